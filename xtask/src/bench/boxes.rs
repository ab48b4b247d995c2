//! The middle boxes under test. Each is set up in the middle namespace for a fan-out and torn
//! down when its guard drops, so that the next one finds plain veths again.

use std::{
    fmt, fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{of_maps::HashOfMaps, DevMapHash, Map, MapData},
    programs::{Xdp, XdpMode},
    Ebpf,
};
use mcrelay_tests::{Mcrelay, NetNs};
use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::testbed::{load_object, load_xdp, Testbed, GROUP, SENDER, UDP_PORT};

/// `BPF_MAP_TYPE_DEVMAP_HASH`.
const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;
/// Entries of the bare program's inner maps (must match `DevMapHash<128>` in bench.rs).
const BARE_INNER_MAX: u32 = 128;
/// How long the bridge waits before trusting its own querier (`mcast_query_response_interval`,
/// centiseconds); floods until then.
const BRIDGE_QUERIER_DELAY_CS: u32 = 50;

/// A middle box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MiddleBox {
    Mcrelay,
    Bare,
    Bridge,
    Mfc,
    Userspace,
}

impl MiddleBox {
    pub const ALL: [Self; 5] =
        [Self::Mcrelay, Self::Bare, Self::Bridge, Self::Mfc, Self::Userspace];

    /// Short, stable name (table and JSON).
    pub fn name(self) -> &'static str {
        match self {
            Self::Mcrelay => "mcrelay",
            Self::Bare => "bare",
            Self::Bridge => "bridge",
            Self::Mfc => "mfc",
            Self::Userspace => "userspace",
        }
    }

    /// One line saying what it is.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Mcrelay => "mcrelay run (XDP native on every port, --static group)",
            Self::Bare => "bare XDP: group lookup in HASH_OF_MAPS, devmap broadcast",
            Self::Bridge => "Linux bridge, IGMP snooping, querier on, static mdb entries",
            Self::Mfc => "kernel multicast routing (MFC) programmed by smcrouted",
            Self::Userspace => "userspace relay: one UDP socket in, one per egress port",
        }
    }
}

impl fmt::Display for MiddleBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a box needs from outside.
pub struct Env<'a> {
    pub mcrelay: &'a Path,
    pub object: &'a Path,
    /// A scratch directory of this run (configuration files, sockets).
    pub scratch: &'a Path,
}

/// A box that is set up; tears itself down on drop (the fields are only held).
pub enum Running {
    Mcrelay { _daemon: Box<Mcrelay> },
    Bare { _ebpf: Ebpf, _inner: DevMapHash<MapData> },
    Bridge { _bridge: BridgeGuard },
    Mfc { _smcrouted: Daemon },
    Userspace { _relay: UserspaceRelay },
}

