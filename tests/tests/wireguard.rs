//! WireGuard hub end to end with real wireguard-go peers (see `mcrelay_tests::wireguard`): mcrelay
//! runs on the gateway with a LAN veth and the hub's WireGuard interface (a tun device: attached
//! in TC mode). Memberships are learned from the hosts' own IGMP (the peers' reports come
//! through the tunnel: their AllowedIPs for the hub include 224.0.0.0/4).
//!
//! WireGuard routes by AllowedIPs, and the hub's AllowedIPs are each peer's own /32: multicast
//! the gateway writes into the hub interface reaches no peer. Delivery to peers needs per-peer
//! copies addressed to each joined peer's tunnel address (`--per-client`).
//!
//! Senders use TTL 8: the hub is a routed hop and decrements it.

use std::{net::IpAddr, thread, time::Duration};

use mcrelay_tests::{
    addr,
    daemon::{groups_json, port_entry, ports_json, stats_json, wait_member, wait_not_member},
    groups::member,
    port_counter, require_testbed,
    wireguard::{WgBed, WgOptions},
    McastReceiver, McastSender, Mcrelay, WireObserver,
};

const PORT: u16 = 5000;
const COUNT: u64 = 50;
const INTERVAL: Duration = Duration::from_millis(2);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
const MEMBER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to keep watching after everything expected arrived, for duplicates and leaks.
const QUIET: Duration = Duration::from_millis(700);
/// The senders' TTL.
const HOPS: u32 = 8;
/// Short leave processing. (The hub's multicast queries reach no peer; with `--per-client`,
/// mcrelay also addresses them to each known peer: see
/// `a_joined_peer_stays_a_member_through_query_rounds`.)
const TIMERS: [&str; 4] = ["--query-response-interval", "1", "--last-member-interval", "0.2"];

fn start_relay(bed: &WgBed, extra: &[&str]) -> Mcrelay {
    let mut args = vec!["run".to_string()];
    args.extend(bed.iface_args());
    args.extend(TIMERS.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    Mcrelay::start_ready(&bed.gw, &args)
}

/// (a) A peer's multicast reaches a LAN receiver that joined (kernel IGMP of the LAN host):
/// every datagram, exactly once, TTL decremented once; the hub interface is in TC mode.
#[test]
fn peer_sender_reaches_lan_receiver() {
    require_testbed!("wireguard-go", "wg", "ping");
    let group = addr("239.31.1.1");
    let bed = WgBed::new("wga", WgOptions { lan_hosts: 1, peers: 1 });
    let (h0, p0, hub) = (&bed.lan[0], &bed.peers[0], &bed.hub_iface);
    let _relay = start_relay(&bed, &[]);

    let doc = ports_json(&bed.gw);
    let port = port_entry(&doc, hub).unwrap_or_else(|| panic!("{hub} missing: {doc:#}"));
    assert_eq!(port["mode"], "tc", "{hub}: {port}");

    let wire = WireObserver::new(&h0.ns, &h0.iface);
    let rx = McastReceiver::join(&h0.ns, group, PORT, &h0.iface);
    wait_member(&bed.gw, group, &h0.gw_port, MEMBER_TIMEOUT);

    McastSender::new(&p0.ns, &p0.iface)
        .with_hop_limit(HOPS)
        .send_numbered(group, PORT, COUNT, INTERVAL);
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}: datagrams from {p0}");
    thread::sleep(QUIET);
    assert_eq!(rx.count(), COUNT, "{rx}: duplicates");
    assert_eq!(rx.distinct(), COUNT, "{rx}: distinct datagrams");
    let sources: Vec<IpAddr> = rx.addresses().into_iter().map(|(s, _)| s).collect();
    assert_eq!(sources, vec![IpAddr::V4(p0.v4)], "{rx}: sources");
    wire.check_thread();
    assert_eq!(
        wire.hop_limits(group).into_iter().collect::<Vec<_>>(),
        vec![HOPS as u8 - 1],
        "{wire}: TTL of {group} (sent with {HOPS}, one routed hop)"
    );
    let forwarded = port_counter(&stats_json(&bed.gw), hub, "packets", "forwarded");
    assert_eq!(forwarded, COUNT, "forwarded on {hub}");
}

