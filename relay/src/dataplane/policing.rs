//! `POLICY`, `RATE_PORTS`, `RATE_PREFIXES`: what the program refuses to relay. A group policy
//! (`[policy] allow/deny`) that wins over every port set, and packet-rate limits per ingress
//! port and per group.
//!
//! Entries go in before the `CONFIG` flag that makes the program read them, and the flag goes
//! down before the last entry goes, so a frame never meets a half-written policy that is more
//! permissive than both the old and the new one.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, MapData,
};
use relay_common::{
    v4_mapped, PortRate, PrefixData, RateLimit, CONFIG_F_ALLOW_LIST, CONFIG_F_POLICY,
    CONFIG_F_RATE_GROUPS, CONFIG_F_RATE_PORTS, POLICY_ALLOW, POLICY_DENY,
};

use super::{
    error::{DataplaneError, KernelContext as _},
    kernel_config::KernelConfig,
};

/// A group prefix: network address and length in bits of its own family.
pub type Prefix = (IpAddr, u8);

/// The policing maps.
pub struct PolicingMaps {
    pub policy: LpmTrie<MapData, PrefixData, u32>,
    pub rate_ports: HashMap<MapData, u32, PortRate>,
    pub rate_prefixes: LpmTrie<MapData, PrefixData, RateLimit>,
}

/// The key of a prefix in the 16-byte group space (IPv4 groups are IPv4-mapped).
fn key((net, len): Prefix) -> Key<PrefixData> {
    match net {
        IpAddr::V4(a) => Key::new(96 + u32::from(len.min(32)), v4_mapped(a.octets())),
        IpAddr::V6(a) => Key::new(u32::from(len.min(128)), a.octets()),
    }
}

/// Whether prefix `inner` lies inside prefix `outer`.
fn within(inner: Prefix, outer: Prefix) -> bool {
    inner.1 >= outer.1 && crate::config::contains(outer.0, outer.1, inner.0)
}

/// Replaces the entries of an LPM trie with `want`, new ones first.
fn replace<V: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, PrefixData, V>,
    want: &BTreeMap<(u32, PrefixData), V>,
    what: &str,
) -> Result<(), DataplaneError> {
    for ((len, data), value) in want {
        trie.insert(&Key::new(*len, *data), *value, 0).kernel(format!("writing {what}"))?;
    }
    let have: Vec<Key<PrefixData>> = trie.keys().filter_map(Result::ok).collect();
    for k in have {
        if !want.contains_key(&(k.prefix_len(), k.data())) {
            let _ = trie.remove(&k);
        }
    }
    Ok(())
}

impl KernelConfig {
    /// Makes the program enforce `[policy]`: groups in a `deny` prefix, and (when `allow` is
    /// not empty) groups outside every `allow` prefix, are dropped as `drop_policy` whatever
    /// port set they have. A deny wins over an allow, also a longer one.
    pub fn set_policy(&mut self, allow: &[Prefix], deny: &[Prefix]) -> Result<(), DataplaneError> {
        let mut want = BTreeMap::new();
        for &p in allow.iter().filter(|a| !deny.iter().any(|d| within(**a, *d))) {
            let k = key(p);
            want.insert((k.prefix_len(), k.data()), POLICY_ALLOW);
        }
        for &p in deny {
            let k = key(p);
            want.insert((k.prefix_len(), k.data()), POLICY_DENY);
        }
        let flags = if want.is_empty() {
            0
        } else if allow.is_empty() {
            CONFIG_F_POLICY
        } else {
            CONFIG_F_POLICY | CONFIG_F_ALLOW_LIST
        };
        let mask = CONFIG_F_POLICY | CONFIG_F_ALLOW_LIST;
        if flags == 0 {
            self.set_flags(mask, 0)?;
        }
        let policing = self.policing();
        replace(&mut policing.policy, &want, "POLICY")?;
        self.set_flags(mask, flags)
    }

    /// Per-group rate limits: each group of a prefix gets `pps` packets per second.
    pub fn set_group_rate_limits(
        &mut self,
        limits: &[(Prefix, u64)],
    ) -> Result<(), DataplaneError> {
        let want: BTreeMap<(u32, PrefixData), RateLimit> = limits
            .iter()
            .map(|&(p, pps)| {
                let k = key(p);
                ((k.prefix_len(), k.data()), RateLimit::per_second(pps))
            })
            .collect();
        if want.is_empty() {
            self.set_flags(CONFIG_F_RATE_GROUPS, 0)?;
        }
        replace(&mut self.policing().rate_prefixes, &want, "RATE_PREFIXES")?;
        if !want.is_empty() {
            self.set_flags(CONFIG_F_RATE_GROUPS, CONFIG_F_RATE_GROUPS)?;
        }
        Ok(())
    }

    /// The rate limit of data arriving on `ifindex` (`None`: no limit).
    pub fn set_port_rate(&mut self, ifindex: u32, pps: Option<u64>) -> Result<(), DataplaneError> {
        let ports = &mut self.policing().rate_ports;
        match pps {
            Some(pps) => {
                let limit = RateLimit::per_second(pps);
                let keep = ports.get(&ifindex, 0).ok().filter(|r| r.limit == limit);
                if keep.is_none() {
                    let rate = PortRate { limit, tat: 0 };
                    ports.insert(ifindex, rate, 0).kernel("writing RATE_PORTS")?;
                }
            }
            None => {
                let _ = ports.remove(&ifindex);
            }
        }
        let any = self.policing().rate_ports.keys().next().is_some();
        self.set_flags(CONFIG_F_RATE_PORTS, if any { CONFIG_F_RATE_PORTS } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Prefix {
        crate::config::parse_prefix(text).expect("prefix")
    }

    #[test]
    fn prefixes_map_into_the_group_space() {
        let k = key(p("239.1.0.0/16"));
        assert_eq!(k.prefix_len(), 112);
        assert_eq!(k.data()[10..14], [0xff, 0xff, 239, 1]);
        assert_eq!(key(p("ff3e::/16")).prefix_len(), 16);
        assert!(within(p("239.1.2.0/24"), p("239.1.0.0/16")));
        assert!(!within(p("239.0.0.0/8"), p("239.1.0.0/16")));
        assert!(!within(p("ff3e::/16"), p("239.0.0.0/8")));
    }
}
