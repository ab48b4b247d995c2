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

/// The exit status for an error returned by a command.
pub fn exit_status(err: &anyhow::Error) -> i32 {
    let usage = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<UsageError>().is_some()
            || e.downcast_ref::<crate::dataplane::DataplaneError>().is_some_and(|d| d.is_usage())
    };
    if err.chain().any(usage) {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    }
}
