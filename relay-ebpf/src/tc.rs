//! The TC (tcx ingress) variant of the forwarding program: same classifier, same maps, same
//! counters as the XDP program, copies made with `bpf_clone_redirect` to each port of the
//! group's `GROUP_TC_PORTS` array.
//!
//! Two entry points (docs/architecture.md, "The TC path"):
//! - `mcrelay_tc`, on a port attached in TC mode (L3 devices, devices without
//!   `ndo_xdp_xmit`), does everything the XDP program does: classify (an L3 device's packets
//!   start with the IP header, `TC_PORTS` says which ports are L3), loop guard (Ethernet
//!   ports), standby, policy, rate limits, counters, copies;
//! - `mcrelay_tc_handover`, behind the XDP program of the other ports, only copies the data
//!   the XDP program handed over (`XDP_PASS`) because the group has a member XDP cannot reach;
//!   everything else goes on untouched (unicast after a one-byte test, no map lookup).
//!
//! Copies to L3 ports are routed: TTL / hop limit decremented (IPv4 checksum fixed), none at
//! TTL <= 1 (`drop_ttl`). Packets from an L3 port are routed to every port, and get an Ethernet
//! header (the group's MAC, this relay's MAC as source) before the copies to Ethernet ports.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::PerCpuHashMap,
    helpers::{bpf_csum_diff, bpf_skb_change_head},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use relay_common::{
    parse::{classify, classify_ip, group_mac, Class, Data, Frame as _, ETH_HLEN},
    Config, Counter, GroupKey, PeerKey, TcPorts, UnknownPolicy, CONFIG_F_POLICY,
    CONFIG_F_RATE_GROUPS, CONFIG_F_RATE_PORTS, CONFIG_F_SOURCE_ENTRIES, MAX_TC_TARGETS, TC_PORT_L3,
    TC_TARGET_ETHERNET, TC_TARGET_L3, TC_TARGET_NO_XDP, TC_TARGET_PEER,
};
use relay_ebpf::SkbFrame;

use crate::{count, is_loop_source, is_standby, police, CONFIG, GROUP_TC_PORTS, TC_PORTS};

/// Copies sent to each per-peer target (`--per-client` on an L3 port). Key: [`PeerKey`].
/// Entries are made on a peer's first copy; the daemon removes those of peers that left.
#[btf_map]
pub(crate) static PEER_COPIES: PerCpuHashMap<PeerKey, u64, { MAX_PEER_ENTRIES }> =
    PerCpuHashMap::new();

/// Capacity of [`PEER_COPIES`].
const MAX_PEER_ENTRIES: usize = 4096;

/// Headers the classifier reads are made linear up to this many bytes.
const PULL_LEN: usize = 128;

const OK: i32 = TC_ACT_OK;
const SHOT: i32 = TC_ACT_SHOT;

/// The whole forwarding program, for a port in TC mode.
#[classifier]
pub fn mcrelay_tc(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the context the program was given.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied at once.
    let port = unsafe { TC_PORTS.get(ingress) }.copied().unwrap_or(0);
    let frame = frame(&ctx);
    let l3 = port & TC_PORT_L3 != 0;
    let class = if l3 { classify_ip(&frame) } else { classify(&frame) };
    let len = frame.len;
    let (counter, action) = match class {
        Class::NotMulticast => return OK,
        Class::Other => (Counter::PassedOther, OK),
        Class::Control => (Counter::PassedControl, OK),
        Class::LinkLocal => (Counter::PassedLinkLocal, OK),
        Class::Malformed => (Counter::Malformed, OK),
        Class::Data(data) => forward(&ctx, &frame, ingress, l3, &data),
    };
    count(ingress, counter, len);
    action
}

/// Behind the XDP program of an Ethernet port: copies the data it handed over.
#[classifier]
pub fn mcrelay_tc_handover(ctx: TcContext) -> i32 {
    let frame = frame(&ctx);
    match classify(&frame) {
        Class::Data(data) => {
            // SAFETY: reading a field of the context the program was given.
            hand_over(&ctx, unsafe { (*ctx.skb.skb).ifindex }, &data)
        }
        _ => OK,
    }
}

/// The packet, its first [`PULL_LEN`] bytes made linear when they are not.
#[inline(always)]
fn frame(ctx: &TcContext) -> SkbFrame {
    let len = ctx.len() as usize;
    let linear = ctx.data_end() - ctx.data();
    if linear < len && linear < PULL_LEN {
        let want = if len < PULL_LEN { len } else { PULL_LEN };
        let _ = ctx.pull_data(want as u32);
    }
    SkbFrame { start: ctx.data(), end: ctx.data_end(), len }
}

/// Data the XDP program of `ingress` passed because its group has a member only TC reaches
/// (the XDP program already applied the loop guard and the policing).
#[inline(always)]
fn hand_over(ctx: &TcContext, ingress: u32, data: &Data) -> i32 {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    if is_standby(&config, ingress) {
        return OK;
    }
    let Some(ports) = lookup(&config, &data.key) else { return OK };
    if ports.flags & TC_TARGET_NO_XDP == 0 {
        // Not handed over (the XDP redirect failed, or the set changed meanwhile).
        return OK;
    }
    let (counter, action) = copy(ctx, ingress, false, &config, data, ports);
    count(ingress, counter, ctx.len() as usize);
    action
}

