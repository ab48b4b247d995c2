//! Property tests of the IGMP/MLD parser and builder, and of its relation to the XDP
//! classifier (the one the `classifier_agrees_*` tests in tests.rs document):
//! - every message the builder can express parses back to itself, with 0 to
//!   [`MAX_VLAN_TAGS`] VLAN tags and without an Ethernet header, and the classifier calls its
//!   frame control (IGMP, MLD) or link-local (PIM hellos, MLD router advertisements);
//! - every prefix of such a frame is refused as truncated and classified malformed;
//! - after random byte changes, whatever the parser still accepts rebuilds to a frame that
//!   parses to the same message, is never classified as data or malformed, and a frame the
//!   classifier calls malformed is refused.
//!
//! 256 cases per property (proptest's default); `PROPTEST_CASES=N` runs more.

use proptest::{collection::vec, prelude::*, sample::Index};
use relay_common::{
    frames::{FrameBuilder, SRC_MAC},
    parse::{
        classify, Class, ETH_P_8021AD, ETH_P_8021Q, IPPROTO_DSTOPTS, MAX_IPV6_EXT_HEADERS,
        MAX_PARSE_OFFSET, MAX_VLAN_TAGS,
    },
};

use super::*;

/// The source MAC of built frames: the one [`FrameBuilder`] writes, so [`tagged`] keeps it.
const MAC: [u8; 6] = SRC_MAC;

fn v4_any() -> impl Strategy<Value = IpAddr> {
    any::<[u8; 4]>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
}

fn v4_group() -> impl Strategy<Value = IpAddr> {
    (224u8..=239, any::<[u8; 3]>())
        .prop_map(|(a, r)| IpAddr::V4(Ipv4Addr::new(a, r[0], r[1], r[2])))
}

fn v6_any() -> impl Strategy<Value = IpAddr> {
    any::<[u8; 16]>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
}

fn v6_group() -> impl Strategy<Value = IpAddr> {
    (any::<u8>(), any::<[u8; 14]>()).prop_map(|(flags_scope, rest)| {
        let mut a = [0xff; 16];
        a[1] = flags_scope;
        a[2..].copy_from_slice(&rest);
        IpAddr::V6(Ipv6Addr::from(a))
    })
}

/// fe80::/64 with any interface identifier.
fn v6_link_local() -> impl Strategy<Value = IpAddr> {
    any::<[u8; 8]>().prop_map(|iid| {
        let mut a = [0u8; 16];
        a[..2].copy_from_slice(&[0xfe, 0x80]);
        a[8..].copy_from_slice(&iid);
        IpAddr::V6(Ipv6Addr::from(a))
    })
}

fn records(
    group: BoxedStrategy<IpAddr>,
    source: BoxedStrategy<IpAddr>,
) -> impl Strategy<Value = Vec<GroupRecord>> {
    vec(
        (1u8..=6, group, vec(source, 0..4)).prop_map(|(kind, group, sources)| GroupRecord {
            kind: RecordType::from_u8(kind).unwrap_or(RecordType::IsInclude),
            group,
            sources,
        }),
        0..4,
    )
}

/// The fields of an IGMPv3 / MLDv2 query that only those versions carry, on wire values so
/// they survive the round trip exactly.
fn v3_fields() -> impl Strategy<Value = (bool, u8, Duration)> {
    (any::<bool>(), 0u8..=7, any::<u8>()).prop_map(|(suppress, qrv, qqic)| {
        (suppress, qrv, Duration::from_secs(u64::from(decode_code8(qqic))))
    })
}

fn igmp_query() -> impl Strategy<Value = Query> {
    let general = |version, max_resp| Query {
        version,
        group: None,
        max_resp,
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: Vec::new(),
    };
    prop_oneof![
        Just(general(QueryVersion::IgmpV1, Duration::ZERO)),
        (prop::option::of(v4_group()), 1u64..=255).prop_map(move |(group, ds)| Query {
            group,
            ..general(QueryVersion::IgmpV2, Duration::from_millis(ds * 100))
        }),
        (prop::option::of(v4_group()), any::<u8>(), v3_fields(), vec(v4_any(), 0..6)).prop_map(
            move |(group, code, (suppress, qrv, qqi), sources)| Query {
                group,
                suppress,
                qrv,
                qqi,
                sources,
                ..general(
                    QueryVersion::IgmpV3,
                    Duration::from_millis(u64::from(decode_code8(code)) * 100)
                )
            }
        ),
    ]
}

