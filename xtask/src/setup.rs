//! `cargo xtask setup`: makes a fresh Debian machine ready to build, run and test mcrelay.
//!
//! Every step first checks whether it is already satisfied and prints one line saying what it
//! found or what it does, so a second run changes nothing. Steps that need root (Debian packages,
//! mounting bpffs) are never attempted without it: the commands to run are printed instead and
//! set-up fails.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::cmd;

/// The bpf-linker release the eBPF build is known to work with (with aya 0.14 and nightly's
/// LLVM 22; a plain `cargo install bpf-linker` does not build here, see [`ensure_bpf_linker`]).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the bpf-linker binary finds libLLVM (its RUNPATH): must outlive the install.
const TOOLCHAIN_PREFIX_UNDER_HOME: &str = ".local/share/mcrelay-toolchain";

/// Where bpffs is mounted; aya pins maps and links under it.
const BPFFS: &str = "/sys/fs/bpf";

/// Debian packages the integration tests, the lab and debugging need, each with one command it
/// provides (how a machine without dpkg is checked):
/// - iproute2: `ip` for namespaces, veth, TAP, bridges and XDP attachments;
/// - ethtool: GRO on veth peers, TX checksum offload off on test senders;
/// - bpftool: inspecting loaded programs, maps and pins;
/// - tcpdump: watching traffic in the lab and when a test fails;
/// - openvpn: real OpenVPN TAP peers in integration tests;
/// - socat: multicast senders and receivers;
/// - iputils-ping: reachability checks inside namespaces;
/// - smcroute: a real multicast routing daemon (and `smcroutectl join`) as a peer;
/// - kmod: `modprobe` for veth, tun and bridge when they are modules;
/// - util-linux: `nsenter` and `mount`;
/// - procps: `sysctl`, `ps`;
/// - nftables, iptables: `mcrelay doctor`'s firewall check is tested against real rules;
/// - openssl: certificates for the OpenVPN test bed;
/// - systemd: `systemd-analyze verify` of the unit file;
/// - wireguard-go, wireguard-tools: real WireGuard peers (this kernel may lack the module);
/// - igmpproxy: the routed side-by-side test runs it on the same bed as mcrelay.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    ("openvpn", "openvpn"),
    ("socat", "socat"),
    ("iputils-ping", "ping"),
    ("smcroute", "smcroute"),
    ("kmod", "modprobe"),
    ("util-linux", "nsenter"),
    ("procps", "sysctl"),
    ("nftables", "nft"),
    ("iptables", "iptables"),
    ("openssl", "openssl"),
    ("systemd", "systemd-analyze"),
    ("wireguard-go", "wireguard-go"),
    ("wireguard-tools", "wg"),
    ("igmpproxy", "igmpproxy"),
];

/// How much of the set-up to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Only what building and linting need: nightly rust-src, rustfmt and clippy, clippy for
    /// the host toolchain, bpf-linker (quick when already there).
    Toolchain,
    /// Everything: toolchain, Debian packages and bpffs.
    Full,
}

/// Runs the set-up steps of `scope`.
pub fn run(scope: Scope) -> anyhow::Result<()> {
    let rustc_version = check_nightly()?;
    ensure_components(Some("nightly"), NIGHTLY_COMPONENTS)?;
    ensure_components(None, HOST_COMPONENTS)?;
    ensure_bpf_linker(&rustc_version)?;
    if scope == Scope::Toolchain {
        return Ok(());
    }

    let host = Host::detect();
    let mut manual_steps = Vec::new();
    ensure_packages(&host, &mut manual_steps)?;
    ensure_bpffs(&host, &mut manual_steps)?;
    if manual_steps.is_empty() {
        return Ok(());
    }

    let reason = host.why_not_privileged().unwrap_or("some steps could not be done");
    eprintln!("[setup] {reason}: run these yourself, then `cargo xtask setup` again:");
    for step in &manual_steps {
        eprintln!("    {step}");
    }
    bail!("set-up is incomplete ({reason})")
}

/// What this machine allows the privileged steps to do.
struct Host {
    root: bool,
    /// `/etc/debian_version` exists and `apt-get` is on PATH.
    debian: bool,
}

impl Host {
    fn detect() -> Self {
        Self {
            root: nix::unistd::geteuid().is_root(),
            debian: Path::new("/etc/debian_version").exists() && cmd::which("apt-get").is_some(),
        }
    }

