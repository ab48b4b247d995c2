//! The daemon's learned state as a JSON file (`/run/mcrelay/ns-<id>.state.json`), written
//! atomically after changes; `mcrelay groups` reads it. Timers are stored as time remaining
//! when the file was written plus the write time, so readers can show live countdowns.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    control::{Control, ControlCounters},
    membership::{CompatMode, Family, FilterMode},
};

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientState {
    pub port: String,
    /// The client's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
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

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn compat_name(c: CompatMode) -> &'static str {
    match c {
        CompatMode::IgmpV1 => "igmpv1",
        CompatMode::IgmpV2 => "igmpv2",
        CompatMode::IgmpV3 => "igmpv3",
        CompatMode::MldV1 => "mldv1",
        CompatMode::MldV2 => "mldv2",
    }
}

/// Builds the state of a running control loop.
pub fn snapshot(control: &Control, now: Duration) -> DaemonState {
    let names = |ports: &mut dyn Iterator<Item = u32>| -> Vec<String> {
        ports.map(|p| control.name(p)).collect()
    };
    let mut groups: Vec<GroupState> = Vec::new();
    let learned: std::collections::BTreeMap<IpAddr, _> =
        control.engine.groups(now).map(|g| (g.group, g)).collect();
    let mut all: std::collections::BTreeSet<IpAddr> =
        control.table.installed().keys().copied().collect();
    all.extend(learned.keys().copied());
    for group in all {
        let installed = control.table.installed().get(&group).cloned().unwrap_or_default();
        let members = learned
            .get(&group)
            .map(|g| {
                g.ports
                    .iter()
                    .map(|p| MemberState {
                        port: control.name(p.port),
                        mode: match p.mode {
                            FilterMode::Include => "include".into(),
                            FilterMode::Exclude => "exclude".into(),
                        },
                        timer_ms: p.group_timer.map(ms),
                        compat: compat_name(p.compat).into(),
                        sources: p
                            .sources
                            .iter()
                            .map(|s| SourceTimer {
                                source: s.source.to_string(),
                                timer_ms: s.timer.map(ms),
                            })
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        groups.push(GroupState {
            group: group.to_string(),
            kind: if control.table.is_static(&group) { "static" } else { "learned" }.into(),
            ports: names(&mut installed.any_source.iter().copied()),
            sources: installed
                .per_source
                .iter()
                .map(|(s, ports)| SourcePorts {
                    source: s.to_string(),
                    ports: names(&mut ports.iter().copied()),
                })
                .collect(),
            members,
        });
    }
    let mut queriers = Vec::new();
    for port in control.engine.ports() {
        for (family, fname) in [(Family::V4, "ipv4"), (Family::V6, "ipv6")] {
            if let Some(q) = control.engine.querier(port, family) {
                queriers.push(QuerierState {
                    port: control.name(port),
                    family: fname.into(),
                    address: q.address.to_string(),
                    is_self: q.is_self,
                });
            }
        }
    }
    let mut routers = control.engine.router_ports(Family::V4);
    routers.extend(control.engine.router_ports(Family::V6));
    DaemonState {
        written_unix_ms: unix_ms(),
        pid: std::process::id(),
        groups,
        queriers,
        router_ports: names(&mut routers.into_iter()),
        control: control.counters.clone(),
        clients: Vec::new(),
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, ms)
}

/// Writes the state file atomically (temporary file + rename).
pub fn write(path: &Path, state: &DaemonState) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(state).context("serialising the state")?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
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
