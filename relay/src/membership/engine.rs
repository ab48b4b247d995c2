//! Router-side IGMP/MLD state machines (RFC 3376 section 6, RFC 3810 section 7), host
//! compatibility (RFC 3376 7.3.2, RFC 3810 8.3.2), querier election, snooping of other queriers'
//! specific queries, and router-port learning. Pure logic driven by an explicit clock.
//!
//! Time is a monotonic `Duration` since an arbitrary start. All timers are stored as absolute
//! expiry instants; a source timer of `None` is the RFC's "timer == 0" (the source is in the
//! EXCLUDE-mode block list).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use super::packet::{
    max_query_sources, Family, Message, MessageKind, Query, QueryVersion, RecordType,
};

/// Timer configuration (RFC 3376 8). Derived values are computed from the base values unless
/// overridden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub robustness: u32,
    pub query_interval: Duration,
    pub query_response_interval: Duration,
    pub last_member_query_interval: Duration,
    /// Default: robustness * QI + QRI.
    pub group_membership_interval: Option<Duration>,
    /// Default: robustness * QI + QRI / 2.
    pub other_querier_present_interval: Option<Duration>,
    /// Default: QI / 4.
    pub startup_query_interval: Option<Duration>,
    /// Default: robustness.
    pub startup_query_count: Option<u32>,
    /// Default: robustness.
    pub last_member_query_count: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            robustness: 2,
            query_interval: Duration::from_secs(125),
            query_response_interval: Duration::from_secs(10),
            last_member_query_interval: Duration::from_secs(1),
            group_membership_interval: None,
            other_querier_present_interval: None,
            startup_query_interval: None,
            startup_query_count: None,
            last_member_query_count: None,
        }
    }
}

impl Config {
    fn rv(&self) -> u32 {
        self.robustness.max(1)
    }

    /// Group membership interval (also the older-version-host-present interval).
    pub fn gmi(&self) -> Duration {
        self.group_membership_interval
            .unwrap_or(self.query_interval * self.rv() + self.query_response_interval)
    }

    pub fn other_querier_present(&self) -> Duration {
        self.other_querier_present_interval
            .unwrap_or(self.query_interval * self.rv() + self.query_response_interval / 2)
    }

    pub fn startup_interval(&self) -> Duration {
        self.startup_query_interval.unwrap_or(self.query_interval / 4)
    }

    pub fn startup_count(&self) -> u32 {
        self.startup_query_count.unwrap_or(self.rv()).max(1)
    }

    pub fn last_member_count(&self) -> u32 {
        self.last_member_query_count.unwrap_or(self.rv()).max(1)
    }

    /// Last member query time: LMQI * LMQC.
    pub fn lmqt(&self) -> Duration {
        self.last_member_query_interval * self.last_member_count()
    }

    fn qrv_field(&self) -> u8 {
        u8::try_from(self.robustness).ok().filter(|r| *r <= 7).unwrap_or(0)
    }
}

/// IGMP version a port queries with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IgmpVersion {
    V2,
    #[default]
    V3,
}

/// MLD version a port queries with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MldVersion {
    V1,
    #[default]
    V2,
}

/// Per-port settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortOptions {
    /// The port has a single host: leaves and blocks take effect at once, without queries.
    pub fast_leave: bool,
    /// Take part in querier election and send queries when elected.
    pub querier: bool,
    pub igmp_version: IgmpVersion,
    pub mld_version: MldVersion,
    /// The port's IPv4 address (query source, election); `None` = 0.0.0.0, loses elections.
    pub ipv4: Option<Ipv4Addr>,
    /// The port's IPv6 link-local address; `None` = ::, loses elections.
    pub ipv6: Option<Ipv6Addr>,
    /// Configured (permanent) router port.
    pub router_port: bool,
    /// Become a router port for a while when a query, PIM hello or router advertisement is
    /// heard (RFC 4541 2.1.1). Off for ports whose hosts must not pull all unknown multicast
    /// to themselves (VPN clients).
    pub learn_routers: bool,
}

impl Default for PortOptions {
    fn default() -> Self {
        PortOptions {
            fast_leave: false,
            querier: true,
            igmp_version: IgmpVersion::V3,
            mld_version: MldVersion::V2,
            ipv4: None,
            ipv6: None,
            router_port: false,
            learn_routers: true,
        }
    }
}

impl PortOptions {
    fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.ipv4.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            Family::V6 => IpAddr::V6(self.ipv6.unwrap_or(Ipv6Addr::UNSPECIFIED)),
        }
    }

    fn query_version(&self, family: Family) -> QueryVersion {
        match (family, self.igmp_version, self.mld_version) {
            (Family::V4, IgmpVersion::V2, _) => QueryVersion::IgmpV2,
            (Family::V4, IgmpVersion::V3, _) => QueryVersion::IgmpV3,
            (Family::V6, _, MldVersion::V1) => QueryVersion::MldV1,
            (Family::V6, _, MldVersion::V2) => QueryVersion::MldV2,
        }
    }
}

/// Something the daemon must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `query` on `port` from `source` (the port's address, or unspecified).
    SendQuery { port: u32, source: IpAddr, query: Query },
    /// `forwarding(group)` changed.
    GroupChanged(IpAddr),
    /// `router_ports(family)` changed.
    RouterPortsChanged(Family),
}

/// What a router signal was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouterSignal {
    /// A general or group-specific query from a non-zero source.
    Query,
    /// A PIM hello (IPv4 224.0.0.13, IPv6 ff02::d).
    PimHello,
    /// A multicast router advertisement (RFC 4286).
    RouterAdvertisement,
}

impl RouterSignal {
    /// Words for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "a query",
            Self::PimHello => "a PIM hello",
            Self::RouterAdvertisement => "a multicast router advertisement",
        }
    }
}