    fn why_not_privileged(&self) -> Option<&'static str> {
        match (self.root, self.debian) {
            (false, false) => Some("not running as root, and not a Debian system"),
            (false, true) => Some("not running as root"),
            (true, false) => Some("not a Debian system (no /etc/debian_version or no apt-get)"),
            (true, true) => None,
        }
    }

    /// A command line as the user must type it: with `sudo` when we are not root.
    fn as_root(&self, command: &Command) -> String {
        let line = cmd::describe(command);
        if self.root {
            line
        } else {
            format!("sudo {line}")
        }
    }
}

/// Fails with the install command when the nightly toolchain is missing (it is preinstalled on the
/// project's machines). Returns the output of `rustc +nightly -vV`.
fn check_nightly() -> anyhow::Result<String> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required; install it from https://rustup.rs")?;
    if !has_nightly(&toolchains) {
        bail!(
            "the nightly Rust toolchain is not installed (the eBPF crate needs it); run:\n    \
             rustup toolchain install nightly --profile minimal --component rust-src,rustfmt,clippy"
        );
    }
    let version = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    println!("[setup] nightly toolchain: {}", version.lines().next().unwrap_or("(no version)"));
    Ok(version)
}

/// Whether `rustup toolchain list` shows the floating nightly (not only dated ones).
fn has_nightly(toolchains: &str) -> bool {
    toolchains.lines().filter_map(|line| line.split_whitespace().next()).any(|name| {
        name == "nightly"
            || name
                .strip_prefix("nightly-")
                .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    })
}

/// Components of the nightly toolchain: rust-src for `-Z build-std=core` (the eBPF build),
/// rustfmt because rustfmt.toml uses nightly-only options, clippy to lint relay-ebpf for its BPF
/// target (`cargo xtask lint`).
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "rustfmt", "clippy"];

/// Components of the toolchain that runs xtask: clippy for the host crates (`cargo xtask lint`).
const HOST_COMPONENTS: &[&str] = &["clippy"];

/// Adds the missing `components` to `toolchain` (`None`: the toolchain running xtask, which
/// rustup names in RUSTUP_TOOLCHAIN).
fn ensure_components(toolchain: Option<&str>, components: &[&str]) -> anyhow::Result<()> {
    let label = toolchain
        .map(str::to_owned)
        .or_else(|| env::var("RUSTUP_TOOLCHAIN").ok())
        .unwrap_or_else(|| "default toolchain".to_owned());
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--installed"]);
    if let Some(toolchain) = toolchain {
        list.args(["--toolchain", toolchain]);
    }
    let installed = cmd::output(&mut list)?;
    let missing: Vec<&str> =
        components.iter().copied().filter(|c| !has_component(&installed, c)).collect();
    if missing.is_empty() {
        println!("[setup] {} ({label}): already installed", components.join(", "));
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    if let Some(toolchain) = toolchain {
        add.args(["--toolchain", toolchain]);
    }
    println!("[setup] {} ({label}): installing: {}", missing.join(", "), cmd::describe(&add));
    cmd::run(&mut add)
}

/// Whether `rustup component list --installed` lists `component` (with or without a target
/// suffix: `rust-src`, `clippy-x86_64-unknown-linux-gnu`).
fn has_component(installed: &str, component: &str) -> bool {
    installed.lines().filter_map(|line| line.split_whitespace().next()).any(|name| {
        name.strip_prefix(component).is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    })
}

/// Installs cargo-fuzz when `cargo fuzz` does not run. Used by `cargo xtask fuzz` only: no
/// [`Scope`] includes it, so set-up and CI never spend the minute it takes to build.
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if let Some(version) = cmd::probe(cmd::cargo().args(["fuzz", "--version"])) {
        println!("[setup] cargo-fuzz: already installed ({})", version.trim());
        return Ok(());
    }
    let mut install = cmd::cargo();
    install.args(["install", "cargo-fuzz", "--locked"]);
    println!("[setup] cargo-fuzz: not found; installing: {}", cmd::describe(&install));
    cmd::run(&mut install)
}

