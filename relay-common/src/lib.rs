//! Types, constants and packet parsers shared by mcrelay's kernel programs and its userspace.
//!
//! Everything here is `#![no_std]` so the same code runs inside the XDP program and in host unit
//! tests. Map keys and values are `#[repr(C)]`, have explicit padding and implement
//! [`bytemuck::Pod`]; with the `user` feature they also implement `aya::Pod` so aya's map APIs
//! accept them.
#![cfg_attr(not(test), no_std)]

pub mod counters;
#[cfg(any(test, feature = "frames"))]
pub mod frames;
pub mod parse;

use bytemuck::{Pod, Zeroable};
pub use counters::{port_slot, Counter, PortCounters, PortSlot, COUNTER_COUNT, PORT_SLOTS};

/// Version of the map layout. Pins live in a directory named after it, so a daemon never reuses a
/// map whose key or value layout differs from what its program expects.
pub const LAYOUT_VERSION: u32 = 4;

/// Maximum number of groups (keys of `GROUP_PORTS`, and again of `GROUP_PORTS_V4`).
pub const MAX_GROUPS: u32 = 16_384;
/// Maximum number of ports in one group's port set (capacity of each inner DEVMAP_HASH). The
/// kernel requires every inner map to match the template's capacity.
pub const MAX_PORTS_PER_GROUP: u32 = 128;
/// Maximum number of ports mcrelay attaches to (entries of `PORTS`, `PORT_STATS_SPILL`, ...).
pub const MAX_PORTS: u32 = 1024;

/// `BPF_MAP_TYPE_DEVMAP_HASH`, for creating inner maps from userspace.
pub const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;
/// Size of `struct bpf_devmap_val` (ifindex + program fd/id), the value of a devmap entry.
pub const DEVMAP_VALUE_SIZE: u32 = 8;

/// Key of `GROUP_PORTS`: a multicast group and, for source-specific entries, a source.
///
/// Both addresses are 16 bytes in network byte order. Aligned to 8 bytes (same size and layout)
/// so the kernel program builds and copies keys with word stores instead of byte loops. IPv4
/// addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one map serves both families.
/// `source` is all zero for a (*,G) entry and the source address for an (S,G) entry.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct GroupKey {
    /// Group address, network byte order, IPv4-mapped for IPv4.
    pub group: [u8; 16],
    /// Source address for (S,G) entries, all zero for (*,G).
    pub source: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<GroupKey>() == 32);

/// Key of `GROUP_TC_PORTS` that names no group (group 0 is no multicast address): the router
/// ports as a [`TcPorts`] array, for the unknown-group policy `router-ports` on ports in TC
/// mode (the TC program cannot walk the `ROUTER_PORTS` devmap).
pub const TC_ROUTERS_KEY: GroupKey = GroupKey { group: [0; 16], source: [0xff; 16] };
/// Key of `GROUP_TC_PORTS`: every port as a [`TcPorts`] array, for the policy `flood`.
pub const TC_FLOOD_KEY: GroupKey = GroupKey { group: [0; 16], source: [0xfe; 16] };

impl GroupKey {
    /// A (*,G) key for an IPv4 group given as 4 bytes in network order.
    #[inline(always)]
    pub const fn any_source_v4(group: [u8; 4]) -> Self {
        Self { group: v4_mapped(group), source: [0; 16] }
    }

    /// A (*,G) key for an IPv6 group given as 16 bytes in network order.
    #[inline(always)]
    pub const fn any_source_v6(group: [u8; 16]) -> Self {
        Self { group, source: [0; 16] }
    }

    /// Whether this key names an IPv4 group (IPv4-mapped form).
    pub fn is_v4(&self) -> bool {
        self.group[..12] == V4_MAPPED_PREFIX
    }

    /// The key of `GROUP_PORTS_V4` for an IPv4 (*,G) key: the group's four bytes in network
    /// order, read as a native-endian `u32` ([`v4_group_key`]). `None` for IPv6 groups and
    /// (S,G) keys, which live in `GROUP_PORTS`.
    pub fn v4_any_source(&self) -> Option<u32> {
        (self.is_v4() && self.source == [0; 16])
            .then(|| v4_group_key([self.group[12], self.group[13], self.group[14], self.group[15]]))
    }
}

