//! RFC 4605 proxy: with `--upstream IFACE`, mcrelay is a host on that port. The kernel's IGMP
//! stack joins on a downstream host; mcrelay reports the group upstream from the gateway's own
//! address (not the host's report relayed), answers the upstream router's query with the
//! current state, reports the leave, never queries upstream, and relays upstream data to the
//! downstream member.
//!
//! The routed scenario (two subnets, the gateway routing unicast between them, a querier and a
//! sender upstream, a kernel host receiving downstream) runs once with mcrelay and once with
//! igmpproxy, the kernel-MFC proxy, and each run asserts what that proxy does; docs/routed.md
//! has the two side by side. The MLD test is the proxy test over IPv6.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    cmd::output_with_timeout,
    control::{
        link_local, link_local_of, CraftedHost, IgmpCapture, MldCapture, IGMP_QUERY,
        IGMP_V2_REPORT, MLD_QUERY, MLD_V2_REPORT,
    },
    daemon::ports_json,
    igmpproxy::{self, IgmpProxy},
    openvpn::ScratchDir,
    require_testbed,
    topology::{Host, Star},
    McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};
use relay::membership::packet::{self, Message, MessageKind, Query, QueryVersion};

const PORT: u16 = 5000;
const COUNT: u64 = 100;
const UPSTREAM_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const TIMEOUT: Duration = Duration::from_secs(10);

/// The type of the first record naming `group` (4 or 16 bytes) in a report of type
/// `report_type` (IGMPv3 or MLDv2: the same layout but for the address length).
fn record_for(report: &[u8], report_type: u8, group: &[u8]) -> Option<u8> {
    let n = group.len();
    if report.first() != Some(&report_type) || report.len() < 8 {
        return None;
    }
    let mut at = 8;
    for _ in 0..u16::from_be_bytes([report[6], report[7]]) {
        let record = report.get(at..at + 4 + n)?;
        let sources = usize::from(u16::from_be_bytes([record[2], record[3]]));
        if record[4..4 + n] == *group {
            return Some(record[0]);
        }
        at += 4 + n + n * sources + 4 * usize::from(record[1]);
    }
    None
}

/// The first record of an IGMPv3 report `igmp` that names `group`: its record type.
fn v3_record_for(igmp: &[u8], group: Ipv4Addr) -> Option<u8> {
    record_for(igmp, 0x22, &group.octets())
}

/// mcrelay as the proxy with `upstream` as its upstream port, short leave timers.
fn proxy_args(upstream: &str) -> Vec<&str> {
    vec![
        "--upstream",
        upstream,
        "--query-interval",
        "20",
        "--query-response-interval",
        "1",
        "--last-member-interval",
        "0.2",
    ]
}

fn from(ip: &[u8], address: Ipv4Addr) -> bool {
    ip[12..16] == address.octets()
}

