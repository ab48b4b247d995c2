//! The state `mcrelay groups` shows, built from the control plane (written to the state file
//! by the daemon, [`crate::state`]).

use std::{net::IpAddr, time::Duration};

use super::Control;
use crate::{
    dataplane::Dataplane,
    membership::{ClientId, CompatMode, Family, FilterMode},
    state::{
        mac_string, ms, unix_ms, ClientState, ControlCounters, DaemonState, GroupState,
        MemberState, QuerierState, SourcePorts, SourceTimer,
    },
};

fn compat_name(c: CompatMode) -> &'static str {
    match c {
        CompatMode::IgmpV1 => "igmpv1",
        CompatMode::IgmpV2 => "igmpv2",
        CompatMode::IgmpV3 => "igmpv3",
        CompatMode::MldV1 => "mldv1",
        CompatMode::MldV2 => "mldv2",
    }
}

/// The state of a running control plane.
pub fn build(control: &Control, now: Duration, dp: &Dataplane) -> DaemonState {
    // A per-client key stands for a copy to one client of a port: the port is named, once.
    let names = |ports: &mut dyn Iterator<Item = u32>| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in ports {
            let name = control.name(dp.client_port(p).unwrap_or(p));
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
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
        control: ControlCounters {
            tc_targets_cut: dp.tc_targets_cut(),
            ..control.counters.clone()
        },
        clients: clients(control, dp),
        not_taken: control.not_taken.iter().cloned().collect(),
    }
}

/// Per-client delivery: each client, its groups and the copies sent to it.
fn clients(control: &Control, dp: &Dataplane) -> Vec<ClientState> {
    dp.client_copies()
        .into_iter()
        .map(|(port, client, copies)| ClientState {
            port: control.name(port),
            mac: match client {
                ClientId::Mac(mac) => Some(mac_string(&mac)),
                ClientId::Peer(_) => None,
            },
            address: match client {
                ClientId::Peer(address) => Some(address.to_string()),
                ClientId::Mac(_) => None,
            },
            groups: control.clients.groups_of(port, client).iter().map(IpAddr::to_string).collect(),
            copies,
        })
        .collect()
}
