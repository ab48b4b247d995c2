//! The IGMP/MLD parser and builder on fuzzed input. The first byte picks the mode:
//! - even: the rest is a frame (and, for `parse_ip`, an IP packet) as it is;
//! - odd: the rest describes a message (kind, addresses, wire-format times) that is built,
//!   must parse back to itself, and is then changed at the places the remaining bytes name.
//!
//! On every frame: `parse` and `parse_ip` give the same answer twice; an accepted message
//! rebuilds to a frame that parses to the same message (with and without Ethernet header);
//! the XDP classifier never calls an accepted frame data or malformed, and the control plane
//! refuses what the classifier calls malformed (the relation relay's packet tests document).
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use relay::membership::packet::{
    build, decode_code16, decode_code8, parse, parse_ip, GroupRecord, Message, MessageKind, Query,
    QueryVersion, RecordType,
};
use relay_common::parse::{
    classify, ipv6_header, ipv6_upper_layer, link_layer, Class, Frame as _, ETH_HLEN, ETH_P_IPV6,
    IPV6_HLEN, MAX_PARSE_OFFSET,
};

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        check(rest);
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok(m) = message(&mut u) else { return };
    let frame = build(MAC, &m).expect("every generated message fits a frame");
    assert_eq!(parse(&frame), Ok(m.clone()), "built {frame:02x?}");
    let mut changed = frame;
    // (Unstructured keeps answering with zeros once its bytes are used up: stop there.)
    while !u.is_empty() {
        let Ok((at, value)) = u.arbitrary::<(u16, u8)>() else { break };
        let i = usize::from(at) % changed.len();
        changed[i] = value;
    }
    check(&changed);
});

fn check(f: &[u8]) {
    let parsed = parse(f);
    assert_eq!(parse(f), parsed, "same frame, same answer");
    let packet = parse_ip(f);
    assert_eq!(parse_ip(f), packet, "same packet, same answer");
    for m in [&parsed, &packet].into_iter().flatten() {
        if let Ok(rebuilt) = build(MAC, m) {
            assert_eq!(parse(&rebuilt).as_ref(), Ok(m), "rebuilt {rebuilt:02x?} from {f:02x?}");
            assert_eq!(parse_ip(&rebuilt[ETH_HLEN..]).as_ref(), Ok(m), "rebuilt {rebuilt:02x?}");
        }
    }
    let class = classify(&f);
    if let Ok(m) = &parsed {
        assert!(!matches!(class, Class::Data(_)), "accepted {m:?}, classified {class:?}: {f:02x?}");
        assert!(class != Class::Malformed, "accepted {m:?}, classified malformed: {f:02x?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Messages the builder can express and the parser accepts, from fuzzer bytes

fn v4(u: &mut Unstructured) -> Result<IpAddr> {
    Ok(IpAddr::V4(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?)))
}

fn v4_group(u: &mut Unstructured) -> Result<IpAddr> {
    let mut a: [u8; 4] = u.arbitrary()?;
    a[0] = 224 | (a[0] & 0x0f);
    Ok(IpAddr::V4(Ipv4Addr::from(a)))
}

fn v6(u: &mut Unstructured) -> Result<IpAddr> {
    Ok(IpAddr::V6(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?)))
}

fn v6_group(u: &mut Unstructured) -> Result<IpAddr> {
    let mut a: [u8; 16] = u.arbitrary()?;
    a[0] = 0xff;
    Ok(IpAddr::V6(Ipv6Addr::from(a)))
}

fn v6_link_local(u: &mut Unstructured) -> Result<IpAddr> {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfe, 0x80]);
    a[8..].copy_from_slice(&u.arbitrary::<[u8; 8]>()?);
    Ok(IpAddr::V6(Ipv6Addr::from(a)))
}

type AddrFn = fn(&mut Unstructured) -> Result<IpAddr>;

fn list(u: &mut Unstructured, max: usize, item: AddrFn) -> Result<Vec<IpAddr>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| item(u)).collect()
}

