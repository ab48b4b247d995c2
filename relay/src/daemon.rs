//! `mcrelay run`: validate, attach, write the maps, run the control loop, clean up.
//!
//! Everything the user asked for is validated before any BPF work. Everything done to the
//! system is undone when a start-up step fails (rollback, exit status 2) and on SIGINT/SIGTERM.
//! Interfaces matching an `-i` glob (or name) that appear later are attached on the fly, and
//! ports that vanish are forgotten (netlink link notifications).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::OpenOptions,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use clap::ArgMatches;
use nix::fcntl::{Flock, FlockArg};
use relay_common::GroupKey;
use rtnetlink::Handle;
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc::UnboundedReceiver,
};

use crate::{
    capture::ControlSocket,
    cli::{MembershipArgs, RunArgs, UnknownArg, XdpMode},
    config::{self, ConfigFile, GroupPolicy},
    control::Control,
    dataplane::{remove_pins, Dataplane, CLIENT_KEY_BIT},
    error::UsageError,
    groups::{key_group, parse_static},
    loop_guard::LoopGuard,
    membership::{self, Engine, IgmpVersion, MldVersion, PortOptions},
    paths,
    ports::{self, Link, LinkEvent},
    reconciler::{GroupTable, GroupWriter as _, Installed},
    state,
};

