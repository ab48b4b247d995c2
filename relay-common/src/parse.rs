//! Frame parsing shared by the XDP program, the control plane and the host tests.
//!
//! Everything reads a frame through the [`Frame`] trait: the kernel side implements it with
//! bounds-checked reads between `data` and `data_end`, the host side with a byte slice, so the
//! exact same code is unit-tested here and verified in the kernel. Two layers:
//! - header walks ([`link_layer`], [`ipv4_header`], [`ipv6_header`], [`ipv6_upper_layer`]) find
//!   the upper-layer protocol and its offset. The XDP program and the control plane's IGMP/MLD
//!   parser (`relay::membership::packet`) both use them, so the limits below hold for both;
//! - [`classify`], the XDP program's verdict on a frame, built on the walks.
//!
//! All offsets stay below [`MAX_PARSE_OFFSET`] and every loop has a constant bound, which keeps
//! the verifier happy.

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
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
// IPv6 extension headers (RFC 8200 section 4) that the walk skips.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// "No next header": what a non-first fragment is treated as, having no upper-layer header.
pub const IPPROTO_NONE: u8 = 59;

/// VLAN tags parsed at most (802.1ad outer + 802.1Q inner), by the XDP program and by the
/// control plane alike.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers skipped at most before giving up (counted as malformed by the XDP
/// program, rejected as "too many extension headers" by the control plane).
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Parsing never looks further into a frame than this.
pub const MAX_PARSE_OFFSET: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Header walks: the part of parsing both sides share. `classify` builds its verdict on them and
// so does the control plane's IGMP/MLD parser (`relay::membership::packet`), which then reads the
// message body. They are `#[inline(always)]` so the kernel program compiles to one function.

/// Why a header walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// A header runs past the end of the frame, or past the length the IP header declares.
    Truncated,
    /// An IP header contradicts itself: wrong version, header length below the minimum, or a
    /// total length shorter than the header.
    Invalid,
    /// More than [`MAX_IPV6_EXT_HEADERS`] extension headers, or one that would start beyond
    /// [`MAX_PARSE_OFFSET`].
    TooManyExtensionHeaders,
}

/// Where the network-layer header of a frame starts, once VLAN tags are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkLayer {
    /// The innermost EtherType read. Still a VLAN TPID when the frame has more than
    /// [`MAX_VLAN_TAGS`] tags.
    pub ethertype: u16,
    /// Offset of the first byte after the Ethernet header and the tags skipped.
    pub l3_offset: usize,
}

/// Skips the VLAN tags (802.1Q or 802.1ad, at most [`MAX_VLAN_TAGS`]) that follow the Ethernet
/// header `eth`, which the caller has already read from the start of `frame`.
#[inline(always)]
pub fn link_layer<F: Frame>(frame: &F, eth: &[u8; ETH_HLEN]) -> Result<LinkLayer, HeaderError> {
    skip_vlan_tags(frame, [eth[12], eth[13]])
}

/// [`link_layer`] given only the Ethernet header's EtherType (network order): the classifier
/// reads just the fields it tests, not the whole header.
#[inline(always)]
fn skip_vlan_tags<F: Frame>(frame: &F, ethertype: [u8; 2]) -> Result<LinkLayer, HeaderError> {
    let mut ethertype = u16::from_be_bytes(ethertype);
    let mut l3_offset = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS && (ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD) {
        let Some(tag) = frame.read::<VLAN_HLEN>(l3_offset) else {
            return Err(HeaderError::Truncated);
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        l3_offset += VLAN_HLEN;
        tags += 1;
    }
    Ok(LinkLayer { ethertype, l3_offset })
}

/// A checked IPv4 header: the fixed part and the two lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    /// The first 20 bytes (options, if any, follow in the frame).
    pub fixed: [u8; IPV4_MIN_HLEN],
    /// Header length in bytes, options included (at least 20).
    pub header_len: usize,
    /// Total length in bytes (at least `header_len`); the frame holds all of it.
    pub total_len: usize,
}

