//! Start-up (with rollback), ports coming and going, and the stop.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::anyhow;
use relay_common::GroupKey;
use rtnetlink::Handle;
use sd_notify::NotifyState;

use super::{Daemon, Plan};
use crate::{
    capture::ControlSocket,
    control::{Control, PortSpec},
    dataplane::{remove_pins, Dataplane, CLIENT_KEY_BIT},
    error::UsageError,
    groups::key_group,
    loop_guard::LoopGuard,
    membership::Engine,
    paths,
    ports::{self, Link},
    reconciler::{GroupTable, GroupWriter as _, Installed},
    settings::SettingsSource,
    state,
};

impl Daemon {
    /// Loads (or adopts) the dataplane, opens the packet socket, attaches to the ports that
    /// exist now and writes the maps. A failure undoes what this run did.
    pub(super) async fn start(
        handle: Handle,
        plan: Plan,
        source: SettingsSource,
    ) -> anyhow::Result<Self> {
        let pin_root = crate::bpffs::ensure(&plan.settings.pin_root)?;
        let pin_dir = paths::pin_dir(&pin_root)?;
        remove_other_layouts(&pin_dir);
        // The caller holds the instance lock: pins in `pin_dir` belong to a daemon that exited
        // or died; Dataplane::load reuses its maps and `attach` adopts its links.
        let existed = pin_dir.exists();
        let loaded = Dataplane::load(Some(&pin_dir), plan.settings.unknown.into())
            .map_err(anyhow::Error::from)
            .and_then(|dp| Ok((dp, open_socket()?)));
        let (mut dp, socket) = match loaded {
            Ok(parts) => parts,
            Err(e) => {
                if !existed {
                    remove_pins(&pin_dir);
                }
                return Err(e);
            }
        };
        dp.set_pin_links(plan.settings.pin);
        if dp.adopted() {
            tracing::info!(
                "taking over from the previous daemon (pinned maps and links in {})",
                pin_dir.display()
            );
        }
        let mut table = GroupTable::new(BTreeMap::new());
        table.set_policy(plan.settings.policy.clone());
        let guard = LoopGuard::new(dp.relay_mac(), plan.settings.hello_holdtime);
        tracing::info!(relay_mac = %state::mac_string(&dp.relay_mac()), "loop guard: relayed frames carry this source MAC");
        let engine = Engine::new(plan.settings.membership.clone());
        let mut control = Control::new(engine, table, socket, guard);
        let s = &plan.settings;
        control.set_limits(s.limits, s.max_clients_per_port, s.report_rate_per_port);
        let mut daemon = Self {
            handle,
            dp,
            control,
            plan,
            source,
            pin_root,
            pin_dir,
            allmulti_set: Vec::new(),
            start: tokio::time::Instant::now(),
        };
        match daemon.start_ports().await {
            Ok(()) => Ok(daemon),
            Err(e) => {
                daemon.roll_back(&e).await;
                Err(e)
            }
        }
    }

    /// The group policy and the per-group rate limits, into the dataplane.
    pub(super) fn apply_policing(&mut self) -> anyhow::Result<()> {
        let s = &self.plan.settings;
        self.dp.set_policy(&s.policy.allow, &s.policy.deny)?;
        let rates: Vec<_> = s.group_rates.iter().map(|r| (r.prefix, r.pps)).collect();
        self.dp.set_group_rate_limits(&rates)?;
        Ok(())
    }

    /// Attaches to the ports that exist now and brings the maps up to date.
    async fn start_ports(&mut self) -> anyhow::Result<()> {
        self.apply_policing()?;
        for port in self.plan.ports.clone() {
            self.add_port(&port).await?;
        }
        self.dp.prune_stale_ports();
        if self.dp.adopted() {
            // Router ports are relearned (configured ones come back with the ports); the
            // previous daemon's may name interfaces that are gone.
            self.dp.set_router_ports(&[])?;
            let mut installed = adopted_sets(&self.dp);
            tracing::info!(
                groups = installed.len(),
                "adopted the previous daemon's group port sets"
            );
            // Peers of per-client L3 ports come back as members (until they are queried
            // and answer, or time out), their ports in the adopted sets.
            let now = self.start.elapsed();
            for (key, port, peer) in self.dp.adopted_peers() {
                let group = key_group(&key);
                if self.control.restore_peer(now, group, port, peer) && key.source == [0; 16] {
                    installed.entry(group).or_default().any_source.insert(port);
                }
            }
            self.control.adopt(installed);
        }
        self.control.set_statics(&mut self.dp, &self.plan.statics);
        for (group, names) in &self.plan.statics {
            tracing::info!(group = %group, ports = ?names, "static group");
        }
        // A map that is full (a take-over of a crowded dataplane) degrades the groups that do
        // not fit, counted and retried; it must not fail the start and make systemd restart
        // the daemon into the same wall.
        if let Err(e) = self.control.process_actions(&mut self.dp) {
            self.control.count_map_error();
            tracing::error!("writing the maps at start-up (retried on the next change): {e:#}");
        }
        Ok(())
    }

