//! `mcrelay groups|ports|stats|detach`: read the daemon's pinned maps (no daemon round-trip).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{
    of_maps::HashOfMaps, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap,
};
use relay_common::{AttachMode, Counter, GroupKey, PortCounters, PortInfo, PORT_ROLE_ROUTER};
use serde_json::{json, Value};

use crate::{
    dataplane::remove_pins,
    groups::key_group,
    instance::{self, InstanceError, InstanceLock},
    paths,
    paths::pins,
};

/// Why the pinned maps cannot be read (or removed).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Nothing is pinned: no daemon ever ran here (or `mcrelay detach` removed it).
    #[error("no mcrelay dataplane in this network namespace ({} does not exist); start one with `mcrelay run`", path.display())]
    NoDataplane { path: PathBuf },
    /// A pinned map could not be opened (EACCES: the user is neither root nor in the
    /// `mcrelay` group, whose members may read the pins).
    #[error("opening {}{}", path.display(), permission_hint(source))]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A map could not be read.
    #[error("reading {map}")]
    Read {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// `detach` while a daemon runs.
    #[error(
        "an mcrelay daemon is running in this network namespace; stop it first (with \
         `run --no-pin` it detaches as it exits; otherwise run `mcrelay detach` after it stopped)"
    )]
    DaemonRunning,
    /// The network namespace or the pin directory could not be identified.
    #[error("finding the pins: {0:#}")]
    Paths(anyhow::Error),
}

impl InspectError {
    /// Whether the user can fix this (exit status 2).
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Open { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            Self::DaemonRunning => true,
            Self::NoDataplane { .. } | Self::Read { .. } | Self::Paths(_) => false,
        }
    }
}

/// What to do about a permission error: the pins are readable by root and the `mcrelay` group.
fn permission_hint(source: &std::io::Error) -> String {
    if source.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    let group = paths::ACCESS_GROUP;
    format!(
        " (mcrelay's pins and state are readable by root and members of the `{group}` group \
         only: join it with `sudo usermod -aG {group} $USER` and log in again, or use sudo)"
    )
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> InspectError {
    move |source| InspectError::Read { map, source }
}

/// The pin directory of this namespace's current map layout.
fn pin_dir(pin_root: &Path) -> Result<PathBuf, InspectError> {
    paths::pin_dir(&crate::bpffs::resolve(pin_root)).map_err(InspectError::Paths)
}

/// One attached port with its summed counters.
#[derive(Debug, Clone)]
pub struct PortRow {
    pub iface: String,
    pub ifindex: u32,
    pub mode: &'static str,
    pub role: &'static str,
    /// Why the loop guard keeps the port in standby (empty: it relays).
    pub standby_reason: &'static str,
    /// The device can take XDP redirects: copies from other ports reach it.
    pub receives_copies: bool,
    pub counters: PortCounters,
}

/// One group with its ports.
#[derive(Debug, Clone)]
pub struct GroupRow {
    pub group: String,
    pub ports: Vec<String>,
    pub kind: &'static str,
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData, InspectError> {
    let path = pin_dir.join(name);
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => return Err(InspectError::NoDataplane { path }),
        // The pin directory is not searchable for this user (0750 root:mcrelay).
        Err(source) => return Err(InspectError::Open { path, source }),
    }
    open_read_only(&path).map_err(|source| InspectError::Open { path, source })
}

/// Opens a pinned map read-only (BPF_OBJ_GET with BPF_F_RDONLY): the CLI can never change the
/// daemon's maps, and the kernel checks that too. (`MapData::from_pin` opens read-write.)
fn open_read_only(path: &Path) -> std::io::Result<MapData> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: BPF_OBJ_GET reads `attr` (a valid, zero-padded bpf_attr prefix) and the
    // NUL-terminated path it points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    MapData::from_fd(fd).map_err(std::io::Error::other)
}

