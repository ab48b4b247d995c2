//! Builders for test frames (feature `frames`): used by the parser's unit tests here and by the
//! BPF_PROG_TEST_RUN tests that feed the same frames to the real program.

extern crate alloc;

use alloc::vec::Vec;

/// Source MAC used by every builder.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The multicast MAC of an IPv4 group (01:00:5e + low 23 bits).
pub fn mac_v4(group: [u8; 4]) -> [u8; 6] {
    [0x01, 0x00, 0x5e, group[1] & 0x7f, group[2], group[3]]
}

/// The multicast MAC of an IPv6 group (33:33 + low 32 bits).
pub fn mac_v6(group: [u8; 16]) -> [u8; 6] {
    [0x33, 0x33, group[12], group[13], group[14], group[15]]
}

/// An Ethernet frame under construction.
#[derive(Clone, Debug)]
pub struct FrameBuilder {
    dst: [u8; 6],
    vlans: Vec<(u16, u16)>,
    ethertype: u16,
    payload: Vec<u8>,
}

impl FrameBuilder {
    /// A frame to `dst` with the given ethertype and L3 payload.
    pub fn new(dst: [u8; 6], ethertype: u16, payload: Vec<u8>) -> Self {
        Self { dst, vlans: Vec::new(), ethertype, payload }
    }

    /// Adds a VLAN tag (outermost first): `tpid` 0x8100 or 0x88a8.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    /// The bytes on the wire.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(64 + self.payload.len());
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&SRC_MAC);
        for (tpid, vid) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&self.ethertype.to_be_bytes());
        f.extend_from_slice(&self.payload);
        f
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (valid header checksum) with `proto` and `l4` as payload.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, ttl: u8, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, ttl, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// An IPv6 packet: `ext` is a list of (next-header value of the extension, its bytes) placed
/// between the fixed header and the upper-layer `l4` of protocol `proto`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], ext: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let ext_len: usize = ext.iter().map(|(_, b)| b.len()).sum();
    let mut p = Vec::with_capacity(40 + ext_len + l4.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
    p.push(ext.first().map_or(proto, |(nh, _)| *nh));
    p.push(1);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = ext.get(i + 1).map_or(proto, |(nh, _)| *nh);
        p.extend_from_slice(&b);
    }
    p.extend_from_slice(l4);
    p
}

/// A hop-by-hop options header carrying the router alert option (8 bytes).
pub fn hop_by_hop_router_alert() -> (u8, Vec<u8>) {
    (0, alloc::vec![0, 0, 5, 2, 0, 0, 1, 0])
}

/// A destination-options header of `8 * (units + 1)` bytes filled with PadN.
pub fn dest_opts(units: u8) -> (u8, Vec<u8>) {
    let len = 8 * (usize::from(units) + 1);
    let mut b = alloc::vec![0u8; len];
    b[1] = units;
    b[2] = 1; // PadN
    b[3] = (len - 4) as u8;
    (60, b)
}

/// A fragment header (first fragment when `offset` is 0).
pub fn fragment(offset: u16) -> (u8, Vec<u8>) {
    let o = (offset << 3).to_be_bytes();
    (44, alloc::vec![0, 0, o[0], o[1], 0, 0, 0, 1])
}

/// A UDP header + payload (checksum left zero: the parser does not look at it).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A complete IPv4 UDP multicast frame from `src` to `group`.
pub fn udp4_frame(src: [u8; 4], group: [u8; 4], payload: &[u8]) -> FrameBuilder {
    FrameBuilder::new(mac_v4(group), 0x0800, ipv4(src, group, 17, 64, &udp(5000, 5001, payload)))
}

/// A complete IPv6 UDP multicast frame from `src` to `group`.
pub fn udp6_frame(src: [u8; 16], group: [u8; 16], payload: &[u8]) -> FrameBuilder {
    FrameBuilder::new(mac_v6(group), 0x86dd, ipv6(src, group, &[], 17, &udp(5000, 5001, payload)))
}

/// An IGMPv2 membership report for `group`.
pub fn igmp_v2_report(src: [u8; 4], group: [u8; 4]) -> FrameBuilder {
    let mut igmp = alloc::vec![0x16, 0, 0, 0, group[0], group[1], group[2], group[3]];
    let c = checksum(&igmp);
    igmp[2..4].copy_from_slice(&c.to_be_bytes());
    FrameBuilder::new(mac_v4(group), 0x0800, ipv4(src, group, 2, 1, &igmp))
}

/// An MLDv2 report (type 143, no records) to ff02::16 with a hop-by-hop router alert.
pub fn mldv2_report(src: [u8; 16]) -> FrameBuilder {
    let dst = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
    FrameBuilder::new(
        mac_v6(dst),
        0x86dd,
        ipv6(src, dst, &[hop_by_hop_router_alert()], 58, &[143, 0, 0, 0, 0, 0, 0, 0]),
    )
}

/// An MLDv1 report (type 131) sent to the group itself (global scope), as hosts do.
pub fn mldv1_report(src: [u8; 16], group: [u8; 16]) -> FrameBuilder {
    let mut mld = alloc::vec![131, 0, 0, 0, 0, 0, 0, 0];
    mld.extend_from_slice(&group);
    FrameBuilder::new(
        mac_v6(group),
        0x86dd,
        ipv6(src, group, &[hop_by_hop_router_alert()], 58, &mld),
    )
}
