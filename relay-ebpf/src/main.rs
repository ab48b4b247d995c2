//! mcrelay's kernel side: the XDP program attached to every port that can take XDP
//! redirects, and its TC variant (`tc.rs`) for L3 devices and devices without
//! `ndo_xdp_xmit`, also attached behind the XDP program of the other ports.
//!
//! Packet path (see docs/architecture.md): classify the frame with the parser shared with
//! userspace (`relay_common::parse`), then
//! - unicast / broadcast destination MAC: `XDP_PASS` at once, nothing counted;
//! - IGMP, MLD, link-local groups, non-IP, malformed: `XDP_PASS` to the stack, counted;
//! - multicast data: the loop guard first (a frame relayed by this relay or by a redundant
//!   peer relay, or one arriving on a standby port, is not relayed: `drop_loop`), then the
//!   group policy (a denied group is dropped: `drop_policy`), then the rate limits of the
//!   ingress port and of the group (`drop_rate_limit`), then look the group up in
//!   `GROUP_PORTS` and broadcast the frame to the group's port set, never back out of the
//!   ingress port, with this relay's MAC as source; no entry: the unknown-group policy.
//!   A group with a member the XDP program cannot reach (`GROUP_TC_PORTS` says so, looked up
//!   only while `CONFIG_F_TC_PORTS` is set) is handed to the TC program of the ingress port
//!   (`XDP_PASS`, not counted here), which makes every copy.
#![no_std]
#![no_main]

mod tc;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS},
    btf_maps::{
        lpm_trie::Key, Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray,
        PerCpuHashMap,
    },
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use relay_common::{
    loop_mac_key,
    parse::{classify, Class, Data, Frame as _},
    port_slot, Config, Counter, GroupKey, PortCounters, PortRate, PortSlot, PrefixData, RateLimit,
    TcPorts, UnknownPolicy, CONFIG_F_ALLOW_LIST, CONFIG_F_POLICY, CONFIG_F_RATE_GROUPS,
    CONFIG_F_RATE_PORTS, CONFIG_F_SOURCE_ENTRIES, CONFIG_F_STANDBY, CONFIG_F_TC_PORTS, MAX_GROUPS,
    MAX_POLICY_PREFIXES, MAX_PORTS, MAX_PORTS_PER_GROUP, MAX_RATE_GROUPS, MAX_RATE_PREFIXES,
    POLICY_DENY, PORT_SLOTS, RELAY_MAC_PREFIX, TC_FLOOD_KEY, TC_ROUTERS_KEY, TC_TARGET_NO_XDP,
};
use relay_ebpf::PacketFrame;

/// Per-group port sets. Key: [`GroupKey`]: a zero source for an IPv6 (*,G) entry, the source
/// for an (S,G) entry (looked up first while `CONFIG_F_SOURCE_ENTRIES` is set); IPv4 (*,G)
/// entries are in `GROUP_PORTS_V4`. Value: an inner
/// DEVMAP_HASH of the member ports (key: ifindex, or a per-client key; value: ifindex and, for
/// per-client copies, the `mcrelay_client` egress program). Written by the daemon's map writer;
/// a change replaces the inner map atomically.
#[btf_map]
pub(crate) static GROUP_PORTS: HashOfMaps<
    GroupKey,
    DevMapHash<{ MAX_PORTS_PER_GROUP as usize }>,
    { MAX_GROUPS as usize },
> = HashOfMaps::new();

/// The IPv4 (*,G) port sets: the same inner maps as `GROUP_PORTS`, keyed by the group's four
/// bytes ([`relay_common::v4_group_key`]), so the most common lookup hashes 4 bytes instead of a
/// 32-byte [`GroupKey`]. IPv6 groups and every (S,G) entry stay in `GROUP_PORTS`. Written by the
/// daemon's map writer, which routes each key to its map.
#[btf_map]
pub(crate) static GROUP_PORTS_V4: HashOfMaps<
    u32,
    DevMapHash<{ MAX_PORTS_PER_GROUP as usize }>,
    { MAX_GROUPS as usize },
> = HashOfMaps::new();

/// Every attached port (key = value = ifindex): the targets of `--unknown flood`. Written by
/// the daemon when it attaches or detaches a port.
#[btf_map]
static FLOOD_PORTS: DevMapHash<{ MAX_PORTS as usize }> = DevMapHash::new();

