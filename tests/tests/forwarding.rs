//! End-to-end forwarding through the real daemon: a gateway namespace running `mcrelay run` on
//! four veth ports, a sender and three receivers each on its own point-to-point segment
//! ([`Star`]), real kernel sockets as peers.
//!
//! Counts are exact: every datagram that must arrive arrives once, and none arrives where it
//! must not. "Must not" is checked after the datagrams that must arrive have all arrived (they
//! were sent after the ones that must not) plus a quiet period.
//!
//! Where a group must not arrive, a [`WireObserver`] watches the link instead of a joined socket:
//! it sees every frame the relay sends out of that port, and it sends no IGMP/MLD report, which a
//! relay that learns memberships would rightly act on. Applications (joined sockets) receive on
//! the ports that are members anyway.

use std::{net::IpAddr, thread, time::Duration};

use mcrelay_tests::{
    addr,
    daemon::{groups_json, port_entry, ports_json, stats_json as stats, READY_TIMEOUT},
    port_counter, require_testbed,
    topology::{Host, Star},
    McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};
use serde_json::Value;

/// UDP port of every test group.
const PORT: u16 = 5000;
/// Datagrams sent per group.
const COUNT: u64 = 200;
/// Gap between two datagrams.
const INTERVAL: Duration = Duration::from_millis(1);
/// How long datagrams that must arrive may take (generous: no timing is asserted).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to keep listening for datagrams that must not arrive, once all others arrived.
const QUIET: Duration = Duration::from_millis(500);

/// Starts `mcrelay run -i gw0 ... -i gwN EXTRA...` on the star's gateway and waits until ready.
/// With `--no-pin`: these tests check that SIGTERM detaches everything (by default the links
/// stay pinned for a hitless restart; tests/tests/restart.rs covers that).
fn start_relay(star: &Star, extra: &[&str]) -> Mcrelay {
    star.start_relay(&[&["--no-pin"], extra].concat())
}

fn join(host: &Host, group: IpAddr) -> McastReceiver {
    McastReceiver::join(&host.ns, group, PORT, &host.iface)
}

fn observe(host: &Host) -> WireObserver {
    WireObserver::new(&host.ns, &host.iface)
}

fn sender(host: &Host) -> McastSender {
    McastSender::new(&host.ns, &host.iface)
}

/// Waits for all `COUNT` datagrams at `rx`.
fn expect_all(rx: &McastReceiver) {
    let got = rx.wait_for(COUNT, DELIVERY_TIMEOUT);
    assert!(got >= COUNT, "{rx}: got {got} of {COUNT} datagrams within {DELIVERY_TIMEOUT:?}");
}

/// After the quiet period: exactly `COUNT` datagrams at `rx`, no duplicates.
fn expect_exactly_all(rx: &McastReceiver) {
    assert_eq!(rx.count(), COUNT, "{rx}: wrong number of datagrams (duplicates?)");
    assert_eq!(rx.distinct(), COUNT, "{rx}: wrong number of distinct datagrams");
}

/// Waits for all `COUNT` datagrams of `group` on the wire at `wire`.
fn expect_all_on_wire(wire: &WireObserver, group: IpAddr) {
    let got = wire.wait_for(group, COUNT, DELIVERY_TIMEOUT);
    assert!(
        got >= COUNT,
        "{wire}: saw {got} of {COUNT} datagrams of {group} within {DELIVERY_TIMEOUT:?}"
    );
}

/// After the quiet period: exactly `COUNT` datagrams of `group` on the wire, no duplicates.
fn expect_exactly_all_on_wire(wire: &WireObserver, group: IpAddr) {
    assert_eq!(wire.count(group), COUNT, "{wire}: wrong number of {group} frames (duplicates?)");
    assert_eq!(wire.distinct(group), COUNT, "{wire}: wrong number of distinct {group} frames");
}

fn expect_none(wire: &WireObserver, group: IpAddr, why: &str) {
    assert_eq!(wire.count(group), 0, "{wire}: {group} arrived, which it must not ({why})");
}

fn assert_no_xdp(ns: &NetNs, ifaces: &[&str]) {
    for iface in ifaces {
        if let Some(xdp) = ns.xdp_attachment(iface) {
            panic!("{iface} in {ns} still has an XDP program attached: {xdp}");
        }
    }
}

