//! Checks on interfaces: the MULTICAST flag, bridges that snoop without a querier, XDP in
//! generic mode, and the veth pitfalls (GRO on the peer, TX checksum offload; see
//! docs/architecture.md).
//!
//! Everything comes from one rtnetlink link dump of this namespace (`ports::list`, the same
//! interface model the daemon uses) plus the read-only ethtool ioctls (no `ethtool` program
//! needed, no privileges).

use super::{Check, Context, Finding, Status};

/// Check 3: interfaces that are up (not loopback) without the MULTICAST flag.
pub fn check_multicast_flag(ctx: &Context) -> Check {
    let mut findings = Vec::new();
    for link in ctx.candidate_ports() {
        if link.multicast {
            continue;
        }
        let focus = ctx.iface.as_deref() == Some(link.name.as_str());
        // Point-to-point tunnels (WireGuard, ipip) often run without it on purpose: only the
        // interface the user named, or an Ethernet-like one, is a problem.
        let status = if focus || !link.pointopoint { Status::Problem } else { Status::Warn };
        findings.push(
            Finding::new(
                status,
                format!(
                    "{} has no MULTICAST flag: the kernel neither sends nor accepts multicast \
                     (or IGMP/MLD) on it",
                    link.name
                ),
            )
            .subject(&link.name)
            .fix(format!("ip link set dev {} multicast on", link.name)),
        );
    }
    let n = ctx.candidate_ports().count();
    Check::from_findings(
        "multicast_flag",
        Status::Ok,
        format!("all {n} interface(s) that are up have the MULTICAST flag"),
        findings,
    )
}

/// Check 6: bridges with IGMP/MLD snooping on and no querier.
pub fn check_bridge_querier(ctx: &Context) -> Check {
    let mut findings = Vec::new();
    let mut bridges = 0;
    for link in &ctx.links {
        let Some(bridge) = &link.bridge else { continue };
        bridges += 1;
        let name = &link.name;
        if !bridge.snooping {
            findings.push(
                Finding::new(Status::Ok, format!("{name}: multicast snooping off (floods)"))
                    .subject(name),
            );
        } else if bridge.querier {
            findings.push(
                Finding::new(Status::Ok, format!("{name}: snooping with its own querier"))
                    .subject(name),
            );
        } else if let Some(other) = &bridge.other_querier {
            findings.push(
                Finding::new(
                    Status::Ok,
                    format!("{name}: snooping; another querier ({other}) is active"),
                )
                .subject(name),
            );
        } else {
            findings.push(
                Finding::new(
                    Status::Problem,
                    format!(
                        "bridge {name} snoops IGMP/MLD (mcast_snooping 1) but has no querier \
                         (mcast_querier 0, none heard): multicast is flooded, and memberships \
                         expire after the membership interval because nobody asks hosts to \
                         report again"
                    ),
                )
                .subject(name)
                .fix(format!("ip link set dev {name} type bridge mcast_querier 1"))
                .note(format!(
                    "or run a querier on the segment (mcrelay's daemon sends queries on its \
                     ports), or turn snooping off: ip link set dev {name} type bridge \
                     mcast_snooping 0"
                )),
            );
        }
    }
    if bridges == 0 {
        return Check {
            id: "bridge_querier",
            status: Status::Ok,
            summary: "no Linux bridge".into(),
            findings,
        };
    }
    Check::from_findings(
        "bridge_querier",
        Status::Ok,
        format!("{bridges} bridge(s): snooping has a querier or is off"),
        findings,
    )
}

