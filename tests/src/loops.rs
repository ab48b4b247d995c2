//! Test beds for the loop guard (issue 11): segments that are real Linux bridges in their own
//! namespaces, relays in their own namespaces whose dataplane is always detached when they are
//! dropped, the loop guard's wire constants, the per-port `standby` fields of
//! `mcrelay ports --json`, and raw Ethernet frames (captured with their source MAC, or sent with
//! a chosen one).
//!
//! A test that forms a loop can start an L2 storm at XDP speed, and pinned XDP links keep it
//! going after the daemon exits: a [`Relay`] therefore stops its daemon and runs
//! `mcrelay detach` when dropped, even while the test panics.

use std::{
    collections::BTreeMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::{ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    daemon::{assert_process_alive, mcrelay_bin, mcrelay_output, port_entry, ports_json},
    mcast::parse_test_datagram,
    netns::{veth_pair, NetNs},
    Mcrelay,
};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// EtherType of the relays' hello frames.
pub const HELLO_ETHERTYPE: u16 = 0x88b5;
/// Destination MAC of the relays' hello frames.
pub const HELLO_DST: Mac = [0x03, 0x6d, 0x63, 0x72, 0x6c, 0x79];
/// First three bytes of every relay MAC (locally administered, unicast): `02:6d:63`.
pub const RELAY_MAC_PREFIX: [u8; 3] = [0x02, 0x6d, 0x63];

/// Name of the bridge in every [`Segment`].
pub const BRIDGE: &str = "br0";

/// How long `mcrelay detach` may take when a [`Relay`] is dropped.
const DETACH_TIMEOUT: Duration = Duration::from_secs(20);

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &Mac) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Whether `mac` has the form of a relay MAC (`02:6d:63:xx:xx:xx`).
pub fn is_relay_mac(mac: &Mac) -> bool {
    mac[..3] == RELAY_MAC_PREFIX
}

/// An L2 segment: a Linux bridge ([`BRIDGE`], default settings: multicast snooping on, STP off)
/// in its own namespace; hosts, relays and other segments are connected by veths.
pub struct Segment {
    /// The namespace holding the bridge.
    pub ns: NetNs,
}

impl Segment {
    /// A namespace named `PREFIX-...` with a bridge in it.
    pub fn new(prefix: &str) -> Self {
        let ns = NetNs::new(prefix);
        ns.add_bridge(BRIDGE);
        Self { ns }
    }

    /// Connects `iface` in `peer` to the bridge: a veth whose end in this namespace is bridge
    /// port `port`, with GRO on (frames an XDP program redirects into `iface` arrive there, and
    /// vanish without GRO).
    pub fn connect(&self, port: &str, peer: &NetNs, iface: &str) {
        veth_pair(&self.ns, port, peer, iface);
        self.ns.gro_on(port);
        self.ns.set_master(port, BRIDGE);
    }

    /// Joins this bridge (port `port`) to `other`'s bridge (port `other_port`) with a veth, so
    /// that both segments are one L2 domain.
    pub fn join(&self, port: &str, other: &Segment, other_port: &str) {
        veth_pair(&self.ns, port, &other.ns, other_port);
        self.ns.gro_on(port);
        other.ns.gro_on(other_port);
        self.ns.set_master(port, BRIDGE);
        other.ns.set_master(other_port, BRIDGE);
    }

    /// A host on this segment (bridge port `port`); see [`Host::new`].
    pub fn add_host(&self, port: &str, prefix: &str, cidr: &str) -> Host {
        let host = Host::new(prefix, &self.ns, port, cidr);
        self.ns.set_master(port, BRIDGE);
        self.ns.gro_on(port);
        host
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {BRIDGE} in {}", self.ns)
    }
}

/// Name of a host's interface.
pub const HOST_IFACE: &str = "eth0";

/// A host with one interface ([`HOST_IFACE`]) that can send (TX checksum offload off) and receive
/// frames redirected by XDP (GRO on).
pub struct Host {
    /// The host's namespace.
    pub ns: NetNs,
    /// The host's interface.
    pub iface: String,
    /// The host's IPv4 address.
    pub v4: Ipv4Addr,
}

impl Host {
    /// A namespace named `PREFIX-...` whose `eth0` (address `cidr`, IPv4) is a veth to
    /// `peer_iface` in `peer`.
    pub fn new(prefix: &str, peer: &NetNs, peer_iface: &str, cidr: &str) -> Self {
        let ns = NetNs::new(prefix);
        veth_pair(peer, peer_iface, &ns, HOST_IFACE);
        ns.add_addr(HOST_IFACE, cidr);
        ns.gro_on(HOST_IFACE);
        ns.tx_off(HOST_IFACE);
        let v4 = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not an IPv4 address/prefix: {cidr}"));
        Self { ns, iface: HOST_IFACE.to_string(), v4 }
    }
}

