//! Parsing and validating group addresses and `--static GROUP@IFACE[,IFACE...]`.

use std::net::IpAddr;

use relay_common::{v4_mapped, GroupKey};

use crate::error::UsageError;

/// A static membership from the command line: a group and the interfaces that receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticGroup {
    pub group: IpAddr,
    pub ifaces: Vec<String>,
}

/// Parses `GROUP@IFACE[,IFACE...]`.
pub fn parse_static(spec: &str) -> Result<StaticGroup, UsageError> {
    let (group, ifaces) = spec.split_once('@').ok_or_else(|| {
        UsageError::new(format!(
            "--static {spec}: expected GROUP@IFACE[,IFACE...], e.g. 239.1.1.1@eth1,tap0"
        ))
    })?;
    let group = parse_group(group).map_err(|e| UsageError::new(format!("--static {spec}: {e}")))?;
    let ifaces: Vec<String> = ifaces.split(',').map(str::trim).map(String::from).collect();
    if ifaces.iter().any(String::is_empty) {
        return Err(UsageError::new(format!(
            "--static {spec}: empty interface name in the list after '@'"
        )));
    }
    Ok(StaticGroup { group, ifaces })
}

/// Parses a group address and checks that it can be relayed.
pub fn parse_group(s: &str) -> Result<IpAddr, UsageError> {
    let addr: IpAddr = s
        .trim()
        .parse()
        .map_err(|_| UsageError::new(format!("'{s}' is not an IPv4 or IPv6 address")))?;
    if !addr.is_multicast() {
        return Err(UsageError::new(format!(
            "{addr} is not a multicast group (IPv4 groups are in 224.0.0.0/4, IPv6 in ff00::/8)"
        )));
    }
    if is_link_local_group(addr) {
        return Err(UsageError::new(format!(
            "{addr} is a link-local group (224.0.0.0/24 or IPv6 scope <= link); link-local \
             groups stay on their segment and are never relayed"
        )));
    }
    Ok(addr)
}

/// 224.0.0.0/24, or an IPv6 multicast scope of interface- or link-local (ff01::/16, ff02::/16).
/// The dataplane hands these to the stack before any group lookup.
pub fn is_link_local_group(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 224 && o[1] == 0 && o[2] == 0
        }
        IpAddr::V6(a) => a.octets()[1] & 0x0f <= 2,
    }
}

/// The (*,G) map key of a group.
pub fn group_key(addr: IpAddr) -> GroupKey {
    match addr {
        IpAddr::V4(a) => GroupKey { group: v4_mapped(a.octets()), source: [0; 16] },
        IpAddr::V6(a) => GroupKey { group: a.octets(), source: [0; 16] },
    }
}

/// The group address of a map key.
pub fn key_group(key: &GroupKey) -> IpAddr {
    if key.is_v4() {
        IpAddr::from([key.group[12], key.group[13], key.group[14], key.group[15]])
    } else {
        IpAddr::from(key.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_statics() {
        let s = parse_static("239.1.1.1@b0,c0").expect("valid");
        assert_eq!(s.group, "239.1.1.1".parse::<IpAddr>().expect("addr"));
        assert_eq!(s.ifaces, ["b0", "c0"]);
        let s = parse_static("ff3e::1@b0").expect("valid");
        assert_eq!(s.group, "ff3e::1".parse::<IpAddr>().expect("addr"));
        assert_eq!(s.ifaces, ["b0"]);
    }

    #[test]
    fn rejects_bad_statics() {
        for bad in [
            "239.1.1.1",
            "nonsense@b0",
            "10.1.1.1@b0",
            "2001:db8::1@b0",
            "239.1.1.1@",
            "239.1.1.1@b0,,c0",
            "224.0.0.251@b0",
            "ff02::fb@b0",
        ] {
            assert!(parse_static(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn key_round_trips() {
        for g in ["239.1.1.1", "ff3e::1:1"] {
            let addr: IpAddr = g.parse().expect("addr");
            assert_eq!(key_group(&group_key(addr)), addr);
        }
    }
}
