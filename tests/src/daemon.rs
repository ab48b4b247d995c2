//! The real `mcrelay` binary: a guard around a running daemon and one-shot subcommands.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Condvar, Mutex, Once,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    cmd::{describe, output_with_timeout},
    groups::{is_member, port_names},
    netns::NetNs,
    workspace_root,
};

/// What the daemon prints on stderr once every port is attached.
pub const READY_LINE: &str = "mcrelay ready";
/// How long the daemon may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Root of every pin mcrelay makes.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mcrelay";
/// How long a one-shot subcommand (`stats`, `groups`, ...) may take.
pub const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(20);

/// The `mcrelay` binary under test: `$MCRELAY_BIN` (set by `cargo xtask test`), else
/// `<target dir>/debug/mcrelay`. Panics when it does not exist.
pub fn mcrelay_bin() -> PathBuf {
    let path = match std::env::var_os("MCRELAY_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace_root().join("target"), PathBuf::from)
            .join("debug/mcrelay"),
    };
    if !path.is_file() {
        panic!(
            "mcrelay binary not found at {}: build it first (`cargo build -p relay`) or point \
             MCRELAY_BIN at it (`cargo xtask test` does both)",
            path.display()
        );
    }
    path
}

/// Mounts bpffs at /sys/fs/bpf once per test process when nothing is mounted there.
///
/// The daemon mounts it itself when missing, but two daemons starting at the same moment (tests
/// run side by side) could both mount it, and the second mount would hide the first daemon's
/// pins from `mcrelay stats`. Mounting once up front removes that race from the tests.
pub fn ensure_bpffs() {
    static MOUNT: Once = Once::new();
    MOUNT.call_once(|| {
        let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
        if !mounted {
            let _ = std::fs::create_dir_all("/sys/fs/bpf");
            if let Err(e) = nix::mount::mount(
                Some("bpf"),
                "/sys/fs/bpf",
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            ) {
                eprintln!(
                    "note: could not mount bpffs at /sys/fs/bpf ({e}); leaving it to mcrelay"
                );
            }
        }
    });
}

/// The daemon's stderr so far, and a condition signalled on every new line.
type Log = Arc<(Mutex<LogState>, Condvar)>;

#[derive(Default)]
struct LogState {
    text: String,
    closed: bool,
}

/// A running `mcrelay` process in a network namespace; SIGTERM (then SIGKILL) when dropped.
pub struct Mcrelay {
    child: Child,
    exit: Option<ExitStatus>,
    what: String,
    log: Log,
    reader: Option<thread::JoinHandle<()>>,
}

impl Mcrelay {
    /// Starts [`mcrelay_bin`] with `args` (e.g. `["run", "-i", "gw0", ...]`) in `ns`.
    pub fn start(ns: &NetNs, args: &[&str]) -> Self {
        Self::start_with(&mcrelay_bin(), ns, args, false)
    }

    /// Starts [`mcrelay_bin`] with `args` in `ns` and waits until it is ready (see
    /// [`Mcrelay::wait_ready`]).
    pub fn start_ready<S: AsRef<str>>(ns: &NetNs, args: &[S]) -> Self {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let mut relay = Self::start(ns, &args);
        relay.wait_ready();
        relay
    }

    /// Starts `bin` with `args` in `ns` (network namespace only, see [`NetNs::command`]), stderr
    /// captured. With `own_process_group`, a Ctrl-C on the terminal does not reach the daemon,
    /// so that the caller decides when it stops.
    pub fn start_with(bin: &Path, ns: &NetNs, args: &[&str], own_process_group: bool) -> Self {
        let mut cmd = ns.command(bin);
        cmd.args(args);
        if own_process_group {
            cmd.process_group(0);
        }
        let what = format!("`{}` in {ns}", describe(&cmd));
        Self::spawn(cmd, what)
    }

    /// Starts `cmd`, a complete `mcrelay run ...` command line built by the caller (e.g.
    /// `ip netns exec NS mcrelay run ...`, the way users start it), stderr captured. The
    /// process started must become the daemon itself (`ip netns exec` and `nsenter` exec it),
    /// since [`Mcrelay::stop`] signals it.
    pub fn start_command(cmd: Command) -> Self {
        let what = format!("`{}`", describe(&cmd));
        Self::spawn(cmd, what)
    }

