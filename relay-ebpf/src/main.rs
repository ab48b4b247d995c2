//! mcrelay's kernel side: one XDP program attached to every port.
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
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS},
    btf_maps::{
        lpm_trie::Key, Array, DevMapHash, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuHashMap,
    },
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use relay_common::{
    loop_mac_key,
    parse::{classify, Class, Data, Frame as _},
    Config, Counter, GroupKey, PortCounters, PortRate, PrefixData, RateLimit, UnknownPolicy,
    CONFIG_F_ALLOW_LIST, CONFIG_F_POLICY, CONFIG_F_RATE_GROUPS, CONFIG_F_RATE_PORTS,
    CONFIG_F_SOURCE_ENTRIES, CONFIG_F_STANDBY, MAX_GROUPS, MAX_POLICY_PREFIXES, MAX_PORTS,
    MAX_PORTS_PER_GROUP, MAX_RATE_GROUPS, MAX_RATE_PREFIXES, POLICY_DENY, RELAY_MAC_PREFIX,
};
use relay_ebpf::PacketFrame;

/// Per-group port sets. Key: [`GroupKey`]: a zero source for a (*,G) entry, the source for an
/// (S,G) entry (looked up first while `CONFIG_F_SOURCE_ENTRIES` is set). Value: an inner
/// DEVMAP_HASH of the member ports (key: ifindex, or a per-client key; value: ifindex and, for
/// per-client copies, the `mcrelay_client` egress program). Written by the daemon's map writer;
/// a change replaces the inner map atomically.
#[btf_map]
static GROUP_PORTS: HashOfMaps<
    GroupKey,
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
static CONFIG: Array<Config, 1> = Array::new();

/// Per-CPU counters per ingress port. Key: ifindex. Value: [`PortCounters`]. The daemon
/// creates an entry when it attaches a port; frames on ports without an entry are not counted.
#[btf_map]
static PORT_STATS: PerCpuHashMap<u32, PortCounters, { MAX_PORTS as usize }> = PerCpuHashMap::new();

/// Relay MACs whose frames are never relayed again (loop guard). Key: the MAC, zero padded
/// ([`loop_mac_key`]). Value: unused (1). Written by the daemon: peer relays that reach this
/// relay through two or more of its ports (this relay's own MAC is in `CONFIG`).
#[btf_map]
static LOOP_MACS: HashMap<[u8; 8], u32, 256> = HashMap::new();

/// Ports in standby (loop guard): their data is not relayed and they get no copies. Key:
/// ifindex. Value: the `PORT_STANDBY_*` reason bits. Written by the daemon; looked up only
/// while `CONFIG_F_STANDBY` is set.
#[btf_map]
static STANDBY_PORTS: HashMap<u32, u32, { MAX_PORTS as usize }> = HashMap::new();

/// `[policy]` as group prefixes: [`POLICY_DENY`] or `POLICY_ALLOW`, longest match wins (the
/// daemon leaves out allow prefixes inside a deny prefix, so a deny always wins). Looked up
/// only while `CONFIG_F_POLICY` is set. Written by the daemon.
#[btf_map]
static POLICY: LpmTrie<PrefixData, u32, { MAX_POLICY_PREFIXES as usize }> = LpmTrie::new();

/// Rate limits of ingress ports (key: ifindex): data beyond the rate is dropped
/// (`drop_rate_limit`). Looked up only while `CONFIG_F_RATE_PORTS` is set. The state is
/// updated without a lock: CPUs racing on one port may each let a packet through.
#[btf_map]
static RATE_PORTS: HashMap<u32, PortRate, { MAX_PORTS as usize }> = HashMap::new();

/// Per-group rate limits by group prefix (`[[rate_limit]]`, `--rate-limit`): every group of
/// the prefix has its own budget. Looked up only while `CONFIG_F_RATE_GROUPS` is set.
#[btf_map]
static RATE_PREFIXES: LpmTrie<PrefixData, RateLimit, { MAX_RATE_PREFIXES as usize }> =
    LpmTrie::new();

/// The rate state of each limited group (key: the group, IPv4-mapped; value: theoretical
/// arrival time of its next conforming packet). Least recently used groups make room.
#[btf_map]
static RATE_GROUPS: LruHashMap<PrefixData, u64, { MAX_RATE_GROUPS as usize }> = LruHashMap::new();

/// Broadcast to every port of the map except the one the frame came in on.
const BROADCAST_FLAGS: u64 = (BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS) as u64;

#[xdp]
pub fn mcrelay_xdp(ctx: XdpContext) -> u32 {
    let frame = PacketFrame { start: ctx.data(), end: ctx.data_end() };
    let (counter, action) = match classify(&frame) {
        Class::NotMulticast => return xdp_action::XDP_PASS,
        Class::Other => (Counter::PassedOther, xdp_action::XDP_PASS),
        Class::Control => (Counter::PassedControl, xdp_action::XDP_PASS),
        Class::LinkLocal => (Counter::PassedLinkLocal, xdp_action::XDP_PASS),
        Class::Malformed => (Counter::Malformed, xdp_action::XDP_PASS),
        Class::Data(data) => forward(&ctx, &frame, &data),
    };
    count(ctx.ingress_ifindex() as u32, counter, frame.end - frame.start);
    action
}