/// A router signal heard on a port: it made the port a router port (`learned`), or was
/// ignored because the port does not learn routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterEvent {
    pub port: u32,
    pub family: Family,
    pub signal: RouterSignal,
    /// Who sent it.
    pub from: IpAddr,
    pub learned: bool,
}

/// Bounds on the state hosts can make the engine keep (a gateway faces hosts it does not
/// control). At a limit new state is refused and existing state is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Groups learned, over all ports.
    pub max_groups: usize,
    /// Groups one port may have joined.
    pub max_groups_per_port: usize,
    /// Distinct sources one group may name (over all ports): each is an (S,G) map entry.
    pub max_sources_per_group: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 10,000 groups (on any number of ports) fit; one port cannot take the last 2,000.
        Limits { max_groups: 12_000, max_groups_per_port: 10_000, max_sources_per_group: 256 }
    }
}

/// Which limit refused new state, or why a membership was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    MaxGroups,
    MaxGroupsPerPort,
    MaxSourcesPerGroup,
    /// An any-source join (IGMPv1/v2, MLDv1, EXCLUDE mode) to an SSM group (RFC 4604).
    SsmAnySource,
    /// A new client on a per-client port that already has its most clients.
    MaxClientsPerPort,
}

impl Refusal {
    /// Stable name (counter label).
    pub fn name(self) -> &'static str {
        match self {
            Refusal::MaxGroups => "max_groups",
            Refusal::MaxGroupsPerPort => "max_groups_per_port",
            Refusal::MaxSourcesPerGroup => "max_sources_per_group",
            Refusal::SsmAnySource => "ssm_any_source",
            Refusal::MaxClientsPerPort => "max_clients_per_port",
        }
    }
}

/// A membership the engine did not take: on `port`, for `group`, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub port: u32,
    pub group: IpAddr,
    pub why: Refusal,
}

/// Router filter mode of a (port, group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilterMode {
    #[default]
    Include,
    Exclude,
}

/// Group compatibility mode (older-version hosts present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompatMode {
    IgmpV1,
    IgmpV2,
    IgmpV3,
    MldV1,
    MldV2,
}

/// Which ports receive a group's traffic, by source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// Ports that accept every source not listed in `per_source`.
    pub any_source: BTreeSet<u32>,
    /// For each source named in any port's source list: the ports that accept it.
    pub per_source: BTreeMap<IpAddr, BTreeSet<u32>>,
}

impl Forwarding {
    pub fn is_empty(&self) -> bool {
        self.any_source.is_empty() && self.per_source.values().all(BTreeSet::is_empty)
    }

    /// Ports that receive traffic from `source`.
    pub fn ports_for(&self, source: &IpAddr) -> &BTreeSet<u32> {
        self.per_source.get(source).unwrap_or(&self.any_source)
    }
}

/// One source of a [`PortSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSnapshot {
    pub source: IpAddr,
    /// Remaining source timer; `None` = timer 0 (blocked, EXCLUDE mode).
    pub timer: Option<Duration>,
}

/// A port's state for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSnapshot {
    pub port: u32,
    pub mode: FilterMode,
    /// Remaining group timer (EXCLUDE mode only).
    pub group_timer: Option<Duration>,
    pub sources: Vec<SourceSnapshot>,
    pub compat: CompatMode,
}

/// A learned group, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub group: IpAddr,
    pub ports: Vec<PortSnapshot>,
}

/// Who is querier on a port for a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuerierStatus {
    pub address: IpAddr,
    /// We are the querier.
    pub is_self: bool,
}

/// The timers announced by a query of the elected querier, over what it announced before.
/// IGMPv3/MLDv2 queries carry robustness (QRV, 0 = not given) and the query interval (QQIC);
/// a general query's maximum response time is the querier's query response interval. An
/// IGMPv2/MLDv1 query announces only the response time.
fn announced(q: &Query, before: Option<Announced>, cfg: &Config) -> Announced {
    let mut a = before.unwrap_or(Announced {
        robustness: cfg.robustness,
        query_interval: cfg.query_interval,
        response_interval: cfg.query_response_interval,
    });
    if (1..=7).contains(&q.qrv) {
        a.robustness = u32::from(q.qrv);
    }
    if !q.qqi.is_zero() {
        a.query_interval = q.qqi;
    }
    if q.group.is_none() && !q.max_resp.is_zero() {
        a.response_interval = q.max_resp;
    }
    a
}

/// Source-specific multicast range: 232.0.0.0/8, ff3x::/96.
pub fn is_ssm(group: &IpAddr) -> bool {
    match group {
        IpAddr::V4(g) => g.octets()[0] == 232,
        IpAddr::V6(g) => {
            let s = g.segments();
            s[0] & 0xfff0 == 0xff30 && s[1..6].iter().all(|x| *x == 0)
        }
    }
}

/// Groups whose membership is tracked: multicast, not link-local (224.0.0.0/24, IPv6 scope <= 2).
pub fn is_tracked(group: &IpAddr) -> bool {
    match group {
        IpAddr::V4(g) => g.is_multicast() && g.octets()[..3] != [224, 0, 0],
        IpAddr::V6(g) => g.is_multicast() && g.segments()[0] & 0x000f > 2,
    }
}

/// Timer values the elected querier announced (RFC 3376 4.1.6-4.1.7 and 8.2-8.3, RFC 3810
/// 5.1.8-5.1.9 and 9.2-9.3): a non-querier uses them, so that memberships do not expire
/// between the queries of a querier with longer intervals than ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Announced {
    robustness: u32,
    query_interval: Duration,
    response_interval: Duration,
}

#[derive(Debug, Clone, Default)]
struct QuerierState {
    /// We are the querier.
    active: bool,
    other: Option<IpAddr>,
    /// What `other` announced in its queries.
    announced: Option<Announced>,
    other_until: Option<Duration>,
    next_query: Option<Duration>,
    startup_left: u32,
}

