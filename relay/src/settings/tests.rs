use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser as _;

use super::*;
use crate::{
    cli::{Cli, Command},
    config::parse_str,
};

/// Parses `mcrelay ARGS...` into the run arguments and the global `--pin-root`.
fn run_args(argv: &[&str]) -> (RunArgs, Option<PathBuf>) {
    let cli = Cli::try_parse_from(std::iter::once("mcrelay").chain(argv.iter().copied()))
        .expect("valid command line");
    match cli.command {
        Command::Run(args) => (*args, cli.pin_root),
        other => panic!("expected run, got {other:?}"),
    }
}

fn settings(argv: &[&str], file: Option<&str>) -> Result<Settings, UsageError> {
    let file = file.map(|text| parse_str(text).expect("valid file"));
    let (args, pin_root) = run_args(argv);
    Settings::new(&args, pin_root.as_deref(), file.as_ref())
}

fn error(argv: &[&str], file: Option<&str>) -> String {
    settings(argv, file).expect_err("rejected").to_string()
}

const FILE: &str = r#"
pin_root = "/sys/fs/bpf/other"
pin = false
xdp_mode = "skb"

[[port]]
name = "eth1"
role = "router"

[[port]]
name = "tap*"
fast_leave = true
per_client = true
xdp_mode = "native"

[[static]]
group = "239.1.1.1"
ports = ["eth1", "tap0"]

[policy]
unknown = "drop"

[timers]
robustness = 3
query_interval = 60
query_response_interval = 5.5
last_member_interval = 0.5

[querier]
enabled = false
igmp_version = 2
mld_version = 1

[loop_guard]
hello_interval = 0.5
holdtime = 2
"#;

fn group(text: &str) -> IpAddr {
    text.parse().expect("address")
}

#[test]
fn no_file_and_no_options_are_the_documented_defaults() {
    let s = settings(&["run"], None).expect("valid");
    assert_eq!(s.pin_root, Path::new(crate::paths::PIN_ROOT));
    assert!(s.pin);
    assert_eq!(s.xdp_mode, XdpMode::Auto);
    assert_eq!(s.unknown, UnknownGroups::RouterPorts);
    assert_eq!(s.membership, membership::Config::default());
    assert!(s.querier);
    assert_eq!((s.igmp_version, s.mld_version), (IgmpVersion::V3, MldVersion::V2));
    assert_eq!(s.hello_interval, Duration::from_secs(1));
    assert_eq!(s.hello_holdtime, Duration::from_millis(3500));
    // An empty file is the same as no file.
    assert_eq!(settings(&["run"], Some("")).expect("valid"), s);
}

#[test]
fn the_file_fills_in_what_the_command_line_left_out() {
    let s = settings(&["run"], Some(FILE)).expect("valid");
    assert_eq!(s.patterns, ["eth1", "tap*"]);
    assert_eq!(
        s.statics,
        [StaticGroup { group: group("239.1.1.1"), ifaces: vec!["eth1".into(), "tap0".into()] }]
    );
    assert_eq!(s.xdp_mode, XdpMode::Skb);
    assert_eq!(s.unknown, UnknownGroups::Drop);
    assert!(!s.pin);
    assert_eq!(s.pin_root, Path::new("/sys/fs/bpf/other"));
    let m = &s.membership;
    assert_eq!(m.robustness, 3);
    assert_eq!(m.query_interval, Duration::from_secs(60));
    assert_eq!(m.query_response_interval, Duration::from_millis(5500));
    assert_eq!(m.last_member_query_interval, Duration::from_millis(500));
    assert_eq!((s.igmp_version, s.mld_version), (IgmpVersion::V2, MldVersion::V1));
    assert!(!s.querier);
    assert_eq!(s.fast_leave, ["tap*"]);
    assert_eq!(s.router_ports, ["eth1"]);
    assert_eq!(s.per_client, ["tap*"]);
    assert_eq!(s.hello_interval, Duration::from_millis(500));
    assert_eq!(s.hello_holdtime, Duration::from_secs(2));
    assert_eq!(s.xdp_mode_for("tap3"), XdpMode::Native);
    assert_eq!(s.xdp_mode_for("eth1"), XdpMode::Skb);
    assert_eq!(s.xdp_mode_for("eth9"), XdpMode::Skb);
    let tap = s.port_options("tap3");
    assert!(tap.fast_leave && !tap.router_port && !tap.querier);
    assert!(s.port_options("eth1").router_port);
    assert!(s.is_per_client("tap0") && !s.is_per_client("eth1"));
}

