//! The structure of the configuration file: what each key means and its default.
//!
//! Defaults equal the command-line defaults (a unit test keeps them in step), so a file that
//! sets nothing behaves like `mcrelay run` without options.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Deserializer};

use crate::options::defaults;
pub use crate::options::{UnknownGroups, XdpMode};

/// `/etc/mcrelay/mcrelay.toml`, as written by the user (validated by [`super::load`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// Prometheus endpoint, e.g. `127.0.0.1:9464` or `[::1]:9464`; none when absent.
    #[serde(deserialize_with = "socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory under a bpffs mount for mcrelay's pins (`--pin-root`).
    pub pin_root: Option<PathBuf>,
    /// Keep XDP links and maps pinned when the daemon exits (false: `--no-pin`).
    pub pin: bool,
    /// How XDP is attached to ports that do not say otherwise (`--xdp-mode`).
    pub xdp_mode: XdpMode,
    /// `[[port]]`: the interfaces to relay between (`-i`).
    #[serde(rename = "port")]
    pub ports: Vec<PortConfig>,
    /// `[[static]]`: static group memberships (`--static`).
    #[serde(rename = "static")]
    pub statics: Vec<StaticConfig>,
    /// `[policy]`: which groups may be relayed, and what happens to unknown groups.
    pub policy: PolicyConfig,
    /// `[timers]`: IGMP/MLD timers (RFC 3376 / RFC 3810).
    pub timers: TimersConfig,
    /// `[querier]`: whether and how mcrelay queries.
    pub querier: QuerierConfig,
    /// `[loop_guard]`: hello timers.
    pub loop_guard: LoopGuardConfig,
    /// `[limits]`: bounds on learned state.
    pub limits: LimitsConfig,
    /// `[[rate_limit]]`: per-group packet rates (`--rate-limit`).
    #[serde(rename = "rate_limit")]
    pub rate_limits: Vec<RateLimitConfig>,
}

/// `[limits]`: what hosts can make mcrelay keep. At a limit, new memberships are refused
/// (counted, logged) and existing ones stay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Groups learned over all ports (`--max-groups`).
    pub max_groups: usize,
    /// Groups one port may join (`--max-groups-per-port`).
    pub max_groups_per_port: usize,
    /// Distinct sources one group may name (`--max-sources-per-group`).
    pub max_sources_per_group: usize,
    /// Clients of a per-client port that get their own copies.
    pub max_clients_per_port: usize,
    /// Control frames (IGMP/MLD/PIM) per second one port may send; the excess is ignored.
    pub report_rate_per_port: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_groups: defaults::MAX_GROUPS,
            max_groups_per_port: defaults::MAX_GROUPS_PER_PORT,
            max_sources_per_group: defaults::MAX_SOURCES_PER_GROUP,
            max_clients_per_port: defaults::MAX_CLIENTS_PER_PORT,
            report_rate_per_port: defaults::REPORT_RATE_PER_PORT,
        }
    }
}

/// One `[[rate_limit]]` entry: every group of `group` (a prefix or one group) may send `pps`
/// packets per second through the relay; the rest is dropped as `drop_rate_limit`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub group: String,
    pub pps: u64,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            metrics_listen: None,
            pin_root: None,
            pin: true,
            xdp_mode: XdpMode::Auto,
            ports: Vec::new(),
            statics: Vec::new(),
            policy: PolicyConfig::default(),
            timers: TimersConfig::default(),
            querier: QuerierConfig::default(),
            loop_guard: LoopGuardConfig::default(),
            rate_limits: Vec::new(),
            limits: LimitsConfig::default(),
        }
    }
}

impl ConfigFile {
    /// The `[[port]]` entry that applies to interface `iface`: the first whose name equals it
    /// or whose glob matches it.
    pub fn port_for(&self, iface: &str) -> Option<&PortConfig> {
        self.ports.iter().find(|p| crate::ports::matches_any(std::slice::from_ref(&p.name), iface))
    }
}