/// A validated `run` request.
#[derive(Debug)]
pub struct Plan {
    /// The `-i` arguments (names and globs): interfaces that appear later and match are
    /// attached too.
    pub patterns: Vec<String>,
    /// Interfaces that exist now and match.
    pub ports: Vec<Link>,
    /// Static groups: interface names per group (all sources).
    pub statics: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Ports (names/globs) with per-client delivery.
    pub per_client: Vec<String>,
    pub xdp_mode: XdpMode,
    /// XDP mode per interface name from the file's `[[port]]` entries.
    port_xdp_modes: Vec<(String, XdpMode)>,
    /// Which groups may be relayed at all (`[policy]` allow/deny).
    pub policy: GroupPolicy,
    /// Membership engine settings.
    pub membership: membership::Config,
    /// Loop guard: time between hellos, and how long a silent relay is remembered.
    pub hello_interval: Duration,
    pub hello_holdtime: Duration,
    membership_args: MembershipArgs,
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
    pub fn new(
        args: &RunArgs,
        links: &[Link],
        file: Option<&ConfigFile>,
        matches: &ArgMatches,
    ) -> Result<Self, UsageError> {
        let parsed =
            args.static_groups.iter().map(|s| parse_static(s)).collect::<Result<Vec<_>, _>>()?;
        let ports = ports::resolve(&args.ifaces, links, |w| tracing::warn!("{w}"))?;
        // A name given to --static, --fast-leave or --router-port must be one of the ports, or
        // match an -i glob (an interface that may appear later).
        let known = |name: &String| {
            ports.iter().any(|p| p.name == *name) || ports::matches_any(&args.ifaces, name)
        };
        let mut statics: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for st in parsed {
            for name in &st.ifaces {
                if !known(name) {
                    return Err(UsageError::new(format!(
                        "--static {}@...: interface {name} is not one of the -i interfaces",
                        st.group
                    )));
                }
            }
            statics.entry(st.group).or_default().extend(st.ifaces.iter().cloned());
        }
        let m = &args.membership;
        let membership = membership_config(m)?;
        let hello_interval = seconds("hello-interval", args.hello_interval)?;
        let hello_holdtime = seconds("hello-holdtime", args.hello_holdtime)?;
        if hello_holdtime <= hello_interval {
            return Err(UsageError::new(format!(
                "--hello-holdtime ({}s) must be longer than --hello-interval ({}s)",
                args.hello_holdtime, args.hello_interval
            )));
        }
        for (flag, names) in [("fast-leave", &m.fast_leave), ("router-port", &m.router_ports)] {
            if let Some(name) = names.iter().find(|n| !known(n)) {
                return Err(UsageError::new(format!(
                    "--{flag} {name}: not one of the -i interfaces"
                )));
            }
        }
        let policy = file.map(config::policy).unwrap_or_default();
        if let Some(denied) = statics.keys().find(|g| !policy.permits(**g)) {
            return Err(UsageError::new(format!(
                "--static {denied}: the group is denied by the configuration's [policy]"
            )));
        }
        let port_xdp_modes = file
            .map(|f| {
                f.ports
                    .iter()
                    .map(|p| (p.name.clone(), config::xdp_mode_for(f, args, matches, &p.name)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            patterns: args.ifaces.clone(),
            ports,
            statics,
            per_client: args.per_client.clone(),
            xdp_mode: args.xdp_mode,
            port_xdp_modes,
            policy,
            membership,
            hello_interval,
            hello_holdtime,
            membership_args: m.clone(),
        })
    }

    /// The XDP mode for an interface (a `[[port]]` entry's own mode, else the general one).
    pub fn xdp_mode_for(&self, iface: &str) -> XdpMode {
        self.port_xdp_modes
            .iter()
            .find(|(pattern, _)| ports::matches_any(std::slice::from_ref(pattern), iface))
            .map_or(self.xdp_mode, |(_, mode)| *mode)
    }

    /// Engine options of a port (its addresses are filled in by the caller).
    pub fn port_options(&self, link: &Link) -> PortOptions {
        self.port_options_named(&link.name)
    }

    fn port_options_named(&self, name: &str) -> PortOptions {
        let m = &self.membership_args;
        PortOptions {
            fast_leave: ports::matches_any(&m.fast_leave, name),
            querier: !m.no_querier,
            igmp_version: if m.igmp_version == 2 { IgmpVersion::V2 } else { IgmpVersion::V3 },
            mld_version: if m.mld_version == 1 { MldVersion::V1 } else { MldVersion::V2 },
            router_port: ports::matches_any(&m.router_ports, name),
            ..PortOptions::default()
        }
    }
}

/// Where the settings come from: the command line and (optionally) the configuration file,
/// read again on reload.
pub struct ConfigSource {
    cli_args: RunArgs,
    matches: ArgMatches,
    path: Option<PathBuf>,
}

impl ConfigSource {
    /// Reads the configuration file (if any) and merges the command line over it.
    fn load(&self) -> anyhow::Result<(RunArgs, Option<ConfigFile>)> {
        let Some(path) = self.path.clone().or_else(|| config::run_config_path(&self.cli_args))
        else {
            return Ok((self.cli_args.clone(), None));
        };
        let file = config::load(&path).map_err(|e| anyhow!(UsageError::from(e)))?;
        for warning in config::warnings(&file) {
            tracing::warn!("{}: {warning}", path.display());
        }
        let args = config::merge(&file, self.cli_args.clone(), &self.matches);
        Ok((args, Some(file)))
    }
}

/// Everything a running daemon holds.
struct Daemon {
    handle: Handle,
    dp: Dataplane,
    plan: Plan,
    source: ConfigSource,
    unknown: UnknownArg,
    /// Ports on which mcrelay turned allmulticast on (turned off again at exit).
    allmulti_set: Vec<u32>,
    /// Memberships of vanished ports, by interface name.
    remembered: BTreeMap<String, Remembered>,
    start: tokio::time::Instant,
}

/// Runs the daemon until SIGINT or SIGTERM.
/// The signals the daemon handles, installed before anything is attached: a SIGTERM that
/// arrives at any moment after start-up must lead to an orderly exit, not the default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
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

pub async fn run(
    cli_args: RunArgs,
    cli_pin_root: &Path,
    matches: ArgMatches,
) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let source = ConfigSource { cli_args, matches, path: None };
    let (args, file) = source.load()?;
    let pin_root = match &file {
        Some(f) => config::pin_root(f, cli_pin_root, &source.matches),
        None => cli_pin_root.to_path_buf(),
    };
    let pin_root = pin_root.as_path();
    // Subscribe before listing, so no interface can appear unseen in between.
    let links_rx = ports::monitor()?;
    let handle = ports::connect()?;
    let links = ports::list(&handle).await?;
    let plan = Plan::new(&args, &links, file.as_ref(), &source.matches)?;

    let _lock = lock_instance()?;
    let pin_root = crate::bpffs::ensure(pin_root)?;
    let pin_root = pin_root.as_path();
    let pin_dir = paths::pin_dir(pin_root)?;
    remove_other_layouts(&pin_dir);
    // We hold the instance lock: pins in `pin_dir` belong to a daemon that exited or died;
    // Dataplane::load reuses its maps and `attach` adopts its links.
    let existed = pin_dir.exists();
    let mut dp = match Dataplane::load(Some(&pin_dir), args.unknown.into()) {
        Ok(dp) => dp,
        Err(e) => {
            if !existed {
                remove_pins(&pin_dir);
            }
            return Err(e.into());
        }
    };
    dp.set_pin_links(!args.no_pin);
    if dp.adopted() {
        tracing::info!(
            "taking over from the previous daemon (pinned maps and links in {})",
            pin_dir.display()
        );
    }
    let metrics_listen = file.as_ref().and_then(|f| f.metrics_listen);
    let mut daemon = Daemon {
        handle,
        dp,
        plan,
        source,
        unknown: args.unknown,
        allmulti_set: Vec::new(),
        remembered: BTreeMap::new(),
        start: tokio::time::Instant::now(),
    };

    let mut control = match daemon.start_up().await {
        Ok(c) => c,
        Err(e) => {
            if daemon.dp.adopted() {
                // Taking over failed: undo only what this run attached; the previous daemon's
                // pinned links and maps keep forwarding as before.
                tracing::error!("take-over failed, leaving the pinned dataplane as it was: {e:#}");
                let own: Vec<u32> =
                    daemon.dp.ports().filter(|p| !p.adopted).map(|p| p.link.index).collect();
                for ifindex in own {
                    daemon.dp.detach(ifindex);
                }
                return Err(e);
            }
            tracing::error!("setup failed, rolling back: {e:#}");
            teardown(&daemon.handle, daemon.dp, &daemon.allmulti_set).await;
            return Err(e);
        }
    };

    let summary: Vec<String> =
        daemon.dp.ports().map(|p| format!("{}({})", p.link.name, p.mode.as_str())).collect();
    tracing::info!(
        "mcrelay ready: {} port(s) [{}], {} static group(s), pins in {}",
        summary.len(),
        summary.join(", "),
        daemon.plan.statics.len(),
        pin_dir.display()
    );

    let status = format!("relaying on {} port(s): {}", summary.len(), summary.join(", "));
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
        tracing::warn!("telling systemd we are ready: {e}");
    }

