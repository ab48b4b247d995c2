//! In-process multicast peers: receivers that join a group on an interface and count numbered
//! datagrams in the background, and a sender that sends them.
//!
//! Datagrams carry `mcrelay-test GROUP SEQ`, so a receiver counts only its own group's datagrams
//! and can tell duplicates from distinct ones.
//!
//! Where a datagram must NOT arrive, use a [`WireObserver`] rather than a joined
//! [`McastReceiver`]: joining sends an IGMP/MLD report, and a relay that learns memberships would
//! then rightly forward the group there.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage},
};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};

use crate::netns::NetNs;

/// First word of every test datagram.
pub const PAYLOAD_TAG: &str = "mcrelay-test";

/// How often a receiver's thread looks at its stop flag.
const RECV_POLL: Duration = Duration::from_millis(50);

/// The payload of datagram `seq` to `group`.
pub fn payload(group: IpAddr, seq: u64) -> String {
    format!("{PAYLOAD_TAG} {group} {seq}")
}

#[derive(Default)]
struct RxState {
    /// Datagrams of this receiver's group, duplicates included.
    datagrams: AtomicU64,
    /// Distinct sequence numbers seen.
    seqs: Mutex<BTreeSet<u64>>,
    /// Datagrams that are not test datagrams of this receiver's group.
    foreign: AtomicU64,
    /// (source, destination) addresses of this receiver's group's datagrams.
    addresses: Mutex<BTreeSet<(IpAddr, IpAddr)>>,
    /// The error that stopped the receiving thread, if any.
    error: Mutex<Option<String>>,
}