/// Check 7: XDP programs in generic (skb) mode on drivers that have native XDP.
pub fn check_xdp_mode(ctx: &Context) -> Check {
    let mut findings = Vec::new();
    let mut attached = 0;
    for link in &ctx.links {
        let Some(xdp) = link.xdp else { continue };
        attached += 1;
        let name = &link.name;
        if !xdp.generic() {
            findings.push(
                Finding::new(Status::Ok, format!("{name}: XDP in {:?} mode", xdp.mode))
                    .subject(name),
            );
            continue;
        }
        let prog = xdp
            .skb_prog_id
            .or(xdp.prog_id)
            .map(|id| format!(" (program id {id})"))
            .unwrap_or_default();
        let fix = format!("mcrelay run -i {name} --xdp-mode native");
        let detach = format!(
            "if the generic program is not mcrelay's, detach it first: ip link set dev {name} \
             xdpgeneric off"
        );
        match link.native_xdp() {
            Some(false) => findings.push(
                Finding::new(
                    Status::Ok,
                    format!("{name}: XDP in generic mode{prog} (its driver has no native XDP)"),
                )
                .subject(name),
            ),
            Some(true) => findings.push(
                Finding::new(
                    Status::Warn,
                    format!(
                        "{name}: XDP runs in generic (skb) mode{prog} although its driver ({}) \
                         supports native XDP: every frame pays for an skb first",
                        link.kind.as_deref().unwrap_or("?")
                    ),
                )
                .subject(name)
                .fix(fix)
                .note(detach),
            ),
            None => findings.push(
                Finding::new(
                    Status::Warn,
                    format!(
                        "{name}: XDP runs in generic (skb) mode{prog}; most NIC drivers support \
                         native XDP"
                    ),
                )
                .subject(name)
                .fix(fix)
                .note(detach)
                .note("if the driver refuses native mode, generic is the only choice"),
            ),
        }
    }
    let summary = if attached == 0 {
        "no XDP program attached in this namespace".to_owned()
    } else {
        format!("{attached} interface(s) with XDP, none in generic mode where native is possible")
    };
    Check::from_findings("xdp_mode", Status::Ok, summary, findings)
}

/// Check 8: veth pitfalls. For each veth that has an XDP program (or is `--iface`): its peer
/// needs GRO on (or an XDP program) to receive redirected frames, and local senders on the peer
/// need TX checksum offload off (XDP cannot complete partial checksums).
pub fn check_veth(ctx: &Context) -> Check {
    let mut findings = Vec::new();
    let mut looked = 0;
    for link in ctx.links.iter().filter(|l| l.is_veth()) {
        let focus = ctx.iface.as_deref() == Some(link.name.as_str());
        if link.xdp.is_none() && !focus {
            continue;
        }
        looked += 1;
        let name = &link.name;
        let Some(peer_index) = link.link_index else { continue };
        if let Some(nsid) = link.link_netnsid {
            findings.push(
                Finding::new(
                    Status::Ok,
                    format!(
                        "{name}: its peer (ifindex {peer_index}) is in another network namespace \
                         (netnsid {nsid}) and cannot be checked from here"
                    ),
                )
                .subject(name)
                .note(format!(
                    "in the peer's namespace run `mcrelay doctor --iface PEER`, or there: \
                     ethtool -K PEER gro on; ethtool -K PEER tx off (PEER: the interface with \
                     ifindex {peer_index}, `ip -o link show` lists it)"
                )),
            );
            continue;
        }
        let Some(peer) = ctx.link(peer_index) else { continue };
        let pname = &peer.name;
        // Where this veth has an XDP program, mcrelay redirects into it: broken delivery is a
        // problem. Named only by --iface (nothing attached yet): a warning for what is coming.
        let severity = if link.xdp.is_some() { Status::Problem } else { Status::Warn };
        match ethtool_flag(pname, ETHTOOL_GGRO) {
            Some(false) if peer.xdp.is_none() => findings.push(
                Finding::new(
                    severity,
                    format!(
                        "{name}: its peer {pname} has GRO off and no XDP program: frames an XDP \
                         program redirects into {name} are dropped silently (veth needs NAPI on \
                         the receiving side)"
                    ),
                )
                .subject(name)
                .fix(format!("ethtool -K {pname} gro on")),
            ),
            Some(_) => findings.push(
                Finding::new(Status::Ok, format!("{name}: peer {pname} can receive redirects"))
                    .subject(name),
            ),
            None => findings.push(
                Finding::new(Status::Ok, format!("{name}: cannot read GRO of peer {pname}"))
                    .subject(name),
            ),
        }
        if ethtool_flag(pname, ETHTOOL_GTXCSUM) == Some(true) {
            findings.push(
                Finding::new(
                    Status::Warn,
                    format!(
                        "{name}: its peer {pname} has TX checksum offload on: multicast that a \
                         local sender on {pname} sends carries a partial UDP checksum, which \
                         the relay (XDP) forwards unfinished and receivers drop \
                         (UdpInCsumErrors)"
                    ),
                )
                .subject(name)
                .fix(format!("ethtool -K {pname} tx off")),
            );
        }
    }
    let summary = if looked == 0 {
        "no veth with an XDP program (nothing to check)".to_owned()
    } else {
        format!("{looked} veth port(s): peers receive redirects, no partial checksums")
    };
    Check::from_findings("veth", Status::Ok, summary, findings)
}