/// Installs bpf-linker linked against the nightly toolchain's own libLLVM: the crate's default
/// LLVM does not exist on these machines, and the linker must read the bitcode that nightly's
/// LLVM writes.
fn ensure_bpf_linker(rustc_version: &str) -> anyhow::Result<()> {
    let on_path = bpf_linker_version(Path::new("bpf-linker"));
    if on_path.as_deref() == Some(BPF_LINKER_VERSION) {
        let location = cmd::which("bpf-linker").unwrap_or_else(|| "bpf-linker".into());
        println!(
            "[setup] bpf-linker {BPF_LINKER_VERSION}: already installed ({})",
            location.display()
        );
        return Ok(());
    }
    let installed = cargo_install_root()?.join("bin").join("bpf-linker");
    if bpf_linker_version(&installed).as_deref() == Some(BPF_LINKER_VERSION) {
        bail!(path_advice(&installed, on_path.as_deref()));
    }

    let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let llvm_dir = Path::new(sysroot.trim()).join("lib");
    let names = fs::read_dir(&llvm_dir)
        .with_context(|| format!("reading {}", llvm_dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.file_name().to_string_lossy().into_owned()));
    let soname = pick_libllvm(names).with_context(|| {
        format!("finding the nightly toolchain's libLLVM in {}", llvm_dir.display())
    })?;
    let libllvm = llvm_dir.join(&soname);
    let major = llvm_major(rustc_version)
        .context("`rustc +nightly -vV` printed no `LLVM version: N.x.y` line")?;

    // bpf-linker's build looks for PREFIX/lib/libLLVM.so; the binary records the soname and
    // PREFIX/lib as its RUNPATH, so both links must stay where they are.
    let prefix = toolchain_prefix()?;
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    replace_symlink(&libllvm, &prefix_lib.join("libLLVM.so"))?;
    replace_symlink(&libllvm, &prefix_lib.join(&soname))?;

    let feature = format!("llvm-{major}");
    let mut install = cmd::cargo();
    install.env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
        "--no-default-features",
        "--features",
        &feature,
    ]);
    let found = match &on_path {
        Some(version) => format!("found {version}"),
        None => "not found".to_owned(),
    };
    println!(
        "[setup] bpf-linker {BPF_LINKER_VERSION}: {found}; building it against {} (about a minute): {}",
        libllvm.display(),
        cmd::describe(&install)
    );
    cmd::run(&mut install)?;

    match bpf_linker_version(&installed) {
        Some(version) if version == BPF_LINKER_VERSION => {}
        other => bail!(
            "{} reports {} after `cargo install`; check that {} still exists",
            installed.display(),
            other.as_deref().unwrap_or("nothing (it does not run)"),
            libllvm.display()
        ),
    }
    if bpf_linker_version(Path::new("bpf-linker")).as_deref() != Some(BPF_LINKER_VERSION) {
        bail!(path_advice(&installed, on_path.as_deref()));
    }
    Ok(())
}

/// The version a bpf-linker binary reports, or `None` when it does not run.
fn bpf_linker_version(binary: &Path) -> Option<String> {
    let output = cmd::probe(Command::new(binary).arg("--version"))?;
    // "bpf-linker 0.13.0"
    output.split_whitespace().nth(1).map(str::to_owned)
}

/// Why a working bpf-linker is not the one aya-build will run, and what to do about it.
fn path_advice(installed: &Path, on_path: Option<&str>) -> String {
    let problem = match on_path {
        Some(version) => format!("the bpf-linker found on PATH reports {version}"),
        None => "there is no working bpf-linker on PATH".to_owned(),
    };
    let dir = installed.parent().unwrap_or(installed);
    format!(
        "bpf-linker {BPF_LINKER_VERSION} is installed at {} but {problem}: put {} first in PATH \
         (for ~/.cargo/bin: `. \"$HOME/.cargo/env\"`)",
        installed.display(),
        dir.display()
    )
}

/// Picks the libLLVM shared object (`libLLVM.so.<version>-rust-<release>`) among the file names
/// of a toolchain's `lib` directory. Its name is also its soname.
fn pick_libllvm(names: impl IntoIterator<Item = String>) -> anyhow::Result<String> {
    let mut candidates: Vec<String> = names
        .into_iter()
        .filter(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .collect();
    match candidates.len() {
        0 => bail!("no libLLVM.so.<version>-rust-<release> file"),
        1 => Ok(candidates.remove(0)),
        _ => bail!("several libLLVM files, cannot choose: {}", candidates.join(", ")),
    }
}

/// The LLVM major version from `rustc -vV` output (`LLVM version: 22.1.4` -> 22).
fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.trim().strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next()?.parse().ok())
}

/// Where `cargo install` puts binaries (ignoring `install.root` in cargo configuration).
fn cargo_install_root() -> anyhow::Result<PathBuf> {
    if let Some(root) = env::var_os("CARGO_INSTALL_ROOT") {
        return Ok(root.into());
    }
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    Ok(home_dir()?.join(".cargo"))
}

/// `$HOME/.local/share/mcrelay-toolchain`.
fn toolchain_prefix() -> anyhow::Result<PathBuf> {
    Ok(home_dir()?.join(TOOLCHAIN_PREFIX_UNDER_HOME))
}

