//! Interfaces: listing them over netlink, resolving `-i` names and globs, preparing them.
//! [`Link`] is mcrelay's one interface model: the daemon attaches to it, `mcrelay doctor`
//! checks it.
//!
//! mcrelay never reads /sys/class/net (under `ip netns exec` or nsenter it may show another
//! namespace); everything comes from rtnetlink in the process's own network namespace.

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::link::{
        BridgeQuerierState, InfoBridge, InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo,
        LinkLayerType, LinkMessage, LinkXdp, XdpAttached,
    },
    Handle, LinkUnspec,
};

use crate::error::UsageError;

/// A netlink request that failed. The message names what was asked and gives the kernel's (or
/// the socket's) reason; the reason is part of the message rather than a `source()`, so both
/// `{e}` and anyhow's `{e:#}` show it once.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened or subscribed.
    #[error("{what}: {error}")]
    Socket { what: &'static str, error: std::io::Error },
    /// The kernel refused or failed a request.
    #[error("{what}: {error}")]
    Request { what: String, error: rtnetlink::Error },
}

impl NetlinkError {
    fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        move |error| Self::Request { what: what.into(), error }
    }

    fn socket(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |error| Self::Socket { what, error }
    }
}

/// An interface as netlink reports it: what the daemon needs to attach and what
/// `mcrelay doctor` checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` as the kernel names it (veth, tun, bridge, vxlan, wireguard, ...);
    /// `None` for physical NICs.
    pub kind: Option<String>,
    pub allmulti: bool,
    pub multicast: bool,
    pub up: bool,
    pub loopback: bool,
    pub pointopoint: bool,
    /// Ethernet link layer (a tap is, a tun is not).
    pub ether: bool,
    /// Hardware address (Ethernet MAC), when the device has one.
    pub mac: Option<[u8; 6]>,
    /// The XDP program attached, if any.
    pub xdp: Option<XdpState>,
    /// Multicast settings, for a Linux bridge.
    pub bridge: Option<BridgeMcast>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub link_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: set when the peer lives in another network namespace.
    pub link_netnsid: Option<i32>,
}

impl Link {
    /// Whether this is a veth: frames redirected into it are dropped unless its peer has GRO
    /// on or an XDP program, and local senders on the peer hand over partial checksums that
    /// XDP cannot complete (docs/architecture.md, "veth and checksum pitfalls").
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    /// tap or tun device (OpenVPN, ...).
    pub fn is_tun(&self) -> bool {
        self.kind.as_deref() == Some("tun")
    }

    /// Whether the driver has native XDP: `Some(true)` for veth and tap, `None` for physical
    /// NICs (most drivers do, not all), `Some(false)` for the rest (tun, bridge, dummy, vlan...).
    pub fn native_xdp(&self) -> Option<bool> {
        match self.kind.as_deref() {
            Some("veth") => Some(true),
            Some("tun") => Some(self.ether),
            None if self.ether => None,
            _ => Some(false),
        }
    }
}

/// How an XDP program is attached to an interface (`IFLA_XDP_ATTACHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
    Offload,
    /// Several programs (`XDP_ATTACHED_MULTI`); see the per-mode program ids.
    Multi,
}

/// The XDP attachment of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpState {
    pub mode: XdpAttachMode,
    pub prog_id: Option<u32>,
    /// Program attached in generic (skb) mode, when the kernel reports it separately.
    pub skb_prog_id: Option<u32>,
}

impl XdpState {
    /// Whether a program runs in generic (skb) mode.
    pub fn generic(&self) -> bool {
        self.mode == XdpAttachMode::Generic || self.skb_prog_id.is_some()
    }
}

/// Multicast settings of a Linux bridge.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BridgeMcast {
    pub snooping: bool,
    pub querier: bool,
    /// Another querier the bridge has heard (IPv4 or IPv6 address), while its timer runs.
    pub other_querier: Option<String>,
}

