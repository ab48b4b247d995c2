//! The kernel side as userspace sees it. [`Dataplane`] is a thin owner of the parts, one
//! concern each:
//!
//! | module | what it does |
//! | --- | --- |
//! | `mod.rs` | loading the object and pinning its maps; the facade the daemon uses |
//! | [`attach`] | attaching the XDP and TC programs, pinned links, adoption, `PORTS`/`PORT_STATS`/`FLOOD_PORTS`/`TC_PORTS` |
//! | [`group_maps`] | the `GROUP_PORTS` + `GROUP_TC_PORTS` writer (inner-map swaps, batches, exact per-key outcome) |
//! | [`kernel_config`] | `CONFIG` and `ROUTER_PORTS` |
//! | [`port_stats`] | `PORT_STATS` (per-CPU array, a slot per port) and `PORT_STATS_SPILL` |
//! | [`clients`] | per-client delivery: the egress program and its maps |
//! | [`sys`] | raw `bpf(2)` calls aya 0.14 lacks, error helpers |
//!
//! The reconciler ([`crate::reconciler`]) talks to it through [`GroupWriter`] only.

pub mod attach;
pub mod clients;
pub mod error;
pub mod group_maps;
pub mod kernel_config;
pub mod policing;
pub mod port_stats;
pub mod sys;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use attach::AttachedPort;
use aya::{
    maps::{
        lpm_trie::LpmTrie, Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap,
    },
    programs::{Program, Xdp},
    Ebpf, EbpfLoader,
};
pub use clients::{CLIENT_KEY_BIT, CLIENT_OBJECT, CLIENT_PROGRAM};
pub use error::DataplaneError;
use error::KernelContext as _;
use group_maps::{GroupMaps, InnerEntry};
use relay_common::{
    AttachMode, GroupKey, PortCounters, PortInfo, TcPorts, TcTarget, UnknownPolicy,
    CONFIG_F_TC_PORTS, MAX_PORTS, MAX_TC_TARGETS, TC_FLOOD_KEY, TC_ROUTERS_KEY, TC_TARGET_ETHERNET,
    TC_TARGET_L3, TC_TARGET_PEER, TC_TARGET_ROUTED,
};

use crate::{
    membership::ClientId,
    options::XdpMode,
    paths::{self, pins},
    ports::Link,
    reconciler::{GroupWrite, GroupWriter},
};

/// The compiled eBPF object (built by build.rs from the relay-ebpf crate).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

/// Name of the XDP entry point in the object.
pub const XDP_PROGRAM: &str = "mcrelay_xdp";
/// Name of the TC (tcx ingress) entry point for ports in TC mode.
pub const TC_PROGRAM: &str = "mcrelay_tc";
/// Name of its twin for L3 ports (tun, WireGuard: packets start with the IP header).
pub const TC_L3_PROGRAM: &str = "mcrelay_tc_l3";
/// Name of the TC entry point behind the XDP program (copies what XDP hands over).
pub const TC_HANDOVER_PROGRAM: &str = "mcrelay_tc_handover";

/// The TC program's port sets (pin name = map name).
const GROUP_TC_PORTS: &str = "GROUP_TC_PORTS";
/// The ports in TC mode (pin name = map name).
const TC_PORTS: &str = "TC_PORTS";
/// Copies per peer of per-client L3 ports (pin name = map name).
const PEER_COPIES: &str = "PEER_COPIES";

/// `BPF_MAP_TYPE_HASH`.
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Maps of the object that are pinned (and reused by the next daemon).
const OBJECT_MAPS: [&str; 16] = [
    GROUP_TC_PORTS,
    TC_PORTS,
    PEER_COPIES,
    pins::GROUP_PORTS,
    pins::GROUP_PORTS_V4,
    pins::FLOOD_PORTS,
    pins::ROUTER_PORTS,
    pins::CONFIG,
    pins::PORT_STATS,
    pins::PORT_STATS_SPILL,
    pins::LOOP_MACS,
    pins::STANDBY_PORTS,
    pins::POLICY,
    pins::RATE_PORTS,
    pins::RATE_PREFIXES,
    pins::RATE_GROUPS,
];

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// The loaded object and its parts. Dropping it detaches every port it attached without a
/// pin (the links belong to the program); [`Dataplane::unpin`] removes the pins.
pub struct Dataplane {
    /// Holds the XDP program (the maps were taken out into the parts below).
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// The maps came from a previous daemon's pins.
    adopted: bool,
    config: kernel_config::KernelConfig,
    ports: attach::Ports,
    groups: GroupMaps,
    clients: clients::Clients,
    /// Port sets whose TC array was cut at `MAX_TC_TARGETS`.
    tc_targets_cut: std::cell::Cell<u64>,
}