fn records(u: &mut Unstructured, group: AddrFn, source: AddrFn) -> Result<Vec<GroupRecord>> {
    let n = u.int_in_range(0..=4)?;
    (0..n)
        .map(|_| {
            let kind = RecordType::from_u8(u.int_in_range(1..=6)?).unwrap_or(RecordType::IsInclude);
            Ok(GroupRecord { kind, group: group(u)?, sources: list(u, 4, source)? })
        })
        .collect()
}

fn query(
    u: &mut Unstructured,
    version: QueryVersion,
    group: AddrFn,
    source: AddrFn,
) -> Result<Query> {
    let mut q = Query {
        version,
        group: if u.arbitrary()? { Some(group(u)?) } else { None },
        max_resp: Duration::ZERO,
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: Vec::new(),
    };
    match version {
        QueryVersion::IgmpV1 => q.group = None,
        QueryVersion::IgmpV2 => {
            q.max_resp = Duration::from_millis(100 * u64::from(u.int_in_range(1u8..=255)?));
        }
        QueryVersion::MldV1 => q.max_resp = Duration::from_millis(u64::from(u.arbitrary::<u16>()?)),
        QueryVersion::IgmpV3 | QueryVersion::MldV2 => {
            q.max_resp = if version == QueryVersion::IgmpV3 {
                Duration::from_millis(100 * u64::from(decode_code8(u.arbitrary()?)))
            } else {
                Duration::from_millis(u64::from(decode_code16(u.arbitrary()?)))
            };
            q.suppress = u.arbitrary()?;
            q.qrv = u.int_in_range(0..=7)?;
            q.qqi = Duration::from_secs(u64::from(decode_code8(u.arbitrary()?)));
            q.sources = list(u, 8, source)?;
        }
    }
    Ok(q)
}

fn message(u: &mut Unstructured) -> Result<Message> {
    let v4_query = |u: &mut Unstructured, version| query(u, version, v4_group, v4);
    let v6_query = |u: &mut Unstructured, version| query(u, version, v6_group, v6);
    Ok(match u.int_in_range(0u8..=14)? {
        0 => {
            Message { source: v4(u)?, kind: MessageKind::Query(v4_query(u, QueryVersion::IgmpV1)?) }
        }
        1 => {
            Message { source: v4(u)?, kind: MessageKind::Query(v4_query(u, QueryVersion::IgmpV2)?) }
        }
        2 => {
            Message { source: v4(u)?, kind: MessageKind::Query(v4_query(u, QueryVersion::IgmpV3)?) }
        }
        3 => Message { source: v4(u)?, kind: MessageKind::V1Report { group: v4_group(u)? } },
        4 => Message { source: v4(u)?, kind: MessageKind::V2Report { group: v4_group(u)? } },
        5 => Message { source: v4(u)?, kind: MessageKind::Leave { group: v4_group(u)? } },
        6 => Message {
            source: v4(u)?,
            kind: MessageKind::V3Report { records: records(u, v4_group, v4)? },
        },
        7 => Message { source: v4(u)?, kind: MessageKind::PimHello },
        8 => Message { source: v4(u)?, kind: MessageKind::RouterAdvertisement },
        9 => Message {
            source: v6_link_local(u)?,
            kind: MessageKind::Query(v6_query(u, QueryVersion::MldV1)?),
        },
        10 => Message {
            source: v6_link_local(u)?,
            kind: MessageKind::Query(v6_query(u, QueryVersion::MldV2)?),
        },
        11 => Message {
            source: v6_link_local(u)?,
            kind: MessageKind::V2Report { group: v6_group(u)? },
        },
        12 => {
            Message { source: v6_link_local(u)?, kind: MessageKind::Leave { group: v6_group(u)? } }
        }
        13 => Message {
            source: if u.arbitrary()? {
                v6_link_local(u)?
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            kind: MessageKind::V3Report { records: records(u, v6_group, v6)? },
        },
        _ => Message {
            source: v6_link_local(u)?,
            kind: if u.arbitrary()? {
                MessageKind::PimHello
            } else {
                MessageKind::RouterAdvertisement
            },
        },
    })
}
