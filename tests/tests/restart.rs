//! Hitless restart: the XDP links and maps are pinned, so forwarding goes on while no daemon
//! runs, and the next daemon adopts them (same map layout: maps reused, program swapped into
//! the pinned links atomically). Receivers count every datagram of a steady stream sent
//! across a SIGKILL and a restart.

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    daemon::{leftover_pins, ports_json},
    groups::port_names,
    mcrelay_output, require_testbed,
    topology::Star,
    McastReceiver, McastSender, Mcrelay, NetNs,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

const PORT: u16 = 5000;

fn xdp_count(ns: &NetNs, ports: &[&str]) -> usize {
    ports.iter().filter(|p| ns.xdp_attachment(p).is_some()).count()
}

/// Sends `total` numbered datagrams to each group at about `rate` per second (paced in 1 ms
/// slices), calling `midway` once after half of them.
fn stream(sender: &McastSender, groups: &[IpAddr], total: u64, rate: u64, midway: impl FnOnce()) {
    let per_ms = (rate / 1000).max(1);
    let start = Instant::now();
    let mut midway = Some(midway);
    let mut seq = 0;
    while seq < total {
        for _ in 0..per_ms.min(total - seq) {
            for g in groups {
                sender.send(*g, PORT, seq).unwrap_or_else(|e| panic!("send {seq}: {e}"));
            }
            seq += 1;
        }
        if seq >= total / 2 {
            if let Some(f) = midway.take() {
                f();
            }
        }
        let due = start + Duration::from_micros(seq * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

#[test]
fn sigkill_and_restart_lose_no_packet() {
    require_testbed!();
    let (static_group, learned_group) = (addr("239.30.0.1"), addr("239.30.0.2"));
    let star = Star::new("rs", 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!() };
    let members = format!("{static_group}@{}", r1.gw_port);
    let extra =
        ["--static", members.as_str(), "--query-interval", "2", "--query-response-interval", "1"];
    let mut relay = star.start_relay(&extra);
    let rx1 = McastReceiver::join(&r1.ns, static_group, PORT, &r1.iface);
    let rx2 = McastReceiver::join(&r2.ns, learned_group, PORT, &r2.iface);
    // Wait until the learned group forwards.
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe = McastSender::new(&s.ns, &s.iface);
    let mut probe_seq = 1_000_000;
    while rx2.count() == 0 {
        assert!(Instant::now() < deadline, "the learned group never reached r2");
        probe.send(learned_group, PORT, probe_seq).expect("probe");
        probe_seq += 1;
        thread::sleep(Duration::from_millis(20));
    }
    let probes_seen = rx2.count();

    const TOTAL: u64 = 40_000;
    const RATE: u64 = 20_000;
    let sender = McastSender::new(&s.ns, &s.iface);
    let mut restarted: Option<Mcrelay> = None;
    let mut gap = Duration::ZERO;
    stream(&sender, &[static_group, learned_group], TOTAL, RATE, || {
        // SIGKILL: no chance to clean up; the pinned links keep forwarding.
        kill(Pid::from_raw(relay.pid() as i32), Signal::SIGKILL).expect("kill -9");
        let _ = relay.wait_exit(Duration::from_secs(5));
        let t = Instant::now();
        restarted = Some(star.start_relay(&extra));
        gap = t.elapsed();
    });
    eprintln!("daemon restarted in {gap:?} while the stream ran at {RATE} datagrams/s per group");
    let got1 = rx1.wait_for(TOTAL, Duration::from_secs(20));
    let got2 = rx2.wait_for(probes_seen + TOTAL, Duration::from_secs(20));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(got1, TOTAL, "{rx1}: datagrams of the static group lost across kill -9 + restart");
    assert_eq!(rx1.distinct(), TOTAL, "{rx1}: duplicates");
    assert_eq!(got2, probes_seen + TOTAL, "{rx2}: datagrams of the learned group lost");

    let relay = restarted.expect("restarted");
    let ports = ports_json(&star.gw);
    let mut names = port_names(&ports);
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(n, names.len(), "a port is listed twice:\n{ports:#}");
    assert_eq!(names.len(), 3, "{ports:#}");
    assert_eq!(xdp_count(&star.gw, &star.gw_ports()), 3);
    drop(relay); // SIGTERM: exits, links stay pinned and forwarding continues

    let before = rx1.count();
    McastSender::new(&s.ns, &s.iface).send_numbered(
        static_group,
        PORT,
        50,
        Duration::from_millis(1),
    );
    assert_eq!(
        rx1.wait_for(before + 50, Duration::from_secs(10)),
        before + 50,
        "no forwarding without a daemon"
    );
    assert_eq!(xdp_count(&star.gw, &star.gw_ports()), 3, "links must stay after a normal exit");

    // `mcrelay detach` removes every program, link and pin.
    let out = mcrelay_output(&star.gw, &["detach"]);
    assert!(out.status.success(), "detach failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(xdp_count(&star.gw, &star.gw_ports()), 0, "detach left XDP attached");
    assert!(leftover_pins(&star.gw).is_empty(), "detach left pins: {:?}", leftover_pins(&star.gw));
}

/// Pins of another map layout (an upgrade that changed a map) are never reused: the daemon
/// removes that version's directory and starts from scratch.
#[test]
fn pins_of_another_layout_version_are_recreated_not_reused() {
    require_testbed!();
    let star = Star::new("lv", 1);
    let root = mcrelay_tests::daemon::pin_root_of(&star.gw);
    let old = root.join("v0");
    std::fs::create_dir_all(&old).unwrap_or_else(|e| panic!("{}: {e}", old.display()));
    let mut relay = star.start_relay(&["--no-pin"]);
    assert!(!old.exists(), "the pins of layout v0 were left in place");
    assert!(relay.stderr().contains("another map layout"), "{}", relay.stderr());
    let status = relay.stop();
    assert!(status.success(), "{status}");
}
