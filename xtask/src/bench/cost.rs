//! Per-packet cost of the running daemon's XDP program (BPF_PROG_TEST_RUN with repeat) at
//! 10 / 1,000 / 10,000 groups and 64 ports, against an empty XDP program; daemon memory.
//!
//! The daemon runs in its own namespace with 64 veth ports `p0..p63`. Group 239.1.1.1 has every
//! port but the ingress `p0`; the other groups have sliding windows of 8 ports (10,000 port
//! lists of 63 names would not fit on a command line). The program the daemon attached to `p0`
//! is opened by id (pinned for a moment with bpftool) and run on crafted frames whose `xdp_md`
//! names `p0` as ingress, so the daemon's own maps and counters are exercised.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    programs::{TestRun as _, TestRunOptions, Xdp},
    Ebpf,
};
use mcrelay_tests::{serde_json::Value, Mcrelay, NetNs};

use super::{
    frames,
    testbed::{load_object, load_xdp, spawn_in, xdp_md},
};

/// Ports of the scale namespace.
pub const SCALE_PORTS: usize = 64;
/// Ports of every group except the probe group.
const WINDOW: usize = 8;
const PROBE_GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const MISS_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 0, 1);

/// How long the daemon may take to write every static group and report ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);

/// Frame kinds whose cost is measured, in table order.
pub const KINDS: [&str; 4] = ["hit", "miss", "unicast", "igmp"];

/// Per-packet cost and memory at one group count.
#[derive(Clone, Debug)]
pub struct CostResult {
    pub groups: usize,
    pub ports: usize,
    /// Median ns per run of mcrelay_xdp, by frame kind.
    pub mcrelay_ns: BTreeMap<&'static str, f64>,
    /// Median ns per run of the empty program (same frames, same run).
    pub empty_ns: f64,
    /// Median ns per run of the bare reference on the hit frame.
    pub bare_ns: f64,
    /// Daemon resident set (VmRSS), KiB.
    pub rss_kib: u64,
    /// memlock of every BPF map the daemon holds open, KiB.
    pub map_kib: u64,
    /// Seconds from starting the daemon to "ready" (includes writing every static group).
    pub startup_s: f64,
    /// bpftool's view of the program: xlated bytes, jited bytes, verified instructions.
    pub prog: BTreeMap<String, u64>,
}

/// The namespace with 64 veth pairs; dropped with them.
pub struct ScaleBed {
    pub ns: NetNs,
}

impl ScaleBed {
    pub fn new(scratch: &Path) -> anyhow::Result<Self> {
        let ns = NetNs::new("mcrbench-scale");
        let mut batch = String::new();
        for i in 0..SCALE_PORTS {
            batch.push_str(&format!("link add p{i} type veth peer name q{i}\n"));
            batch.push_str(&format!("link set p{i} up\nlink set q{i} up\n"));
        }
        let file = scratch.join("scale.batch");
        fs::write(&file, batch)?;
        let status = Command::new("ip")
            .args(["-n", ns.name(), "-batch"])
            .arg(&file)
            .status()
            .context("ip -batch")?;
        if !status.success() {
            bail!("creating {SCALE_PORTS} veth pairs failed ({status})");
        }
        Ok(Self { ns })
    }
}

/// Options of one cost measurement.
pub struct CostParams<'a> {
    pub mcrelay: &'a Path,
    pub object: &'a Path,
    pub groups: usize,
    /// BPF_PROG_TEST_RUN repeat count per call.
    pub repeat: u32,
    /// Calls per frame kind (the median is reported).
    pub calls: usize,
}

