use super::*;
use crate::membership::packet::GroupRecord;

const G: &str = "239.1.1.1";
const S1: &str = "10.1.0.1";
const S2: &str = "10.1.0.2";
const S3: &str = "10.1.0.3";
const HOST: &str = "192.0.2.100";

fn a(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn t(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

const GMI: Duration = Duration::from_secs(260);
const LMQT: Duration = Duration::from_secs(2);

fn opts(v4: &str) -> PortOptions {
    PortOptions {
        ipv4: Some(v4.parse().expect("v4")),
        ipv6: Some("fe80::1".parse().expect("v6")),
        ..PortOptions::default()
    }
}

fn set(items: &[u32]) -> BTreeSet<u32> {
    items.iter().copied().collect()
}

struct H {
    e: Engine,
}

impl H {
    /// Port 1 (querier, 192.0.2.1) added at t=0, startup actions discarded.
    fn new() -> H {
        H::with_port(opts("192.0.2.1"))
    }

    fn with_port(o: PortOptions) -> H {
        let mut e = Engine::new(Config::default());
        e.add_port(t(0), 1, o);
        e.take_actions();
        H { e }
    }

    fn msg(&mut self, now: Duration, port: u32, src: &str, kind: MessageKind) {
        self.e.handle(now, port, &Message { source: a(src), kind });
    }

    fn rec(&mut self, now: Duration, port: u32, kind: RecordType, group: &str, sources: &[&str]) {
        let src = if a(group).is_ipv4() { HOST } else { "fe80::100" };
        let records = vec![GroupRecord {
            kind,
            group: a(group),
            sources: sources.iter().map(|s| a(s)).collect(),
        }];
        self.msg(now, port, src, MessageKind::V3Report { records });
    }

    fn take(&mut self) -> Vec<Action> {
        self.e.take_actions()
    }

    /// Queries sent since the last call (other actions are dropped).
    fn queries(&mut self) -> Vec<(u32, Query)> {
        self.take()
            .into_iter()
            .filter_map(|x| match x {
                Action::SendQuery { port, query, .. } => Some((port, query)),
                _ => None,
            })
            .collect()
    }

    fn snap(&self, now: Duration, group: &str, port: u32) -> Option<PortSnapshot> {
        self.e
            .groups(now)
            .find(|g| g.group == a(group))
            .and_then(|g| g.ports.into_iter().find(|p| p.port == port))
    }

    /// Sources of (G, port 1) with remaining timers.
    fn sources(&self, now: Duration) -> Vec<(IpAddr, Option<Duration>)> {
        self.snap(now, G, 1)
            .map(|p| p.sources.into_iter().map(|s| (s.source, s.timer)).collect())
            .unwrap_or_default()
    }

    fn mode(&self, now: Duration) -> Option<(FilterMode, Option<Duration>)> {
        self.snap(now, G, 1).map(|p| (p.mode, p.group_timer))
    }

    /// Builds EXCLUDE({S1}, {S2}) on port 1 at t=0: INCLUDE({S1}) + IS_EX({S1, S2}).
    fn exclude_s1_s2() -> H {
        let mut h = H::new();
        h.rec(t(0), 1, RecordType::IsInclude, G, &[S1]);
        h.rec(t(0), 1, RecordType::IsExclude, G, &[S1, S2]);
        assert_eq!(h.mode(t(0)), Some((FilterMode::Exclude, Some(GMI))));
        assert_eq!(h.sources(t(0)), vec![(a(S1), Some(GMI)), (a(S2), None)]);
        h.take();
        h
    }

    /// INCLUDE({S1, S2}) on port 1 at t=0.
    fn include_s1_s2() -> H {
        let mut h = H::new();
        h.rec(t(0), 1, RecordType::IsInclude, G, &[S1, S2]);
        h.take();
        h
    }
}

fn gsq(group: &str, sources: &[&str], suppress: bool) -> Query {
    Query {
        version: QueryVersion::IgmpV3,
        group: Some(a(group)),
        max_resp: t(1),
        suppress,
        qrv: 2,
        qqi: t(125),
        sources: sources.iter().map(|s| a(s)).collect(),
    }
}

fn general_v3() -> Query {
    Query {
        version: QueryVersion::IgmpV3,
        group: None,
        max_resp: t(10),
        suppress: false,
        qrv: 2,
        qqi: t(125),
        sources: vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// Config

#[test]
fn config_defaults_and_derived_values() {
    let c = Config::default();
    assert_eq!(c.gmi(), t(260));
    assert_eq!(c.other_querier_present(), t(255));
    assert_eq!(c.startup_interval(), ms(31_250));
    assert_eq!(c.startup_count(), 2);
    assert_eq!(c.last_member_count(), 2);
    assert_eq!(c.lmqt(), t(2));
    let c = Config { robustness: 3, query_interval: t(60), ..Config::default() };
    assert_eq!(c.gmi(), t(190));
    assert_eq!(c.other_querier_present(), t(185));
    assert_eq!(c.startup_count(), 3);
    assert_eq!(c.lmqt(), t(3));
    let c = Config { group_membership_interval: Some(t(30)), ..Config::default() };
    assert_eq!(c.gmi(), t(30));
}

// ---------------------------------------------------------------------------------------------
// RFC 3376 6.4 tables

#[test]
fn include_plus_allow() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::AllowNew, G, &[S3]);
    assert_eq!(h.mode(t(10)), Some((FilterMode::Include, None)));
    assert_eq!(
        h.sources(t(10)),
        vec![(a(S1), Some(t(250))), (a(S2), Some(t(250))), (a(S3), Some(GMI))]
    );
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
}

#[test]
fn include_plus_is_in_refreshes() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::IsInclude, G, &[S2]);
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(t(250))), (a(S2), Some(GMI))]);
    assert_eq!(h.take(), vec![], "refresh changes no forwarding");
}

