//! Frames that must never be relayed even though they carry IP multicast data: VLAN-tagged
//! frames arriving on a port (a trunk: they belong to their VLAN, not to the untagged segments
//! mcrelay joins), and frames whose destination MAC is not the one their group maps to
//! (802.1D reserved addresses among them). They are passed to the stack and counted as
//! `passed_other`; the untagged, well-addressed frames next to them are relayed.
//!
//! VLAN subinterfaces (`eth1.10`) as ports cannot be tested on this kernel (no 8021q); see
//! docs/architecture.md, "Topologies".

use std::{net::Ipv4Addr, thread, time::Duration};

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

/// A device that cannot transmit XDP redirects (here a bridge; VLAN subinterfaces, dummies,
/// VXLAN and L3 tun are the same) is attached, but devmap broadcasts skip it: mcrelay says so
/// in its log and in `mcrelay ports` (`receives_copies: false`) instead of counting copies that
/// never leave.
#[test]
fn ports_that_cannot_take_xdp_copies_are_marked() {
    require_testbed!();
    let star = Star::new("nx", 1);
    star.gw.ip(&["link", "add", "dum0", "type", "bridge"]);
    star.gw.ip(&["link", "set", "dum0", "up"]);
    let relay = star.start_relay(&["-i", "dum0"]);
    let ports = mcrelay_tests::daemon::ports_json(&star.gw);
    let copies = |iface: &str| {
        mcrelay_tests::daemon::port_entry(&ports, iface).map(|p| p["receives_copies"].clone())
    };
    assert_eq!(copies("dum0"), Some(serde_json::Value::Bool(false)), "{ports:#}");
    assert_eq!(copies(&star.hosts[0].gw_port), Some(serde_json::Value::Bool(true)), "{ports:#}");
    assert!(relay.stderr().contains("cannot transmit XDP redirects"), "{}", relay.stderr());
}
