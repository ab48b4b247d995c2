//! The one validated model of what `mcrelay run` was asked to do, built in one place
//! ([`Settings::new`]) from the configuration file and the command line.
//!
//! Precedence: an option given on the command line wins; otherwise the file's value; otherwise
//! the default. `-i`, `--static`, `--fast-leave`, `--router-port` and `--per-client` add to
//! what the file lists. The command line leaves every overridable option `None` unless the user
//! gave it, so "given" needs no clap internals.
//!
//! Each rule (a timer range, "response shorter than interval", versions) has one validator in
//! [`rules`], used both here (messages name the flag) and by the file validator (messages
//! point at the line).
//!
//! Nothing below this module sees clap types or strings to parse again.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use crate::options::{defaults, rules, UnknownGroups, XdpMode};
use crate::{
    cli::RunArgs,
    config::{self, ConfigFile, GroupPolicy, PortRole},
    error::UsageError,
    groups::{parse_group, StaticGroup},
    membership::{self, IgmpVersion, MldVersion, PortOptions},
    ports,
};

/// Everything `mcrelay run` needs, validated; interfaces are names and globs (they are
/// resolved against the system by the daemon's plan).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The configuration file read, if any (read again on reload).
    pub config_path: Option<PathBuf>,
    /// Directory under a bpffs mount for the pins.
    pub pin_root: PathBuf,
    /// Keep links and maps pinned when the daemon exits.
    pub pin: bool,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Interface names and globs to relay between (file ports first, then `-i`).
    pub patterns: Vec<String>,
    /// Static memberships by interface name (or a name a glob matches).
    pub statics: Vec<StaticGroup>,
    /// Names/globs of ports with per-client delivery.
    pub per_client: Vec<String>,
    /// Names/globs of routed Ethernet ports (`--l3`).
    pub l3: Vec<String>,
    /// Names/globs of ports with a single host behind them.
    pub fast_leave: Vec<String>,
    /// Names/globs of configured router ports.
    pub router_ports: Vec<String>,
    /// Names/globs of RFC 4605 upstream ports.
    pub upstream: Vec<String>,
    /// Names/globs of ports that never become router ports by what they hear.
    pub no_learn_routers: Vec<String>,
    /// The XDP mode of ports without one of their own.
    pub xdp_mode: XdpMode,
    /// Per-port XDP modes from `[[port]]` entries (empty when `--xdp-mode` was given: the
    /// command line wins over every port).
    pub port_xdp_modes: Vec<(String, XdpMode)>,
    pub unknown: UnknownGroups,
    /// `[policy]` allow/deny.
    pub policy: GroupPolicy,
    /// IGMP/MLD timers.
    pub membership: membership::Config,
    /// Take part in querier election.
    pub querier: bool,
    pub igmp_version: IgmpVersion,
    pub mld_version: MldVersion,
    /// Bounds on learned state.
    pub limits: membership::Limits,
    /// Clients of a per-client port that get their own copies.
    pub max_clients_per_port: usize,
    /// Control frames per second and port.
    pub report_rate_per_port: u32,
    /// Per-group rate limits (`[[rate_limit]]`, then `--rate-limit`).
    pub group_rates: Vec<config::GroupRate>,
    /// Ingress rate limits by port name/glob (`[[port]] rate_limit_pps`).
    pub port_rates: Vec<(String, u64)>,
    /// Loop guard timers.
    pub hello_interval: Duration,
    pub hello_holdtime: Duration,
}

