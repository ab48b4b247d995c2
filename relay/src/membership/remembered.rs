//! Memberships of a vanished port, kept by interface name for one group membership interval.
//!
//! An interface that is destroyed and created again under the same name (an OpenVPN restart
//! re-creates its tap) gets these memberships back at once, as if its members had just
//! reported: forwarding resumes as soon as the device exists, not when the next query is
//! answered (hosts behind it never noticed the flap and send no report by themselves).
//! Members that are really gone time out after one membership interval as usual.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use super::{ClientId, Clients, Engine, FilterMode, GroupRecord, Message, MessageKind, RecordType};

/// What a vanished port had learned.
#[derive(Debug)]
pub struct Remembered {
    until: Duration,
    records: Vec<GroupRecord>,
    clients: Vec<(IpAddr, ClientId)>,
}

impl Remembered {
    /// What `port` has learned now, as current-state records.
    pub fn of_port(engine: &Engine, clients: &Clients, port: u32, now: Duration) -> Self {
        let mut records = Vec::new();
        for g in engine.groups(now) {
            for p in g.ports.iter().filter(|p| p.port == port) {
                let (kind, sources) = match p.mode {
                    // Excluded sources are the ones without a timer.
                    FilterMode::Exclude => (
                        RecordType::IsExclude,
                        p.sources.iter().filter(|s| s.timer.is_none()).map(|s| s.source).collect(),
                    ),
                    FilterMode::Include => {
                        (RecordType::IsInclude, p.sources.iter().map(|s| s.source).collect())
                    }
                };
                records.push(GroupRecord { kind, group: g.group, sources });
            }
        }
        Self { until: now + engine.config().gmi(), records, clients: clients.of_port(port) }
    }

    /// Whether there is anything to give back.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.clients.is_empty()
    }

    /// The number of group records.
    pub fn groups(&self) -> usize {
        self.records.len()
    }

    /// Whether the memberships are still within their membership interval.
    pub fn is_current(&self, now: Duration) -> bool {
        self.until > now
    }

    /// Gives the memberships to `port` (the re-created interface).
    pub fn restore(self, engine: &mut Engine, clients: &mut Clients, port: u32, now: Duration) {
        let (v4, v6): (Vec<_>, Vec<_>) = self.records.into_iter().partition(|r| r.group.is_ipv4());
        for (records, source) in
            [(v4, IpAddr::from(Ipv4Addr::UNSPECIFIED)), (v6, IpAddr::from(Ipv6Addr::UNSPECIFIED))]
        {
            if !records.is_empty() {
                let msg = Message { source, kind: MessageKind::V3Report { records } };
                engine.handle(now, port, &msg);
            }
        }
        let expiry = now + engine.config().gmi();
        for (group, mac) in self.clients {
            clients.join(group, port, mac, expiry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Config, PortOptions};

    const NOW: Duration = Duration::from_secs(100);

    #[test]
    fn a_recreated_port_gets_its_memberships_back() {
        let mut engine = Engine::new(Config::default());
        let mut clients = Clients::default();
        engine.add_port(NOW, 3, PortOptions::default());
        clients.add_port(3);
        let group: IpAddr = "239.1.2.3".parse().expect("group");
        let blocked: IpAddr = "10.9.9.9".parse().expect("source");
        let report = Message {
            source: "10.0.0.2".parse().expect("host"),
            kind: MessageKind::V3Report {
                records: vec![GroupRecord {
                    kind: RecordType::IsExclude,
                    group,
                    sources: vec![blocked],
                }],
            },
        };
        engine.handle(NOW, 3, &report);
        clients.join(group, 3, ClientId::Mac([2, 0, 0, 0, 0, 1]), NOW + Duration::from_secs(260));
        let remembered = Remembered::of_port(&engine, &clients, 3, NOW);
        assert_eq!(remembered.groups(), 1);
        assert!(remembered.is_current(NOW + Duration::from_secs(259)));
        assert!(!remembered.is_current(NOW + engine.config().gmi()));

        engine.remove_port(3);
        clients.remove_port(3);
        assert!(engine.forwarding(&group).is_empty());
        // The interface comes back with another ifindex.
        engine.add_port(NOW, 9, PortOptions::default());
        clients.add_port(9);
        remembered.restore(&mut engine, &mut clients, 9, NOW);
        let forwarding = engine.forwarding(&group);
        assert!(forwarding.ports_for(&"10.1.1.1".parse().expect("source")).contains(&9));
        assert!(!forwarding.ports_for(&blocked).contains(&9), "the blocked source stays blocked");
        assert_eq!(clients.members(group, 9), [ClientId::Mac([2, 0, 0, 0, 0, 1])]);
    }
}
