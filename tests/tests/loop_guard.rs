//! The loop guard (issue 11, item 1): redundant relays and relays beside bridges must not
//! circulate multicast.
//!
//! Without the guard, mcrelay's L2 path forwards frames unchanged, so two relays between the same
//! two segments, a relay beside a Linux bridge, or one relay with two ports on one segment
//! circulate every datagram at XDP speed (measured before the guard: 269,288 datagrams at the
//! receiver for 200 sent with two relays between two bridged segments), and pinned XDP links
//! keep the storm going after the daemons exit. This file's topologies against the binary before
//! the guard, 5 datagrams sent, frames of the group on the receiver's wire within 2 s: 129,000
//! (two relays), 243,000 (two ports on one bridge), 180,000 (relay beside a bridge), 297,000
//! (two relays, both daemons stopped, pinned links). The guard's contract, as used here:
//!
//! - relayed data frames leave with the relay's own "relay MAC" (`02:6d:63:xx:xx:xx`); a data
//!   frame arriving with the relay's own relay MAC (or that of a redundant peer) is dropped and
//!   counted in the port counter `drop_loop`;
//! - relays send hellos (EtherType 0x88B5 to 03:6d:63:72:6c:79) on every port every
//!   `--hello-interval` and forget a peer after `--hello-holdtime`; a relay hearing its own hello
//!   on another of its ports puts the higher-ifindex port of the pair in standby; a relay that
//!   sees a relay with a lower relay MAC on every one of its ports goes into standby on all of
//!   them; standby ports neither relay nor get copies (`mcrelay ports --json`: `standby`,
//!   `standby_reason`); the standby relay resumes within the holdtime when the active one goes.
//!
//! Every segment is a real Linux bridge (default settings: multicast snooping on) in its own
//! namespace; receivers are kernel sockets; every relay is a [`Relay`] guard, which stops its
//! daemon and runs `mcrelay detach` when dropped, so that no storm outlives a test.
//!
//! Counting is robust on a busy machine: deliveries are awaited with generous timeouts, and
//! "nothing more arrives" is checked over a window that starts a second after the sender
//! stopped (a storm never goes quiet; a healthy relay is silent by then).

use std::{
    net::{IpAddr, Ipv4Addr},
    ops::Range,
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    loops::{
        ipv4_udp_frame, is_relay_mac, mac_string, port_standby, send_frames, standby_reason,
        FrameCapture, Host, Relay, Segment,
    },
    mcast::payload,
    port_counter, require_testbed, McastReceiver, McastSender, WireObserver,
};

/// The group of every test (IPv4: the receivers are the kernel's IGMP stack).
const GROUP: &str = "239.77.1.1";
/// UDP port of the test datagrams.
const PORT: u16 = 5000;
/// Datagrams per burst.
const COUNT: u64 = 200;
/// Gap between two datagrams of a burst (a modest 500 datagrams/s).
const INTERVAL: Duration = Duration::from_millis(2);
/// Fast hellos, so that the tests settle and take over in about a second.
const HELLO_ARGS: [&str; 4] = ["--hello-interval", "0.2", "--hello-holdtime", "1"];
/// The holdtime passed in [`HELLO_ARGS`].
const HOLDTIME: Duration = Duration::from_secs(1);
/// How long the relays may take to settle (generous: hellos every 0.2 s settle in about 1 s).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a settled standby pattern must stay unchanged to count as settled (> holdtime).
const SETTLE_STABLE: Duration = Duration::from_millis(1500);
/// How long datagrams that must arrive may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// After the sender stopped: wait this long, then ...
const QUIET_AFTER: Duration = Duration::from_secs(1);
/// ... nothing more of the group may arrive during this window.
const QUIET_WINDOW: Duration = Duration::from_secs(1);
/// How often standby flags are polled.
const POLL: Duration = Duration::from_millis(50);
/// First sequence number of probe datagrams (kept apart from the measured bursts).
const PROBE_SEQ: u64 = 1_000_000;

fn group() -> IpAddr {
    addr(GROUP)
}

fn group_v4() -> Ipv4Addr {
    match group() {
        IpAddr::V4(g) => g,
        IpAddr::V6(_) => unreachable!("GROUP is IPv4"),
    }
}

