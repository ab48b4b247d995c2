//! Control-plane frames on a host's segment: writing crafted frames onto the wire (a test playing
//! a host or a rival querier), watching IGMP arrive, and the addresses crafted hosts send from.
//!
//! The frames themselves are built by the tests (with `relay::membership::packet`, a
//! dev-dependency this library must not have, see Cargo.toml): this module only sends and
//! observes bytes.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{netns::NetNs, topology::Host};

/// IGMP message types, for [`IgmpCapture::wait_for`].
pub const IGMP_QUERY: u8 = 0x11;
/// IGMPv2 membership report.
pub const IGMP_V2_REPORT: u8 = 0x16;
/// IGMPv3 membership report.
pub const IGMP_V3_REPORT: u8 = 0x22;

/// A made-up, locally administered MAC for crafted frames of host number `n`:
/// `02:6d:63:00:00:<n>`.
pub fn crafted_mac(n: u8) -> [u8; 6] {
    [0x02, 0x6d, 0x63, 0, 0, n]
}

/// Sends an Ethernet `frame` (destination MAC first) out of `iface` in `ns` through a raw packet
/// socket; panics if it cannot be sent.
pub fn inject_on(ns: &NetNs, iface: &str, frame: &[u8]) {
    ns.in_netns(|| send_raw(iface, frame))
        .unwrap_or_else(|e| panic!("injecting a frame on {iface} in {ns}: {e}"));
}

/// Sends a crafted Ethernet `frame` out of the host's interface (see [`inject_on`]).
pub fn inject(host: &Host, frame: &[u8]) {
    inject_on(&host.ns, &host.iface, frame);
}

/// `sendto(2)` of `frame` on an `AF_PACKET`/`SOCK_RAW` socket addressed to `iface` (current
/// network namespace).
fn send_raw(iface: &str, frame: &[u8]) -> io::Result<()> {
    if frame.len() < 6 {
        return Err(io::Error::other("frame shorter than an Ethernet address"));
    }
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    // SAFETY: plain socket(2), owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: buffers valid for their lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A crafted IGMP / MLD host on a [`Host`]'s segment: the Ethernet source and IP source its
/// frames carry, and the interface they are written to.
///
/// Build a frame from [`CraftedHost::mac`] and [`CraftedHost::source`], then
/// [`CraftedHost::send`] it.
pub struct CraftedHost<'a> {
    /// The segment's host, whose interface the frames leave through.
    pub host: &'a Host,
    /// Ethernet source ([`crafted_mac`]).
    pub mac: [u8; 6],
    /// IP source: the host's IPv4 address, or (MLD) its IPv6 link-local address.
    pub source: IpAddr,
}

impl<'a> CraftedHost<'a> {
    /// Crafted host number `n` on `host`'s segment: IGMP from the host's IPv4 address, MLD
    /// (`v6`) from its link-local address ([`link_local`]).
    pub fn new(host: &'a Host, n: u8, v6: bool) -> Self {
        let source = if v6 { IpAddr::V6(link_local(host)) } else { IpAddr::V4(host.v4) };
        Self::with_source(host, n, source)
    }

    /// Another host on the same segment (IPv4: `.3` of the host's subnet; IPv6: the same
    /// link-local address is fine for a router, which keeps no per-host state).
    pub fn neighbour(host: &'a Host, n: u8, v6: bool) -> Self {
        let mut crafted = Self::new(host, n, v6);
        if let IpAddr::V4(a) = crafted.source {
            let o = a.octets();
            crafted.source = IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 3));
        }
        crafted
    }

    /// Crafted host number `n` on `host`'s segment sending from any `source` (a rival querier
    /// with a chosen address, say).
    pub fn with_source(host: &'a Host, n: u8, source: IpAddr) -> Self {
        Self { host, mac: crafted_mac(n), source }
    }

    /// Writes `frame` onto the segment ([`inject`]).
    pub fn send(&self, frame: &[u8]) {
        inject(self.host, frame);
    }
}

/// The IPv6 link-local address of the host's interface (`ip -j -6 addr show scope link`),
/// waiting up to 10 s for it to appear.
pub fn link_local(host: &Host) -> Ipv6Addr {
    link_local_of(&host.ns, &host.iface)
}