    /// Undoes a failed start-up.
    async fn roll_back(&mut self, e: &anyhow::Error) {
        if self.dp.adopted() {
            // Taking over failed: undo only what this run attached; the previous daemon's
            // pinned links and maps keep forwarding as before.
            tracing::error!("take-over failed, leaving the pinned dataplane as it was: {e:#}");
            let own: Vec<u32> =
                self.dp.ports().filter(|p| !p.adopted).map(|p| p.link.index).collect();
            for ifindex in own {
                self.dp.detach(ifindex);
            }
            return;
        }
        tracing::error!("setup failed, rolling back: {e:#}");
        self.detach_all().await;
    }

    /// Prepares a port (allmulticast), attaches the program and registers the port with the
    /// control plane.
    pub(super) async fn add_port(&mut self, port: &Link) -> anyhow::Result<()> {
        if !port.multicast {
            tracing::warn!(
                iface = %port.name,
                "interface has no MULTICAST flag; the local stack will not join groups on it \
                 (ip link set {} multicast on)",
                port.name
            );
        }
        if !port.allmulti {
            ports::set_allmulti(&self.handle, port.index, true).await?;
            self.allmulti_set.push(port.index);
        }
        let settings = &self.plan.settings;
        let routed = settings.is_routed(&port.name);
        let (mode, fallback) = self.dp.attach(port, settings.xdp_mode_for(&port.name), routed)?;
        if routed && port.ether {
            tracing::info!(iface = %port.name, "routed port (--l3): TC program, TTL decremented");
        }
        let rate = self.plan.settings.port_rate(&port.name);
        self.dp.set_port_rate(port.index, rate)?;
        if let Some(pps) = rate {
            tracing::info!(iface = %port.name, pps, "storm control: data from this port limited");
        }
        match fallback {
            Some(reason) => tracing::warn!(
                iface = %port.name,
                "attached in generic (skb) mode because native XDP failed: {reason}"
            ),
            None if mode == relay_common::AttachMode::Tc => tracing::info!(
                iface = %port.name,
                ifindex = port.index,
                kind = port.kind.as_deref().unwrap_or("?"),
                l3 = !port.ether,
                "attached in TC mode: the device cannot transmit XDP redirects (no \
                 ndo_xdp_xmit), so the TC program copies to it{}",
                if port.ether { "" } else { "; routed port: TTL decremented on the way through" }
            ),
            None => {
                tracing::info!(iface = %port.name, ifindex = port.index, mode = mode.as_str(), "attached")
            }
        }
        if port.is_veth() {
            tracing::info!(
                iface = %port.name,
                "veth port: its peer needs GRO on (ethtool -K PEER gro on) or an XDP program to \
                 accept redirected frames, and local senders behind it must send with full \
                 checksums (ethtool -K IF tx off) - see docs/architecture.md"
            );
        }
        let opts = self.port_options(&port.name, port.index).await?;
        let spec = PortSpec {
            ifindex: port.index,
            name: port.name.clone(),
            mac: port.mac,
            per_client: self.plan.settings.is_per_client(&port.name),
            upstream: self.plan.settings.is_upstream(&port.name),
            l3: !port.ether,
        };
        self.control.add_port(self.start.elapsed(), spec, opts);
        Ok(())
    }

    /// The membership options of a port, with its current addresses (query source, election).
    pub(super) async fn port_options(
        &self,
        name: &str,
        ifindex: u32,
    ) -> anyhow::Result<crate::membership::PortOptions> {
        let addrs = ports::addresses(&self.handle).await?;
        let mut opts = self.plan.settings.port_options(name);
        let a = addrs.get(&ifindex).copied().unwrap_or_default();
        opts.ipv4 = a.v4;
        opts.ipv6 = a.v6_link_local;
        Ok(opts)
    }

    /// Forgets a port (also one that was only half added): the control plane's state
    /// (remembered by name for a membership interval), the XDP attachment, and allmulticast
    /// when mcrelay turned it on and the interface still exists (`restore_allmulti`).
    /// Returns the port's name when the control plane knew it.
    pub(super) async fn remove_port(
        &mut self,
        ifindex: u32,
        restore_allmulti: bool,
    ) -> Option<String> {
        let name = self.control.remove_port(self.start.elapsed(), ifindex);
        self.dp.detach(ifindex);
        if self.allmulti_set.contains(&ifindex) {
            if restore_allmulti {
                if let Err(e) = ports::set_allmulti(&self.handle, ifindex, false).await {
                    tracing::warn!(ifindex, "restoring allmulticast: {e:#}");
                }
            }
            self.allmulti_set.retain(|i| *i != ifindex);
        }
        if name.is_some() {
            self.control.set_statics(&mut self.dp, &self.plan.statics);
        }
        name
    }

