//! Check 5: firewall rules that drop IGMP/MLD or multicast.
//!
//! A heuristic, and the report says so: a rule is flagged when its verdict is drop or reject and
//! one of its (non-negated) matches names IGMP, ICMPv6 / the MLD types (130, 131, 132, 143),
//! a multicast destination (224.0.0.0/4, ff00::/8) or the multicast packet type. Other
//! conditions of the same rule (interfaces, ports) are not evaluated, jumps are not followed,
//! and base chains with policy drop that accept neither IGMP nor multicast get a warning.
//!
//! Sources: `nft -j list ruleset` when `nft` exists (it also shows the rules of iptables-nft);
//! otherwise `iptables-save` / `ip6tables-save`; plus the legacy (x_tables) rule set when the
//! kernel has one and `iptables-legacy-save` exists. Without any of these tools the check is
//! skipped, not failed.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use super::{Check, Context, Finding, Status};

const HEURISTIC: &str = "heuristic: drop/reject rules matching IGMP, MLD/ICMPv6, multicast \
                         destinations or pkttype multicast; other conditions and jumps are not \
                         evaluated";

/// What a rule matches that concerns multicast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Igmp,
    Mld,
    Icmpv6,
    Multicast4,
    Multicast6,
    Multicast,
}

impl Class {
    fn describe(self) -> &'static str {
        match self {
            Class::Igmp => "IGMP",
            Class::Mld => "MLD (ICMPv6 130-132, 143)",
            Class::Icmpv6 => "all ICMPv6 (MLD included)",
            Class::Multicast4 => "IPv4 multicast destinations",
            Class::Multicast6 => "IPv6 multicast destinations",
            Class::Multicast => "multicast packets",
        }
    }
}

/// A rule (or chain policy) that drops what a relay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drop {
    /// `inet filter input`, `iptables filter INPUT`.
    pub place: String,
    pub classes: Vec<Class>,
    /// The command that removes it (`None` for policies).
    pub fix: Option<String>,
    /// A chain policy rather than a rule.
    pub policy: bool,
    /// The rule as written (iptables) or its handle (nft).
    pub rule: String,
    /// The nft rule as `nft list ruleset` writes it, when known.
    pub text: Option<String>,
}

impl Drop {
    fn finding(&self) -> Finding {
        let what = self.classes.iter().map(|c| c.describe()).collect::<Vec<_>>().join(", ");
        if self.policy {
            Finding::new(
                Status::Warn,
                format!(
                    "chain {} has policy drop and no rule in it accepts IGMP/MLD or multicast",
                    self.place
                ),
            )
            .subject(&self.place)
            .note(format!("accept them before the policy applies, e.g.: {}", self.rule))
        } else {
            let mut finding = Finding::new(
                Status::Problem,
                match &self.text {
                    Some(text) => {
                        format!("{}: rule `{text}` ({}) drops {what}", self.place, self.rule)
                    }
                    None => format!("{}: rule `{}` drops {what}", self.place, self.rule),
                },
            )
            .subject(&self.place)
            .note("or insert an accept rule for IGMP/MLD and the relayed groups before it");
            if let Some(fix) = &self.fix {
                finding = finding.fix(fix.clone());
            }
            finding
        }
    }
}

