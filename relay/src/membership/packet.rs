//! IGMP / MLD (and the router signals PIM hello and Multicast Router Advertisement): parsing of
//! received Ethernet frames and building of complete frames.
//!
//! MLD messages reuse the IGMP shapes (RFC 3810 says so itself): an MLDv1 report is a
//! [`MessageKind::V2Report`], an MLDv1 done is a [`MessageKind::Leave`], an MLDv2 report is a
//! [`MessageKind::V3Report`]; the address family of [`Message::source`] tells them apart.
//!
//! Nothing here panics on any input; every rejection carries a [`ParseError`] reason that can be
//! counted.
//!
//! # One header walk with the XDP program
//!
//! Up to the upper-layer header, [`parse`] runs the code the XDP classifier runs
//! ([`relay_common::parse`]): the Ethernet header and at most [`MAX_VLAN_TAGS`] VLAN tags, the
//! IPv4 header checks, the IPv6 fixed header and at most [`MAX_IPV6_EXT_HEADERS`] extension
//! headers, none starting beyond [`MAX_PARSE_OFFSET`]. Both sides therefore find the same
//! protocol at the same offset, and give up on the same frames (too many tags: not IP; too
//! many extension headers or a cut header: rejected here, `malformed` in the program). Only the
//! message body (reports, queries, group records) is parsed here alone.
//!
//! What this parser does on top, on purpose, because the program must not pay for it on the
//! forwarding path or does not need it:
//! - it verifies checksums (IPv4 header, IGMP, ICMPv6, PIM); the program classifies a frame
//!   with a bad checksum as control all the same and passes it to the stack;
//! - it refuses fragments (IPv4 MF or offset, any IPv6 fragment header): the control plane does
//!   not reassemble. The program looks through a first IPv6 fragment and takes a later one as
//!   having no upper-layer header (data, when it goes to a group beyond link scope);
//! - it checks that the upper-layer header starts inside the IP packet; the program reads there
//!   only to tell MLD from other ICMPv6;
//! - it does not look at the destination address (the capture filter already kept multicast
//!   MACs), where the program stops at a unicast one before walking extension headers.
//!
//! [`parse_ip`] (no Ethernet header) counts offsets from the IP header, so its
//! [`MAX_PARSE_OFFSET`] bound lies 14 bytes further into the packet. The tests
//! `classifier_agrees_*` and `control_plane_checks_what_the_classifier_does_not` hold both
//! sides to this.
//!
//! [`MAX_VLAN_TAGS`]: relay_common::parse::MAX_VLAN_TAGS
//! [`MAX_IPV6_EXT_HEADERS`]: relay_common::parse::MAX_IPV6_EXT_HEADERS
//! [`MAX_PARSE_OFFSET`]: relay_common::parse::MAX_PARSE_OFFSET

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use relay_common::parse::{
    ipv4_header, ipv6_header, ipv6_upper_layer, link_layer, Frame as _, HeaderError, ETH_HLEN,
    ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMPV6, IPPROTO_IGMP, IPV6_HLEN, MAX_PARSE_OFFSET,
};

/// Address family of a message, group or querier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The unspecified address (0.0.0.0 or ::) of this family.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The all-systems / all-nodes group that general queries go to.
    pub fn all_systems(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(ALL_SYSTEMS),
            Family::V6 => IpAddr::V6(ALL_NODES),
        }
    }
}

pub const ALL_SYSTEMS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
pub const ALL_ROUTERS_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 2);
pub const IGMPV3_ROUTERS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 22);
pub const ALL_PIM_ROUTERS_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 13);
pub const ALL_SNOOPERS_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 106);
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub const ALL_ROUTERS_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
pub const MLDV2_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
pub const ALL_PIM_ROUTERS_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xd);
pub const ALL_SNOOPERS_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x6a);

const IPPROTO_PIM: u8 = 103;
/// Frames built here stay within a 1500-byte IP MTU.
const MTU: usize = 1500;

const IGMP_QUERY: u8 = 0x11;
const IGMP_V1_REPORT: u8 = 0x12;
const IGMP_V2_REPORT: u8 = 0x16;
const IGMP_V2_LEAVE: u8 = 0x17;
const IGMP_V3_REPORT: u8 = 0x22;
const IGMP_MRD_ADVERTISEMENT: u8 = 0x30;
const MLD_QUERY: u8 = 130;
const MLD_V1_REPORT: u8 = 131;
const MLD_V1_DONE: u8 = 132;
const MLD_V2_REPORT: u8 = 143;
const MLD_MRD_ADVERTISEMENT: u8 = 151;
const PIM_V2_HELLO: u8 = 0x20;