/// Ports leading to multicast routers (key = value = ifindex): where data for groups without
/// a port set goes under `--unknown router-ports`. Written by the daemon.
#[btf_map]
static ROUTER_PORTS: DevMapHash<{ MAX_PORTS as usize }> = DevMapHash::new();

/// Index 0: the [`Config`] the daemon gives the dataplane (unknown-group policy, flags).
#[btf_map]
pub(crate) static CONFIG: Array<Config, 1> = Array::new();

/// Per-CPU counters per ingress port, in slot [`port_slot`]`(ifindex)`: a [`PortSlot`], the
/// port that holds the slot and its [`PortCounters`] (an inlined array lookup, no hashing).
/// The daemon claims the slot when it attaches a port; a port whose slot another port holds
/// is counted in `PORT_STATS_SPILL`; frames on ports in neither are not counted.
#[btf_map]
pub(crate) static PORT_STATS: PerCpuArray<PortSlot, { PORT_SLOTS as usize }> = PerCpuArray::new();

/// Per-CPU counters of the ports whose `PORT_STATS` slot another port holds. Key: ifindex.
#[btf_map]
pub(crate) static PORT_STATS_SPILL: PerCpuHashMap<u32, PortCounters, { MAX_PORTS as usize }> =
    PerCpuHashMap::new();

/// Relay MACs whose frames are never relayed again (loop guard). Key: the MAC, zero padded
/// ([`loop_mac_key`]). Value: unused (1). Written by the daemon: peer relays that reach this
/// relay through two or more of its ports (this relay's own MAC is in `CONFIG`).
#[btf_map]
pub(crate) static LOOP_MACS: HashMap<[u8; 8], u32, 256> = HashMap::new();

/// Ports in standby (loop guard): their data is not relayed and they get no copies. Key:
/// ifindex. Value: the `PORT_STANDBY_*` reason bits. Written by the daemon; looked up only
/// while `CONFIG_F_STANDBY` is set.
#[btf_map]
pub(crate) static STANDBY_PORTS: HashMap<u32, u32, { MAX_PORTS as usize }> = HashMap::new();

/// `[policy]` as group prefixes: [`POLICY_DENY`] or `POLICY_ALLOW`, longest match wins (the
/// daemon leaves out allow prefixes inside a deny prefix, so a deny always wins). Looked up
/// only while `CONFIG_F_POLICY` is set. Written by the daemon.
#[btf_map]
pub(crate) static POLICY: LpmTrie<PrefixData, u32, { MAX_POLICY_PREFIXES as usize }> =
    LpmTrie::new();

/// Rate limits of ingress ports (key: ifindex): data beyond the rate is dropped
/// (`drop_rate_limit`). Looked up only while `CONFIG_F_RATE_PORTS` is set. The state is
/// updated without a lock: CPUs racing on one port may each let a packet through.
#[btf_map]
pub(crate) static RATE_PORTS: HashMap<u32, PortRate, { MAX_PORTS as usize }> = HashMap::new();

/// Per-group rate limits by group prefix (`[[rate_limit]]`, `--rate-limit`): every group of
/// the prefix has its own budget. Looked up only while `CONFIG_F_RATE_GROUPS` is set.
#[btf_map]
pub(crate) static RATE_PREFIXES: LpmTrie<PrefixData, RateLimit, { MAX_RATE_PREFIXES as usize }> =
    LpmTrie::new();

/// The rate state of each limited group (key: the group, IPv4-mapped; value: theoretical
/// arrival time of its next conforming packet). Least recently used groups make room.
#[btf_map]
pub(crate) static RATE_GROUPS: LruHashMap<PrefixData, u64, { MAX_RATE_GROUPS as usize }> =
    LruHashMap::new();

/// The port sets of `GROUP_PORTS` as arrays the TC program walks. Key: as `GROUP_PORTS`.
/// Value: [`TcPorts`]. Written by the daemon's group map writer in the same round as
/// `GROUP_PORTS`.
#[btf_map]
pub(crate) static GROUP_TC_PORTS: HashMap<GroupKey, TcPorts, { MAX_GROUPS as usize }> =
    HashMap::new();

