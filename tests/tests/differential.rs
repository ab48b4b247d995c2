//! Differential test: the kernel's classifier against the host's.
//!
//! A seeded generator makes a few thousand frames (multicast data over IPv4 and IPv6, IGMP and
//! MLD built by the control plane, VLAN tags, IPv4 options, IPv6 extension-header chains,
//! link-local groups, unicast, broadcast, non-IP, Ethernet padding, truncations, changed
//! bytes and garbage). Each goes through the real XDP program with BPF_PROG_TEST_RUN and
//! through `relay_common::parse::classify` on the host; the verdict and the one counter that
//! moved must be what relay-ebpf/src/main.rs does with the host's class:
//! - not multicast: `XDP_PASS`, nothing counted;
//! - other / control / link-local / malformed: `XDP_PASS` and `passed_other`,
//!   `passed_control`, `passed_link_local` or `malformed`;
//! - data: the relay's own source MAC: `XDP_DROP` + `drop_loop`; an (S,G) or (*,G) entry for
//!   the host's key: `XDP_REDIRECT` + `forwarded`; otherwise (`--unknown drop`): `XDP_DROP` +
//!   `drop_no_members`. A few groups have entries, so the host's group and source are checked
//!   too, not only its class.
//!
//! Skipped, with the reason printed, only where BPF cannot be used (not root, or the kernel
//! refuses to load the object for lack of privileges); under CI that fails instead.

use std::{collections::BTreeMap, net::IpAddr};

