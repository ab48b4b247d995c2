//! `cargo xtask lab`: a namespace topology showing multicast crossing segments through mcrelay.
//!
//! ```text
//!   sender ──┐                                  ┌── seg2-a   (joined 239.1.1.1)
//!            ├─ [br0 "lan"] ── gw-lan ┐  ┌ gw-seg2 ── [br0 "seg2"] ─┤
//!   lan-rx ──┘                        mcrelay                      └── seg2-b   (joins nothing:
//!   (joined 239.1.1.1 + 239.2.2.2)    --static 239.1.1.1@gw-seg2        watches the wire)
//! ```
//!
//! The sender sends to 239.1.1.1 and 239.2.2.2 (50 datagrams/s each). The LAN bridge floods both
//! to the LAN receiver and to the gateway; mcrelay relays only 239.1.1.1 to segment 2. The
//! segment-2 host `seg2-b` counts on its wire what arrives of each group without joining any:
//! a join would send an IGMP report, and mcrelay (which learns memberships) would then rightly
//! relay 239.2.2.2 too. Every second a table shows the counts and `mcrelay stats --json`; at the
//! end a verdict, and a non-zero exit when the flows were not as expected.
//!
//! `cargo xtask lab --routed` shows the other scene: a LAN and a routed VPN (OpenVPN `dev tun`),
//! see [`routed`].

mod routed;

use std::{
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use mcrelay_tests::{
    daemon::{port_entry, READY_TIMEOUT},
    interrupt::install_interrupt_flag,
    mcrelay_json_with, missing_prerequisite,
    serde_json::Value,
    veth_pair, McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};

/// Options of `cargo xtask lab`.
pub struct LabOptions {
    /// Stop by itself after this long (None: run until Ctrl-C).
    pub duration: Option<Duration>,
    /// Path of the built `mcrelay` binary.
    pub mcrelay: PathBuf,
    /// The routed scene (LAN and OpenVPN `dev tun`) instead of the two LAN segments.
    pub routed: bool,
    /// Routed scene: pass `--per-client TUN` to mcrelay and expect the client that joined
    /// nothing to get nothing.
    pub per_client: bool,
}

/// The group relayed to segment 2.
const RELAYED: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
/// The group that stays on the LAN.
const LAN_ONLY: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);
/// UDP port of both groups.
const PORT: u16 = 5000;
/// Datagrams per second and group.
const RATE: u32 = 50;
/// The gateway's port on the LAN and on segment 2.
const GW_LAN: &str = "gw-lan";
const GW_SEG2: &str = "gw-seg2";
/// Host interfaces, and the bridge in each switch namespace.
const HOST_IFACE: &str = "eth0";
const BRIDGE: &str = "br0";
/// How long datagrams still in flight get after the sender stopped.
const DRAIN: Duration = Duration::from_millis(500);
/// Share of the sent datagrams a receiver must get for a flow to count as delivered
/// (a demo, not a test: a datagram lost while the topology settles is no failure).
const DELIVERED_SHARE: f64 = 0.9;

pub fn run(opts: LabOptions) -> anyhow::Result<()> {
    if let Some(reason) = missing_prerequisite(&[]) {
        bail!("the lab cannot run here: {reason}");
    }
    if !opts.mcrelay.is_file() {
        bail!("mcrelay binary {} does not exist", opts.mcrelay.display());
    }
    let interrupted = install_interrupt_flag()?;
    // The test-bed helpers panic on failure (as tests should); the guards clean up while the
    // panic unwinds, and here it becomes an error.
    let scene = || {
        if opts.routed {
            routed::run_lab(&opts, interrupted)
        } else {
            run_lab(&opts, interrupted)
        }
    };
    match std::panic::catch_unwind(AssertUnwindSafe(scene)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            bail!("the lab failed: {message}")
        }
    }
}

/// Every namespace of the lab; dropping it deletes them all.
struct Topology {
    gw: NetNs,
    lan: NetNs,
    seg2: NetNs,
    sender: NetNs,
    lan_rx: NetNs,
    seg2_a: NetNs,
    seg2_b: NetNs,
}

