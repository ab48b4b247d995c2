//! The group map writer: `GROUP_PORTS`, a HASH_OF_MAPS from [`GroupKey`] to an inner
//! DEVMAP_HASH holding the port set, `GROUP_PORTS_V4`, the same for IPv4 (*,G) keys with the
//! group's four bytes as key (the XDP program's common lookup hashes 4 bytes, not 32), and
//! `GROUP_TC_PORTS`, the same port sets as arrays for the TC program (which cannot walk a
//! devmap; keyed by [`GroupKey`] for every key), written in the same round right after the
//! port-set maps for the keys written there. Callers see one map of [`GroupKey`]s: which of
//! the two outer maps a key lives in is decided here ([`GroupKey::v4_any_source`]).
//!
//! A change builds a new inner map and swaps it in with one outer-map write, so a packet sees
//! the old port set or the new one, never a half-built one. Every syscall write of a
//! map-of-maps waits for an RCU grace period (~10 ms here) before it returns; the writes of a
//! round go out as one BPF_MAP_UPDATE_BATCH and one BPF_MAP_DELETE_BATCH, so 10,000 groups are
//! written in well under a second. When a batch fails, keys are written one by one so that
//! every key's outcome is known: the writer's view of the kernel is exact.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    time::Instant,
};

use aya::{
    maps::{of_maps::HashOfMaps, DevMapHash, HashMap, Map, MapData},
    programs::ProgramFd,
};
use relay_common::{
    v4_group_of_key, GroupKey, TcPorts, BPF_MAP_TYPE_DEVMAP_HASH, DEVMAP_VALUE_SIZE,
    MAX_PORTS_PER_GROUP, TC_TARGET_PEER,
};

use super::{
    error::{DataplaneError, KernelContext as _},
    sys::{delete_batch, is_not_found, update_batch},
};

/// One entry of a port set: where a copy goes.
#[derive(Debug, Clone, Copy)]
pub struct InnerEntry<'a> {
    /// The inner map key (a port's ifindex, or a per-client key).
    pub key: u32,
    /// The interface the copy leaves through.
    pub ifindex: u32,
    /// The devmap egress program run on the copy (per-client delivery), if any.
    pub program: Option<&'a ProgramFd>,
}

/// `GROUP_PORTS`, `GROUP_PORTS_V4` and the inner maps they refer to, as the kernel has them.
pub struct GroupMaps {
    outer: HashOfMaps<MapData, GroupKey, DevMapHash<MapData>>,
    /// The fd of `outer` (for the batch calls aya does not have).
    outer_fd: RawFd,
    /// `GROUP_PORTS_V4`: the IPv4 (*,G) keys.
    v4: HashOfMaps<MapData, u32, DevMapHash<MapData>>,
    /// The fd of `v4`.
    v4_fd: RawFd,
    /// `GROUP_TC_PORTS`: the same keys, the port sets as [`TcPorts`] arrays.
    tc: HashMap<MapData, GroupKey, TcPorts>,
    /// The inner-map keys (ports, per-client keys) of every entry, as written. The inner maps
    /// themselves are not kept open: the outer map holds the only reference, so the daemon's
    /// descriptors do not grow with the number of groups.
    inner: BTreeMap<GroupKey, Vec<u32>>,
    /// When the last `GROUP_PORTS` change was issued. The kernel makes a new entry visible to
    /// the program at once, then waits for an RCU grace period before the syscall returns;
    /// this marks the moment forwarding changes.
    last_publish: Option<Instant>,
}

impl GroupMaps {
    /// Wraps the maps; with `adopted`, takes over the entries a previous daemon left.
    pub fn new(
        outer: Map,
        v4: Map,
        tc: HashMap<MapData, GroupKey, TcPorts>,
        adopted: bool,
    ) -> Result<Self, DataplaneError> {
        let Map::HashOfMaps(data) = outer else {
            return Err(DataplaneError::Missing("GROUP_PORTS of type HASH_OF_MAPS".into()));
        };
        let outer_fd = data.fd().as_fd().as_raw_fd();
        let outer = HashOfMaps::try_from(Map::HashOfMaps(data)).kernel("opening GROUP_PORTS")?;
        let Map::HashOfMaps(data) = v4 else {
            return Err(DataplaneError::Missing("GROUP_PORTS_V4 of type HASH_OF_MAPS".into()));
        };
        let v4_fd = data.fd().as_fd().as_raw_fd();
        let v4 = HashOfMaps::try_from(Map::HashOfMaps(data)).kernel("opening GROUP_PORTS_V4")?;
        let mut maps =
            Self { outer, outer_fd, v4, v4_fd, tc, inner: BTreeMap::new(), last_publish: None };
        if adopted {
            let keys: Vec<GroupKey> = maps.outer.keys().filter_map(Result::ok).collect();
            for key in keys {
                match maps.outer.get(&key, 0) {
                    Ok(inner) => {
                        maps.inner.insert(key, inner.keys().filter_map(Result::ok).collect());
                    }
                    Err(e) => tracing::warn!("reading an adopted group entry: {e}"),
                }
            }
            let keys: Vec<u32> = maps.v4.keys().filter_map(Result::ok).collect();
            for key in keys {
                match maps.v4.get(&key, 0) {
                    Ok(inner) => {
                        maps.inner.insert(
                            GroupKey::any_source_v4(v4_group_of_key(key)),
                            inner.keys().filter_map(Result::ok).collect(),
                        );
                    }
                    Err(e) => tracing::warn!("reading an adopted IPv4 group entry: {e}"),
                }
            }
        }
        Ok(maps)
    }

