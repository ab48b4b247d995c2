//! `mcrelay run`: validate, start (attach, write the maps), serve (the event loop), stop.
//!
//! Everything the user asked for is validated before any BPF work ([`Plan`]). Everything done
//! to the system is undone when a start-up step fails (rollback, exit status 2 for usage
//! errors) and, with `--no-pin`, on SIGINT/SIGTERM. Interfaces matching an `-i` glob (or name)
//! that appear later are attached on the fly, and ports that vanish are forgotten (netlink
//! link notifications).
//!
//! - [`lifecycle`]: start-up with rollback, adding and removing ports, stop.
//! - [`events`]: the event loop, one handler per event.
//! - [`reload`]: SIGHUP, applying the difference of a new configuration.

mod events;
mod lifecycle;
mod plan;
mod reload;

use std::path::PathBuf;

use anyhow::Context as _;
use rtnetlink::Handle;
use tokio::signal::unix::{signal, Signal, SignalKind};

pub use self::plan::Plan;
use crate::{
    control::Control,
    dataplane::Dataplane,
    instance::{self, InstanceLock},
    ports,
    settings::SettingsSource,
};

/// Everything a running daemon holds.
struct Daemon {
    handle: Handle,
    dp: Dataplane,
    control: Control,
    plan: Plan,
    source: SettingsSource,
    /// Where the pins are (under the bpffs the daemon found or mounted).
    pin_root: PathBuf,
    pin_dir: PathBuf,
    /// Ports on which mcrelay turned allmulticast on (turned off again at exit).
    allmulti_set: Vec<u32>,
    start: tokio::time::Instant,
}

/// The signals the daemon handles, installed before anything is attached: a SIGTERM that
/// arrives at any moment after start-up must lead to an orderly exit, not the default action.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing a SIGHUP handler")?,
        })
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(source: SettingsSource) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let settings = source.load()?;
    // Subscribe before listing, so no interface can appear unseen in between.
    let links_rx = ports::monitor()?;
    let handle = ports::connect()?;
    let links = ports::list(&handle).await?;
    let plan = Plan::new(settings, &links)?;

    let mut lock = InstanceLock::acquire()?;
    lock.record_pid();
    let mut daemon = Daemon::start(handle, plan, source).await?;
    daemon.announce_ready();
    let metrics = daemon.spawn_metrics();
    let result = daemon.serve(signals, links_rx).await;
    if let Some(task) = metrics {
        task.abort();
    }
    daemon.stop().await;
    drop(lock);
    result
}

/// How long `mcrelay reload` waits for the daemon's verdict.
const RELOAD_VERDICT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `mcrelay reload`: sends SIGHUP to this namespace's daemon and reports its verdict: success
/// only when the new configuration is in force; a refused file is a usage error (exit 2) with
/// the daemon's reasons (FILE:LINE:COL lines), the old configuration still in force.
pub fn reload() -> anyhow::Result<()> {
    let pid = instance::running_pid()?;
    let path = crate::paths::reload_file()?;
    let seen = |v: &crate::state::ReloadVerdict| (v.pid, v.seq);
    let before = crate::state::ReloadVerdict::read(&path).map(|v| seen(&v));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .with_context(|| format!("sending SIGHUP to mcrelay (pid {pid})"))?;
    let deadline = std::time::Instant::now() + RELOAD_VERDICT_WAIT;
    let verdict = loop {
        match crate::state::ReloadVerdict::read(&path) {
            Some(v) if v.pid == pid as u32 && Some(seen(&v)) != before => break v,
            _ if std::time::Instant::now() > deadline => anyhow::bail!(
                "sent SIGHUP to mcrelay (pid {pid}), but it gave no verdict within {}s; see its \
                 log (journalctl -u mcrelay)",
                RELOAD_VERDICT_WAIT.as_secs()
            ),
            _ => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    if verdict.applied {
        println!("mcrelay (pid {pid}) reloaded: {}", verdict.message);
        return Ok(());
    }
    let refused = format!(
        "mcrelay (pid {pid}) refused the new configuration; the previous one stays in force:\n{}",
        verdict.message
    );
    if verdict.usage {
        Err(crate::error::UsageError::new(refused).into())
    } else {
        Err(anyhow::anyhow!(refused))
    }
}