/// `mcrelay run -i P ... HELLO_ARGS EXTRA...`.
fn run_args(ports: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["run".to_string()];
    for port in ports {
        args.extend(["-i".to_string(), port.to_string()]);
    }
    args.extend(HELLO_ARGS.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

// ------------------------------------------------------------------------------------------
// Topologies

/// Relay ports in the topologies with two segments.
const XY: [&str; 2] = ["x", "y"];

/// Two bridged segments and two relays between them:
///
/// ```text
///   sender ── [bridge X in SX] ──┬── x  R1  y ──┬── [bridge Y in SY] ── receiver
///                                └── x  R2  y ──┘
/// ```
///
/// Fields drop in order: the relays first (daemons stopped, `mcrelay detach`), then the hosts and
/// the segments.
struct TwoRelays {
    relays: [Relay; 2],
    sender: Host,
    receiver: Host,
    _x: Segment,
    _y: Segment,
}

impl TwoRelays {
    fn new(tag: &str) -> Self {
        let x = Segment::new(&format!("mcr{tag}-sx"));
        let y = Segment::new(&format!("mcr{tag}-sy"));
        let sender = x.add_host("hs", &format!("mcr{tag}-hs"), "198.18.0.1/24");
        let receiver = y.add_host("hr", &format!("mcr{tag}-hr"), "198.18.0.2/24");
        let relays = [1, 2].map(|n| {
            let relay = Relay::new(&format!("R{n}"), &format!("mcr{tag}-r{n}"));
            x.connect(&format!("r{n}"), &relay.ns, "x");
            y.connect(&format!("r{n}"), &relay.ns, "y");
            relay
        });
        Self { relays, sender, receiver, _x: x, _y: y }
    }

    /// Starts both relays (`run -i x -i y HELLO_ARGS EXTRA`).
    fn start(&mut self, extra: &[&str]) {
        for relay in &mut self.relays {
            relay.start(&run_args(&XY, extra));
        }
    }

    /// Waits until exactly one relay is in standby on both ports and the other on none, stably;
    /// returns (index of the active relay, index of the standby relay).
    fn wait_settled(&self) -> (usize, usize) {
        wait_stable("one relay active, the other in standby on both ports", || {
            let views: Vec<_> = self.relays.iter().map(|r| r.standby(&XY)).collect();
            let state = |i: usize| -> Option<bool> {
                match views[i].0[..] {
                    [Some(a), Some(b)] if a == b => Some(a),
                    _ => None,
                }
            };
            match (state(0), state(1)) {
                (Some(false), Some(true)) => Ok((0, 1)),
                (Some(true), Some(false)) => Ok((1, 0)),
                _ => Err(self
                    .relays
                    .iter()
                    .zip(&views)
                    .map(|(r, (flags, doc))| format!("{r}: standby {flags:?}\n{doc:#}"))
                    .collect::<Vec<_>>()
                    .join("\n")),
            }
        })
    }
}

/// One relay with two ports (`xa`, `xb`) on the sender's bridged segment and a third (`zc`) to
/// the receiver's own segment (no one-letter names here: `ip link set a up` reads `a` as
/// `address`):
///
/// ```text
///   sender ── [bridge X in SX] ──┬── xa ┐
///                                └── xb ┴ R  zc ── receiver
/// ```
struct TwoPortsOnOneBridge {
    relay: Relay,
    sender: Host,
    receiver: Host,
    _x: Segment,
}

impl TwoPortsOnOneBridge {
    fn new(tag: &str) -> Self {
        let x = Segment::new(&format!("mcr{tag}-sx"));
        let sender = x.add_host("hs", &format!("mcr{tag}-hs"), "198.18.0.1/24");
        let relay = Relay::new("R", &format!("mcr{tag}-r"));
        x.connect("ra", &relay.ns, "xa");
        x.connect("rb", &relay.ns, "xb");
        let receiver = Host::new(&format!("mcr{tag}-hr"), &relay.ns, "zc", "198.18.1.2/24");
        Self { relay, sender, receiver, _x: x }
    }
}

/// Segments X and Y joined by a Linux bridge (in namespace SB), so that they are one L2 domain,
/// and one relay with ports on both:
///
/// ```text
///   sender ── [bridge X in SX] ── x [bridge in SB] y ── [bridge Y in SY] ── receiver
///                      └────────────── x  R  y ──────────────┘
/// ```
struct RelayBesideBridge {
    relay: Relay,
    sender: Host,
    receiver: Host,
    _x: Segment,
    _y: Segment,
    _bridge: Segment,
}

impl RelayBesideBridge {
    fn new(tag: &str) -> Self {
        let x = Segment::new(&format!("mcr{tag}-sx"));
        let y = Segment::new(&format!("mcr{tag}-sy"));
        let bridge = Segment::new(&format!("mcr{tag}-sb"));
        bridge.join("x", &x, "bx");
        bridge.join("y", &y, "by");
        let sender = x.add_host("hs", &format!("mcr{tag}-hs"), "198.18.0.1/24");
        let receiver = y.add_host("hr", &format!("mcr{tag}-hr"), "198.18.0.2/24");
        let relay = Relay::new("R", &format!("mcr{tag}-r"));
        x.connect("rx", &relay.ns, "x");
        y.connect("ry", &relay.ns, "y");
        Self { relay, sender, receiver, _x: x, _y: y, _bridge: bridge }
    }
}

// ------------------------------------------------------------------------------------------
// Waiting and counting

/// Polls `check` every [`POLL`] until it returns `Ok(v)` with the same `v` for
/// [`SETTLE_STABLE`]; returns `v`. Panics after [`SETTLE_TIMEOUT`] with the last `Err` (or the
/// flapping values).
fn wait_stable<T: PartialEq + std::fmt::Debug>(
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    let mut held: Option<(T, Instant)> = None;
    loop {
        let last = match check() {
            Ok(v) => match held.take() {
                Some((prev, since)) if prev == v => {
                    if since.elapsed() >= SETTLE_STABLE {
                        eprintln!("settled ({what}) after {:?}: {v:?}", start.elapsed());
                        return v;
                    }
                    held = Some((prev, since));
                    None
                }
                Some((prev, _)) => {
                    let msg = format!("changed from {prev:?} to {v:?}");
                    held = Some((v, Instant::now()));
                    Some(msg)
                }
                None => {
                    held = Some((v, Instant::now()));
                    None
                }
            },
            Err(state) => {
                held = None;
                Some(state)
            }
        };
        if start.elapsed() > SETTLE_TIMEOUT {
            panic!(
                "waited {SETTLE_TIMEOUT:?} for the relays to settle ({what}); last state:\n{}",
                last.unwrap_or_else(|| format!("{held:?}"))
            );
        }
        thread::sleep(POLL);
    }
}

/// Sends probe datagrams (every 50 ms) until `rx` has received one more datagram than before;
/// returns how long that took. Panics after `timeout`.
fn probe_until_delivered(
    tx: &McastSender,
    rx: &McastReceiver,
    next_probe: &mut u64,
    timeout: Duration,
) -> Duration {
    let before = rx.count();
    let start = Instant::now();
    while rx.count() == before {
        rx.check_thread();
        assert!(
            start.elapsed() < timeout,
            "{rx}: no probe datagram of {GROUP} arrived within {timeout:?}"
        );
        tx.send(group(), PORT, *next_probe).unwrap_or_else(|e| panic!("sending a probe: {e}"));
        *next_probe += 1;
        thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// What a burst of numbered datagrams produced at the receiver.
#[derive(Debug)]
struct Burst {
    /// Datagrams sent.
    sent: u64,
    /// Datagrams the receiver socket got (duplicates included), up to [`QUIET_AFTER`] after the
    /// sender stopped.
    copies: u64,
    /// Distinct datagrams the receiver socket got.
    distinct: u64,
    /// Frames of the group on the receiver's wire, same moment.
    wire: u64,
    /// Datagrams the socket got during the quiet window.
    late_copies: u64,
    /// Frames of the group on the receiver's wire during the quiet window.
    late_wire: u64,
}

impl Burst {
    /// No storm: at most two copies per datagram, and nothing more once the sender stopped.
    fn assert_no_storm(&self, what: &str) {
        assert!(
            self.late_copies == 0 && self.late_wire == 0,
            "{what}: the group kept arriving after the sender stopped ({} datagrams at the \
             receiver socket, {} frames on its wire, in {QUIET_WINDOW:?} starting {QUIET_AFTER:?} \
             after the last send): a forwarding loop; {self:?}",
            self.late_copies,
            self.late_wire
        );
        assert!(
            self.copies <= 2 * self.sent && self.wire <= 2 * self.sent,
            "{what}: {} copies of {} datagrams reached the receiver, {} frames its wire (at \
             most two each allowed): a forwarding loop; {self:?}",
            self.copies,
            self.sent,
            self.wire
        );
    }

    /// Every datagram arrived (at least once).
    fn assert_all_distinct(&self, what: &str) {
        assert_eq!(
            self.distinct, self.sent,
            "{what}: not every datagram reached the receiver; {self:?}"
        );
    }

    /// Every datagram arrived exactly once.
    fn assert_exactly_once(&self, what: &str) {
        self.assert_all_distinct(what);
        assert_eq!(self.copies, self.sent, "{what}: duplicates at the receiver; {self:?}");
    }
}

/// Sends datagrams `seqs` to the group from `tx`, waits until the receiver has at least that
/// many more (or [`DELIVERY_TIMEOUT`]), then waits [`QUIET_AFTER`] and counts what still arrives
/// during [`QUIET_WINDOW`].
fn burst(tx: &McastSender, rx: &McastReceiver, wire: &WireObserver, seqs: Range<u64>) -> Burst {
    let g = group();
    let sent = seqs.end - seqs.start;
    let (count0, distinct0, wire0) = (rx.count(), rx.distinct(), wire.count(g));
    for seq in seqs {
        tx.send(g, PORT, seq).unwrap_or_else(|e| panic!("sending {seq} to {g}: {e}"));
        thread::sleep(INTERVAL);
    }
    rx.wait_for(count0 + sent, DELIVERY_TIMEOUT);
    thread::sleep(QUIET_AFTER);
    let (count1, distinct1, wire1) = (rx.count(), rx.distinct(), wire.count(g));
    thread::sleep(QUIET_WINDOW);
    let (count2, wire2) = (rx.count(), wire.count(g));
    rx.check_thread();
    wire.check_thread();
    let b = Burst {
        sent,
        copies: count1 - count0,
        distinct: distinct1 - distinct0,
        wire: wire1 - wire0,
        late_copies: count2 - count1,
        late_wire: wire2 - wire1,
    };
    eprintln!("burst: {b:?}");
    b
}

/// The receiver side of a test: a joined socket, a wire observer and a frame capture on the
/// receiver's interface.
struct Receiving {
    rx: McastReceiver,
    wire: WireObserver,
    capture: FrameCapture,
}

impl Receiving {
    fn on(host: &Host) -> Self {
        Self {
            rx: McastReceiver::join(&host.ns, group(), PORT, &host.iface),
            wire: WireObserver::new(&host.ns, &host.iface),
            capture: FrameCapture::new(&host.ns, &host.iface),
        }
    }
}

/// The ifindexes of `ports` in `relay`'s namespace.
fn ifindexes(relay: &Relay, ports: &[&str]) -> Vec<u32> {
    ports.iter().map(|p| relay.ns.ifindex(p)).collect()
}

/// For a relay whose two `ports` are on one L2 domain: waits until exactly one of them is in
/// standby (the one with the higher ifindex, per the contract) and every other port of
/// `all_ports` is active, stably; returns the standby port.
fn wait_one_port_standby<'a>(relay: &Relay, pair: [&'a str; 2], all_ports: &[&str]) -> &'a str {
    let idx = ifindexes(relay, &pair);
    let expected = if idx[0] > idx[1] { pair[0] } else { pair[1] };
    let standby = wait_stable("exactly one port of the pair in standby", || {
        let (flags, doc) = relay.standby(all_ports);
        let on: Vec<&str> = all_ports
            .iter()
            .zip(&flags)
            .filter(|(_, f)| **f == Some(true))
            .map(|(p, _)| *p)
            .collect();
        let all_reported = flags.iter().all(Option::is_some);
        match on[..] {
            [port] if all_reported && pair.contains(&port) => Ok(port.to_string()),
            _ => Err(format!("{relay}: standby {flags:?} for {all_ports:?}\n{doc:#}")),
        }
    });
    let doc = relay.ports();
    assert_eq!(
        standby, expected,
        "{relay}: the higher-ifindex port of the pair must be the one in standby \
         (ifindexes {pair:?} = {idx:?}); ports --json:\n{doc:#}"
    );
    let reason = standby_reason(&doc, expected).unwrap_or_default();
    assert!(!reason.is_empty(), "{relay}: {expected} is in standby without a reason:\n{doc:#}");
    for port in all_ports.iter().filter(|p| **p != expected) {
        assert_eq!(
            standby_reason(&doc, port),
            Some(""),
            "{relay}: active port {port} must have an empty standby_reason:\n{doc:#}"
        );
    }
    eprintln!("{relay}: {expected} in standby: {reason}");
    pair.into_iter().find(|p| *p == expected).unwrap_or(pair[0])
}

fn drop_loop(relay: &Relay, port: &str) -> u64 {
    port_counter(&relay.ports(), port, "counters", "drop_loop")
}

// ------------------------------------------------------------------------------------------
// Tests

/// Two relays between the same two bridged segments: after the election exactly one copy of
/// every datagram reaches the receiver, relayed with a relay MAC, and nothing circulates once
/// the sender stops.
#[test]
fn two_relays_between_two_bridged_segments() {
    require_testbed!();
    let mut t = TwoRelays::new("lg1");
    t.start(&[]);
    let recv = Receiving::on(&t.receiver);
    let (active, standby) = t.wait_settled();
    eprintln!("active: {}, standby: {}", t.relays[active], t.relays[standby]);
    {
        let doc = t.relays[standby].ports();
        for port in XY {
            let reason = standby_reason(&doc, port).unwrap_or_default();
            assert!(!reason.is_empty(), "standby port {port} without a reason:\n{doc:#}");
        }
        let doc = t.relays[active].ports();
        for port in XY {
            assert_eq!(standby_reason(&doc, port), Some(""), "active port {port}:\n{doc:#}");
        }
    }

    let tx = McastSender::new(&t.sender.ns, &t.sender.iface);
    let mut probe = PROBE_SEQ;
    let took = probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);
    eprintln!("first probe delivered after {took:?}");
    thread::sleep(QUIET_AFTER);

    let b = burst(&tx, &recv.rx, &recv.wire, 0..COUNT);
    b.assert_no_storm("two relays between two bridged segments");
    b.assert_all_distinct("two relays between two bridged segments");
    b.assert_exactly_once("two relays between two bridged segments, after the election");

    // Relayed frames carry a relay MAC: one, the active relay's.
    let sources = recv.capture.data_sources(group());
    let shown: Vec<String> =
        sources.iter().map(|(m, n)| format!("{} x{n}", mac_string(m))).collect();
    assert_eq!(sources.len(), 1, "relayed frames on Y from several source MACs: {shown:?}");
    assert!(
        sources.keys().all(is_relay_mac),
        "relayed frames must leave with the relay MAC (02:6d:63:xx:xx:xx): {shown:?}"
    );
    // Both relays send hellos on Y, the standby one included.
    let hellos = recv.capture.hello_sources();
    assert!(
        hellos.len() >= 2,
        "hellos of both relays expected on Y, saw: {:?}",
        hellos.iter().map(|(m, n)| format!("{} x{n}", mac_string(m))).collect::<Vec<_>>()
    );

    for relay in &mut t.relays {
        relay.assert_alive("during the test");
    }
}