/// Key of `GROUP_PORTS_V4`: an IPv4 group (network order) as the `u32` with the same bytes.
#[inline(always)]
pub const fn v4_group_key(group: [u8; 4]) -> u32 {
    u32::from_ne_bytes(group)
}

/// The IPv4 group a `GROUP_PORTS_V4` key names (network order).
pub const fn v4_group_of_key(key: u32) -> [u8; 4] {
    key.to_ne_bytes()
}

/// First 12 bytes of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Maps an IPv4 address (network order) into the 16-byte key space.
///
/// Built from two 64-bit words: written as a byte-array literal, the BPF backend zeroes the
/// first ten bytes with a call to a byte-loop `memset` subprogram, twice per IPv4 data frame
/// (group and source).
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let low = u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]);
    // SAFETY: [u64; 2] and [u8; 16] have the same size and every bit pattern is valid.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([0, low]) }
}

/// What the dataplane does with multicast data for a group that has no port set.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownPolicy {
    /// RFC 4541: send towards router ports. Until router ports are learned the frame goes to the
    /// local stack (XDP_PASS).
    RouterPorts = 0,
    /// Drop the frame (counted as `DropNoMembers`).
    Drop = 1,
    /// Send to every port (the `FLOOD_PORTS` devmap) except the ingress port.
    Flood = 2,
}

impl UnknownPolicy {
    /// Decodes the value stored in [`Config::unknown_policy`]; unknown values mean the default.
    #[inline(always)]
    pub const fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Drop,
            2 => Self::Flood,
            _ => Self::RouterPorts,
        }
    }
}

/// The single entry of the `CONFIG` array: settings userspace gives the dataplane.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// An [`UnknownPolicy`] as `u32`.
    pub unknown_policy: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Number of entries in `ROUTER_PORTS` (0: unknown groups go to the local stack).
    pub router_ports: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
    /// This relay's MAC (loop guard): the source MAC of every frame it relays. Starts with
    /// [`RELAY_MAC_PREFIX`]; all zero until the daemon picks one.
    pub relay_mac: [u8; 6],
    /// Explicit padding; zero.
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Config>() == 24);

/// [`Config::flags`] bit: some port is in standby (loop guard): look the ingress port up in
/// `STANDBY_PORTS`. Clear, the program saves that lookup.
pub const CONFIG_F_STANDBY: u32 = 2;

/// First three bytes of every relay MAC: locally administered, unicast ("mc" after 0x02).
/// A data frame whose source MAC starts with them was relayed by an mcrelay.
pub const RELAY_MAC_PREFIX: [u8; 3] = [0x02, 0x6d, 0x63];

/// Key of `LOOP_MACS`: a relay MAC, zero padded to 8 bytes.
pub const fn loop_mac_key(mac: [u8; 6]) -> [u8; 8] {
    [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]
}

/// EtherType of mcrelay's hellos (IEEE 802 local experimental EtherType 1).
pub const HELLO_ETHERTYPE: u16 = 0x88b5;

/// Destination MAC of mcrelay's hellos: locally administered group address, flooded by
/// bridges and switches (unlike 802.1D reserved addresses).
pub const HELLO_MAC: [u8; 6] = [0x03, 0x6d, 0x63, 0x72, 0x6c, 0x79];

/// [`Config::flags`] bit: `GROUP_PORTS` holds (S,G) entries, so look up (S,G) before (*,G).
/// Clear, the program saves that lookup.
pub const CONFIG_F_SOURCE_ENTRIES: u32 = 1;

/// [`Config::flags`] bit: `POLICY` holds group prefixes: look the group up there before any
/// port set (a deny wins over static, learned, router-port and flood forwarding).
pub const CONFIG_F_POLICY: u32 = 4;
/// [`Config::flags`] bit: `[policy] allow` is not empty: a group that matches no `POLICY`
/// prefix is denied too.
pub const CONFIG_F_ALLOW_LIST: u32 = 8;
/// [`Config::flags`] bit: some ingress port has a rate limit in `RATE_PORTS`.
pub const CONFIG_F_RATE_PORTS: u32 = 16;
/// [`Config::flags`] bit: `RATE_PREFIXES` holds per-group limits.
pub const CONFIG_F_RATE_GROUPS: u32 = 32;

