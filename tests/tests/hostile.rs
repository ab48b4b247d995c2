//! A hostile or chatty host cannot exhaust mcrelay or starve other hosts: it floods reports for
//! 20,000 groups, records naming 300 sources and Neighbour Solicitations from one port while a
//! legitimate host on another port joins a group and must receive every packet of it. The
//! daemon stays alive with bounded descriptors and memory, and what it refused (limits, the
//! per-port rate of control frames) is counted.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use mcrelay_tests::{
    addr,
    control::CraftedHost,
    daemon::{wait_groups, wait_member},
    loops::send_frames,
    require_testbed,
    topology::Star,
    McastReceiver, McastSender,
};
use relay::membership::packet::{self, GroupRecord, Message, MessageKind, RecordType};

const PORT: u16 = 5000;
const COUNT: u64 = 200;

/// `/proc/PID/status` field in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// An ICMPv6 Neighbour Solicitation for a made-up target, from the crafted host (not MLD:
/// the control plane must not spend much on it).
fn neighbour_solicitation(mac: [u8; 6], n: u16) -> Vec<u8> {
    let target = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0x99, n);
    let o = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    let g = group.octets();
    let mut f = vec![0x33, 0x33, g[12], g[13], g[14], g[15]];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    let mut ip = vec![0x60, 0, 0, 0, 0, 24, 58, 255];
    ip.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    ip.extend_from_slice(&g);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&o);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp); // checksum left 0: the host stack drops it, as it would a forgery
    f
}

#[test]
fn a_flooding_host_does_not_starve_a_legitimate_join() {
    require_testbed!();
    let star = Star::new("hf", 3);
    let [s, hostile, legit] = &star.hosts[..] else { unreachable!() };
    let relay = star.start_relay(&[
        "--max-groups-per-port",
        "2000",
        "--query-interval",
        "20",
        "--query-response-interval",
        "1",
    ]);
    let pid = relay.pid();
    let attacker = CraftedHost::new(hostile, 5, false);
    let report = |group: Ipv4Addr| {
        let msg = Message {
            source: attacker.source,
            kind: MessageKind::V2Report { group: IpAddr::V4(group) },
        };
        packet::build(attacker.mac, &msg).expect("report")
    };
    // 20,000 groups.
    let floods: Vec<Vec<u8>> = (0..20_000u32)
        .map(|i| report(Ipv4Addr::new(239, 200, (i >> 8) as u8, i as u8)))
        .chain((0..2_000u16).map(|n| neighbour_solicitation(attacker.mac, n)))
        .collect();
    // Records naming 300 sources each.
    let wide: Vec<Vec<u8>> = (0..20u8)
        .map(|g| {
            let sources = (0..300u16)
                .map(|i| IpAddr::V4(Ipv4Addr::new(10, 99, (i >> 8) as u8, i as u8)))
                .collect();
            let records = vec![GroupRecord {
                kind: RecordType::IsInclude,
                group: IpAddr::V4(Ipv4Addr::new(239, 201, 0, g)),
                sources,
            }];
            let msg = Message { source: attacker.source, kind: MessageKind::V3Report { records } };
            packet::build(attacker.mac, &msg).expect("v3 report")
        })
        .collect();
    // The legitimate host joins while the flood runs.
    let group = addr("239.10.10.1");
    let rx = std::thread::scope(|scope| {
        scope.spawn(|| {
            send_frames(&hostile.ns, &hostile.iface, &wide);
            // Bursts of 250 (the receiving CPU's backlog holds 1,000 frames).
            for chunk in floods.chunks(250) {
                send_frames(&hostile.ns, &hostile.iface, chunk);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let rx = McastReceiver::join(&legit.ns, group, PORT, &legit.iface);
        wait_member(&star.gw, group, &legit.gw_port, Duration::from_secs(30));
        rx
    });
    McastSender::new(&s.ns, &s.iface).send_numbered(group, PORT, COUNT, Duration::from_millis(1));
    assert_eq!(rx.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{rx}: during the flood");

    let (doc, _) = wait_groups(&star.gw, "refusals counted", Duration::from_secs(30), |d| {
        let refused = &d["control"]["refused"];
        refused["max_groups_per_port"].as_u64().unwrap_or(0) >= 1
            && refused["max_sources_per_group"].as_u64().unwrap_or(0) >= 1
    });
    let learned = doc["groups"].as_array().map_or(0, Vec::len);
    let (fds, rss) = (open_fds(pid), status_kb(pid, "VmRSS:"));
    let hwm = status_kb(pid, "VmHWM:");
    let c = &doc["control"];
    println!(
        "hostile flood: {} frames received, {} over the port's rate, {} dropped by the full \
         queue, refused {}, {learned} groups learned, {fds} fds, RSS {rss} kB (peak {hwm} kB)",
        c["received"], c["rate_limited"], c["capture_drops"], c["refused"]
    );
    assert!(c["rate_limited"].as_u64().unwrap_or(0) > 0, "the flood was not rate limited");
    assert!(learned <= 2_001 + 1, "{learned} groups learned past the per-port limit");
    assert!(fds < 256, "{fds} descriptors open: fds grow with the state");
    assert!(doc["not_taken"].as_array().is_some_and(|a| !a.is_empty()), "{doc:#}");
    mcrelay_tests::daemon::assert_process_alive(pid, "after the flood");
}