/// `ETHTOOL_GGRO`: generic receive offload.
const ETHTOOL_GGRO: u32 = 0x2b;
/// `ETHTOOL_GTXCSUM`: TX checksum offload (any of the checksum features).
const ETHTOOL_GTXCSUM: u32 = 0x16;

/// A boolean feature read with the legacy ethtool ioctl (`SIOCETHTOOL`, read-only, no
/// privileges); `None` when it cannot be read.
fn ethtool_flag(iface: &str, cmd: u32) -> Option<bool> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let bytes = iface.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let mut value = EthtoolValue { cmd, data: 0 };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` is a valid ifreq whose data pointer points at `value`, both live across the
    // call; SIOCETHTOOL with a GET command only writes `value`.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req as *mut IfReq) };
    // SAFETY: `fd` is ours and not used afterwards.
    unsafe { libc::close(fd) };
    (rc == 0).then_some(value.data != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{BridgeMcast, Link, XdpAttachMode, XdpState};

    fn link(name: &str, kind: Option<&str>) -> Link {
        Link::for_tests(2, name, kind)
    }

    #[test]
    fn native_xdp_support() {
        assert_eq!(link("v", Some("veth")).native_xdp(), Some(true));
        assert_eq!(link("tap0", Some("tun")).native_xdp(), Some(true));
        let mut tun = link("tun0", Some("tun"));
        tun.ether = false;
        assert_eq!(tun.native_xdp(), Some(false));
        assert_eq!(link("eth0", None).native_xdp(), None);
        assert_eq!(link("br0", Some("bridge")).native_xdp(), Some(false));
    }

    #[test]
    fn bridge_without_querier_is_a_problem() {
        let mut br = link("br0", Some("bridge"));
        br.bridge = Some(BridgeMcast { snooping: true, querier: false, other_querier: None });
        let ctx = Context::new(vec![br.clone()], None);
        let check = check_bridge_querier(&ctx);
        assert_eq!(check.status, Status::Problem);
        assert_eq!(check.fixes(), vec!["ip link set dev br0 type bridge mcast_querier 1"]);
        br.bridge = Some(BridgeMcast {
            snooping: true,
            querier: false,
            other_querier: Some("10.0.0.1".into()),
        });
        assert_eq!(check_bridge_querier(&Context::new(vec![br], None)).status, Status::Ok);
    }

    #[test]
    fn multicast_flag_off() {
        let mut eth = link("eth0", None);
        eth.multicast = false;
        let mut wg = link("wg0", Some("wireguard"));
        wg.multicast = false;
        wg.pointopoint = true;
        wg.index = 3;
        let check = check_multicast_flag(&Context::new(vec![eth, wg.clone()], None));
        assert_eq!(check.status, Status::Problem);
        assert_eq!(check.fixes().len(), 2);
        let check = check_multicast_flag(&Context::new(vec![wg], None));
        assert_eq!(check.status, Status::Warn);
    }

    #[test]
    fn generic_xdp_on_veth_warns() {
        let mut v = link("v0", Some("veth"));
        v.xdp =
            Some(XdpState { mode: XdpAttachMode::Generic, prog_id: Some(7), skb_prog_id: None });
        let check = check_xdp_mode(&Context::new(vec![v], None));
        assert_eq!(check.status, Status::Warn);
        assert!(check.fixes()[0].contains("--xdp-mode native"));
    }
}