#[derive(Debug, Clone)]
struct PortState {
    opts: PortOptions,
    q4: QuerierState,
    q6: QuerierState,
    router4: Option<Duration>,
    router6: Option<Duration>,
}

impl PortState {
    fn querier(&self, family: Family) -> &QuerierState {
        match family {
            Family::V4 => &self.q4,
            Family::V6 => &self.q6,
        }
    }

    fn querier_mut(&mut self, family: Family) -> &mut QuerierState {
        match family {
            Family::V4 => &mut self.q4,
            Family::V6 => &mut self.q6,
        }
    }

    fn router_mut(&mut self, family: Family) -> &mut Option<Duration> {
        match family {
            Family::V4 => &mut self.router4,
            Family::V6 => &mut self.router6,
        }
    }

    fn is_router(&self, family: Family) -> bool {
        self.opts.router_port
            || match family {
                Family::V4 => self.router4.is_some(),
                Family::V6 => self.router6.is_some(),
            }
    }

    /// We send queries for this family now.
    fn sends_queries(&self, family: Family) -> bool {
        self.opts.querier && self.querier(family).active
    }

    /// The timers in force for `family` on this port: the elected other querier's announced
    /// values while there is one, else ours.
    fn timers(&self, family: Family, cfg: &Config) -> Config {
        let q = self.querier(family);
        match (q.active, q.other, q.announced) {
            (false, Some(_), Some(a)) => Config {
                robustness: a.robustness,
                query_interval: a.query_interval,
                query_response_interval: a.response_interval,
                ..cfg.clone()
            },
            _ => cfg.clone(),
        }
    }
}

/// Router state of one (group, port).
#[derive(Debug, Clone, Default)]
struct Entry {
    mode: FilterMode,
    group_timer: Option<Duration>,
    sources: BTreeMap<IpAddr, Option<Duration>>,
    v1_host: Option<Duration>,
    v2_host: Option<Duration>,
    /// Pending group-specific query transmissions.
    retx_group: u32,
    /// Pending group-and-source-specific query transmissions, per source.
    retx_sources: BTreeMap<IpAddr, u32>,
    retx_at: Option<Duration>,
}

fn running(t: &Option<Duration>, now: Duration) -> bool {
    matches!(t, Some(x) if *x > now)
}

fn expired(t: &Option<Duration>, now: Duration) -> bool {
    matches!(t, Some(x) if *x <= now)
}

