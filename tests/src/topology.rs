//! Ready-made topologies.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{
    daemon::Mcrelay,
    netns::{veth_pair, NetNs},
};

/// Name of a host's interface towards the gateway.
pub const HOST_IFACE: &str = "eth0";

/// A host on its own point-to-point segment to the gateway.
pub struct Host {
    /// The host's namespace.
    pub ns: NetNs,
    /// The host's interface ([`HOST_IFACE`]).
    pub iface: String,
    /// The gateway's end of this segment (`gwN`).
    pub gw_port: String,
    /// The host's IPv4 address (`198.18.N.2/24`).
    pub v4: Ipv4Addr,
    /// The host's IPv6 address (`fd00:6d63:0:N::2/64`).
    pub v6: Ipv6Addr,
}

/// A gateway namespace with one veth segment per host: host `N` has `eth0` with
/// `198.18.N.2/24` and `fd00:6d63:0:N::2/64`, the gateway has `gwN` (no addresses).
///
/// Every host interface has GRO on (it may receive frames redirected by XDP on the gateway) and
/// TX checksum offload off (it may send). Fields drop in order: gateway first, then the hosts.
pub struct Star {
    /// The gateway's namespace, where mcrelay runs.
    pub gw: NetNs,
    /// The hosts, in segment order.
    pub hosts: Vec<Host>,
}

impl Star {
    /// Builds a star of `hosts` hosts; namespace names start with `mcr{tag}-`.
    pub fn new(tag: &str, hosts: usize) -> Self {
        assert!(hosts < 256, "at most 255 hosts");
        let gw = NetNs::new(&format!("mcr{tag}-gw"));
        let mut built = Vec::with_capacity(hosts);
        for n in 0..hosts {
            let ns = NetNs::new(&format!("mcr{tag}-h{n}"));
            let gw_port = format!("gw{n}");
            veth_pair(&gw, &gw_port, &ns, HOST_IFACE);
            let octet = n as u8;
            let v4 = Ipv4Addr::new(198, 18, octet, 2);
            let v6 = Ipv6Addr::new(0xfd00, 0x6d63, 0, u16::from(octet), 0, 0, 0, 2);
            ns.add_addr(HOST_IFACE, &format!("{v4}/24"));
            ns.add_addr(HOST_IFACE, &format!("{v6}/64"));
            ns.gro_on(HOST_IFACE);
            ns.tx_off(HOST_IFACE);
            built.push(Host { ns, iface: HOST_IFACE.to_string(), gw_port, v4, v6 });
        }
        Self { gw, hosts: built }
    }

    /// The gateway's ports, in segment order.
    pub fn gw_ports(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.gw_port.as_str()).collect()
    }

    /// `-i gw0 -i gw1 ...` for `mcrelay run`.
    pub fn iface_args(&self) -> Vec<String> {
        self.hosts.iter().flat_map(|h| ["-i".to_string(), h.gw_port.clone()]).collect()
    }

    /// Starts `mcrelay run -i gw0 ... -i gwN EXTRA...` on the gateway and waits until it is
    /// ready.
    pub fn start_relay(&self, extra: &[&str]) -> Mcrelay {
        let mut args: Vec<String> = vec!["run".into()];
        args.extend(self.iface_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        Mcrelay::start_ready(&self.gw, &args)
    }
}