/// One relay with two ports into one bridge: one port goes into standby (the higher ifindex),
/// and the sender's datagrams reach the receiver on the third port without a storm.
#[test]
fn one_relay_two_ports_on_one_bridge() {
    require_testbed!();
    let mut t = TwoPortsOnOneBridge::new("lg2");
    let ports = ["xa", "xb", "zc"];
    t.relay.start(&run_args(&ports, &[]));
    let recv = Receiving::on(&t.receiver);
    let standby = wait_one_port_standby(&t.relay, ["xa", "xb"], &ports);

    let tx = McastSender::new(&t.sender.ns, &t.sender.iface);
    let mut probe = PROBE_SEQ;
    probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);
    thread::sleep(QUIET_AFTER);
    let b = burst(&tx, &recv.rx, &recv.wire, 0..COUNT);
    b.assert_no_storm("one relay with two ports on one bridge");
    b.assert_all_distinct("one relay with two ports on one bridge");
    if b.copies != b.sent {
        eprintln!("note: {} copies of {} datagrams (exactly one each expected)", b.copies, b.sent);
    }

    let doc = t.relay.ports();
    let on: Vec<&str> =
        ports.iter().copied().filter(|p| port_standby(&doc, p) == Some(true)).collect();
    assert_eq!(on, [standby], "exactly one of the two bridge ports in standby:\n{doc:#}");
    t.relay.assert_alive("during the test");
}

