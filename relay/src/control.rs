//! The control loop: IGMP/MLD frames in, membership engine, group maps out (through the
//! reconciler, [`crate::reconciler::GroupTable`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use crate::{
    capture::ControlSocket,
    dataplane::Dataplane,
    groups::is_link_local_group,
    loop_guard::{self, Decision, LoopGuard},
    membership::{packet, Action, Engine, Family, Message, MessageKind, ParseError},
    reconciler::{GroupTable, WriteFailures},
    state::{self, DaemonState},
};

/// Counters of the control plane, shown by `mcrelay groups` / `stats`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ControlCounters {
    pub received: u64,
    pub ignored_other_port: u64,
    /// Frames the filter let through that are not IGMP/MLD/PIM (ICMPv6 neighbour discovery).
    pub ignored_not_membership: u64,
    pub malformed: BTreeMap<String, u64>,
    pub queries_sent: u64,
    pub send_errors: u64,
    pub group_updates: u64,
    /// Reports and leaves relayed to router ports, queries of other queriers relayed to all
    /// other ports (RFC 4541 2.1.1).
    pub relayed: u64,
    /// Time from receiving a report to the moment the map update it caused was issued (the
    /// entry is visible to the XDP program from then on): last and worst, in microseconds.
    /// This is the join-to-forwarding latency on the gateway.
    pub last_update_us: u64,
    pub max_update_us: u64,
    /// Relay hellos received (loop guard).
    #[serde(default)]
    pub hellos_received: u64,
    /// Control frames ignored because they came from this relay's own ports or relay MAC, or
    /// from a redundant peer relay (they went round a loop).
    #[serde(default)]
    pub ignored_loop: u64,
    /// Group map writes that failed (logged; retried on the next round, since the record of
    /// what is installed keeps the old set).
    #[serde(default)]
    pub map_errors: u64,
    /// Time from receiving a report until the update syscalls returned (includes the
    /// kernel's RCU grace period that map-in-map updates wait for after publishing).
    pub last_update_done_us: u64,
}