/// (b) A peer's join (a socket joining on its WireGuard interface: kernel IGMPv3 through the
/// tunnel) is learned on the hub interface.
#[test]
fn peer_join_is_learned_on_hub() {
    require_testbed!("wireguard-go", "wg", "ping");
    let group = addr("239.31.2.1");
    let bed = WgBed::new("wgb", WgOptions { lan_hosts: 1, peers: 1 });
    let (p0, hub) = (&bed.peers[0], &bed.hub_iface);
    let _relay = start_relay(&bed, &[]);

    let _rx = McastReceiver::join(&p0.ns, group, PORT, &p0.iface);
    wait_member(&bed.gw, group, hub, MEMBER_TIMEOUT);
    let doc = groups_json(&bed.gw);
    let m =
        member(&doc, group, hub).unwrap_or_else(|| panic!("no member {hub} of {group}: {doc:#}"));
    assert_eq!(m["compat"], "igmpv3", "{hub}: {m}");
    assert_eq!(m["mode"], "exclude", "{hub}: {m}");
}

/// (c) Per-peer delivery (`--per-client HUB`): the LAN host's datagrams reach the peer that
/// joined, each copy addressed to its tunnel address (UDP port and payload unchanged, the LAN
/// sender as source), and not the peer that did not; after the joined peer leaves, it gets
/// nothing more.
///
/// Both peers run a receiver bound to `0.0.0.0:PORT`; only peer A's joined the group. Peer B
/// also has a wire observer on its WireGuard interface for copies still addressed to the group.
#[test]
fn per_peer_delivery_only_to_joined_peer() {
    require_testbed!("wireguard-go", "wg", "ping");
    let group = addr("239.31.3.1");
    let bed = WgBed::new("wgc", WgOptions { lan_hosts: 1, peers: 2 });
    let (h0, a, b, hub) = (&bed.lan[0], &bed.peers[0], &bed.peers[1], &bed.hub_iface);
    let _relay = start_relay(&bed, &["--per-client", hub]);

    let wire_b = WireObserver::new(&b.ns, &b.iface);
    let rx_b = McastReceiver::wildcard(&b.ns, group, PORT);
    let rx_a = McastReceiver::join_wildcard(&a.ns, group, PORT, &a.iface);
    wait_member(&bed.gw, group, hub, MEMBER_TIMEOUT);

    let sender = McastSender::new(&h0.ns, &h0.iface).with_hop_limit(HOPS);
    sender.send_numbered(group, PORT, COUNT, INTERVAL);
    assert_eq!(
        rx_a.wait_for(COUNT, DELIVERY_TIMEOUT),
        COUNT,
        "{rx_a}: datagrams from the LAN ({} forwarded on {}; per-client state: {})",
        port_counter(&stats_json(&bed.gw), &h0.gw_port, "packets", "forwarded"),
        h0.gw_port,
        groups_json(&bed.gw)["clients"]
    );
    thread::sleep(QUIET);
    assert_eq!(rx_a.count(), COUNT, "{rx_a}: duplicates");
    assert_eq!(rx_a.distinct(), COUNT, "{rx_a}: distinct datagrams");
    let expected = [(IpAddr::V4(h0.v4), IpAddr::V4(a.v4))].into_iter().collect();
    assert_eq!(rx_a.addresses(), expected, "{rx_a}: (source, destination) of the copies");
    assert_eq!(rx_b.count(), 0, "{rx_b}: copies for the peer that did not join");
    assert_eq!(wire_b.count(group), 0, "{wire_b}: group traffic for the peer that did not join");

    // A leaves: its kernel sends a TO_IN({}) report through the tunnel.
    drop(rx_a);
    wait_not_member(&bed.gw, group, hub, MEMBER_TIMEOUT);
    let rx_a = McastReceiver::wildcard(&a.ns, group, PORT);
    let wire_a = WireObserver::new(&a.ns, &a.iface);
    sender.send_numbered(group, PORT, COUNT, INTERVAL);
    thread::sleep(QUIET);
    assert_eq!(rx_a.count(), 0, "{rx_a}: copies after the peer left");
    assert_eq!(wire_a.count(group), 0, "{wire_a}: group traffic after the peer left");
    assert_eq!(rx_b.count(), 0, "{rx_b}: copies for the peer that never joined");
    assert_eq!(wire_b.count(group), 0, "{wire_b}: group traffic for the peer that never joined");
}

