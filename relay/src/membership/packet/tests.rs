use relay_common::parse::{
    classify, Class, ETH_P_8021AD, ETH_P_8021Q, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS,
};

use super::*;

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fn a4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().expect("ipv4"))
}

fn a6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().expect("ipv6"))
}

fn q(version: QueryVersion, group: Option<IpAddr>, max_resp_ms: u64) -> Query {
    Query {
        version,
        group,
        max_resp: Duration::from_millis(max_resp_ms),
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: Vec::new(),
    }
}

fn v3(version: QueryVersion, group: Option<IpAddr>, sources: Vec<IpAddr>, suppress: bool) -> Query {
    Query {
        version,
        group,
        max_resp: Duration::from_secs(10),
        suppress,
        qrv: 2,
        qqi: Duration::from_secs(125),
        sources,
    }
}

/// Every message kind, both families where they exist.
fn samples() -> Vec<Message> {
    let s4 = a4("192.0.2.1");
    let s6 = a6("fe80::1");
    let g4 = a4("239.1.2.3");
    let g6 = a6("ff3e::8000:1");
    let recs4 = vec![
        GroupRecord { kind: RecordType::IsInclude, group: g4, sources: vec![a4("10.0.0.1")] },
        GroupRecord { kind: RecordType::IsExclude, group: a4("239.1.1.1"), sources: vec![] },
        GroupRecord {
            kind: RecordType::ToInclude,
            group: a4("239.1.1.2"),
            sources: vec![a4("10.0.0.1"), a4("10.0.0.2")],
        },
        GroupRecord { kind: RecordType::ToExclude, group: a4("239.1.1.3"), sources: vec![] },
        GroupRecord {
            kind: RecordType::AllowNew,
            group: a4("239.1.1.4"),
            sources: vec![a4("10.0.0.3")],
        },
        GroupRecord {
            kind: RecordType::BlockOld,
            group: a4("239.1.1.5"),
            sources: vec![a4("10.0.0.4")],
        },
    ];
    let recs6 = vec![
        GroupRecord { kind: RecordType::IsInclude, group: g6, sources: vec![a6("2001:db8::1")] },
        GroupRecord { kind: RecordType::ToExclude, group: a6("ff15::1"), sources: vec![] },
        GroupRecord {
            kind: RecordType::BlockOld,
            group: a6("ff15::2"),
            sources: vec![a6("2001:db8::1"), a6("2001:db8::2")],
        },
    ];
    let kinds4 = vec![
        MessageKind::Query(q(QueryVersion::IgmpV1, None, 0)),
        MessageKind::Query(q(QueryVersion::IgmpV2, None, 10_000)),
        MessageKind::Query(q(QueryVersion::IgmpV2, Some(g4), 1000)),
        MessageKind::Query(v3(QueryVersion::IgmpV3, None, vec![], false)),
        MessageKind::Query(v3(QueryVersion::IgmpV3, Some(g4), vec![], true)),
        MessageKind::Query(v3(
            QueryVersion::IgmpV3,
            Some(g4),
            vec![a4("10.0.0.1"), a4("10.0.0.2")],
            false,
        )),
        MessageKind::V1Report { group: g4 },
        MessageKind::V2Report { group: g4 },
        MessageKind::Leave { group: g4 },
        MessageKind::V3Report { records: recs4 },
        MessageKind::V3Report { records: vec![] },
        MessageKind::PimHello,
        MessageKind::RouterAdvertisement,
    ];
    let kinds6 = vec![
        MessageKind::Query(q(QueryVersion::MldV1, None, 10_000)),
        MessageKind::Query(q(QueryVersion::MldV1, Some(g6), 1000)),
        MessageKind::Query(v3(QueryVersion::MldV2, None, vec![], false)),
        MessageKind::Query(v3(QueryVersion::MldV2, Some(g6), vec![], true)),
        MessageKind::Query(v3(QueryVersion::MldV2, Some(g6), vec![a6("2001:db8::1")], false)),
        MessageKind::V2Report { group: g6 },
        MessageKind::Leave { group: g6 },
        MessageKind::V3Report { records: recs6 },
        MessageKind::PimHello,
        MessageKind::RouterAdvertisement,
    ];
    kinds4
        .into_iter()
        .map(|kind| Message { source: s4, kind })
        .chain(kinds6.into_iter().map(|kind| Message { source: s6, kind }))
        .collect()
}