#[test]
fn include_plus_is_ex() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::IsExclude, G, &[S2, S3]);
    // EXCLUDE(A*B, B-A): S2 keeps its timer, S3 blocked, S1 deleted, group timer GMI.
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(GMI))));
    assert_eq!(h.sources(t(10)), vec![(a(S2), Some(t(250))), (a(S3), None)]);
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    let f = h.e.forwarding(&a(G));
    assert_eq!(f.any_source, set(&[1]));
    assert_eq!(f.per_source[&a(S2)], set(&[1]));
    assert_eq!(f.per_source[&a(S3)], set(&[]));
}

#[test]
fn include_plus_to_ex() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::ToExclude, G, &[S2, S3]);
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(GMI))));
    // Q(G, A*B) = Q(G, {S2}): S2 lowered to LMQT.
    assert_eq!(h.sources(t(10)), vec![(a(S2), Some(LMQT)), (a(S3), None)]);
    let actions = h.take();
    assert!(actions.contains(&Action::GroupChanged(a(G))));
    assert!(actions.contains(&Action::SendQuery {
        port: 1,
        source: a("192.0.2.1"),
        query: gsq(G, &[S2], false)
    }));
    assert_eq!(h.e.next_deadline(), Some(t(11)));
    h.e.tick(t(11));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S2], false))], "retransmission");
    h.e.tick(t(12));
    assert_eq!(h.queries(), vec![]);
    // S2 expired in EXCLUDE mode: kept, now blocked.
    assert_eq!(h.sources(t(12)), vec![(a(S2), None), (a(S3), None)]);
    let f = h.e.forwarding(&a(G));
    assert_eq!(f.any_source, set(&[1]));
    assert_eq!(f.per_source[&a(S2)], set(&[]));
}

#[test]
fn include_plus_block() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::BlockOld, G, &[S2, S3]);
    assert_eq!(h.mode(t(10)), Some((FilterMode::Include, None)));
    // Q(G, A*B) = Q(G, {S2}); S3 is not added.
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(t(250))), (a(S2), Some(LMQT))]);
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S2], false))]);
    h.e.tick(t(11));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S2], false))]);
    h.e.tick(t(12));
    assert_eq!(h.sources(t(12)), vec![(a(S1), Some(t(248)))]);
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    // Blocking the last source removes the group after LMQT.
    h.rec(t(20), 1, RecordType::BlockOld, G, &[S1]);
    h.take();
    h.e.tick(t(21));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S1], false))]);
    h.e.tick(t(22));
    assert!(h.snap(t(22), G, 1).is_none());
    assert_eq!(h.e.groups(t(22)).count(), 0);
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    assert!(h.e.forwarding(&a(G)).is_empty());
}

#[test]
fn include_block_answered_keeps_source() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::BlockOld, G, &[S2]);
    h.take();
    // Another host still wants S2: its report restores the timer; the retransmission then
    // carries S2 with the suppress flag.
    h.rec(ms(10_500), 1, RecordType::IsInclude, G, &[S2]);
    h.e.tick(t(11));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S2], true))]);
    h.e.tick(t(30));
    assert_eq!(h.sources(t(30))[1], (a(S2), Some(ms(240_500))));
}

#[test]
fn include_plus_to_in() {
    let mut h = H::include_s1_s2();
    h.rec(t(10), 1, RecordType::ToInclude, G, &[S2, S3]);
    assert_eq!(h.mode(t(10)), Some((FilterMode::Include, None)));
    // INCLUDE(A+B), (B)=GMI, Q(G, A-B) = Q(G, {S1}).
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(LMQT)), (a(S2), Some(GMI)), (a(S3), Some(GMI))]);
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S1], false))]);
    h.e.tick(t(12));
    assert_eq!(h.sources(t(12)), vec![(a(S2), Some(t(258))), (a(S3), Some(t(258)))]);
}

#[test]
fn exclude_plus_allow() {
    let mut h = H::exclude_s1_s2();
    h.rec(t(10), 1, RecordType::AllowNew, G, &[S2, S3]);
    // EXCLUDE(X+A, Y-A), (A)=GMI.
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(t(250)))));
    assert_eq!(
        h.sources(t(10)),
        vec![(a(S1), Some(t(250))), (a(S2), Some(GMI)), (a(S3), Some(GMI))]
    );
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    assert_eq!(h.e.forwarding(&a(G)).per_source[&a(S2)], set(&[1]));
}

#[test]
fn exclude_plus_is_in() {
    let mut h = H::exclude_s1_s2();
    h.rec(t(10), 1, RecordType::IsInclude, G, &[S2, S3]);
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(t(250)))));
    assert_eq!(
        h.sources(t(10)),
        vec![(a(S1), Some(t(250))), (a(S2), Some(GMI)), (a(S3), Some(GMI))]
    );
    assert_eq!(h.queries(), vec![]);
}

#[test]
fn exclude_plus_block() {
    let mut h = H::exclude_s1_s2();
    h.rec(t(10), 1, RecordType::BlockOld, G, &[S1, S2, S3]);
    // EXCLUDE(X+(A-Y), Y), (A-X-Y)=Group Timer, Q(G, A-Y) = Q(G, {S1, S3}); both lowered.
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(t(250)))));
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(LMQT)), (a(S2), None), (a(S3), Some(LMQT))]);
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S1, S3], false))]);
    h.e.tick(t(11));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S1, S3], false))]);
    h.e.tick(t(12));
    assert_eq!(h.sources(t(12)), vec![(a(S1), None), (a(S2), None), (a(S3), None)]);
    let f = h.e.forwarding(&a(G));
    assert_eq!(f.any_source, set(&[1]));
    assert!(f.per_source.values().all(BTreeSet::is_empty));
}

#[test]
fn exclude_block_without_querier_uses_group_timer() {
    let mut h = H::with_port(PortOptions { querier: false, ..opts("192.0.2.1") });
    h.rec(t(0), 1, RecordType::IsExclude, G, &[S2]);
    h.rec(t(10), 1, RecordType::BlockOld, G, &[S3]);
    assert_eq!(h.sources(t(10)), vec![(a(S2), None), (a(S3), Some(t(250)))]);
    assert_eq!(h.queries(), vec![], "not querier: no queries");
}