impl Ipv4Header {
    /// Protocol field.
    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        self.fixed[9]
    }

    /// Source address, network order.
    #[inline(always)]
    pub fn source(&self) -> [u8; 4] {
        [self.fixed[12], self.fixed[13], self.fixed[14], self.fixed[15]]
    }

    /// Destination address, network order.
    #[inline(always)]
    pub fn destination(&self) -> [u8; 4] {
        [self.fixed[16], self.fixed[17], self.fixed[18], self.fixed[19]]
    }
}

/// Reads and checks the IPv4 header at `l3`: version 4, a header length of at least 20 bytes,
/// a total length that covers the header and fits in the frame (Ethernet padding after it is
/// fine).
#[inline(always)]
pub fn ipv4_header<F: Frame>(frame: &F, l3: usize) -> Result<Ipv4Header, HeaderError> {
    let Some(fixed) = frame.read::<IPV4_MIN_HLEN>(l3) else {
        return Err(HeaderError::Truncated);
    };
    let header_len = usize::from(fixed[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if fixed[0] >> 4 != 4 || header_len < IPV4_MIN_HLEN || total_len < header_len {
        return Err(HeaderError::Invalid);
    }
    if l3 + total_len > frame.len() {
        return Err(HeaderError::Truncated);
    }
    Ok(Ipv4Header { fixed, header_len, total_len })
}

/// A checked IPv6 fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Header {
    /// The 40 bytes of the fixed header.
    pub fixed: [u8; IPV6_HLEN],
    /// Payload length in bytes (extension headers included); the frame holds all of it.
    pub payload_len: usize,
}

impl Ipv6Header {
    /// Next-header field of the fixed header.
    #[inline(always)]
    pub fn next_header(&self) -> u8 {
        self.fixed[6]
    }

    /// Source address, network order.
    #[inline(always)]
    pub fn source(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.fixed[8..24]);
        a
    }

    /// Destination address, network order.
    #[inline(always)]
    pub fn destination(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.fixed[24..40]);
        a
    }
}

/// Reads and checks the IPv6 fixed header at `l3`: version 6 and a payload that fits in the
/// frame.
#[inline(always)]
pub fn ipv6_header<F: Frame>(frame: &F, l3: usize) -> Result<Ipv6Header, HeaderError> {
    let Some(fixed) = frame.read::<IPV6_HLEN>(l3) else {
        return Err(HeaderError::Truncated);
    };
    let payload_len = usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
    if fixed[0] >> 4 != 6 {
        return Err(HeaderError::Invalid);
    }
    if l3 + IPV6_HLEN + payload_len > frame.len() {
        return Err(HeaderError::Truncated);
    }
    Ok(Ipv6Header { fixed, payload_len })
}

/// The upper-layer header of an IPv6 packet, found behind its extension headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpperLayer {
    /// Protocol of the upper-layer header; [`IPPROTO_NONE`] for a non-first fragment.
    pub protocol: u8,
    /// Offset of the upper-layer header in the frame. Nothing has been read there yet: it may
    /// lie at or past the end of the frame.
    pub offset: usize,
    /// A fragment header was skipped on the way.
    pub fragment: bool,
}

/// Walks the IPv6 extension headers that start at `offset` (just after the fixed header) with
/// next-header value `next`, up to the upper-layer header.
///
/// Hop-by-hop, routing, fragment, destination-options and authentication headers are skipped,
/// at most [`MAX_IPV6_EXT_HEADERS`] of them; any other value is the upper-layer protocol. The
/// walk reads only the first bytes of each header (next header, length, fragment offset), so
/// it does not notice a header whose body runs past the packet: the caller checks
/// [`UpperLayer::offset`] before reading there.
#[inline(always)]
pub fn ipv6_upper_layer<F: Frame>(
    frame: &F,
    next: u8,
    offset: usize,
) -> Result<UpperLayer, HeaderError> {
    let mut next = next;
    let mut off = offset;
    let mut fragment = false;
    let mut skipped = 0;
    while skipped < MAX_IPV6_EXT_HEADERS {
        if off > MAX_PARSE_OFFSET {
            return Err(HeaderError::TooManyExtensionHeaders);
        }
        let len = match next {
            // Length in 8-byte units, not counting the first 8 bytes.
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(h) = frame.read::<2>(off) else {
                    return Err(HeaderError::Truncated);
                };
                next = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            // Always 8 bytes. Only the first fragment carries the upper-layer header.
            IPPROTO_FRAGMENT => {
                let Some(h) = frame.read::<4>(off) else {
                    return Err(HeaderError::Truncated);
                };
                next = h[0];
                fragment = true;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    next = IPPROTO_NONE;
                }
                8
            }
            // Length in 4-byte units, not counting the first 8 bytes.
            IPPROTO_AH => {
                let Some(h) = frame.read::<2>(off) else {
                    return Err(HeaderError::Truncated);
                };
                next = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            _ => break,
        };
        off += len;
        skipped += 1;
    }
    if skipped == MAX_IPV6_EXT_HEADERS
        && matches!(
            next,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
        )
    {
        return Err(HeaderError::TooManyExtensionHeaders);
    }
    Ok(UpperLayer { protocol: next, offset: off, fragment })
}

