//! The forwarding test bed: a sender namespace with the live-frames generator, a middle
//! namespace where the box under test runs, a sink namespace whose veths count what arrives.
//!
//! ```text
//!  mcrbench-src            mcrbench-mid (box under test)         mcrbench-sink
//!  s0 198.18.0.2 ──veth── in0 198.18.0.1                        
//!   bench_gen (XDP_TX,      out0 198.18.1.1 ──────veth────── r0  bench_count (XDP_DROP)
//!   live frames)            out1 198.18.2.1 ──────veth────── r1  bench_count
//!                           ...                              ...
//!                           out7 198.18.8.1 ──────veth────── r7  bench_count
//! ```

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use mcrelay_tests::{veth_pair, NetNs};
use nix::sched::{setns, CloneFlags};

use super::frames;

/// The most egress ports a scenario uses.
pub const MAX_FANOUT: usize = 8;
/// The group every forwarding scenario sends to.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
/// The sender's address (the source of every generated frame).
pub const SENDER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// UDP port of the generated frames (and of the userspace relay).
pub const UDP_PORT: u16 = 5001;
/// Frames per BPF_PROG_TEST_RUN call of the generator (the stop flag is checked between calls).
const GEN_CHUNK: u32 = 1 << 17;

/// Loads relay-ebpf's bench object (a fresh instance: maps are not shared between instances).
pub fn load_object(path: &Path) -> anyhow::Result<Ebpf> {
    Ebpf::load_file(path).with_context(|| format!("loading {}", path.display()))
}

/// Loads program `name` of `ebpf` into the kernel and returns it.
pub fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the bench object"))?
        .try_into()?;
    program.load().with_context(|| format!("the kernel rejected {name}"))?;
    Ok(program)
}

/// `struct xdp_md` for BPF_PROG_TEST_RUN: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex.
pub fn xdp_md(frame_len: usize, ingress_ifindex: u32) -> Vec<u8> {
    [0, frame_len as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// Runs `f` on a new scoped thread that entered the network namespace of `ns`.
pub fn spawn_in<'scope, T: Send + 'scope>(
    scope: &'scope thread::Scope<'scope, '_>,
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'scope,
) -> anyhow::Result<thread::ScopedJoinHandle<'scope, T>> {
    let file = File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
    Ok(scope.spawn(move || {
        // An error here would leave the thread in the wrong namespace: nothing may run then.
        if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
            panic!("setns into a bench namespace: {e}");
        }
        f()
    }))
}

/// The namespaces and veths of the forwarding benchmark, with the counters attached.
pub struct Testbed {
    /// Counter programs attached to the sink's veths; dropped (detached) first.
    counters: Ebpf,
    /// ifindexes of `r0..r7` in the sink namespace (the counter slots).
    sink_ifindexes: Vec<u32>,
    /// ifindex of `s0` in the sender namespace (the generator's ingress device).
    pub sender_ifindex: u32,
    /// MAC address of `s0`.
    pub sender_mac: [u8; 6],
    pub src: NetNs,
    pub mid: NetNs,
    _sink: NetNs,
}

impl Testbed {
    /// Builds the namespaces and veths and attaches the counters.
    pub fn new(object: &Path) -> anyhow::Result<Self> {
        let src = NetNs::new("mcrbench-src");
        let mid = NetNs::new("mcrbench-mid");
        let sink = NetNs::new("mcrbench-sink");
        veth_pair(&src, "s0", &mid, "in0");
        src.add_addr("s0", &format!("{SENDER}/24"));
        mid.add_addr("in0", "198.18.0.1/24");
        // NAPI on in0 for the boxes without XDP (bridge, MFC, userspace): the generator's
        // XDP_TX frames enter through veth's XDP transmit path, which needs it.
        mid.gro_on("in0");
        for i in 0..MAX_FANOUT {
            let (out, r) = (format!("out{i}"), format!("r{i}"));
            veth_pair(&mid, &out, &sink, &r);
            mid.add_addr(&out, &format!("198.18.{}.1/24", i + 1));
            sink.add_addr(&r, &format!("198.18.{}.2/24", i + 1));
        }
        // No IPv6 chatter (router solicitations, MLD reports) on the counted links.
        for ns in [&src, &mid, &sink] {
            ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1");
        }
        let sender_ifindex = src.ifindex("s0");
        let sender_mac =
            parse_mac(src.link_json("s0").get("address").and_then(|a| a.as_str()).unwrap_or(""))?;
        let sink_ifindexes: Vec<u32> =
            (0..MAX_FANOUT).map(|i| sink.ifindex(&format!("r{i}"))).collect();
        if let Some(&big) = sink_ifindexes.iter().find(|&&i| i >= 4096) {
            bail!("ifindex {big} in the sink namespace is beyond the counter map");
        }

        let mut counters = load_object(object)?;
        load_xdp(&mut counters, "bench_count")?;
        let counters = thread::scope(|scope| -> anyhow::Result<Ebpf> {
            let handle = spawn_in(scope, &sink, move || -> anyhow::Result<Ebpf> {
                let program: &mut Xdp = counters
                    .program_mut("bench_count")
                    .ok_or_else(|| anyhow!("bench_count missing"))?
                    .try_into()?;
                for i in 0..MAX_FANOUT {
                    program
                        .attach(&format!("r{i}"), XdpMode::Driver)
                        .with_context(|| format!("attaching the counter to r{i} (native)"))?;
                }
                Ok(counters)
            })?;
            handle.join().map_err(|_| anyhow!("attaching the counters panicked"))?
        })?;
        Ok(Self { counters, sink_ifindexes, sender_ifindex, sender_mac, src, mid, _sink: sink })
    }

