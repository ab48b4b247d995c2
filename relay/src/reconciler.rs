//! The reconciler: turns what the membership engine learned (plus static members, router
//! ports, per-client keys and the group policy) into `GROUP_PORTS` entries, and keeps a record
//! of exactly what the kernel holds.
//!
//! For each group it wants one (*,G) entry with the ports that take every source, and one
//! (S,G) entry per source some port named (even an empty one: it keeps a blocked source off
//! the (*,G) ports). Only keys whose port set changed are written. The kernel is reached
//! through [`GroupWriter`], so this logic is unit-tested on the host with a fake writer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use relay_common::GroupKey;

use crate::{config::GroupPolicy, groups::group_key, membership::Forwarding};

/// One change to `GROUP_PORTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupWrite {
    /// Replace (or create) the key's port set; the values are inner-map keys (ifindexes or
    /// per-client keys). An empty set is kept as an entry.
    Set(GroupKey, Vec<u32>),
    /// Remove the key.
    Remove(GroupKey),
}

/// What the reconciler needs from the kernel side.
pub trait GroupWriter {
    /// Why a write failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Carries out a round of writes. Returns the keys whose write failed; the kernel kept
    /// what it had for those, every other key now holds what was written.
    fn write_groups(&mut self, writes: Vec<GroupWrite>) -> Vec<(GroupKey, Self::Error)>;

    /// Sets the ports that lead to multicast routers (targets for unknown groups).
    fn set_router_ports(&mut self, ifindexes: &[u32]) -> Result<(), Self::Error>;
}

/// Writes that failed in a round: the reconciler's record keeps the old sets for them, so the
/// next round writes them again.
#[derive(Debug, thiserror::Error)]
#[error("{} group map write(s) failed (first: {}: {})", .failed.len(), .failed[0].0, .failed[0].1)]
pub struct WriteFailures<E: std::error::Error> {
    pub failed: Vec<(String, E)>,
}

/// What is installed for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Ports for sources without their own entry: the (*,G) entry.
    pub any_source: BTreeSet<u32>,
    /// (S,G) entries.
    pub per_source: BTreeMap<IpAddr, BTreeSet<u32>>,
}

/// Desired and installed group port sets.
#[derive(Debug, Default)]
pub struct GroupTable {
    statics: BTreeMap<IpAddr, BTreeSet<u32>>,
    routers: BTreeSet<u32>,
    /// What the kernel holds, key by key (updated only for writes that succeeded).
    installed: BTreeMap<IpAddr, Installed>,
    /// Port sets a previous daemon left in the maps (hitless restart). They stay in force,
    /// united with what is learned, until [`GroupTable::end_adoption`] (one membership
    /// interval after start: by then every live member has reported again).
    adopted: BTreeMap<IpAddr, Installed>,
    /// Groups that may be relayed at all (`[policy]`); others get no entries.
    policy: GroupPolicy,
    /// Per-client delivery: for (group, shared port), the inner-map keys of the clients that
    /// joined through that port. The port itself is replaced by these keys.
    clients: BTreeMap<(IpAddr, u32), BTreeSet<u32>>,
    /// Ports that get no copies at all (standby by the loop guard).
    excluded: BTreeSet<u32>,
}

/// The (S,G) map key.
pub fn source_key(group: IpAddr, source: IpAddr) -> GroupKey {
    let mut key = group_key(group);
    key.source = group_key(source).group;
    key
}

/// Where a write lands in [`Installed`]: the (*,G) set or one source's set.
#[derive(Debug, Clone, Copy)]
struct Slot {
    group: IpAddr,
    source: Option<IpAddr>,
}

impl GroupTable {
    pub fn new(statics: BTreeMap<IpAddr, BTreeSet<u32>>) -> Self {
        Self { statics, ..Self::default() }
    }

    /// What should be installed for `group` given the engine's view.
    pub fn desired(&self, group: IpAddr, learned: &Forwarding) -> Installed {
        let mut want = self.desired_now(group, learned);
        if let Some(old) = self.adopted.get(&group) {
            want.any_source.extend(old.any_source.iter().copied());
            for (s, ports) in &old.per_source {
                want.per_source.entry(*s).or_default().extend(ports.iter().copied());
            }
        }
        if !self.excluded.is_empty() {
            want.any_source.retain(|p| !self.excluded.contains(p));
            for ports in want.per_source.values_mut() {
                ports.retain(|p| !self.excluded.contains(p));
            }
        }
        want
    }