/// A static group reaches exactly its ports: not the other receiver, not back out of the
/// ingress port. Then SIGTERM: exit 0, nothing attached any more.
fn static_group_reaches_only_its_ports(tag: &str, group: IpAddr) {
    let star = Star::new(tag, 4);
    let [s, r1, r2, r3] = &star.hosts[..] else { unreachable!("the star has 4 hosts") };
    let members = format!("{group}@{},{}", r1.gw_port, r2.gw_port);
    let mut relay = start_relay(&star, &["--static", &members]);
    for port in star.gw_ports() {
        assert!(
            star.gw.xdp_attachment(port).is_some(),
            "mcrelay is ready but `ip -d link show {port}` shows no XDP program"
        );
    }

    let (rx1, rx2) = (join(r1, group), join(r2, group));
    let (wire1, wire3, echo) = (observe(r1), observe(r3), observe(s));
    sender(s).send_numbered(group, PORT, COUNT, INTERVAL);

    expect_all(&rx1);
    expect_all(&rx2);
    thread::sleep(QUIET);
    expect_exactly_all(&rx1);
    expect_exactly_all(&rx2);
    expect_exactly_all_on_wire(&wire1, group);
    expect_none(&wire3, group, "its port is not in the group's port set");
    expect_none(&echo, group, "never back out of the ingress port");

    let stats = stats(&star.gw);
    assert_eq!(
        port_counter(&stats, &s.gw_port, "packets", "forwarded"),
        COUNT,
        "forwarded counter of the sender's port"
    );
    for r in [r1, r2, r3] {
        assert_eq!(port_counter(&stats, &r.gw_port, "packets", "forwarded"), 0, "{}", r.gw_port);
    }

    let status = relay.stop();
    assert!(
        status.success(),
        "mcrelay exited with {status} on SIGTERM; stderr:\n{}",
        relay.stderr()
    );
    assert_no_xdp(&star.gw, &star.gw_ports());
}

#[test]
fn ipv4_static_group_reaches_only_its_ports() {
    require_testbed!();
    static_group_reaches_only_its_ports("s4", addr("239.1.1.1"));
}

#[test]
fn ipv6_static_group_reaches_only_its_ports() {
    require_testbed!();
    static_group_reaches_only_its_ports("s6", addr("ff3e::1:1"));
}

/// Two groups with different port sets: each segment gets only the group of its port (its
/// receiver gets every datagram, its wire carries nothing of the other group). Also: `-i` with a
/// glob, `ports --json`, `groups --json`.
#[test]
fn two_groups_stay_separate() {
    require_testbed!();
    let star = Star::new("2g", 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!("the star has 3 hosts") };
    let (a, b) = (addr("239.1.1.1"), addr("239.2.2.2"));
    let static_a = format!("{a}@{}", r1.gw_port);
    let static_b = format!("{b}@{}", r2.gw_port);
    let _relay = Mcrelay::start_ready(
        &star.gw,
        &["run", "-i", "gw*", "--static", &static_a, "--static", &static_b],
    );

    let ports = ports_json(&star.gw);
    for port in star.gw_ports() {
        let entry = port_entry(&ports, port)
            .unwrap_or_else(|| panic!("`-i gw*` did not attach {port}; ports --json:\n{ports:#}"));
        assert!(entry.get("mode").and_then(Value::as_str).is_some(), "{port} has no mode: {entry}");
    }
    let groups = groups_json(&star.gw);
    assert_group(&groups, "239.1.1.1", &[&r1.gw_port]);
    assert_group(&groups, "239.2.2.2", &[&r2.gw_port]);

    let (r1_a, r2_b) = (join(r1, a), join(r2, b));
    let (wire1, wire2) = (observe(r1), observe(r2));
    let tx = sender(s);
    for seq in 0..COUNT {
        for group in [a, b] {
            tx.send(group, PORT, seq).unwrap_or_else(|e| panic!("sending to {group}: {e}"));
        }
        thread::sleep(INTERVAL);
    }

    expect_all(&r1_a);
    expect_all(&r2_b);
    thread::sleep(QUIET);
    expect_exactly_all(&r1_a);
    expect_exactly_all(&r2_b);
    expect_exactly_all_on_wire(&wire1, a);
    expect_exactly_all_on_wire(&wire2, b);
    expect_none(&wire1, b, "239.2.2.2 is static on the other port only");
    expect_none(&wire2, a, "239.1.1.1 is static on the other port only");
    assert_eq!(port_counter(&stats(&star.gw), &s.gw_port, "packets", "forwarded"), 2 * COUNT);
}

