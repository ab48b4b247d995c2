//! Ports: attaching the XDP and TC programs, pinning and adopting their links, and the
//! per-port maps (`PORTS`, `PORT_STATS`, `FLOOD_PORTS`, `TC_PORTS`).
//!
//! Which program goes where (docs/architecture.md, "The TC path"): a device that cannot take
//! XDP redirects (`Link::native_xdp() == Some(false)`: tun, WireGuard, VXLAN, bridges, VLAN
//! subinterfaces, ...) gets the TC program alone (`AttachMode::Tc`); every other port gets the
//! XDP program and, behind it, the TC program (tcx ingress), which copies the data the XDP
//! program hands over for groups with members only TC reaches.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{DevMapHash, HashMap, MapData},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        SchedClassifier, TcAttachType, Xdp, XdpMode as KernelXdpMode,
    },
};
use relay_common::{
    AttachMode, PortCounters, PortInfo, PORT_ROLE_ROUTER, TC_PORT_ATTACHED, TC_PORT_L3,
    TC_PORT_ROUTED, TC_TARGET_L3, TC_TARGET_NO_XDP, TC_TARGET_ROUTED,
};

use super::{
    error::{DataplaneError, KernelContext as _},
    port_stats::PortStats,
    sys::{self, error_chain},
};
use crate::{
    options::XdpMode,
    paths::{self, pins},
    ports::Link,
};

/// Removes a link pin so that the link is detached when this returns. The pin is opened
/// first, so the last reference is this process's descriptor, and closing a link's last
/// descriptor detaches it at once; removing the pin alone hands the release to a kernel work
/// item, and the interface keeps its program a moment longer (a detach followed by a check,
/// or by a new attachment, would see it).
pub fn unpin_link(path: &Path) -> std::io::Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(link) => link.unpin().map(drop),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Where the TC links are pinned, next to the XDP links' directory.
pub const TC_LINKS: &str = "tc-links";

/// The TC programs: the whole program for Ethernet ports in TC mode and its twin for L3
/// devices (each carries one classifier), the hand-over copier behind XDP on the others.
pub struct TcPrograms<'a> {
    pub tc_mode: &'a mut SchedClassifier,
    pub tc_l3: &'a mut SchedClassifier,
    pub handover: &'a mut SchedClassifier,
}

impl TcPrograms<'_> {
    /// The whole program for `link` in TC mode.
    fn for_link(&mut self, link: &Link) -> &mut SchedClassifier {
        if link.ether {
            self.tc_mode
        } else {
            self.tc_l3
        }
    }
}

/// A port the program is attached to.
#[derive(Debug)]
pub struct AttachedPort {
    pub link: Link,
    pub mode: AttachMode,
    /// A routed Ethernet port (`--l3`): attached in TC mode, its copies routed.
    pub routed: bool,
    /// Taken over from a previous daemon's pinned link (not attached by this one).
    pub adopted: bool,
    /// The XDP link (none in TC mode).
    port_link: Option<PortLink>,
    /// The TC (tcx ingress) link: the whole program in TC mode, the copier behind XDP
    /// otherwise (none when tcx is not available).
    tc_link: Option<PortLink>,
}

/// Who keeps a port's link alive.
#[derive(Debug)]
enum PortLink {
    /// The loaded XDP program (no pins): dropping the dataplane detaches it.
    Owned(XdpLinkId),
    /// A loaded TC program (no pins): the hand-over program's when `behind_xdp`.
    OwnedTc { id: SchedClassifierLinkId, behind_xdp: bool },
    /// A pin in bpffs: the link survives the daemon; removing the pin detaches it.
    Pinned(PathBuf),
}

/// The attached ports and their maps.
pub struct Ports {
    info: HashMap<MapData, u32, PortInfo>,
    stats: PortStats,
    flood: DevMapHash<MapData>,
    /// `TC_PORTS`: the `TC_PORT_*` bits of the ports in TC mode.
    tc_ports: HashMap<MapData, u32, u32>,
    attached: BTreeMap<u32, AttachedPort>,
    /// Router ports as last set (`PORT_ROLE_ROUTER` in [`PortInfo::role`]).
    routers: BTreeSet<u32>,
    /// Standby ports as last set: ifindex -> `PORT_STANDBY_*` bits of [`PortInfo::role`].
    standby: BTreeMap<u32, u32>,
    pin_dir: Option<PathBuf>,
    /// Pin the XDP links of new attachments (false with `run --no-pin`).
    pub pin_links: bool,
    /// A pinned link was just unpinned to re-attach in another mode.
    released_pin: bool,
}

