//! The kernel side as userspace sees it: loading the object, pinning its maps, attaching the
//! XDP program to ports and writing the group maps.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{
        of_maps::HashOfMaps, Array, DevMapHash, HashMap, Map, MapData, PerCpuHashMap, PerCpuValues,
    },
    programs::{xdp::XdpLinkId, ProgramError, Xdp, XdpMode},
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use relay_common::{
    AttachMode, Config, GroupKey, PortCounters, PortInfo, UnknownPolicy, BPF_MAP_TYPE_DEVMAP_HASH,
    CONFIG_F_SOURCE_ENTRIES, DEVMAP_VALUE_SIZE, MAX_PORTS, MAX_PORTS_PER_GROUP,
};

use crate::{cli::XdpModeArg, error::UsageError, paths::pins, ports::Link};

/// The compiled eBPF object (built by build.rs from the relay-ebpf crate).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

/// `BPF_MAP_TYPE_HASH`.
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Name of the XDP entry point in the object.
pub const XDP_PROGRAM: &str = "mcrelay_xdp";

/// A port the program is attached to.
#[derive(Debug)]
pub struct AttachedPort {
    pub link: Link,
    pub mode: AttachMode,
    link_id: XdpLinkId,
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
}

impl Dataplane {
    /// Loads the object, pins its maps in `pin_dir` (which must not exist yet; `None`: no pins,
    /// everything goes away with this value) and writes the configuration.
    pub fn load(pin_dir: Option<&Path>, unknown: UnknownPolicy) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(|e| {
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

        let ports_data = MapData::create(
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
        if let Some(pin_dir) = pin_dir {
            std::fs::create_dir_all(pin_dir)
                .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
            for name in [
                pins::GROUP_PORTS,
                pins::FLOOD_PORTS,
                pins::ROUTER_PORTS,
                pins::CONFIG,
                pins::PORT_STATS,
            ] {
                let map =
                    ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))?;
                map.pin(pin_dir.join(name))
                    .with_context(|| format!("pinning {name} in {}", pin_dir.display()))?;
            }
            ports_data.pin(pin_dir.join(pins::PORTS)).context("pinning the PORTS map")?;
        }
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
        };
        dp.set_unknown_policy(unknown)?;
        Ok(dp)
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
        let mut map: DevMapHash<_> =
            DevMapHash::try_from(map_mut(&mut self.ebpf, pins::ROUTER_PORTS)?)?;
        for &old in &self.router_ports {
            if !ifindexes.contains(&old) {
                match map.remove(old) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e).context("writing ROUTER_PORTS"),
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
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing"))?
            .try_into()?;
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
        self.attached.insert(link.index, AttachedPort { link: link.clone(), mode: used, link_id });
        if let Err(e) = self.register_port(link.index, &link.name, used) {
            self.detach(link.index);
            return Err(e);
        }
        Ok((used, fallback_reason))
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
            if let Ok(program) = self
                .ebpf
                .program_mut(XDP_PROGRAM)
                .ok_or(())
                .and_then(|p| <&mut Xdp>::try_from(p).map_err(|_| ()))
            {
                if let Err(e) = program.detach(port.link_id) {
                    tracing::warn!(iface = %port.link.name, "detaching: {e}");
                }
            }
        }
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
            let mut outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
                HashOfMaps::try_from(map_mut(&mut self.ebpf, pins::GROUP_PORTS)?)?;
            self.last_publish = Some(std::time::Instant::now());
            match outer.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a group"),
            }
            self.groups.remove(&key);
            return self.update_source_flag();
        }
        if ifindexes.len() > MAX_PORTS_PER_GROUP as usize {
            return Err(anyhow!(
                "a group can have at most {MAX_PORTS_PER_GROUP} ports ({} given)",
                ifindexes.len()
            ));
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
        let mut inner = DevMapHash::try_from(Map::DevMapHash(data))?;
        for &ifindex in ifindexes {
            inner.insert(ifindex, ifindex, None, 0).context("filling a group port set")?;
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