/// Opens an rtnetlink connection on the current tokio runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(NetlinkError::socket("opening a netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every interface of this network namespace.
pub async fn list(handle: &Handle) -> Result<Vec<Link>, NetlinkError> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) =
        stream.try_next().await.map_err(NetlinkError::request("listing interfaces over netlink"))?
    {
        if let Some(link) = from_message(&msg) {
            links.push(link);
        }
    }
    Ok(links)
}

/// The interface a link message describes (`None` without a name).
fn from_message(msg: &LinkMessage) -> Option<Link> {
    let flags = msg.header.flags;
    let mut name = None;
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        allmulti: flags.contains(LinkFlags::Allmulti),
        multicast: flags.contains(LinkFlags::Multicast),
        up: flags.contains(LinkFlags::Up),
        loopback: flags.contains(LinkFlags::Loopback),
        pointopoint: flags.contains(LinkFlags::Pointopoint),
        ether: msg.header.link_layer_type == LinkLayerType::Ether,
        mac: None,
        xdp: None,
        bridge: None,
        link_index: None,
        link_netnsid: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) if a.len() == 6 => {
                link.mac = <[u8; 6]>::try_from(a.as_slice()).ok();
            }
            LinkAttribute::Link(index) => link.link_index = Some(*index),
            LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(*id),
            LinkAttribute::Xdp(xdp) => link.xdp = xdp_state(xdp),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(kind_name(k)),
                        LinkInfo::Data(InfoData::Bridge(opts)) => {
                            link.bridge = Some(bridge_mcast(opts));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link.name = name?;
    Some(link)
}

/// The kernel's name of a link kind (`IFLA_INFO_KIND`: "veth", "tun", "sit", ...).
fn kind_name(kind: &InfoKind) -> String {
    kind.to_string()
}

fn xdp_state(attrs: &[LinkXdp]) -> Option<XdpState> {
    let mut mode = None;
    let mut prog_id = None;
    let mut skb_prog_id = None;
    for attr in attrs {
        match attr {
            LinkXdp::Attached(XdpAttached::Driver) => mode = Some(XdpAttachMode::Native),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = Some(XdpAttachMode::Generic),
            LinkXdp::Attached(XdpAttached::Hardware) => mode = Some(XdpAttachMode::Offload),
            LinkXdp::Attached(XdpAttached::Multiple) => mode = Some(XdpAttachMode::Multi),
            LinkXdp::ProgId(id) if *id != 0 => prog_id = Some(*id),
            LinkXdp::SkbProgId(id) if *id != 0 => skb_prog_id = Some(*id),
            _ => {}
        }
    }
    mode.map(|mode| XdpState { mode, prog_id, skb_prog_id })
}

fn bridge_mcast(opts: &[InfoBridge]) -> BridgeMcast {
    let mut out = BridgeMcast::default();
    for opt in opts {
        match opt {
            InfoBridge::MulticastSnooping(on) => out.snooping = *on,
            InfoBridge::MulticastQuerier(on) => out.querier = *on,
            InfoBridge::MulticastQuerierState(states) => {
                out.other_querier = other_querier(states);
            }
            _ => {}
        }
    }
    out
}

/// The address of another querier the bridge currently hears (its "other querier present"
/// timer is running).
fn other_querier(states: &[BridgeQuerierState]) -> Option<String> {
    let mut v4 = None;
    let mut v4_timer = 0;
    let mut v6 = None;
    let mut v6_timer = 0;
    for state in states {
        match state {
            BridgeQuerierState::Ipv4Address(a) if !a.is_unspecified() => v4 = Some(a.to_string()),
            BridgeQuerierState::Ipv4OtherTimer(t) => v4_timer = *t,
            BridgeQuerierState::Ipv6Address(a) if !a.is_unspecified() => v6 = Some(a.to_string()),
            BridgeQuerierState::Ipv6OtherTimer(t) => v6_timer = *t,
            _ => {}
        }
    }
    match (v4, v6) {
        (Some(a), _) if v4_timer > 0 => Some(a),
        (_, Some(a)) if v6_timer > 0 => Some(a),
        _ => None,
    }
}

