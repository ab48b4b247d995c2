//! `cargo xtask bench`: the same offered load through mcrelay and its peers, side by side.
//!
//! 1. Forwarding: a live-frames XDP generator pushes 64- and 1400-byte UDP multicast frames into
//!    a middle namespace; mcrelay, a bare devmap-broadcast XDP program, a Linux bridge with IGMP
//!    snooping, kernel multicast routing (smcrouted) and a userspace relay take turns there;
//!    XDP counters on the receivers count what arrives. Fan-out 1, 2, 4, 8; several
//!    repetitions; medians; ratios taken within one repetition.
//! 2. Cost: the daemon's program through BPF_PROG_TEST_RUN (repeat) for a group hit, a miss,
//!    unicast and IGMP, against an empty program, at 10 / 1,000 / 10,000 groups on 64 ports;
//!    daemon RSS and map memory.
//!
//! Nothing here asserts timing; `--quick` only checks that every box moved traffic.

mod boxes;
mod control;
mod cost;
mod direct;
mod frames;
mod report;
mod tc;
mod testbed;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use self::{
    boxes::{Env, MiddleBox},
    cost::{CostParams, CostResult, ScaleBed},
    testbed::{Generator, Sample, Testbed, GROUP, SENDER, UDP_PORT},
};

/// What `cargo xtask bench` was asked to do.
pub struct Options {
    /// CI smoke mode: one short repetition, fan-out 1 and 2, 64-byte frames.
    pub quick: bool,
    /// Where to write the JSON records (default `target/bench/bench.json`).
    pub json: Option<PathBuf>,
    /// Where to write the SVG chart (default `target/bench/bench.svg`).
    pub svg: Option<PathBuf>,
    /// The `mcrelay` binary to benchmark.
    pub mcrelay: PathBuf,
    /// relay-ebpf's bench object (generator, counter, bare reference).
    pub object: PathBuf,
    /// Parts to run (`direct`, `tc`, `forward`, `control`, `cost`); empty: all.
    pub only: Vec<String>,
}

impl Options {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// How much to measure.
struct Plan {
    repetitions: usize,
    frame_sizes: Vec<usize>,
    fanouts: Vec<usize>,
    warmup: Duration,
    duration: Duration,
    cost_groups: Vec<usize>,
    cost_repeat: u32,
    cost_calls: usize,
    /// Direct mode: fan-outs and frames per measured BPF_PROG_TEST_RUN call.
    direct_copies: Vec<usize>,
    direct_repeat: u32,
    /// Control plane: joins measured, leave measured every N joins, reports in the burst.
    control_joins: usize,
    control_leave_every: usize,
    control_burst: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                repetitions: 1,
                frame_sizes: vec![64],
                fanouts: vec![1, 2],
                warmup: Duration::from_millis(100),
                duration: Duration::from_millis(200),
                cost_groups: vec![10],
                cost_repeat: 10_000,
                cost_calls: 1,
                direct_copies: vec![1, 2],
                direct_repeat: 100_000,
                control_joins: 20,
                control_leave_every: 4,
                control_burst: 200,
            }
        } else {
            Self {
                repetitions: 3,
                frame_sizes: vec![64, 1400],
                fanouts: vec![1, 2, 4, 8],
                warmup: Duration::from_millis(300),
                duration: Duration::from_secs(1),
                cost_groups: vec![10, 1_000, 10_000],
                cost_repeat: 1_000_000,
                cost_calls: 7,
                direct_copies: vec![1, 2, 3],
                direct_repeat: 2_000_000,
                control_joins: 1_000,
                control_leave_every: 5,
                control_burst: 2_000,
            }
        }
    }
}

