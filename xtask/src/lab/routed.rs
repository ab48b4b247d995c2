//! `cargo xtask lab --routed`: a LAN and a routed VPN (OpenVPN `dev tun`), mcrelay on the
//! VPN server between them.
//!
//! ```text
//!   LAN sender ── eth0 ═══ lan0 ─┐                         ┌─ wan0 ═══ eth0 ── client c0
//!   (TTL 8: 239.1.1.1            │  gateway: mcrelay on     │     tun0 (joined 239.1.1.1)
//!    and 239.2.2.2)              │  lan0 (XDP) + vpntun0    │
//!                                └  (TC), OpenVPN server  ──┴─ wan1 ═══ eth0 ── client c1
//!                                                                 tun0 (joins nothing)
//! ```
//!
//! The bed is the test harness's OpenVPN bed (`mcrelay_tests::openvpn`, option `tun`: TLS with
//! certificates made by `openssl`, `topology subnet`, the clients' `route-up` hook sending
//! multicast into the tunnel). Client c0 joins 239.1.1.1 through the tunnel (its IGMP report is
//! learned on the server's tun); nobody joins 239.2.2.2, so it never enters the tunnel. The tun
//! is a routed hop: the sender's TTL 8 arrives as 7.
//!
//! OpenVPN writes what the server puts into its tun to every client, so by default c1, which
//! joined nothing, sees 239.1.1.1 on its tun too: its count is shown and explained, not judged.
//! With `--per-client` the lab passes `--per-client vpntun0` to mcrelay, which then sends each
//! joined client its own copy addressed to its tunnel address; that c1 sees none of 239.1.1.1
//! becomes part of the verdict.

use std::{
    collections::BTreeSet,
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use mcrelay_tests::{
    daemon::{mcrelay_output_with, port_entry, READY_TIMEOUT},
    groups::is_member,
    mcrelay_json_with,
    openvpn::{VpnBed, VpnOptions},
    serde_json::Value,
    McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};

use super::{watch, LabOptions, PortStats, Stream};

/// The group client c0 joins.
const JOINED: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
/// The group nobody in the VPN joins.
const NOT_JOINED: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);
const PORT: u16 = 5000;
/// Datagrams per second and group.
const RATE: u32 = 50;
/// The sender's TTL: enough for the routed hop.
const TTL: u8 = 8;
/// How long c0's join may take to be learned on the tun.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(20);
const DRAIN: Duration = Duration::from_millis(500);
/// Share of the sent datagrams the joined client must get (a demo, not a test).
const DELIVERED_SHARE: f64 = 0.9;

/// Counts so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Snapshot {
    sent: u64,
    /// Datagrams of [`JOINED`] c0's socket received.
    c0_joined: u64,
    /// [`JOINED`] on c0's tun, and the TTLs it arrived with.
    c0_wire_joined: u64,
    c0_ttls: BTreeSet<u8>,
    /// [`NOT_JOINED`] on c0's tun.
    c0_not_joined: u64,
    /// [`JOINED`] and [`NOT_JOINED`] on c1's tun.
    c1_joined: u64,
    c1_not_joined: u64,
    /// The server's tun is in TC mode (`mcrelay ports`).
    tun_mode_tc: bool,
}

struct Listeners {
    c0: McastReceiver,
    c0_wire: WireObserver,
    c1_wire: WireObserver,
    /// c0's tunnel address: per-client copies arrive addressed to it.
    c0_address: IpAddr,
}

/// Datagrams of `group` on a wire: addressed to the group, or (per-client copies) to the
/// client's own address.
fn on_wire(wire: &WireObserver, group: IpAddr) -> u64 {
    wire.count(group) + wire.readdressed(group).values().sum::<u64>()
}