#[test]
fn exclude_plus_to_in() {
    let mut h = H::exclude_s1_s2();
    h.rec(t(10), 1, RecordType::ToInclude, G, &[S2]);
    // EXCLUDE(X+A, Y-A), (A)=GMI, Q(G, X-A) = Q(G, {S1}), Q(G): group timer lowered.
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(LMQT))));
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(LMQT)), (a(S2), Some(GMI))]);
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], false)), (1, gsq(G, &[S1], false))]);
    h.e.tick(t(11));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], false)), (1, gsq(G, &[S1], false))]);
    assert_eq!(h.e.next_deadline(), Some(t(12)));
    h.e.tick(t(12));
    // Group timer expired: INCLUDE with the sources whose timers still run.
    assert_eq!(h.mode(t(12)), Some((FilterMode::Include, None)));
    assert_eq!(h.sources(t(12)), vec![(a(S2), Some(t(258)))]);
    let f = h.e.forwarding(&a(G));
    assert!(f.any_source.is_empty());
    assert_eq!(f.per_source, BTreeMap::from([(a(S2), set(&[1]))]));
    assert!(h.take().contains(&Action::GroupChanged(a(G))));
}

#[test]
fn exclude_plus_is_ex() {
    let mut h = H::exclude_s1_s2();
    h.rec(t(10), 1, RecordType::IsExclude, G, &[S2, S3]);
    // EXCLUDE(A-Y, Y*A): S3 new = GMI, S2 stays blocked, S1 deleted; group timer GMI.
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(GMI))));
    assert_eq!(h.sources(t(10)), vec![(a(S2), None), (a(S3), Some(GMI))]);
    assert_eq!(h.queries(), vec![]);
}

#[test]
fn exclude_plus_to_ex() {
    let mut h = H::exclude_s1_s2();
    h.rec(t(10), 1, RecordType::ToExclude, G, &[S1, S2, S3]);
    // EXCLUDE(A-Y, Y*A), (A-X-Y)=Group Timer, Q(G, A-Y) = Q(G, {S1, S3}), group timer GMI.
    assert_eq!(h.mode(t(10)), Some((FilterMode::Exclude, Some(GMI))));
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(LMQT)), (a(S2), None), (a(S3), Some(LMQT))]);
    assert_eq!(h.queries(), vec![(1, gsq(G, &[S1, S3], false))]);
}

#[test]
fn group_timer_expiry_switches_to_include() {
    let mut h = H::exclude_s1_s2();
    // S1 refreshed later: at group-timer expiry it is the only source left.
    h.rec(t(100), 1, RecordType::AllowNew, G, &[S1, S3]);
    h.take();
    assert_eq!(h.e.next_deadline(), Some(ms(31_250)), "startup query comes first");
    h.e.tick(t(125));
    h.e.tick(t(250));
    h.take();
    assert_eq!(h.mode(t(259)), Some((FilterMode::Exclude, Some(t(1)))));
    h.e.tick(t(260));
    assert_eq!(h.mode(t(260)), Some((FilterMode::Include, None)));
    assert_eq!(h.sources(t(260)), vec![(a(S1), Some(t(100))), (a(S3), Some(t(100)))]);
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    h.e.tick(t(360));
    assert!(h.snap(t(360), G, 1).is_none(), "deleted when INCLUDE with no sources");
}

// ---------------------------------------------------------------------------------------------
// IGMPv1/v2 and compatibility

#[test]
fn v2_join_and_leave_with_last_member_queries() {
    let mut h = H::new();
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a(G) });
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    assert_eq!(h.mode(t(0)), Some((FilterMode::Exclude, Some(GMI))));
    assert_eq!(h.snap(t(0), G, 1).map(|p| p.compat), Some(CompatMode::IgmpV2));
    assert_eq!(h.e.forwarding(&a(G)).any_source, set(&[1]));
    h.msg(t(5), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], false))]);
    assert_eq!(h.mode(t(5)), Some((FilterMode::Exclude, Some(LMQT))));
    h.e.tick(t(6));
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], false))]);
    assert_eq!(h.e.next_deadline(), Some(t(7)));
    h.e.tick(ms(6_999));
    assert!(h.snap(ms(6_999), G, 1).is_some());
    h.e.tick(t(7));
    assert!(h.snap(t(7), G, 1).is_none());
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    assert!(h.e.forwarding(&a(G)).is_empty());
}

#[test]
fn v2_leave_answered_by_report_keeps_group() {
    let mut h = H::new();
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a(G) });
    h.msg(t(5), 1, HOST, MessageKind::Leave { group: a(G) });
    h.take();
    h.msg(ms(5_500), 1, "192.0.2.101", MessageKind::V2Report { group: a(G) });
    h.e.tick(t(6));
    // Retransmission with the suppress flag: the group timer is above LMQT again.
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], true))]);
    h.e.tick(t(8));
    assert_eq!(h.mode(t(8)), Some((FilterMode::Exclude, Some(ms(257_500)))));
    assert_eq!(h.take(), vec![]);
}

#[test]
fn v2_querier_port_sends_v2_queries() {
    let mut e = Engine::new(Config::default());
    e.add_port(t(0), 1, PortOptions { igmp_version: IgmpVersion::V2, ..opts("192.0.2.1") });
    let q: Vec<Query> = e
        .take_actions()
        .into_iter()
        .filter_map(|x| match x {
            Action::SendQuery { query, .. } if query.version.family() == Family::V4 => Some(query),
            _ => None,
        })
        .collect();
    let general = Query {
        version: QueryVersion::IgmpV2,
        group: None,
        max_resp: t(10),
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: vec![],
    };
    assert_eq!(q, vec![general]);
    let mut h = H { e };
    h.msg(t(1), 1, HOST, MessageKind::V2Report { group: a(G) });
    h.msg(t(2), 1, HOST, MessageKind::Leave { group: a(G) });
    let specific = Query {
        version: QueryVersion::IgmpV2,
        group: Some(a(G)),
        max_resp: t(1),
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: vec![],
    };
    assert_eq!(h.queries(), vec![(1, specific)]);
    // Q(G,S) cannot be expressed in IGMPv2: no query, no timer lowering.
    h.rec(t(3), 1, RecordType::IsInclude, "239.2.2.2", &[S1]);
    h.rec(t(4), 1, RecordType::BlockOld, "239.2.2.2", &[S1]);
    assert_eq!(h.queries(), vec![]);
    let s = h.snap(t(4), "239.2.2.2", 1).expect("state");
    assert_eq!(s.sources[0].timer, Some(t(259)));
}