#[test]
fn round_trip_every_message() {
    for m in samples() {
        let frame = build(MAC, &m).expect("build");
        assert_eq!(parse(&frame), Ok(m.clone()), "{m:?}");
        // Ethernet padding after the IP packet is ignored.
        let mut padded = frame.clone();
        padded.resize(frame.len().max(60) + 4, 0);
        assert_eq!(parse(&padded), Ok(m.clone()), "padded {m:?}");
        // VLAN tags: classifier_agrees_with_zero_one_and_two_vlan_tags.
    }
}

#[test]
fn query_frames_have_router_alert_ttl_and_destinations() {
    let g = a4("239.1.2.3");
    let general = build_query(MAC, a4("192.0.2.1"), &v3(QueryVersion::IgmpV3, None, vec![], false))
        .expect("build");
    assert_eq!(&general[..6], &[0x01, 0x00, 0x5e, 0, 0, 1]);
    assert_eq!(&general[6..12], &MAC);
    assert_eq!(general[14], 0x46, "IHL 6: router alert option");
    assert_eq!(general[22], 1, "TTL 1");
    assert_eq!(&general[30..34], &[224, 0, 0, 1]);
    assert_eq!(&general[34..38], &[0x94, 0x04, 0, 0]);
    let specific =
        build_query(MAC, a4("192.0.2.1"), &q(QueryVersion::IgmpV2, Some(g), 1000)).expect("build");
    assert_eq!(&specific[30..34], &[239, 1, 2, 3]);
    assert_eq!(&specific[..6], &[0x01, 0x00, 0x5e, 1, 2, 3]);

    let m = build_query(MAC, a6("fe80::1"), &v3(QueryVersion::MldV2, None, vec![], false))
        .expect("build");
    assert_eq!(&m[..6], &[0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(m[14 + 6], 0, "hop-by-hop first");
    assert_eq!(m[14 + 7], 1, "hop limit 1");
    assert_eq!(&m[14 + 24..14 + 40], &ALL_NODES.octets());
    assert_eq!(&m[54..58], &[58, 0, 5, 2], "router alert option");
    let g6 = a6("ff1e::5");
    let m = build_query(MAC, a6("fe80::1"), &q(QueryVersion::MldV1, Some(g6), 1000)).expect("b");
    assert_eq!(&m[..6], &[0x33, 0x33, 0, 0, 0, 5]);
    assert_eq!(m.len(), 14 + 40 + 8 + 24);
}

#[test]
fn build_rejects_inconsistent_queries() {
    let s4 = a4("192.0.2.1");
    let mut bad = q(QueryVersion::IgmpV2, Some(a4("239.1.1.1")), 1000);
    bad.sources.push(a4("10.0.0.1"));
    assert_eq!(build_query(MAC, s4, &bad), Err(BuildError::Unrepresentable));
    let mld = q(QueryVersion::MldV1, None, 1000);
    assert_eq!(build_query(MAC, s4, &mld), Err(BuildError::FamilyMismatch));
    let many = v3(QueryVersion::IgmpV3, Some(a4("239.1.1.1")), vec![s4; 400], false);
    assert_eq!(build_query(MAC, s4, &many), Err(BuildError::TooLarge));
    let max = max_query_sources(Family::V4);
    let fits = v3(QueryVersion::IgmpV3, Some(a4("239.1.1.1")), vec![s4; max], false);
    assert!(build_query(MAC, s4, &fits).expect("fits").len() <= 14 + 1500);
    let max6 = max_query_sources(Family::V6);
    let s6 = a6("fe80::1");
    let fits6 = v3(QueryVersion::MldV2, Some(a6("ff1e::1")), vec![s6; max6], false);
    assert!(build_query(MAC, s6, &fits6).expect("fits").len() <= 14 + 1500);
    let over6 = v3(QueryVersion::MldV2, Some(a6("ff1e::1")), vec![s6; max6 + 1], false);
    assert_eq!(build_query(MAC, s6, &over6), Err(BuildError::TooLarge));
}

#[test]
fn exponential_codes_round_trip() {
    for code in 0..=255u8 {
        assert_eq!(encode_code8(decode_code8(code)), code);
    }
    for code in 0..=u16::MAX {
        assert_eq!(encode_code16(decode_code16(code)), code);
    }
    assert_eq!(decode_code8(0x80), 128);
    assert_eq!(decode_code8(0xff), 31744);
    assert_eq!(decode_code16(0x8000), 32768);
    assert_eq!(decode_code16(0xffff), 8_387_584);
    // Values between codes round down; huge values saturate.
    for v in (0..40_000u32).step_by(7) {
        let d = decode_code8(encode_code8(v));
        assert!(d <= v || v > 31744, "{v} -> {d}");
        assert!(v.min(31744) - d < (v.min(31744) / 16).max(1), "{v} -> {d}");
    }
    for v in (0..9_000_000u32).step_by(997) {
        let d = decode_code16(encode_code16(v));
        assert!(d <= v || v > 8_387_584, "{v} -> {d}");
        assert!(v.min(8_387_584) - d < (v.min(8_387_584) / 4096).max(1) * 2, "{v} -> {d}");
    }
    assert_eq!(encode_code8(u32::MAX), 0xff);
    assert_eq!(encode_code16(u32::MAX), 0xffff);
    // Non-representable query times are rounded down, on the wire and back.
    let mut query = v3(QueryVersion::IgmpV3, None, vec![], false);
    query.max_resp = Duration::from_millis(20_050); // 200.5 ds -> 200 ds -> code 0x89 = 200
    query.qqi = Duration::from_secs(300); // 300 -> code 0x92 = 288? check below
    let frame = build_query(MAC, a4("192.0.2.1"), &query).expect("build");
    let Ok(Message { kind: MessageKind::Query(back), .. }) = parse(&frame) else {
        panic!("query expected")
    };
    assert_eq!(back.max_resp, Duration::from_secs(20));
    assert_eq!(back.qqi, Duration::from_secs(u64::from(decode_code8(encode_code8(300)))));
    assert!(back.qqi <= Duration::from_secs(300) && back.qqi >= Duration::from_secs(280));
}

#[test]
fn query_versions_by_length() {
    // IGMP: 8 bytes & code 0 = v1, 8 bytes = v2, >= 12 = v3, 9..11 = bad.
    let frame = build_query(MAC, a4("192.0.2.1"), &q(QueryVersion::IgmpV2, None, 100)).expect("b");
    let mut bad = frame.clone();
    // Append 2 bytes to the IGMP message, fix IP total length and both checksums.
    bad.extend_from_slice(&[0, 0]);
    bad[16..18].copy_from_slice(&(24u16 + 10).to_be_bytes());
    refix_v4(&mut bad);
    assert_eq!(parse(&bad), Err(ParseError::BadLength));
    // MLD: 24 = v1, 25..27 bad.
    let frame = build_query(MAC, a6("fe80::1"), &q(QueryVersion::MldV1, None, 100)).expect("b");
    let mut bad = frame.clone();
    bad.push(0);
    bad[18..20].copy_from_slice(&(8u16 + 25).to_be_bytes());
    refix_v6(&mut bad);
    assert_eq!(parse(&bad), Err(ParseError::BadLength));
}

fn refix_v4(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&frame[14..38], 0));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame[40..42].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&frame[38..], 0));
    frame[40..42].copy_from_slice(&c.to_be_bytes());
}

