//! Checks that need more than the types: addresses, prefixes, names, ranges and cross
//! references. Every problem names the key it is about, so it can be shown at its line.

use std::collections::HashMap;

use super::{
    file::ConfigFile,
    policy::{parse_prefix, GroupPolicy},
    span::{at, Issue},
};
use crate::{groups::parse_group, options::rules, ports};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Every problem in `file`, in file order per section.
pub fn validate(file: &ConfigFile) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Some(root) = &file.pin_root {
        if !root.is_absolute() {
            issues.push(Issue::new(
                at!["pin_root"],
                format!(
                    "pin_root '{}' must be an absolute path under a bpffs mount, e.g. \
                     \"/sys/fs/bpf/mcrelay\"",
                    root.display()
                ),
            ));
        }
    }
    check_ports(file, &mut issues);
    let policy = check_policy(file, &mut issues);
    check_statics(file, &policy, &mut issues);
    check_timers(file, &mut issues);
    check_querier(file, &mut issues);
    check_loop_guard(file, &mut issues);
    check_rate_limits(file, &mut issues);
    check_limits(file, &mut issues);
    issues
}

fn check_ports(file: &ConfigFile, issues: &mut Vec<Issue>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, port) in file.ports.iter().enumerate() {
        let name = port.name.as_str();
        if let Some(problem) = interface_name_problem(name) {
            issues.push(Issue::new(at!["port", i, "name"], problem));
        } else if let Some(first) = seen.insert(name, i) {
            seen.insert(name, first);
            issues.push(Issue::new(
                at!["port", i, "name"],
                format!(
                    "port '{name}' is defined twice ([[port]] entries {} and {}); keep one \
                     entry per interface and put all its options there",
                    first + 1,
                    i + 1
                ),
            ));
        }
        if port.rate_limit_pps == Some(0) {
            issues.push(Issue::new(
                at!["port", i, "rate_limit_pps"],
                "rate_limit_pps must be at least 1; leave it out for no limit",
            ));
        }
    }
}

/// Why `name` cannot be an interface name or glob, if it cannot.
fn interface_name_problem(name: &str) -> Option<String> {
    if name.trim().is_empty() {
        return Some(
            "empty port name: give an interface name such as \"eth1\" or a glob \
                     such as \"tap*\""
                .into(),
        );
    }
    if name.contains(['/', ' ', '\t', '\n']) {
        return Some(format!(
            "'{name}' is not an interface name: names contain no '/' or whitespace"
        ));
    }
    if ports::is_glob(name) {
        if let Err(e) = glob::Pattern::new(name) {
            return Some(format!("'{name}' is not a valid glob: {e}"));
        }
    } else if name.len() > IFNAME_MAX {
        return Some(format!(
            "'{name}' is longer than {IFNAME_MAX} bytes, the longest interface name Linux \
             allows"
        ));
    }
    None
}

fn check_policy(file: &ConfigFile, issues: &mut Vec<Issue>) -> GroupPolicy {
    let mut policy = GroupPolicy::default();
    for (key, list, out) in [
        ("allow", &file.policy.allow, &mut policy.allow),
        ("deny", &file.policy.deny, &mut policy.deny),
    ] {
        for (i, text) in list.iter().enumerate() {
            match parse_prefix(text) {
                Ok(prefix) => out.push(prefix),
                Err(e) => issues.push(Issue::new(at!["policy", key, i], format!("{key}: {e}"))),
            }
        }
    }
    policy
}

fn check_statics(file: &ConfigFile, policy: &GroupPolicy, issues: &mut Vec<Issue>) {
    let port_names: Vec<String> = file.ports.iter().map(|p| p.name.clone()).collect();
    for (i, st) in file.statics.iter().enumerate() {
        match parse_group(&st.group) {
            Ok(group) if !policy.permits(group) => issues.push(Issue::new(
                at!["static", i, "group"],
                format!(
                    "static group {group} is not permitted by [policy] (allow/deny); change \
                     the policy or remove the static entry"
                ),
            )),
            Ok(_) => {}
            Err(e) => issues.push(Issue::new(at!["static", i, "group"], format!("group {e}"))),
        }
        if st.ports.is_empty() {
            issues.push(Issue::new(
                at!["static", i, "ports"],
                "ports is empty: list the ports that receive the group, e.g. [\"eth1\", \"tap0\"]",
            ));
        }
        for (j, name) in st.ports.iter().enumerate() {
            if !ports::matches_any(&port_names, name) {
                issues.push(Issue::new(
                    at!["static", i, "ports", j],
                    format!(
                        "'{name}' is not one of the ports: add a [[port]] entry with name = \
                         \"{name}\" (or a glob that matches it)"
                    ),
                ));
            }
        }
    }
}