// ---------------------------------------------------------------------------------------------
// Classification (the XDP program's view of a frame)

/// What a frame is, as far as forwarding is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Destination MAC is unicast or broadcast: not ours, pass untouched and uncounted.
    NotMulticast,
    /// Multicast MAC but not IP multicast data that may be relayed: non-IP, IP to a unicast
    /// address, data whose destination MAC is not its group's (RFC 1112 / RFC 2464 mapping;
    /// 802.1D reserved MACs among them), and VLAN-tagged data (a trunk port's frames belong to
    /// their VLAN, never to the untagged segments).
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
    // The destination MAC and the EtherType, not the whole header: a 14-byte array costs a
    // byte-by-byte copy in the kernel program.
    // The EtherType first: once it is in, the destination MAC is too.
    let Some(ethertype) = frame.read::<2>(ETH_HLEN - 2) else {
        return Class::Malformed;
    };
    let Some(dst) = frame.read::<6>(0) else {
        return Class::Malformed;
    };
    if dst == [0xff; 6] {
        return Class::NotMulticast;
    }
    let Ok(l2) = skip_vlan_tags(frame, ethertype) else {
        return Class::Malformed;
    };
    let class = match l2.ethertype {
        ETH_P_IPV6 => classify_ipv6(frame, l2.l3_offset),
        ETH_P_IP => classify_ipv4(frame, l2.l3_offset),
        _ => return Class::Other,
    };
    // Tested by reference, `class` returned as it is: rebuilding it costs the kernel program a
    // copy of the whole value.
    if let Class::Data(data) = &class {
        if l2.l3_offset != ETH_HLEN || !dst_matches_group(&dst, data) {
            return Class::Other;
        }
    }
    class
}

/// Classifies an IP packet without a link-layer header (what an L3 device such as tun or
/// WireGuard receives), the way [`classify`] classifies an Ethernet frame: a unicast or
/// broadcast destination is [`Class::NotMulticast`], the rest as behind an Ethernet header.
#[inline(always)]
pub fn classify_ip<F: Frame>(frame: &F) -> Class {
    let Some(first) = frame.read::<2>(0) else {
        return Class::Malformed;
    };
    match first[0] >> 4 {
        4 => match frame.read::<2>(16) {
            Some(dst) if dst[0] & 0xf0 == 0xe0 => classify_ipv4(frame, 0),
            Some(_) => Class::NotMulticast,
            None => Class::Malformed,
        },
        6 => match frame.read::<2>(24) {
            Some(dst) if dst[0] == 0xff => classify_ipv6(frame, 0),
            Some(_) => Class::NotMulticast,
            None => Class::Malformed,
        },
        _ => Class::Other,
    }
}

/// The multicast MAC a group maps to (RFC 1112 6.4, RFC 2464 7): the destination of the
/// Ethernet header the TC program puts in front of a routed packet.
#[inline(always)]
pub fn group_mac(data: &Data) -> [u8; 6] {
    let g = &data.key.group;
    if data.ipv6 {
        [0x33, 0x33, g[12], g[13], g[14], g[15]]
    } else {
        [0x01, 0x00, 0x5e, g[13] & 0x7f, g[14], g[15]]
    }
}