/// Why a frame was not accepted as a membership / router-signal message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum ParseError {
    #[error("frame shorter than its headers say")]
    Truncated,
    #[error("not an IPv4 or IPv6 frame")]
    NotIp,
    #[error("malformed IP header")]
    BadIpHeader,
    #[error("bad IPv4 header checksum")]
    BadIpChecksum,
    #[error("IP fragment")]
    Fragment,
    #[error("too many IPv6 extension headers")]
    TooManyExtensionHeaders,
    #[error("not IGMP, MLD or PIM")]
    NotMembership,
    #[error("bad IGMP/ICMPv6/PIM checksum")]
    BadChecksum,
    #[error("message length does not match its contents")]
    BadLength,
    #[error("unknown IGMP/MLD/PIM message type")]
    UnknownType,
    #[error("TTL / hop limit is not 1 (the message came from beyond the link)")]
    BadTtl,
    #[error("no IP Router Alert option where the RFC requires one")]
    NoRouterAlert,
    #[error("MLD source address is not link-local (RFC 3810 5.1.14, 5.2.13)")]
    BadSource,
    #[error("destination address does not fit the message type")]
    BadDestination,
}

impl ParseError {
    /// Every reason, for counter tables.
    pub const ALL: [ParseError; 14] = [
        ParseError::Truncated,
        ParseError::NotIp,
        ParseError::BadIpHeader,
        ParseError::BadIpChecksum,
        ParseError::Fragment,
        ParseError::TooManyExtensionHeaders,
        ParseError::NotMembership,
        ParseError::BadChecksum,
        ParseError::BadLength,
        ParseError::UnknownType,
        ParseError::BadTtl,
        ParseError::NoRouterAlert,
        ParseError::BadSource,
        ParseError::BadDestination,
    ];

    /// Stable lower-case name (metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::NotIp => "not_ip",
            ParseError::BadIpHeader => "bad_ip_header",
            ParseError::BadIpChecksum => "bad_ip_checksum",
            ParseError::Fragment => "fragment",
            ParseError::TooManyExtensionHeaders => "too_many_extension_headers",
            ParseError::NotMembership => "not_membership",
            ParseError::BadChecksum => "bad_checksum",
            ParseError::BadLength => "bad_length",
            ParseError::UnknownType => "unknown_type",
            ParseError::BadTtl => "bad_ttl",
            ParseError::NoRouterAlert => "no_router_alert",
            ParseError::BadSource => "bad_source",
            ParseError::BadDestination => "bad_destination",
        }
    }
}

/// Why a frame could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("addresses of different families in one message")]
    FamilyMismatch,
    #[error("field not representable in this message version")]
    Unrepresentable,
    #[error("message does not fit a 1500-byte MTU")]
    TooLarge,
}

/// IGMPv3 / MLDv2 group record types (RFC 3376 4.2.12, RFC 3810 5.2.12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordType {
    IsInclude = 1,
    IsExclude = 2,
    ToInclude = 3,
    ToExclude = 4,
    AllowNew = 5,
    BlockOld = 6,
}

impl RecordType {
    pub const fn from_u8(v: u8) -> Option<RecordType> {
        Some(match v {
            1 => RecordType::IsInclude,
            2 => RecordType::IsExclude,
            3 => RecordType::ToInclude,
            4 => RecordType::ToExclude,
            5 => RecordType::AllowNew,
            6 => RecordType::BlockOld,
            _ => return None,
        })
    }
}

/// One group record of an IGMPv3 / MLDv2 report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub kind: RecordType,
    pub group: IpAddr,
    pub sources: Vec<IpAddr>,
}

/// Query wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryVersion {
    IgmpV1,
    IgmpV2,
    IgmpV3,
    MldV1,
    MldV2,
}

impl QueryVersion {
    pub const fn family(self) -> Family {
        match self {
            QueryVersion::IgmpV1 | QueryVersion::IgmpV2 | QueryVersion::IgmpV3 => Family::V4,
            QueryVersion::MldV1 | QueryVersion::MldV2 => Family::V6,
        }
    }

    /// Whether this format can carry source lists, the S flag, QRV and QQIC.
    pub const fn has_sources(self) -> bool {
        matches!(self, QueryVersion::IgmpV3 | QueryVersion::MldV2)
    }
}

/// A membership query (general, group-specific or group-and-source-specific). This is also
/// what the engine asks to send (`QuerySpec`).
///
/// Fields a version cannot carry are zero / false / empty after parsing, and must be so for
/// building (`sources`, `suppress`, `qrv`, `qqi` exist only in IGMPv3 / MLDv2; IGMPv1 has no
/// max response time). Times are rounded down to what the wire format can express.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub version: QueryVersion,
    /// `None` for a general query.
    pub group: Option<IpAddr>,
    pub max_resp: Duration,
    /// "Suppress Router-Side Processing" flag.
    pub suppress: bool,
    /// Querier's Robustness Variable (0 when > 7 or unknown).
    pub qrv: u8,
    /// Querier's Query Interval.
    pub qqi: Duration,
    pub sources: Vec<IpAddr>,
}

/// The payload of a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageKind {
    Query(Query),
    /// IGMPv1 membership report.
    V1Report {
        group: IpAddr,
    },
    /// IGMPv2 membership report or MLDv1 multicast listener report.
    V2Report {
        group: IpAddr,
    },
    /// IGMPv2 leave group or MLDv1 multicast listener done.
    Leave {
        group: IpAddr,
    },
    /// IGMPv3 or MLDv2 report (records of unknown type are dropped, per RFC 3376 4.2.12).
    V3Report {
        records: Vec<GroupRecord>,
    },
    /// PIMv2 hello (IPv4 protocol / IPv6 next header 103).
    PimHello,
    /// Multicast Router Discovery advertisement (RFC 4286: IGMP 0x30, ICMPv6 151).
    RouterAdvertisement,
}

