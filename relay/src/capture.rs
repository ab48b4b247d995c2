//! The control-plane socket: one AF_PACKET socket that receives every IGMP, MLD and PIM frame
//! arriving on any interface (a classic BPF filter keeps everything else out) and sends the
//! queries mcrelay originates. On L3 ports (tun, WireGuard) frames are IP packets without a
//! link-layer header, received and sent as such.
//!
//! Why not raw IGMP sockets: the kernel delivers IGMP to raw sockets only for groups the host
//! itself joined (ip_check_mc_rcu), so reports for other groups would be missed. The XDP program
//! passes IGMP/MLD to the stack, and packet sockets see them before any IP processing.

use std::{
    io,
    mem::{size_of, zeroed},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// `ARPHRD_ETHER`: Ethernet devices (frames start with the MAC header).
const ARPHRD_ETHER: u32 = 1;
/// `ARPHRD_NONE`: L3 devices such as tun and WireGuard (packets start with the IP header).
const ARPHRD_NONE: u32 = 0xfffe;

/// A jump target of the filter program (an instruction index once placed).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    Accept,
    Reject,
    EthIpv4,
    EthIpv6,
    L3,
    L3Ipv4,
    PortOk,
}

/// One instruction: a load/ALU (no jump) or a conditional jump to labels, or a label.
enum Insn {
    Op(u16, u32),
    Jump(u16, u32, Label, Label),
    Here(Label),
}

/// The classic BPF filter of the control socket. It accepts only what the control plane acts
/// on, on Ethernet ports (after the MAC header, destination MAC with the group bit) and on L3
/// ports (tun, WireGuard: the IP header first):
/// - IPv4 IGMP (reports, queries, leaves, multicast router advertisements) and PIM hellos;
/// - IPv6 whose first next header is hop-by-hop (MLD and MRD carry a router alert there) and
///   PIM hellos;
/// - mcrelay's own hellos (EtherType 0x88b5, the loop guard; Ethernet only).
///
/// Other ICMPv6 (Neighbour Solicitations to solicited-node groups, router advertisements, ...)
/// stays out: it would only load the control loop. Userspace parses and checks the rest.
///
/// Only frames that arrived on one of `ports` pass (tested by ifindex up to [`FILTER_PORTS`]
/// ports): frames on interfaces that are not relay ports never wake the daemon. No port: no
/// frame.
fn filter(ports: &[u32]) -> Vec<libc::sock_filter> {
    const LDB: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LDH: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LDW: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LDB_IND: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_IND) as u16;
    const LDX_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
    const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const HATYPE: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_HATYPE) as u32;
    const ETH: u32 = 14;
    const PIM: u32 = 103;
    const PIM_HELLO: u32 = 0x20;
    use Insn::{Here, Jump, Op};
    use Label::*;
    let mut program = Vec::new();
    if ports.is_empty() {
        // No port yet: nothing to take (frames queued now would only be ignored later).
        return assemble(&[Op(RET, 0)]);
    }
    if ports.len() <= FILTER_PORTS {
        const IFINDEX: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_IFINDEX) as u32;
        program.push(Op(LDW, IFINDEX));
        program.extend(ports.iter().map(|&port| Jump(JEQ, port, PortOk, Next)));
        program.push(Op(RET, 0));
        program.push(Here(PortOk));
    }
    program.extend([
        Op(LDW, HATYPE),
        Jump(JEQ, ARPHRD_NONE, L3, Next),
        Jump(JEQ, ARPHRD_ETHER, Next, Reject),
        // Ethernet: multicast destination MAC, then by EtherType.
        Op(LDB, 0),
        Jump(JSET, 1, Next, Reject),
        Op(LDH, 12),
        Jump(JEQ, u32::from(relay_common::HELLO_ETHERTYPE), Accept, Next),
        Jump(JEQ, 0x0800, EthIpv4, Next),
        Jump(JEQ, 0x86dd, EthIpv6, Reject),
        Here(EthIpv4),
        Op(LDB, ETH + 9),
        Jump(JEQ, 2, Accept, Next),
        Jump(JEQ, PIM, Next, Reject),
        Op(LDX_MSH, ETH),
        Op(LDB_IND, ETH),
        Jump(JEQ, PIM_HELLO, Accept, Reject),
        Here(EthIpv6),
        Op(LDB, ETH + 6),
        Jump(JEQ, 0, Accept, Next),
        Jump(JEQ, PIM, Next, Reject),
        Op(LDB, ETH + 40),
        Jump(JEQ, PIM_HELLO, Accept, Reject),
        // L3 device: the IP version, then the same tests without the MAC header.
        Here(L3),
        Op(LDB, 0),
        Op(AND, 0xf0),
        Jump(JEQ, 0x40, L3Ipv4, Next),
        Jump(JEQ, 0x60, Next, Reject),
        Op(LDB, 6),
        Jump(JEQ, 0, Accept, Next),
        Jump(JEQ, PIM, Next, Reject),
        Op(LDB, 40),
        Jump(JEQ, PIM_HELLO, Accept, Reject),
        Here(L3Ipv4),
        Op(LDB, 9),
        Jump(JEQ, 2, Accept, Next),
        Jump(JEQ, PIM, Next, Reject),
        Op(LDX_MSH, 0),
        Op(LDB_IND, 0),
        Jump(JEQ, PIM_HELLO, Accept, Reject),
        Here(Accept),
        Op(RET, 0x0004_0000), // whole frame
        Here(Reject),
        Op(RET, 0),
    ]);
    assemble(&program)
}

