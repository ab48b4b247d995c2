//! Property tests of the shared classifier ([`relay_common::parse`]), in two layers:
//! - arbitrary bytes: no panic, the same verdict twice, no read beyond [`MAX_PARSE_OFFSET`]
//!   (plus the widest header read), and a data verdict whose offsets and addresses are those
//!   of the frame;
//! - structured frames from a model (Ethernet, 0-3 VLAN tags, IPv4 with options, IPv6 with 0-8
//!   extension headers, IGMP/MLD/UDP/other bodies, broken header fields, Ethernet padding,
//!   truncation): the verdict equals the one the model computes on its own, from the rules
//!   written in parse.rs's documentation rather than from its code.
//!
//! 256 cases per property (proptest's default); `PROPTEST_CASES=N` runs more. The invariants
//! of the first layer (invariants/mod.rs) are also what the `classify` fuzz target checks.

mod invariants;

use invariants::{be16, check_any_frame};
use proptest::{collection::vec, prelude::*, sample::Index};
use relay_common::{
    parse::{
        classify, is_mld_type, Class, Data, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP,
        ETH_P_IPV6, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMPV6,
        IPPROTO_IGMP, IPPROTO_NONE, IPPROTO_ROUTING, IPV4_MIN_HLEN, IPV6_HLEN,
        MAX_IPV6_EXT_HEADERS, MAX_PARSE_OFFSET, MAX_VLAN_TAGS, VLAN_HLEN,
    },
    v4_mapped, GroupKey,
};

