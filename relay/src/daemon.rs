//! `mcrelay run`: validate, attach, write the maps, wait for a signal, clean up.
//!
//! Everything the user asked for is validated before any BPF work. Everything done to the
//! system is undone when a later step fails (rollback) and on SIGINT/SIGTERM.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::OpenOptions,
    net::IpAddr,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use nix::fcntl::{Flock, FlockArg};
use relay_common::GroupKey;
use rtnetlink::Handle;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    capture::ControlSocket,
    cli::{MembershipArgs, RunArgs},
    control::{Control, ControlCounters, GroupTable},
    dataplane::{remove_pins, Dataplane},
    error::UsageError,
    groups::{group_key, parse_static},
    membership::{self, Engine, IgmpVersion, MldVersion, PortOptions},
    paths,
    ports::{self, Link},
    state,
};

/// A validated `run` request.
#[derive(Debug)]
pub struct Plan {
    pub ports: Vec<Link>,
    /// Static groups: key, address and member ifindexes (deduplicated, sorted).
    pub groups: BTreeMap<GroupKey, (IpAddr, Vec<u32>)>,
    /// Membership engine settings.
    pub membership: membership::Config,
    /// Per-port engine options, by ifindex.
    pub port_options: BTreeMap<u32, PortOptions>,
}

