//! One daemon per network namespace: an exclusive `flock` on `/run/mcrelay/ns-<id>.lock`,
//! which also holds the daemon's pid (for `mcrelay reload`). Every command that needs to know
//! whether a daemon runs (run, reload, groups/ports/stats, detach) asks here.

use std::{
    fs::{File, OpenOptions},
    io::{Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
};

use nix::fcntl::{Flock, FlockArg};

use crate::paths;

/// Why the instance lock cannot be taken or read.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// No right to create or open the lock file.
    #[error("permission denied opening {}: mcrelay needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and write access to {})", path.display(), paths::RUN_DIR)]
    Permission { path: PathBuf },
    /// Another process holds the lock.
    #[error("an mcrelay daemon is already running in this network namespace ({})", path.display())]
    Running { path: PathBuf },
    /// The lock file exists, but no daemon holds it (or there is none).
    #[error("no mcrelay daemon is running in this network namespace")]
    NotRunning,
    /// Anything else the file system said.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The network namespace could not be identified.
    #[error("identifying this network namespace: {0:#}")]
    Namespace(anyhow::Error),
}

impl InstanceError {
    /// Whether the user can fix this (exit status 2): privileges, or a daemon in the way.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Permission { .. } | Self::Running { .. } | Self::NotRunning)
    }
}

fn lock_path() -> Result<PathBuf, InstanceError> {
    paths::lock_file().map_err(InstanceError::Namespace)
}

fn io_error(path: PathBuf, source: std::io::Error) -> InstanceError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        InstanceError::Permission { path }
    } else {
        InstanceError::Io { path, source }
    }
}

/// This namespace's instance lock, held until dropped.
#[derive(Debug)]
pub struct InstanceLock(Flock<File>);

impl InstanceLock {
    /// Takes the lock, or fails at once when another process holds it.
    pub fn acquire() -> Result<Self, InstanceError> {
        let path = lock_path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir.to_path_buf(), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(path.clone(), e))?;
        // Readable by the `mcrelay` group: `groups` asks the lock whether a daemon runs.
        paths::restrict(&path, false).map_err(|e| io_error(path.clone(), e))?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map(Self)
            .map_err(|_| InstanceError::Running { path })
    }

    /// Writes this process's id into the lock file (the daemon does, for `mcrelay reload`).
    pub fn record_pid(&mut self) {
        let file: &mut File = &mut self.0;
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
    }
}

/// Whether a daemon holds this namespace's lock.
pub fn is_running() -> bool {
    let Ok(path) = lock_path() else { return false };
    let Ok(file) = File::open(path) else { return false };
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// The pid of the running daemon.
pub fn running_pid() -> Result<i32, InstanceError> {
    let path = lock_path()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(InstanceError::NotRunning)
        }
        Err(e) => return Err(io_error(path, e)),
    };
    if !is_running() {
        return Err(InstanceError::NotRunning);
    }
    text.trim().parse().map_err(|_| InstanceError::Io {
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "does not hold a process id"),
        path,
    })
}