    fn spawn(mut cmd: Command, what: String) -> Self {
        ensure_bpffs();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let log: Log = Arc::default();
        let reader = child.stderr.take().map(|stderr| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let (lock, changed) = &*log;
                    if let Ok(mut state) = lock.lock() {
                        state.text.push_str(&line);
                        state.text.push('\n');
                    }
                    changed.notify_all();
                }
                let (lock, changed) = &*log;
                if let Ok(mut state) = lock.lock() {
                    state.closed = true;
                }
                changed.notify_all();
            })
        });
        Self { child, exit: None, what, log, reader }
    }

    /// Waits until the daemon reports ready; panics (showing its stderr) if it exits first or
    /// takes longer than [`READY_TIMEOUT`].
    pub fn wait_ready(&mut self) {
        if let Err(status) = self.wait_ready_or_exit(READY_TIMEOUT) {
            panic!(
                "{} exited ({status}) before it was ready; stderr:\n{}",
                self.what,
                self.stderr()
            );
        }
    }

    /// Waits until the daemon reports ready (`Ok`) or exits (`Err` with its status); panics after
    /// `timeout`.
    pub fn wait_ready_or_exit(&mut self, timeout: Duration) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(READY_LINE) {
                return Ok(());
            }
            if let Some(status) = self.try_exit_status() {
                self.wait_log_closed(Duration::from_secs(2));
                if self.stderr().contains(READY_LINE) {
                    return Ok(());
                }
                return Err(status);
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not ready after {timeout:?} (no line containing {READY_LINE:?}); stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            let (lock, changed) = &*self.log;
            if let Ok(state) = lock.lock() {
                let _ = changed.wait_timeout(state, Duration::from_millis(20));
            }
        }
    }

    /// Waits until the daemon exits by itself; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                self.wait_log_closed(Duration::from_secs(2));
                return status;
            }
            if Instant::now() >= deadline {
                panic!("{} still running after {timeout:?}; stderr:\n{}", self.what, self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.0.lock().map(|state| state.text.clone()).unwrap_or_default()
    }

    /// The exit status if the daemon has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit ([`STOP_TIMEOUT`], then SIGKILL); returns the exit
    /// status. Does nothing more if the daemon already exited.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.try_exit_status() {
            return status;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                self.wait_log_closed(Duration::from_secs(2));
                return status;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it", self.what);
        let _ = self.child.kill();
        let status = self.child.wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        self.exit = Some(status);
        status
    }

    /// What was started, for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }

    fn wait_log_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.log;
        let Ok(mut state) = lock.lock() else { return };
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            match changed.wait_timeout(state, deadline - now) {
                Ok((next, _)) => state = next,
                Err(_) => return,
            }
        }
    }
}

impl Drop for Mcrelay {
    fn drop(&mut self) {
        let status = self.stop();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if thread::panicking() {
            eprintln!("--- {} ({status}) stderr ---\n{}---", self.what, self.stderr());
        }
    }
}

/// Where mcrelay pins for the instance of a network namespace (`/sys/fs/bpf/mcrelay/ns-<inode>`).
pub fn pin_root_of(ns: &NetNs) -> PathBuf {
    pin_root_of_path(ns.path()).unwrap_or_else(|| panic!("cannot stat {}", ns.path().display()))
}

/// [`pin_root_of`] for a namespace file (`/run/netns/NAME`); `None` if it cannot be read.
pub fn pin_root_of_path(netns_path: &Path) -> Option<PathBuf> {
    let inode = std::fs::metadata(netns_path).ok()?.ino();
    Some(Path::new(PIN_ROOT).join(format!("ns-{inode}")))
}

/// Every file (pin) under [`pin_root_of`] `ns`; empty when the instance left nothing behind.
pub fn leftover_pins(ns: &NetNs) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, found);
            } else {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&pin_root_of(ns), &mut found);
    found
}

/// Runs `mcrelay ARGS` ([`mcrelay_bin`]) in `ns` to completion.
pub fn mcrelay_output(ns: &NetNs, args: &[&str]) -> Output {
    mcrelay_output_with(&mcrelay_bin(), ns, args)
}

/// Runs `bin ARGS` in `ns` to completion (panics after [`ONE_SHOT_TIMEOUT`]).
pub fn mcrelay_output_with(bin: &Path, ns: &NetNs, args: &[&str]) -> Output {
    let mut cmd = ns.command(bin);
    cmd.args(args);
    output_with_timeout(cmd, ONE_SHOT_TIMEOUT)
}

/// Runs `mcrelay ARGS` (e.g. `["stats", "--json"]`) in `ns` and parses its stdout as JSON;
/// panics unless it exits 0 with valid JSON.
pub fn mcrelay_json(ns: &NetNs, args: &[&str]) -> Value {
    mcrelay_json_with(&mcrelay_bin(), ns, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Like [`mcrelay_json`] with an explicit binary, returning errors instead of panicking.
pub fn mcrelay_json_with(bin: &Path, ns: &NetNs, args: &[&str]) -> anyhow::Result<Value> {
    let out = mcrelay_output_with(bin, ns, args);
    let what = format!("`{} {}` in {ns}", bin.display(), args.join(" "));
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}); stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "{what} printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The entry of `iface` in the `ports` array of `mcrelay stats --json` / `ports --json`.
pub fn port_entry<'a>(doc: &'a Value, iface: &str) -> Option<&'a Value> {
    doc.get("ports")?
        .as_array()?
        .iter()
        .find(|port| port.get("iface").and_then(Value::as_str) == Some(iface))
}