/// Attaches (or replaces) the socket's classic BPF filter.
fn attach_filter(fd: libc::c_int, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    // SAFETY: the option value points at a live sock_fprog whose program outlives the call.
    check(
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        },
        "SO_ATTACH_FILTER",
    )
    .map(drop)
}

/// Most ports the filter tests by ifindex (its jumps reach 255 instructions); with more, it
/// takes frames from every interface and the control plane ignores the others.
const FILTER_PORTS: usize = 200;

/// Places the instructions and resolves the labels into jump offsets.
fn assemble(program: &[Insn]) -> Vec<libc::sock_filter> {
    let mut at = std::collections::BTreeMap::new();
    let mut n = 0usize;
    for insn in program {
        match insn {
            Insn::Here(label) => {
                at.insert(*label as u8, n);
            }
            _ => n += 1,
        }
    }
    let mut out = Vec::with_capacity(n);
    for insn in program {
        let pc = out.len();
        let offset = |label: Label| -> u8 {
            let target = if label == Label::Next { pc + 1 } else { at[&(label as u8)] };
            u8::try_from(target - pc - 1).unwrap_or(u8::MAX)
        };
        match *insn {
            Insn::Op(code, k) => out.push(libc::sock_filter { code, jt: 0, jf: 0, k }),
            Insn::Jump(code, k, jt, jf) => {
                out.push(libc::sock_filter { code, jt: offset(jt), jf: offset(jf), k });
            }
            Insn::Here(_) => {}
        }
    }
    out
}

/// An Ethernet frame around an IP packet received on an L3 port (for relaying it to Ethernet
/// ports): the group's MAC as destination, a zero source (the caller puts its own), the
/// EtherType of the IP version. `None` for anything that is not IPv4 or IPv6.
pub fn ethernet_frame(packet: &[u8]) -> Option<Vec<u8>> {
    let (dst, ethertype) = match packet.first()? >> 4 {
        4 => {
            let g = packet.get(16..20)?;
            ([0x01, 0x00, 0x5e, g[1] & 0x7f, g[2], g[3]], 0x0800u16)
        }
        6 => {
            let g = packet.get(36..40)?;
            ([0x33, 0x33, g[0], g[1], g[2], g[3]], 0x86dd)
        }
        _ => return None,
    };
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    Some(frame)
}

/// One AF_PACKET socket for all ports.
pub struct ControlSocket {
    fd: AsyncFd<OwnedFd>,
}

/// A received control frame.
#[derive(Debug)]
pub struct Received {
    /// Interface it arrived on.
    pub ifindex: u32,
    /// The whole Ethernet frame.
    pub frame: Vec<u8>,
}

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(ret)
    }
}

/// One `recvfrom` on the non-blocking socket: the frame, `None` for an outgoing frame of our
/// own, or the error (`WouldBlock` when the queue is empty).
fn receive(fd: libc::c_int) -> io::Result<Option<Received>> {
    // IGMP/MLD/PIM frames fit in a jumbo frame; a longer one is cut and then rejected as
    // truncated by the parser.
    let mut buf = vec![0u8; 9216];
    // SAFETY: all-zero sockaddr_ll is valid; the buffers are valid for the given lengths.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    let n = unsafe {
        libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut addr).cast(), &mut len)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if addr.sll_pkttype == libc::PACKET_OUTGOING {
        return Ok(None);
    }
    buf.truncate(n as usize);
    Ok(Some(Received { ifindex: addr.sll_ifindex as u32, frame: buf }))
}

/// Receive buffer of the control socket (bytes; the kernel doubles it for bookkeeping).
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

