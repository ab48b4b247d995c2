//! Per-client membership on shared ports: which client joined which group on which port. A
//! client is known by its unicast MAC on an Ethernet port (an OpenVPN `dev tap` server's TAP),
//! by its address on an L3 port (a tun or WireGuard peer: the source of its reports). The
//! port-level state is the engine's; this only decides which clients get their own copy.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use super::{engine::is_tracked, Message, MessageKind, RecordType, Refusal, Refused};

/// A client of a per-client port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientId {
    /// A host behind an Ethernet port, by its unicast MAC.
    Mac([u8; 6]),
    /// A peer behind an L3 port (tun, WireGuard), by its tunnel address.
    Peer(IpAddr),
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mac(mac) => f.write_str(&crate::state::mac_string(mac)),
            Self::Peer(address) => address.fmt(f),
        }
    }
}

/// A client's membership in one group: until when, and when it first joined (copies go to
/// clients in the order they came, so a host forging many MACs cannot push out real ones).
#[derive(Debug, Clone, Copy)]
struct Member {
    expiry: Duration,
    since: u64,
}

/// Clients of the per-client ports and their memberships.
#[derive(Debug)]
pub struct Clients {
    /// Ports with per-client delivery.
    ports: BTreeSet<u32>,
    /// (group, port) -> client MAC -> its membership.
    members: BTreeMap<(IpAddr, u32), BTreeMap<ClientId, Member>>,
    /// Groups whose members changed since [`Clients::take_changed`].
    changed: BTreeSet<IpAddr>,
    /// Most distinct clients per port.
    max_per_port: usize,
    /// Joins counter (order of arrival).
    joins: u64,
    refused: Vec<Refused>,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            ports: BTreeSet::new(),
            members: BTreeMap::new(),
            changed: BTreeSet::new(),
            max_per_port: relay_common::MAX_CLIENTS_PER_SET,
            joins: 0,
            refused: Vec::new(),
        }
    }
}

impl Clients {
    /// Most distinct clients a port may have (joins of further clients are refused).
    pub fn set_max_per_port(&mut self, max: usize) {
        self.max_per_port = max;
    }

    /// Joins refused since the last call.
    pub fn take_refused(&mut self) -> Vec<Refused> {
        std::mem::take(&mut self.refused)
    }

    /// Distinct clients with a membership on `port`.
    fn clients_on(&self, port: u32) -> BTreeSet<ClientId> {
        self.members
            .iter()
            .filter(|((_, p), _)| *p == port)
            .flat_map(|(_, clients)| clients.keys().copied())
            .collect()
    }

    /// Turns per-client delivery on for `port`.
    pub fn add_port(&mut self, port: u32) {
        self.ports.insert(port);
    }

    /// Forgets `port` and its clients.
    pub fn remove_port(&mut self, port: u32) {
        self.ports.remove(&port);
        let changed = &mut self.changed;
        self.members.retain(|(group, p), _| {
            let keep = *p != port;
            if !keep {
                changed.insert(*group);
            }
            keep
        });
    }

    /// Whether `port` has per-client delivery.
    pub fn is_per_client(&self, port: u32) -> bool {
        self.ports.contains(&port)
    }

