//! The kernel side as userspace sees it: loading the object, pinning its maps, attaching the
//! XDP program to ports and writing the group maps.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{
        of_maps::HashOfMaps, Array, DevMapHash, HashMap, Map, MapData, PerCpuHashMap, PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use relay_common::{
    AttachMode, ClientCopies, ClientSet, ClientSetKey, Config, GroupKey, PortCounters, PortInfo,
    UnknownPolicy, BPF_MAP_TYPE_DEVMAP_HASH, CONFIG_F_SOURCE_ENTRIES, DEVMAP_VALUE_SIZE,
    MAX_CLIENTS_PER_SET, MAX_PORTS, MAX_PORTS_PER_GROUP,
};

use crate::{cli::XdpModeArg, error::UsageError, groups::group_key, paths::pins, ports::Link};

/// The compiled eBPF object (built by build.rs from the relay-ebpf crate).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

/// The per-client egress program (relay-ebpf's `client` binary), loaded once per VPN client.
pub static CLIENT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/client"));

/// `BPF_MAP_TYPE_HASH`.
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Name of the per-client egress program in [`CLIENT_OBJECT`].
pub const CLIENT_PROGRAM: &str = "mcrelay_client";

/// Name of the XDP entry point in the object.
pub const XDP_PROGRAM: &str = "mcrelay_xdp";

/// A port the program is attached to.
#[derive(Debug)]
pub struct AttachedPort {
    pub link: Link,
    pub mode: AttachMode,
    /// Taken over from a previous daemon's pinned link (not attached by this one).
    pub adopted: bool,
    port_link: PortLink,
}

/// Who keeps a port's XDP link alive.
#[derive(Debug)]
enum PortLink {
    /// The loaded program (no pins): dropping the dataplane detaches it.
    Owned(XdpLinkId),
    /// A pin in bpffs: the link survives the daemon; removing the pin detaches it.
    Pinned(PathBuf),
}

/// The loaded object, its pinned maps and the ports it is attached to. Dropping it detaches
/// every port (the links belong to the object); [`Dataplane::unpin`] removes the pins.
pub struct Dataplane {
    ebpf: Ebpf,
    ports_map: HashMap<MapData, u32, PortInfo>,
    pin_dir: Option<PathBuf>,
    attached: BTreeMap<u32, AttachedPort>,
    /// Inner maps by group, kept so their fds stay open while referenced.
    groups: BTreeMap<GroupKey, DevMapHash<MapData>>,
    /// What `CONFIG` holds.
    config: Config,
    /// Ports in `ROUTER_PORTS`.
    router_ports: Vec<u32>,
    /// When the last `GROUP_PORTS` update was issued. The kernel makes the new entry visible
    /// to the program at once, then waits for an RCU grace period before the syscall returns
    /// (map-in-map updates do, ~10 ms here); this marks the moment forwarding changes.
    last_publish: Option<std::time::Instant>,
    /// The maps came from a previous daemon's pins.
    adopted: bool,
    /// Pin the XDP links of new attachments (false with `run --no-pin`).
    pub pin_links: bool,
    /// The per-client egress program (loaded on first use) and its maps.
    client: Option<Ebpf>,
    /// Copies per (port, client MAC) counted before the client's set was last rewritten.
    client_totals: BTreeMap<(u32, [u8; 6]), u64>,
    /// Outer-map writes collected by [`Dataplane::begin_batch`]: key -> inner map fd (`None`:
    /// delete). The inner maps are held in `groups`.
    pending: Option<BTreeMap<GroupKey, Option<std::os::fd::RawFd>>>,
}

/// Keys of per-client entries in a group's inner DEVMAP_HASH have this bit set; bits 8..23
/// hold the shared port's ifindex and bits 0..7 the slot. Plain port entries use the ifindex
/// as key (always below this bit).
pub const CLIENT_KEY_BIT: u32 = 1 << 31;

/// The inner-map key of slot `slot` of the per-client copies for `ifindex`.
pub const fn client_key(ifindex: u32, slot: u32) -> u32 {
    CLIENT_KEY_BIT | ((ifindex & 0x7fff) << 8) | (slot & 0xff)
}

/// Maps of the object that are pinned (and reused by the next daemon).
const OBJECT_MAPS: [&str; 5] =
    [pins::GROUP_PORTS, pins::FLOOD_PORTS, pins::ROUTER_PORTS, pins::CONFIG, pins::PORT_STATS];

