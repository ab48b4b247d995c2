//! The usage error (exit status 2) and errno helpers shared by the layers. The exit status
//! itself is decided in `main.rs` from the error types in the chain.

/// A problem with what the user asked for (bad argument, unknown interface, missing privileges,
/// an attachment the system refused). `mcrelay` exits with status 2 for these, after undoing
/// everything it had changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Shorthand for returning a [`UsageError`] wrapped in anyhow.
#[macro_export]
macro_rules! usage_bail {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::UsageError::new(format!($($arg)*))))
    };
}

/// Whether an OS error somewhere in `err`'s chain is EPERM or EACCES (missing privileges).
pub fn is_permission_denied(err: &anyhow::Error) -> bool {
    let denied = [nix::errno::Errno::EPERM as i32, nix::errno::Errno::EACCES as i32];
    err.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| {
        e.kind() == std::io::ErrorKind::PermissionDenied
            || e.raw_os_error().is_some_and(|code| denied.contains(&code))
    })
}
