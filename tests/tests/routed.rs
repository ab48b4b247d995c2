//! Routed (L3) ports end to end with real OpenVPN in `dev tun` mode (TLS, `topology subnet`,
//! clients in their own namespaces; see `mcrelay_tests::openvpn`, option `tun`). mcrelay runs on
//! the gateway with a LAN veth and the server's tun: the tun is attached in TC mode, the LAN
//! veth in XDP with the TC program behind it. Memberships are learned from the hosts' own IGMP
//! (over the tunnel for the client: the server's tun carries IP packets without a MAC header).
//!
//! Senders use TTL 8: a routed hop decrements it (to 7 on the far side) and TTL 1 is not
//! forwarded (`drop_ttl`).

use std::{net::IpAddr, thread, time::Duration};

use mcrelay_tests::{
    addr,
    daemon::{ports_json, stats_json, wait_groups, wait_member},
    openvpn::{VpnBed, VpnClient, VpnOptions},
    port_counter, require_testbed,
    topology::Host,
    McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};

const PORT: u16 = 5000;
const COUNT: u64 = 50;
const INTERVAL: Duration = Duration::from_millis(2);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
const MEMBER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to keep watching after everything expected arrived, for duplicates and leaks.
const QUIET: Duration = Duration::from_millis(700);
/// The senders' TTL / hop limit.
const HOPS: u32 = 8;
const TIMERS: [&str; 6] =
    ["--query-interval", "5", "--query-response-interval", "1", "--last-member-interval", "0.2"];

/// A routed bed: one LAN host, one VPN client over `dev tun`.
fn bed(tag: &str) -> VpnBed {
    VpnBed::new(tag, VpnOptions { tun: true, lan_hosts: 1, clients: 1, ..VpnOptions::default() })
}

fn start_relay(bed: &VpnBed, extra: &[String]) -> Mcrelay {
    let mut args = vec!["run".to_string()];
    args.extend(bed.iface_args());
    args.extend(TIMERS.iter().map(|s| s.to_string()));
    args.extend(extra.iter().cloned());
    Mcrelay::start_ready(&bed.gw, &args)
}

fn counter(gw: &NetNs, iface: &str, key: &str) -> u64 {
    port_counter(&stats_json(gw), iface, "packets", key)
}

fn send(ns: &NetNs, iface: &str, group: IpAddr, hops: u32) {
    McastSender::new(ns, iface).with_hop_limit(hops).send_numbered(group, PORT, COUNT, INTERVAL);
}

/// Every datagram arrived exactly once, and the wire saw them with TTL / hop limit `hops`.
fn expect_all(rx: &McastReceiver, wire: &WireObserver, group: IpAddr, hops: u8) {
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}: datagrams received");
    thread::sleep(QUIET);
    assert_eq!(rx.count(), COUNT, "{rx}: duplicates");
    assert_eq!(rx.distinct(), COUNT, "{rx}: distinct datagrams");
    wire.check_thread();
    assert_eq!(
        wire.hop_limits(group).into_iter().collect::<Vec<_>>(),
        vec![hops],
        "{wire}: TTL / hop limit of {group} (sent with {HOPS}, one routed hop)"
    );
}