/// [`Config::flags`] bit: some port is attached with the TC program alone (L3 devices and
/// devices without `ndo_xdp_xmit`): the XDP program looks a group up in `GROUP_TC_PORTS` and
/// hands data whose group has such a member to the TC program of the ingress port
/// (`XDP_PASS`). Clear, the XDP program saves that lookup.
pub const CONFIG_F_TC_PORTS: u32 = 64;

/// Most ports one group's TC copies go to (capacity of a [`TcPorts`] value, the bound of the
/// TC program's copy loop).
pub const MAX_TC_TARGETS: usize = 32;

/// [`TcTarget::flags`] / [`TcPorts::flags`] bit: an L3 device (no Ethernet header: tun,
/// WireGuard). Its copies are routed: TTL / hop limit decremented, `drop_ttl` at 1.
pub const TC_TARGET_L3: u32 = 1;
/// [`TcTarget::flags`] / [`TcPorts::flags`] bit: the device cannot take XDP redirects (no
/// `ndo_xdp_xmit`): only the TC program reaches it.
pub const TC_TARGET_NO_XDP: u32 = 2;
/// [`TcPorts::flags`] bit: some target has an Ethernet header.
pub const TC_TARGET_ETHERNET: u32 = 4;
/// [`TcTarget::flags`] / [`TcPorts::flags`] bit: a per-peer copy on an L3 port (`--per-client`
/// on tun / WireGuard): the copy's destination address is rewritten to [`TcTarget::addr`] (IP
/// and UDP checksums fixed), so the VPN delivers it to that one peer.
pub const TC_TARGET_PEER: u32 = 8;
/// [`TcTarget::flags`] / [`TcPorts::flags`] bit: a routed Ethernet port (`--l3`): its copies
/// cross a routed hop (TTL / hop limit decremented) and leave with the port's own MAC
/// (the first 6 bytes of [`TcTarget::addr`]) as source.
pub const TC_TARGET_ROUTED: u32 = 16;

/// One copy target of the TC program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TcTarget {
    /// Egress ifindex.
    pub ifindex: u32,
    /// `TC_TARGET_*` bits of the device (and [`TC_TARGET_PEER`] for a per-peer copy).
    pub flags: u32,
    /// With [`TC_TARGET_PEER`]: the peer's address (IPv4-mapped for IPv4), of the group's
    /// family. With [`TC_TARGET_ROUTED`]: the port's MAC, then zeros. Zero otherwise.
    pub addr: [u8; 16],
}

/// Value of `GROUP_TC_PORTS` (key: [`GroupKey`], the same keys as `GROUP_PORTS`): a group's
/// port set as a plain array the TC program can walk (`bpf_clone_redirect` to each), because
/// the inner DEVMAP_HASH of `GROUP_PORTS` cannot be iterated from BPF. Written by the daemon's
/// group map writer in the same round as `GROUP_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TcPorts {
    /// Targets in use (at most [`MAX_TC_TARGETS`]).
    pub count: u32,
    /// The `TC_TARGET_*` bits of all targets together.
    pub flags: u32,
    pub targets: [TcTarget; MAX_TC_TARGETS],
}
const _: () = assert!(core::mem::size_of::<TcPorts>() == 8 + 24 * MAX_TC_TARGETS);

impl Default for TcPorts {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// Value bit of `TC_PORTS` (key: ifindex): the port is in TC mode (the TC program alone, which
/// classifies, polices, counts and copies everything arriving there). XDP ports have no entry.
pub const TC_PORT_ATTACHED: u32 = 1;
/// Value bit of `TC_PORTS`: the port is an L3 device (packets start with the IP header). The
/// program there is `mcrelay_tc_l3`, which knows it without this bit: it is recorded for
/// inspection (`bpftool map dump`) and for routing decisions that need it.
pub const TC_PORT_L3: u32 = 2;
/// Value bit of `TC_PORTS`: a routed Ethernet port (`--l3`): data arriving there crosses a
/// routed hop (TTL / hop limit decremented, none at TTL <= 1).
pub const TC_PORT_ROUTED: u32 = 4;

/// Value of a `POLICY` prefix: its groups are never relayed (`drop_policy`).
pub const POLICY_DENY: u32 = 1;
/// Value of a `POLICY` prefix: its groups may be relayed.
pub const POLICY_ALLOW: u32 = 2;

/// A packet rate as the dataplane enforces it (GCRA, the virtual-scheduling form of a token
/// bucket): one packet every `interval_ns`, with up to `burst_ns / interval_ns` more at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateLimit {
    pub interval_ns: u64,
    pub burst_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RateLimit>() == 16);