impl Topology {
    fn build() -> Self {
        let topo = Self {
            gw: NetNs::new("mclab-gw"),
            lan: NetNs::new("mclab-lan"),
            seg2: NetNs::new("mclab-seg2"),
            sender: NetNs::new("mclab-sender"),
            lan_rx: NetNs::new("mclab-lanrx"),
            seg2_a: NetNs::new("mclab-seg2a"),
            seg2_b: NetNs::new("mclab-seg2b"),
        };
        for switch in [&topo.lan, &topo.seg2] {
            switch.add_bridge(BRIDGE);
        }
        topo.attach_host(&topo.lan, "p-sender", &topo.sender, "198.18.1.10/24");
        topo.attach_host(&topo.lan, "p-lanrx", &topo.lan_rx, "198.18.1.20/24");
        topo.attach_host(&topo.seg2, "p-seg2a", &topo.seg2_a, "198.18.2.21/24");
        topo.attach_host(&topo.seg2, "p-seg2b", &topo.seg2_b, "198.18.2.22/24");
        for (gw_port, switch) in [(GW_LAN, &topo.lan), (GW_SEG2, &topo.seg2)] {
            veth_pair(&topo.gw, gw_port, switch, "p-gw");
            switch.set_master("p-gw", BRIDGE);
            // The gateway's end is a redirect target: its peer needs GRO to take the frames.
            switch.gro_on("p-gw");
        }
        topo
    }

    /// A host on a switch: a veth from the bridge to the host's eth0 with `cidr`, GRO on (it may
    /// receive relayed frames) and TX checksum offload off (it may send).
    fn attach_host(&self, switch: &NetNs, port: &str, host: &NetNs, cidr: &str) {
        veth_pair(switch, port, host, HOST_IFACE);
        switch.set_master(port, BRIDGE);
        host.add_addr(HOST_IFACE, cidr);
        host.gro_on(HOST_IFACE);
        host.tx_off(HOST_IFACE);
    }

    fn describe(&self, mcrelay: &Path) -> String {
        let n = |ns: &NetNs| ns.name().to_string();
        format!(
            "[lab] topology (network namespaces):\n\
             \x20 LAN switch {lan}: bridge {BRIDGE} with sender {sender} (198.18.1.10), \
             lan-rx {lanrx} (198.18.1.20) and the gateway's {GW_LAN}\n\
             \x20 segment-2 switch {seg2}: bridge {BRIDGE} with seg2-a {a} (198.18.2.21), \
             seg2-b {b} (198.18.2.22) and the gateway's {GW_SEG2}\n\
             \x20 gateway {gw}: mcrelay on {GW_LAN} and {GW_SEG2}, --static {RELAYED}@{GW_SEG2}\n\
             [lab] look around while it runs: `ip netns exec {b} tcpdump -ni {HOST_IFACE} udp`, \
             `nsenter --net=/run/netns/{gw} {bin} groups`",
            lan = n(&self.lan),
            sender = n(&self.sender),
            lanrx = n(&self.lan_rx),
            seg2 = n(&self.seg2),
            a = n(&self.seg2_a),
            b = n(&self.seg2_b),
            gw = n(&self.gw),
            bin = mcrelay.display(),
        )
    }
}

/// What each host counts.
struct Listeners {
    lan_relayed: McastReceiver,
    lan_lan_only: McastReceiver,
    seg2_a_relayed: McastReceiver,
    seg2_wire: WireObserver,
}

/// Counts so far.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    sent: u64,
    lan_relayed: u64,
    lan_lan_only: u64,
    seg2_a_relayed: u64,
    seg2_wire_relayed: u64,
    seg2_wire_lan_only: u64,
}

impl Listeners {
    fn snapshot(&self, sent: u64) -> Snapshot {
        Snapshot {
            sent,
            lan_relayed: self.lan_relayed.count(),
            lan_lan_only: self.lan_lan_only.count(),
            seg2_a_relayed: self.seg2_a_relayed.count(),
            seg2_wire_relayed: self.seg2_wire.count(IpAddr::V4(RELAYED)),
            seg2_wire_lan_only: self.seg2_wire.count(IpAddr::V4(LAN_ONLY)),
        }
    }
}