fn refix_v6(frame: &mut [u8]) {
    let src = v6(frame, 22).expect("src");
    let dst = v6(frame, 38).expect("dst");
    let body = 14 + 48;
    frame[body + 2..body + 4].copy_from_slice(&[0, 0]);
    let len = frame.len() - body;
    let c = fold(sum16(&frame[body..], pseudo_v6(&src, &dst, len, 58)));
    frame[body + 2..body + 4].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn checksums_are_verified() {
    let m =
        Message { source: a4("192.0.2.1"), kind: MessageKind::V2Report { group: a4("239.1.1.1") } };
    let mut f = build(MAC, &m).expect("build");
    let last = f.len() - 1;
    f[last] ^= 1;
    assert_eq!(parse(&f), Err(ParseError::BadChecksum));
    let mut f = build(MAC, &m).expect("build");
    f[22] = 2; // TTL changes, IP header checksum no longer matches
    assert_eq!(parse(&f), Err(ParseError::BadIpChecksum));
    let m6 =
        Message { source: a6("fe80::1"), kind: MessageKind::V2Report { group: a6("ff1e::1") } };
    let mut f = build(MAC, &m6).expect("build");
    f[22 + 15] ^= 1; // source address is in the pseudo-header
    assert_eq!(parse(&f), Err(ParseError::BadChecksum));
    let pim = Message { source: a6("fe80::1"), kind: MessageKind::PimHello };
    let mut f = build(MAC, &pim).expect("build");
    f[22 + 15] ^= 1;
    assert_eq!(parse(&f), Err(ParseError::BadChecksum));
}

#[test]
fn other_traffic_is_rejected_with_reasons() {
    let mut arp = vec![0xffu8; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(parse(&arp), Err(ParseError::NotIp));
    let m =
        Message { source: a4("192.0.2.1"), kind: MessageKind::V2Report { group: a4("239.1.1.1") } };
    let mut f = build(MAC, &m).expect("build");
    f[23] = 17; // UDP
    refix_v4_header(&mut f);
    assert_eq!(parse(&f), Err(ParseError::NotMembership));
    let mut f = build(MAC, &m).expect("build");
    f[20] = 0x20; // more fragments
    refix_v4_header(&mut f);
    assert_eq!(parse(&f), Err(ParseError::Fragment));
    let mut f = build(MAC, &m).expect("build");
    f[38] = 0x13; // DVMRP
    refix_v4(&mut f);
    assert_eq!(parse(&f), Err(ParseError::UnknownType));
    // ICMPv6 echo request is not MLD.
    let m6 =
        Message { source: a6("fe80::1"), kind: MessageKind::V2Report { group: a6("ff1e::1") } };
    let mut f = build(MAC, &m6).expect("build");
    f[62] = 128;
    assert_eq!(parse(&f), Err(ParseError::NotMembership));
    // A long chain of destination-options headers is bounded.
    let mut chain = build(MAC, &m6).expect("build")[..54].to_vec();
    chain[20] = 60;
    for _ in 0..12 {
        chain.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    let plen = (chain.len() - 54) as u16;
    chain[18..20].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(parse(&chain), Err(ParseError::TooManyExtensionHeaders));
    for e in ParseError::ALL {
        assert!(!e.name().is_empty());
    }
}

fn refix_v4_header(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&frame[14..38], 0));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn v3_report_aux_data_and_unknown_records_are_skipped() {
    // IGMPv3 report: record type 7 (unknown, skipped) with aux data, then an ALLOW record with
    // one word of aux data.
    let mut body = vec![IGMP_V3_REPORT, 0, 0, 0, 0, 0, 0, 2];
    body.extend_from_slice(&[7, 1, 0, 0, 239, 0, 0, 9, 0xaa, 0xbb, 0xcc, 0xdd]);
    body.extend_from_slice(&[5, 1, 0, 1, 239, 1, 1, 1, 10, 0, 0, 1, 1, 2, 3, 4]);
    let ip = ipv4_packet(Ipv4Addr::new(192, 0, 2, 9), IGMPV3_ROUTERS, IPPROTO_IGMP, true, body)
        .expect("ip");
    let mut frame = vec![1, 0, 0x5e, 0, 0, 22, 2, 0, 0, 0, 0, 1, 8, 0];
    frame.extend_from_slice(&ip);
    let m = parse(&frame).expect("parse");
    assert_eq!(
        m.kind,
        MessageKind::V3Report {
            records: vec![GroupRecord {
                kind: RecordType::AllowNew,
                group: a4("239.1.1.1"),
                sources: vec![a4("10.0.0.1")],
            }]
        }
    );
    // MLDv2 with aux data.
    let mut body = vec![MLD_V2_REPORT, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0];
    body.extend_from_slice(&Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 1).octets());
    body.extend_from_slice(&[9, 9, 9, 9]);
    let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let ip = ipv6_packet(src, MLDV2_ROUTERS, IPPROTO_ICMPV6, true, body).expect("ip");
    let mut frame = vec![0x33, 0x33, 0, 0, 0, 0x16, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    frame.extend_from_slice(&ip);
    let m = parse(&frame).expect("parse");
    assert_eq!(
        m.kind,
        MessageKind::V3Report {
            records: vec![GroupRecord {
                kind: RecordType::IsInclude,
                group: a6("ff1e::1"),
                sources: vec![],
            }]
        }
    );
    // A record whose source count runs past the message is a length error.
    let mut bad = frame.clone();
    bad[62 + 10..62 + 12].copy_from_slice(&[0, 9]);
    refix_v6(&mut bad);
    assert_eq!(parse(&bad), Err(ParseError::BadLength));
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_bytes_and_mutations_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = (rng.next() % 200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len > 14 && rng.next() & 1 == 0 {
            // Make it look like IP so the deeper parsers run too.
            let v6 = rng.next() & 1 == 0;
            f[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            f[14] = if v6 { 0x60 } else { 0x45 };
        }
        let _ = parse(&f);
        let _ = parse_ip(&f);
    }
    let frames: Vec<Vec<u8>> = samples().iter().map(|m| build(MAC, m).expect("build")).collect();
    for _ in 0..50_000 {
        let mut f = frames[(rng.next() as usize) % frames.len()].clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() as usize) % f.len();
            f[i] = rng.next() as u8;
        }
        let _ = parse(&f);
    }
}

#[test]
fn parse_ip_without_ethernet() {
    for m in samples() {
        let frame = build(MAC, &m).expect("build");
        assert_eq!(parse_ip(&frame[14..]), Ok(m));
    }
}

// ---------------------------------------------------------------------------------------------
// The same frames through the XDP program's classifier: where the two share a header walk they
// must agree; where they differ, the difference is the documented one (see the module doc).

/// `frame` with VLAN tags inserted after the MAC addresses, outermost first.
fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (vid, tpid) in tpids.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid as u16 + 1).to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