/// Random bytes, half of them made to look like an IPv4 or IPv6 frame to a multicast MAC so
/// the deeper walks run.
fn arbitrary_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..80),
        (any::<bool>(), any::<bool>(), vec(any::<u8>(), ETH_HLEN + 1..600)).prop_map(
            |(v6, tagged, mut f)| {
                f[0] |= 1;
                let at = if tagged && f.len() > 20 {
                    f[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
                    16
                } else {
                    12
                };
                f[at..at + 2]
                    .copy_from_slice(&if v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be_bytes());
                f[at + 2] = if v6 { 0x60 } else { 0x45 };
                f
            }
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MacKind {
    Multicast,
    Unicast,
    Broadcast,
}

#[derive(Clone, Debug)]
enum Ext {
    HopByHop { router_alert: bool, units: u8 },
    DestOpts { units: u8 },
    Routing { units: u8 },
    Fragment { offset: u16 },
    Auth { units: u8 },
}

impl Ext {
    fn code(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => IPPROTO_HOPOPTS,
            Ext::DestOpts { .. } => IPPROTO_DSTOPTS,
            Ext::Routing { .. } => IPPROTO_ROUTING,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
            Ext::Auth { .. } => IPPROTO_AH,
        }
    }

    /// Length in bytes (RFC 8200 section 4; AH: RFC 4302 section 2.2).
    fn len(&self) -> usize {
        match self {
            Ext::HopByHop { units, .. } | Ext::DestOpts { units } | Ext::Routing { units } => {
                8 * (usize::from(*units) + 1)
            }
            Ext::Fragment { .. } => 8,
            Ext::Auth { units } => 4 * (usize::from(*units) + 2),
        }
    }

    /// How many of its first bytes a walk reads.
    fn probe(&self) -> usize {
        if matches!(self, Ext::Fragment { .. }) {
            4
        } else {
            2
        }
    }

    /// Whether this is a fragment other than the first (no upper-layer header follows).
    fn later_fragment(&self) -> bool {
        matches!(self, Ext::Fragment { offset } if *offset != 0)
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        let mut b = vec![0u8; self.len()];
        b[0] = next;
        match self {
            Ext::HopByHop { router_alert, units } => {
                b[1] = *units;
                let mut at = 2;
                if *router_alert {
                    b[2..6].copy_from_slice(&[5, 2, 0, 0]);
                    at = 6;
                }
                pad(&mut b[at..]);
            }
            Ext::DestOpts { units } => {
                b[1] = *units;
                pad(&mut b[2..]);
            }
            Ext::Routing { units } => b[1] = *units,
            Ext::Fragment { offset } => {
                b[2..4].copy_from_slice(&((offset << 3) | 1).to_be_bytes());
                b[4..8].copy_from_slice(&[0, 0, 0x12, 0x34]);
            }
            Ext::Auth { units } => b[1] = *units,
        }
        b
    }
}

/// Fills an options area with Pad1 or one PadN option.
fn pad(area: &mut [u8]) {
    if area.len() >= 2 {
        area[0] = 1;
        area[1] = (area.len() - 2) as u8;
    }
}

#[derive(Clone, Debug)]
enum L3 {
    V4 { src: [u8; 4], dst: [u8; 4], proto: u8, option_words: u8, body: Vec<u8> },
    V6 { src: [u8; 16], dst: [u8; 16], ext: Vec<Ext>, proto: u8, body: Vec<u8> },
    NonIp { ethertype: u16, body: Vec<u8> },
}

/// A header field made to contradict the rest.
#[derive(Clone, Copy, Debug)]
enum Corruption {
    None,
    /// Version nibble neither 4 nor 6.
    BadVersion(u8),
    /// IPv4 header length below 20 bytes.
    ShortHeader(u8),
    /// IPv4 total length below the header length.
    TotalBelowHeader,
    /// IPv4 total / IPv6 payload length longer by this much.
    Longer(u16),
}

#[derive(Clone, Debug)]
struct Spec {
    mac: MacKind,
    tags: Vec<u16>,
    l3: L3,
    corruption: Corruption,
    padding: Vec<u8>,
    cut: Option<Index>,
}

impl Spec {
    fn build(&self) -> Vec<u8> {
        let dst_mac = match (self.mac, &self.l3) {
            (MacKind::Unicast, _) => [0x02, 0, 0, 0, 0, 0x09],
            (MacKind::Broadcast, _) => [0xff; 6],
            (MacKind::Multicast, L3::V4 { dst, .. }) => {
                [0x01, 0x00, 0x5e, dst[1] & 0x7f, dst[2], dst[3]]
            }
            (MacKind::Multicast, L3::V6 { dst, .. }) => {
                [0x33, 0x33, dst[12], dst[13], dst[14], dst[15]]
            }
            (MacKind::Multicast, L3::NonIp { .. }) => [0x01, 0x80, 0xc2, 0, 0, 0x0e],
        };
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        for (vid, tpid) in self.tags.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(vid as u16 + 1).to_be_bytes());
        }
        let l3 = f.len() + 2;
        match &self.l3 {
            L3::V4 { src, dst, proto, option_words, body } => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let header_len = IPV4_MIN_HLEN + 4 * usize::from(*option_words);
                let total = (header_len + body.len()) as u16;
                f.extend_from_slice(&[0x40 | (header_len / 4) as u8, 0]);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 0, 1, *proto, 0, 0]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                if *option_words > 0 {
                    f.extend_from_slice(&[0x94, 0x04, 0, 0]); // router alert
                    f.extend(std::iter::repeat_n(1u8, 4 * usize::from(*option_words) - 4));
                }
                f.extend_from_slice(body);
            }
            L3::V6 { src, dst, ext, proto, body } => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ext_len: usize = ext.iter().map(Ext::len).sum();
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext_len + body.len()) as u16).to_be_bytes());
                f.push(ext.first().map_or(*proto, Ext::code));
                f.push(1);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                for (i, e) in ext.iter().enumerate() {
                    f.extend(e.bytes(ext.get(i + 1).map_or(*proto, Ext::code)));
                }
                f.extend_from_slice(body);
            }
            L3::NonIp { ethertype, body } => {
                f.extend_from_slice(&ethertype.to_be_bytes());
                f.extend_from_slice(body);
            }
        }
        let v4 = matches!(self.l3, L3::V4 { .. });
        let length_at = l3 + if v4 { 2 } else { 4 };
        match (self.corruption, &self.l3) {
            (_, L3::NonIp { .. }) | (Corruption::None, _) => {}
            (Corruption::BadVersion(v), _) => f[l3] = (v << 4) | (f[l3] & 0x0f),
            (Corruption::ShortHeader(ihl), L3::V4 { .. }) => f[l3] = 0x40 | ihl,
            (Corruption::TotalBelowHeader, L3::V4 { .. }) => {
                let short = (usize::from(f[l3] & 0x0f) * 4 - 1) as u16;
                f[length_at..length_at + 2].copy_from_slice(&short.to_be_bytes());
            }
            (Corruption::Longer(by), _) => {
                let longer =
                    u16::from_be_bytes([f[length_at], f[length_at + 1]]).saturating_add(by);
                f[length_at..length_at + 2].copy_from_slice(&longer.to_be_bytes());
            }
            (Corruption::ShortHeader(_) | Corruption::TotalBelowHeader, L3::V6 { .. }) => {}
        }
        f.extend_from_slice(&self.padding);
        if let Some(cut) = self.cut {
            f.truncate(cut.index(f.len()));
        }
        f
    }

    /// The verdict the classifier must reach on `f` (this spec's frame, maybe cut), from the
    /// documented rules: data that is VLAN-tagged, or whose destination MAC is not its group's
    /// (01:00:5e + low 23 bits, 33:33 + low 32 bits), is not relayed ("other").
    fn expected(&self, f: &[u8]) -> Class {
        match self.expected_by_headers(f) {
            Class::Data(d) => {
                let g = &d.key.group;
                let mapped = if d.ipv6 {
                    f[..6] == [0x33, 0x33, g[12], g[13], g[14], g[15]]
                } else {
                    f[..6] == [0x01, 0x00, 0x5e, g[13] & 0x7f, g[14], g[15]]
                };
                if self.tags.is_empty() && mapped {
                    Class::Data(d)
                } else {
                    Class::Other
                }
            }
            other => other,
        }
    }

    /// The verdict from the headers alone.
    fn expected_by_headers(&self, f: &[u8]) -> Class {
        if f.len() < 2 {
            return Class::Malformed;
        }
        if f[0] & 1 == 0 {
            return Class::NotMulticast;
        }
        if f.len() < ETH_HLEN {
            return Class::Malformed;
        }
        if f[..6] == [0xff; 6] {
            return Class::NotMulticast;
        }
        let tags = self.tags.len().min(MAX_VLAN_TAGS);
        let l3 = ETH_HLEN + VLAN_HLEN * tags;
        if f.len() < l3 {
            return Class::Malformed;
        }
        if self.tags.len() > MAX_VLAN_TAGS {
            return Class::Other; // the ethertype read is a TPID
        }
        match &self.l3 {
            L3::NonIp { .. } => Class::Other,
            L3::V4 { src, dst, proto, .. } => {
                if f.len() < l3 + IPV4_MIN_HLEN {
                    return Class::Malformed;
                }
                let (version, header_len, total) =
                    (f[l3] >> 4, usize::from(f[l3] & 0x0f) * 4, be16(f, l3 + 2));
                if version != 4 || header_len < IPV4_MIN_HLEN || total < header_len {
                    return Class::Malformed;
                }
                if l3 + total > f.len() {
                    return Class::Malformed;
                }
                if dst[0] & 0xf0 != 0xe0 {
                    Class::Other
                } else if *proto == IPPROTO_IGMP {
                    Class::Control
                } else if dst[..3] == [224, 0, 0] {
                    Class::LinkLocal
                } else {
                    Class::Data(Data {
                        key: GroupKey { group: v4_mapped(*dst), source: v4_mapped(*src) },
                        l3_offset: l3,
                        ipv6: false,
                    })
                }
            }
            L3::V6 { src, dst, ext, proto, .. } => {
                if f.len() < l3 + IPV6_HLEN || f[l3] >> 4 != 6 {
                    return Class::Malformed;
                }
                if l3 + IPV6_HLEN + be16(f, l3 + 4) > f.len() {
                    return Class::Malformed;
                }
                if dst[0] != 0xff {
                    return Class::Other;
                }
                // The walk: at most MAX_IPV6_EXT_HEADERS headers, none starting beyond
                // MAX_PARSE_OFFSET; the offset is also checked before looking at the upper
                // layer while fewer than the maximum were skipped.
                let mut off = l3 + IPV6_HLEN;
                let mut upper = *proto;
                let mut skipped = 0;
                for e in ext {
                    if skipped == MAX_IPV6_EXT_HEADERS || off > MAX_PARSE_OFFSET {
                        return Class::Malformed;
                    }
                    if off + e.probe() > f.len() {
                        return Class::Malformed;
                    }
                    off += e.len();
                    skipped += 1;
                    if e.later_fragment() {
                        upper = IPPROTO_NONE;
                        break;
                    }
                }
                if skipped < MAX_IPV6_EXT_HEADERS && off > MAX_PARSE_OFFSET {
                    return Class::Malformed;
                }
                if upper == IPPROTO_ICMPV6 {
                    if off > MAX_PARSE_OFFSET || off + 2 > f.len() {
                        return Class::Malformed;
                    }
                    // Read from the frame: Ethernet padding counts.
                    if is_mld_type(f[off]) {
                        return Class::Control;
                    }
                }
                if dst[1] & 0x0f <= 2 {
                    Class::LinkLocal
                } else {
                    Class::Data(Data {
                        key: GroupKey { group: *dst, source: *src },
                        l3_offset: l3,
                        ipv6: true,
                    })
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn v4_destination() -> impl Strategy<Value = [u8; 4]> {
    prop_oneof![
        4 => (224u8..=239, any::<[u8; 3]>()).prop_map(|(a, r)| [a, r[0], r[1], r[2]]),
        2 => any::<u8>().prop_map(|d| [224, 0, 0, d]),
        1 => (1u8..224, any::<[u8; 3]>()).prop_map(|(a, r)| [a, r[0], r[1], r[2]]),
        1 => (240u8..=255, any::<[u8; 3]>()).prop_map(|(a, r)| [a, r[0], r[1], r[2]]),
    ]
}

fn v6_destination() -> impl Strategy<Value = [u8; 16]> {
    prop_oneof![
        6 => (any::<u8>(), any::<[u8; 14]>()).prop_map(|(flags_scope, rest)| {
            let mut a = [0xff; 16];
            a[1] = flags_scope;
            a[2..].copy_from_slice(&rest);
            a
        }),
        1 => any::<[u8; 16]>().prop_map(|mut a| {
            a[0] = 0x20;
            a
        }),
    ]
}

fn extension_header() -> impl Strategy<Value = Ext> {
    prop_oneof![
        3 => (any::<bool>(), 0u8..3).prop_map(|(router_alert, units)| Ext::HopByHop { router_alert, units }),
        3 => (0u8..4).prop_map(|units| Ext::DestOpts { units }),
        1 => (0u8..3).prop_map(|units| Ext::Routing { units }),
        2 => prop_oneof![Just(0u16), 1u16..8192].prop_map(|offset| Ext::Fragment { offset }),
        1 => (1u8..6).prop_map(|units| Ext::Auth { units }),
        // Large ones push what follows beyond MAX_PARSE_OFFSET.
        1 => (60u8..=255).prop_map(|units| Ext::DestOpts { units }),
    ]
}

/// An upper-layer body: MLD and other ICMPv6 types first, or anything.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            prop_oneof![
                Just(130u8),
                Just(131),
                Just(132),
                Just(143),
                Just(151),
                Just(128),
                Just(0x16),
                any::<u8>()
            ],
            vec(any::<u8>(), 0..32)
        )
            .prop_map(|(first, mut rest)| {
                rest.insert(0, first);
                rest
            }),
        Just(Vec::new()),
    ]
}

