//! Source filtering (IGMPv3 / MLDv2, RFC 3376 section 6, RFC 3810 section 7) end to end through
//! the real daemon.
//!
//! Two senders with different source addresses share the sender's segment (host 0 gets a second
//! address). Each burst from a source carries its own range of sequence numbers, and bursts are
//! sent one source at a time, so what a receiver counts after a burst belongs to that source.
//! What reaches a receiver's segment is seen with a [`WireObserver`] (it joins nothing), so the
//! assertions are about what mcrelay forwards, not about what a host's own socket filter lets
//! through; where kernel sockets are the receivers, they also count per source.
//!
//! Peers:
//! - the kernel's own IGMPv3 / MLDv2 host stack, driven by source-specific socket options
//!   (IP_ADD_SOURCE_MEMBERSHIP, IP_BLOCK_SOURCE, MCAST_JOIN_SOURCE_GROUP, MCAST_BLOCK_SOURCE);
//! - crafted IGMPv3 / MLDv2 reports written onto a receiver's segment, walking the router state
//!   transitions of the RFC tables, with `mcrelay groups --json` checked after each one (mode,
//!   source lists, group and source timers, (S,G) and (*,G) port sets).
//!
//! Waits poll `mcrelay groups --json` with generous deadlines; nothing asserts how fast anything
//! happened. Crafted hosts never answer mcrelay's group(-and-source)-specific queries, so the
//! queried sources (or the group) time out after the last member query time, as the RFC says.

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    control::CraftedHost,
    daemon::{assert_process_alive, groups_json as groups, wait_groups_checked},
    groups::{group_entry, group_ports as star_ports, member, member_sources, names, source_ports},
    mcast::SourceSender,
    require_testbed,
    topology::{Host, Star},
    Mcrelay, NetNs, WireObserver,
};
use relay::membership::packet::{self, GroupRecord, Message, MessageKind, RecordType};
use serde_json::Value;

const PORT: u16 = 5000;
const COUNT: u64 = 100;
const INTERVAL: Duration = Duration::from_millis(1);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(500);

/// Fast queries, but a long group membership interval (2 * 20 + 1 = 41 s): anything that changes
/// within a few seconds was changed by a report or by the last member query time (0.2 * 2 s),
/// not by a membership timing out.
const LEAVE_TIMERS: [&str; 6] =
    ["--query-interval", "20", "--query-response-interval", "1", "--last-member-interval", "0.2"];
const LEAVE_GMI_MS: u64 = 41_000;

/// Short everything: group membership interval 2 * 2 + 1 = 5 s.
const SHORT_TIMERS: [&str; 6] =
    ["--query-interval", "2", "--query-response-interval", "1", "--last-member-interval", "0.2"];
const SHORT_GMI_MS: u64 = 5_000;

/// Starts mcrelay on every port of the star with the given timer options.
fn start_relay(star: &Star, extra: &[&str]) -> Mcrelay {
    let relay = star.start_relay(extra);
    DAEMON_PID.with(|p| p.set(Some(relay.pid())));
    relay
}

thread_local! {
    /// The daemon this test thread started, so that waits can tell a dead daemon from a slow one.
    static DAEMON_PID: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Panics if the daemon started by this test has exited (a zombie until its guard reaps it);
/// the guard then prints its stderr.
fn assert_daemon_alive(what: &str) {
    if let Some(pid) = DAEMON_PID.with(Cell::get) {
        assert_process_alive(pid, what);
    }
}

// ---------------------------------------------------------------------------------------------
// Senders: two source addresses on the sender's segment

/// Which of the two senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    S1,
    S2,
}

impl Src {
    fn index(self) -> usize {
        match self {
            Src::S1 => 0,
            Src::S2 => 1,
        }
    }
}

/// Two UDP sockets in the sender's namespace, bound to two different source addresses.
struct Senders {
    sockets: [SourceSender; 2],
    /// Bursts sent so far per source (each burst gets its own sequence numbers).
    bursts: [Cell<u64>; 2],
}

impl Senders {
    /// S1 is the host's own address; S2 is added (`198.18.N.3/24`, `fd00:6d63:0:N::3/64`).
    fn new(host: &Host, v6: bool) -> Self {
        let s1 = if v6 { IpAddr::V6(host.v6) } else { IpAddr::V4(host.v4) };
        let s2 = match s1 {
            IpAddr::V4(a) => {
                let o = a.octets();
                IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 3))
            }
            IpAddr::V6(a) => {
                let mut seg = a.segments();
                seg[7] = 3;
                IpAddr::V6(Ipv6Addr::from(seg))
            }
        };
        let prefix = if v6 { 64 } else { 24 };
        host.ns.add_addr(&host.iface, &format!("{s2}/{prefix}"));
        let sockets = [s1, s2].map(|a| SourceSender::new(&host.ns, &host.iface, a));
        Self { sockets, bursts: [Cell::new(0), Cell::new(0)] }
    }

    fn addr(&self, src: Src) -> IpAddr {
        self.sockets[src.index()].source()
    }

    /// Sends COUNT test datagrams to `group` from `src`, with sequence numbers no other burst
    /// uses (source i, burst b: `i * 1_000_000 + b * COUNT ..`).
    fn burst(&self, src: Src, group: IpAddr) {
        let i = src.index();
        let b = self.bursts[i].get();
        self.bursts[i].set(b + 1);
        let base = i as u64 * 1_000_000 + b * COUNT;
        self.sockets[i].send_range(group, PORT, base..base + COUNT, INTERVAL);
    }
}