#[test]
fn fast_leave_removes_at_once() {
    let mut h = H::with_port(PortOptions { fast_leave: true, ..opts("192.0.2.1") });
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a(G) });
    h.take();
    h.msg(t(5), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))], "no queries");
    assert!(h.snap(t(5), G, 1).is_none());
    // IGMPv3: TO_IN(B) from EXCLUDE leaves INCLUDE(B) at once; BLOCK removes sources at once.
    h.rec(t(10), 1, RecordType::IsExclude, G, &[S1]);
    h.rec(t(11), 1, RecordType::ToInclude, G, &[S2, S3]);
    assert_eq!(h.mode(t(11)), Some((FilterMode::Include, None)));
    assert_eq!(h.sources(t(11)), vec![(a(S2), Some(GMI)), (a(S3), Some(GMI))]);
    h.rec(t(12), 1, RecordType::BlockOld, G, &[S2]);
    assert_eq!(h.sources(t(12)), vec![(a(S3), Some(t(259)))]);
    assert_eq!(h.queries(), vec![]);
}

#[test]
fn membership_times_out_after_gmi() {
    let mut h = H::with_port(PortOptions { querier: false, ..opts("192.0.2.1") });
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a(G) });
    h.take();
    assert_eq!(h.e.next_deadline(), Some(GMI));
    h.e.tick(t(259));
    assert!(h.snap(t(259), G, 1).is_some());
    assert_eq!(h.take(), vec![]);
    h.e.tick(GMI);
    assert!(h.snap(GMI, G, 1).is_none());
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    assert_eq!(h.e.next_deadline(), None);
}

#[test]
fn v1_host_present_ignores_leaves() {
    let mut h = H::new();
    h.msg(t(0), 1, HOST, MessageKind::V1Report { group: a(G) });
    assert_eq!(h.snap(t(0), G, 1).map(|p| p.compat), Some(CompatMode::IgmpV1));
    h.take();
    h.msg(t(1), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.queries(), vec![]);
    assert_eq!(h.mode(t(1)), Some((FilterMode::Exclude, Some(t(259)))));
    // v1 also implies the v2 rules: BLOCK ignored, TO_EX(x) = TO_EX({}).
    h.rec(t(2), 1, RecordType::ToExclude, G, &[S1]);
    assert_eq!(h.sources(t(2)), vec![]);
    // Once the v1 host timer (GMI) expires, leaves count again.
    h.rec(t(200), 1, RecordType::IsExclude, G, &[]);
    h.e.tick(t(260));
    assert_eq!(h.snap(t(260), G, 1).map(|p| p.compat), Some(CompatMode::IgmpV3));
    h.take();
    h.msg(t(261), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], false))]);
}

#[test]
fn v2_host_present_ignores_block_and_source_lists_of_to_ex() {
    let mut h = H::new();
    // INCLUDE({S1}) + v2 report = IS_EX({}): EXCLUDE({}, {}), S1 deleted.
    h.rec(t(0), 1, RecordType::IsInclude, G, &[S1]);
    h.msg(t(1), 1, HOST, MessageKind::V2Report { group: a(G) });
    assert_eq!(h.mode(t(1)), Some((FilterMode::Exclude, Some(GMI))));
    assert_eq!(h.sources(t(1)), vec![]);
    h.rec(t(1), 1, RecordType::AllowNew, G, &[S1]);
    assert_eq!(h.sources(t(1)), vec![(a(S1), Some(GMI))]);
    h.take();
    h.rec(t(2), 1, RecordType::BlockOld, G, &[S1]);
    assert_eq!(h.queries(), vec![], "BLOCK ignored");
    assert_eq!(h.sources(t(2)), vec![(a(S1), Some(t(259)))]);
    h.rec(t(3), 1, RecordType::ToExclude, G, &[S1, S2]);
    // TO_EX({}): EXCLUDE(A-Y, Y*A) with A = {} clears the lists.
    assert_eq!(h.sources(t(3)), vec![]);
    assert_eq!(h.mode(t(3)), Some((FilterMode::Exclude, Some(GMI))));
    // v2 leave is TO_IN({}).
    h.msg(t(4), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.queries(), vec![(1, gsq(G, &[], false))]);
}

// ---------------------------------------------------------------------------------------------
// MLD

#[test]
fn mldv1_report_and_done() {
    let g6 = "ff15::1234";
    let mut h = H::new();
    h.msg(t(0), 1, "fe80::100", MessageKind::V2Report { group: a(g6) });
    assert_eq!(h.take(), vec![Action::GroupChanged(a(g6))]);
    let s = h.snap(t(0), g6, 1).expect("state");
    assert_eq!((s.mode, s.compat), (FilterMode::Exclude, CompatMode::MldV1));
    h.msg(t(1), 1, "fe80::100", MessageKind::Leave { group: a(g6) });
    let q = Query {
        version: QueryVersion::MldV2,
        group: Some(a(g6)),
        max_resp: t(1),
        suppress: false,
        qrv: 2,
        qqi: t(125),
        sources: vec![],
    };
    let actions = h.take();
    assert_eq!(
        actions,
        vec![Action::SendQuery { port: 1, source: a("fe80::1"), query: q.clone() }]
    );
    h.e.tick(t(2));
    h.e.tick(t(3));
    assert!(h.snap(t(3), g6, 1).is_none());
    // MLDv2 source-specific in INCLUDE mode.
    h.rec(t(4), 1, RecordType::IsInclude, g6, &["2001:db8::1"]);
    assert_eq!(h.e.forwarding(&a(g6)).per_source[&a("2001:db8::1")], set(&[1]));
    // A family mismatch between report source and group is ignored.
    h.msg(t(5), 1, HOST, MessageKind::V2Report { group: a("ff15::9") });
    assert!(h.snap(t(5), "ff15::9", 1).is_none());
}

