//! `cargo xtask`: development tasks for mcrelay (set-up, build, run, lab, lint, tests, fuzz,
//! bench, install).
//!
//! `cargo xtask` is an alias (.cargo/config.toml) for `cargo run --package xtask --`.

mod bench;
mod cmd;
mod fuzz;
mod install;
mod lab;
mod lint;
mod setup;
mod workspace;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::{
    setup::Scope,
    workspace::{build_mcrelay, Profile},
};

/// Development tasks for mcrelay, the eBPF/XDP multicast relay.
///
/// Start with `cargo xtask setup` (as root) on a fresh Debian machine, then `cargo xtask test`.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Prepare this machine: nightly rust-src, bpf-linker, Debian packages, bpffs.
    ///
    /// Idempotent: every step is skipped when already done. Installing packages and mounting
    /// bpffs need root on Debian; otherwise the commands to run are printed and setup fails.
    Setup,
    /// Build the mcrelay binary (and the eBPF object it embeds).
    ///
    /// Checks the eBPF toolchain first (nightly rust-src, bpf-linker), then runs
    /// `cargo build --package relay`. The binary is target/{debug,release}/mcrelay.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build mcrelay, then run it as root with the given arguments.
    ///
    /// Example (as root): `cargo xtask run -- --help`.
    Run {
        /// Build and run the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for mcrelay (after `--`).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Start the demonstration lab: namespaces where mcrelay carries multicast between segments.
    ///
    /// Runs setup and a debug build first. Needs root.
    Lab {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
    },
    /// Benchmark mcrelay against its peers (bare XDP, bridge, MFC, userspace relay).
    ///
    /// Runs setup and a release build first (`--quick`: debug build), builds namespaces, pushes
    /// live-frames traffic through each middle box and prints a table; writes JSON and an SVG
    /// chart. Needs root. See docs/performance.md.
    Bench {
        /// CI smoke mode: one short repetition, fan-out 1 and 2; checks that every middle box
        /// moved traffic (times nothing).
        #[arg(long)]
        quick: bool,
        /// Write the results as JSON here (default: target/bench/bench.json).
        #[arg(long, value_name = "FILE")]
        json: Option<std::path::PathBuf>,
        /// Write the chart (Mpps against fan-out) here (default: target/bench/bench.svg).
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
        /// Run only these parts (comma separated: direct, tc, forward, control, cost; default all).
        #[arg(long, value_name = "PARTS", value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Check formatting and lints: nightly rustfmt, clippy on the host crates and clippy on
    /// relay-ebpf for its BPF target, all with warnings as errors (what CI runs).
    ///
    /// Runs the toolchain part of setup first (nightly rustfmt, clippy, rust-src, bpf-linker).
    Lint,
    /// Run every test: setup, a debug build of mcrelay, then `cargo test` on the workspace.
    ///
    /// The tests get MCRELAY_BIN (absolute path of target/debug/mcrelay) and RUST_BACKTRACE=1
    /// and run two at a time. Integration tests need root.
    Test {
        /// Arguments for the test binaries after `--`, e.g. a name filter or `--nocapture`.
        #[arg(last = true, value_name = "TEST_ARGS")]
        args: Vec<String>,
    },
    /// Fuzz the parsers (cargo-fuzz, libFuzzer, nightly) for a bounded time per target.
    ///
    /// Installs cargo-fuzz when missing. Targets (fuzz/fuzz_targets): classify (the shared
    /// classifier), membership_parse (IGMP/MLD), config_parse (the configuration file). Prints
    /// the executions per target and the input of any crash; fails when a target crashed. The
    /// corpus grows in fuzz/corpus/TARGET, crash inputs go to fuzz/artifacts/TARGET.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "N", default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Run only this target (default: every one).
        #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        target: Option<String>,
    },
    /// Build the release binary and install it with its systemd unit, default configuration,
    /// man page and shell completions.
    ///
    /// With the default prefix /usr/local the unit goes to /etc/systemd/system and the
    /// configuration to /etc/mcrelay; with any other prefix everything stays under it and the
    /// unit's ExecStart= follows. An existing configuration is never overwritten; files whose
    /// content is unchanged are left alone, so running it twice changes nothing.
    Install {
        /// Installation prefix.
        #[arg(long, value_name = "DIR", default_value = install::DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// Print what would be installed; build and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Commands::Setup => setup::run(Scope::Full),
        Commands::Build { release } => {
            setup::run(Scope::Toolchain)?;
            build_mcrelay(Profile::from_release_flag(release)).map(drop)
        }
        Commands::Run { release, args } => run(Profile::from_release_flag(release), &args),
        Commands::Lab { duration } => lab(duration.map(Duration::from_secs)),
        Commands::Lint => setup::run(Scope::Toolchain).and_then(|()| lint::run()),
        Commands::Test { args } => test(&args),
        Commands::Fuzz { seconds, target } => setup::run(Scope::Toolchain)
            .and_then(|()| setup::ensure_cargo_fuzz())
            .and_then(|()| fuzz::run(seconds, target.as_deref())),
        Commands::Install { prefix, dry_run } => install::run(&prefix, dry_run),
        Commands::Bench { quick, json, svg, only } => bench(quick, json, svg, only),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cargo xtask run`: build, then replace this process with mcrelay (so signals reach it).
fn run(profile: Profile, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "mcrelay needs root (it loads eBPF programs): run this as root, or run \
             `cargo xtask build{}` and then `sudo target/{}/mcrelay ...`",
            if profile == Profile::Release { " --release" } else { "" },
            if profile == Profile::Release { "release" } else { "debug" }
        );
    }
    setup::run(Scope::Toolchain)?;
    let binary = build_mcrelay(profile)?;
    let mut mcrelay = Command::new(&binary);
    mcrelay.args(args);
    println!("[run] {}", cmd::describe(&mcrelay));
    let error = mcrelay.exec();
    Err(error).with_context(|| format!("could not start {}", binary.display()))
}

/// `cargo xtask lab`: set up, build, then hand over to the lab.
fn lab(duration: Option<Duration>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the lab needs root (network namespaces, eBPF): run `cargo xtask lab` as root");
    }
    setup::run(Scope::Full)?;
    let options = lab::LabOptions { duration, mcrelay: build_mcrelay(Profile::Debug)? };
    let until = match options.duration {
        Some(duration) => format!("for {}s", duration.as_secs()),
        None => "until Ctrl-C".to_owned(),
    };
    println!("[lab] starting with {} {until}", options.mcrelay.display());
    lab::run(options)
}

/// `cargo xtask bench`: set up, build mcrelay (release; debug for `--quick`), benchmark.
fn bench(
    quick: bool,
    json: Option<std::path::PathBuf>,
    svg: Option<std::path::PathBuf>,
    only: Vec<String>,
) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmark needs root (network namespaces, eBPF): run `cargo xtask bench` as root"
        );
    }
    setup::run(Scope::Full)?;
    let profile = if quick { Profile::Debug } else { Profile::Release };
    let mcrelay = build_mcrelay(profile)?;
    let object = bench::find_object(&mcrelay)?;
    bench::run(&bench::Options { quick, json, svg, mcrelay, object, only })
}

/// `cargo xtask test`: set up, build mcrelay, run the workspace tests; prints the wall time.
fn test(test_args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let result = setup::run(Scope::Full)
        .and_then(|()| build_mcrelay(Profile::Debug))
        .and_then(|mcrelay| run_tests(&mcrelay, test_args));
    let elapsed = started.elapsed().as_secs();
    let outcome = if result.is_ok() { "passed" } else { "FAILED" };
    println!("[test] {outcome} in {}m{:02}s", elapsed / 60, elapsed % 60);
    result
}

/// `cargo test` on the default workspace members (all but the BPF-only relay-ebpf).
fn run_tests(mcrelay: &Path, test_args: &[String]) -> anyhow::Result<()> {
    let mut cargo_test = cmd::cargo();
    cargo_test
        .current_dir(workspace::root())
        .env("MCRELAY_BIN", mcrelay)
        .env("RUST_BACKTRACE", "1")
        .args(["test", "--no-fail-fast", "--", "--test-threads=2"])
        .args(test_args);
    println!("[test] {}", cmd::describe(&cargo_test));
    cmd::run(&mut cargo_test)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn passes_arguments_after_double_dash() {
        let cli = Cli::parse_from(["cargo xtask", "run", "--release", "--", "--config", "x.toml"]);
        match cli.command {
            Commands::Run { release, args } => {
                assert!(release);
                assert_eq!(args, ["--config", "x.toml"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
