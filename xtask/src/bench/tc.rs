//! TC rows: mcrelay's TC program (`mcrelay_tc`) against the least a TC fan-out does.
//!
//! The daemon runs in the middle namespace with `tcin` (a Linux bridge without members: no
//! `ndo_xdp_xmit`, so the port gets TC mode and `mcrelay_tc` on its tcx ingress) and the
//! member veths `out0..`, `--static 239.1.1.1@out0,..` (bridged copies: the TTL is kept, so one
//! skb can be run again and again). `bench_tc_direct` runs through BPF_PROG_TEST_RUN on an skb
//! whose `__sk_buff.ifindex` is `tcin` (the kernel gives the skb that device): it restores the
//! source MAC and tail-calls the target, whose `bpf_clone_redirect` copies really leave through
//! the member veths (their peers run `bench_count`). Targets: the program the daemon attached to
//! `tcin` (opened by id), `bench_tc_bare` (clone-redirect to each target ifindex, drop) behind
//! the same wrapper, and `bench_tc_bare` alone ("bare (plain)"). The figure is the kernel's
//! duration per run (the copies, the veth transmit and, when softirqs run as bottom halves are
//! re-enabled after each run, the receivers' NAPI); unlike the wall time of the syscall it
//! leaves out time the CPU spent elsewhere when the test loop rescheduled (a shared machine).
//! The wall-time Mpps is kept in the JSON records.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command, thread};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, ProgramArray},
    programs::{SchedClassifier, TcAttachType, TestRun as _, TestRunOptions},
    Ebpf,
};
use mcrelay_tests::{
    serde_json::{json, Value},
    Mcrelay, NetNs,
};

// The same three targets as direct mode: mcrelay's program as the daemon attached it, the
// bare reference behind the same wrapper, and the bare reference alone.
pub use super::direct::Target;
use super::{
    cost::median,
    direct::{copies_header, sorted_unique},
    frames,
    testbed::{load_object, spawn_in, Testbed, GROUP, SENDER, UDP_PORT},
};

/// The port in TC mode (a bridge without members).
pub const TC_PORT: &str = "tcin";

/// One TC measurement.
#[derive(Clone, Debug)]
pub struct TcRun {
    pub repetition: usize,
    pub target: Target,
    pub frame_bytes: usize,
    pub copies: usize,
    /// The kernel's average per run (BPF_PROG_TEST_RUN duration), ns.
    pub kernel_ns: f64,
    /// Runs / wall time of the syscall, Mpps.
    pub wall_mpps: f64,
    /// Frames counted on each member receiver / runs (1.0: every run delivered a copy).
    pub delivered: Vec<f64>,
}

/// What to run.
pub struct TcPlan<'a> {
    pub mcrelay: &'a Path,
    pub object: &'a Path,
    pub repetitions: usize,
    pub frame_sizes: &'a [usize],
    pub copies: &'a [usize],
    /// Runs per measured call.
    pub repeat: u32,
}

/// `tcin` in the middle namespace; deleted on drop.
struct TcPortGuard<'a> {
    ns: &'a NetNs,
}

impl<'a> TcPortGuard<'a> {
    fn new(ns: &'a NetNs) -> Self {
        ns.ip(&["link", "add", TC_PORT, "type", "bridge", "stp_state", "0"]);
        ns.add_addr(TC_PORT, "198.18.200.1/24");
        ns.link_up(TC_PORT);
        Self { ns }
    }
}

impl Drop for TcPortGuard<'_> {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", self.ns.name(), "link", "del", TC_PORT])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