/// (a) A LAN sender's group reaches the tun client that joined (its IGMP report learned on the
/// server's tun), TTL decremented once; (c) TTL 1 is not forwarded and counted as `drop_ttl`;
/// (d) `mcrelay ports --json` shows the tun in mode `tc`.
///
/// IPv6: an OpenVPN server in tun mode silently drops every packet from a client whose source
/// is link-local ("add address learning" is a TODO in its multi.c), and MLD reports always
/// have one: no MLD membership can be learned over `dev tun`. The IPv6 case therefore makes the
/// tun a static member of the group.
fn lan_to_tun_client(tag: &str, group: IpAddr) {
    let bed = bed(tag);
    let h0: &Host = &bed.lan[0];
    let c0: &VpnClient = &bed.clients[0];
    let tun = bed.servers[0].tap.clone();
    let statics = if group.is_ipv6() {
        vec!["--static".to_string(), format!("{group}@{tun}")]
    } else {
        vec![]
    };
    let _relay = start_relay(&bed, &statics);

    let doc = ports_json(&bed.gw);
    let port = doc["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["iface"] == tun.as_str())
        .unwrap_or_else(|| panic!("{tun} missing from mcrelay ports: {doc}"));
    assert_eq!(port["mode"], "tc", "{tun}: {port}");
    assert_eq!(port["receives_copies"], true, "{tun}: {port}");

    let wire = WireObserver::new(&c0.ns, &c0.tap);
    let rx = McastReceiver::join(&c0.ns, group, PORT, &c0.tap);
    wait_member(&bed.gw, group, &tun, MEMBER_TIMEOUT);

    send(&h0.ns, &h0.iface, group, HOPS);
    expect_all(&rx, &wire, group, HOPS as u8 - 1);
    assert_eq!(counter(&bed.gw, &h0.gw_port, "forwarded"), COUNT, "forwarded on {}", h0.gw_port);

    send(&h0.ns, &h0.iface, group, 1);
    thread::sleep(QUIET);
    assert_eq!(rx.count(), COUNT, "{rx}: datagrams with TTL 1 arrived through a routed hop");
    assert_eq!(counter(&bed.gw, &h0.gw_port, "drop_ttl"), COUNT, "drop_ttl on {}", h0.gw_port);
}

/// (b) The tun client's multicast reaches a LAN receiver that joined (an Ethernet header put
/// in front of it), TTL decremented once; (c) TTL 1 from the tunnel is not forwarded.
fn tun_client_to_lan(tag: &str, group: IpAddr) {
    let bed = bed(tag);
    let h0: &Host = &bed.lan[0];
    let c0: &VpnClient = &bed.clients[0];
    let tun = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, &[]);

    let wire = WireObserver::new(&h0.ns, &h0.iface);
    let rx = McastReceiver::join(&h0.ns, group, PORT, &h0.iface);
    wait_member(&bed.gw, group, &h0.gw_port, MEMBER_TIMEOUT);

    send(&c0.ns, &c0.tap, group, HOPS);
    expect_all(&rx, &wire, group, HOPS as u8 - 1);
    assert_eq!(counter(&bed.gw, &tun, "forwarded"), COUNT, "forwarded on {tun}");

    send(&c0.ns, &c0.tap, group, 1);
    thread::sleep(QUIET);
    assert_eq!(rx.count(), COUNT, "{rx}: datagrams with TTL 1 arrived through a routed hop");
    assert_eq!(counter(&bed.gw, &tun, "drop_ttl"), COUNT, "drop_ttl on {tun}");
}

#[test]
fn lan_sender_reaches_tun_client_ipv4() {
    require_testbed!("openvpn", "openssl", "ping");
    lan_to_tun_client("rtl4", addr("239.30.1.1"));
}

#[test]
fn tun_client_sender_reaches_lan_receiver_ipv4() {
    require_testbed!("openvpn", "openssl", "ping");
    tun_client_to_lan("rtc4", addr("239.30.2.1"));
}

#[test]
fn lan_sender_reaches_tun_client_ipv6() {
    require_testbed!("openvpn", "openssl", "ping");
    lan_to_tun_client("rtl6", addr("ff1e::30:1:1"));
}

#[test]
fn tun_client_sender_reaches_lan_receiver_ipv6() {
    require_testbed!("openvpn", "openssl", "ping");
    tun_client_to_lan("rtc6", addr("ff1e::30:2:1"));
}

/// The tun's pinned TC link is adopted by the next daemon (forwarding goes on), and a tun that
/// OpenVPN re-creates (server restart) is attached again in TC mode and relays again.
#[test]
fn tun_port_survives_daemon_restart_and_tun_recreation() {
    require_testbed!("openvpn", "openssl", "ping");
    let group = addr("239.30.3.1");
    let mut bed = bed("rtr");
    let tun = bed.servers[0].tap.clone();
    let mut relay = start_relay(&bed, &[]);
    let rx = McastReceiver::join(&bed.clients[0].ns, group, PORT, &bed.clients[0].tap);
    wait_member(&bed.gw, group, &tun, MEMBER_TIMEOUT);

    // A new daemon takes the pinned links over.
    relay.stop();
    let relay = start_relay(&bed, &[]);
    send(&bed.lan[0].ns, &bed.lan[0].iface, group, HOPS);
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}: after the daemon restart");
    let stderr = relay.stderr();
    assert!(stderr.contains("adopted the pinned TC link"), "{stderr}");

    // OpenVPN restarts: the tun goes away and comes back under the same name.
    bed.stop_server(0);
    bed.start_server(0);
    bed.wait_connected();
    wait_member(&bed.gw, group, &tun, MEMBER_TIMEOUT);
    let mode = |doc: &mcrelay_tests::serde_json::Value| {
        mcrelay_tests::daemon::port_entry(doc, &tun).map(|p| p["mode"].clone())
    };
    let deadline = std::time::Instant::now() + MEMBER_TIMEOUT;
    while mode(&ports_json(&bed.gw)) != Some("tc".into()) {
        assert!(std::time::Instant::now() < deadline, "{tun} not attached again in TC mode");
        thread::sleep(Duration::from_millis(100));
    }
    let before = rx.count();
    send(&bed.lan[0].ns, &bed.lan[0].iface, group, HOPS);
    assert_eq!(
        rx.wait_for(before + COUNT, DELIVERY_TIMEOUT),
        before + COUNT,
        "{rx}: after the tun was re-created"
    );
}