impl Dataplane {
    /// Loads the object and writes the configuration.
    ///
    /// With `pin_dir`, the maps are pinned there; when they are already pinned (a previous
    /// daemon of the same layout version left them), they are reused as they are: forwarding
    /// state, counters and all. `None`: no pins, everything goes away with this value.
    pub fn load(pin_dir: Option<&Path>, unknown: UnknownPolicy) -> Result<Self> {
        let adopted = pin_dir.is_some_and(|d| d.join(pins::GROUP_PORTS).exists());
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir)
                .kernel(format!("creating pin directory {}", dir.display()))?;
            for name in OBJECT_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            if sys::is_permission_error(&e) {
                DataplaneError::Permission(sys::error_chain(&e))
            } else {
                DataplaneError::Kernel {
                    context: "loading the eBPF object".into(),
                    source: Box::new(e),
                }
            }
        })?;
        program_mut(&mut ebpf)?.load().kernel("the kernel rejected the XDP program (verifier)")?;
        let (_, tc) = programs_mut(&mut ebpf)?;
        tc.tc_mode.load().kernel("the kernel rejected the TC program (verifier)")?;
        tc.tc_l3.load().kernel("the kernel rejected the TC program for L3 ports (verifier)")?;
        tc.handover.load().kernel("the kernel rejected the TC hand-over program (verifier)")?;
        if let Some(dir) = pin_dir {
            // Pins are created 0600; `mcrelay ports/stats` of the `mcrelay` group read them.
            paths::restrict_pin_dir(dir).kernel(format!("restricting {}", dir.display()))?;
            for name in OBJECT_MAPS {
                let pin = dir.join(name);
                paths::restrict(&pin, false).kernel(format!("restricting {}", pin.display()))?;
            }
        }

        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| DataplaneError::Missing(format!("map {name}")))
        };
        let config = Array::try_from(take(pins::CONFIG)?).kernel("opening CONFIG")?;
        let routers =
            DevMapHash::try_from(take(pins::ROUTER_PORTS)?).kernel("opening ROUTER_PORTS")?;
        let flood = DevMapHash::try_from(take(pins::FLOOD_PORTS)?).kernel("opening FLOOD_PORTS")?;
        let stats = port_stats::PortStats::new(
            PerCpuArray::try_from(take(pins::PORT_STATS)?).kernel("opening PORT_STATS")?,
            PerCpuHashMap::try_from(take(pins::PORT_STATS_SPILL)?)
                .kernel("opening PORT_STATS_SPILL")?,
        );
        let loops = kernel_config::LoopMaps {
            macs: HashMap::try_from(take(pins::LOOP_MACS)?).kernel("opening LOOP_MACS")?,
            standby: HashMap::try_from(take(pins::STANDBY_PORTS)?)
                .kernel("opening STANDBY_PORTS")?,
        };
        let policing = policing::PolicingMaps {
            policy: LpmTrie::try_from(take(pins::POLICY)?).kernel("opening POLICY")?,
            rate_ports: HashMap::try_from(take(pins::RATE_PORTS)?).kernel("opening RATE_PORTS")?,
            rate_prefixes: LpmTrie::try_from(take(pins::RATE_PREFIXES)?)
                .kernel("opening RATE_PREFIXES")?,
        };
        let tc_groups =
            HashMap::try_from(take(GROUP_TC_PORTS)?).kernel("opening GROUP_TC_PORTS")?;
        let tc_ports = HashMap::try_from(take(TC_PORTS)?).kernel("opening TC_PORTS")?;
        let mut clients = clients::Clients::default();
        clients.set_peer_copies(
            PerCpuHashMap::try_from(take(PEER_COPIES)?).kernel("opening PEER_COPIES")?,
        );
        let groups = GroupMaps::new(
            take(pins::GROUP_PORTS)?,
            take(pins::GROUP_PORTS_V4)?,
            tc_groups,
            adopted,
        )?;
        let info = ports_map(pin_dir)?;

        let mut config =
            kernel_config::KernelConfig::new(config, routers, loops, policing, adopted)?;
        config.set_unknown_policy(unknown)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_owned),
            adopted,
            config,
            ports: attach::Ports::new(info, stats, flood, tc_ports, pin_dir),
            groups,
            clients,
            tc_targets_cut: std::cell::Cell::new(0),
        })
    }

    /// Whether the maps were adopted from a previous daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Pin the XDP links of new attachments (false with `run --no-pin`).
    pub fn set_pin_links(&mut self, pin: bool) {
        self.ports.pin_links = pin;
    }

    /// Port sets found in `GROUP_PORTS` (after adoption: what the previous daemon installed).
    pub fn group_port_sets(&self) -> BTreeMap<GroupKey, Vec<u32>> {
        self.groups.port_sets()
    }

    /// The peers a previous daemon delivered to on per-client L3 ports: (group key, port,
    /// peer). WireGuard peers never hear a multicast query, so they are not learned again
    /// by themselves.
    pub fn adopted_peers(&self) -> Vec<(GroupKey, u32, IpAddr)> {
        self.groups
            .peer_targets()
            .into_iter()
            .map(|(key, port, addr)| (key, port, clients::peer_address(&addr)))
            .collect()
    }

    /// Keys currently in `GROUP_PORTS`.
    pub fn group_keys(&self) -> impl Iterator<Item = &GroupKey> {
        self.groups.keys()
    }

    /// When the last `GROUP_PORTS` change was issued (the moment forwarding changed).
    pub fn last_publish(&self) -> Option<std::time::Instant> {
        self.groups.last_publish()
    }

    /// This relay's MAC: the source of every frame it relays (loop guard).
    pub fn relay_mac(&self) -> [u8; 6] {
        self.config.relay_mac()
    }

    /// Applies the loop guard's decisions: relay MACs never relayed again, and standby ports
    /// (ifindex -> `PORT_STANDBY_*` bits, also recorded in `PORTS` for the CLI).
    pub fn set_loop_guard(
        &mut self,
        loop_macs: &std::collections::BTreeSet<[u8; 6]>,
        standby: &BTreeMap<u32, u32>,
    ) -> Result<()> {
        self.config.set_loop_macs(loop_macs)?;
        self.config.set_standby(standby)?;
        self.ports.set_standby(standby)
    }

    /// Changes what happens to data for groups without a port set.
    pub fn set_unknown_policy(&mut self, unknown: UnknownPolicy) -> Result<()> {
        self.config.set_unknown_policy(unknown)
    }

    /// Makes the program drop denied groups (`[policy]`) whatever their port sets.
    pub fn set_policy(
        &mut self,
        allow: &[policing::Prefix],
        deny: &[policing::Prefix],
    ) -> Result<()> {
        self.config.set_policy(allow, deny)
    }

    /// Per-group rate limits by prefix (packets per second for each group of the prefix).
    pub fn set_group_rate_limits(&mut self, limits: &[(policing::Prefix, u64)]) -> Result<()> {
        self.config.set_group_rate_limits(limits)
    }

    /// The rate limit of data arriving on a port (`None`: no limit).
    pub fn set_port_rate(&mut self, ifindex: u32, pps: Option<u64>) -> Result<()> {
        self.config.set_port_rate(ifindex, pps)
    }

    /// The loaded XDP program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf)
    }

    /// A port's counters, summed over the CPUs.
    pub fn counters(&self, ifindex: u32) -> Result<PortCounters> {
        self.ports.counters(ifindex)
    }

    /// Attaches the program to `link` in the requested mode and registers the port in the
    /// maps. Returns the mode actually used and, for `auto`, why native mode was not possible.
    /// `routed`: a routed Ethernet port (`--l3`), served by the TC program.
    pub fn attach(
        &mut self,
        link: &Link,
        mode: XdpMode,
        routed: bool,
    ) -> Result<(AttachMode, Option<String>)> {
        let (xdp, tc) = programs_mut(&mut self.ebpf)?;
        let attached = self.ports.attach(xdp, tc, link, mode, routed);
        self.update_tc_flag()?;
        attached
    }

    /// `CONFIG_F_TC_PORTS` on while some port is in TC mode; the TC program's arrays of the
    /// router ports and of all ports follow the ports.
    fn update_tc_flag(&mut self) -> Result<()> {
        let bits = if self.ports.any_tc() { CONFIG_F_TC_PORTS } else { 0 };
        self.config.set_flags(CONFIG_F_TC_PORTS, bits)?;
        self.write_tc_unknown_sets()
    }

    /// The router ports and all ports as `GROUP_TC_PORTS` arrays (`TC_ROUTERS_KEY`,
    /// `TC_FLOOD_KEY`): where the TC program sends groups without a port set, by the
    /// unknown-group policy, as the XDP program does with `ROUTER_PORTS` / `FLOOD_PORTS`.
    fn write_tc_unknown_sets(&mut self) -> Result<()> {
        let routers = self.config.router_ports().to_vec();
        let all: Vec<u32> = self.ports.attached().map(|p| p.link.index).collect();
        for (key, ports) in [(TC_ROUTERS_KEY, routers), (TC_FLOOD_KEY, all)] {
            let value = self.tc_targets(&key.group, &self.entries(&ports));
            self.groups.set_tc(key, value)?;
        }
        Ok(())
    }

    /// Registers a port in the maps without attaching (tests run the program for it).
    pub fn register_port(&mut self, ifindex: u32, ifname: &str, mode: AttachMode) -> Result<()> {
        self.ports.register(ifindex, ifname, mode)
    }

    /// Detaches the program from a port and forgets the port in the maps (best effort).
    pub fn detach(&mut self, ifindex: u32) {
        if let Err(e) = self.config.set_port_rate(ifindex, None) {
            tracing::warn!("removing the rate limit of ifindex {ifindex}: {e}");
        }
        match programs_mut(&mut self.ebpf) {
            Ok((xdp, tc)) => self.ports.detach(xdp, tc, ifindex),
            Err(e) => tracing::warn!("detaching ifindex {ifindex}: {e}"),
        }
        if let Err(e) = self.update_tc_flag() {
            tracing::warn!("updating the TC flag: {e}");
        }
    }

    /// Removes pins and map entries of ports that are not attached now.
    pub fn prune_stale_ports(&mut self) {
        self.ports.prune_stale();
    }

    /// Ports attached, by ifindex.
    pub fn ports(&self) -> impl Iterator<Item = &AttachedPort> {
        self.ports.attached()
    }

    /// Sets one group's port set at once (an empty set removes it): for tests and tools; the
    /// daemon writes through [`GroupWriter`].
    pub fn set_group(&mut self, key: GroupKey, ifindexes: &[u32]) -> Result<()> {
        let write = if ifindexes.is_empty() {
            GroupWrite::Remove(key)
        } else {
            GroupWrite::Set(key, ifindexes.to_vec())
        };
        match self.write_groups(vec![write]).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Sets the clients of a per-client port that joined a group (MACs on an Ethernet port,
    /// peer addresses on an L3 port); returns the inner-map keys that stand for them in the
    /// group's port sets (empty: plain copies).
    pub fn set_client_set(
        &mut self,
        ifindex: u32,
        group: IpAddr,
        clients: &[ClientId],
    ) -> Result<Vec<u32>> {
        let l3 = self.ports.tc_target_flags(ifindex) & TC_TARGET_L3 != 0;
        self.clients.set_clients(ifindex, group, clients, l3)
    }

    /// The port a per-client key of this daemon sends copies through (`None` for a plain
    /// port key).
    pub fn client_port(&self, key: u32) -> Option<u32> {
        (key & CLIENT_KEY_BIT != 0).then(|| self.clients.port_of(key)).flatten()
    }

    /// Port-set writes whose TC array was cut at `MAX_TC_TARGETS` so far.
    pub fn tc_targets_cut(&self) -> u64 {
        self.tc_targets_cut.get()
    }

    /// Forgets the copy counts of clients that are gone.
    pub fn retain_clients(&mut self, keep: impl Fn(u32, ClientId) -> bool) {
        self.clients.retain(keep);
    }

    /// Copies sent to each client so far: (port ifindex, client, copies).
    pub fn client_copies(&self) -> Vec<(u32, ClientId, u64)> {
        self.clients.copies()
    }

    /// Removes this instance's pins (the directory and, if empty, its parents up to the root).
    pub fn unpin(&self) {
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }

    /// The copy targets for a port set: attached ports, and per-client keys of this daemon.
    fn entries<'a>(&'a self, keys: &[u32]) -> Vec<InnerEntry<'a>> {
        let mut out = Vec::with_capacity(keys.len());
        for &key in keys {
            if key & CLIENT_KEY_BIT == 0 {
                if self.ports.is_registered(key) {
                    out.push(InnerEntry { key, ifindex: key, program: None });
                } else {
                    tracing::debug!(
                        ifindex = key,
                        "skipping a port that is not attached (any more)"
                    );
                }
                continue;
            }
            let port = self.clients.port_of(key);
            if let Some(ifindex) = port.filter(|p| self.clients.is_peer_port(*p)) {
                // A peer of an L3 port: only the TC program copies there (see tc_targets).
                out.push(InnerEntry { key, ifindex, program: None });
                continue;
            }
            match (port, self.clients.program_fd()) {
                (Some(ifindex), Some(program)) => {
                    out.push(InnerEntry { key, ifindex, program: Some(program) });
                }
                _ => tracing::debug!(key, "skipping a per-client entry of a previous daemon"),
            }
        }
        out
    }

    /// A port set as the TC program's array: one target per interface (per-client entries
    /// of an Ethernet port make one plain copy there), one per peer of an L3 per-client port,
    /// with what the TC program must know about it.
    fn tc_targets(&self, group: &[u8; 16], entries: &[InnerEntry<'_>]) -> TcPorts {
        let mut out = TcPorts::default();
        let mut n = 0;
        for e in entries {
            let peer = (e.key & CLIENT_KEY_BIT != 0)
                .then(|| self.clients.peer_of(e.ifindex, group, e.key))
                .flatten();
            if peer.is_none() && out.targets[..n].iter().any(|t| t.ifindex == e.ifindex) {
                continue;
            }
            if n == MAX_TC_TARGETS {
                self.tc_targets_cut.set(self.tc_targets_cut.get() + 1);
                tracing::warn!(
                    "the TC path copies a group to at most {MAX_TC_TARGETS} ports and peers; \
                     the rest get no copy of the data the TC program copies (tc_targets_cut)"
                );
                break;
            }
            let mut flags = self.ports.tc_target_flags(e.ifindex);
            let mut addr = [0; 16];
            if let Some(peer) = peer {
                flags |= TC_TARGET_PEER;
                addr = crate::groups::group_key(peer).group;
            } else if flags & TC_TARGET_ROUTED != 0 {
                // Routed copies leave with the port's own MAC as source.
                addr[..6].copy_from_slice(&self.ports.mac(e.ifindex).unwrap_or_default());
            }
            out.targets[n] = TcTarget { ifindex: e.ifindex, flags, addr };
            out.flags |= flags | if flags & TC_TARGET_L3 == 0 { TC_TARGET_ETHERNET } else { 0 };
            n += 1;
        }
        out.count = n as u32;
        out
    }
}