use aya::programs::{TestRun as _, TestRunOptions};
use mcrelay_tests::skip_or_fail;
use relay::{
    dataplane::{Dataplane, DataplaneError},
    groups::group_key,
    membership::packet::{
        build, GroupRecord, Message, MessageKind, Query, QueryVersion, RecordType,
    },
};
use relay_common::{
    frames::{
        dest_opts, fragment, hop_by_hop_router_alert, ipv6, mac_v4, mac_v6, udp, FrameBuilder,
    },
    parse::{classify, Class, ETH_HLEN},
    v4_mapped, AttachMode, Counter, GroupKey, PortCounters, UnknownPolicy,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// Loopback: exists in every network namespace, so the kernel accepts it as ingress device.
const INGRESS: u32 = 1;
/// Frames in the corpus.
const FRAMES: usize = 4000;
const SEED: u64 = 0x6d63_7265_6c61_7921;
/// BPF_PROG_TEST_RUN takes XDP frames of at least an Ethernet header and at most a page less
/// headroom and shared info; stay well inside.
const MAX_FRAME: usize = 3000;

/// Groups with a (*,G) entry.
const G4: [u8; 4] = [239, 1, 1, 1];
const G6: [u8; 16] = [0xff, 0x3e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
/// Groups with an (S,G) entry for source S4 / S6 only.
const SG4: [u8; 4] = [239, 2, 2, 2];
const SG6: [u8; 16] = [0xff, 0x1e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2];
const S4: [u8; 4] = [10, 0, 0, 9];
const S6: [u8; 16] = [0xfd, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
/// Groups and sources without entries.
const NONE4: [u8; 4] = [239, 9, 9, 9];
const NONE6: [u8; 16] = [0xff, 0x0e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 9];
const OTHER_S4: [u8; 4] = [10, 0, 0, 1];
const OTHER_S6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// Fewer than `n` random bytes.
    fn bytes_below(&mut self, n: usize) -> Vec<u8> {
        let len = self.below(n);
        self.bytes(len)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.iter_mut().for_each(|b| *b = self.byte());
        a
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn v4_group(rng: &mut Rng) -> [u8; 4] {
    match rng.below(6) {
        0 => G4,
        1 => SG4,
        2 => NONE4,
        3 => [224, 0, 0, rng.byte()],
        4 => [224, 0, 1, rng.byte()],
        _ => [224 | (rng.byte() & 0x0f), rng.byte(), rng.byte(), rng.byte()],
    }
}

fn v6_group(rng: &mut Rng) -> [u8; 16] {
    match rng.below(5) {
        0 => G6,
        1 => SG6,
        2 => NONE6,
        _ => {
            let mut g: [u8; 16] = rng.array();
            g[0] = 0xff;
            g
        }
    }
}

fn v4_source(rng: &mut Rng) -> [u8; 4] {
    match rng.below(3) {
        0 => S4,
        1 => OTHER_S4,
        _ => rng.array(),
    }
}

fn v6_source(rng: &mut Rng) -> [u8; 16] {
    match rng.below(3) {
        0 => S6,
        1 => OTHER_S6,
        _ => rng.array(),
    }
}

/// An IPv4 packet with `option_words` words of options (a router alert, then NOPs).
fn ipv4_with_options(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    option_words: usize,
    l4: &[u8],
) -> Vec<u8> {
    let header = 20 + 4 * option_words;
    let mut p = vec![0x40 | (header / 4) as u8, 0];
    p.extend_from_slice(&((header + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    if option_words > 0 {
        p.extend_from_slice(&[0x94, 0x04, 0, 0]);
        p.resize(header, 1);
    }
    p.extend_from_slice(l4);
    p
}

/// Adds 0 to 3 VLAN tags (a third one is beyond what either side parses).
fn with_tags(rng: &mut Rng, mut builder: FrameBuilder) -> FrameBuilder {
    let tags = match rng.below(10) {
        0..=5 => 0,
        6 | 7 => 1,
        8 => 2,
        _ => 3,
    };
    for vid in 0..tags {
        builder = builder.vlan(rng.pick(&[0x8100, 0x88a8]), vid + 1);
    }
    builder
}

fn data_v4(rng: &mut Rng) -> Vec<u8> {
    let (src, group) = (v4_source(rng), v4_group(rng));
    let proto = rng.pick(&[17, 17, 6, 103, 2]);
    let options = if rng.chance(20) { 1 + rng.below(10) } else { 0 };
    let payload = rng.bytes_below(64);
    let l4 = udp(5000, 5001, &payload);
    let ip = ipv4_with_options(src, group, proto, options, &l4);
    with_tags(rng, FrameBuilder::new(mac_v4(group), 0x0800, ip)).build()
}

/// An IPv6 extension header of any kind the walk knows (or a large one).
fn extension_header(rng: &mut Rng) -> (u8, Vec<u8>) {
    match rng.below(8) {
        0 | 1 => hop_by_hop_router_alert(),
        2 | 3 => dest_opts(rng.below(4) as u8),
        4 => fragment(if rng.chance(60) { 0 } else { 1 + rng.below(1000) as u16 }),
        5 => {
            // Routing header, type 0 segments left 0.
            let units = rng.below(3);
            let mut b = vec![0u8; 8 * (units + 1)];
            b[1] = units as u8;
            (43, b)
        }
        6 => {
            // Authentication header: length in 4-byte units minus 2.
            let units = 1 + rng.below(4);
            let mut b = vec![0u8; 4 * (units + 2)];
            b[1] = units as u8;
            (51, b)
        }
        _ => dest_opts(60 + rng.below(196) as u8),
    }
}

fn data_v6(rng: &mut Rng) -> Vec<u8> {
    let (src, group) = (v6_source(rng), v6_group(rng));
    let headers = match rng.below(10) {
        0..=3 => 0,
        4..=7 => 1 + rng.below(5),
        _ => 6 + rng.below(3),
    };
    let ext: Vec<_> = (0..headers).map(|_| extension_header(rng)).collect();
    let (proto, l4) = match rng.below(6) {
        0 => {
            let mut icmp = vec![rng.pick(&[128, 129, 130, 131, 132, 143, 151, 135])];
            icmp.extend(rng.bytes_below(24));
            (58, icmp)
        }
        1 => (59, Vec::new()),
        2 => (6, rng.bytes(20)),
        _ => (17, udp(5000, 5001, &rng.bytes_below(64))),
    };
    let ip = ipv6(src, group, &ext, proto, &l4);
    with_tags(rng, FrameBuilder::new(mac_v6(group), 0x86dd, ip)).build()
}

fn link_local_v6() -> [u8; 16] {
    [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
}

/// IGMP, MLD, PIM hellos and router advertisements as the control plane builds them.
fn control(rng: &mut Rng) -> Vec<u8> {
    let v4 = rng.chance(50);
    let group = if v4 { IpAddr::from(v4_group(rng)) } else { IpAddr::from(v6_group(rng)) };
    let source = if v4 { IpAddr::from(v4_source(rng)) } else { IpAddr::from(link_local_v6()) };
    let query = |version| Query {
        version,
        group: Some(group),
        max_resp: std::time::Duration::from_secs(10),
        suppress: false,
        qrv: 0,
        qqi: std::time::Duration::ZERO,
        sources: Vec::new(),
    };
    let kind = match rng.below(7) {
        0 => MessageKind::Query(query(if v4 { QueryVersion::IgmpV2 } else { QueryVersion::MldV1 })),
        1 => MessageKind::Query(Query {
            qrv: 2,
            qqi: std::time::Duration::from_secs(125),
            sources: vec![source],
            ..query(if v4 { QueryVersion::IgmpV3 } else { QueryVersion::MldV2 })
        }),
        2 => MessageKind::V2Report { group },
        3 => MessageKind::Leave { group },
        4 => MessageKind::V3Report {
            records: vec![GroupRecord { kind: RecordType::IsExclude, group, sources: vec![] }],
        },
        5 => MessageKind::PimHello,
        _ => MessageKind::RouterAdvertisement,
    };
    let frame = build([0x02, 0, 0, 0, 0, 1], &Message { source, kind }).expect("build control");
    let builder = FrameBuilder::new(
        frame[..6].try_into().expect("MAC"),
        u16::from_be_bytes([frame[12], frame[13]]),
        frame[14..].to_vec(),
    );
    with_tags(rng, builder).build()
}

/// Unicast, broadcast and non-IP frames, and IP to a unicast address behind a multicast MAC.
fn not_multicast_data(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => {
            let mut f = data_v4(rng);
            f[0] &= 0xfe;
            f
        }
        1 => {
            let mut f = data_v6(rng);
            f[..6].copy_from_slice(&[0xff; 6]);
            f
        }
        2 => FrameBuilder::new([0xff; 6], 0x0806, rng.bytes(28)).build(),
        3 => {
            let ethertype = rng.pick(&[0x88cc, 0x8809, 0x0806, 0x88f7, 0x1234]);
            let dst =
                rng.pick(&[[0x01, 0x80, 0xc2, 0, 0, 0x0e], [0x01, 0x00, 0x0c, 0xcc, 0xcc, 0xcc]]);
            let body = rng.bytes(46);
            with_tags(rng, FrameBuilder::new(dst, ethertype, body)).build()
        }
        _ => {
            let ip = ipv4_with_options(OTHER_S4, [10, 0, 0, 2], 17, 0, &udp(1, 2, b"x"));
            FrameBuilder::new(mac_v4(G4), 0x0800, ip).build()
        }
    }
}

/// Any frame of the kinds above, by name.
fn valid(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    match rng.below(10) {
        0..=2 => ("data-v4", data_v4(rng)),
        3..=5 => ("data-v6", data_v6(rng)),
        6 | 7 => ("control", control(rng)),
        _ => ("not-multicast-data", not_multicast_data(rng)),
    }
}

/// The corpus: valid frames, and the same cut short, padded, changed, looped back; garbage.
fn corpus(relay_mac: [u8; 6]) -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = Rng(SEED);
    let mut frames = Vec::with_capacity(FRAMES);
    while frames.len() < FRAMES {
        let (kind, mut f) = valid(&mut rng);
        let frame = match rng.below(20) {
            0..=8 => (kind, f),
            9..=11 => {
                f.truncate(ETH_HLEN + rng.below(f.len() - ETH_HLEN + 1));
                ("truncated", f)
            }
            12 => {
                let padding = rng.below(40);
                f.extend(std::iter::repeat_n(0, padding));
                ("padded", f)
            }
            13..=16 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(f.len());
                    f[i] = rng.byte();
                }
                ("changed", f)
            }
            17 => {
                f[6..12].copy_from_slice(&relay_mac);
                ("looped", f)
            }
            _ => {
                let len = ETH_HLEN + rng.below(300);
                let mut g = rng.bytes(len);
                if rng.chance(70) {
                    g[0] |= 1;
                }
                if rng.chance(50) {
                    g[12..14].copy_from_slice(rng.pick(&[
                        &[0x08, 0x00],
                        &[0x86, 0xdd],
                        &[0x81, 0x00],
                    ]));
                }
                ("garbage", g)
            }
        };
        if frame.1.len() >= ETH_HLEN && frame.1.len() <= MAX_FRAME {
            frames.push(frame);
        }
    }
    frames
}

/// The verdict and counter relay-ebpf's `mcrelay_xdp` must produce for a frame of class
/// `class` (see the module doc).
fn expected(
    class: &Class,
    frame: &[u8],
    relay_mac: [u8; 6],
    entries: &[GroupKey],
) -> (u32, Option<Counter>) {
    match class {
        Class::NotMulticast => (XDP_PASS, None),
        Class::Other => (XDP_PASS, Some(Counter::PassedOther)),
        Class::Control => (XDP_PASS, Some(Counter::PassedControl)),
        Class::LinkLocal => (XDP_PASS, Some(Counter::PassedLinkLocal)),
        Class::Malformed => (XDP_PASS, Some(Counter::Malformed)),
        Class::Data(data) => {
            let star_g = GroupKey { group: data.key.group, source: [0; 16] };
            if frame[6..12] == relay_mac {
                (XDP_DROP, Some(Counter::DropLoop))
            } else if entries.contains(&data.key) || entries.contains(&star_g) {
                (XDP_REDIRECT, Some(Counter::Forwarded))
            } else {
                (XDP_DROP, Some(Counter::DropNoMembers))
            }
        }
    }
}

fn action_name(action: u32) -> &'static str {
    match action {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "other action",
    }
}

fn class_name(class: &Class) -> &'static str {
    match class {
        Class::NotMulticast => "not-multicast",
        Class::Other => "other",
        Class::Control => "control",
        Class::LinkLocal => "link-local",
        Class::Data(_) => "data",
        Class::Malformed => "malformed",
    }
}

/// The counter that moved between two snapshots (by one packet of `len` bytes), `None` when
/// none did; panics when several did or by other amounts.
fn moved(before: &PortCounters, after: &PortCounters, len: usize) -> Option<Counter> {
    let changed: Vec<(Counter, u64, u64)> = Counter::ALL
        .iter()
        .map(|&c| {
            let i = c as usize;
            (c, after.packets[i] - before.packets[i], after.bytes[i] - before.bytes[i])
        })
        .filter(|&(_, packets, bytes)| packets != 0 || bytes != 0)
        .collect();
    match changed.as_slice() {
        [] => None,
        [(counter, 1, bytes)] if *bytes == len as u64 => Some(*counter),
        other => panic!("counters moved unexpectedly: {other:?}"),
    }
}

/// The dataplane with `--unknown drop`, the loopback as its one port and the group entries
/// the corpus aims at; `None` (reason printed) where BPF cannot be used.
fn dataplane() -> Option<(Dataplane, Vec<GroupKey>)> {
    if !nix::unistd::Uid::effective().is_root() {
        skip_or_fail(
            "the differential test needs root (BPF_PROG_TEST_RUN: CAP_BPF, CAP_NET_ADMIN)",
        );
        return None;
    }
    let mut dp = match Dataplane::load(None, UnknownPolicy::Drop) {
        Ok(dp) => dp,
        Err(DataplaneError::Permission(reason)) => {
            skip_or_fail(&format!("the kernel refuses to load the eBPF object: {reason}"));
            return None;
        }
        Err(e) => panic!("loading the eBPF object: {e}"),
    };
    dp.register_port(INGRESS, "lo", AttachMode::Skb).expect("register port");
    let entries = vec![
        group_key(IpAddr::from(G4)),
        group_key(IpAddr::from(G6)),
        GroupKey { group: v4_mapped(SG4), source: v4_mapped(S4) },
        GroupKey { group: SG6, source: S6 },
    ];
    for key in &entries {
        dp.set_group(*key, &[INGRESS]).expect("set group");
    }
    Some((dp, entries))
}

fn run(dp: &mut Dataplane, frame: &[u8]) -> u32 {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, frame.len() as u32, 0, INGRESS, 0, 0];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(bytemuck::cast_slice(&md));
    let prog = dp.program_mut().expect("program");
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

#[test]
fn kernel_and_host_classifiers_agree_on_a_generated_corpus() {
    let Some((mut dp, entries)) = dataplane() else { return };
    let relay_mac = dp.relay_mac();
    let frames = corpus(relay_mac);
    let mut by_class: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut disagreements = Vec::new();
    for (kind, frame) in &frames {
        let class = classify(&frame.as_slice());
        let want = expected(&class, frame, relay_mac, &entries);
        let before = dp.counters(INGRESS).expect("counters");
        let verdict = run(&mut dp, frame);
        let after = dp.counters(INGRESS).expect("counters");
        let got = (verdict, moved(&before, &after, frame.len()));
        *by_class.entry(class_name(&class)).or_default() += 1;
        *by_kind.entry(kind).or_default() += 1;
        let counter = got.1.map_or("uncounted", Counter::name);
        *by_outcome.entry(format!("{} {counter}", action_name(verdict))).or_default() += 1;
        if got != want {
            disagreements.push(format!(
                "{kind} frame, host {class:?} -> expected {want:?}, kernel {got:?}: {frame:02x?}"
            ));
        }
    }
    println!("differential: {} frames, seed {SEED:#x}", frames.len());
    println!("  by host class: {by_class:?}");
    println!("  by generator:  {by_kind:?}");
    println!("  by kernel verdict and counter: {by_outcome:?}");
    assert!(
        disagreements.is_empty(),
        "{} of {} frames disagree; the first ones:\n{}",
        disagreements.len(),
        frames.len(),
        disagreements.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    for class in ["not-multicast", "other", "control", "link-local", "data", "malformed"] {
        assert!(
            by_class.get(class).copied().unwrap_or(0) >= 20,
            "too few {class} frames: {by_class:?}"
        );
    }
}
