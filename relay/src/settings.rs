//! Typed settings shared by the command line, the configuration file and the layers below
//! them. The CLI and the file parser produce these values; the dataplane and the daemon only
//! ever see them, never clap's argument types or strings to parse again.

use serde::Deserialize;

/// How the XDP program is attached to a port (`--xdp-mode`, `xdp_mode` in the file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Native where the driver supports it, generic (skb) elsewhere, with a warning.
    #[default]
    Auto,
    /// Native (driver) mode only; fail when the driver cannot.
    Native,
    /// Generic (skb) mode only.
    Skb,
}
