//! Per-client delivery on a shared TAP: a devmap egress program that addresses one copy of a
//! multicast frame to one VPN client.
//!
//! OpenVPN (`dev tap`, server mode) floods every multicast frame written into its tap to all
//! clients but sends a unicast-addressed frame only to the client owning that MAC. mcrelay
//! loads one instance of this program per client that joined a group through a `per_client`
//! port, with `CLIENT_MAC` set at load time, and puts one entry per such client into the
//! group's inner DEVMAP_HASH (same tap ifindex, this instance as the entry's program). The
//! broadcast redirect makes one copy per entry; this program then rewrites the copy's
//! destination MAC. The IP destination stays the group, so the client's stack accepts it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// The client's unicast MAC, set per loaded instance (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static CLIENT_MAC: [u8; 6] = [0; 6];

/// Index 0: copies addressed to this client (per CPU).
#[btf_map]
static COPIES: PerCpuArray<u64, 1> = PerCpuArray::new();

#[xdp(map = "devmap")]
pub fn mcrelay_client(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 6 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: a global of this object, read volatile so the load-time value is used.
    let mac = unsafe { core::ptr::read_volatile(&raw const CLIENT_MAC) };
    // SAFETY: the first six bytes are inside the packet, checked above.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 6], mac) };
    if let Some(copies) = COPIES.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it now.
        unsafe { *copies += 1 };
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
