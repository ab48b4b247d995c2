//! RFC 4605 proxy: with `--upstream IFACE`, mcrelay is a host on that port. The kernel's IGMP
//! stack joins on a downstream host; mcrelay reports the group upstream from the gateway's own
//! address (not the host's report relayed), answers the upstream router's query with the
//! current state, reports the leave, never queries upstream, and relays upstream data to the
//! downstream member.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use mcrelay_tests::{
    addr,
    control::{CraftedHost, IgmpCapture, IGMP_QUERY},
    require_testbed,
    topology::Star,
    McastReceiver, McastSender,
};
use relay::membership::packet::{self, Message, MessageKind, Query, QueryVersion};

const PORT: u16 = 5000;
const COUNT: u64 = 100;
const UPSTREAM_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const TIMEOUT: Duration = Duration::from_secs(10);

/// The first record of an IGMPv3 report `igmp` that names `group`: its record type.
fn v3_record_for(igmp: &[u8], group: Ipv4Addr) -> Option<u8> {
    if igmp.first() != Some(&0x22) || igmp.len() < 8 {
        return None;
    }
    let mut at = 8;
    for _ in 0..u16::from_be_bytes([igmp[6], igmp[7]]) {
        let record = igmp.get(at..at + 8)?;
        let sources = usize::from(u16::from_be_bytes([record[2], record[3]]));
        if record[4..8] == group.octets() {
            return Some(record[0]);
        }
        at += 8 + 4 * sources + 4 * usize::from(record[1]);
    }
    None
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
    let _relay = star.start_relay(&[
        "--upstream",
        &up.gw_port,
        "--query-interval",
        "20",
        "--query-response-interval",
        "1",
        "--last-member-interval",
        "0.2",
    ]);
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
