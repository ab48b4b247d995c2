//! The reconciler against a fake kernel: a map from key to port set that can be told to
//! refuse writes of some keys.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

const LAN: u32 = 2;
const TAP: u32 = 3;
const WAN: u32 = 4;

/// A `GROUP_PORTS` stand-in: what a kernel would hold after the writes.
#[derive(Default)]
struct FakeKernel {
    entries: BTreeMap<GroupKey, BTreeSet<u32>>,
    routers: Vec<u32>,
    /// Writes of these keys fail (as a full map or a refused inner map would).
    refuse: BTreeSet<GroupKey>,
    rounds: usize,
}

/// A write the fake kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("no room in the fake map")]
struct Full;

impl GroupWriter for FakeKernel {
    type Error = Full;

    fn write_groups(&mut self, writes: Vec<GroupWrite>) -> Vec<(GroupKey, Full)> {
        self.rounds += 1;
        let mut failed = Vec::new();
        for write in writes {
            let key = match &write {
                GroupWrite::Set(k, _) | GroupWrite::Remove(k) => *k,
            };
            if self.refuse.contains(&key) {
                failed.push((key, Full));
                continue;
            }
            match write {
                GroupWrite::Set(k, ports) => {
                    self.entries.insert(k, ports.into_iter().collect());
                }
                GroupWrite::Remove(k) => {
                    self.entries.remove(&k);
                }
            }
        }
        failed
    }

    fn set_router_ports(&mut self, ifindexes: &[u32]) -> Result<(), Full> {
        self.routers = ifindexes.to_vec();
        Ok(())
    }
}

