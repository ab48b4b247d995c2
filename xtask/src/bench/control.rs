//! Control-plane numbers (issue 13 item 4, issue 10): how fast the daemon turns IGMP into
//! forwarding. Printed, never asserted.
//!
//! ```text
//!  mcrbench-csrc            mcrbench-cmid (mcrelay run -i in0 -i out0 --fast-leave out0)
//!  s0 ──── veth ──── in0                       out0 ──── veth ──── r0 (mcrbench-csink)
//!  UDP socket, one datagram                                         bench_stamp: first / last
//!  every ~20 us to the group under test                             frame time (ktime ns)
//! ```
//!
//! - join-to-forward: a crafted IGMPv2 report leaves r0 (raw socket, CLOCK_MONOTONIC taken just
//!   before `send`); latency = the first frame of that group at r0 (`bpf_ktime_get_ns`, the
//!   same clock) minus the send time. One new group per join; median and p99.
//! - leave-to-stop: an IGMPv2 leave (fast leave on out0); latency = the last frame at r0 minus
//!   the send time (0 when no frame followed the leave).
//! - reports per second: N reports for N new groups sent back to back, then the first frame of
//!   the last group at r0 (the daemon reads reports in order): N / that time. `mcrelay groups`
//!   says how many of the N were installed.
//! - groups written per second at start-up: from the cost part (static groups, map writer).
//!
//! The resolution of the latencies is the sender's pacing (printed: mean gap between frames).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::Array,
    programs::{Xdp, XdpMode},
    Ebpf,
};
use mcrelay_tests::{
    serde_json::{json, Value},
    veth_pair, Mcrelay, NetNs,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::{
    cost::median,
    frames,
    testbed::{load_object, load_xdp, spawn_in, SENDER, UDP_PORT},
};

/// Gap between the sender's datagrams (busy wait: sleeping is far coarser).
const PACE: Duration = Duration::from_micros(20);
/// A group counts as stopped once no frame arrived for this long.
const QUIET: Duration = Duration::from_millis(20);
/// The receiver's address (source of the reports).
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];

/// How much to measure.
pub struct ControlPlan<'a> {
    pub mcrelay: &'a Path,
    pub object: &'a Path,
    pub joins: usize,
    /// Every this many joins, the group is left again and leave-to-stop measured.
    pub leave_every: usize,
    pub burst_reports: usize,
}

/// What the control-plane bench saw.
#[derive(Clone, Debug, Default)]
pub struct ControlResult {
    /// Join-to-forward latencies, µs (joins that timed out are left out and counted).
    pub join_us: Vec<f64>,
    pub join_timeouts: usize,
    /// Leave-to-stop latencies, µs.
    pub leave_us: Vec<f64>,
    pub leave_timeouts: usize,
    /// Reports sent back to back, seconds until the last one forwarded, groups installed.
    pub burst_reports: usize,
    pub burst_s: f64,
    pub burst_installed: usize,
    /// Seconds from the first report of the burst until `mcrelay groups` showed the last
    /// group installed (polled every 50 ms).
    pub burst_installed_s: f64,
    /// Mean gap between generated frames, µs: the resolution of the latencies.
    pub frame_gap_us: f64,
}

impl ControlResult {
    pub fn reports_per_s(&self) -> f64 {
        if self.burst_installed_s > 0.0 {
            self.burst_installed.min(self.burst_reports) as f64 / self.burst_installed_s
        } else {
            0.0
        }
    }
}

/// The value at fraction `q` (0..=1) of `values` (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn now_ns() -> u64 {
    // SAFETY: all-zero timespec is valid; clock_gettime only writes it.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A raw packet socket bound to `iface` in `ns`.
fn packet_socket(ns: &NetNs, iface: &str) -> anyhow::Result<OwnedFd> {
    ns.in_netns(|| -> anyhow::Result<OwnedFd> {
        let ifindex = nix::net::if_::if_nametoindex(iface)?;
        // SAFETY: plain socket(2), owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(fd)
    })
}

fn send(fd: &OwnedFd, frame: &[u8]) -> anyhow::Result<()> {
    // SAFETY: frame is a valid buffer of the length passed.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("send on the raw socket");
    }
    Ok(())
}