fn run_lab(opts: &LabOptions, interrupted: &AtomicBool) -> anyhow::Result<()> {
    println!("[lab] building the topology");
    let topo = Topology::build();
    println!("{}", topo.describe(&opts.mcrelay));

    let static_group = format!("{RELAYED}@{GW_SEG2}");
    let args = ["run", "-i", GW_LAN, "-i", GW_SEG2, "--static", &static_group];
    println!("[lab] starting {} {}", opts.mcrelay.display(), args.join(" "));
    // Own process group: Ctrl-C reaches only the lab, which then stops mcrelay in order.
    let mut relay = Mcrelay::start_with(&opts.mcrelay, &topo.gw, &args, true);
    if let Err(status) = relay.wait_ready_or_exit(READY_TIMEOUT) {
        bail!("mcrelay exited ({status}) before it was ready; stderr:\n{}", relay.stderr());
    }
    println!("[lab] mcrelay is ready");

    let (relayed, lan_only) = (IpAddr::V4(RELAYED), IpAddr::V4(LAN_ONLY));
    let listeners = Listeners {
        lan_relayed: McastReceiver::join(&topo.lan_rx, relayed, PORT, HOST_IFACE),
        lan_lan_only: McastReceiver::join(&topo.lan_rx, lan_only, PORT, HOST_IFACE),
        seg2_a_relayed: McastReceiver::join(&topo.seg2_a, relayed, PORT, HOST_IFACE),
        seg2_wire: WireObserver::new(&topo.seg2_b, HOST_IFACE),
    };

    let mut stream = Stream::start(McastSender::new(&topo.sender, HOST_IFACE), [RELAYED, LAN_ONLY]);
    let live = std::io::stdout().is_terminal();
    let (elapsed, outcome) = watch(&mut relay, opts.duration, interrupted, |elapsed| {
        let snapshot = listeners.snapshot(stream.sent());
        let stats = mcrelay_json_with(&opts.mcrelay, &topo.gw, &["stats", "--json"]);
        let title = format!("t={:>4}s (Ctrl-C stops)", elapsed.as_secs());
        print_table(&title, &snapshot, &stats, live);
    });

    let sent = stream.stop();
    thread::sleep(DRAIN);
    let snapshot = listeners.snapshot(sent);
    let stats = mcrelay_json_with(&opts.mcrelay, &topo.gw, &["stats", "--json"]);
    let title = format!("final, after {}s", elapsed.as_secs());
    print_table(&title, &snapshot, &stats, false);
    outcome?;

    println!("[lab] stopping mcrelay and removing the namespaces");
    let status = relay.stop();
    if !status.success() {
        bail!("mcrelay exited with {status} on SIGTERM; stderr:\n{}", relay.stderr());
    }
    drop(listeners);
    drop(topo);
    verdict(&snapshot)
}

/// A port's mode and packet counters in `mcrelay stats --json`.
struct PortStats<'a> {
    mode: &'a str,
    packets: Option<&'a Value>,
}

impl<'a> PortStats<'a> {
    fn of(doc: &'a Value, port: &str) -> Self {
        let entry = port_entry(doc, port);
        let mode = entry.and_then(|p| p.get("mode")).and_then(Value::as_str).unwrap_or("?");
        Self { mode, packets: entry.and_then(|p| p.get("packets")) }
    }

    /// One packet counter (0 when missing).
    fn get(&self, key: &str) -> u64 {
        self.packets.and_then(|p| p.get(key)).and_then(Value::as_u64).unwrap_or(0)
    }

    /// All `drop_*` counters together.
    fn drops(&self) -> u64 {
        self.packets.and_then(Value::as_object).map_or(0, |p| {
            p.iter().filter(|(k, _)| k.starts_with("drop_")).filter_map(|(_, v)| v.as_u64()).sum()
        })
    }
}