/// How long an attachment waits for the kernel to release an unpinned link (it does so from a
/// work item, a moment after the pin is removed).
const LINK_RELEASE_WAIT: Duration = Duration::from_secs(2);

impl Ports {
    pub fn new(
        info: HashMap<MapData, u32, PortInfo>,
        stats: PortStats,
        flood: DevMapHash<MapData>,
        tc_ports: HashMap<MapData, u32, u32>,
        pin_dir: Option<&Path>,
    ) -> Self {
        Self {
            info,
            stats,
            flood,
            tc_ports,
            attached: BTreeMap::new(),
            routers: BTreeSet::new(),
            standby: BTreeMap::new(),
            pin_dir: pin_dir.map(Path::to_owned),
            pin_links: true,
            released_pin: false,
        }
    }

    /// Whether `ifindex` is a registered port (entries naming other ifindexes are skipped).
    pub fn is_registered(&self, ifindex: u32) -> bool {
        self.info.get(&ifindex, 0).is_ok()
    }

    /// Ports attached, by ifindex.
    pub fn attached(&self) -> impl Iterator<Item = &AttachedPort> {
        self.attached.values()
    }

    /// A port's counters, summed over the CPUs.
    pub fn counters(&self, ifindex: u32) -> Result<PortCounters, DataplaneError> {
        self.stats.counters(ifindex)
    }

    /// Whether some attached port is in TC mode.
    pub fn any_tc(&self) -> bool {
        self.attached.values().any(|p| p.mode == AttachMode::Tc)
    }

    /// The `TC_TARGET_*` bits of a port as a copy target of the TC program.
    pub fn tc_target_flags(&self, ifindex: u32) -> u32 {
        let Some(port) = self.attached.get(&ifindex) else { return 0 };
        let l3 = match (port.link.ether, port.routed) {
            (false, _) => TC_TARGET_L3,
            (true, true) => TC_TARGET_ROUTED,
            (true, false) => 0,
        };
        let no_xdp = if port.mode == AttachMode::Tc || port.link.native_xdp() == Some(false) {
            TC_TARGET_NO_XDP
        } else {
            0
        };
        l3 | no_xdp
    }

    /// The MAC of an attached port, if it has one.
    pub fn mac(&self, ifindex: u32) -> Option<[u8; 6]> {
        self.attached.get(&ifindex)?.link.mac
    }

    /// Attaches the programs to `link` and registers the port: the TC program alone for a
    /// device that cannot take XDP redirects, else the XDP program in the requested mode with
    /// the TC program behind it. Returns the mode used and, for `auto`, why native mode was not
    /// possible.
    pub fn attach(
        &mut self,
        xdp: &mut Xdp,
        tc: TcPrograms<'_>,
        link: &Link,
        mode: XdpMode,
        routed: bool,
    ) -> Result<(AttachMode, Option<String>), DataplaneError> {
        let mut tc = tc;
        if routed && link.ether {
            if mode == XdpMode::Native {
                return Err(DataplaneError::Attach {
                    iface: link.name.clone(),
                    mode: "native",
                    reason: "a routed port (--l3) is served by the TC program".into(),
                    hint: " (leave --xdp-mode auto for this port)",
                });
            }
            return self.attach_tc_mode(tc.for_link(link), link, true);
        }
        if link.native_xdp() == Some(false) {
            if mode == XdpMode::Native {
                // Asked for native XDP only: say it cannot be had rather than use TC.
                return Err(DataplaneError::Attach {
                    iface: link.name.clone(),
                    mode: "native",
                    reason: format!(
                        "a {} device has no native XDP (it gets TC mode with --xdp-mode auto)",
                        link.kind.as_deref().unwrap_or("non-Ethernet")
                    ),
                    hint: " (try --xdp-mode auto)",
                });
            }
            return self.attach_tc_mode(tc.for_link(link), link, false);
        }
        let used = self.attach_xdp(xdp, link, mode)?;
        // The copier behind XDP: without it, groups with members in TC mode miss the data
        // arriving here (the XDP program hands it over), nothing else changes.
        match self.attach_tc(tc.handover, link, true) {
            Ok(tc_link) => {
                if let Some(port) = self.attached.get_mut(&link.index) {
                    port.tc_link = Some(tc_link);
                }
            }
            Err(e) => tracing::warn!(
                iface = %link.name,
                "cannot attach the TC program behind XDP ({e}): ports in TC mode get no copies \
                 of data arriving here"
            ),
        }
        Ok(used)
    }

