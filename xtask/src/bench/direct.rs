//! Direct mode: the XDP program the real daemon attached to its ingress port, driven in place.
//!
//! `bench_direct` runs through BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (batch 64) and
//! `xdp_md.ingress_ifindex` = `in0` in the middle namespace: each frame gets the generator's
//! header back and is handed by tail call to the target, which redirects it for real (devmap
//! broadcast to the member veths, whose peers run `bench_count`). The target is the program
//! `mcrelay run` attached to `in0` (opened by id) or `bench_bare` with the same port set. Mpps
//! is frames / wall time of the syscall, which also holds the copies, the veth transmit and the
//! receivers' NAPI (all on the calling CPU). The tail call and the header copy are common to
//! both targets; `bare (plain)` (bench_bare run without the wrapper) shows what they cost.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command, thread};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf,
};
use mcrelay_tests::{
    serde_json::{json, Value},
    Mcrelay, NetNs,
};

use super::{
    boxes,
    cost::{median, xdp_prog_id},
    frames,
    testbed::{load_object, load_xdp, spawn_in, xdp_md, Testbed, GROUP, SENDER, UDP_PORT},
};

/// Frames per XDP_PROG_TEST_RUN batch (the kernel's page pool and redirect flush unit).
pub const BATCH: u32 = 64;

/// What the bench's wrapper (`bench_direct`, `bench_tc_direct`) hands the packets to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// mcrelay's program, as `mcrelay run` attached it to the ingress port.
    Mcrelay,
    /// The bare reference (`bench_bare`, `bench_tc_bare`) behind the same wrapper.
    Bare,
    /// The bare reference run directly (no wrapper): for XDP, the reference speed of
    /// PLATFORM.md.
    BarePlain,
}

impl Target {
    pub const ALL: [Self; 3] = [Self::Mcrelay, Self::Bare, Self::BarePlain];

    pub fn name(self) -> &'static str {
        match self {
            Self::Mcrelay => "mcrelay",
            Self::Bare => "bare",
            Self::BarePlain => "bare (plain)",
        }
    }
}

/// One direct-mode measurement.
#[derive(Clone, Debug)]
pub struct DirectRun {
    pub repetition: usize,
    pub target: Target,
    pub frame_bytes: usize,
    pub copies: usize,
    /// Frames run / wall time of the syscall, Mpps.
    pub mpps: f64,
    /// Frames counted on each member receiver / frames run (1.0: every frame delivered).
    pub delivered: Vec<f64>,
}

/// What to run.
pub struct DirectPlan<'a> {
    pub mcrelay: &'a Path,
    pub object: &'a Path,
    pub repetitions: usize,
    pub frame_sizes: &'a [usize],
    pub copies: &'a [usize],
    /// Frames per measured call.
    pub repeat: u32,
}

/// The wrapper (`bench_direct`) and the bare reference, loaded once.
struct Driver {
    ebpf: Ebpf,
    bare: Ebpf,
}

pub fn measure(testbed: &Testbed, plan: &DirectPlan<'_>) -> anyhow::Result<Vec<DirectRun>> {
    let mut ebpf = load_object(plan.object)?;
    load_xdp(&mut ebpf, "bench_direct")?;
    let mut bare = load_object(plan.object)?;
    load_xdp(&mut bare, "bench_bare")?;
    let mut driver = Driver { ebpf, bare };
    let ingress = testbed.mid.ifindex("in0");
    let mut runs = Vec::new();
    let total = plan.repetitions * plan.frame_sizes.len() * plan.copies.len() * Target::ALL.len();
    for repetition in 0..plan.repetitions {
        for &copies in plan.copies {
            let outs = testbed.out_ifindexes(copies);
            // One daemon per fan-out, both frame sizes through it.
            let mut daemon = start_daemon(testbed, plan.mcrelay, copies)?;
            let daemon_prog = open_attached(&testbed.mid, "in0")?;
            let inner = thread::scope(|scope| {
                spawn_in(scope, &testbed.mid, || boxes::bare_group(&mut driver.bare, &outs))?
                    .join()
                    .map_err(|_| anyhow!("filling the bare port set panicked"))?
            })?;
            for &frame_bytes in plan.frame_sizes {
                let frame = frames::udp4(
                    frames::group_mac(GROUP),
                    testbed.sender_mac,
                    SENDER,
                    GROUP,
                    UDP_PORT,
                    frame_bytes,
                );
                let mut order = Target::ALL.to_vec();
                order.rotate_left(repetition % Target::ALL.len());
                for target in order {
                    let (mpps, delivered) = run_target(
                        testbed,
                        &mut driver,
                        &daemon_prog,
                        target,
                        &frame,
                        ingress,
                        plan,
                    )
                    .with_context(|| format!("direct mode, {}", target.name()))?;
                    let delivered: Vec<f64> = delivered[..copies].to_vec();
                    println!(
                        "[bench] direct {:>3}/{total} rep {} {:>4} B copies {} {:<12} {:>7.3} Mpps (delivered per member {})",
                        runs.len() + 1,
                        repetition + 1,
                        frame_bytes,
                        copies,
                        target.name(),
                        mpps,
                        delivered.iter().map(|d| format!("{d:.2}")).collect::<Vec<_>>().join("/"),
                    );
                    runs.push(DirectRun {
                        repetition,
                        target,
                        frame_bytes,
                        copies,
                        mpps,
                        delivered,
                    });
                }
            }
            drop(inner);
            drop(daemon_prog);
            daemon.stop();
        }
    }
    Ok(runs)
}