/// Sends one burst from `src` and checks, on each observed wire, that the burst arrived
/// complete (exactly COUNT datagrams, no duplicates) or not at all.
fn deliver(
    gw: &NetNs,
    senders: &Senders,
    src: Src,
    group: IpAddr,
    checks: &[(&WireObserver, bool)],
    when: &str,
) {
    let before: Vec<u64> = checks.iter().map(|(w, _)| w.count(group)).collect();
    senders.burst(src, group);
    for ((wire, forwarded), before) in checks.iter().zip(&before) {
        if *forwarded {
            wire.wait_for(group, before + COUNT, DELIVERY_TIMEOUT);
        }
    }
    thread::sleep(QUIET);
    for ((wire, forwarded), before) in checks.iter().zip(&before) {
        let got = wire.count(group) - before;
        let want = if *forwarded { COUNT } else { 0 };
        if got != want {
            assert_daemon_alive(&format!("before {src:?} -> {group} was checked {when}"));
            let doc = groups(gw);
            let entry = group_entry(&doc, group).cloned().unwrap_or(Value::Null);
            panic!(
                "{wire}: {src:?} ({}) -> {group} {when}: {want} of {COUNT} datagrams expected, \
                 {got} arrived; mcrelay groups --json entry of {group}:\n{entry:#}",
                senders.addr(src),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `mcrelay groups --json`

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Include,
    Exclude,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Include => "include",
            Mode::Exclude => "exclude",
        }
    }
}

/// The router state one port should have for a group, per RFC 3376 6.4 / RFC 3810 7.4:
/// INCLUDE(requested) or EXCLUDE(requested, blocked).
#[derive(Debug, Clone)]
struct Want {
    mode: Mode,
    /// Sources with a running timer (INCLUDE list, or EXCLUDE "requested list" X).
    requested: Vec<IpAddr>,
    /// EXCLUDE-mode "exclude list" Y (timer 0).
    blocked: Vec<IpAddr>,
}

impl Want {
    fn include(requested: &[IpAddr]) -> Self {
        Self { mode: Mode::Include, requested: requested.to_vec(), blocked: vec![] }
    }

    fn exclude(requested: &[IpAddr], blocked: &[IpAddr]) -> Self {
        Self { mode: Mode::Exclude, requested: requested.to_vec(), blocked: blocked.to_vec() }
    }
}

/// Whether `port`'s state for `group` is `want` (mode, exact source lists with running or zero
/// timers) and the installed port sets agree: (*,G) has the port exactly in EXCLUDE mode, every
/// requested source's (S,G) set has it, no blocked source's (S,G) set has it.
fn state_is(doc: &Value, group: IpAddr, port: &str, want: &Want) -> bool {
    let Some(m) = member(doc, group, port) else { return false };
    if m["mode"] != want.mode.name() {
        return false;
    }
    let sources = member_sources(m);
    let listed: BTreeSet<IpAddr> = sources.keys().copied().collect();
    let wanted: BTreeSet<IpAddr> = want.requested.iter().chain(&want.blocked).copied().collect();
    if listed != wanted
        || want.requested.iter().any(|s| sources[s].is_none())
        || want.blocked.iter().any(|s| sources[s].is_some())
    {
        return false;
    }
    let has = |ports: &[String]| ports.iter().any(|p| p == port);
    has(&star_ports(doc, group)) == (want.mode == Mode::Exclude)
        && want.requested.iter().all(|s| source_ports(doc, group, *s).is_some_and(|p| has(&p)))
        && want.blocked.iter().all(|s| !source_ports(doc, group, *s).is_some_and(|p| has(&p)))
}

/// Whether nothing of `group` is learned or installed for `port`.
fn state_gone(doc: &Value, group: IpAddr, port: &str) -> bool {
    let Some(g) = group_entry(doc, group) else { return true };
    member(doc, group, port).is_none()
        && !names(&g["ports"]).iter().any(|p| p == port)
        && !g["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| names(&s["ports"]).iter().any(|p| p == port))
}

/// Polls until `pred(groups --json)` holds, failing at once if the daemon died; returns the
/// document and how long it took. Panics with the last document after `timeout`.
fn wait_groups(
    gw: &NetNs,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let alive = || assert_daemon_alive(&format!("while waiting for {what}"));
    wait_groups_checked(gw, what, timeout, alive, pred)
}

/// Waits for `want` on `port`, then checks the timers `groups --json` shows: the group timer
/// runs (at most the GMI) in EXCLUDE mode and is null in INCLUDE mode; every requested source's
/// timer runs, at most the GMI. With `fresh_group_timer`, the group timer must have been reset
/// to the GMI recently (more than half of it left).
fn wait_state(
    gw: &NetNs,
    group: IpAddr,
    port: &str,
    want: &Want,
    gmi_ms: u64,
    fresh_group_timer: bool,
    what: &str,
) -> Value {
    let (doc, took) =
        wait_groups(gw, &format!("{what}: {port} in {group} {want:?}"), STATE_TIMEOUT, |d| {
            state_is(d, group, port, want)
        });
    eprintln!("{what}: state reached after {took:?}");
    let m = member(&doc, group, port).unwrap_or_else(|| panic!("no member {port}:\n{doc:#}"));
    let timer = m["timer_ms"].as_u64();
    match want.mode {
        Mode::Include => assert!(
            m["timer_ms"].is_null(),
            "{what}: INCLUDE mode with a group timer on {port}:\n{doc:#}"
        ),
        Mode::Exclude => {
            let t = timer.unwrap_or_else(|| {
                panic!("{what}: EXCLUDE mode without a group timer on {port}:\n{doc:#}")
            });
            assert!(
                t > 0 && t <= gmi_ms,
                "{what}: group timer {t} ms out of (0, {gmi_ms}]:\n{doc:#}"
            );
            if fresh_group_timer {
                assert!(
                    t > gmi_ms / 2,
                    "{what}: group timer {t} ms was not reset to the GMI ({gmi_ms} ms):\n{doc:#}"
                );
            }
        }
    }
    assert!(
        m["compat"] == "igmpv3" || m["compat"] == "mldv2",
        "{what}: compat mode of {port} is {}:\n{doc:#}",
        m["compat"]
    );
    for (s, t) in member_sources(m) {
        if let Some(t) = t {
            assert!(t <= gmi_ms, "{what}: source {s} timer {t} ms above the GMI:\n{doc:#}");
        }
    }
    doc
}

fn wait_gone(gw: &NetNs, group: IpAddr, port: &str, what: &str) {
    let (_, took) =
        wait_groups(gw, &format!("{what}: {port} gone from {group}"), STATE_TIMEOUT, |d| {
            state_gone(d, group, port)
        });
    eprintln!("{what}: {port} gone from {group} after {took:?}");
}

// ---------------------------------------------------------------------------------------------
// Crafted reports

/// The crafted host `from` sends an IGMPv3 / MLDv2 report with one record.
fn report(from: &CraftedHost, kind: RecordType, group: IpAddr, sources: &[IpAddr]) {
    let msg = Message {
        source: from.source,
        kind: MessageKind::V3Report {
            records: vec![GroupRecord { kind, group, sources: sources.to_vec() }],
        },
    };
    from.send(&packet::build(from.mac, &msg).unwrap_or_else(|e| panic!("building {msg:?}: {e:?}")));
}

// ---------------------------------------------------------------------------------------------
// 1. Kernel source-specific joins

/// Per source: datagrams received (duplicates included) and distinct sequence numbers.
type PerSource = Mutex<BTreeMap<IpAddr, (u64, BTreeSet<u64>)>>;

/// A UDP socket with a source filter, counting test datagrams per source address.
struct FilteredReceiver {
    label: String,
    seen: Arc<PerSource>,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// How a [`FilteredReceiver`] joins.
#[derive(Debug, Clone, Copy)]
enum Filter {
    /// IPv4: IP_ADD_SOURCE_MEMBERSHIP; IPv6: MCAST_JOIN_SOURCE_GROUP.
    OnlyFrom(IpAddr),
    /// Any-source join (IPv4: IP_ADD_MEMBERSHIP; IPv6: MCAST_JOIN_GROUP), then IPv4:
    /// IP_BLOCK_SOURCE; IPv6: MCAST_BLOCK_SOURCE.
    AllBut(IpAddr),
}

impl FilteredReceiver {
    fn join(host: &Host, group: IpAddr, filter: Filter) -> Self {
        let label =
            format!("socket on {} in {} joined to {group} with {filter:?}", host.iface, host.ns);
        let (iface, v4) = (host.iface.clone(), host.v4);
        let socket = host
            .ns
            .in_netns(|| filtered_socket(group, &iface, v4, filter))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, error, stop) = (Arc::clone(&seen), Arc::clone(&error), Arc::clone(&stop));
            thread::spawn(move || filtered_loop(&socket, group, &seen, &error, &stop))
        };
        Self { label, seen, error, stop, thread: Some(thread) }
    }

    /// Datagrams received from `source` (duplicates included) and distinct sequence numbers.
    fn from(&self, source: IpAddr) -> (u64, u64) {
        if let Ok(e) = self.error.lock() {
            if let Some(e) = e.as_ref() {
                panic!("{}: receiving failed: {e}", self.label);
            }
        }
        self.seen
            .lock()
            .map(|s| s.get(&source).map_or((0, 0), |(n, seqs)| (*n, seqs.len() as u64)))
            .unwrap_or((0, 0))
    }

    /// Waits until `n` datagrams from `source` arrived or `timeout` passed.
    fn wait_from(&self, source: IpAddr, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.from(source).0 < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.from(source).0
    }

    /// Sources other than the given ones that something arrived from.
    fn others(&self, known: &[IpAddr]) -> Vec<IpAddr> {
        self.seen
            .lock()
            .map(|s| s.keys().filter(|a| !known.contains(a)).copied().collect())
            .unwrap_or_default()
    }
}

impl std::fmt::Display for FilteredReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

impl Drop for FilteredReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn setsockopt<T>(
    fd: &impl std::os::fd::AsRawFd,
    level: i32,
    name: i32,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a valid, initialised option structure of exactly the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) }
}

