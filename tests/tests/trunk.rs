//! Frames that must never be relayed even though they carry IP multicast data: VLAN-tagged
//! frames arriving on a port (a trunk: they belong to their VLAN, not to the untagged segments
//! mcrelay joins), and frames whose destination MAC is not the one their group maps to
//! (802.1D reserved addresses among them). They are passed to the stack and counted as
//! `passed_other`; the untagged, well-addressed frames next to them are relayed.
//!
//! VLAN subinterfaces (`eth1.10`) as ports cannot be tested on this kernel (no 8021q); see
//! docs/architecture.md, "Topologies".

use std::{
    net::{IpAddr, Ipv4Addr},
    thread,
    time::Duration,
};

use mcrelay_tests::{
    daemon::{port_counter, stats_json},
    loops::{ipv4_udp_frame, send_frames},
    require_testbed,
    topology::Star,
};

const PORT: u16 = 5000;
const N: u64 = 50;

#[test]
fn tagged_and_misaddressed_data_is_passed_not_relayed() {
    require_testbed!();
    let star = Star::new("tk", 2);
    let [s, r1] = &star.hosts[..] else { unreachable!() };
    let group = Ipv4Addr::new(239, 12, 0, 1);
    let member = format!("{group}@{}", r1.gw_port);
    let _relay = star.start_relay(&["--static", &member, "--unknown", "flood"]);
    let mac = [0x02, 0, 0, 0, 0x12, 0x34];
    let plain = ipv4_udp_frame(mac, s.v4, group, PORT, b"plain");
    let tagged = |vid: u16| {
        let mut f = plain.clone();
        let tag = [0x81, 0x00, (vid >> 8) as u8, vid as u8];
        f.splice(12..12, tag);
        f
    };
    let to = |dst: [u8; 6]| {
        let mut f = plain.clone();
        f[..6].copy_from_slice(&dst);
        f
    };
    let mut frames = Vec::new();
    for _ in 0..N {
        frames.push(plain.clone());
        frames.push(tagged(10));
        frames.push(to([0x01, 0x80, 0xc2, 0, 0, 0x0e])); // LLDP's reserved address
        frames.push(to([0x01, 0x00, 0x5e, 0x0c, 0, 0x02])); // another group's MAC
    }
    send_frames(&s.ns, &s.iface, &frames);
    // The counters are per CPU and summed on read; give the last frames a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = stats_json(&star.gw);
        let forwarded = port_counter(&stats, &s.gw_port, "packets", "forwarded");
        let other = port_counter(&stats, &s.gw_port, "packets", "passed_other");
        if forwarded == N && other == 3 * N {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "forwarded {forwarded} (want {N}), passed_other {other} (want {}):\n{stats:#}",
            3 * N
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A device that cannot transmit XDP redirects (here a bridge; VLAN subinterfaces, VXLAN and
/// L3 tun are the same) is attached in TC mode and does receive copies: a receiver behind the
/// bridge gets every datagram of a group the bridge is a member of. `mcrelay ports` says `tc`.
#[test]
fn ports_that_cannot_take_xdp_copies_get_them_through_tc() {
    require_testbed!();
    let star = Star::new("nx", 1);
    let sender = &star.hosts[0];
    star.gw.add_bridge("brx0");
    let behind = mcrelay_tests::NetNs::new("mcrnx-behind");
    mcrelay_tests::veth_pair(&star.gw, "bp0", &behind, "eth0");
    star.gw.set_master("bp0", "brx0");
    star.gw.ip(&["link", "set", "brx0", "up"]);
    behind.add_addr("eth0", "198.18.77.2/24");
    let group = Ipv4Addr::new(239, 12, 0, 2);
    let member = format!("{group}@brx0");
    let relay = star.start_relay(&["-i", "brx0", "--static", &member]);
    let ports = mcrelay_tests::daemon::ports_json(&star.gw);
    let port = |iface: &str| mcrelay_tests::daemon::port_entry(&ports, iface).cloned();
    let bridge = port("brx0").expect("brx0 attached");
    assert_eq!(bridge["mode"], "tc", "{ports:#}");
    assert_eq!(bridge["receives_copies"], true, "{ports:#}");
    assert!(relay.stderr().contains("cannot transmit XDP redirects"), "{}", relay.stderr());

    let rx = mcrelay_tests::McastReceiver::join(&behind, IpAddr::V4(group), PORT, "eth0");
    mcrelay_tests::McastSender::new(&sender.ns, &sender.iface).send_numbered(
        IpAddr::V4(group),
        PORT,
        N,
        Duration::from_millis(1),
    );
    assert_eq!(rx.wait_for(N, Duration::from_secs(10)), N, "{rx}: behind the bridge");
}

/// A group whose port set has a port only the TC program reaches gets all its copies from the
/// TC program, which copies to at most 32 targets: with 34 member ports the set is cut, logged,
/// and counted (`tc_targets_cut` in `mcrelay groups --json`).
#[test]
fn a_tc_port_set_beyond_32_targets_is_cut_logged_and_counted() {
    require_testbed!();
    let gw = mcrelay_tests::NetNs::new("mcrtcc-gw");
    let ports: Vec<String> = (0..34).map(|n| format!("c{n}")).collect();
    for (n, port) in ports.iter().enumerate() {
        let peer = format!("d{n}");
        gw.ip(&["link", "add", port, "type", "veth", "peer", "name", &peer]);
        gw.link_up(port);
        gw.link_up(&peer);
    }
    let member = format!("239.12.0.9@{}", ports.join(","));
    // c0 routed: attached in TC mode, so the group has a member XDP cannot reach.
    let relay = mcrelay_tests::Mcrelay::start_ready(
        &gw,
        &["run", "-i", "c*", "--l3", "c0", "--static", &member],
    );
    let doc = mcrelay_tests::daemon::groups_json(&gw);
    let cut = doc["control"]["tc_targets_cut"].as_u64().unwrap_or(0);
    assert!(cut >= 1, "tc_targets_cut: {doc:#}");
    let stderr = relay.stderr();
    assert!(stderr.contains("at most 32 ports and peers"), "{stderr}");
}