/// The IPv6 link-local address of `iface` in `ns` (a gateway's port, say), waiting up to 10 s
/// for it to appear.
pub fn link_local_of(ns: &NetNs, iface: &str) -> Ipv6Addr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.ip(&["-j", "-6", "addr", "show", "dev", iface, "scope", "link"]);
        let doc: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let found = doc
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .find_map(|a| a["local"].as_str().and_then(|s| s.parse::<Ipv6Addr>().ok()));
        if let Some(a) = found {
            return a;
        }
        assert!(Instant::now() < deadline, "no link-local address on {iface} in {ns}: {out}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Watches the IGMP frames arriving on a host's interface (a non-blocking IPv4 packet socket in
/// the host's namespace; frames the host sends are ignored), until dropped.
pub struct IgmpCapture {
    fd: OwnedFd,
}

impl IgmpCapture {
    /// Starts capturing on the host's interface.
    pub fn new(host: &Host) -> Self {
        Self { fd: capture_socket(host, libc::ETH_P_IP) }
    }

    /// Waits up to `timeout` for an incoming IGMP message of `igmp_type` ([`IGMP_QUERY`],
    /// [`IGMP_V2_REPORT`], [`IGMP_V3_REPORT`]); true when one arrived. Frames of other types
    /// read meanwhile are consumed.
    pub fn wait_for(&self, igmp_type: u8, timeout: Duration) -> bool {
        self.wait_for_packet(timeout, |ip, igmp| {
            let _ = ip;
            igmp.first() == Some(&igmp_type)
        })
        .is_some()
    }

    /// Waits up to `timeout` for an incoming IGMP packet for which `pred(ip_header, igmp)`
    /// holds, and returns the whole IP packet. Packets read meanwhile are consumed.
    pub fn wait_for_packet(
        &self,
        timeout: Duration,
        pred: impl Fn(&[u8], &[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        wait_for_incoming(&self.fd, timeout, |p| {
            // IPv4 protocol 2 is IGMP.
            if p.len() < 24 || p[9] != 2 {
                return false;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            p.len() > ihl && pred(&p[..ihl], &p[ihl..])
        })
    }
}

/// MLD message types (ICMPv6), for [`MldCapture`].
pub const MLD_QUERY: u8 = 130;
/// MLDv1 report.
pub const MLD_V1_REPORT: u8 = 131;
/// MLDv2 report.
pub const MLD_V2_REPORT: u8 = 143;

/// Watches the MLD messages arriving on a host's interface (a non-blocking IPv6 packet socket in
/// the host's namespace; frames the host sends are ignored), until dropped.
pub struct MldCapture {
    fd: OwnedFd,
}

impl MldCapture {
    /// Starts capturing on the host's interface.
    pub fn new(host: &Host) -> Self {
        Self { fd: capture_socket(host, libc::ETH_P_IPV6) }
    }

    /// Waits up to `timeout` for an incoming MLD message (ICMPv6 types 130 to 132 and 143, after
    /// a hop-by-hop header if any) for which `pred(ipv6_header, icmpv6)` holds, and returns the
    /// whole IPv6 packet. Packets read meanwhile are consumed.
    pub fn wait_for_packet(
        &self,
        timeout: Duration,
        pred: impl Fn(&[u8], &[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        wait_for_incoming(&self.fd, timeout, |p| {
            let Some(icmp) = mld_payload(p) else { return false };
            matches!(icmp.first(), Some(130..=132 | 143)) && pred(&p[..40], icmp)
        })
    }
}

/// The ICMPv6 message of an IPv6 packet `p` (directly after the fixed header, or after one
/// hop-by-hop options header as MLD has), or `None`.
fn mld_payload(p: &[u8]) -> Option<&[u8]> {
    const ICMPV6: u8 = 58;
    const HOP_BY_HOP: u8 = 0;
    match *p.get(6)? {
        ICMPV6 => p.get(40..),
        HOP_BY_HOP => {
            let len = (usize::from(*p.get(41)?) + 1) * 8;
            if *p.get(40)? != ICMPV6 {
                return None;
            }
            p.get(40 + len..)
        }
        _ => None,
    }
}

/// A capture socket ([`packet_socket`]) for `ethertype` on the host's interface, in its namespace.
fn capture_socket(host: &Host, ethertype: libc::c_int) -> OwnedFd {
    host.ns
        .in_netns(|| packet_socket(&host.iface, ethertype as u16))
        .unwrap_or_else(|e| panic!("capture on {} in {}: {e}", host.iface, host.ns))
}

/// Reads the non-blocking packet socket `fd` for up to `timeout` and returns the first incoming
/// packet (not one the host sent) for which `wanted` holds. Packets read meanwhile are consumed.
fn wait_for_incoming(
    fd: &OwnedFd,
    timeout: Duration,
    wanted: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buffers valid for their sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(sll).cast(),
                &mut len,
            )
        };
        if n <= 0 {
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        let p = &buf[..n as usize];
        if sll.sll_pkttype != libc::PACKET_OUTGOING && wanted(p) {
            return Some(p.to_vec());
        }
    }
    None
}

/// An `AF_PACKET`/`SOCK_DGRAM` socket for `ethertype`, non-blocking, bound to `iface`.
fn packet_socket(iface: &str, ethertype: u16) -> io::Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    let proto = ethertype.to_be();
    // SAFETY: plain socket(2), owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: valid sockaddr_ll and size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mld_payload_skips_one_hop_by_hop_header() {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 58, 1];
        p.extend_from_slice(&[0; 32]);
        p.extend_from_slice(&[143, 0, 0, 0]);
        assert_eq!(mld_payload(&p), Some(&[143, 0, 0, 0][..]));
        // Hop-by-hop (8 bytes: next header ICMPv6, length 0, router alert, padding) first.
        p[6] = 0;
        p.splice(40..40, [58, 0, 5, 2, 0, 0, 1, 0]);
        assert_eq!(mld_payload(&p), Some(&[143, 0, 0, 0][..]));
        // A hop-by-hop header followed by something else, and a truncated packet.
        p[40] = 17;
        assert_eq!(mld_payload(&p), None);
        assert_eq!(mld_payload(&p[..41]), None);
    }
}