/// A parsed message and the IP source address it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub source: IpAddr,
    pub kind: MessageKind,
}

// ---------------------------------------------------------------------------------------------
// Exponential codes

/// Decodes a floating-point code with `mant_bits` mantissa bits and 3 exponent bits below the
/// top bit (RFC 3376 4.1.1, RFC 3810 5.1.3): below the top bit the code is the value itself,
/// else `(mant | 1 << mant_bits) << (exp + 3)`.
const fn decode_exp(code: u32, mant_bits: u32) -> u32 {
    let top = 1 << (mant_bits + 3);
    if code < top {
        code
    } else {
        let mant = code & ((1 << mant_bits) - 1);
        let exp = (code >> mant_bits) & 0x07;
        (mant | (1 << mant_bits)) << (exp + 3)
    }
}

/// The inverse of [`decode_exp`], rounding down; values above the largest representable one
/// give the largest code.
const fn encode_exp(value: u32, mant_bits: u32) -> u32 {
    let top = 1 << (mant_bits + 3);
    if value < top {
        return value;
    }
    let mut exp = 0;
    while exp < 8 {
        let mant = value >> (exp + 3);
        if mant < (2 << mant_bits) {
            return top | (exp << mant_bits) | (mant & ((1 << mant_bits) - 1));
        }
        exp += 1;
    }
    (top << 1) - 1
}

/// Decodes an 8-bit IGMPv3 Max Resp Code / IGMPv3 and MLDv2 QQIC (RFC 3376 4.1.1, 4.1.7).
pub const fn decode_code8(code: u8) -> u32 {
    decode_exp(code as u32, 4)
}

/// Encodes a value as an 8-bit exponential code, rounding down; values above the largest
/// representable one (31744) give the largest code.
pub const fn encode_code8(value: u32) -> u8 {
    encode_exp(value, 4) as u8
}

/// Decodes a 16-bit MLDv2 Maximum Response Code (RFC 3810 5.1.3), in milliseconds.
pub const fn decode_code16(code: u16) -> u32 {
    decode_exp(code as u32, 12)
}

/// Encodes a value as a 16-bit MLDv2 exponential code, rounding down and saturating.
pub const fn encode_code16(value: u32) -> u16 {
    encode_exp(value, 12) as u16
}