    /// Port sets (inner keys) of every key in the map.
    pub fn port_sets(&self) -> BTreeMap<GroupKey, Vec<u32>> {
        self.inner.clone()
    }

    /// The per-peer targets in `GROUP_TC_PORTS` (after adoption: the previous daemon's
    /// peers): (key, port ifindex, the peer's address as the map holds it).
    pub fn peer_targets(&self) -> Vec<(GroupKey, u32, [u8; 16])> {
        let mut out = Vec::new();
        for (key, ports) in self.tc.iter().filter_map(Result::ok) {
            let n = (ports.count as usize).min(ports.targets.len());
            for t in ports.targets[..n].iter().filter(|t| t.flags & TC_TARGET_PEER != 0) {
                out.push((key, t.ifindex, t.addr));
            }
        }
        out
    }

    /// Writes a `GROUP_TC_PORTS` entry that names no group (`TC_ROUTERS_KEY`,
    /// `TC_FLOOD_KEY`).
    pub fn set_tc(&mut self, key: GroupKey, ports: TcPorts) -> Result<(), DataplaneError> {
        self.tc.insert(key, ports, 0).kernel("writing GROUP_TC_PORTS")
    }

    /// Keys currently in `GROUP_PORTS` and `GROUP_PORTS_V4`.
    pub fn keys(&self) -> impl Iterator<Item = &GroupKey> {
        self.inner.keys()
    }

    /// Whether any (S,G) entry exists.
    pub fn has_source_entries(&self) -> bool {
        self.inner.keys().any(|k| k.source != [0; 16])
    }

    pub fn last_publish(&self) -> Option<Instant> {
        self.last_publish
    }

    /// Builds an inner map holding `entries` (at most [`MAX_PORTS_PER_GROUP`]; the rest are
    /// left out with a warning), to be written with `tc`, the TC program's array of the set.
    pub fn build(entries: &[InnerEntry<'_>], tc: TcPorts) -> Result<InnerMap, DataplaneError> {
        let mut entries = entries;
        if entries.len() > MAX_PORTS_PER_GROUP as usize {
            tracing::warn!(
                "a group can have at most {MAX_PORTS_PER_GROUP} ports or clients; {} wanted, \
                 the rest get no copy",
                entries.len()
            );
            entries = &entries[..MAX_PORTS_PER_GROUP as usize];
        }
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_DEVMAP_HASH,
            4,
            DEVMAP_VALUE_SIZE,
            MAX_PORTS_PER_GROUP,
            0,
        );
        let data = MapData::create(obj, "mcrelay_grp", None).kernel("creating a group port set")?;
        let fd = data.fd().as_fd().as_raw_fd();
        let mut inner =
            DevMapHash::try_from(Map::DevMapHash(data)).kernel("creating a group port set")?;
        for e in entries {
            inner.insert(e.key, e.ifindex, e.program, 0).kernel("filling a group port set")?;
        }
        Ok(InnerMap { map: inner, fd, keys: entries.iter().map(|e| e.key).collect(), tc })
    }

    /// Writes a round of changes: `sets` replace (or create) entries, `removes` delete them.
    /// Returns the keys whose write failed, with why; those keep what they had.
    pub fn commit(
        &mut self,
        sets: Vec<(GroupKey, InnerMap)>,
        removes: Vec<GroupKey>,
    ) -> Vec<(GroupKey, DataplaneError)> {
        let mut failed = Vec::new();
        let removes: Vec<GroupKey> =
            removes.into_iter().filter(|k| self.inner.contains_key(k)).collect();
        if !removes.is_empty() {
            self.last_publish = Some(Instant::now());
            for key in &removes {
                // Gone from the TC path first: a group without members gets no copies there.
                match self.tc.remove(key) {
                    Err(e) if !is_not_found(&e) => {
                        tracing::warn!("removing a GROUP_TC_PORTS entry: {e}");
                    }
                    _ => {}
                }
            }
            let (v4, wide): (Vec<GroupKey>, Vec<GroupKey>) =
                removes.into_iter().partition(|k| k.v4_any_source().is_some());
            self.remove_v4(v4, &mut failed);
            self.remove_wide(wide, &mut failed);
        }
        if !sets.is_empty() {
            self.last_publish = Some(Instant::now());
            let (v4, wide): (Vec<_>, Vec<_>) =
                sets.into_iter().partition(|(k, _)| k.v4_any_source().is_some());
            let mut written = Vec::new();
            self.write_v4(v4, &mut written, &mut failed);
            self.write_wide(wide, &mut written, &mut failed);
            // The TC program's copy of each set written. A failure is reported for the key
            // (the reconciler writes it again, both maps).
            for (key, tc) in written {
                if let Err(e) = self.tc.insert(key, tc, 0) {
                    failed.push((key, kernel_error("writing GROUP_TC_PORTS", e)));
                }
            }
        }
        failed
    }

