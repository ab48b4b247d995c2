//! Check 1: where the kernel sends multicast (and so IGMP/MLD joins).
//!
//! The story mcrelay comes from: on a VPN client the route for 224.0.0.0/4 points at the
//! physical NIC, so joins never enter the tunnel. The check asks the kernel itself (netlink
//! `RTM_GETROUTE`, like `ip route get 239.255.255.250`) which device it would use.
//!
//! Two kernel details shape the advice (read in `__mkroute_output`, confirmed with tcpdump):
//! a multicast route with a gateway (`224.0.0.0/4 via GW`) makes the kernel send multicast
//! frames to the gateway's *unicast* MAC, while for routes shorter than /4 (the default route,
//! OpenVPN's `redirect-gateway def1` halves) the gateway is ignored and only the device counts.
//! So OpenVPN's `route 224.0.0.0 240.0.0.0` (always installed with a gateway) is not a fix on
//! `dev tap`. On an L3 device (`dev tun`, WireGuard) there is no MAC to pick and the gateway is
//! harmless (measured: data and IGMP reports reach the OpenVPN server's tun).
//!
//! IPv6: the kernel installs `multicast ff00::/8 dev X table local metric 256` for every
//! interface with IPv6, and the local table is consulted first: a route in the main table never
//! wins. The fix is a lower-metric route in the local table.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage},
        AddressFamily,
    },
    Handle,
};

use super::{read_sysctl, Check, Context, Finding, Status};

/// The group whose route is looked up (SSDP: organisation-local scope, typical traffic).
pub const PROBE_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// A global-scope IPv6 group.
pub const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 1);

/// What the kernel answered for a route lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Route {
        oif: Option<u32>,
        gateway: Option<IpAddr>,
    },
    /// No route (the kernel's error, e.g. "Network is unreachable").
    NoRoute(String),
}

/// `ip route get DST`, over netlink.
pub async fn lookup(handle: &Handle, dst: IpAddr) -> anyhow::Result<Lookup> {
    let mut msg = RouteMessage::default();
    msg.header.address_family =
        if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
    let mut stream = handle.route().get(msg).execute();
    match stream.try_next().await {
        Ok(Some(reply)) => {
            let mut oif = None;
            let mut gateway = None;
            for attr in &reply.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                        gateway = Some(IpAddr::V4(*a));
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                        gateway = Some(IpAddr::V6(*a));
                    }
                    _ => {}
                }
            }
            Ok(Lookup::Route { oif, gateway })
        }
        Ok(None) => Ok(Lookup::NoRoute("no answer from the kernel".into())),
        Err(rtnetlink::Error::NetlinkError(e)) => {
            let text = e.to_io().to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
            Ok(Lookup::NoRoute(text))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("looking up the route to {dst}"))),
    }
}

/// The fix for IPv4, for interface `dev`.
pub fn fix_v4(dev: &str) -> String {
    format!("ip route replace 224.0.0.0/4 dev {dev}")
}

/// The fix for IPv6, for interface `dev`.
pub fn fix_v6(dev: &str) -> String {
    format!("ip -6 route replace multicast ff00::/8 dev {dev} table local metric 1")
}

/// The OpenVPN client-side alternatives to running the fix by hand.
fn openvpn_notes(dev: &str) -> Vec<String> {
    vec![
        format!(
            "OpenVPN client alternative: `redirect-gateway def1` in the client config (the \
             default route then points into {dev}; for routes shorter than /4 the kernel ignores \
             the gateway for multicast), or `script-security 2` plus `route-up \
             /etc/openvpn/mcast-route.sh` with the script running: ip route replace 224.0.0.0/4 \
             dev \"$dev\""
        ),
        "not `route 224.0.0.0 240.0.0.0`: OpenVPN installs it with a gateway, and the kernel \
         then sends multicast frames to that gateway's unicast MAC"
            .into(),
    ]
}

/// The up VPN-like interfaces (tap/tun devices).
fn vpn_links(ctx: &Context) -> Vec<String> {
    ctx.links.iter().filter(|l| l.is_tun() && l.up).map(|l| l.name.clone()).collect()
}

