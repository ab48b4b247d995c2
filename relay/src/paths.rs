//! Every filesystem path mcrelay uses, in one place.
//!
//! Pins are kept per network namespace (`ns-<inode of /proc/self/ns/net>`) so that instances
//! in different namespaces of one host never collide, and per map-layout version (`v<N>`) so a
//! daemon never opens a map whose layout differs from what its program expects.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use relay_common::LAYOUT_VERSION;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Root of every pin mcrelay makes.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mcrelay";
/// Runtime directory (lock files).
pub const RUN_DIR: &str = "/run/mcrelay";
/// Default configuration file.
pub const CONFIG_FILE: &str = "/etc/mcrelay/mcrelay.toml";

/// Names of the pinned maps inside [`pin_dir`].
pub mod pins {
    pub const GROUP_PORTS: &str = "GROUP_PORTS";
    pub const FLOOD_PORTS: &str = "FLOOD_PORTS";
    pub const ROUTER_PORTS: &str = "ROUTER_PORTS";
    /// Directory of pinned XDP links, one file per ifindex.
    pub const LINKS: &str = "links";
    pub const CONFIG: &str = "CONFIG";
    pub const PORT_STATS: &str = "PORT_STATS";
    pub const LOOP_MACS: &str = "LOOP_MACS";
    pub const STANDBY_PORTS: &str = "STANDBY_PORTS";
    pub const POLICY: &str = "POLICY";
    pub const RATE_PORTS: &str = "RATE_PORTS";
    pub const RATE_PREFIXES: &str = "RATE_PREFIXES";
    pub const RATE_GROUPS: &str = "RATE_GROUPS";
    /// Created by the daemon (not part of the object): ifindex -> `PortInfo`.
    pub const PORTS: &str = "PORTS";
}

/// Identifies the network namespace this process runs in.
pub fn netns_id() -> anyhow::Result<u64> {
    let meta = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    Ok(meta.ino())
}

/// `PIN_ROOT/ns-<id>`: everything this namespace's instance pinned, all layout versions.
pub fn netns_pin_root(root: &Path) -> anyhow::Result<PathBuf> {
    Ok(root.join(format!("ns-{}", netns_id()?)))
}

/// `PIN_ROOT/ns-<id>/v<LAYOUT_VERSION>`: the pins of the current layout.
pub fn pin_dir(root: &Path) -> anyhow::Result<PathBuf> {
    Ok(netns_pin_root(root)?.join(format!("v{LAYOUT_VERSION}")))
}

/// Lock file held by the running daemon of this network namespace.
pub fn lock_file() -> anyhow::Result<PathBuf> {
    Ok(Path::new(RUN_DIR).join(format!("ns-{}.lock", netns_id()?)))
}

/// Where the daemon of this network namespace leaves the verdict of its last reload, for
/// `mcrelay reload` to report.
pub fn reload_file() -> anyhow::Result<PathBuf> {
    Ok(Path::new(RUN_DIR).join(format!("ns-{}.reload.json", netns_id()?)))
}

/// State file the daemon of this network namespace writes for `mcrelay groups`.
pub fn state_file() -> anyhow::Result<PathBuf> {
    Ok(Path::new(RUN_DIR).join(format!("ns-{}.state.json", netns_id()?)))
}