    let metrics = metrics_listen.map(|listen| {
        tracing::info!(%listen, "serving Prometheus metrics on /metrics");
        let root = pin_root.to_path_buf();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listen, root).await {
                tracing::error!("metrics endpoint on {listen}: {e:#}");
            }
        })
    });

    let result = daemon.control_loop(signals, &mut control, links_rx).await;
    if let Some(task) = metrics {
        task.abort();
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    if let Ok(path) = paths::state_file() {
        let _ = std::fs::remove_file(path);
    }
    if args.no_pin {
        tracing::info!("shutting down: detaching from every port (--no-pin)");
        teardown(&daemon.handle, daemon.dp, &daemon.allmulti_set).await;
    } else {
        tracing::info!(
            "exiting; XDP links and maps stay pinned in {}, so forwarding continues and the \
             next mcrelay takes over (`mcrelay detach` removes them)",
            pin_dir.display()
        );
    }
    result
}

/// Removes the pins of other map-layout versions in this namespace (an upgrade that changed
/// the layout): unpinning their links detaches them. A clean re-create, never a reuse of a
/// map whose layout differs.
fn remove_other_layouts(pin_dir: &Path) {
    let (Some(root), Some(current)) = (pin_dir.parent(), pin_dir.file_name()) else { return };
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name != current && name.to_string_lossy().starts_with('v') {
            tracing::warn!(
                "removing pins of another map layout ({}): re-creating from scratch",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Daemon {
    /// Attaches to the ports that exist now and starts the control plane. Any error here is
    /// rolled back by the caller.
    async fn start_up(&mut self) -> anyhow::Result<Control> {
        let ports = self.plan.ports.clone();
        for port in &ports {
            self.attach(port).await?;
        }
        let socket = ControlSocket::open().map_err(|e| {
            if e.to_string().contains("Operation not permitted") {
                anyhow!(UsageError::new(format!("{e:#}: mcrelay run needs CAP_NET_RAW")))
            } else {
                e.context("opening the IGMP/MLD packet socket")
            }
        })?;
        let mut table = GroupTable::new(BTreeMap::new());
        table.set_policy(self.plan.policy.clone());
        let guard = LoopGuard::new(self.dp.relay_mac(), self.plan.hello_holdtime);
        tracing::info!(relay_mac = %state::mac_string(&self.dp.relay_mac()), "loop guard: relayed frames carry this source MAC");
        let mut control =
            Control::new(Engine::new(self.plan.membership.clone()), table, socket, guard);
        for port in &ports {
            self.add_to_control(&mut control, port).await?;
        }
        self.dp.prune_stale_ports();
        if self.dp.adopted() {
            // Router ports are relearned (configured ones come back with the ports); the
            // previous daemon's may name interfaces that are gone.
            self.dp.set_router_ports(&[])?;
            let installed = adopted_sets(&self.dp);
            tracing::info!(
                groups = installed.len(),
                "adopted the previous daemon's group port sets"
            );
            control.table.adopt(installed);
        }
        self.sync_statics(&mut control)?;
        for (group, names) in &self.plan.statics {
            tracing::info!(group = %group, ports = ?names, "static group");
        }
        control.process_actions(&mut self.dp)?;
        Ok(control)
    }

    /// Prepares a port (allmulticast) and attaches the program.
    async fn attach(&mut self, port: &Link) -> anyhow::Result<()> {
        if !port.multicast {
            tracing::warn!(
                iface = %port.name,
                "interface has no MULTICAST flag; the local stack will not join groups on it \
                 (ip link set {} multicast on)",
                port.name
            );
        }
        if !port.allmulti {
            ports::set_allmulti(&self.handle, port.index, true).await?;
            self.allmulti_set.push(port.index);
        }
        let (mode, fallback) = self.dp.attach(port, self.plan.xdp_mode_for(&port.name))?;
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
        Ok(())
    }

    /// Registers an attached port with the membership engine.
    async fn add_to_control(&self, control: &mut Control, port: &Link) -> anyhow::Result<()> {
        let addrs = ports::addresses(&self.handle).await?;
        let mut opts = self.plan.port_options(port);
        let a = addrs.get(&port.index).copied().unwrap_or_default();
        opts.ipv4 = a.v4;
        opts.ipv6 = a.v6_link_local;
        if let Some(mac) = port.mac {
            control.macs.insert(port.index, mac);
        }
        control.names.insert(port.index, port.name.clone());
        if ports::matches_any(&self.plan.per_client, &port.name) {
            tracing::info!(iface = %port.name, "per-client delivery: one copy per joined client, to its unicast MAC");
            control.per_client_ports.insert(port.index);
        }
        control.engine.add_port(self.start.elapsed(), port.index, opts);
        Ok(())
    }

    /// Recomputes static port sets from interface names (ifindexes change when an interface
    /// is re-created).
    fn sync_statics(&mut self, control: &mut Control) -> anyhow::Result<()> {
        let by_name: BTreeMap<&String, u32> = control.names.iter().map(|(i, n)| (n, *i)).collect();
        let statics: BTreeMap<IpAddr, BTreeSet<u32>> = self
            .plan
            .statics
            .iter()
            .map(|(g, names)| (*g, names.iter().filter_map(|n| by_name.get(n).copied()).collect()))
            .collect();
        let engine = &control.engine;
        match control.table.set_statics(&mut self.dp, |g| engine.forwarding(g), statics) {
            Ok(_) => Ok(()),
            Err(e) => {
                control.count_write_failures(&e);
                Ok(())
            }
        }
    }

    /// SIGHUP: reads the configuration again and applies the difference. Everything is
    /// validated first; an invalid configuration changes nothing. Groups whose ports did not
    /// change are not touched.
    async fn reload(&mut self, control: &mut Control) -> anyhow::Result<String> {
        let (args, file) = self.source.load()?;
        let links = ports::list(&self.handle).await?;
        let plan = Plan::new(&args, &links, file.as_ref(), &self.source.matches)?;
        let mut changes = Vec::new();
        if plan.membership != self.plan.membership {
            changes.push("timer changes take effect after a restart".to_string());
        }
        if args.unknown != self.unknown {
            self.dp.set_unknown_policy(args.unknown.into())?;
            self.unknown = args.unknown;
            changes.push(format!("unknown groups: {:?}", args.unknown));
        }
        let old = std::mem::replace(&mut self.plan, plan);
        // Ports no longer wanted.
        let gone: Vec<(u32, String)> = control
            .names
            .iter()
            .filter(|(_, name)| !ports::matches_any(&self.plan.patterns, name))
            .map(|(i, n)| (*i, n.clone()))
            .collect();
        for (ifindex, name) in gone {
            if self.allmulti_set.contains(&ifindex) {
                if let Err(e) = ports::set_allmulti(&self.handle, ifindex, false).await {
                    tracing::warn!(iface = %name, "restoring allmulticast: {e:#}");
                }
            }
            self.on_link_removed(control, ifindex);
            changes.push(format!("-{name}"));
        }
        // Ports newly wanted.
        for link in links {
            if !control.names.contains_key(&link.index)
                && ports::matches_any(&self.plan.patterns, &link.name)
            {
                let name = link.name.clone();
                self.on_link_new(control, link).await;
                if control.names.values().any(|n| *n == name) {
                    changes.push(format!("+{name}"));
                }
            }
        }
        // Per-port options (fast leave, router role) of the ports that stay.
        let existing: Vec<(u32, String)> =
            control.names.iter().map(|(i, n)| (*i, n.clone())).collect();
        let addrs = ports::addresses(&self.handle).await?;
        for (ifindex, name) in existing {
            let (o, n) = (old.port_options_named(&name), self.plan.port_options_named(&name));
            if o != n {
                let mut opts = n;
                let a = addrs.get(&ifindex).copied().unwrap_or_default();
                opts.ipv4 = a.v4;
                opts.ipv6 = a.v6_link_local;
                control.engine.add_port(self.start.elapsed(), ifindex, opts);
                changes.push(format!("options of {name}"));
            }
        }
        if old.statics != self.plan.statics {
            changes.push("static groups".into());
        }
        self.sync_statics(control)?;
        if old.policy != self.plan.policy {
            changes.push("group policy".into());
            control.table.set_policy(self.plan.policy.clone());
            let engine = &control.engine;
            let learned: Vec<IpAddr> = engine.groups(Duration::ZERO).map(|g| g.group).collect();
            if let Err(e) = control.table.reapply(&mut self.dp, |g| engine.forwarding(g), learned) {
                control.count_write_failures(&e);
            }
        }
        Ok(if changes.is_empty() { "no change".into() } else { changes.join(", ") })
    }

    /// An interface appeared (or changed): attach when it matches and is new.
    async fn on_link_new(&mut self, control: &mut Control, link: Link) {
        if control.names.contains_key(&link.index)
            || !ports::matches_any(&self.plan.patterns, &link.name)
        {
            return;
        }
        tracing::info!(iface = %link.name, ifindex = link.index, "interface appeared");
        let result = async {
            self.attach(&link).await?;
            self.add_to_control(control, &link).await?;
            self.sync_statics(control)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(iface = %link.name, "could not attach to a new interface: {e:#}");
            self.dp.detach(link.index);
            control.engine.remove_port(link.index);
            control.names.remove(&link.index);
        } else if let Some(r) = self.remembered.remove(&link.name) {
            let now = self.start.elapsed();
            if r.until > now {
                tracing::info!(
                    iface = %link.name,
                    groups = r.records.len(),
                    "re-created interface: restoring its memberships until members report again"
                );
                r.restore(control, link.index, now);
            }
        }
        control.dirty = true;
    }

    /// An interface vanished: forget the port and what was learned on it (remembered by name
    /// for one membership interval, see [`Remembered`]).
    fn on_link_removed(&mut self, control: &mut Control, ifindex: u32) {
        let Some(name) = control.names.get(&ifindex).cloned() else { return };
        let now = self.start.elapsed();
        let remembered = Remembered::of_port(control, ifindex, now);
        if !remembered.is_empty() {
            self.remembered.insert(name.clone(), remembered);
        }
        control.names.remove(&ifindex);
        tracing::info!(iface = %name, ifindex, "interface vanished; dropping its port state");
        control.table.forget_port(ifindex);
        self.dp.detach(ifindex);
        control.engine.remove_port(ifindex);
        control.macs.remove(&ifindex);
        control.per_client_ports.remove(&ifindex);
        control.clients.retain(|(_, port), _| *port != ifindex);
        self.allmulti_set.retain(|i| *i != ifindex);
        if let Err(e) = self.sync_statics(control) {
            tracing::warn!("updating static groups: {e:#}");
        }
        control.dirty = true;
    }

    /// Receives control frames and link events, runs timers and keeps the maps current until
    /// a signal arrives.
    async fn control_loop(
        &mut self,
        signals: Signals,
        control: &mut Control,
        mut links: UnboundedReceiver<LinkEvent>,
    ) -> anyhow::Result<()> {
        let Signals { mut term, mut int, mut hup } = signals;
        let start = self.start;
        let state_path = paths::state_file()?;
        let mut flush = tokio::time::interval(Duration::from_millis(250));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received_at = None;
        let mut links_closed = false;
        let mut flushes: u64 = 0;
        let adoption_ends = start + self.plan.membership.gmi();
        // systemd's watchdog (WatchdogSec=): ping at half the interval.
        let watchdog = sd_notify::watchdog_enabled();
        let mut last_status = String::new();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
        let mut hello_tick = tokio::time::interval(self.plan.hello_interval);
        hello_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = control
                .engine
                .next_deadline()
                .map_or(start + Duration::from_secs(3600), |d| start + d);
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM"); return Ok(()); }
                _ = int.recv() => { tracing::info!("SIGINT"); return Ok(()); }
                _ = hup.recv() => {
                    let _ = sd_notify::notify(&[NotifyState::Reloading]);
                    match self.reload(control).await {
                        Ok(summary) => tracing::info!("reloaded: {summary}"),
                        Err(e) => tracing::error!("reload rejected, running state kept: {e:#}"),
                    }
                    let _ = sd_notify::notify(&[NotifyState::Ready]);
                    control.dirty = true;
                }
                received = control.socket.recv() => {
                    let r = received.context("receiving on the packet socket")?;
                    received_at = Some(tokio::time::Instant::now());
                    control.on_frame(start.elapsed(), r.ifindex, &r.frame);
                    if control.hello_due() {
                        control.send_hellos();
                    }
                    if let Err(e) = control.update_loop_guard(start.elapsed(), &mut self.dp) {
                        tracing::warn!("loop guard: {e:#}");
                    }
                }
                _ = hello_tick.tick() => {
                    control.hello_due();
                    control.send_hellos();
                    if let Err(e) = control.update_loop_guard(start.elapsed(), &mut self.dp) {
                        tracing::warn!("loop guard: {e:#}");
                    }
                }
                event = links.recv(), if !links_closed => match event {
                    Some(LinkEvent::New(link)) => self.on_link_new(control, link).await,
                    Some(LinkEvent::Removed(ifindex)) => self.on_link_removed(control, ifindex),
                    None => {
                        links_closed = true;
                        tracing::error!(
                            "the netlink link monitor stopped: interfaces that appear or vanish \
                             from now on are not noticed (restart mcrelay)"
                        );
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    control.engine.tick(start.elapsed());
                    control.dirty = true;
                }
                () = tokio::time::sleep_until(adoption_ends), if control.table.adopting() => {
                    tracing::info!("membership interval since take-over passed: dropping adopted port sets nobody renewed");
                    let engine = &control.engine;
                    if let Err(e) = control.table.end_adoption(&mut self.dp, |g| engine.forwarding(g)) {
                        control.count_write_failures(&e);
                    }
                    control.dirty = true;
                }
                _ = watchdog_tick.tick(), if watchdog.is_some() => {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
                _ = flush.tick() => {
                    // Rewrite after changes, and at least once a second: counters (per-client
                    // copies, remaining timers) move without any control-plane event.
                    flushes += 1;
                    if control.dirty || flushes.is_multiple_of(4) {
                        control.dirty = false;
                        let status = format!(
                            "{} port(s), {} group(s), {} queries sent",
                            control.names.len(),
                            control.table.installed().len(),
                            control.counters.queries_sent
                        );
                        if status != last_status {
                            let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
                            last_status = status;
                        }
                        let mut snapshot = control.snapshot(start.elapsed());
                        snapshot.clients = client_states(control, &self.dp);
                        if let Err(e) = state::write(&state_path, &snapshot) {
                            tracing::warn!("{e:#}");
                        }
                    }
                }
            }
            control.expire_clients(start.elapsed());
            let updates = control.counters.group_updates;
            // A failed map write (full map, a port that vanished under us) must not end the
            // daemon: log it; the group is rewritten on its next change.
            if let Err(e) = control.process_actions(&mut self.dp) {
                control.counters.map_errors += 1;
                tracing::error!("updating the maps: {e:#}");
            }
            if let Some(at) = received_at.take() {
                if control.counters.group_updates != updates {
                    let done = at.elapsed().as_micros() as u64;
                    let visible = self.dp.last_publish().map_or(done, |p| {
                        p.saturating_duration_since(at.into_std()).as_micros() as u64
                    });
                    let c = &mut control.counters;
                    c.last_update_us = visible;
                    c.max_update_us = c.max_update_us.max(visible);
                    c.last_update_done_us = done;
                    tracing::debug!(
                        visible_us = visible,
                        done_us = done,
                        "report applied to the maps"
                    );
                }
            }
        }
    }
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
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow!(UsageError::new(format!(
            "another mcrelay is already running in this network namespace ({}: {errno})",
            path.display()
        )))
    })?;
    // The pid, for `mcrelay reload` (SIGHUP).
    {
        use std::io::{Seek as _, Write as _};
        let file: &mut std::fs::File = &mut lock;
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
    }
    Ok(lock)
}

/// `mcrelay reload`: sends SIGHUP to this namespace's daemon.
pub fn reload() -> anyhow::Result<()> {
    let path = paths::lock_file()?;
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow!("no mcrelay daemon in this network namespace ({} missing)", path.display())
    })?;
    let file = std::fs::File::open(&path)?;
    if Flock::lock(file, FlockArg::LockSharedNonblock).is_ok() {
        return Err(anyhow!("no mcrelay daemon is running in this network namespace"));
    }
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| anyhow!("{} does not hold a process id", path.display()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .with_context(|| format!("sending SIGHUP to mcrelay (pid {pid})"))?;
    println!("sent SIGHUP to mcrelay (pid {pid})");
    Ok(())
}