impl RateLimit {
    /// `pps` packets per second with a burst of a tenth of a second's worth (at least 8).
    pub const fn per_second(pps: u64) -> Self {
        let pps = if pps == 0 { 1 } else { pps };
        let interval_ns = 1_000_000_000 / pps;
        let burst = if pps / 10 > 8 { pps / 10 } else { 8 };
        Self { interval_ns, burst_ns: interval_ns * burst }
    }

    /// Whether a packet at `now` (ns) conforms, given the theoretical arrival time `tat` of
    /// the next packet; a conforming packet moves `tat` on. Shared by the program and the
    /// host tests.
    #[inline(always)]
    pub fn admit(&self, now: u64, tat: &mut u64) -> bool {
        let t = if *tat > now { *tat } else { now };
        if t - now > self.burst_ns {
            return false;
        }
        *tat = t + self.interval_ns;
        true
    }
}

/// Value of `RATE_PORTS`: an ingress port's limit and its state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortRate {
    pub limit: RateLimit,
    /// Theoretical arrival time of the next conforming packet (ns, `bpf_ktime_get_ns`).
    pub tat: u64,
}
const _: () = assert!(core::mem::size_of::<PortRate>() == 24);

/// Data of a `POLICY` / `RATE_PREFIXES` key: a group prefix over the 16-byte group space
/// (IPv4 groups IPv4-mapped, so an IPv4 prefix of length `n` is `96 + n` bits).
pub type PrefixData = [u8; 16];

/// Most `POLICY` prefixes.
pub const MAX_POLICY_PREFIXES: u32 = 1024;
/// Most `RATE_PREFIXES` entries.
pub const MAX_RATE_PREFIXES: u32 = 256;
/// Most groups with their own rate state at once (`RATE_GROUPS`, least recently used go).
pub const MAX_RATE_GROUPS: u32 = 65_536;

/// Attach mode of a port, as stored in [`PortInfo::attach_mode`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP in the driver (native).
    Native = 1,
    /// Generic (SKB) XDP.
    Skb = 2,
    /// TC (tcx ingress) program alone: L3 devices (tun, WireGuard) and devices without
    /// `ndo_xdp_xmit` (VXLAN, bridges, VLAN subinterfaces, ...), which XDP broadcasts
    /// silently skip; they receive their copies from `bpf_clone_redirect`.
    Tc = 3,
}

impl AttachMode {
    /// Decodes a stored value.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Native),
            2 => Some(Self::Skb),
            3 => Some(Self::Tc),
            _ => None,
        }
    }

    /// Lower-case name used by the CLI and JSON output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Skb => "skb",
            Self::Tc => "tc",
        }
    }
}

/// Value of the `PORTS` hash (key: ifindex): what userspace knows about a port it attached.
/// Written by the daemon, read by the CLI; the XDP program does not read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortInfo {
    /// An [`AttachMode`] as `u32`.
    pub attach_mode: u32,
    /// Role and state bits: [`PORT_ROLE_ROUTER`] when the port is one of the router ports
    /// (configured or learned; the ports of `ROUTER_PORTS`), plus the loop guard's standby
    /// reasons [`PORT_STANDBY_SAME_SEGMENT`] and [`PORT_STANDBY_PEER`] (the value of the port's
    /// `STANDBY_PORTS` entry). No bits: a member port relaying normally. Written by the daemon's
    /// dataplane (`Ports::set_routers`, `Ports::set_standby`), read by `mcrelay ports`.
    pub role: u32,
    /// Interface name, NUL padded (IFNAMSIZ = 16).
    pub name: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PortInfo>() == 24);

