//! The VPN gateway end to end with real OpenVPN (TLS, `dev tap`, two clients in their own
//! namespaces over "WAN" veths; see `mcrelay_tests::openvpn`). mcrelay runs on the gateway with
//! the LAN veths and the server's tap as ports and learns every membership from the hosts' own
//! IGMP/MLD (no `--static` anywhere).
//!
//! Counts are exact where mcrelay is the only path (no bridge, no multicast routing on the
//! gateway, `client-to-client` off unless a test says otherwise); a LAN host that joined nothing
//! watches its wire and must see nothing. Waits poll with generous deadlines; nothing asserts how
//! fast something happened (the restart test prints its gap).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    daemon::{groups_json, ports_json, stats_json as stats, wait_member, wait_not_member},
    mcast::{payload, McastStream},
    openvpn::{VpnBed, VpnClient, VpnOptions, CLIENT_TAP},
    port_counter, require_testbed,
    topology::Host,
    McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};
use serde_json::Value;

const PORT: u16 = 5000;
const COUNT: u64 = 100;
const INTERVAL: Duration = Duration::from_millis(2);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
const MEMBER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to keep watching after everything expected arrived, for duplicates and leaks.
const QUIET: Duration = Duration::from_millis(700);
/// Short query interval (hosts re-report often), long enough membership interval (2 * 5 + 1 s).
const TIMERS: [&str; 6] =
    ["--query-interval", "5", "--query-response-interval", "1", "--last-member-interval", "0.2"];

/// Starts mcrelay in the gateway on `ifaces` (or on every LAN port and tap) with [`TIMERS`] and
/// `extra`, waits until it is ready and prints the attach mode of every port.
fn start_relay(bed: &VpnBed, ifaces: Option<&[&str]>, extra: &[&str]) -> Mcrelay {
    let mut args: Vec<String> = vec!["run".into()];
    match ifaces {
        Some(list) => args.extend(list.iter().flat_map(|i| ["-i".to_string(), i.to_string()])),
        None => args.extend(bed.iface_args()),
    }
    args.extend(TIMERS.iter().chain(extra).map(|s| s.to_string()));
    let relay = Mcrelay::start_ready(&bed.gw, &args);
    print_modes(&bed.gw);
    relay
}

/// Prints `iface=mode` for every port of `mcrelay ports --json`.
fn print_modes(gw: &NetNs) {
    let doc = ports_json(gw);
    let modes: Vec<String> = doc["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}={}", p["iface"].as_str().unwrap_or("?"), p["mode"]))
        .collect();
    eprintln!("attach modes: {}", modes.join(" "));
}

fn forwarded(gw: &NetNs, iface: &str) -> u64 {
    port_counter(&stats(gw), iface, "packets", "forwarded")
}

fn join_lan(host: &Host, group: IpAddr) -> McastReceiver {
    McastReceiver::join(&host.ns, group, PORT, &host.iface)
}

fn join_client(client: &VpnClient, group: IpAddr) -> McastReceiver {
    McastReceiver::join(&client.ns, group, PORT, &client.tap)
}

fn observe_lan(host: &Host) -> WireObserver {
    WireObserver::new(&host.ns, &host.iface)
}

fn observe_client(client: &VpnClient) -> WireObserver {
    WireObserver::new(&client.ns, &client.tap)
}

fn send_lan(host: &Host, group: IpAddr) {
    McastSender::new(&host.ns, &host.iface).send_numbered(group, PORT, COUNT, INTERVAL);
}

fn send_client(client: &VpnClient, group: IpAddr) {
    McastSender::new(&client.ns, &client.tap).send_numbered(group, PORT, COUNT, INTERVAL);
}

/// Every datagram arrived, exactly once.
fn expect_exactly_all(rx: &McastReceiver) {
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}: datagrams received");
    thread::sleep(QUIET);
    assert_eq!(rx.count(), COUNT, "{rx}: duplicates");
    assert_eq!(rx.distinct(), COUNT, "{rx}: distinct datagrams");
}

fn expect_none(wire: &WireObserver, group: IpAddr, why: &str) {
    wire.check_thread();
    assert_eq!(wire.count(group), 0, "{wire}: {group} arrived, but {why}");
}

