//! TC rows (issue 13 item 3): mcrelay's TC program (`mcrelay_tc`, attached by the real daemon to
//! a port in TC mode) against a bare TC `bpf_clone_redirect` reference, driven in place.
//!
//! The ingress port is a bridge `tcin0` in the middle namespace (no `ndo_xdp_xmit`: the daemon
//! attaches it in TC mode), the members are `out0..` as in direct mode (XDP ports; their peers
//! count). `bench_direct_tc` runs through BPF_PROG_TEST_RUN on an skb (repeat, `__sk_buff.ifindex`
//! = `tcin0`): it restores the source MAC of the packet (the test run reuses one skb, and
//! mcrelay writes its relay MAC into it) and tail-calls the target, `mcrelay_tc` (opened by id
//! from the daemon's descriptors) or `bench_bare_tc` (IPv4 destination -> array of ifindexes,
//! `bpf_clone_redirect` to each). The clones are transmitted for real (veth to the counting
//! peers). Mpps = packets / wall time of the syscall.

use std::{fmt::Write as _, fs, path::Path, process::Command, thread};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, HashMap, ProgramArray},
    programs::{loaded_programs, SchedClassifier, TestRun as _, TestRunOptions},
    Ebpf,
};
use mcrelay_tests::{Mcrelay, NetNs};

use super::{
    cost::median,
    frames,
    testbed::{load_object, spawn_in, Testbed, GROUP, SENDER, UDP_PORT},
};

/// The TC-mode ingress port (a bridge: TC mode).
const TC_IN: &str = "tcin0";
/// Ports of a `BARE_TC_GROUPS` entry (relay-ebpf's bench.rs).
const BARE_TC_PORTS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcTarget {
    Mcrelay,
    Bare,
}

impl TcTarget {
    pub const ALL: [Self; 2] = [Self::Mcrelay, Self::Bare];

    pub fn name(self) -> &'static str {
        match self {
            Self::Mcrelay => "mcrelay_tc",
            Self::Bare => "bare tc",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TcRun {
    pub repetition: usize,
    pub target: TcTarget,
    pub frame_bytes: usize,
    pub copies: usize,
    pub mpps: f64,
    pub delivered: Vec<f64>,
}

pub struct TcPlan<'a> {
    pub mcrelay: &'a Path,
    pub object: &'a Path,
    pub repetitions: usize,
    pub frame_sizes: &'a [usize],
    pub copies: &'a [usize],
    pub repeat: u32,
}

/// Deletes the bridge on drop.
struct Bridge<'a>(&'a NetNs);

impl Drop for Bridge<'_> {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["-n", self.0.name(), "link", "del", TC_IN]).status();
    }
}

