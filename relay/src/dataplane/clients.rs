//! Per-client delivery on a shared port, and the inner-map keys that stand for a port's
//! clients in a group's port set.
//!
//! - Ethernet ports (an OpenVPN TAP): the `mcrelay_client` devmap egress program and its maps
//!   (`CLIENT_SETS`, `CLIENT_CURSOR`, `CLIENT_COPIES`) address each copy to a client's MAC.
//! - L3 ports (tun, WireGuard): each joined peer is a target of the TC program with its
//!   address (`TcTarget::peer`); the copy's destination becomes the peer's address, so the
//!   VPN routes it to that peer alone. Copies are counted in the TC program's `PEER_COPIES`.
//!
//! A per-client key is `CLIENT_KEY_BIT | id << 8 | slot`: `id` is a small number this daemon
//! gives each per-client port (the devmap value holds the port's real ifindex, so any ifindex
//! fits), `slot` the copy's index in the set.

use std::{collections::BTreeMap, net::IpAddr};

use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{ProgramFd, Xdp},
    Ebpf, EbpfLoader,
};
use relay_common::{ClientCopies, ClientSet, ClientSetKey, PeerKey, MAX_CLIENTS_PER_SET};

use super::{
    error::{DataplaneError, KernelContext as _},
    sys::cpus,
};
use crate::{groups::group_key, membership::ClientId};

/// The per-client egress program (relay-ebpf's `client` binary).
pub static CLIENT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/client"));

/// Name of the per-client egress program in [`CLIENT_OBJECT`].
pub const CLIENT_PROGRAM: &str = "mcrelay_client";

/// Keys of per-client entries in a group's inner DEVMAP_HASH have this bit set. Plain port
/// entries use the ifindex as key, always below this bit (ifindexes are positive `int`s).
pub const CLIENT_KEY_BIT: u32 = 1 << 31;

/// Largest per-client port id (23 bits between the slot and [`CLIENT_KEY_BIT`]).
const MAX_PORT_ID: u32 = (1 << 23) - 1;

/// The inner-map key of slot `slot` of the per-client copies of the port with id `port_id`.
pub const fn client_key(port_id: u32, slot: u32) -> u32 {
    CLIENT_KEY_BIT | ((port_id & MAX_PORT_ID) << 8) | (slot & 0xff)
}

/// The per-client object (loaded on first use), the ids of per-client ports, and copy totals.
#[derive(Default)]
pub struct Clients {
    ebpf: Option<Ebpf>,
    /// Per-client port id by ifindex, and the reverse.
    ids: BTreeMap<u32, u32>,
    ports: BTreeMap<u32, u32>,
    /// Copies per (port, client MAC) counted before the client's set was last rewritten.
    totals: BTreeMap<(u32, [u8; 6]), u64>,
    /// Per-peer delivery on L3 ports: (port, group key) -> the joined peers, slot by slot.
    peers: BTreeMap<(u32, [u8; 16]), Vec<IpAddr>>,
    /// The TC program's `PEER_COPIES` (set once the object is loaded).
    peer_copies: Option<PerCpuHashMap<MapData, PeerKey, u64>>,
}

impl Clients {
    /// The port (ifindex) a per-client key sends copies to.
    pub fn port_of(&self, key: u32) -> Option<u32> {
        self.ports.get(&((key & !CLIENT_KEY_BIT) >> 8)).copied()
    }

    /// The egress program, once loaded.
    pub fn program_fd(&self) -> Option<&ProgramFd> {
        let program: &Xdp = self.ebpf.as_ref()?.program(CLIENT_PROGRAM)?.try_into().ok()?;
        program.fd().ok()
    }

    fn port_id(&mut self, ifindex: u32) -> Result<u32, DataplaneError> {
        if let Some(id) = self.ids.get(&ifindex) {
            return Ok(*id);
        }
        let id = self.ids.len() as u32 + 1;
        if id > MAX_PORT_ID {
            return Err(DataplaneError::Missing("a free per-client port id".into()));
        }
        self.ids.insert(ifindex, id);
        self.ports.insert(id, ifindex);
        Ok(id)
    }