impl Listeners {
    fn snapshot(&self, sent: u64, tun_mode_tc: bool) -> Snapshot {
        let (joined, not_joined) = (IpAddr::V4(JOINED), IpAddr::V4(NOT_JOINED));
        Snapshot {
            sent,
            c0_joined: self.c0.count(),
            c0_wire_joined: on_wire(&self.c0_wire, joined),
            c0_ttls: self
                .c0_wire
                .hop_limits(joined)
                .union(&self.c0_wire.hop_limits(self.c0_address))
                .copied()
                .collect(),
            c0_not_joined: on_wire(&self.c0_wire, not_joined),
            c1_joined: on_wire(&self.c1_wire, joined),
            c1_not_joined: on_wire(&self.c1_wire, not_joined),
            tun_mode_tc,
        }
    }
}

pub(super) fn run_lab(opts: &LabOptions, interrupted: &AtomicBool) -> anyhow::Result<()> {
    for program in ["openvpn", "openssl", "ping"] {
        if mcrelay_tests::find_program(program).is_none() {
            bail!("the routed lab needs `{program}` (cargo xtask setup installs it)");
        }
    }
    println!("[lab] building the routed topology (OpenVPN dev tun, two clients; ~10 s)");
    let bed = VpnBed::new(
        "lab",
        VpnOptions { tun: true, lan_hosts: 1, clients: 2, ..VpnOptions::default() },
    );
    let tun = bed.servers[0].tap.clone();
    let lan = bed.lan[0].gw_port.clone();
    let (sender, c0, c1) = (&bed.lan[0], &bed.clients[0], &bed.clients[1]);
    println!("{}", describe(&bed, &opts.mcrelay));

    let mut args: Vec<String> = vec!["run".into()];
    args.extend(bed.iface_args());
    if opts.per_client {
        args.extend(["--per-client".into(), tun.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    println!("[lab] starting {} {}", opts.mcrelay.display(), args.join(" "));
    let mut relay = Mcrelay::start_with(&opts.mcrelay, &bed.gw, &args, true);
    if let Err(status) = relay.wait_ready_or_exit(READY_TIMEOUT) {
        bail!("mcrelay exited ({status}) before it was ready; stderr:\n{}", relay.stderr());
    }
    println!("[lab] mcrelay is ready");

    let listeners = Listeners {
        c0_wire: WireObserver::new(&c0.ns, &c0.tap),
        c1_wire: WireObserver::new(&c1.ns, &c1.tap),
        // Bound to the port, as receiving applications are: it takes the group's datagrams
        // and the per-client copies addressed to c0.
        c0: McastReceiver::join_wildcard(&c0.ns, IpAddr::V4(JOINED), PORT, &c0.tap),
        c0_address: IpAddr::V4(c0.v4),
    };
    wait_joined(&opts.mcrelay, &bed.gw, &tun)?;
    println!("[lab] c0's join came through the tunnel: {tun} is a member of {JOINED}");
    show(&opts.mcrelay, &bed.gw, &["ports"]);
    show(&opts.mcrelay, &bed.gw, &["groups"]);
    let tun_mode_tc = mode(&opts.mcrelay, &bed.gw, &tun).as_deref() == Some("tc");

    let sender = McastSender::new(&sender.ns, &sender.iface).with_hop_limit(TTL.into());
    let mut stream = Stream::start(sender, [JOINED, NOT_JOINED]);
    let live = std::io::stdout().is_terminal();
    let (elapsed, outcome) = watch(&mut relay, opts.duration, interrupted, |elapsed| {
        let snapshot = listeners.snapshot(stream.sent(), tun_mode_tc);
        let stats = mcrelay_json_with(&opts.mcrelay, &bed.gw, &["stats", "--json"]);
        let title = format!("t={:>4}s (Ctrl-C stops)", elapsed.as_secs());
        print_table(&title, &snapshot, &stats, &[&lan, &tun], live);
    });

    let sent = stream.stop();
    thread::sleep(DRAIN);
    let snapshot = listeners.snapshot(sent, tun_mode_tc);
    let stats = mcrelay_json_with(&opts.mcrelay, &bed.gw, &["stats", "--json"]);
    let title = format!("final, after {}s", elapsed.as_secs());
    print_table(&title, &snapshot, &stats, &[&lan, &tun], false);
    show(&opts.mcrelay, &bed.gw, &["ports"]);
    show(&opts.mcrelay, &bed.gw, &["groups"]);
    outcome?;

    println!("[lab] stopping mcrelay, OpenVPN and removing the namespaces");
    let status = relay.stop();
    if !status.success() {
        bail!("mcrelay exited with {status} on SIGTERM; stderr:\n{}", relay.stderr());
    }
    drop(listeners);
    drop(bed);
    verdict(&snapshot, opts.per_client)
}

fn describe(bed: &VpnBed, mcrelay: &Path) -> String {
    let tun = &bed.servers[0].tap;
    let (h0, c0, c1) = (&bed.lan[0], &bed.clients[0], &bed.clients[1]);
    format!(
        "[lab] topology (network namespaces):\n\
         \x20 gateway {gw}: OpenVPN server on {tun} (dev tun, 10.8.0.1/24), LAN port {lan} \
         (198.18.0.1/24); mcrelay on {lan} and {tun}\n\
         \x20 LAN sender {h}: {hv4}, sends {JOINED} and {NOT_JOINED} with TTL {TTL}, {RATE}/s each\n\
         \x20 client c0 {c0n}: tun0 {c0v4}, joins {JOINED}\n\
         \x20 client c1 {c1n}: tun0 {c1v4}, joins nothing (watches its tun)\n\
         [lab] look around while it runs: `ip netns exec {c1n} tcpdump -ni tun0 -v udp`, \
         `nsenter --net=/run/netns/{gw} {bin} groups`",
        gw = bed.gw.name(),
        lan = h0.gw_port,
        h = h0.ns.name(),
        hv4 = h0.v4,
        c0n = c0.ns.name(),
        c0v4 = c0.v4,
        c1n = c1.ns.name(),
        c1v4 = c1.v4,
        bin = mcrelay.display(),
    )
}

/// Waits until the tun is a member of [`JOINED`] (`mcrelay groups --json`).
fn wait_joined(bin: &Path, gw: &NetNs, tun: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + MEMBER_TIMEOUT;
    loop {
        if let Ok(doc) = mcrelay_json_with(bin, gw, &["groups", "--json"]) {
            if is_member(&doc, IpAddr::V4(JOINED), tun) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("{tun} did not become a member of {JOINED} within {MEMBER_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The attach mode of `iface` in `mcrelay ports --json`.
fn mode(bin: &Path, gw: &NetNs, iface: &str) -> Option<String> {
    let doc = mcrelay_json_with(bin, gw, &["ports", "--json"]).ok()?;
    port_entry(&doc, iface)?.get("mode")?.as_str().map(String::from)
}

/// Prints `mcrelay ARGS` as the operator would see it.
fn show(bin: &Path, gw: &NetNs, args: &[&str]) {
    let out = mcrelay_output_with(bin, gw, args);
    println!("[lab] $ mcrelay {}", args.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        print!("{}", String::from_utf8_lossy(&out.stderr));
    }
}

fn print_table(
    title: &str,
    s: &Snapshot,
    stats: &anyhow::Result<Value>,
    ports: &[&str],
    redraw: bool,
) {
    let mut out = String::new();
    if redraw {
        out.push_str("\x1b[H\x1b[2J");
    }
    out.push_str(&format!("[lab] {title}   sent per group: {}\n", s.sent));
    out.push_str(&format!("  {:<34} {:>10} {:>10}\n", "datagrams", JOINED, NOT_JOINED));
    let ttls: Vec<String> = s.c0_ttls.iter().map(u8::to_string).collect();
    let rows = [
        ("c0 socket (joined .1)".to_string(), s.c0_joined.to_string(), "-".to_string()),
        (
            format!(
                "c0 tun0 wire (TTL {})",
                if ttls.is_empty() { "-".into() } else { ttls.join(",") }
            ),
            s.c0_wire_joined.to_string(),
            s.c0_not_joined.to_string(),
        ),
        (
            "c1 tun0 wire (joined nothing)".to_string(),
            s.c1_joined.to_string(),
            s.c1_not_joined.to_string(),
        ),
    ];
    for (name, a, b) in rows {
        out.push_str(&format!("  {name:<34} {a:>10} {b:>10}\n"));
    }
    match stats {
        Ok(doc) => {
            out.push_str(&format!(
                "  {:<9} {:<6} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
                "port", "mode", "forwarded", "unknown", "control", "drop_ttl", "drops"
            ));
            for port in ports {
                let stats = PortStats::of(doc, port);
                out.push_str(&format!(
                    "  {:<9} {:<6} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
                    port,
                    stats.mode,
                    stats.get("forwarded"),
                    stats.get("passed_unknown"),
                    stats.get("passed_control"),
                    stats.get("drop_ttl"),
                    stats.drops(),
                ));
            }
        }
        Err(e) => out.push_str(&format!("  mcrelay stats: {e:#}\n")),
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

fn delivered(got: u64, sent: u64) -> bool {
    sent > 0 && got as f64 >= sent as f64 * DELIVERED_SHARE
}

/// Prints what crossed the routed hop; an error when mcrelay did not do its part.
pub(super) fn verdict(s: &Snapshot, per_client: bool) -> anyhow::Result<()> {
    let mut checks = vec![
        (
            s.tun_mode_tc,
            "the server's tun is attached in TC mode (`mcrelay ports`: tc)".to_string(),
        ),
        (
            delivered(s.c0_joined, s.sent),
            format!("client c0 (joined) received {} of {} of {JOINED}", s.c0_joined, s.sent),
        ),
        (
            s.c0_ttls == BTreeSet::from([TTL - 1]),
            format!("one routed hop: TTL {TTL} arrived as {:?} on c0's tun", s.c0_ttls),
        ),
        (
            s.sent > 0 && s.c0_not_joined == 0 && s.c1_not_joined == 0,
            format!(
                "{NOT_JOINED} (nobody joined) never entered the tunnel: {} and {} seen on the \
                 clients' tuns",
                s.c0_not_joined, s.c1_not_joined
            ),
        ),
    ];
    if per_client {
        checks.push((
            s.c1_joined == 0,
            format!("per client: c1 (joined nothing) saw {} of {JOINED}", s.c1_joined),
        ));
    }
    println!("[lab] verdict:");
    for (ok, text) in &checks {
        println!("  {} {text}", if *ok { "ok  " } else { "FAIL" });
    }
    if !per_client {
        println!(
            "  note c1 (joined nothing) saw {} of {JOINED} on its tun: OpenVPN writes what the \
             server puts into its tun to every client; with `--per-client` each joined client \
             gets its own copy, addressed to its tunnel address (`cargo xtask lab --routed \
             --per-client`)",
            s.c1_joined
        );
    }
    if checks.iter().all(|(ok, _)| *ok) {
        println!(
            "[lab] as expected: {JOINED} crosses the routed hop to the VPN, {NOT_JOINED} does not"
        );
        Ok(())
    } else {
        bail!("the routed lab did not behave as expected (see the verdict above)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_checks_the_routed_hop_and_judges_c1_only_per_client() {
        let good = Snapshot {
            sent: 100,
            c0_joined: 100,
            c0_wire_joined: 100,
            c0_ttls: BTreeSet::from([TTL - 1]),
            c0_not_joined: 0,
            c1_joined: 100,
            c1_not_joined: 0,
            tun_mode_tc: true,
        };
        assert!(verdict(&good, false).is_ok(), "OpenVPN's flooding to c1 is explained");
        assert!(verdict(&good, true).is_err(), "per client, c1 must see nothing");
        assert!(verdict(&Snapshot { c1_joined: 0, ..good.clone() }, true).is_ok());
        assert!(
            verdict(&Snapshot { c0_ttls: BTreeSet::from([TTL]), ..good.clone() }, false).is_err()
        );
        assert!(verdict(&Snapshot { c1_not_joined: 1, ..good.clone() }, false).is_err());
        assert!(verdict(&Snapshot { tun_mode_tc: false, ..good.clone() }, false).is_err());
        assert!(verdict(&Snapshot { c0_joined: 10, ..good }, false).is_err());
        assert!(verdict(&Snapshot::default(), false).is_err());
    }
}