/// [`PortInfo::role`] bit: the port leads to a multicast router.
pub const PORT_ROLE_ROUTER: u32 = 1;
/// [`PortInfo::role`] bit: standby, another of this relay's ports is on the same segment.
pub const PORT_STANDBY_SAME_SEGMENT: u32 = 2;
/// [`PortInfo::role`] bit: standby, a relay with a lower relay MAC serves every segment of
/// this one.
pub const PORT_STANDBY_PEER: u32 = 4;
/// [`PortInfo::role`] bit: the device cannot transmit XDP redirects (no `ndo_xdp_xmit`: VLAN
/// subinterfaces, bridges, VXLAN, macvlan, L3 tun, dummy, ...): devmap broadcasts skip it; it
/// is attached in TC mode and receives its copies from the TC program.
pub const PORT_NO_XDP_XMIT: u32 = 8;

/// Clients of one per-client port that joined one group: at most this many get their own copy.
pub const MAX_CLIENTS_PER_SET: usize = 32;

/// Key of `CLIENT_SETS` and `CLIENT_CURSOR` (per-client delivery): the shared port and the
/// group's (*,G) key.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Pod, Zeroable)]
pub struct ClientSetKey {
    /// The shared (TAP) port's ifindex.
    pub ifindex: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
    /// The group, as in `GROUP_PORTS` with a zero source.
    pub group: GroupKey,
}
const _: () = assert!(core::mem::size_of::<ClientSetKey>() == 40);

/// Value of `CLIENT_SETS`: the unicast MACs the copies of a group's frames on a shared port
/// are addressed to. The group's inner map has exactly `count` entries for the port, all with
/// the `mcrelay_client` egress program, so each frame makes `count` consecutive copies; the
/// program gives copy `i` the MAC `macs[cursor++ % count]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ClientSet {
    pub count: u32,
    pub _pad: u32,
    pub macs: [[u8; 6]; MAX_CLIENTS_PER_SET],
}
const _: () = assert!(core::mem::size_of::<ClientSet>() == 8 + 6 * MAX_CLIENTS_PER_SET);

/// Key of the per-CPU `PEER_COPIES` (value: `u64` copies): a per-peer target of the TC
/// program, its port and address (as in [`TcTarget::peer`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Pod, Zeroable)]
pub struct PeerKey {
    pub ifindex: u32,
    pub peer: [u8; 16],
}

/// Value of the per-CPU `CLIENT_COPIES`: copies addressed to each slot of a [`ClientSet`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ClientCopies {
    pub copies: [u64; MAX_CLIENTS_PER_SET],
}

#[cfg(test)]
mod rate_tests {
    use super::RateLimit;

    #[test]
    fn a_rate_admits_its_burst_then_one_packet_per_interval() {
        let limit = RateLimit::per_second(100); // 10 ms apart, burst 10 packets
        let mut tat = 0;
        let at_once = (0..100).filter(|_| limit.admit(1_000_000_000, &mut tat)).count();
        assert_eq!(at_once, 11, "the burst and the packet that starts it");
        // One more every 10 ms.
        assert!(!limit.admit(1_000_000_000 + 9_000_000, &mut tat));
        let later = 1_000_000_000 + 20_000_000;
        assert!(limit.admit(later, &mut tat));
        // Over a long quiet time the credit is the burst again, never more.
        let quiet = later + 10_000_000_000;
        assert_eq!((0..100).filter(|_| limit.admit(quiet, &mut tat)).count(), 11);
        assert_eq!(RateLimit::per_second(1_000_000).burst_ns, 100_000 * 1_000);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain no padding (checked by the size
    // assertions and by bytemuck's derive) and are valid for any bit pattern.
    unsafe impl aya::Pod for super::GroupKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PortInfo {}
    unsafe impl aya::Pod for super::PortCounters {}
    unsafe impl aya::Pod for super::PortSlot {}
    unsafe impl aya::Pod for super::ClientSetKey {}
    unsafe impl aya::Pod for super::ClientSet {}
    unsafe impl aya::Pod for super::ClientCopies {}
    unsafe impl aya::Pod for super::RateLimit {}
    unsafe impl aya::Pod for super::PortRate {}
    unsafe impl aya::Pod for super::TcPorts {}
    unsafe impl aya::Pod for super::PeerKey {}
}