/// A relay beside a Linux bridge that already joins its two segments: the relay hears its own
/// hellos across the bridge and puts one port in standby; the receiver gets the bridged copy
/// without a storm.
#[test]
fn relay_beside_a_bridge() {
    require_testbed!();
    let mut t = RelayBesideBridge::new("lg3");
    t.relay.start(&run_args(&XY, &[]));
    let recv = Receiving::on(&t.receiver);
    let standby = wait_one_port_standby(&t.relay, XY, &XY);

    let tx = McastSender::new(&t.sender.ns, &t.sender.iface);
    let mut probe = PROBE_SEQ;
    probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);
    thread::sleep(QUIET_AFTER);
    let b = burst(&tx, &recv.rx, &recv.wire, 0..COUNT);
    b.assert_no_storm("relay beside a bridge");
    b.assert_all_distinct("relay beside a bridge");
    if b.copies != b.sent {
        eprintln!("note: {} copies of {} datagrams (exactly one each expected)", b.copies, b.sent);
    }

    let doc = t.relay.ports();
    let on: Vec<&str> =
        XY.iter().copied().filter(|p| port_standby(&doc, p) == Some(true)).collect();
    assert_eq!(on, [standby], "exactly one port in standby:\n{doc:#}");
    t.relay.assert_alive("during the test");
}