fn deciseconds(d: Duration) -> u32 {
    u32::try_from(d.as_millis() / 100).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Parsing

fn slice(buf: &[u8], start: usize, len: usize) -> Result<&[u8], ParseError> {
    let end = start.checked_add(len).ok_or(ParseError::Truncated)?;
    buf.get(start..end).ok_or(ParseError::Truncated)
}

fn byte(buf: &[u8], at: usize) -> Result<u8, ParseError> {
    buf.get(at).copied().ok_or(ParseError::Truncated)
}

fn be16(buf: &[u8], at: usize) -> Result<u16, ParseError> {
    let b = slice(buf, at, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn v4(buf: &[u8], at: usize) -> Result<Ipv4Addr, ParseError> {
    let b = slice(buf, at, 4)?;
    Ok(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn v6(buf: &[u8], at: usize) -> Result<Ipv6Addr, ParseError> {
    let b = slice(buf, at, 16)?;
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ok(Ipv6Addr::from(a))
}

/// Ones-complement sum of 16-bit words (odd trailing byte padded with zero), not yet folded.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo_v6(src: &Ipv6Addr, dst: &Ipv6Addr, len: usize, next: u8) -> u64 {
    let acc = sum16(&src.octets(), 0);
    let acc = sum16(&dst.octets(), acc);
    acc + (len as u64 & 0xffff_ffff) + u64::from(next)
}

/// Parses a full Ethernet frame with up to [`MAX_VLAN_TAGS`](relay_common::parse::MAX_VLAN_TAGS)
/// VLAN tags, as the XDP program does.
pub fn parse(frame: &[u8]) -> Result<Message, ParseError> {
    let eth = frame.read::<ETH_HLEN>(0).ok_or(ParseError::Truncated)?;
    let l2 = link_layer(&frame, &eth)?;
    match l2.ethertype {
        ETH_P_IP => parse_ipv4(frame, l2.l3_offset),
        ETH_P_IPV6 => parse_ipv6(frame, l2.l3_offset),
        _ => Err(ParseError::NotIp),
    }
}

/// Parses an IP packet without link-layer header (for L3 / tun ports).
pub fn parse_ip(packet: &[u8]) -> Result<Message, ParseError> {
    match byte(packet, 0)? >> 4 {
        4 => parse_ipv4(packet, 0),
        6 => parse_ipv6(packet, 0),
        _ => Err(ParseError::NotIp),
    }
}

impl From<HeaderError> for ParseError {
    fn from(e: HeaderError) -> Self {
        match e {
            HeaderError::Truncated => ParseError::Truncated,
            HeaderError::Invalid => ParseError::BadIpHeader,
            HeaderError::TooManyExtensionHeaders => ParseError::TooManyExtensionHeaders,
        }
    }
}

/// The IPv4 packet at `l3` of `frame`: header checks shared with the XDP program, then what
/// only the control plane checks (header checksum, no fragments), then the message.
fn parse_ipv4(frame: &[u8], l3: usize) -> Result<Message, ParseError> {
    let ip = ipv4_header(&frame, l3)?;
    if fold(sum16(slice(frame, l3, ip.header_len)?, 0)) != 0 {
        return Err(ParseError::BadIpChecksum);
    }
    if u16::from_be_bytes([ip.fixed[6], ip.fixed[7]]) & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    let src = Ipv4Addr::from(ip.source());
    let payload = slice(frame, l3 + ip.header_len, ip.total_len - ip.header_len)?;
    let msg = match ip.protocol() {
        IPPROTO_IGMP => parse_igmp(src, payload)?,
        IPPROTO_PIM => parse_pim(IpAddr::V4(src), payload, 0)?,
        _ => return Err(ParseError::NotMembership),
    };
    let options = slice(frame, l3 + 20, ip.header_len - 20)?;
    let envelope = Envelope {
        destination: IpAddr::V4(Ipv4Addr::from(ip.destination())),
        ttl: ip.fixed[8],
        router_alert: has_ipv4_router_alert(options),
        // IGMPv3 reports only: older hosts and routers may leave the option out.
        router_alert_required: matches!(msg.kind, MessageKind::V3Report { .. }),
    };
    envelope.check(&msg)?;
    Ok(msg)
}

/// What the IP header says about a message: checked against its type by
/// [`Envelope::check`] (RFC 3376 4 and 9.1, RFC 3810 5 and 7.4, RFC 7761 4.3.1, RFC 4286).
struct Envelope {
    destination: IpAddr,
    ttl: u8,
    router_alert: bool,
    router_alert_required: bool,
}

impl Envelope {
    fn check(&self, msg: &Message) -> Result<(), ParseError> {
        if self.ttl != 1 {
            return Err(ParseError::BadTtl);
        }
        if self.router_alert_required && !self.router_alert {
            return Err(ParseError::NoRouterAlert);
        }
        if let IpAddr::V6(source) = msg.source {
            // Queries and advertisements come from a router's link-local address; reports and
            // dones may also come from :: (a host still configuring its address).
            let reporting = matches!(
                msg.kind,
                MessageKind::V2Report { .. }
                    | MessageKind::Leave { .. }
                    | MessageKind::V3Report { .. }
            );
            if !(is_link_local(&source) || (reporting && source.is_unspecified())) {
                return Err(ParseError::BadSource);
            }
        }
        let family = Family::of(&msg.source);
        let d = self.destination;
        let routers = match family {
            Family::V4 => IpAddr::V4(ALL_ROUTERS_V4),
            Family::V6 => IpAddr::V6(ALL_ROUTERS_V6),
        };
        let fits = match &msg.kind {
            MessageKind::Query(q) => match q.group {
                None => d == family.all_systems(),
                Some(group) => d == group || d == family.all_systems(),
            },
            MessageKind::V1Report { group } | MessageKind::V2Report { group } => d == *group,
            MessageKind::Leave { group } => d == routers || d == *group,
            MessageKind::V3Report { .. } => {
                d == match family {
                    Family::V4 => IpAddr::V4(IGMPV3_ROUTERS),
                    Family::V6 => IpAddr::V6(MLDV2_ROUTERS),
                }
            }
            MessageKind::PimHello => {
                d == match family {
                    Family::V4 => IpAddr::V4(ALL_PIM_ROUTERS_V4),
                    Family::V6 => IpAddr::V6(ALL_PIM_ROUTERS_V6),
                }
            }
            MessageKind::RouterAdvertisement => {
                d == match family {
                    Family::V4 => IpAddr::V4(ALL_SNOOPERS_V4),
                    Family::V6 => IpAddr::V6(ALL_SNOOPERS_V6),
                }
            }
        };
        if fits {
            Ok(())
        } else {
            Err(ParseError::BadDestination)
        }
    }
}

/// fe80::/10.
fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// Whether IPv4 `options` hold a Router Alert option (type 148, RFC 2113). Their length
/// byte counts the whole option.
fn has_ipv4_router_alert(options: &[u8]) -> bool {
    options_contain(options, 148, |kind| kind <= 1, usize::from)
}

/// Whether an IPv6 hop-by-hop header holds a Router Alert option (type 5, RFC 2711). Its
/// options start after the next-header and length bytes; their length byte counts the data.
fn has_ipv6_router_alert(hop_by_hop: &[u8]) -> bool {
    let Some(&units) = hop_by_hop.get(1) else { return false };
    let end = (usize::from(units) + 1) * 8;
    hop_by_hop.get(2..end.min(hop_by_hop.len())).is_some_and(|options| {
        options_contain(options, 5, |kind| kind == 0, |len| usize::from(len) + 2)
    })
}

/// Walks type-length-value options looking for type `wanted`. `single` tells the one-byte
/// options (padding), `size` an option's whole size from its length byte.
fn options_contain(
    options: &[u8],
    wanted: u8,
    single: impl Fn(u8) -> bool,
    size: impl Fn(u8) -> usize,
) -> bool {
    let mut i = 0;
    while let Some(&kind) = options.get(i) {
        if kind == wanted {
            return true;
        }
        if single(kind) {
            i += 1;
            continue;
        }
        match options.get(i + 1).map(|len| size(*len)) {
            Some(step) if step >= 2 => i += step,
            _ => return false,
        }
    }
    false
}

/// The IPv6 packet at `l3` of `frame`: fixed header and extension-header walk shared with the
/// XDP program, then the message. Fragments are refused (the first one included).
fn parse_ipv6(frame: &[u8], l3: usize) -> Result<Message, ParseError> {
    let ip = ipv6_header(&frame, l3)?;
    // The walk sees only the IP packet, not the Ethernet padding after it.
    let packet = slice(frame, 0, l3 + IPV6_HLEN + ip.payload_len)?;
    let upper = ipv6_upper_layer(&packet, ip.next_header(), l3 + IPV6_HLEN)?;
    if upper.protocol == IPPROTO_ICMPV6 && upper.offset > MAX_PARSE_OFFSET {
        // The classifier gives up on an ICMPv6 header this far in, also when the walk ended
        // at its last extension header without looking there.
        return Err(ParseError::TooManyExtensionHeaders);
    }
    if upper.fragment {
        return Err(ParseError::Fragment);
    }
    let m = packet.get(upper.offset..).ok_or(ParseError::Truncated)?;
    let src = Ipv6Addr::from(ip.source());
    let dst = Ipv6Addr::from(ip.destination());
    let msg = match upper.protocol {
        IPPROTO_ICMPV6 => parse_icmpv6(src, dst, m)?,
        IPPROTO_PIM => parse_pim(IpAddr::V6(src), m, pseudo_v6(&src, &dst, m.len(), IPPROTO_PIM))?,
        _ => return Err(ParseError::NotMembership),
    };
    let hop_by_hop = packet.get(l3 + IPV6_HLEN..upper.offset).unwrap_or_default();
    let envelope = Envelope {
        destination: IpAddr::V6(dst),
        ttl: ip.fixed[7],
        router_alert: ip.next_header() == 0 && has_ipv6_router_alert(hop_by_hop),
        // Every MLD message (RFC 2710 3, RFC 3810 5); not PIM.
        router_alert_required: upper.protocol == IPPROTO_ICMPV6,
    };
    envelope.check(&msg)?;
    Ok(msg)
}

fn parse_pim(source: IpAddr, m: &[u8], pseudo: u64) -> Result<Message, ParseError> {
    if m.len() < 4 {
        return Err(ParseError::BadLength);
    }
    if fold(sum16(m, pseudo)) != 0 {
        return Err(ParseError::BadChecksum);
    }
    if byte(m, 0)? != PIM_V2_HELLO {
        return Err(ParseError::UnknownType);
    }
    Ok(Message { source, kind: MessageKind::PimHello })
}

fn group_or_general(group: IpAddr) -> Option<IpAddr> {
    (!group.is_unspecified()).then_some(group)
}

fn parse_igmp(src: Ipv4Addr, m: &[u8]) -> Result<Message, ParseError> {
    if m.len() < 8 {
        return Err(ParseError::BadLength);
    }
    if fold(sum16(m, 0)) != 0 {
        return Err(ParseError::BadChecksum);
    }
    let ty = byte(m, 0)?;
    let code = byte(m, 1)?;
    let group = IpAddr::V4(v4(m, 4)?);
    let kind = match ty {
        IGMP_QUERY => MessageKind::Query(parse_igmp_query(m, code, group)?),
        IGMP_V1_REPORT => MessageKind::V1Report { group },
        IGMP_V2_REPORT => MessageKind::V2Report { group },
        IGMP_V2_LEAVE => MessageKind::Leave { group },
        IGMP_V3_REPORT => MessageKind::V3Report { records: parse_records(m, Family::V4)? },
        IGMP_MRD_ADVERTISEMENT => MessageKind::RouterAdvertisement,
        _ => return Err(ParseError::UnknownType),
    };
    Ok(Message { source: IpAddr::V4(src), kind })
}

fn parse_igmp_query(m: &[u8], code: u8, group: IpAddr) -> Result<Query, ParseError> {
    let group = group_or_general(group);
    let mut q = Query {
        version: QueryVersion::IgmpV2,
        group,
        max_resp: Duration::ZERO,
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: Vec::new(),
    };
    match m.len() {
        8 if code == 0 => q.version = QueryVersion::IgmpV1,
        8 => q.max_resp = Duration::from_millis(u64::from(code) * 100),
        9..=11 => return Err(ParseError::BadLength),
        _ => {
            q.version = QueryVersion::IgmpV3;
            q.max_resp = Duration::from_millis(u64::from(decode_code8(code)) * 100);
            let flags = byte(m, 8)?;
            q.suppress = flags & 0x08 != 0;
            q.qrv = flags & 0x07;
            q.qqi = Duration::from_secs(u64::from(decode_code8(byte(m, 9)?)));
            let n = usize::from(be16(m, 10)?);
            if 12 + 4 * n > m.len() {
                return Err(ParseError::BadLength);
            }
            for i in 0..n {
                q.sources.push(IpAddr::V4(v4(m, 12 + 4 * i)?));
            }
        }
    }
    Ok(q)
}

/// Group records of an IGMPv3 (family V4) or MLDv2 (V6) report; `m` is the whole message.
fn parse_records(m: &[u8], family: Family) -> Result<Vec<GroupRecord>, ParseError> {
    let alen = match family {
        Family::V4 => 4,
        Family::V6 => 16,
    };
    let addr = |at: usize| -> Result<IpAddr, ParseError> {
        match family {
            Family::V4 => v4(m, at).map(IpAddr::V4),
            Family::V6 => v6(m, at).map(IpAddr::V6),
        }
    };
    let n = usize::from(be16(m, 6)?);
    let mut records = Vec::with_capacity(n.min(64));
    let mut off = 8;
    for _ in 0..n {
        let head = slice(m, off, 4 + alen).map_err(|_| ParseError::BadLength)?;
        let ty = head[0];
        let aux = usize::from(head[1]) * 4;
        let nsrc = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let end = off + 4 + alen + nsrc * alen + aux;
        if end > m.len() {
            return Err(ParseError::BadLength);
        }
        if let Some(kind) = RecordType::from_u8(ty) {
            let group = addr(off + 4)?;
            let mut sources = Vec::with_capacity(nsrc);
            for i in 0..nsrc {
                sources.push(addr(off + 4 + alen + i * alen)?);
            }
            records.push(GroupRecord { kind, group, sources });
        }
        off = end;
    }
    Ok(records)
}

fn parse_icmpv6(src: Ipv6Addr, dst: Ipv6Addr, m: &[u8]) -> Result<Message, ParseError> {
    if m.len() < 4 {
        return Err(ParseError::BadLength);
    }
    let ty = byte(m, 0)?;
    if !matches!(
        ty,
        MLD_QUERY | MLD_V1_REPORT | MLD_V1_DONE | MLD_V2_REPORT | MLD_MRD_ADVERTISEMENT
    ) {
        return Err(ParseError::NotMembership);
    }
    if fold(sum16(m, pseudo_v6(&src, &dst, m.len(), IPPROTO_ICMPV6))) != 0 {
        return Err(ParseError::BadChecksum);
    }
    let group = |m: &[u8]| -> Result<IpAddr, ParseError> {
        if m.len() < 24 {
            return Err(ParseError::BadLength);
        }
        v6(m, 8).map(IpAddr::V6)
    };
    let kind = match ty {
        MLD_QUERY => MessageKind::Query(parse_mld_query(m, group(m)?)?),
        MLD_V1_REPORT => MessageKind::V2Report { group: group(m)? },
        MLD_V1_DONE => MessageKind::Leave { group: group(m)? },
        MLD_V2_REPORT => {
            if m.len() < 8 {
                return Err(ParseError::BadLength);
            }
            MessageKind::V3Report { records: parse_records(m, Family::V6)? }
        }
        _ => {
            if m.len() < 8 {
                return Err(ParseError::BadLength);
            }
            MessageKind::RouterAdvertisement
        }
    };
    Ok(Message { source: IpAddr::V6(src), kind })
}

fn parse_mld_query(m: &[u8], group: IpAddr) -> Result<Query, ParseError> {
    let code = be16(m, 4)?;
    let mut q = Query {
        version: QueryVersion::MldV1,
        group: group_or_general(group),
        max_resp: Duration::ZERO,
        suppress: false,
        qrv: 0,
        qqi: Duration::ZERO,
        sources: Vec::new(),
    };
    match m.len() {
        24 => q.max_resp = Duration::from_millis(u64::from(code)),
        25..=27 => return Err(ParseError::BadLength),
        _ => {
            q.version = QueryVersion::MldV2;
            q.max_resp = Duration::from_millis(u64::from(decode_code16(code)));
            let flags = byte(m, 24)?;
            q.suppress = flags & 0x08 != 0;
            q.qrv = flags & 0x07;
            q.qqi = Duration::from_secs(u64::from(decode_code8(byte(m, 25)?)));
            let n = usize::from(be16(m, 26)?);
            if 28 + 16 * n > m.len() {
                return Err(ParseError::BadLength);
            }
            for i in 0..n {
                q.sources.push(IpAddr::V6(v6(m, 28 + 16 * i)?));
            }
        }
    }
    Ok(q)
}

// ---------------------------------------------------------------------------------------------
// Building

/// Largest number of sources in one query that keeps the frame within a 1500-byte MTU.
pub const fn max_query_sources(family: Family) -> usize {
    match family {
        Family::V4 => (MTU - 24 - 12) / 4,
        Family::V6 => (MTU - 48 - 28) / 16,
    }
}

/// Destination MAC of an IP multicast address.
pub fn multicast_mac(addr: &IpAddr) -> [u8; 6] {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            [0x33, 0x33, o[12], o[13], o[14], o[15]]
        }
    }
}

/// Builds a query as a complete Ethernet frame from `src_mac` / `src_ip`: router alert, TTL /
/// hop limit 1, checksums; general queries go to 224.0.0.1 / ff02::1, specific ones to the group.
/// For MLD, `src_ip` should be the port's link-local address (hosts drop other sources).
pub fn build_query(src_mac: [u8; 6], src_ip: IpAddr, query: &Query) -> Result<Vec<u8>, BuildError> {
    build(src_mac, &Message { source: src_ip, kind: MessageKind::Query(query.clone()) })
}

/// Builds any [`Message`] as a complete Ethernet frame (reports and leaves go to the addresses
/// hosts use: the group, 224.0.0.2 / ff02::2, 224.0.0.22 / ff02::16).
pub fn build(src_mac: [u8; 6], msg: &Message) -> Result<Vec<u8>, BuildError> {
    let family = Family::of(&msg.source);
    let same =
        |a: &IpAddr| if Family::of(a) == family { Ok(()) } else { Err(BuildError::FamilyMismatch) };
    let (dst, body, proto): (IpAddr, Vec<u8>, u8) = match (&msg.kind, family) {
        (MessageKind::Query(q), _) => {
            if q.version.family() != family {
                return Err(BuildError::FamilyMismatch);
            }
            if let Some(g) = &q.group {
                same(g)?;
            }
            q.sources.iter().try_for_each(same)?;
            if !q.version.has_sources()
                && (!q.sources.is_empty() || q.suppress || q.qrv != 0 || !q.qqi.is_zero())
            {
                return Err(BuildError::Unrepresentable);
            }
            if q.sources.len() > max_query_sources(family) {
                return Err(BuildError::TooLarge);
            }
            if q.qrv > 7 {
                return Err(BuildError::Unrepresentable);
            }
            let dst = q.group.unwrap_or(family.all_systems());
            match family {
                Family::V4 => (dst, igmp_query(q)?, IPPROTO_IGMP),
                Family::V6 => (dst, mld_query(q), IPPROTO_ICMPV6),
            }
        }
        (MessageKind::V1Report { group }, Family::V4) => {
            same(group)?;
            (*group, igmp_simple(IGMP_V1_REPORT, 0, group), IPPROTO_IGMP)
        }
        (MessageKind::V1Report { .. }, Family::V6) => return Err(BuildError::FamilyMismatch),
        (MessageKind::V2Report { group }, Family::V4) => {
            same(group)?;
            (*group, igmp_simple(IGMP_V2_REPORT, 0, group), IPPROTO_IGMP)
        }
        (MessageKind::Leave { group }, Family::V4) => {
            same(group)?;
            (IpAddr::V4(ALL_ROUTERS_V4), igmp_simple(IGMP_V2_LEAVE, 0, group), IPPROTO_IGMP)
        }
        (MessageKind::V2Report { group }, Family::V6) => {
            same(group)?;
            (*group, mld_simple(MLD_V1_REPORT, group), IPPROTO_ICMPV6)
        }
        (MessageKind::Leave { group }, Family::V6) => {
            same(group)?;
            (IpAddr::V6(ALL_ROUTERS_V6), mld_simple(MLD_V1_DONE, group), IPPROTO_ICMPV6)
        }
        (MessageKind::V3Report { records }, _) => {
            for r in records {
                same(&r.group)?;
                r.sources.iter().try_for_each(same)?;
            }
            match family {
                Family::V4 => {
                    (IpAddr::V4(IGMPV3_ROUTERS), report(IGMP_V3_REPORT, records), IPPROTO_IGMP)
                }
                Family::V6 => {
                    (IpAddr::V6(MLDV2_ROUTERS), report(MLD_V2_REPORT, records), IPPROTO_ICMPV6)
                }
            }
        }
        (MessageKind::PimHello, Family::V4) => {
            (IpAddr::V4(ALL_PIM_ROUTERS_V4), pim_hello(), IPPROTO_PIM)
        }
        (MessageKind::PimHello, Family::V6) => {
            (IpAddr::V6(ALL_PIM_ROUTERS_V6), pim_hello(), IPPROTO_PIM)
        }
        (MessageKind::RouterAdvertisement, Family::V4) => {
            (IpAddr::V4(ALL_SNOOPERS_V4), mrd_advertisement(IGMP_MRD_ADVERTISEMENT), IPPROTO_IGMP)
        }
        (MessageKind::RouterAdvertisement, Family::V6) => {
            (IpAddr::V6(ALL_SNOOPERS_V6), mrd_advertisement(MLD_MRD_ADVERTISEMENT), IPPROTO_ICMPV6)
        }
    };
    let router_alert = proto != IPPROTO_PIM;
    let ip = match (msg.source, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, proto, router_alert, body)?,
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_packet(s, d, proto, router_alert, body)?,
        _ => return Err(BuildError::FamilyMismatch),
    };
    let ethertype = match family {
        Family::V4 => ETH_P_IP,
        Family::V6 => ETH_P_IPV6,
    };
    let mut frame = Vec::with_capacity(14 + ip.len());
    frame.extend_from_slice(&multicast_mac(&dst));
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip);
    Ok(frame)
}

