//! The few kernel calls aya 0.14 does not offer, and helpers for aya's errors.

use std::os::fd::RawFd;

use aya::{maps::MapError, EbpfError, Pod};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `bpf_attr` for the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf(BPF_MAP_UPDATE_BATCH)`: writes `keys[i] -> fds[i]` into a map-of-maps.
pub fn update_batch<K: Pod>(map_fd: RawFd, keys: &[K], fds: &[u32]) -> std::io::Result<()> {
    debug_assert_eq!(keys.len(), fds.len());
    batch_op(BPF_MAP_UPDATE_BATCH, map_fd, keys, Some(fds))
}

/// `bpf(BPF_MAP_DELETE_BATCH)`: removes `keys` from a map.
pub fn delete_batch<K: Pod>(map_fd: RawFd, keys: &[K]) -> std::io::Result<()> {
    batch_op(BPF_MAP_DELETE_BATCH, map_fd, keys, None)
}

fn batch_op<K: Pod>(
    cmd: libc::c_long,
    map_fd: RawFd,
    keys: &[K],
    values: Option<&[u32]>,
) -> std::io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: map_fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the kernel reads `count` keys (and values) from the arrays, which live for the
    // call and have exactly the map's key and value sizes (the caller's key type is the map's:
    // `GroupKey`, 32 bytes, or a `u32`; fd: 4 bytes),
    // and writes the number processed back into `attr.count` (hence `&mut`).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A delete of a key that is not there: aya reports it as a syscall error with ENOENT.
pub fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Whether an OS error in `e`'s chain is one of `codes` (aya's syscall errors carry the
/// `io::Error` as their source).
pub fn has_errno(e: &(dyn std::error::Error + 'static), codes: &[i32]) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some_and(|code| codes.contains(&code)) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Whether loading failed for lack of privileges: an EPERM or EACCES anywhere in the chain.
pub fn is_permission_error(e: &EbpfError) -> bool {
    has_errno(e, &[libc::EPERM, libc::EACCES])
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The number of possible CPUs (per-CPU map values have one slot each).
pub fn cpus() -> Result<usize, std::io::Error> {
    aya::util::nr_cpus().map_err(|(_, e)| e)
}
