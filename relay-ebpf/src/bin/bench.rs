//! Programs of `cargo xtask bench` (not part of the product): the traffic generator, the
//! receivers' counter, the bare reference forwarder and an empty program.
//!
//! - `bench_gen`: run with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES on the sender's
//!   interface; restores the frame's Ethernet/IPv4/UDP headers from `GEN_HEADER` (pages are
//!   recycled with whatever the stack wrote into them, e.g. a decremented TTL) and returns
//!   `XDP_TX`, so every run puts one frame on the wire.
//! - `bench_count`: attached to the receiving veths; counts frames per ingress ifindex per CPU in
//!   `RX_PACKETS` and drops them (it also gives the veth the NAPI that redirected frames need).
//! - `bench_bare`: the limit mcrelay is measured against: the IPv4 destination at a fixed offset
//!   looked up in `BARE_GROUPS` (HASH_OF_MAPS of DEVMAP_HASH, like mcrelay's GROUP_PORTS), then a
//!   broadcast redirect excluding the ingress port. No other parsing, no counters.
//! - `bench_stamp`: the control-plane bench's receiver: records, per ingress ifindex, the
//!   `bpf_ktime_get_ns` of the first frame since userspace zeroed `RX_FIRST_NS` and of the last
//!   frame (`RX_LAST_NS`), and drops.
//! - `bench_empty`: `XDP_PASS`, the floor of a BPF_PROG_TEST_RUN per-packet cost.
//! - `bench_direct`: the direct mode's driver: restores the source MAC from `GEN_HEADER`, then
//!   tail-calls the program in `DIRECT_TARGET[0]` (the program the daemon
//!   attached, or `bench_bare`). Run with live frames and the ingress port's ifindex, the target
//!   runs in place as on that port, on a frame whose source MAC is the sender's again (mcrelay
//!   writes its relay MAC into the recycled page; seen again, the loop guard would drop it).
//! - `bench_direct_tc` / `bench_bare_tc`: the same for the TC rows: the wrapper restores the
//!   source MAC of the skb BPF_PROG_TEST_RUN reuses on every repetition and tail-calls
//!   `DIRECT_TC_TARGET[0]` (mcrelay's `mcrelay_tc` on a port in TC mode, or `bench_bare_tc`);
//!   `bench_bare_tc` looks the IPv4 destination up in `BARE_TC_GROUPS` (4-byte key, an array of
//!   egress ifindexes) and `bpf_clone_redirect`s to each, then drops the original.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_BROADCAST, BPF_F_EXCLUDE_INGRESS, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, DevMapHash, HashMap, HashOfMaps, PerCpuArray, ProgramArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Bytes of Ethernet + IPv4 + UDP headers that `bench_gen` restores on every frame.
const HEADER_LEN: usize = 42;
/// End of the source MAC: the only bytes a direct-mode target writes (mcrelay's relay MAC).
const SOURCE_MAC_END: usize = 12;
/// Offset of the IPv4 destination address in an untagged frame.
const IPV4_DST_OFFSET: usize = 30;
/// Counter slots: ingress ifindexes below this are counted.
const MAX_IFINDEX: usize = 4096;

/// Index 0: the header template of the generated frames (written by the bench before a run).
#[btf_map]
static GEN_HEADER: Array<[u8; HEADER_LEN], 1> = Array::new();

/// Frames received, per CPU, indexed by ingress ifindex.
#[btf_map]
static RX_PACKETS: PerCpuArray<u64, MAX_IFINDEX> = PerCpuArray::new();

/// First frame since userspace zeroed the slot, ns (CLOCK_MONOTONIC), by ingress ifindex.
#[btf_map]
static RX_FIRST_NS: Array<u64, MAX_IFINDEX> = Array::new();

/// Last frame, ns (CLOCK_MONOTONIC), by ingress ifindex.
#[btf_map]
static RX_LAST_NS: Array<u64, MAX_IFINDEX> = Array::new();