/// One forwarding measurement.
#[derive(Clone, Debug)]
pub struct Run {
    pub repetition: usize,
    pub middle_box: MiddleBox,
    pub frame_bytes: usize,
    pub fanout: usize,
    pub sample: Sample,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(options.quick);
    let scratch = std::env::temp_dir().join(format!("mcrbench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = run_in(options, &plan, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let elapsed = started.elapsed().as_secs();
    println!(
        "[bench] {} in {}m{:02}s",
        if result.is_ok() { "done" } else { "FAILED" },
        elapsed / 60,
        elapsed % 60
    );
    result
}

fn run_in(options: &Options, plan: &Plan, scratch: &std::path::Path) -> anyhow::Result<()> {
    mcrelay_tests::daemon::ensure_bpffs();
    println!("[bench] object {}", options.object.display());
    println!("[bench] mcrelay {}", options.mcrelay.display());
    let env = Env { mcrelay: &options.mcrelay, object: &options.object, scratch };

    let testbed = Testbed::new(&options.object).context("building the forwarding test bed")?;
    let direct_runs = if !options.wants("direct") {
        Vec::new()
    } else {
        direct::measure(
            &testbed,
            &direct::DirectPlan {
                mcrelay: &options.mcrelay,
                object: &options.object,
                repetitions: plan.repetitions,
                frame_sizes: &plan.frame_sizes,
                copies: &plan.direct_copies,
                repeat: plan.direct_repeat,
            },
        )
        .context("direct mode")?
    };
    let tc_runs = if !options.wants("tc") {
        Vec::new()
    } else {
        tc::measure(
            &testbed,
            &tc::TcPlan {
                mcrelay: &options.mcrelay,
                object: &options.object,
                repetitions: plan.repetitions,
                frame_sizes: &plan.frame_sizes,
                copies: &plan.direct_copies,
                repeat: plan.direct_repeat,
            },
        )
        .context("TC rows")?
    };
    let runs = if options.wants("forward") {
        forwarding(&testbed, options, plan, &env)?
    } else {
        Vec::new()
    };
    drop(testbed);
    let control = if options.wants("control") {
        let result = control::measure(&control::ControlPlan {
            mcrelay: &options.mcrelay,
            object: &options.object,
            joins: plan.control_joins,
            leave_every: plan.control_leave_every,
            burst_reports: plan.control_burst,
        })
        .context("control-plane bench")?;
        Some(result)
    } else {
        None
    };
    let costs = if options.wants("cost") { costs(options, plan, scratch)? } else { Vec::new() };

    let report = report::Report::new(&runs, &costs, &direct_runs, control.as_ref());
    println!();
    print!("{}", report.table());
    print!("{}", tc::table(&tc_runs));
    let default_dir = crate::workspace::target_dir()?.join("bench");
    let json = options.json.clone().unwrap_or_else(|| default_dir.join("bench.json"));
    let svg = options.svg.clone().unwrap_or_else(|| default_dir.join("bench.svg"));
    for path in [&json, &svg] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    std::fs::write(&json, report.json()).with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&svg, report.svg()).with_context(|| format!("writing {}", svg.display()))?;
    println!("[bench] wrote {} and {}", json.display(), svg.display());

    if options.quick {
        let idle: Vec<String> = runs
            .iter()
            .filter(|r| r.sample.member_pps.iter().any(|&pps| pps <= 0.0))
            .map(|r| {
                format!(
                    "{} fan-out {} ({:?} pps per member)",
                    r.middle_box, r.fanout, r.sample.member_pps
                )
            })
            .collect();
        let idle_direct =
            direct_runs.iter().filter(|r| r.delivered.iter().any(|&d| d <= 0.0)).map(|r| {
                format!("direct {} x{} ({:?} delivered)", r.target.name(), r.copies, r.delivered)
            });
        let idle_tc = tc_runs
            .iter()
            .filter(|r| r.delivered.iter().any(|&d| d <= 0.0))
            .map(|r| format!("tc {} x{} ({:?} delivered)", r.target.name(), r.copies, r.delivered));
        let idle: Vec<String> = idle.into_iter().chain(idle_direct).chain(idle_tc).collect();
        if !idle.is_empty() {
            bail!("middle boxes that moved no traffic to some member: {}", idle.join("; "));
        }
        println!("[bench] quick: every middle box moved traffic to every member");
    }
    Ok(())
}

fn forwarding(
    testbed: &Testbed,
    options: &Options,
    plan: &Plan,
    env: &Env<'_>,
) -> anyhow::Result<Vec<Run>> {
    let mut generator = Generator::new(&options.object)?;
    let mut runs = Vec::new();
    let total =
        plan.repetitions * plan.frame_sizes.len() * plan.fanouts.len() * MiddleBox::ALL.len();
    for repetition in 0..plan.repetitions {
        for &frame_bytes in &plan.frame_sizes {
            let frame = frames::udp4(
                frames::group_mac(GROUP),
                testbed.sender_mac,
                SENDER,
                GROUP,
                UDP_PORT,
                frame_bytes,
            );
            for &fanout in &plan.fanouts {
                // Rotate the order per repetition so slow drift does not favour one box.
                let mut order = MiddleBox::ALL.to_vec();
                order.rotate_left(repetition % MiddleBox::ALL.len());
                for middle_box in order.iter().copied() {
                    let running = boxes::start(middle_box, testbed, env, fanout)
                        .with_context(|| format!("starting {middle_box}"))?;
                    let sample = testbed::measure(
                        testbed,
                        &mut generator,
                        &frame,
                        fanout,
                        plan.warmup,
                        plan.duration,
                    )
                    .with_context(|| format!("measuring {middle_box}"))?;
                    drop(running);
                    println!(
                        "[bench] {:>3}/{total} rep {} {:>4} B fan-out {} {:<9} {:>7.3} Mpps per member (offered {:.2}, leaked {:.3})",
                        runs.len() + 1,
                        repetition + 1,
                        frame_bytes,
                        fanout,
                        middle_box.name(),
                        sample.pps() / 1e6,
                        sample.offered_pps / 1e6,
                        sample.leaked_pps / 1e6,
                    );
                    runs.push(Run { repetition, middle_box, frame_bytes, fanout, sample });
                }
            }
        }
    }
    Ok(runs)
}

fn costs(
    options: &Options,
    plan: &Plan,
    scratch: &std::path::Path,
) -> anyhow::Result<Vec<CostResult>> {
    let bed = ScaleBed::new(scratch).context("building the scale test bed")?;
    let mut results = Vec::new();
    for &groups in &plan.cost_groups {
        let params = CostParams {
            mcrelay: &options.mcrelay,
            object: &options.object,
            groups,
            repeat: plan.cost_repeat,
            calls: plan.cost_calls,
        };
        // A failure here must not throw away the forwarding results: report it and go on.
        let result = match cost::measure(&bed, &params) {
            Ok(result) => result,
            Err(e) if options.quick => {
                return Err(e.context(format!("per-packet cost at {groups} groups")))
            }
            Err(e) => {
                eprintln!("[bench] per-packet cost at {groups} groups FAILED: {e:#}");
                continue;
            }
        };
        println!(
            "[bench] cost at {groups} groups x {} ports: hit {:.1} ns, empty {:.1} ns, RSS {} KiB, maps {} KiB",
            result.ports,
            result.mcrelay_ns.get("hit").copied().unwrap_or_default(),
            result.empty_ns,
            result.rss_kib,
            result.map_kib
        );
        results.push(result);
    }
    Ok(results)
}

/// relay-ebpf's bench object built next to `mcrelay` (relay's build script puts it in
/// `<profile dir>/build/relay-*/out/bench`; the newest wins).
pub fn find_object(mcrelay: &std::path::Path) -> anyhow::Result<PathBuf> {
    let profile_dir = mcrelay.parent().context("mcrelay binary without a directory")?;
    testbed::find_object(profile_dir)
}