pub fn measure(testbed: &Testbed, plan: &TcPlan<'_>) -> anyhow::Result<Vec<TcRun>> {
    let mid = &testbed.mid;
    mid.ip(&["link", "add", TC_IN, "type", "bridge"]);
    let _bridge = Bridge(mid);
    mid.ip(&["link", "set", TC_IN, "up"]);
    let ingress = mid.ifindex(TC_IN);
    let mut ebpf = load_object(plan.object)?;
    for name in ["bench_direct_tc", "bench_bare_tc"] {
        classifier(&mut ebpf, name)?
            .load()
            .with_context(|| format!("the kernel rejected {name}"))?;
    }
    let mut runs = Vec::new();
    let total = plan.repetitions * plan.frame_sizes.len() * plan.copies.len() * TcTarget::ALL.len();
    for repetition in 0..plan.repetitions {
        for &copies in plan.copies {
            let outs = testbed.out_ifindexes(copies);
            if outs.len() > BARE_TC_PORTS {
                bail!("at most {BARE_TC_PORTS} copies in the TC rows");
            }
            let mut entry = [0u32; BARE_TC_PORTS + 1];
            entry[0] = outs.len() as u32;
            entry[1..=outs.len()].copy_from_slice(&outs);
            let mut groups: HashMap<_, u32, [u32; BARE_TC_PORTS + 1]> = HashMap::try_from(
                ebpf.map_mut("BARE_TC_GROUPS").ok_or_else(|| anyhow!("BARE_TC_GROUPS missing"))?,
            )?;
            groups.insert(u32::from_ne_bytes(GROUP.octets()), entry, 0)?;
            let mut daemon = start_daemon(mid, plan.mcrelay, copies)?;
            let daemon_prog = open_daemon_program(daemon.pid(), "mcrelay_tc")
                .context("opening the daemon's mcrelay_tc")?;
            for &frame_bytes in plan.frame_sizes {
                let frame = frames::udp4(
                    frames::group_mac(GROUP),
                    testbed.sender_mac,
                    SENDER,
                    GROUP,
                    UDP_PORT,
                    frame_bytes,
                );
                let mut order = TcTarget::ALL.to_vec();
                order.rotate_left(repetition % TcTarget::ALL.len());
                for target in order {
                    let (mpps, delivered) =
                        run_target(testbed, &mut ebpf, &daemon_prog, target, &frame, ingress, plan)
                            .with_context(|| format!("TC rows, {}", target.name()))?;
                    let delivered: Vec<f64> = delivered[..copies].to_vec();
                    println!(
                        "[bench] tc {:>3}/{total} rep {} {:>4} B copies {} {:<12} {:>7.3} Mpps (delivered per member {})",
                        runs.len() + 1,
                        repetition + 1,
                        frame_bytes,
                        copies,
                        target.name(),
                        mpps,
                        delivered.iter().map(|d| format!("{d:.2}")).collect::<Vec<_>>().join("/"),
                    );
                    runs.push(TcRun { repetition, target, frame_bytes, copies, mpps, delivered });
                }
            }
            drop(daemon_prog);
            daemon.stop();
        }
    }
    Ok(runs)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    Ok(ebpf.program_mut(name).ok_or_else(|| anyhow!("{name} missing"))?.try_into()?)
}

fn start_daemon(mid: &NetNs, mcrelay: &Path, copies: usize) -> anyhow::Result<Mcrelay> {
    let outs: Vec<String> = (0..copies).map(|i| format!("out{i}")).collect();
    let mut args: Vec<String> = ["run", "--no-pin", "-i", TC_IN].map(String::from).to_vec();
    for out in &outs {
        args.extend(["-i".to_owned(), out.clone()]);
    }
    args.extend(["--static".to_owned(), format!("{GROUP}@{}", outs.join(","))]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Mcrelay::start_with(mcrelay, mid, &args, true);
    daemon.wait_ready();
    Ok(daemon)
}

/// The program `name` the process `pid` holds a descriptor of (pinned for a moment with
/// bpftool, then opened).
fn open_daemon_program(pid: u32, name: &str) -> anyhow::Result<SchedClassifier> {
    let mut held = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else { continue };
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            held.push(id);
        }
    }
    let id = loaded_programs()
        .flatten()
        .find(|p| held.contains(&p.id()) && p.name_as_str() == Some(name))
        .map(|p| p.id())
        .ok_or_else(|| anyhow!("process {pid} holds no program {name}"))?;
    let pin = Path::new("/sys/fs/bpf").join(format!("mcrbench-{}-{name}-{id}", std::process::id()));
    let _ = fs::remove_file(&pin);
    let status = Command::new("bpftool")
        .args(["prog", "pin", "id", &id.to_string()])
        .arg(&pin)
        .status()
        .context("bpftool prog pin")?;
    if !status.success() {
        bail!("bpftool prog pin id {id} failed ({status})");
    }
    let opened = SchedClassifier::from_pin(&pin);
    let _ = fs::remove_file(&pin);
    opened.context("opening the daemon's TC program")
}

