//! The control loop: IGMP/MLD frames in, membership engine, group maps out.
//!
//! `GroupTable` turns the engine's per-group [`Forwarding`] (plus static members and router
//! ports) into `GROUP_PORTS` entries: one (*,G) entry with the ports that take every source,
//! and one (S,G) entry per source some port named. Only keys whose port set changed are
//! rewritten, each by an atomic inner-map swap.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::Context as _;
use relay_common::GroupKey;

use crate::{
    capture::ControlSocket,
    config::GroupPolicy,
    dataplane::Dataplane,
    groups::{group_key, is_link_local_group},
    membership::{packet, Action, Engine, Family, Forwarding, Message, MessageKind, ParseError},
    state::{self, DaemonState},
};

/// What is installed for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Ports for sources without their own entry: the (*,G) entry.
    pub any_source: BTreeSet<u32>,
    /// (S,G) entries.
    pub per_source: BTreeMap<IpAddr, BTreeSet<u32>>,
}

/// Desired and installed group port sets.
#[derive(Debug, Default)]
pub struct GroupTable {
    statics: BTreeMap<IpAddr, BTreeSet<u32>>,
    routers: BTreeSet<u32>,
    installed: BTreeMap<IpAddr, Installed>,
    /// Port sets a previous daemon left in the maps (hitless restart). They stay in force,
    /// united with what is learned, until [`GroupTable::end_adoption`] (one membership
    /// interval after start: by then every live member has reported again).
    adopted: BTreeMap<IpAddr, Installed>,
    /// Groups that may be relayed at all (`[policy]`); others get no entries.
    policy: GroupPolicy,
    /// Per-client delivery: for (group, shared port), the inner-map keys of the clients that
    /// joined through that port. The port itself is replaced by these keys.
    clients: BTreeMap<(IpAddr, u32), BTreeSet<u32>>,
}

/// The (S,G) map key.
pub fn source_key(group: IpAddr, source: IpAddr) -> GroupKey {
    let mut key = group_key(group);
    key.source = group_key(source).group;
    key
}

impl GroupTable {
    pub fn new(statics: BTreeMap<IpAddr, BTreeSet<u32>>) -> Self {
        Self { statics, ..Self::default() }
    }

    /// What should be installed for `group` given the engine's view.
    pub fn desired(&self, group: IpAddr, learned: &Forwarding) -> Installed {
        let mut want = self.desired_now(group, learned);
        if let Some(old) = self.adopted.get(&group) {
            want.any_source.extend(old.any_source.iter().copied());
            for (s, ports) in &old.per_source {
                want.per_source.entry(*s).or_default().extend(ports.iter().copied());
            }
        }
        want
    }

    fn desired_now(&self, group: IpAddr, learned: &Forwarding) -> Installed {
        let mut want = self.desired_ports(group, learned);
        let substitute = |ports: &mut BTreeSet<u32>| {
            let shared: Vec<u32> = ports
                .iter()
                .copied()
                .filter(|p| self.clients.get(&(group, *p)).is_some_and(|c| !c.is_empty()))
                .collect();
            for p in shared {
                ports.remove(&p);
                ports.extend(self.clients[&(group, p)].iter().copied());
            }
        };
        substitute(&mut want.any_source);
        for ports in want.per_source.values_mut() {
            substitute(ports);
        }
        want
    }

    /// Sets the per-client keys of a (group, shared port); empty: the port gets plain copies.
    pub fn set_clients(&mut self, group: IpAddr, port: u32, keys: BTreeSet<u32>) {
        if keys.is_empty() {
            self.clients.remove(&(group, port));
        } else {
            self.clients.insert((group, port), keys);
        }
    }

    fn desired_ports(&self, group: IpAddr, learned: &Forwarding) -> Installed {
        if !self.policy.permits(group) {
            return Installed::default();
        }
        let statics = self.statics.get(&group);
        if learned.is_empty() && statics.is_none() {
            return Installed::default();
        }
        let extra: BTreeSet<u32> =
            statics.into_iter().flatten().chain(self.routers.iter()).copied().collect();
        let mut any_source: BTreeSet<u32> = learned.any_source.union(&extra).copied().collect();
        if learned.any_source.is_empty() && statics.is_none() {
            // Nobody wants "all sources": sources without an entry are an unknown flow.
            any_source.clear();
        }
        let per_source = learned
            .per_source
            .iter()
            .map(|(s, ports)| (*s, ports.union(&extra).copied().collect()))
            .collect();
        Installed { any_source, per_source }
    }

    /// Brings `group`'s map entries in line with `learned`. Returns whether anything changed.
    pub fn apply(
        &mut self,
        dp: &mut Dataplane,
        group: IpAddr,
        learned: &Forwarding,
    ) -> anyhow::Result<bool> {
        let want = self.desired(group, learned);
        let have = self.installed.get(&group).cloned().unwrap_or_default();
        if want == have {
            return Ok(false);
        }
        if want.any_source != have.any_source {
            let ports: Vec<u32> = want.any_source.iter().copied().collect();
            dp.set_group(group_key(group), &ports)?;
        }
        for (source, ports) in &want.per_source {
            if have.per_source.get(source) != Some(ports) {
                // Even an empty set is installed: it keeps a blocked source off the (*,G) ports.
                let ports: Vec<u32> = ports.iter().copied().collect();
                dp.install_group(source_key(group, *source), &ports)?;
            }
        }
        for source in have.per_source.keys() {
            if !want.per_source.contains_key(source) {
                dp.remove_group(source_key(group, *source))?;
            }
        }
        if want == Installed::default() {
            self.installed.remove(&group);
        } else {
            self.installed.insert(group, want);
        }
        Ok(true)
    }