fn lower(t: &mut Option<Duration>, to: Duration) {
    if let Some(x) = t {
        if *x > to {
            *x = to;
        }
    }
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.mode == FilterMode::Include && self.sources.is_empty()
    }

    fn compat(&self, now: Duration, family: Family) -> CompatMode {
        match family {
            Family::V4 if running(&self.v1_host, now) => CompatMode::IgmpV1,
            Family::V4 if running(&self.v2_host, now) => CompatMode::IgmpV2,
            Family::V4 => CompatMode::IgmpV3,
            Family::V6 if running(&self.v2_host, now) => CompatMode::MldV1,
            Family::V6 => CompatMode::MldV2,
        }
    }

    fn deadline(&self) -> Option<Duration> {
        let group = if self.mode == FilterMode::Exclude { self.group_timer } else { None };
        self.sources
            .values()
            .flatten()
            .copied()
            .chain(group)
            .chain(self.v1_host)
            .chain(self.v2_host)
            .chain(self.retx_at)
            .min()
    }

    /// Applies every timer that expired at or before `now` (RFC 3376 6.2.2, 6.3, 6.5).
    fn expire(&mut self, now: Duration) {
        if self.mode == FilterMode::Exclude && expired(&self.group_timer, now) {
            // Group timer expiry in EXCLUDE: INCLUDE with the sources whose timers still run.
            self.mode = FilterMode::Include;
            self.group_timer = None;
            self.retx_group = 0;
        }
        match self.mode {
            FilterMode::Include => {
                self.group_timer = None;
                self.sources.retain(|_, t| running(t, now));
            }
            FilterMode::Exclude => {
                for t in self.sources.values_mut() {
                    if expired(t, now) {
                        *t = None;
                    }
                }
            }
        }
        if expired(&self.v1_host, now) {
            self.v1_host = None;
        }
        if expired(&self.v2_host, now) {
            self.v2_host = None;
        }
        let sources = &self.sources;
        self.retx_sources.retain(|s, n| *n > 0 && matches!(sources.get(s), Some(Some(_))));
        if self.retx_group == 0 && self.retx_sources.is_empty() {
            self.retx_at = None;
        }
    }

    /// Whether this port accepts traffic from `source`.
    fn accepts(&self, source: &IpAddr, ssm: bool) -> bool {
        match (self.mode, self.sources.get(source)) {
            (_, Some(Some(_))) => true,
            (FilterMode::Exclude, None) => !ssm,
            _ => false,
        }
    }

    /// RFC 3376 6.4.1 / 6.4.2 tables. Returns (send Q(G), sources for Q(G,S)).
    fn apply(
        &mut self,
        now: Duration,
        gmi: Duration,
        kind: RecordType,
        b: &BTreeSet<IpAddr>,
    ) -> (bool, BTreeSet<IpAddr>) {
        use RecordType::*;
        let t_gmi = Some(now + gmi);
        let keys =
            |m: &BTreeMap<IpAddr, Option<Duration>>| m.keys().copied().collect::<BTreeSet<_>>();
        match (self.mode, kind) {
            // INCLUDE(A) + IS_IN(B) / ALLOW(B) -> INCLUDE(A+B), (B)=GMI
            // EXCLUDE(X,Y) + IS_IN(A) / ALLOW(A) -> EXCLUDE(X+A, Y-A), (A)=GMI
            (_, IsInclude | AllowNew) => {
                b.iter().for_each(|s| {
                    self.sources.insert(*s, t_gmi);
                });
                (false, BTreeSet::new())
            }
            // INCLUDE(A) + IS_EX(B) -> EXCLUDE(A*B, B-A), (B-A)=0, Delete(A-B), GT=GMI
            // INCLUDE(A) + TO_EX(B) -> the same, and Send Q(G, A*B)
            (FilterMode::Include, IsExclude | ToExclude) => {
                let a = keys(&self.sources);
                let new = b.iter().map(|s| (*s, self.sources.get(s).copied().flatten())).collect();
                self.sources = new;
                self.mode = FilterMode::Exclude;
                self.group_timer = t_gmi;
                let q = if kind == ToExclude {
                    a.intersection(b).copied().collect()
                } else {
                    BTreeSet::new()
                };
                (false, q)
            }
            // INCLUDE(A) + BLOCK(B) -> INCLUDE(A), Send Q(G, A*B)
            (FilterMode::Include, BlockOld) => {
                (false, b.iter().filter(|s| self.sources.contains_key(s)).copied().collect())
            }
            // INCLUDE(A) + TO_IN(B) -> INCLUDE(A+B), (B)=GMI, Send Q(G, A-B)
            (FilterMode::Include, ToInclude) => {
                let q = keys(&self.sources).difference(b).copied().collect();
                b.iter().for_each(|s| {
                    self.sources.insert(*s, t_gmi);
                });
                (false, q)
            }
            // EXCLUDE(X,Y) + IS_EX(A) -> EXCLUDE(A-Y, Y*A), (A-X-Y)=GMI, Delete(X-A), Delete(Y-A),
            //   GT=GMI
            // EXCLUDE(X,Y) + TO_EX(A) -> EXCLUDE(A-Y, Y*A), (A-X-Y)=Group Timer, Delete(X-A),
            //   Delete(Y-A), Send Q(G, A-Y), GT=GMI
            (FilterMode::Exclude, IsExclude | ToExclude) => {
                let fresh = if kind == IsExclude { t_gmi } else { self.group_timer };
                let new: BTreeMap<IpAddr, Option<Duration>> =
                    b.iter().map(|s| (*s, self.sources.get(s).copied().unwrap_or(fresh))).collect();
                let q = if kind == ToExclude {
                    new.iter().filter(|(_, t)| t.is_some()).map(|(s, _)| *s).collect()
                } else {
                    BTreeSet::new()
                };
                self.sources = new;
                self.group_timer = t_gmi;
                (false, q)
            }
            // EXCLUDE(X,Y) + BLOCK(A) -> EXCLUDE(X+(A-X-Y), Y), (A-X-Y)=Group Timer,
            //   Send Q(G, A-Y)
            (FilterMode::Exclude, BlockOld) => {
                let gt = self.group_timer;
                let mut q = BTreeSet::new();
                for s in b {
                    if self.sources.entry(*s).or_insert(gt).is_some() {
                        q.insert(*s);
                    }
                }
                (false, q)
            }
            // EXCLUDE(X,Y) + TO_IN(A) -> EXCLUDE(X+A, Y-A), (A)=GMI, Send Q(G, X-A), Send Q(G)
            (FilterMode::Exclude, ToInclude) => {
                let q = self
                    .sources
                    .iter()
                    .filter(|(s, t)| t.is_some() && !b.contains(s))
                    .map(|(s, _)| *s)
                    .collect();
                b.iter().for_each(|s| {
                    self.sources.insert(*s, t_gmi);
                });
                (true, q)
            }
        }
    }
}

/// What a membership message asks of one (port, group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    V1Report,
    V2Report,
    Leave,
    Record(RecordType),
}

/// The membership engine of all ports.
#[derive(Debug, Clone)]
pub struct Engine {
    cfg: Config,
    ports: BTreeMap<u32, PortState>,
    groups: BTreeMap<IpAddr, BTreeMap<u32, Entry>>,
    actions: Vec<Action>,
    router_events: Vec<RouterEvent>,
    limits: Limits,
    /// The earliest timer of each group, and the same ordered by time: timer work is
    /// proportional to what expires, not to the whole state (kept in step by
    /// [`Engine::reindex`], which every change of a group's entries ends with).
    deadline_of: BTreeMap<IpAddr, Duration>,
    deadlines: BTreeSet<(Duration, IpAddr)>,
    /// Groups each port has an entry for (kept in step with `groups`).
    port_groups: BTreeMap<u32, usize>,
    refused: Vec<Refused>,
}

