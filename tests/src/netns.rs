//! Named network namespaces (`ip netns`) as RAII guards, and the links inside them.

use std::{
    ffi::OsStr,
    fmt,
    fs::File,
    os::{fd::OwnedFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

use crate::cmd::{self, output_with_timeout, run_checked, COMMAND_TIMEOUT};

/// Where `ip netns` keeps its namespace files.
const NETNS_DIR: &str = "/run/netns";

/// How long a link may take to become operationally up.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Name prefixes of the namespaces this test bed makes (tests: `mcr...`, the lab: `mclab-...`);
/// leftovers with these prefixes whose process is gone are removed by [`remove_stale_netns`].
pub const OWNED_PREFIXES: [&str; 2] = ["mcr", "mclab"];

/// Sysctls set in every namespace before any link exists (so `default` reaches every link).
const NETNS_SYSCTLS: [(&str, &str); 6] = [
    // Addresses usable at once: no duplicate address detection.
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    // Hosts receive multicast from senders on other segments without a route back to them.
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    // Quiet links: no router solicitations in captures and counters.
    ("net/ipv6/conf/all/router_solicitations", "0"),
    ("net/ipv6/conf/default/router_solicitations", "0"),
];

/// A named network namespace that is deleted (after killing every process in it) when dropped.
///
/// The name is `PREFIX-PID-N`: unique among concurrent tests, and a leftover of a crashed earlier
/// run with the same name is removed first.
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates the namespace, brings `lo` up and sets the test sysctls ([`NETNS_SYSCTLS`]).
    pub fn new(prefix: &str) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_stale_netns);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{id}", std::process::id());
        let path = Path::new(NETNS_DIR).join(&name);
        if path.exists() {
            remove_netns(&name);
        }
        cmd::run(&["ip", "netns", "add", &name]);
        let ns = Self { name, path };
        // Nothing can have pinned for this brand-new namespace: whatever is there belongs to a
        // killed daemon of an earlier namespace with the same (recycled) inode number.
        remove_pins_of(&ns.path);
        ns.ip(&["link", "set", "lo", "up"]);
        for (key, value) in NETNS_SYSCTLS {
            ns.sysctl(key, value);
        }
        ns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `/proc/sys/KEY` (KEY with slashes, e.g. `net/ipv4/conf/all/rp_filter`) in this
    /// namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key);
        self.in_netns(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {key}={value} in {self}: {e}"));
    }

    /// A command that runs in this network namespace only.
    ///
    /// Unlike `ip netns exec`, the command keeps the caller's mount namespace and so sees the
    /// host's /sys/fs/bpf, where mcrelay pins its maps: start `mcrelay` this way.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let fd: OwnedFd = File::open(&self.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()))
            .into();
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd owned by
        // the closure (opened with O_CLOEXEC, so the program does not inherit it).
        unsafe {
            cmd.pre_exec(move || {
                setns(&fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Runs `argv` in this namespace (see [`NetNs::command`]), panics unless it exits 0, returns
    /// its stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        let (program, args) = argv.split_first().expect("exec: empty command line");
        let mut cmd = self.command(program);
        cmd.args(args);
        run_checked(cmd)
    }

    /// `ip -n NAME ARGS...`; panics unless it succeeds; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run_checked(cmd)
    }

    /// The MAC of `iface` in this namespace (`ip -j link show`).
    pub fn mac(&self, iface: &str) -> [u8; 6] {
        let out = self.ip(&["-j", "link", "show", "dev", iface]);
        let doc: serde_json::Value = serde_json::from_str(&out).expect("ip -j link show");
        let text = doc[0]["address"].as_str().unwrap_or_default().to_string();
        let bytes: Vec<u8> =
            text.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
        bytes.try_into().unwrap_or_else(|_| panic!("MAC of {iface} in {self}: {text:?}"))
    }

    /// Runs `f` on a thread that has entered this network namespace and returns its result.
    ///
    /// Sockets created by `f` stay in this namespace wherever they are used afterwards.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(&self.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()));
        let name = &self.name;
        thread::scope(|scope| {
            let worker = scope.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into network namespace {name}: {e}"));
                f()
            });
            worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The interface index of `iface` in this namespace.
    pub fn ifindex(&self, iface: &str) -> u32 {
        self.in_netns(|| nix::net::if_::if_nametoindex(iface))
            .unwrap_or_else(|e| panic!("no interface {iface} in {self}: {e}"))
    }

    /// Adds an address (`198.18.1.2/24`, `fd00::2/64`) to `iface`; IPv6 addresses with
    /// `nodad`, so that they are usable at once.
    pub fn add_addr(&self, iface: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["addr", "add", cidr, "dev", iface, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", iface]);
        }
    }

    /// `ethtool -K IFACE gro on`: gives a veth NAPI, which it needs to receive frames that an
    /// XDP program redirected into its peer.
    pub fn gro_on(&self, iface: &str) {
        self.exec(&["ethtool", "-K", iface, "gro", "on"]);
    }

    /// `ethtool -K IFACE tx off`: full UDP checksums from local senders, which an XDP redirect
    /// never fills in.
    pub fn tx_off(&self, iface: &str) {
        self.exec(&["ethtool", "-K", iface, "tx", "off"]);
    }

    /// Brings `iface` up.
    pub fn link_up(&self, iface: &str) {
        self.ip(&["link", "set", iface, "up"]);
    }

    /// Adds an interface whose driver has no native XDP (dummy, else ifb, else a bridge: the
    /// first kind this kernel has), up; returns the kind.
    pub fn add_plain_device(&self, name: &str) -> &'static str {
        for kind in ["dummy", "ifb", "bridge"] {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", &self.name, "link", "add", name, "type", kind]);
            if output_with_timeout(cmd, COMMAND_TIMEOUT).status.success() {
                self.link_up(name);
                return kind;
            }
        }
        panic!("cannot create a dummy, ifb or bridge device in {self}");
    }

    /// Adds a Linux bridge, up.
    pub fn add_bridge(&self, name: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.link_up(name);
    }

    /// Makes `iface` a port of `bridge`.
    pub fn set_master(&self, iface: &str, bridge: &str) {
        self.ip(&["link", "set", iface, "master", bridge]);
    }

    /// `ip -j -d link show dev IFACE`, parsed.
    pub fn link_json(&self, iface: &str) -> Value {
        let out = self.ip(&["-j", "-d", "link", "show", "dev", iface]);
        let doc: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`ip -j -d link show dev {iface}` in {self}: {e}:\n{out}"));
        doc.get(0).cloned().unwrap_or(Value::Null)
    }

    /// The XDP attachment of `iface` as `ip -d link show` reports it, or `None`.
    ///
    /// Reads both the JSON (`"xdp"` key) and the text form, so that a change in iproute2's JSON
    /// layout cannot turn "attached" into "not attached".
    pub fn xdp_attachment(&self, iface: &str) -> Option<String> {
        let json = self.link_json(iface);
        if let Some(xdp) = json.get("xdp") {
            return Some(xdp.to_string());
        }
        let text = self.ip(&["-d", "link", "show", "dev", iface]);
        text.split_whitespace()
            .find(|word| word.starts_with("xdp") || word.starts_with("prog/xdp"))
            .map(|_| text.clone())
    }

    /// Waits until `iface` is operationally up (carrier on both ends of a veth).
    pub fn wait_oper_up(&self, iface: &str) {
        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        loop {
            let link = self.link_json(iface);
            let state = link.get("operstate").and_then(Value::as_str).unwrap_or("");
            if state == "UP" {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{iface} in {self} is not up after {LINK_UP_TIMEOUT:?} (operstate {state:?})"
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Process ids of every process in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        netns_pids(&self.name)
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns {}", self.name)
    }
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetNs({})", self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

fn netns_pids(name: &str) -> Vec<i32> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "pids", name]);
    let out = output_with_timeout(cmd, COMMAND_TIMEOUT);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Removes namespaces left behind by crashed runs: names `PREFIX-PID-N` with a prefix from
/// [`OWNED_PREFIXES`] whose process PID no longer exists.
pub fn remove_stale_netns() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !OWNED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mut parts = name.rsplitn(3, '-');
        let (Some(counter), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if counter.parse::<u32>().is_err() {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            eprintln!("removing network namespace {name} left behind by process {pid}");
            remove_netns(&name);
        }
    }
}

/// Kills every process in namespace `name` and deletes it; ignores errors.
fn remove_netns(name: &str) {
    let own = std::process::id() as i32;
    for pid in netns_pids(name) {
        if pid != own {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // A daemon that was killed leaves its pins; the namespace's inode number will be reused.
    remove_pins_of(&Path::new(NETNS_DIR).join(name));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "del", name]);
    let _ = output_with_timeout(cmd, COMMAND_TIMEOUT);
}

/// Removes mcrelay's pin directory of the namespace at `netns_path` (see
/// [`crate::daemon::pin_root_of`]); ignores errors.
fn remove_pins_of(netns_path: &Path) {
    if let Some(dir) = crate::daemon::pin_root_of_path(netns_path) {
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        // The daemon's lock and state files are named like the pin directory.
        if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
            for suffix in ["lock", "state.json"] {
                let _ = std::fs::remove_file(format!("/run/mcrelay/{name}.{suffix}"));
            }
        }
    }
}

/// Creates a veth pair with `name_a` in `a` and `name_b` in `b` (each end created directly in its
/// namespace), brings both ends up and waits until they are operationally up.
/// A veth pair whose end in `a` gets ifindex `index` (the kernel allocates the other one).
pub fn veth_pair_with_index(a: &NetNs, name_a: &str, index: u32, b: &NetNs, name_b: &str) {
    add_veth_pair(a, name_a, Some(index), b, name_b);
}

pub fn veth_pair(a: &NetNs, name_a: &str, b: &NetNs, name_b: &str) {
    add_veth_pair(a, name_a, None, b, name_b);
}

fn add_veth_pair(a: &NetNs, name_a: &str, index: Option<u32>, b: &NetNs, name_b: &str) {
    let index = index.map(|i| i.to_string());
    let mut argv = vec!["ip", "link", "add", name_a];
    if let Some(index) = &index {
        argv.extend(["index", index.as_str()]);
    }
    argv.extend(["netns", a.name(), "type", "veth", "peer", "name", name_b, "netns", b.name()]);
    cmd::run(&argv);
    a.link_up(name_a);
    b.link_up(name_b);
    a.wait_oper_up(name_a);
    b.wait_oper_up(name_b);
}