/// The client entry of `address` in `mcrelay groups --json` (per-client delivery), if any.
fn client_entry(
    doc: &mcrelay_tests::serde_json::Value,
    address: IpAddr,
) -> Option<&mcrelay_tests::serde_json::Value> {
    doc["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["address"].as_str() == Some(address.to_string().as_str()))
}

fn has_group(client: Option<&mcrelay_tests::serde_json::Value>, group: IpAddr) -> bool {
    client.is_some_and(|c| {
        c["groups"].as_array().into_iter().flatten().any(|g| g.as_str() == Some(&group.to_string()))
    })
}

/// Per-peer delivery on a routed VPN (`--per-client` on the tun): OpenVPN in `dev tun` mode
/// floods multicast to every client, so mcrelay addresses each copy to a joined client's own
/// tunnel address instead (the destination rewritten, checksums fixed, TTL decremented once).
/// The joined client's application (bound to the port, joined on its tun) receives every
/// datagram; the other client's tun carries none (neither the group nor readdressed); after
/// the client leaves, no more copies go to it.
#[test]
fn per_client_tun_delivers_only_to_the_joined_client() {
    require_testbed!("openvpn", "openssl", "ping");
    let group = addr("239.30.4.1");
    let bed = VpnBed::new(
        "rtp",
        VpnOptions { tun: true, lan_hosts: 1, clients: 2, ..VpnOptions::default() },
    );
    let tun = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, &["--per-client".to_string(), tun.clone()]);
    let (h0, c0, c1) = (&bed.lan[0], &bed.clients[0], &bed.clients[1]);
    let (a0, a1) = (IpAddr::V4(c0.v4), IpAddr::V4(c1.v4));

    let wire0 = WireObserver::new(&c0.ns, &c0.tap);
    let wire1 = WireObserver::new(&c1.ns, &c1.tap);
    let rx0 = McastReceiver::join_wildcard(&c0.ns, group, PORT, &c0.tap);
    let rx1 = McastReceiver::wildcard(&c1.ns, group, PORT);
    wait_groups(&bed.gw, "the joined client as a per-client member", MEMBER_TIMEOUT, |doc| {
        has_group(client_entry(doc, a0), group)
    });

    send(&h0.ns, &h0.iface, group, HOPS);
    assert_eq!(rx0.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx0}: datagrams received");
    thread::sleep(QUIET);
    assert_eq!((rx0.count(), rx0.distinct()), (COUNT, COUNT), "{rx0}: duplicates");
    assert_eq!(wire0.readdressed(group), [(a0, COUNT)].into(), "{wire0}: copies to {a0}");
    assert_eq!(wire0.count(group), 0, "{wire0}: copies still addressed to {group}");
    assert_eq!(wire0.hop_limits(a0).into_iter().collect::<Vec<_>>(), vec![HOPS as u8 - 1]);
    assert_eq!(rx1.count(), 0, "{rx1}: the client that did not join");
    assert_eq!(wire1.count(group) + wire1.readdressed(group).values().sum::<u64>(), 0, "{wire1}");
    let doc = mcrelay_tests::daemon::groups_json(&bed.gw);
    assert_eq!(client_entry(&doc, a0).map(|c| c["copies"].clone()), Some(COUNT.into()), "{doc:#}");
    assert!(client_entry(&doc, a1).is_none(), "{a1} is no member: {doc:#}");

    // The client leaves (its kernel sends the leave over the tunnel): no more copies.
    drop(rx0);
    wait_groups(&bed.gw, "the client's leave", MEMBER_TIMEOUT, |doc| {
        !has_group(client_entry(doc, a0), group)
            && !doc["groups"].as_array().into_iter().flatten().any(|g| {
                g["group"].as_str() == Some(&group.to_string())
                    && g["ports"].as_array().into_iter().flatten().any(|p| p == tun.as_str())
            })
    });
    send(&h0.ns, &h0.iface, group, HOPS);
    thread::sleep(QUIET);
    assert_eq!(wire0.readdressed(group), [(a0, COUNT)].into(), "{wire0}: copies after the leave");
    assert_eq!(wire0.count(group), 0, "{wire0}: after the leave");
}