/// Addresses of one interface that mcrelay uses as the source of its queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortAddrs {
    /// First IPv4 address.
    pub v4: Option<std::net::Ipv4Addr>,
    /// IPv6 link-local address (MLD queries must come from one).
    pub v6_link_local: Option<std::net::Ipv6Addr>,
}

/// IPv4 and IPv6 link-local addresses of every interface, by ifindex.
pub async fn addresses(
    handle: &Handle,
) -> Result<std::collections::BTreeMap<u32, PortAddrs>, NetlinkError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out: std::collections::BTreeMap<u32, PortAddrs> = Default::default();
    let mut stream = handle.address().get().execute();
    while let Some(msg) =
        stream.try_next().await.map_err(NetlinkError::request("listing addresses over netlink"))?
    {
        let entry = out.entry(msg.header.index).or_default();
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Address(std::net::IpAddr::V6(a))
                    if a.segments()[0] & 0xffc0 == 0xfe80 =>
                {
                    entry.v6_link_local.get_or_insert(*a);
                }
                AddressAttribute::Local(std::net::IpAddr::V4(a)) => {
                    entry.v4.get_or_insert(*a);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Whether an `-i` argument is a glob rather than a plain name.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Resolves `-i` arguments to interfaces, in the order given, without duplicates.
///
/// A plain name that does not exist is an error; a glob that matches nothing is reported
/// through `warn` (its interfaces may appear later). No interface at all is an error.
pub fn resolve(
    patterns: &[String],
    links: &[Link],
    mut warn: impl FnMut(String),
) -> Result<Vec<Link>, UsageError> {
    let mut out: Vec<Link> = Vec::new();
    for pattern in patterns {
        let matched: Vec<&Link> = if is_glob(pattern) {
            let glob = glob::Pattern::new(pattern)
                .map_err(|e| UsageError::new(format!("-i {pattern}: invalid glob: {e}")))?;
            let m: Vec<&Link> = links.iter().filter(|l| glob.matches(&l.name)).collect();
            if m.is_empty() {
                warn(format!("-i {pattern}: no interface matches (yet)"));
            }
            m
        } else {
            let link = links.iter().find(|l| l.name == *pattern).ok_or_else(|| {
                UsageError::new(format!(
                    "interface {pattern} not found in this network namespace \
                     (is it created yet? `ip link show` lists the interfaces)"
                ))
            })?;
            vec![link]
        };
        for link in matched {
            if !out.iter().any(|l| l.index == link.index) {
                out.push(link.clone());
            }
        }
    }
    // With globs, interfaces may appear later (hot plug): starting with none is fine then.
    if out.is_empty() && !patterns.iter().any(|p| is_glob(p)) {
        return Err(UsageError::new(
            "no interface to attach to: give -i IFACE (names or globs) or ports in the config file",
        ));
    }
    Ok(out)
}

/// Turns IFF_ALLMULTI on or off.
pub async fn set_allmulti(handle: &Handle, index: u32, on: bool) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).allmulticast(on).build())
        .execute()
        .await
        .map_err(NetlinkError::request(format!(
            "setting allmulticast {} on ifindex {index}",
            if on { "on" } else { "off" }
        )))
}