fn seconds(name: &str, value: f64) -> Result<Duration, UsageError> {
    if !(value.is_finite() && value > 0.0 && value < 86_400.0) {
        return Err(UsageError::new(format!(
            "--{name} {value}: expected a number of seconds greater than 0"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

fn membership_config(m: &MembershipArgs) -> Result<membership::Config, UsageError> {
    if m.robustness == 0 || m.robustness > 7 {
        return Err(UsageError::new(format!("--robustness {}: expected 1 to 7", m.robustness)));
    }
    let qi = seconds("query-interval", m.query_interval)?;
    let qri = seconds("query-response-interval", m.query_response_interval)?;
    if qri >= qi {
        return Err(UsageError::new(format!(
            "--query-response-interval ({}s) must be shorter than --query-interval ({}s)",
            m.query_response_interval, m.query_interval
        )));
    }
    Ok(membership::Config {
        robustness: m.robustness,
        query_interval: qi,
        query_response_interval: qri,
        last_member_query_interval: seconds("last-member-interval", m.last_member_interval)?,
        ..membership::Config::default()
    })
}

impl Plan {
    /// Checks the arguments against the interfaces that exist. Touches nothing.
    pub fn new(args: &RunArgs, links: &[Link]) -> Result<Self, UsageError> {
        let statics =
            args.static_groups.iter().map(|s| parse_static(s)).collect::<Result<Vec<_>, _>>()?;
        let ports = ports::resolve(&args.ifaces, links, |w| tracing::warn!("{w}"))?;
        let mut groups: BTreeMap<GroupKey, (IpAddr, Vec<u32>)> = BTreeMap::new();
        for st in statics {
            let entry = groups.entry(group_key(st.group)).or_insert_with(|| (st.group, Vec::new()));
            for name in &st.ifaces {
                let port = ports.iter().find(|p| p.name == *name).ok_or_else(|| {
                    UsageError::new(format!(
                        "--static {}@...: interface {name} is not one of the -i interfaces",
                        st.group
                    ))
                })?;
                if !entry.1.contains(&port.index) {
                    entry.1.push(port.index);
                }
            }
            entry.1.sort_unstable();
        }
        let m = &args.membership;
        let membership = membership_config(m)?;
        let port_named = |flag: &str, name: &String| -> Result<(), UsageError> {
            if ports.iter().any(|p| p.name == *name) {
                Ok(())
            } else {
                Err(UsageError::new(format!("--{flag} {name}: not one of the -i interfaces")))
            }
        };
        for name in &m.fast_leave {
            port_named("fast-leave", name)?;
        }
        for name in &m.router_ports {
            port_named("router-port", name)?;
        }
        let port_options = ports
            .iter()
            .map(|p| {
                let opts = PortOptions {
                    fast_leave: m.fast_leave.contains(&p.name),
                    querier: !m.no_querier,
                    igmp_version: if m.igmp_version == 2 {
                        IgmpVersion::V2
                    } else {
                        IgmpVersion::V3
                    },
                    mld_version: if m.mld_version == 1 { MldVersion::V1 } else { MldVersion::V2 },
                    router_port: m.router_ports.contains(&p.name),
                    ..PortOptions::default()
                };
                (p.index, opts)
            })
            .collect();
        Ok(Self { ports, groups, membership, port_options })
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs, pin_root: &Path) -> anyhow::Result<()> {
    let handle = ports::connect()?;
    let links = ports::list(&handle).await?;
    let plan = Plan::new(&args, &links)?;

    let _lock = lock_instance()?;
    ensure_bpffs(pin_root)?;
    let pin_dir = paths::pin_dir(pin_root)?;
    if pin_dir.exists() {
        // We hold the instance lock, so these pins belong to a daemon that died.
        tracing::info!("removing stale pins in {}", pin_dir.display());
        remove_pins(&pin_dir);
    }
    let mut dp = match Dataplane::load(Some(&pin_dir), args.unknown.into()) {
        Ok(dp) => dp,
        Err(e) => {
            remove_pins(&pin_dir);
            return Err(e);
        }
    };

    let mut allmulti_set = Vec::new();
    let setup = attach_all(&handle, &mut dp, &plan, &args, &mut allmulti_set).await;
    let control = match setup {
        Ok(()) => start_control(&handle, &mut dp, &plan).await,
        Err(e) => Err(e),
    };
    let mut control = match control {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("setup failed, rolling back: {e:#}");
            teardown(&handle, dp, &allmulti_set).await;
            return Err(e);
        }
    };

    let summary: Vec<String> =
        dp.ports().map(|p| format!("{}({})", p.link.name, p.mode.as_str())).collect();
    tracing::info!(
        "mcrelay ready: {} port(s) [{}], {} static group(s), pins in {}",
        summary.len(),
        summary.join(", "),
        plan.groups.len(),
        pin_dir.display()
    );

    let result = control_loop(&mut control, &mut dp).await;
    tracing::info!("shutting down: detaching from every port");
    teardown(&handle, dp, &allmulti_set).await;
    if let Ok(path) = paths::state_file() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Opens the control socket and starts the membership engine on every port.
async fn start_control(
    handle: &Handle,
    dp: &mut Dataplane,
    plan: &Plan,
) -> anyhow::Result<Control> {
    let socket = ControlSocket::open().map_err(|e| {
        if e.to_string().contains("Operation not permitted") {
            anyhow!(UsageError::new(format!("{e:#}: mcrelay run needs CAP_NET_RAW")))
        } else {
            e.context("opening the IGMP/MLD packet socket")
        }
    })?;
    let addrs = ports::addresses(handle).await?;
    let mut engine = Engine::new(plan.membership.clone());
    let mut macs = BTreeMap::new();
    let mut names = BTreeMap::new();
    let statics: BTreeMap<IpAddr, BTreeSet<u32>> = plan
        .groups
        .values()
        .map(|(addr, ports)| (*addr, ports.iter().copied().collect()))
        .collect();
    let mut table = GroupTable::new(statics);
    table.install_statics(dp)?;
    for (addr, ports) in plan.groups.values() {
        tracing::info!(group = %addr, ports = ports.len(), "static group");
    }
    for port in &plan.ports {
        let mut opts = plan.port_options.get(&port.index).cloned().unwrap_or_default();
        let a = addrs.get(&port.index).copied().unwrap_or_default();
        opts.ipv4 = a.v4;
        opts.ipv6 = a.v6_link_local;
        if let Some(mac) = port.mac {
            macs.insert(port.index, mac);
        }
        names.insert(port.index, port.name.clone());
        engine.add_port(Duration::ZERO, port.index, opts);
    }
    let mut control = Control {
        engine,
        table,
        socket,
        macs,
        names,
        counters: ControlCounters::default(),
        dirty: true,
    };
    control.process_actions(dp)?;
    Ok(control)
}

/// Receives control frames, runs timers and keeps the maps current until a signal arrives.
async fn control_loop(control: &mut Control, dp: &mut Dataplane) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let start = tokio::time::Instant::now();
    let state_path = paths::state_file()?;
    let mut flush = tokio::time::interval(Duration::from_millis(250));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut received_at = None;
    loop {
        let deadline =
            control.engine.next_deadline().map_or(start + Duration::from_secs(3600), |d| start + d);
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT"); return Ok(()); }
            received = control.socket.recv() => {
                let r = received.context("receiving on the packet socket")?;
                received_at = Some(tokio::time::Instant::now());
                control.on_frame(start.elapsed(), r.ifindex, &r.frame);
            }
            () = tokio::time::sleep_until(deadline) => {
                control.engine.tick(start.elapsed());
                control.dirty = true;
            }
            _ = flush.tick() => {
                if control.dirty {
                    control.dirty = false;
                    if let Err(e) = state::write(&state_path, &control.snapshot(start.elapsed())) {
                        tracing::warn!("{e:#}");
                    }
                }
            }
        }
        let updates = control.counters.group_updates;
        control.process_actions(dp)?;
        if let Some(at) = received_at.take() {
            if control.counters.group_updates != updates {
                let done = at.elapsed().as_micros() as u64;
                let visible = dp.last_publish().map_or(done, |p| {
                    p.saturating_duration_since(at.into_std()).as_micros() as u64
                });
                let c = &mut control.counters;
                c.last_update_us = visible;
                c.max_update_us = c.max_update_us.max(visible);
                c.last_update_done_us = done;
                tracing::debug!(visible_us = visible, done_us = done, "report applied to the maps");
            }
        }
    }
}

async fn attach_all(
    handle: &Handle,
    dp: &mut Dataplane,
    plan: &Plan,
    args: &RunArgs,
    allmulti_set: &mut Vec<u32>,
) -> anyhow::Result<()> {
    for port in &plan.ports {
        if !port.multicast {
            tracing::warn!(
                iface = %port.name,
                "interface has no MULTICAST flag; the local stack will not join groups on it \
                 (ip link set {} multicast on)",
                port.name
            );
        }
        if !port.allmulti {
            ports::set_allmulti(handle, port.index, true).await?;
            allmulti_set.push(port.index);
        }
        let (mode, fallback) = dp.attach(port, args.xdp_mode)?;
        match fallback {
            Some(reason) => tracing::warn!(
                iface = %port.name,
                "attached in generic (skb) mode because native XDP failed: {reason}"
            ),
            None => {
                tracing::info!(iface = %port.name, ifindex = port.index, mode = mode.as_str(), "attached")
            }
        }
        if port.is_veth() {
            tracing::info!(
                iface = %port.name,
                "veth port: its peer needs GRO on (ethtool -K PEER gro on) or an XDP program to \
                 accept redirected frames, and local senders behind it must send with full \
                 checksums (ethtool -K IF tx off) - see docs/architecture.md"
            );
        }
    }
    Ok(())
}

/// Detaches everything, restores allmulticast, removes the pins.
async fn teardown(handle: &Handle, mut dp: Dataplane, allmulti_set: &[u32]) {
    let indexes: Vec<u32> = dp.ports().map(|p| p.link.index).collect();
    for ifindex in indexes {
        dp.detach(ifindex);
    }
    dp.unpin();
    drop(dp);
    for &ifindex in allmulti_set {
        if let Err(e) = ports::set_allmulti(handle, ifindex, false).await {
            tracing::warn!("restoring allmulticast on ifindex {ifindex}: {e:#}");
        }
    }
}

/// One daemon per network namespace: an exclusive lock on a file named after the namespace.
fn lock_instance() -> anyhow::Result<Flock<std::fs::File>> {
    let path = paths::lock_file()?;
    let permission = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
    let dir = path.parent().ok_or_else(|| anyhow!("lock path has no parent"))?;
    if let Err(e) = std::fs::create_dir_all(dir) {
        if permission(&e) {
            return Err(anyhow!(UsageError::new(format!(
                "permission denied creating {}: mcrelay run needs root (or CAP_BPF, \
                 CAP_NET_ADMIN, CAP_PERFMON and write access to {})",
                dir.display(),
                paths::RUN_DIR
            ))));
        }
        return Err(e).with_context(|| format!("creating {}", dir.display()));
    }
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| {
            if permission(&e) {
                anyhow!(UsageError::new(format!(
                    "permission denied opening {}: mcrelay run needs root",
                    path.display()
                )))
            } else {
                anyhow!(e).context(format!("opening {}", path.display()))
            }
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow!(UsageError::new(format!(
            "another mcrelay is already running in this network namespace ({}: {errno})",
            path.display()
        )))
    })
}

/// Mounts bpffs at /sys/fs/bpf when the pin root lives there and nothing is mounted yet.
fn ensure_bpffs(pin_root: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    if !pin_root.starts_with(paths::BPFFS) {
        return Ok(());
    }
    let fs = nix::sys::statfs::statfs(paths::BPFFS)
        .with_context(|| format!("statfs {}", paths::BPFFS))?;
    if fs.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {}", paths::BPFFS);
    nix::mount::mount(
        Some("bpf"),
        paths::BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!("mounting bpffs at {} (mount -t bpf bpf {})", paths::BPFFS, paths::BPFFS)
    })
}