#[test]
fn a_proxy_reports_downstream_members_upstream_as_a_host() {
    require_testbed!();
    let star = Star::new("px", 2);
    let [up, down] = &star.hosts[..] else { unreachable!() };
    star.gw.add_addr(&up.gw_port, &format!("{UPSTREAM_ADDRESS}/24"));
    let at_up = IgmpCapture::new(up);
    // Everything IGMP that reaches the upstream host during the test, for the last check.
    let all_at_up = IgmpCapture::new(up);
    let _relay = star.start_relay(&proxy_args(&up.gw_port));
    let IpAddr::V4(group) = addr("239.30.0.1") else { unreachable!() };
    let rx = McastReceiver::join(&down.ns, IpAddr::V4(group), PORT, &down.iface);

    // 1. The join goes upstream as mcrelay's own report (IS/TO_EX: record types 2 or 4).
    let report = at_up.wait_for_packet(TIMEOUT, |ip, igmp| {
        from(ip, UPSTREAM_ADDRESS) && matches!(v3_record_for(igmp, group), Some(2 | 4))
    });
    assert!(report.is_some(), "no report for {group} from {UPSTREAM_ADDRESS} upstream");
    // ... and repeated (robustness 2: once more, a second later), as a host repeats it.
    let repeat = at_up.wait_for_packet(TIMEOUT, |ip, igmp| {
        from(ip, UPSTREAM_ADDRESS) && matches!(v3_record_for(igmp, group), Some(2 | 4))
    });
    assert!(repeat.is_some(), "the state change for {group} was not repeated");
    // The host's own report is not relayed there.
    let relayed = at_up.wait_for_packet(Duration::from_secs(1), |ip, _| from(ip, down.v4));
    assert!(relayed.is_none(), "the downstream host's report was relayed upstream");

    // 2. Upstream data reaches the downstream member.
    McastSender::new(&up.ns, &up.iface).send_numbered(
        IpAddr::V4(group),
        PORT,
        COUNT,
        Duration::from_millis(1),
    );
    assert_eq!(rx.wait_for(COUNT, TIMEOUT), COUNT, "{rx}: upstream data");

    // 3. The upstream router's general query is answered with the current state (IS_EX: 2).
    let router = CraftedHost::with_source(up, 7, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)));
    let query = Message {
        source: router.source,
        kind: MessageKind::Query(Query {
            version: QueryVersion::IgmpV3,
            group: None,
            max_resp: Duration::from_secs(1),
            suppress: false,
            qrv: 2,
            qqi: Duration::from_secs(20),
            sources: vec![],
        }),
    };
    router.send(&packet::build(router.mac, &query).expect("query"));
    let answer = at_up.wait_for_packet(TIMEOUT, |ip, igmp| {
        from(ip, UPSTREAM_ADDRESS) && v3_record_for(igmp, group) == Some(2)
    });
    assert!(answer.is_some(), "the upstream query was not answered with the group's state");

    // 4. The leave goes upstream as TO_IN({}) (3) once the last member query ran out.
    drop(rx);
    let leave = at_up.wait_for_packet(TIMEOUT, |ip, igmp| {
        from(ip, UPSTREAM_ADDRESS) && v3_record_for(igmp, group) == Some(3)
    });
    assert!(leave.is_some(), "no leave for {group} upstream");

    // 5. mcrelay never queried upstream (all the test long).
    let queried = all_at_up.wait_for_packet(Duration::from_millis(500), |ip, igmp| {
        igmp.first() == Some(&IGMP_QUERY) && !from(ip, Ipv4Addr::new(198, 18, 0, 9))
    });
    assert!(queried.is_none(), "mcrelay queried on its upstream port");
}

// ---------------------------------------------------------------------------------------------
// The routed scenario, mcrelay and igmpproxy side by side.

/// The gateway's addresses on the upstream (`gw0`) and downstream (`gw1`) subnets; the hosts
/// are `.2` there and route through the gateway.
const GW_UP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const GW_DOWN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The upstream querier (a crafted host on the upstream subnet).
const QUERIER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
/// The sender's TTL for routed data.
const HOPS: u32 = 8;
/// How long to keep watching after everything expected arrived.
const QUIET: Duration = Duration::from_millis(700);
/// How long the join may take to bring data downstream.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the upstream stream runs before the host joins.
const STREAM_HEAD_START: Duration = Duration::from_millis(300);

/// The proxy on the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    /// `mcrelay run -i gw0 -i gw1 --upstream gw0`.
    Mcrelay,
    /// `igmpproxy` with gw0 upstream and gw1 downstream (kernel MFC).
    Igmpproxy,
    /// `mcrelay run -i gw0 -i gw1 --upstream gw0 --l3 gw0 --l3 gw1`: both ports routed.
    McrelayRouted,
}