/// Pinned dataplanes go on forwarding after both daemons exit; they must not loop then either.
/// Afterwards `mcrelay detach` removes everything.
#[test]
fn storm_does_not_outlive_daemons() {
    require_testbed!();
    let mut t = TwoRelays::new("lg4");
    t.start(&[]); // pinned (the default)
    let recv = Receiving::on(&t.receiver);
    t.wait_settled();
    let tx = McastSender::new(&t.sender.ns, &t.sender.iface);
    let mut probe = PROBE_SEQ;
    probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);

    for relay in &mut t.relays {
        let status = relay.stop();
        assert!(status.success(), "{relay}: mcrelay exited with {status} on SIGTERM");
    }
    for relay in &t.relays {
        for port in XY {
            assert!(
                relay.ns.xdp_attachment(port).is_some(),
                "{relay}: {port} lost its XDP program when the daemon exited (pinned links \
                 must stay, or this test proves nothing)"
            );
        }
    }
    thread::sleep(QUIET_AFTER);

    let b = burst(&tx, &recv.rx, &recv.wire, 0..COUNT);
    b.assert_no_storm("two pinned dataplanes without daemons");
    b.assert_all_distinct("two pinned dataplanes without daemons (forwarding goes on)");
    if b.copies != b.sent {
        eprintln!("note: {} copies of {} datagrams without daemons", b.copies, b.sent);
    }

    for relay in &t.relays {
        let out = relay.detach();
        assert!(
            out.status.success(),
            "{relay}: mcrelay detach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for port in XY {
            assert!(
                relay.ns.xdp_attachment(port).is_none(),
                "{relay}: {port} still has XDP after mcrelay detach"
            );
        }
    }
}