#[test]
fn link_local_groups_are_not_tracked() {
    let mut h = H::new();
    for g in ["224.0.0.251", "224.0.0.22", "ff02::fb", "ff01::1", "ff12::1"] {
        let src = if a(g).is_ipv4() { HOST } else { "fe80::100" };
        h.msg(t(0), 1, src, MessageKind::V2Report { group: a(g) });
        h.rec(t(0), 1, RecordType::IsExclude, g, &[]);
    }
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a("10.0.0.1") });
    assert_eq!(h.e.groups(t(0)).count(), 0);
    assert_eq!(h.take(), vec![]);
    assert!(is_tracked(&a("224.0.1.1")));
    assert!(is_tracked(&a("ff05::1")));
    assert!(is_tracked(&a("ff3e::1")));
    assert!(!is_tracked(&a("ff32::1")));
}

// ---------------------------------------------------------------------------------------------
// SSM

#[test]
fn ssm_groups_only_forward_requested_sources() {
    let g = "232.1.1.1";
    let mut h = H::new();
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a(g) });
    h.rec(t(0), 1, RecordType::IsExclude, g, &[]);
    h.rec(t(0), 1, RecordType::ToExclude, g, &[S1]);
    assert_eq!(h.e.groups(t(0)).count(), 0, "no EXCLUDE state or v2 joins for SSM");
    h.rec(t(1), 1, RecordType::IsInclude, g, &[S1]);
    h.rec(t(1), 2, RecordType::IsInclude, g, &[S1]);
    let f = h.e.forwarding(&a(g));
    assert!(f.any_source.is_empty());
    assert_eq!(f.per_source, BTreeMap::from([(a(S1), set(&[1]))]), "port 2 is unknown");
    let g6 = "ff3e::8000:1";
    h.rec(t(2), 1, RecordType::IsExclude, g6, &[]);
    h.rec(t(2), 1, RecordType::AllowNew, g6, &["2001:db8::5"]);
    let f = h.e.forwarding(&a(g6));
    assert!(f.any_source.is_empty());
    assert_eq!(f.per_source.len(), 1);
    assert!(is_ssm(&a("ff35::1")));
    assert!(!is_ssm(&a("ff3e:1::1")));
    assert!(!is_ssm(&a("ff1e::1")));
    assert!(!is_ssm(&a("233.1.1.1")));
}

// ---------------------------------------------------------------------------------------------
// Forwarding across ports

#[test]
fn forwarding_multi_port_mix() {
    let mut e = Engine::new(Config::default());
    for port in 1..=4 {
        e.add_port(t(0), port, PortOptions { querier: false, ..PortOptions::default() });
    }
    let mut h = H { e };
    h.rec(t(0), 1, RecordType::IsInclude, G, &[S1]); // INCLUDE({S1})
    h.rec(t(0), 2, RecordType::IsExclude, G, &[S1]); // EXCLUDE({}, {S1})
    h.msg(t(0), 3, HOST, MessageKind::V2Report { group: a(G) }); // EXCLUDE({}, {})
    h.rec(t(0), 4, RecordType::IsInclude, G, &[S2]); // INCLUDE({S2})
    let f = h.e.forwarding(&a(G));
    assert_eq!(f.any_source, set(&[2, 3]));
    assert_eq!(f.per_source[&a(S1)], set(&[1, 3]));
    assert_eq!(f.per_source[&a(S2)], set(&[2, 3, 4]));
    assert_eq!(f.ports_for(&a(S3)), &set(&[2, 3]));
    assert_eq!(f.ports_for(&a(S1)), &set(&[1, 3]));
    assert!(h.e.forwarding(&a("239.9.9.9")).is_empty());
    // Removing a port drops its state and announces the change.
    h.take();
    h.e.remove_port(3);
    assert_eq!(h.take(), vec![Action::GroupChanged(a(G))]);
    let f = h.e.forwarding(&a(G));
    assert_eq!(f.any_source, set(&[2]));
    assert_eq!(f.per_source[&a(S1)], set(&[1]));
    // Messages on unknown ports are ignored.
    h.msg(t(1), 3, HOST, MessageKind::V2Report { group: a(G) });
    assert_eq!(h.e.forwarding(&a(G)).any_source, set(&[2]));
}

// ---------------------------------------------------------------------------------------------
// Querier election, startup, snooping

#[test]
fn startup_queries_then_query_interval() {
    let mut e = Engine::new(Config::default());
    e.add_port(t(0), 1, opts("192.0.2.1"));
    let first = e.take_actions();
    assert_eq!(first.len(), 2, "IGMP and MLD");
    assert!(first.contains(&Action::SendQuery {
        port: 1,
        source: a("192.0.2.1"),
        query: general_v3()
    }));
    assert!(first.iter().any(|x| matches!(x,
        Action::SendQuery { source, query, .. }
            if *source == a("fe80::1") && query.version == QueryVersion::MldV2
                && query.group.is_none() && query.max_resp == t(10))));
    assert_eq!(
        e.querier(1, Family::V4),
        Some(QuerierStatus { address: a("192.0.2.1"), is_self: true })
    );
    let sqi = ms(31_250);
    assert_eq!(e.next_deadline(), Some(sqi));
    e.tick(sqi - ms(1));
    assert_eq!(e.take_actions(), vec![]);
    e.tick(sqi);
    assert_eq!(e.take_actions().len(), 2, "second startup query");
    assert_eq!(e.next_deadline(), Some(sqi + t(125)));
    e.tick(sqi + t(125));
    assert_eq!(e.take_actions().len(), 2);
    assert_eq!(e.next_deadline(), Some(sqi + t(250)));
}