/// What one run of the routed scenario saw.
#[derive(Debug)]
struct Findings {
    proxy: Proxy,
    /// The group was reported upstream from the gateway's upstream address (IGMPv3 IS_EX /
    /// TO_EX record, or an IGMPv2 report).
    report_from_gateway: bool,
    /// From the downstream host's join to that report.
    join_to_report: Option<Duration>,
    /// From the downstream host's join to the first datagram of a stream already running
    /// upstream (one datagram every 10 ms).
    join_to_data: Option<Duration>,
    /// The downstream host's own report was seen upstream.
    host_report_upstream: bool,
    /// Datagrams (of [`COUNT`], TTL [`HOPS`]) that reached the downstream member.
    delivered: u64,
    /// The TTLs those arrived with on the downstream wire.
    ttls: BTreeSet<u8>,
    /// The source MACs those arrived with.
    source_macs: BTreeSet<[u8; 6]>,
    /// The gateway's downstream port's MAC.
    downstream_mac: [u8; 6],
    /// Datagrams (of [`COUNT`]) sent with TTL 1 that reached the downstream member.
    ttl1_delivered: u64,
    /// The upstream querier's general query was answered from the gateway's address with the
    /// group's state.
    query_answered: bool,
    /// The leave went upstream (IGMPv3 TO_IN({}) or an IGMPv2 leave) from the gateway within
    /// 15 s of the host's leave (the group whose source was already sending at the join).
    leave_upstream: bool,
    /// The same for a second group whose data started only after the join was reported.
    late_leave_upstream: bool,
    /// `ping` from the upstream host to the downstream host worked, and the reply's TTL.
    unicast_ttl: Option<u8>,
}

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms =
            |d: Option<Duration>| d.map_or("never".into(), |d| format!("{} ms", d.as_millis()));
        writeln!(f, "{:?} in the routed scenario:", self.proxy)?;
        writeln!(f, "  report upstream from {GW_UP}: {}", self.report_from_gateway)?;
        writeln!(f, "  join -> report upstream: {}", ms(self.join_to_report))?;
        writeln!(f, "  join -> first datagram downstream: {}", ms(self.join_to_data))?;
        writeln!(f, "  host's own report seen upstream: {}", self.host_report_upstream)?;
        writeln!(f, "  TTL {HOPS} datagrams delivered: {} of {COUNT}", self.delivered)?;
        writeln!(f, "  TTL on the downstream wire: {:?}", self.ttls)?;
        writeln!(
            f,
            "  source MACs there: {:02x?} (gateway port {:02x?})",
            self.source_macs, self.downstream_mac
        )?;
        writeln!(f, "  TTL 1 datagrams delivered: {} of {COUNT}", self.ttl1_delivered)?;
        writeln!(f, "  upstream query answered: {}", self.query_answered)?;
        writeln!(f, "  leave upstream (source sending before the join): {}", self.leave_upstream)?;
        writeln!(
            f,
            "  leave upstream (source started after the join): {}",
            self.late_leave_upstream
        )?;
        write!(f, "  unicast ping across, reply TTL: {:?}", self.unicast_ttl)
    }
}

/// Whether `igmp` reports `group` joined: an IGMPv3 IS_EX / TO_EX record, or an IGMPv2 report.
fn joins(igmp: &[u8], group: Ipv4Addr) -> bool {
    matches!(v3_record_for(igmp, group), Some(2 | 4))
        || (igmp.first() == Some(&IGMP_V2_REPORT) && igmp.get(4..8) == Some(&group.octets()))
}

/// Whether `igmp` reports `group` left: an IGMPv3 TO_IN record (the proxy's union is empty),
/// or an IGMPv2 leave (type 0x17).
fn leaves(igmp: &[u8], group: Ipv4Addr) -> bool {
    v3_record_for(igmp, group) == Some(3)
        || (igmp.first() == Some(&0x17) && igmp.get(4..8) == Some(&group.octets()))
}

