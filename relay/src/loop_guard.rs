//! The loop guard's control side: hellos between relays, and the decisions they lead to.
//!
//! Every relay sends a hello on each port every hello interval (and at once when it hears a
//! relay it did not know). A hello names the sending relay (its relay MAC) and the port it
//! left through. From the hellos it hears, a relay decides:
//! - **Same segment twice**: its own hello heard on another of its ports means both ports are
//!   on one segment (a bridge, a hub, a relay beside a bridge). The port with the higher
//!   ifindex goes into standby.
//! - **Redundant relays**: a peer relay heard on two or more ports reaches this relay through
//!   a loop. Its relay MAC goes into `LOOP_MACS` (its relayed frames are never relayed again,
//!   which bounds a packet to at most two copies), and stays there while this daemon runs. If
//!   the peer's relay MAC is lower and it is present on every port of this relay, this relay
//!   stands by on all of them (exactly one copy); it resumes when the peer's hellos have been
//!   missing for the hold time.
//!
//! Pure logic: no sockets, no maps; time is passed in.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use relay_common::{HELLO_ETHERTYPE, HELLO_MAC, PORT_STANDBY_PEER, PORT_STANDBY_SAME_SEGMENT};

/// Magic at the start of a hello's payload.
const MAGIC: [u8; 4] = *b"MCRL";
const VERSION: u8 = 1;
/// Ethernet header + payload (magic, version, flags, relay MAC, port ifindex, hold time).
const HELLO_LEN: usize = 14 + 4 + 1 + 1 + 6 + 4 + 4;

/// A hello as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sending relay.
    pub relay_mac: [u8; 6],
    /// The sender's port (its ifindex, in the sender's namespace).
    pub port: u32,
    /// How long the sender may stay silent before it counts as gone.
    pub holdtime: Duration,
}

/// Builds the hello a port sends (`port_mac` is the port's own MAC, the frame's source).
pub fn build_hello(port_mac: [u8; 6], hello: &Hello) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&HELLO_MAC);
    f.extend_from_slice(&port_mac);
    f.extend_from_slice(&HELLO_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&MAGIC);
    f.push(VERSION);
    f.push(0);
    f.extend_from_slice(&hello.relay_mac);
    f.extend_from_slice(&hello.port.to_be_bytes());
    let hold = u32::try_from(hello.holdtime.as_millis()).unwrap_or(u32::MAX);
    f.extend_from_slice(&hold.to_be_bytes());
    f.resize(60, 0);
    f
}

/// Parses a hello frame; `None` when the frame is not one.
pub fn parse_hello(frame: &[u8]) -> Option<Hello> {
    if frame.len() < HELLO_LEN || frame[12..14] != HELLO_ETHERTYPE.to_be_bytes() {
        return None;
    }
    let p = &frame[14..];
    if p[..4] != MAGIC || p[4] != VERSION {
        return None;
    }
    let relay_mac: [u8; 6] = p[6..12].try_into().ok()?;
    let port = u32::from_be_bytes(p[12..16].try_into().ok()?);
    let hold = u32::from_be_bytes(p[16..20].try_into().ok()?);
    Some(Hello { relay_mac, port, holdtime: Duration::from_millis(u64::from(hold)) })
}

/// Whether an Ethernet frame is a hello (by EtherType).
pub fn is_hello(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == HELLO_ETHERTYPE.to_be_bytes()
}

/// What the guard decided, for the dataplane and the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Relay MACs whose frames are never relayed again.
    pub loop_macs: BTreeSet<[u8; 6]>,
    /// Standby ports: ifindex -> `PORT_STANDBY_*` bits.
    pub standby: BTreeMap<u32, u32>,
}

/// The loop guard of one relay.
#[derive(Debug)]
pub struct LoopGuard {
    relay_mac: [u8; 6],
    /// How long a silent peer (or own hello path) is remembered.
    holdtime: Duration,
    /// Peer relay -> port it was heard on -> expiry.
    peers: BTreeMap<[u8; 6], BTreeMap<u32, Duration>>,
    /// Own hellos heard: (port heard on, port sent from) -> expiry.
    own: BTreeMap<(u32, u32), Duration>,
    /// Peers found redundant at some point (kept while the daemon runs: their dataplane may
    /// still be forwarding from pins after their daemon went away).
    redundant: BTreeSet<[u8; 6]>,
    /// A hello should go out at once (a new relay was heard).
    triggered: bool,
}

