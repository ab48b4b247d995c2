//! The vocabulary the command line, the configuration file and the settings share: the
//! enums of the options, their defaults, and one validator per rule. A leaf module: it uses
//! nothing of the crate but the membership engine's version types.

use serde::Deserialize;

use crate::membership::{IgmpVersion, MldVersion};

/// How the XDP program is attached to a port (`--xdp-mode`, `xdp_mode` in the file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Native where the driver supports it, generic (skb) elsewhere, with a warning; TC for
    /// devices XDP cannot send to.
    #[default]
    Auto,
    /// Native (driver) mode only; fail when the driver cannot.
    Native,
    /// Generic (skb) mode only.
    Skb,
}

/// What happens to multicast data for groups nobody joined (`--unknown`, `[policy] unknown`).
///
/// The dataplane stores it as [`relay_common::UnknownPolicy`], the value the XDP program reads
/// from its CONFIG map; this is the one user-facing type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownGroups {
    /// RFC 4541: towards router ports (until router ports are learned: to the local stack).
    #[default]
    RouterPorts,
    /// Drop, counted as drop_no_members.
    Drop,
    /// Flood to every port except the ingress port.
    Flood,
}

impl From<UnknownGroups> for relay_common::UnknownPolicy {
    fn from(value: UnknownGroups) -> Self {
        match value {
            UnknownGroups::RouterPorts => Self::RouterPorts,
            UnknownGroups::Drop => Self::Drop,
            UnknownGroups::Flood => Self::Flood,
        }
    }
}

/// Defaults of the overridable options (the file's defaults are the same values).
pub mod defaults {
    /// RFC 3376 8.1.
    pub const ROBUSTNESS: u32 = 2;
    /// RFC 3376 8.2, seconds.
    pub const QUERY_INTERVAL: f64 = 125.0;
    /// RFC 3376 8.3, seconds.
    pub const QUERY_RESPONSE_INTERVAL: f64 = 10.0;
    /// RFC 3376 8.8, seconds.
    pub const LAST_MEMBER_INTERVAL: f64 = 1.0;
    pub const IGMP_VERSION: u8 = 3;
    pub const MLD_VERSION: u8 = 2;
    /// Loop guard, seconds.
    pub const HELLO_INTERVAL: f64 = 1.0;
    /// Loop guard, seconds.
    pub const HELLO_HOLDTIME: f64 = 3.5;
    /// State limits (see `membership::Limits`): 10,000 groups fit, on any number of ports.
    pub const MAX_GROUPS: usize = 12_000;
    pub const MAX_GROUPS_PER_PORT: usize = 10_000;
    pub const MAX_SOURCES_PER_GROUP: usize = 256;
    /// Clients per per-client port that get their own copies.
    pub const MAX_CLIENTS_PER_PORT: usize = 32;
    /// IGMP/MLD/PIM frames per second one port may send the control plane (a second's worth
    /// may come at once).
    pub const REPORT_RATE_PER_PORT: u32 = 2_000;
}

/// One validator per rule. Each returns the problem in words without naming where the value
/// came from; the caller adds the flag name or the file position.
pub mod rules {
    use std::time::Duration;

    use super::{IgmpVersion, MldVersion};

    /// A duration in seconds: finite, more than 0, less than a day.
    pub fn seconds(value: f64) -> Result<Duration, String> {
        if value.is_finite() && value > 0.0 && value < 86_400.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            Err(format!("{value}: expected seconds, more than 0 and less than a day"))
        }
    }

    /// The robustness variable (RFC 3376 8.1): 1 to 7 (a 3-bit field in queries).
    pub fn robustness(value: u32) -> Result<u32, String> {
        if (1..=7).contains(&value) {
            Ok(value)
        } else {
            Err(format!("{value}: expected 1 to 7 (the RFC default is 2)"))
        }
    }

    /// Two durations that must be ordered: hosts answer within one query interval (the
    /// response interval is shorter), and a relay misses more than one hello before it counts
    /// as gone (the hello interval is shorter than the holdtime). Each value comes with the
    /// name the user knows it by.
    pub fn shorter_than(shorter: (&str, f64), longer: (&str, f64)) -> Result<(), String> {
        if shorter.1 < longer.1 {
            Ok(())
        } else {
            Err(format!(
                "{} ({}s) must be shorter than {} ({}s)",
                shorter.0, shorter.1, longer.0, longer.1
            ))
        }
    }

    /// A rate: at least 1 per second.
    pub fn rate(value: u32) -> Result<u32, String> {
        if value >= 1 {
            Ok(value)
        } else {
            Err(format!("{value}: a rate must be at least 1 per second"))
        }
    }

    /// A limit: at least 1.
    pub fn limit(value: usize) -> Result<usize, String> {
        if value >= 1 {
            Ok(value)
        } else {
            Err(format!("{value}: a limit must be at least 1"))
        }
    }

    /// IGMP version of mcrelay's queries.
    pub fn igmp_version(value: u8) -> Result<IgmpVersion, String> {
        match value {
            2 => Ok(IgmpVersion::V2),
            3 => Ok(IgmpVersion::V3),
            _ => Err(format!("{value}: expected 2 or 3")),
        }
    }

    /// MLD version of mcrelay's queries.
    pub fn mld_version(value: u8) -> Result<MldVersion, String> {
        match value {
            1 => Ok(MldVersion::V1),
            2 => Ok(MldVersion::V2),
            _ => Err(format!("{value}: expected 1 or 2")),
        }
    }
}