/// A relay namespace and the `mcrelay` daemon in it.
///
/// Dropping it stops the daemon (SIGTERM, then SIGKILL) and then runs `mcrelay detach`, so that
/// no pinned XDP link outlives the test, whatever the daemon was started with and however the
/// test ended. The namespace itself goes last.
pub struct Relay {
    label: String,
    bin: PathBuf,
    daemon: Option<Mcrelay>,
    /// The relay's namespace.
    pub ns: NetNs,
}

impl Relay {
    /// A relay namespace named `PREFIX-...`; `label` (`"R1"`) names it in messages.
    pub fn new(label: &str, prefix: &str) -> Self {
        Self { label: label.to_string(), bin: mcrelay_bin(), daemon: None, ns: NetNs::new(prefix) }
    }

    /// The label given to [`Relay::new`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Starts `mcrelay ARGS` (e.g. `["run", "-i", "x", ...]`) and waits until it is ready.
    pub fn start<S: AsRef<str>>(&mut self, args: &[S]) {
        assert!(self.daemon.is_none(), "{}: a daemon is already running", self.label);
        self.daemon = Some(Mcrelay::start_ready(&self.ns, args));
    }

    /// The daemon's guard; panics if none was started.
    pub fn daemon(&mut self) -> &mut Mcrelay {
        let label = &self.label;
        self.daemon.as_mut().unwrap_or_else(|| panic!("{label}: no daemon started"))
    }

    /// SIGTERM through the guard; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.daemon().stop()
    }

    /// SIGKILL: the daemon gets no chance to clean up; returns once it has exited.
    pub fn kill(&mut self) -> ExitStatus {
        let daemon = self.daemon();
        let _ = kill(Pid::from_raw(daemon.pid() as i32), Signal::SIGKILL);
        daemon.wait_exit(Duration::from_secs(10))
    }

    /// Panics (the guard then shows the daemon's stderr) unless the daemon is still running.
    pub fn assert_alive(&mut self, when: &str) {
        let label = self.label.clone();
        let daemon = self.daemon();
        if let Some(status) = daemon.try_exit_status() {
            panic!("{label}: mcrelay exited ({status}) {when}; stderr:\n{}", daemon.stderr());
        }
        assert_process_alive(daemon.pid(), &format!("({label}) {when}"));
    }

    /// `mcrelay detach` in this namespace (the daemon must be stopped).
    pub fn detach(&self) -> Output {
        mcrelay_output(&self.ns, &["detach"])
    }

    /// `mcrelay ports --json`, parsed.
    pub fn ports(&self) -> Value {
        ports_json(&self.ns)
    }

    /// `mcrelay ports --json` reduced to the `standby` flag of each of `ports` (`None`: the
    /// port is missing or has no boolean `standby`).
    pub fn standby(&self, ports: &[&str]) -> (Vec<Option<bool>>, Value) {
        let doc = self.ports();
        (ports.iter().map(|p| port_standby(&doc, p)).collect(), doc)
    }
}

impl fmt::Display for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.label, self.ns)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.daemon.take());
        detach_quietly(&self.bin, &self.ns);
    }
}

/// `mcrelay detach` in `ns`, never panicking (it runs in `Drop`, maybe while unwinding): errors
/// are printed, a hung command is killed after [`DETACH_TIMEOUT`].
fn detach_quietly(bin: &std::path::Path, ns: &NetNs) {
    let mut cmd = ns.command(bin);
    cmd.arg("detach").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("cannot run `mcrelay detach` in {ns}: {e}");
            return;
        }
    };
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = io::Read::read_to_string(&mut stderr, &mut err);
                }
                eprintln!("`mcrelay detach` in {ns} failed ({status}): {err}");
                return;
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                eprintln!("`mcrelay detach` in {ns} hung; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

/// The `standby` flag of `iface` in a `mcrelay ports --json` document; `None` when the port or
/// the field is missing.
pub fn port_standby(doc: &Value, iface: &str) -> Option<bool> {
    port_entry(doc, iface)?.get("standby")?.as_bool()
}

/// The `standby_reason` of `iface` in a `mcrelay ports --json` document.
pub fn standby_reason<'a>(doc: &'a Value, iface: &str) -> Option<&'a str> {
    port_entry(doc, iface)?.get("standby_reason")?.as_str()
}