fn default_bed(tag: &str) -> VpnBed {
    VpnBed::new(tag, VpnOptions::default())
}

/// A LAN sender reaches a VPN client that joined on its tap, through mcrelay (lan0 -> vpntap0),
/// and nothing reaches the LAN host that joined nothing.
fn lan_to_client(tag: &str, group: IpAddr) {
    let bed = default_bed(tag);
    let [h0, h1] = &bed.lan[..] else { unreachable!() };
    let [c0, c1] = &bed.clients[..] else { unreachable!() };
    let tap = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, None, &[]);
    let (lan_wire, other_client) = (observe_lan(h1), observe_client(c1));
    let rx = join_client(c0, group);
    wait_member(&bed.gw, group, &tap, MEMBER_TIMEOUT);

    send_lan(h0, group);
    expect_exactly_all(&rx);
    expect_none(&lan_wire, group, "that LAN host joined nothing");
    assert_eq!(forwarded(&bed.gw, &h0.gw_port), COUNT, "forwarded counter of {}", h0.gw_port);
    assert_eq!(forwarded(&bed.gw, &tap), 0, "forwarded counter of {tap}");
    // OpenVPN floods every multicast frame it reads from its tap to every client (what
    // per-client delivery is about); shown, not asserted.
    eprintln!(
        "{tag}: the client that joined nothing saw {} of {COUNT} datagrams on its tap",
        other_client.count(group)
    );
}

#[test]
fn lan_sender_reaches_joined_vpn_client_ipv4() {
    require_testbed!("openvpn", "openssl", "ping");
    lan_to_client("ovl4", addr("239.20.1.1"));
}

#[test]
fn lan_sender_reaches_joined_vpn_client_ipv6() {
    require_testbed!("openvpn", "openssl", "ping");
    lan_to_client("ovl6", addr("ff1e::20:1:1"));
}

/// A VPN client's sender reaches a LAN receiver through mcrelay (vpntap0 -> lan0), not the LAN
/// host that joined nothing.
fn client_to_lan(tag: &str, group: IpAddr) {
    let bed = default_bed(tag);
    let [h0, h1] = &bed.lan[..] else { unreachable!() };
    let c0 = &bed.clients[0];
    let tap = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, None, &[]);
    let lan_wire = observe_lan(h1);
    let rx = join_lan(h0, group);
    wait_member(&bed.gw, group, &h0.gw_port, MEMBER_TIMEOUT);

    send_client(c0, group);
    expect_exactly_all(&rx);
    expect_none(&lan_wire, group, "that LAN host joined nothing");
    assert_eq!(forwarded(&bed.gw, &tap), COUNT, "forwarded counter of {tap}");
}

#[test]
fn vpn_client_sender_reaches_joined_lan_receiver_ipv4() {
    require_testbed!("openvpn", "openssl", "ping");
    client_to_lan("ovc4", addr("239.20.2.1"));
}

#[test]
fn vpn_client_sender_reaches_joined_lan_receiver_ipv6() {
    require_testbed!("openvpn", "openssl", "ping");
    client_to_lan("ovc6", addr("ff1e::20:2:1"));
}

/// Client to client through mcrelay: the clients sit on two OpenVPN server instances (two
/// taps), so c0's datagram enters the gateway on vpntap0 and mcrelay relays it to vpntap1.
fn client_to_client_across_taps(tag: &str, group: IpAddr) {
    let bed = VpnBed::new(tag, VpnOptions { servers: 2, ..VpnOptions::default() });
    let [c0, c1] = &bed.clients[..] else { unreachable!() };
    let (tap0, tap1) = (bed.servers[c0.server].tap.clone(), bed.servers[c1.server].tap.clone());
    assert_ne!(tap0, tap1);
    let _relay = start_relay(&bed, None, &[]);
    let lan_wires: Vec<WireObserver> = bed.lan.iter().map(observe_lan).collect();
    let rx = join_client(c1, group);
    wait_member(&bed.gw, group, &tap1, MEMBER_TIMEOUT);

    send_client(c0, group);
    expect_exactly_all(&rx);
    for wire in &lan_wires {
        expect_none(wire, group, "no LAN host joined");
    }
    assert_eq!(forwarded(&bed.gw, &tap0), COUNT, "forwarded counter of {tap0}");
}