/// Appends the items of `more` not already in `list`.
fn extend_unique(list: &mut Vec<String>, more: impl IntoIterator<Item = String>) {
    for item in more {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

/// A flag's value, checked by `rule`; the error names the flag.
fn checked<T, U>(
    flag: &str,
    value: T,
    rule: impl Fn(T) -> Result<U, String>,
) -> Result<U, UsageError>
where
    T: Copy,
{
    rule(value).map_err(|e| UsageError::new(format!("--{flag} {e}")))
}

/// The state limits: each flag over the file's `[limits]`.
fn limits(cli: &RunArgs, l: &config::LimitsConfig) -> Result<membership::Limits, UsageError> {
    let limit = |flag: &str, given: Option<usize>, file: usize| {
        checked(flag, given.unwrap_or(file), rules::limit)
    };
    Ok(membership::Limits {
        max_groups: limit("max-groups", cli.max_groups, l.max_groups)?,
        max_groups_per_port: limit(
            "max-groups-per-port",
            cli.max_groups_per_port,
            l.max_groups_per_port,
        )?,
        max_sources_per_group: limit(
            "max-sources-per-group",
            cli.max_sources_per_group,
            l.max_sources_per_group,
        )?,
    })
}

/// The per-group rate limits: the file's `[[rate_limit]]` entries, then `--rate-limit`.
fn group_rates(cli: &RunArgs, f: &ConfigFile) -> Result<Vec<config::GroupRate>, UsageError> {
    let mut rates = Vec::new();
    for limit in &f.rate_limits {
        // The file validator checked the prefix already.
        let prefix = config::parse_prefix(&limit.group).map_err(UsageError::new)?;
        rates.push(config::GroupRate { prefix, pps: limit.pps });
    }
    rates.extend(cli.rate_limits.iter().copied());
    Ok(rates)
}

/// The IGMP/MLD timers: each flag over the file's `[timers]`, checked together.
fn membership_timers(
    m: &crate::cli::MembershipArgs,
    t: &config::TimersConfig,
) -> Result<membership::Config, UsageError> {
    let robustness =
        checked("robustness", m.robustness.unwrap_or(t.robustness), rules::robustness)?;
    let qi = m.query_interval.unwrap_or(t.query_interval);
    let qri = m.query_response_interval.unwrap_or(t.query_response_interval);
    let lmi = m.last_member_interval.unwrap_or(t.last_member_interval);
    let config = membership::Config {
        robustness,
        query_interval: checked("query-interval", qi, rules::seconds)?,
        query_response_interval: checked("query-response-interval", qri, rules::seconds)?,
        last_member_query_interval: checked("last-member-interval", lmi, rules::seconds)?,
        ..membership::Config::default()
    };
    rules::shorter_than(("--query-response-interval", qri), ("--query-interval", qi))
        .map_err(UsageError::new)?;
    Ok(config)
}

/// The loop guard's hello interval and holdtime: flags over `[loop_guard]`.
fn loop_guard_timers(
    cli: &RunArgs,
    g: &config::LoopGuardConfig,
) -> Result<(Duration, Duration), UsageError> {
    let hello = cli.hello_interval.unwrap_or(g.hello_interval);
    let holdtime = cli.hello_holdtime.unwrap_or(g.holdtime);
    let interval = checked("hello-interval", hello, rules::seconds)?;
    let hold = checked("hello-holdtime", holdtime, rules::seconds)?;
    rules::shorter_than(("--hello-interval", hello), ("--hello-holdtime", holdtime))
        .map_err(UsageError::new)?;
    Ok((interval, hold))
}

impl Settings {
    /// Reads the configuration file `run` uses (`--config FILE`, else
    /// /etc/mcrelay/mcrelay.toml when it exists) and builds the settings. Warnings about the
    /// file (ports that match nothing yet, planned options) are logged.
    pub fn load(cli: &RunArgs, cli_pin_root: Option<&Path>) -> Result<Self, UsageError> {
        let path = cli.config.clone().or_else(|| {
            let default = Path::new(crate::paths::CONFIG_FILE);
            default.exists().then(|| default.to_path_buf())
        });
        let file = match &path {
            Some(path) => {
                let file = config::load(path)?;
                for warning in config::warnings(&file) {
                    tracing::warn!("{}: {warning}", path.display());
                }
                Some(file)
            }
            None => None,
        };
        let mut settings = Self::new(cli, cli_pin_root, file.as_ref())?;
        settings.config_path = path;
        Ok(settings)
    }

    /// Combines a validated file (if any) with the command line. Touches nothing.
    pub fn new(
        cli: &RunArgs,
        cli_pin_root: Option<&Path>,
        file: Option<&ConfigFile>,
    ) -> Result<Self, UsageError> {
        let default_file = ConfigFile::default();
        let f = file.unwrap_or(&default_file);
        let m = &cli.membership;

        let mut patterns: Vec<String> = Vec::new();
        extend_unique(&mut patterns, f.ports.iter().map(|p| p.name.clone()));
        extend_unique(&mut patterns, cli.ifaces.iter().cloned());
        let from_ports = |keep: fn(&config::PortConfig) -> bool| -> Vec<String> {
            f.ports.iter().filter(|p| keep(p)).map(|p| p.name.clone()).collect()
        };
        let mut fast_leave = from_ports(|p| p.fast_leave);
        extend_unique(&mut fast_leave, m.fast_leave.iter().cloned());
        let mut router_ports = from_ports(|p| p.role == PortRole::Router);
        extend_unique(&mut router_ports, m.router_ports.iter().cloned());
        let mut upstream = from_ports(|p| p.role == PortRole::Upstream);
        extend_unique(&mut upstream, m.upstream.iter().cloned());
        let mut no_learn_routers = from_ports(|p| !p.learn_routers);
        extend_unique(&mut no_learn_routers, m.no_learn_routers.iter().cloned());
        let mut per_client = from_ports(|p| p.per_client);
        extend_unique(&mut per_client, cli.per_client.iter().cloned());
        let mut l3 = from_ports(|p| p.l3);
        extend_unique(&mut l3, cli.l3.iter().cloned());

        let mut statics = Vec::new();
        for st in &f.statics {
            // The file validator checked the address already.
            let group = parse_group(&st.group)?;
            statics.push(StaticGroup { group, ifaces: st.ports.clone() });
        }
        statics.extend(cli.static_groups.iter().cloned());

        let port_xdp_modes = match cli.xdp_mode {
            Some(_) => Vec::new(),
            None => f.ports.iter().filter_map(|p| Some((p.name.clone(), p.xdp_mode?))).collect(),
        };

        let membership = membership_timers(m, &f.timers)?;
        let q = &f.querier;
        let igmp_version =
            checked("igmp-version", m.igmp_version.unwrap_or(q.igmp_version), rules::igmp_version)?;
        let mld_version =
            checked("mld-version", m.mld_version.unwrap_or(q.mld_version), rules::mld_version)?;
        let (hello_interval, hello_holdtime) = loop_guard_timers(cli, &f.loop_guard)?;

        let limits = limits(cli, &f.limits)?;
        let group_rates = group_rates(cli, f)?;
        let port_rates =
            f.ports.iter().filter_map(|p| Some((p.name.clone(), p.rate_limit_pps?))).collect();

        let pin_root = cli_pin_root
            .map(Path::to_path_buf)
            .or_else(|| f.pin_root.clone())
            .unwrap_or_else(|| PathBuf::from(crate::paths::PIN_ROOT));

        let settings = Self {
            config_path: cli.config.clone(),
            pin_root,
            pin: !cli.no_pin && f.pin,
            metrics_listen: f.metrics_listen,
            patterns,
            statics,
            per_client,
            l3,
            fast_leave,
            router_ports,
            no_learn_routers,
            upstream,
            xdp_mode: cli.xdp_mode.unwrap_or(f.xdp_mode),
            port_xdp_modes,
            unknown: cli.unknown.unwrap_or(f.policy.unknown),
            policy: config::policy(f),
            membership,
            querier: !cli.membership.no_querier && q.enabled,
            igmp_version,
            mld_version,
            limits,
            max_clients_per_port: f.limits.max_clients_per_port,
            report_rate_per_port: f.limits.report_rate_per_port,
            group_rates,
            port_rates,
            hello_interval,
            hello_holdtime,
        };
        if let Some(denied) = settings.statics.iter().find(|s| !settings.policy.permits(s.group)) {
            return Err(UsageError::new(format!(
                "--static {}: the group is denied by the configuration's [policy]",
                denied.group
            )));
        }
        Ok(settings)
    }

    /// The XDP mode for an interface (a `[[port]]` entry's own mode, else the general one).
    pub fn xdp_mode_for(&self, iface: &str) -> XdpMode {
        self.port_xdp_modes
            .iter()
            .find(|(pattern, _)| ports::matches_any(std::slice::from_ref(pattern), iface))
            .map_or(self.xdp_mode, |(_, mode)| *mode)
    }

    /// Membership options of the port named `name` (its addresses are filled in by the
    /// caller). An upstream port never queries and is a router port (downstream sources go
    /// there).
    pub fn port_options(&self, name: &str) -> PortOptions {
        let upstream = self.is_upstream(name);
        PortOptions {
            fast_leave: ports::matches_any(&self.fast_leave, name),
            querier: self.querier && !upstream,
            igmp_version: self.igmp_version,
            mld_version: self.mld_version,
            router_port: upstream || ports::matches_any(&self.router_ports, name),
            learn_routers: !ports::matches_any(&self.no_learn_routers, name),
            ..PortOptions::default()
        }
    }

    /// The ingress rate limit of the port named `name` (its `[[port]]` entry's), if any.
    pub fn port_rate(&self, name: &str) -> Option<u64> {
        self.port_rates
            .iter()
            .find(|(pattern, _)| ports::matches_any(std::slice::from_ref(pattern), name))
            .map(|(_, pps)| *pps)
    }

    /// Whether the port named `name` is an RFC 4605 upstream port.
    pub fn is_upstream(&self, name: &str) -> bool {
        ports::matches_any(&self.upstream, name)
    }

    /// Whether the port named `name` has per-client delivery.
    pub fn is_per_client(&self, name: &str) -> bool {
        ports::matches_any(&self.per_client, name)
    }

    /// Whether the port named `name` is a routed Ethernet port (`--l3`).
    pub fn is_routed(&self, name: &str) -> bool {
        ports::matches_any(&self.l3, name)
    }
}

/// Where the settings come from: the command line (and through it the configuration file).
/// The daemon keeps it to read the file again on reload.
#[derive(Debug, Clone)]
pub struct SettingsSource {
    cli: RunArgs,
    pin_root: Option<PathBuf>,
}

impl SettingsSource {
    /// `run`'s arguments and the global `--pin-root`, if given.
    pub fn new(cli: RunArgs, pin_root: Option<PathBuf>) -> Self {
        Self { cli, pin_root }
    }

    /// Reads the file (if any) and builds the settings.
    pub fn load(&self) -> Result<Settings, UsageError> {
        Settings::load(&self.cli, self.pin_root.as_deref())
    }
}

#[cfg(test)]
mod tests;