#[cfg(test)]
impl Link {
    /// An up, multicast-capable Ethernet interface with no XDP, bridge or peer (unit tests).
    pub(crate) fn for_tests(index: u32, name: &str, kind: Option<&str>) -> Self {
        Self {
            index,
            name: name.into(),
            kind: kind.map(str::to_owned),
            allmulti: false,
            multicast: true,
            up: true,
            loopback: false,
            pointopoint: false,
            ether: true,
            mac: None,
            xdp: None,
            bridge: None,
            link_index: None,
            link_netnsid: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link::for_tests(index, name, None)
    }

    #[test]
    fn resolves_names_and_globs_in_order_without_duplicates() {
        let links = [link(1, "lo"), link(2, "eth0"), link(3, "tap0"), link(4, "tap1")];
        let mut warnings = Vec::new();
        let got =
            resolve(&["eth0".into(), "tap*".into(), "tap0".into(), "vpn*".into()], &links, |w| {
                warnings.push(w)
            })
            .expect("resolves");
        let names: Vec<_> = got.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["eth0", "tap0", "tap1"]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn kinds_have_the_kernels_names() {
        assert_eq!(kind_name(&InfoKind::Veth), "veth");
        assert_eq!(kind_name(&InfoKind::SitTun), "sit");
        assert_eq!(kind_name(&InfoKind::GreTap6), "ip6gretap");
        assert_eq!(kind_name(&InfoKind::Other("ovpn".into())), "ovpn");
    }

    #[test]
    fn xdp_attachment_from_netlink() {
        assert_eq!(xdp_state(&[LinkXdp::ProgId(0)]), None);
        let generic = xdp_state(&[
            LinkXdp::Attached(XdpAttached::SocketBuffer),
            LinkXdp::ProgId(7),
            LinkXdp::SkbProgId(0),
        ])
        .expect("attached");
        assert_eq!(generic.prog_id, Some(7));
        assert!(generic.generic());
        let native = xdp_state(&[LinkXdp::Attached(XdpAttached::Driver)]).expect("attached");
        assert!(!native.generic());
    }

    #[test]
    fn unknown_name_is_an_error() {
        let err = resolve(&["nope0".into()], &[link(1, "lo")], |_| {}).expect_err("must fail");
        assert!(err.to_string().contains("nope0"), "{err}");
    }

    #[test]
    fn a_glob_that_matches_nothing_yet_is_fine() {
        let mut warnings = Vec::new();
        let got = resolve(&["tap*".into()], &[link(1, "lo")], |w| warnings.push(w)).expect("ok");
        assert!(got.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(matches_any(&["tap*".into()], "tap7"));
        assert!(!matches_any(&["tap*".into(), "eth0".into()], "eth1"));
    }
}

/// A change of the interface list, from the kernel's RTNLGRP_LINK notifications.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// An interface appeared or changed (flags, name, ...).
    New(Link),
    /// An interface is gone.
    Removed(u32),
    /// An address was added to or removed from an interface (RTM_NEWADDR / RTM_DELADDR).
    Addresses(u32),
}

/// Subscribes to link and address notifications. The receiver yields events until the
/// connection closes.
pub fn monitor() -> Result<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>, NetlinkError> {
    use futures::StreamExt as _;
    use rtnetlink::{
        packet_core::NetlinkPayload,
        packet_route::RouteNetlinkMessage,
        sys::{AsyncSocket as _, SocketAddr},
    };
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection()
        .map_err(NetlinkError::socket("opening a netlink socket for link events"))?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            rtnetlink::constants::RTMGRP_LINK
                | rtnetlink::constants::RTMGRP_IPV4_IFADDR
                | rtnetlink::constants::RTMGRP_IPV6_IFADDR,
        ))
        .map_err(NetlinkError::socket("subscribing to link and address notifications"))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    from_message(&link).map(LinkEvent::New)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    Some(LinkEvent::Removed(link.header.index))
                }
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a),
                ) => Some(LinkEvent::Addresses(a.header.index)),
                _ => None,
            };
            if let Some(event) = event {
                if tx.send(event).is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}

/// Whether `name` matches any `-i` argument (plain names exactly, globs as globs).
pub fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| {
        if is_glob(p) {
            glob::Pattern::new(p).is_ok_and(|g| g.matches(name))
        } else {
            p == name
        }
    })
}