fn home_dir() -> anyhow::Result<PathBuf> {
    env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// Makes `link` a symbolic link to `target`, replacing whatever file or link is there.
fn replace_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// Installs the missing Debian packages (or, elsewhere, checks the commands they provide).
fn ensure_packages(host: &Host, manual_steps: &mut Vec<String>) -> anyhow::Result<()> {
    if !host.debian {
        let missing: Vec<String> = DEBIAN_PACKAGES
            .iter()
            .filter(|(_, command)| find_command(command).is_none())
            .map(|(package, command)| format!("{command} (Debian: {package})"))
            .collect();
        if missing.is_empty() {
            println!(
                "[setup] packages: not Debian, but all {} required commands found",
                DEBIAN_PACKAGES.len()
            );
        } else {
            println!(
                "[setup] packages: not Debian, cannot install; missing commands: {}",
                missing.join(", ")
            );
            manual_steps.push(format!("install the packages that provide: {}", missing.join(", ")));
        }
        return Ok(());
    }

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        println!("[setup] Debian packages: all {} installed", DEBIAN_PACKAGES.len());
        return Ok(());
    }

    let mut update = apt_get();
    update.arg("update");
    let mut install = apt_get();
    install.args(["install", "--yes", "--no-install-recommends"]).args(&missing);
    if !host.root {
        println!("[setup] Debian packages: missing {} (needs root)", missing.join(" "));
        manual_steps.push(host.as_root(&update));
        manual_steps.push(host.as_root(&install));
        return Ok(());
    }
    println!("[setup] Debian packages: installing {}", missing.join(" "));
    cmd::run(&mut update)?;
    cmd::run(&mut install)?;
    let still_missing: Vec<&str> =
        missing.into_iter().filter(|package| !dpkg_installed(package)).collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get succeeded but these packages are still not installed: {}",
            still_missing.join(" ")
        );
    }
    Ok(())
}

/// `apt-get` that never asks questions.
fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    command.env("DEBIAN_FRONTEND", "noninteractive").stdin(Stdio::null());
    command
}

fn dpkg_installed(package: &str) -> bool {
    cmd::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// Finds a command in PATH or in the sbin directories a non-root PATH often lacks.
fn find_command(name: &str) -> Option<PathBuf> {
    cmd::which(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|path| path.is_file())
    })
}

/// Mounts bpffs at /sys/fs/bpf (not mounted at boot on these machines).
fn ensure_bpffs(host: &Host, manual_steps: &mut Vec<String>) -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if is_bpffs_mounted(&mounts) {
        println!("[setup] bpffs: already mounted at {BPFFS}");
        return Ok(());
    }
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", BPFFS]);
    if !host.root {
        println!("[setup] bpffs: not mounted at {BPFFS} (needs root)");
        manual_steps.push(host.as_root(&mount));
        return Ok(());
    }
    println!("[setup] bpffs: mounting: {}", cmd::describe(&mount));
    cmd::run(&mut mount)
}

/// Whether `/proc/mounts` content has a bpf filesystem at /sys/fs/bpf.
fn is_bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_llvm_major() {
        let output = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                      host: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(output), Some(22));
        assert_eq!(llvm_major("rustc 1.97.0-nightly\n"), None);
    }

    #[test]
    fn picks_the_libllvm_soname_not_the_linker_script() {
        let names = [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-b5a965480ee51f9a.so",
            "rustlib",
        ]
        .map(String::from);
        assert_eq!(
            pick_libllvm(names).expect("one candidate"),
            "libLLVM.so.22.1-rust-1.97.0-nightly"
        );
        assert!(pick_libllvm(["rustlib".to_owned()]).is_err());
    }

    #[test]
    fn recognises_nightly_and_components() {
        let toolchains = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                          nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(toolchains));
        assert!(!has_nightly(
            "stable-x86_64-unknown-linux-gnu\nnightly-2026-01-01-x86_64-unknown-linux-gnu\n"
        ));
        let installed = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n\
                         rust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(has_component(installed, "rust-src"));
        assert!(has_component(installed, "clippy"));
        assert!(!has_component(installed, "rustfmt"));
        assert!(!has_component(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
    }

    #[test]
    fn detects_bpffs_in_proc_mounts() {
        let without = "sysfs /sys sysfs rw,nosuid 0 0\nproc /proc proc rw 0 0\n";
        assert!(!is_bpffs_mounted(without));
        let with = format!("{without}bpf /sys/fs/bpf bpf rw,relatime 0 0\n");
        assert!(is_bpffs_mounted(&with));
        assert!(!is_bpffs_mounted("tmpfs /sys/fs/bpf tmpfs rw 0 0\n"));
    }
}