/// `groups --json` lists `group` as a static group on exactly `ports`.
fn assert_group(doc: &Value, group: &str, ports: &[&str]) {
    let entry = doc
        .get("groups")
        .and_then(Value::as_array)
        .and_then(|groups| {
            groups.iter().find(|g| {
                g.get("group").and_then(Value::as_str) == Some(group)
                    && g.get("kind").and_then(Value::as_str) == Some("static")
            })
        })
        .unwrap_or_else(|| panic!("no static entry for {group} in groups --json:\n{doc:#}"));
    let mut listed: Vec<&str> = entry
        .get("ports")
        .and_then(Value::as_array)
        .map(|p| p.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    listed.sort_unstable();
    let mut expected = ports.to_vec();
    expected.sort_unstable();
    assert_eq!(listed, expected, "ports of {group} in groups --json:\n{doc:#}");
}

/// With the default unknown policy (router-ports, none learned), a group without a port set is
/// not forwarded anywhere: counted as passed_unknown on the ingress port.
#[test]
fn group_without_ports_is_not_forwarded() {
    require_testbed!();
    let star = Star::new("uk", 4);
    let [s, r1, r2, r3] = &star.hosts[..] else { unreachable!("the star has 4 hosts") };
    let (known, unknown) = (addr("239.1.1.1"), addr("239.3.3.3"));
    let static_known = format!("{known}@{}", r1.gw_port);
    let _relay = start_relay(&star, &["--static", &static_known]);

    let wires: Vec<WireObserver> = [r1, r2, r3].into_iter().map(observe).collect();
    let control = join(r1, known);
    let tx = sender(s);
    tx.send_numbered(unknown, PORT, COUNT, INTERVAL);
    // Sent afterwards on the same path: once these are in, the unknown group had its chance.
    tx.send_numbered(known, PORT, COUNT, INTERVAL);

    expect_all(&control);
    thread::sleep(QUIET);
    expect_exactly_all(&control);
    expect_exactly_all_on_wire(&wires[0], known);
    for wire in &wires {
        expect_none(wire, unknown, "the group has no ports and the unknown policy is router-ports");
    }
    let stats = stats(&star.gw);
    assert_eq!(port_counter(&stats, &s.gw_port, "packets", "passed_unknown"), COUNT);
    assert_eq!(port_counter(&stats, &s.gw_port, "packets", "forwarded"), COUNT);
}

/// A link-local group is never relayed: a static entry for it is either refused (exit 2) or
/// has no effect, and even `--unknown flood` (which does relay other unknown groups to every
/// other port) keeps it on its segment.
fn link_local_group_is_never_forwarded(tag: &str, link_local: IpAddr, other: IpAddr) {
    let star = Star::new(tag, 4);
    let [s, r1, r2, r3] = &star.hosts[..] else { unreachable!("the star has 4 hosts") };

    // 1. A static entry for the link-local group (next to one for a routable control group).
    let ports = format!("{},{}", r1.gw_port, r2.gw_port);
    let (static_ll, static_other) = (format!("{link_local}@{ports}"), format!("{other}@{ports}"));
    let mut args = vec!["run".to_string()];
    args.extend(star.iface_args());
    args.extend(["--static".into(), static_ll, "--static".into(), static_other]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = Mcrelay::start(&star.gw, &args);
    match relay.wait_ready_or_exit(READY_TIMEOUT) {
        Err(status) => {
            let stderr = relay.stderr();
            assert_eq!(
                status.code(),
                Some(2),
                "refusing {link_local} must exit 2; stderr:\n{stderr}"
            );
            assert!(
                stderr.contains(&link_local.to_string()),
                "the error should name {link_local}; stderr:\n{stderr}"
            );
            assert_no_xdp(&star.gw, &star.gw_ports());
        }
        Ok(()) => {
            let wires = [observe(r1), observe(r2)];
            let control = [join(r1, other), join(r2, other)];
            let tx = sender(s);
            tx.send_numbered(link_local, PORT, COUNT, INTERVAL);
            tx.send_numbered(other, PORT, COUNT, INTERVAL);
            control.iter().for_each(expect_all);
            thread::sleep(QUIET);
            for wire in &wires {
                expect_none(wire, link_local, "link-local groups are never relayed, static or not");
            }
        }
    }
    drop(relay);

    // 2. --unknown flood: a group nobody joined reaches every other port, the link-local group
    // none. Nobody joins anything here (a join would make the group known).
    let _relay = start_relay(&star, &["--unknown", "flood"]);
    let wires: Vec<WireObserver> = [r1, r2, r3].into_iter().map(observe).collect();
    let echo = observe(s);
    let tx = sender(s);
    tx.send_numbered(link_local, PORT, COUNT, INTERVAL);
    tx.send_numbered(other, PORT, COUNT, INTERVAL);

    for wire in &wires {
        expect_all_on_wire(wire, other);
    }
    thread::sleep(QUIET);
    for wire in &wires {
        expect_exactly_all_on_wire(wire, other);
        expect_none(wire, link_local, "link-local groups stay on their segment even with flood");
    }
    expect_none(&echo, other, "flooding never goes back out of the ingress port");
    let stats = stats(&star.gw);
    let passed = port_counter(&stats, &s.gw_port, "packets", "passed_link_local");
    assert!(passed >= COUNT, "passed_link_local on {} is {passed}, expected >= {COUNT}", s.gw_port);
    assert_eq!(port_counter(&stats, &s.gw_port, "packets", "forwarded"), COUNT);
}

#[test]
fn ipv4_link_local_group_is_never_forwarded() {
    require_testbed!();
    link_local_group_is_never_forwarded("l4", addr("224.0.0.251"), addr("239.9.9.9"));
}

#[test]
fn ipv6_link_local_group_is_never_forwarded() {
    require_testbed!();
    link_local_group_is_never_forwarded("l6", addr("ff02::fb"), addr("ff3e::9:9"));
}