/// An IPv4 packet (from its header on) addressed to `to` instead, header checksum updated
/// (IGMP's own checksum does not cover the addresses). `None` for anything but IPv4.
pub fn readdress_ipv4(packet: &[u8], to: Ipv4Addr) -> Option<Vec<u8>> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl {
        return None;
    }
    let mut copy = packet.to_vec();
    copy[16..20].copy_from_slice(&to.octets());
    copy[10..12].fill(0);
    set_checksum(&mut copy[..ihl], 10, 0);
    Some(copy)
}

fn put_addr(buf: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
    }
}

fn set_checksum(buf: &mut [u8], at: usize, pseudo: u64) {
    let c = fold(sum16(buf, pseudo)).to_be_bytes();
    if let Some(dst) = buf.get_mut(at..at + 2) {
        dst.copy_from_slice(&c);
    }
}

fn igmp_simple(ty: u8, code: u8, group: &IpAddr) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0];
    put_addr(&mut b, group);
    b
}

fn mld_simple(ty: u8, group: &IpAddr) -> Vec<u8> {
    let mut b = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    put_addr(&mut b, group);
    b
}

fn igmp_query(q: &Query) -> Result<Vec<u8>, BuildError> {
    let group = q.group.unwrap_or(Family::V4.unspecified());
    Ok(match q.version {
        QueryVersion::IgmpV1 => {
            if q.group.is_some() {
                return Err(BuildError::Unrepresentable);
            }
            igmp_simple(IGMP_QUERY, 0, &group)
        }
        QueryVersion::IgmpV2 => {
            let code = deciseconds(q.max_resp).clamp(1, 255) as u8;
            igmp_simple(IGMP_QUERY, code, &group)
        }
        _ => {
            let mut b = igmp_simple(IGMP_QUERY, encode_code8(deciseconds(q.max_resp)), &group);
            b.push(u8::from(q.suppress) << 3 | (q.qrv & 7));
            b.push(encode_code8(seconds(q.qqi)));
            b.extend_from_slice(&(q.sources.len() as u16).to_be_bytes());
            q.sources.iter().for_each(|s| put_addr(&mut b, s));
            b
        }
    })
}

