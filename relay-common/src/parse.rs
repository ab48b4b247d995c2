//! Frame classification shared by the XDP program and the host tests.
//!
//! [`classify`] reads a frame through the [`Frame`] trait: the kernel side implements it with
//! bounds-checked reads between `data` and `data_end`, the host side with a byte slice, so the
//! exact same decision code is unit-tested here and verified in the kernel. All offsets stay
//! below [`MAX_PARSE_OFFSET`] and every loop has a constant bound, which keeps the verifier happy.

use crate::{v4_mapped, GroupKey};

/// Reads from a frame. `read` returns `None` when `N` bytes at `offset` are not inside it.
#[expect(clippy::len_without_is_empty, reason = "a frame is never asked whether it is empty")]
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
    // Group bit of the destination MAC clear: unicast. Tested on its own, before anything
    // else is read, so unicast pass-through costs one small load. (Two bytes, not one: LLVM
    // turns a one-byte bounds check into a form the verifier does not learn from.)
    match frame.read::<2>(0) {
        Some(first) if first[0] & 1 == 0 => return Class::NotMulticast,
        Some(_) => {}
        None => return Class::Malformed,
    }
    let Some(eth) = frame.read::<ETH_HLEN>(0) else {
        return Class::Malformed;
    };
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
        key: GroupKey {
            group: v4_mapped(dst),
            source: v4_mapped([ip[12], ip[13], ip[14], ip[15]]),
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::*;

    const SRC4: [u8; 4] = [10, 0, 0, 1];
    const G4: [u8; 4] = [239, 1, 1, 1];
    const SRC6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const G6: [u8; 16] = [0xff, 0x3e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];

    fn class(frame: &[u8]) -> Class {
        classify(&frame)
    }

    fn data_key(c: Class) -> GroupKey {
        match c {
            Class::Data(d) => d.key,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn ipv4_multicast_data() {
        let f = udp4_frame(SRC4, G4, b"hello").build();
        let key = data_key(class(&f));
        assert_eq!(key.group, v4_mapped(G4));
        assert_eq!(key.source, v4_mapped(SRC4));
        assert!(key.is_v4());
    }

    #[test]
    fn ipv6_multicast_data() {
        let f = udp6_frame(SRC6, G6, b"hello").build();
        let key = data_key(class(&f));
        assert_eq!(key.group, G6);
        assert_eq!(key.source, SRC6);
        assert!(!key.is_v4());
    }

    #[test]
    fn unicast_and_broadcast_are_not_multicast() {
        let mut f = udp4_frame(SRC4, G4, b"x").build();
        f[0] = 0x02;
        assert_eq!(class(&f), Class::NotMulticast);
        f[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(class(&f), Class::NotMulticast);
    }

    #[test]
    fn multicast_mac_with_unicast_ip_or_non_ip_is_other() {
        let f = FrameBuilder::new(
            mac_v4(G4),
            0x0800,
            ipv4(SRC4, [10, 0, 0, 2], 17, 64, &udp(1, 2, b"x")),
        )
        .build();
        assert_eq!(class(&f), Class::Other);
        let lldp = FrameBuilder::new([0x01, 0x80, 0xc2, 0, 0, 0x0e], 0x88cc, vec![0; 46]).build();
        assert_eq!(class(&lldp), Class::Other);
    }

    #[test]
    fn igmp_and_mld_are_control() {
        assert_eq!(class(&igmp_v2_report(SRC4, G4).build()), Class::Control);
        assert_eq!(class(&mldv2_report(SRC6).build()), Class::Control);
        // MLDv1 reports go to the (global) group address itself.
        assert_eq!(class(&mldv1_report(SRC6, G6).build()), Class::Control);
    }

    #[test]
    fn link_local_groups_stay_local() {
        let f = udp4_frame(SRC4, [224, 0, 0, 251], b"mdns").build();
        assert_eq!(class(&f), Class::LinkLocal);
        let mut ff02 = G6;
        ff02[1] = 0x02;
        assert_eq!(class(&udp6_frame(SRC6, ff02, b"x").build()), Class::LinkLocal);
        ff02[1] = 0x01;
        assert_eq!(class(&udp6_frame(SRC6, ff02, b"x").build()), Class::LinkLocal);
        // 224.0.1.x is not link-local.
        assert!(matches!(class(&udp4_frame(SRC4, [224, 0, 1, 1], b"x").build()), Class::Data(_)));
    }

    #[test]
    fn vlan_and_qinq_tagged() {
        let f = udp4_frame(SRC4, G4, b"x").vlan(0x8100, 10).build();
        let Class::Data(d) = class(&f) else { panic!("expected data") };
        assert_eq!(d.l3_offset, ETH_HLEN + VLAN_HLEN);
        let f = udp6_frame(SRC6, G6, b"x").vlan(0x88a8, 100).vlan(0x8100, 10).build();
        let Class::Data(d) = class(&f) else { panic!("expected data") };
        assert_eq!(d.l3_offset, ETH_HLEN + 2 * VLAN_HLEN);
        // A third tag is beyond what we parse: the inner ethertype is a tag, so "other".
        let f = udp4_frame(SRC4, G4, b"x").vlan(0x88a8, 1).vlan(0x8100, 2).vlan(0x8100, 3).build();
        assert_eq!(class(&f), Class::Other);
    }

    #[test]
    fn ipv6_extension_headers_are_skipped() {
        let l4 = udp(1, 2, b"payload");
        let f = FrameBuilder::new(
            mac_v6(G6),
            0x86dd,
            ipv6(SRC6, G6, &[hop_by_hop_router_alert(), dest_opts(2), fragment(0)], 17, &l4),
        )
        .build();
        assert_eq!(data_key(class(&f)).group, G6);
        // MLD behind several extension headers is still control.
        let f = FrameBuilder::new(
            mac_v6(G6),
            0x86dd,
            ipv6(
                SRC6,
                G6,
                &[hop_by_hop_router_alert(), dest_opts(0)],
                58,
                &[131, 0, 0, 0, 0, 0, 0, 0],
            ),
        )
        .build();
        assert_eq!(class(&f), Class::Control);
        // A non-first fragment of ICMPv6 carries no ICMPv6 header: it is data.
        let f = FrameBuilder::new(
            mac_v6(G6),
            0x86dd,
            ipv6(SRC6, G6, &[fragment(8)], 58, &[131, 0, 0, 0]),
        )
        .build();
        assert!(matches!(class(&f), Class::Data(_)));
    }

    #[test]
    fn too_many_extension_headers_is_malformed() {
        let ext: Vec<_> = (0..MAX_IPV6_EXT_HEADERS + 1).map(|_| dest_opts(0)).collect();
        let f = FrameBuilder::new(mac_v6(G6), 0x86dd, ipv6(SRC6, G6, &ext, 17, &udp(1, 2, b"x")))
            .build();
        assert_eq!(class(&f), Class::Malformed);
    }

    #[test]
    fn bad_headers_are_malformed() {
        let mut f = udp4_frame(SRC4, G4, b"x").build();
        f[ETH_HLEN] = 0x44; // IHL 4
        assert_eq!(class(&f), Class::Malformed);
        let mut f = udp4_frame(SRC4, G4, b"x").build();
        f[ETH_HLEN] = 0x65; // version 6 in an IPv4 frame
        assert_eq!(class(&f), Class::Malformed);
        let mut f = udp6_frame(SRC6, G6, b"x").build();
        f[ETH_HLEN] = 0x40;
        assert_eq!(class(&f), Class::Malformed);
    }

    #[test]
    fn ethernet_padding_is_fine() {
        let mut f = udp4_frame(SRC4, G4, b"").build();
        f.resize(60, 0);
        assert!(matches!(class(&f), Class::Data(_)));
    }

    /// Every prefix of a valid multicast frame shorter than the whole is malformed (or, when
    /// the cut leaves no full Ethernet header, malformed too): never data, never a panic.
    #[test]
    fn truncated_frames_are_malformed_at_every_length() {
        let frames = [
            udp4_frame(SRC4, G4, b"0123456789").build(),
            udp4_frame(SRC4, G4, b"x").vlan(0x88a8, 1).vlan(0x8100, 2).build(),
            udp6_frame(SRC6, G6, b"0123456789").build(),
            FrameBuilder::new(
                mac_v6(G6),
                0x86dd,
                ipv6(SRC6, G6, &[hop_by_hop_router_alert(), dest_opts(1)], 17, &udp(1, 2, b"abc")),
            )
            .build(),
            igmp_v2_report(SRC4, G4).build(),
            mldv2_report(SRC6).build(),
        ];
        for f in &frames {
            for cut in 0..f.len() {
                assert_eq!(class(&f[..cut]), Class::Malformed, "cut at {cut} of {f:02x?}");
            }
        }
    }
}
