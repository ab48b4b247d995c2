//! Combining the file with the command line: options given on the command line win; `-i`,
//! `--static`, `--fast-leave` and `--router-port` add to what the file lists.
//!
//! "Given on the command line" is told apart from "clap's default" by
//! [`clap::ArgMatches::value_source`], so `--query-interval 125` overrides a file that says 60
//! even though 125 is also the default.

use std::path::{Path, PathBuf};

use clap::{parser::ValueSource, ArgMatches};

use super::file::{ConfigFile, PortRole};
use crate::cli::{RunArgs, XdpMode};

/// Whether the argument with clap id `id` (the field name in [`RunArgs`]) was given by the user
/// rather than defaulted.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// `args` (parsed from `matches`, the `run` subcommand's matches) with the file filled in
/// where the command line said nothing. The file's ports come first, then `-i` interfaces not
/// already listed; likewise the statics, fast-leave and router ports.
pub fn merge(file: &ConfigFile, mut args: RunArgs, matches: &ArgMatches) -> RunArgs {
    let mut ifaces: Vec<String> = Vec::new();
    for port in &file.ports {
        push_unique(&mut ifaces, port.name.clone());
    }
    for iface in args.ifaces.drain(..) {
        push_unique(&mut ifaces, iface);
    }
    args.ifaces = ifaces;

    let mut statics: Vec<String> = file
        .statics
        .iter()
        .map(|st| format!("{}@{}", st.group.trim(), st.ports.join(",")))
        .collect();
    statics.append(&mut args.static_groups);
    args.static_groups = statics;

    if !given(matches, "xdp_mode") {
        args.xdp_mode = file.xdp_mode;
    }
    if !given(matches, "unknown") {
        args.unknown = file.policy.unknown.into();
    }
    if !given(matches, "no_pin") {
        args.no_pin = !file.pin;
    }

    let m = &mut args.membership;
    let t = &file.timers;
    if !given(matches, "query_interval") {
        m.query_interval = t.query_interval;
    }
    if !given(matches, "query_response_interval") {
        m.query_response_interval = t.query_response_interval;
    }
    if !given(matches, "last_member_interval") {
        m.last_member_interval = t.last_member_interval;
    }
    if !given(matches, "robustness") {
        m.robustness = t.robustness;
    }
    let q = &file.querier;
    if !given(matches, "igmp_version") {
        m.igmp_version = q.igmp_version;
    }
    if !given(matches, "mld_version") {
        m.mld_version = q.mld_version;
    }
    if !given(matches, "no_querier") {
        m.no_querier = !q.enabled;
    }

    let mut fast_leave: Vec<String> =
        file.ports.iter().filter(|p| p.fast_leave).map(|p| p.name.clone()).collect();
    for name in m.fast_leave.drain(..) {
        push_unique(&mut fast_leave, name);
    }
    m.fast_leave = fast_leave;

    let mut router_ports: Vec<String> =
        file.ports.iter().filter(|p| p.role == PortRole::Router).map(|p| p.name.clone()).collect();
    for name in m.router_ports.drain(..) {
        push_unique(&mut router_ports, name);
    }
    m.router_ports = router_ports;

    let mut per_client: Vec<String> =
        file.ports.iter().filter(|p| p.per_client).map(|p| p.name.clone()).collect();
    for name in args.per_client.drain(..) {
        push_unique(&mut per_client, name);
    }
    args.per_client = per_client;
    args
}

/// The XDP mode for interface `iface`: `--xdp-mode` when given on the command line, else the
/// `xdp_mode` of the port's `[[port]]` entry, else the merged default (`args.xdp_mode`, which
/// [`merge`] took from the file's top-level `xdp_mode`).
pub fn xdp_mode_for(
    file: &ConfigFile,
    args: &RunArgs,
    matches: &ArgMatches,
    iface: &str,
) -> XdpMode {
    if given(matches, "xdp_mode") {
        return args.xdp_mode;
    }
    file.port_for(iface).and_then(|p| p.xdp_mode).unwrap_or(args.xdp_mode)
}

/// The pin root: `--pin-root` when given on the command line (a global option, so it shows in
/// the subcommand's `matches` too), else the file's `pin_root`, else `cli_pin_root` (the
/// default).
pub fn pin_root(file: &ConfigFile, cli_pin_root: &Path, matches: &ArgMatches) -> PathBuf {
    if given(matches, "pin_root") {
        return cli_pin_root.to_path_buf();
    }
    file.pin_root.clone().unwrap_or_else(|| cli_pin_root.to_path_buf())
}