/// Which address a receiver binds and whether it joins.
#[derive(Clone, Copy)]
enum Bind<'a> {
    /// `group:port`, joined on the interface.
    Group(&'a str),
    /// The unspecified address (`0.0.0.0` / `::`) and `port`, joined on the interface when
    /// given.
    Wildcard(Option<&'a str>),
}

/// A UDP socket joined to a group on one interface, counting datagrams on a background thread
/// until dropped.
pub struct McastReceiver {
    label: String,
    state: Arc<RxState>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl McastReceiver {
    /// Binds `group:port` in `ns` and joins `group` on `iface` (IPv4: `IP_ADD_MEMBERSHIP` with
    /// the ifindex; IPv6: `IPV6_JOIN_GROUP`). The socket only receives its own group
    /// (`IP_MULTICAST_ALL` off and bound to the group address).
    pub fn join(ns: &NetNs, group: IpAddr, port: u16, iface: &str) -> Self {
        let label = format!("receiver of {group}:{port} on {iface} in {ns}");
        Self::start(ns, group, port, Bind::Group(iface), label)
    }

    /// Binds the unspecified address (`0.0.0.0:port` / `[::]:port`) in `ns` and joins `group`
    /// on `iface`: receives the group's datagrams and those sent to one of the host's unicast
    /// addresses on `port` (a copy whose destination a relay rewrote). Counts the datagrams
    /// whose payload names `group`.
    pub fn join_wildcard(ns: &NetNs, group: IpAddr, port: u16, iface: &str) -> Self {
        let label = format!("receiver on port {port} joined to {group} on {iface} in {ns}");
        Self::start(ns, group, port, Bind::Wildcard(Some(iface)), label)
    }

    /// Binds the unspecified address (`0.0.0.0:port` / `[::]:port`) in `ns` without joining
    /// anything: catches datagrams of `group` (by payload) sent to one of the host's unicast
    /// addresses on `port`. Sends no IGMP/MLD report.
    pub fn wildcard(ns: &NetNs, group: IpAddr, port: u16) -> Self {
        let label = format!("receiver on port {port} (not joined, counting {group}) in {ns}");
        Self::start(ns, group, port, Bind::Wildcard(None), label)
    }

    fn start(ns: &NetNs, group: IpAddr, port: u16, bind: Bind<'_>, label: String) -> Self {
        let socket = ns
            .in_netns(|| receiver_socket(group, port, bind))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let state = Arc::new(RxState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, group) = (Arc::clone(&state), Arc::clone(&stop), group.to_string());
            thread::spawn(move || receive_loop(&socket, &group, &state, &stop))
        };
        Self { label, state, stop, thread: Some(thread) }
    }

    /// Datagrams of this receiver's group received so far (duplicates included).
    pub fn count(&self) -> u64 {
        self.state.datagrams.load(Ordering::SeqCst)
    }

    /// Distinct sequence numbers received so far.
    pub fn distinct(&self) -> u64 {
        self.state.seqs.lock().map_or(0, |seqs| seqs.len() as u64)
    }

    /// The (source, destination) address pairs of the datagrams counted so far (the
    /// destination from `IP_PKTINFO` / `IPV6_PKTINFO`).
    pub fn addresses(&self) -> BTreeSet<(IpAddr, IpAddr)> {
        self.state.addresses.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Datagrams received that were not this group's test datagrams.
    pub fn foreign(&self) -> u64 {
        self.state.foreign.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` datagrams arrived or `timeout` passed; returns the count.
    pub fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            self.check_thread();
            thread::sleep(Duration::from_millis(5));
        }
        self.count()
    }

    /// Panics if the receiving thread stopped with an error.
    pub fn check_thread(&self) {
        if let Ok(error) = self.state.error.lock() {
            if let Some(e) = error.as_ref() {
                panic!("{}: receiving failed: {e}", self.label);
            }
        }
    }

    /// What this receiver is, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl fmt::Display for McastReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

impl Drop for McastReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn receiver_socket(group: IpAddr, port: u16, bind: Bind<'_>) -> io::Result<UdpSocket> {
    let iface = match bind {
        Bind::Group(iface) | Bind::Wildcard(Some(iface)) => Some(iface),
        Bind::Wildcard(None) => None,
    };
    let ifindex = match iface {
        Some(iface) => nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?,
        None => 0,
    };
    let wildcard = matches!(bind, Bind::Wildcard(_));
    let socket = match group {
        IpAddr::V4(g) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_reuse_address(true)?;
            socket.set_multicast_all_v4(false)?;
            let local = if wildcard { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { group };
            socket.bind(&SocketAddr::new(local, port).into())?;
            if iface.is_some() {
                socket.join_multicast_v4_n(&g, &InterfaceIndexOrAddress::Index(ifindex))?;
            }
            setsockopt(&socket, sockopt::Ipv4PacketInfo, &true).map_err(io::Error::from)?;
            socket
        }
        IpAddr::V6(g) => {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_only_v6(true)?;
            socket.set_reuse_address(true)?;
            socket.set_multicast_all_v6(false)?;
            // The scope id is needed (and only used) for link-scoped groups such as ff02::fb.
            let local = if wildcard { Ipv6Addr::UNSPECIFIED } else { g };
            socket.bind(&SocketAddrV6::new(local, port, 0, ifindex).into())?;
            if iface.is_some() {
                socket.join_multicast_v6(&g, ifindex)?;
            }
            setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
            socket
        }
    };
    socket.set_read_timeout(Some(RECV_POLL))?;
    set_large_receive_buffer(socket.as_raw_fd());
    Ok(socket.into())
}

/// Receive buffer of every test socket: room for thousands of datagrams, so that a counting
/// thread starved by a busy machine loses nothing.
const RECV_BUFFER: libc::c_int = 8 << 20;

/// `SO_RCVBUFFORCE` (root may exceed net.core.rmem_max), else `SO_RCVBUF`; best effort.
fn set_large_receive_buffer(fd: std::os::fd::RawFd) {
    let size = RECV_BUFFER;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) with a valid c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// One datagram: its length, source and destination address.
fn receive_one(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> nix::Result<(usize, Option<IpAddr>, Option<IpAddr>)> {
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let source = msg.address.and_then(|a| {
        a.as_sockaddr_in()
            .map(|a| IpAddr::V4(a.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
    });
    let destination = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4PacketInfo(info) => {
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))))
        }
        ControlMessageOwned::Ipv6PacketInfo(info) => {
            Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)))
        }
        _ => None,
    });
    Ok((msg.bytes, source, destination))
}

fn receive_loop(socket: &UdpSocket, group: &str, state: &RxState, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match receive_one(socket, &mut buf) {
            Ok((n, source, destination)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let mut words = text.split_whitespace();
                let seq = match (words.next(), words.next(), words.next()) {
                    (Some(PAYLOAD_TAG), Some(g), Some(seq)) if g == group => {
                        seq.parse::<u64>().ok()
                    }
                    _ => None,
                };
                match seq {
                    Some(seq) => {
                        if let Ok(mut seqs) = state.seqs.lock() {
                            seqs.insert(seq);
                        }
                        if let (Some(s), Some(d), Ok(mut addresses)) =
                            (source, destination, state.addresses.lock())
                        {
                            addresses.insert((s, d));
                        }
                        state.datagrams.fetch_add(1, Ordering::SeqCst);
                    }
                    None => {
                        state.foreign.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(e) => {
                if let Ok(mut error) = state.error.lock() {
                    *error = Some(e.to_string());
                }
                return;
            }
        }
    }
}

/// UDP sockets (IPv4 and IPv6) that send multicast out of one interface, with multicast loopback
/// off and the default TTL / hop limit (1).
pub struct McastSender {
    label: String,
    v4: UdpSocket,
    v6: UdpSocket,
}

impl McastSender {
    /// Sockets in `ns` sending out of `iface`.
    pub fn new(ns: &NetNs, iface: &str) -> Self {
        let label = format!("sender on {iface} in {ns}");
        let (v4, v6) = ns
            .in_netns(|| -> io::Result<(UdpSocket, UdpSocket)> {
                let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
                let v4 = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                set_multicast_if_index_v4(&v4, ifindex)?;
                v4.set_multicast_loop_v4(false)?;
                v4.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
                let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
                v6.set_only_v6(true)?;
                v6.set_multicast_if_v6(ifindex)?;
                v6.set_multicast_loop_v6(false)?;
                v6.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
                Ok((v4.into(), v6.into()))
            })
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        Self { label, v4, v6 }
    }

    /// Sends with multicast TTL / hop limit `hops` (the default is 1: enough for a bridged
    /// relay, expired at the first routed hop).
    pub fn with_hop_limit(self, hops: u32) -> Self {
        socket2::SockRef::from(&self.v4)
            .set_multicast_ttl_v4(hops)
            .and_then(|()| socket2::SockRef::from(&self.v6).set_multicast_hops_v6(hops))
            .unwrap_or_else(|e| panic!("{}: setting the hop limit: {e}", self.label));
        self
    }

    /// Sends test datagram `seq` to `group:port`.
    pub fn send(&self, group: IpAddr, port: u16, seq: u64) -> io::Result<()> {
        let socket = if group.is_ipv4() { &self.v4 } else { &self.v6 };
        socket.send_to(payload(group, seq).as_bytes(), SocketAddr::new(group, port)).map(|_| ())
    }

    /// Sends datagrams `0..count` to `group:port`, `interval` apart; panics on a send error.
    pub fn send_numbered(&self, group: IpAddr, port: u16, count: u64, interval: Duration) {
        for seq in 0..count {
            self.send(group, port, seq)
                .unwrap_or_else(|e| panic!("{}: sending {seq} to {group}:{port}: {e}", self.label));
            thread::sleep(interval);
        }
    }
}

/// A [`McastSender`] on a background thread sending numbered datagrams (`0, 1, 2, ...`) to one
/// group, `interval` apart, until dropped; send errors are ignored (an interface may come and
/// go meanwhile).
pub struct McastStream {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl McastStream {
    /// Starts streaming to `group:port` out of `iface` in `ns`.
    pub fn start(ns: &NetNs, iface: &str, group: IpAddr, port: u16, interval: Duration) -> Self {
        let sender = McastSender::new(ns, iface);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut seq = 0;
            while !flag.load(Ordering::SeqCst) {
                let _ = sender.send(group, port, seq);
                seq += 1;
                thread::sleep(interval);
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for McastStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP socket that sends multicast from one source address out of one interface (TTL / hop
/// limit 1, multicast loopback off): for tests where the source address matters (source
/// filtering), with several addresses on one segment.
pub struct SourceSender {
    label: String,
    source: IpAddr,
    socket: UdpSocket,
}

impl SourceSender {
    /// A socket in `ns` bound to `source` (an address of `iface`), sending out of `iface`.
    pub fn new(ns: &NetNs, iface: &str, source: IpAddr) -> Self {
        let label = format!("sender from {source} on {iface} in {ns}");
        let socket =
            ns.in_netns(|| source_socket(source, iface)).unwrap_or_else(|e| panic!("{label}: {e}"));
        Self { label, source, socket }
    }

    /// The source address.
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// Sends test datagram `seq` to `group:port`.
    pub fn send(&self, group: IpAddr, port: u16, seq: u64) -> io::Result<()> {
        self.socket
            .send_to(payload(group, seq).as_bytes(), SocketAddr::new(group, port))
            .map(|_| ())
    }

    /// Sends datagrams `seqs` to `group:port`, `interval` apart; panics on a send error.
    pub fn send_range(
        &self,
        group: IpAddr,
        port: u16,
        seqs: std::ops::Range<u64>,
        interval: Duration,
    ) {
        for seq in seqs {
            self.send(group, port, seq)
                .unwrap_or_else(|e| panic!("{}: sending {seq} to {group}: {e}", self.label));
            thread::sleep(interval);
        }
    }
}

/// A UDP socket bound to `src`, sending multicast out of `iface` (IPv4: by source address,
/// IPv6: by interface index), loop off.
fn source_socket(src: IpAddr, iface: &str) -> io::Result<UdpSocket> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    let sock = match src {
        IpAddr::V4(a) => {
            let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            sock.bind(&SocketAddr::from((a, 0)).into())?;
            sock.set_multicast_loop_v4(false)?;
            sock.set_multicast_if_v4(&a)?;
            sock
        }
        IpAddr::V6(a) => {
            let sock = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
            sock.set_only_v6(true)?;
            sock.bind(&SocketAddr::from((a, 0)).into())?;
            sock.set_multicast_loop_v6(false)?;
            sock.set_multicast_if_v6(ifindex)?;
            sock
        }
    };
    Ok(sock.into())
}

/// `IP_MULTICAST_IF` by interface index (`struct ip_mreqn`), so that the interface needs no
/// IPv4 address.
fn set_multicast_if_index_v4(socket: &Socket, ifindex: u32) -> io::Result<()> {
    let mreqn = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr { s_addr: 0 },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: ifindex as libc::c_int,
    };
    // SAFETY: the option value is a valid ip_mreqn and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            std::ptr::addr_of!(mreqn).cast(),
            std::mem::size_of::<libc::ip_mreqn>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[derive(Default)]
struct WireState {
    /// Per group: frames seen (duplicates included) and distinct sequence numbers.
    seen: Mutex<BTreeMap<IpAddr, (u64, BTreeSet<u64>)>>,
    /// The TTL / hop limit values the datagrams of each group arrived with.
    hop_limits: Mutex<BTreeMap<IpAddr, BTreeSet<u8>>>,
    /// Per group: datagrams of the group addressed to another destination (per-peer copies),
    /// counted by destination. Their hop limits are under the destination in `hop_limits`.
    readdressed: Mutex<BTreeMap<IpAddr, BTreeMap<IpAddr, u64>>>,
    /// Per group: the source MACs its datagrams arrived with (Ethernet devices).
    source_macs: Mutex<BTreeMap<IpAddr, BTreeSet<[u8; 6]>>>,
    error: Mutex<Option<String>>,
}

/// A packet socket on one interface that counts the test datagrams arriving there, per group,
/// without joining anything: it sees what the wire carries whether or not the host's stack
/// would accept it, and it sends no IGMP/MLD report that could make a relay forward a group.
/// Frames the host itself sends are ignored.
pub struct WireObserver {
    label: String,
    state: Arc<WireState>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl WireObserver {
    /// Starts observing `iface` in `ns`.
    pub fn new(ns: &NetNs, iface: &str) -> Self {
        let label = format!("wire observer on {iface} in {ns}");
        let fd = ns.in_netns(|| packet_socket(iface)).unwrap_or_else(|e| panic!("{label}: {e}"));
        let state = Arc::new(WireState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || observe_loop(&fd, &state, &stop))
        };
        Self { label, state, stop, thread: Some(thread) }
    }

    /// Test datagrams of `group` seen arriving so far (duplicates included).
    pub fn count(&self, group: IpAddr) -> u64 {
        self.state.seen.lock().map_or(0, |seen| seen.get(&group).map_or(0, |(n, _)| *n))
    }

    /// Distinct sequence numbers of `group` seen so far.
    pub fn distinct(&self, group: IpAddr) -> u64 {
        self.state
            .seen
            .lock()
            .map_or(0, |seen| seen.get(&group).map_or(0, |(_, seqs)| seqs.len() as u64))
    }

    /// The source MACs the datagrams of `group` arrived with (none on an L3 device).
    pub fn source_macs(&self, group: IpAddr) -> BTreeSet<[u8; 6]> {
        self.state
            .source_macs
            .lock()
            .map_or_else(|_| BTreeSet::new(), |seen| seen.get(&group).cloned().unwrap_or_default())
    }

    /// Datagrams of `group`'s test payload that arrived addressed to another destination
    /// (per-peer copies), by destination.
    pub fn readdressed(&self, group: IpAddr) -> BTreeMap<IpAddr, u64> {
        self.state
            .readdressed
            .lock()
            .map_or_else(|_| BTreeMap::new(), |seen| seen.get(&group).cloned().unwrap_or_default())
    }

    /// The TTL (IPv4) / hop limit (IPv6) values the datagrams of `group` (or, for per-peer
    /// copies, to the destination `group`) arrived with.
    pub fn hop_limits(&self, group: IpAddr) -> BTreeSet<u8> {
        self.state
            .hop_limits
            .lock()
            .map_or_else(|_| BTreeSet::new(), |seen| seen.get(&group).cloned().unwrap_or_default())
    }

    /// Waits until at least `n` datagrams of `group` arrived or `timeout` passed; returns the
    /// count.
    pub fn wait_for(&self, group: IpAddr, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.count(group) < n && Instant::now() < deadline {
            self.check_thread();
            thread::sleep(Duration::from_millis(5));
        }
        self.count(group)
    }

    /// Panics if the observing thread stopped with an error.
    pub fn check_thread(&self) {
        if let Ok(error) = self.state.error.lock() {
            if let Some(e) = error.as_ref() {
                panic!("{}: receiving failed: {e}", self.label);
            }
        }
    }

    /// What this observer is, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl fmt::Display for WireObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

impl Drop for WireObserver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An `AF_PACKET`/`SOCK_DGRAM` socket for every protocol, bound to `iface`, with a receive
/// timeout.
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the returned descriptor is owned right away.
    let raw = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(protocol))
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) with a valid sockaddr_ll and its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let timeout = libc::timeval { tv_sec: 0, tv_usec: RECV_POLL.as_micros() as libc::suseconds_t };
    // SAFETY: setsockopt(2) with a valid timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    set_large_receive_buffer(fd.as_raw_fd());
    Ok(fd)
}

/// Reads frames from a packet socket (with a receive timeout) until `stop`, handing every
/// incoming one (not our own outgoing) to `on_frame` with its address; a socket error other
/// than a timeout is recorded in `error` and ends the loop.
pub(crate) fn receive_frames(
    fd: &OwnedFd,
    error: &Mutex<Option<String>>,
    stop: &AtomicBool,
    mut on_frame: impl FnMut(&libc::sockaddr_ll, &[u8]),
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom(2) into a buffer and a sockaddr_ll we own, with their sizes.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(addr).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) {
                continue;
            }
            if let Ok(mut slot) = error.lock() {
                *slot = Some(e.to_string());
            }
            return;
        }
        if addr.sll_pkttype != libc::PACKET_OUTGOING {
            on_frame(&addr, &buf[..n as usize]);
        }
    }
}

fn observe_loop(fd: &OwnedFd, state: &WireState, stop: &AtomicBool) {
    receive_frames(fd, &state.error, stop, |addr, packet| {
        let ethertype = u16::from_be(addr.sll_protocol);
        let Some((group, dst, seq)) = parse_any_test_datagram(ethertype, packet) else {
            return;
        };
        if group != dst {
            if let Ok(mut seen) = state.readdressed.lock() {
                *seen.entry(group).or_default().entry(dst).or_default() += 1;
            }
            let hop_limit = if group.is_ipv4() { packet[8] } else { packet[7] };
            if let Ok(mut seen) = state.hop_limits.lock() {
                seen.entry(dst).or_default().insert(hop_limit);
            }
            return;
        }
        {
            if let Ok(mut seen) = state.seen.lock() {
                let entry = seen.entry(group).or_default();
                entry.0 += 1;
                entry.1.insert(seq);
            }
            let hop_limit = if group.is_ipv4() { packet[8] } else { packet[7] };
            if let Ok(mut seen) = state.hop_limits.lock() {
                seen.entry(group).or_default().insert(hop_limit);
            }
            if addr.sll_halen == 6 {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&addr.sll_addr[..6]);
                if let Ok(mut seen) = state.source_macs.lock() {
                    seen.entry(group).or_default().insert(mac);
                }
            }
        }
    });
}

/// The group and sequence number of a test datagram, given its ethertype and the bytes from the
/// IP header on; `None` for anything else (including a payload naming another group than the
/// destination address).
pub fn parse_test_datagram(ethertype: u16, packet: &[u8]) -> Option<(IpAddr, u64)> {
    let (group, dst, seq) = parse_any_test_datagram(ethertype, packet)?;
    (group == dst).then_some((dst, seq))
}

/// The group its payload names, the destination address and the sequence number of a test
/// datagram, whatever its destination (a per-peer copy is addressed to the peer).
pub fn parse_any_test_datagram(ethertype: u16, packet: &[u8]) -> Option<(IpAddr, IpAddr, u64)> {
    let (dst, udp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(*packet.first()? & 0x0f) * 4;
            if packet.get(9)? != &17 || ihl < 20 {
                return None;
            }
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            (IpAddr::from(dst), packet.get(ihl..)?)
        }
        0x86dd => {
            if packet.get(6)? != &17 {
                return None;
            }
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            (IpAddr::from(dst), packet.get(40..)?)
        }
        _ => return None,
    };
    let text = std::str::from_utf8(udp.get(8..)?).ok()?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(PAYLOAD_TAG), Some(group), Some(seq)) => {
            Some((group.parse().ok()?, dst, seq.parse().ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(dst: [u8; 4], payload: &str) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 1, 17, 0, 0, 198, 18, 0, 2];
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0x13, 0x88, 0x13, 0x88, 0, 0, 0, 0]);
        p.extend_from_slice(payload.as_bytes());
        p
    }

    #[test]
    fn parses_ipv4_test_datagrams_only() {
        let group: IpAddr = "239.1.1.1".parse().expect("address");
        let p = ipv4_udp([239, 1, 1, 1], &payload(group, 7));
        assert_eq!(parse_test_datagram(0x0800, &p), Some((group, 7)));
        // Payload naming another group than the destination.
        let p = ipv4_udp([239, 2, 2, 2], &payload(group, 7));
        assert_eq!(parse_test_datagram(0x0800, &p), None);
        // Not a test payload, truncated, other ethertype.
        assert_eq!(parse_test_datagram(0x0800, &ipv4_udp([239, 1, 1, 1], "hello 1 2")), None);
        assert_eq!(parse_test_datagram(0x0800, &p[..10]), None);
        assert_eq!(parse_test_datagram(0x0806, &p), None);
    }

    #[test]
    fn parses_ipv6_test_datagrams() {
        let group: IpAddr = "ff3e::1:1".parse().expect("address");
        let IpAddr::V6(v6) = group else { unreachable!() };
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 17, 1];
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&v6.octets());
        p.extend_from_slice(&[0x13, 0x88, 0x13, 0x88, 0, 0, 0, 0]);
        p.extend_from_slice(payload(group, 42).as_bytes());
        assert_eq!(parse_test_datagram(0x86dd, &p), Some((group, 42)));
        p[6] = 0; // hop-by-hop first: not a plain UDP datagram
        assert_eq!(parse_test_datagram(0x86dd, &p), None);
    }
}