pub fn measure(bed: &ScaleBed, p: &CostParams<'_>) -> anyhow::Result<CostResult> {
    let ns = &bed.ns;
    // --no-pin: the next daemon (other group count) must start clean, not take over.
    let mut args: Vec<String> =
        vec!["run".into(), "--no-pin".into(), "--xdp-mode".into(), "native".into()];
    for i in 0..SCALE_PORTS {
        args.extend(["-i".into(), format!("p{i}")]);
    }
    let all_but_p0: Vec<String> = (1..SCALE_PORTS).map(|i| format!("p{i}")).collect();
    args.extend(["--static".into(), format!("{PROBE_GROUP}@{}", all_but_p0.join(","))]);
    for k in 1..p.groups {
        let first = k % (SCALE_PORTS - WINDOW);
        let ports: Vec<String> = (first..first + WINDOW).map(|i| format!("p{i}")).collect();
        let group = Ipv4Addr::new(239, 2, (k >> 8) as u8, k as u8);
        args.extend(["--static".into(), format!("{group}@{}", ports.join(","))]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut daemon = Mcrelay::start_with(p.mcrelay, ns, &args, true);
    // 10,000 static groups take a while to write: allow for it rather than the test default.
    if let Err(status) = daemon.wait_ready_or_exit(STARTUP_TIMEOUT) {
        bail!(
            "mcrelay with {} groups exited ({status}) before ready:\n{}",
            p.groups,
            daemon.stderr()
        );
    }
    let startup_s = started.elapsed().as_secs_f64();
    // Let the control loop settle (start-up queries) before reading memory.
    thread::sleep(Duration::from_millis(300));
    let pid = daemon.pid();
    let rss_kib = vm_rss_kib(pid)?;
    let map_kib = map_memlock(pid) / 1024;

    let prog_id = xdp_prog_id(ns, "p0")?;
    let prog = prog_stats(prog_id);
    let mut program = super::direct::open_attached(ns, "p0")?;

    let mut empty = load_object(p.object)?;
    load_xdp(&mut empty, "bench_empty")?;
    let mut bare = load_object(p.object)?;
    load_xdp(&mut bare, "bench_bare")?;

    let ingress = ns.ifindex("p0");
    let src_mac = [0x02, 0, 0, 0, 0, 0x01];
    let src = Ipv4Addr::new(198, 18, 0, 2);
    let hit = frames::udp4(frames::group_mac(PROBE_GROUP), src_mac, src, PROBE_GROUP, 5001, 64);
    let miss = frames::udp4(frames::group_mac(MISS_GROUP), src_mac, src, MISS_GROUP, 5001, 64);
    let unicast = frames::udp4(
        [0x02, 0, 0, 0, 0, 0x02],
        src_mac,
        src,
        Ipv4Addr::new(198, 18, 0, 1),
        5001,
        64,
    );
    let igmp = frames::igmp_v2_report(src_mac, src, PROBE_GROUP);
    let frames_by_kind: [(&'static str, Vec<u8>); 4] =
        [("hit", hit.clone()), ("miss", miss), ("unicast", unicast), ("igmp", igmp)];

    let (mcrelay_ns, empty_ns, bare_ns) = thread::scope(|scope| {
        spawn_in(scope, ns, || -> anyhow::Result<_> {
            let mut mcrelay_ns = BTreeMap::new();
            // Interleave the programs per round so drift on a noisy machine hits all alike.
            let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            let empty_prog = program_of(&mut empty, "bench_empty")?;
            for _ in 0..p.calls {
                samples
                    .entry("empty")
                    .or_default()
                    .push(run_ns(empty_prog, &hit, ingress, p.repeat)?);
                for (kind, frame) in &frames_by_kind {
                    samples.entry(kind).or_default().push(run_ns(
                        &mut program,
                        frame,
                        ingress,
                        p.repeat,
                    )?);
                }
            }
            // The bare reference with the same probe group and port set, so its "hit" is one.
            let ports: Vec<u32> = (1..SCALE_PORTS).map(|i| ns.ifindex(&format!("p{i}"))).collect();
            let _inner = super::boxes::bare_group(&mut bare, &ports)?;
            let bare_prog = program_of(&mut bare, "bench_bare")?;
            for _ in 0..p.calls {
                samples
                    .entry("bare")
                    .or_default()
                    .push(run_ns(bare_prog, &hit, ingress, p.repeat)?);
            }
            for kind in KINDS {
                mcrelay_ns.insert(kind, median(samples.get(kind).map_or(&[][..], Vec::as_slice)));
            }
            Ok((
                mcrelay_ns,
                median(samples.get("empty").map_or(&[][..], Vec::as_slice)),
                median(samples.get("bare").map_or(&[][..], Vec::as_slice)),
            ))
        })?
        .join()
        .map_err(|_| anyhow!("the cost measurement panicked"))?
    })?;
    drop(program);
    daemon.stop();
    Ok(CostResult {
        groups: p.groups,
        ports: SCALE_PORTS,
        mcrelay_ns,
        empty_ns,
        bare_ns,
        rss_kib,
        map_kib,
        startup_s,
        prog,
    })
}

fn program_of<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf.program_mut(name).ok_or_else(|| anyhow!("{name} missing"))?.try_into()?)
}

/// One BPF_PROG_TEST_RUN call with `repeat`; the kernel's average ns per run.
fn run_ns(program: &mut Xdp, frame: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<f64> {
    let ctx = xdp_md(frame.len(), ingress);
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    let result = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok(result.duration.as_nanos() as f64)
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Sum of `memlock` over the BPF maps process `pid` holds open (each map counted once).
fn map_memlock(pid: u32) -> u64 {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return 0 };
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else { continue };
        if !info.contains("map_type:") {
            continue;
        }
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            if seen.insert(id) {
                total += memlock;
            }
        }
    }
    total
}

/// The id of the XDP program attached to `iface` in `ns` (from `ip -j -d link show`).
pub fn xdp_prog_id(ns: &NetNs, iface: &str) -> anyhow::Result<u32> {
    fn find_id(v: &Value) -> Option<u64> {
        match v {
            Value::Object(map) => map
                .get("prog")
                .and_then(|p| p.get("id"))
                .and_then(Value::as_u64)
                .or_else(|| map.values().find_map(find_id)),
            Value::Array(items) => items.iter().find_map(find_id),
            _ => None,
        }
    }
    let link = ns.link_json(iface);
    link.get("xdp")
        .and_then(find_id)
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| anyhow!("no XDP program on {iface}: {link}"))
}

/// `bpftool -j prog show id ID`: sizes and verifier statistics (empty when bpftool fails).
pub fn prog_stats(id: u32) -> BTreeMap<String, u64> {
    let Ok(out) =
        Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]).output()
    else {
        return BTreeMap::new();
    };
    let Ok(doc) = mcrelay_tests::serde_json::from_slice::<Value>(&out.stdout) else {
        return BTreeMap::new();
    };
    ["bytes_xlated", "bytes_jited", "verified_insns"]
        .iter()
        .filter_map(|k| Some(((*k).to_owned(), doc.get(*k)?.as_u64()?)))
        .collect()
}