/// Everything the XDP program does with multicast data, for a port without XDP.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    frame: &SkbFrame,
    ingress: u32,
    l3: bool,
    data: &Data,
) -> (Counter, i32) {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    if !l3 {
        let Some(source) = frame.read::<6>(6) else {
            return (Counter::Malformed, OK);
        };
        if is_loop_source(&config, source) {
            return (Counter::DropLoop, SHOT);
        }
    }
    if is_standby(&config, ingress) {
        return (Counter::DropLoop, OK);
    }
    if config.flags & (CONFIG_F_POLICY | CONFIG_F_RATE_PORTS | CONFIG_F_RATE_GROUPS) != 0 {
        if let Some(counter) = police(ingress, &config, data) {
            return (counter, SHOT);
        }
    }
    match lookup(&config, &data.key) {
        Some(ports) => copy(ctx, ingress, l3, &config, data, ports),
        // Router ports and flooding are devmaps the TC program cannot walk: groups without a
        // port set go to the local stack unless the policy is to drop them.
        None => match UnknownPolicy::from_u32(config.unknown_policy) {
            UnknownPolicy::Drop => (Counter::DropNoMembers, SHOT),
            _ => (Counter::PassedUnknown, OK),
        },
    }
}

/// The group's TC port set: (S,G) first when any exist, then (*,G).
#[inline(always)]
fn lookup(config: &Config, key: &GroupKey) -> Option<&'static TcPorts> {
    if config.flags & CONFIG_F_SOURCE_ENTRIES != 0 {
        // SAFETY: the value is only read.
        if let Some(ports) = unsafe { GROUP_TC_PORTS.get(key) } {
            return Some(ports);
        }
    }
    let any = GroupKey { group: key.group, source: [0; 16] };
    // SAFETY: as above.
    unsafe { GROUP_TC_PORTS.get(any) }
}

/// Copies the packet to every port of `ports` but `ingress`. The original is consumed (like
/// an XDP redirect, the local stack does not see relayed data).
#[inline(always)]
fn copy(
    ctx: &TcContext,
    ingress: u32,
    l3_in: bool,
    config: &Config,
    data: &Data,
    ports: &TcPorts,
) -> (Counter, i32) {
    if l3_in {
        // Routed from an L3 port: every copy crosses a routed hop.
        if decrement_hop_limit(ctx, data).is_err() {
            return (Counter::DropTtl, SHOT);
        }
        clone_to(ctx, ports, ingress, TC_TARGET_L3);
        let ethernet = ports.flags & TC_TARGET_ETHERNET != 0;
        if ports.flags & TC_TARGET_PEER != 0 {
            peer_copies(ctx, ports, ingress, data, ethernet);
        }
        if ethernet && push_ethernet(ctx, config, data).is_ok() {
            clone_to(ctx, ports, ingress, 0);
        }
        return (Counter::Forwarded, SHOT);
    }
    // Bridged copies first, as received but with this relay's MAC as source (loop guard).
    if ports.flags & TC_TARGET_ETHERNET != 0 {
        if config.relay_mac[0] != 0 {
            let _ = ctx.store(6, &config.relay_mac, 0);
        }
        clone_to(ctx, ports, ingress, 0);
    }
    if ports.flags & TC_TARGET_L3 != 0 {
        if decrement_hop_limit(ctx, data).is_err() {
            return (Counter::DropTtl, SHOT);
        }
        clone_to(ctx, ports, ingress, TC_TARGET_L3);
        if ports.flags & TC_TARGET_PEER != 0 {
            peer_copies(ctx, ports, ingress, data, false);
        }
    }
    (Counter::Forwarded, SHOT)
}

/// Clones the packet to every plain target but `ingress` whose `TC_TARGET_L3` bit is `l3`.
#[inline(always)]
fn clone_to(ctx: &TcContext, ports: &TcPorts, ingress: u32, l3: u32) {
    let count = ports.count as usize;
    let mut i = 0;
    while i < MAX_TC_TARGETS {
        if i >= count {
            break;
        }
        let target = ports.targets[i];
        if target.ifindex != ingress && target.flags & (TC_TARGET_L3 | TC_TARGET_PEER) == l3 {
            let _ = ctx.clone_redirect(target.ifindex, 0);
        }
        i += 1;
    }
}

