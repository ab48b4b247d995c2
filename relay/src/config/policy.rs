//! Group prefixes (`[policy] allow` / `deny`) and the decision they make.

use std::net::IpAddr;

/// Which groups may be relayed: `[policy] allow` and `deny`, parsed.
///
/// Only prefixes decide here; the dataplane's own rules (IGMP/MLD and link-local groups go to the
/// local stack) apply regardless.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPolicy {
    /// Prefixes that may be relayed; empty: every group.
    pub allow: Vec<(IpAddr, u8)>,
    /// Prefixes that are never relayed; a deny wins over any allow.
    pub deny: Vec<(IpAddr, u8)>,
}

impl GroupPolicy {
    /// Whether `group` may be relayed: not in a denied prefix, and in an allowed one (or
    /// `allow` is empty). An IPv4 prefix never matches an IPv6 group and vice versa.
    pub fn permits(&self, group: IpAddr) -> bool {
        if self.deny.iter().any(|&(net, len)| contains(net, len, group)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|&(net, len)| contains(net, len, group))
    }
}

/// Whether prefix `net/len` contains `addr`.
pub fn contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(net), IpAddr::V4(addr)) => {
            let mask = mask32(len);
            u32::from(net) & mask == u32::from(addr) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(addr)) => {
            let mask = mask128(len);
            u128::from(net) & mask == u128::from(addr) & mask
        }
        _ => false,
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0)
}

/// A per-group rate limit: every group of the prefix may send `pps` packets per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRate {
    pub prefix: (IpAddr, u8),
    pub pps: u64,
}

/// Parses `--rate-limit PREFIX=PPS` (e.g. `239.0.0.0/8=1000`).
pub fn parse_rate_limit(text: &str) -> Result<GroupRate, String> {
    let (prefix, pps) = text.split_once('=').ok_or_else(|| {
        format!("'{text}': expected PREFIX=PPS, e.g. 239.0.0.0/8=1000 or ff3e::/16=500")
    })?;
    let prefix = parse_prefix(prefix.trim())?;
    let pps: u64 = pps.trim().parse().map_err(|_| {
        format!("'{text}': the rate after '=' must be a whole number of packets per second")
    })?;
    if pps == 0 {
        return Err(format!("'{text}': the rate must be at least 1 packet per second"));
    }
    Ok(GroupRate { prefix, pps })
}

/// Parses a multicast group prefix: `239.0.0.0/8`, `ff3e::/16`, or a single group
/// (`239.1.1.1`, meaning /32 or /128). Host bits must be zero and the prefix must lie inside
/// 224.0.0.0/4 or ff00::/8. The error says how to fix the text.
pub fn parse_prefix(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr_text, len_text) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.trim().parse().map_err(|_| {
        format!(
            "'{text}' is not a prefix: write ADDRESS/LENGTH, e.g. \"239.0.0.0/8\" or \"ff3e::/16\""
        )
    })?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len_text {
        None => max,
        Some(l) => match l.trim().parse::<u8>() {
            Ok(len) if len <= max => len,
            _ => {
                return Err(format!("'{text}': the prefix length must be a number from 0 to {max}"))
            }
        },
    };
    let (multicast_net, multicast_len, family): (IpAddr, u8, &str) = match addr {
        IpAddr::V4(_) => ([224, 0, 0, 0].into(), 4, "224.0.0.0/4"),
        IpAddr::V6(_) => ([0xff00, 0, 0, 0, 0, 0, 0, 0].into(), 8, "ff00::/8"),
    };
    if len < multicast_len || !contains(multicast_net, multicast_len, addr) {
        return Err(format!(
            "'{text}' is not a multicast prefix: group prefixes lie inside {family}"
        ));
    }
    let network = network_of(addr, len);
    if network != addr {
        return Err(format!(
            "'{text}' has bits set after the prefix length; did you mean \"{network}/{len}\"?"
        ));
    }
    Ok((addr, len))
}

fn network_of(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::from((u32::from(a) & mask32(len)).to_be_bytes()),
        IpAddr::V6(a) => IpAddr::from((u128::from(a) & mask128(len)).to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn policy(allow: &[&str], deny: &[&str]) -> GroupPolicy {
        let parse = |list: &[&str]| {
            list.iter().map(|p| parse_prefix(p).expect("valid prefix")).collect::<Vec<_>>()
        };
        GroupPolicy { allow: parse(allow), deny: parse(deny) }
    }

    #[test]
    fn prefixes_parse() {
        assert_eq!(parse_prefix("239.0.0.0/8"), Ok((ip("239.0.0.0"), 8)));
        assert_eq!(parse_prefix("224.0.0.251"), Ok((ip("224.0.0.251"), 32)));
        assert_eq!(parse_prefix("224.0.0.0/4"), Ok((ip("224.0.0.0"), 4)));
        assert_eq!(parse_prefix("ff3e::/16"), Ok((ip("ff3e::"), 16)));
        assert_eq!(parse_prefix("ff02::fb/128"), Ok((ip("ff02::fb"), 128)));
        assert_eq!(parse_prefix("ff00::/8"), Ok((ip("ff00::"), 8)));
    }

    #[test]
    fn bad_prefixes_are_rejected_with_a_hint() {
        for (bad, hint) in [
            ("239.0.0.0/33", "0 to 32"),
            ("ff3e::/129", "0 to 128"),
            ("239.0.0.0/x", "0 to 32"),
            ("239.0.0/8", "not a prefix"),
            ("nonsense", "not a prefix"),
            ("10.0.0.0/8", "not a multicast prefix"),
            ("0.0.0.0/0", "not a multicast prefix"),
            ("224.0.0.0/3", "not a multicast prefix"),
            ("2001:db8::/32", "not a multicast prefix"),
            ("ff00::/7", "not a multicast prefix"),
            ("239.1.1.1/8", "did you mean \"239.0.0.0/8\""),
            ("ff3e::1/16", "did you mean \"ff3e::/16\""),
        ] {
            let err = parse_prefix(bad).expect_err(bad);
            assert!(err.contains(hint), "{bad}: {err:?} should contain {hint:?}");
        }
    }

    #[test]
    fn policy_empty_allows_everything() {
        let p = GroupPolicy::default();
        assert!(p.permits(ip("239.1.1.1")));
        assert!(p.permits(ip("ff3e::1")));
    }

    #[test]
    fn policy_allow_list_restricts() {
        let p = policy(&["239.1.0.0/16", "ff3e::/16"], &[]);
        assert!(p.permits(ip("239.1.2.3")));
        assert!(!p.permits(ip("239.2.0.1")));
        assert!(p.permits(ip("ff3e::1234")));
        assert!(!p.permits(ip("ff15::1")));
    }

    #[test]
    fn policy_deny_wins() {
        let p = policy(&["239.0.0.0/8"], &["239.255.0.0/16", "ff05::/16"]);
        assert!(p.permits(ip("239.1.1.1")));
        assert!(!p.permits(ip("239.255.255.250")));
        // Not in allow (IPv6 with an IPv4-only allow list).
        assert!(!p.permits(ip("ff3e::1")));
        let p = policy(&[], &["239.255.255.250"]);
        assert!(!p.permits(ip("239.255.255.250")));
        assert!(p.permits(ip("239.255.255.251")));
        assert!(p.permits(ip("ff05::1")));
    }

    #[test]
    fn prefix_families_never_mix() {
        assert!(!contains(ip("224.0.0.0"), 4, ip("ff02::1")));
        assert!(!contains(ip("ff00::"), 8, ip("239.1.1.1")));
        assert!(contains(ip("224.0.0.0"), 0, ip("10.0.0.1")));
    }
}
