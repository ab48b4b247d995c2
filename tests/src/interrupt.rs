//! A flag raised by SIGINT / SIGTERM / SIGHUP, for long-running helpers such as `cargo xtask lab`.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn raise_flag(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs handlers so that SIGINT (Ctrl-C), SIGTERM and SIGHUP only raise a flag, and returns
/// the flag: the caller polls it and tears everything down through its guards.
pub fn install_interrupt_flag() -> anyhow::Result<&'static AtomicBool> {
    let action =
        SigAction::new(SigHandler::Handler(raise_flag), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }
            .map_err(|e| anyhow::anyhow!("installing a {signal} handler: {e}"))?;
    }
    Ok(&INTERRUPTED)
}
