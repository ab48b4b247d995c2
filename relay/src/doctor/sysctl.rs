//! Checks on `/proc/sys/net` (per network namespace): strict reverse-path filtering and forced
//! IGMP/MLD versions that differ between interfaces.

use std::collections::BTreeSet;

use super::{read_sysctl, sysctl_command, Check, Context, Finding, Status};
use crate::ports::Link;

/// The interfaces these checks look at: `--iface` alone when given, else every interface that is
/// up, not loopback and has the MULTICAST flag.
fn ports(ctx: &Context) -> Vec<&Link> {
    match &ctx.iface {
        Some(name) => ctx.link_by_name(name).into_iter().collect(),
        None => ctx.candidate_ports().filter(|l| l.multicast).collect(),
    }
}

fn read_num(key: &str) -> Option<u32> {
    read_sysctl(key)?.parse().ok()
}

/// Check 2: `rp_filter` = 1 (strict). The kernel uses max(all, IFACE); strict drops multicast
/// whose source has no route back through the receiving interface, which is exactly the traffic
/// a relay brings in from other segments.
pub fn check_rp_filter(ctx: &Context) -> Check {
    let Some(all) = read_num("net/ipv4/conf/all/rp_filter") else {
        return Check::skipped("rp_filter", "no IPv4 in this network namespace");
    };
    let mut findings = Vec::new();
    let ports = ports(ctx);
    for link in &ports {
        let key = format!("net/ipv4/conf/{}/rp_filter", link.name);
        let Some(dev) = read_num(&key) else { continue };
        let effective = all.max(dev);
        if effective != 1 {
            continue;
        }
        let mut finding = Finding::new(
            Status::Warn,
            format!(
                "{}: strict reverse-path filtering (rp_filter 1; all={all}, {}={dev}) drops \
                 multicast from senders whose subnet is not routed back through {}",
                link.name, link.name, link.name
            ),
        )
        .subject(&link.name);
        if all == 1 {
            finding = finding.fix(sysctl_command("net/ipv4/conf/all/rp_filter", "2"));
        }
        if dev == 1 {
            finding = finding.fix(sysctl_command(&key, "2"));
        }
        findings.push(finding.note("2 is loose mode (any route back will do); 0 turns it off"));
    }
    Check::from_findings(
        "rp_filter",
        Status::Ok,
        format!("no strict rp_filter on {} interface(s)", ports.len()),
        findings,
    )
}

/// The IGMP version the kernel enforces on an interface from `all` and the interface's own
/// `force_igmp_version` (1 wins over 2 wins over 3; 0 = automatic).
pub fn effective_igmp(all: u32, dev: u32) -> u32 {
    [1, 2, 3].into_iter().find(|v| all == *v || dev == *v).unwrap_or(0)
}

/// The MLD version the kernel enforces (`force_mld_version`: 2 wins over 1; 0 = automatic).
pub fn effective_mld(all: u32, dev: u32) -> u32 {
    [2, 1].into_iter().find(|v| all == *v || dev == *v).unwrap_or(0)
}

fn describe(proto: &str, version: u32) -> String {
    if version == 0 {
        format!("{proto} automatic")
    } else {
        format!("{proto}v{version} forced")
    }
}

/// Check 4: forced IGMP/MLD versions that differ between interfaces (a relay between an
/// IGMPv2-forced and an IGMPv3 segment sees reports it cannot translate one to one, and hosts
/// answer queries in different versions).
pub fn check_forced_versions(ctx: &Context) -> Check {
    // Compare every multicast interface (even with --iface: the point is the difference).
    let ports: Vec<&Link> = ctx.candidate_ports().filter(|l| l.multicast).collect();
    let mut findings = Vec::new();
    for (proto, base, key, effective) in [
        ("IGMP", "net/ipv4/conf", "force_igmp_version", effective_igmp as fn(u32, u32) -> u32),
        ("MLD", "net/ipv6/conf", "force_mld_version", effective_mld),
    ] {
        let Some(all) = read_num(&format!("{base}/all/{key}")) else { continue };
        let per_port: Vec<(&Link, u32, u32)> = ports
            .iter()
            .filter_map(|l| {
                let dev = read_num(&format!("{base}/{}/{key}", l.name))?;
                Some((*l, dev, effective(all, dev)))
            })
            .collect();
        let versions: BTreeSet<u32> = per_port.iter().map(|(_, _, v)| *v).collect();
        if versions.len() <= 1 {
            continue;
        }
        let listing = per_port
            .iter()
            .map(|(l, _, v)| format!("{} {}", l.name, describe(proto, *v)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut finding = Finding::new(
            Status::Warn,
            format!("{proto} versions differ between interfaces: {listing}"),
        )
        .note(format!(
            "or force the same version everywhere: sysctl -w {}.all.{key}=N",
            base.replace('/', ".")
        ));
        if all != 0 {
            finding = finding.fix(sysctl_command(&format!("{base}/all/{key}"), "0"));
        }
        for (link, dev, _) in &per_port {
            if *dev != 0 {
                finding = finding.fix(sysctl_command(&format!("{base}/{}/{key}", link.name), "0"));
            }
        }
        findings.push(finding);
    }
    Check::from_findings(
        "forced_versions",
        Status::Ok,
        format!("IGMP/MLD versions agree on {} interface(s)", ports.len()),
        findings,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_versions() {
        assert_eq!(effective_igmp(0, 0), 0);
        assert_eq!(effective_igmp(0, 2), 2);
        assert_eq!(effective_igmp(2, 1), 1);
        assert_eq!(effective_igmp(3, 0), 3);
        assert_eq!(effective_mld(0, 1), 1);
        assert_eq!(effective_mld(1, 2), 2);
        assert_eq!(effective_mld(0, 0), 0);
    }
}