    fn desired_now(&self, group: IpAddr, learned: &Forwarding) -> Installed {
        let mut want = self.desired_ports(group, learned);
        let substitute = |ports: &mut BTreeSet<u32>| {
            let shared: Vec<u32> = ports
                .iter()
                .copied()
                .filter(|p| self.clients.get(&(group, *p)).is_some_and(|c| !c.is_empty()))
                .collect();
            for p in shared {
                ports.remove(&p);
                ports.extend(self.clients[&(group, p)].iter().copied());
            }
        };
        substitute(&mut want.any_source);
        for ports in want.per_source.values_mut() {
            substitute(ports);
        }
        want
    }

    /// Sets the per-client keys of a (group, shared port); empty: the port gets plain copies.
    pub fn set_clients(&mut self, group: IpAddr, port: u32, keys: BTreeSet<u32>) {
        if keys.is_empty() {
            self.clients.remove(&(group, port));
        } else {
            self.clients.insert((group, port), keys);
        }
    }

    /// Ports that must get no copies (call [`GroupTable::reapply`] after a change).
    pub fn set_excluded(&mut self, ports: BTreeSet<u32>) {
        self.excluded = ports;
    }

    fn desired_ports(&self, group: IpAddr, learned: &Forwarding) -> Installed {
        if !self.policy.permits(group) {
            return Installed::default();
        }
        let statics = self.statics.get(&group);
        if learned.is_empty() && statics.is_none() {
            return Installed::default();
        }
        let extra: BTreeSet<u32> =
            statics.into_iter().flatten().chain(self.routers.iter()).copied().collect();
        let mut any_source: BTreeSet<u32> = learned.any_source.union(&extra).copied().collect();
        if learned.any_source.is_empty() && statics.is_none() {
            // Nobody wants "all sources": sources without an entry are an unknown flow.
            any_source.clear();
        }
        let per_source = learned
            .per_source
            .iter()
            .map(|(s, ports)| (*s, ports.union(&extra).copied().collect()))
            .collect();
        Installed { any_source, per_source }
    }

    /// Brings the entries of `groups` in line with what is wanted, in one round of writes.
    /// Returns how many groups changed; keys whose write failed keep their old record (so the
    /// next round retries them) and are reported in the error.
    pub fn sync<W: GroupWriter>(
        &mut self,
        writer: &mut W,
        groups: impl IntoIterator<Item = (IpAddr, Forwarding)>,
    ) -> Result<usize, WriteFailures<W::Error>> {
        let mut writes = Vec::new();
        let mut slots: BTreeMap<GroupKey, (Slot, Option<BTreeSet<u32>>)> = BTreeMap::new();
        let mut changed = 0;
        for (group, learned) in groups {
            let want = self.desired(group, &learned);
            let have = self.installed.get(&group).cloned().unwrap_or_default();
            if want == have {
                continue;
            }
            changed += 1;
            let any = Slot { group, source: None };
            if want.any_source != have.any_source {
                let key = group_key(group);
                if want.any_source.is_empty() {
                    writes.push(GroupWrite::Remove(key));
                    slots.insert(key, (any, None));
                } else {
                    writes.push(GroupWrite::Set(key, want.any_source.iter().copied().collect()));
                    slots.insert(key, (any, Some(want.any_source.clone())));
                }
            }
            for (source, ports) in &want.per_source {
                if have.per_source.get(source) != Some(ports) {
                    let key = source_key(group, *source);
                    writes.push(GroupWrite::Set(key, ports.iter().copied().collect()));
                    slots.insert(key, (Slot { group, source: Some(*source) }, Some(ports.clone())));
                }
            }
            for source in have.per_source.keys() {
                if !want.per_source.contains_key(source) {
                    let key = source_key(group, *source);
                    writes.push(GroupWrite::Remove(key));
                    slots.insert(key, (Slot { group, source: Some(*source) }, None));
                }
            }
        }
        if writes.is_empty() {
            return Ok(changed);
        }
        let failed = writer.write_groups(writes);
        let failed_keys: BTreeSet<GroupKey> = failed.iter().map(|(k, _)| *k).collect();
        for (key, (slot, ports)) in slots {
            if !failed_keys.contains(&key) {
                self.record(slot, ports);
            }
        }
        if failed.is_empty() {
            return Ok(changed);
        }
        let failed = failed
            .into_iter()
            .map(|(key, e)| {
                let what = slots_name(&key);
                (what, e)
            })
            .collect();
        Err(WriteFailures { failed })
    }

    /// Records what the kernel now holds for one key.
    fn record(&mut self, slot: Slot, ports: Option<BTreeSet<u32>>) {
        let entry = self.installed.entry(slot.group).or_default();
        match (slot.source, ports) {
            (None, Some(p)) => entry.any_source = p,
            (None, None) => entry.any_source.clear(),
            (Some(s), Some(p)) => {
                entry.per_source.insert(s, p);
            }
            (Some(s), None) => {
                entry.per_source.remove(&s);
            }
        }
        if *entry == Installed::default() {
            self.installed.remove(&slot.group);
        }
    }