/// Reads every attached port and its counters.
pub fn read_ports(pin_dir: &Path) -> Result<Vec<PortRow>, InspectError> {
    let ports: HashMap<_, u32, PortInfo> =
        HashMap::try_from(Map::HashMap(open(pin_dir, pins::PORTS)?)).map_err(map_error("PORTS"))?;
    let stats = crate::dataplane::port_stats::PortStats::new(
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, pins::PORT_STATS)?))
            .map_err(map_error("PORT_STATS"))?,
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open(pin_dir, pins::PORT_STATS_SPILL)?))
            .map_err(map_error("PORT_STATS_SPILL"))?,
    );
    let mut rows = Vec::new();
    for entry in ports.iter() {
        let (ifindex, info) = entry.map_err(map_error("PORTS"))?;
        let counters = stats.counters(ifindex).unwrap_or_default();
        let name_len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
        rows.push(PortRow {
            iface: String::from_utf8_lossy(&info.name[..name_len]).into_owned(),
            ifindex,
            mode: AttachMode::from_u32(info.attach_mode).map_or("unknown", AttachMode::as_str),
            role: if info.role & PORT_ROLE_ROUTER != 0 { "router" } else { "member" },
            standby_reason: crate::loop_guard::standby_reason(info.role),
            // A device without XDP transmit gets its copies from the TC program (TC mode).
            receives_copies: info.role & relay_common::PORT_NO_XDP_XMIT == 0
                || info.attach_mode == AttachMode::Tc as u32,
            counters,
        });
    }
    rows.sort_by_key(|r| r.ifindex);
    Ok(rows)
}

/// Reads every group and its ports.
pub fn read_groups(pin_dir: &Path) -> Result<Vec<GroupRow>, InspectError> {
    let names: BTreeMap<u32, String> =
        read_ports(pin_dir)?.into_iter().map(|p| (p.ifindex, p.iface)).collect();
    let outer: HashOfMaps<_, GroupKey, DevMapHash<MapData>> =
        HashOfMaps::try_from(Map::HashOfMaps(open(pin_dir, pins::GROUP_PORTS)?))
            .map_err(map_error("GROUP_PORTS"))?;
    let v4: HashOfMaps<_, u32, DevMapHash<MapData>> =
        HashOfMaps::try_from(Map::HashOfMaps(open(pin_dir, pins::GROUP_PORTS_V4)?))
            .map_err(map_error("GROUP_PORTS_V4"))?;
    let mut entries: Vec<(GroupKey, DevMapHash<MapData>)> = Vec::new();
    for key in outer.keys() {
        let key = key.map_err(map_error("GROUP_PORTS"))?;
        // Entries may change between listing and reading: skip the ones that went away.
        if let Ok(inner) = outer.get(&key, 0) {
            entries.push((key, inner));
        }
    }
    for key in v4.keys() {
        let key = key.map_err(map_error("GROUP_PORTS_V4"))?;
        if let Ok(inner) = v4.get(&key, 0) {
            entries.push((GroupKey::any_source_v4(relay_common::v4_group_of_key(key)), inner));
        }
    }
    let mut rows = Vec::new();
    for (key, inner) in entries {
        let mut ports: Vec<String> = Vec::new();
        for (k, value) in inner.iter().filter_map(Result::ok) {
            let name = if k & crate::dataplane::CLIENT_KEY_BIT != 0 {
                // A per-client copy: the devmap value names the port it leaves through.
                let port = value.if_index;
                let port = names.get(&port).cloned().unwrap_or_else(|| format!("ifindex {port}"));
                format!("{port}/client{}", k & 0xff)
            } else {
                names.get(&k).cloned().unwrap_or_else(|| format!("ifindex {k}"))
            };
            ports.push(name);
        }
        ports.sort();
        let group = key_group(&key).to_string();
        let group = if key.source == [0; 16] {
            group
        } else {
            let source = key_group(&GroupKey { group: key.source, source: [0; 16] });
            format!("({source},{group})")
        };
        // Without a running daemon nothing is learned or expires: what the maps hold stays as
        // it is, like a static entry (the contract knows only static and learned).
        rows.push(GroupRow { group, ports, kind: "static" });
    }
    rows.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(rows)
}

fn counters_json(values: &[u64; relay_common::COUNTER_COUNT]) -> Value {
    let map: serde_json::Map<String, Value> =
        Counter::ALL.iter().map(|c| (c.name().to_owned(), json!(values[*c as usize]))).collect();
    Value::Object(map)
}

