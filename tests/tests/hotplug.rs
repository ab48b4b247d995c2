//! Interfaces that come and go: `-i` globs attach to interfaces that appear after start-up,
//! and a port that vanishes (its namespace deleted, an OpenVPN restart destroying its tap)
//! is forgotten with its learned state, then picked up again when it comes back.

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    daemon::{ports_json as ports, wait_groups},
    groups::{port_in_groups, port_names},
    mcast::McastStream,
    require_testbed,
    topology::Star,
    veth_pair, McastReceiver, Mcrelay, NetNs,
};

const PORT: u16 = 5000;
const DEADLINE: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut pred: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < DEADLINE, "waited {DEADLINE:?} for {what}");
        thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// A receiver host on a new veth segment `port` of the gateway.
struct Segment {
    ns: NetNs,
}

impl Segment {
    fn new(gw: &NetNs, port: &str, tag: &str) -> Self {
        let ns = NetNs::new(&format!("mcrhp{tag}"));
        veth_pair(gw, port, &ns, "eth0");
        ns.add_addr("eth0", "198.18.200.2/24");
        ns.gro_on("eth0");
        ns.tx_off("eth0");
        Self { ns }
    }
}

/// Streams numbered datagrams to `group` every millisecond until dropped.
fn stream(ns: &NetNs, iface: &str, group: IpAddr) -> McastStream {
    McastStream::start(ns, iface, group, PORT, Duration::from_millis(1))
}

#[test]
fn glob_ports_come_and_go_and_forwarding_resumes() {
    require_testbed!();
    let group: IpAddr = "239.20.0.1".parse().expect("group");
    let star = Star::new("hp", 1);
    let sender_host = &star.hosts[0];
    // gw0 exists; hp* does not yet.
    let mut relay = Mcrelay::start_ready(
        &star.gw,
        &[
            "run",
            "-i",
            "gw0",
            "-i",
            "hp*",
            "--query-interval",
            "20",
            "--query-response-interval",
            "1",
        ],
    );
    assert_eq!(port_names(&ports(&star.gw)), ["gw0"]);
    let _stream = stream(&sender_host.ns, &sender_host.iface, group);

    for round in 0..2 {
        let created = Instant::now();
        let segment = Segment::new(&star.gw, "hp0", &format!("{round}"));
        wait_until("hp0 to be attached", || port_names(&ports(&star.gw)).contains(&"hp0".into()));
        let rx = McastReceiver::join(&segment.ns, group, PORT, "eth0");
        wait_until("the stream to reach the new port", || rx.count() > 0);
        eprintln!(
            "round {round}: first datagram {:?} after the interface was created",
            created.elapsed()
        );
        let doc = ports(&star.gw);
        let hp0 = doc["ports"].as_array().into_iter().flatten().find(|p| p["iface"] == "hp0");
        assert!(hp0.is_some_and(|p| p["mode"] == "native"), "{doc:#}");
        drop(rx);
        drop(segment); // deletes the namespace and with it the veth pair
        wait_until("hp0 to be forgotten", || !port_names(&ports(&star.gw)).contains(&"hp0".into()));
        // The state file is rewritten a few times a second: poll it.
        wait_groups(&star.gw, "the vanished port's learned state to be dropped", DEADLINE, |d| {
            !port_in_groups(d, "hp0")
        });
    }
    let status = relay.stop();
    assert!(status.success(), "{status}; stderr:\n{}", relay.stderr());
}

#[test]
fn static_members_follow_the_interface_name() {
    require_testbed!();
    let group: IpAddr = "239.20.0.2".parse().expect("group");
    let star = Star::new("hs", 1);
    let sender_host = &star.hosts[0];
    let members = format!("{group}@hp1");
    let mut relay =
        Mcrelay::start_ready(&star.gw, &["run", "-i", "gw0", "-i", "hp*", "--static", &members]);
    let _stream = stream(&sender_host.ns, &sender_host.iface, group);
    for round in 0..2 {
        let segment = Segment::new(&star.gw, "hp1", &format!("s{round}"));
        // A wire observer would do as well; a joined socket also proves the checksum path.
        let rx = McastReceiver::join(&segment.ns, group, PORT, "eth0");
        wait_until("the static group to reach hp1", || rx.count() > 0);
        drop(rx);
        drop(segment);
        wait_until("hp1 to be forgotten", || !port_names(&ports(&star.gw)).contains(&"hp1".into()));
    }
    let status = relay.stop();
    assert!(status.success(), "{status}; stderr:\n{}", relay.stderr());
}

/// A port that vanishes and comes back under the same name (an OpenVPN restart re-creates its
/// tap) gets its memberships back at once: the hosts behind it never noticed and send no
/// report by themselves. Here the host cannot report at all any more (nftables drops its
/// IGMP), so only the remembered membership can make the stream flow again.
#[test]
fn a_recreated_port_gets_its_memberships_back() {
    require_testbed!("nft");
    let group: IpAddr = "239.20.0.3".parse().expect("group");
    let star = Star::new("hf", 1);
    let sender_host = &star.hosts[0];
    let segment = Segment::new(&star.gw, "hp2", "f");
    let mut relay = Mcrelay::start_ready(
        &star.gw,
        &["run", "--no-pin", "-i", "gw0", "-i", "hp*", "--query-interval", "20"],
    );
    let rx = McastReceiver::join(&segment.ns, group, PORT, "eth0");
    let _stream = stream(&sender_host.ns, &sender_host.iface, group);
    wait_until("the stream to reach hp2", || rx.count() > 0);
    // From now on the host sends no IGMP at all.
    for rule in [
        "add table inet mcrtest",
        "add chain inet mcrtest out { type filter hook output priority 0 ; }",
        "add rule inet mcrtest out meta l4proto igmp drop",
    ] {
        let mut argv = vec!["nft"];
        argv.extend(rule.split(' '));
        segment.ns.exec(&argv);
    }
    // The gateway's end of the segment leaves the namespace and comes back: DELLINK, NEWLINK.
    let parking = NetNs::new("mcrhfpark");
    star.gw.ip(&["link", "set", "hp2", "netns", parking.name()]);
    wait_until("hp2 to be forgotten", || !port_names(&ports(&star.gw)).contains(&"hp2".into()));
    let before = rx.count();
    parking.ip(&["link", "set", "hp2", "netns", star.gw.name()]);
    star.gw.link_up("hp2");
    wait_until("hp2 to be attached again", || port_names(&ports(&star.gw)).contains(&"hp2".into()));
    let took = wait_until("the stream to flow again", || rx.count() > before + 10);
    eprintln!("stream resumed {took:?} after the port was attached again");
    assert!(relay.stderr().contains("restoring its memberships"), "{}", relay.stderr());
    let status = relay.stop();
    assert!(status.success(), "{status}");
}