/// One `[[port]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Interface name or glob (`tap*`).
    pub name: String,
    /// `member` (hosts behind it) or `router` (a multicast router: gets all multicast).
    #[serde(default)]
    pub role: PortRole,
    /// Overrides the top-level `xdp_mode` for this port.
    #[serde(default)]
    pub xdp_mode: Option<XdpMode>,
    /// A single host behind the port: leaves take effect at once.
    #[serde(default)]
    pub fast_leave: bool,
    /// Per-client delivery on a shared TAP (OpenVPN `dev tap` server): one copy per joined
    /// client, addressed to its unicast MAC, instead of one multicast copy for all clients.
    #[serde(default)]
    pub per_client: bool,
    /// A routed Ethernet port: TTL / hop limit decremented across it, TTL 1 not forwarded,
    /// its copies sourced from its own MAC (`--l3`).
    #[serde(default)]
    pub l3: bool,
    /// Whether a query, PIM hello or router advertisement heard here makes this a router
    /// port for a while (false for VPN client ports: `--no-learn-routers`).
    #[serde(default = "yes")]
    pub learn_routers: bool,
    /// Most multicast data packets per second relayed from this port (storm control); the
    /// rest is dropped as `drop_rate_limit`.
    #[serde(default)]
    pub rate_limit_pps: Option<u64>,
}

/// What is behind a port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortRole {
    /// Hosts that join groups.
    #[default]
    Member,
    /// A multicast router (RFC 4541: gets all multicast).
    Router,
    /// The upstream of an RFC 4605 proxy: mcrelay reports the downstream memberships there as
    /// a host would, answers its queries, and sends it the downstream sources (`--upstream`).
    Upstream,
}

/// One `[[static]]` entry: a group relayed to `ports` whether or not anyone joined it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    /// IPv4 or IPv6 group address (all sources).
    pub group: String,
    /// Port names (or names matching a port glob) that receive the group.
    pub ports: Vec<String>,
}

/// `[policy]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Group prefixes that may be relayed (CIDR); empty: every group.
    pub allow: Vec<String>,
    /// Group prefixes that are never relayed (CIDR); wins over `allow`.
    pub deny: Vec<String>,
    /// Multicast data for groups nobody joined (`--unknown`).
    pub unknown: UnknownGroups,
}

/// `[timers]`, in seconds (fractions allowed).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimersConfig {
    /// Robustness variable, 1 to 7 (also the last member query count).
    pub robustness: u32,
    pub query_interval: f64,
    pub query_response_interval: f64,
    pub last_member_interval: f64,
}

impl Default for TimersConfig {
    fn default() -> Self {
        Self {
            robustness: defaults::ROBUSTNESS,
            query_interval: defaults::QUERY_INTERVAL,
            query_response_interval: defaults::QUERY_RESPONSE_INTERVAL,
            last_member_interval: defaults::LAST_MEMBER_INTERVAL,
        }
    }
}

/// `[querier]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuerierConfig {
    /// Act as querier where no other router does (`--no-querier` turns it off).
    pub enabled: bool,
    /// IGMP version of mcrelay's queries: 2 or 3.
    pub igmp_version: u8,
    /// MLD version of mcrelay's queries: 1 or 2.
    pub mld_version: u8,
}

impl Default for QuerierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            igmp_version: defaults::IGMP_VERSION,
            mld_version: defaults::MLD_VERSION,
        }
    }
}

/// `[loop_guard]`: hellos between relays (and between this relay's own ports), in seconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopGuardConfig {
    /// Time between hellos (`--hello-interval`).
    pub hello_interval: f64,
    /// Time without a hello after which a relay counts as gone (`--hello-holdtime`).
    pub holdtime: f64,
}

impl Default for LoopGuardConfig {
    fn default() -> Self {
        Self { hello_interval: defaults::HELLO_INTERVAL, holdtime: defaults::HELLO_HOLDTIME }
    }
}

fn yes() -> bool {
    true
}

fn socket_addr<'de, D: Deserializer<'de>>(de: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(de)?;
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "'{text}' is not a socket address: write ADDRESS:PORT, e.g. \"127.0.0.1:9464\" or \
             \"[::1]:9464\""
        ))
    })
}