/// The port sets found in adopted maps, by group.
fn adopted_sets(dp: &Dataplane) -> BTreeMap<IpAddr, Installed> {
    let mut out: BTreeMap<IpAddr, Installed> = BTreeMap::new();
    for (key, ports) in dp.group_port_sets() {
        // Per-client entries name the previous daemon's client ids, which mean nothing now:
        // those clients get their entries back when they report again.
        let ports: Vec<u32> = ports.into_iter().filter(|k| k & CLIENT_KEY_BIT == 0).collect();
        let group = key_group(&key);
        let entry = out.entry(group).or_default();
        if key.source == [0; 16] {
            entry.any_source.extend(ports);
        } else {
            let source = key_group(&GroupKey { group: key.source, source: [0; 16] });
            entry.per_source.entry(source).or_default().extend(ports);
        }
    }
    out
}

/// Per-client delivery state for `mcrelay groups`.
fn client_states(control: &Control, dp: &Dataplane) -> Vec<state::ClientState> {
    dp.client_copies()
        .into_iter()
        .map(|(port, mac, copies)| state::ClientState {
            port: control.name(port),
            mac: state::mac_string(&mac),
            groups: control
                .clients
                .iter()
                .filter(|((_, p), macs)| *p == port && macs.contains_key(&mac))
                .map(|((g, _), _)| g.to_string())
                .collect(),
            copies,
        })
        .collect()
}