    /// Attaches the TC program alone (TC mode) and registers the port.
    fn attach_tc_mode(
        &mut self,
        tc: &mut SchedClassifier,
        link: &Link,
        routed: bool,
    ) -> Result<(AttachMode, Option<String>), DataplaneError> {
        // A previous daemon of an older version may have left an XDP link here.
        if let Some(path) = self.link_pin(link.index).filter(|p| p.exists()) {
            let _ = unpin_link(&path);
        }
        let adopted = self.tc_link_pin(link.index).is_some_and(|p| p.exists());
        let tc_link = self.attach_tc(tc, link, false)?;
        let adopted = adopted && matches!(tc_link, PortLink::Pinned(_));
        self.attached.insert(
            link.index,
            AttachedPort {
                link: link.clone(),
                mode: AttachMode::Tc,
                routed,
                adopted,
                port_link: None,
                tc_link: Some(tc_link),
            },
        );
        let registered = if adopted {
            self.register_adopted(link.index, &link.name, AttachMode::Tc)
        } else {
            self.register(link.index, &link.name, AttachMode::Tc)
        };
        if let Err(e) = registered {
            self.detach_links(link.index, None, Some(tc), None);
            self.forget(link.index);
            return Err(e);
        }
        Ok((AttachMode::Tc, None))
    }

    /// Where the TC link of a port is pinned (`None` without pins).
    fn tc_link_pin(&self, ifindex: u32) -> Option<PathBuf> {
        self.pin_dir.as_ref().map(|d| d.join(TC_LINKS).join(ifindex.to_string()))
    }