/// Whether the destination MAC is the one the group maps to: `01:00:5e` and the low 23 bits of
/// an IPv4 group (RFC 1112 6.4), `33:33` and the low 32 bits of an IPv6 group (RFC 2464 7).
#[inline(always)]
pub fn mac_matches_group(eth: &[u8; ETH_HLEN], data: &Data) -> bool {
    dst_matches_group(&[eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]], data)
}

/// [`mac_matches_group`] given the destination MAC alone.
#[inline(always)]
fn dst_matches_group(dst: &[u8; 6], data: &Data) -> bool {
    let g = &data.key.group;
    if data.ipv6 {
        dst[0] == 0x33 && dst[1] == 0x33 && dst[2..6] == g[12..16]
    } else {
        dst[0] == 0x01
            && dst[1] == 0x00
            && dst[2] == 0x5e
            && dst[3] == g[13] & 0x7f
            && dst[4] == g[14]
            && dst[5] == g[15]
    }
}

#[inline(always)]
fn classify_ipv4<F: Frame>(frame: &F, l3: usize) -> Class {
    let Ok(ip) = ipv4_header(frame, l3) else {
        return Class::Malformed;
    };
    let dst = ip.destination();
    if dst[0] & 0xf0 != 0xe0 {
        return Class::Other;
    }
    if ip.protocol() == IPPROTO_IGMP {
        return Class::Control;
    }
    if dst[0] == 224 && dst[1] == 0 && dst[2] == 0 {
        return Class::LinkLocal;
    }
    Class::Data(Data {
        key: GroupKey { group: v4_mapped(dst), source: v4_mapped(ip.source()) },
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
    let Ok(ip) = ipv6_header(frame, l3) else {
        return Class::Malformed;
    };
    let dst = ip.destination();
    if dst[0] != 0xff {
        return Class::Other;
    }
    let Ok(upper) = ipv6_upper_layer(frame, ip.next_header(), l3 + IPV6_HLEN) else {
        return Class::Malformed;
    };
    if upper.protocol == IPPROTO_ICMPV6 {
        if upper.offset > MAX_PARSE_OFFSET {
            return Class::Malformed;
        }
        // Two bytes (type, code), never one: LLVM turns a one-byte bounds check into `>=`,
        // which the verifier does not use to widen the packet range.
        let Some(icmp) = frame.read::<2>(upper.offset) else {
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
    Class::Data(Data {
        key: GroupKey { group: dst, source: ip.source() },
        l3_offset: l3,
        ipv6: true,
    })
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
    fn ip_packets_without_ethernet_header() {
        let frame = udp4_frame(SRC4, G4, b"hello").build();
        let packet = &frame[ETH_HLEN..];
        match classify_ip(&packet) {
            Class::Data(d) => {
                assert_eq!((d.key.group, d.l3_offset, d.ipv6), (v4_mapped(G4), 0, false));
                assert_eq!(group_mac(&d), mac_v4(G4));
            }
            other => panic!("expected data, got {other:?}"),
        }
        let frame = udp6_frame(SRC6, G6, b"hello").build();
        match classify_ip(&&frame[ETH_HLEN..]) {
            Class::Data(d) => {
                assert_eq!((d.key.group, d.ipv6, group_mac(&d)), (G6, true, mac_v6(G6)))
            }
            other => panic!("expected data, got {other:?}"),
        }
        let report = igmp_v2_report(SRC4, G4).build();
        assert_eq!(classify_ip(&&report[ETH_HLEN..]), Class::Control);
        let unicast = ipv4(SRC4, [10, 0, 0, 2], 17, 64, &udp(1, 2, b"x"));
        assert_eq!(classify_ip(&unicast.as_slice()), Class::NotMulticast);
        assert_eq!(classify_ip(&&[0x45u8][..]), Class::Malformed);
        for cut in 0..packet.len() {
            assert_eq!(classify_ip(&&packet[..cut]), Class::Malformed, "cut at {cut}");
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
        // Tagged data belongs to its VLAN: never relayed as if it were untagged.
        let f = udp4_frame(SRC4, G4, b"x").vlan(0x8100, 10).build();
        assert_eq!(class(&f), Class::Other);
        let f = udp6_frame(SRC6, G6, b"x").vlan(0x88a8, 100).vlan(0x8100, 10).build();
        assert_eq!(class(&f), Class::Other);
        // Tagged IGMP is still control (the stack hands it to the VLAN's interface).
        let f = igmp_v2_report(SRC4, G4).vlan(0x8100, 10).build();
        assert_eq!(class(&f), Class::Control);
        // A third tag is beyond what we parse: the inner ethertype is a tag, so "other".
        let f = udp4_frame(SRC4, G4, b"x").vlan(0x88a8, 1).vlan(0x8100, 2).vlan(0x8100, 3).build();
        assert_eq!(class(&f), Class::Other);
    }

    #[test]
    fn data_to_another_mac_than_its_groups_is_not_relayed() {
        let udp = udp(5000, 5001, b"x");
        let to =
            |mac: [u8; 6]| FrameBuilder::new(mac, 0x0800, ipv4(SRC4, G4, 17, 64, &udp)).build();
        assert!(matches!(class(&to(mac_v4(G4))), Class::Data(_)));
        // 239.129.1.1 maps to the same MAC as 239.1.1.1 (23 bits): fine.
        let aliased = [239, 129, 1, 1];
        let f = FrameBuilder::new(mac_v4(G4), 0x0800, ipv4(SRC4, aliased, 17, 64, &udp)).build();
        assert!(matches!(class(&f), Class::Data(_)));
        assert_eq!(class(&to(mac_v4([239, 1, 1, 2]))), Class::Other);
        // 802.1D reserved (STP, LACP, LLDP...) and other multicast MACs.
        assert_eq!(class(&to([0x01, 0x80, 0xc2, 0, 0, 0x0e])), Class::Other);
        assert_eq!(class(&to([0x33, 0x33, 1, 1, 1, 1])), Class::Other);
        let f6 = FrameBuilder::new(mac_v4(G4), 0x86dd, ipv6(SRC6, G6, &[], 17, &udp)).build();
        assert_eq!(class(&f6), Class::Other);
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

    /// The Ethernet header of `f`, for calling [`link_layer`] directly.
    fn eth(f: &[u8]) -> [u8; ETH_HLEN] {
        let mut e = [0u8; ETH_HLEN];
        e.copy_from_slice(&f[..ETH_HLEN]);
        e
    }

    #[test]
    fn link_layer_skips_up_to_max_vlan_tags() {
        let untagged = udp4_frame(SRC4, G4, b"x");
        let cases = [
            (untagged.clone(), ETH_P_IP, ETH_HLEN),
            (untagged.clone().vlan(ETH_P_8021Q, 10), ETH_P_IP, ETH_HLEN + VLAN_HLEN),
            (untagged.clone().vlan(ETH_P_8021AD, 1).vlan(ETH_P_8021Q, 2), ETH_P_IP, 22),
            // One tag more than the limit: the walk stops at the third TPID.
            (
                untagged.clone().vlan(ETH_P_8021AD, 1).vlan(ETH_P_8021Q, 2).vlan(ETH_P_8021Q, 3),
                ETH_P_8021Q,
                ETH_HLEN + MAX_VLAN_TAGS * VLAN_HLEN,
            ),
        ];
        for (builder, ethertype, l3_offset) in cases {
            let f = builder.build();
            assert_eq!(link_layer(&f.as_slice(), &eth(&f)), Ok(LinkLayer { ethertype, l3_offset }));
        }
        // A tag cut short.
        let f = untagged.vlan(ETH_P_8021Q, 10).build();
        assert_eq!(link_layer(&&f[..ETH_HLEN + 2], &eth(&f)), Err(HeaderError::Truncated));
    }

    #[test]
    fn ip_header_errors_tell_truncation_from_contradiction() {
        let f = udp4_frame(SRC4, G4, b"x").build();
        assert!(ipv4_header(&f.as_slice(), ETH_HLEN).is_ok());
        assert_eq!(ipv4_header(&&f[..f.len() - 1], ETH_HLEN), Err(HeaderError::Truncated));
        assert_eq!(ipv4_header(&&f[..ETH_HLEN + 19], ETH_HLEN), Err(HeaderError::Truncated));
        let mut bad = f.clone();
        bad[ETH_HLEN] = 0x44; // IHL 4
        assert_eq!(ipv4_header(&bad.as_slice(), ETH_HLEN), Err(HeaderError::Invalid));
        let f = udp6_frame(SRC6, G6, b"x").build();
        assert!(ipv6_header(&f.as_slice(), ETH_HLEN).is_ok());
        assert_eq!(ipv6_header(&&f[..f.len() - 1], ETH_HLEN), Err(HeaderError::Truncated));
        let mut bad = f.clone();
        bad[ETH_HLEN] = 0x40;
        assert_eq!(ipv6_header(&bad.as_slice(), ETH_HLEN), Err(HeaderError::Invalid));
    }

    /// An MLDv1 report behind a hop-by-hop router alert and `dest` destination-options headers.
    fn mld_behind(dest: usize) -> Vec<u8> {
        let mut ext = vec![hop_by_hop_router_alert()];
        ext.extend((0..dest).map(|_| dest_opts(0)));
        let mut mld = vec![131, 0, 0, 0, 0, 0, 0, 0];
        mld.extend_from_slice(&G6);
        FrameBuilder::new(mac_v6(G6), 0x86dd, ipv6(SRC6, G6, &ext, IPPROTO_ICMPV6, &mld)).build()
    }

    fn walk(f: &[u8]) -> Result<UpperLayer, HeaderError> {
        ipv6_upper_layer(&f, f[ETH_HLEN + 6], ETH_HLEN + IPV6_HLEN)
    }

    #[test]
    fn extension_header_walk_up_to_and_past_the_limit() {
        for headers in 1..=MAX_IPV6_EXT_HEADERS {
            let f = mld_behind(headers - 1);
            let offset = ETH_HLEN + IPV6_HLEN + 8 * headers;
            assert_eq!(
                walk(&f),
                Ok(UpperLayer { protocol: IPPROTO_ICMPV6, offset, fragment: false }),
                "{headers} extension headers"
            );
            assert_eq!(class(&f), Class::Control, "{headers} extension headers");
        }
        for headers in MAX_IPV6_EXT_HEADERS + 1..=MAX_IPV6_EXT_HEADERS + 2 {
            let f = mld_behind(headers - 1);
            assert_eq!(walk(&f), Err(HeaderError::TooManyExtensionHeaders), "{headers}");
            assert_eq!(class(&f), Class::Malformed, "{headers} extension headers");
        }
        // An extension header cut short.
        let f = mld_behind(2);
        let cut = ETH_HLEN + IPV6_HLEN + 8 * 2 + 1;
        assert_eq!(walk(&f[..cut]), Err(HeaderError::Truncated));
    }

    #[test]
    fn extension_header_walk_stops_beyond_max_parse_offset() {
        // A hop-by-hop header of 2048 bytes puts the next header beyond MAX_PARSE_OFFSET.
        let mut big = vec![0u8; 2048];
        big[1] = 255;
        let ext = [(0, big), dest_opts(0)];
        let f = FrameBuilder::new(mac_v6(G6), 0x86dd, ipv6(SRC6, G6, &ext, 17, &udp(1, 2, b"x")))
            .build();
        assert_eq!(walk(&f), Err(HeaderError::TooManyExtensionHeaders));
        assert_eq!(class(&f), Class::Malformed);
    }

    /// The walk looks through a first fragment and reports it; a later fragment has no
    /// upper-layer header. (The control plane refuses both; the classifier does not.)
    #[test]
    fn extension_header_walk_reports_fragments() {
        let mld = [131, 0, 0, 0];
        for (offset, protocol) in [(0, IPPROTO_ICMPV6), (8, IPPROTO_NONE)] {
            let ext = [hop_by_hop_router_alert(), fragment(offset)];
            let f = FrameBuilder::new(mac_v6(G6), 0x86dd, ipv6(SRC6, G6, &ext, 58, &mld)).build();
            let upper = walk(&f).expect("walk");
            assert_eq!((upper.protocol, upper.fragment), (protocol, true), "offset {offset}");
        }
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