/// The bare forwarder's port sets: IPv4 group (network byte order as read from the frame) to
/// an inner DEVMAP_HASH of egress ifindexes.
#[btf_map]
static BARE_GROUPS: HashOfMaps<u32, DevMapHash<128>, 1024> = HashOfMaps::new();

/// Slot 0: the program `bench_direct` hands every frame to (written by the bench).
#[btf_map]
static DIRECT_TARGET: ProgramArray<1> = ProgramArray::new();

/// Most egress ports of a `BARE_TC_GROUPS` entry.
const BARE_TC_PORTS: usize = 8;

/// The bare TC forwarder's port sets: IPv4 group (as read from the packet) to
/// `[count, ifindex...]`.
#[btf_map]
static BARE_TC_GROUPS: HashMap<u32, [u32; BARE_TC_PORTS + 1], 16> = HashMap::new();

/// Slot 0: the TC program `bench_direct_tc` hands every packet to.
#[btf_map]
static DIRECT_TC_TARGET: ProgramArray<1> = ProgramArray::new();

const BROADCAST_FLAGS: u64 = (BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS) as u64;

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + HEADER_LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(header) = GEN_HEADER.get(0) {
        // SAFETY: `start..start + HEADER_LEN` lies inside the packet, checked above.
        unsafe { core::ptr::write_unaligned(start as *mut [u8; HEADER_LEN], *header) };
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_direct(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + SOURCE_MAC_END > end {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(header) = GEN_HEADER.get(0) {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&header[6..SOURCE_MAC_END]);
        // SAFETY: bytes 6..12 lie inside the packet, checked above.
        unsafe { core::ptr::write_unaligned((start + 6) as *mut [u8; 6], mac) };
    }
    // SAFETY: control goes to the target program and does not come back; on failure (empty
    // slot) it falls through to the abort below.
    unsafe { DIRECT_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn bench_count(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    if let Some(count) = RX_PACKETS.get_ptr_mut(ifindex) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_stamp(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(first) = RX_FIRST_NS.get_ptr_mut(ifindex) {
        // SAFETY: a slot of a global array; racing writers only move a timestamp.
        unsafe {
            if *first == 0 {
                *first = now;
            }
        }
    }
    if let Some(last) = RX_LAST_NS.get_ptr_mut(ifindex) {
        // SAFETY: as above.
        unsafe { *last = now };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_bare(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IPV4_DST_OFFSET + 4 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the four bytes lie inside the packet, checked above.
    let group = unsafe { core::ptr::read_unaligned((start + IPV4_DST_OFFSET) as *const u32) };
    // SAFETY: the inner map reference is only used for the redirect helper call.
    match unsafe { BARE_GROUPS.get(&group) } {
        Some(ports) => ports.redirect(0, BROADCAST_FLAGS).unwrap_or(xdp_action::XDP_PASS),
        None => xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn bench_direct_tc(ctx: TcContext) -> i32 {
    if let Some(header) = GEN_HEADER.get(0) {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&header[6..SOURCE_MAC_END]);
        if ctx.store(6, &mac, 0).is_err() {
            return TC_ACT_SHOT;
        }
    }
    // SAFETY: as in `bench_direct`.
    unsafe { DIRECT_TC_TARGET.tail_call(&ctx, 0) };
    TC_ACT_SHOT
}

#[classifier]
pub fn bench_bare_tc(ctx: TcContext) -> i32 {
    let Ok(group) = ctx.load::<u32>(IPV4_DST_OFFSET) else {
        return TC_ACT_OK;
    };
    // SAFETY: the value is only read.
    let Some(ports) = (unsafe { BARE_TC_GROUPS.get(group) }) else {
        return TC_ACT_OK;
    };
    let count = ports[0] as usize;
    for (i, &ifindex) in ports[1..].iter().enumerate() {
        if i >= count {
            break;
        }
        let _ = ctx.clone_redirect(ifindex, 0);
    }
    TC_ACT_SHOT
}

#[xdp]
pub fn bench_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
