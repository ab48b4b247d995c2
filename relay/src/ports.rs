//! Interfaces: listing them over netlink, resolving `-i` names and globs, preparing them.
//!
//! mcrelay never reads /sys/class/net (under `ip netns exec` or nsenter it may show another
//! namespace); everything comes from rtnetlink in the process's own network namespace.

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    Handle, LinkUnspec,
};

use crate::error::UsageError;

/// An interface as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (veth, tun, bridge, ...); `None` for physical NICs.
    pub kind: Option<String>,
    pub allmulti: bool,
    pub multicast: bool,
    pub up: bool,
    /// Hardware address (Ethernet MAC), when the device has one.
    pub mac: Option<[u8; 6]>,
}

impl Link {
    /// Whether this is a veth (the redirect-target pitfalls of PLATFORM.md apply).
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// Opens an rtnetlink connection on the current tokio runtime.
pub fn connect() -> anyhow::Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every interface of this network namespace.
pub async fn list(handle: &Handle) -> anyhow::Result<Vec<Link>> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing interfaces over netlink")? {
        if let Some(link) = from_message(&msg) {
            links.push(link);
        }
    }
    Ok(links)
}

fn from_message(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut kind = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) if a.len() == 6 => {
                mac = <[u8; 6]>::try_from(a.as_slice()).ok();
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    let flags = msg.header.flags;
    Some(Link {
        index: msg.header.index,
        name: name?,
        kind,
        allmulti: flags.contains(LinkFlags::Allmulti),
        multicast: flags.contains(LinkFlags::Multicast),
        up: flags.contains(LinkFlags::Up),
        mac,
    })
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
) -> anyhow::Result<std::collections::BTreeMap<u32, PortAddrs>> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out: std::collections::BTreeMap<u32, PortAddrs> = Default::default();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing addresses over netlink")? {
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

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Dummy => "dummy".into(),
        InfoKind::Vlan => "vlan".into(),
        other => format!("{other:?}").to_lowercase(),
    }
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
pub async fn set_allmulti(handle: &Handle, index: u32, on: bool) -> anyhow::Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).allmulticast(on).build())
        .execute()
        .await
        .with_context(|| {
            format!("setting allmulticast {} on ifindex {index}", if on { "on" } else { "off" })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            kind: None,
            allmulti: false,
            multicast: true,
            up: true,
            mac: None,
        }
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
}

/// Subscribes to link notifications. The receiver yields events until the connection closes.
pub fn monitor() -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>> {
    use futures::StreamExt as _;
    use rtnetlink::{
        packet_core::NetlinkPayload,
        packet_route::RouteNetlinkMessage,
        sys::{AsyncSocket as _, SocketAddr},
    };
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().context("opening a netlink socket for link events")?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
        .context("subscribing to link notifications")?;
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