/// `program` in PATH or the usual sbin directories (PATH of non-root users lacks them).
pub fn find_tool(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

pub(super) fn run_tool(tool: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", tool.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{} {}` failed ({}): {}",
            tool.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs the tools that exist and judges their rule sets.
pub fn check(_ctx: &Context) -> Check {
    let mut drops = Vec::new();
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    let mut nft_ok = false;
    if let Some(nft) = find_tool("nft") {
        match run_tool(&nft, &["-j", "list", "ruleset"]) {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(doc) => {
                    let mut found = nft_drops(&doc);
                    // The rules as nft writes them, for the report (best effort).
                    if let Ok(listing) = run_tool(&nft, &["-a", "list", "ruleset"]) {
                        let texts = nft_rule_texts(&listing);
                        for drop in found.iter_mut().filter(|d| !d.policy) {
                            if let Some(text) = texts.get(&(drop.place.clone(), drop.rule.clone()))
                            {
                                drop.text = Some(text.clone());
                            }
                        }
                    }
                    drops.extend(found);
                    sources.push("nft");
                    nft_ok = true;
                }
                Err(e) => errors.push(format!("nft printed invalid JSON: {e}")),
            },
            Err(e) => errors.push(e),
        }
    }
    let mut ran_iptables_save = false;
    if !nft_ok {
        for (save, cmd) in [("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")] {
            let Some(tool) = find_tool(save) else { continue };
            match run_tool(&tool, &[]) {
                Ok(text) => {
                    drops.extend(iptables_drops(&text, cmd));
                    sources.push(save);
                    ran_iptables_save = true;
                }
                Err(e) => errors.push(e),
            }
        }
    }
    // Legacy x_tables rules are invisible to nft; only look when the kernel has such tables
    // (reading them through the tool would otherwise load the legacy modules).
    if !ran_iptables_save {
        for (proc_file, save, cmd) in [
            ("/proc/net/ip_tables_names", "iptables-legacy-save", "iptables-legacy"),
            ("/proc/net/ip6_tables_names", "ip6tables-legacy-save", "ip6tables-legacy"),
        ] {
            let has_tables = std::fs::read_to_string(proc_file).is_ok_and(|s| !s.trim().is_empty());
            let Some(tool) = find_tool(save).filter(|_| has_tables) else { continue };
            match run_tool(&tool, &[]) {
                Ok(text) => {
                    drops.extend(iptables_drops(&text, cmd));
                    sources.push(save);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if sources.is_empty() {
        let why = if errors.is_empty() {
            "neither nft nor iptables-save is installed: firewall rules not checked".to_owned()
        } else {
            format!("firewall rules could not be read: {}", errors.join("; "))
        };
        return Check::skipped("firewall", why);
    }
    let mut findings: Vec<Finding> = drops.iter().map(Drop::finding).collect();
    for finding in &mut findings {
        finding.notes.push(HEURISTIC.into());
    }
    for error in errors {
        findings.push(Finding::new(Status::Ok, format!("not read: {error}")));
    }
    Check::from_findings(
        "firewall",
        Status::Ok,
        format!(
            "no rule drops IGMP/MLD or multicast (read with {}; heuristic)",
            sources.join(", ")
        ),
        findings,
    )
}

/// Every string and number in an nft JSON value (sets, prefixes, ranges flattened); prefixes as
/// `addr/len`.
fn values(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|i| values(i, out)),
        Value::Object(map) => {
            if let Some(prefix) = map.get("prefix") {
                let addr = prefix.get("addr").and_then(Value::as_str).unwrap_or("");
                let len = prefix.get("len").and_then(Value::as_u64).unwrap_or(0);
                out.push(format!("{addr}/{len}"));
            } else {
                map.values().for_each(|i| values(i, out));
            }
        }
        _ => {}
    }
}

/// Whether a value names a multicast address (`239.1.2.3`, `224.0.0.0/4`, `ff02::1`).
fn is_multicast_value(value: &str) -> bool {
    let addr = value.split('/').next().unwrap_or(value);
    addr.parse::<IpAddr>().is_ok_and(|a| a.is_multicast())
}

fn is_mld_value(value: &str) -> bool {
    matches!(value, "130" | "131" | "132" | "143")
        || value.starts_with("mld")
        || value.contains("listener")
}

/// What one match (`left op right`) selects, by what it looks at and the values it compares.
fn classify(left: &str, right: &[String]) -> Option<Class> {
    let any = |f: &dyn Fn(&str) -> bool| right.iter().any(|v| f(v.as_str()));
    match left {
        "ip protocol" | "meta l4proto" | "ip6 nexthdr" | "proto" => {
            if any(&|v| v == "igmp" || v == "2") {
                Some(Class::Igmp)
            } else if any(&|v| matches!(v, "ipv6-icmp" | "icmpv6" | "58")) {
                Some(Class::Icmpv6)
            } else {
                None
            }
        }
        "ip daddr" | "ip6 daddr" | "dst" => any(&is_multicast_value).then(|| {
            if any(&|v| v.contains(':')) {
                Class::Multicast6
            } else {
                Class::Multicast4
            }
        }),
        "icmpv6 type" | "icmpv6-type" => any(&is_mld_value).then_some(Class::Mld),
        "meta pkttype" | "pkt-type" | "dst-type" => {
            any(&|v| v.eq_ignore_ascii_case("multicast")).then_some(Class::Multicast)
        }
        _ => None,
    }
}

/// `ip protocol`, `meta l4proto`, ... for the left side of an nft match.
fn nft_left(left: &Value) -> Option<String> {
    if let Some(p) = left.get("payload") {
        let proto = p.get("protocol")?.as_str()?;
        let field = p.get("field")?.as_str()?;
        return Some(format!("{proto} {field}"));
    }
    if let Some(m) = left.get("meta") {
        return Some(format!("meta {}", m.get("key")?.as_str()?));
    }
    None
}

/// The classes a list of nft statements matches, and whether its verdict is drop/reject or
/// accept.
fn nft_rule(exprs: &[Value]) -> (Vec<Class>, Option<bool>) {
    let mut classes = Vec::new();
    let mut verdict = None;
    for stmt in exprs {
        if let Some(m) = stmt.get("match") {
            if m.get("op").and_then(Value::as_str) == Some("!=") {
                continue;
            }
            let Some(left) = m.get("left").and_then(nft_left) else { continue };
            let mut right = Vec::new();
            values(m.get("right").unwrap_or(&Value::Null), &mut right);
            if let Some(class) = classify(&left, &right) {
                classes.push(class);
            }
        } else if stmt.get("drop").is_some() || stmt.get("reject").is_some() {
            verdict = Some(true);
        } else if stmt.get("accept").is_some() {
            verdict = Some(false);
        }
    }
    classes.sort();
    classes.dedup();
    (classes, verdict)
}

/// Drop rules and suspicious policies in an `nft -j list ruleset` document.
pub fn nft_drops(doc: &Value) -> Vec<Drop> {
    let items = doc.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut drops = Vec::new();
    // (family, table, chain) of base chains with policy drop on a receive hook.
    let mut strict_chains: Vec<(String, String, String)> = Vec::new();
    let mut accepting: Vec<(String, String, String)> = Vec::new();
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    for item in &items {
        if let Some(chain) = item.get("chain") {
            let hook = s(chain, "hook");
            if s(chain, "policy") == "drop"
                && matches!(hook.as_str(), "input" | "prerouting" | "forward")
            {
                strict_chains.push((s(chain, "family"), s(chain, "table"), s(chain, "name")));
            }
            continue;
        }
        let Some(rule) = item.get("rule") else { continue };
        let key = (s(rule, "family"), s(rule, "table"), s(rule, "chain"));
        let exprs = rule.get("expr").and_then(Value::as_array).cloned().unwrap_or_default();
        let (classes, verdict) = nft_rule(&exprs);
        if classes.is_empty() {
            continue;
        }
        match verdict {
            Some(true) => {
                let handle = rule.get("handle").and_then(Value::as_u64);
                let place = format!("{} {} {}", key.0, key.1, key.2);
                drops.push(Drop {
                    fix: handle.map(|h| format!("nft delete rule {place} handle {h}")),
                    rule: handle.map_or_else(|| "?".into(), |h| format!("handle {h}")),
                    place,
                    classes,
                    policy: false,
                    text: None,
                });
            }
            Some(false) => accepting.push(key),
            None => {}
        }
    }
    for key in strict_chains.into_iter().filter(|k| !accepting.contains(k)) {
        let place = format!("{} {} {}", key.0, key.1, key.2);
        let v6 = key.0 == "ip6";
        let rule = if v6 {
            format!("nft insert rule {place} icmpv6 type {{ 130, 131, 132, 143 }} accept")
        } else {
            format!("nft insert rule {place} ip protocol igmp accept")
        };
        drops.push(Drop {
            place,
            classes: vec![Class::Multicast],
            fix: None,
            policy: true,
            rule,
            text: None,
        });
    }
    drops
}

/// The rules of `nft -a list ruleset`, keyed by (`FAMILY TABLE CHAIN`, `handle N`).
pub fn nft_rule_texts(listing: &str) -> std::collections::HashMap<(String, String), String> {
    let mut out = std::collections::HashMap::new();
    let mut table = String::new();
    let mut chain = String::new();
    for line in listing.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, ..] => table = format!("{family} {name}"),
            ["chain", name, ..] => chain = (*name).to_owned(),
            _ => {
                if let Some((rule, handle)) = line.rsplit_once(" # handle ") {
                    if !rule.starts_with("type ") && !table.is_empty() && !chain.is_empty() {
                        out.insert(
                            (format!("{table} {chain}"), format!("handle {}", handle.trim())),
                            rule.trim().to_owned(),
                        );
                    }
                }
            }
        }
    }
    out
}

