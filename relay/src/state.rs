//! The daemon's learned state as a JSON file (`/run/mcrelay/ns-<id>.state.json`), written
//! atomically after changes; `mcrelay groups` reads it. Timers are stored as time remaining
//! when the file was written plus the write time, so readers can show live countdowns.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Counters of the control plane, shown by `mcrelay groups` / `stats`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ControlCounters {
    pub received: u64,
    pub ignored_other_port: u64,
    /// Frames the filter let through that are not IGMP/MLD/PIM (ICMPv6 neighbour discovery).
    pub ignored_not_membership: u64,
    pub malformed: std::collections::BTreeMap<String, u64>,
    pub queries_sent: u64,
    pub send_errors: u64,
    pub group_updates: u64,
    /// Reports and leaves relayed to router ports, queries of other queriers relayed to all
    /// other ports (RFC 4541 2.1.1).
    pub relayed: u64,
    /// Time from receiving a report to the moment the map update it caused was issued (the
    /// entry is visible to the XDP program from then on): last and worst, in microseconds.
    /// This is the join-to-forwarding latency on the gateway.
    pub last_update_us: u64,
    pub max_update_us: u64,
    /// Relay hellos received (loop guard).
    #[serde(default)]
    pub hellos_received: u64,
    /// Control frames ignored because they came from this relay's own ports or relay MAC, or
    /// from a redundant peer relay (they went round a loop).
    #[serde(default)]
    pub ignored_loop: u64,
    /// MLD queries not sent because the port had no IPv6 link-local address (hosts drop
    /// queries from `::`, RFC 3810 5.1.14).
    #[serde(default)]
    pub queries_skipped_no_address: u64,
    /// Control frames ignored because their port sent more than its rate
    /// (`[limits] report_rate_per_port`).
    #[serde(default)]
    pub rate_limited: u64,
    /// Control frames the kernel dropped because the daemon's receive queue was full (a flood).
    #[serde(default)]
    pub capture_drops: u64,
    /// Reports sent upstream (RFC 4605 proxy).
    #[serde(default)]
    pub reports_sent: u64,
    /// Memberships not taken, by reason: a limit (`max_groups`, `max_groups_per_port`,
    /// `max_sources_per_group`) or an any-source join to an SSM group (`ssm_any_source`).
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Router signals (queries, PIM hellos, router advertisements) heard on ports that do not
    /// learn routers (`learn_routers = false`): ignored for the router role.
    #[serde(default)]
    pub router_signals_ignored: u64,
    /// Group map writes that failed (logged; retried on the next round, since the record of
    /// what is installed keeps the old set).
    #[serde(default)]
    pub map_errors: u64,
    /// Port-set writes whose TC array was cut at `MAX_TC_TARGETS` (32 ports and peers): those
    /// beyond get no copy of data the TC program copies (logged each time).
    #[serde(default)]
    pub tc_targets_cut: u64,
    /// Time from receiving a report until the update syscalls returned (includes the
    /// kernel's RCU grace period that map-in-map updates wait for after publishing).
    pub last_update_done_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonState {
    /// When this was written, milliseconds since the Unix epoch.
    pub written_unix_ms: u64,
    pub pid: u32,
    pub groups: Vec<GroupState>,
    pub queriers: Vec<QuerierState>,
    pub router_ports: Vec<String>,
    pub control: ControlCounters,
    /// Per-client delivery: clients seen on per-client ports, their groups and the copies
    /// addressed to them.
    #[serde(default)]
    pub clients: Vec<ClientState>,
    /// Recent memberships that were not taken, and why.
    #[serde(default)]
    pub not_taken: Vec<NotTaken>,
}

/// A membership the daemon did not take (the most recent few, for `mcrelay groups`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotTaken {
    pub group: String,
    pub port: String,
    /// The refusal's name (`ssm_any_source`, `max_groups`, ...).
    pub reason: String,
    /// In words, with what to do about it.
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientState {
    pub port: String,
    /// A client of an Ethernet port: its MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// A peer of an L3 port (tun, WireGuard): its tunnel address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub groups: Vec<String>,
    /// Copies sent to this client (all groups).
    pub copies: u64,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupState {
    pub group: String,
    /// `static` or `learned`.
    pub kind: String,
    /// Ports that receive every source without its own entry (the (*,G) entry).
    pub ports: Vec<String>,
    /// (S,G) entries: ports per named source.
    pub sources: Vec<SourcePorts>,
    /// Learned membership per port.
    pub members: Vec<MemberState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourcePorts {
    pub source: String,
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberState {
    pub port: String,
    /// `include` or `exclude`.
    pub mode: String,
    /// Group timer left (EXCLUDE mode), milliseconds at `written_unix_ms`.
    pub timer_ms: Option<u64>,
    /// igmpv1, igmpv2, igmpv3, mldv1, mldv2.
    pub compat: String,
    pub sources: Vec<SourceTimer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceTimer {
    pub source: String,
    /// Source timer left in milliseconds; `None`: blocked (EXCLUDE-mode timer 0).
    pub timer_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuerierState {
    pub port: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    pub address: String,
    /// mcrelay itself is the querier.
    pub is_self: bool,
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The verdict of a reload (SIGHUP), left for `mcrelay reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadVerdict {
    /// The daemon's pid and a counter of the reloads it handled: a reader knows a verdict is
    /// about its own SIGHUP when the pair moved on.
    pub pid: u32,
    pub seq: u64,
    /// The new configuration is in force.
    pub applied: bool,
    /// What changed, or why the file was refused (FILE:LINE:COL lines for file errors).
    pub message: String,
    /// Refused for a reason the user can fix (the file): `mcrelay reload` exits 2.
    pub usage: bool,
}

impl ReloadVerdict {
    /// Writes the verdict atomically.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_restricted(path, &serde_json::to_vec(self)?)
    }

    /// The verdict in `path`, if there is a readable one.
    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, ms)
}

/// Writes the state file atomically (temporary file + rename).
pub fn write(path: &Path, state: &DaemonState) -> anyhow::Result<()> {
    let text = serde_json::to_vec(state).context("serialising the state")?;
    write_restricted(path, &text)
}

/// Writes `content` to `path` atomically (temporary file + rename), readable by root and the
/// `mcrelay` group only (`paths::restrict`): the state holds client MACs and memberships.
/// The temporary file is created 0600 and restricted before it is renamed into place, so no
/// other user can open it in between.
fn write_restricted(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(content)?;
        crate::paths::restrict(&tmp, false)
    };
    write().with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Reads a state file, with every timer reduced by the time since it was written.
pub fn read(path: &Path) -> anyhow::Result<DaemonState> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut state: DaemonState =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    let age = unix_ms().saturating_sub(state.written_unix_ms);
    for g in &mut state.groups {
        for m in &mut g.members {
            m.timer_ms = m.timer_ms.map(|t| t.saturating_sub(age));
            for s in &mut m.sources {
                s.timer_ms = s.timer_ms.map(|t| t.saturating_sub(age));
            }
        }
    }
    Ok(state)
}