fn start_daemon(tb: &Testbed, mcrelay: &Path, copies: usize) -> anyhow::Result<Mcrelay> {
    let outs: Vec<String> = (0..copies).map(|i| format!("out{i}")).collect();
    let mut args: Vec<String> =
        ["run", "--no-pin", "--xdp-mode", "native", "-i", "in0"].map(String::from).to_vec();
    for out in &outs {
        args.extend(["-i".to_owned(), out.clone()]);
    }
    args.extend(["--static".to_owned(), format!("{GROUP}@{}", outs.join(","))]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Mcrelay::start_with(mcrelay, &tb.mid, &args, true);
    daemon.wait_ready();
    Ok(daemon)
}

/// Opens the XDP program attached to `iface` in `ns` (pinned for a moment with bpftool).
pub fn open_attached(ns: &NetNs, iface: &str) -> anyhow::Result<Xdp> {
    let prog_id = xdp_prog_id(ns, iface)?;
    let pin =
        Path::new("/sys/fs/bpf").join(format!("mcrbench-{}-{iface}-{prog_id}", std::process::id()));
    let _ = fs::remove_file(&pin);
    let status = Command::new("bpftool")
        .args(["prog", "pin", "id", &prog_id.to_string()])
        .arg(&pin)
        .status()
        .context("bpftool prog pin")?;
    if !status.success() {
        bail!("bpftool prog pin id {prog_id} failed ({status})");
    }
    let opened = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface);
    let _ = fs::remove_file(&pin);
    opened.context("opening the daemon's program")
}

/// One warm-up call and one measured call; Mpps and the fraction delivered per receiver.
fn run_target(
    tb: &Testbed,
    driver: &mut Driver,
    daemon_prog: &Xdp,
    target: Target,
    frame: &[u8],
    ingress: u32,
    plan: &DirectPlan<'_>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut header = [0u8; frames::HEADER_LEN];
    header.copy_from_slice(&frame[..frames::HEADER_LEN]);
    let mut template: Array<_, [u8; frames::HEADER_LEN]> = Array::try_from(
        driver.ebpf.map_mut("GEN_HEADER").ok_or_else(|| anyhow!("GEN_HEADER missing"))?,
    )?;
    template.set(0, header, 0)?;
    let target_fd = match target {
        Target::Mcrelay => Some(daemon_prog.fd()?.try_clone()?),
        Target::Bare => Some(program_of(&mut driver.bare, "bench_bare")?.fd()?.try_clone()?),
        Target::BarePlain => None,
    };
    if let Some(fd) = &target_fd {
        let mut slots = ProgramArray::try_from(
            driver.ebpf.map_mut("DIRECT_TARGET").ok_or_else(|| anyhow!("DIRECT_TARGET missing"))?,
        )?;
        slots.set(0, fd, 0).context("DIRECT_TARGET[0] (tail call target)")?;
    }
    let program: &mut Xdp = match target {
        Target::BarePlain => program_of(&mut driver.bare, "bench_bare")?,
        _ => program_of(&mut driver.ebpf, "bench_direct")?,
    };
    let ctx = xdp_md(frame.len(), ingress);
    let call = |repeat: u32| -> anyhow::Result<f64> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(BATCH);
        let started = std::time::Instant::now();
        program.test_run(opts).context("BPF_PROG_TEST_RUN with live frames")?;
        Ok(started.elapsed().as_secs_f64())
    };
    let (secs, before, after) = thread::scope(|scope| {
        spawn_in(scope, &tb.mid, || -> anyhow::Result<_> {
            call((plan.repeat / 10).max(BATCH))?;
            let before = tb.received()?;
            let secs = call(plan.repeat)?;
            // The receivers' NAPI runs when the syscall re-enables bottom halves: done by now.
            let after = tb.received()?;
            Ok((secs, before, after))
        })?
        .join()
        .map_err(|_| anyhow!("the direct run panicked"))?
    })?;
    let delivered = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / f64::from(plan.repeat))
        .collect();
    Ok((f64::from(plan.repeat) / secs / 1e6, delivered))
}

fn program_of<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf.program_mut(name).ok_or_else(|| anyhow!("{name} missing"))?.try_into()?)
}