/// Counter `key` of section `section` (`packets`, `bytes` or `counters`) of `iface` in a
/// `mcrelay stats --json` / `ports --json` document; panics (showing the document) if missing.
pub fn port_counter(doc: &Value, iface: &str, section: &str, key: &str) -> u64 {
    port_entry(doc, iface)
        .and_then(|port| port.get(section))
        .and_then(|counters| counters.get(key))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| {
            panic!(
                "no {section}.{key} counter for port {iface} in:\n{}",
                serde_json::to_string_pretty(doc).unwrap_or_default()
            )
        })
}

/// How often the `wait_*` helpers run `mcrelay groups --json`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `mcrelay groups --json` in `ns`, parsed.
pub fn groups_json(ns: &NetNs) -> Value {
    mcrelay_json(ns, &["groups", "--json"])
}

/// `mcrelay ports --json` in `ns`, parsed.
pub fn ports_json(ns: &NetNs) -> Value {
    mcrelay_json(ns, &["ports", "--json"])
}

/// `mcrelay stats --json` in `ns`, parsed.
pub fn stats_json(ns: &NetNs) -> Value {
    mcrelay_json(ns, &["stats", "--json"])
}

/// The interfaces `mcrelay ports --json` lists in `ns`, in its order.
pub fn attached_ports(ns: &NetNs) -> Vec<String> {
    port_names(&ports_json(ns))
}

/// Polls `mcrelay groups --json` in `ns` every [`POLL_INTERVAL`] until `pred` holds; returns the
/// document that satisfied it and how long it took. Panics with the last document after
/// `timeout` (`what` says what was awaited).
///
/// The daemon rewrites the state file behind `groups` a few times a second, so anything it
/// learned shows up with a lag: poll, never read once.
pub fn wait_groups(
    ns: &NetNs,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    wait_groups_checked(ns, what, timeout, || {}, pred)
}

/// [`wait_groups`] that calls `check` before every poll (to fail early, e.g. when the daemon
/// died, or to keep a peer reporting).
pub fn wait_groups_checked(
    ns: &NetNs,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut(),
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        check();
        let doc = groups_json(ns);
        if pred(&doc) {
            return (doc, start.elapsed());
        }
        if start.elapsed() > timeout {
            panic!("waited {timeout:?} for {what}; mcrelay groups --json:\n{doc:#}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until `port` is in the (*,G) ports of `group`; returns how long it took.
pub fn wait_member(ns: &NetNs, group: IpAddr, port: &str, timeout: Duration) -> Duration {
    let what = format!("{port} to be a member of {group}");
    wait_groups(ns, &what, timeout, |d| is_member(d, group, port)).1
}

/// Waits until `port` is no longer in the (*,G) ports of `group`; returns how long it took.
pub fn wait_not_member(ns: &NetNs, group: IpAddr, port: &str, timeout: Duration) -> Duration {
    wait_groups(ns, &format!("{port} to leave {group}"), timeout, |d| !is_member(d, group, port)).1
}

/// Panics unless process `pid` is still running: for a daemon whose guard is held elsewhere,
/// which has exited (a zombie until the guard reaps it) if this fails; the guard then prints
/// its stderr. `what` says when, for the message.
pub fn assert_process_alive(pid: u32, what: &str) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3 (after the parenthesised command name) is the state.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z" | "X")) {
        panic!("mcrelay (pid {pid}) exited {what}; its stderr follows");
    }
}

/// A binary (normally [`mcrelay_bin`]) at a path that uid 65534 can execute: the original if
/// every directory above it is searchable by others, else a copy in a private temporary
/// directory (removed on drop).
pub struct BinaryForNobody {
    path: PathBuf,
    copy_dir: Option<PathBuf>,
}

impl BinaryForNobody {
    /// Finds or makes an executable path for `bin`.
    pub fn new(bin: &Path) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let reachable =
            bin.ancestors().skip(1).all(|dir| {
                std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
            }) && std::fs::metadata(bin).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
        if reachable {
            return Self { path: bin.to_path_buf(), copy_dir: None };
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mcrelay-nobody-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join("mcrelay");
        std::fs::copy(bin, &path).unwrap_or_else(|e| panic!("copying {}: {e}", bin.display()));
        for (p, mode) in [(&dir, 0o755), (&path, 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        }
        Self { path, copy_dir: Some(dir) }
    }

    /// Where uid 65534 can execute the binary.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `setpriv` running the binary with `args` in `ns` as uid/gid 65534, without supplementary
    /// groups or inheritable capabilities.
    pub fn command(&self, ns: &NetNs, args: &[&str]) -> Command {
        let mut cmd = ns.command("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
            .arg(self.path())
            .args(args);
        cmd
    }
}

impl Drop for BinaryForNobody {
    fn drop(&mut self) {
        if let Some(dir) = &self.copy_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