    /// Frames counted so far on each receiver `r0..r7` (summed over CPUs).
    pub fn received(&self) -> anyhow::Result<Vec<u64>> {
        let map = self.counters.map("RX_PACKETS").ok_or_else(|| anyhow!("RX_PACKETS missing"))?;
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        self.sink_ifindexes.iter().map(|i| Ok(array.get(i, 0)?.iter().sum())).collect()
    }

    /// The ifindexes of `out0..out{n-1}` in the middle namespace.
    pub fn out_ifindexes(&self, n: usize) -> Vec<u32> {
        (0..n).map(|i| self.mid.ifindex(&format!("out{i}"))).collect()
    }
}

/// The live-frames generator: `bench_gen` run through BPF_PROG_TEST_RUN on `s0`.
pub struct Generator {
    ebpf: Ebpf,
}

impl Generator {
    pub fn new(object: &Path) -> anyhow::Result<Self> {
        let mut ebpf = load_object(object)?;
        load_xdp(&mut ebpf, "bench_gen")?;
        Ok(Self { ebpf })
    }

    /// Sends `frame` out of the sender's veth until `stop` is set; returns the frames sent.
    /// Call it on a thread inside the sender's namespace (the ingress ifindex is looked up
    /// there).
    pub fn run(
        &mut self,
        frame: &[u8],
        ingress_ifindex: u32,
        stop: &AtomicBool,
    ) -> anyhow::Result<u64> {
        let mut header = [0u8; frames::HEADER_LEN];
        header.copy_from_slice(&frame[..frames::HEADER_LEN]);
        let mut template: Array<_, [u8; frames::HEADER_LEN]> = Array::try_from(
            self.ebpf.map_mut("GEN_HEADER").ok_or_else(|| anyhow!("GEN_HEADER missing"))?,
        )?;
        template.set(0, header, 0)?;
        let program: &mut Xdp = self
            .ebpf
            .program_mut("bench_gen")
            .ok_or_else(|| anyhow!("bench_gen missing"))?
            .try_into()?;
        let ctx = xdp_md(frame.len(), ingress_ifindex);
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(frame);
            opts.ctx_in = Some(&ctx);
            opts.repeat = GEN_CHUNK;
            opts.attrs = TestRunAttrs::new().xdp_live_frames(0);
            program.test_run(opts).context("BPF_PROG_TEST_RUN with live frames (generator)")?;
            sent += u64::from(GEN_CHUNK);
        }
        Ok(sent)
    }
}

/// What one measurement saw.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Frames per second offered by the generator.
    pub offered_pps: f64,
    /// Frames per second counted on each of the `fanout` member receivers.
    pub member_pps: Vec<f64>,
    /// Frames per second counted on receivers that are not members (should be ~0).
    pub leaked_pps: f64,
}

impl Sample {
    /// The group's forwarding rate: the mean over member receivers (frames per second that
    /// reach each member).
    pub fn pps(&self) -> f64 {
        if self.member_pps.is_empty() {
            0.0
        } else {
            self.member_pps.iter().sum::<f64>() / self.member_pps.len() as f64
        }
    }
}

/// Offers `frame` for `warmup + duration` and counts on the receivers during `duration`.
pub fn measure(
    testbed: &Testbed,
    generator: &mut Generator,
    frame: &[u8],
    fanout: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Sample> {
    let stop = AtomicBool::new(false);
    let ingress = testbed.sender_ifindex;
    thread::scope(|scope| -> anyhow::Result<Sample> {
        let stop = &stop;
        let sender = spawn_in(scope, &testbed.src, move || {
            let started = Instant::now();
            let sent = generator.run(frame, ingress, stop);
            (sent, started.elapsed())
        })?;
        let counted = (|| -> anyhow::Result<(Vec<u64>, Vec<u64>, Duration)> {
            thread::sleep(warmup);
            let before = testbed.received()?;
            let t0 = Instant::now();
            thread::sleep(duration);
            let after = testbed.received()?;
            Ok((before, after, t0.elapsed()))
        })();
        stop.store(true, Ordering::Relaxed);
        let (sent, sending) = sender.join().map_err(|_| anyhow!("the generator panicked"))?;
        let sent = sent?;
        let (before, after, elapsed) = counted?;
        let secs = elapsed.as_secs_f64();
        let rates: Vec<f64> =
            before.iter().zip(&after).map(|(b, a)| a.saturating_sub(*b) as f64 / secs).collect();
        Ok(Sample {
            offered_pps: sent as f64 / sending.as_secs_f64(),
            member_pps: rates[..fanout].to_vec(),
            // `+ 0.0`: the empty sum is -0.0, printed as "-0.000".
            leaked_pps: rates[fanout..].iter().sum::<f64>() + 0.0,
        })
    })
}

/// relay-ebpf's bench object as built by relay's build script: the newest
/// `<target>/<profile>/build/relay-*/out/bench`.
pub fn find_object(profile_dir: &Path) -> anyhow::Result<PathBuf> {
    let build = profile_dir.join("build");
    let entries =
        std::fs::read_dir(&build).with_context(|| format!("reading {}", build.display()))?;
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("relay-")
                && !name.starts_with("relay-ebpf")
                && !name.starts_with("relay-common")
        })
        .map(|e| e.path().join("out/bench"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no relay-*/out/bench under {}: build relay first", build.display()))
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC address {text:?}"))?;
    bytes.try_into().map_err(|_| anyhow!("bad MAC address {text:?}"))
}