/// Both relays run with `--no-pin`; the active one is killed (SIGKILL: its XDP programs go with
/// the process). The standby relay leaves standby within holdtime + 2 s and the receiver gets
/// every datagram again, once.
#[test]
fn takeover_when_active_relay_dies() {
    require_testbed!();
    let mut t = TwoRelays::new("lg5");
    t.start(&["--no-pin"]);
    let recv = Receiving::on(&t.receiver);
    let (active, standby) = t.wait_settled();
    let tx = McastSender::new(&t.sender.ns, &t.sender.iface);
    let mut probe = PROBE_SEQ;
    probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);
    thread::sleep(QUIET_AFTER);
    let b = burst(&tx, &recv.rx, &recv.wire, 0..COUNT);
    b.assert_no_storm("before the take-over");
    b.assert_exactly_once("before the take-over");

    let killed = Instant::now();
    t.relays[active].kill();
    let deadline = killed + Duration::from_secs(10);
    while XY.iter().any(|p| t.relays[active].ns.xdp_attachment(p).is_some()) {
        assert!(
            Instant::now() < deadline,
            "{}: XDP still attached 10 s after SIGKILL of a --no-pin daemon",
            t.relays[active]
        );
        thread::sleep(POLL);
    }

    // The survivor leaves standby on both ports.
    let limit = HOLDTIME + Duration::from_secs(2);
    let survivor = &t.relays[standby];
    let give_up = killed + Duration::from_secs(20);
    let took = loop {
        let (flags, doc) = survivor.standby(&XY);
        if flags.iter().all(|f| *f == Some(false)) {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < give_up,
            "{survivor} still in standby 20 s after the active relay was killed: {flags:?}\n{doc:#}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    eprintln!("{survivor} left standby {took:?} after the active relay was killed");
    assert!(
        took <= limit,
        "{survivor} left standby after {took:?}, limit holdtime + 2 s = {limit:?}"
    );

    // And relays: the first probe arrives soon (the standby relay kept its memberships: the
    // contract says it resumes within the holdtime; 3 s of slack for a busy machine), then a
    // burst arrives exactly once.
    let resumed = probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);
    let since_kill = killed.elapsed();
    eprintln!("forwarding resumed {since_kill:?} after the kill ({resumed:?} of probing)");
    let limit = HOLDTIME + Duration::from_secs(3);
    assert!(
        since_kill <= limit,
        "forwarding resumed {since_kill:?} after the active relay was killed (limit {limit:?}): \
         did the standby relay keep learning memberships?"
    );
    thread::sleep(QUIET_AFTER);
    let b = burst(&tx, &recv.rx, &recv.wire, 10_000..10_000 + COUNT);
    b.assert_no_storm("after the take-over");
    b.assert_exactly_once("after the take-over");
    t.relays[standby].assert_alive("after the take-over");
}

