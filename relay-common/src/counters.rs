//! Per-port counters: what happened to each multicast frame and why.

use bytemuck::{Pod, Zeroable};

/// The fate of a frame, one counter each. Indexes [`PortCounters`].
///
/// The index of each counter is part of the pinned `PORT_STATS` layout and its [`Counter::name`]
/// is what `mcrelay stats`/`ports` and the metrics show: neither changes. One is reserved for
/// a later feature and stays 0 until then: [`Counter::DropTtl`].
///
/// Frames whose destination MAC is not multicast (unicast) and Ethernet broadcast leave the
/// program before any counter is touched, so that pass-through costs nothing; the kernel's own
/// interface counters cover them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Multicast data redirected to the group's ports.
    Forwarded = 0,
    /// IGMP or MLD, passed to the local stack for the control loop.
    PassedControl = 1,
    /// Link-local group (224.0.0.0/24, IPv6 scope <= link), passed to the stack.
    PassedLinkLocal = 2,
    /// Multicast data for a group without ports, passed to the stack (unknown = router-ports,
    /// no router ports known).
    PassedUnknown = 3,
    /// Multicast MAC but not IPv4/IPv6 multicast (ARP to a multicast MAC, LLDP, STP, ...).
    PassedOther = 4,
    /// Dropped: group without ports and unknown = drop.
    DropNoMembers = 5,
    /// Dropped by the group policy (`[policy] deny`, or outside a non-empty `allow`), whatever
    /// port set, router port or flood would have forwarded it.
    DropPolicy = 6,
    /// Dropped in L3 mode because TTL / hop limit would expire.
    ///
    /// Reserved, never counted yet: filled by the routed-ports issue (L3 mode: TTL / hop limit
    /// decremented, TTL <= 1 dropped). The slot stays so the map layout and the names stay stable.
    DropTtl = 7,
    /// Not relayed because of the loop guard: a frame this relay or a redundant peer relay
    /// already relayed (its relay MAC as source; dropped), or multicast data arriving on a port
    /// in standby (passed to the local stack, never relayed).
    DropLoop = 8,
    /// Dropped by a rate limit: the ingress port's (`[[port]] rate_limit_pps`) or the group's
    /// (`[[rate_limit]]`, `--rate-limit`).
    DropRateLimit = 9,
    /// Frame too short or with an invalid header; passed to the stack untouched.
    Malformed = 10,
    /// The redirect helper failed (no usable target); the frame was passed to the stack.
    RedirectFailed = 11,
}

/// Number of [`Counter`] variants.
pub const COUNTER_COUNT: usize = 12;

impl Counter {
    /// All counters, in index order.
    pub const ALL: [Counter; COUNTER_COUNT] = [
        Counter::Forwarded,
        Counter::PassedControl,
        Counter::PassedLinkLocal,
        Counter::PassedUnknown,
        Counter::PassedOther,
        Counter::DropNoMembers,
        Counter::DropPolicy,
        Counter::DropTtl,
        Counter::DropLoop,
        Counter::DropRateLimit,
        Counter::Malformed,
        Counter::RedirectFailed,
    ];

    /// Stable lower-case name used in CLI and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Forwarded => "forwarded",
            Counter::PassedControl => "passed_control",
            Counter::PassedLinkLocal => "passed_link_local",
            Counter::PassedUnknown => "passed_unknown",
            Counter::PassedOther => "passed_other",
            Counter::DropNoMembers => "drop_no_members",
            Counter::DropPolicy => "drop_policy",
            Counter::DropTtl => "drop_ttl",
            Counter::DropLoop => "drop_loop",
            Counter::DropRateLimit => "drop_rate_limit",
            Counter::Malformed => "malformed",
            Counter::RedirectFailed => "redirect_failed",
        }
    }
}

/// A port's counters: in its [`PortSlot`] of `PORT_STATS`, or the value of the per-CPU hash
/// `PORT_STATS_SPILL` (key: ingress ifindex). Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortCounters {
    /// Frames, indexed by [`Counter`].
    pub packets: [u64; COUNTER_COUNT],
    /// Bytes (whole frame as received), indexed by [`Counter`].
    pub bytes: [u64; COUNTER_COUNT],
}
const _: () = assert!(core::mem::size_of::<PortCounters>() == 16 * COUNTER_COUNT);

/// Slots of the per-CPU array `PORT_STATS`: a port's counters live in slot
/// `ifindex % PORT_SLOTS` ([`port_slot`]) when no other port holds it, else in the per-CPU
/// hash `PORT_STATS_SPILL` (key: ifindex).
pub const PORT_SLOTS: u32 = 1024;

/// The `PORT_STATS` slot of a port.
#[inline(always)]
pub const fn port_slot(ifindex: u32) -> u32 {
    ifindex % PORT_SLOTS
}

/// Value of the per-CPU array `PORT_STATS` (index: [`port_slot`]): the port that holds the
/// slot and its counters. `ifindex` is the same in every CPU's copy (written by the daemon);
/// 0: the slot is free. Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortSlot {
    /// The port whose counters these are (0: none).
    pub ifindex: u32,
    /// Explicit padding; zero.
    pub _pad: u32,
    pub counters: PortCounters,
}
const _: () = assert!(core::mem::size_of::<PortSlot>() == 8 + 16 * COUNTER_COUNT);

impl Default for PortSlot {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl Default for PortCounters {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl PortCounters {
    /// Adds `other` to `self` (summing the per-CPU values).
    pub fn accumulate(&mut self, other: &PortCounters) {
        for i in 0..COUNTER_COUNT {
            self.packets[i] = self.packets[i].wrapping_add(other.packets[i]);
            self.bytes[i] = self.bytes[i].wrapping_add(other.bytes[i]);
        }
    }

    /// Frames counted under `c`.
    pub const fn packets(&self, c: Counter) -> u64 {
        self.packets[c as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), d.name());
            }
        }
    }

    #[test]
    fn accumulate_sums_every_field() {
        let mut a = PortCounters::default();
        let mut b = PortCounters::default();
        b.packets[Counter::Forwarded as usize] = 3;
        b.bytes[Counter::Malformed as usize] = 64;
        a.accumulate(&b);
        a.accumulate(&b);
        assert_eq!(a.packets(Counter::Forwarded), 6);
        assert_eq!(a.bytes[Counter::Malformed as usize], 128);
    }
}