fn storage_v6(a: Ipv6Addr) -> libc::sockaddr_storage {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: sockaddr_storage is large enough and suitably aligned for a sockaddr_in6.
    let sin6 = unsafe { &mut *std::ptr::addr_of_mut!(ss).cast::<libc::sockaddr_in6>() };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_addr = libc::in6_addr { s6_addr: a.octets() };
    ss
}

fn filtered_socket(
    group: IpAddr,
    iface: &str,
    host_v4: Ipv4Addr,
    filter: Filter,
) -> io::Result<UdpSocket> {
    use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    let socket = match group {
        IpAddr::V4(g) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_reuse_address(true)?;
            socket.set_multicast_all_v4(false)?;
            socket.bind(&SocketAddr::new(group, PORT).into())?;
            let req = |s: IpAddr| -> io::Result<libc::ip_mreq_source> {
                let IpAddr::V4(s) = s else {
                    return Err(io::Error::other("IPv6 source for an IPv4 group"));
                };
                Ok(libc::ip_mreq_source {
                    imr_multiaddr: in_addr(g),
                    imr_interface: in_addr(host_v4),
                    imr_sourceaddr: in_addr(s),
                })
            };
            match filter {
                Filter::OnlyFrom(s) => {
                    setsockopt(
                        &socket,
                        libc::IPPROTO_IP,
                        libc::IP_ADD_SOURCE_MEMBERSHIP,
                        &req(s)?,
                    )?;
                }
                Filter::AllBut(s) => {
                    socket.join_multicast_v4_n(&g, &InterfaceIndexOrAddress::Index(ifindex))?;
                    setsockopt(&socket, libc::IPPROTO_IP, libc::IP_BLOCK_SOURCE, &req(s)?)?;
                }
            }
            socket
        }
        IpAddr::V6(g) => {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_only_v6(true)?;
            socket.set_reuse_address(true)?;
            socket.set_multicast_all_v6(false)?;
            socket.bind(&SocketAddrV6::new(g, PORT, 0, ifindex).into())?;
            let req = |s: IpAddr| -> io::Result<libc::group_source_req> {
                let IpAddr::V6(s) = s else {
                    return Err(io::Error::other("IPv4 source for an IPv6 group"));
                };
                Ok(libc::group_source_req {
                    gsr_interface: ifindex,
                    gsr_group: storage_v6(g),
                    gsr_source: storage_v6(s),
                })
            };
            match filter {
                Filter::OnlyFrom(s) => {
                    setsockopt(
                        &socket,
                        libc::IPPROTO_IPV6,
                        libc::MCAST_JOIN_SOURCE_GROUP,
                        &req(s)?,
                    )?;
                }
                Filter::AllBut(s) => {
                    let gr = libc::group_req { gr_interface: ifindex, gr_group: storage_v6(g) };
                    setsockopt(&socket, libc::IPPROTO_IPV6, libc::MCAST_JOIN_GROUP, &gr)?;
                    setsockopt(&socket, libc::IPPROTO_IPV6, libc::MCAST_BLOCK_SOURCE, &req(s)?)?;
                }
            }
            socket
        }
    };
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = socket.set_recv_buffer_size(8 << 20);
    Ok(socket.into())
}

