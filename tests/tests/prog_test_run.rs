//! BPF_PROG_TEST_RUN on the real object: crafted frames in, verdicts and counters out.
//!
//! Each test loads its own instance of the object (no pins), writes the maps through the same
//! `Dataplane` code the daemon uses, and runs the XDP program with an `xdp_md` whose ingress
//! ifindex is the loopback device (1), registered as a port so its counters exist.

use std::net::IpAddr;

use aya::programs::{TestRun as _, TestRunOptions};
use relay::{dataplane::Dataplane, groups::group_key, reconciler::GroupWriter as _};
use relay_common::{
    frames::*,
    parse::{ETH_HLEN, IPV6_HLEN},
    AttachMode, Counter, PortCounters, UnknownPolicy, COUNTER_COUNT,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// Loopback: exists in every network namespace, so the kernel accepts it as ingress device.
const INGRESS: u32 = 1;

const SRC4: [u8; 4] = [10, 0, 0, 1];
const G4: [u8; 4] = [239, 1, 1, 1];
const OTHER4: [u8; 4] = [239, 9, 9, 9];
const SRC6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const G6: [u8; 16] = [0xff, 0x3e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];

struct Harness {
    dp: Dataplane,
}

impl Harness {
    /// Loads the object; `None` when the kernel or privileges do not allow it (test skipped
    /// with the reason printed).
    fn new() -> Option<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP: BPF_PROG_TEST_RUN tests need root (CAP_BPF + CAP_NET_ADMIN)");
            return None;
        }
        let mut dp = Dataplane::load(None, UnknownPolicy::RouterPorts).expect("load object");
        dp.register_port(INGRESS, "lo", AttachMode::Skb).expect("register port");
        Some(Self { dp })
    }

    fn with_group(mut self, group: IpAddr) -> Self {
        // The port set only has to name existing devices: loopback again.
        self.dp.set_group(group_key(group), &[INGRESS]).expect("set group");
        self
    }

    fn run(&mut self, frame: &[u8]) -> u32 {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let md: [u32; 6] = [0, frame.len() as u32, 0, INGRESS, 0, 0];
        let ctx: &[u8] = bytemuck::cast_slice(&md);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(ctx);
        let prog = self.dp.program_mut().expect("program");
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    fn counters(&self) -> PortCounters {
        self.dp.counters(INGRESS).expect("counters")
    }

    /// Runs `frame`, asserts the verdict and that exactly `counter` moved by one (or nothing
    /// moved for `None`), with the frame's length in bytes.
    fn expect(&mut self, frame: &[u8], verdict: u32, counter: Option<Counter>) {
        let before = self.counters();
        let got = self.run(frame);
        let after = self.counters();
        assert_eq!(got, verdict, "verdict for frame {frame:02x?}");
        for c in relay_common::Counter::ALL {
            let i = c as usize;
            let (dp, db) = (after.packets[i] - before.packets[i], after.bytes[i] - before.bytes[i]);
            if Some(c) == counter {
                assert_eq!(
                    (dp, db),
                    (1, frame.len() as u64),
                    "counter {} for {frame:02x?}",
                    c.name()
                );
            } else {
                assert_eq!((dp, db), (0, 0), "counter {} moved for {frame:02x?}", c.name());
            }
        }
    }
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}

fn v6(a: [u8; 16]) -> IpAddr {
    IpAddr::from(a)
}

#[test]
fn ipv4_multicast_with_port_set_is_redirected() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4));
    h.expect(&udp4_frame(SRC4, G4, b"data").build(), XDP_REDIRECT, Some(Counter::Forwarded));
}

#[test]
fn ipv6_multicast_with_port_set_is_redirected() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v6(G6));
    h.expect(&udp6_frame(SRC6, G6, b"data").build(), XDP_REDIRECT, Some(Counter::Forwarded));
}