#[test]
fn lower_address_wins_election_and_querier_takes_over_after_timeout() {
    let mut h = H::with_port(opts("192.0.2.5"));
    let other_q = MessageKind::Query(general_v3());
    // A higher address does not displace us.
    h.msg(t(1), 1, "192.0.2.9", other_q.clone());
    assert!(h.e.querier(1, Family::V4).is_some_and(|q| q.is_self));
    // A lower one does.
    h.msg(t(2), 1, "192.0.2.2", other_q.clone());
    assert_eq!(
        h.e.querier(1, Family::V4),
        Some(QuerierStatus { address: a("192.0.2.2"), is_self: false })
    );
    assert!(h.e.querier(1, Family::V6).is_some_and(|q| q.is_self), "per family");
    h.take();
    // No more IGMP general queries from us; MLD continues.
    h.e.tick(t(200));
    assert!(h.queries().iter().all(|(_, q)| q.version == QueryVersion::MldV2));
    // The other querier keeps querying every QI: we stay quiet.
    h.msg(t(127), 1, "192.0.2.2", other_q.clone());
    h.e.tick(t(381));
    assert!(h.queries().iter().all(|(_, q)| q.version == QueryVersion::MldV2));
    // It goes silent: after the other-querier-present interval we take over.
    assert!(h.e.next_deadline().is_some_and(|d| d <= t(127 + 255)));
    h.e.tick(t(127 + 255));
    let q = h.queries();
    assert!(q.contains(&(1, general_v3())), "{q:?}");
    assert!(h.e.querier(1, Family::V4).is_some_and(|q| q.is_self));
}

#[test]
fn port_without_address_loses_every_election() {
    let mut h = H::with_port(PortOptions::default());
    assert_eq!(
        h.e.querier(1, Family::V4),
        Some(QuerierStatus { address: a("0.0.0.0"), is_self: true })
    );
    h.msg(t(1), 1, "192.0.2.200", MessageKind::Query(general_v3()));
    assert_eq!(
        h.e.querier(1, Family::V4),
        Some(QuerierStatus { address: a("192.0.2.200"), is_self: false })
    );
    // Our own address-less query, looped back, does not make us give up.
    let mut h = H::with_port(PortOptions::default());
    h.msg(t(1), 1, "0.0.0.0", MessageKind::Query(general_v3()));
    assert!(h.e.querier(1, Family::V4).is_some_and(|q| q.is_self));
    // A querier without an address does not displace one that has an address.
    let mut h = H::new();
    h.msg(t(1), 1, "0.0.0.0", MessageKind::Query(general_v3()));
    assert!(h.e.querier(1, Family::V4).is_some_and(|q| q.is_self));
    assert!(h.e.router_ports(Family::V4).is_empty(), "0.0.0.0 queries are not from routers");
}

#[test]
fn querier_disabled_only_records_the_querier() {
    let mut h = H::with_port(PortOptions { querier: false, ..opts("192.0.2.1") });
    assert_eq!(h.e.querier(1, Family::V4), None);
    h.msg(t(1), 1, "192.0.2.9", MessageKind::Query(general_v3()));
    assert_eq!(
        h.e.querier(1, Family::V4),
        Some(QuerierStatus { address: a("192.0.2.9"), is_self: false })
    );
    h.e.tick(t(1 + 255));
    assert_eq!(h.e.querier(1, Family::V4), None);
    assert_eq!(h.queries(), vec![]);
}

#[test]
fn own_queries_looped_back_are_ignored() {
    let mut h = H::new();
    h.msg(t(1), 1, "192.0.2.1", MessageKind::Query(general_v3()));
    assert!(h.e.querier(1, Family::V4).is_some_and(|q| q.is_self));
    assert!(h.e.router_ports(Family::V4).is_empty());
}

#[test]
fn snooped_group_specific_query_lowers_timers() {
    // We are not querier (lower address present); the querier's specific queries stop
    // forwarding after LMQT when nobody answers.
    let mut h = H::new();
    h.msg(t(0), 1, "192.0.2.0", MessageKind::Query(general_v3()));
    h.msg(t(1), 1, HOST, MessageKind::V2Report { group: a(G) });
    h.msg(t(2), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.queries(), vec![], "non-querier sends nothing");
    assert_eq!(h.mode(t(2)), Some((FilterMode::Exclude, Some(t(259)))));
    h.msg(t(2), 1, "192.0.2.0", MessageKind::Query(gsq(G, &[], false)));
    assert_eq!(h.mode(t(2)), Some((FilterMode::Exclude, Some(LMQT))));
    // A retransmission does not extend it.
    h.msg(t(3), 1, "192.0.2.0", MessageKind::Query(gsq(G, &[], false)));
    assert_eq!(h.mode(t(3)), Some((FilterMode::Exclude, Some(t(1)))));
    h.e.tick(t(4));
    assert!(h.snap(t(4), G, 1).is_none());
    // Suppress flag set: no timer update.
    h.rec(t(10), 1, RecordType::IsInclude, G, &[S1, S2]);
    h.msg(t(10), 1, "192.0.2.0", MessageKind::Query(gsq(G, &[S1], true)));
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(GMI)), (a(S2), Some(GMI))]);
    // Source-specific query: only the listed sources.
    h.msg(t(10), 1, "192.0.2.0", MessageKind::Query(gsq(G, &[S1], false)));
    assert_eq!(h.sources(t(10)), vec![(a(S1), Some(LMQT)), (a(S2), Some(GMI))]);
    h.e.tick(t(12));
    assert_eq!(h.sources(t(12)), vec![(a(S2), Some(t(258)))]);
}

// ---------------------------------------------------------------------------------------------
// Router ports

#[test]
fn router_ports_are_learned_and_expire() {
    let mut e = Engine::new(Config::default());
    e.add_port(t(0), 1, opts("192.0.2.1"));
    e.add_port(t(0), 2, PortOptions { router_port: true, ..opts("192.0.2.1") });
    e.add_port(t(0), 3, opts("192.0.2.1"));
    let mut h = H { e };
    assert!(h.take().contains(&Action::RouterPortsChanged(Family::V4)));
    assert_eq!(h.e.router_ports(Family::V4), set(&[2]));
    h.msg(t(10), 1, "192.0.2.77", MessageKind::PimHello);
    assert!(h.take().contains(&Action::RouterPortsChanged(Family::V4)));
    assert_eq!(h.e.router_ports(Family::V4), set(&[1, 2]));
    assert_eq!(h.e.router_ports(Family::V6), set(&[2]));
    h.msg(t(20), 3, "fe80::77", MessageKind::RouterAdvertisement);
    assert_eq!(h.e.router_ports(Family::V6), set(&[2, 3]));
    h.msg(t(30), 1, "192.0.2.9", MessageKind::Query(general_v3()));
    // Refreshed by the query: expires OQPI after t=30.
    h.take();
    h.e.tick(t(30 + 254));
    assert_eq!(h.e.router_ports(Family::V4), set(&[1, 2]));
    assert_eq!(h.e.router_ports(Family::V6), set(&[2]), "port 3 expired at 275");
    h.e.tick(t(30 + 255));
    assert_eq!(h.e.router_ports(Family::V4), set(&[2]));
    assert!(h.take().contains(&Action::RouterPortsChanged(Family::V4)));
    h.e.remove_port(2);
    assert!(h.e.router_ports(Family::V4).is_empty());
}