fn mld_query(q: &Query) -> Vec<u8> {
    let group = q.group.unwrap_or(Family::V6.unspecified());
    let code = match q.version {
        QueryVersion::MldV1 => millis(q.max_resp).min(0xffff) as u16,
        _ => encode_code16(millis(q.max_resp)),
    };
    let mut b = vec![MLD_QUERY, 0, 0, 0];
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    put_addr(&mut b, &group);
    if q.version == QueryVersion::MldV2 {
        b.push(u8::from(q.suppress) << 3 | (q.qrv & 7));
        b.push(encode_code8(seconds(q.qqi)));
        b.extend_from_slice(&(q.sources.len() as u16).to_be_bytes());
        q.sources.iter().for_each(|s| put_addr(&mut b, s));
    }
    b
}

fn report(ty: u8, records: &[GroupRecord]) -> Vec<u8> {
    let mut b = vec![ty, 0, 0, 0, 0, 0];
    b.extend_from_slice(&(records.len().min(0xffff) as u16).to_be_bytes());
    for r in records {
        b.push(r.kind as u8);
        b.push(0);
        b.extend_from_slice(&(r.sources.len().min(0xffff) as u16).to_be_bytes());
        put_addr(&mut b, &r.group);
        r.sources.iter().for_each(|s| put_addr(&mut b, s));
    }
    b
}