#[test]
fn multicast_without_port_set_follows_unknown_policy() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4));
    let other = udp4_frame(SRC4, OTHER4, b"data").build();
    let other6 =
        udp6_frame(SRC6, [0xff, 0x3e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2], b"d").build();
    // Default: router ports; none known yet, so the stack gets it.
    h.expect(&other, XDP_PASS, Some(Counter::PassedUnknown));
    h.expect(&other6, XDP_PASS, Some(Counter::PassedUnknown));
    h.dp.set_unknown_policy(UnknownPolicy::Drop).expect("policy");
    h.expect(&other, XDP_DROP, Some(Counter::DropNoMembers));
    h.dp.set_unknown_policy(UnknownPolicy::Flood).expect("policy");
    h.expect(&other, XDP_REDIRECT, Some(Counter::Forwarded));
}

#[test]
fn removing_a_group_stops_forwarding() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4));
    let f = udp4_frame(SRC4, G4, b"data").build();
    h.expect(&f, XDP_REDIRECT, Some(Counter::Forwarded));
    h.dp.set_group(group_key(v4(G4)), &[]).expect("remove");
    h.expect(&f, XDP_PASS, Some(Counter::PassedUnknown));
}

#[test]
fn unicast_and_broadcast_pass_untouched_and_uncounted() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4));
    let mut unicast = udp4_frame(SRC4, G4, b"data").build();
    unicast[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    h.expect(&unicast, XDP_PASS, None);
    let mut broadcast = unicast.clone();
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    h.expect(&broadcast, XDP_PASS, None);
    // ARP request: broadcast, not IP.
    let arp = FrameBuilder::new([0xff; 6], 0x0806, vec![0; 28]).build();
    h.expect(&arp, XDP_PASS, None);
}

#[test]
fn non_ip_to_a_multicast_mac_is_passed_as_other() {
    let Some(mut h) = Harness::new() else { return };
    let lldp = FrameBuilder::new([0x01, 0x80, 0xc2, 0, 0, 0x0e], 0x88cc, vec![0; 46]).build();
    h.expect(&lldp, XDP_PASS, Some(Counter::PassedOther));
}

#[test]
fn igmp_and_mld_go_to_the_stack_even_for_groups_with_ports() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4)).with_group(v6(G6));
    h.expect(&igmp_v2_report(SRC4, G4).build(), XDP_PASS, Some(Counter::PassedControl));
    h.expect(&mldv2_report(SRC6).build(), XDP_PASS, Some(Counter::PassedControl));
    h.expect(&mldv1_report(SRC6, G6).build(), XDP_PASS, Some(Counter::PassedControl));
}

#[test]
fn link_local_groups_go_to_the_stack() {
    let Some(mut h) = Harness::new() else { return };
    h.expect(
        &udp4_frame(SRC4, [224, 0, 0, 251], b"mdns").build(),
        XDP_PASS,
        Some(Counter::PassedLinkLocal),
    );
    let mut ff02 = [0u8; 16];
    ff02[0] = 0xff;
    ff02[1] = 0x02;
    ff02[15] = 0xfb;
    h.expect(&udp6_frame(SRC6, ff02, b"mdns").build(), XDP_PASS, Some(Counter::PassedLinkLocal));
}

/// Tagged data belongs to its VLAN (a trunk port): passed to the stack, never relayed to the
/// untagged ports, even for a group that has ports; tagged IGMP is still control.
#[test]
fn vlan_and_qinq_tagged_multicast_is_passed_not_relayed() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4)).with_group(v6(G6));
    for frame in [
        udp4_frame(SRC4, G4, b"d").vlan(0x8100, 10).build(),
        udp4_frame(SRC4, G4, b"d").vlan(0x88a8, 100).vlan(0x8100, 10).build(),
        udp6_frame(SRC6, G6, b"d").vlan(0x88a8, 100).vlan(0x8100, 10).build(),
    ] {
        h.expect(&frame, XDP_PASS, Some(Counter::PassedOther));
    }
    h.expect(
        &igmp_v2_report(SRC4, G4).vlan(0x8100, 10).build(),
        XDP_PASS,
        Some(Counter::PassedControl),
    );
    // The same data untagged is relayed.
    h.expect(&udp4_frame(SRC4, G4, b"d").build(), XDP_REDIRECT, Some(Counter::Forwarded));
}

