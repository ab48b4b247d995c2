//! Which bpffs mcrelay pins in, and mounting it when it is missing.
//!
//! `ip netns exec NS CMD` runs CMD in a private mount namespace with a fresh /sys, where
//! /sys/fs/bpf is an empty sysfs directory. A bpffs mounted there is private to that mount
//! namespace: it goes when the command exits, and with it every pin (so every pinned XDP link
//! detaches), and no other `ip netns exec NS` command sees it. So a pin root under /sys/fs/bpf
//! means the bpffs of the mount namespace `ip netns exec` was run from, whenever this process's
//! own /sys/fs/bpf is not a bpffs: the nearest ancestor process in another mount namespace whose
//! /sys/fs/bpf is a bpffs, else the outermost readable ancestor (normally PID 1), where the
//! daemon mounts one. Its files are reached through `/proc/PID/root` (path lookups there walk
//! that process's mount tree, and BPF_OBJ_PIN/BPF_OBJ_GET take paths); the daemon keeps a
//! directory fd of it open and uses `/proc/self/fd/N/...`, which stays valid after that process
//! exits. `mount(2)` refuses targets in another mount namespace, so the daemon mounts from a
//! short-lived thread that has entered it (`setns`).
//!
//! PID 1 is not special-cased: it is simply the last ancestor. Where /proc/1 cannot be read
//! (hardened or sandboxed hosts), the nearest readable ancestor still names the namespace the
//! user ran `ip netns exec` from. A pin root outside /sys/fs/bpf (`--pin-root`) is used as given.

use std::{
    ffi::CString,
    os::{
        fd::{FromRawFd as _, IntoRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use nix::{
    fcntl::{Flock, FlockArg},
    mount::MsFlags,
    sched::CloneFlags,
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

use crate::paths;

/// How many ancestors to look at, at most (a guard against a malformed /proc).
const MAX_ANCESTORS: usize = 64;

/// Lock file that serialises mounting bpffs among mcrelay processes (two daemons starting at
/// once would otherwise both mount, and the second mount would hide the first one's pins).
const MOUNT_LOCK: &str = "bpffs.lock";

/// A process in another mount namespace whose /sys/fs/bpf stands for the host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub pid: i32,
    /// Its command name, for messages.
    pub comm: String,
    /// Whether a bpffs is mounted at its /sys/fs/bpf.
    pub mounted: bool,
}

impl Host {
    /// `/proc/PID/root/sys/fs/bpf`.
    pub fn bpffs(&self) -> PathBuf {
        proc_root(self.pid).join(relative(Path::new(paths::BPFFS)))
    }
}

/// The pin root the daemon uses for `pin_root`, with a bpffs mounted where needed (see the
/// module documentation). Logs which bpffs when it is not this mount namespace's.
pub fn ensure(pin_root: &Path) -> anyhow::Result<PathBuf> {
    let Some(rel) = under_bpffs(pin_root) else { return Ok(pin_root.to_path_buf()) };
    if is_bpffs(Path::new(paths::BPFFS)) {
        return Ok(pin_root.to_path_buf());
    }
    let Some(host) = find_host() else {
        mount_here()?;
        return Ok(pin_root.to_path_buf());
    };
    let _lock = mount_lock();
    if !is_bpffs(&host.bpffs()) {
        tracing::info!(
            "mounting bpffs at {} in the mount namespace of {} (pid {}): this process's /sys \
             is private (`ip netns exec`), a bpffs mounted here would vanish with it",
            paths::BPFFS,
            host.comm,
            host.pid
        );
        mount_in_namespace_of(host.pid)?;
    }
    let dir = open_dir(&host.bpffs())?;
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", dir.into_raw_fd()));
    // The fd is never closed: the daemon pins through it for as long as it runs, also after
    // `host.pid` exited.
    if !is_bpffs(&fd_path) {
        return Err(anyhow!("{} is not a bpffs after mounting it", host.bpffs().display()));
    }
    tracing::info!(
        "{} here is not a bpffs (private mount namespace, e.g. `ip netns exec`): pinning in the \
         bpffs at {} of the mount namespace of {} (pid {}), held open as {}",
        paths::BPFFS,
        paths::BPFFS,
        host.comm,
        host.pid,
        fd_path.display()
    );
    Ok(fd_path.join(rel))
}

/// The pin root the CLI reads for `pin_root`: like [`ensure`] but never mounts. A one-shot
/// command goes through `/proc/PID/root` of the host process (its ancestor outlives it).
pub fn resolve(pin_root: &Path) -> PathBuf {
    let Some(rel) = under_bpffs(pin_root) else { return pin_root.to_path_buf() };
    if is_bpffs(Path::new(paths::BPFFS)) {
        return pin_root.to_path_buf();
    }
    match find_host() {
        Some(host) if host.mounted => {
            let root = host.bpffs().join(rel);
            tracing::debug!(
                "{} here is not a bpffs: reading pins through {} ({}, pid {})",
                paths::BPFFS,
                root.display(),
                host.comm,
                host.pid
            );
            root
        }
        _ => pin_root.to_path_buf(),
    }
}

/// The host process: among this process's ancestors in another mount namespace, the nearest
/// one with a bpffs at /sys/fs/bpf, else the outermost one. `None` when no readable ancestor is
/// in another mount namespace (this process runs in the host's).
pub fn find_host() -> Option<Host> {
    let own = mount_ns("self")?;
    let mut outermost = None;
    let mut pid = nix::unistd::getppid().as_raw();
    for _ in 0..MAX_ANCESTORS {
        if pid <= 0 {
            break;
        }
        if mount_ns(&pid.to_string()).is_some_and(|ns| ns != own) {
            let mounted = is_bpffs(&proc_root(pid).join(relative(Path::new(paths::BPFFS))));
            let host = Host { pid, comm: comm(pid), mounted };
            if mounted {
                return Some(host);
            }
            outermost = Some(host);
        }
        // An unreadable process (e.g. PID 1 on some hosts) is passed over; its parent id is
        // still readable from /proc/PID/stat.
        let Some(parent) = parent_pid(pid) else { break };
        pid = parent;
    }
    outermost
}

/// Mounts bpffs at /sys/fs/bpf in the mount namespace of process `pid` (unless one is mounted
/// there by now). `mount(2)` only mounts in the caller's own mount namespace, so a short-lived
/// thread unshares its filesystem context (so that it may switch namespaces alone, without the
/// rest of the process) and enters that namespace first.
pub fn mount_in_namespace_of(pid: i32) -> anyhow::Result<()> {
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = std::fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> anyhow::Result<()> {
                nix::sched::unshare(CloneFlags::CLONE_FS)
                    .context("unshare(CLONE_FS) before entering another mount namespace")?;
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNS)
                    .with_context(|| format!("entering the mount namespace {ns_path}"))?;
                mount_bpffs_here()
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the thread mounting bpffs panicked")))
    })
}

/// Mounts bpffs at /sys/fs/bpf in this process's mount namespace unless one is there.
fn mount_here() -> anyhow::Result<()> {
    let _lock = mount_lock();
    statfs(paths::BPFFS).with_context(|| format!("statfs {}", paths::BPFFS))?;
    if is_bpffs(Path::new(paths::BPFFS)) {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {}", paths::BPFFS);
    mount_bpffs_here()
}

/// `mount -t bpf bpf /sys/fs/bpf` in the calling thread's mount namespace, unless one is there.
fn mount_bpffs_here() -> anyhow::Result<()> {
    if is_bpffs(Path::new(paths::BPFFS)) {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), paths::BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>)
        .with_context(|| {
            format!("mounting bpffs at {} (mount -t bpf bpf {})", paths::BPFFS, paths::BPFFS)
        })
}

/// An exclusive lock on `RUN_DIR/bpffs.lock` (shared by every mount namespace that shares
/// /run); best effort, `None` when it cannot be taken.
fn mount_lock() -> Option<Flock<std::fs::File>> {
    std::fs::create_dir_all(paths::RUN_DIR).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(paths::RUN_DIR).join(MOUNT_LOCK))
        .ok()?;
    Flock::lock(file, FlockArg::LockExclusive).ok()
}

