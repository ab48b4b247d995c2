//! The control-plane socket: one AF_PACKET socket that receives every IGMP, MLD and PIM frame
//! arriving on any interface (a classic BPF filter keeps everything else out) and sends the
//! queries mcrelay originates.
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

/// A classic BPF program: accept frames with a multicast destination MAC that carry IPv4
/// IGMP (2) or PIM (103), IPv6 whose first next-header is hop-by-hop (0), ICMPv6 (58) or
/// PIM (103), or mcrelay's own hellos (EtherType 0x88b5, the loop guard). Userspace parses
/// and checks the rest.
fn filter() -> [libc::sock_filter; 15] {
    const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
    const LDB: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LDH: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    [
        /* 0 */ op(LDB, 0, 0, 0), // destination MAC, first byte
        /* 1 */ op(JSET, 0, 12, 1), // group bit clear -> drop (14)
        /* 2 */ op(LDH, 0, 0, 12), // ethertype
        /* 3 */ op(JEQ, 0, 3, 0x0800), // not IPv4 -> 7
        /* 4 */ op(LDB, 0, 0, 23), // IPv4 protocol
        /* 5 */ op(JEQ, 7, 0, 2), // IGMP -> accept (13)
        /* 6 */ op(JEQ, 6, 7, 103), // PIM -> accept, else drop
        /* 7 */ op(JEQ, 5, 0, relay_common::HELLO_ETHERTYPE as u32), // hello -> accept
        /* 8 */ op(JEQ, 0, 5, 0x86dd), // not IPv6 -> drop (14)
        /* 9 */ op(LDB, 0, 0, 20), // IPv6 next header
        /* 10 */ op(JEQ, 2, 0, 0), // hop-by-hop -> accept
        /* 11 */ op(JEQ, 1, 0, 58), // ICMPv6 -> accept
        /* 12 */ op(JEQ, 0, 1, 103), // PIM -> accept, else drop
        /* 13 */ op(RET, 0, 0, 0x0004_0000), // accept (whole frame)
        /* 14 */ op(RET, 0, 0, 0), // drop
    ]
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
        let prog = filter();
        let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
        let one: libc::c_int = 1;
        // SAFETY: option values point at live, correctly sized values.
        unsafe {
            check(
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&raw const fprog).cast(),
                    size_of::<libc::sock_fprog>() as libc::socklen_t,
                ),
                "SO_ATTACH_FILTER",
            )?;
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