impl LoopGuard {
    pub fn new(relay_mac: [u8; 6], holdtime: Duration) -> Self {
        Self {
            relay_mac,
            holdtime,
            peers: BTreeMap::new(),
            own: BTreeMap::new(),
            redundant: BTreeSet::new(),
            triggered: true,
        }
    }

    pub fn relay_mac(&self) -> [u8; 6] {
        self.relay_mac
    }

    /// The hello this relay sends on `port`.
    pub fn hello(&self, port: u32) -> Hello {
        Hello { relay_mac: self.relay_mac, port, holdtime: self.holdtime }
    }

    /// Takes note of a hello heard on `port`.
    pub fn on_hello(&mut self, now: Duration, port: u32, hello: &Hello) {
        let hold = if hello.holdtime.is_zero() { self.holdtime } else { hello.holdtime };
        if hello.relay_mac == self.relay_mac {
            if hello.port != port {
                self.own.insert((port, hello.port), now + hold);
            }
            return;
        }
        let ports = self.peers.entry(hello.relay_mac).or_default();
        if ports.insert(port, now + hold).is_none() {
            // A relay we did not know here: answer at once, so it learns about us without
            // waiting a hello interval.
            self.triggered = true;
        }
        if ports.len() >= 2 {
            self.redundant.insert(hello.relay_mac);
        }
    }

    /// Forgets what was not heard again within the hold time.
    pub fn expire(&mut self, now: Duration) {
        self.own.retain(|_, expiry| *expiry > now);
        for ports in self.peers.values_mut() {
            ports.retain(|_, expiry| *expiry > now);
        }
        self.peers.retain(|_, ports| !ports.is_empty());
    }

    /// The earliest expiry (when the decision may change without a hello).
    pub fn next_expiry(&self) -> Option<Duration> {
        let own = self.own.values().copied();
        let peers = self.peers.values().flat_map(|p| p.values().copied());
        own.chain(peers).min()
    }

    /// Whether a hello should go out now (then cleared).
    pub fn take_trigger(&mut self) -> bool {
        std::mem::take(&mut self.triggered)
    }

    /// Forgets a port that went away.
    pub fn forget_port(&mut self, port: u32) {
        self.own.retain(|(rx, tx), _| *rx != port && *tx != port);
        for ports in self.peers.values_mut() {
            ports.remove(&port);
        }
        self.peers.retain(|_, ports| !ports.is_empty());
    }

    /// Whether frames from `mac` (a relay MAC) must not be processed or relayed.
    pub fn is_loop_mac(&self, mac: &[u8; 6]) -> bool {
        *mac == self.relay_mac || self.redundant.contains(mac)
    }

    /// The decision for the ports this relay has now.
    pub fn decide(&self, ports: &BTreeSet<u32>) -> Decision {
        let mut standby: BTreeMap<u32, u32> = BTreeMap::new();
        for &(rx, tx) in self.own.keys() {
            if ports.contains(&rx) && ports.contains(&tx) {
                *standby.entry(rx.max(tx)).or_default() |= PORT_STANDBY_SAME_SEGMENT;
            }
        }
        let active: BTreeSet<u32> =
            ports.iter().copied().filter(|p| !standby.contains_key(p)).collect();
        for (mac, seen) in &self.peers {
            let here: BTreeSet<u32> = seen.keys().copied().filter(|p| ports.contains(p)).collect();
            // A lower relay that serves every segment this one serves (through at least two
            // of its ports: otherwise there is no loop) forwards alone.
            if *mac < self.relay_mac && here.len() >= 2 && active.is_subset(&here) {
                for p in here {
                    *standby.entry(p).or_default() |= PORT_STANDBY_PEER;
                }
            }
        }
        Decision { loop_macs: self.redundant.clone(), standby }
    }
}