/// The unknown-group policy holds on the TC path too: with `--unknown flood`, a tun client's
/// group that nobody joined reaches the LAN (through the TC program's array of all ports, one
/// routed hop) and a LAN sender's reaches the tun client (handed over by the LAN port's XDP
/// program); `--unknown drop` drops it on the tun and counts `drop_no_members`.
#[test]
fn unknown_groups_from_a_tun_client_follow_the_policy() {
    require_testbed!("openvpn", "openssl", "ping");
    let group = addr("239.30.9.1");
    let bed = bed("rtu");
    let (h0, c0) = (&bed.lan[0], &bed.clients[0]);
    let tun = bed.servers[0].tap.clone();

    let mut relay = start_relay(&bed, &["--unknown".to_string(), "flood".to_string()]);
    let wire = WireObserver::new(&h0.ns, &h0.iface);
    send(&c0.ns, &c0.tap, group, HOPS);
    assert_eq!(wire.wait_for(group, COUNT, DELIVERY_TIMEOUT), COUNT, "{wire}: flooded");
    assert_eq!(wire.hop_limits(group).into_iter().collect::<Vec<_>>(), vec![HOPS as u8 - 1]);
    // The other way: the LAN port's XDP program cannot send to the tun; it hands the unknown
    // group to its TC program, whose array of all ports has the tun.
    let tun_wire = WireObserver::new(&c0.ns, &c0.tap);
    let lan_group = addr("239.30.9.2");
    send(&h0.ns, &h0.iface, lan_group, HOPS);
    assert_eq!(tun_wire.wait_for(lan_group, COUNT, DELIVERY_TIMEOUT), COUNT, "{tun_wire}");
    assert_eq!(
        tun_wire.hop_limits(lan_group).into_iter().collect::<Vec<_>>(),
        vec![HOPS as u8 - 1]
    );
    relay.stop();
    drop(relay);

    let _relay = start_relay(&bed, &["--unknown".to_string(), "drop".to_string()]);
    let before = wire.count(group);
    send(&c0.ns, &c0.tap, group, HOPS);
    thread::sleep(QUIET);
    assert_eq!(wire.count(group), before, "{wire}: dropped");
    assert_eq!(counter(&bed.gw, &tun, "drop_no_members"), COUNT, "drop_no_members on {tun}");
}

/// A chatty tun client meets the same limits as a host on an Ethernet port: a burst of 3,000
/// IGMPv2 reports (each for another group, from its tunnel address, Router Alert and TTL 1 as
/// hosts send them) through the tunnel is rate limited per port (`control.rate_limited`,
/// `[limits] report_rate_per_port = 200`), the groups past `--max-groups-per-port` are refused
/// and counted, and the daemon lives on.
#[test]
fn a_chatty_tun_client_is_rate_limited_and_refused_past_the_limits() {
    use relay::membership::packet::{self, Message, MessageKind};
    require_testbed!("openvpn", "openssl", "ping");
    let bed = bed("rth");
    let c0 = &bed.clients[0];
    let tun = bed.servers[0].tap.clone();
    // A report rate below what gets through OpenVPN in a burst here (some 700 of 3,000).
    let dir = mcrelay_tests::openvpn::ScratchDir::new();
    let config = dir.write("mcrelay.toml", "[limits]\nreport_rate_per_port = 200\n", 0o644);
    let relay = start_relay(
        &bed,
        &[
            "--config".to_string(),
            config.display().to_string(),
            "--max-groups-per-port".to_string(),
            "100".to_string(),
        ],
    );
    let packets: Vec<(Vec<u8>, std::net::Ipv4Addr)> = (0..3_000u32)
        .map(|i| {
            let group = std::net::Ipv4Addr::new(239, 210, (i >> 8) as u8, i as u8);
            let msg = Message {
                source: IpAddr::V4(c0.v4),
                kind: MessageKind::V2Report { group: IpAddr::V4(group) },
            };
            let frame = packet::build([2, 0, 0, 0, 0, 1], &msg).expect("report");
            (frame[14..].to_vec(), group)
        })
        .collect();
    c0.ns
        .in_netns(|| -> std::io::Result<()> {
            use socket2::{Domain, Protocol, SockAddr, Socket, Type};
            // IPPROTO_RAW: the packets carry their own IP header (Router Alert included).
            let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
            socket.bind_device(Some(c0.tap.as_bytes()))?;
            for (ip, group) in &packets {
                let to = SockAddr::from(std::net::SocketAddrV4::new(*group, 0));
                // A full tun queue drops a packet now and then: the rest still make the flood.
                let _ = socket.send_to(ip, &to);
            }
            Ok(())
        })
        .expect("sending the reports through a raw socket in the client's namespace");
    let (doc, _) = wait_groups(&bed.gw, "the flood counted", Duration::from_secs(30), |d| {
        d["control"]["rate_limited"].as_u64().unwrap_or(0) > 0
            && d["control"]["refused"]["max_groups_per_port"].as_u64().unwrap_or(0) > 0
    });
    let learned = doc["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| {
            g["members"].as_array().into_iter().flatten().any(|m| m["port"] == tun.as_str())
        })
        .count();
    assert!(learned <= 100, "{learned} groups learned on {tun} past the per-port limit of 100");
    mcrelay_tests::daemon::assert_process_alive(relay.pid(), "after the flood");
}