fn filtered_loop(
    socket: &UdpSocket,
    group: IpAddr,
    seen: &PerSource,
    error: &Mutex<Option<String>>,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 2048];
    let group = group.to_string();
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let mut words = text.split_whitespace();
                if let (Some(mcrelay_tests::mcast::PAYLOAD_TAG), Some(g), Some(seq)) =
                    (words.next(), words.next(), words.next())
                {
                    if let (true, Ok(seq)) = (g == group, seq.parse::<u64>()) {
                        if let Ok(mut seen) = seen.lock() {
                            let e = seen.entry(from.ip()).or_default();
                            e.0 += 1;
                            e.1.insert(seq);
                        }
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                if let Ok(mut error) = error.lock() {
                    *error = Some(e.to_string());
                }
                return;
            }
        }
    }
}

/// Checks that a socket received exactly `n` distinct datagrams from `source`, without
/// duplicates.
fn assert_socket(rx: &FilteredReceiver, source: IpAddr, n: u64, when: &str) {
    if n > 0 {
        rx.wait_from(source, n, DELIVERY_TIMEOUT);
    }
    let (count, distinct) = rx.from(source);
    assert_eq!((count, distinct), (n, n), "{rx}: datagrams (all, distinct) from {source} {when}");
}

/// Host 1 joins only S1 (IP_ADD_SOURCE_MEMBERSHIP / MCAST_JOIN_SOURCE_GROUP), host 2 only S2;
/// host 3 joins nothing. Each gets exactly its source, on the wire and on its socket; closing a
/// socket leaves (the host sends BLOCK, mcrelay queries the source, nobody answers).
fn kernel_source_specific_join(tag: &str, group: IpAddr) {
    let v6 = group.is_ipv6();
    let star = Star::new(tag, 4);
    let [s, r1, r2, r3] = &star.hosts[..] else { unreachable!() };
    let senders = Senders::new(s, v6);
    let (s1, s2) = (senders.addr(Src::S1), senders.addr(Src::S2));
    let _relay = start_relay(&star, &LEAVE_TIMERS);
    let (w1, w2, w3) = (
        WireObserver::new(&r1.ns, &r1.iface),
        WireObserver::new(&r2.ns, &r2.iface),
        WireObserver::new(&r3.ns, &r3.iface),
    );
    let rx1 = FilteredReceiver::join(r1, group, Filter::OnlyFrom(s1));
    let rx2 = FilteredReceiver::join(r2, group, Filter::OnlyFrom(s2));
    wait_state(&star.gw, group, &r1.gw_port, &Want::include(&[s1]), LEAVE_GMI_MS, false, tag);
    wait_state(&star.gw, group, &r2.gw_port, &Want::include(&[s2]), LEAVE_GMI_MS, false, tag);

    let when = "while host 1 joined (G,S1) and host 2 (G,S2)";
    deliver(&star.gw, &senders, Src::S1, group, &[(&w1, true), (&w2, false), (&w3, false)], when);
    deliver(&star.gw, &senders, Src::S2, group, &[(&w1, false), (&w2, true), (&w3, false)], when);
    assert_socket(&rx1, s1, COUNT, when);
    assert_socket(&rx1, s2, 0, when);
    assert_socket(&rx2, s1, 0, when);
    assert_socket(&rx2, s2, COUNT, when);
    assert_eq!(rx1.others(&[s1, s2]), Vec::<IpAddr>::new(), "{rx1}: unexpected sources");

    drop(rx1);
    wait_gone(&star.gw, group, &r1.gw_port, &format!("{tag}: host 1 closed its socket"));
    let doc = groups(&star.gw);
    assert!(state_is(&doc, group, &r2.gw_port, &Want::include(&[s2])), "host 2 changed:\n{doc:#}");
    let when = "after host 1 closed its socket";
    deliver(&star.gw, &senders, Src::S1, group, &[(&w1, false), (&w2, false), (&w3, false)], when);
    deliver(&star.gw, &senders, Src::S2, group, &[(&w1, false), (&w2, true), (&w3, false)], when);
    assert_socket(&rx2, s2, 2 * COUNT, when);

    drop(rx2);
    wait_gone(&star.gw, group, &r2.gw_port, &format!("{tag}: host 2 closed its socket"));
    let when = "after both closed their sockets";
    deliver(&star.gw, &senders, Src::S2, group, &[(&w1, false), (&w2, false), (&w3, false)], when);
}

