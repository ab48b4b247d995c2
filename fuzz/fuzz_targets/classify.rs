//! The shared classifier on fuzzed frames. The first byte picks how the rest becomes a frame:
//! as it is, or behind an Ethernet header to a multicast MAC (optionally VLAN tagged) with an
//! IPv4 or IPv6 header whose version and length fields are made consistent, so the fuzzer
//! spends its time in the header walks instead of rediscovering ethertypes and lengths.
//!
//! Checks the invariants of relay-common/tests/invariants (shared with the property tests):
//! deterministic, no read beyond MAX_PARSE_OFFSET, data verdicts whose offsets and addresses
//! are the frame's, header walks that stay inside the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../relay-common/tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => invariants::check_any_frame(rest),
        1 => invariants::check_any_frame(&ip_frame(rest, false, mode & 0x10 != 0)),
        _ => invariants::check_any_frame(&ip_frame(rest, true, mode & 0x10 != 0)),
    }
});

/// `packet` behind an Ethernet header (and a VLAN tag when `tagged`), with the IP version
/// nibble and the total / payload length set to the packet's size, and for IPv6 a multicast
/// destination.
fn ip_frame(packet: &[u8], ipv6: bool, tagged: bool) -> Vec<u8> {
    let mut f = if ipv6 { vec![0x33, 0x33, 0, 0, 0, 1] } else { vec![0x01, 0x00, 0x5e, 1, 2, 3] };
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    if tagged {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    }
    f.extend_from_slice(if ipv6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let l3 = f.len();
    f.extend_from_slice(packet);
    if ipv6 && packet.len() >= 40 {
        f[l3] = 0x60 | (f[l3] & 0x0f);
        f[l3 + 4..l3 + 6].copy_from_slice(&((packet.len() - 40) as u16).to_be_bytes());
        f[l3 + 24] = 0xff;
    } else if !ipv6 && packet.len() >= 20 {
        f[l3] = 0x40 | (f[l3] & 0x0f).max(5);
        f[l3 + 2..l3 + 4].copy_from_slice(&(packet.len() as u16).to_be_bytes());
    }
    f
}