/// What the classifier says about a membership frame it should pass to the stack: IGMP and
/// MLD are control; PIM hellos and MLD router advertisements (not an MLD type) go to
/// link-local groups.
fn expected_class(m: &Message) -> Class {
    match (&m.kind, Family::of(&m.source)) {
        (MessageKind::PimHello, _) | (MessageKind::RouterAdvertisement, Family::V6) => {
            Class::LinkLocal
        }
        _ => Class::Control,
    }
}

#[test]
fn classifier_agrees_with_zero_one_and_two_vlan_tags() {
    for m in samples() {
        let frame = build(MAC, &m).expect("build");
        for tpids in [&[][..], &[ETH_P_8021Q], &[ETH_P_8021AD, ETH_P_8021Q]] {
            let f = tagged(&frame, tpids);
            assert_eq!(parse(&f), Ok(m.clone()), "{tpids:x?} {m:?}");
            assert_eq!(classify(&f.as_slice()), expected_class(&m), "{tpids:x?} {m:?}");
        }
        // One tag past MAX_VLAN_TAGS: neither side looks further, so neither sees IP.
        let f = tagged(&frame, &[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q]);
        assert_eq!(parse(&f), Err(ParseError::NotIp), "{m:?}");
        assert_eq!(classify(&f.as_slice()), Class::Other, "{m:?}");
    }
    assert_eq!(MAX_VLAN_TAGS, 2, "the cases above stop at two tags");
}