impl Engine {
    pub fn new(cfg: Config) -> Engine {
        Engine {
            cfg,
            ports: BTreeMap::new(),
            groups: BTreeMap::new(),
            actions: Vec::new(),
            router_events: Vec::new(),
            limits: Limits::default(),
            deadline_of: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            port_groups: BTreeMap::new(),
            refused: Vec::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Sets the limits (they apply to new state; what exists stays).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Memberships refused since the last call.
    pub fn take_refused(&mut self) -> Vec<Refused> {
        std::mem::take(&mut self.refused)
    }

    /// Groups learned now, over all ports.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Adds a port, or updates the options of an existing one (keeping its learned state).
    /// A new querier-enabled port starts as querier and sends its first startup queries at once.
    pub fn add_port(&mut self, now: Duration, port: u32, opts: PortOptions) {
        let was_router =
            self.ports.get(&port).map(|p| [p.is_router(Family::V4), p.is_router(Family::V6)]);
        let old_addrs =
            self.ports.get(&port).map(|p| [p.opts.addr(Family::V4), p.opts.addr(Family::V6)]);
        let state = self.ports.entry(port).or_insert_with(|| PortState {
            opts: opts.clone(),
            q4: QuerierState::default(),
            q6: QuerierState::default(),
            router4: None,
            router6: None,
        });
        state.opts = opts;
        if !state.opts.learn_routers {
            // Learned router roles end with the option; configured ones stay.
            state.router4 = None;
            state.router6 = None;
        }
        let mut start = Vec::new();
        for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
            let enabled = state.opts.querier;
            let addr = state.opts.addr(family);
            let readdressed = old_addrs.is_some_and(|old| old[i] != addr);
            let q = state.querier_mut(family);
            if !enabled {
                q.active = false;
                q.next_query = None;
                q.startup_left = 0;
            } else if !q.active && q.other.is_none() {
                q.active = true;
                q.startup_left = self.cfg.startup_count();
                start.push(family);
            } else if q.active && readdressed {
                // The port got (another) address: start over from it, so hosts hear a
                // querier they accept at once (MLD queries from :: are dropped by hosts).
                q.startup_left = self.cfg.startup_count();
                start.push(family);
            }
        }
        for family in start {
            self.send_general(now, port, family);
        }
        if let (Some(was), Some(p)) = (was_router, self.ports.get(&port)) {
            for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
                if was[i] != p.is_router(family) {
                    self.actions.push(Action::RouterPortsChanged(family));
                }
            }
        } else if self.ports.get(&port).is_some_and(|p| p.opts.router_port) {
            self.actions.push(Action::RouterPortsChanged(Family::V4));
            self.actions.push(Action::RouterPortsChanged(Family::V6));
        }
    }

    /// Removes a port and everything learned on it.
    pub fn remove_port(&mut self, port: u32) {
        let Some(state) = self.ports.remove(&port) else { return };
        for family in [Family::V4, Family::V6] {
            if state.is_router(family) {
                self.actions.push(Action::RouterPortsChanged(family));
            }
        }
        let groups: Vec<IpAddr> =
            self.groups.iter().filter(|(_, m)| m.contains_key(&port)).map(|(g, _)| *g).collect();
        for group in groups {
            let before = self.forwarding(&group);
            if let Some(m) = self.groups.get_mut(&group) {
                m.remove(&port);
                if m.is_empty() {
                    self.groups.remove(&group);
                }
            }
            self.announce_if_changed(group, &before);
        }
        self.port_groups.remove(&port);
    }