#[test]
fn ipv6_with_extension_headers() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v6(G6));
    let data = FrameBuilder::new(
        mac_v6(G6),
        0x86dd,
        ipv6(
            SRC6,
            G6,
            &[hop_by_hop_router_alert(), dest_opts(3), fragment(0)],
            17,
            &udp(1, 2, b"x"),
        ),
    )
    .build();
    h.expect(&data, XDP_REDIRECT, Some(Counter::Forwarded));
    let mld = FrameBuilder::new(
        mac_v6(G6),
        0x86dd,
        ipv6(SRC6, G6, &[hop_by_hop_router_alert(), dest_opts(1)], 58, &[131, 0, 0, 0, 0, 0, 0, 0]),
    )
    .build();
    h.expect(&mld, XDP_PASS, Some(Counter::PassedControl));
    let ext: Vec<_> =
        (0..relay_common::parse::MAX_IPV6_EXT_HEADERS + 1).map(|_| dest_opts(0)).collect();
    let too_deep =
        FrameBuilder::new(mac_v6(G6), 0x86dd, ipv6(SRC6, G6, &ext, 17, &udp(1, 2, b"x"))).build();
    h.expect(&too_deep, XDP_PASS, Some(Counter::Malformed));
}

/// Cuts valid frames at every header boundary (and inside headers): the kernel program must
/// pass them to the stack as malformed, exactly like the host parser says.
#[test]
fn truncated_frames_are_passed_as_malformed() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4)).with_group(v6(G6));
    let ext6 = FrameBuilder::new(
        mac_v6(G6),
        0x86dd,
        ipv6(SRC6, G6, &[hop_by_hop_router_alert(), dest_opts(1)], 17, &udp(1, 2, b"abcdefgh")),
    )
    .build();
    let cases: Vec<(Vec<u8>, Vec<usize>)> = vec![
        // Ethernet | IPv4 | UDP | payload. (The kernel refuses test frames shorter than an
        // Ethernet header with EINVAL, as drivers never hand XDP less.)
        (
            udp4_frame(SRC4, G4, b"abcdefgh").build(),
            vec![ETH_HLEN, ETH_HLEN + 19, ETH_HLEN + 20, ETH_HLEN + 28],
        ),
        // Ethernet | 802.1ad | 802.1Q | IPv4
        (
            udp4_frame(SRC4, G4, b"abcdefgh").vlan(0x88a8, 1).vlan(0x8100, 2).build(),
            vec![
                ETH_HLEN,
                ETH_HLEN + 2,
                ETH_HLEN + 4,
                ETH_HLEN + 6,
                ETH_HLEN + 8,
                ETH_HLEN + 27,
                ETH_HLEN + 28,
            ],
        ),
        // Ethernet | IPv6 | UDP
        (
            udp6_frame(SRC6, G6, b"abcdefgh").build(),
            vec![ETH_HLEN, ETH_HLEN + 39, ETH_HLEN + IPV6_HLEN, ETH_HLEN + IPV6_HLEN + 8],
        ),
        // Ethernet | IPv6 | hop-by-hop | dest opts | UDP
        (
            ext6.clone(),
            vec![
                ETH_HLEN + IPV6_HLEN,
                ETH_HLEN + IPV6_HLEN + 1,
                ETH_HLEN + IPV6_HLEN + 8,
                ETH_HLEN + IPV6_HLEN + 20,
                ETH_HLEN + IPV6_HLEN + 24,
            ],
        ),
        (igmp_v2_report(SRC4, G4).build(), vec![ETH_HLEN + 20, ETH_HLEN + 24]),
        (
            mldv2_report(SRC6).build(),
            vec![ETH_HLEN + IPV6_HLEN, ETH_HLEN + IPV6_HLEN + 8, ETH_HLEN + IPV6_HLEN + 9],
        ),
    ];
    for (frame, cuts) in cases {
        for cut in cuts {
            let short = &frame[..cut];
            h.expect(short, XDP_PASS, Some(Counter::Malformed));
        }
        // And every other length too, for the verdict (counters checked above).
        for cut in ETH_HLEN..frame.len() {
            assert_eq!(h.run(&frame[..cut]), XDP_PASS, "cut at {cut}");
        }
    }
}