/// Host 1 joins any-source, then blocks S1 (IP_BLOCK_SOURCE / MCAST_BLOCK_SOURCE): mcrelay goes
/// EXCLUDE({}, {S1}) for its port (after querying S1 without an answer) and forwards S2 only;
/// host 2 joins (G,S1) only, so S1 has a receiver elsewhere at first. Then host 2 closes its
/// socket (S1 is wanted by nobody, but host 1 still takes every other source), then host 1.
fn kernel_block_source(tag: &str, group: IpAddr) {
    let v6 = group.is_ipv6();
    let star = Star::new(tag, 4);
    let [s, r1, r2, r3] = &star.hosts[..] else { unreachable!() };
    let senders = Senders::new(s, v6);
    let (s1, s2) = (senders.addr(Src::S1), senders.addr(Src::S2));
    let _relay = start_relay(&star, &LEAVE_TIMERS);
    let (w1, w2, w3) = (
        WireObserver::new(&r1.ns, &r1.iface),
        WireObserver::new(&r2.ns, &r2.iface),
        WireObserver::new(&r3.ns, &r3.iface),
    );
    let rx1 = FilteredReceiver::join(r1, group, Filter::AllBut(s1));
    let rx2 = FilteredReceiver::join(r2, group, Filter::OnlyFrom(s1));
    wait_state(&star.gw, group, &r1.gw_port, &Want::exclude(&[], &[s1]), LEAVE_GMI_MS, true, tag);
    wait_state(&star.gw, group, &r2.gw_port, &Want::include(&[s1]), LEAVE_GMI_MS, false, tag);

    let when = "while host 1 joined G blocking S1 and host 2 joined (G,S1)";
    deliver(&star.gw, &senders, Src::S1, group, &[(&w1, false), (&w2, true), (&w3, false)], when);
    deliver(&star.gw, &senders, Src::S2, group, &[(&w1, true), (&w2, false), (&w3, false)], when);
    assert_socket(&rx1, s1, 0, when);
    assert_socket(&rx1, s2, COUNT, when);
    assert_socket(&rx2, s1, COUNT, when);
    assert_socket(&rx2, s2, 0, when);

    drop(rx2);
    wait_gone(&star.gw, group, &r2.gw_port, &format!("{tag}: host 2 closed its socket"));
    let doc = groups(&star.gw);
    assert!(
        state_is(&doc, group, &r1.gw_port, &Want::exclude(&[], &[s1])),
        "host 1's state changed when host 2 left:\n{doc:#}"
    );
    let when = "after host 2 closed its socket (host 1 still blocks S1)";
    deliver(&star.gw, &senders, Src::S1, group, &[(&w1, false), (&w2, false), (&w3, false)], when);
    deliver(&star.gw, &senders, Src::S2, group, &[(&w1, true), (&w2, false), (&w3, false)], when);
    assert_socket(&rx1, s1, 0, when);
    assert_socket(&rx1, s2, 2 * COUNT, when);

    drop(rx1);
    wait_gone(&star.gw, group, &r1.gw_port, &format!("{tag}: host 1 closed its socket"));
    let when = "after both closed their sockets";
    deliver(&star.gw, &senders, Src::S1, group, &[(&w1, false), (&w2, false), (&w3, false)], when);
    deliver(&star.gw, &senders, Src::S2, group, &[(&w1, false), (&w2, false), (&w3, false)], when);
}