#[test]
fn the_command_line_wins_even_with_default_values() {
    let s = settings(
        &[
            "--pin-root",
            "/sys/fs/bpf/mine",
            "run",
            "-i",
            "eth2",
            "-i",
            "eth1",
            "--static",
            "239.2.2.2@eth2",
            "--xdp-mode",
            "auto",
            "--unknown",
            "router-ports",
            "--query-interval",
            "125",
            "--robustness",
            "2",
            "--igmp-version",
            "3",
            "--fast-leave",
            "eth2",
            "--router-port",
            "eth1",
            "--hello-holdtime",
            "3.5",
        ],
        Some(FILE),
    )
    .expect("valid");
    assert_eq!(s.patterns, ["eth1", "tap*", "eth2"], "added, without duplicates");
    assert_eq!(
        s.statics.iter().map(|st| st.group).collect::<Vec<_>>(),
        [group("239.1.1.1"), group("239.2.2.2")]
    );
    assert_eq!(s.xdp_mode, XdpMode::Auto);
    assert_eq!(s.unknown, UnknownGroups::RouterPorts);
    assert_eq!(s.membership.query_interval, Duration::from_secs(125));
    assert_eq!(s.membership.robustness, 2);
    assert_eq!(s.igmp_version, IgmpVersion::V3);
    // Not given on the command line: from the file.
    assert_eq!(s.membership.query_response_interval, Duration::from_millis(5500));
    assert_eq!(s.mld_version, MldVersion::V1);
    assert!(!s.querier);
    assert_eq!(s.hello_interval, Duration::from_millis(500));
    assert_eq!(s.hello_holdtime, Duration::from_millis(3500));
    assert_eq!(s.fast_leave, ["tap*", "eth2"]);
    assert_eq!(s.router_ports, ["eth1"]);
    assert_eq!(s.pin_root, Path::new("/sys/fs/bpf/mine"));
    // --xdp-mode on the command line beats the per-port setting too.
    assert_eq!(s.xdp_mode_for("tap3"), XdpMode::Auto);
}

#[test]
fn flags_that_turn_things_off_beat_the_file() {
    let s = settings(&["run", "--no-querier", "--no-pin"], Some("[querier]\nenabled = true\n"))
        .expect("valid");
    assert!(!s.querier && !s.pin);
}

#[test]
fn every_rule_is_checked_on_the_combined_values_and_names_the_flag() {
    assert!(error(&["run", "--robustness", "0"], None).contains("--robustness 0: expected 1 to 7"));
    assert!(error(&["run", "--query-interval", "0"], None).contains("--query-interval 0"));
    assert!(error(&["run", "--last-member-interval", "nan"], None).contains("more than 0"));
    // Each value is fine alone; together they break the rule.
    let e = error(&["run", "--query-response-interval", "70"], Some(FILE));
    assert!(
        e.contains("--query-response-interval (70s) must be shorter than --query-interval (60s)"),
        "{e}"
    );
    let e = error(&["run", "--hello-interval", "2"], Some(FILE));
    assert!(e.contains("--hello-interval (2s) must be shorter than --hello-holdtime (2s)"), "{e}");
    let e = error(
        &["run", "--static", "239.9.9.9@eth1"],
        Some("[policy]\ndeny = [\"239.9.0.0/16\"]\n"),
    );
    assert!(e.contains("denied by the configuration's [policy]"), "{e}");
}

#[test]
fn statics_are_typed_when_the_command_line_is_parsed() {
    let (args, _) = run_args(&["run", "--static", "ff3e::1@b0, c0"]);
    assert_eq!(
        args.static_groups,
        [StaticGroup { group: group("ff3e::1"), ifaces: vec!["b0".into(), "c0".into()] }]
    );
    let bad = Cli::try_parse_from(["mcrelay", "run", "--static", "224.0.0.5@b0"])
        .expect_err("link-local group");
    assert!(bad.to_string().contains("link-local"), "{bad}");
}

#[test]
fn the_config_option_names_the_file() {
    let (args, pin) = run_args(&["run", "--config", "/nonexistent/x.toml"]);
    let e = Settings::load(&args, pin.as_deref()).expect_err("missing file");
    assert!(e.to_string().contains("/nonexistent/x.toml"), "{e}");
}