fn mld_query() -> impl Strategy<Value = Query> {
    prop_oneof![
        (prop::option::of(v6_group()), any::<u16>()).prop_map(|(group, ms)| Query {
            version: QueryVersion::MldV1,
            group,
            max_resp: Duration::from_millis(u64::from(ms)),
            suppress: false,
            qrv: 0,
            qqi: Duration::ZERO,
            sources: Vec::new(),
        }),
        (prop::option::of(v6_group()), any::<u16>(), v3_fields(), vec(v6_any(), 0..4)).prop_map(
            |(group, code, (suppress, qrv, qqi), sources)| Query {
                version: QueryVersion::MldV2,
                group,
                max_resp: Duration::from_millis(u64::from(decode_code16(code))),
                suppress,
                qrv,
                qqi,
                sources,
            }
        ),
    ]
}

/// Every kind of message the builder can express, with addresses its envelope rules accept.
fn message() -> impl Strategy<Value = Message> {
    let v4 = (
        v4_any(),
        prop_oneof![
            igmp_query().prop_map(MessageKind::Query),
            v4_group().prop_map(|group| MessageKind::V1Report { group }),
            v4_group().prop_map(|group| MessageKind::V2Report { group }),
            v4_group().prop_map(|group| MessageKind::Leave { group }),
            records(v4_group().boxed(), v4_any().boxed())
                .prop_map(|records| MessageKind::V3Report { records }),
            Just(MessageKind::PimHello),
            Just(MessageKind::RouterAdvertisement),
        ],
    )
        .prop_map(|(source, kind)| Message { source, kind });
    let v6_router = (
        v6_link_local(),
        prop_oneof![
            mld_query().prop_map(MessageKind::Query),
            Just(MessageKind::PimHello),
            Just(MessageKind::RouterAdvertisement),
        ],
    );
    // Reports and dones may also come from :: (RFC 3810 5.2.13).
    let v6_host = (
        prop_oneof![3 => v6_link_local(), 1 => Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED))],
        prop_oneof![
            v6_group().prop_map(|group| MessageKind::V2Report { group }),
            v6_group().prop_map(|group| MessageKind::Leave { group }),
            records(v6_group().boxed(), v6_any().boxed())
                .prop_map(|records| MessageKind::V3Report { records }),
        ],
    );
    prop_oneof![
        v4,
        prop_oneof![v6_router, v6_host].prop_map(|(source, kind)| Message { source, kind }),
    ]
}

/// `frame` (built here, so from [`MAC`]) with VLAN tags after the MAC addresses, outermost
/// first.
fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let dst = frame[..6].try_into().expect("an Ethernet header");
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut builder = FrameBuilder::new(dst, ethertype, frame[14..].to_vec());
    for (vid, tpid) in tpids.iter().enumerate() {
        builder = builder.vlan(*tpid, vid as u16 + 1);
    }
    builder.build()
}

fn vlan_tags() -> impl Strategy<Value = Vec<u16>> {
    vec(prop_oneof![Just(ETH_P_8021Q), Just(ETH_P_8021AD)], 0..=MAX_VLAN_TAGS)
}

/// What the classifier says about an accepted membership frame to a multicast MAC (as in
/// tests.rs): IGMP and MLD are control; PIM hellos and MLD router advertisements (not an MLD
/// type) go to link-local groups.
fn expected_class(m: &Message) -> Class {
    match (&m.kind, Family::of(&m.source)) {
        (MessageKind::PimHello, _) | (MessageKind::RouterAdvertisement, Family::V6) => {
            Class::LinkLocal
        }
        _ => Class::Control,
    }
}

