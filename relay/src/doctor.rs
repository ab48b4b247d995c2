//! `mcrelay doctor`: diagnoses the host's multicast set-up and prints the exact fixes.

use crate::cli::DoctorArgs;

/// Runs every check; returns the exit status (0: no problem found, 3: problems found).
pub async fn run(_args: &DoctorArgs) -> anyhow::Result<i32> {
    anyhow::bail!("mcrelay doctor is not available in this build yet")
}