/// Sets `kind` up in the middle namespace of `tb` with members `out0..out{fanout-1}`.
pub fn start(
    kind: MiddleBox,
    tb: &Testbed,
    env: &Env<'_>,
    fanout: usize,
) -> anyhow::Result<Running> {
    let outs: Vec<String> = (0..fanout).map(|i| format!("out{i}")).collect();
    match kind {
        MiddleBox::Mcrelay => {
            let mut args = vec![
                // --no-pin: detach on exit, so the next box finds plain veths.
                "run".to_owned(),
                "--no-pin".into(),
                "--xdp-mode".into(),
                "native".into(),
                "-i".into(),
                "in0".into(),
            ];
            for out in &outs {
                args.extend(["-i".to_owned(), out.clone()]);
            }
            args.extend(["--static".to_owned(), format!("{GROUP}@{}", outs.join(","))]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut daemon = Mcrelay::start_with(env.mcrelay, &tb.mid, &args, true);
            daemon.wait_ready();
            Ok(Running::Mcrelay { _daemon: Box::new(daemon) })
        }
        MiddleBox::Bare => {
            let (ebpf, inner) = start_bare(tb, env.object, &tb.out_ifindexes(fanout))?;
            Ok(Running::Bare { _ebpf: ebpf, _inner: inner })
        }
        MiddleBox::Bridge => {
            BridgeGuard::start(&tb.mid, &outs).map(|b| Running::Bridge { _bridge: b })
        }
        MiddleBox::Mfc => {
            start_smcroute(&tb.mid, env.scratch, &outs).map(|d| Running::Mfc { _smcrouted: d })
        }
        MiddleBox::Userspace => {
            UserspaceRelay::start(&tb.mid, fanout).map(|r| Running::Userspace { _relay: r })
        }
    }
}

/// Loads `bench_bare`, fills its group map and attaches it (native) to `in0`.
///
/// Everything that names an ifindex runs inside the middle namespace: a devmap resolves the
/// ifindexes written into it in the namespace of the writer.
fn start_bare(
    tb: &Testbed,
    object: &Path,
    outs: &[u32],
) -> anyhow::Result<(Ebpf, DevMapHash<MapData>)> {
    let mut ebpf = load_object(object)?;
    load_xdp(&mut ebpf, "bench_bare")?;
    thread::scope(|scope| {
        super::testbed::spawn_in(scope, &tb.mid, move || -> anyhow::Result<_> {
            let inner = bare_group(&mut ebpf, outs)?;
            let program: &mut Xdp = ebpf
                .program_mut("bench_bare")
                .ok_or_else(|| anyhow!("bench_bare missing"))?
                .try_into()?;
            program.attach("in0", XdpMode::Driver).context("attaching bench_bare to in0")?;
            Ok((ebpf, inner))
        })?
        .join()
        .map_err(|_| anyhow!("setting up bench_bare panicked"))?
    })
}

/// Gives the bare program a port set for [`GROUP`]: `ifindexes` in the calling thread's
/// network namespace. The returned inner map must outlive its use.
pub fn bare_group(ebpf: &mut Ebpf, ifindexes: &[u32]) -> anyhow::Result<DevMapHash<MapData>> {
    let inner = MapData::create(
        aya_obj::Map::new_from_params(BPF_MAP_TYPE_DEVMAP_HASH, 4, 8, BARE_INNER_MAX, 0),
        "bench_bare_grp",
        None,
    )
    .context("creating the bare program's port set")?;
    let mut inner = DevMapHash::try_from(Map::DevMapHash(inner))?;
    for &ifindex in ifindexes {
        inner.insert(ifindex, ifindex, None, 0).context("filling the bare port set")?;
    }
    let mut groups: HashOfMaps<_, u32, DevMapHash<MapData>> = HashOfMaps::try_from(
        ebpf.map_mut("BARE_GROUPS").ok_or_else(|| anyhow!("BARE_GROUPS missing"))?,
    )?;
    groups.insert(u32::from_ne_bytes(GROUP.octets()), &inner, 0)?;
    Ok(inner)
}

/// A Linux bridge `br0` over `in0` and every `out*`; deleted on drop.
pub struct BridgeGuard {
    ns_name: String,
}

impl BridgeGuard {
    fn start(ns: &NetNs, members: &[String]) -> anyhow::Result<Self> {
        let guard = Self { ns_name: ns.name().to_owned() };
        ns.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "1",
            "mcast_query_response_interval",
            &BRIDGE_QUERIER_DELAY_CS.to_string(),
        ]);
        ns.ip(&["link", "set", "br0", "type", "bridge", "mcast_querier", "1"]);
        ns.add_addr("br0", "198.18.100.1/24");
        ns.link_up("br0");
        ns.ip(&["link", "set", "in0", "master", "br0"]);
        for i in 0..super::testbed::MAX_FANOUT {
            ns.ip(&["link", "set", &format!("out{i}"), "master", "br0"]);
        }
        for member in members {
            ns.exec(&[
                "bridge",
                "mdb",
                "add",
                "dev",
                "br0",
                "port",
                member,
                "grp",
                &GROUP.to_string(),
                "permanent",
            ]);
        }
        // Until the querier's start-up delay has passed the bridge floods every port.
        thread::sleep(Duration::from_millis(u64::from(BRIDGE_QUERIER_DELAY_CS) * 10 + 500));
        Ok(guard)
    }
}

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.ns_name, "link", "del", "br0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A helper daemon (smcrouted) started by the bench: SIGTERM, then SIGKILL, on drop.
pub struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// smcrouted in `ns` with one (S,G) route from in0 to `outs`; waits until the kernel has it.
fn start_smcroute(ns: &NetNs, scratch: &Path, outs: &[String]) -> anyhow::Result<Daemon> {
    let conf = scratch.join("smcroute.conf");
    let mut text = String::from("phyint in0 enable\n");
    for out in outs {
        text.push_str(&format!("phyint {out} enable\n"));
    }
    text.push_str(&format!(
        "mroute from in0 source {SENDER} group {GROUP} to {}\n",
        outs.join(" ")
    ));
    fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let ident = format!("mcrbench-{}", std::process::id());
    let socket: PathBuf = scratch.join("smcroute.sock");
    let pidfile: PathBuf = scratch.join("smcroute.pid");
    let mut cmd = ns.command("smcrouted");
    cmd.args(["-n", "-N", "-l", "err", "-i", &ident, "-f"])
        .arg(&conf)
        .arg("-u")
        .arg(&socket)
        .arg("-P")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().context("starting smcrouted (Debian package smcroute)")?;
    let daemon = Daemon { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routes = ns.ip(&["mroute", "show"]);
        if routes.contains(&GROUP.to_string()) && outs.iter().all(|o| routes.contains(o.as_str())) {
            return Ok(daemon);
        }
        if Instant::now() >= deadline {
            bail!("smcrouted did not install the route within 10 s; `ip mroute show`:\n{routes}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A userspace relay: one socket joined on in0, one sending socket per egress port; a thread in
/// the middle namespace copies every datagram to each. Stops on drop.
pub struct UserspaceRelay {
    stop: Arc<AtomicBool>,
    worker: Option<thread::JoinHandle<anyhow::Result<()>>>,
}

impl UserspaceRelay {
    fn start(ns: &NetNs, fanout: usize) -> anyhow::Result<Self> {
        let file = fs::File::open(ns.path())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || -> anyhow::Result<()> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                let sockets = userspace_sockets(fanout);
                let (input, outputs) = match sockets {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let group = SocketAddrV4::new(GROUP, UDP_PORT).into();
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = input.recv(&mut buf) else { continue };
                    // SAFETY: recv initialised the first n bytes.
                    let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                    for out in &outputs {
                        let _ = out.send_to(data, &group);
                    }
                }
                Ok(())
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self { stop, worker: Some(worker) }),
            Ok(Err(e)) => bail!("userspace relay: {e}"),
            Err(_) => bail!("userspace relay did not start"),
        }
    }
}

fn userspace_sockets(fanout: usize) -> anyhow::Result<(Socket, Vec<Socket>)> {
    let input = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    input.set_reuse_address(true)?;
    input.set_recv_buffer_size(4 << 20)?;
    input.bind(&SocketAddrV4::new(GROUP, UDP_PORT).into())?;
    input.join_multicast_v4(&GROUP, &Ipv4Addr::new(198, 18, 0, 1)).context("joining on in0")?;
    input.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut outputs = Vec::with_capacity(fanout);
    for i in 0..fanout {
        let addr = Ipv4Addr::new(198, 18, i as u8 + 1, 1);
        let out = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        out.bind(&SocketAddrV4::new(addr, 0).into())?;
        out.set_multicast_if_v4(&addr)?;
        out.set_multicast_ttl_v4(1)?;
        out.set_multicast_loop_v4(false)?;
        out.set_send_buffer_size(4 << 20)?;
        outputs.push(out);
    }
    Ok((input, outputs))
}

impl Drop for UserspaceRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            match worker.join() {
                Ok(Err(e)) => eprintln!("[bench] userspace relay: {e:#}"),
                Err(_) => eprintln!("[bench] userspace relay panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}