    /// Ports currently known.
    pub fn ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports.keys().copied()
    }

    /// Processes a message received on `port` at `now`.
    pub fn handle(&mut self, now: Duration, port: u32, msg: &Message) {
        if !self.ports.contains_key(&port) {
            return;
        }
        let family = Family::of(&msg.source);
        match &msg.kind {
            MessageKind::Query(q) => self.on_query(now, port, msg.source, q),
            MessageKind::PimHello => {
                self.mark_router(now, port, family, RouterSignal::PimHello, msg.source)
            }
            MessageKind::RouterAdvertisement => {
                self.mark_router(now, port, family, RouterSignal::RouterAdvertisement, msg.source)
            }
            MessageKind::V1Report { group } => {
                if family == Family::V4 {
                    self.process(now, port, *group, family, Op::V1Report, &BTreeSet::new());
                }
            }
            MessageKind::V2Report { group } => {
                self.process(now, port, *group, family, Op::V2Report, &BTreeSet::new())
            }
            MessageKind::Leave { group } => {
                self.process(now, port, *group, family, Op::Leave, &BTreeSet::new())
            }
            MessageKind::V3Report { records } => {
                for r in records {
                    let sources = r.sources.iter().copied().collect();
                    self.process(now, port, r.group, family, Op::Record(r.kind), &sources);
                }
            }
        }
    }

    /// Runs every timer due at or before `now`.
    pub fn tick(&mut self, now: Duration) {
        let ports: Vec<u32> = self.ports.keys().copied().collect();
        for port in ports {
            for family in [Family::V4, Family::V6] {
                self.tick_port(now, port, family);
            }
        }
        let due: Vec<IpAddr> =
            self.deadlines.iter().take_while(|(at, _)| *at <= now).map(|(_, g)| *g).collect();
        for group in due {
            let before = self.forwarding(&group);
            let Engine { cfg, ports, groups, actions, port_groups, .. } = self;
            if let Some(m) = groups.get_mut(&group) {
                for (port, entry) in m.iter_mut() {
                    if entry.retx_at.is_some_and(|t| t <= now) {
                        match ports.get(port) {
                            Some(p) if p.sends_queries(Family::of(&group)) => {
                                send_pending(cfg, p, *port, group, entry, now, actions)
                            }
                            _ => {
                                entry.retx_group = 0;
                                entry.retx_sources.clear();
                                entry.retx_at = None;
                            }
                        }
                    }
                    entry.expire(now);
                }
                m.retain(|port, e| {
                    let keep = !e.is_empty();
                    if !keep {
                        if let Some(n) = port_groups.get_mut(port) {
                            *n = n.saturating_sub(1);
                        }
                    }
                    keep
                });
                if m.is_empty() {
                    groups.remove(&group);
                }
            }
            self.announce_if_changed(group, &before);
        }
    }

    /// When `tick` must run next (`None`: nothing scheduled).
    pub fn next_deadline(&self) -> Option<Duration> {
        let ports = self.ports.values().flat_map(|p| {
            let q4 = if p.sends_queries(Family::V4) { p.q4.next_query } else { None };
            let q6 = if p.sends_queries(Family::V6) { p.q6.next_query } else { None };
            [q4, q6, p.q4.other_until, p.q6.other_until, p.router4, p.router6].into_iter().flatten()
        });
        let entries = self.deadlines.first().map(|(at, _)| *at);
        debug_assert_eq!(
            entries,
            self.groups.values().flat_map(|m| m.values().filter_map(Entry::deadline)).min(),
            "the deadline index is out of step with the entries"
        );
        ports.chain(entries).min()
    }

    /// Actions accumulated since the last call.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Which ports receive `group`, by source.
    pub fn forwarding(&self, group: &IpAddr) -> Forwarding {
        let mut f = Forwarding::default();
        let Some(m) = self.groups.get(group) else { return f };
        let ssm = is_ssm(group);
        let named: BTreeSet<IpAddr> = m.values().flat_map(|e| e.sources.keys().copied()).collect();
        for s in named {
            let ports = m.iter().filter(|(_, e)| e.accepts(&s, ssm)).map(|(p, _)| *p).collect();
            f.per_source.insert(s, ports);
        }
        if !ssm {
            f.any_source =
                m.iter().filter(|(_, e)| e.mode == FilterMode::Exclude).map(|(p, _)| *p).collect();
        }
        f
    }

    /// Learned groups, with timers relative to `now`.
    pub fn groups(&self, now: Duration) -> impl Iterator<Item = GroupSnapshot> + '_ {
        self.groups.iter().map(move |(group, m)| GroupSnapshot {
            group: *group,
            ports: m
                .iter()
                .map(|(port, e)| PortSnapshot {
                    port: *port,
                    mode: e.mode,
                    group_timer: match e.mode {
                        FilterMode::Exclude => e.group_timer.map(|t| t.saturating_sub(now)),
                        FilterMode::Include => None,
                    },
                    sources: e
                        .sources
                        .iter()
                        .map(|(s, t)| SourceSnapshot {
                            source: *s,
                            timer: t.map(|t| t.saturating_sub(now)),
                        })
                        .collect(),
                    compat: e.compat(now, Family::of(group)),
                })
                .collect(),
        })
    }

    /// Router ports for a family: configured ones and those where router signals were heard.
    pub fn router_ports(&self, family: Family) -> BTreeSet<u32> {
        self.ports.iter().filter(|(_, p)| p.is_router(family)).map(|(i, _)| *i).collect()
    }

    /// The address `port` sends from for `family` (unspecified when it has none).
    pub fn port_address(&self, port: u32, family: Family) -> Option<IpAddr> {
        self.ports.get(&port).map(|p| p.opts.addr(family))
    }

    /// The current querier of `port` for `family`, if any is known.
    pub fn querier(&self, port: u32, family: Family) -> Option<QuerierStatus> {
        let p = self.ports.get(&port)?;
        let q = p.querier(family);
        if p.sends_queries(family) {
            Some(QuerierStatus { address: p.opts.addr(family), is_self: true })
        } else {
            q.other.map(|address| QuerierStatus { address, is_self: false })
        }
    }

    // -----------------------------------------------------------------------------------------

    /// Files `group` under its earliest timer (or nowhere, when it has none or is gone).
    fn reindex(&mut self, group: IpAddr) {
        let next =
            self.groups.get(&group).and_then(|m| m.values().filter_map(Entry::deadline).min());
        let old = match next {
            Some(at) => self.deadline_of.insert(group, at),
            None => self.deadline_of.remove(&group),
        };
        if old != next {
            if let Some(at) = old {
                self.deadlines.remove(&(at, group));
            }
            if let Some(at) = next {
                self.deadlines.insert((at, group));
            }
        }
    }

    /// Ends every change of a group's entries: re-files its timers and announces a changed
    /// port set.
    fn announce_if_changed(&mut self, group: IpAddr, before: &Forwarding) {
        self.reindex(group);
        if self.forwarding(&group) != *before {
            let action = Action::GroupChanged(group);
            if !self.actions.contains(&action) {
                self.actions.push(action);
            }
        }
    }

    fn send_general(&mut self, now: Duration, port: u32, family: Family) {
        let cfg = &self.cfg;
        let Some(p) = self.ports.get_mut(&port) else { return };
        let version = p.opts.query_version(family);
        let query = Query {
            version,
            group: None,
            max_resp: cfg.query_response_interval,
            suppress: false,
            qrv: if version.has_sources() { cfg.qrv_field() } else { 0 },
            qqi: if version.has_sources() { cfg.query_interval } else { Duration::ZERO },
            sources: Vec::new(),
        };
        let source = p.opts.addr(family);
        let q = p.querier_mut(family);
        q.startup_left = q.startup_left.saturating_sub(1);
        let next = if q.startup_left > 0 { cfg.startup_interval() } else { cfg.query_interval };
        q.next_query = Some(now + next);
        self.actions.push(Action::SendQuery { port, source, query });
    }

    fn tick_port(&mut self, now: Duration, port: u32, family: Family) {
        let Some(p) = self.ports.get_mut(&port) else { return };
        let enabled = p.opts.querier;
        let is_static = p.opts.router_port;
        let router = p.router_mut(family);
        if expired(router, now) {
            *router = None;
            if !is_static {
                self.actions.push(Action::RouterPortsChanged(family));
            }
        }
        let q = p.querier_mut(family);
        if expired(&q.other_until, now) {
            q.other = None;
            q.other_until = None;
            if enabled {
                // Other querier present timer expired: we are querier again (RFC 3376 6.6.2).
                q.active = true;
                q.startup_left = 0;
                self.send_general(now, port, family);
            }
        } else if enabled && q.active && expired(&q.next_query, now) {
            self.send_general(now, port, family);
        }
    }

    fn mark_router(
        &mut self,
        now: Duration,
        port: u32,
        family: Family,
        signal: RouterSignal,
        from: IpAddr,
    ) {
        let oqpi = self.cfg.other_querier_present();
        let Some(p) = self.ports.get_mut(&port) else { return };
        if !p.opts.learn_routers {
            let event = RouterEvent { port, family, signal, from, learned: false };
            self.router_events.push(event);
            return;
        }
        let was = p.is_router(family);
        *p.router_mut(family) = Some(now + oqpi);
        if !was {
            self.actions.push(Action::RouterPortsChanged(family));
            self.router_events.push(RouterEvent { port, family, signal, from, learned: true });
        }
    }

    /// Router signals heard since the last call: ports that became router ports, and signals
    /// ignored on ports that do not learn routers.
    pub fn take_router_events(&mut self) -> Vec<RouterEvent> {
        std::mem::take(&mut self.router_events)
    }

    fn on_query(&mut self, now: Duration, port: u32, source: IpAddr, q: &Query) {
        let family = Family::of(&source);
        if q.version.family() != family {
            return;
        }
        let Some(p) = self.ports.get(&port) else { return };
        let ours = p.opts.addr(family);
        if !ours.is_unspecified() && source == ours {
            return; // our own query, looped back
        }
        if !source.is_unspecified() {
            self.mark_router(now, port, family, RouterSignal::Query, source);
        }
        let cfg = &self.cfg;
        if let Some(p) = self.ports.get_mut(&port) {
            let enabled = p.opts.querier;
            let qs = p.querier_mut(family);
            if !enabled || beats(&source, &ours) {
                let replace = match qs.other {
                    _ if qs.active => true,
                    None => true,
                    Some(cur) => cur == source || beats(&source, &cur),
                };
                if replace {
                    if qs.other != Some(source) {
                        qs.announced = None;
                    }
                    qs.announced = Some(announced(q, qs.announced, cfg));
                    qs.active = false;
                    qs.other = Some(source);
                    qs.next_query = None;
                    qs.startup_left = 0;
                    let oqpi = p.timers(family, cfg).other_querier_present();
                    p.querier_mut(family).other_until = Some(now + oqpi);
                }
            }
        }
        // Snooping (RFC 3376 6.6.1): a specific query without the S flag lowers our timers.
        let Some(group) = q.group else { return };
        if q.suppress || Family::of(&group) != family {
            return;
        }
        let lmqi =
            if q.max_resp.is_zero() { self.cfg.last_member_query_interval } else { q.max_resp };
        let to = now + lmqi * self.cfg.last_member_count();
        let Some(entry) = self.groups.get_mut(&group).and_then(|m| m.get_mut(&port)) else {
            return;
        };
        if q.sources.is_empty() {
            if entry.mode == FilterMode::Exclude {
                lower(&mut entry.group_timer, to);
            }
        } else {
            for s in &q.sources {
                if let Some(t) = entry.sources.get_mut(s) {
                    lower(t, to);
                }
            }
        }
        self.reindex(group);
    }

    fn process(
        &mut self,
        now: Duration,
        port: u32,
        group: IpAddr,
        family: Family,
        op: Op,
        b: &BTreeSet<IpAddr>,
    ) {
        if Family::of(&group) != family || !is_tracked(&group) || !self.ports.contains_key(&port) {
            return;
        }
        let ssm = is_ssm(&group);
        if ssm
            && matches!(
                op,
                Op::V1Report
                    | Op::V2Report
                    | Op::Record(RecordType::IsExclude | RecordType::ToExclude)
            )
        {
            // RFC 4604: no any-source membership in SSM groups; say why nothing happens.
            self.refused.push(Refused { port, group, why: Refusal::SsmAnySource });
            return;
        }
        if let Some(why) = self.refusal(port, group, &op, b) {
            self.refused.push(Refused { port, group, why });
            return;
        }
        let before = self.forwarding(&group);
        let Engine { cfg, ports, groups, actions, port_groups, .. } = self;
        let Some(p) = ports.get(&port) else { return };
        let timers = p.timers(family, cfg);
        let gmi = timers.gmi();
        let m = groups.entry(group).or_default();
        let entry = m.entry(port).or_insert_with(|| {
            *port_groups.entry(port).or_default() += 1;
            Entry::default()
        });
        entry.expire(now);
        let compat = entry.compat(now, family);
        let older = matches!(compat, CompatMode::IgmpV1 | CompatMode::IgmpV2 | CompatMode::MldV1);
        let empty = BTreeSet::new();
        // Host compatibility translation (RFC 3376 7.3.2, RFC 3810 8.3.2) and SSM (RFC 4604:
        // no EXCLUDE-mode and no v1/v2 joins for SSM groups).
        let step = match op {
            Op::V1Report | Op::V2Report if ssm => None,
            Op::V1Report => {
                entry.v1_host = Some(now + gmi);
                Some((RecordType::IsExclude, &empty))
            }
            Op::V2Report => {
                entry.v2_host = Some(now + gmi);
                Some((RecordType::IsExclude, &empty))
            }
            Op::Leave if ssm || compat == CompatMode::IgmpV1 => None,
            Op::Leave => Some((RecordType::ToInclude, &empty)),
            Op::Record(RecordType::IsExclude | RecordType::ToExclude) if ssm => None,
            Op::Record(RecordType::BlockOld) if older => None,
            Op::Record(RecordType::ToExclude) if older => Some((RecordType::ToExclude, &empty)),
            Op::Record(kind) => Some((kind, b)),
        };
        if let Some((kind, sources)) = step {
            let (qg, qgs) = entry.apply(now, gmi, kind, sources);
            if qg || !qgs.is_empty() {
                queue_specific_queries(cfg, p, port, group, entry, now, qg, &qgs, actions);
            }
        }
        if entry.is_empty() {
            m.remove(&port);
            if let Some(n) = port_groups.get_mut(&port) {
                *n = n.saturating_sub(1);
            }
        }
        if m.is_empty() {
            groups.remove(&group);
        }
        self.announce_if_changed(group, &before);
    }

    /// Which limit, if any, refuses what `op` would add for (`port`, `group`). Only new state
    /// is refused: a refresh of what exists always passes, as does anything that only removes.
    fn refusal(&self, port: u32, group: IpAddr, op: &Op, b: &BTreeSet<IpAddr>) -> Option<Refusal> {
        let adds = match op {
            Op::Leave | Op::Record(RecordType::BlockOld) => false,
            Op::Record(RecordType::ToInclude | RecordType::IsInclude | RecordType::AllowNew) => {
                !b.is_empty()
            }
            _ => true,
        };
        if !adds {
            return None;
        }
        let members = self.groups.get(&group);
        if members.is_none() && self.groups.len() >= self.limits.max_groups {
            return Some(Refusal::MaxGroups);
        }
        if !members.is_some_and(|m| m.contains_key(&port))
            && self.port_groups.get(&port).copied().unwrap_or(0) >= self.limits.max_groups_per_port
        {
            return Some(Refusal::MaxGroupsPerPort);
        }
        if !b.is_empty() {
            let known: BTreeSet<&IpAddr> = members
                .into_iter()
                .flat_map(|m| m.values())
                .flat_map(|e| e.sources.keys())
                .collect();
            let new = b.iter().filter(|s| !known.contains(s)).count();
            if new > 0 && known.len() + new > self.limits.max_sources_per_group {
                return Some(Refusal::MaxSourcesPerGroup);
            }
        }
        None
    }
}