    /// Changes the router ports; every installed group gets them too.
    pub fn set_routers(
        &mut self,
        dp: &mut Dataplane,
        engine: &Engine,
        routers: BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        if routers == self.routers {
            return Ok(());
        }
        self.routers = routers;
        let ports: Vec<u32> = self.routers.iter().copied().collect();
        dp.set_router_ports(&ports)?;
        let groups: Vec<IpAddr> = self.installed.keys().copied().collect();
        for g in groups {
            self.apply(dp, g, &engine.forwarding(&g))?;
        }
        Ok(())
    }

    /// Replaces the static memberships (ifindexes per group) and rewrites the groups whose
    /// static ports changed.
    pub fn set_statics(
        &mut self,
        dp: &mut Dataplane,
        engine: &Engine,
        statics: BTreeMap<IpAddr, BTreeSet<u32>>,
    ) -> anyhow::Result<()> {
        let statics: BTreeMap<IpAddr, BTreeSet<u32>> =
            statics.into_iter().filter(|(_, ports)| !ports.is_empty()).collect();
        let mut changed: BTreeSet<IpAddr> = BTreeSet::new();
        for (g, ports) in &statics {
            if self.statics.get(g) != Some(ports) {
                changed.insert(*g);
            }
        }
        changed.extend(self.statics.keys().filter(|g| !statics.contains_key(g)).copied());
        self.statics = statics;
        for g in changed {
            self.apply(dp, g, &engine.forwarding(&g))?;
        }
        Ok(())
    }

    /// Sets which groups may be relayed (call [`GroupTable::reapply_all`] after a change).
    pub fn set_policy(&mut self, policy: GroupPolicy) {
        self.policy = policy;
    }

    /// Recomputes every installed group (after a policy change).
    pub fn reapply_all(&mut self, dp: &mut Dataplane, engine: &Engine) -> anyhow::Result<()> {
        let mut groups: BTreeSet<IpAddr> = self.installed.keys().copied().collect();
        groups.extend(engine.groups(Duration::ZERO).map(|g| g.group));
        groups.extend(self.statics.keys().copied());
        for g in groups {
            self.apply(dp, g, &engine.forwarding(&g))?;
        }
        Ok(())
    }

    /// Removes a vanished port from every remembered set (installed and adopted), so that no
    /// later rewrite names its ifindex; the engine reports the learned groups that change.
    pub fn forget_port(&mut self, port: u32) {
        for sets in [&mut self.installed, &mut self.adopted] {
            for inst in sets.values_mut() {
                inst.any_source.remove(&port);
                for ports in inst.per_source.values_mut() {
                    ports.remove(&port);
                }
            }
        }
        self.routers.remove(&port);
        self.clients.retain(|(_, p), _| *p != port);
    }

    /// Takes over what a previous daemon installed (the maps were reused).
    pub fn adopt(&mut self, installed: BTreeMap<IpAddr, Installed>) {
        self.installed = installed.clone();
        self.adopted = installed;
    }

    /// Whether adopted port sets are still in force.
    pub fn adopting(&self) -> bool {
        !self.adopted.is_empty()
    }

    /// Drops the adopted port sets: from now on only learned, static and router ports count.
    pub fn end_adoption(&mut self, dp: &mut Dataplane, engine: &Engine) -> anyhow::Result<()> {
        let groups: Vec<IpAddr> = self.adopted.keys().copied().collect();
        self.adopted.clear();
        for g in groups {
            self.apply(dp, g, &engine.forwarding(&g))?;
        }
        Ok(())
    }

    /// Router ports (learned and configured, both families).
    pub fn routers(&self) -> &BTreeSet<u32> {
        &self.routers
    }

    pub fn installed(&self) -> &BTreeMap<IpAddr, Installed> {
        &self.installed
    }

    pub fn is_static(&self, group: &IpAddr) -> bool {
        self.statics.contains_key(group)
    }
}

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
    /// Map writes that failed (logged; the group is rewritten on its next change).
    #[serde(default)]
    pub map_errors: u64,
    /// Same, until the update syscalls returned (includes the kernel's RCU grace period that
    /// map-in-map updates wait for after publishing).
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
}

impl Control {
    /// A control plane over `socket`, with no port yet.
    pub fn new(engine: Engine, table: GroupTable, socket: ControlSocket) -> Self {
        Self {
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
        self.counters.received += 1;
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
        for port in targets {
            match self.socket.send(port, frame) {
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

    /// Carries out what the engine asked for.
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
        dp.begin_batch();
        let result = self.apply_changes(dp, routers_changed, changed);
        let committed = dp.commit_batch();
        // Unload the per-client programs of clients that left or timed out.
        let clients = &self.clients;
        dp.retain_clients(|port, mac| {
            clients.iter().any(|((_, p), macs)| *p == port && macs.contains_key(&mac))
        });
        result.and(committed)
    }

    fn apply_changes(
        &mut self,
        dp: &mut Dataplane,
        routers_changed: bool,
        changed: BTreeSet<IpAddr>,
    ) -> anyhow::Result<()> {
        if routers_changed {
            let mut routers = self.engine.router_ports(Family::V4);
            routers.extend(self.engine.router_ports(Family::V6));
            tracing::info!(ports = ?routers.iter().map(|p| self.name(*p)).collect::<Vec<_>>(), "router ports");
            self.table.set_routers(dp, &self.engine, routers)?;
            self.dirty = true;
        }
        for g in changed {
            if is_link_local_group(g) {
                continue;
            }
            let fwd = self.engine.forwarding(&g);
            if self.table.apply(dp, g, &fwd).with_context(|| format!("updating group {g}"))? {
                self.counters.group_updates += 1;
                tracing::debug!(group = %g, ?fwd, "group updated");
            }
            self.dirty = true;
        }
        Ok(())
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