impl ControlSocket {
    /// Opens the socket (needs CAP_NET_RAW) in the current network namespace.
    pub fn open() -> anyhow::Result<Self> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscalls with valid arguments; the fd is owned right away.
        let fd = unsafe {
            let raw = check(
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                ),
                "socket(AF_PACKET)",
            )?;
            OwnedFd::from_raw_fd(raw)
        };
        attach_filter(fd.as_raw_fd(), &filter(&[]))?;
        let one: libc::c_int = 1;
        // SAFETY: option values point at live, correctly sized values.
        unsafe {
            // Do not see our own queries.
            check(
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_IGNORE_OUTGOING,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                ),
                "PACKET_IGNORE_OUTGOING",
            )?;
        }
        // A deep receive queue rides out bursts (a host flooding reports); what still does not
        // fit is counted by the kernel (see `ControlSocket::take_drops`).
        let size: libc::c_int = RECEIVE_BUFFER;
        for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: the option value points at a live c_int.
            let ret = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if ret == 0 {
                break;
            }
        }
        // SAFETY: we own the fd and keep it inside the AsyncFd for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the packet socket with tokio: {e}"))?;
        Ok(Self { fd })
    }

    /// Waits for the next control frame.
    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| receive(fd.as_raw_fd())) {
                Ok(Ok(Some(received))) => return Ok(received),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next frame already queued, without waiting (`None`: the queue is empty). Draining
    /// the queue before writing the maps turns a burst of reports into one round of writes.
    pub fn try_recv(&self) -> io::Result<Option<Received>> {
        loop {
            match receive(self.fd.as_raw_fd()) {
                Ok(Some(received)) => return Ok(Some(received)),
                // Our own outgoing frame: skip it.
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Lets only frames from `ports` through (all interfaces while `ports` is empty).
    pub fn set_ports(&self, ports: &[u32]) -> io::Result<()> {
        attach_filter(self.fd.as_raw_fd(), &filter(ports))
    }

    /// Frames the kernel dropped because the receive queue was full, since the last call
    /// (`PACKET_STATISTICS`, which the read resets).
    pub fn take_drops(&self) -> u64 {
        // SAFETY: all-zero tpacket_stats is valid; getsockopt writes at most `len` bytes.
        let mut stats: libc::tpacket_stats = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        let ret = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &mut len,
            )
        };
        if ret == 0 {
            u64::from(stats.tp_drops)
        } else {
            0
        }
    }

    /// Sends an IP packet out of an L3 port (tun, WireGuard: no link-layer header).
    pub fn send_ip(&self, ifindex: u32, packet: &[u8]) -> io::Result<()> {
        let ethertype: u16 = match packet.first().map(|b| b >> 4) {
            Some(4) => 0x0800,
            Some(6) => 0x86dd,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an IP packet")),
        };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_protocol = ethertype.to_be();
        // SAFETY: packet and addr are valid for their lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(n as libc::c_int, "sendto(AF_PACKET, L3)").map(|_| ())
    }

    /// Sends a complete Ethernet frame out of `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        if frame.len() >= 14 {
            addr.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        }
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6.min(frame.len())]);
        // SAFETY: frame and addr are valid for their lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(n as libc::c_int, "sendto(AF_PACKET)").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every jump of the filter lands inside the program, and the program ends in returns.
    #[test]
    fn filter_jumps_stay_inside_the_program() {
        let program = filter(&[2, 3, 40_000]);
        let jmp = (libc::BPF_JMP) as u16;
        for (pc, insn) in program.iter().enumerate() {
            if insn.code & 0x07 == jmp {
                for off in [insn.jt, insn.jf] {
                    assert!(pc + 1 + usize::from(off) < program.len(), "jump at {pc}");
                    assert_ne!(off, u8::MAX, "unresolved jump at {pc}");
                }
            }
        }
        let ret = (libc::BPF_RET | libc::BPF_K) as u16;
        assert_eq!(program[program.len() - 1].code, ret);
        assert_eq!(program[program.len() - 2].code, ret);
    }

    #[test]
    fn ethernet_frame_maps_the_group() {
        let mut v4 = vec![0x45u8; 20];
        v4[16..20].copy_from_slice(&[239, 129, 2, 3]);
        let f = ethernet_frame(&v4).expect("v4");
        assert_eq!(&f[..6], &[0x01, 0x00, 0x5e, 0x01, 2, 3]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14..], &v4[..]);
        let mut v6 = vec![0x60u8; 40];
        v6[36..40].copy_from_slice(&[0, 0, 0, 0x16]);
        assert_eq!(&ethernet_frame(&v6).expect("v6")[..6], &[0x33, 0x33, 0, 0, 0, 0x16]);
        assert!(ethernet_frame(&[0x10]).is_none());
    }
}