fn check_timers(file: &ConfigFile, issues: &mut Vec<Issue>) {
    let t = &file.timers;
    if let Err(e) = rules::robustness(t.robustness) {
        issues.push(Issue::new(at!["timers", "robustness"], format!("robustness = {e}")));
    }
    let mut all_valid = true;
    for (key, value) in [
        ("query_interval", t.query_interval),
        ("query_response_interval", t.query_response_interval),
        ("last_member_interval", t.last_member_interval),
    ] {
        if let Err(e) = rules::seconds(value) {
            all_valid = false;
            issues.push(Issue::new(at!["timers", key], format!("{key} = {e}")));
        }
    }
    if all_valid {
        if let Err(e) = rules::shorter_than(
            ("query_response_interval", t.query_response_interval),
            ("query_interval", t.query_interval),
        ) {
            issues.push(Issue::new(at!["timers", "query_response_interval"], e));
        }
    }
}

fn check_querier(file: &ConfigFile, issues: &mut Vec<Issue>) {
    let q = &file.querier;
    if let Err(e) = rules::igmp_version(q.igmp_version) {
        issues.push(Issue::new(at!["querier", "igmp_version"], format!("igmp_version = {e}")));
    }
    if let Err(e) = rules::mld_version(q.mld_version) {
        issues.push(Issue::new(at!["querier", "mld_version"], format!("mld_version = {e}")));
    }
}

fn check_limits(file: &ConfigFile, issues: &mut Vec<Issue>) {
    let l = &file.limits;
    for (key, value) in [
        ("max_groups", l.max_groups),
        ("max_groups_per_port", l.max_groups_per_port),
        ("max_sources_per_group", l.max_sources_per_group),
        ("max_clients_per_port", l.max_clients_per_port),
    ] {
        if let Err(e) = rules::limit(value) {
            issues.push(Issue::new(at!["limits", key], format!("{key} = {e}")));
        }
    }
    if let Err(e) = rules::rate(l.report_rate_per_port) {
        issues.push(Issue::new(
            at!["limits", "report_rate_per_port"],
            format!("report_rate_per_port = {e}"),
        ));
    }
    if l.max_clients_per_port > relay_common::MAX_CLIENTS_PER_SET {
        issues.push(Issue::new(
            at!["limits", "max_clients_per_port"],
            format!(
                "max_clients_per_port = {}: at most {} (the size of a per-client copy set)",
                l.max_clients_per_port,
                relay_common::MAX_CLIENTS_PER_SET
            ),
        ));
    }
}

fn check_rate_limits(file: &ConfigFile, issues: &mut Vec<Issue>) {
    for (i, limit) in file.rate_limits.iter().enumerate() {
        if let Err(e) = parse_prefix(&limit.group) {
            issues.push(Issue::new(at!["rate_limit", i, "group"], format!("group: {e}")));
        }
        if limit.pps == 0 {
            issues.push(Issue::new(
                at!["rate_limit", i, "pps"],
                "pps must be at least 1; leave the entry out for no limit",
            ));
        }
    }
}

fn check_loop_guard(file: &ConfigFile, issues: &mut Vec<Issue>) {
    let g = &file.loop_guard;
    let mut all_valid = true;
    for (key, value) in [("hello_interval", g.hello_interval), ("holdtime", g.holdtime)] {
        if let Err(e) = rules::seconds(value) {
            all_valid = false;
            issues.push(Issue::new(at!["loop_guard", key], format!("{key} = {e}")));
        }
    }
    if all_valid {
        if let Err(e) =
            rules::shorter_than(("hello_interval", g.hello_interval), ("holdtime", g.holdtime))
        {
            issues.push(Issue::new(at!["loop_guard", "holdtime"], e));
        }
    }
}

/// Problems that do not stop mcrelay: ports that match no interface in this network namespace
/// (yet), and options that are accepted but not implemented.
pub fn lint(file: &ConfigFile, interfaces: &[String]) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (i, port) in file.ports.iter().enumerate() {
        let name = &port.name;
        if !interfaces.iter().any(|iface| ports::matches_any(std::slice::from_ref(name), iface)) {
            let message = if ports::is_glob(name) {
                format!(
                    "no interface matches '{name}' in this network namespace yet; matching \
                     interfaces are attached when they appear"
                )
            } else {
                format!(
                    "interface '{name}' does not exist in this network namespace; `mcrelay run` \
                     fails until it does (`ip link show` lists the interfaces)"
                )
            };
            issues.push(Issue::new(at!["port", i, "name"], message));
        }
    }
    issues
}