/// `mcrelay ports`.
pub fn ports(pin_root: &Path, as_json: bool) -> anyhow::Result<()> {
    let rows = read_ports(&pin_dir(pin_root)?)?;
    if as_json {
        let ports: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"iface": r.iface, "ifindex": r.ifindex, "mode": r.mode, "role": r.role,
                       "standby": !r.standby_reason.is_empty(),
                       "standby_reason": r.standby_reason,
                       "receives_copies": r.receives_copies,
                       "counters": counters_json(&r.counters.packets)})
            })
            .collect();
        println!("{}", json!({ "ports": ports }));
        return Ok(());
    }
    println!(
        "{:<16} {:>7} {:<7} {:<7} {:>12} {:>12} {:>12}",
        "IFACE", "IFINDEX", "MODE", "ROLE", "FORWARDED", "PASSED", "DROPPED"
    );
    for r in &rows {
        let (passed, dropped) = passed_dropped(&r.counters);
        println!(
            "{:<16} {:>7} {:<7} {:<7} {:>12} {:>12} {:>12}",
            r.iface,
            r.ifindex,
            r.mode,
            if r.standby_reason.is_empty() { r.role } else { "standby" },
            r.counters.packets(Counter::Forwarded),
            passed,
            dropped
        );
    }
    Ok(())
}

fn passed_dropped(c: &PortCounters) -> (u64, u64) {
    let passed = [
        Counter::PassedControl,
        Counter::PassedLinkLocal,
        Counter::PassedUnknown,
        Counter::PassedOther,
        Counter::Malformed,
        Counter::RedirectFailed,
    ]
    .iter()
    .map(|&k| c.packets(k))
    .sum();
    let dropped = [
        Counter::DropNoMembers,
        Counter::DropPolicy,
        Counter::DropTtl,
        Counter::DropLoop,
        Counter::DropRateLimit,
    ]
    .iter()
    .map(|&k| c.packets(k))
    .sum();
    (passed, dropped)
}

/// `mcrelay groups`: the running daemon's state file (learned and static groups, timers,
/// queriers); without one, the static view from the pinned maps.
pub fn groups(pin_root: &Path, as_json: bool) -> anyhow::Result<()> {
    let state_path = paths::state_file()?;
    let state = if instance::is_running() && state_path.exists() {
        Some(crate::state::read(&state_path)?)
    } else {
        None
    };
    let Some(state) = state else {
        let rows = read_groups(&pin_dir(pin_root)?)?;
        if as_json {
            let groups: Vec<Value> = rows
                .iter()
                .map(|r| json!({"group": r.group, "ports": r.ports, "kind": r.kind}))
                .collect();
            println!("{}", json!({ "groups": groups }));
        } else {
            println!("{:<40} {:<8} PORTS", "GROUP", "KIND");
            for r in &rows {
                println!("{:<40} {:<8} {}", r.group, r.kind, r.ports.join(" "));
            }
        }
        return Ok(());
    };
    if as_json {
        println!(
            "{}",
            json!({"groups": state.groups, "queriers": state.queriers,
                   "router_ports": state.router_ports, "control": state.control,
                   "clients": state.clients, "not_taken": state.not_taken})
        );
        return Ok(());
    }
    println!("{:<40} {:<8} PORTS", "GROUP", "KIND");
    for g in &state.groups {
        println!("{:<40} {:<8} {}", g.group, g.kind, g.ports.join(" "));
        for s in &g.sources {
            println!("  source {:<32} {}", s.source, s.ports.join(" "));
        }
        for m in &g.members {
            let timer =
                m.timer_ms.map_or(String::from("-"), |t| format!("{:.1}s", t as f64 / 1000.0));
            let sources: Vec<String> = m
                .sources
                .iter()
                .map(|s| match s.timer_ms {
                    Some(t) => format!("{}({:.1}s)", s.source, t as f64 / 1000.0),
                    None => format!("{}(blocked)", s.source),
                })
                .collect();
            println!(
                "  member {:<16} {:<8} timer {:<8} {:<7} {}",
                m.port,
                m.mode,
                timer,
                m.compat,
                sources.join(" ")
            );
        }
    }
    if !state.queriers.is_empty() {
        println!();
        println!("{:<16} {:<6} QUERIER", "PORT", "FAMILY");
        for q in &state.queriers {
            let me = if q.is_self { " (mcrelay)" } else { "" };
            println!("{:<16} {:<6} {}{me}", q.port, q.family, q.address);
        }
    }
    if !state.router_ports.is_empty() {
        println!("router ports: {}", state.router_ports.join(" "));
    }
    if !state.clients.is_empty() {
        println!();
        println!(
            "{:<16} {:<24} {:>10} GROUPS (per-client delivery)",
            "PORT", "CLIENT (MAC OR PEER)", "COPIES"
        );
        for c in &state.clients {
            let client = c.mac.as_deref().or(c.address.as_deref()).unwrap_or("?");
            println!("{:<16} {:<24} {:>10} {}", c.port, client, c.copies, c.groups.join(" "));
        }
    }
    if !state.not_taken.is_empty() {
        println!();
        println!("NOT TAKEN (recent memberships mcrelay did not learn, and why)");
        for n in &state.not_taken {
            println!("{:<40} {:<16} {}", n.group, n.port, n.why);
        }
    }
    Ok(())
}

