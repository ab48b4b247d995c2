//! Check `wireguard`: what a WireGuard interface needs to carry multicast.
//!
//! WireGuard hands a packet to the one peer whose AllowedIPs cover its *destination* (and accepts
//! from a peer only packets whose *source* its AllowedIPs cover). A multicast destination is
//! nobody's unless a peer's AllowedIPs include it, and AllowedIPs cannot overlap between peers.
//!
//! Which side this host is on (the rule the docs state):
//! - **peer** (client): the interface has exactly one peer and no mcrelay daemon runs in this
//!   network namespace. That peer's AllowedIPs must cover 224.0.0.0/4 (ff00::/8 when the tunnel
//!   carries IPv6), and the kernel's route for multicast must point at the interface, or IGMP
//!   reports and multicast data never leave through the tunnel;
//! - **hub**: two or more peers, or one peer while mcrelay runs here. The kernel's multicast
//!   reaches at most one peer, so mcrelay needs `--per-client IFACE`; a peer whose AllowedIPs
//!   cover (part of) 224.0.0.0/4 takes all of that multicast for itself, which is flagged.
//!
//! Interfaces: kernel WireGuard (link kind `wireguard`) or wireguard-go (a tun whose UAPI socket
//! `/var/run/wireguard/IFACE.sock` belongs to a process of this network namespace: the socket
//! directory is shared by all namespaces). Peers come from `wg show IFACE dump`
//! (wireguard-tools); without `wg` the check says it was skipped and why.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use rtnetlink::Handle;

use super::{
    firewall::{find_tool, run_tool},
    route::{self, Lookup, PROBE_V4, PROBE_V6},
    Check, Context, Finding, Status,
};
use crate::ports::Link;

/// Where wireguard-go (and other userspace implementations) put their UAPI sockets.
const SOCKET_DIRS: [&str; 2] = ["/var/run/wireguard", "/run/wireguard"];

/// An address prefix (`224.0.0.0/4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub len: u8,
}

