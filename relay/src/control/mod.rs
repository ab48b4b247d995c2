//! The control plane: IGMP/MLD frames in, the membership engine, group maps out (through the
//! reconciler, [`crate::reconciler::GroupTable`]), and the loop guard's hellos.
//!
//! [`Control`] owns everything learned at run time; the daemon drives it through methods (a
//! port appeared or vanished, a frame arrived, a timer fired) and never reaches into its state.

mod proxy;
mod snapshot;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

pub use crate::state::ControlCounters;
use crate::{
    capture::{ControlSocket, Received},
    config::GroupPolicy,
    dataplane::{Dataplane, DataplaneError},
    groups::is_link_local_group,
    loop_guard::{self, Decision, LoopGuard},
    membership::{
        packet, Action, ClientId, Clients, Engine, Family, Limits, Message, MessageKind,
        ParseError, PortOptions, Refusal, Remembered, RouterSignal,
    },
    reconciler::{GroupTable, Installed, WriteFailures},
    state::{mac_string, DaemonState},
};

/// A port as the control plane knows it.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub ifindex: u32,
    pub name: String,
    /// Source MAC of queries and hellos sent on the port.
    pub mac: Option<[u8; 6]>,
    /// Per-client delivery (a shared TAP of an OpenVPN server).
    pub per_client: bool,
    /// Upstream of an RFC 4605 proxy: mcrelay is a host there.
    pub upstream: bool,
    /// An L3 device (tun, WireGuard): IP packets without a link-layer header.
    pub l3: bool,
}

/// Everything the control loop works on.
pub struct Control {
    engine: Engine,
    table: GroupTable,
    socket: ControlSocket,
    /// MAC of every port (query source).
    macs: BTreeMap<u32, [u8; 6]>,
    /// L3 ports (no link-layer header): received packets are parsed as IP, sent ones are IP.
    l3_ports: BTreeSet<u32>,
    names: BTreeMap<u32, String>,
    counters: ControlCounters,
    dirty: bool,
    /// Per-client memberships on per-client ports.
    clients: Clients,
    /// Memberships of vanished ports, by interface name (see [`Remembered`]).
    remembered: BTreeMap<String, Remembered>,
    /// The most recent memberships not taken (for `mcrelay groups`), newest last.
    not_taken: std::collections::VecDeque<crate::state::NotTaken>,
    /// When each kind of refusal was last logged, and how many were not logged since.
    refusals_logged: BTreeMap<Refusal, (Duration, u64)>,
    /// Control frames per second and port that are handled (the rest is ignored).
    report_rate: u32,
    /// Per port: frames that may still come now, and when that was computed.
    report_tokens: BTreeMap<u32, (f64, Duration)>,
    /// Ports whose running over the rate was logged.
    rate_limit_logged: BTreeSet<u32>,
    /// RFC 4605 upstream ports, and per (port, IPv6?) whether the querier there speaks an
    /// older version (IGMPv1/v2, MLDv1): reports go in that version.
    upstream: BTreeMap<u32, BTreeSet<bool>>,
    /// Reports due upstream later: answers to queries (within their maximum response time)
    /// and the repeats of state changes.
    proxy_due: Vec<proxy::Due>,
    /// Ports whose missing link-local address was logged.
    unaddressed_logged: BTreeSet<u32>,
    /// Ignored router signals already logged, per port and kind.
    router_signals_logged: BTreeSet<(u32, RouterSignal)>,
    /// The querier last logged per (port, IPv6?), to log changes once.
    queriers_seen: BTreeMap<(u32, bool), (IpAddr, bool)>,
    /// Hellos between relays and the standby / loop-MAC decisions they lead to.
    loop_guard: LoopGuard,
    /// When the control plane was made (a clock for rate-limited logs).
    started: std::time::Instant,
    /// The loop guard's decision now in force.
    decision: Decision,
}