#[test]
fn client_to_client_across_two_vpn_servers_ipv4() {
    require_testbed!("openvpn", "openssl", "ping");
    client_to_client_across_taps("ovx4", addr("239.20.3.1"));
}

#[test]
fn client_to_client_across_two_vpn_servers_ipv6() {
    require_testbed!("openvpn", "openssl", "ping");
    client_to_client_across_taps("ovx6", addr("ff1e::20:3:1"));
}

/// Both clients on one tap, `client-to-client` off: c0's datagram enters the gateway on the tap,
/// c1's membership is on that same port, and mcrelay never sends a frame back out of its
/// ingress port, so c1 gets nothing. While c1's membership is the group's only one, the frames
/// are still counted `forwarded` (the broadcast redirect excludes the ingress port and makes no
/// copy); once a LAN host joins, it receives every datagram.
#[test]
fn shared_tap_without_client_to_client_does_not_hairpin() {
    require_testbed!("openvpn", "openssl", "ping");
    let group = addr("239.20.4.1");
    let bed = default_bed("ovh");
    let [h0, h1] = &bed.lan[..] else { unreachable!() };
    let [c0, c1] = &bed.clients[..] else { unreachable!() };
    let tap = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, None, &[]);
    let (c1_wire, h0_wire, h1_wire) = (observe_client(c1), observe_lan(h0), observe_lan(h1));
    let rx_c1 = join_client(c1, group);
    wait_member(&bed.gw, group, &tap, MEMBER_TIMEOUT);

    send_client(c0, group);
    thread::sleep(QUIET);
    assert_eq!(forwarded(&bed.gw, &tap), COUNT, "forwarded counter of {tap}");
    expect_none(&h0_wire, group, "no LAN host joined yet");

    let rx_h0 = join_lan(h0, group);
    wait_member(&bed.gw, group, &h0.gw_port, MEMBER_TIMEOUT);
    send_client(c0, group);
    expect_exactly_all(&rx_h0);
    assert_eq!(forwarded(&bed.gw, &tap), 2 * COUNT, "forwarded counter of {tap}");
    assert_eq!(rx_c1.count(), 0, "{rx_c1}: got datagrams of the client on the same tap");
    expect_none(&c1_wire, group, "nothing is sent back out of the tap it came in on");
    expect_none(&h1_wire, group, "that LAN host joined nothing");
}

/// Both clients on one tap with `client-to-client`: OpenVPN itself delivers c0's multicast to
/// c1 (once: mcrelay sends nothing back into the tap) and still writes it into the tap, where
/// mcrelay relays it to the joined LAN receiver only.
#[test]
fn shared_tap_with_client_to_client_openvpn_delivers() {
    require_testbed!("openvpn", "openssl", "ping");
    let group = addr("239.20.5.1");
    let bed = VpnBed::new("ovo", VpnOptions { client_to_client: true, ..VpnOptions::default() });
    let [h0, h1] = &bed.lan[..] else { unreachable!() };
    let [c0, c1] = &bed.clients[..] else { unreachable!() };
    let tap = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, None, &[]);
    let lan_wire = observe_lan(h1);
    let (rx_c1, rx_h0) = (join_client(c1, group), join_lan(h0, group));
    wait_member(&bed.gw, group, &tap, MEMBER_TIMEOUT);
    wait_member(&bed.gw, group, &h0.gw_port, MEMBER_TIMEOUT);

    send_client(c0, group);
    expect_exactly_all(&rx_c1);
    expect_exactly_all(&rx_h0);
    expect_none(&lan_wire, group, "that LAN host joined nothing");
    assert_eq!(forwarded(&bed.gw, &tap), COUNT, "forwarded counter of {tap}");
}