/// An MLDv1 report whose hop-by-hop router alert is followed by `dest` destination-options
/// headers. The ICMPv6 checksum stays valid: its pseudo-header does not cover them.
fn mld_report_behind(dest: usize) -> (Message, Vec<u8>) {
    let m = Message { source: a6("fe80::1"), kind: MessageKind::V2Report { group: a6("ff1e::1") } };
    let frame = build(MAC, &m).expect("build");
    let hbh = ETH_HLEN + IPV6_HLEN;
    let mut f = frame[..hbh + 8].to_vec();
    // Where the next-header field of the last extension header is.
    let mut last = hbh;
    for _ in 0..dest {
        f[last] = IPPROTO_DSTOPTS;
        last = f.len();
        f.extend_from_slice(&[IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0]);
    }
    f.extend_from_slice(&frame[hbh + 8..]);
    let plen = (f.len() - hbh) as u16;
    f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&plen.to_be_bytes());
    (m, f)
}

#[test]
fn classifier_agrees_on_extension_header_chains() {
    for headers in 1..=MAX_IPV6_EXT_HEADERS + 2 {
        let (m, f) = mld_report_behind(headers - 1);
        if headers <= MAX_IPV6_EXT_HEADERS {
            assert_eq!(parse(&f), Ok(m), "{headers} extension headers");
            assert_eq!(classify(&f.as_slice()), Class::Control, "{headers} extension headers");
        } else {
            assert_eq!(parse(&f), Err(ParseError::TooManyExtensionHeaders), "{headers}");
            assert_eq!(classify(&f.as_slice()), Class::Malformed, "{headers} extension headers");
        }
    }
}