/// IPv4: the route for 224.0.0.0/4.
pub async fn check_v4(handle: &Handle, ctx: &Context) -> anyhow::Result<Check> {
    let answer = lookup(handle, IpAddr::V4(PROBE_V4)).await?;
    Ok(judge(ctx, &answer, Family::V4))
}

/// IPv6: the route for ff00::/8.
pub async fn check_v6(handle: &Handle, ctx: &Context) -> anyhow::Result<Check> {
    if read_sysctl("net/ipv6/conf/all/disable_ipv6").is_none() {
        return Ok(Check::skipped("multicast_route_v6", "IPv6 is not available on this host"));
    }
    if let Some(iface) = &ctx.iface {
        let key = format!("net/ipv6/conf/{iface}/disable_ipv6");
        if read_sysctl(&key).is_none_or(|v| v == "1") {
            return Ok(Check::skipped(
                "multicast_route_v6",
                format!("IPv6 is disabled on {iface}"),
            ));
        }
    }
    let answer = lookup(handle, IpAddr::V6(PROBE_V6)).await?;
    Ok(judge(ctx, &answer, Family::V6))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Turns a route lookup into the check's result (pure, unit-tested).
pub fn judge(ctx: &Context, answer: &Lookup, family: Family) -> Check {
    let (id, prefix, probe, fix): (_, _, String, fn(&str) -> String) = match family {
        Family::V4 => ("multicast_route", "224.0.0.0/4", PROBE_V4.to_string(), fix_v4),
        Family::V6 => ("multicast_route_v6", "ff00::/8", PROBE_V6.to_string(), fix_v6),
    };
    let joins = if family == Family::V4 { "IGMP joins" } else { "MLD reports" };
    let with_notes = |mut finding: Finding, dev: &str| {
        let tap = ctx.link_by_name(dev).is_none_or(|l| l.ether);
        if family == Family::V4 && tap {
            for note in openvpn_notes(dev) {
                finding = finding.note(note);
            }
        }
        finding
    };
    let mut findings = Vec::new();
    let ok_summary = match (answer, ctx.iface.as_deref()) {
        (Lookup::NoRoute(err), Some(iface)) => {
            findings.push(with_notes(
                Finding::new(
                    Status::Problem,
                    format!(
                        "no route for {prefix} ({probe}: {err}): applications that do not pick \
                         an interface cannot send multicast, and nothing goes out {iface}"
                    ),
                )
                .fix(fix(iface)),
                iface,
            ));
            String::new()
        }
        (Lookup::NoRoute(err), None) => {
            let any_port = ctx.candidate_ports().any(|l| l.multicast);
            if any_port {
                findings.push(
                    Finding::new(
                        Status::Warn,
                        format!(
                            "no route for {prefix} ({probe}: {err}): applications that do not \
                             pick an interface cannot send multicast"
                        ),
                    )
                    .fix(fix("IFACE"))
                    .note("IFACE: the interface that should carry multicast (the VPN's tap0)"),
                );
            }
            format!("no route for {prefix} and no interface that could carry it")
        }
        (Lookup::Route { oif, gateway }, focus) => {
            let dev = oif.map_or_else(|| "(no device)".to_owned(), |i| ctx.name_of(i));
            let vpns = vpn_links(ctx);
            match focus {
                Some(iface) if dev != iface => findings.push(with_notes(
                    Finding::new(
                        Status::Problem,
                        format!(
                            "{prefix} goes out {dev}, not {iface}: multicast and {joins} never \
                             enter {iface}"
                        ),
                    )
                    .subject(&dev)
                    .fix(fix(iface)),
                    iface,
                )),
                None if !vpns.is_empty() && !vpns.contains(&dev) => {
                    let first = &vpns[0];
                    findings.push(with_notes(
                        Finding::new(
                            Status::Warn,
                            format!(
                                "{prefix} goes out {dev} although VPN interface(s) {} exist: if \
                                 multicast should cross the VPN, {joins} never enter it",
                                vpns.join(", ")
                            ),
                        )
                        .subject(&dev)
                        .fix(fix(first)),
                        first,
                    ));
                }
                _ => {}
            }
            // On a device without a link layer (tun, WireGuard) the gateway picks no MAC and
            // is harmless: OpenVPN's `route 224.0.0.0 240.0.0.0` on `dev tun` was measured to
            // carry data and IGMP reports to the server.
            let ether = oif.and_then(|i| ctx.link(i)).is_none_or(|l| l.ether);
            if let (Some(gw), Family::V4, true) = (gateway, family, ether) {
                let status = if focus.is_some() { Status::Problem } else { Status::Warn };
                let target = focus.unwrap_or(&dev);
                findings.push(with_notes(
                    Finding::new(
                        status,
                        format!(
                            "the route for {prefix} has a gateway ({gw} on {dev}): the kernel \
                             sends multicast frames to the gateway's unicast MAC instead of the \
                             group's multicast MAC"
                        ),
                    )
                    .subject(&dev)
                    .fix(fix(target)),
                    target,
                ));
            }
            format!("{prefix} goes out {dev}")
        }
    };
    Check::from_findings(id, Status::Ok, ok_summary, findings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Link;

    fn link(index: u32, name: &str, kind: Option<&str>) -> Link {
        Link::for_tests(index, name, kind)
    }

    fn ctx(iface: Option<&str>) -> Context {
        Context::new(
            vec![link(2, "eth0", None), link(3, "tap0", Some("tun"))],
            iface.map(str::to_owned),
        )
    }

    #[test]
    fn route_via_nic_with_iface_is_a_problem() {
        let answer = Lookup::Route { oif: Some(2), gateway: None };
        let check = judge(&ctx(Some("tap0")), &answer, Family::V4);
        assert_eq!(check.status, Status::Problem);
        assert_eq!(check.fixes(), vec!["ip route replace 224.0.0.0/4 dev tap0"]);
        assert!(check.summary.contains("eth0"), "{}", check.summary);
        let check = judge(&ctx(Some("tap0")), &answer, Family::V6);
        assert_eq!(
            check.fixes(),
            vec!["ip -6 route replace multicast ff00::/8 dev tap0 table local metric 1"]
        );
    }

    #[test]
    fn route_via_nic_without_iface_warns_naming_the_vpn() {
        let answer = Lookup::Route { oif: Some(2), gateway: None };
        let check = judge(&ctx(None), &answer, Family::V4);
        assert_eq!(check.status, Status::Warn);
        assert!(check.summary.contains("tap0"));
        assert_eq!(check.fixes(), vec!["ip route replace 224.0.0.0/4 dev tap0"]);
    }

    #[test]
    fn route_into_the_vpn_is_fine() {
        let answer = Lookup::Route { oif: Some(3), gateway: None };
        assert_eq!(judge(&ctx(Some("tap0")), &answer, Family::V4).status, Status::Ok);
        assert_eq!(judge(&ctx(None), &answer, Family::V4).status, Status::Ok);
    }

    #[test]
    fn gateway_on_the_multicast_route_is_flagged() {
        let answer =
            Lookup::Route { oif: Some(3), gateway: Some("10.8.0.1".parse().expect("address")) };
        let check = judge(&ctx(Some("tap0")), &answer, Family::V4);
        assert_eq!(check.status, Status::Problem);
        assert!(check.summary.contains("gateway"));
    }

    #[test]
    fn gateway_on_a_tun_is_harmless() {
        let mut tun = link(4, "tun0", Some("tun"));
        tun.ether = false;
        let ctx = Context::new(vec![link(2, "eth0", None), tun], Some("tun0".into()));
        let answer =
            Lookup::Route { oif: Some(4), gateway: Some("10.8.0.1".parse().expect("address")) };
        assert_eq!(judge(&ctx, &answer, Family::V4).status, Status::Ok);
        // The OpenVPN tap advice is not given for a tun.
        let answer = Lookup::Route { oif: Some(2), gateway: None };
        let check = judge(&ctx, &answer, Family::V4);
        assert_eq!(check.status, Status::Problem);
        assert!(check.findings.iter().all(|f| f.notes.is_empty()), "{check:?}");
    }

    #[test]
    fn no_route() {
        let answer = Lookup::NoRoute("Network is unreachable".into());
        assert_eq!(judge(&ctx(Some("tap0")), &answer, Family::V4).status, Status::Problem);
        assert_eq!(judge(&ctx(None), &answer, Family::V4).status, Status::Warn);
    }
}