/// A sender that does not choose an interface follows the routes: the route-up hook's
/// `224.0.0.0/4 dev tap0` (IPv4) and `multicast ff00::/8 dev tap0 table local metric 1` (IPv6)
/// send it into the tunnel; without them it leaves through the WAN NIC (the client's default
/// route) and never reaches the gateway's LAN.
#[test]
fn client_multicast_routes_decide_whether_traffic_enters_the_tunnel() {
    require_testbed!("openvpn", "openssl", "ping");
    let bed = default_bed("ovr");
    let h0 = &bed.lan[0];
    let c0 = &bed.clients[0];
    let tap = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, None, &[]);
    for group in [addr("239.20.6.1"), addr("ff1e::20:6:1")] {
        let rx = join_lan(h0, group);
        wait_member(&bed.gw, group, &h0.gw_port, MEMBER_TIMEOUT);
        let before = forwarded(&bed.gw, &tap);
        send_unbound(&c0.ns, group, 0..COUNT);
        expect_exactly_all(&rx);
        assert_eq!(forwarded(&bed.gw, &tap) - before, COUNT, "{group}: forwarded from {tap}");

        // The mistake from the story: the route points at the physical NIC.
        if group.is_ipv4() {
            c0.ns.ip(&["route", "del", "224.0.0.0/4", "dev", CLIENT_TAP]);
        } else {
            c0.ns.ip(&[
                "-6",
                "route",
                "del",
                "multicast",
                "ff00::/8",
                "dev",
                CLIENT_TAP,
                "table",
                "local",
                "metric",
                "1",
            ]);
            c0.ns.ip(&[
                "-6",
                "route",
                "add",
                "multicast",
                "ff00::/8",
                "dev",
                &c0.wan,
                "table",
                "local",
                "metric",
                "1",
            ]);
        }
        let wan_wire = WireObserver::new(&bed.gw, &format!("wan{}", 0));
        send_unbound(&c0.ns, group, COUNT..2 * COUNT);
        assert_eq!(
            wan_wire.wait_for(group, COUNT, DELIVERY_TIMEOUT),
            COUNT,
            "{wan_wire}: {group} without the route into the tunnel"
        );
        thread::sleep(QUIET);
        assert_eq!(rx.count(), COUNT, "{rx}: {group} arrived without the route into the tunnel");
    }
}

/// Sends datagrams `seqs` to `group` from a socket in `ns` that names no interface.
fn send_unbound(ns: &NetNs, group: IpAddr, seqs: std::ops::Range<u64>) {
    ns.in_netns(|| {
        let bind: SocketAddr =
            if group.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("bind address");
        let socket = UdpSocket::bind(bind).expect("binding an unbound sender");
        for seq in seqs {
            socket
                .send_to(payload(group, seq).as_bytes(), SocketAddr::new(group, PORT))
                .unwrap_or_else(|e| panic!("sending to {group} from {ns}: {e}"));
            thread::sleep(INTERVAL);
        }
    });
}