#[test]
fn ports_that_do_not_learn_routers_ignore_router_signals_and_say_so() {
    let mut e = Engine::new(Config::default());
    e.add_port(t(0), 1, PortOptions { learn_routers: false, ..opts("192.0.2.1") });
    e.add_port(t(0), 2, opts("198.51.100.1"));
    let mut h = H { e };
    h.take();
    h.msg(t(1), 1, "192.0.2.5", MessageKind::PimHello);
    h.msg(t(1), 1, "192.0.2.5", MessageKind::Query(general_v3()));
    assert!(h.e.router_ports(Family::V4).is_empty(), "a VPN client cannot make itself a router");
    assert!(!h.take().contains(&Action::RouterPortsChanged(Family::V4)));
    let ignored = h.e.take_router_events();
    assert_eq!(ignored.len(), 2);
    assert!(ignored.iter().all(|e| !e.learned && e.port == 1 && e.from == a("192.0.2.5")));
    assert_eq!(ignored[0].signal, RouterSignal::PimHello);
    assert_eq!(ignored[1].signal, RouterSignal::Query);

    // The same signals make a learning port a router port, once per change.
    h.msg(t(2), 2, "198.51.100.7", MessageKind::PimHello);
    h.msg(t(3), 2, "198.51.100.7", MessageKind::PimHello);
    assert_eq!(h.e.router_ports(Family::V4), set(&[2]));
    let learned = h.e.take_router_events();
    assert_eq!(learned.len(), 1);
    assert!(learned[0].learned && learned[0].port == 2);

    // Turning learning off (a reload) ends the learned role at once.
    h.take();
    h.e.add_port(t(4), 2, PortOptions { learn_routers: false, ..opts("198.51.100.1") });
    assert!(h.e.router_ports(Family::V4).is_empty());
    assert!(h.take().contains(&Action::RouterPortsChanged(Family::V4)));
    // A configured router port stays one whatever it hears.
    h.e.add_port(
        t(5),
        1,
        PortOptions { learn_routers: false, router_port: true, ..opts("192.0.2.1") },
    );
    assert_eq!(h.e.router_ports(Family::V4), set(&[1]));
}

/// RFC 3376 4.1.6-4.1.7, 8.2-8.3: a non-querier uses the elected querier's robustness, query
/// interval and query response interval, so memberships outlive the gap between its queries.
#[test]
fn a_non_querier_uses_the_timers_the_querier_announces() {
    let mut h = H::new();
    let slow = Query { qrv: 3, qqi: t(300), max_resp: t(20), ..general_v3() };
    h.msg(t(0), 1, "192.0.2.0", MessageKind::Query(slow.clone()));
    assert_eq!(h.e.querier(1, Family::V4).map(|q| q.is_self), Some(false));
    h.rec(t(1), 1, RecordType::IsExclude, G, &[]);
    // 3 * 300 + 20 = 920 s, not our own 2 * 125 + 10 = 260 s.
    assert_eq!(h.mode(t(1)), Some((FilterMode::Exclude, Some(t(920)))));
    h.e.tick(t(600));
    assert!(h.mode(t(600)).is_some(), "expired between two of the querier's queries");
    // The querier keeps being present for its own other-querier-present interval
    // (3 * 300 + 20 / 2 = 910 s), not ours (255 s): we do not take over at 255.
    h.e.tick(t(300));
    assert_eq!(h.e.querier(1, Family::V4).map(|q| q.is_self), Some(false));
    // An IGMPv2 query announces only its response time; the rest stays.
    let v2 = Query {
        version: QueryVersion::IgmpV2,
        qrv: 0,
        qqi: Duration::ZERO,
        max_resp: t(5),
        ..general_v3()
    };
    h.msg(t(601), 1, "192.0.2.0", MessageKind::Query(v2));
    h.rec(t(602), 1, RecordType::IsExclude, G, &[]);
    assert_eq!(h.mode(t(602)).and_then(|m| m.1), Some(t(3 * 300 + 5)), "time left");
}