/// Everything the control loop works on.
pub struct Control {
    pub engine: Engine,
    pub table: GroupTable,
    pub socket: ControlSocket,
    /// MAC of every port (query source).
    pub macs: BTreeMap<u32, [u8; 6]>,
    pub names: BTreeMap<u32, String>,
    pub counters: ControlCounters,
    pub dirty: bool,
    /// Ports with per-client delivery (a shared TAP of an OpenVPN server).
    pub per_client_ports: BTreeSet<u32>,
    /// Clients seen joining through per-client ports: (group, port) -> MAC -> expiry.
    pub clients: BTreeMap<(IpAddr, u32), BTreeMap<[u8; 6], Duration>>,
    /// Groups whose per-client members changed since the last map update.
    clients_changed: BTreeSet<IpAddr>,
    /// The querier last logged per (port, IPv6?), to log changes once.
    queriers_seen: BTreeMap<(u32, bool), (IpAddr, bool)>,
    /// Hellos between relays and the standby / loop-MAC decisions they lead to.
    loop_guard: LoopGuard,
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
            decision: Decision::default(),
            engine,
            table,
            socket,
            macs: BTreeMap::new(),
            names: BTreeMap::new(),
            counters: ControlCounters::default(),
            dirty: true,
            per_client_ports: BTreeSet::new(),
            clients: BTreeMap::new(),
            clients_changed: BTreeSet::new(),
            queriers_seen: BTreeMap::new(),
        }
    }

    /// Handles one received frame.
    pub fn on_frame(&mut self, now: Duration, ifindex: u32, frame: &[u8]) {
        if !self.names.contains_key(&ifindex) {
            self.counters.ignored_other_port += 1;
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
        if frame.len() >= 12 {
            let mut source = [0u8; 6];
            source.copy_from_slice(&frame[6..12]);
            if self.loop_guard.is_loop_mac(&source) || self.macs.values().any(|m| *m == source) {
                // Our own query or relayed report coming back, or one a redundant relay
                // relayed: acting on it would feed a loop.
                self.counters.ignored_loop += 1;
                return;
            }
        }
        match packet::parse(frame) {
            Ok(msg) => {
                tracing::trace!(port = ifindex, ?msg, "control message");
                if self.per_client_ports.contains(&ifindex) && frame.len() >= 12 {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&frame[6..12]);
                    self.track_client(now, ifindex, mac, &msg);
                }
                self.engine.handle(now, ifindex, &msg);
                self.relay_control(ifindex, frame, &msg);
                self.dirty = true;
            }
            Err(e) => self.count_malformed(e),
        }
    }

    /// Per-client membership on a shared port, keyed by the reporting client's MAC: a join
    /// (re)arms the client's timer (one group membership interval), a leave ends it at once
    /// (the port-level state still goes through the normal last-member queries).
    fn track_client(&mut self, now: Duration, port: u32, mac: [u8; 6], msg: &Message) {
        let expiry = now + self.engine.config().gmi();
        let mut joins: Vec<IpAddr> = Vec::new();
        let mut leaves: Vec<IpAddr> = Vec::new();
        match &msg.kind {
            MessageKind::V1Report { group } | MessageKind::V2Report { group } => joins.push(*group),
            MessageKind::Leave { group } => leaves.push(*group),
            MessageKind::V3Report { records } => {
                for r in records {
                    use crate::membership::RecordType as R;
                    match r.kind {
                        R::IsExclude | R::ToExclude => joins.push(r.group),
                        R::IsInclude | R::AllowNew if !r.sources.is_empty() => joins.push(r.group),
                        R::ToInclude if r.sources.is_empty() => leaves.push(r.group),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        for g in joins.into_iter().filter(crate::membership::engine::is_tracked) {
            let known = self.clients.entry((g, port)).or_default().insert(mac, expiry).is_some();
            if !known {
                self.clients_changed.insert(g);
            }
        }
        for g in leaves {
            if let Some(m) = self.clients.get_mut(&(g, port)) {
                if m.remove(&mac).is_some() {
                    self.clients_changed.insert(g);
                }
            }
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

    /// Puts back a per-client membership (an interface re-created under the same name).
    pub fn restore_client(&mut self, group: IpAddr, port: u32, mac: [u8; 6], now: Duration) {
        let expiry = now + self.engine.config().gmi();
        self.clients.entry((group, port)).or_default().insert(mac, expiry);
        self.clients_changed.insert(group);
    }

    /// Drops clients whose membership timed out.
    pub fn expire_clients(&mut self, now: Duration) {
        for ((g, _), macs) in &mut self.clients {
            let before = macs.len();
            macs.retain(|_, expiry| *expiry > now);
            if macs.len() != before {
                self.clients_changed.insert(*g);
            }
        }
        self.clients.retain(|_, macs| !macs.is_empty());
    }

    /// Brings the per-client sets of changed groups into the dataplane and their keys into
    /// the table.
    fn sync_clients(
        &mut self,
        dp: &mut Dataplane,
        changed: &mut BTreeSet<IpAddr>,
    ) -> anyhow::Result<()> {
        for g in std::mem::take(&mut self.clients_changed) {
            for &port in &self.per_client_ports {
                let macs: Vec<[u8; 6]> = self
                    .clients
                    .get(&(g, port))
                    .into_iter()
                    .flat_map(|m| m.keys().copied())
                    .collect();
                let keys = dp.set_client_set(port, g, &macs)?;
                self.table.set_clients(g, port, keys.into_iter().collect());
            }
            changed.insert(g);
        }
        Ok(())
    }

    /// RFC 4541 2.1.1: reports and leaves go on towards router ports (so upstream routers learn
    /// what hosts behind the relay want); queries of another querier go to every other port
    /// (so hosts there answer). The frame is sent unchanged.
    fn relay_control(&mut self, ingress: u32, frame: &[u8], msg: &Message) {
        if self.decision.standby.contains_key(&ingress) {
            return;
        }
        let targets: Vec<u32> = match &msg.kind {
            MessageKind::V1Report { .. }
            | MessageKind::V2Report { .. }
            | MessageKind::Leave { .. }
            | MessageKind::V3Report { .. } => {
                self.table.routers().iter().copied().filter(|p| *p != ingress).collect()
            }
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
            match self.socket.send(port, &frame) {
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
    /// one round. A failed write is counted and logged; the group is retried next round.
    pub fn process_actions(&mut self, dp: &mut Dataplane) -> anyhow::Result<()> {
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
        self.sync_clients(dp, &mut changed)?;
        if routers_changed {
            let mut routers = self.engine.router_ports(Family::V4);
            routers.extend(self.engine.router_ports(Family::V6));
            tracing::info!(ports = ?routers.iter().map(|p| self.name(*p)).collect::<Vec<_>>(), "router ports");
            let engine = &self.engine;
            self.table.set_routers(dp, |g| engine.forwarding(g), routers)?;
            self.dirty = true;
        }
        let groups: Vec<_> = changed
            .into_iter()
            .filter(|g| !is_link_local_group(*g))
            .map(|g| (g, self.engine.forwarding(&g)))
            .collect();
        if !groups.is_empty() {
            self.dirty = true;
        }
        let result = self.table.sync(dp, groups);
        // Forget the copy totals of clients that left or timed out.
        let clients = &self.clients;
        dp.retain_clients(|port, mac| {
            clients.iter().any(|((_, p), macs)| *p == port && macs.contains_key(&mac))
        });
        match result {
            Ok(n) => {
                self.counters.group_updates += n as u64;
                Ok(())
            }
            Err(e) => {
                self.count_write_failures(&e);
                Ok(())
            }
        }
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
                relay = %state::mac_string(mac),
                "loop guard: another relay reaches this one through two or more ports; frames \
                 it relays are not relayed again"
            );
        }
        for (port, why) in &decision.standby {
            if self.decision.standby.get(port) != Some(why) {
                tracing::warn!(
                    port = self.name(*port),
                    reason = standby_reason(*why),
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
        let mut routers = self.engine.router_ports(Family::V4);
        routers.extend(self.engine.router_ports(Family::V6));
        let engine = &self.engine;
        self.table.set_routers(dp, |g| engine.forwarding(g), routers)?;
        let learned: Vec<IpAddr> = engine.groups(Duration::ZERO).map(|g| g.group).collect();
        if let Err(e) = self.table.reapply(dp, |g| engine.forwarding(g), learned) {
            self.count_write_failures(&e);
        }
        self.dirty = true;
        Ok(())
    }

    /// Standby ports and why (ifindex -> `PORT_STANDBY_*` bits).
    pub fn standby(&self) -> &BTreeMap<u32, u32> {
        &self.decision.standby
    }

    /// Counts and logs failed group writes (they are retried on the next round).
    pub fn count_write_failures(&mut self, e: &WriteFailures) {
        self.counters.map_errors += e.failed.len() as u64;
        tracing::warn!("{e}");
    }

    fn send_query(&mut self, port: u32, source: IpAddr, query: &packet::Query) {
        let Some(mac) = self.macs.get(&port).copied() else {
            return;
        };
        match packet::build_query(mac, source, query) {
            Ok(frame) => match self.socket.send(port, &frame) {
                Ok(()) => self.counters.queries_sent += 1,
                Err(e) => {
                    self.counters.send_errors += 1;
                    tracing::debug!(port = self.name(port), "sending a query: {e}");
                }
            },
            Err(e) => tracing::warn!("building a query: {e:?}"),
        }
    }

    pub fn name(&self, port: u32) -> String {
        self.names.get(&port).cloned().unwrap_or_else(|| format!("ifindex {port}"))
    }

    /// The state `mcrelay groups` shows.
    pub fn snapshot(&self, now: Duration) -> DaemonState {
        state::snapshot(self, now)
    }
}

/// Words for a standby reason (`PORT_STANDBY_*` bits).
pub fn standby_reason(bits: u32) -> &'static str {
    if bits & relay_common::PORT_STANDBY_SAME_SEGMENT != 0 {
        "another port of this relay is on the same segment"
    } else if bits & relay_common::PORT_STANDBY_PEER != 0 {
        "a relay with a lower relay MAC serves every segment of this one"
    } else {
        ""
    }
}