/// Ports in TC mode (`mcrelay_tc`, `mcrelay_tc_l3`). Key: ifindex. Value: `TC_PORT_*` bits
/// (`TC_PORT_ROUTED`: data arriving there crosses a routed hop; `TC_PORT_L3`: an L3 device).
/// Written by the daemon when it attaches a port.
#[btf_map]
pub(crate) static TC_PORTS: HashMap<u32, u32, { MAX_PORTS as usize }> = HashMap::new();

/// Broadcast to every port of the map except the one the frame came in on.
const BROADCAST_FLAGS: u64 = (BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS) as u64;

#[xdp]
pub fn mcrelay_xdp(ctx: XdpContext) -> u32 {
    let frame = PacketFrame { start: ctx.data(), end: ctx.data_end() };
    // Matched by reference: a move out of the value costs two copies of it.
    let class = classify(&frame);
    let (counter, action) = match &class {
        Class::NotMulticast => return xdp_action::XDP_PASS,
        Class::Other => (Counter::PassedOther, xdp_action::XDP_PASS),
        Class::Control => (Counter::PassedControl, xdp_action::XDP_PASS),
        Class::LinkLocal => (Counter::PassedLinkLocal, xdp_action::XDP_PASS),
        Class::Malformed => (Counter::Malformed, xdp_action::XDP_PASS),
        Class::Data(data) => match forward(&ctx, &frame, data) {
            Ok(verdict) => verdict,
            // Handed to the TC program, which counts it.
            Err(action) => return action,
        },
    };
    count(ctx.ingress_ifindex() as u32, counter, frame.end - frame.start);
    action
}

/// Decides what happens to multicast data and performs the redirect. `Err(XDP_PASS)`: the
/// group has a member only the TC program reaches; the TC program of this port copies the
/// frame to every member (and counts it).
#[inline(always)]
fn forward(ctx: &XdpContext, frame: &PacketFrame, data: &Data) -> Result<(Counter, u32), u32> {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(source) = frame.read::<6>(6) else {
        return Ok((Counter::Malformed, xdp_action::XDP_PASS));
    };
    if is_loop_source(&config, source) {
        return Ok((Counter::DropLoop, xdp_action::XDP_DROP));
    }
    if is_standby(&config, ingress) {
        return Ok((Counter::DropLoop, xdp_action::XDP_PASS));
    }
    if config.flags & (CONFIG_F_POLICY | CONFIG_F_RATE_PORTS | CONFIG_F_RATE_GROUPS) != 0 {
        if let Some(counter) = police(ingress, &config, data) {
            return Ok((counter, xdp_action::XDP_DROP));
        }
    }
    // (S,G) first, when any exist: its port set is complete for that source. Then the (*,G)
    // of an IPv6 group. Both in `GROUP_PORTS`, looked up in a function of their own.
    if config.flags & CONFIG_F_SOURCE_ENTRIES != 0 || data.ipv6 {
        match forward_wide(config.flags, data) {
            WIDE_NONE => {}
            WIDE_TC => return Err(xdp_action::XDP_PASS),
            WIDE_FAILED => return Ok(redirect(ctx, &config, Err(0))),
            action => return Ok(redirect(ctx, &config, Ok(action as u32))),
        }
    }
    // The (*,G) of an IPv4 group: four bytes to hash.
    if !data.ipv6 {
        // SAFETY: the inner map reference is only used for the redirect helper call.
        if let Some(ports) = unsafe { GROUP_PORTS_V4.get(&v4_group(&data.key)) } {
            if config.flags & CONFIG_F_TC_PORTS != 0 && needs_tc(config.flags, &any_source(data)) {
                return Err(xdp_action::XDP_PASS);
            }
            return Ok(redirect(ctx, &config, ports.redirect(0, BROADCAST_FLAGS)));
        }
    }
    let policy = UnknownPolicy::from_u32(config.unknown_policy);
    if config.flags & CONFIG_F_TC_PORTS != 0 && policy != UnknownPolicy::Drop {
        // Router ports / all ports include one only the TC program reaches: it copies.
        let key = if policy == UnknownPolicy::Flood { TC_FLOOD_KEY } else { TC_ROUTERS_KEY };
        if needs_tc(config.flags, &key) {
            return Err(xdp_action::XDP_PASS);
        }
    }
    Ok(match policy {
        UnknownPolicy::RouterPorts if config.router_ports > 0 => {
            redirect(ctx, &config, ROUTER_PORTS.redirect(0, BROADCAST_FLAGS))
        }
        UnknownPolicy::RouterPorts => (Counter::PassedUnknown, xdp_action::XDP_PASS),
        UnknownPolicy::Drop => (Counter::DropNoMembers, xdp_action::XDP_DROP),
        UnknownPolicy::Flood => redirect(ctx, &config, FLOOD_PORTS.redirect(0, BROADCAST_FLAGS)),
    })
}