/// One copy to each per-peer target but those of `ingress`: the destination address becomes
/// the peer's (IPv4 header and UDP checksums fixed) and the VPN sends the copy to that peer
/// alone. The hop limit was already decremented. With `restore`, the group address is put
/// back afterwards (copies without a peer address follow).
///
/// The address to replace is read back from the packet each time rather than carried in a
/// variable: the verifier then sees the same state at every turn of the loop.
#[inline(always)]
fn peer_copies(ctx: &TcContext, ports: &TcPorts, ingress: u32, data: &Data, restore: bool) {
    let udp_csum = udp_checksum_offset(ctx, data);
    let count = ports.count as usize;
    let mut i = 0;
    while i < MAX_TC_TARGETS {
        if i >= count {
            break;
        }
        let target = &ports.targets[i];
        if target.flags & TC_TARGET_PEER != 0
            && target.ifindex != ingress
            && set_destination(ctx, data, udp_csum, &target.peer).is_ok()
            && ctx.clone_redirect(target.ifindex, 0).is_ok()
        {
            count_peer_copy(target.ifindex, target.peer);
        }
        i += 1;
    }
    if restore {
        let _ = set_destination(ctx, data, udp_csum, &data.key.group);
    }
}

/// Offset of the UDP checksum when the packet is UDP (IPv6: right after the fixed header).
/// Other protocols keep their checksum as is.
#[inline(always)]
fn udp_checksum_offset(ctx: &TcContext, data: &Data) -> Option<usize> {
    let l3 = data.l3_offset;
    if data.ipv6 {
        let next: u8 = ctx.load(l3 + 6).ok()?;
        return (next == 17).then_some(l3 + 40 + 6);
    }
    let first: u8 = ctx.load(l3).ok()?;
    let protocol: u8 = ctx.load(l3 + 9).ok()?;
    (protocol == 17).then_some(l3 + usize::from(first & 0x0f) * 4 + 6)
}

/// Rewrites the destination address to `to` (IPv4-mapped for IPv4) with the checksums that
/// cover it.
#[inline(never)]
fn set_destination(
    ctx: &TcContext,
    data: &Data,
    udp_csum: Option<usize>,
    to: &[u8; 16],
) -> Result<(), ()> {
    let l3 = data.l3_offset;
    let pseudo = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
    if data.ipv6 {
        let mut old: [u8; 16] = ctx.load(l3 + 24).map_err(|_| ())?;
        let mut new = *to;
        // SAFETY: both buffers are 16 bytes on this stack, as the sizes say.
        let diff =
            unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 16, new.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        if let Some(at) = udp_csum {
            ctx.l4_csum_replace(at, 0, diff as u64, pseudo).map_err(|_| ())?;
        }
        return ctx.store(l3 + 24, to, 0).map_err(|_| ());
    }
    let from: [u8; 4] = ctx.load(l3 + 16).map_err(|_| ())?;
    let old = u64::from(u32::from_ne_bytes(from));
    let new = u64::from(u32::from_ne_bytes([to[12], to[13], to[14], to[15]]));
    if let Some(at) = udp_csum {
        ctx.l4_csum_replace(at, old, new, pseudo | 4).map_err(|_| ())?;
    }
    ctx.l3_csum_replace(l3 + 10, old, new, 4).map_err(|_| ())?;
    let address: [u8; 4] = [to[12], to[13], to[14], to[15]];
    ctx.store(l3 + 16, &address, 0).map_err(|_| ())
}

#[inline(always)]
fn count_peer_copy(ifindex: u32, peer: [u8; 16]) {
    let key = PeerKey { ifindex, peer };
    match PEER_COPIES.get_ptr_mut(key) {
        // SAFETY: a per-CPU value only this CPU writes.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = PEER_COPIES.insert(key, 1, 0);
        }
    }
}

/// Decrements the TTL (IPv4, checksum updated) or the hop limit (IPv6); `Err` when it is 1 or
/// less: the packet must not cross a routed hop.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext, data: &Data) -> Result<(), ()> {
    let l3 = data.l3_offset;
    if data.ipv6 {
        let hop_limit: u8 = ctx.load(l3 + 7).map_err(|_| ())?;
        if hop_limit <= 1 {
            return Err(());
        }
        return ctx.store(l3 + 7, &(hop_limit - 1), 0).map_err(|_| ());
    }
    // TTL and protocol: the 16-bit word the checksum covers.
    let old: [u8; 2] = ctx.load(l3 + 8).map_err(|_| ())?;
    if old[0] <= 1 {
        return Err(());
    }
    let new = [old[0] - 1, old[1]];
    ctx.l3_csum_replace(
        l3 + 10,
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
        2,
    )
    .map_err(|_| ())?;
    ctx.store(l3 + 8, &new[0], 0).map_err(|_| ())
}

/// Puts an Ethernet header in front of an IP packet from an L3 port: the group's MAC, this
/// relay's MAC as source (loop guard), the packet's EtherType.
#[inline(always)]
fn push_ethernet(ctx: &TcContext, config: &Config, data: &Data) -> Result<(), ()> {
    // SAFETY: a helper call on the program's own context.
    if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
        return Err(());
    }
    let dst = group_mac(data);
    let src = config.relay_mac;
    let ethertype: [u8; 2] = if data.ipv6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    let header: [u8; ETH_HLEN] = [
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        dst[4],
        dst[5],
        src[0],
        src[1],
        src[2],
        src[3],
        src[4],
        src[5],
        ethertype[0],
        ethertype[1],
    ];
    ctx.store(0, &header, 0).map_err(|_| ())
}