#[test]
fn classifier_agrees_on_every_truncation() {
    let mut frames: Vec<Vec<u8>> = samples().iter().map(|m| build(MAC, m).expect("b")).collect();
    frames.push(tagged(&frames[0], &[ETH_P_8021AD, ETH_P_8021Q]));
    frames.push(mld_report_behind(3).1);
    for f in &frames {
        for len in 0..f.len() {
            let cut = &f[..len];
            assert_eq!(parse(cut), Err(ParseError::Truncated), "{f:02x?} cut to {len}");
            assert_eq!(classify(&cut), Class::Malformed, "{f:02x?} cut to {len}");
        }
    }
}

/// What only the control plane checks: checksums and fragments. The classifier passes these
/// frames to the stack as control (or link-local) all the same; the control plane drops them.
#[test]
fn control_plane_checks_what_the_classifier_does_not() {
    let m =
        Message { source: a4("192.0.2.1"), kind: MessageKind::V2Report { group: a4("239.1.1.1") } };
    let mut bad_ip_checksum = build(MAC, &m).expect("build");
    bad_ip_checksum[22] = 2; // TTL
    let mut igmp_checksum = build(MAC, &m).expect("build");
    let last = igmp_checksum.len() - 1;
    igmp_checksum[last] ^= 1;
    let mut v4_fragment = build(MAC, &m).expect("build");
    v4_fragment[20] = 0x20; // more fragments
    refix_v4_header(&mut v4_fragment);
    let (_, mut mld_checksum) = mld_report_behind(0);
    let last = mld_checksum.len() - 1;
    mld_checksum[last] ^= 1;
    let cases = [
        (bad_ip_checksum, ParseError::BadIpChecksum, Class::Control),
        (igmp_checksum, ParseError::BadChecksum, Class::Control),
        (v4_fragment, ParseError::Fragment, Class::Control),
        (mld_checksum, ParseError::BadChecksum, Class::Control),
        (mld_fragment(0), ParseError::Fragment, Class::Control),
        // A later fragment has no ICMPv6 header: for the classifier, data to a global group.
        (mld_fragment(8), ParseError::Fragment, Class::Data(mld_fragment_data())),
    ];
    for (f, error, class) in cases {
        assert_eq!(parse(&f), Err(error), "{f:02x?}");
        assert_eq!(classify(&f.as_slice()), class, "{f:02x?}");
    }
}

/// An MLDv1 report with a fragment header (fragment offset `offset` bytes) after its
/// hop-by-hop router alert.
fn mld_fragment(offset: u16) -> Vec<u8> {
    let (_, frame) = mld_report_behind(0);
    let hbh = ETH_HLEN + IPV6_HLEN;
    let mut f = frame[..hbh + 8].to_vec();
    f[hbh] = IPPROTO_FRAGMENT;
    f.extend_from_slice(&[IPPROTO_ICMPV6, 0]);
    f.extend_from_slice(&(offset | 1).to_be_bytes()); // M flag: more fragments follow
    f.extend_from_slice(&[0, 0, 0, 7]);
    f.extend_from_slice(&frame[hbh + 8..]);
    let plen = (f.len() - hbh) as u16;
    f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&plen.to_be_bytes());
    f
}

fn mld_fragment_data() -> relay_common::parse::Data {
    let group = Ipv6Addr::new(0xff1e, 0, 0, 0, 0, 0, 0, 1).octets();
    let source = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).octets();
    relay_common::parse::Data {
        key: relay_common::GroupKey { group, source },
        l3_offset: ETH_HLEN,
        ipv6: true,
    }
}

/// The message body of a built frame (after Ethernet and `ip_header` bytes of IP headers),
/// with its checksum cleared for the packet builders to fill in.
fn body_of(frame: &[u8], ip_header: usize) -> Vec<u8> {
    let mut body = frame[14 + ip_header..].to_vec();
    body[2..4].copy_from_slice(&[0, 0]);
    body
}

fn ethernet(ethertype: u16, ip: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x33, 0x33, 0, 0, 0, 1, 2, 0, 0, 0, 0, 1];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(ip);
    frame
}