/// The (*,G) key of a frame's group.
#[inline(always)]
fn any_source(data: &Data) -> GroupKey {
    // Built from 64-bit words: byte arrays (a `[0; 16]` source) become `memset` calls.
    // SAFETY: `GroupKey` is 32 plain bytes aligned to 8, as is [u64; 4]; every bit pattern is
    // valid for both.
    let words: [u64; 4] = unsafe { core::mem::transmute::<GroupKey, [u64; 4]>(data.key) };
    // SAFETY: as above.
    unsafe { core::mem::transmute::<[u64; 4], GroupKey>([words[0], words[1], 0, 0]) }
}

/// The `GROUP_PORTS_V4` key of an IPv4 group: the last four bytes of its IPv4-mapped form,
/// read as one word ([`relay_common::v4_group_key`]).
#[inline(always)]
fn v4_group(key: &GroupKey) -> u32 {
    // SAFETY: bytes 12..16 of the 8-aligned key: an aligned, initialized u32.
    unsafe { core::ptr::read(key.group.as_ptr().add(12).cast::<u32>()) }
}

/// [`forward_wide`]: no entry.
const WIDE_NONE: i64 = -1;
/// [`forward_wide`]: the group has a member only the TC program reaches.
const WIDE_TC: i64 = -2;
/// [`forward_wide`]: the redirect helper failed.
const WIDE_FAILED: i64 = -3;

/// The `GROUP_PORTS` lookups of a data frame: (S,G) while `CONFIG_F_SOURCE_ENTRIES` is set,
/// then (*,G) for an IPv6 group. Returns the redirect helper's action, or `WIDE_*`.
///
/// A function of its own (a BPF subprogram), not inlined: the verifier turns a
/// `bpf_redirect_map` call into a direct call of the devmap's redirect only when one call
/// instruction always sees inner maps of the same outer map; `GROUP_PORTS_V4`'s redirect in
/// the caller must not be merged with these by the compiler (an indirect call through the map's
/// ops costs ~12 ns per frame).
#[inline(never)]
fn forward_wide(flags: u32, data: &Data) -> i64 {
    if flags & CONFIG_F_SOURCE_ENTRIES != 0 {
        // SAFETY: the inner map reference is only used for the redirect helper call.
        if let Some(ports) = unsafe { GROUP_PORTS.get(&data.key) } {
            if needs_tc(flags, &data.key) {
                return WIDE_TC;
            }
            return wide_result(ports.redirect(0, BROADCAST_FLAGS));
        }
    }
    if data.ipv6 {
        let key = any_source(data);
        // SAFETY: as above.
        if let Some(ports) = unsafe { GROUP_PORTS.get(&key) } {
            if needs_tc(flags, &key) {
                return WIDE_TC;
            }
            return wide_result(ports.redirect(0, BROADCAST_FLAGS));
        }
    }
    WIDE_NONE
}

#[inline(always)]
fn wide_result(result: Result<u32, u32>) -> i64 {
    match result {
        Ok(action) => i64::from(action),
        Err(_) => WIDE_FAILED,
    }
}

/// Whether a group's port set has a member the XDP program cannot reach (looked up only
/// while some port is attached in TC mode, `flags` being `Config::flags`).
#[inline(always)]
fn needs_tc(flags: u32, key: &GroupKey) -> bool {
    flags & CONFIG_F_TC_PORTS != 0
        // SAFETY: the value is read once, right here.
        && unsafe { GROUP_TC_PORTS.get(key) }.is_some_and(|p| p.flags & TC_TARGET_NO_XDP != 0)
}