    /// Gives the TC program's per-peer copy counters.
    pub fn set_peer_copies(&mut self, map: PerCpuHashMap<MapData, PeerKey, u64>) {
        self.peer_copies = Some(map);
    }

    /// Whether `ifindex` delivers to peers by address (an L3 per-client port with members).
    pub fn is_peer_port(&self, ifindex: u32) -> bool {
        self.peers.keys().any(|(port, _)| *port == ifindex)
    }

    /// The address of the peer a per-client key of `ifindex` stands for in `group`'s set.
    pub fn peer_of(&self, ifindex: u32, group: &[u8; 16], key: u32) -> Option<IpAddr> {
        self.peers.get(&(ifindex, *group))?.get((key & 0xff) as usize).copied()
    }

    /// Sets the clients of a per-client port that joined a group: MACs on an Ethernet port,
    /// addresses on an L3 port (`l3`). Returns the inner-map keys that stand for them.
    pub fn set_clients(
        &mut self,
        ifindex: u32,
        group: IpAddr,
        clients: &[ClientId],
        l3: bool,
    ) -> Result<Vec<u32>, DataplaneError> {
        if l3 {
            let peers: Vec<IpAddr> = clients
                .iter()
                .filter_map(|c| match c {
                    ClientId::Peer(a) if a.is_ipv4() == group.is_ipv4() => Some(*a),
                    _ => None,
                })
                .collect();
            return self.set_peers(ifindex, group, &peers);
        }
        let macs: Vec<[u8; 6]> = clients
            .iter()
            .filter_map(|c| match c {
                ClientId::Mac(m) => Some(*m),
                ClientId::Peer(_) => None,
            })
            .collect();
        self.set(ifindex, group, &macs)
    }

    /// Sets the peers of an L3 port that joined a group (at most [`MAX_CLIENTS_PER_SET`]).
    fn set_peers(
        &mut self,
        ifindex: u32,
        group: IpAddr,
        peers: &[IpAddr],
    ) -> Result<Vec<u32>, DataplaneError> {
        let key = (ifindex, group_key(group).group);
        if peers.is_empty() {
            self.peers.remove(&key);
            return Ok(Vec::new());
        }
        if peers.len() > MAX_CLIENTS_PER_SET {
            tracing::warn!(
                "{} peers joined {group} on one port; the first {MAX_CLIENTS_PER_SET} get copies",
                peers.len()
            );
        }
        let n = peers.len().min(MAX_CLIENTS_PER_SET);
        let port_id = self.port_id(ifindex)?;
        self.peers.insert(key, peers[..n].to_vec());
        Ok((0..n as u32).map(|slot| client_key(port_id, slot)).collect())
    }