    /// Tells systemd (and the log) that the daemon is ready.
    pub(super) fn announce_ready(&self) {
        let summary: Vec<String> =
            self.dp.ports().map(|p| format!("{}({})", p.link.name, p.mode.as_str())).collect();
        tracing::info!(
            "mcrelay ready: {} port(s) [{}], {} static group(s), pins in {}",
            summary.len(),
            summary.join(", "),
            self.plan.statics.len(),
            self.pin_dir.display()
        );
        let status = format!("relaying on {} port(s): {}", summary.len(), summary.join(", "));
        if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
            tracing::warn!("telling systemd we are ready: {e}");
        }
    }

    /// Serves Prometheus metrics when the configuration asks for it.
    pub(super) fn spawn_metrics(&self) -> Option<tokio::task::JoinHandle<()>> {
        let listen = self.plan.settings.metrics_listen?;
        tracing::info!(%listen, "serving Prometheus metrics on /metrics");
        let root = self.pin_root.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listen, root).await {
                tracing::error!("metrics endpoint on {listen}: {e:#}");
            }
        }))
    }

    /// Stops: with `--no-pin` everything is detached; otherwise the pinned dataplane keeps
    /// forwarding for the next daemon.
    pub(super) async fn stop(mut self) {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
        if let Ok(path) = paths::state_file() {
            let _ = std::fs::remove_file(path);
        }
        if self.plan.settings.pin {
            tracing::info!(
                "exiting; XDP links and maps stay pinned in {}, so forwarding continues and the \
                 next mcrelay takes over (`mcrelay detach` removes them)",
                self.pin_dir.display()
            );
        } else {
            tracing::info!("shutting down: detaching from every port (--no-pin)");
            self.detach_all().await;
        }
    }

    /// Detaches everything, restores allmulticast, removes the pins.
    async fn detach_all(&mut self) {
        let indexes: Vec<u32> = self.dp.ports().map(|p| p.link.index).collect();
        for ifindex in indexes {
            self.dp.detach(ifindex);
        }
        self.dp.unpin();
        for ifindex in std::mem::take(&mut self.allmulti_set) {
            if let Err(e) = ports::set_allmulti(&self.handle, ifindex, false).await {
                tracing::warn!("restoring allmulticast on ifindex {ifindex}: {e:#}");
            }
        }
    }
}

/// Opens the IGMP/MLD packet socket; without CAP_NET_RAW that is a usage error.
fn open_socket() -> anyhow::Result<ControlSocket> {
    ControlSocket::open().map_err(|e| {
        if crate::error::is_permission_denied(&e) {
            anyhow!(UsageError::new(format!("{e:#}: mcrelay run needs CAP_NET_RAW")))
        } else {
            e.context("opening the IGMP/MLD packet socket")
        }
    })
}

/// Removes the pins of other map-layout versions in this namespace (an upgrade that changed
/// the layout): unpinning their links detaches them. A clean re-create, never a reuse of a
/// map whose layout differs.
fn remove_other_layouts(pin_dir: &Path) {
    let (Some(root), Some(current)) = (pin_dir.parent(), pin_dir.file_name()) else { return };
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name != current && name.to_string_lossy().starts_with('v') {
            tracing::warn!(
                "removing pins of another map layout ({}): re-creating from scratch",
                entry.path().display()
            );
            crate::dataplane::unpin_links_under(&entry.path(), 1);
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The port sets found in adopted maps, by group.
fn adopted_sets(dp: &Dataplane) -> BTreeMap<IpAddr, Installed> {
    let mut out: BTreeMap<IpAddr, Installed> = BTreeMap::new();
    for (key, ports) in dp.group_port_sets() {
        // Per-client entries name the previous daemon's client ids, which mean nothing now:
        // those clients get their entries back when they report again.
        let ports: Vec<u32> = ports.into_iter().filter(|k| k & CLIENT_KEY_BIT == 0).collect();
        let group = key_group(&key);
        let entry = out.entry(group).or_default();
        if key.source == [0; 16] {
            entry.any_source.extend(ports);
        } else {
            let source = key_group(&GroupKey { group: key.source, source: [0; 16] });
            entry.per_source.entry(source).or_default().extend(ports);
        }
    }
    out
}