/// A WireGuard peer never hears the hub's multicast queries (no peer's AllowedIPs cover
/// 224.0.0.1), so on its own it would stop reporting and its membership would time out while
/// it is still joined (measured: gone after 5.5 s with a 2 s query interval). With
/// `--per-client`, mcrelay also sends each query to every known peer's tunnel address: the
/// peer answers, and stays a member across many group membership intervals.
#[test]
fn a_joined_peer_stays_a_member_through_query_rounds() {
    require_testbed!("wireguard-go", "wg", "ping");
    let group = addr("239.31.4.1");
    let bed = WgBed::new("wgq", WgOptions { lan_hosts: 1, peers: 1 });
    let (h0, a, hub) = (&bed.lan[0], &bed.peers[0], &bed.hub_iface);
    // Group membership interval: 2 x 2 s + 1 s = 5 s.
    let _relay = start_relay(&bed, &["--per-client", hub, "--query-interval", "2"]);
    let rx = McastReceiver::join_wildcard(&a.ns, group, PORT, &a.iface);
    wait_member(&bed.gw, group, hub, MEMBER_TIMEOUT);

    // Three membership intervals, checked every half second.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        let doc = groups_json(&bed.gw);
        assert!(member(&doc, group, hub).is_some(), "{hub} lost {group}: {doc:#}");
        thread::sleep(Duration::from_millis(500));
    }
    McastSender::new(&h0.ns, &h0.iface)
        .with_hop_limit(HOPS)
        .send_numbered(group, PORT, COUNT, INTERVAL);
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}: after the query rounds");
}

/// A restarted daemon keeps delivering to the peers of the previous one: WireGuard peers
/// never hear a multicast query, so they would not be learned again by themselves; the new
/// daemon takes them from the pinned per-peer targets, queries them at their addresses, and
/// keeps them past a membership interval from their answers.
#[test]
fn per_peer_delivery_survives_a_daemon_restart() {
    require_testbed!("wireguard-go", "wg", "ping");
    let group = addr("239.31.5.1");
    let bed = WgBed::new("wgr", WgOptions { lan_hosts: 1, peers: 1 });
    let (h0, a, hub) = (&bed.lan[0], &bed.peers[0], &bed.hub_iface);
    let args = ["--per-client", hub.as_str(), "--query-interval", "2"];
    let mut relay = start_relay(&bed, &args);
    let rx = McastReceiver::join_wildcard(&a.ns, group, PORT, &a.iface);
    wait_member(&bed.gw, group, hub, MEMBER_TIMEOUT);
    relay.stop();

    let _relay = start_relay(&bed, &args);
    let sender = McastSender::new(&h0.ns, &h0.iface).with_hop_limit(HOPS);
    sender.send_numbered(group, PORT, COUNT, INTERVAL);
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}: right after the restart");
    // Past three membership intervals (2 x 2 s + 1 s) of the new daemon.
    thread::sleep(Duration::from_secs(15));
    let doc = groups_json(&bed.gw);
    assert!(member(&doc, group, hub).is_some(), "{hub} lost {group}: {doc:#}");
    sender.send_numbered(group, PORT, COUNT, INTERVAL);
    assert_eq!(rx.wait_for(2 * COUNT, DELIVERY_TIMEOUT), 2 * COUNT, "{rx}: 15 s later");
}