impl GroupWriter for Dataplane {
    type Error = DataplaneError;

    fn write_groups(&mut self, writes: Vec<GroupWrite>) -> Vec<(GroupKey, DataplaneError)> {
        let mut failed = Vec::new();
        let mut sets = Vec::new();
        let mut removes = Vec::new();
        for write in writes {
            match write {
                GroupWrite::Set(key, ports) => {
                    let entries = self.entries(&ports);
                    match GroupMaps::build(&entries, self.tc_targets(&key.group, &entries)) {
                        Ok(inner) => sets.push((key, inner)),
                        Err(e) => failed.push((key, e)),
                    }
                }
                GroupWrite::Remove(key) => removes.push(key),
            }
        }
        if sets.iter().any(|(k, _)| k.source != [0; 16]) {
            // Raise the flag first: the program must look (S,G) up once the entries exist.
            if let Err(e) = self.config.set_source_entries(true) {
                let (sg, rest): (Vec<_>, Vec<_>) =
                    sets.into_iter().partition(|(k, _)| k.source != [0; 16]);
                failed.extend(sg.into_iter().map(|(k, _)| (k, e.repeat())));
                sets = rest;
            }
        }
        failed.extend(self.groups.commit(sets, removes));
        if !self.groups.has_source_entries() {
            if let Err(e) = self.config.set_source_entries(false) {
                tracing::warn!("clearing the (S,G) flag: {e}");
            }
        }
        failed
    }