/// The bridge variant: LAN veths and the tap are ports of a Linux bridge (clients get LAN
/// addresses through `server-bridge`), and mcrelay is attached to the same ports. XDP sees the
/// frames before the bridge: relayed multicast never reaches the bridge (exactly once, nothing
/// to the non-member), while IGMP/MLD, unicast and whatever mcrelay passes go on to the bridge.
/// A group nobody joined is passed (`passed_unknown`) with the default `--unknown router-ports`,
/// and the bridge, which has no querier, floods it to every port; `--unknown drop` (the
/// recommended set-up for a bridged gateway) keeps it off the bridge.
fn bridge_variant(tag: &str, unknown: &str) {
    let bed = VpnBed::new(tag, VpnOptions { bridge: true, ..VpnOptions::default() });
    let [h0, h1] = &bed.lan[..] else { unreachable!() };
    let c0 = &bed.clients[0];
    let tap = bed.servers[0].tap.clone();
    let _relay = start_relay(&bed, None, &["--unknown", unknown]);
    // Unicast crosses the bridge as before (the point of a bridged VPN).
    let mut ping = c0.ns.command("ping");
    ping.args(["-c", "1", "-W", "5", &h0.v4.to_string()]);
    let out = ping.output().expect("ping");
    assert!(out.status.success(), "{c0} cannot ping LAN host {}: {out:?}", h0.v4);

    let pairs =
        [(addr("239.20.7.1"), addr("239.20.7.2")), (addr("ff1e::20:7:1"), addr("ff1e::20:7:2"))];
    for (down, up) in pairs {
        let lan_wire = observe_lan(h1);
        let rx = join_client(c0, down);
        wait_member(&bed.gw, down, &tap, MEMBER_TIMEOUT);
        let before = forwarded(&bed.gw, &h0.gw_port);
        send_lan(h0, down);
        expect_exactly_all(&rx);
        assert_eq!(forwarded(&bed.gw, &h0.gw_port) - before, COUNT, "{down}: forwarded");

        let rx = join_lan(h0, up);
        wait_member(&bed.gw, up, &h0.gw_port, MEMBER_TIMEOUT);
        let before = forwarded(&bed.gw, &tap);
        send_client(c0, up);
        expect_exactly_all(&rx);
        assert_eq!(forwarded(&bed.gw, &tap) - before, COUNT, "{up}: forwarded");
        expect_none(&lan_wire, down, "that LAN host joined nothing");
        expect_none(&lan_wire, up, "that LAN host joined nothing");
    }

    let nobody = addr("239.20.7.9");
    let (lan_wire, client_wire) = (observe_lan(h1), observe_client(c0));
    let counter = if unknown == "drop" { "drop_no_members" } else { "passed_unknown" };
    let count = |doc: &Value| port_counter(doc, &h0.gw_port, "packets", counter);
    let before = count(&stats(&bed.gw));
    send_lan(h0, nobody);
    let expected = if unknown == "drop" { 0 } else { COUNT };
    if expected > 0 {
        lan_wire.wait_for(nobody, COUNT, DELIVERY_TIMEOUT);
        client_wire.wait_for(nobody, COUNT, DELIVERY_TIMEOUT);
    }
    thread::sleep(QUIET);
    assert_eq!(count(&stats(&bed.gw)) - before, COUNT, "{counter} of {}", h0.gw_port);
    assert_eq!(lan_wire.count(nobody), expected, "{lan_wire}: group nobody joined");
    assert_eq!(client_wire.count(nobody), expected, "{client_wire}: group nobody joined");
}

#[test]
fn bridge_beside_mcrelay_floods_unknown_groups() {
    require_testbed!("openvpn", "openssl", "ping");
    bridge_variant("ovb", "router-ports");
}

/// The recommended bridged set-up.
#[test]
fn bridge_beside_mcrelay_with_unknown_drop() {
    require_testbed!("openvpn", "openssl", "ping");
    bridge_variant("ovd", "drop");
}

/// Watches `iface` in the namespace at `netns`: returns (when the old ifindex `old` vanished,
/// when a new `iface` was up and running), polling every millisecond until `stop`.
fn watch_link(
    netns: PathBuf,
    iface: String,
    old: u32,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(Option<Instant>, Option<Instant>)> {
    use nix::net::if_::InterfaceFlags;
    thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("opening the gateway's netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let (mut gone, mut up) = (None, None);
        while !stop.load(Ordering::SeqCst) && up.is_none() {
            let index = nix::net::if_::if_nametoindex(iface.as_str()).ok();
            if gone.is_none() && index != Some(old) {
                gone = Some(Instant::now());
            }
            if let (Some(_), Some(index)) = (gone, index) {
                let running = nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
                    addrs.any(|a| {
                        a.interface_name == iface
                            && a.flags
                                .contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING)
                    })
                });
                if index != old && running {
                    up = Some(Instant::now());
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        (gone, up)
    })
}

/// Pings `to` from `ns` (200 ms timeout per try) until it answers; when it did, or `None`
/// after 30 s.
fn wait_ping(ns: &NetNs, to: std::net::Ipv4Addr) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut ping = ns.command("ping");
        ping.args(["-c", "1", "-W", "0.2", &to.to_string()]);
        if ping.output().is_ok_and(|out| out.status.success()) {
            return Some(Instant::now());
        }
    }
    None
}

