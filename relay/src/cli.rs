//! Command-line interface. The subcommand and option names are the product's contract
//! (scripts and the systemd unit use them): keep them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::groups::{parse_static, StaticGroup};
pub use crate::options::{UnknownGroups, XdpMode};

/// mcrelay: relays IP multicast between network segments at XDP speed, only to the segments
/// that have receivers.
#[derive(Debug, Parser)]
#[command(
    name = "mcrelay",
    version,
    about = "Relays IP multicast between network segments at XDP speed, only to the segments \
             that have receivers",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log verbosity: -v debug, -vv trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Directory under a bpffs mount where mcrelay pins its maps [default: /sys/fs/bpf/mcrelay].
    #[arg(long, global = true, value_name = "DIR")]
    pub pin_root: Option<PathBuf>,
}

impl Cli {
    /// `--pin-root`, else the default (`run` also looks at the configuration file).
    pub fn pin_root(&self) -> PathBuf {
        self.pin_root.clone().unwrap_or_else(|| PathBuf::from(crate::paths::PIN_ROOT))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the interfaces, learn memberships and relay multicast until SIGINT/SIGTERM
    /// (the pinned dataplane keeps forwarding after the daemon exits, unless --no-pin).
    Run(Box<RunArgs>),
    /// Show groups and their ports (like `bridge mdb show`).
    Groups(OutputArgs),
    /// Show attached ports: interface, attach mode, role, counters.
    Ports(OutputArgs),
    /// Show per-port packet and byte counters by reason.
    Stats(StatsArgs),
    /// Remove every program, link and pin mcrelay made in this network namespace (the daemon
    /// must be stopped; a running daemon detaches with `run --no-pin` or keeps forwarding).
    Detach,
    /// Make the running daemon re-read its configuration (same as SIGHUP).
    Reload,
    /// Validate a configuration file without touching the system (exit 2 on errors).
    CheckConfig {
        /// The file to check (e.g. /etc/mcrelay/mcrelay.toml).
        file: PathBuf,
    },
    /// Print the man page (roff) to standard output.
    #[command(hide = true)]
    Man,
    /// Print shell completions to standard output.
    #[command(hide = true)]
    Completions {
        /// Shell to generate completions for.
        shell: clap_complete::Shell,
    },
    /// Diagnose this host's multicast set-up (routes, rp_filter, firewall, XDP, veth pitfalls,
    /// WireGuard AllowedIPs and OpenVPN `dev tun` routes); works without the daemon. Exit
    /// status 3 when problems were found.
    Doctor(DoctorArgs),
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON (`{"checks":[...]}`) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Interface that should carry multicast (e.g. the VPN's tap0, tun0 or wg0); checks focus
    /// on it.
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); command-line options override it. Without this option,
    /// /etc/mcrelay/mcrelay.toml is read when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface to relay between (repeatable); names or globs such as `tap*`.
    #[arg(short = 'i', long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,

    /// Static group membership: GROUP@IFACE[,IFACE...], e.g. 239.1.1.1@b0,c0 or ff3e::1@b0
    /// (repeatable). Every interface must be one of the -i interfaces.
    #[arg(long = "static", value_name = "GROUP@IFACES", value_parser = parse_static)]
    pub static_groups: Vec<StaticGroup>,

    /// How to attach XDP: auto tries native (driver) mode and falls back to generic (skb) mode;
    /// devices XDP cannot send to (tun, WireGuard, bridges, VXLAN, VLAN subinterfaces) get the
    /// TC program instead, except with `native` [default: auto].
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpMode>,

    /// What to do with multicast data for groups nobody joined [default: router-ports].
    #[arg(long, value_enum)]
    pub unknown: Option<UnknownGroups>,

    /// Per-client delivery on this port: on a shared TAP (OpenVPN `dev tap` server) each
    /// client that joins gets its own copy addressed to its unicast MAC; on a tun or WireGuard
    /// port each joined peer gets its own copy addressed to its tunnel address (applications
    /// there must be bound to the port, not to the group address). Repeatable; names or globs.
    #[arg(long = "per-client", value_name = "IFACE")]
    pub per_client: Vec<String>,

    /// A routed Ethernet port: data into or out of it crosses a routed hop (TTL / hop limit
    /// decremented, TTL 1 not forwarded and counted as drop_ttl, the port's own MAC as source
    /// of its copies). Served by the TC program. tun and WireGuard ports are always routed.
    /// Repeatable; names or globs.
    #[arg(long = "l3", value_name = "IFACE")]
    pub l3: Vec<String>,

    /// Seconds between loop-guard hellos, sent on every port so that relays on the same
    /// segments find each other (and a relay finds two of its own ports on one segment)
    /// [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub hello_interval: Option<f64>,

    /// Seconds without a hello after which another relay (or a path between two of this
    /// relay's ports) counts as gone and standby ports relay again [default: 3.5].
    #[arg(long, value_name = "SECONDS")]
    pub hello_holdtime: Option<f64>,

    /// Rate limit per group: every group of PREFIX may send PPS packets per second through
    /// the relay, the rest is dropped (drop_rate_limit); e.g. 239.0.0.0/8=1000 (repeatable).
    #[arg(long = "rate-limit", value_name = "PREFIX=PPS", value_parser = crate::config::parse_rate_limit)]
    pub rate_limits: Vec<crate::config::GroupRate>,

    /// Most groups learned over all ports; at the limit new joins are refused, counted and
    /// logged [default: 12000].
    #[arg(long, value_name = "N")]
    pub max_groups: Option<usize>,

    /// Most groups one port may join [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_groups_per_port: Option<usize>,

    /// Most distinct sources one group may name (each is a map entry) [default: 256].
    #[arg(long, value_name = "N")]
    pub max_sources_per_group: Option<usize>,

    /// Detach everything on exit. By default the XDP links and maps stay pinned when the
    /// daemon exits or dies, so forwarding continues and the next daemon takes over without
    /// losing a packet (`mcrelay detach` removes them).
    #[arg(long)]
    pub no_pin: bool,

    #[command(flatten)]
    pub membership: MembershipArgs,
}

/// IGMP/MLD timers and querier settings (RFC 3376 / RFC 3810 defaults). An option left out
/// takes the configuration file's value, else the default shown.
#[derive(Debug, Args, Clone)]
pub struct MembershipArgs {
    /// Query interval in seconds [default: 125].
    #[arg(long, value_name = "SECONDS")]
    pub query_interval: Option<f64>,