impl FakeKernel {
    /// The kernel's content in the reconciler's terms, to compare with `installed()`.
    fn as_installed(&self) -> BTreeMap<IpAddr, Installed> {
        let mut out: BTreeMap<IpAddr, Installed> = BTreeMap::new();
        for (key, ports) in &self.entries {
            let group = crate::groups::key_group(key);
            let entry = out.entry(group).or_default();
            if key.source == [0; 16] {
                entry.any_source = ports.clone();
            } else {
                let source =
                    crate::groups::key_group(&GroupKey { group: key.source, source: [0; 16] });
                entry.per_source.insert(source, ports.clone());
            }
        }
        out
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn set(ports: &[u32]) -> BTreeSet<u32> {
    ports.iter().copied().collect()
}

fn any_source(ports: &[u32]) -> Forwarding {
    Forwarding { any_source: set(ports), per_source: BTreeMap::new() }
}

#[test]
fn learned_group_is_written_once_and_left_alone_when_unchanged() {
    let mut kernel = FakeKernel::default();
    let mut table = GroupTable::default();
    let g = ip("239.1.1.1");
    assert_eq!(table.sync(&mut kernel, [(g, any_source(&[LAN, TAP]))]).expect("sync"), 1);
    assert_eq!(kernel.entries[&group_key(g)], set(&[LAN, TAP]));
    let rounds = kernel.rounds;
    assert_eq!(table.sync(&mut kernel, [(g, any_source(&[LAN, TAP]))]).expect("sync"), 0);
    assert_eq!(kernel.rounds, rounds, "no write for an unchanged set");
    // Everyone left: the entry goes.
    table.sync(&mut kernel, [(g, Forwarding::default())]).expect("sync");
    assert!(kernel.entries.is_empty());
    assert!(table.installed().is_empty());
}

#[test]
fn adopted_sets_stay_until_adoption_ends() {
    let mut kernel = FakeKernel::default();
    let g = ip("239.2.2.2");
    // What a previous daemon left: LAN and TAP.
    kernel.entries.insert(group_key(g), set(&[LAN, TAP]));
    let mut table = GroupTable::default();
    table.adopt(kernel.as_installed());
    // Only TAP has reported again so far: LAN keeps its copy while adopting.
    table.sync(&mut kernel, [(g, any_source(&[TAP]))]).expect("sync");
    assert_eq!(kernel.entries[&group_key(g)], set(&[LAN, TAP]));
    assert!(table.adopting());
    // One membership interval later LAN has not reported: it goes.
    table.end_adoption(&mut kernel, |_| any_source(&[TAP])).expect("end");
    assert!(!table.adopting());
    assert_eq!(kernel.entries[&group_key(g)], set(&[TAP]));
    assert_eq!(table.installed(), &kernel.as_installed());
}

#[test]
fn per_client_keys_replace_the_shared_port() {
    let mut kernel = FakeKernel::default();
    let mut table = GroupTable::default();
    let g = ip("239.3.3.3");
    let clients = set(&[0x8000_0100, 0x8000_0101]);
    table.set_clients(g, TAP, clients.clone());
    table.sync(&mut kernel, [(g, any_source(&[LAN, TAP]))]).expect("sync");
    let mut want = clients;
    want.insert(LAN);
    assert_eq!(kernel.entries[&group_key(g)], want, "TAP replaced by its two client keys");
    // The clients left: TAP gets plain copies again.
    table.set_clients(g, TAP, BTreeSet::new());
    table.sync(&mut kernel, [(g, any_source(&[LAN, TAP]))]).expect("sync");
    assert_eq!(kernel.entries[&group_key(g)], set(&[LAN, TAP]));
}

#[test]
fn blocked_source_gets_an_empty_source_entry() {
    let mut kernel = FakeKernel::default();
    let mut table = GroupTable::default();
    let g = ip("239.4.4.4");
    let s = ip("10.0.0.9");
    // EXCLUDE {s} on LAN: every source but s. The engine reports s with no port.
    let fwd = Forwarding {
        any_source: set(&[LAN]),
        per_source: [(s, BTreeSet::new())].into_iter().collect(),
    };
    table.sync(&mut kernel, [(g, fwd)]).expect("sync");
    assert_eq!(kernel.entries[&group_key(g)], set(&[LAN]));
    assert_eq!(
        kernel.entries.get(&source_key(g, s)),
        Some(&BTreeSet::new()),
        "an empty (S,G) entry keeps s off the (*,G) ports"
    );
    // The source is allowed again: its entry goes.
    table.sync(&mut kernel, [(g, any_source(&[LAN]))]).expect("sync");
    assert!(!kernel.entries.contains_key(&source_key(g, s)));
}

#[test]
fn failed_write_leaves_both_views_equal_and_is_retried() {
    let mut kernel = FakeKernel::default();
    let mut table = GroupTable::default();
    let ok = ip("239.5.5.1");
    let refused = ip("239.5.5.2");
    kernel.refuse.insert(group_key(refused));
    let err = table
        .sync(&mut kernel, [(ok, any_source(&[LAN])), (refused, any_source(&[TAP]))])
        .expect_err("one write fails");
    assert_eq!(err.failed.len(), 1);
    assert_eq!(err.failed[0].0, "239.5.5.2");
    // The refused group is not recorded as installed; the other one is.
    assert_eq!(table.installed(), &kernel.as_installed());
    assert!(!table.installed().contains_key(&refused));
    // Room again: the same desired state is written on the next round.
    kernel.refuse.clear();
    table.sync(&mut kernel, [(refused, any_source(&[TAP]))]).expect("retry");
    assert_eq!(kernel.entries[&group_key(refused)], set(&[TAP]));
    assert_eq!(table.installed(), &kernel.as_installed());
}

#[test]
fn failed_removal_keeps_the_old_record() {
    let mut kernel = FakeKernel::default();
    let mut table = GroupTable::default();
    let g = ip("239.6.6.6");
    table.sync(&mut kernel, [(g, any_source(&[LAN]))]).expect("sync");
    kernel.refuse.insert(group_key(g));
    table.sync(&mut kernel, [(g, Forwarding::default())]).expect_err("removal fails");
    assert_eq!(table.installed(), &kernel.as_installed(), "still installed in both views");
}

#[test]
fn router_ports_join_every_installed_group_and_statics_follow_names() {
    let mut kernel = FakeKernel::default();
    let g = ip("239.7.7.7");
    let mut table = GroupTable::new([(g, set(&[LAN]))].into_iter().collect());
    table.reapply(&mut kernel, |_| Forwarding::default(), []).expect("statics");
    assert_eq!(kernel.entries[&group_key(g)], set(&[LAN]));
    table.set_routers(&mut kernel, |_| Forwarding::default(), set(&[WAN])).expect("routers");
    assert_eq!(kernel.routers, vec![WAN]);
    assert_eq!(kernel.entries[&group_key(g)], set(&[LAN, WAN]));
    // The static port moved (interface re-created with another ifindex).
    table
        .set_statics(
            &mut kernel,
            |_| Forwarding::default(),
            [(g, set(&[TAP]))].into_iter().collect(),
        )
        .expect("statics");
    assert_eq!(kernel.entries[&group_key(g)], set(&[TAP, WAN]));
}

#[test]
fn denied_group_gets_no_entry() {
    let mut kernel = FakeKernel::default();
    let mut table = GroupTable::default();
    let g = ip("239.8.8.8");
    table.sync(&mut kernel, [(g, any_source(&[LAN]))]).expect("sync");
    table.set_policy(GroupPolicy { allow: Vec::new(), deny: vec![(ip("239.8.0.0"), 16)] });
    table.reapply(&mut kernel, |_| any_source(&[LAN]), [g]).expect("reapply");
    assert!(kernel.entries.is_empty());
}
