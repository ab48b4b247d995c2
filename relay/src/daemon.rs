//! `mcrelay run`: validate, attach, write the maps, wait for a signal, clean up.
//!
//! Everything the user asked for is validated before any BPF work. Everything done to the
//! system is undone when a later step fails (rollback) and on SIGINT/SIGTERM.

use std::{collections::BTreeMap, fs::OpenOptions, net::IpAddr, path::Path};

use anyhow::{anyhow, Context as _};
use nix::fcntl::{Flock, FlockArg};
use relay_common::GroupKey;
use rtnetlink::Handle;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::RunArgs,
    dataplane::{remove_pins, Dataplane},
    error::UsageError,
    groups::{group_key, parse_static},
    paths,
    ports::{self, Link},
};

/// A validated `run` request.
#[derive(Debug)]
pub struct Plan {
    pub ports: Vec<Link>,
    /// Static groups: key, address and member ifindexes (deduplicated, sorted).
    pub groups: BTreeMap<GroupKey, (IpAddr, Vec<u32>)>,
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
        Ok(Self { ports, groups })
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
    if let Err(e) = setup {
        tracing::error!("setup failed, rolling back: {e:#}");
        teardown(&handle, dp, &allmulti_set).await;
        return Err(e);
    }

    let summary: Vec<String> =
        dp.ports().map(|p| format!("{}({})", p.link.name, p.mode.as_str())).collect();
    tracing::info!(
        "mcrelay ready: {} port(s) [{}], {} static group(s), pins in {}",
        summary.len(),
        summary.join(", "),
        plan.groups.len(),
        pin_dir.display()
    );

    wait_for_shutdown().await?;
    tracing::info!("shutting down: detaching from every port");
    teardown(&handle, dp, &allmulti_set).await;
    Ok(())
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
    for (key, (addr, ifindexes)) in &plan.groups {
        dp.set_group(*key, ifindexes).with_context(|| format!("adding static group {addr}"))?;
        tracing::info!(group = %addr, ports = ifindexes.len(), "static group");
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

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
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