fn network_layer() -> impl Strategy<Value = L3> {
    let v4 = (
        any::<[u8; 4]>(),
        v4_destination(),
        prop_oneof![Just(IPPROTO_IGMP), Just(17u8), Just(103u8), Just(6u8), any::<u8>()],
        prop_oneof![3 => Just(0u8), 1 => 1u8..=10],
        body(),
    )
        .prop_map(|(src, dst, proto, option_words, body)| L3::V4 {
            src,
            dst,
            proto,
            option_words,
            body,
        });
    let v6 = (
        any::<[u8; 16]>(),
        v6_destination(),
        vec(extension_header(), 0..=8),
        prop_oneof![
            Just(IPPROTO_ICMPV6),
            Just(17u8),
            Just(103u8),
            Just(6u8),
            Just(IPPROTO_NONE),
            Just(IPPROTO_IGMP)
        ],
        body(),
    )
        .prop_map(|(src, dst, ext, proto, body)| L3::V6 { src, dst, ext, proto, body });
    let non_ip = (
        any::<u16>().prop_filter("not IP or a VLAN tag", |t| {
            ![ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD].contains(t)
        }),
        vec(any::<u8>(), 0..46),
    )
        .prop_map(|(ethertype, body)| L3::NonIp { ethertype, body });
    prop_oneof![4 => v4, 5 => v6, 1 => non_ip]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![8 => Just(MacKind::Multicast), 1 => Just(MacKind::Unicast), 1 => Just(MacKind::Broadcast)],
        vec(prop_oneof![Just(ETH_P_8021Q), Just(ETH_P_8021AD)], 0..=3),
        network_layer(),
        prop_oneof![
            12 => Just(Corruption::None),
            1 => prop_oneof![0u8..4, 5u8..6, 7u8..16].prop_map(Corruption::BadVersion),
            1 => (0u8..5).prop_map(Corruption::ShortHeader),
            1 => Just(Corruption::TotalBelowHeader),
            1 => (1u16..64).prop_map(Corruption::Longer),
        ],
        prop_oneof![3 => Just(Vec::new()), 1 => vec(any::<u8>(), 1..32)],
        prop_oneof![4 => Just(None), 1 => any::<Index>().prop_map(Some)],
    )
        .prop_map(|(mac, tags, l3, corruption, padding, cut)| Spec {
            mac,
            tags,
            l3,
            corruption,
            padding,
            cut,
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_keep_the_invariants(f in arbitrary_frame()) {
        check_any_frame(&f);
    }

    #[test]
    fn structured_frames_get_the_model_verdict(spec in spec()) {
        let f = spec.build();
        prop_assert_eq!(classify(&f.as_slice()), spec.expected(&f), "frame {:02x?}", f);
        check_any_frame(&f);
    }

    /// A valid frame with one byte changed still keeps the invariants.
    #[test]
    fn mutated_frames_keep_the_invariants(
        spec in spec(),
        at in any::<Index>(),
        value in any::<u8>(),
    ) {
        let mut f = spec.build();
        if !f.is_empty() {
            let i = at.index(f.len());
            f[i] = value;
        }
        check_any_frame(&f);
    }
}