    fn set_router_ports(&mut self, ifindexes: &[u32]) -> Result<()> {
        self.config.set_router_ports(ifindexes)?;
        self.ports.set_routers(ifindexes)?;
        self.write_tc_unknown_sets()
    }
}

/// Opens (or creates and pins) `PORTS`, the daemon's own map of port names and modes.
fn ports_map(pin_dir: Option<&Path>) -> Result<HashMap<MapData, u32, PortInfo>> {
    let path = pin_dir.map(|d| d.join(pins::PORTS));
    let data = match path.as_ref().filter(|p| p.exists()) {
        Some(path) => MapData::from_pin(path).kernel("opening the pinned PORTS map")?,
        None => {
            let obj = aya_obj::Map::new_from_params(
                BPF_MAP_TYPE_HASH,
                4,
                std::mem::size_of::<PortInfo>() as u32,
                MAX_PORTS,
                0,
            );
            let data = MapData::create(obj, pins::PORTS, None).kernel("creating the PORTS map")?;
            if let Some(path) = &path {
                data.pin(path).kernel("pinning the PORTS map")?;
            }
            data
        }
    };
    if let Some(path) = &path {
        paths::restrict(path, false).kernel(format!("restricting {}", path.display()))?;
    }
    HashMap::try_from(Map::HashMap(data)).kernel("opening PORTS")
}