/// An Ethernet frame carrying an IPv4 UDP datagram from `src_mac`/`src` to `group:port` (TTL 1,
/// UDP checksum 0 = none), for injecting frames with a chosen source MAC.
pub fn ipv4_udp_frame(
    src_mac: Mac,
    src: Ipv4Addr,
    group: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let g = group.octets();
    let dst_mac = [0x01, 0x00, 0x5e, g[1] & 0x7f, g[2], g[3]];
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut frame = Vec::with_capacity(14 + ip_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 1; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&g);
    let sum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The internet checksum of an IPv4 header whose checksum field is zero.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 =
        header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends raw Ethernet `frames` out of `iface` in `ns` (an `AF_PACKET`/`SOCK_RAW` socket).
pub fn send_frames(ns: &NetNs, iface: &str, frames: &[Vec<u8>]) {
    let what = format!("raw frames out of {iface} in {ns}");
    ns.in_netns(|| -> io::Result<()> {
        let fd = raw_packet_socket(iface, 0)?;
        for frame in frames {
            // SAFETY: send(2) of a buffer we own, with its length.
            let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// An `AF_PACKET`/`SOCK_RAW` socket bound to `iface` for `protocol` (host order; 0: send only).
fn raw_packet_socket(iface: &str, protocol: u16) -> io::Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    let protocol = protocol.to_be();
    // SAFETY: plain socket(2); the returned descriptor is owned right away.
    let raw = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol))
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
    Ok(fd)
}

/// Sets `SO_RCVTIMEO` and a large receive buffer (best effort for the buffer).
fn set_receive_options(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt(2) with a valid timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let size: libc::c_int = 8 << 20;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) with a valid c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    Ok(())
}

#[derive(Default)]
struct CaptureState {
    /// Per group: test datagrams seen per source MAC.
    data: Mutex<BTreeMap<IpAddr, BTreeMap<Mac, u64>>>,
    /// Hello frames (EtherType [`HELLO_ETHERTYPE`] to [`HELLO_DST`]) seen per source MAC.
    hellos: Mutex<BTreeMap<Mac, u64>>,
    error: Mutex<Option<String>>,
}

/// A raw packet socket on one interface that records the source MAC of every test datagram
/// (per group) and of every relay hello arriving there (frames the host sends are ignored).
pub struct FrameCapture {
    label: String,
    state: Arc<CaptureState>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FrameCapture {
    /// Starts capturing on `iface` in `ns`.
    pub fn new(ns: &NetNs, iface: &str) -> Self {
        let label = format!("frame capture on {iface} in {ns}");
        let fd = ns
            .in_netns(|| -> io::Result<OwnedFd> {
                let fd = raw_packet_socket(iface, libc::ETH_P_ALL as u16)?;
                set_receive_options(&fd, Duration::from_millis(50))?;
                Ok(fd)
            })
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let state = Arc::new(CaptureState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || capture_loop(&fd, &state, &stop))
        };
        Self { label, state, stop, thread: Some(thread) }
    }

    /// Test datagrams of `group` seen so far, per source MAC.
    pub fn data_sources(&self, group: IpAddr) -> BTreeMap<Mac, u64> {
        self.check_thread();
        self.state
            .data
            .lock()
            .map(|d| d.get(&group).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Hello frames seen so far, per source MAC.
    pub fn hello_sources(&self) -> BTreeMap<Mac, u64> {
        self.check_thread();
        self.state.hellos.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Panics if the capturing thread stopped with an error.
    pub fn check_thread(&self) {
        if let Ok(error) = self.state.error.lock() {
            if let Some(e) = error.as_ref() {
                panic!("{}: receiving failed: {e}", self.label);
            }
        }
    }
}

impl fmt::Display for FrameCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

impl Drop for FrameCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn capture_loop(fd: &OwnedFd, state: &CaptureState, stop: &AtomicBool) {
    crate::mcast::receive_frames(fd, &state.error, stop, |_, frame| {
        if frame.len() < 14 {
            return;
        }
        let mut dst: Mac = [0; 6];
        dst.copy_from_slice(&frame[..6]);
        let mut src: Mac = [0; 6];
        src.copy_from_slice(&frame[6..12]);
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        if ethertype == HELLO_ETHERTYPE && dst == HELLO_DST {
            if let Ok(mut hellos) = state.hellos.lock() {
                *hellos.entry(src).or_default() += 1;
            }
        } else if let Some((group, _)) = parse_test_datagram(ethertype, &frame[14..]) {
            if let Ok(mut data) = state.data.lock() {
                *data.entry(group).or_default().entry(src).or_default() += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frame_is_well_formed() {
        let group = Ipv4Addr::new(239, 129, 2, 3);
        let frame = ipv4_udp_frame(
            [2, 0x6d, 0x63, 1, 2, 3],
            Ipv4Addr::new(198, 18, 0, 1),
            group,
            5000,
            b"x",
        );
        assert_eq!(&frame[..6], &[0x01, 0x00, 0x5e, 0x01, 2, 3]);
        assert_eq!(ipv4_checksum(&frame[14..34]), 0, "header checksum must verify");
        assert_eq!(frame.len(), 14 + 20 + 8 + 1);
        let payload = crate::mcast::payload(IpAddr::V4(group), 9);
        let frame = ipv4_udp_frame([2; 6], Ipv4Addr::LOCALHOST, group, 5000, payload.as_bytes());
        assert_eq!(parse_test_datagram(0x0800, &frame[14..]), Some((IpAddr::V4(group), 9)));
    }

    #[test]
    fn relay_macs() {
        assert!(is_relay_mac(&[0x02, 0x6d, 0x63, 0, 0, 1]));
        assert!(!is_relay_mac(&[0x02, 0x6d, 0x64, 0, 0, 1]));
        assert_eq!(mac_string(&HELLO_DST), "03:6d:63:72:6c:79");
    }
}