/// The relation between the two sides on any frame.
fn check_agreement(f: &[u8]) -> Result<(), TestCaseError> {
    let parsed = parse(f);
    let class = classify(&f);
    if let Ok(m) = &parsed {
        prop_assert!(
            !matches!(class, Class::Data(_) | Class::Malformed),
            "accepted {m:?} but classified {class:?}: {f:02x?}"
        );
        if let Ok(rebuilt) = build(MAC, m) {
            prop_assert_eq!(parse(&rebuilt), Ok(m.clone()), "rebuilt {:02x?}", rebuilt);
            prop_assert_eq!(parse_ip(&rebuilt[14..]), Ok(m.clone()));
        }
    }
    if class == Class::Malformed {
        prop_assert!(parsed.is_err(), "classified malformed but accepted: {f:02x?}");
    }
    Ok(())
}

proptest! {
    #[test]
    fn built_messages_parse_back_to_themselves(m in message(), tags in vlan_tags()) {
        let frame = build(MAC, &m).expect("build");
        prop_assert_eq!(parse_ip(&frame[14..]), Ok(m.clone()));
        let f = tagged(&frame, &tags);
        prop_assert_eq!(parse(&f), Ok(m.clone()));
        prop_assert_eq!(classify(&f.as_slice()), expected_class(&m));
    }

    #[test]
    fn every_prefix_is_truncated_and_malformed(m in message(), tags in vlan_tags(), cut in any::<Index>()) {
        let f = tagged(&build(MAC, &m).expect("build"), &tags);
        let short = &f[..cut.index(f.len())];
        prop_assert_eq!(parse(short), Err(ParseError::Truncated));
        prop_assert_eq!(classify(&short), Class::Malformed);
    }

    #[test]
    fn changed_bytes_keep_the_sides_consistent(
        m in message(),
        tags in vlan_tags(),
        changes in vec((any::<Index>(), any::<u8>()), 1..4),
    ) {
        let mut f = tagged(&build(MAC, &m).expect("build"), &tags);
        for (at, value) in changes {
            let i = at.index(f.len());
            f[i] = value;
        }
        let _ = parse_ip(&f);
        check_agreement(&f)?;
    }

    #[test]
    fn arbitrary_bytes_keep_the_sides_consistent(f in vec(any::<u8>(), 0..300)) {
        let _ = parse_ip(&f);
        check_agreement(&f)?;
    }
}

/// An MLDv1 report behind exactly [`MAX_IPV6_EXT_HEADERS`] extension headers (a hop-by-hop
/// router alert, then destination options) whose last one is large enough that the report
/// starts beyond [`MAX_PARSE_OFFSET`], in a 1118-byte frame.
fn mld_report_beyond_max_parse_offset() -> (Message, Vec<u8>) {
    let m = Message {
        source: "fe80::1".parse().map(IpAddr::V6).expect("address"),
        kind: MessageKind::V2Report { group: "ff1e::1".parse().map(IpAddr::V6).expect("group") },
    };
    let frame = build(MAC, &m).expect("build");
    let hbh = 14 + IPV6_HLEN;
    let mut f = frame[..hbh + 8].to_vec();
    let mut last = hbh;
    for units in [0u8, 0, 0, 0, 124] {
        f[last] = IPPROTO_DSTOPTS;
        last = f.len();
        let len = 8 * (usize::from(units) + 1);
        let mut opts = vec![0u8; len];
        opts[0] = IPPROTO_ICMPV6;
        opts[1] = units;
        opts[2] = 1; // PadN
        opts[3] = (len - 4) as u8;
        f.extend_from_slice(&opts);
    }
    f.extend_from_slice(&frame[hbh + 8..]);
    let plen = (f.len() - hbh) as u16;
    f[14 + 4..14 + 6].copy_from_slice(&plen.to_be_bytes());
    (m, f)
}

/// Found by this layer: with exactly MAX_IPV6_EXT_HEADERS extension headers the walk ends
/// without checking the offset; the classifier then refused an ICMPv6 header beyond
/// MAX_PARSE_OFFSET (malformed) while the control plane read it and accepted the report. Both
/// sides now give up on it.
#[test]
fn mld_beyond_max_parse_offset_is_refused_by_both_sides() {
    let (_, f) = mld_report_beyond_max_parse_offset();
    assert!(f.len() == 1118 && f.len() > MAX_PARSE_OFFSET);
    assert_eq!(MAX_IPV6_EXT_HEADERS, 6, "the frame has exactly this many extension headers");
    assert_eq!(classify(&f.as_slice()), Class::Malformed);
    assert!(parse(&f).is_err(), "the control plane accepts what the classifier calls malformed");
}