/// Restarting the OpenVPN server destroys its tap and creates a new one; mcrelay, started with
/// a glob, must attach to the new device and forwarding must resume without restarting mcrelay.
/// Prints the gap from the new tap being up to the first relayed datagram at the client.
#[test]
fn openvpn_server_restart_forwarding_resumes() {
    require_testbed!("openvpn", "openssl", "ping");
    let group = addr("239.20.8.1");
    let mut bed = default_bed("ovs");
    let tap = bed.servers[0].tap.clone();
    let (lan0, lan1) = (bed.lan[0].gw_port.clone(), bed.lan[1].gw_port.clone());
    let relay = start_relay(&bed, Some(&[&lan0, &lan1, "vpntap*"]), &[]);
    let rx = join_client(&bed.clients[0], group);
    let lan_wire = observe_lan(&bed.lan[1]);
    wait_member(&bed.gw, group, &tap, MEMBER_TIMEOUT);

    // A LAN sender streams the group every 5 ms for the whole test.
    let stream = McastStream::start(
        &bed.lan[0].ns,
        &bed.lan[0].iface,
        group,
        PORT,
        Duration::from_millis(5),
    );
    assert!(rx.wait_for(20, DELIVERY_TIMEOUT) >= 20, "{rx}: the stream does not flow");

    let old = bed.gw.ifindex(&tap);
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher =
        watch_link(bed.gw.path().to_path_buf(), tap.clone(), old, Arc::clone(&watch_stop));
    let stopped_at = Instant::now();
    bed.stop_server(0);
    let at_gone = rx.count();
    // The port's learned state goes with the device.
    wait_not_member(&bed.gw, group, &tap, Duration::from_secs(5));
    bed.start_server(0);

    let (mut attached, mut first) = (None, None);
    let reconnected = thread::scope(|scope| {
        let ping = scope.spawn(|| wait_ping(&bed.clients[0].ns, bed.servers[0].v4));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next_cli = Instant::now();
        while first.is_none() && Instant::now() < deadline {
            if rx.count() > at_gone {
                first = Some(Instant::now());
                break;
            }
            if Instant::now() >= next_cli && attached.is_none() {
                next_cli = Instant::now() + Duration::from_millis(50);
                let ports = ports_json(&bed.gw);
                let new_port = ports["ports"].as_array().into_iter().flatten().any(|p| {
                    p["iface"] == tap.as_str()
                        && p["ifindex"].as_u64().is_some_and(|i| i != u64::from(old))
                });
                if attached.is_none() && new_port {
                    attached = Some(Instant::now());
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        ping.join().expect("ping thread")
    });
    watch_stop.store(true, Ordering::SeqCst);
    let (gone, up) = watcher.join().expect("link watcher");
    let since = |t: Option<Instant>, from: Option<Instant>| match (t, from) {
        (Some(t), Some(from)) => format!("{:?}", t.saturating_duration_since(from)),
        _ => "never".to_string(),
    };
    eprintln!(
        "restart: old {tap} gone {} after SIGTERM; from the new {tap} up: mcrelay port attached \
         after {} (50 ms polling), client pings through the tunnel after {}, first relayed datagram \
         after {}",
        since(gone, Some(stopped_at)),
        since(attached, up),
        since(reconnected, up),
        since(first, up),
    );
    let Some(first) = first else {
        panic!(
            "no datagram reached the client within 30 s of restarting the server; \
             `mcrelay ports --json`:\n{:#}\n`mcrelay groups --json`:\n{:#}\n{}",
            ports_json(&bed.gw),
            groups_json(&bed.gw),
            bed.logs()
        );
    };
    eprintln!("--- mcrelay log ---\n{}---", relay.stderr());
    let up = up.expect("the new tap was never seen up");
    eprintln!("restart gap (new {tap} up -> first relayed datagram): {:?}", first - up);

    let resumed = rx.count();
    assert!(
        rx.wait_for(resumed + 50, DELIVERY_TIMEOUT) >= resumed + 50,
        "{rx}: the stream did not keep flowing after the restart"
    );
    drop(stream);
    expect_none(&lan_wire, group, "that LAN host joined nothing");
}
