//! The dataplane's error type: what went wrong talking to the kernel, typed so that callers
//! decide exit statuses and retries from the variant, never from message text.

use super::sys::error_chain;

/// A failure of the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The kernel refused to load the object for lack of privileges (a usage error).
    #[error(
        "permission denied loading the eBPF object ({0}); mcrelay needs root or CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON"
    )]
    Permission(String),
    /// The kernel refused to attach XDP to an interface in the requested mode (a usage error).
    #[error("cannot attach XDP to {iface} in {mode} mode: {reason}{hint}")]
    Attach {
        iface: String,
        mode: &'static str,
        reason: String,
        /// What to try instead (empty when nothing helps).
        hint: &'static str,
    },
    /// A program or map the object should have is missing (a build problem).
    #[error("{0} missing from the eBPF object")]
    Missing(String),
    /// A kernel call failed: `context` says what mcrelay was doing.
    #[error("{context}: {}", error_chain(source.as_ref()))]
    Kernel {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DataplaneError {
    /// Whether the error is the user's to fix (exit status 2) rather than a runtime failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Permission(_) | Self::Attach { .. })
    }

    /// The same failure for another key of a batch (the error itself cannot be cloned).
    pub fn repeat(&self) -> Self {
        Self::Kernel { context: self.to_string(), source: "see above".into() }
    }
}

/// `.kernel("what mcrelay was doing")` on results of aya and the standard library.
pub trait KernelContext<T> {
    fn kernel(self, context: impl Into<String>) -> Result<T, DataplaneError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> KernelContext<T> for Result<T, E> {
    fn kernel(self, context: impl Into<String>) -> Result<T, DataplaneError> {
        self.map_err(|e| DataplaneError::Kernel { context: context.into(), source: Box::new(e) })
    }
}