/// `struct __sk_buff` up to `ifindex` (the rest zero): the device the test run's skb comes
/// from.
fn sk_buff(ifindex: u32) -> Vec<u8> {
    let mut ctx = [0u32; 11];
    ctx[10] = ifindex;
    ctx.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

fn run_target(
    tb: &Testbed,
    ebpf: &mut Ebpf,
    daemon_prog: &SchedClassifier,
    target: TcTarget,
    frame: &[u8],
    ingress: u32,
    plan: &TcPlan<'_>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut header = [0u8; frames::HEADER_LEN];
    header.copy_from_slice(&frame[..frames::HEADER_LEN]);
    let mut template: Array<_, [u8; frames::HEADER_LEN]> =
        Array::try_from(ebpf.map_mut("GEN_HEADER").ok_or_else(|| anyhow!("GEN_HEADER missing"))?)?;
    template.set(0, header, 0)?;
    let target_fd = match target {
        TcTarget::Mcrelay => daemon_prog.fd()?.try_clone()?,
        TcTarget::Bare => classifier(ebpf, "bench_bare_tc")?.fd()?.try_clone()?,
    };
    let mut slots = ProgramArray::try_from(
        ebpf.map_mut("DIRECT_TC_TARGET").ok_or_else(|| anyhow!("DIRECT_TC_TARGET missing"))?,
    )?;
    slots.set(0, &target_fd, 0).context("DIRECT_TC_TARGET[0] (tail call target)")?;
    let program = classifier(ebpf, "bench_direct_tc")?;
    let ctx = sk_buff(ingress);
    let call = |repeat: u32| -> anyhow::Result<f64> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let started = std::time::Instant::now();
        program.test_run(opts).context("BPF_PROG_TEST_RUN on an skb")?;
        Ok(started.elapsed().as_secs_f64())
    };
    let (secs, before, after) = thread::scope(|scope| {
        spawn_in(scope, &tb.mid, || -> anyhow::Result<_> {
            call((plan.repeat / 10).max(64))?;
            let before = tb.received()?;
            let secs = call(plan.repeat)?;
            // Give the receivers' NAPI a moment (veth rings are drained asynchronously).
            thread::sleep(std::time::Duration::from_millis(100));
            let after = tb.received()?;
            Ok((secs, before, after))
        })?
        .join()
        .map_err(|_| anyhow!("the TC run panicked"))?
    })?;
    let delivered = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / f64::from(plan.repeat))
        .collect();
    Ok((f64::from(plan.repeat) / secs / 1e6, delivered))
}

/// The TC table (one per frame size): Mpps and mcrelay_tc / bare tc, median of per-repetition
/// ratios.
pub fn table(runs: &[TcRun]) -> String {
    let mut out = String::new();
    if runs.is_empty() {
        return out;
    }
    let mut sizes: Vec<usize> = runs.iter().map(|r| r.frame_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut copies: Vec<usize> = runs.iter().map(|r| r.copies).collect();
    copies.sort_unstable();
    copies.dedup();
    let reps = runs.iter().map(|r| r.repetition).max().unwrap_or(0) + 1;
    for size in sizes {
        let _ = writeln!(
            out,
            "TC rows, {size}-byte packets: Mpps through the TC ingress program (BPF_PROG_TEST_RUN on an skb), median of {reps} [mcrelay_tc / row, median of per-repetition ratios]"
        );
        let _ = write!(out, "{:<13}", "program");
        for c in &copies {
            let _ = write!(out, " {:>18}", format!("{c} cop{}", if *c == 1 { "y" } else { "ies" }));
        }
        out.push('\n');
        for target in TcTarget::ALL {
            let _ = write!(out, "{:<13}", target.name());
            for &c in &copies {
                let of = |t: TcTarget| -> Vec<&TcRun> {
                    runs.iter()
                        .filter(|r| r.target == t && r.frame_bytes == size && r.copies == c)
                        .collect()
                };
                let m = median(&of(target).iter().map(|r| r.mpps).collect::<Vec<_>>());
                let cell = if target == TcTarget::Mcrelay {
                    format!("{m:.3}")
                } else {
                    let ratios: Vec<f64> = of(TcTarget::Mcrelay)
                        .iter()
                        .filter_map(|mc| {
                            of(target)
                                .iter()
                                .find(|b| b.repetition == mc.repetition && b.mpps > 0.0)
                                .map(|b| mc.mpps / b.mpps)
                        })
                        .collect();
                    format!("{m:.3} [{:.2}x]", median(&ratios))
                };
                let _ = write!(out, " {cell:>18}");
            }
            out.push('\n');
        }
        let short: Vec<String> = runs
            .iter()
            .filter(|r| r.frame_bytes == size && r.delivered.iter().any(|d| *d < 0.99))
            .map(|r| format!("{} x{} rep {}", r.target.name(), r.copies, r.repetition + 1))
            .collect();
        if !short.is_empty() {
            let _ = writeln!(
                out,
                "  (fewer than 99% of packets reached a member in: {})",
                short.join(", ")
            );
        }
        out.push('\n');
    }
    out
}