    /// Sets the clients of a shared port that joined a group (at most
    /// [`MAX_CLIENTS_PER_SET`]); returns the inner-map keys the group's port set must contain
    /// for that port instead of the port itself (empty: no per-client copies).
    fn set(
        &mut self,
        ifindex: u32,
        group: IpAddr,
        macs: &[[u8; 6]],
    ) -> Result<Vec<u32>, DataplaneError> {
        let key = ClientSetKey { ifindex, _pad: 0, group: group_key(group) };
        self.collect_copies(&key)?;
        let port_id = self.port_id(ifindex)?;
        let ebpf = self.ebpf()?;
        let mut sets: HashMap<_, ClientSetKey, ClientSet> = map(ebpf, "CLIENT_SETS")?;
        if macs.is_empty() {
            // The group's last client left: its cursor and copy counters go too (the totals
            // were collected above).
            let _ = sets.remove(&key);
            let mut cursor: PerCpuHashMap<_, ClientSetKey, u32> = map(ebpf, "CLIENT_CURSOR")?;
            let _ = cursor.remove(&key);
            let mut copies: PerCpuHashMap<_, ClientSetKey, ClientCopies> =
                map(ebpf, "CLIENT_COPIES")?;
            let _ = copies.remove(&key);
            return Ok(Vec::new());
        }
        if macs.len() > MAX_CLIENTS_PER_SET {
            tracing::warn!(
                "{} clients joined {group} on one port; the first {MAX_CLIENTS_PER_SET} get copies",
                macs.len()
            );
        }
        let n = macs.len().min(MAX_CLIENTS_PER_SET);
        let mut set = ClientSet { count: n as u32, _pad: 0, macs: [[0; 6]; MAX_CLIENTS_PER_SET] };
        set.macs[..n].copy_from_slice(&macs[..n]);
        sets.insert(key, set, 0).kernel("writing CLIENT_SETS")?;
        let cpus = cpus().kernel("counting CPUs")?;
        let mut cursor: PerCpuHashMap<_, ClientSetKey, u32> = map(ebpf, "CLIENT_CURSOR")?;
        if cursor.get(&key, 0).is_err() {
            let zero = PerCpuValues::try_from(vec![0u32; cpus]).kernel("sizing CLIENT_CURSOR")?;
            cursor.insert(key, zero, 0).kernel("writing CLIENT_CURSOR")?;
        }
        let mut copies: PerCpuHashMap<_, ClientSetKey, ClientCopies> = map(ebpf, "CLIENT_COPIES")?;
        if copies.get(&key, 0).is_err() {
            let zero = ClientCopies { copies: [0; MAX_CLIENTS_PER_SET] };
            let zero = PerCpuValues::try_from(vec![zero; cpus]).kernel("sizing CLIENT_COPIES")?;
            copies.insert(key, zero, 0).kernel("writing CLIENT_COPIES")?;
        }
        Ok((0..n as u32).map(|slot| client_key(port_id, slot)).collect())
    }

    /// Adds the copies counted for `key`'s current slots to the per-MAC totals and restarts
    /// its counters (before the set's slots change).
    fn collect_copies(&mut self, key: &ClientSetKey) -> Result<(), DataplaneError> {
        let Some(ebpf) = self.ebpf.as_mut() else { return Ok(()) };
        let sets: HashMap<_, ClientSetKey, ClientSet> = map(ebpf, "CLIENT_SETS")?;
        let Ok(set) = sets.get(key, 0) else { return Ok(()) };
        let mut copies: PerCpuHashMap<_, ClientSetKey, ClientCopies> = map(ebpf, "CLIENT_COPIES")?;
        if let Ok(per_cpu) = copies.get(key, 0) {
            for slot in 0..(set.count as usize).min(MAX_CLIENTS_PER_SET) {
                let n: u64 = per_cpu.iter().map(|c| c.copies[slot]).sum();
                *self.totals.entry((key.ifindex, set.macs[slot])).or_default() += n;
            }
        }
        let cpus = cpus().kernel("counting CPUs")?;
        let zero = ClientCopies { copies: [0; MAX_CLIENTS_PER_SET] };
        let zero = PerCpuValues::try_from(vec![zero; cpus]).kernel("sizing CLIENT_COPIES")?;
        copies.insert(key, zero, 0).kernel("writing CLIENT_COPIES")?;
        Ok(())
    }

    /// The per-client program, loaded on first use.
    fn ebpf(&mut self) -> Result<&mut Ebpf, DataplaneError> {
        if self.ebpf.is_none() {
            let mut ebpf =
                EbpfLoader::new().load(CLIENT_OBJECT).kernel("loading the per-client program")?;
            let program: &mut Xdp = ebpf
                .program_mut(CLIENT_PROGRAM)
                .ok_or_else(|| DataplaneError::Missing(CLIENT_PROGRAM.into()))?
                .try_into()
                .kernel("the per-client program")?;
            program.load().kernel("the kernel rejected the per-client program")?;
            self.ebpf = Some(ebpf);
        }
        self.ebpf.as_mut().ok_or_else(|| DataplaneError::Missing(CLIENT_PROGRAM.into()))
    }