/// Election: `a` beats `b` when numerically lower. A query from the unspecified address never
/// wins (it cannot be told apart from our own looped-back query when we have no address), and
/// any specified address beats an unspecified one.
fn beats(a: &IpAddr, b: &IpAddr) -> bool {
    if a.is_unspecified() {
        return false;
    }
    b.is_unspecified() || a < b
}

/// Handles "Send Q(G)" / "Send Q(G,S)" table actions (RFC 3376 6.6.3): with fast leave the
/// queried timers expire at once; as querier, lower them to LMQT and start the LMQC queries;
/// otherwise nothing (the querier's queries are snooped).
#[expect(
    clippy::too_many_arguments,
    reason = "the RFC 3376 6.6.3 action needs the port, the entry and both query kinds; a struct \
              of borrows would only rename them"
)]
fn queue_specific_queries(
    cfg: &Config,
    p: &PortState,
    port: u32,
    group: IpAddr,
    entry: &mut Entry,
    now: Duration,
    qg: bool,
    qgs: &BTreeSet<IpAddr>,
    actions: &mut Vec<Action>,
) {
    let family = Family::of(&group);
    if p.opts.fast_leave {
        for s in qgs {
            if let Some(t) = entry.sources.get_mut(s) {
                lower(t, now);
            }
        }
        if qg && entry.mode == FilterMode::Exclude {
            lower(&mut entry.group_timer, now);
        }
        entry.expire(now);
        return;
    }
    if !p.sends_queries(family) {
        return;
    }
    let to = now + cfg.lmqt();
    let count = cfg.last_member_count();
    if p.opts.query_version(family).has_sources() {
        for s in qgs {
            if let Some(t) = entry.sources.get_mut(s) {
                if t.is_some() {
                    lower(t, to);
                    entry.retx_sources.insert(*s, count);
                }
            }
        }
    }
    if qg && entry.mode == FilterMode::Exclude {
        lower(&mut entry.group_timer, to);
        entry.retx_group = count;
    }
    if entry.retx_group > 0 || !entry.retx_sources.is_empty() {
        send_pending(cfg, p, port, group, entry, now, actions);
    }
}