/// Drop rules and suspicious policies in `iptables-save` output; `cmd` is the matching
/// iptables command (for the fix).
pub fn iptables_drops(text: &str, cmd: &str) -> Vec<Drop> {
    let mut drops = Vec::new();
    let mut table = String::from("filter");
    let mut strict_chains: Vec<(String, String)> = Vec::new();
    let mut accepting: Vec<(String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
            continue;
        }
        if let Some(policy) = line.strip_prefix(':') {
            let mut parts = policy.split_whitespace();
            if let (Some(chain), Some("DROP")) = (parts.next(), parts.next()) {
                if matches!(chain, "INPUT" | "FORWARD" | "PREROUTING") {
                    strict_chains.push((table.clone(), chain.to_owned()));
                }
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else { continue };
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        let Some(chain) = tokens.first() else { continue };
        let mut classes = Vec::new();
        let mut verdict = None;
        let mut negate = false;
        let mut i = 1;
        while i < tokens.len() {
            let token = tokens[i];
            if token == "!" {
                negate = true;
                i += 1;
                continue;
            }
            let value = tokens.get(i + 1).copied().unwrap_or("");
            let left = match token {
                "-p" | "--protocol" => Some("proto"),
                "-d" | "--destination" => Some("dst"),
                "--pkt-type" => Some("pkt-type"),
                "--dst-type" => Some("dst-type"),
                "--icmpv6-type" => Some("icmpv6-type"),
                "-j" | "--jump" => {
                    verdict = match value {
                        "DROP" | "REJECT" => Some(true),
                        "ACCEPT" => Some(false),
                        _ => verdict,
                    };
                    None
                }
                _ => None,
            };
            if let (Some(left), false) = (left, negate) {
                let right: Vec<String> = value.split(',').map(str::to_lowercase).collect();
                if let Some(class) = classify(left, &right) {
                    classes.push(class);
                }
            }
            negate = false;
            i += 1;
        }
        classes.sort();
        classes.dedup();
        if classes.is_empty() {
            continue;
        }
        match verdict {
            Some(true) => drops.push(Drop {
                place: format!("{cmd} {table} {chain}"),
                classes,
                fix: Some(format!("{cmd} -t {table} -D {rest}")),
                policy: false,
                text: None,
                rule: format!("-A {rest}"),
            }),
            Some(false) => accepting.push((table.clone(), (*chain).to_owned())),
            None => {}
        }
    }
    for (table, chain) in strict_chains.into_iter().filter(|k| !accepting.contains(k)) {
        let rule = if cmd.starts_with("ip6") {
            format!("{cmd} -t {table} -I {chain} -p ipv6-icmp --icmpv6-type 143 -j ACCEPT")
        } else {
            format!("{cmd} -t {table} -I {chain} -p igmp -j ACCEPT")
        };
        drops.push(Drop {
            place: format!("{cmd} {table} {chain}"),
            classes: vec![Class::Multicast],
            fix: None,
            policy: true,
            rule,
            text: None,
        });
    }
    drops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_igmp_drop_is_found() {
        let doc: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"inet","name":"t","handle":1}},
            {"chain":{"family":"inet","table":"t","name":"input","handle":1,"type":"filter",
              "hook":"input","prio":0,"policy":"accept"}},
            {"rule":{"family":"inet","table":"t","chain":"input","handle":2,"expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"protocol"}},
                "right":"igmp"}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"t","chain":"input","handle":3,"expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},
                "right":{"prefix":{"addr":"224.0.0.0","len":4}}}},{"reject":null}]}},
            {"rule":{"family":"inet","table":"t","chain":"input","handle":4,"expr":[
              {"match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"protocol"}},
                "right":"igmp"}},{"drop":null}]}},
            {"rule":{"family":"inet","table":"t","chain":"input","handle":5,"expr":[
              {"match":{"op":"==","left":{"payload":{"protocol":"icmpv6","field":"type"}},
                "right":{"set":["mld-listener-query","echo-request"]}}},{"drop":null}]}}
            ]}"#,
        )
        .expect("valid JSON");
        let drops = nft_drops(&doc);
        assert_eq!(drops.len(), 3, "{drops:?}");
        assert_eq!(drops[0].classes, vec![Class::Igmp]);
        assert_eq!(drops[0].fix.as_deref(), Some("nft delete rule inet t input handle 2"));
        assert_eq!(drops[1].classes, vec![Class::Multicast4]);
        assert_eq!(drops[2].classes, vec![Class::Mld]);
    }

    #[test]
    fn nft_listing_texts() {
        let listing = "table inet t { # handle 1\n\tchain input { # handle 1\n\t\ttype filter \
                       hook input priority filter; policy accept;\n\t\tip protocol igmp drop \
                       # handle 2\n\t}\n}\n";
        let texts = nft_rule_texts(listing);
        assert_eq!(
            texts.get(&("inet t input".to_owned(), "handle 2".to_owned())).map(String::as_str),
            Some("ip protocol igmp drop")
        );
        assert_eq!(texts.len(), 1);
    }

    #[test]
    fn nft_policy_drop_without_accept_warns() {
        let doc: Value = serde_json::from_str(
            r#"{"nftables":[
            {"chain":{"family":"ip","table":"f","name":"in","handle":1,"type":"filter",
              "hook":"input","prio":0,"policy":"drop"}}]}"#,
        )
        .expect("valid JSON");
        let drops = nft_drops(&doc);
        assert_eq!(drops.len(), 1);
        assert!(drops[0].policy);
        assert_eq!(drops[0].finding().status, Status::Warn);
    }

    #[test]
    fn iptables_rules() {
        let text = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n\
                    -A INPUT -p igmp -j DROP\n-A INPUT -d 239.0.0.0/8 -i eth0 -j REJECT\n\
                    -A INPUT ! -p igmp -j DROP\n-A INPUT -p tcp -j DROP\n\
                    -A INPUT -m pkttype --pkt-type multicast -j DROP\nCOMMIT\n";
        let drops = iptables_drops(text, "iptables");
        let rules: Vec<&str> = drops.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(
            rules,
            vec![
                "-A INPUT -p igmp -j DROP",
                "-A INPUT -d 239.0.0.0/8 -i eth0 -j REJECT",
                "-A INPUT -m pkttype --pkt-type multicast -j DROP",
                "iptables -t filter -I FORWARD -p igmp -j ACCEPT",
            ]
        );
        assert_eq!(drops[0].fix.as_deref(), Some("iptables -t filter -D INPUT -p igmp -j DROP"));
        let v6 = iptables_drops(
            "*filter\n-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 143 -j DROP\n\
             -A INPUT -d ff00::/8 -j DROP\n",
            "ip6tables",
        );
        assert_eq!(v6.len(), 2);
        assert!(v6[0].classes.contains(&Class::Mld));
        assert_eq!(v6[1].classes, vec![Class::Multicast6]);
    }
}