/// The configuration file `run` reads: `--config FILE`, else /etc/mcrelay/mcrelay.toml when it
/// exists, else none.
pub fn run_config_path(args: &RunArgs) -> Option<PathBuf> {
    match &args.config {
        Some(path) => Some(path.clone()),
        None => {
            let default = Path::new(crate::paths::CONFIG_FILE);
            default.exists().then(|| default.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::{
        cli::{Cli, Command, UnknownArg},
        config::parse_str,
    };

    /// Parses `mcrelay ARGS...` and returns the run arguments, the run subcommand's matches
    /// and the pin root.
    fn run_args(argv: &[&str]) -> (RunArgs, ArgMatches, PathBuf) {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("mcrelay").chain(argv.iter().copied()))
            .expect("valid command line");
        let cli = Cli::from_arg_matches(&matches).expect("matches convert");
        let run = matches.subcommand_matches("run").expect("run subcommand").clone();
        match cli.command {
            Command::Run(args) => (args, run, cli.pin_root),
            other => panic!("expected run, got {other:?}"),
        }
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
"#;

    #[test]
    fn defaults_match_the_command_line_defaults() {
        let file = ConfigFile::default();
        let (args, matches, pin) = run_args(&["run"]);
        let merged = merge(&file, run_args(&["run"]).0, &matches);
        assert_eq!(format!("{merged:?}"), format!("{args:?}"));
        assert_eq!(pin_root(&file, &pin, &matches), pin);
    }

    #[test]
    fn the_file_fills_in_what_the_command_line_left_out() {
        let file = parse_str(FILE).expect("valid file");
        let (args, matches, pin) = run_args(&["run"]);
        let merged = merge(&file, args, &matches);
        assert_eq!(merged.ifaces, ["eth1", "tap*"]);
        assert_eq!(merged.static_groups, ["239.1.1.1@eth1,tap0"]);
        assert_eq!(merged.xdp_mode, XdpMode::Skb);
        assert_eq!(merged.unknown, UnknownArg::Drop);
        assert!(merged.no_pin);
        let m = &merged.membership;
        assert_eq!(m.robustness, 3);
        assert_eq!(m.query_interval, 60.0);
        assert_eq!(m.query_response_interval, 5.5);
        assert_eq!(m.last_member_interval, 0.5);
        assert_eq!((m.igmp_version, m.mld_version), (2, 1));
        assert!(m.no_querier);
        assert_eq!(m.fast_leave, ["tap*"]);
        assert_eq!(m.router_ports, ["eth1"]);
        assert_eq!(pin_root(&file, &pin, &matches), Path::new("/sys/fs/bpf/other"));
        assert_eq!(xdp_mode_for(&file, &merged, &matches, "tap3"), XdpMode::Native);
        assert_eq!(xdp_mode_for(&file, &merged, &matches, "eth1"), XdpMode::Skb);
        assert_eq!(xdp_mode_for(&file, &merged, &matches, "eth9"), XdpMode::Skb);
    }

    #[test]
    fn the_command_line_wins_even_with_default_values() {
        let file = parse_str(FILE).expect("valid file");
        let (args, matches, pin) = run_args(&[
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
        ]);
        let merged = merge(&file, args, &matches);
        assert_eq!(merged.ifaces, ["eth1", "tap*", "eth2"], "added, without duplicates");
        assert_eq!(merged.static_groups, ["239.1.1.1@eth1,tap0", "239.2.2.2@eth2"]);
        assert_eq!(merged.xdp_mode, XdpMode::Auto);
        assert_eq!(merged.unknown, UnknownArg::RouterPorts);
        let m = &merged.membership;
        assert_eq!(m.query_interval, 125.0);
        assert_eq!(m.robustness, 2);
        assert_eq!(m.igmp_version, 3);
        // Not given on the command line: from the file.
        assert_eq!(m.query_response_interval, 5.5);
        assert_eq!(m.mld_version, 1);
        assert!(m.no_querier);
        assert_eq!(m.fast_leave, ["tap*", "eth2"]);
        assert_eq!(m.router_ports, ["eth1"]);
        assert_eq!(pin_root(&file, &pin, &matches), Path::new("/sys/fs/bpf/mine"));
        // --xdp-mode on the command line beats the per-port setting too.
        assert_eq!(xdp_mode_for(&file, &merged, &matches, "tap3"), XdpMode::Auto);
    }

    #[test]
    fn no_querier_on_the_command_line_beats_an_enabled_querier() {
        let file = parse_str("[querier]\nenabled = true\n").expect("valid file");
        let (args, matches, _) = run_args(&["run", "--no-querier"]);
        assert!(merge(&file, args, &matches).membership.no_querier);
    }

    #[test]
    fn the_config_option_names_the_file() {
        let (args, _, _) = run_args(&["run", "--config", "/tmp/x.toml"]);
        assert_eq!(run_config_path(&args), Some(PathBuf::from("/tmp/x.toml")));
    }
}