/// Sends the pending group-specific and group-and-source-specific queries of one entry and
/// schedules the next retransmission (RFC 3376 6.6.3.1, 6.6.3.2).
fn send_pending(
    cfg: &Config,
    p: &PortState,
    port: u32,
    group: IpAddr,
    entry: &mut Entry,
    now: Duration,
    actions: &mut Vec<Action>,
) {
    let family = Family::of(&group);
    let version = p.opts.query_version(family);
    let source = p.opts.addr(family);
    let lmqt_at = now + cfg.lmqt();
    let query = |sources: Vec<IpAddr>, suppress: bool| Query {
        version,
        group: Some(group),
        max_resp: cfg.last_member_query_interval,
        suppress: suppress && version.has_sources(),
        qrv: if version.has_sources() { cfg.qrv_field() } else { 0 },
        qqi: if version.has_sources() { cfg.query_interval } else { Duration::ZERO },
        sources,
    };
    if entry.retx_group > 0 {
        entry.retx_group -= 1;
        let suppress = running(&entry.group_timer, lmqt_at);
        if !suppress {
            lower(&mut entry.group_timer, lmqt_at);
        }
        actions.push(Action::SendQuery { port, source, query: query(Vec::new(), suppress) });
    }
    if !entry.retx_sources.is_empty() {
        let (mut high, mut low) = (Vec::new(), Vec::new());
        for (s, n) in entry.retx_sources.iter_mut() {
            match entry.sources.get_mut(s) {
                Some(t @ Some(_)) => {
                    if running(t, lmqt_at) {
                        high.push(*s);
                    } else {
                        low.push(*s);
                    }
                    *n = n.saturating_sub(1);
                }
                _ => *n = 0,
            }
        }
        entry.retx_sources.retain(|_, n| *n > 0);
        let chunk = max_query_sources(family);
        for (list, suppress) in [(high, true), (low, false)] {
            for part in list.chunks(chunk) {
                actions.push(Action::SendQuery {
                    port,
                    source,
                    query: query(part.to_vec(), suppress),
                });
            }
        }
    }
    entry.retx_at = if entry.retx_group > 0 || !entry.retx_sources.is_empty() {
        Some(now + cfg.last_member_query_interval)
    } else {
        None
    };
}

#[cfg(test)]
mod tests;
