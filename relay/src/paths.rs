//! Every filesystem path mcrelay uses, in one place.
//!
//! Pins are kept per network namespace (`ns-<inode of /proc/self/ns/net>`) so that instances
//! in different namespaces of one host never collide, and per map-layout version (`v<N>`) so a
//! daemon never opens a map whose layout differs from what its program expects.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::OnceLock,
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
    pub const GROUP_PORTS_V4: &str = "GROUP_PORTS_V4";
    pub const FLOOD_PORTS: &str = "FLOOD_PORTS";
    pub const ROUTER_PORTS: &str = "ROUTER_PORTS";
    /// Directory of pinned XDP links, one file per ifindex.
    pub const LINKS: &str = "links";
    pub const CONFIG: &str = "CONFIG";
    pub const PORT_STATS: &str = "PORT_STATS";
    pub const PORT_STATS_SPILL: &str = "PORT_STATS_SPILL";
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

/// The group whose members may read what the daemon leaves for the CLI (pins, state file,
/// reload verdict, lock): `mcrelay groups/ports/stats` then work without root.
pub const ACCESS_GROUP: &str = "mcrelay";
/// Names another group than [`ACCESS_GROUP`] (for tests that create a temporary one, and for
/// packagers who must use another name). Read once, by the daemon.
pub const ACCESS_GROUP_ENV: &str = "MCRELAY_GROUP";

/// The access group, when it exists on this system (looked up once per process).
pub fn access_group() -> Option<&'static (String, nix::unistd::Gid)> {
    static GROUP: OnceLock<Option<(String, nix::unistd::Gid)>> = OnceLock::new();
    GROUP
        .get_or_init(|| {
            let name =
                std::env::var(ACCESS_GROUP_ENV).unwrap_or_else(|_| ACCESS_GROUP.to_owned());
            match nix::unistd::Group::from_name(&name) {
                Ok(Some(group)) => Some((name, group.gid)),
                Ok(None) => {
                    tracing::debug!("no group {name}: pins and state files are readable by root only");
                    None
                }
                Err(e) => {
                    tracing::warn!("looking up the group {name}: {e}; pins and state files are readable by root only");
                    None
                }
            }
        })
        .as_ref()
}

/// Mode of a file the daemon leaves for the CLI: 0640 with the access group, else 0600.
pub const fn file_mode(group: bool) -> u32 {
    if group {
        0o640
    } else {
        0o600
    }
}

/// Mode of a per-namespace directory the daemon creates: 0750 with the access group, else 0700.
pub const fn dir_mode(group: bool) -> u32 {
    if group {
        0o750
    } else {
        0o700
    }
}

/// Makes `path` (a file, a pin, or with `dir` a directory) readable by root and the access
/// group only: group [`access_group`], mode [`file_mode`]/[`dir_mode`]; without the group,
/// root only. The group is set before the mode is widened, so nobody else can open it in
/// between. Changing the group needs membership in it (the unit's `SupplementaryGroups=`) or
/// CAP_CHOWN; without either, `path` stays root-only (with one warning per process).
pub fn restrict(path: &Path, dir: bool) -> std::io::Result<()> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let group =
        access_group().filter(|(name, gid)| match nix::unistd::chown(path, None, Some(*gid)) {
            Ok(()) => true,
            Err(e) => {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot give {} to the group {name} ({e}): the daemon must be a member \
                         of it (SupplementaryGroups={name}) or have CAP_CHOWN; pins and state \
                         files stay readable by root only",
                        path.display()
                    );
                }
                false
            }
        });
    let mode = if dir { dir_mode(group.is_some()) } else { file_mode(group.is_some()) };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// [`restrict`] on a pin directory and its parent (`ns-<id>`, see [`pin_dir`]); the pin root
/// above them is left as it is (shared by every namespace's instance).
pub fn restrict_pin_dir(pin_dir: &Path) -> std::io::Result<()> {
    if let Some(ns_dir) = pin_dir.parent() {
        restrict(ns_dir, true)?;
    }
    restrict(pin_dir, true)
}
