//! The configuration file (/etc/mcrelay/mcrelay.toml).

use std::path::Path;

/// `mcrelay check-config FILE`.
pub fn check_config(file: &Path) -> anyhow::Result<()> {
    anyhow::bail!("check-config is not available in this build yet ({})", file.display())
}
