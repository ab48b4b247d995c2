//! The TC (tcx ingress) variant of the forwarding program: same classifier, same maps, same
//! counters as the XDP program, copies made with `bpf_clone_redirect` to each port of the
//! group's `GROUP_TC_PORTS` array.
//!
//! Three entry points (docs/architecture.md, "The TC path"):
//! - `mcrelay_tc`, on an Ethernet port attached in TC mode (devices without `ndo_xdp_xmit`,
//!   routed `--l3` ports), does everything the XDP program does: classify, loop guard,
//!   standby, policy, rate limits, counters, copies;
//! - `mcrelay_tc_l3`, the same for L3 devices (tun, WireGuard: packets start with the IP
//!   header); a twin so that the verifier walks one classifier per program;
//! - `mcrelay_tc_handover`, behind the XDP program of the other ports, only copies the data
//!   the XDP program handed over (`XDP_PASS`) because the group has a member XDP cannot reach;
//!   everything else goes on untouched (unicast after a one-byte test, no map lookup).
//!
//! Copies to L3 ports, routed (`--l3`) ports and peers are routed: TTL / hop limit
//! decremented once (IPv4 checksum fixed), none at TTL <= 1 (`drop_ttl`); bridged copies keep
//! what they came with. Packets from a routed port are routed to every port; those from an L3
//! port get an Ethernet header (the group's MAC, this relay's MAC as source) first when some
//! target needs one. The copies are made by `bpf_loop` passes over the group's targets; the
//! classifier, the policing and the forwarding are subprograms of their own (the verifier's
//! instruction budget and the 512 bytes of stack along a call chain: see "Fitting the
//! verifier" in docs/architecture.md).

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::PerCpuHashMap,
    cty::c_void,
    helpers::{bpf_csum_diff, bpf_loop, bpf_skb_change_head},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use relay_common::{
    parse::{classify, classify_ip, group_mac, Class, Data, Frame as _, ETH_HLEN},
    Config, Counter, GroupKey, PeerKey, TcPorts, UnknownPolicy, CONFIG_F_POLICY,
    CONFIG_F_RATE_GROUPS, CONFIG_F_RATE_PORTS, CONFIG_F_SOURCE_ENTRIES, MAX_TC_TARGETS,
    TC_FLOOD_KEY, TC_PORT_ROUTED, TC_ROUTERS_KEY, TC_TARGET_ETHERNET, TC_TARGET_L3,
    TC_TARGET_NO_XDP, TC_TARGET_PEER, TC_TARGET_ROUTED,
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

/// The whole forwarding program, for an Ethernet port in TC mode.
#[classifier]
pub fn mcrelay_tc(ctx: TcContext) -> i32 {
    tc_mode(&ctx, false)
}

/// The whole forwarding program, for an L3 port (tun, WireGuard: packets start with the IP
/// header). A program of its own: `l3` is then a constant, and the verifier walks one
/// classifier per program.
#[classifier]
pub fn mcrelay_tc_l3(ctx: TcContext) -> i32 {
    tc_mode(&ctx, true)
}

/// Classify, count, and forward multicast data through [`forward_out`].
#[inline(always)]
fn tc_mode(ctx: &TcContext, l3: bool) -> i32 {
    // SAFETY: reading a field of the context the program was given.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let frame = frame(ctx);
    // An L3 port is always routed: only Ethernet ports look up whether they are (`--l3`).
    // SAFETY: the value is copied at once.
    let routed = l3 || unsafe { TC_PORTS.get(ingress) }.is_some_and(|p| p & TC_PORT_ROUTED != 0);
    let mut out = DataOut::default();
    let class = classify_out(&frame, u32::from(l3), &mut out);
    let len = frame.len;
    let (counter, action) = match class {
        CLASS_NOT_MULTICAST => return OK,
        CLASS_OTHER => (Counter::PassedOther, OK),
        CLASS_CONTROL => (Counter::PassedControl, OK),
        CLASS_LINK_LOCAL => (Counter::PassedLinkLocal, OK),
        CLASS_DATA => {
            let done =
                forward_out(ctx, &frame, ingress, u32::from(l3) | u32::from(routed) << 1, &out);
            (counter_of(done >> 32), done as u32 as i32)
        }
        _ => (Counter::Malformed, OK),
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

/// [`Data`] as [`classify_out`] hands it over (plain fields: the kernel refuses the BTF of a
/// Rust enum or `bool` in a function's signature).
#[repr(C)]
#[derive(Default)]
struct DataOut {
    key: GroupKey,
    l3_offset: u32,
    ipv6: u32,
}

const CLASS_NOT_MULTICAST: u32 = 0;
const CLASS_OTHER: u32 = 1;
const CLASS_CONTROL: u32 = 2;
const CLASS_LINK_LOCAL: u32 = 3;
const CLASS_MALFORMED: u32 = 4;
const CLASS_DATA: u32 = 5;

/// The classifier in a stack frame of its own (see [`police_tc`]): the `CLASS_*` of the frame
/// (`l3`: it starts with the IP header), the data's fields in `out`.
#[inline(never)]
fn classify_out(frame: &SkbFrame, l3: u32, out: &mut DataOut) -> u32 {
    let class = if l3 != 0 { classify_ip(frame) } else { classify(frame) };
    match class {
        Class::NotMulticast => CLASS_NOT_MULTICAST,
        Class::Other => CLASS_OTHER,
        Class::Control => CLASS_CONTROL,
        Class::LinkLocal => CLASS_LINK_LOCAL,
        Class::Malformed => CLASS_MALFORMED,
        Class::Data(data) => {
            out.key = data.key;
            out.l3_offset = data.l3_offset as u32;
            out.ipv6 = u32::from(data.ipv6);
            CLASS_DATA
        }
    }
}

/// [`forward`] in a stack frame of its own, beside [`classify_out`]'s (BPF allows 512 bytes
/// of stack along a chain of calls; the two together are more). `port`: bit 0 L3, bit 1
/// routed. Returns the counter (high half) and the action (low half).
#[inline(never)]
fn forward_out(ctx: &TcContext, frame: &SkbFrame, ingress: u32, port: u32, out: &DataOut) -> u64 {
    let data = Data { key: out.key, l3_offset: out.l3_offset as usize, ipv6: out.ipv6 != 0 };
    let port = Ingress { l3: port & 1 != 0, routed: port & 2 != 0 };
    let (counter, action) = forward(ctx, frame, ingress, port, &data);
    u64::from(counter as u32) << 32 | u64::from(action as u32)
}

/// The counter [`forward_out`] returned.
#[inline(always)]
fn counter_of(value: u64) -> Counter {
    match value as u32 {
        x if x == Counter::DropTtl as u32 => Counter::DropTtl,
        x if x == Counter::DropLoop as u32 => Counter::DropLoop,
        x if x == Counter::DropPolicy as u32 => Counter::DropPolicy,
        x if x == Counter::DropRateLimit as u32 => Counter::DropRateLimit,
        x if x == Counter::DropNoMembers as u32 => Counter::DropNoMembers,
        x if x == Counter::PassedUnknown as u32 => Counter::PassedUnknown,
        x if x == Counter::PassedOther as u32 => Counter::PassedOther,
        x if x == Counter::Malformed as u32 => Counter::Malformed,
        _ => Counter::Forwarded,
    }
}

/// Policy and rate limits, in a stack frame of their own: the keys they build are then not
/// on the call chain of the copy loop's body (BPF allows 512 bytes of stack along a chain of
/// calls). Returns `drop_policy` / `drop_rate_limit` as their `Counter` value, `u32::MAX` to
/// let the packet through (a plain integer: the BTF of a Rust enum return type is refused).
#[inline(never)]
fn police_tc(ingress: u32, config: &Config, data: &Data) -> u32 {
    police(ingress, config, data).map_or(u32::MAX, |c| c as u32)
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
    // The configuration is read in place (its entry always exists): stack is short here.
    let Some(config) = CONFIG.get(0) else { return OK };
    if is_standby(config, ingress) {
        return OK;
    }
    let ports = match port_set(config, &data.key) {
        Ok(ports) => ports,
        Err(_) => return OK,
    };
    if ports.flags & TC_TARGET_NO_XDP == 0 {
        // Not handed over (the XDP redirect failed, or the set changed meanwhile).
        return OK;
    }
    let bridged = Ingress { l3: false, routed: false };
    let (counter, action) = copy(ctx, ingress, bridged, config, data, ports);
    count(ingress, counter, ctx.len() as usize);
    action
}

/// What the ingress port is.
#[derive(Clone, Copy)]
struct Ingress {
    /// An L3 device: the packet starts with the IP header.
    l3: bool,
    /// Data arriving there crosses a routed hop (L3 devices and `--l3` Ethernet ports).
    routed: bool,
}

/// Everything the XDP program does with multicast data, for a port without XDP.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    frame: &SkbFrame,
    ingress: u32,
    port: Ingress,
    data: &Data,
) -> (Counter, i32) {
    // The configuration is read in place (its entry always exists): stack is short here.
    let Some(config) = CONFIG.get(0) else { return (Counter::PassedOther, OK) };
    if !port.l3 {
        let Some(source) = frame.read::<6>(6) else {
            return (Counter::Malformed, OK);
        };
        if is_loop_source(config, source) {
            return (Counter::DropLoop, SHOT);
        }
    }
    if is_standby(config, ingress) {
        return (Counter::DropLoop, OK);
    }
    if config.flags & (CONFIG_F_POLICY | CONFIG_F_RATE_PORTS | CONFIG_F_RATE_GROUPS) != 0 {
        match police_tc(ingress, config, data) {
            x if x == Counter::DropPolicy as u32 => return (Counter::DropPolicy, SHOT),
            x if x == Counter::DropRateLimit as u32 => return (Counter::DropRateLimit, SHOT),
            _ => {}
        }
    }
    match port_set(config, &data.key) {
        Ok(ports) => copy(ctx, ingress, port, config, data, ports),
        Err(outcome) => outcome,
    }
}

/// Where data of `key` goes: its group's port set, or for a group without one the
/// unknown-group policy's (the router ports / all ports, arrays the daemon keeps under keys of
/// their own). `Err`: nowhere; the counter and the action.
#[inline(always)]
fn port_set(config: &Config, key: &GroupKey) -> Result<&'static TcPorts, (Counter, i32)> {
    if let Some(ports) = lookup(config, key) {
        return Ok(ports);
    }
    let key = match UnknownPolicy::from_u32(config.unknown_policy) {
        UnknownPolicy::Drop => return Err((Counter::DropNoMembers, SHOT)),
        UnknownPolicy::RouterPorts => TC_ROUTERS_KEY,
        UnknownPolicy::Flood => TC_FLOOD_KEY,
    };
    // SAFETY: the value is only read.
    match unsafe { GROUP_TC_PORTS.get(key) }.filter(|p| p.count > 0) {
        Some(ports) => Ok(ports),
        None => Err((Counter::PassedUnknown, OK)),
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
///
/// A packet from an L3 port gets its Ethernet header first when some target needs one (L3
/// targets drop it again: the redirect to a device without a MAC header pulls it). Bridged
/// copies leave as received (this relay's MAC as source); routed ones (to L3 ports, `--l3`
/// ports and peers, or every copy when the ingress is routed) after one hop-limit decrement.
/// Each target kind is one pass of the same loop ([`copy_pass`]).
#[inline(always)]
fn copy(
    ctx: &TcContext,
    ingress: u32,
    port: Ingress,
    config: &Config,
    data: &Data,
    ports: &TcPorts,
) -> (Counter, i32) {
    let mut pass = Pass {
        skb: ctx.skb.skb,
        ports,
        l3: data.l3_offset as u64,
        udp_csum: -1,
        group: data.key.group,
        ipv6: u32::from(data.ipv6),
        ingress,
        serve: ports.flags & (TC_TARGET_L3 | TC_TARGET_PEER | TC_TARGET_ROUTED),
        relay_mac: config.relay_mac,
    };
    if ports.flags & TC_TARGET_ETHERNET != 0 {
        if !port.l3 {
            pass.serve |= PASS_BRIDGED;
        } else if push_ethernet(ctx, config, data).is_ok() {
            pass.l3 += ETH_HLEN as u64;
            pass.serve |= PASS_BRIDGED;
        } else {
            // No Ethernet header: only the L3 targets can be served.
            pass.serve &= TC_TARGET_L3 | TC_TARGET_PEER;
        }
    }
    if pass.serve & TC_TARGET_PEER != 0 {
        pass.udp_csum = udp_checksum_offset(ctx, pass.l3 as usize, data.ipv6);
    }
    if !port.routed && pass.serve & PASS_BRIDGED != 0 {
        // Bridged copies first, with the hop limit they came with.
        let routed = pass.serve & !PASS_BRIDGED;
        pass.serve = PASS_BRIDGED;
        copy_pass(&mut pass);
        pass.serve = routed;
    }
    if pass.serve == 0 {
        return (Counter::Forwarded, SHOT);
    }
    if decrement_hop_limit(ctx, pass.l3 as usize, data.ipv6).is_err() {
        return (Counter::DropTtl, SHOT);
    }
    copy_pass(&mut pass);
    (Counter::Forwarded, SHOT)
}

/// Pass bit of [`copy_pass`] for bridged Ethernet targets (the `TC_TARGET_*` bits name the
/// others).
const PASS_BRIDGED: u32 = 1 << 31;

/// One copy to each target of the kinds in `pass.serve` (`PASS_BRIDGED`, `TC_TARGET_L3`,
/// `TC_TARGET_ROUTED`, `TC_TARGET_PEER`) but those of the ingress port: a peer's copy is
/// addressed to the peer, every other one to the group (put back when a peer's copy changed
/// it); bridged copies carry this relay's MAC as source, routed Ethernet ones their port's MAC.
///
/// The loop is `bpf_loop` with [`copy_one`] as its body: the verifier checks the body once,
/// not once per turn and path (an open-coded loop over 32 targets of four kinds exceeds its
/// budget of a million instructions).
#[inline(always)]
fn copy_pass(pass: &mut Pass) {
    // SAFETY: the port set is a map value that lives for the whole program run.
    let count = unsafe { (*pass.ports).count } as usize;
    let turns = count.min(MAX_TC_TARGETS) as u32;
    // SAFETY: `copy_one` has the callback signature bpf_loop expects, and `pass` outlives the
    // call.
    unsafe {
        bpf_loop(turns, copy_one as *mut c_void, core::ptr::from_mut(pass).cast(), 0);
    }
}

/// The packet and the port set, for [`copy_one`], on [`copy`]'s stack.
#[repr(C)]
struct Pass {
    skb: *mut __sk_buff,
    ports: *const TcPorts,
    /// Offset of the IP header.
    l3: u64,
    /// Offset of the UDP checksum, -1 when the packet is not UDP.
    udp_csum: i64,
    /// The group address (IPv4-mapped for IPv4).
    group: [u8; 16],
    ipv6: u32,
    ingress: u32,
    /// The target kinds this pass serves.
    serve: u32,
    relay_mac: [u8; 6],
}

/// The body of [`copy_pass`]'s loop, for target `index`. Returns 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn copy_one(index: u64, pass: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer copy_pass gave it.
    let pass = unsafe { &*(pass as *const Pass) };
    // SAFETY: the port set is a map value that lives for the whole program run.
    let ports = unsafe { &*pass.ports };
    let i = index as usize;
    if i >= MAX_TC_TARGETS {
        return 1;
    }
    let target = &ports.targets[i];
    let kind = target.flags & (TC_TARGET_L3 | TC_TARGET_PEER | TC_TARGET_ROUTED);
    let kind = if kind == 0 { PASS_BRIDGED } else { kind };
    if kind & pass.serve == 0 || target.ifindex == pass.ingress {
        return 0;
    }
    let ctx = TcContext::new(pass.skb);
    // The destination only changes in a pass with per-peer copies.
    if pass.serve & TC_TARGET_PEER != 0 {
        let to = if kind & TC_TARGET_PEER != 0 { &target.addr } else { &pass.group };
        if set_destination(&ctx, pass.l3 as usize, pass.ipv6 != 0, pass.udp_csum, to).is_err() {
            return 0;
        }
    }
    if kind == PASS_BRIDGED {
        set_source_mac(&ctx, &pass.relay_mac);
    } else if kind == TC_TARGET_ROUTED {
        // The port's MAC: the first 6 bytes of `addr`.
        // SAFETY: `addr` has 16 bytes; the first 6 are read as an array of 6.
        set_source_mac(&ctx, unsafe { &*target.addr.as_ptr().cast::<[u8; 6]>() });
    }
    if ctx.clone_redirect(target.ifindex, 0).is_ok() && kind & TC_TARGET_PEER != 0 {
        count_peer_copy(target.ifindex, target.addr);
    }
    0
}

/// Writes the Ethernet source address (an unset, all-zero MAC leaves the frame as it is).
#[inline(always)]
fn set_source_mac(ctx: &TcContext, mac: &[u8; 6]) {
    if *mac != [0; 6] {
        let _ = ctx.store(6, mac, 0);
    }
}

/// Offset of the UDP checksum when the packet is UDP (IPv6: right after the fixed header),
/// else -1: other protocols keep their checksum as is.
#[inline(always)]
fn udp_checksum_offset(ctx: &TcContext, l3: usize, ipv6: bool) -> i64 {
    if ipv6 {
        return match ctx.load::<u8>(l3 + 6) {
            Ok(17) => (l3 + 40 + 6) as i64,
            _ => -1,
        };
    }
    match (ctx.load::<u8>(l3), ctx.load::<u8>(l3 + 9)) {
        (Ok(first), Ok(17)) => (l3 + usize::from(first & 0x0f) * 4 + 6) as i64,
        _ => -1,
    }
}

/// Makes `to` (IPv4-mapped for IPv4) the destination address, with the checksums that cover
/// it; nothing to do when it already is.
/// `udp_csum`: the UDP checksum's offset, negative when the packet is not UDP.
#[inline(never)]
fn set_destination(
    ctx: &TcContext,
    l3: usize,
    ipv6: bool,
    udp_csum: i64,
    to: &[u8; 16],
) -> Result<(), ()> {
    let udp_csum = (udp_csum >= 0).then_some(udp_csum as usize);
    let pseudo = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
    if ipv6 {
        let mut old: [u8; 16] = ctx.load(l3 + 24).map_err(|_| ())?;
        if old == *to {
            return Ok(());
        }
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
    let address: [u8; 4] = [to[12], to[13], to[14], to[15]];
    if from == address {
        return Ok(());
    }
    let old = u64::from(u32::from_ne_bytes(from));
    let new = u64::from(u32::from_ne_bytes(address));
    if let Some(at) = udp_csum {
        ctx.l4_csum_replace(at, old, new, pseudo | 4).map_err(|_| ())?;
    }
    ctx.l3_csum_replace(l3 + 10, old, new, 4).map_err(|_| ())?;
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
fn decrement_hop_limit(ctx: &TcContext, l3: usize, ipv6: bool) -> Result<(), ()> {
    if ipv6 {
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