impl Net {
    pub const MCAST_V4: Net = Net { addr: IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), len: 4 };
    pub const MCAST_V6: Net =
        Net { addr: IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)), len: 8 };

    /// `ADDR/LEN` (a bare address is a host prefix).
    pub fn parse(text: &str) -> Option<Net> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse::<u8>().ok()?),
            None => {
                let a = text.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Net { addr, len })
    }

    fn bits(addr: IpAddr) -> u128 {
        match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        }
    }

    /// The first `len` bits of [`Net::bits`] (IPv4 sits in the top 32 bits).
    fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        }
    }

    /// Whether every address of `other` is in `self` (same family).
    pub fn covers(&self, other: &Net) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.len <= other.len
            && (Self::bits(self.addr) ^ Self::bits(other.addr)) & Self::mask(self.len) == 0
    }

    /// Whether the two share any address (same family).
    pub fn overlaps(&self, other: &Net) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One peer of `wg show IFACE dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub key: String,
    /// AllowedIPs as `wg` printed them (kept in order for the fix command).
    pub allowed: Vec<String>,
}

impl Peer {
    fn nets(&self) -> impl Iterator<Item = Net> + '_ {
        self.allowed.iter().filter_map(|a| Net::parse(a))
    }

    /// Whether one AllowedIPs prefix covers all of `net`.
    pub fn covers(&self, net: &Net) -> bool {
        self.nets().any(|n| n.covers(net))
    }

    /// The AllowedIPs that share addresses with `net`.
    pub fn overlapping(&self, net: &Net) -> Vec<Net> {
        self.nets().filter(|n| n.overlaps(net)).collect()
    }

    /// Whether the peer has any IPv6 AllowedIPs (the tunnel carries IPv6).
    pub fn uses_v6(&self) -> bool {
        self.nets().any(|n| n.addr.is_ipv6())
    }

    fn allowed_text(&self) -> String {
        if self.allowed.is_empty() {
            "none".into()
        } else {
            self.allowed.join(", ")
        }
    }
}

/// Parses `wg show IFACE dump`: the interface line (private key, public key, port, fwmark),
/// then one line per peer (public key, preshared key, endpoint, allowed ips, handshake, rx, tx,
/// keepalive), tab-separated.
pub fn parse_dump(text: &str) -> Result<Vec<Peer>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().ok_or("`wg show dump` printed nothing")?;
    if first.split('\t').count() != 4 {
        return Err(format!("unexpected interface line in `wg show dump`: {first:?}"));
    }
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() != 8 {
                return Err(format!("unexpected peer line in `wg show dump`: {line:?}"));
            }
            let allowed = if fields[3] == "(none)" {
                Vec::new()
            } else {
                fields[3]
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            Ok(Peer { key: fields[0].to_owned(), allowed })
        })
        .collect()
}

/// How an interface is WireGuard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    Kernel,
    /// wireguard-go (or another userspace implementation) with this UAPI socket.
    Userspace(PathBuf),
}

/// The userspace UAPI socket of `name` when one exists and was made in this network namespace.
fn userspace_socket(name: &str) -> Option<PathBuf> {
    let path = SOCKET_DIRS
        .iter()
        .map(|d| Path::new(d).join(format!("{name}.sock")))
        .find(|p| std::fs::symlink_metadata(p).is_ok())?;
    match std::fs::read_to_string("/proc/net/unix") {
        Ok(table) => unix_socket_listed(&table, &path).then_some(path),
        // Cannot tell: take it.
        Err(_) => Some(path),
    }
}

/// Whether `/proc/net/unix` (`table`) lists a socket bound to `path`. The table is that of the
/// reader's network namespace: the socket directory is shared by all namespaces, but a socket
/// made in another one is not listed (the process that made it may be gone: wireguard-go
/// makes it before it daemonizes).
pub fn unix_socket_listed(table: &str, path: &Path) -> bool {
    let Some(path) = path.to_str() else { return false };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && SOCKET_DIRS.iter().any(|d| {
                let file = path.rsplit('/').next().unwrap_or(path);
                fields[7] == path || fields[7] == format!("{d}/{file}")
            })
    })
}

/// Whether `link` is a WireGuard interface, and which kind.
pub fn flavor(link: &Link) -> Option<Flavor> {
    match link.kind.as_deref() {
        Some("wireguard") => Some(Flavor::Kernel),
        Some("tun") if !link.ether => userspace_socket(&link.name).map(Flavor::Userspace),
        _ => None,
    }
}

/// The WireGuard interfaces this check looks at: `--iface` (when it is one), else all.
fn interfaces(ctx: &Context) -> Vec<(&Link, Flavor)> {
    ctx.links
        .iter()
        .filter(|l| ctx.iface.as_deref().is_none_or(|i| i == l.name))
        .filter_map(|l| flavor(l).map(|f| (l, f)))
        .collect()
}

/// Which side of the tunnel this interface is on (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Peer,
    Hub,
}

/// The rule: one peer and no relay here is a peer; otherwise a hub.
pub fn role(peers: usize, relay_running: bool) -> Role {
    if peers == 1 && !relay_running {
        Role::Peer
    } else {
        Role::Hub
    }
}

/// Runs the check.
pub async fn check(handle: &Handle, ctx: &Context) -> anyhow::Result<Check> {
    let found = interfaces(ctx);
    if found.is_empty() {
        let summary = match &ctx.iface {
            Some(iface) => format!("{iface} is not a WireGuard interface"),
            None => "no WireGuard interface".to_owned(),
        };
        return Ok(Check { id: ID, status: Status::Ok, summary, findings: Vec::new() });
    }
    let names: Vec<&str> = found.iter().map(|(l, _)| l.name.as_str()).collect();
    let Some(wg) = find_tool("wg") else {
        return Ok(Check::skipped(
            ID,
            format!(
                "WireGuard interface(s) {} found, but `wg` (wireguard-tools) is not installed, so \
                 their peers and AllowedIPs cannot be read (apt-get install wireguard-tools)",
                names.join(", ")
            ),
        ));
    };
    let relay_running = crate::instance::is_running();
    let v4 = route::lookup(handle, IpAddr::V4(PROBE_V4)).await?;
    let v6 = route::lookup(handle, IpAddr::V6(PROBE_V6)).await?;
    let mut findings = Vec::new();
    let mut skipped = Vec::new();
    for (link, _) in &found {
        match run_tool(&wg, &["show", &link.name, "dump"]).and_then(|t| parse_dump(&t)) {
            Ok(peers) => findings.extend(judge(ctx, link, &peers, relay_running, &v4, &v6)),
            Err(e) => skipped.push(format!("{}: {e}", link.name)),
        }
    }
    if findings.is_empty() {
        return Ok(Check::skipped(
            ID,
            format!("cannot read the peers ({}); run as root", skipped.join("; ")),
        ));
    }
    for why in skipped {
        findings.push(Finding::new(Status::Skip, format!("not checked: {why}")));
    }
    Ok(Check::from_findings(
        ID,
        Status::Ok,
        format!("WireGuard {}: AllowedIPs and routes let multicast through", names.join(", ")),
        findings,
    ))
}

const ID: &str = "wireguard";

/// The `wg set` command that sets `peer`'s AllowedIPs to its current ones plus `add` (`wg set`
/// replaces the list, so the old ones must be repeated).
fn allowed_ips_fix(iface: &str, peer: &Peer, add: &[Net]) -> String {
    let mut list = peer.allowed.clone();
    list.extend(add.iter().map(Net::to_string));
    format!("wg set {iface} peer {} allowed-ips {}", peer.key, list.join(","))
}

/// The findings for one interface (pure, unit-tested).
pub fn judge(
    ctx: &Context,
    link: &Link,
    peers: &[Peer],
    relay_running: bool,
    v4: &Lookup,
    v6: &Lookup,
) -> Vec<Finding> {
    let name = &link.name;
    if peers.is_empty() {
        return vec![Finding::new(
            Status::Warn,
            format!("WireGuard interface {name} has no peer: nothing, multicast included, can go through it"),
        )
        .subject(name)
        .note(format!(
            "add the other side: wg set {name} peer KEY allowed-ips ADDRESSES endpoint \
             HOST:PORT (on a peer, ADDRESSES include 224.0.0.0/4; on a hub they must not)"
        ))];
    }
    match role(peers.len(), relay_running) {
        Role::Peer => judge_peer(ctx, link, &peers[0], v4, v6),
        Role::Hub => judge_hub(link, peers),
    }
}

fn judge_peer(ctx: &Context, link: &Link, peer: &Peer, v4: &Lookup, v6: &Lookup) -> Vec<Finding> {
    let name = &link.name;
    let mut findings = Vec::new();
    let uses_v6 = peer.uses_v6();
    let mut missing = Vec::new();
    if !peer.covers(&Net::MCAST_V4) {
        missing.push(Net::MCAST_V4);
    }
    if uses_v6 && !peer.covers(&Net::MCAST_V6) {
        missing.push(Net::MCAST_V6);
    }
    let sources_note = "the AllowedIPs must also cover the senders whose multicast this host \
                        should receive (e.g. the LAN behind the hub): WireGuard drops an incoming \
                        packet whose source its peer's AllowedIPs do not cover";
    if missing.is_empty() {
        findings.push(
            Finding::new(
                Status::Ok,
                format!("{name}: its peer's AllowedIPs ({}) cover multicast", peer.allowed_text()),
            )
            .subject(name)
            .note(sources_note),
        );
    } else {
        let what = missing.iter().map(Net::to_string).collect::<Vec<_>>().join(" and ");
        let status = if missing.contains(&Net::MCAST_V4) { Status::Problem } else { Status::Warn };
        let quick: Vec<String> =
            peer.allowed.iter().cloned().chain(missing.iter().map(Net::to_string)).collect();
        findings.push(
            Finding::new(
                status,
                format!(
                    "{name}: the AllowedIPs of its peer ({}) do not include {what}: WireGuard \
                     sends a packet only to the peer whose AllowedIPs cover its destination, so \
                     IGMP/MLD reports and multicast data never leave through {name}",
                    peer.allowed_text()
                ),
            )
            .subject(name)
            .fix(allowed_ips_fix(name, peer, &missing))
            .note(format!(
                "in a wg-quick config (/etc/wireguard/{name}.conf), [Peer] section: AllowedIPs = \
                 {} (wg-quick then also adds the route {} dev {name})",
                quick.join(", "),
                Net::MCAST_V4
            ))
            .note(sources_note),
        );
    }
    // The route: multicast (and the IGMP reports of joins without an interface) must go out
    // this interface. A gateway on it is harmless here (no link layer: measured on tun).
    match v4 {
        Lookup::Route { oif: Some(oif), .. } if ctx.name_of(*oif) == *name => findings.push(
            Finding::new(Status::Ok, format!("{}/4 goes out {name}", Ipv4Addr::new(224, 0, 0, 0)))
                .subject(name),
        ),
        other => {
            let now = match other {
                Lookup::Route { oif, .. } => format!(
                    "out {}, not {name}",
                    oif.map_or_else(|| "(no device)".to_owned(), |i| ctx.name_of(i))
                ),
                Lookup::NoRoute(err) => format!("nowhere (no route: {err}), not out {name}"),
            };
            findings.push(
                Finding::new(
                    Status::Problem,
                    format!(
                        "{name}: the kernel sends multicast ({PROBE_V4}) {now}: applications that \
                         do not pick an interface, and their IGMP joins, never enter the tunnel"
                    ),
                )
                .subject(name)
                .fix(route::fix_v4(name))
                .note(
                    "wg-quick: `PostUp = ip route replace 224.0.0.0/4 dev %i` in [Interface], \
                     or 224.0.0.0/4 in the peer's AllowedIPs (wg-quick adds a route for each; \
                     not with `Table = off`)",
                ),
            );
        }
    }
    if uses_v6 {
        let here = matches!(v6, Lookup::Route { oif: Some(oif), .. } if ctx.name_of(*oif) == *name);
        if !here {
            findings.push(
                Finding::new(
                    Status::Warn,
                    format!(
                        "{name}: IPv6 multicast ({PROBE_V6}) does not go out {name}: the \
                         kernel's ff00::/8 routes in the local table win over a main-table route \
                         (also the one wg-quick adds for ff00::/8)"
                    ),
                )
                .subject(name)
                .fix(route::fix_v6(name)),
            );
        }
    }
    findings
}

fn judge_hub(link: &Link, peers: &[Peer]) -> Vec<Finding> {
    let name = &link.name;
    let why = if peers.len() >= 2 {
        format!("{} peers", peers.len())
    } else {
        "one peer, and mcrelay runs here".to_owned()
    };
    let mut findings = vec![Finding::new(
        Status::Ok,
        format!(
            "{name} is a hub ({why}): WireGuard sends a multicast destination to no peer unless \
             one peer's AllowedIPs cover it, and AllowedIPs cannot overlap between peers, so the \
             kernel's multicast reaches one peer at most"
        ),
    )
    .subject(name)
    .note(format!(
        "mcrelay reaches every joined peer with per-client delivery (each copy to the peer's own \
         tunnel address): mcrelay run -i LAN -i {name} --per-client {name}"
    ))];
    for peer in peers {
        let v4 = peer.overlapping(&Net::MCAST_V4);
        let v6 = peer.overlapping(&Net::MCAST_V6);
        if v4.is_empty() && v6.is_empty() {
            continue;
        }
        let owned: Vec<Net> = v4.iter().chain(&v6).copied().collect();
        let listed = owned.iter().map(Net::to_string).collect::<Vec<_>>().join(", ");
        let mut finding = Finding::new(
            Status::Warn,
            format!(
                "{name}: hub peer {} owns multicast ({listed} in its AllowedIPs): all multicast \
                 this host sends into {name} goes to that one peer only, never to the other \
                 peers",
                peer.key
            ),
        )
        .subject(name)
        .note(format!(
            "with {} peers, multicast reaches them through mcrelay's per-client copies \
             (--per-client {name}); AllowedIPs with multicast belong on the peers' side (their \
             AllowedIPs for this hub)",
            peers.len()
        ));
        // Only prefixes that are multicast themselves can go without changing unicast routing.
        let is_mcast = |n: &Net| Net::MCAST_V4.covers(n) || Net::MCAST_V6.covers(n);
        let keep: Vec<String> = peer
            .allowed
            .iter()
            .filter(|a| Net::parse(a).is_none_or(|n| !is_mcast(&n)))
            .cloned()
            .collect();
        if owned.iter().all(is_mcast) && !keep.is_empty() {
            finding = finding.fix(format!(
                "wg set {name} peer {} allowed-ips {}",
                peer.key,
                keep.join(",")
            ));
        } else {
            finding = finding.note(format!(
                "its AllowedIPs cover more than multicast (a full tunnel?): leave them, and let \
                 mcrelay --per-client {name} address the copies to each peer"
            ));
        }
        findings.push(finding);
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "QfS7PkIpGBJ9UDu6YssEHZQAcF2BSVQdjnXVBSwQ/2o=";

    fn peer(allowed: &[&str]) -> Peer {
        Peer { key: KEY.into(), allowed: allowed.iter().map(|s| (*s).to_owned()).collect() }
    }

    fn wg_link() -> Link {
        let mut l = Link::for_tests(5, "wg0", Some("wireguard"));
        l.ether = false;
        l
    }

    fn ctx() -> Context {
        Context::new(vec![Link::for_tests(2, "eth0", None), wg_link()], Some("wg0".into()))
    }

    #[test]
    fn nets() {
        let m = Net::MCAST_V4;
        assert!(m.covers(&Net::parse("239.1.2.3").expect("net")));
        assert!(!m.covers(&Net::parse("10.0.0.0/8").expect("net")));
        assert!(Net::parse("0.0.0.0/0").expect("net").covers(&m));
        assert!(!Net::parse("239.0.0.0/8").expect("net").covers(&m));
        assert!(Net::parse("239.0.0.0/8").expect("net").overlaps(&m));
        assert!(Net::parse("::/0").expect("net").covers(&Net::MCAST_V6));
        assert!(!Net::parse("::/0").expect("net").covers(&m));
        assert!(Net::parse("ff02::16").expect("net").overlaps(&Net::MCAST_V6));
        assert_eq!(Net::parse("10.0.0.0/33"), None);
    }

    #[test]
    fn dump() {
        let text = "priv\tpub\t51820\toff\n\
                    KEY1\t(none)\t(none)\t10.9.0.2/32,224.0.0.0/4\t0\t0\t0\toff\n\
                    KEY2\t(none)\t192.0.2.1:51820\t(none)\t0\t0\t0\t25\n";
        let peers = parse_dump(text).expect("parses");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].allowed, vec!["10.9.0.2/32", "224.0.0.0/4"]);
        assert!(peers[0].covers(&Net::MCAST_V4));
        assert!(peers[1].allowed.is_empty());
        assert!(parse_dump("").is_err());
        assert!(parse_dump("a\tb\n").is_err());
    }

    #[test]
    fn socket_of_this_namespace() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                     00000000812db56d: 00000002 00000000 00010000 0001 01 1877667 \
                     /var/run/wireguard/wg7.sock\n\
                     00000000812db56e: 00000002 00000000 00010000 0001 01 1877668\n";
        assert!(unix_socket_listed(table, Path::new("/var/run/wireguard/wg7.sock")));
        assert!(unix_socket_listed(table, Path::new("/run/wireguard/wg7.sock")));
        assert!(!unix_socket_listed(table, Path::new("/var/run/wireguard/wg8.sock")));
    }

    #[test]
    fn roles() {
        assert_eq!(role(1, false), Role::Peer);
        assert_eq!(role(1, true), Role::Hub);
        assert_eq!(role(2, false), Role::Hub);
    }

    fn route(oif: u32) -> Lookup {
        Lookup::Route { oif: Some(oif), gateway: None }
    }

    #[test]
    fn peer_without_multicast_allowed_ips() {
        let link = wg_link();
        let f = judge(&ctx(), &link, &[peer(&["10.9.0.1/32"])], false, &route(2), &route(2));
        let check = Check::from_findings(ID, Status::Ok, "fine", f);
        assert_eq!(check.status, Status::Problem);
        assert_eq!(
            check.fixes(),
            vec![
                format!("wg set wg0 peer {KEY} allowed-ips 10.9.0.1/32,224.0.0.0/4"),
                "ip route replace 224.0.0.0/4 dev wg0".to_owned(),
            ]
        );
        // IPv6 in the tunnel: ff00::/8 too.
        let f = judge(
            &ctx(),
            &link,
            &[peer(&["10.9.0.1/32", "fd00::1/128"])],
            false,
            &route(5),
            &route(5),
        );
        let check = Check::from_findings(ID, Status::Ok, "fine", f);
        assert_eq!(
            check.fixes(),
            vec![format!(
                "wg set wg0 peer {KEY} allowed-ips 10.9.0.1/32,fd00::1/128,224.0.0.0/4,ff00::/8"
            )]
        );
    }

    #[test]
    fn good_peer() {
        let link = wg_link();
        let f = judge(&ctx(), &link, &[peer(&["0.0.0.0/0"])], false, &route(5), &route(5));
        assert_eq!(Check::from_findings(ID, Status::Ok, "fine", f).status, Status::Ok);
        let f = judge(
            &ctx(),
            &link,
            &[peer(&["10.9.0.1/32", "224.0.0.0/4"])],
            false,
            &Lookup::Route { oif: Some(5), gateway: Some("10.9.0.1".parse().expect("ip")) },
            &route(5),
        );
        assert_eq!(Check::from_findings(ID, Status::Ok, "fine", f).status, Status::Ok);
    }

    #[test]
    fn hub_peer_owning_multicast() {
        let link = wg_link();
        let peers = [peer(&["10.9.0.2/32", "224.0.0.0/4"]), peer(&["10.9.0.3/32"])];
        let f = judge(&ctx(), &link, &peers, false, &route(2), &route(2));
        let check = Check::from_findings(ID, Status::Ok, "fine", f);
        assert_eq!(check.status, Status::Warn);
        assert_eq!(check.fixes(), vec![format!("wg set wg0 peer {KEY} allowed-ips 10.9.0.2/32")]);
        let peers = [peer(&["0.0.0.0/0"]), peer(&["10.9.0.3/32"])];
        let f = judge(&ctx(), &link, &peers, false, &route(2), &route(2));
        let check = Check::from_findings(ID, Status::Ok, "fine", f);
        assert_eq!(check.status, Status::Warn);
        assert!(check.fixes().is_empty());
        let peers = [peer(&["10.9.0.2/32"]), peer(&["10.9.0.3/32"])];
        let f = judge(&ctx(), &link, &peers, false, &route(2), &route(2));
        let check = Check::from_findings(ID, Status::Ok, "fine", f);
        assert_eq!(check.status, Status::Ok);
        assert!(check.findings[0].notes[0].contains("--per-client wg0"));
    }
}