#[test]
fn igmpv3_kernel_ip_add_source_membership() {
    require_testbed!();
    kernel_source_specific_join("sfk4", addr("239.20.1.1"));
}

#[test]
fn mldv2_kernel_mcast_join_source_group() {
    require_testbed!();
    kernel_source_specific_join("sfk6", addr("ff1e::20:1:1"));
}

#[test]
fn igmpv3_kernel_ip_block_source_after_any_source_join() {
    require_testbed!();
    kernel_block_source("sfb4", addr("239.20.2.1"));
}

#[test]
fn mldv2_kernel_mcast_block_source_after_any_source_join() {
    require_testbed!();
    kernel_block_source("sfb6", addr("ff1e::20:2:1"));
}

// ---------------------------------------------------------------------------------------------
// 2. Crafted reports: the RFC 3376 6.4 / RFC 3810 7.4 transitions

/// One crafted host on host 1's segment walks the router state of its port through the
/// transitions of the RFC tables; after each one, `groups --json` shows the state the table
/// gives and each source reaches host 1's wire exactly when that state forwards it. Host 2
/// never reports and never receives anything.
fn crafted_walk(tag: &str, group: IpAddr) {
    let v6 = group.is_ipv6();
    let star = Star::new(tag, 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!() };
    let senders = Senders::new(s, v6);
    let (s1, s2) = (senders.addr(Src::S1), senders.addr(Src::S2));
    let host = CraftedHost::new(r1, 1, v6);
    let _relay = start_relay(&star, &LEAVE_TIMERS);
    let (w1, w2) = (WireObserver::new(&r1.ns, &r1.iface), WireObserver::new(&r2.ns, &r2.iface));
    let port = r1.gw_port.as_str();
    let gw = &star.gw;
    let check = |what: &str, s1_fwd: bool, s2_fwd: bool| {
        deliver(gw, &senders, Src::S1, group, &[(&w1, s1_fwd), (&w2, false)], what);
        deliver(gw, &senders, Src::S2, group, &[(&w1, s2_fwd), (&w2, false)], what);
    };

    // INCLUDE({}) + ALLOW(S1) -> INCLUDE({S1}), (S1) = GMI.
    let what = "INCLUDE->ALLOW: INCLUDE({}) + ALLOW({S1}) = INCLUDE({S1})";
    report(&host, RecordType::AllowNew, group, &[s1]);
    wait_state(gw, group, port, &Want::include(&[s1]), LEAVE_GMI_MS, false, what);
    check(what, true, false);

    // INCLUDE(A={S1}) + IS_EX(B={S2}) -> EXCLUDE(A*B={}, B-A={S2}), Delete(A-B={S1}), GT = GMI.
    let what = "INCLUDE->IS_EX: INCLUDE({S1}) + IS_EX({S2}) = EXCLUDE({}, {S2})";
    report(&host, RecordType::IsExclude, group, &[s2]);
    wait_state(gw, group, port, &Want::exclude(&[], &[s2]), LEAVE_GMI_MS, true, what);
    check(what, true, false);

    // EXCLUDE(X={}, Y={S2}) + ALLOW(A={S2}) -> EXCLUDE(X+A={S2}, Y-A={}), (S2) = GMI.
    let what = "EXCLUDE->ALLOW: EXCLUDE({}, {S2}) + ALLOW({S2}) = EXCLUDE({S2}, {})";
    report(&host, RecordType::AllowNew, group, &[s2]);
    wait_state(gw, group, port, &Want::exclude(&[s2], &[]), LEAVE_GMI_MS, false, what);
    check(what, true, true);

    // EXCLUDE(X={S2}, Y={}) + BLOCK(A={S1}) -> EXCLUDE(X+(A-X-Y)={S1,S2}, Y), (S1) = GT,
    // Send Q(G, A-Y={S1}): nobody answers, (S1) expires after LMQT -> EXCLUDE({S2}, {S1}).
    let what =
        "EXCLUDE->BLOCK: EXCLUDE({S2}, {}) + BLOCK({S1}) = EXCLUDE({S2}, {S1}) after Q(G,S1)";
    report(&host, RecordType::BlockOld, group, &[s1]);
    wait_state(gw, group, port, &Want::exclude(&[s2], &[s1]), LEAVE_GMI_MS, false, what);
    check(what, false, true);

    // EXCLUDE(X={S2}, Y={S1}) + TO_IN(A={S1}) -> EXCLUDE(X+A={S1,S2}, Y-A={}), (S1) = GMI,
    // Send Q(G, X-A={S2}), Send Q(G): nobody answers; after LMQT the group timer expires
    // (-> INCLUDE with the running sources) and so does (S2): INCLUDE({S1}).
    let what =
        "EXCLUDE->TO_IN: EXCLUDE({S2}, {S1}) + TO_IN({S1}) = INCLUDE({S1}) after Q(G), Q(G,S2)";
    report(&host, RecordType::ToInclude, group, &[s1]);
    wait_state(gw, group, port, &Want::include(&[s1]), LEAVE_GMI_MS, false, what);
    check(what, true, false);

    // INCLUDE(A={S1}) + TO_EX(B={S1}) -> EXCLUDE(A*B={S1}, B-A={}), GT = GMI, Send Q(G, A*B):
    // nobody answers, (S1) expires after LMQT -> EXCLUDE({}, {S1}).
    let what = "INCLUDE->TO_EX: INCLUDE({S1}) + TO_EX({S1}) = EXCLUDE({}, {S1}) after Q(G,S1)";
    report(&host, RecordType::ToExclude, group, &[s1]);
    wait_state(gw, group, port, &Want::exclude(&[], &[s1]), LEAVE_GMI_MS, true, what);
    check(what, false, true);

    // EXCLUDE(X={}, Y={S1}) + TO_IN({}) -> Send Q(G): nobody answers; the group timer expires
    // after LMQT -> INCLUDE({}) -> the port leaves.
    let what = "EXCLUDE->TO_IN({}): leave after Q(G)";
    report(&host, RecordType::ToInclude, group, &[]);
    wait_gone(gw, group, port, what);
    check(what, false, false);
}