#[test]
fn counters_accumulate_bytes_per_reason() {
    let Some(h) = Harness::new() else { return };
    let mut h = h.with_group(v4(G4));
    let small = udp4_frame(SRC4, G4, b"a").build();
    let large = udp4_frame(SRC4, G4, &[7u8; 1000]).build();
    for _ in 0..3 {
        h.run(&small);
    }
    h.run(&large);
    let c = h.counters();
    assert_eq!(c.packets(Counter::Forwarded), 4);
    assert_eq!(c.bytes[Counter::Forwarded as usize], 3 * small.len() as u64 + large.len() as u64);
    assert_eq!(c.packets.iter().sum::<u64>(), 4);
    assert_eq!(COUNTER_COUNT, Counter::ALL.len());
}

/// A dummy device with a chosen ifindex, removed on drop.
struct Dummy(String);

impl Dummy {
    /// A dummy device with the first free ifindex of `candidates`.
    fn with_index(candidates: impl Iterator<Item = u32>) -> Option<(Self, u32)> {
        let name = format!("mcrslot{}", std::process::id());
        for index in candidates {
            let ok = std::process::Command::new("ip")
                .args(["link", "add", "name", &name, "index", &index.to_string(), "type", "dummy"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Some((Self(name), index));
            }
        }
        None
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn a_port_whose_counter_slot_is_taken_is_counted_apart() {
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    // Another port takes the `PORT_STATS` slot of loopback first.
    let slots = relay_common::PORT_SLOTS;
    let Some((_dummy, other)) = Dummy::with_index((1..64).map(|k| INGRESS + k * slots)) else {
        eprintln!("SKIP: no free ifindex for a dummy device");
        return;
    };
    assert_eq!(relay_common::port_slot(other), relay_common::port_slot(INGRESS));
    let mut dp = Dataplane::load(None, UnknownPolicy::RouterPorts).expect("load object");
    dp.register_port(other, "other", AttachMode::Skb).expect("register the other port");
    dp.register_port(INGRESS, "lo", AttachMode::Skb).expect("register port");
    let mut h = Harness { dp }.with_group(v4(G4));
    h.expect(&udp4_frame(SRC4, G4, b"x").build(), XDP_REDIRECT, Some(Counter::Forwarded));
    h.expect(&udp4_frame(SRC4, OTHER4, b"x").build(), XDP_PASS, Some(Counter::PassedUnknown));
    let theirs = h.dp.counters(other).expect("counters of the other port");
    assert_eq!(theirs.packets.iter().sum::<u64>(), 0, "counted in the other port's slot");
}

#[test]
fn source_specific_entries_are_looked_up_first() {
    let Some(mut h) = Harness::new() else { return };
    let s1 = [10, 0, 0, 1];
    let s2 = [10, 0, 0, 2];
    let mut sg = group_key(v4(G4));
    sg.source = relay_common::v4_mapped(s1);
    h.dp.set_group(sg, &[INGRESS]).expect("set (S,G)");
    h.expect(&udp4_frame(s1, G4, b"x").build(), XDP_REDIRECT, Some(Counter::Forwarded));
    // Another source of the same group has no entry and no (*,G): unknown.
    h.expect(&udp4_frame(s2, G4, b"x").build(), XDP_PASS, Some(Counter::PassedUnknown));
    // Removing the last (S,G) entry leaves nothing for s1 either.
    h.dp.set_group(sg, &[]).expect("remove (S,G)");
    h.expect(&udp4_frame(s1, G4, b"x").build(), XDP_PASS, Some(Counter::PassedUnknown));
    // IPv6 too.
    let mut sg6 = group_key(v6(G6));
    sg6.source = SRC6;
    h.dp.set_group(sg6, &[INGRESS]).expect("set (S,G)");
    h.expect(&udp6_frame(SRC6, G6, b"x").build(), XDP_REDIRECT, Some(Counter::Forwarded));
}

#[test]
fn unknown_groups_go_to_router_ports_when_there_are_some() {
    let Some(mut h) = Harness::new() else { return };
    let f = udp4_frame(SRC4, OTHER4, b"x").build();
    h.expect(&f, XDP_PASS, Some(Counter::PassedUnknown));
    h.dp.set_router_ports(&[INGRESS]).expect("router ports");
    h.expect(&f, XDP_REDIRECT, Some(Counter::Forwarded));
    h.dp.set_router_ports(&[]).expect("router ports");
    h.expect(&f, XDP_PASS, Some(Counter::PassedUnknown));
}