    /// Changes the router ports; every installed group gets them too.
    pub fn set_routers<W: GroupWriter>(
        &mut self,
        writer: &mut W,
        forwarding: impl Fn(&IpAddr) -> Forwarding,
        routers: BTreeSet<u32>,
    ) -> anyhow::Result<usize> {
        let routers: BTreeSet<u32> =
            routers.into_iter().filter(|p| !self.excluded.contains(p)).collect();
        if routers == self.routers {
            return Ok(0);
        }
        let ports: Vec<u32> = routers.iter().copied().collect();
        writer.set_router_ports(&ports)?;
        self.routers = routers;
        let groups: Vec<IpAddr> = self.installed.keys().copied().collect();
        Ok(self.sync(writer, groups.into_iter().map(|g| (g, forwarding(&g))))?)
    }

    /// Replaces the static memberships (ifindexes per group) and rewrites the groups whose
    /// static ports changed.
    pub fn set_statics<W: GroupWriter>(
        &mut self,
        writer: &mut W,
        forwarding: impl Fn(&IpAddr) -> Forwarding,
        statics: BTreeMap<IpAddr, BTreeSet<u32>>,
    ) -> Result<usize, WriteFailures<W::Error>> {
        let statics: BTreeMap<IpAddr, BTreeSet<u32>> =
            statics.into_iter().filter(|(_, ports)| !ports.is_empty()).collect();
        let mut changed: BTreeSet<IpAddr> = BTreeSet::new();
        for (g, ports) in &statics {
            if self.statics.get(g) != Some(ports) {
                changed.insert(*g);
            }
        }
        changed.extend(self.statics.keys().filter(|g| !statics.contains_key(g)).copied());
        self.statics = statics;
        self.sync(writer, changed.into_iter().map(|g| (g, forwarding(&g))))
    }

    /// Sets which groups may be relayed (call [`GroupTable::reapply`] after a change).
    pub fn set_policy(&mut self, policy: GroupPolicy) {
        self.policy = policy;
    }

    /// Recomputes every installed or static group plus `learned` (after a policy change).
    pub fn reapply<W: GroupWriter>(
        &mut self,
        writer: &mut W,
        forwarding: impl Fn(&IpAddr) -> Forwarding,
        learned: impl IntoIterator<Item = IpAddr>,
    ) -> Result<usize, WriteFailures<W::Error>> {
        let mut groups: BTreeSet<IpAddr> = self.installed.keys().copied().collect();
        groups.extend(learned);
        groups.extend(self.statics.keys().copied());
        self.sync(writer, groups.into_iter().map(|g| (g, forwarding(&g))))
    }

    /// Removes a vanished port from every remembered set (installed and adopted), so that no
    /// later rewrite names its ifindex; the engine reports the learned groups that change.
    pub fn forget_port(&mut self, port: u32) {
        for sets in [&mut self.installed, &mut self.adopted] {
            for inst in sets.values_mut() {
                inst.any_source.remove(&port);
                for ports in inst.per_source.values_mut() {
                    ports.remove(&port);
                }
            }
        }
        self.routers.remove(&port);
        self.clients.retain(|(_, p), _| *p != port);
    }

    /// Takes over what a previous daemon installed (the maps were reused).
    pub fn adopt(&mut self, installed: BTreeMap<IpAddr, Installed>) {
        self.installed = installed.clone();
        self.adopted = installed;
    }

    /// Whether adopted port sets are still in force.
    pub fn adopting(&self) -> bool {
        !self.adopted.is_empty()
    }

    /// Drops the adopted port sets: from now on only learned, static and router ports count.
    pub fn end_adoption<W: GroupWriter>(
        &mut self,
        writer: &mut W,
        forwarding: impl Fn(&IpAddr) -> Forwarding,
    ) -> Result<usize, WriteFailures<W::Error>> {
        let groups: Vec<IpAddr> = self.adopted.keys().copied().collect();
        self.adopted.clear();
        self.sync(writer, groups.into_iter().map(|g| (g, forwarding(&g))))
    }

    /// Router ports (learned and configured, both families).
    pub fn routers(&self) -> &BTreeSet<u32> {
        &self.routers
    }

    pub fn installed(&self) -> &BTreeMap<IpAddr, Installed> {
        &self.installed
    }

    pub fn is_static(&self, group: &IpAddr) -> bool {
        self.statics.contains_key(group)
    }
}

/// `G` or `(S,G)` for a key, for messages.
fn slots_name(key: &GroupKey) -> String {
    let group = crate::groups::key_group(key);
    if key.source == [0; 16] {
        group.to_string()
    } else {
        let source = crate::groups::key_group(&GroupKey { group: key.source, source: [0; 16] });
        format!("({source},{group})")
    }
}

#[cfg(test)]
mod tests;