impl Dataplane {
    /// Loads the object and writes the configuration.
    ///
    /// With `pin_dir`, the maps are pinned there; when they are already pinned (a previous
    /// daemon of the same layout version left them), they are reused as they are: forwarding
    /// state, counters and all. `None`: no pins, everything goes away with this value.
    pub fn load(pin_dir: Option<&Path>, unknown: UnknownPolicy) -> anyhow::Result<Self> {
        let adopt = pin_dir.is_some_and(|d| d.join(pins::GROUP_PORTS).exists());
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
            for name in OBJECT_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            if is_permission_error(&e) {
                anyhow!(UsageError::new(format!(
                    "permission denied loading the eBPF object ({e}); mcrelay needs root or \
                     CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
                )))
            } else {
                anyhow!(e).context("loading the eBPF object")
            }
        })?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing from the object"))?
            .try_into()?;
        program.load().context("the kernel rejected the XDP program (verifier)")?;

        let ports_path = pin_dir.map(|d| d.join(pins::PORTS));
        let ports_data = match ports_path.as_ref().filter(|p| p.exists()) {
            Some(path) => MapData::from_pin(path).context("opening the pinned PORTS map")?,
            None => {
                let data = MapData::create(
                    aya_obj::Map::new_from_params(
                        BPF_MAP_TYPE_HASH,
                        4,
                        std::mem::size_of::<PortInfo>() as u32,
                        MAX_PORTS,
                        0,
                    ),
                    pins::PORTS,
                    None,
                )
                .context("creating the PORTS map")?;
                if let Some(path) = &ports_path {
                    data.pin(path).context("pinning the PORTS map")?;
                }
                data
            }
        };
        let ports_map = HashMap::try_from(Map::HashMap(ports_data))?;

        let mut dp = Self {
            ebpf,
            ports_map,
            pin_dir: pin_dir.map(Path::to_owned),
            attached: BTreeMap::new(),
            groups: BTreeMap::new(),
            config: Config::default(),
            router_ports: Vec::new(),
            last_publish: None,
            adopted: adopt,
            pin_links: true,
            client: None,
            client_totals: BTreeMap::new(),
            pending: None,
        };
        if adopt {
            dp.read_back()?;
        }
        dp.set_unknown_policy(unknown)?;
        Ok(dp)
    }

    /// Whether the maps were adopted from a previous daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Reads the state a previous daemon left in the reused maps: config, router ports and
    /// every group's port set (the inner maps are kept so later swaps work as usual).
    fn read_back(&mut self) -> anyhow::Result<()> {
        let config: Array<_, Config> = Array::try_from(map_ref(&self.ebpf, pins::CONFIG)?)?;
        self.config = config.get(&0, 0).context("reading CONFIG")?;
        let routers: DevMapHash<_> =
            DevMapHash::try_from(map_ref(&self.ebpf, pins::ROUTER_PORTS)?)?;
        self.router_ports = routers.keys().filter_map(Result::ok).collect();
        let outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
            HashOfMaps::try_from(map_ref(&self.ebpf, pins::GROUP_PORTS)?)?;
        let keys: Vec<GroupKey> = outer.keys().filter_map(Result::ok).collect();
        for key in keys {
            match outer.get(&key, 0) {
                Ok(inner) => {
                    self.groups.insert(key, inner);
                }
                Err(e) => tracing::warn!("reading an adopted group entry: {e}"),
            }
        }
        Ok(())
    }

    /// Port sets found in `GROUP_PORTS` (after adoption: what the previous daemon installed).
    pub fn group_port_sets(&self) -> BTreeMap<GroupKey, Vec<u32>> {
        self.groups
            .iter()
            .map(|(k, inner)| (*k, inner.keys().filter_map(Result::ok).collect()))
            .collect()
    }

    fn write_config(&mut self, config: Config) -> anyhow::Result<()> {
        if config == self.config {
            return Ok(());
        }
        let mut map: Array<_, Config> = Array::try_from(map_mut(&mut self.ebpf, pins::CONFIG)?)?;
        map.set(0, config, 0).context("writing CONFIG")?;
        self.config = config;
        Ok(())
    }

    /// Changes what happens to data for groups without a port set.
    pub fn set_unknown_policy(&mut self, unknown: UnknownPolicy) -> anyhow::Result<()> {
        let config = Config { unknown_policy: unknown as u32, ..self.config };
        // Force the write: the map starts zeroed, which equals the default config.
        self.config.unknown_policy = u32::MAX;
        self.write_config(config)
    }

    /// Sets the ports that lead to multicast routers (targets for unknown groups).
    pub fn set_router_ports(&mut self, ifindexes: &[u32]) -> anyhow::Result<()> {
        if ifindexes.is_empty() {
            // No router port left: make the program stop using the map before emptying it, so
            // no frame is redirected into an empty map meanwhile.
            self.write_config(Config { router_ports: 0, ..self.config })?;
        }
        let mut map: DevMapHash<_> =
            DevMapHash::try_from(map_mut(&mut self.ebpf, pins::ROUTER_PORTS)?)?;
        for &old in &self.router_ports {
            if !ifindexes.contains(&old) {
                if let Err(e) = map.remove(old) {
                    if !is_not_found(&e) {
                        return Err(e).context("writing ROUTER_PORTS");
                    }
                }
            }
        }
        for &ifindex in ifindexes {
            map.insert(ifindex, ifindex, None, 0).context("writing ROUTER_PORTS")?;
        }
        self.router_ports = ifindexes.to_vec();
        self.write_config(Config { router_ports: ifindexes.len() as u32, ..self.config })
    }

    /// Keeps `CONFIG_F_SOURCE_ENTRIES` in line with whether any (S,G) entry exists.
    fn update_source_flag(&mut self) -> anyhow::Result<()> {
        let any = self.groups.keys().any(|k| k.source != [0; 16]);
        let flags = if any {
            self.config.flags | CONFIG_F_SOURCE_ENTRIES
        } else {
            self.config.flags & !CONFIG_F_SOURCE_ENTRIES
        };
        self.write_config(Config { flags, ..self.config })
    }

    /// The loaded XDP program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program_mut(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing"))?
            .try_into()?)
    }

    /// A port's counters, summed over the CPUs.
    pub fn counters(&self, ifindex: u32) -> anyhow::Result<PortCounters> {
        let map = self.ebpf.map(pins::PORT_STATS).ok_or_else(|| anyhow!("PORT_STATS missing"))?;
        let stats: PerCpuHashMap<_, u32, PortCounters> = PerCpuHashMap::try_from(map)?;
        let mut total = PortCounters::default();
        for c in stats.get(&ifindex, 0).context("reading PORT_STATS")?.iter() {
            total.accumulate(c);
        }
        Ok(total)
    }

    /// Attaches the program to `link` in the requested mode and registers the port in the
    /// maps. Returns the mode actually used and, for `auto`, why native mode was not possible.
    pub fn attach(
        &mut self,
        link: &Link,
        mode: XdpModeArg,
    ) -> anyhow::Result<(AttachMode, Option<String>)> {
        if let Some(adopted) = self.adopt_link(link, mode) {
            return Ok((adopted, None));
        }
        let pin = self.new_link_pin(link.index)?;
        let program = program_mut(&mut self.ebpf)?;
        let try_mode = |program: &mut Xdp, m: XdpMode| program.attach_to_if_index(link.index, m);
        let (link_id, used, fallback_reason) = match mode {
            XdpModeArg::Native => {
                let id = try_mode(program, XdpMode::Driver)
                    .map_err(|e| attach_error(link, "native", e))?;
                (id, AttachMode::Native, None)
            }
            XdpModeArg::Skb => {
                let id =
                    try_mode(program, XdpMode::Skb).map_err(|e| attach_error(link, "skb", e))?;
                (id, AttachMode::Skb, None)
            }
            XdpModeArg::Auto => match try_mode(program, XdpMode::Driver) {
                Ok(id) => (id, AttachMode::Native, None),
                Err(native_err) => {
                    let reason = error_chain(&native_err);
                    let id = try_mode(program, XdpMode::Skb)
                        .map_err(|e| attach_error(link, "native or skb", e))?;
                    (id, AttachMode::Skb, Some(reason))
                }
            },
        };
        let port_link = match pin {
            // Pinned links outlive the daemon: forwarding continues across restarts.
            Some(path) => {
                let pinned = program
                    .take_link(link_id)
                    .map_err(anyhow::Error::from)
                    .and_then(|l| Ok(FdLink::try_from(l)?))
                    .and_then(|fd| Ok(fd.pin(&path)?));
                match pinned {
                    Ok(_) => PortLink::Pinned(path),
                    Err(e) => {
                        return Err(e.context(format!("pinning the XDP link of {}", link.name)));
                    }
                }
            }
            None => PortLink::Owned(link_id),
        };
        self.attached.insert(
            link.index,
            AttachedPort { link: link.clone(), mode: used, adopted: false, port_link },
        );
        if let Err(e) = self.register_port(link.index, &link.name, used) {
            self.detach(link.index);
            return Err(e);
        }
        Ok((used, fallback_reason))
    }

    /// Where the XDP link of a port is pinned (`None` without pins).
    fn link_pin(&self, ifindex: u32) -> Option<PathBuf> {
        self.pin_dir.as_ref().map(|d| d.join(pins::LINKS).join(ifindex.to_string()))
    }

    /// Where a new attachment's link is pinned, if it is.
    fn new_link_pin(&self, ifindex: u32) -> anyhow::Result<Option<PathBuf>> {
        let Some(path) = self.link_pin(ifindex).filter(|_| self.pin_links) else {
            return Ok(None);
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Some(path))
    }

    /// Takes over the pinned link a previous daemon left on this port: the program in the
    /// link is replaced atomically (BPF_LINK_UPDATE), so no frame goes unprocessed. A pin that
    /// cannot be used (interface re-created meanwhile) is removed.
    fn adopt_link(&mut self, link: &Link, wanted: XdpModeArg) -> Option<AttachMode> {
        let path = self.link_pin(link.index)?;
        if !path.exists() {
            return None;
        }
        let mode = self
            .ports_map
            .get(&link.index, 0)
            .ok()
            .filter(|info| {
                let len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
                info.name[..len] == *link.name.as_bytes()
            })
            .and_then(|info| AttachMode::from_u32(info.attach_mode));
        let mismatch = matches!(
            (wanted, mode),
            (XdpModeArg::Native, Some(AttachMode::Skb))
                | (XdpModeArg::Skb, Some(AttachMode::Native))
        );
        if mismatch {
            tracing::info!(iface = %link.name, "the pinned link has another XDP mode than asked for: re-attaching");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let result = (|| -> anyhow::Result<()> {
            let mode = mode.ok_or_else(|| anyhow!("no matching PORTS entry"))?;
            let fd_link = FdLink::from(PinnedLink::from_pin(&path)?);
            let xdp_link = XdpLink::try_from(fd_link)?;
            let program = program_mut(&mut self.ebpf)?;
            let id = program.attach_to_link(xdp_link)?;
            // The program took an fd of the link; give it up so that the pin is the only
            // reference and removing it detaches the port.
            drop(program.take_link(id)?);
            self.attached.insert(
                link.index,
                AttachedPort {
                    link: link.clone(),
                    mode,
                    adopted: true,
                    port_link: PortLink::Pinned(path.clone()),
                },
            );
            self.register_port_adopted(link.index, &link.name, mode)
        })();
        match result {
            Ok(()) => {
                tracing::info!(iface = %link.name, "adopted the pinned XDP link (program replaced atomically)");
                mode
            }
            Err(e) => {
                tracing::warn!(iface = %link.name, "cannot adopt {}: {e:#}; attaching anew", path.display());
                self.attached.remove(&link.index);
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Removes link pins of ports that are not attached now (left by a previous daemon for
    /// interfaces that are gone or no longer wanted): that detaches them. Also drops their
    /// entries from PORTS, PORT_STATS and FLOOD_PORTS.
    pub fn prune_stale_ports(&mut self) {
        if let Some(dir) = self.pin_dir.as_ref().map(|d| d.join(pins::LINKS)) {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let stale = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_none_or(|i| !self.attached.contains_key(&i));
                    if stale {
                        tracing::info!("removing stale link pin {}", entry.path().display());
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        let stale: Vec<u32> = self
            .ports_map
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !self.attached.contains_key(i))
            .collect();
        for ifindex in stale {
            self.forget_port(ifindex);
        }
    }

    /// Like [`Self::register_port`], but keeps the counters an adopted port already has.
    fn register_port_adopted(
        &mut self,
        ifindex: u32,
        ifname: &str,
        mode: AttachMode,
    ) -> anyhow::Result<()> {
        let has_stats = {
            let stats: PerCpuHashMap<_, u32, PortCounters> =
                PerCpuHashMap::try_from(map_ref(&self.ebpf, pins::PORT_STATS)?)?;
            stats.get(&ifindex, 0).is_ok()
        };
        if has_stats {
            let mut flood: DevMapHash<_> =
                DevMapHash::try_from(map_mut(&mut self.ebpf, pins::FLOOD_PORTS)?)?;
            flood.insert(ifindex, ifindex, None, 0).context("writing FLOOD_PORTS")?;
            return Ok(());
        }
        self.register_port(ifindex, ifname, mode)
    }

    /// Enters a port in PORTS, PORT_STATS and FLOOD_PORTS (done by [`Self::attach`]; public
    /// so tests can register a port they run the program for without attaching).
    pub fn register_port(
        &mut self,
        ifindex: u32,
        ifname: &str,
        mode: AttachMode,
    ) -> anyhow::Result<()> {
        let mut name = [0u8; 16];
        let n = ifname.len().min(15);
        name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        self.ports_map
            .insert(ifindex, PortInfo { attach_mode: mode as u32, role: 0, name }, 0)
            .context("writing PORTS")?;
        let mut stats: PerCpuHashMap<_, u32, PortCounters> =
            PerCpuHashMap::try_from(map_mut(&mut self.ebpf, pins::PORT_STATS)?)?;
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let zero = PerCpuValues::try_from(vec![PortCounters::default(); cpus])?;
        stats.insert(ifindex, zero, 0).context("creating PORT_STATS entry")?;
        let mut flood: DevMapHash<_> =
            DevMapHash::try_from(map_mut(&mut self.ebpf, pins::FLOOD_PORTS)?)?;
        flood.insert(ifindex, ifindex, None, 0).context("writing FLOOD_PORTS")?;
        Ok(())
    }

    /// Detaches the program from a port and forgets the port in the maps (best effort).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(port) = self.attached.remove(&ifindex) {
            match port.port_link {
                PortLink::Owned(id) => {
                    if let Ok(program) = program_mut(&mut self.ebpf) {
                        if let Err(e) = program.detach(id) {
                            tracing::warn!(iface = %port.link.name, "detaching: {e}");
                        }
                    }
                }
                // Removing the last reference (the pin) detaches a pinned link.
                PortLink::Pinned(path) => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(iface = %port.link.name, "unpinning {}: {e}", path.display());
                    }
                }
            }
        }
        self.forget_port(ifindex);
    }

    fn forget_port(&mut self, ifindex: u32) {
        let _ = self.ports_map.remove(&ifindex);
        if let Ok(map) = map_mut(&mut self.ebpf, pins::PORT_STATS) {
            if let Ok(mut stats) = PerCpuHashMap::<_, u32, PortCounters>::try_from(map) {
                let _ = stats.remove(&ifindex);
            }
        }
        if let Ok(map) = map_mut(&mut self.ebpf, pins::FLOOD_PORTS) {
            if let Ok(mut flood) = DevMapHash::try_from(map) {
                let _ = flood.remove(ifindex);
            }
        }
    }

    /// Ports attached, by ifindex.
    pub fn ports(&self) -> impl Iterator<Item = &AttachedPort> {
        self.attached.values()
    }

    /// When the last `GROUP_PORTS` change was issued (see the field's documentation).
    pub fn last_publish(&self) -> Option<std::time::Instant> {
        self.last_publish
    }

    /// Keys currently in `GROUP_PORTS`.
    pub fn group_keys(&self) -> impl Iterator<Item = &GroupKey> {
        self.groups.keys()
    }

    /// Sets a group's port set, replacing the previous one atomically (a new inner map is
    /// built and swapped in). An empty set removes the group.
    pub fn set_group(&mut self, key: GroupKey, ifindexes: &[u32]) -> anyhow::Result<()> {
        if ifindexes.is_empty() {
            return self.remove_group(key);
        }
        self.install_group(key, ifindexes)
    }

    /// Sets the clients of a shared port that joined a group (at most
    /// [`MAX_CLIENTS_PER_SET`]); returns the inner-map keys the group's port set must contain
    /// for that port instead of the port itself (empty: no per-client copies).
    pub fn set_client_set(
        &mut self,
        ifindex: u32,
        group: IpAddr,
        macs: &[[u8; 6]],
    ) -> anyhow::Result<Vec<u32>> {
        let key = ClientSetKey { ifindex, _pad: 0, group: group_key(group) };
        self.collect_client_copies(&key)?;
        let ebpf = self.client_ebpf()?;
        let mut sets: aya::maps::HashMap<_, ClientSetKey, ClientSet> =
            aya::maps::HashMap::try_from(map_mut(ebpf, "CLIENT_SETS")?)?;
        if macs.is_empty() {
            let _ = sets.remove(&key);
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
        sets.insert(key, set, 0).context("writing CLIENT_SETS")?;
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let mut cursor: PerCpuHashMap<_, ClientSetKey, u32> =
            PerCpuHashMap::try_from(map_mut(ebpf, "CLIENT_CURSOR")?)?;
        if cursor.get(&key, 0).is_err() {
            cursor.insert(key, PerCpuValues::try_from(vec![0u32; cpus])?, 0)?;
        }
        let mut copies: PerCpuHashMap<_, ClientSetKey, ClientCopies> =
            PerCpuHashMap::try_from(map_mut(ebpf, "CLIENT_COPIES")?)?;
        if copies.get(&key, 0).is_err() {
            let zero = ClientCopies { copies: [0; MAX_CLIENTS_PER_SET] };
            copies.insert(key, PerCpuValues::try_from(vec![zero; cpus])?, 0)?;
        }
        Ok((0..n as u32).map(|slot| client_key(ifindex, slot)).collect())
    }

    /// Adds the copies counted for `key`'s current slots to the per-MAC totals and restarts
    /// its counters (before the set's slots change).
    fn collect_client_copies(&mut self, key: &ClientSetKey) -> anyhow::Result<()> {
        let Some(ebpf) = self.client.as_mut() else { return Ok(()) };
        let sets: aya::maps::HashMap<_, ClientSetKey, ClientSet> =
            aya::maps::HashMap::try_from(map_ref(ebpf, "CLIENT_SETS")?)?;
        let Ok(set) = sets.get(key, 0) else { return Ok(()) };
        let mut copies: PerCpuHashMap<_, ClientSetKey, ClientCopies> =
            PerCpuHashMap::try_from(map_mut(ebpf, "CLIENT_COPIES")?)?;
        if let Ok(per_cpu) = copies.get(key, 0) {
            for slot in 0..(set.count as usize).min(MAX_CLIENTS_PER_SET) {
                let n: u64 = per_cpu.iter().map(|c| c.copies[slot]).sum();
                *self.client_totals.entry((key.ifindex, set.macs[slot])).or_default() += n;
            }
        }
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let zero = ClientCopies { copies: [0; MAX_CLIENTS_PER_SET] };
        copies.insert(key, PerCpuValues::try_from(vec![zero; cpus])?, 0)?;
        Ok(())
    }

    /// The per-client program, loaded on first use.
    fn client_ebpf(&mut self) -> anyhow::Result<&mut Ebpf> {
        if self.client.is_none() {
            let mut ebpf =
                EbpfLoader::new().load(CLIENT_OBJECT).context("loading the per-client program")?;
            let program: &mut Xdp = ebpf
                .program_mut(CLIENT_PROGRAM)
                .ok_or_else(|| anyhow!("{CLIENT_PROGRAM} missing"))?
                .try_into()?;
            program.load().context("the kernel rejected the per-client program")?;
            self.client = Some(ebpf);
        }
        self.client.as_mut().ok_or_else(|| anyhow!("per-client program missing"))
    }

    /// Forgets the totals of clients that are gone (`keep` says which (port, MAC) stay).
    pub fn retain_clients(&mut self, keep: impl Fn(u32, [u8; 6]) -> bool) {
        self.client_totals.retain(|(i, m), _| keep(*i, *m));
    }

    /// Copies sent to each client so far: (port ifindex, MAC, copies), all groups together.
    pub fn client_copies(&self) -> Vec<(u32, [u8; 6], u64)> {
        let mut totals = self.client_totals.clone();
        if let Some(ebpf) = &self.client {
            let sets = map_ref(ebpf, "CLIENT_SETS")
                .ok()
                .and_then(|m| aya::maps::HashMap::<_, ClientSetKey, ClientSet>::try_from(m).ok());
            let copies = map_ref(ebpf, "CLIENT_COPIES")
                .ok()
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
        totals.into_iter().map(|((i, m), n)| (i, m, n)).collect()
    }

    /// Removes a key from `GROUP_PORTS` (absent already: fine).
    pub fn remove_group(&mut self, key: GroupKey) -> anyhow::Result<()> {
        if self.groups.remove(&key).is_none() {
            if let Some(pending) = self.pending.as_mut() {
                pending.remove(&key);
            }
            return Ok(());
        }
        if let Some(pending) = self.pending.as_mut() {
            pending.insert(key, None);
            return Ok(());
        }
        let mut outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
            HashOfMaps::try_from(map_mut(&mut self.ebpf, pins::GROUP_PORTS)?)?;
        self.last_publish = Some(std::time::Instant::now());
        if let Err(e) = outer.remove(&key) {
            if !is_not_found(&e) {
                return Err(e).context("removing a group");
            }
        }
        self.update_source_flag()
    }

    /// Installs a port set for a key, even an empty one: an (S,G) entry with no ports stops
    /// that source (blocked in EXCLUDE mode everywhere) instead of letting the (*,G) entry
    /// carry it.
    pub fn install_group(&mut self, key: GroupKey, ifindexes: &[u32]) -> anyhow::Result<()> {
        let mut ifindexes = ifindexes;
        if ifindexes.len() > MAX_PORTS_PER_GROUP as usize {
            tracing::warn!(
                "a group can have at most {MAX_PORTS_PER_GROUP} ports or clients; {} wanted, \
                 the rest get no copy",
                ifindexes.len()
            );
            ifindexes = &ifindexes[..MAX_PORTS_PER_GROUP as usize];
        }
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_DEVMAP_HASH,
            4,
            DEVMAP_VALUE_SIZE,
            MAX_PORTS_PER_GROUP,
            0,
        );
        let data =
            MapData::create(obj, "mcrelay_grp", None).context("creating a group port set")?;
        let inner_fd = data.fd().as_fd().as_raw_fd();
        let mut inner = DevMapHash::try_from(Map::DevMapHash(data))?;
        for &key in ifindexes {
            if key & CLIENT_KEY_BIT == 0 {
                if self.ports_map.get(&key, 0).is_err() {
                    tracing::debug!(
                        ifindex = key,
                        "skipping a port that is not attached (any more)"
                    );
                    continue;
                }
                inner.insert(key, key, None, 0).context("filling a group port set")?;
                continue;
            }
            let port = (key >> 8) & 0x7fff;
            let Some(client) = self.client.as_ref() else {
                tracing::debug!(key, "skipping a per-client entry of a previous daemon");
                continue;
            };
            let program: &Xdp = client
                .program(CLIENT_PROGRAM)
                .ok_or_else(|| anyhow!("{CLIENT_PROGRAM} missing"))?
                .try_into()?;
            inner
                .insert(key, port, Some(program.fd()?), 0)
                .context("adding a per-client copy to a group port set")?;
        }
        if let Some(pending) = self.pending.as_mut() {
            // `inner` stays open in `groups` until the batch is written.
            pending.insert(key, Some(inner_fd));
            self.groups.insert(key, inner);
            return Ok(());
        }
        if key.source != [0; 16] && self.config.flags & CONFIG_F_SOURCE_ENTRIES == 0 {
            // Raise the flag first: the program must look (S,G) up once the entry exists.
            let flags = self.config.flags | CONFIG_F_SOURCE_ENTRIES;
            self.write_config(Config { flags, ..self.config })?;
        }
        let mut outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
            HashOfMaps::try_from(map_mut(&mut self.ebpf, pins::GROUP_PORTS)?)?;
        self.last_publish = Some(std::time::Instant::now());
        outer.insert(key, &inner, 0).context("writing GROUP_PORTS")?;
        self.groups.insert(key, inner);
        Ok(())
    }

    /// Starts collecting `GROUP_PORTS` changes: [`Self::install_group`] and
    /// [`Self::remove_group`] build their inner maps at once but the outer map is written by
    /// [`Self::commit_batch`] with one BPF_MAP_UPDATE_BATCH and one BPF_MAP_DELETE_BATCH. Every
    /// syscall write of a map-of-maps waits for an RCU grace period (~10 ms here) before it
    /// returns; a batch waits once, so 10,000 groups are written in well under a second instead
    /// of minutes.
    pub fn begin_batch(&mut self) {
        if self.pending.is_none() {
            self.pending = Some(BTreeMap::new());
        }
    }

    /// Writes the collected changes (see [`Self::begin_batch`]).
    pub fn commit_batch(&mut self) -> anyhow::Result<()> {
        let Some(pending) = self.pending.take() else { return Ok(()) };
        if pending.is_empty() {
            return Ok(());
        }
        let (updates, deletes): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(_, v)| v.is_some());
        if updates.iter().any(|(k, _)| k.source != [0; 16])
            && self.config.flags & CONFIG_F_SOURCE_ENTRIES == 0
        {
            // Raise the flag first: the program must look (S,G) up once the entries exist.
            let flags = self.config.flags | CONFIG_F_SOURCE_ENTRIES;
            self.write_config(Config { flags, ..self.config })?;
        }
        let outer_fd = match self.ebpf.map(pins::GROUP_PORTS) {
            Some(Map::HashOfMaps(data)) => data.fd().as_fd().as_raw_fd(),
            _ => return Err(anyhow!("GROUP_PORTS missing or of the wrong type")),
        };
        self.last_publish = Some(std::time::Instant::now());
        if !deletes.is_empty() {
            let keys: Vec<GroupKey> = deletes.iter().map(|(k, _)| *k).collect();
            if let Err(e) = batch_op(BPF_MAP_DELETE_BATCH, outer_fd, &keys, None) {
                tracing::debug!("delete batch: {e}; deleting one by one");
                let mut outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
                    HashOfMaps::try_from(map_mut(&mut self.ebpf, pins::GROUP_PORTS)?)?;
                for key in &keys {
                    if let Err(e) = outer.remove(key) {
                        if !is_not_found(&e) {
                            return Err(e).context("removing a group");
                        }
                    }
                }
            }
        }
        if !updates.is_empty() {
            let keys: Vec<GroupKey> = updates.iter().map(|(k, _)| *k).collect();
            let fds: Vec<u32> = updates.iter().filter_map(|(_, v)| v.map(|fd| fd as u32)).collect();
            if let Err(e) = batch_op(BPF_MAP_UPDATE_BATCH, outer_fd, &keys, Some(&fds)) {
                tracing::debug!("update batch: {e}; writing one by one");
                let mut outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
                    HashOfMaps::try_from(map_mut(&mut self.ebpf, pins::GROUP_PORTS)?)?;
                for key in &keys {
                    let inner = self.groups.get(key).ok_or_else(|| anyhow!("group vanished"))?;
                    outer.insert(*key, inner, 0).context("writing GROUP_PORTS")?;
                }
            }
        }
        self.update_source_flag()
    }

    /// Removes this instance's pins (the directory and, if empty, its parents up to the root).
    pub fn unpin(&self) {
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }
}

/// Removes a pin directory and then its empty parents (`ns-<id>`, the root).
pub fn remove_pins(pin_dir: &Path) {
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

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `bpf(BPF_MAP_{UPDATE,DELETE}_BATCH)` on `map_fd` (aya 0.14 has no batch API).
fn batch_op(
    cmd: libc::c_long,
    map_fd: std::os::fd::RawFd,
    keys: &[GroupKey],
    values: Option<&[u32]>,
) -> std::io::Result<()> {
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: map_fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the kernel reads `count` keys (and values) from the arrays, which live for the
    // call and have exactly the map's key and value sizes (GroupKey: 32 bytes, fd: 4 bytes),
    // and writes the number processed back into `attr.count` (hence `&mut`).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A delete of a key that is not there: aya reports it as a syscall error with ENOENT.
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a Map> {
    ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn program_mut(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing"))?
        .try_into()?)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
}

fn attach_error(link: &Link, mode: &str, e: ProgramError) -> anyhow::Error {
    anyhow!(UsageError::new(format!(
        "cannot attach XDP to {} in {mode} mode: {}{}",
        link.name,
        error_chain(&e),
        if mode == "native" { " (try --xdp-mode auto or skb)" } else { "" }
    )))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn is_permission_error(e: &aya::EbpfError) -> bool {
    let text = error_chain(e);
    text.contains("Operation not permitted") || text.contains("Permission denied")
}