/// Words for a standby reason (`PORT_STANDBY_*` bits).
pub fn standby_reason(bits: u32) -> &'static str {
    if bits & relay_common::PORT_STANDBY_SAME_SEGMENT != 0 {
        "another port of this relay is on the same segment"
    } else if bits & relay_common::PORT_STANDBY_PEER != 0 {
        "a relay with a lower relay MAC serves every segment of this one"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 6] = [0x02, 0x6d, 0x63, 0, 0, 5];
    const LOWER: [u8; 6] = [0x02, 0x6d, 0x63, 0, 0, 1];
    const HIGHER: [u8; 6] = [0x02, 0x6d, 0x63, 0, 0, 9];
    const HOLD: Duration = Duration::from_secs(3);

    fn t(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn hello(mac: [u8; 6], port: u32) -> Hello {
        Hello { relay_mac: mac, port, holdtime: HOLD }
    }

    fn ports(p: &[u32]) -> BTreeSet<u32> {
        p.iter().copied().collect()
    }

    #[test]
    fn hello_round_trips() {
        let h = hello(ME, 40_000);
        let frame = build_hello([2, 0, 0, 0, 0, 1], &h);
        assert_eq!(frame.len(), 60);
        assert!(is_hello(&frame));
        assert_eq!(parse_hello(&frame), Some(h));
        let mut bad = frame.clone();
        bad[14] = b'X';
        assert_eq!(parse_hello(&bad), None);
        assert_eq!(parse_hello(&frame[..30]), None);
    }

    #[test]
    fn own_hello_on_another_port_puts_the_higher_port_in_standby() {
        let mut g = LoopGuard::new(ME, HOLD);
        g.on_hello(t(0), 7, &hello(ME, 3));
        let d = g.decide(&ports(&[3, 7, 9]));
        assert_eq!(d.standby, [(7, PORT_STANDBY_SAME_SEGMENT)].into_iter().collect());
        // The path disappears (bridge unplugged): both ports relay again after the hold time.
        g.expire(t(3_001));
        assert!(g.decide(&ports(&[3, 7, 9])).standby.is_empty());
    }

    #[test]
    fn lower_redundant_relay_forwards_alone_and_higher_takes_over_when_it_dies() {
        let mut g = LoopGuard::new(ME, HOLD);
        g.on_hello(t(0), 3, &hello(LOWER, 11));
        // One common segment only: a chain, nothing to do.
        let d = g.decide(&ports(&[3, 7]));
        assert!(d.standby.is_empty() && d.loop_macs.is_empty());
        g.on_hello(t(10), 7, &hello(LOWER, 12));
        let d = g.decide(&ports(&[3, 7]));
        assert_eq!(d.loop_macs, [LOWER].into_iter().collect());
        assert_eq!(
            d.standby,
            [(3, PORT_STANDBY_PEER), (7, PORT_STANDBY_PEER)].into_iter().collect()
        );
        // The lower relay goes silent: after the hold time this one forwards again, and its
        // MAC stays a loop MAC (its pinned dataplane may still be forwarding).
        g.expire(t(3_011));
        let d = g.decide(&ports(&[3, 7]));
        assert!(d.standby.is_empty());
        assert_eq!(d.loop_macs, [LOWER].into_iter().collect());
    }

    #[test]
    fn higher_relay_never_makes_this_one_stand_by() {
        let mut g = LoopGuard::new(ME, HOLD);
        g.on_hello(t(0), 3, &hello(HIGHER, 1));
        g.on_hello(t(0), 7, &hello(HIGHER, 2));
        let d = g.decide(&ports(&[3, 7]));
        assert!(d.standby.is_empty());
        assert!(g.is_loop_mac(&HIGHER) && g.is_loop_mac(&ME) && !g.is_loop_mac(&LOWER));
    }

    #[test]
    fn lower_relay_missing_a_segment_of_ours_does_not_make_us_stand_by() {
        let mut g = LoopGuard::new(ME, HOLD);
        g.on_hello(t(0), 3, &hello(LOWER, 1));
        g.on_hello(t(0), 7, &hello(LOWER, 2));
        // Port 9 leads to a segment the lower relay does not serve: keep forwarding (the
        // loop MAC bounds the duplicates on 3 and 7 to two copies).
        let d = g.decide(&ports(&[3, 7, 9]));
        assert!(d.standby.is_empty());
        assert_eq!(d.loop_macs, [LOWER].into_iter().collect());
    }

    #[test]
    fn new_relay_triggers_an_immediate_hello() {
        let mut g = LoopGuard::new(ME, HOLD);
        assert!(g.take_trigger(), "first hello at start");
        assert!(!g.take_trigger());
        g.on_hello(t(0), 3, &hello(LOWER, 1));
        assert!(g.take_trigger());
        g.on_hello(t(100), 3, &hello(LOWER, 1));
        assert!(!g.take_trigger(), "a known relay does not trigger");
    }
}
