//! igmpproxy, the classic IGMP proxy that programs the kernel's multicast routing (MFC), as a
//! guard: the comparison point of mcrelay's `--upstream` mode in tests/tests/proxy.rs.
//!
//! igmpproxy (IPv4 only) opens the kernel's multicast routing socket (`MRT_INIT`), makes one
//! VIF per configured interface with an IPv4 address, queries on its downstream interfaces,
//! joins upstream (through an ordinary socket membership, so the gateway's kernel sends the
//! report) what was reported downstream, and adds an MFC entry when the first datagram of a
//! source arrives upstream (the kernel's `NOCACHE` upcall). The kernel then forwards as a router
//! does: TTL decremented, and only packets whose TTL is above the VIF's threshold.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{netns::NetNs, openvpn::ScratchDir};

/// Where Debian (and most distributions) install it; `require_testbed!("igmpproxy")` looks it
/// up in `PATH`, which has /usr/sbin for root.
pub const IGMPPROXY: &str = "/usr/sbin/igmpproxy";
/// How long igmpproxy may take to make its VIFs.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The configuration of one upstream and some downstream interfaces: no rate limit, TTL
/// threshold 1 (the kernel forwards packets with a TTL above 1), sources from anywhere accepted
/// upstream (`altnet 0.0.0.0/0`), and `quickleave` (leave upstream as soon as the last
/// downstream host left; `hashtablesize` makes no difference in tests/tests/proxy.rs).
pub fn config(upstream: &str, downstream: &[&str]) -> String {
    let mut text = format!(
        "quickleave\n\nphyint {upstream} upstream ratelimit 0 threshold 1\n  altnet 0.0.0.0/0\n"
    );
    for iface in downstream {
        text.push_str(&format!("\nphyint {iface} downstream ratelimit 0 threshold 1\n"));
    }
    text
}

/// `igmpproxy -d CONFIG` in a network namespace (its stderr in a log file); killed when dropped
/// (and the namespace's removal kills it anyway).
pub struct IgmpProxy {
    child: Child,
    ns_name: String,
    log: PathBuf,
    // Holds the configuration and the log; removed last.
    _dir: ScratchDir,
}

impl IgmpProxy {
    /// Starts igmpproxy with `config` ([`config`]) in `ns` and waits until the kernel lists
    /// `vifs` VIFs in `/proc/net/ip_mr_vif`; panics (showing its log) otherwise.
    pub fn start(ns: &NetNs, config: &str, vifs: usize) -> Self {
        let dir = ScratchDir::new();
        let conf = dir.write("igmpproxy.conf", config, 0o600);
        let log = dir.path().join("igmpproxy.log");
        let log_file =
            fs::File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        // -d: stay in the foreground and log everything to stderr; -v -v: debug messages.
        let child = ns
            .command(program())
            .args(["-d", "-v", "-v"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {IGMPPROXY} in {ns}: {e}"));
        let mut proxy = Self { child, ns_name: ns.name().to_string(), log, _dir: dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            proxy.check_running();
            let table = ns.exec(&["cat", "/proc/net/ip_mr_vif"]);
            // A header line, then one line per VIF.
            if table.lines().skip(1).filter(|l| !l.trim().is_empty()).count() >= vifs {
                return proxy;
            }
            assert!(
                Instant::now() < deadline,
                "igmpproxy made no {vifs} VIFs within {READY_TIMEOUT:?}: {table}\nlog:\n{}",
                proxy.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (showing the log) if igmpproxy has exited.
    pub fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("igmpproxy in {} exited ({status}); log:\n{}", self.ns_name, self.log());
        }
    }

    /// The kernel's multicast forwarding cache in the namespace (`/proc/net/ip_mr_cache`).
    pub fn mfc(ns: &NetNs) -> String {
        ns.exec(&["cat", "/proc/net/ip_mr_cache"])
    }
}

impl Drop for IgmpProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- igmpproxy in {} ---\n{}---", self.ns_name, self.log());
        }
    }
}

/// The igmpproxy program: found in `PATH`, else [`IGMPPROXY`].
pub fn program() -> PathBuf {
    crate::find_program("igmpproxy").unwrap_or_else(|| PathBuf::from(IGMPPROXY))
}
