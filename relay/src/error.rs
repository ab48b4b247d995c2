//! Errors that decide the exit status.

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

/// Exit status for a runtime failure.
pub const EXIT_RUNTIME: i32 = 1;
/// Exit status for usage and configuration errors.
pub const EXIT_USAGE: i32 = 2;

/// Whether an OS error somewhere in `err`'s chain is EPERM or EACCES (missing privileges).
pub fn is_permission_denied(err: &anyhow::Error) -> bool {
    let denied = [nix::errno::Errno::EPERM as i32, nix::errno::Errno::EACCES as i32];
    err.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| {
        e.kind() == std::io::ErrorKind::PermissionDenied
            || e.raw_os_error().is_some_and(|code| denied.contains(&code))
    })
}

/// The exit status for an error returned by a command: decided by the error types in the
/// chain, never by message text.
pub fn exit_status(err: &anyhow::Error) -> i32 {
    let usage = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<UsageError>().is_some()
            || e.downcast_ref::<crate::config::ConfigError>().is_some()
            || e.downcast_ref::<crate::dataplane::DataplaneError>().is_some_and(|d| d.is_usage())
            || e.downcast_ref::<crate::instance::InstanceError>().is_some_and(|i| i.is_usage())
            || e.downcast_ref::<crate::inspect::InspectError>().is_some_and(|i| i.is_usage())
    };
    if err.chain().any(usage) {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    }
}