/// Data frames that arrive with the relay's own relay MAC are dropped and counted as
/// `drop_loop`: frames with the active relay's MAC (learned from its relayed frames on Y),
/// injected into X, never reach the receiver.
#[test]
fn frames_with_own_relay_mac_are_dropped_as_loops() {
    require_testbed!();
    const SPOOFED: u64 = 20;
    let mut t = TwoRelays::new("lg6");
    t.start(&[]);
    let recv = Receiving::on(&t.receiver);
    let (active, _) = t.wait_settled();
    let tx = McastSender::new(&t.sender.ns, &t.sender.iface);
    let mut probe = PROBE_SEQ;
    probe_until_delivered(&tx, &recv.rx, &mut probe, DELIVERY_TIMEOUT);
    thread::sleep(QUIET_AFTER);
    let sources = recv.capture.data_sources(group());
    let relay_mac = match sources.keys().collect::<Vec<_>>()[..] {
        [mac] if is_relay_mac(mac) => *mac,
        _ => panic!(
            "expected the probes on Y to come from one relay MAC, saw {:?}",
            sources.keys().map(mac_string).collect::<Vec<_>>()
        ),
    };
    let relay = &t.relays[active];
    eprintln!("{relay} relays with {}", mac_string(&relay_mac));

    let before = drop_loop(relay, "x");
    let (count0, wire0) = (recv.rx.count(), recv.wire.count(group()));
    let frames: Vec<Vec<u8>> = (0..SPOOFED)
        .map(|i| {
            let data = payload(group(), 500_000 + i);
            ipv4_udp_frame(relay_mac, t.sender.v4, group_v4(), PORT, data.as_bytes())
        })
        .collect();
    send_frames(&t.sender.ns, &t.sender.iface, &frames);

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let after = loop {
        let now = drop_loop(relay, "x");
        if now >= before + SPOOFED || Instant::now() >= deadline {
            break now;
        }
        thread::sleep(POLL);
    };
    assert!(
        after >= before + SPOOFED,
        "{relay}: drop_loop on x went from {before} to {after} for {SPOOFED} frames carrying its \
         own relay MAC:\n{:#}",
        relay.ports()
    );
    thread::sleep(QUIET_AFTER);
    let (count1, wire1) = (recv.rx.count(), recv.wire.count(group()));
    assert!(
        count1 == count0 && wire1 == wire0,
        "frames carrying {relay}'s own relay MAC were relayed to Y: {} datagrams at the receiver, \
         {} frames on its wire",
        count1 - count0,
        wire1 - wire0
    );
    // Genuine datagrams sent afterwards still arrive, exactly once.
    let b = burst(&tx, &recv.rx, &recv.wire, 0..COUNT);
    b.assert_no_storm("after frames with the relay MAC");
    b.assert_exactly_once("after frames with the relay MAC");
    for relay in &mut t.relays {
        relay.assert_alive("during the test");
    }
}