impl Control {
    /// A control plane over `socket`, with no port yet.
    pub fn new(
        engine: Engine,
        table: GroupTable,
        socket: ControlSocket,
        loop_guard: LoopGuard,
    ) -> Self {
        Self {
            loop_guard,
            started: std::time::Instant::now(),
            decision: Decision::default(),
            engine,
            table,
            socket,
            macs: BTreeMap::new(),
            l3_ports: BTreeSet::new(),
            names: BTreeMap::new(),
            counters: ControlCounters::default(),
            dirty: true,
            clients: Clients::default(),
            remembered: BTreeMap::new(),
            queriers_seen: BTreeMap::new(),
            router_signals_logged: BTreeSet::new(),
            unaddressed_logged: BTreeSet::new(),
            not_taken: std::collections::VecDeque::new(),
            upstream: BTreeMap::new(),
            proxy_due: Vec::new(),
            report_rate: crate::options::defaults::REPORT_RATE_PER_PORT,
            report_tokens: BTreeMap::new(),
            rate_limit_logged: BTreeSet::new(),
            refusals_logged: BTreeMap::new(),
        }
    }

    /// Registers a port with membership options `opts`. A port re-created under the name of
    /// one that vanished within a membership interval gets its memberships back.
    pub fn add_port(&mut self, now: Duration, port: PortSpec, opts: PortOptions) {
        if let Some(mac) = port.mac {
            self.macs.insert(port.ifindex, mac);
        }
        if port.upstream {
            tracing::info!(iface = %port.name, "upstream (RFC 4605 proxy): reporting the downstream memberships here");
            self.upstream.insert(port.ifindex, BTreeSet::new());
        }
        if port.l3 {
            self.l3_ports.insert(port.ifindex);
        } else {
            self.l3_ports.remove(&port.ifindex);
        }
        if port.per_client {
            tracing::info!(iface = %port.name, "per-client delivery: one copy per joined client, to its unicast MAC");
            self.clients.add_port(port.ifindex);
        }
        self.engine.add_port(now, port.ifindex, opts);
        if let Some(r) = self.remembered.remove(&port.name) {
            if r.is_current(now) {
                tracing::info!(
                    iface = %port.name,
                    groups = r.groups(),
                    "re-created interface: restoring its memberships until members report again"
                );
                r.restore(&mut self.engine, &mut self.clients, port.ifindex, now);
            }
        }
        self.names.insert(port.ifindex, port.name);
        self.refresh_capture();
        self.dirty = true;
    }

    /// Lets only the ports' control frames reach the socket.
    fn refresh_capture(&self) {
        let ports: Vec<u32> = self.names.keys().copied().collect();
        if let Err(e) = self.socket.set_ports(&ports) {
            tracing::warn!("narrowing the control socket to the ports: {e}");
        }
    }

    /// New membership options for a port that stays (also: its addresses changed).
    pub fn set_port_options(&mut self, now: Duration, ifindex: u32, opts: PortOptions) {
        if opts.ipv6.is_some() {
            self.unaddressed_logged.remove(&ifindex);
        }
        self.engine.add_port(now, ifindex, opts);
        self.dirty = true;
    }

    /// Forgets a port and what was learned on it (remembered by name for one membership
    /// interval). Returns its name, or `None` for a port that was not registered.
    pub fn remove_port(&mut self, now: Duration, ifindex: u32) -> Option<String> {
        let name = self.names.remove(&ifindex)?;
        let remembered = Remembered::of_port(&self.engine, &self.clients, ifindex, now);
        if !remembered.is_empty() {
            self.remembered.insert(name.clone(), remembered);
        }
        self.table.forget_port(ifindex);
        self.engine.remove_port(ifindex);
        self.macs.remove(&ifindex);
        self.l3_ports.remove(&ifindex);
        self.clients.remove_port(ifindex);
        self.loop_guard.forget_port(ifindex);
        self.router_signals_logged.retain(|(port, _)| *port != ifindex);
        self.report_tokens.remove(&ifindex);
        self.refresh_capture();
        self.upstream.remove(&ifindex);
        self.rate_limit_logged.remove(&ifindex);
        self.dirty = true;
        Some(name)
    }