    /// Query response interval (max response time of general queries) in seconds
    /// [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub query_response_interval: Option<f64>,

    /// Last member query interval in seconds (group-specific queries after a leave)
    /// [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub last_member_interval: Option<f64>,

    /// Robustness variable (also the last member query count) [default: 2].
    #[arg(long, value_name = "N")]
    pub robustness: Option<u32>,

    /// IGMP version mcrelay queries with (2 or 3) [default: 3].
    #[arg(long, value_name = "2|3", value_parser = clap::value_parser!(u8).range(2..=3))]
    pub igmp_version: Option<u8>,

    /// MLD version mcrelay queries with (1 or 2) [default: 2].
    #[arg(long, value_name = "1|2", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub mld_version: Option<u8>,

    /// Never act as querier (another router queries on every port).
    #[arg(long)]
    pub no_querier: bool,

    /// Port with a single host behind it: leaves take effect at once (repeatable).
    #[arg(long = "fast-leave", value_name = "IFACE")]
    pub fast_leave: Vec<String>,

    /// Port that leads to a multicast router: gets all multicast (repeatable).
    #[arg(long = "router-port", value_name = "IFACE")]
    pub router_ports: Vec<String>,

    /// Upstream port of an RFC 4605 IGMP/MLD proxy (repeatable): mcrelay reports there, from
    /// the port's address, the union of what hosts on the other ports joined, answers the
    /// upstream router's queries, never queries there itself, and sends it the data of
    /// downstream sources.
    #[arg(long = "upstream", value_name = "IFACE")]
    pub upstream: Vec<String>,

    /// Port whose hosts must not become router ports by sending a query, PIM hello or router
    /// advertisement (which pulls all unknown multicast to them): VPN client ports
    /// (repeatable; names or globs).
    #[arg(long = "no-learn-routers", value_name = "IFACE")]
    pub no_learn_routers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print JSON (an object with a top-level array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON (an object with a top-level array) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print again every SECONDS seconds, with rates, until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
}
