//! `cargo xtask fuzz`: runs the cargo-fuzz targets in fuzz/ for a bounded time each.
//!
//! The targets (fuzz/fuzz_targets) are the shared classifier, the IGMP/MLD parser and the
//! configuration parser. Each runs under libFuzzer for `--seconds` with nightly; its corpus
//! grows in fuzz/corpus/TARGET (not committed) and starts from the seed directories below; a
//! crash input is written to fuzz/artifacts/TARGET. libFuzzer's output goes to a log file per
//! target under the build directory; what matters (executions, crash input) is printed.
//!
//! Built without a sanitizer: the parsers are safe Rust, so what fuzzing looks for is panics
//! and broken invariants (assertions in the targets, overflow checks, debug assertions), and
//! an uninstrumented build runs about twice as many inputs per second as one with AddressSanitizer.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::{cmd, workspace};

/// Every fuzz target (a file fuzz/fuzz_targets/NAME.rs and a `[[bin]]` in fuzz/Cargo.toml).
pub const TARGETS: &[&str] = &["classify", "membership_parse", "config_parse"];

/// Seconds per target when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 30;

/// libFuzzer's limit for one input (its default is 20 minutes).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// Read-only seed directories of a target, relative to the workspace root.
fn seeds(target: &str) -> &'static [&'static str] {
    match target {
        "config_parse" => &["packaging", "tests/data/config"],
        _ => &[],
    }
}

/// What one target's run found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    /// `stat::number_of_executed_units`.
    executions: Option<u64>,
    /// `stat::average_exec_per_sec`.
    per_second: Option<u64>,
    /// Inputs libFuzzer saved as failing ("Test unit written to PATH").
    crashes: Vec<PathBuf>,
}

/// Builds every target, runs `target` (or all of them) for `seconds` each, prints a summary;
/// fails when a target crashed or could not run.
pub fn run(seconds: u64, target: Option<&str>) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!("no fuzz target {name}; the targets are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let root = workspace::root();
    let build_dir = workspace::target_dir()?.join("fuzz");
    let log_dir = build_dir.join("logs");
    fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;

    let mut build = cargo_fuzz(root, "build", &build_dir);
    println!("[fuzz] {}", cmd::describe(&build));
    cmd::run(&mut build)?;

    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for name in targets {
        let corpus = root.join("fuzz").join("corpus").join(name);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let log = log_dir.join(format!("{name}.log"));
        let mut fuzz = cargo_fuzz(root, "run", &build_dir);
        fuzz.arg(name).arg(&corpus).args(seeds(name).iter().map(|dir| root.join(dir)));
        fuzz.args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"]);
        // An input that runs this long is a hang: saved and reported like a crash.
        fuzz.arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"));
        println!("[fuzz] {name}: {seconds}s: {} (log: {})", cmd::describe(&fuzz), log.display());
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stderr = file.try_clone().context("duplicating the log file handle")?;
        let status = fuzz
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .status()
            .with_context(|| format!("could not start `{}`", cmd::describe(&fuzz)))?;
        let text =
            fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        let outcome = parse_log(&text);
        let executions = outcome.executions.map_or("?".to_owned(), |n| n.to_string());
        let rate = outcome.per_second.map_or("?".to_owned(), |n| n.to_string());
        let result = if status.success() && outcome.crashes.is_empty() {
            "ok".to_owned()
        } else {
            failed.push(name);
            eprintln!("[fuzz] {name}: FAILED ({status}); from {}:", log.display());
            for line in panic_message(&text).chain(tail(&text, 30)) {
                eprintln!("    {line}");
            }
            match outcome.crashes.as_slice() {
                [] => "FAILED (no crash input saved: see the log)".to_owned(),
                crashes => format!(
                    "CRASH: {} (reproduce: cargo +nightly fuzz run --sanitizer none {name} PATH)",
                    crashes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            }
        };
        summary.push(format!("{name:<18} {executions:>12} runs {rate:>8}/s  {result}"));
    }
    println!("[fuzz] summary ({seconds}s per target):");
    for line in &summary {
        println!("    {line}");
    }
    if !failed.is_empty() {
        bail!("fuzz target(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo +nightly fuzz SUBCOMMAND` in the workspace root, without sanitizer, building in
/// `build_dir`.
fn cargo_fuzz(root: &Path, subcommand: &str, build_dir: &Path) -> Command {
    let mut command = Command::new("rustup");
    command.current_dir(root).args(["run", "nightly", "cargo", "fuzz", subcommand]);
    command.args(["--sanitizer", "none", "--target-dir"]).arg(build_dir);
    // Set by the cargo that runs xtask; they would make nightly cargo use its compiler.
    for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTDOC"] {
        command.env_remove(key);
    }
    command
}

/// Picks the final statistics and the saved crash inputs out of libFuzzer's output.
fn parse_log(text: &str) -> Outcome {
    let stat = |name: &str| {
        text.lines()
            .filter_map(|line| line.trim().strip_prefix(name)?.trim().parse().ok())
            .next_back()
    };
    let crashes = text
        .lines()
        .filter_map(|line| {
            let (_, path) = line.split_once("Test unit written to ")?;
            Some(PathBuf::from(path.trim()))
        })
        .collect();
    Outcome {
        executions: stat("stat::number_of_executed_units:"),
        per_second: stat("stat::average_exec_per_sec:"),
        crashes,
    }
}

/// The first panic in a target's output: its location line and the message line after it.
fn panic_message(text: &str) -> impl Iterator<Item = &str> {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|line| line.contains("panicked at"));
    at.map_or(&[][..], |i| &lines[i..(i + 2).min(lines.len())]).to_vec().into_iter()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> impl Iterator<Item = &str> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines.into_iter().skip(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_final_stats_and_crash_inputs() {
        let log = "\
#1048576\tpulse  cov: 410 ft: 1200 corp: 150/9Kb exec/s: 34952 rss: 60Mb
Done 1048576 runs in 31 second(s)
stat::number_of_executed_units: 1048576
stat::average_exec_per_sec:     33825
stat::new_units_added:          149
";
        assert_eq!(
            parse_log(log),
            Outcome { executions: Some(1_048_576), per_second: Some(33_825), crashes: vec![] }
        );
        let crash = "\
thread '<unnamed>' panicked at fuzz_targets/classify.rs:12:5:
==1234== ERROR: libFuzzer: deadly signal
artifact_prefix='/w/fuzz/artifacts/classify/'; Test unit written to /w/fuzz/artifacts/classify/crash-da39a3ee
stat::number_of_executed_units: 77
";
        let outcome = parse_log(crash);
        assert_eq!(
            panic_message(crash).collect::<Vec<_>>(),
            [
                "thread '<unnamed>' panicked at fuzz_targets/classify.rs:12:5:",
                "==1234== ERROR: libFuzzer: deadly signal"
            ]
        );
        assert_eq!(outcome.executions, Some(77));
        assert_eq!(outcome.crashes, [PathBuf::from("/w/fuzz/artifacts/classify/crash-da39a3ee")]);
    }

    #[test]
    fn every_target_has_a_source_file() {
        for target in TARGETS {
            let file = workspace::root().join("fuzz/fuzz_targets").join(format!("{target}.rs"));
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }

    #[test]
    fn runs_nightly_cargo_fuzz_without_sanitizer() {
        let command = cargo_fuzz(Path::new("/"), "run", Path::new("/t"));
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args[..5], ["run", "nightly", "cargo", "fuzz", "run"]);
        assert!(args.windows(2).any(|w| w == ["--sanitizer", "none"]));
    }
}
