//! Per-client delivery on a shared TAP: the devmap egress program that addresses each copy of
//! a multicast frame to one VPN client.
//!
//! OpenVPN (`dev tap`, server mode) floods every multicast frame written into its tap to all
//! clients but sends a unicast-addressed frame only to the client owning that MAC. For a group
//! with `n` joined clients behind a per-client port, the group's inner DEVMAP_HASH holds `n`
//! entries for that port, all with this program, so the broadcast redirect makes `n` copies.
//! The kernel runs one egress program per device and flush for the whole bulk queue (the first
//! entry's program), so the program cannot be told which entry a copy belongs to. It does not
//! need to: the `n` copies of one frame are processed one after the other on one CPU, so a
//! per-CPU cursor taken modulo `n` gives them `n` distinct MACs from the group's client set
//! (`CLIENT_SETS`). Frames to the port for groups without a set pass unchanged.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{HashMap, PerCpuHashMap},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use relay_common::{
    parse::{classify, Class},
    ClientCopies, ClientSet, ClientSetKey, GroupKey, MAX_CLIENTS_PER_SET,
};
use relay_ebpf::PacketFrame;

/// (shared port, group) -> the clients' MACs. Written by the daemon.
#[btf_map]
static CLIENT_SETS: HashMap<ClientSetKey, ClientSet, 4096> = HashMap::new();

/// (shared port, group) -> next slot, per CPU.
#[btf_map]
static CLIENT_CURSOR: PerCpuHashMap<ClientSetKey, u32, 4096> = PerCpuHashMap::new();

/// (shared port, group) -> copies per slot, per CPU. Read by the daemon.
#[btf_map]
static CLIENT_COPIES: PerCpuHashMap<ClientSetKey, ClientCopies, 4096> = PerCpuHashMap::new();

#[xdp(map = "devmap")]
pub fn mcrelay_client(ctx: XdpContext) -> u32 {
    let frame = PacketFrame { start: ctx.data(), end: ctx.data_end() };
    let Class::Data(data) = classify(&frame) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: reading a field of the context the kernel passed in.
    let ifindex = unsafe { (*ctx.ctx).egress_ifindex };
    let key = ClientSetKey {
        ifindex,
        _pad: 0,
        group: GroupKey { group: data.key.group, source: [0; 16] },
    };
    // SAFETY: the value is only read here; the daemon replaces whole entries.
    let Some(set) = (unsafe { CLIENT_SETS.get(key) }) else {
        return xdp_action::XDP_PASS;
    };
    let count = set.count;
    if count == 0 || count as usize > MAX_CLIENTS_PER_SET {
        return xdp_action::XDP_PASS;
    }
    let Some(cursor) = CLIENT_CURSOR.get_ptr_mut(key) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: per-CPU value, only this CPU uses it while the program runs.
    let slot = unsafe {
        let slot = *cursor % count;
        *cursor = cursor.read().wrapping_add(1);
        slot as usize
    };
    // Bound the index for the verifier: LLVM knows `slot < count <= 32` and would drop a plain
    // check, leaving the verifier with an unbounded offset; a volatile read hides that.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&raw const slot) } & (MAX_CLIENTS_PER_SET - 1);
    let mac = set.macs[slot];
    if frame.start + 6 > frame.end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the first six bytes are inside the packet, checked just above.
    unsafe { core::ptr::write_unaligned(frame.start as *mut [u8; 6], mac) };
    if let Some(copies) = CLIENT_COPIES.get_ptr_mut(key) {
        // SAFETY: per-CPU value; `slot` is below MAX_CLIENTS_PER_SET.
        unsafe { (*copies).copies[slot] += 1 };
    }
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
