//! What must hold when the shared classifier ([`relay_common::parse`]) looks at any byte
//! string: no panic, the same verdict twice and through another `Frame` impl, no read beyond
//! [`MAX_PARSE_OFFSET`] (plus the widest header read), a data verdict whose offsets and
//! addresses are those of the frame, and header walks that stay inside it.
//!
//! Shared by the property tests (classify_props.rs) and the `classify` fuzz target
//! (fuzz/fuzz_targets/classify.rs, which includes this file by path): it panics on a violation.

use std::cell::Cell;

use relay_common::{
    parse::{
        classify, ipv4_header, ipv6_header, ipv6_upper_layer, link_layer, Class, Data, Frame,
        ETH_HLEN, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_IGMP,
        IPPROTO_ROUTING, IPV4_MIN_HLEN, IPV6_HLEN, MAX_IPV6_EXT_HEADERS, MAX_PARSE_OFFSET,
        MAX_VLAN_TAGS, VLAN_HLEN,
    },
    v4_mapped,
};

/// The widest single read the walks make at an offset they have bounded (a fragment header's
/// first four bytes).
const WIDEST_BOUNDED_READ: usize = 4;

/// A slice-backed frame that remembers the furthest byte any read asked for.
struct Recording<'a> {
    bytes: &'a [u8],
    furthest: Cell<usize>,
}

impl Frame for Recording<'_> {
    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.furthest.set(self.furthest.get().max(offset.saturating_add(N)));
        self.bytes.read::<N>(offset)
    }
}

pub fn be16(f: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([f[at], f[at + 1]]))
}

/// Checks every invariant on `f`; panics with the frame on a violation.
pub fn check_any_frame(f: &[u8]) {
    let class = classify(&f);
    assert_eq!(classify(&f), class, "same bytes, same verdict");
    let recording = Recording { bytes: f, furthest: Cell::new(0) };
    assert_eq!(classify(&recording), class, "the verdict does not depend on the Frame impl");
    assert!(
        recording.furthest.get() <= MAX_PARSE_OFFSET + WIDEST_BOUNDED_READ,
        "read up to byte {} of {f:02x?}",
        recording.furthest.get()
    );
    if f.len() >= 2 && f[0] & 1 == 0 {
        assert_eq!(class, Class::NotMulticast);
    }
    if f.len() < ETH_HLEN && f.first().is_some_and(|b| b & 1 == 1) {
        assert_eq!(class, Class::Malformed);
    }
    if let Class::Data(Data { key, l3_offset: l3, ipv6 }) = class {
        assert!([ETH_HLEN, ETH_HLEN + VLAN_HLEN, ETH_HLEN + 2 * VLAN_HLEN].contains(&l3));
        assert_eq!(be16(f, l3 - 2), if ipv6 { 0x86dd } else { 0x0800 }, "ethertype");
        if ipv6 {
            assert_eq!(f[l3] >> 4, 6);
            assert!(l3 + IPV6_HLEN + be16(f, l3 + 4) <= f.len(), "payload inside the frame");
            assert_eq!(key.source[..], f[l3 + 8..l3 + 24]);
            assert_eq!(key.group[..], f[l3 + 24..l3 + 40]);
            assert_eq!(key.group[0], 0xff);
            assert!(key.group[1] & 0x0f > 2, "not interface- or link-local scope");
        } else {
            let header_len = usize::from(f[l3] & 0x0f) * 4;
            assert_eq!(f[l3] >> 4, 4);
            assert!(header_len >= IPV4_MIN_HLEN && header_len <= be16(f, l3 + 2));
            assert!(l3 + be16(f, l3 + 2) <= f.len(), "packet inside the frame");
            assert_ne!(f[l3 + 9], IPPROTO_IGMP);
            let (source, group) = (&f[l3 + 12..l3 + 16], &f[l3 + 16..l3 + 20]);
            assert_eq!(key.source, v4_mapped([source[0], source[1], source[2], source[3]]));
            assert_eq!(key.group, v4_mapped([group[0], group[1], group[2], group[3]]));
            assert!(key.is_v4() && group[0] & 0xf0 == 0xe0 && group[..3] != [224, 0, 0]);
        }
    }
    check_walks(f);
}

/// Invariants of the header walks on their own.
fn check_walks(f: &[u8]) {
    let Some(eth) = f.read::<ETH_HLEN>(0) else { return };
    let Ok(l2) = link_layer(&f, &eth) else {
        assert!(f.len() < ETH_HLEN + MAX_VLAN_TAGS * VLAN_HLEN, "a tag can only be cut short");
        return;
    };
    assert!(l2.l3_offset <= ETH_HLEN + MAX_VLAN_TAGS * VLAN_HLEN && l2.l3_offset <= f.len());
    let l3 = l2.l3_offset;
    if let Ok(ip) = ipv4_header(&f, l3) {
        assert!(ip.header_len >= IPV4_MIN_HLEN && ip.header_len <= ip.total_len);
        assert!(l3 + ip.total_len <= f.len());
    }
    if let Ok(ip) = ipv6_header(&f, l3) {
        assert!(l3 + IPV6_HLEN + ip.payload_len <= f.len());
        let start = l3 + IPV6_HLEN;
        if let Ok(upper) = ipv6_upper_layer(&f, ip.next_header(), start) {
            // At most MAX_IPV6_EXT_HEADERS headers of at most 2048 bytes each.
            assert!(upper.offset >= start && upper.offset - start <= MAX_IPV6_EXT_HEADERS * 2048);
            assert!(!matches!(
                upper.protocol,
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
            ));
            assert_eq!(upper.offset == start, upper.protocol == ip.next_header());
        }
    }
}