pub fn measure(testbed: &Testbed, plan: &TcPlan<'_>) -> anyhow::Result<Vec<TcRun>> {
    let _port = TcPortGuard::new(&testbed.mid);
    let ingress = testbed.mid.ifindex(TC_PORT);
    let mut driver = load_object(plan.object)?;
    for name in ["bench_tc_direct", "bench_tc_bare"] {
        classifier(&mut driver, name)?
            .load()
            .with_context(|| format!("the kernel rejected {name}"))?;
    }
    let mut runs = Vec::new();
    let total = plan.repetitions * plan.frame_sizes.len() * plan.copies.len() * Target::ALL.len();
    for repetition in 0..plan.repetitions {
        for &copies in plan.copies {
            let outs = testbed.out_ifindexes(copies);
            let mut daemon = start_daemon(testbed, plan.mcrelay, copies)?;
            let daemon_prog = open_attached_tc(&testbed.mid, TC_PORT)?;
            let mut targets: Array<_, u32> = Array::try_from(
                driver
                    .map_mut("TC_BARE_TARGETS")
                    .ok_or_else(|| anyhow!("TC_BARE_TARGETS missing"))?,
            )?;
            targets.set(0, copies as u32, 0)?;
            for (i, &ifindex) in outs.iter().enumerate() {
                targets.set(i as u32 + 1, ifindex, 0)?;
            }
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
                    let (wall_mpps, kernel_ns, delivered) = run_target(
                        testbed,
                        &mut driver,
                        &daemon_prog,
                        target,
                        &frame,
                        ingress,
                        plan,
                    )
                    .with_context(|| format!("TC rows, {}", target.name()))?;
                    let delivered: Vec<f64> = delivered[..copies].to_vec();
                    println!(
                        "[bench] tc {:>3}/{total} rep {} {:>4} B copies {} {:<12} {:>6.0} ns/run in the kernel, {:>6.3} Mpps wall (delivered per member {})",
                        runs.len() + 1,
                        repetition + 1,
                        frame_bytes,
                        copies,
                        target.name(),
                        kernel_ns,
                        wall_mpps,
                        delivered.iter().map(|d| format!("{d:.2}")).collect::<Vec<_>>().join("/"),
                    );
                    runs.push(TcRun {
                        repetition,
                        target,
                        frame_bytes,
                        copies,
                        kernel_ns,
                        wall_mpps,
                        delivered,
                    });
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

fn start_daemon(tb: &Testbed, mcrelay: &Path, copies: usize) -> anyhow::Result<Mcrelay> {
    let outs: Vec<String> = (0..copies).map(|i| format!("out{i}")).collect();
    let mut args: Vec<String> = ["run", "--no-pin", "-i", TC_PORT].map(String::from).to_vec();
    for out in &outs {
        args.extend(["-i".to_owned(), out.clone()]);
    }
    args.extend(["--static".to_owned(), format!("{GROUP}@{}", outs.join(","))]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Mcrelay::start_with(mcrelay, &tb.mid, &args, true);
    daemon.wait_ready();
    Ok(daemon)
}

/// Opens the program on the tcx ingress of `iface` in `ns` (pinned for a moment with bpftool).
fn open_attached_tc(ns: &NetNs, iface: &str) -> anyhow::Result<SchedClassifier> {
    let ids = thread::scope(|scope| {
        spawn_in(scope, ns, || -> anyhow::Result<Vec<u32>> {
            let (_, programs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
                .with_context(|| format!("querying the tcx ingress of {iface}"))?;
            // The whole program (TC mode), not the hand-over copier behind XDP.
            if let Some(other) = programs.iter().find(|p| p.name_as_str() != Some("mcrelay_tc")) {
                bail!("{iface} has {:?} on its tcx ingress, not mcrelay_tc", other.name_as_str());
            }
            Ok(programs.iter().map(|p| p.id()).collect())
        })?
        .join()
        .map_err(|_| anyhow!("querying tcx panicked"))?
    })?;
    let [prog_id] = ids[..] else {
        bail!("expected one program on the tcx ingress of {iface}, found ids {ids:?}");
    };
    let pin = Path::new("/sys/fs/bpf")
        .join(format!("mcrbench-{}-tc-{iface}-{prog_id}", std::process::id()));
    let _ = fs::remove_file(&pin);
    let status = Command::new("bpftool")
        .args(["prog", "pin", "id", &prog_id.to_string()])
        .arg(&pin)
        .status()
        .context("bpftool prog pin")?;
    if !status.success() {
        bail!("bpftool prog pin id {prog_id} failed ({status})");
    }
    let opened = SchedClassifier::from_pin(&pin);
    let _ = fs::remove_file(&pin);
    opened.context("opening the daemon's TC program")
}

/// `struct __sk_buff` up to `ifindex` for BPF_PROG_TEST_RUN: the kernel gives the skb the device
/// `ifindex` (and `skb_iif` = `ingress_ifindex`); every other field given must be zero.
fn sk_buff(ifindex: u32) -> Vec<u8> {
    // len, pkt_type, mark, queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto,
    // priority, ingress_ifindex, ifindex
    [0, 0, 0, 0, 0, 0, 0, 0, 0, ifindex, ifindex]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// One warm-up call and one measured call: Mpps, the kernel's ns per run and the fraction
/// delivered per receiver.
fn run_target(
    tb: &Testbed,
    driver: &mut Ebpf,
    daemon_prog: &SchedClassifier,
    target: Target,
    frame: &[u8],
    ingress: u32,
    plan: &TcPlan<'_>,
) -> anyhow::Result<(f64, f64, Vec<f64>)> {
    let mut header = [0u8; frames::HEADER_LEN];
    header.copy_from_slice(&frame[..frames::HEADER_LEN]);
    let mut template: Array<_, [u8; frames::HEADER_LEN]> = Array::try_from(
        driver.map_mut("GEN_HEADER").ok_or_else(|| anyhow!("GEN_HEADER missing"))?,
    )?;
    template.set(0, header, 0)?;
    let target_fd = match target {
        Target::Mcrelay => Some(daemon_prog.fd()?.try_clone()?),
        Target::Bare => Some(classifier(driver, "bench_tc_bare")?.fd()?.try_clone()?),
        Target::BarePlain => None,
    };
    if let Some(fd) = &target_fd {
        let mut slots = ProgramArray::try_from(
            driver
                .map_mut("TC_DIRECT_TARGET")
                .ok_or_else(|| anyhow!("TC_DIRECT_TARGET missing"))?,
        )?;
        slots.set(0, fd, 0).context("TC_DIRECT_TARGET[0] (tail call target)")?;
    }
    let program: &SchedClassifier = match target {
        Target::BarePlain => classifier(driver, "bench_tc_bare")?,
        _ => classifier(driver, "bench_tc_direct")?,
    };
    let ctx = sk_buff(ingress);
    let call = |repeat: u32| -> anyhow::Result<(f64, f64)> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let started = std::time::Instant::now();
        let result = program.test_run(opts).context("BPF_PROG_TEST_RUN on an skb")?;
        Ok((started.elapsed().as_secs_f64(), result.duration.as_nanos() as f64))
    };
    let (secs, kernel_ns, before, after) = thread::scope(|scope| {
        spawn_in(scope, &tb.mid, || -> anyhow::Result<_> {
            call((plan.repeat / 10).max(1))?;
            let before = tb.received()?;
            let (secs, kernel_ns) = call(plan.repeat)?;
            let after = tb.received()?;
            Ok((secs, kernel_ns, before, after))
        })?
        .join()
        .map_err(|_| anyhow!("the TC run panicked"))?
    })?;
    let delivered = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / f64::from(plan.repeat))
        .collect();
    Ok((f64::from(plan.repeat) / secs / 1e6, kernel_ns, delivered))
}

/// mcrelay / `peer` per repetition (throughput from the kernel's ns per run, so `peer`'s ns over
/// mcrelay's), by (frame size, copies).
pub fn ratios(runs: &[TcRun], peer: Target) -> BTreeMap<(usize, usize), Vec<f64>> {
    per_repetition(runs, peer, |m, p| p.kernel_ns / m.kernel_ns)
}

/// mcrelay's ns per run minus `peer`'s, per repetition, by (frame size, copies).
pub fn extra_ns(runs: &[TcRun], peer: Target) -> BTreeMap<(usize, usize), Vec<f64>> {
    per_repetition(runs, peer, |m, p| m.kernel_ns - p.kernel_ns)
}

fn per_repetition(
    runs: &[TcRun],
    peer: Target,
    value: fn(&TcRun, &TcRun) -> f64,
) -> BTreeMap<(usize, usize), Vec<f64>> {
    let mut by_key: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for m in runs.iter().filter(|r| r.target == Target::Mcrelay && r.kernel_ns > 0.0) {
        let peer_run = runs.iter().find(|r| {
            r.target == peer
                && r.repetition == m.repetition
                && r.frame_bytes == m.frame_bytes
                && r.copies == m.copies
        });
        if let Some(p) = peer_run.filter(|p| p.kernel_ns > 0.0) {
            by_key.entry((m.frame_bytes, m.copies)).or_default().push(value(m, p));
        }
    }
    by_key
}

fn values_of(
    runs: &[TcRun],
    target: Target,
    size: usize,
    copies: usize,
    value: fn(&TcRun) -> f64,
) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.target == target && r.frame_bytes == size && r.copies == copies)
        .map(value)
        .collect()
}

fn median_of(by_key: &BTreeMap<(usize, usize), Vec<f64>>, key: (usize, usize)) -> f64 {
    median(by_key.get(&key).map_or(&[][..], Vec::as_slice))
}

/// The TC tables (one per frame size).
pub fn table(runs: &[TcRun]) -> String {
    let mut out = String::new();
    if runs.is_empty() {
        return out;
    }
    let sizes = sorted_unique(runs.iter().map(|r| r.frame_bytes));
    let copies = sorted_unique(runs.iter().map(|r| r.copies));
    let reps = runs.iter().map(|r| r.repetition).max().unwrap_or(0) + 1;
    let to_bare = ratios(runs, Target::Bare);
    let to_plain = ratios(runs, Target::BarePlain);
    let over_bare = extra_ns(runs, Target::Bare);
    for size in sizes {
        let _ = writeln!(
            out,
            "TC rows, {size}-byte frames: ns per packet through the tcx ingress program (BPF_PROG_TEST_RUN on an skb, kernel time), median of {reps} [mcrelay / row in packets per second, median of per-repetition ratios]"
        );
        copies_header(&mut out, &copies);
        for target in Target::ALL {
            let _ = write!(out, "{:<13}", target.name());
            for &c in &copies {
                let ns = median(&values_of(runs, target, size, c, |r| r.kernel_ns));
                let cell = match target {
                    Target::Mcrelay => format!("{ns:.0}"),
                    Target::Bare => format!("{ns:.0} [{:.2}x]", median_of(&to_bare, (size, c))),
                    Target::BarePlain => {
                        format!("{ns:.0} [{:.2}x]", median_of(&to_plain, (size, c)))
                    }
                };
                let _ = write!(out, " {cell:>18}");
            }
            out.push('\n');
        }
        let _ = write!(out, "{:<13}", "mcrelay-bare");
        for &c in &copies {
            let _ = write!(out, " {:>18}", format!("{:+.0} ns", median_of(&over_bare, (size, c))));
        }
        out.push('\n');
        let short: Vec<String> = runs
            .iter()
            .filter(|r| r.frame_bytes == size && r.delivered.iter().any(|d| *d < 0.99))
            .map(|r| format!("{} x{} rep {}", r.target.name(), r.copies, r.repetition + 1))
            .collect();
        if !short.is_empty() {
            let _ = writeln!(
                out,
                "  (fewer than 99% of runs reached a member in: {})",
                short.join(", ")
            );
        }
        out.push('\n');
    }
    out
}

pub fn json(runs: &[TcRun]) -> Value {
    let to_bare = ratios(runs, Target::Bare);
    let to_plain = ratios(runs, Target::BarePlain);
    let mut records = Vec::new();
    for size in sorted_unique(runs.iter().map(|r| r.frame_bytes)) {
        for c in sorted_unique(runs.iter().map(|r| r.copies)) {
            for target in Target::ALL {
                let kernel_ns = values_of(runs, target, size, c, |r| r.kernel_ns);
                if kernel_ns.is_empty() {
                    continue;
                }
                let wall_mpps = values_of(runs, target, size, c, |r| r.wall_mpps);
                let delivered: Vec<&Vec<f64>> = runs
                    .iter()
                    .filter(|r| r.target == target && r.frame_bytes == size && r.copies == c)
                    .map(|r| &r.delivered)
                    .collect();
                let over = match target {
                    Target::Mcrelay => None,
                    Target::Bare => to_bare.get(&(size, c)).cloned(),
                    Target::BarePlain => to_plain.get(&(size, c)).cloned(),
                };
                records.push(json!({
                    "kind": "tc",
                    "program": target.name(),
                    "frame_bytes": size,
                    "copies": c,
                    "kernel_ns_median": median(&kernel_ns),
                    "kernel_ns_runs": kernel_ns,
                    "wall_mpps_median": median(&wall_mpps),
                    "wall_mpps_runs": wall_mpps,
                    "delivered_runs": delivered,
                    "mcrelay_over_this_median": over.as_deref().map(median),
                    "mcrelay_over_this_runs": over,
                }));
            }
        }
    }
    Value::Array(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(repetition: usize, target: Target, kernel_ns: f64) -> TcRun {
        TcRun {
            repetition,
            target,
            frame_bytes: 64,
            copies: 2,
            kernel_ns,
            wall_mpps: 1.0,
            delivered: vec![1.0, 1.0],
        }
    }

    #[test]
    fn ratios_are_taken_within_a_repetition() {
        let runs = [
            run(0, Target::Mcrelay, 500.0),
            run(0, Target::Bare, 400.0),
            run(1, Target::Mcrelay, 1000.0),
            run(1, Target::Bare, 900.0),
        ];
        assert_eq!(ratios(&runs, Target::Bare)[&(64, 2)], vec![0.8, 0.9]);
        assert_eq!(extra_ns(&runs, Target::Bare)[&(64, 2)], vec![100.0, 100.0]);
        let text = table(&runs);
        assert!(text.contains("[0.85x]"), "{text}");
        assert!(text.contains("+100 ns"), "{text}");
        assert_eq!(json(&runs).as_array().map(Vec::len), Some(2));
    }
}