/// `pin_root` relative to /sys/fs/bpf, when it lies there.
fn under_bpffs(pin_root: &Path) -> Option<&Path> {
    pin_root.strip_prefix(paths::BPFFS).ok()
}

/// `path` without its leading `/`.
fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

fn proc_root(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root"))
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

/// The mount namespace of `/proc/<pid>` (`self` or a number), `None` when it cannot be read.
fn mount_ns(pid: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).ok().map(|m| m.ino())
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| String::from("?"))
}

fn parent_pid(pid: i32) -> Option<i32> {
    parse_stat_ppid(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The parent pid in a `/proc/PID/stat` line (field 4; the command name in field 2 may hold
/// spaces and parentheses, so count from the last `)`).
fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// An `O_PATH` directory fd of `path`.
fn open_dir(path: &Path) -> anyhow::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a plain open(2) of a NUL-terminated path; the result is checked before use.
    let fd =
        unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening {}", path.display()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_roots_under_sys_fs_bpf_are_relative_to_it() {
        assert_eq!(under_bpffs(Path::new("/sys/fs/bpf/mcrelay")), Some(Path::new("mcrelay")));
        assert_eq!(under_bpffs(Path::new("/sys/fs/bpf")), Some(Path::new("")));
        assert_eq!(under_bpffs(Path::new("/sys/fs/bpfx/mcrelay")), None);
        assert_eq!(under_bpffs(Path::new("/run/bpf/mcrelay")), None);
        assert_eq!(relative(Path::new(paths::BPFFS)), Path::new("sys/fs/bpf"));
    }

    #[test]
    fn a_pin_root_elsewhere_is_used_as_given() {
        let root = Path::new("/run/my-bpffs/mcrelay");
        assert_eq!(resolve(root), root);
        assert_eq!(ensure(root).expect("no-op"), root);
    }

    #[test]
    fn parent_pid_from_stat() {
        assert_eq!(parse_stat_ppid("42 (bash) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_stat_ppid("42 (a) b (c) R 1234 42 42 0 -1"), Some(1234));
        assert_eq!(parse_stat_ppid("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn the_own_parent_is_found_from_proc() {
        let me = std::process::id() as i32;
        assert_eq!(parent_pid(me), Some(nix::unistd::getppid().as_raw()));
    }
}