/// Decides what happens to multicast data and performs the redirect.
#[inline(always)]
fn forward(ctx: &XdpContext, frame: &PacketFrame, data: &Data) -> (Counter, u32) {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    // Loop guard: a frame some mcrelay relayed carries its relay MAC as source. Ours, or a
    // redundant peer's, means the frame went round a loop: never relay it again.
    let Some(source) = frame.read::<6>(6) else {
        return (Counter::Malformed, xdp_action::XDP_PASS);
    };
    if source[..3] == RELAY_MAC_PREFIX
        && (source == config.relay_mac
            // SAFETY: the value is only tested for presence.
            || unsafe { LOOP_MACS.get(loop_mac_key(source)) }.is_some())
    {
        return (Counter::DropLoop, xdp_action::XDP_DROP);
    }
    if config.flags & CONFIG_F_STANDBY != 0 {
        // SAFETY: as above.
        if unsafe { STANDBY_PORTS.get(ctx.ingress_ifindex() as u32) }.is_some() {
            return (Counter::DropLoop, xdp_action::XDP_PASS);
        }
    }
    if config.flags & (CONFIG_F_POLICY | CONFIG_F_RATE_PORTS | CONFIG_F_RATE_GROUPS) != 0 {
        if let Some(verdict) = police(ctx, &config, data) {
            return verdict;
        }
    }
    // (S,G) first, when any exist: its port set is complete for that source.
    if config.flags & CONFIG_F_SOURCE_ENTRIES != 0 {
        // SAFETY: the inner map reference is only used for the redirect helper call.
        if let Some(ports) = unsafe { GROUP_PORTS.get(&data.key) } {
            return redirect(ctx, &config, ports.redirect(0, BROADCAST_FLAGS));
        }
    }
    // The source as a copy of two zero words: a `[0; 16]` literal becomes a `memset` call.
    let zero: [u64; 2] = [0, 0];
    // SAFETY: [u64; 2] and [u8; 16] have the same size and every bit pattern is valid.
    let key = GroupKey {
        group: data.key.group,
        source: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(zero) },
    };
    // SAFETY: as above.
    if let Some(ports) = unsafe { GROUP_PORTS.get(&key) } {
        return redirect(ctx, &config, ports.redirect(0, BROADCAST_FLAGS));
    }
    match UnknownPolicy::from_u32(config.unknown_policy) {
        UnknownPolicy::RouterPorts if config.router_ports > 0 => {
            redirect(ctx, &config, ROUTER_PORTS.redirect(0, BROADCAST_FLAGS))
        }
        UnknownPolicy::RouterPorts => (Counter::PassedUnknown, xdp_action::XDP_PASS),
        UnknownPolicy::Drop => (Counter::DropNoMembers, xdp_action::XDP_DROP),
        UnknownPolicy::Flood => redirect(ctx, &config, FLOOD_PORTS.redirect(0, BROADCAST_FLAGS)),
    }
}

/// The group policy and the rate limits: a verdict for a frame that must not be relayed.
#[inline(always)]
fn police(ctx: &XdpContext, config: &Config, data: &Data) -> Option<(Counter, u32)> {
    if config.flags & CONFIG_F_POLICY != 0 {
        let key = Key { prefix_len: 128, data: data.key.group };
        let denied = match POLICY.get(&key) {
            Some(verdict) => *verdict == POLICY_DENY,
            None => config.flags & CONFIG_F_ALLOW_LIST != 0,
        };
        if denied {
            return Some((Counter::DropPolicy, xdp_action::XDP_DROP));
        }
    }
    if config.flags & (CONFIG_F_RATE_PORTS | CONFIG_F_RATE_GROUPS) == 0 {
        return None;
    }
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if config.flags & CONFIG_F_RATE_PORTS != 0 {
        if let Some(rate) = RATE_PORTS.get_ptr_mut(ctx.ingress_ifindex() as u32) {
            // SAFETY: the value lives in the map; a racing CPU at worst admits one more packet.
            let rate = unsafe { &mut *rate };
            if !rate.limit.admit(now, &mut rate.tat) {
                return Some((Counter::DropRateLimit, xdp_action::XDP_DROP));
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
                        return Some((Counter::DropRateLimit, xdp_action::XDP_DROP));
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
fn count(ifindex: u32, counter: Counter, len: usize) {
    if let Some(stats) = PORT_STATS.get_ptr_mut(ifindex) {
        let i = counter as usize;
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*stats).packets[i] += 1;
            (*stats).bytes[i] += len as u64;
        }
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