/// A sender thread: one datagram to each of two groups, `RATE` times a second.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Stream {
    fn start(sender: McastSender, groups: [Ipv4Addr; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            thread::spawn(move || send_loop(&sender, groups, &stop, &sent))
        };
        Self { stop, sent, thread: Some(thread) }
    }

    /// Datagrams sent to each group so far.
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops sending; returns the datagrams sent to each group.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.sent()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn send_loop(sender: &McastSender, groups: [Ipv4Addr; 2], stop: &AtomicBool, sent: &AtomicU64) {
    let period = Duration::from_secs(1) / RATE;
    let mut next = Instant::now();
    let mut seq = 0;
    while !stop.load(Ordering::SeqCst) {
        for group in groups {
            if let Err(e) = sender.send(IpAddr::V4(group), PORT, seq) {
                eprintln!("[lab] sending to {group}: {e}");
            }
        }
        seq += 1;
        sent.store(seq, Ordering::SeqCst);
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

/// Runs a scene until Ctrl-C, `duration`, or mcrelay's exit, calling `tick` once a second
/// with the time since the start. Returns that time at the end, and an error when mcrelay
/// exited by itself.
fn watch(
    relay: &mut Mcrelay,
    duration: Option<Duration>,
    interrupted: &AtomicBool,
    mut tick: impl FnMut(Duration),
) -> (Duration, anyhow::Result<()>) {
    let started = Instant::now();
    let mut next_tick = started + Duration::from_secs(1);
    loop {
        if interrupted.load(Ordering::SeqCst) {
            println!("\n[lab] interrupted");
            break;
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if let Some(status) = relay.try_exit_status() {
            let error = anyhow::anyhow!(
                "mcrelay exited unexpectedly ({status}); stderr:\n{}",
                relay.stderr()
            );
            return (started.elapsed(), Err(error));
        }
        if Instant::now() >= next_tick {
            next_tick += Duration::from_secs(1);
            tick(started.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    (started.elapsed(), Ok(()))
}

fn print_table(title: &str, s: &Snapshot, stats: &anyhow::Result<Value>, redraw: bool) {
    let mut out = String::new();
    if redraw {
        out.push_str("\x1b[H\x1b[2J");
    }
    let dash = "-".to_string();
    out.push_str(&format!("[lab] {title}   sent per group: {}\n", s.sent));
    out.push_str(&format!("  {:<28} {:>10} {:>10}\n", "datagrams received", RELAYED, LAN_ONLY));
    let rows = [
        ("lan-rx   (LAN, joined both)", s.lan_relayed.to_string(), s.lan_lan_only.to_string()),
        ("seg2-a   (seg 2, joined .1)", s.seg2_a_relayed.to_string(), dash.clone()),
        (
            "seg2-b   (seg 2, on wire)",
            s.seg2_wire_relayed.to_string(),
            s.seg2_wire_lan_only.to_string(),
        ),
    ];
    for (name, a, b) in rows {
        out.push_str(&format!("  {name:<28} {a:>10} {b:>10}\n"));
    }
    match stats {
        Ok(doc) => {
            out.push_str(&format!(
                "  {:<9} {:<7} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}\n",
                "port",
                "mode",
                "forwarded",
                "unknown",
                "control",
                "link-local",
                "drops",
                "redir-err"
            ));
            for port in [GW_LAN, GW_SEG2] {
                let stats = PortStats::of(doc, port);
                out.push_str(&format!(
                    "  {:<9} {:<7} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}\n",
                    port,
                    stats.mode,
                    stats.get("forwarded"),
                    stats.get("passed_unknown"),
                    stats.get("passed_control"),
                    stats.get("passed_link_local"),
                    stats.drops(),
                    stats.get("redirect_failed"),
                ));
            }
        }
        Err(e) => out.push_str(&format!("  mcrelay stats: {e:#}\n")),
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// Whether `got` of `sent` counts as delivered.
fn delivered(got: u64, sent: u64) -> bool {
    sent > 0 && got as f64 >= sent as f64 * DELIVERED_SHARE
}

/// Prints which flows crossed and which did not; an error when that is not what mcrelay is
/// configured to do.
fn verdict(s: &Snapshot) -> anyhow::Result<()> {
    let checks = [
        (
            delivered(s.seg2_a_relayed, s.sent),
            format!(
                "{RELAYED} crossed to segment 2: seg2-a received {} of {}",
                s.seg2_a_relayed, s.sent
            ),
        ),
        (
            s.seg2_wire_lan_only == 0 && s.sent > 0,
            format!(
                "{LAN_ONLY} stayed on the LAN: {} of {} seen on segment 2's wire",
                s.seg2_wire_lan_only, s.sent
            ),
        ),
        (
            delivered(s.lan_relayed, s.sent) && delivered(s.lan_lan_only, s.sent),
            format!(
                "the LAN receiver got both groups: {} and {} of {} each",
                s.lan_relayed, s.lan_lan_only, s.sent
            ),
        ),
    ];
    println!("[lab] verdict:");
    for (ok, text) in &checks {
        println!("  {} {text}", if *ok { "ok  " } else { "FAIL" });
    }
    if checks.iter().all(|(ok, _)| *ok) {
        println!("[lab] as expected: only {RELAYED} crosses to segment 2");
        Ok(())
    } else {
        bail!("the lab did not behave as expected (see the verdict above)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_accepts_the_expected_flows_only() {
        let good = Snapshot {
            sent: 100,
            lan_relayed: 100,
            lan_lan_only: 100,
            seg2_a_relayed: 99,
            seg2_wire_relayed: 100,
            seg2_wire_lan_only: 0,
        };
        assert!(verdict(&good).is_ok());
        assert!(verdict(&Snapshot { seg2_wire_lan_only: 1, ..good }).is_err());
        assert!(verdict(&Snapshot { seg2_a_relayed: 0, ..good }).is_err());
        assert!(verdict(&Snapshot { lan_lan_only: 10, ..good }).is_err());
        assert!(verdict(&Snapshot::default()).is_err());
    }
}