/// mcrelay / bare per repetition, by (frame size, copies).
pub fn ratios(runs: &[DirectRun], peer: Target) -> BTreeMap<(usize, usize), Vec<f64>> {
    let mut by_key: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for m in runs.iter().filter(|r| r.target == Target::Mcrelay) {
        let peer_run = runs.iter().find(|r| {
            r.target == peer
                && r.repetition == m.repetition
                && r.frame_bytes == m.frame_bytes
                && r.copies == m.copies
        });
        if let Some(p) = peer_run.filter(|p| p.mpps > 0.0) {
            by_key.entry((m.frame_bytes, m.copies)).or_default().push(m.mpps / p.mpps);
        }
    }
    by_key
}

fn mpps_of(runs: &[DirectRun], target: Target, size: usize, copies: usize) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.target == target && r.frame_bytes == size && r.copies == copies)
        .map(|r| r.mpps)
        .collect()
}

pub(super) fn sorted_unique(values: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The header line of a table with one column per number of copies.
pub(super) fn copies_header(out: &mut String, copies: &[usize]) {
    let _ = write!(out, "{:<13}", "program");
    for c in copies {
        let _ = write!(out, " {:>18}", format!("{c} cop{}", if *c == 1 { "y" } else { "ies" }));
    }
    out.push('\n');
}

/// The direct-mode tables (one per frame size).
pub fn table(runs: &[DirectRun]) -> String {
    let mut out = String::new();
    if runs.is_empty() {
        return out;
    }
    let sizes = sorted_unique(runs.iter().map(|r| r.frame_bytes));
    let copies = sorted_unique(runs.iter().map(|r| r.copies));
    let reps = runs.iter().map(|r| r.repetition).max().unwrap_or(0) + 1;
    let to_bare = ratios(runs, Target::Bare);
    let to_plain = ratios(runs, Target::BarePlain);
    for size in sizes {
        let _ = writeln!(
            out,
            "Direct mode, {size}-byte frames: Mpps through the ingress program (live frames, batch {BATCH}), median of {reps} [mcrelay / row, median of per-repetition ratios]"
        );
        copies_header(&mut out, &copies);
        for target in Target::ALL {
            let _ = write!(out, "{:<13}", target.name());
            for &c in &copies {
                let m = median(&mpps_of(runs, target, size, c));
                let cell = match target {
                    Target::Mcrelay => format!("{m:.3}"),
                    Target::Bare => format!(
                        "{m:.3} [{:.2}x]",
                        median(to_bare.get(&(size, c)).map_or(&[][..], Vec::as_slice))
                    ),
                    Target::BarePlain => format!(
                        "{m:.3} [{:.2}x]",
                        median(to_plain.get(&(size, c)).map_or(&[][..], Vec::as_slice))
                    ),
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
                "  (fewer than 99% of frames reached a member in: {})",
                short.join(", ")
            );
        }
        out.push('\n');
    }
    out
}

/// Target lines: mcrelay >= 0.9x bare (same wrapper) per frame size.
pub fn targets(runs: &[DirectRun]) -> Vec<String> {
    let to_bare = ratios(runs, Target::Bare);
    let mut lines = Vec::new();
    for size in sorted_unique(runs.iter().map(|r| r.frame_bytes)) {
        let shown: Vec<(usize, f64)> = to_bare
            .iter()
            .filter(|((s, _), _)| *s == size)
            .map(|((_, c), r)| (*c, median(r)))
            .collect();
        let ok = shown.iter().all(|&(_, r)| r >= 0.9);
        let text: Vec<String> = shown.iter().map(|(c, r)| format!("{c}:{r:.2}")).collect();
        lines.push(format!(
            "direct >= 0.9x bare {size:>4} B, mcrelay/bare by copies {}: {}",
            text.join(" "),
            if ok { "MET" } else { "NOT MET" }
        ));
    }
    lines
}

pub fn json(runs: &[DirectRun]) -> Value {
    let to_bare = ratios(runs, Target::Bare);
    let mut records = Vec::new();
    for size in sorted_unique(runs.iter().map(|r| r.frame_bytes)) {
        for c in sorted_unique(runs.iter().map(|r| r.copies)) {
            for target in Target::ALL {
                let mpps = mpps_of(runs, target, size, c);
                if mpps.is_empty() {
                    continue;
                }
                let delivered: Vec<&Vec<f64>> = runs
                    .iter()
                    .filter(|r| r.target == target && r.frame_bytes == size && r.copies == c)
                    .map(|r| &r.delivered)
                    .collect();
                records.push(json!({
                    "kind": "direct",
                    "program": target.name(),
                    "frame_bytes": size,
                    "copies": c,
                    "mpps_median": median(&mpps),
                    "mpps_runs": mpps,
                    "delivered_runs": delivered,
                    "mcrelay_over_bare_runs": (target == Target::Bare).then(|| to_bare.get(&(size, c)).cloned()),
                }));
            }
        }
    }
    Value::Array(records)
}
