//! Reading the documents of `mcrelay groups --json` and `mcrelay ports --json`.
//!
//! Every accessor is lenient: a missing key reads as "nothing there" (an empty list, `None`,
//! `false`), so that a predicate polled while the daemon is still starting simply does not hold
//! yet. Polling itself is in [`crate::daemon`] ([`crate::daemon::wait_groups`]).

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::Value;

/// Whether the JSON string `v` is the address `a` (in any spelling `IpAddr` parses).
pub fn same_addr(v: &Value, a: IpAddr) -> bool {
    v.as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(a)
}

/// The strings of the JSON array `v` (port names); empty when `v` is no array.
pub fn names(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect()
}

/// The entry of `group` in `groups[]` (the first one, if a static and a learned entry exist).
pub fn group_entry(doc: &Value, group: IpAddr) -> Option<&Value> {
    doc["groups"].as_array()?.iter().find(|g| same_addr(&g["group"], group))
}

/// The (*,G) ports of `group`: the `ports` of every entry of `group` in `groups[]`.
pub fn group_ports(doc: &Value, group: IpAddr) -> Vec<String> {
    doc["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| same_addr(&g["group"], group))
        .flat_map(|g| names(&g["ports"]))
        .collect()
}

/// Whether `port` is in the (*,G) ports of `group`.
pub fn is_member(doc: &Value, group: IpAddr, port: &str) -> bool {
    group_ports(doc, group).iter().any(|p| p == port)
}

/// The (S,G) ports of `group` and `source` (of the first entry of `group`); `None` without an
/// (S,G) entry.
pub fn source_ports(doc: &Value, group: IpAddr, source: IpAddr) -> Option<Vec<String>> {
    let g = group_entry(doc, group)?;
    let s = g["sources"].as_array()?.iter().find(|s| same_addr(&s["source"], source))?;
    Some(names(&s["ports"]))
}

/// Whether any entry of `group` has an (S,G) entry for `source` whose ports include `port`.
pub fn has_source(doc: &Value, group: IpAddr, source: IpAddr, port: &str) -> bool {
    doc["groups"].as_array().into_iter().flatten().any(|g| {
        same_addr(&g["group"], group)
            && g["sources"].as_array().into_iter().flatten().any(|s| {
                same_addr(&s["source"], source)
                    && s["ports"].as_array().into_iter().flatten().any(|p| p == port)
            })
    })
}

/// The learned membership of `port` in `group` (`groups[].members[]`).
pub fn member<'a>(doc: &'a Value, group: IpAddr, port: &str) -> Option<&'a Value> {
    group_entry(doc, group)?["members"].as_array()?.iter().find(|m| m["port"] == port)
}

/// Source timers of a member entry: source -> remaining milliseconds (`None`: blocked).
pub fn member_sources(m: &Value) -> BTreeMap<IpAddr, Option<u64>> {
    m["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let a = s["source"].as_str()?.parse::<IpAddr>().ok()?;
            Some((a, s["timer_ms"].as_u64()))
        })
        .collect()
}

/// Whether `port` appears anywhere in `groups[]`: in a (*,G) port set or as a learned member.
pub fn port_in_groups(doc: &Value, port: &str) -> bool {
    doc["groups"].as_array().into_iter().flatten().any(|g| {
        g["ports"].as_array().into_iter().flatten().any(|p| p == port)
            || g["members"].as_array().into_iter().flatten().any(|m| m["port"] == port)
    })
}

/// The querier of `port` for IPv4 in `queriers[]`: its address and whether it is mcrelay.
pub fn ipv4_querier(doc: &Value, port: &str) -> Option<(String, bool)> {
    doc["queriers"].as_array().into_iter().flatten().find_map(|q| {
        (q["port"] == port && q["family"] == "ipv4")
            .then(|| (q["address"].as_str().unwrap_or_default().to_string(), q["is_self"] == true))
    })
}

/// The interface names in `ports[]` of `mcrelay ports --json` / `stats --json`, in order.
pub fn port_names(doc: &Value) -> Vec<String> {
    doc["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["iface"].as_str().map(String::from))
        .collect()
}