/// Loop guard: a frame some mcrelay relayed carries its relay MAC as source. Ours, or a
/// redundant peer's, means the frame went round a loop: never relay it again.
#[inline(always)]
pub(crate) fn is_loop_source(config: &Config, source: [u8; 6]) -> bool {
    source[..3] == RELAY_MAC_PREFIX
        && (source == config.relay_mac
            // SAFETY: the value is only tested for presence.
            || unsafe { LOOP_MACS.get(loop_mac_key(source)) }.is_some())
}

/// Whether data arriving on `ingress` is not relayed because the port is in standby.
#[inline(always)]
pub(crate) fn is_standby(config: &Config, ingress: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    config.flags & CONFIG_F_STANDBY != 0 && unsafe { STANDBY_PORTS.get(ingress) }.is_some()
}

/// The group policy and the rate limits: the drop counter of a frame that must not be
/// relayed.
#[inline(always)]
pub(crate) fn police(ingress: u32, config: &Config, data: &Data) -> Option<Counter> {
    if config.flags & CONFIG_F_POLICY != 0 {
        let key = Key { prefix_len: 128, data: data.key.group };
        let denied = match POLICY.get(&key) {
            Some(verdict) => *verdict == POLICY_DENY,
            None => config.flags & CONFIG_F_ALLOW_LIST != 0,
        };
        if denied {
            return Some(Counter::DropPolicy);
        }
    }
    if config.flags & (CONFIG_F_RATE_PORTS | CONFIG_F_RATE_GROUPS) == 0 {
        return None;
    }
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if config.flags & CONFIG_F_RATE_PORTS != 0 {
        if let Some(rate) = RATE_PORTS.get_ptr_mut(ingress) {
            // SAFETY: the value lives in the map; a racing CPU at worst admits one more packet.
            let rate = unsafe { &mut *rate };
            if !rate.limit.admit(now, &mut rate.tat) {
                return Some(Counter::DropRateLimit);
            }
        }
    }
    if config.flags & CONFIG_F_RATE_GROUPS != 0 {
        if let Some(limit) = RATE_PREFIXES.get(&Key { prefix_len: 128, data: data.key.group }) {
            let limit = *limit;
            match RATE_GROUPS.get_ptr_mut(data.key.group) {
                // SAFETY: as above.
                Some(tat) => {
                    if !limit.admit(now, unsafe { &mut *tat }) {
                        return Some(Counter::DropRateLimit);
                    }
                }
                None => {
                    let _ = RATE_GROUPS.insert(data.key.group, now + limit.interval_ns, 0);
                }
            }
        }
    }
    None
}

/// Counts a redirect and, when it was set up, gives the frame this relay's MAC as source:
/// the copies are made after the program returns, so every copy carries it.
#[inline(always)]
fn redirect(ctx: &XdpContext, config: &Config, result: Result<u32, u32>) -> (Counter, u32) {
    match result {
        Ok(action) => {
            if config.relay_mac[0] != 0 {
                let at = ctx.data() + 6;
                if at + 6 <= ctx.data_end() {
                    // SAFETY: bytes 6..12 lie inside the packet (checked just above).
                    unsafe { core::ptr::write_unaligned(at as *mut [u8; 6], config.relay_mac) };
                }
            }
            (Counter::Forwarded, action)
        }
        Err(_) => (Counter::RedirectFailed, xdp_action::XDP_PASS),
    }
}

#[inline(always)]
pub(crate) fn count(ifindex: u32, counter: Counter, len: usize) {
    let stats = match PORT_STATS.get_ptr_mut(port_slot(ifindex)) {
        // SAFETY: per-CPU value of this CPU; the daemon writes `ifindex` once per attach.
        Some(slot) if unsafe { (*slot).ifindex } == ifindex => unsafe {
            core::ptr::addr_of_mut!((*slot).counters)
        },
        _ => match PORT_STATS_SPILL.get_ptr_mut(ifindex) {
            Some(stats) => stats,
            None => return,
        },
    };
    let i = counter as usize;
    // SAFETY: per-CPU value, only this CPU writes it while the program runs.
    unsafe {
        (*stats).packets[i] += 1;
        (*stats).bytes[i] += len as u64;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