    /// Deletes (S,G) and IPv6 keys from `GROUP_PORTS`.
    fn remove_wide(
        &mut self,
        removes: Vec<GroupKey>,
        failed: &mut Vec<(GroupKey, DataplaneError)>,
    ) {
        if removes.is_empty() {
            return;
        }
        match delete_batch(self.outer_fd, &removes) {
            Ok(()) => removes.iter().for_each(|k| {
                self.inner.remove(k);
            }),
            Err(e) => {
                tracing::debug!("delete batch: {e}; deleting one by one");
                for key in removes {
                    match self.outer.remove(&key) {
                        Err(e) if !is_not_found(&e) => {
                            failed.push((key, kernel_error("removing a group", e)));
                        }
                        _ => {
                            self.inner.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// Deletes IPv4 (*,G) keys from `GROUP_PORTS_V4`.
    fn remove_v4(&mut self, removes: Vec<GroupKey>, failed: &mut Vec<(GroupKey, DataplaneError)>) {
        let pairs: Vec<(GroupKey, u32)> =
            removes.iter().filter_map(|k| k.v4_any_source().map(|v| (*k, v))).collect();
        if pairs.is_empty() {
            return;
        }
        let keys: Vec<u32> = pairs.iter().map(|(_, v)| *v).collect();
        match delete_batch(self.v4_fd, &keys) {
            Ok(()) => pairs.iter().for_each(|(k, _)| {
                self.inner.remove(k);
            }),
            Err(e) => {
                tracing::debug!("delete batch (IPv4): {e}; deleting one by one");
                for (key, v4) in pairs {
                    match self.v4.remove(&v4) {
                        Err(e) if !is_not_found(&e) => {
                            failed.push((key, kernel_error("removing a group", e)));
                        }
                        _ => {
                            self.inner.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// Writes (S,G) and IPv6 keys into `GROUP_PORTS`.
    fn write_wide(
        &mut self,
        sets: Vec<(GroupKey, InnerMap)>,
        written: &mut Vec<(GroupKey, TcPorts)>,
        failed: &mut Vec<(GroupKey, DataplaneError)>,
    ) {
        if sets.is_empty() {
            return;
        }
        let keys: Vec<GroupKey> = sets.iter().map(|(k, _)| *k).collect();
        let fds: Vec<u32> = sets.iter().map(|(_, m)| m.fd as u32).collect();
        match update_batch(self.outer_fd, &keys, &fds) {
            Ok(()) => {
                for (key, map) in sets {
                    self.inner.insert(key, map.keys);
                    written.push((key, map.tc));
                }
            }
            Err(e) => {
                tracing::debug!("update batch: {e}; writing one by one");
                for (key, map) in sets {
                    match self.outer.insert(key, &map.map, 0) {
                        Ok(()) => {
                            self.inner.insert(key, map.keys);
                            written.push((key, map.tc));
                        }
                        Err(e) => failed.push((key, kernel_error("writing GROUP_PORTS", e))),
                    }
                }
            }
        }
    }

    /// Writes IPv4 (*,G) keys into `GROUP_PORTS_V4`.
    fn write_v4(
        &mut self,
        sets: Vec<(GroupKey, InnerMap)>,
        written: &mut Vec<(GroupKey, TcPorts)>,
        failed: &mut Vec<(GroupKey, DataplaneError)>,
    ) {
        let sets: Vec<(GroupKey, u32, InnerMap)> =
            sets.into_iter().filter_map(|(k, m)| k.v4_any_source().map(|v| (k, v, m))).collect();
        if sets.is_empty() {
            return;
        }
        let keys: Vec<u32> = sets.iter().map(|(_, v, _)| *v).collect();
        let fds: Vec<u32> = sets.iter().map(|(_, _, m)| m.fd as u32).collect();
        match update_batch(self.v4_fd, &keys, &fds) {
            Ok(()) => {
                for (key, _, map) in sets {
                    self.inner.insert(key, map.keys);
                    written.push((key, map.tc));
                }
            }
            Err(e) => {
                tracing::debug!("update batch (IPv4): {e}; writing one by one");
                for (key, v4, map) in sets {
                    match self.v4.insert(v4, &map.map, 0) {
                        Ok(()) => {
                            self.inner.insert(key, map.keys);
                            written.push((key, map.tc));
                        }
                        Err(e) => failed.push((key, kernel_error("writing GROUP_PORTS_V4", e))),
                    }
                }
            }
        }
    }
}

/// A port set built and not yet published (its fd closes once it is in `GROUP_PORTS`).
pub struct InnerMap {
    map: DevMapHash<MapData>,
    /// The fd of `map` (valid while `map` lives).
    fd: RawFd,
    /// The keys written into it.
    keys: Vec<u32>,
    /// The same set for the TC program.
    tc: TcPorts,
}

fn kernel_error(context: &str, e: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Kernel { context: context.into(), source: Box::new(e) }
}