#[test]
fn envelopes_that_break_the_rfcs_are_rejected_with_reasons() {
    let v2 =
        Message { source: a4("192.0.2.1"), kind: MessageKind::V2Report { group: a4("239.1.1.1") } };
    let good = build(MAC, &v2).expect("build");
    assert!(parse(&good).is_ok());
    // TTL 2: it crossed a router.
    let mut f = good.clone();
    f[22] = 2;
    refix_v4_header(&mut f);
    assert_eq!(parse(&f), Err(ParseError::BadTtl));
    // A v2 report must go to its group.
    let mut f = good.clone();
    f[30..34].copy_from_slice(&[239, 9, 9, 9]);
    refix_v4_header(&mut f);
    assert_eq!(parse(&f), Err(ParseError::BadDestination));
    // IGMPv1/v2 without the Router Alert option are fine (older hosts leave it out)...
    let body = body_of(&good, 24);
    let ip = ipv4_packet(Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(239, 1, 1, 1), 2, false, body)
        .expect("ip");
    assert_eq!(parse(&ethernet(0x0800, &ip)).map(|m| m.kind), Ok(v2.kind.clone()));
    // ...an IGMPv3 report is not.
    let records =
        vec![GroupRecord { kind: RecordType::IsExclude, group: a4("239.1.1.1"), sources: vec![] }];
    let v3 = Message { source: a4("192.0.2.1"), kind: MessageKind::V3Report { records } };
    let body = body_of(&build(MAC, &v3).expect("build"), 24);
    let ip = ipv4_packet(Ipv4Addr::new(192, 0, 2, 1), IGMPV3_ROUTERS, 2, false, body).expect("ip");
    assert_eq!(parse(&ethernet(0x0800, &ip)), Err(ParseError::NoRouterAlert));

    // MLD: link-local sources (or :: for reports), hop limit 1, Router Alert always.
    let report = |source: &str| Message {
        source: a6(source),
        kind: MessageKind::V2Report { group: a6("ff1e::1") },
    };
    assert!(parse(&build(MAC, &report("fe80::1")).expect("build")).is_ok());
    assert!(parse(&build(MAC, &report("::")).expect("build")).is_ok());
    assert_eq!(
        parse(&build(MAC, &report("2001:db8::1")).expect("build")),
        Err(ParseError::BadSource)
    );
    let query =
        Message { source: a6("::"), kind: MessageKind::Query(q(QueryVersion::MldV2, None, 1000)) };
    assert_eq!(parse(&build(MAC, &query).expect("build")), Err(ParseError::BadSource));
    let mut f = build(MAC, &report("fe80::1")).expect("build");
    f[21] = 255; // hop limit
    assert_eq!(parse(&f), Err(ParseError::BadTtl));
    let body = body_of(&build(MAC, &report("fe80::1")).expect("build"), 48);
    let (src, dst) = ("fe80::1".parse().expect("src"), "ff1e::1".parse().expect("dst"));
    let ip = ipv6_packet(src, dst, IPPROTO_ICMPV6, false, body).expect("ip");
    assert_eq!(parse(&ethernet(0x86dd, &ip)), Err(ParseError::NoRouterAlert));
    // A PIM hello goes to ALL-PIM-ROUTERS.
    let pim = build(MAC, &Message { source: a4("192.0.2.1"), kind: MessageKind::PimHello })
        .expect("build");
    let mut f = pim.clone();
    f[30..34].copy_from_slice(&[224, 0, 0, 1]);
    // No Router Alert: a 20-byte header.
    f[24..26].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&f[14..34], 0));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(parse(&pim).map(|m| m.kind), Ok(MessageKind::PimHello));
    assert_eq!(parse(&f), Err(ParseError::BadDestination));
}

#[test]
fn a_readdressed_query_parses_with_its_new_destination() {
    let query = q(QueryVersion::IgmpV3, None, 1000);
    let frame = build_query(MAC, a4("10.66.0.1"), &query).expect("query");
    let peer = Ipv4Addr::new(10, 66, 0, 10);
    let copy = readdress_ipv4(&frame[14..], peer).expect("IPv4");
    assert_eq!(copy[16..20], peer.octets());
    let ihl = usize::from(copy[0] & 0x0f) * 4;
    assert_eq!(fold(sum16(&copy[..ihl], 0)), 0, "header checksum");
    assert_eq!(copy[ihl..], frame[14 + ihl..], "the IGMP message is unchanged");
    assert_eq!(copy[12..16], frame[26..30], "the source is unchanged");
    assert!(readdress_ipv4(&[0x60; 40], peer).is_none(), "IPv6 is not readdressed");
}