/// `mcrelay stats [--watch SECONDS]`.
pub fn stats(pin_root: &Path, as_json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    let pin_dir = pin_dir(pin_root)?;
    let mut previous: Option<Vec<PortRow>> = None;
    loop {
        let rows = read_ports(&pin_dir)?;
        let interval = watch.unwrap_or(0).max(1) as f64;
        if as_json {
            let ports: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let mut v = json!({"iface": r.iface, "ifindex": r.ifindex, "mode": r.mode,
                        "packets": counters_json(&r.counters.packets),
                        "bytes": counters_json(&r.counters.bytes)});
                    if let Some(prev) =
                        previous.as_ref().and_then(|p| p.iter().find(|p| p.ifindex == r.ifindex))
                    {
                        let rates: [u64; relay_common::COUNTER_COUNT] = std::array::from_fn(|i| {
                            ((r.counters.packets[i].saturating_sub(prev.counters.packets[i]))
                                as f64
                                / interval) as u64
                        });
                        v["packets_per_second"] = counters_json(&rates);
                    }
                    v
                })
                .collect();
            println!("{}", json!({ "ports": ports }));
        } else {
            println!(
                "{:<16} {:<22} {:>14} {:>16} {:>12}",
                "IFACE", "COUNTER", "PACKETS", "BYTES", "PPS"
            );
            for r in &rows {
                let prev =
                    previous.as_ref().and_then(|p| p.iter().find(|p| p.ifindex == r.ifindex));
                for c in Counter::ALL {
                    let packets = r.counters.packets(c);
                    if packets == 0 && c != Counter::Forwarded {
                        continue;
                    }
                    let pps = prev.map_or(String::from("-"), |p| {
                        format!(
                            "{:.0}",
                            packets.saturating_sub(p.counters.packets(c)) as f64 / interval
                        )
                    });
                    println!(
                        "{:<16} {:<22} {:>14} {:>16} {:>12}",
                        r.iface,
                        c.name(),
                        packets,
                        r.counters.bytes[c as usize],
                        pps
                    );
                }
            }
        }
        std::io::stdout().flush().ok();
        let Some(secs) = watch else { return Ok(()) };
        previous = Some(rows);
        std::thread::sleep(Duration::from_secs(secs.max(1)));
        if !as_json {
            println!();
        }
    }
}

/// `mcrelay detach`: removes the pins of this namespace (the daemon must not be running).
pub fn detach(pin_root: &Path) -> anyhow::Result<()> {
    let pin_root = &crate::bpffs::resolve(pin_root);
    // Held while the pins go, so that no daemon starts in between.
    let _lock = match InstanceLock::acquire() {
        Ok(lock) => lock,
        Err(InstanceError::Running { .. }) => return Err(InspectError::DaemonRunning.into()),
        Err(e) => return Err(e.into()),
    };
    let root = paths::netns_pin_root(pin_root).map_err(InspectError::Paths)?;
    if !root.exists() {
        println!("nothing to detach ({} does not exist)", root.display());
        return Ok(());
    }
    // Links first, one by one, so that every port is detached when this returns.
    crate::dataplane::unpin_links_under(&root, 2);
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    remove_pins(&root.join("_")); // prune the now-empty parents
    println!("removed {}", root.display());
    Ok(())
}
