//! mcrelay's test bed: network namespaces, veths and bridges, in-process multicast peers and a
//! guard around the real `mcrelay` daemon.
//!
//! Used by the integration tests in `tests/` and by `cargo xtask lab`. Everything that changes the
//! system is held by an RAII guard ([`NetNs`], [`Mcrelay`], [`McastReceiver`]) so that a test
//! that panics still cleans up, and every name carries the process id and a counter so that tests
//! running side by side (and leftovers of a crashed run) never collide.
//!
//! Two pitfalls of veth test beds (docs/architecture.md, "veth and checksum pitfalls") are handled by the helpers that build topologies
//! ([`topology::Star`] and the lab): the host end of a veth whose gateway end is a redirect target
//! needs GRO on, or redirected frames vanish; and every sender needs TX checksum offload off, or
//! receivers drop the relayed datagrams as UdpInCsumErrors.

pub mod cmd;
pub mod control;
pub mod daemon;
pub mod groups;
pub mod igmpproxy;
pub mod interrupt;
pub mod loops;
pub mod mcast;
pub mod netns;
pub mod openvpn;
pub mod topology;
pub mod wireguard;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use daemon::{
    mcrelay_bin, mcrelay_json, mcrelay_json_with, mcrelay_output, mcrelay_output_with,
    port_counter, Mcrelay,
};
pub use mcast::{McastReceiver, McastSender, WireObserver};
pub use netns::{veth_pair, NetNs};
/// Re-exported so that users of the JSON helpers (the lab) need no dependency of their own.
pub use serde_json;

/// Programs every test bed needs.
const REQUIRED_PROGRAMS: [&str; 2] = ["ip", "ethtool"];

/// Why the test bed cannot be built on this machine, or `None` when it can.
///
/// `programs` lists programs the caller needs besides `ip` and `ethtool`.
pub fn missing_prerequisite(programs: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root (network namespaces and XDP need root)".into());
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("kernel without network namespaces (CONFIG_NET_NS)".into());
    }
    for program in REQUIRED_PROGRAMS.iter().chain(programs) {
        if find_program(program).is_none() {
            return Some(format!("program `{program}` not found in PATH"));
        }
    }
    None
}

/// Skips (or, under CI, fails) a test with `reason`.
///
/// In CI (`CI` set in the environment) the machine is expected to have everything, so a missing
/// prerequisite fails the test rather than letting it pass silently.
pub fn skip_or_fail(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("test bed unavailable under CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Returns early from a test (printing the reason) when the test bed cannot be built here.
///
/// `require_testbed!()` checks root, network namespaces, `ip` and `ethtool`;
/// `require_testbed!("setpriv")` also checks the listed programs.
#[macro_export]
macro_rules! require_testbed {
    ($($program:expr),* $(,)?) => {
        if let Some(reason) = $crate::missing_prerequisite(&[$($program),*]) {
            $crate::skip_or_fail(&reason);
            return;
        }
    };
}

/// The full path of `program` found through `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

/// Parses an address literal of a test (`"239.1.1.1"`, `"ff1e::1"`); panics on a typo.
pub fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