/// A port attached before it had a link-local address (a tap OpenVPN just created) starts its
/// MLD startup queries again, from the new address, as soon as it gets one.
#[test]
fn a_port_that_gets_an_address_queries_from_it_at_once() {
    let mut h = H::with_port(PortOptions { ipv6: None, ..opts("192.0.2.1") });
    h.e.tick(t(40));
    h.take();
    let ll: std::net::Ipv6Addr = "fe80::1".parse().expect("address");
    h.e.add_port(t(41), 1, PortOptions { ipv6: Some(ll), ..opts("192.0.2.1") });
    let sent: Vec<(IpAddr, QueryVersion)> = h
        .take()
        .into_iter()
        .filter_map(|x| match x {
            Action::SendQuery { source, query, .. } => Some((source, query.version)),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![(a("fe80::1"), QueryVersion::MldV2)], "only MLD, from the new address");
}

#[test]
fn our_own_timers_apply_again_when_the_other_querier_is_gone() {
    let mut h = H::new();
    let slow = Query { qrv: 3, qqi: t(300), max_resp: t(20), ..general_v3() };
    h.msg(t(0), 1, "192.0.2.0", MessageKind::Query(slow));
    h.e.tick(t(911));
    assert_eq!(h.e.querier(1, Family::V4).map(|q| q.is_self), Some(true), "took over after 910 s");
    h.rec(t(912), 1, RecordType::IsExclude, G, &[]);
    assert_eq!(h.mode(t(912)).and_then(|m| m.1), Some(GMI), "time left");
}

// ---------------------------------------------------------------------------------------------
// Deadlines

#[test]
fn next_deadline_is_the_earliest_timer() {
    let mut e = Engine::new(Config::default());
    assert_eq!(e.next_deadline(), None);
    e.add_port(t(0), 1, PortOptions { querier: false, ..opts("192.0.2.1") });
    assert_eq!(e.next_deadline(), None);
    let mut h = H { e };
    h.rec(t(0), 1, RecordType::IsInclude, G, &[S1]);
    assert_eq!(h.e.next_deadline(), Some(t(260)));
    h.rec(t(5), 1, RecordType::IsInclude, "239.2.2.2", &[S1]);
    assert_eq!(h.e.next_deadline(), Some(t(260)));
    h.msg(t(7), 1, "192.0.2.5", MessageKind::PimHello);
    assert_eq!(h.e.next_deadline(), Some(t(260)));
    h.msg(t(8), 1, "192.0.2.5", MessageKind::Query(gsq("239.2.2.2", &[S1], false)));
    assert_eq!(h.e.next_deadline(), Some(t(10)));
    h.e.tick(t(10));
    assert_eq!(h.e.next_deadline(), Some(t(260)));
    h.e.tick(t(260));
    // Other querier (heard at t=8) and router port (PIM at 7, query at 8) remain.
    assert_eq!(h.e.next_deadline(), Some(t(8 + 255)));
    h.e.tick(t(8 + 255));
    assert_eq!(h.e.next_deadline(), None);
    assert_eq!(h.e.groups(t(263)).count(), 0);
    // Retransmissions count as deadlines too.
    let mut h = H::new();
    assert_eq!(h.e.next_deadline(), Some(ms(31_250)), "startup query");
    h.e.tick(ms(31_250));
    assert_eq!(h.e.next_deadline(), Some(ms(156_250)), "general query");
    h.msg(t(40), 1, HOST, MessageKind::V2Report { group: a(G) });
    h.msg(t(100), 1, HOST, MessageKind::Leave { group: a(G) });
    assert_eq!(h.e.next_deadline(), Some(t(101)));
    h.e.tick(t(101));
    assert_eq!(h.e.next_deadline(), Some(t(102)), "group timer at LMQT");
}

#[test]
fn many_sources_are_split_across_queries() {
    let mut h = H::new();
    h.e.set_limits(Limits { max_sources_per_group: 1000, ..Limits::default() });
    let sources: Vec<String> =
        (0..500).map(|i| format!("10.2.{}.{}", i / 250, i % 250 + 1)).collect();
    let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
    h.rec(t(0), 1, RecordType::IsInclude, G, &refs);
    h.rec(t(1), 1, RecordType::BlockOld, G, &refs);
    let q = h.queries();
    assert_eq!(q.len(), 2);
    assert!(q.iter().all(|(_, q)| q.sources.len() <= max_query_sources(Family::V4)));
    assert_eq!(q.iter().map(|(_, q)| q.sources.len()).sum::<usize>(), 500);
}

// ---------------------------------------------------------------------------------------------
// Limits

#[test]
fn limits_refuse_new_state_and_leave_what_exists() {
    let mut h = H::new();
    h.e.add_port(t(0), 2, opts("198.51.100.1"));
    h.e.set_limits(Limits { max_groups: 3, max_groups_per_port: 2, max_sources_per_group: 2 });
    let join = |h: &mut H, port: u32, g: &str| {
        h.msg(t(1), port, HOST, MessageKind::V2Report { group: a(g) });
    };
    join(&mut h, 1, "239.0.0.1");
    join(&mut h, 1, "239.0.0.2");
    join(&mut h, 1, "239.0.0.3"); // port 1 has 2 groups already
    join(&mut h, 2, "239.0.0.4");
    join(&mut h, 2, "239.0.0.5"); // 3 groups in all
    let refused: Vec<Refusal> = h.e.take_refused().into_iter().map(|r| r.why).collect();
    assert_eq!(refused, [Refusal::MaxGroupsPerPort, Refusal::MaxGroups]);
    assert_eq!(h.e.group_count(), 3);
    // Refreshing what exists is not new state; joining an existing group on a new port is
    // refused only by the per-port limit.
    join(&mut h, 1, "239.0.0.1");
    join(&mut h, 2, "239.0.0.1");
    assert!(h.e.take_refused().is_empty());
    assert!(h.e.forwarding(&a("239.0.0.1")).any_source.contains(&2));
    // Sources: two distinct ones per group, whatever port names them.
    h.rec(t(2), 2, RecordType::AllowNew, "239.0.0.4", &[S1, S2]);
    h.rec(t(2), 2, RecordType::AllowNew, "239.0.0.4", &[S3]);
    assert_eq!(
        h.e.take_refused().iter().map(|r| r.why).collect::<Vec<_>>(),
        [Refusal::MaxSourcesPerGroup]
    );
    // Leaving frees room.
    h.e.add_port(t(3), 1, PortOptions { fast_leave: true, ..opts("192.0.2.1") });
    h.msg(t(3), 1, HOST, MessageKind::Leave { group: a("239.0.0.2") });
    join(&mut h, 1, "239.0.0.3");
    assert!(h.e.take_refused().is_empty(), "a leave freed a slot");
}

#[test]
fn any_source_joins_to_ssm_groups_are_refused_with_a_reason() {
    let mut h = H::new();
    h.msg(t(0), 1, HOST, MessageKind::V2Report { group: a("232.1.1.1") });
    h.rec(t(0), 1, RecordType::IsExclude, "232.1.1.1", &[]);
    let refused = h.e.take_refused();
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|r| r.why == Refusal::SsmAnySource && r.port == 1));
    assert!(h.e.forwarding(&a("232.1.1.1")).is_empty());
    // A source-specific join is what SSM wants.
    h.rec(t(1), 1, RecordType::IsInclude, "232.1.1.1", &[S1]);
    assert!(h.e.take_refused().is_empty());
    assert!(h.e.forwarding(&a("232.1.1.1")).ports_for(&a(S1)).contains(&1));
}