/// Removes a pin directory and then its empty parents (`ns-<id>`, the root).
pub fn remove_pins(pin_dir: &Path) {
    unpin_links_under(pin_dir, 2);
    if pin_dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(pin_dir) {
            tracing::warn!("removing {}: {e}", pin_dir.display());
        }
    }
    let mut dir = pin_dir.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        if std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// Unpins every link pinned under `dir` (in a `links` directory at most `depth` levels down),
/// each detached when the call returns ([`attach::unpin_link`]).
pub fn unpin_links_under(dir: &Path, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if entry.file_name() == pins::LINKS || entry.file_name() == attach::TC_LINKS {
            for link in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                if let Err(e) = attach::unpin_link(&link.path()) {
                    tracing::warn!("unpinning {}: {e}", link.path().display());
                }
            }
        } else if depth > 0 {
            unpin_links_under(&path, depth - 1);
        }
    }
}

/// The XDP and the TC programs at once.
fn programs_mut(ebpf: &mut Ebpf) -> Result<(&mut Xdp, attach::TcPrograms<'_>)> {
    let (mut xdp, mut tc, mut tc_l3, mut handover) = (None, None, None, None);
    for (name, program) in ebpf.programs_mut() {
        match (name, program) {
            (XDP_PROGRAM, Program::Xdp(p)) => xdp = Some(p),
            (TC_PROGRAM, Program::SchedClassifier(p)) => tc = Some(p),
            (TC_L3_PROGRAM, Program::SchedClassifier(p)) => tc_l3 = Some(p),
            (TC_HANDOVER_PROGRAM, Program::SchedClassifier(p)) => handover = Some(p),
            _ => {}
        }
    }
    let missing = |name: &str| DataplaneError::Missing(format!("program {name}"));
    Ok((
        xdp.ok_or_else(|| missing(XDP_PROGRAM))?,
        attach::TcPrograms {
            tc_mode: tc.ok_or_else(|| missing(TC_PROGRAM))?,
            tc_l3: tc_l3.ok_or_else(|| missing(TC_L3_PROGRAM))?,
            handover: handover.ok_or_else(|| missing(TC_HANDOVER_PROGRAM))?,
        },
    ))
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or_else(|| DataplaneError::Missing(format!("program {XDP_PROGRAM}")))?
        .try_into()
        .kernel(format!("program {XDP_PROGRAM}"))
}