fn pim_hello() -> Vec<u8> {
    // Holdtime option (type 1, length 2): 105 s.
    vec![PIM_V2_HELLO, 0, 0, 0, 0, 1, 0, 2, 0, 105]
}

fn mrd_advertisement(ty: u8) -> Vec<u8> {
    // Advertisement interval 20 s, query interval 125 s, robustness 2.
    vec![ty, 20, 0, 0, 0, 125, 0, 2]
}

fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    router_alert: bool,
    mut body: Vec<u8>,
) -> Result<Vec<u8>, BuildError> {
    let ihl = if router_alert { 24 } else { 20 };
    let total = ihl + body.len();
    if total > MTU {
        return Err(BuildError::TooLarge);
    }
    set_checksum(&mut body, 2, 0);
    let mut p = Vec::with_capacity(total);
    p.push(0x40 | (ihl / 4) as u8);
    p.push(0xc0); // precedence: internetwork control
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]); // id, flags, fragment offset
    p.push(1); // TTL
    p.push(proto);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    if router_alert {
        p.extend_from_slice(&[0x94, 0x04, 0x00, 0x00]);
    }
    set_checksum(&mut p, 10, 0);
    p.extend_from_slice(&body);
    Ok(p)
}

fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    router_alert: bool,
    mut body: Vec<u8>,
) -> Result<Vec<u8>, BuildError> {
    let ext: &[u8] = if router_alert {
        // hop-by-hop: next header, length 0, router alert (MLD), PadN(0)
        &[proto, 0, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]
    } else {
        &[]
    };
    let plen = ext.len() + body.len();
    if 40 + plen > MTU {
        return Err(BuildError::TooLarge);
    }
    let pseudo = pseudo_v6(&src, &dst, body.len(), proto);
    set_checksum(&mut body, 2, pseudo);
    let mut p = Vec::with_capacity(40 + plen);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(plen as u16).to_be_bytes());
    p.push(if router_alert { 0 } else { proto });
    p.push(1); // hop limit
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(ext);
    p.extend_from_slice(&body);
    Ok(p)
}

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
