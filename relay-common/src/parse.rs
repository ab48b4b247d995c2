//! Frame classification shared by the XDP program and the host tests.
//!
//! [`classify`] reads a frame through the [`Frame`] trait: the kernel side implements it with
//! bounds-checked reads between `data` and `data_end`, the host side with a byte slice, so the
//! exact same decision code is unit-tested here and verified in the kernel. All offsets stay
//! below [`MAX_PARSE_OFFSET`] and every loop has a constant bound, which keeps the verifier happy.

use crate::{v4_mapped, GroupKey};

/// Reads from a frame. `read` returns `None` when `N` bytes at `offset` are not inside it.
pub trait Frame {
    /// Length of the frame in bytes.
    fn len(&self) -> usize;
    /// Copies `N` bytes starting at `offset`, or `None` when they run past the end.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Frame for &[u8] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_IGMP: u8 = 2;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPV6_HLEN: usize = 40;
/// VLAN tags parsed at most (802.1ad outer + 802.1Q inner).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers skipped at most before giving up (counted as malformed).
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Parsing never looks further into a frame than this.
pub const MAX_PARSE_OFFSET: usize = 1024;

/// What a frame is, as far as forwarding is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Destination MAC is unicast or broadcast: not ours, pass untouched and uncounted.
    NotMulticast,
    /// Multicast MAC but not IP multicast data (non-IP, or IP to a unicast address).
    Other,
    /// IGMP or MLD: the control loop's business.
    Control,
    /// A link-local group (224.0.0.0/24, IPv6 scope interface- or link-local).
    LinkLocal,
    /// Multicast data. `key.source` holds the sender address (not zero: it is an (S,G) pair).
    Data(Data),
    /// Too short, or a header that contradicts itself.
    Malformed,
}

/// A multicast data frame's group, source and where its IP header starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data {
    /// Group and source, IPv4-mapped for IPv4.
    pub key: GroupKey,
    /// Offset of the IPv4/IPv6 header (after the VLAN tags).
    pub l3_offset: usize,
    /// `true` for IPv6.
    pub ipv6: bool,
}

/// Classifies a frame. Pure function of the bytes; never panics.
#[inline(always)]
pub fn classify<F: Frame>(frame: &F) -> Class {
    let Some(eth) = frame.read::<ETH_HLEN>(0) else {
        return Class::Malformed;
    };
    // Group bit of the destination MAC clear: unicast.
    if eth[0] & 1 == 0 {
        return Class::NotMulticast;
    }
    if eth[0..6] == [0xff; 6] {
        return Class::NotMulticast;
    }
    let mut proto = u16::from_be_bytes([eth[12], eth[13]]);
    let mut l3 = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS && (proto == ETH_P_8021Q || proto == ETH_P_8021AD) {
        let Some(tag) = frame.read::<VLAN_HLEN>(l3) else {
            return Class::Malformed;
        };
        proto = u16::from_be_bytes([tag[2], tag[3]]);
        l3 += VLAN_HLEN;
        tags += 1;
    }
    match proto {
        ETH_P_IP => classify_ipv4(frame, l3),
        ETH_P_IPV6 => classify_ipv6(frame, l3),
        _ => Class::Other,
    }
}

#[inline(always)]
fn classify_ipv4<F: Frame>(frame: &F, l3: usize) -> Class {
    let Some(ip) = frame.read::<20>(l3) else {
        return Class::Malformed;
    };
    let version = ip[0] >> 4;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if version != 4 || header_len < 20 || total_len < header_len || l3 + total_len > frame.len() {
        return Class::Malformed;
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    if dst[0] & 0xf0 != 0xe0 {
        return Class::Other;
    }
    if ip[9] == IPPROTO_IGMP {
        return Class::Control;
    }
    if dst[0] == 224 && dst[1] == 0 && dst[2] == 0 {
        return Class::LinkLocal;
    }
    Class::Data(Data {
        key: GroupKey { group: v4_mapped(dst), source: v4_mapped([ip[12], ip[13], ip[14], ip[15]]) },
        l3_offset: l3,
        ipv6: false,
    })
}

/// Whether an ICMPv6 type is an MLD message (query, v1 report, done, v2 report).
#[inline(always)]
pub const fn is_mld_type(t: u8) -> bool {
    matches!(t, 130 | 131 | 132 | 143)
}

#[inline(always)]
fn classify_ipv6<F: Frame>(frame: &F, l3: usize) -> Class {
    let Some(ip) = frame.read::<IPV6_HLEN>(l3) else {
        return Class::Malformed;
    };
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 || l3 + IPV6_HLEN + payload_len > frame.len() {
        return Class::Malformed;
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    if dst[0] != 0xff {
        return Class::Other;
    }
    let mut next = ip[6];
    let mut off = l3 + IPV6_HLEN;
    let mut i = 0;
    // Walk the extension headers up to the upper-layer protocol.
    while i < MAX_IPV6_EXT_HEADERS {
        if off > MAX_PARSE_OFFSET {
            return Class::Malformed;
        }
        let len = match next {
            // Hop-by-hop, routing, destination options: (hdr ext len + 1) * 8.
            0 | 43 | 60 => {
                let Some(h) = frame.read::<2>(off) else {
                    return Class::Malformed;
                };
                next = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            // Fragment header: 8 bytes. A non-first fragment carries no upper-layer header.
            44 => {
                let Some(h) = frame.read::<4>(off) else {
                    return Class::Malformed;
                };
                next = h[0];
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    next = 59;
                }
                8
            }
            // Authentication header: (payload len + 2) * 4.
            51 => {
                let Some(h) = frame.read::<2>(off) else {
                    return Class::Malformed;
                };
                next = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            _ => break,
        };
        off += len;
        i += 1;
    }
    if i == MAX_IPV6_EXT_HEADERS && matches!(next, 0 | 43 | 44 | 51 | 60) {
        return Class::Malformed;
    }
    if next == IPPROTO_ICMPV6 {
        if off > MAX_PARSE_OFFSET {
            return Class::Malformed;
        }
        // Two bytes (type, code), never one: LLVM turns a one-byte bounds check into `>=`,
        // which the verifier does not use to widen the packet range.
        let Some(icmp) = frame.read::<2>(off) else {
            return Class::Malformed;
        };
        if is_mld_type(icmp[0]) {
            return Class::Control;
        }
    }
    // Scope nibble: 1 interface-local, 2 link-local (and 0 reserved) stay on the link.
    if dst[1] & 0x0f <= 2 {
        return Class::LinkLocal;
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&ip[8..24]);
    Class::Data(Data { key: GroupKey { group: dst, source }, l3_offset: l3, ipv6: true })
}