pub fn measure(plan: &ControlPlan<'_>) -> anyhow::Result<ControlResult> {
    let src = NetNs::new("mcrbench-csrc");
    let mid = NetNs::new("mcrbench-cmid");
    let sink = NetNs::new("mcrbench-csink");
    veth_pair(&src, "s0", &mid, "in0");
    veth_pair(&mid, "out0", &sink, "r0");
    src.add_addr("s0", &format!("{SENDER}/24"));
    mid.add_addr("in0", "198.18.0.1/24");
    mid.add_addr("out0", "198.18.1.1/24");
    sink.add_addr("r0", &format!("{HOST}/24"));
    for ns in [&src, &mid, &sink] {
        ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1");
    }
    let r0 = sink.ifindex("r0");

    // The receiver's stamps.
    let mut stamp = load_object(plan.object)?;
    load_xdp(&mut stamp, "bench_stamp")?;
    let mut stamp = thread::scope(|scope| -> anyhow::Result<Ebpf> {
        spawn_in(scope, &sink, move || -> anyhow::Result<Ebpf> {
            let program: &mut Xdp = stamp
                .program_mut("bench_stamp")
                .ok_or_else(|| anyhow!("bench_stamp missing"))?
                .try_into()?;
            program.attach("r0", XdpMode::Driver).context("attaching bench_stamp to r0")?;
            Ok(stamp)
        })?
        .join()
        .map_err(|_| anyhow!("attaching bench_stamp panicked"))?
    })?;

    let mut daemon = Mcrelay::start_with(
        plan.mcrelay,
        &mid,
        &[
            "run",
            "--no-pin",
            "--xdp-mode",
            "native",
            "-i",
            "in0",
            "-i",
            "out0",
            "--fast-leave",
            "out0",
        ],
        true,
    );
    daemon.wait_ready();
    let socket = packet_socket(&sink, "r0")?;

    let group: Mutex<Ipv4Addr> = Mutex::new(Ipv4Addr::new(239, 9, 9, 9));
    let stop = AtomicBool::new(false);

    let result = thread::scope(|scope| -> anyhow::Result<ControlResult> {
        let (group, stop) = (&group, &stop);
        let sender = spawn_in(scope, &src, move || -> anyhow::Result<(u64, Duration)> {
            let started = Instant::now();
            let mut frames_sent = 0u64;
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.bind(&SocketAddrV4::new(SENDER, 0).into())?;
            socket.set_multicast_if_v4(&SENDER)?;
            socket.set_multicast_loop_v4(false)?;
            let payload = [0u8; 18];
            while !stop.load(Ordering::Relaxed) {
                let group = *group.lock().map_err(|_| anyhow!("poisoned"))?;
                let _ = socket.send_to(&payload, &SocketAddrV4::new(group, UDP_PORT).into());
                frames_sent += 1;
                let until = Instant::now() + PACE;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            Ok((frames_sent, started.elapsed()))
        })?;
        let measured = (|| -> anyhow::Result<ControlResult> {
            let mut first: Array<_, u64> = Array::try_from(
                stamp.take_map("RX_FIRST_NS").ok_or_else(|| anyhow!("RX_FIRST_NS missing"))?,
            )?;
            let last: Array<_, u64> = Array::try_from(
                stamp.take_map("RX_LAST_NS").ok_or_else(|| anyhow!("RX_LAST_NS missing"))?,
            )?;
            let mut out = ControlResult::default();
            let set_group = |to: Ipv4Addr| -> anyhow::Result<()> {
                *group.lock().map_err(|_| anyhow!("poisoned"))? = to;
                // Let the new group's frames flow (to the stack: unknown group) first.
                thread::sleep(Duration::from_millis(3));
                Ok(())
            };
            let wait_first = |first: &Array<_, u64>, timeout: Duration| -> anyhow::Result<u64> {
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    let t = first.get(&r0, 0)?;
                    if t != 0 {
                        return Ok(t);
                    }
                    thread::sleep(Duration::from_micros(50));
                }
                Ok(0)
            };
            for k in 0..plan.joins {
                let group = Ipv4Addr::new(239, 10, (k >> 8) as u8, k as u8);
                set_group(group)?;
                first.set(r0, 0, 0)?;
                let sent = now_ns();
                send(&socket, &frames::igmp_v2_report(HOST_MAC, HOST, group))?;
                let t = wait_first(&first, Duration::from_secs(2))?;
                if t == 0 {
                    out.join_timeouts += 1;
                    continue;
                }
                out.join_us.push(t.saturating_sub(sent) as f64 / 1e3);
                if k % plan.leave_every == 0 {
                    let sent = now_ns();
                    send(&socket, &frames::igmp_v2_leave(HOST_MAC, HOST, group))?;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let stopped = loop {
                        thread::sleep(Duration::from_millis(1));
                        let t = last.get(&r0, 0)?;
                        if now_ns().saturating_sub(t) > QUIET.as_nanos() as u64 {
                            break Some(t);
                        }
                        if Instant::now() >= deadline {
                            break None;
                        }
                    };
                    match stopped {
                        Some(t) => out.leave_us.push(t.saturating_sub(sent) as f64 / 1e3),
                        None => out.leave_timeouts += 1,
                    }
                }
            }
            // Reports per second: a burst of reports for new groups, then the last one's data.
            let burst: Vec<Ipv4Addr> = (0..plan.burst_reports)
                .map(|i| Ipv4Addr::new(239, 20, (i >> 8) as u8, i as u8))
                .collect();
            let last_group = *burst.last().ok_or_else(|| anyhow!("no burst"))?;
            set_group(last_group)?;
            first.set(r0, 0, 0)?;
            let reports: Vec<Vec<u8>> =
                burst.iter().map(|g| frames::igmp_v2_report(HOST_MAC, HOST, *g)).collect();
            let sent = now_ns();
            // In chunks: a veth ring holds 256 frames; the pauses keep it from overflowing.
            for chunk in reports.chunks(32) {
                for report in chunk {
                    send(&socket, report)?;
                }
                thread::sleep(Duration::from_micros(200));
            }
            let t = wait_first(&first, Duration::from_secs(60))?;
            out.burst_reports = burst.len();
            if t != 0 {
                out.burst_s = t.saturating_sub(sent) as f64 / 1e9;
            }
            let count = || -> anyhow::Result<usize> {
                let doc = mcrelay_tests::daemon::mcrelay_json_with(
                    plan.mcrelay,
                    &mid,
                    &["groups", "--json"],
                )?;
                Ok(doc["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| g["group"].as_str().is_some_and(|s| s.starts_with("239.20.")))
                    .count())
            };
            let (mut installed, mut at, mut changed) = (0, now_ns(), Instant::now());
            while installed < burst.len() && changed.elapsed() < Duration::from_secs(1) {
                let n = count()?;
                if n > installed {
                    (installed, at, changed) = (n, now_ns(), Instant::now());
                }
                thread::sleep(Duration::from_millis(50));
            }
            out.burst_installed = installed;
            out.burst_installed_s = at.saturating_sub(sent) as f64 / 1e9;
            Ok(out)
        })();
        stop.store(true, Ordering::Relaxed);
        let (frames_sent, elapsed) =
            sender.join().map_err(|_| anyhow!("the paced generator panicked"))??;
        let mut measured = measured?;
        if frames_sent > 0 {
            measured.frame_gap_us = elapsed.as_secs_f64() * 1e6 / frames_sent as f64;
        }
        Ok(measured)
    })?;
    daemon.stop();
    drop(stamp);
    if result.join_us.is_empty() {
        bail!("no join was forwarded ({} timeouts)", result.join_timeouts);
    }
    Ok(result)
}

/// The control-plane lines of the report.
pub fn table(c: &ControlResult, startup_groups_per_s: Option<f64>) -> String {
    let mut out = String::from(
        "Control plane (mcrelay run -i in0 -i out0 --fast-leave out0, IGMPv2 from r0)\n",
    );
    out.push_str(&format!(
        "  join-to-forward  median {:.0} us, p99 {:.0} us over {} joins ({} timed out)\n",
        median(&c.join_us),
        quantile(&c.join_us, 0.99),
        c.join_us.len(),
        c.join_timeouts
    ));
    out.push_str(&format!(
        "  leave-to-stop    median {:.0} us, p99 {:.0} us over {} leaves ({} timed out)\n",
        median(&c.leave_us),
        quantile(&c.leave_us, 0.99),
        c.leave_us.len(),
        c.leave_timeouts
    ));
    out.push_str(&format!(
        "  reports          {:.0} reports/s processed ({} of {} reports sent in 32s every 200 us installed within {:.3} s; the last one's data forwarded after {:.3} s)\n",
        c.reports_per_s(),
        c.burst_installed,
        c.burst_reports,
        c.burst_installed_s,
        c.burst_s,
    ));
    out.push_str(&format!(
        "  (latency resolution: one generated frame every {:.1} us on average)\n",
        c.frame_gap_us
    ));
    if let Some(rate) = startup_groups_per_s {
        out.push_str(&format!("  start-up         {rate:.0} static groups written/s\n"));
    }
    out.push('\n');
    out
}

pub fn json(c: &ControlResult, startup_groups_per_s: Option<f64>) -> Value {
    json!({
        "kind": "control",
        "join_to_forward_us_median": median(&c.join_us),
        "join_to_forward_us_p99": quantile(&c.join_us, 0.99),
        "join_to_forward_us": c.join_us,
        "join_timeouts": c.join_timeouts,
        "leave_to_stop_us_median": median(&c.leave_us),
        "leave_to_stop_us_p99": quantile(&c.leave_us, 0.99),
        "leave_to_stop_us": c.leave_us,
        "leave_timeouts": c.leave_timeouts,
        "burst_reports": c.burst_reports,
        "burst_s": c.burst_s,
        "burst_installed": c.burst_installed,
        "burst_installed_s": c.burst_installed_s,
        "frame_gap_us": c.frame_gap_us,
        "reports_per_s": c.reports_per_s(),
        "startup_groups_written_per_s": startup_groups_per_s,
    })
}