/// What a vanished port had learned. An interface that is destroyed and created again under
/// the same name within one group membership interval (an OpenVPN restart re-creates its tap)
/// gets these memberships back at once, as if its members had just reported: forwarding
/// resumes as soon as the device exists, not when the next query is answered (hosts behind it
/// never noticed the flap and send no report by themselves). Members that are really gone time
/// out after one membership interval as usual.
struct Remembered {
    until: Duration,
    records: Vec<membership::GroupRecord>,
    clients: Vec<(IpAddr, [u8; 6])>,
}

impl Remembered {
    fn of_port(control: &Control, port: u32, now: Duration) -> Self {
        use membership::{FilterMode, GroupRecord, RecordType};
        let mut records = Vec::new();
        for g in control.engine.groups(now) {
            for p in g.ports.iter().filter(|p| p.port == port) {
                let record = match p.mode {
                    FilterMode::Exclude => GroupRecord {
                        kind: RecordType::IsExclude,
                        group: g.group,
                        sources: p
                            .sources
                            .iter()
                            .filter(|s| s.timer.is_none())
                            .map(|s| s.source)
                            .collect(),
                    },
                    FilterMode::Include => GroupRecord {
                        kind: RecordType::IsInclude,
                        group: g.group,
                        sources: p.sources.iter().map(|s| s.source).collect(),
                    },
                };
                records.push(record);
            }
        }
        let clients = control
            .clients
            .iter()
            .filter(|((_, p), _)| *p == port)
            .flat_map(|((g, _), macs)| macs.keys().map(move |m| (*g, *m)))
            .collect();
        Self { until: now + control.engine.config().gmi(), records, clients }
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.clients.is_empty()
    }

    fn restore(self, control: &mut Control, port: u32, now: Duration) {
        use membership::{Message, MessageKind};
        let (v4, v6): (Vec<_>, Vec<_>) = self.records.into_iter().partition(|r| r.group.is_ipv4());
        for (records, source) in [
            (v4, IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)),
            (v6, IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)),
        ] {
            if !records.is_empty() {
                let msg = Message { source, kind: MessageKind::V3Report { records } };
                control.engine.handle(now, port, &msg);
            }
        }
        for (group, mac) in self.clients {
            control.restore_client(group, port, mac, now);
        }
    }
}
