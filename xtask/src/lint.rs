//! `cargo xtask lint`: formatting and clippy over the whole tree, the way CI checks it.
//!
//! Three checks, all of which must pass:
//! 1. `cargo +nightly fmt --all --check`: rustfmt.toml uses nightly-only options
//!    (`group_imports`, `imports_granularity`), which stable rustfmt ignores, so the tree is
//!    formatted, and checked, with nightly's rustfmt.
//! 2. `cargo clippy --workspace --exclude relay-ebpf --all-targets -- -D warnings`: the host
//!    crates, with the toolchain that runs xtask.
//! 3. clippy on relay-ebpf for `bpfel-unknown-none` with the nightly toolchain, `-Z build-std=core`
//!    and the flags relay/build.rs (aya-build) compiles it with; `-D warnings` too. Only the lib
//!    and bin targets: `#![no_std]` programs have no test harness.
//!
//! `cargo xtask setup` installs what they need (nightly rustfmt and clippy, rust-src).

use std::{ffi::OsString, path::Path, process::Command};

use anyhow::bail;

use crate::{cmd, workspace};

/// The eBPF crate, which only builds for [`BPF_TARGET`].
const EBPF_PACKAGE: &str = "relay-ebpf";

/// The target relay/build.rs builds [`EBPF_PACKAGE`] for (aya-build on a little-endian host).
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Runs every check, all of them even when one fails, and fails naming those that did.
pub fn run() -> anyhow::Result<()> {
    let root = workspace::root();
    let ebpf_target_dir = workspace::target_dir()?.join("lint-ebpf");
    let mut checks = [
        ("rustfmt", fmt_check(root)),
        ("clippy (host crates)", clippy_host(root)),
        ("clippy (relay-ebpf, bpfel-unknown-none)", clippy_ebpf(root, &ebpf_target_dir)),
    ];
    let mut failed = Vec::new();
    for (name, command) in &mut checks {
        println!("[lint] {name}: {}", cmd::describe(command));
        if let Err(error) = cmd::run(command) {
            eprintln!("[lint] {name}: FAILED: {error:#}");
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {} (`cargo +nightly fmt --all` fixes formatting)", failed.join(", "));
    }
    println!("[lint] passed");
    Ok(())
}

/// A command of the nightly toolchain's cargo, whatever toolchain runs xtask.
fn nightly_cargo(root: &Path) -> Command {
    let mut command = Command::new("rustup");
    command.current_dir(root).args(["run", "nightly", "cargo"]);
    // Set by cargo for what it runs; they would make nightly cargo use xtask's compiler.
    for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTDOC"] {
        command.env_remove(key);
    }
    command
}

fn fmt_check(root: &Path) -> Command {
    let mut command = nightly_cargo(root);
    command.args(["fmt", "--all", "--check"]);
    command
}

fn clippy_host(root: &Path) -> Command {
    let mut command = cmd::cargo();
    command.current_dir(root).args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    command
}

fn clippy_ebpf(root: &Path, target_dir: &Path) -> Command {
    let mut command = nightly_cargo(root);
    command
        .env("CARGO_ENCODED_RUSTFLAGS", ebpf_rustflags(std::env::consts::ARCH))
        .args(["clippy", "--package", EBPF_PACKAGE, "--release", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir)
        .args(["--", "-D", "warnings"]);
    command
}

/// The flags aya-build 0.2 compiles the eBPF crate with (`CARGO_ENCODED_RUSTFLAGS`, separated
/// by 0x1f): `bpf_target_arch` is the host's architecture (aya-ebpf reads it for the
/// architecture-specific register layout), plus BTF debug information.
fn ebpf_rustflags(host_arch: &str) -> OsString {
    let arch = if host_arch.starts_with("riscv64") { "riscv64" } else { host_arch };
    [format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()]
        .join("\x1f")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_rustflags_match_aya_build() {
        assert_eq!(
            ebpf_rustflags("x86_64"),
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"
        );
        assert!(ebpf_rustflags("riscv64gc").to_string_lossy().contains("\"riscv64\""));
    }

    #[test]
    fn host_clippy_leaves_out_the_ebpf_crate() {
        let command = clippy_host(Path::new("/"));
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|w| w == ["--exclude", EBPF_PACKAGE]));
        assert!(args.ends_with(&["-D".to_owned(), "warnings".to_owned()]));
    }
}