/// `ping -c 1` from `ns` to `to`: the reply's TTL, or `None` when there was no reply.
fn ping_ttl(ns: &NetNs, to: Ipv4Addr) -> Option<u8> {
    let mut cmd: Command = ns.command("ping");
    cmd.args(["-n", "-c", "1", "-W", "3", &to.to_string()]);
    let out = output_with_timeout(cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    let ttl = text.split_whitespace().find_map(|w| w.strip_prefix("ttl="))?;
    out.status.success().then(|| ttl.parse().ok()).flatten()
}

/// Two routed subnets: `gw0` (198.18.0.0/24, the upstream host sends and a crafted querier
/// queries there) and `gw1` (198.18.1.0/24, a kernel host joins), the gateway forwarding
/// unicast between them (`ip_forward`, the hosts' default routes), and `proxy` on the gateway.
fn routed_scenario(tag: &str, proxy: Proxy, group: Ipv4Addr) -> Findings {
    let star = Star::new(tag, 2);
    let [up, down] = &star.hosts[..] else { unreachable!() };
    star.gw.add_addr(&up.gw_port, &format!("{GW_UP}/24"));
    star.gw.add_addr(&down.gw_port, &format!("{GW_DOWN}/24"));
    star.gw.sysctl("net/ipv4/ip_forward", "1");
    up.ns.ip(&["route", "add", "default", "via", &GW_UP.to_string()]);
    down.ns.ip(&["route", "add", "default", "via", &GW_DOWN.to_string()]);
    let at_up = IgmpCapture::new(up);
    let all_at_up = IgmpCapture::new(up);

    // Whichever runs is held until the end of the scenario.
    let (_mcrelay, mut igmpproxy_guard): (Option<Mcrelay>, Option<IgmpProxy>) = match proxy {
        Proxy::Mcrelay | Proxy::McrelayRouted => {
            let mut args = proxy_args(&up.gw_port);
            if proxy == Proxy::McrelayRouted {
                args.extend(["--l3", &up.gw_port, "--l3", &down.gw_port]);
            }
            (Some(star.start_relay(&args)), None)
        }
        Proxy::Igmpproxy => {
            let config = igmpproxy::config(&up.gw_port, &[&down.gw_port]);
            (None, Some(IgmpProxy::start(&star.gw, &config, 2)))
        }
    };
    let unicast_ttl = ping_ttl(&up.ns, down.v4);

    // A stream already runs upstream (one datagram every 10 ms) when the host joins; the join's
    // latency is how long the first of its datagrams takes to show up downstream.
    let g = IpAddr::V4(group);
    let wire = WireObserver::new(&down.ns, &down.iface);
    let probes = McastSender::new(&up.ns, &up.iface).with_hop_limit(HOPS);
    let streaming = AtomicBool::new(true);
    let (probe_rx, rx, joined, report, join_to_data) = thread::scope(|scope| {
        scope.spawn(|| {
            let mut seq = 0;
            while streaming.load(Ordering::SeqCst) {
                let _ = probes.send(g, PORT + 1, seq);
                seq += 1;
                thread::sleep(Duration::from_millis(10));
            }
        });
        thread::sleep(STREAM_HEAD_START);
        let joined = Instant::now();
        let at_up = &at_up;
        let report = scope.spawn(move || {
            at_up
                .wait_for_packet(JOIN_TIMEOUT, |ip, igmp| from(ip, GW_UP) && joins(igmp, group))
                .map(|_| joined.elapsed())
        });
        let probe_rx = McastReceiver::join(&down.ns, g, PORT + 1, &down.iface);
        let rx = McastReceiver::join(&down.ns, g, PORT, &down.iface);
        let join_to_data = (probe_rx.wait_for(1, JOIN_TIMEOUT) > 0).then(|| joined.elapsed());
        streaming.store(false, Ordering::SeqCst);
        (probe_rx, rx, joined, report.join().unwrap_or(None), join_to_data)
    });
    let _ = joined;

    // Routed data with TTL 8, then TTL 1.
    McastSender::new(&up.ns, &up.iface).with_hop_limit(HOPS).send_numbered(
        g,
        PORT,
        COUNT,
        Duration::from_millis(2),
    );
    let delivered = rx.wait_for(COUNT, TIMEOUT);
    thread::sleep(QUIET);
    let ttls = wire.hop_limits(g);
    let source_macs = wire.source_macs(g);
    let before = rx.count();
    McastSender::new(&up.ns, &up.iface).send_numbered(g, PORT, COUNT, Duration::from_millis(2));
    rx.wait_for(before + COUNT, QUIET * 2);
    let ttl1_delivered = rx.count() - before;

    // The upstream querier's general query (IGMPv3, 1 s to answer).
    let router = CraftedHost::with_source(up, 7, IpAddr::V4(QUERIER));
    let query = Message {
        source: router.source,
        kind: MessageKind::Query(Query {
            version: QueryVersion::IgmpV3,
            group: None,
            max_resp: Duration::from_secs(1),
            suppress: false,
            qrv: 2,
            qqi: Duration::from_secs(20),
            sources: vec![],
        }),
    };
    router.send(&packet::build(router.mac, &query).expect("query"));
    let query_answered = at_up
        .wait_for_packet(TIMEOUT, |ip, igmp| {
            from(ip, GW_UP) && v3_record_for(igmp, group) == Some(2)
        })
        .is_some();

    drop((rx, probe_rx));
    let leave_upstream = at_up
        .wait_for_packet(Duration::from_secs(15), |ip, igmp| from(ip, GW_UP) && leaves(igmp, group))
        .is_some();

    // Another group, whose data starts only once the join was reported upstream.
    let late = Ipv4Addr::from(u32::from(group) + 1);
    let late_rx = McastReceiver::join(&down.ns, IpAddr::V4(late), PORT, &down.iface);
    let late_reported = at_up
        .wait_for_packet(JOIN_TIMEOUT, |ip, igmp| from(ip, GW_UP) && joins(igmp, late))
        .is_some();
    McastSender::new(&up.ns, &up.iface).with_hop_limit(HOPS).send_numbered(
        IpAddr::V4(late),
        PORT,
        10,
        Duration::from_millis(10),
    );
    let late_delivered = late_rx.wait_for(10, TIMEOUT);
    drop(late_rx);
    let late_leave_upstream = at_up
        .wait_for_packet(Duration::from_secs(15), |ip, igmp| from(ip, GW_UP) && leaves(igmp, late))
        .is_some();
    assert!(
        late_reported && late_delivered == 10,
        "{late}: reported {late_reported}, {late_delivered} of 10 delivered"
    );

    let host_report_upstream =
        all_at_up.wait_for_packet(Duration::from_millis(300), |ip, _| from(ip, down.v4)).is_some();
    if let Some(p) = igmpproxy_guard.as_mut() {
        p.check_running();
        eprintln!("kernel MFC:\n{}", IgmpProxy::mfc(&star.gw));
    }

    let findings = Findings {
        proxy,
        report_from_gateway: report.is_some(),
        join_to_report: report,
        join_to_data,
        host_report_upstream,
        delivered,
        ttls,
        source_macs,
        downstream_mac: star.gw.mac(&down.gw_port),
        ttl1_delivered,
        query_answered,
        leave_upstream,
        late_leave_upstream,
        unicast_ttl,
    };
    eprintln!("{findings}");
    findings
}

/// What holds for both: the proxy's own report upstream from the gateway's address (never the
/// host's), data delivered, the upstream query answered, the leave reported upstream for a
/// group whose data started after the join, unicast routed (one hop: the reply's TTL 64
/// arrives as 63).
fn common(f: &Findings) {
    assert!(f.report_from_gateway, "{f}");
    assert!(!f.host_report_upstream, "{f}");
    assert!(f.join_to_data.is_some(), "{f}");
    assert_eq!(f.delivered, COUNT, "{f}");
    assert!(f.query_answered, "{f}");
    assert!(f.late_leave_upstream, "{f}");
    assert_eq!(f.unicast_ttl, Some(63), "{f}");
}

/// mcrelay relays between Ethernet ports as a bridge would: the datagrams keep their TTL (8),
/// and TTL 1 is relayed too. Only its L3 ports (tun, WireGuard) are routed hops (TTL
/// decremented, TTL 1 dropped: tests/tests/routed.rs).
#[test]
fn routed_subnets_with_mcrelay_as_the_proxy() {
    require_testbed!("ping");
    let f = routed_scenario("prm", Proxy::Mcrelay, Ipv4Addr::new(239, 30, 5, 1));
    common(&f);
    assert_eq!(f.ttls, BTreeSet::from([HOPS as u8]), "{f}");
    assert_eq!(f.ttl1_delivered, COUNT, "{f}");
    assert!(f.leave_upstream, "{f}");
}

/// With both ports routed (`--l3`), mcrelay is a routed hop like the kernel's MFC: TTL 8
/// arrives as 7, TTL 1 is not forwarded (`drop_ttl`), and the copies leave with the
/// downstream port's own MAC as source (not the relay MAC of bridged copies).
#[test]
fn routed_subnets_with_mcrelay_l3_ports_as_the_proxy() {
    require_testbed!("ping");
    let f = routed_scenario("pr3", Proxy::McrelayRouted, Ipv4Addr::new(239, 30, 7, 1));
    common(&f);
    assert_eq!(f.ttls, BTreeSet::from([HOPS as u8 - 1]), "{f}");
    assert_eq!(f.ttl1_delivered, 0, "{f}");
    assert_eq!(f.source_macs, BTreeSet::from([f.downstream_mac]), "{f}");
    assert!(f.leave_upstream, "{f}");
}

/// igmpproxy has the kernel route: TTL decremented once (8 arrives as 7), TTL 1 not forwarded
/// (threshold 1: the kernel forwards a TTL above it).
///
/// The host's leave of the group whose source was already sending at the join does not go
/// upstream within 15 s: the kernel's upcall for that source's first datagram made igmpproxy
/// 0.3 create the route ("No table entry ... Inserting route"), and at the leave it logs
/// "quickleave is enabled but there are still some downstream hosts left"; the upstream
/// membership lasts until the route ages out through its general queries (125 s apart after
/// the start-up ones). For a group whose data starts after the join the leave goes upstream at
/// once ("this was the last downstream host").
#[test]
fn routed_subnets_with_igmpproxy_as_the_proxy() {
    require_testbed!("ping", "igmpproxy");
    let f = routed_scenario("pri", Proxy::Igmpproxy, Ipv4Addr::new(239, 30, 6, 1));
    common(&f);
    assert_eq!(f.ttls, BTreeSet::from([HOPS as u8 - 1]), "{f}");
    assert_eq!(f.ttl1_delivered, 0, "{f}");
    assert!(!f.leave_upstream, "{f}");
}

// ---------------------------------------------------------------------------------------------
// MLD proxy.

/// The first record of an MLDv2 report `icmp` that names `group`: its record type.
fn mld_record_for(icmp: &[u8], group: Ipv6Addr) -> Option<u8> {
    record_for(icmp, MLD_V2_REPORT, &group.octets())
}

fn from6(ip: &[u8], address: Ipv6Addr) -> bool {
    ip[8..24] == address.octets()
}

/// The proxy test over IPv6: the kernel's MLD stack joins downstream; mcrelay reports the group
/// upstream in MLDv2 from the upstream port's link-local address (the host's report is not
/// relayed), upstream data reaches the host, an upstream MLDv2 query is answered with the
/// group's state, the leave goes upstream, and mcrelay never queries there.
#[test]
fn a_proxy_reports_downstream_mld_members_upstream_as_a_host() {
    require_testbed!();
    let star = Star::new("px6", 2);
    let [up, down]: &[Host] = &star.hosts[..] else { unreachable!() };
    let gw_up = link_local_of(&star.gw, &up.gw_port);
    let host = link_local(down);
    let at_up = MldCapture::new(up);
    let all_at_up = MldCapture::new(up);
    let _relay = star.start_relay(&proxy_args(&up.gw_port));
    let IpAddr::V6(group) = addr("ff1e::30:7:1") else { unreachable!() };
    let rx = McastReceiver::join(&down.ns, IpAddr::V6(group), PORT, &down.iface);
    let reported = |at: &MldCapture, kinds: &[u8], timeout: Duration| {
        at.wait_for_packet(timeout, |ip, icmp| {
            from6(ip, gw_up) && mld_record_for(icmp, group).is_some_and(|k| kinds.contains(&k))
        })
        .is_some()
    };

    // 1. The join goes upstream as mcrelay's own MLDv2 report (IS_EX / TO_EX), repeated.
    assert!(reported(&at_up, &[2, 4], TIMEOUT), "no MLD report for {group} from {gw_up}");
    assert!(reported(&at_up, &[2, 4], TIMEOUT), "the state change for {group} was not repeated");
    // The host's own report is not relayed there.
    let relayed = at_up.wait_for_packet(Duration::from_secs(1), |ip, _| from6(ip, host));
    assert!(relayed.is_none(), "the downstream host's MLD report was relayed upstream");

    // 2. Upstream data reaches the downstream member.
    McastSender::new(&up.ns, &up.iface).send_numbered(
        IpAddr::V6(group),
        PORT,
        COUNT,
        Duration::from_millis(1),
    );
    assert_eq!(rx.wait_for(COUNT, TIMEOUT), COUNT, "{rx}: upstream data");

    // 3. The upstream router's MLDv2 general query is answered with the state (IS_EX: 2).
    let router = CraftedHost::new(up, 7, true);
    let query = Message {
        source: router.source,
        kind: MessageKind::Query(Query {
            version: QueryVersion::MldV2,
            group: None,
            max_resp: Duration::from_secs(1),
            suppress: false,
            qrv: 2,
            qqi: Duration::from_secs(20),
            sources: vec![],
        }),
    };
    router.send(&packet::build(router.mac, &query).expect("query"));
    assert!(reported(&at_up, &[2], TIMEOUT), "the upstream MLD query was not answered");

    // 4. The leave goes upstream as TO_IN({}) (3).
    drop(rx);
    assert!(reported(&at_up, &[3], TIMEOUT), "no MLD leave for {group} upstream");

    // 5. mcrelay never queried upstream.
    let queried = all_at_up.wait_for_packet(Duration::from_millis(500), |ip, icmp| {
        icmp.first() == Some(&MLD_QUERY) && !from6(ip, router_ll(&router))
    });
    assert!(queried.is_none(), "mcrelay sent an MLD query on its upstream port");
}

fn router_ll(router: &CraftedHost<'_>) -> Ipv6Addr {
    match router.source {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!("an MLD querier has an IPv6 source"),
    }
}

// ---------------------------------------------------------------------------------------------
// More than 32 interfaces.

/// Interfaces of the many-port gateway: one upstream and 33 downstream, one more than the
/// kernel's 32 multicast VIFs (`MAXVIFS`).
const MANY: usize = 34;

/// A gateway namespace with [`MANY`] veth pairs inside it: `aN` (10.77.N.1/24, up) and its peer
/// `bN`.
fn many_port_gateway(tag: &str) -> NetNs {
    let gw = NetNs::new(&format!("mcr{tag}-gw"));
    for n in 0..MANY {
        let (a, b) = (format!("a{n}"), format!("b{n}"));
        gw.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        gw.link_up(&a);
        gw.link_up(&b);
        gw.add_addr(&a, &format!("10.77.{n}.1/24"));
    }
    gw
}

/// igmpproxy makes one VIF per interface and stops at the kernel's 32: with 34 it exits
/// ("out of VIF space") instead of proxying for the first 32.
#[test]
fn igmpproxy_exits_with_more_than_32_interfaces() {
    require_testbed!("igmpproxy");
    let gw = many_port_gateway("pvi");
    let downstream: Vec<String> = (1..MANY).map(|n| format!("a{n}")).collect();
    let downstream: Vec<&str> = downstream.iter().map(String::as_str).collect();
    let mut config = igmpproxy::config("a0", &downstream);
    for n in 0..MANY {
        config.push_str(&format!("\nphyint b{n} disabled\n"));
    }
    let dir = ScratchDir::new();
    let conf = dir.write("igmpproxy.conf", &config, 0o600);
    let mut cmd = gw.command(igmpproxy::program());
    cmd.arg("-d").arg(&conf);
    let out = output_with_timeout(cmd, Duration::from_secs(20));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "igmpproxy kept running with {MANY} interfaces:\n{log}");
    assert!(log.contains("out of VIF space"), "{log}");
}

/// mcrelay takes the same 34 interfaces as ports (the upstream one among them).
#[test]
fn mcrelay_proxies_for_more_than_32_interfaces() {
    require_testbed!();
    let gw = many_port_gateway("pvm");
    let _relay = Mcrelay::start_ready(&gw, &["run", "-i", "a*", "--upstream", "a0"]);
    let doc = ports_json(&gw);
    let ports = doc["ports"].as_array().map_or(0, Vec::len);
    assert_eq!(ports, MANY, "mcrelay ports --json: {doc}");
}