    /// Attaches a TC program (`behind_xdp`: the hand-over one) to the tcx ingress of `link`,
    /// or takes over the pinned link a previous daemon left there (program replaced
    /// atomically).
    fn attach_tc(
        &mut self,
        tc: &mut SchedClassifier,
        link: &Link,
        behind_xdp: bool,
    ) -> Result<PortLink, DataplaneError> {
        let pin = self.tc_link_pin(link.index);
        if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
            let adopted = (|| -> Result<(), DataplaneError> {
                let fd_link =
                    FdLink::from(PinnedLink::from_pin(path).kernel("opening the pinned TC link")?);
                let tc_link =
                    SchedClassifierLink::try_from(fd_link).kernel("using the pinned TC link")?;
                let id = tc.attach_to_link(tc_link).kernel("replacing the TC program")?;
                drop(tc.take_link(id).kernel("releasing the TC link")?);
                Ok(())
            })();
            match adopted {
                Ok(()) => {
                    tracing::info!(iface = %link.name, "adopted the pinned TC link (program replaced atomically)");
                    return Ok(PortLink::Pinned(path.clone()));
                }
                Err(e) => {
                    tracing::warn!(iface = %link.name, "cannot adopt {}: {e}; attaching anew", path.display());
                    let _ = unpin_link(path);
                }
            }
        }
        let id = tc
            .attach_with_options(
                &link.name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| DataplaneError::Attach {
                iface: link.name.clone(),
                mode: "tc",
                reason: error_chain(&e),
                hint: " (TC mode needs tcx, Linux 6.6 or later)",
            })?;
        let Some(path) = pin.filter(|_| self.pin_links) else {
            return Ok(PortLink::OwnedTc { id, behind_xdp });
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).kernel(format!("creating {}", dir.display()))?;
            paths::restrict(dir, true).kernel(format!("restricting {}", dir.display()))?;
        }
        let context = format!("pinning the TC link of {}", link.name);
        let tc_link = tc.take_link(id).kernel(context.clone())?;
        let fd_link = FdLink::try_from(tc_link).kernel(context.clone())?;
        fd_link.pin(&path).kernel(context)?;
        Ok(PortLink::Pinned(path))
    }

    /// Attaches the XDP program to `link` in the requested mode and registers the port.
    fn attach_xdp(
        &mut self,
        program: &mut Xdp,
        link: &Link,
        mode: XdpMode,
    ) -> Result<(AttachMode, Option<String>), DataplaneError> {
        if let Some(adopted) = self.adopt_link(program, link, mode) {
            return Ok((adopted, None));
        }
        let pin = self.new_link_pin(link.index)?;
        // A link whose pin was just removed (another mode wanted) is released by a kernel
        // work item shortly after: until then the interface reports EEXIST.
        let wait =
            if std::mem::take(&mut self.released_pin) { LINK_RELEASE_WAIT } else { Duration::ZERO };
        let released_until = Instant::now() + wait;
        let attach = |program: &mut Xdp, m: KernelXdpMode, name: &'static str| loop {
            match program.attach_to_if_index(link.index, m) {
                Ok(id) => return Ok(id),
                Err(e)
                    if sys::has_errno(&e, &[libc::EEXIST, libc::EBUSY])
                        && Instant::now() < released_until =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(DataplaneError::Attach {
                        iface: link.name.clone(),
                        mode: name,
                        reason: error_chain(&e),
                        hint: if name == "native" { " (try --xdp-mode auto or skb)" } else { "" },
                    })
                }
            }
        };
        let (link_id, used, fallback_reason) = match mode {
            XdpMode::Native => {
                (attach(program, KernelXdpMode::Driver, "native")?, AttachMode::Native, None)
            }
            XdpMode::Skb => (attach(program, KernelXdpMode::Skb, "skb")?, AttachMode::Skb, None),
            XdpMode::Auto => match attach(program, KernelXdpMode::Driver, "native") {
                Ok(id) => (id, AttachMode::Native, None),
                Err(native) => {
                    let reason = match native {
                        DataplaneError::Attach { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    let id = attach(program, KernelXdpMode::Skb, "native or skb")?;
                    (id, AttachMode::Skb, Some(reason))
                }
            },
        };
        let port_link = match pin {
            // Pinned links outlive the daemon: forwarding continues across restarts.
            Some(path) => {
                let context = format!("pinning the XDP link of {}", link.name);
                let xdp_link = program.take_link(link_id).kernel(context.clone())?;
                let fd_link = FdLink::try_from(xdp_link).kernel(context.clone())?;
                fd_link.pin(&path).kernel(context)?;
                PortLink::Pinned(path)
            }
            None => PortLink::Owned(link_id),
        };
        self.attached.insert(
            link.index,
            AttachedPort {
                link: link.clone(),
                mode: used,
                routed: false,
                adopted: false,
                port_link: Some(port_link),
                tc_link: None,
            },
        );
        if let Err(e) = self.register(link.index, &link.name, used) {
            self.detach_links(link.index, Some(program), None, None);
            self.forget(link.index);
            return Err(e);
        }
        Ok((used, fallback_reason))
    }

    /// Where the XDP link of a port is pinned (`None` without pins).
    fn link_pin(&self, ifindex: u32) -> Option<PathBuf> {
        self.pin_dir.as_ref().map(|d| d.join(pins::LINKS).join(ifindex.to_string()))
    }

    /// Where a new attachment's link is pinned, if it is.
    fn new_link_pin(&self, ifindex: u32) -> Result<Option<PathBuf>, DataplaneError> {
        let Some(path) = self.link_pin(ifindex).filter(|_| self.pin_links) else {
            return Ok(None);
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).kernel(format!("creating {}", dir.display()))?;
            // The link pins themselves stay 0600 (BPF_OBJ_PIN's mode): no reader needs them.
            paths::restrict(dir, true).kernel(format!("restricting {}", dir.display()))?;
        }
        Ok(Some(path))
    }

    /// Takes over the pinned link a previous daemon left on this port: the program in the
    /// link is replaced atomically (BPF_LINK_UPDATE), so no frame goes unprocessed. A pin that
    /// cannot be used (interface re-created meanwhile) is removed.
    fn adopt_link(
        &mut self,
        program: &mut Xdp,
        link: &Link,
        wanted: XdpMode,
    ) -> Option<AttachMode> {
        let path = self.link_pin(link.index)?;
        if !path.exists() {
            return None;
        }
        let mode = self
            .info
            .get(&link.index, 0)
            .ok()
            .filter(|info| {
                let len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
                info.name[..len] == *link.name.as_bytes()
            })
            .and_then(|info| AttachMode::from_u32(info.attach_mode));
        let mismatch = matches!(
            (wanted, mode),
            (XdpMode::Native, Some(AttachMode::Skb)) | (XdpMode::Skb, Some(AttachMode::Native))
        );
        if mismatch {
            tracing::info!(iface = %link.name, "the pinned link has another XDP mode than asked for: re-attaching");
            let _ = unpin_link(&path);
            self.released_pin = true;
            return None;
        }
        let result = (|| -> Result<AttachMode, DataplaneError> {
            let mode =
                mode.ok_or_else(|| DataplaneError::Missing("a matching PORTS entry".into()))?;
            let fd_link =
                FdLink::from(PinnedLink::from_pin(&path).kernel("opening the pinned link")?);
            let xdp_link = XdpLink::try_from(fd_link).kernel("using the pinned link")?;
            let id = program.attach_to_link(xdp_link).kernel("replacing the program")?;
            // The program took an fd of the link; give it up so that the pin is the only
            // reference and removing it detaches the port.
            drop(program.take_link(id).kernel("releasing the link")?);
            self.attached.insert(
                link.index,
                AttachedPort {
                    link: link.clone(),
                    mode,
                    routed: false,
                    adopted: true,
                    port_link: Some(PortLink::Pinned(path.clone())),
                    tc_link: None,
                },
            );
            self.register_adopted(link.index, &link.name, mode)?;
            Ok(mode)
        })();
        match result {
            Ok(mode) => {
                tracing::info!(iface = %link.name, "adopted the pinned XDP link (program replaced atomically)");
                Some(mode)
            }
            Err(e) => {
                tracing::warn!(iface = %link.name, "cannot adopt {}: {e}; attaching anew", path.display());
                self.attached.remove(&link.index);
                let _ = unpin_link(&path);
                None
            }
        }
    }

    /// Removes link pins of ports that are not attached now (left by a previous daemon for
    /// interfaces that are gone or no longer wanted): that detaches them. Also drops their
    /// entries from PORTS, PORT_STATS and FLOOD_PORTS.
    pub fn prune_stale(&mut self) {
        let dirs = self.pin_dir.as_ref().map(|d| [d.join(pins::LINKS), d.join(TC_LINKS)]);
        for dir in dirs.into_iter().flatten() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let stale = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_none_or(|i| !self.attached.contains_key(&i));
                    if stale {
                        tracing::info!("removing stale link pin {}", entry.path().display());
                        let _ = unpin_link(&entry.path());
                    }
                }
            }
        }
        let stale: Vec<u32> = self
            .info
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !self.attached.contains_key(i))
            .collect();
        for ifindex in stale {
            self.forget(ifindex);
        }
    }

    /// Like [`Self::register`], but keeps the counters an adopted port already has.
    fn register_adopted(
        &mut self,
        ifindex: u32,
        ifname: &str,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        if self.stats.has(ifindex) {
            self.flood.insert(ifindex, ifindex, None, 0).kernel("writing FLOOD_PORTS")?;
            return Ok(());
        }
        self.register(ifindex, ifname, mode)
    }

    /// Enters a port in PORTS, PORT_STATS and FLOOD_PORTS.
    pub fn register(
        &mut self,
        ifindex: u32,
        ifname: &str,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        let mut name = [0u8; 16];
        let n = ifname.len().min(15);
        name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        self.info
            .insert(
                ifindex,
                PortInfo { attach_mode: mode as u32, role: self.role(ifindex), name },
                0,
            )
            .kernel("writing PORTS")?;
        self.stats.register(ifindex)?;
        self.flood.insert(ifindex, ifindex, None, 0).kernel("writing FLOOD_PORTS")?;
        if mode == AttachMode::Tc {
            let port = self.attached.get(&ifindex);
            let l3 = port.is_some_and(|p| !p.link.ether);
            let routed = port.is_some_and(|p| p.routed);
            let bits = TC_PORT_ATTACHED
                | if l3 { TC_PORT_L3 } else { 0 }
                | if routed { TC_PORT_ROUTED } else { 0 };
            self.tc_ports.insert(ifindex, bits, 0).kernel("writing TC_PORTS")?;
        }
        Ok(())
    }

    /// Detaches the programs from a port and forgets the port in the maps (best effort).
    pub fn detach(&mut self, xdp: &mut Xdp, tc: TcPrograms<'_>, ifindex: u32) {
        let ether = self.attached.get(&ifindex).is_none_or(|p| p.link.ether);
        let whole = if ether { tc.tc_mode } else { tc.tc_l3 };
        self.detach_links(ifindex, Some(xdp), Some(whole), Some(tc.handover));
        self.forget(ifindex);
    }

    /// Releases the links of a port: owned links through their program, pinned ones by
    /// removing the pin (the last reference).
    fn detach_links(
        &mut self,
        ifindex: u32,
        mut xdp: Option<&mut Xdp>,
        mut tc: Option<&mut SchedClassifier>,
        mut handover: Option<&mut SchedClassifier>,
    ) {
        let Some(port) = self.attached.remove(&ifindex) else { return };
        let name = &port.link.name;
        for link in [port.port_link, port.tc_link].into_iter().flatten() {
            let result = match link {
                PortLink::Owned(id) => match xdp.as_deref_mut() {
                    Some(program) => program.detach(id).map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                PortLink::OwnedTc { id, behind_xdp } => {
                    let program =
                        if behind_xdp { handover.as_deref_mut() } else { tc.as_deref_mut() };
                    match program {
                        Some(program) => program.detach(id).map_err(|e| e.to_string()),
                        None => Ok(()),
                    }
                }
                PortLink::Pinned(path) => {
                    unpin_link(&path).map_err(|e| format!("unpinning {}: {e}", path.display()))
                }
            };
            if let Err(e) = result {
                tracing::warn!(iface = %name, "detaching: {e}");
            }
        }
    }

    /// Records the standby reason bits of every attached port in `PORTS` (for the CLI).
    pub fn set_standby(&mut self, standby: &BTreeMap<u32, u32>) -> Result<(), DataplaneError> {
        self.standby.clone_from(standby);
        self.write_roles()
    }

    /// Records which attached ports are router ports in `PORTS` (for the CLI).
    pub fn set_routers(&mut self, ifindexes: &[u32]) -> Result<(), DataplaneError> {
        self.routers = ifindexes.iter().copied().collect();
        self.write_roles()
    }

    /// [`PortInfo::role`] of a port: `PORT_ROLE_ROUTER`, the `PORT_STANDBY_*` bits and
    /// `PORT_NO_XDP_XMIT`.
    fn role(&self, ifindex: u32) -> u32 {
        let router = if self.routers.contains(&ifindex) { PORT_ROLE_ROUTER } else { 0 };
        let no_xmit =
            self.attached.get(&ifindex).is_some_and(|p| p.link.native_xdp() == Some(false));
        router
            | self.standby.get(&ifindex).copied().unwrap_or(0)
            | if no_xmit { relay_common::PORT_NO_XDP_XMIT } else { 0 }
    }

    /// Brings the role of every attached port in `PORTS` up to date.
    fn write_roles(&mut self) -> Result<(), DataplaneError> {
        for &ifindex in self.attached.keys() {
            let Ok(mut info) = self.info.get(&ifindex, 0) else { continue };
            let role = self.role(ifindex);
            if role != info.role {
                info.role = role;
                self.info.insert(ifindex, info, 0).kernel("writing PORTS")?;
            }
        }
        Ok(())
    }

    fn forget(&mut self, ifindex: u32) {
        let _ = self.tc_ports.remove(&ifindex);
        let _ = self.info.remove(&ifindex);
        self.stats.forget(ifindex);
        let _ = self.flood.remove(ifindex);
    }
}