    /// The per-client ports.
    pub fn ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports.iter().copied()
    }

    /// A membership message from the client `client` on `port`: a join (re)arms the client's
    /// timer until `expiry` (one group membership interval from now), a leave ends it at once
    /// (the port-level state still goes through the normal last-member queries).
    pub fn on_message(&mut self, port: u32, client: ClientId, msg: &Message, expiry: Duration) {
        if !self.is_per_client(port) {
            return;
        }
        let mut joins: Vec<IpAddr> = Vec::new();
        let mut leaves: Vec<IpAddr> = Vec::new();
        match &msg.kind {
            MessageKind::V1Report { group } | MessageKind::V2Report { group } => joins.push(*group),
            MessageKind::Leave { group } => leaves.push(*group),
            MessageKind::V3Report { records } => {
                for r in records {
                    match r.kind {
                        RecordType::IsExclude | RecordType::ToExclude => joins.push(r.group),
                        RecordType::IsInclude | RecordType::AllowNew if !r.sources.is_empty() => {
                            joins.push(r.group);
                        }
                        RecordType::ToInclude if r.sources.is_empty() => leaves.push(r.group),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        for group in joins.into_iter().filter(is_tracked) {
            self.join(group, port, client, expiry);
        }
        for group in leaves {
            if let Some(clients) = self.members.get_mut(&(group, port)) {
                if clients.remove(&client).is_some() {
                    self.changed.insert(group);
                }
            }
        }
    }

    /// Makes `client` a member of `group` on `port` until `expiry`; refused (and recorded) when
    /// `client` is a new client on a port that has its most clients.
    pub fn join(&mut self, group: IpAddr, port: u32, client: ClientId, expiry: Duration) {
        if let Some(member) = self.members.get_mut(&(group, port)).and_then(|m| m.get_mut(&client))
        {
            member.expiry = expiry;
            return;
        }
        let clients = self.clients_on(port);
        if !clients.contains(&client) && clients.len() >= self.max_per_port {
            self.refused.push(Refused { port, group, why: Refusal::MaxClientsPerPort });
            return;
        }
        self.joins += 1;
        let member = Member { expiry, since: self.joins };
        self.members.entry((group, port)).or_default().insert(client, member);
        self.changed.insert(group);
    }

    /// Drops memberships that timed out.
    pub fn expire(&mut self, now: Duration) {
        for ((group, _), clients) in &mut self.members {
            let before = clients.len();
            clients.retain(|_, member| member.expiry > now);
            if clients.len() != before {
                self.changed.insert(*group);
            }
        }
        self.members.retain(|_, clients| !clients.is_empty());
    }

    /// The groups whose members changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<IpAddr> {
        std::mem::take(&mut self.changed)
    }

    /// The clients that are members of `group` on `port`, first come first.
    pub fn members(&self, group: IpAddr, port: u32) -> Vec<ClientId> {
        let mut members: Vec<(ClientId, u64)> = self
            .members
            .get(&(group, port))
            .into_iter()
            .flat_map(|m| m.iter().map(|(client, member)| (*client, member.since)))
            .collect();
        members.sort_by_key(|(_, since)| *since);
        members.into_iter().map(|(client, _)| client).collect()
    }

    /// The IPv4 peers of an L3 port with some membership there.
    pub fn peers_on(&self, port: u32) -> Vec<std::net::Ipv4Addr> {
        self.clients_on(port)
            .into_iter()
            .filter_map(|c| match c {
                ClientId::Peer(IpAddr::V4(a)) => Some(a),
                _ => None,
            })
            .collect()
    }

    /// The groups client `client` on `port` is a member of.
    pub fn groups_of(&self, port: u32, client: ClientId) -> Vec<IpAddr> {
        self.members
            .iter()
            .filter(|((_, p), clients)| *p == port && clients.contains_key(&client))
            .map(|((group, _), _)| *group)
            .collect()
    }

    /// Whether client `client` on `port` is a member of any group.
    pub fn is_member(&self, port: u32, client: ClientId) -> bool {
        self.members.iter().any(|((_, p), clients)| *p == port && clients.contains_key(&client))
    }

    /// Every (group, client) membership on `port`.
    pub fn of_port(&self, port: u32) -> Vec<(IpAddr, ClientId)> {
        self.members
            .iter()
            .filter(|((_, p), _)| *p == port)
            .flat_map(|((group, _), clients)| clients.keys().map(move |client| (*group, *client)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::membership::GroupRecord;

    const A: ClientId = ClientId::Mac([2, 0, 0, 0, 0, 0xa]);
    const B: ClientId = ClientId::Mac([2, 0, 0, 0, 0, 0xb]);
    const G: IpAddr = IpAddr::V4(Ipv4Addr::new(239, 1, 1, 1));
    const SECOND: Duration = Duration::from_secs(1);

    fn msg(kind: MessageKind) -> Message {
        Message { source: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), kind }
    }

    fn record(kind: RecordType, sources: &[&str]) -> Message {
        let sources = sources.iter().map(|s| s.parse().expect("address")).collect();
        msg(MessageKind::V3Report { records: vec![GroupRecord { kind, group: G, sources }] })
    }

    #[test]
    fn joins_and_leaves_of_each_client_are_tracked_separately() {
        let mut c = Clients::default();
        c.add_port(7);
        c.on_message(7, A, &msg(MessageKind::V2Report { group: G }), 10 * SECOND);
        c.on_message(7, B, &record(RecordType::IsExclude, &[]), 10 * SECOND);
        assert_eq!(c.members(G, 7), [A, B]);
        assert_eq!(c.take_changed(), BTreeSet::from([G]));
        // A renewal changes nothing that the dataplane needs to know.
        c.on_message(7, A, &msg(MessageKind::V2Report { group: G }), 20 * SECOND);
        assert!(c.take_changed().is_empty());
        c.on_message(7, A, &msg(MessageKind::Leave { group: G }), 20 * SECOND);
        assert_eq!(c.members(G, 7), [B]);
        assert_eq!(c.take_changed(), BTreeSet::from([G]));
        c.on_message(7, B, &record(RecordType::ToInclude, &[]), 20 * SECOND);
        assert!(c.members(G, 7).is_empty());
    }

    #[test]
    fn source_specific_joins_count_and_empty_includes_do_not() {
        let mut c = Clients::default();
        c.add_port(7);
        c.on_message(7, A, &record(RecordType::IsInclude, &[]), 10 * SECOND);
        assert!(c.members(G, 7).is_empty());
        c.on_message(7, A, &record(RecordType::AllowNew, &["10.0.0.9"]), 10 * SECOND);
        assert_eq!(c.groups_of(7, A), [G]);
    }

    #[test]
    fn ports_without_per_client_delivery_and_link_local_groups_are_ignored() {
        let mut c = Clients::default();
        c.add_port(7);
        c.on_message(8, A, &msg(MessageKind::V2Report { group: G }), 10 * SECOND);
        let local = IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251));
        c.on_message(7, A, &msg(MessageKind::V2Report { group: local }), 10 * SECOND);
        assert!(c.of_port(7).is_empty() && c.of_port(8).is_empty());
    }

    #[test]
    fn memberships_expire_and_removed_ports_take_their_clients_along() {
        let mut c = Clients::default();
        c.add_port(7);
        c.join(G, 7, A, 5 * SECOND);
        c.join(G, 7, B, 15 * SECOND);
        c.take_changed();
        c.expire(10 * SECOND);
        assert_eq!(c.members(G, 7), [B]);
        assert!(c.is_member(7, B) && !c.is_member(7, A));
        assert_eq!(c.take_changed(), BTreeSet::from([G]));
        c.remove_port(7);
        assert!(!c.is_per_client(7) && c.members(G, 7).is_empty());
        assert_eq!(c.take_changed(), BTreeSet::from([G]));
    }
}
