//! The frames the benchmark sends: IPv4 UDP multicast with correct checksums, unicast, IGMP.

use std::net::Ipv4Addr;

/// Ethernet + IPv4 (no options) + UDP headers.
pub const HEADER_LEN: usize = 42;
/// The frame check sequence the wire adds (frame sizes are quoted with it, RFC 2544 style).
pub const FCS_LEN: usize = 4;

/// The multicast MAC address of an IPv4 group.
pub fn group_mac(group: Ipv4Addr) -> [u8; 6] {
    let o = group.octets();
    [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
}

/// A UDP datagram from `src` to `dst` in an Ethernet frame of `size` bytes on the wire
/// (including the FCS), TTL 64, both checksums filled in.
pub fn udp4(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    size: usize,
) -> Vec<u8> {
    let len = size.saturating_sub(FCS_LEN).max(HEADER_LEN);
    let payload_len = len - HEADER_LEN;
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    let total = (20 + 8 + payload_len) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let ip_sum = checksum(&f[ip_start..ip_start + 20], 0);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_start = f.len();
    let udp_len = (8 + payload_len) as u16;
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload_len).map(|i| i as u8));
    let mut pseudo = 0u32;
    for word in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    pseudo += 17 + u32::from(udp_len);
    let mut udp_sum = checksum(&f[udp_start..], pseudo);
    if udp_sum == 0 {
        udp_sum = 0xffff;
    }
    f[udp_start + 6..udp_start + 8].copy_from_slice(&udp_sum.to_be_bytes());
    f
}

/// An IGMPv2 membership report for `group` (with the Router Alert option, as hosts send it).
pub fn igmp_v2_report(src_mac: [u8; 6], src: Ipv4Addr, group: Ipv4Addr) -> Vec<u8> {
    igmp_v2(src_mac, src, group, false)
}

/// An IGMPv2 leave for `group`, to 224.0.0.2.
pub fn igmp_v2_leave(src_mac: [u8; 6], src: Ipv4Addr, group: Ipv4Addr) -> Vec<u8> {
    igmp_v2(src_mac, src, group, true)
}

fn igmp_v2(src_mac: [u8; 6], src: Ipv4Addr, group: Ipv4Addr, leave: bool) -> Vec<u8> {
    let dst = if leave { Ipv4Addr::new(224, 0, 0, 2) } else { group };
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&group_mac(dst));
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x46, 0xc0, 0, 32, 0, 0, 0x40, 0, 1, 2, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[0x94, 0x04, 0, 0]);
    let ip_sum = checksum(&f[ip_start..ip_start + 24], 0);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let igmp_start = f.len();
    f.extend_from_slice(&[if leave { 0x17 } else { 0x16 }, 0, 0, 0]);
    f.extend_from_slice(&group.octets());
    let igmp_sum = checksum(&f[igmp_start..], 0);
    f[igmp_start + 2..igmp_start + 4].copy_from_slice(&igmp_sum.to_be_bytes());
    f.resize(60, 0);
    f
}

/// The Internet checksum of `data` with `initial` (a pseudo-header sum) added.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { [chunk[0], chunk[1]] } else { [chunk[0], 0] };
        sum += u32::from(u16::from_be_bytes(word));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frame_has_the_requested_size_and_valid_checksums() {
        let f = udp4(
            group_mac(Ipv4Addr::new(239, 1, 1, 1)),
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(239, 1, 1, 1),
            5001,
            64,
        );
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0x01, 0x00, 0x5e, 1, 1, 1]);
        assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header checksum");
        let mut pseudo = 0u32;
        for w in f[26..34].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        pseudo += 17 + u32::from(u16::from_be_bytes([f[38], f[39]]));
        assert_eq!(checksum(&f[34..], pseudo), 0, "UDP checksum");
        assert_eq!(
            udp4([0; 6], [0; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, 1, 1400).len(),
            1396
        );
    }

    #[test]
    fn igmp_report_checksums() {
        let f = igmp_v2_report(
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(239, 1, 1, 1),
        );
        assert_eq!(checksum(&f[14..38], 0), 0);
        assert_eq!(checksum(&f[38..46], 0), 0);
    }
}