    /// Forgets the copy counts of clients that are gone (`keep` says which stay).
    pub fn retain(&mut self, keep: impl Fn(u32, ClientId) -> bool) {
        self.totals.retain(|(i, m), _| keep(*i, ClientId::Mac(*m)));
        if let Some(map) = &mut self.peer_copies {
            let gone: Vec<PeerKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !keep(k.ifindex, ClientId::Peer(peer_address(&k.peer))))
                .collect();
            for k in gone {
                let _ = map.remove(&k);
            }
        }
    }

    /// Copies sent to each client so far: (port ifindex, client, copies), all groups together.
    pub fn copies(&self) -> Vec<(u32, ClientId, u64)> {
        let mut out = self.mac_copies();
        // Every peer with a membership, with the copies counted so far (none yet: 0).
        let mut peers: BTreeMap<(u32, IpAddr), u64> = self
            .peers
            .iter()
            .flat_map(|((port, _), peers)| peers.iter().map(move |p| ((*port, *p), 0)))
            .collect();
        if let Some(map) = &self.peer_copies {
            for (key, per_cpu) in map.iter().filter_map(Result::ok) {
                let n: u64 = per_cpu.iter().sum();
                *peers.entry((key.ifindex, peer_address(&key.peer))).or_default() += n;
            }
        }
        out.extend(peers.into_iter().map(|((port, peer), n)| (port, ClientId::Peer(peer), n)));
        out
    }

    fn mac_copies(&self) -> Vec<(u32, ClientId, u64)> {
        let mut totals = self.totals.clone();
        if let Some(ebpf) = &self.ebpf {
            let sets = ebpf
                .map("CLIENT_SETS")
                .and_then(|m| HashMap::<_, ClientSetKey, ClientSet>::try_from(m).ok());
            let copies = ebpf
                .map("CLIENT_COPIES")
                .and_then(|m| PerCpuHashMap::<_, ClientSetKey, ClientCopies>::try_from(m).ok());
            if let (Some(sets), Some(copies)) = (sets, copies) {
                for (key, set) in sets.iter().filter_map(Result::ok) {
                    let per_cpu = copies.get(&key, 0).ok();
                    for slot in 0..(set.count as usize).min(MAX_CLIENTS_PER_SET) {
                        let n: u64 =
                            per_cpu.as_ref().map_or(0, |v| v.iter().map(|c| c.copies[slot]).sum());
                        *totals.entry((key.ifindex, set.macs[slot])).or_default() += n;
                    }
                }
            }
        }
        totals.into_iter().map(|((i, m), n)| (i, ClientId::Mac(m), n)).collect()
    }
}

/// An address as the TC program keeps it (IPv4-mapped for IPv4).
pub fn peer_address(bytes: &[u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*bytes);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// A map of the per-client object, typed.
fn map<'a, M>(ebpf: &'a mut Ebpf, name: &str) -> Result<M, DataplaneError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let raw = ebpf.map_mut(name).ok_or_else(|| DataplaneError::Missing(format!("map {name}")))?;
    M::try_from(raw).kernel(format!("opening {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_name_any_port_id_and_slot() {
        let key = client_key(40_000, 7);
        assert_ne!(key & CLIENT_KEY_BIT, 0);
        assert_eq!(key & 0xff, 7);
        assert_eq!((key & !CLIENT_KEY_BIT) >> 8, 40_000);
        assert_ne!(client_key(1, 0), client_key(1 + (1 << 15), 0), "no 15-bit aliasing");
    }

    #[test]
    fn port_ids_map_back_to_any_ifindex() {
        let mut clients = Clients::default();
        let a = clients.port_id(40_000).expect("id");
        let b = clients.port_id(40_000 - 32_768).expect("id");
        assert_ne!(a, b);
        assert_eq!(clients.port_of(client_key(a, 3)), Some(40_000));
        assert_eq!(clients.port_of(client_key(b, 0)), Some(40_000 - 32_768));
    }
}