#[test]
fn igmpv3_crafted_record_transitions() {
    require_testbed!();
    crafted_walk("sfw4", addr("239.20.3.1"));
}

#[test]
fn mldv2_crafted_record_transitions() {
    require_testbed!();
    crafted_walk("sfw6", addr("ff1e::20:3:1"));
}

/// Group timer expiry (RFC 3376 6.5): host A joins any-source (IS_EX({})), host B asks for S1
/// (IS_IN({S1})), both on host 1's segment: EXCLUDE({S1}, {}) forwards both sources. Host A
/// falls silent while host B keeps answering for S1: when the group timer expires the port
/// switches to INCLUDE({S1}) and S2 stops. Then host B falls silent too and (S1) expires.
fn group_timer_expiry(tag: &str, group: IpAddr) {
    let v6 = group.is_ipv6();
    let star = Star::new(tag, 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!() };
    let senders = Senders::new(s, v6);
    let s1 = senders.addr(Src::S1);
    let (host_a, host_b) = (CraftedHost::new(r1, 1, v6), CraftedHost::neighbour(r1, 2, v6));
    let _relay = start_relay(&star, &SHORT_TIMERS);
    let (w1, w2) = (WireObserver::new(&r1.ns, &r1.iface), WireObserver::new(&r2.ns, &r2.iface));
    let port = r1.gw_port.as_str();
    let gw = &star.gw;
    let check = |what: &str, s1_fwd: bool, s2_fwd: bool| {
        deliver(gw, &senders, Src::S1, group, &[(&w1, s1_fwd), (&w2, false)], what);
        deliver(gw, &senders, Src::S2, group, &[(&w1, s2_fwd), (&w2, false)], what);
    };

    // Both hosts answer as they would to general queries; every answer restarts the GMI, so
    // EXCLUDE mode lasts while the two bursts are sent (host A's IS_EX({}) alone deletes S1
    // from the requested list for a moment, during which S1 still matches the (*,G) entry).
    let what = "IS_EX({}) + IS_IN({S1}) = EXCLUDE({S1}, {})";
    let both_answer = || {
        report(&host_a, RecordType::IsExclude, group, &[]);
        report(&host_b, RecordType::IsInclude, group, &[s1]);
    };
    both_answer();
    wait_state(gw, group, port, &Want::exclude(&[s1], &[]), SHORT_GMI_MS, true, what);
    both_answer();
    deliver(gw, &senders, Src::S1, group, &[(&w1, true), (&w2, false)], what);
    both_answer();
    deliver(gw, &senders, Src::S2, group, &[(&w1, true), (&w2, false)], what);

    // Host B answers (IS_IN({S1}) every second); host A is gone.
    let what = "group timer expiry: EXCLUDE({S1}, {}) -> INCLUDE({S1})";
    let start = Instant::now();
    let mut refreshed: Option<Instant> = None;
    loop {
        if refreshed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            report(&host_b, RecordType::IsInclude, group, &[s1]);
            refreshed = Some(Instant::now());
        }
        assert_daemon_alive(what);
        let doc = groups(gw);
        if state_is(&doc, group, port, &Want::include(&[s1])) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: waited 30 s:\n{doc:#}");
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{what}: after {:?} (GMI {SHORT_GMI_MS} ms)", start.elapsed());
    report(&host_b, RecordType::IsInclude, group, &[s1]);
    let doc = wait_state(gw, group, port, &Want::include(&[s1]), SHORT_GMI_MS, false, what);
    assert!(
        member(&doc, group, port).is_some_and(|m| m["timer_ms"].is_null()),
        "{what}: a group timer in INCLUDE mode:\n{doc:#}"
    );
    check(what, true, false);

    // Host B falls silent: (S1) expires after the GMI and the port leaves.
    let what = "source timer expiry: INCLUDE({S1}) -> INCLUDE({})";
    let (_, took) = wait_groups(gw, what, Duration::from_secs(30), |d| state_gone(d, group, port));
    eprintln!("{what}: after {took:?}");
    check(what, false, false);
}

#[test]
fn igmpv3_group_timer_expiry_back_to_include() {
    require_testbed!();
    group_timer_expiry("sfe4", addr("239.20.4.1"));
}

#[test]
fn mldv2_group_timer_expiry_back_to_include() {
    require_testbed!();
    group_timer_expiry("sfe6", addr("ff1e::20:4:1"));
}

// ---------------------------------------------------------------------------------------------
// 3. SSM range

/// Sends a report for a non-SSM `sentinel` group with a new source and waits until mcrelay
/// learned it: every report sent before on the same segment has been processed by then.
fn processed(gw: &NetNs, host: &CraftedHost<'_>, port: &str, sentinel: IpAddr, marker: IpAddr) {
    report(host, RecordType::AllowNew, sentinel, &[marker]);
    wait_groups(gw, &format!("sentinel ({marker}, {sentinel}) learned"), STATE_TIMEOUT, |d| {
        source_ports(d, sentinel, marker).is_some_and(|p| p.iter().any(|x| x == port))
    });
}

/// In the SSM range only (S,G) that were asked for are forwarded: an any-source join (IS_EX({}))
/// and a TO_EX({}) are ignored; INCLUDE({S1}) forwards S1 only.
fn ssm_range(tag: &str, group: IpAddr, sentinel: IpAddr) {
    let v6 = group.is_ipv6();
    let star = Star::new(tag, 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!() };
    let senders = Senders::new(s, v6);
    let s1 = senders.addr(Src::S1);
    let marker = |n: u8| match s1 {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(n))),
    };
    let (h1, h2) = (CraftedHost::new(r1, 1, v6), CraftedHost::new(r2, 2, v6));
    let _relay = start_relay(&star, &LEAVE_TIMERS);
    let (w1, w2) = (WireObserver::new(&r1.ns, &r1.iface), WireObserver::new(&r2.ns, &r2.iface));
    let gw = &star.gw;
    let check = |what: &str, s1_to_1: bool| {
        deliver(gw, &senders, Src::S1, group, &[(&w1, s1_to_1), (&w2, false)], what);
        deliver(gw, &senders, Src::S2, group, &[(&w1, false), (&w2, false)], what);
    };

    // Any-source joins from both hosts: ignored.
    report(&h1, RecordType::IsExclude, group, &[]);
    report(&h2, RecordType::IsExclude, group, &[]);
    processed(gw, &h1, &r1.gw_port, sentinel, marker(1));
    processed(gw, &h2, &r2.gw_port, sentinel, marker(2));
    let doc = groups(gw);
    for port in [&r1.gw_port, &r2.gw_port] {
        assert!(
            state_gone(&doc, group, port),
            "IS_EX({{}}) for the SSM group {group} was not ignored on {port}:\n{doc:#}"
        );
    }
    check("after IS_EX({}) (any-source join) in the SSM range", false);

    // INCLUDE({S1}) on host 1: only S1, only there.
    let what = "SSM: IS_IN({S1}) = INCLUDE({S1})";
    report(&h1, RecordType::IsInclude, group, &[s1]);
    let doc = wait_state(gw, group, &r1.gw_port, &Want::include(&[s1]), LEAVE_GMI_MS, false, what);
    assert!(state_gone(&doc, group, &r2.gw_port), "{what}: host 2's port in {group}:\n{doc:#}");
    assert!(star_ports(&doc, group).is_empty(), "{what}: (*,G) ports in the SSM range:\n{doc:#}");
    check(what, true);

    // TO_EX({}) in the SSM range is ignored too: the port stays INCLUDE({S1}).
    let what = "SSM: INCLUDE({S1}) + TO_EX({}) ignored";
    report(&h1, RecordType::ToExclude, group, &[]);
    report(&h2, RecordType::ToExclude, group, &[]);
    processed(gw, &h1, &r1.gw_port, sentinel, marker(3));
    processed(gw, &h2, &r2.gw_port, sentinel, marker(4));
    let doc = groups(gw);
    assert!(
        state_is(&doc, group, &r1.gw_port, &Want::include(&[s1])),
        "{what}: state of {} changed:\n{doc:#}",
        r1.gw_port
    );
    assert!(state_gone(&doc, group, &r2.gw_port), "{what}: host 2's port in {group}:\n{doc:#}");
    check(what, true);
}

#[test]
fn igmpv3_ssm_range_forwards_only_requested_sources() {
    require_testbed!();
    ssm_range("sfs4", addr("232.1.1.1"), addr("239.20.5.1"));
}

#[test]
fn mldv2_ssm_range_forwards_only_requested_sources() {
    require_testbed!();
    ssm_range("sfs6", addr("ff3e::1:1"), addr("ff1e::20:5:1"));
}