    /// The registered ports: ifindex and name.
    pub fn ports(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(i, n)| (*i, n.as_str()))
    }

    /// Whether `ifindex` is a registered port.
    pub fn has_port(&self, ifindex: u32) -> bool {
        self.names.contains_key(&ifindex)
    }

    /// Static groups by port name; names that are not ports (yet) are skipped. Failed writes
    /// are counted and retried on the next round.
    pub fn set_statics(
        &mut self,
        dp: &mut Dataplane,
        statics: &BTreeMap<IpAddr, BTreeSet<String>>,
    ) {
        let by_name: BTreeMap<&String, u32> = self.names.iter().map(|(i, n)| (n, *i)).collect();
        let statics = statics
            .iter()
            .map(|(g, names)| (*g, names.iter().filter_map(|n| by_name.get(n).copied()).collect()))
            .collect();
        let engine = &self.engine;
        if let Err(e) = self.table.set_statics(dp, |g| engine.forwarding(g), statics) {
            self.count_write_failures(&e);
        }
    }

    /// A new `[policy]`: every learned group is written again under it.
    pub fn set_policy(&mut self, dp: &mut Dataplane, policy: GroupPolicy) {
        self.table.set_policy(policy);
        self.reapply(dp);
    }

    /// Writes every learned group again (after a change of policy or of excluded ports).
    fn reapply(&mut self, dp: &mut Dataplane) {
        let engine = &self.engine;
        let learned: Vec<IpAddr> = engine.groups(Duration::ZERO).map(|g| g.group).collect();
        if let Err(e) = self.table.reapply(dp, |g| engine.forwarding(g), learned) {
            self.count_write_failures(&e);
        }
        self.dirty = true;
    }

    /// A peer a previous daemon delivered `group` to on the per-client L3 port `port`: a
    /// member again for one membership interval (refreshed when it answers a query). Returns
    /// whether it was taken (the port is a per-client L3 port of this daemon).
    pub fn restore_peer(&mut self, now: Duration, group: IpAddr, port: u32, peer: IpAddr) -> bool {
        if !self.l3_ports.contains(&port) || !self.clients.is_per_client(port) {
            return false;
        }
        let expiry = now + self.engine.config().gmi();
        self.clients.join(group, port, ClientId::Peer(peer), expiry);
        true
    }

    /// Takes over the port sets a previous daemon left in the pinned maps.
    pub fn adopt(&mut self, installed: BTreeMap<IpAddr, Installed>) {
        self.table.adopt(installed);
    }

    /// Whether adopted port sets are still waiting to be renewed.
    pub fn adopting(&self) -> bool {
        self.table.adopting()
    }

    /// One membership interval after a take-over: adopted port sets nobody renewed go.
    pub fn end_adoption(&mut self, dp: &mut Dataplane) {
        let engine = &self.engine;
        if let Err(e) = self.table.end_adoption(dp, |g| engine.forwarding(g)) {
            self.count_write_failures(&e);
        }
        self.dirty = true;
    }

    /// When the membership engine next needs [`Control::tick`].
    pub fn next_deadline(&self) -> Option<Duration> {
        self.engine.next_deadline()
    }

    /// Runs the membership timers.
    pub fn tick(&mut self, now: Duration) {
        self.engine.tick(now);
        self.dirty = true;
    }

    /// The group membership interval.
    pub fn membership_interval(&self) -> Duration {
        self.engine.config().gmi()
    }

    /// The next frame from the packet socket.
    pub async fn recv(&self) -> std::io::Result<Received> {
        self.socket.recv().await
    }

    /// A frame already queued on the packet socket, without waiting.
    pub fn try_recv(&self) -> std::io::Result<Option<Received>> {
        self.socket.try_recv()
    }

    /// Whether the state changed since the last call (the state file is due).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Marks the state as changed.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Control-plane counters.
    pub fn counters(&self) -> &ControlCounters {
        &self.counters
    }

    /// Records how long a report took to reach the maps: `visible` until the update was
    /// published, `done` until the syscalls returned (microseconds).
    pub fn record_update_latency(&mut self, visible: u64, done: u64) {
        let c = &mut self.counters;
        c.last_update_us = visible;
        c.max_update_us = c.max_update_us.max(visible);
        c.last_update_done_us = done;
    }

    /// Collects the control socket's drop count (call now and then).
    pub fn poll_capture_drops(&mut self) {
        let drops = self.socket.take_drops();
        if drops > 0 {
            self.counters.capture_drops += drops;
            tracing::warn!(
                drops,
                "control frames dropped: the receive queue was full (a host flooding reports?)"
            );
            self.dirty = true;
        }
    }

    /// One line for systemd's status.
    pub fn status_line(&self) -> String {
        format!(
            "{} port(s), {} group(s), {} queries sent",
            self.names.len(),
            self.table.installed().len(),
            self.counters.queries_sent
        )
    }

    /// Handles one received frame.
    pub fn on_frame(&mut self, now: Duration, ifindex: u32, frame: &[u8]) {
        if !self.names.contains_key(&ifindex) {
            self.counters.ignored_other_port += 1;
            return;
        }
        if self.l3_ports.contains(&ifindex) {
            self.on_l3_packet(now, ifindex, frame);
            return;
        }
        if loop_guard::is_hello(frame) {
            if let Some(hello) = loop_guard::parse_hello(frame) {
                self.counters.hellos_received += 1;
                self.loop_guard.on_hello(now, ifindex, &hello);
            }
            return;
        }
        self.counters.received += 1;
        let Some(source) = frame.get(6..12).and_then(|s| <[u8; 6]>::try_from(s).ok()) else {
            self.count_malformed(ParseError::Truncated);
            return;
        };
        if self.loop_guard.is_loop_mac(&source) || self.macs.values().any(|m| *m == source) {
            // Our own query or relayed report coming back, or one a redundant relay
            // relayed: acting on it would feed a loop.
            self.counters.ignored_loop += 1;
            return;
        }
        if !self.report_budget(now, ifindex) {
            self.counters.rate_limited += 1;
            return;
        }
        match packet::parse(frame) {
            Ok(msg) if self.upstream.contains_key(&ifindex) => {
                // Upstream, mcrelay is a host: it answers queries and learns no memberships.
                // Its queries are not relayed: downstream, mcrelay is the querier.
                if let MessageKind::Query(q) = &msg.kind {
                    self.on_upstream_query(ifindex, msg.source, q);
                }
            }
            Ok(msg) => {
                tracing::trace!(port = ifindex, ?msg, "control message");
                let expiry = now + self.engine.config().gmi();
                self.clients.on_message(ifindex, ClientId::Mac(source), &msg, expiry);
                self.engine.handle(now, ifindex, &msg);
                self.relay_control(ifindex, frame, &msg);
                self.dirty = true;
            }
            Err(e) => self.count_malformed(e),
        }
    }

    /// Handles an IP packet received on an L3 port: no MAC, so no loop-guard check; a peer
    /// of a per-client port is known by its address (the report's source). Relayed like a
    /// frame, in an Ethernet header of this relay.
    fn on_l3_packet(&mut self, now: Duration, ifindex: u32, packet: &[u8]) {
        self.counters.received += 1;
        if !self.report_budget(now, ifindex) {
            self.counters.rate_limited += 1;
            return;
        }
        match packet::parse_ip(packet) {
            Ok(msg) => {
                tracing::trace!(port = ifindex, ?msg, "control message (L3 port)");
                if !msg.source.is_unspecified() {
                    let expiry = now + self.engine.config().gmi();
                    self.clients.on_message(ifindex, ClientId::Peer(msg.source), &msg, expiry);
                }
                self.engine.handle(now, ifindex, &msg);
                if let Some(frame) = crate::capture::ethernet_frame(packet) {
                    self.relay_control(ifindex, &frame, &msg);
                }
                self.dirty = true;
            }
            Err(e) => self.count_malformed(e),
        }
    }

    /// Sends a frame built for Ethernet out of `port`: as is, or as the IP packet it carries
    /// on an L3 port.
    fn send_frame(&self, port: u32, frame: &[u8]) -> std::io::Result<()> {
        if self.l3_ports.contains(&port) {
            self.socket.send_ip(port, frame.get(14..).unwrap_or_default())
        } else {
            self.socket.send(port, frame)
        }
    }

    /// One log line whenever the querier of a port changes (election won or lost).
    fn log_querier_changes(&mut self) {
        let ports: Vec<u32> = self.names.keys().copied().collect();
        for port in ports {
            for (family, v6) in [(Family::V4, false), (Family::V6, true)] {
                let Some(q) = self.engine.querier(port, family) else { continue };
                let now = (q.address, q.is_self);
                if self.queriers_seen.insert((port, v6), now) != Some(now) {
                    let who = if q.is_self { "mcrelay itself" } else { "another router" };
                    tracing::info!(
                        port = self.name(port),
                        family = if v6 { "ipv6" } else { "ipv4" },
                        querier = %q.address,
                        "querier: {who}"
                    );
                }
            }
        }
    }

    /// Says why a port became a router port, and counts router signals a port that does not
    /// learn routers ignored (logged once per port and signal kind).
    fn log_router_events(&mut self) {
        for e in self.engine.take_router_events() {
            if e.learned {
                tracing::info!(
                    port = self.name(e.port),
                    from = %e.from,
                    "router port: heard {} (learn_routers = false / --no-learn-routers turns this off)",
                    e.signal.as_str()
                );
            } else {
                self.counters.router_signals_ignored += 1;
                if self.router_signals_logged.insert((e.port, e.signal)) {
                    tracing::warn!(
                        port = self.name(e.port),
                        from = %e.from,
                        "ignoring {} for the router role: the port does not learn routers",
                        e.signal.as_str()
                    );
                }
            }
        }
    }

    /// New limits for learned state (existing state stays) and the per-port rate of control
    /// frames.
    pub fn set_limits(&mut self, limits: Limits, max_clients_per_port: usize, report_rate: u32) {
        self.engine.set_limits(limits);
        self.clients.set_max_per_port(max_clients_per_port);
        self.report_rate = report_rate.max(1);
    }

    /// Counts memberships the engine refused, keeps the latest for `mcrelay groups`, and logs
    /// them at most once per kind every 10 s (with how many were not logged).
    fn note_refusals(&mut self) {
        const QUIET: Duration = Duration::from_secs(10);
        const KEEP: usize = 32;
        let now = self.clock();
        let mut refused = self.engine.take_refused();
        refused.extend(self.clients.take_refused());
        for r in refused {
            *self.counters.refused.entry(r.why.name().to_owned()).or_default() += 1;
            let why = match r.why {
                Refusal::SsmAnySource => "SSM group (232.0.0.0/8, ff3x::/96): any-source joins \
                    (IGMPv1/v2, MLDv1, EXCLUDE mode) are ignored (RFC 4604); join with a source \
                    list (IGMPv3/MLDv2 INCLUDE), or use a group outside the SSM range"
                    .to_owned(),
                limit => format!(
                    "limit {} reached: new memberships are refused until some expire or the \
                     limit is raised ([limits] in the configuration file)",
                    limit.name()
                ),
            };
            let entry = crate::state::NotTaken {
                group: r.group.to_string(),
                port: self.name(r.port),
                reason: r.why.name().to_owned(),
                why: why.clone(),
            };
            self.not_taken.retain(|n| !(n.group == entry.group && n.port == entry.port));
            if self.not_taken.len() == KEEP {
                self.not_taken.pop_front();
            }
            self.not_taken.push_back(entry);
            let logged = self.refusals_logged.entry(r.why).or_insert((Duration::ZERO, 0));
            if logged.0.is_zero() || now >= logged.0 + QUIET {
                let suppressed = std::mem::take(&mut logged.1);
                logged.0 = now.max(Duration::from_nanos(1));
                tracing::warn!(
                    port = self.name(r.port),
                    group = %r.group,
                    suppressed,
                    "membership not taken: {why}"
                );
            } else {
                logged.1 += 1;
            }
            self.dirty = true;
        }
    }

    /// Whether a control frame from `port` fits the port's budget (a token bucket of
    /// `report_rate` frames per second, one second's worth deep); logs when a port first runs
    /// over it.
    fn report_budget(&mut self, now: Duration, port: u32) -> bool {
        let rate = self.report_rate as f64;
        let (tokens, last) = self.report_tokens.entry(port).or_insert((rate, now));
        *tokens = (*tokens + now.saturating_sub(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return true;
        }
        if self.rate_limit_logged.insert(port) {
            tracing::warn!(
                port = self.name(port),
                rate = self.report_rate,
                "control frames over the port's rate: the excess is ignored (counted as \
                 control.rate_limited; [limits] report_rate_per_port)"
            );
        }
        false
    }

    /// Monotonic time for rate-limited logs.
    fn clock(&self) -> Duration {
        self.started.elapsed()
    }

    /// Drops per-client memberships that timed out.
    pub fn expire_clients(&mut self, now: Duration) {
        self.clients.expire(now);
    }

    /// Brings the per-client sets of changed groups into the dataplane and their keys into
    /// the table.
    fn sync_clients(
        &mut self,
        dp: &mut Dataplane,
        changed: &mut BTreeSet<IpAddr>,
    ) -> anyhow::Result<()> {
        for g in self.clients.take_changed() {
            let ports: Vec<u32> = self.clients.ports().collect();
            for port in ports {
                let keys = dp.set_client_set(port, g, &self.clients.members(g, port))?;
                self.table.set_clients(g, port, keys.into_iter().collect());
            }
            changed.insert(g);
        }
        Ok(())
    }

    /// RFC 4541 2.1.1: reports and leaves go on towards router ports (so upstream routers learn
    /// what hosts behind the relay want); queries of another querier go to every other port
    /// (so hosts there answer).
    fn relay_control(&mut self, ingress: u32, frame: &[u8], msg: &Message) {
        if self.decision.standby.contains_key(&ingress) {
            return;
        }
        let targets: Vec<u32> = match &msg.kind {
            MessageKind::V1Report { .. }
            | MessageKind::V2Report { .. }
            | MessageKind::Leave { .. }
            | MessageKind::V3Report { .. } => self
                .table
                .routers()
                .iter()
                .copied()
                // Upstream ports get mcrelay's own reports, not the hosts' (RFC 4605).
                .filter(|p| *p != ingress && !self.upstream.contains_key(p))
                .collect(),
            MessageKind::Query(_) if !msg.source.is_unspecified() => {
                self.names.keys().copied().filter(|p| *p != ingress).collect()
            }
            _ => Vec::new(),
        };
        // Relayed frames carry the relay MAC as source, like relayed data: a relay that hears
        // them come back (or a redundant peer's) ignores them instead of relaying them again.
        let mut frame = frame.to_vec();
        if frame.len() >= 12 {
            frame[6..12].copy_from_slice(&self.loop_guard.relay_mac());
        }
        for port in targets.into_iter().filter(|p| !self.decision.standby.contains_key(p)) {
            match self.send_frame(port, &frame) {
                Ok(()) => self.counters.relayed += 1,
                Err(e) => {
                    self.counters.send_errors += 1;
                    tracing::debug!(port = self.name(port), "relaying a control frame: {e}");
                }
            }
        }
    }

    fn count_malformed(&mut self, e: ParseError) {
        if e == ParseError::NotMembership {
            self.counters.ignored_not_membership += 1;
            return;
        }
        *self.counters.malformed.entry(e.name().to_owned()).or_default() += 1;
    }

    /// Carries out what the engine asked for: queries go out, changed groups are written in
    /// one round. A failed group write is counted and logged; the group is retried next round.
    /// Returns whether any group was written.
    pub fn process_actions(&mut self, dp: &mut Dataplane) -> anyhow::Result<bool> {
        let mut changed: BTreeSet<IpAddr> = BTreeSet::new();
        let mut routers_changed = false;
        for action in self.engine.take_actions() {
            match action {
                Action::SendQuery { port, source, query } => self.send_query(port, source, &query),
                Action::GroupChanged(g) => {
                    changed.insert(g);
                }
                Action::RouterPortsChanged(_) => routers_changed = true,
            }
        }
        self.log_querier_changes();
        self.log_router_events();
        self.note_refusals();
        self.sync_clients(dp, &mut changed)?;
        if routers_changed {
            let routers = self.router_ports();
            tracing::info!(ports = ?routers.iter().map(|p| self.name(*p)).collect::<Vec<_>>(), "router ports");
            let engine = &self.engine;
            self.table.set_routers(dp, |g| engine.forwarding(g), routers)?;
            self.dirty = true;
        }
        // Upstream reports go out after the group maps are written: data the report pulls
        // in is then forwarded from its first packet.
        let upstream_changes = if self.upstream.is_empty() { None } else { Some(changed.clone()) };
        let groups: Vec<_> = changed
            .into_iter()
            .filter(|g| !is_link_local_group(*g))
            .map(|g| (g, self.engine.forwarding(&g)))
            .collect();
        if !groups.is_empty() {
            self.dirty = true;
        }
        let result = self.table.sync(dp, groups);
        if let Some(changed) = upstream_changes {
            let now = self.clock();
            self.report_upstream(now, &changed);
        }
        // Forget the copy totals of clients that left or timed out.
        let clients = &self.clients;
        dp.retain_clients(|port, mac| clients.is_member(port, mac));
        let written = match result {
            Ok(n) => n,
            Err(e) => {
                self.count_write_failures(&e);
                0
            }
        };
        self.counters.group_updates += written as u64;
        Ok(written > 0)
    }

    /// Router ports of both families.
    fn router_ports(&self) -> BTreeSet<u32> {
        let mut routers = self.engine.router_ports(Family::V4);
        routers.extend(self.engine.router_ports(Family::V6));
        routers
    }

    /// Sends a hello on every port (loop guard).
    pub fn send_hellos(&mut self) {
        for (&port, &mac) in &self.macs {
            let frame = loop_guard::build_hello(mac, &self.loop_guard.hello(port));
            if let Err(e) = self.socket.send(port, &frame) {
                self.counters.send_errors += 1;
                tracing::debug!(port = %self.names.get(&port).map_or("?", String::as_str), "sending a hello: {e}");
            }
        }
    }

    /// Whether a hello should go out at once (a relay we did not know was heard).
    pub fn hello_due(&mut self) -> bool {
        self.loop_guard.take_trigger()
    }

    /// Expires silent relays and applies a changed loop-guard decision: loop MACs and standby
    /// ports to the dataplane, standby ports out of every port set.
    pub fn update_loop_guard(&mut self, now: Duration, dp: &mut Dataplane) -> anyhow::Result<()> {
        self.loop_guard.expire(now);
        let ports: BTreeSet<u32> = self.names.keys().copied().collect();
        let decision = self.loop_guard.decide(&ports);
        if decision == self.decision {
            return Ok(());
        }
        for mac in decision.loop_macs.difference(&self.decision.loop_macs) {
            tracing::warn!(
                relay = %mac_string(mac),
                "loop guard: another relay reaches this one through two or more ports; frames \
                 it relays are not relayed again"
            );
        }
        for (port, why) in &decision.standby {
            if self.decision.standby.get(port) != Some(why) {
                tracing::warn!(
                    port = self.name(*port),
                    reason = loop_guard::standby_reason(*why),
                    "loop guard: port in standby"
                );
            }
        }
        for port in self.decision.standby.keys().filter(|p| !decision.standby.contains_key(p)) {
            tracing::info!(port = self.name(*port), "loop guard: port relays again");
        }
        dp.set_loop_guard(&decision.loop_macs, &decision.standby)?;
        self.decision = decision;
        let excluded: BTreeSet<u32> = self.decision.standby.keys().copied().collect();
        self.table.set_excluded(excluded);
        let routers = self.router_ports();
        let engine = &self.engine;
        self.table.set_routers(dp, |g| engine.forwarding(g), routers)?;
        self.reapply(dp);
        Ok(())
    }

    /// Standby ports and why (ifindex -> `PORT_STANDBY_*` bits).
    pub fn standby(&self) -> &BTreeMap<u32, u32> {
        &self.decision.standby
    }

    /// Counts and logs failed group writes (they are retried on the next round).
    fn count_write_failures(&mut self, e: &WriteFailures<DataplaneError>) {
        self.counters.map_errors += e.failed.len() as u64;
        tracing::warn!("{e}");
    }

    /// Counts a failed round of map writes that did not end the daemon.
    pub fn count_map_error(&mut self) {
        self.counters.map_errors += 1;
    }

    fn send_query(&mut self, port: u32, source: IpAddr, query: &packet::Query) {
        // An L3 port has no MAC: the query goes out without its Ethernet header.
        let l3 = self.l3_ports.contains(&port).then_some([0; 6]);
        let Some(mac) = self.macs.get(&port).copied().or(l3) else {
            return;
        };
        if source.is_ipv6() && source.is_unspecified() {
            // RFC 3810 5.1.14: hosts drop MLD queries whose source is not link-local. The
            // port has no link-local address yet (a tap OpenVPN just created): wait for one.
            self.counters.queries_skipped_no_address += 1;
            if self.unaddressed_logged.insert(port) {
                tracing::warn!(
                    port = self.name(port),
                    "not sending MLD queries: the port has no IPv6 link-local address yet \
                     (hosts drop queries from ::); they start when one is configured"
                );
            }
            return;
        }
        match packet::build_query(mac, source, query) {
            Ok(frame) => {
                match self.send_frame(port, &frame) {
                    Ok(()) => self.counters.queries_sent += 1,
                    Err(e) => {
                        self.counters.send_errors += 1;
                        tracing::debug!(port = self.name(port), "sending a query: {e}");
                    }
                }
                if l3.is_some() && self.clients.is_per_client(port) {
                    self.send_unicast_queries(port, frame.get(14..).unwrap_or_default());
                }
            }
            Err(e) => tracing::warn!("building a query: {e:?}"),
        }
    }

    /// A per-client L3 port also gets the query addressed to each known peer: WireGuard
    /// sends a multicast destination to no peer (AllowedIPs are per peer), so without these
    /// a peer never hears a query, never reports again, and its membership would time out
    /// while it is still joined. (OpenVPN tun peers get both; they answer once.)
    fn send_unicast_queries(&mut self, port: u32, packet: &[u8]) {
        for peer in self.clients.peers_on(port) {
            let Some(copy) = packet::readdress_ipv4(packet, peer) else { continue };
            match self.socket.send_ip(port, &copy) {
                Ok(()) => self.counters.queries_sent += 1,
                Err(e) => {
                    self.counters.send_errors += 1;
                    tracing::debug!(port = self.name(port), %peer, "sending a query: {e}");
                }
            }
        }
    }

    /// The interface name of a port (or `ifindex N`).
    pub fn name(&self, port: u32) -> String {
        self.names.get(&port).cloned().unwrap_or_else(|| format!("ifindex {port}"))
    }

    /// The state `mcrelay groups` shows, with per-client copy counts from the dataplane.
    pub fn snapshot(&self, now: Duration, dp: &Dataplane) -> DaemonState {
        snapshot::build(self, now, dp)
    }
}
