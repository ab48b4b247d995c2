//! `cargo xtask lab`: a namespace topology showing multicast crossing segments.
//! (Placeholder: filled in by the lab implementation.)

use std::{path::PathBuf, time::Duration};

/// Options of `cargo xtask lab`.
pub struct LabOptions {
    /// Stop by itself after this long (None: run until Ctrl-C).
    pub duration: Option<Duration>,
    /// Path of the built `mcrelay` binary.
    pub mcrelay: PathBuf,
}

pub fn run(_opts: LabOptions) -> anyhow::Result<()> {
    anyhow::bail!("lab not implemented yet")
}
