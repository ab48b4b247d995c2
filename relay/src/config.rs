//! The configuration file (/etc/mcrelay/mcrelay.toml; packaging/mcrelay.toml documents every
//! key).
//!
//! Reading a file goes through three steps, each of which reports problems at their line and
//! column: TOML syntax (every error the parser recovers from), the structure (unknown keys, wrong
//! types; serde with `deny_unknown_fields`), and the meaning ([`validate`]: addresses, prefixes,
//! names, ranges, cross references). Nothing here touches the system: no BPF, no netlink;
//! [`warnings`] only lists interface names.
//!
//! The command line overrides the file; `Settings` (one layer up, settings.rs) combines the two.

mod file;
mod policy;
mod span;
mod validate;

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use toml::{
    de::{DeArray, DeString, DeTable, DeValue},
    Spanned,
};

use self::span::{line_col, Issue, Locator};
pub use self::{
    file::{
        ConfigFile, LimitsConfig, LoopGuardConfig, PolicyConfig, PortConfig, PortRole,
        QuerierConfig, StaticConfig, TimersConfig, UnknownGroups, XdpMode,
    },
    policy::{contains, parse_prefix, parse_rate_limit, GroupPolicy, GroupRate},
    span::LineCol,
};
use crate::error::UsageError;

/// A problem at a place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub at: LineCol,
    pub message: String,
}

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file has errors; each one is shown as `FILE:LINE:COL: message`, one per line.
    #[error("{}", render(path, errors))]
    Invalid { path: PathBuf, errors: Vec<Diagnostic> },
}

fn render(path: &Path, errors: &[Diagnostic]) -> String {
    let lines: Vec<String> =
        errors.iter().map(|e| format!("{}:{}: {}", path.display(), e.at, e.message)).collect();
    lines.join("\n")
}

impl From<ConfigError> for UsageError {
    /// Configuration errors are usage errors (exit status 2).
    fn from(err: ConfigError) -> Self {
        match &err {
            ConfigError::Read { source, .. } => UsageError::new(format!("{err}: {source}")),
            ConfigError::Invalid { .. } => UsageError::new(err.to_string()),
        }
    }
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_str(&text).map_err(|errors| ConfigError::Invalid { path: path.to_path_buf(), errors })
}

/// Parses and validates configuration text; on failure, every problem found, in file order.
pub fn parse_str(text: &str) -> Result<ConfigFile, Vec<Diagnostic>> {
    let at = |span: Option<Range<usize>>, message: String| Diagnostic {
        at: line_col(text, span.map_or(0, |s| s.start)),
        message,
    };
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // The parser recovers and goes on, which often yields follow-up errors on the same
        // line; the first one per line is the one that explains it.
        let mut errors: Vec<Diagnostic> = Vec::new();
        // The parser reports some errors after later ones (an unclosed table before the
        // value it skipped): sort first, so the first per line is the earliest.
        let mut all: Vec<Diagnostic> = syntax_errors
            .into_iter()
            .map(|e| at(e.span(), format!("TOML syntax: {}", e.message())))
            .collect();
        all.sort_by_key(|d| d.at);
        for d in all {
            if !errors.iter().any(|prev| prev.at.line == d.at.line) {
                errors.push(d);
            }
        }
        return Err(errors);
    }
    let file = match ConfigFile::deserialize(toml::de::Deserializer::from(document.clone())) {
        Ok(file) => file,
        Err(first) => {
            // serde stops at the first problem; look at every top-level key and every
            // [[port]]/[[static]] entry on its own to report them all.
            let mut errors: Vec<Diagnostic> = structure_errors(document)
                .into_iter()
                .map(|e| at(e.span(), structure_message(e.message())))
                .collect();
            if errors.is_empty() {
                errors.push(at(first.span(), structure_message(first.message())));
            }
            errors.sort_by_key(|d| d.at);
            errors.dedup();
            return Err(errors);
        }
    };
    let issues = validate::validate(&file);
    if issues.is_empty() {
        return Ok(file);
    }
    let mut errors = locate(text, issues);
    errors.sort_by_key(|d| d.at);
    Err(errors)
}

/// The structural errors of `document`, found by deserializing each top-level key, and each
/// element of an array of tables, on its own (every other key then takes its default).
fn structure_errors(document: Spanned<DeTable<'_>>) -> Vec<toml::de::Error> {
    let span = document.span();
    let mut parts: Vec<(Spanned<DeString<'_>>, Spanned<DeValue<'_>>)> = Vec::new();
    for (key, value) in document.into_inner() {
        match value.get_ref() {
            DeValue::Array(array) if array.iter().all(|v| v.get_ref().is_table()) => {
                for element in array.iter() {
                    let mut one = DeArray::new();
                    one.push(element.clone());
                    parts.push((key.clone(), Spanned::new(value.span(), DeValue::Array(one))));
                }
            }
            _ => parts.push((key, value)),
        }
    }
    parts
        .into_iter()
        .filter_map(|(key, value)| {
            let mut table = DeTable::new();
            table.insert(key, value);
            let document = Spanned::new(span.clone(), table);
            ConfigFile::deserialize(toml::de::Deserializer::from(document)).err()
        })
        .collect()
}

/// serde's message, with a hint where it helps.
fn structure_message(message: &str) -> String {
    let message = message.trim_end();
    if message.starts_with("unknown field") {
        format!("{message} (the commented default mcrelay.toml lists every key)")
    } else if message.starts_with("invalid type") && message.ends_with("expected f64") {
        format!("{message}: write a number of seconds, e.g. 2.5")
    } else {
        message.to_owned()
    }
}

fn locate(text: &str, issues: Vec<Issue>) -> Vec<Diagnostic> {
    let locator = Locator::new(text);
    issues
        .into_iter()
        .map(|issue| Diagnostic {
            at: line_col(text, locator.span(&issue.at).start),
            message: issue.message,
        })
        .collect()
}

/// The allow/deny prefixes of `[policy]`, parsed. The file must have been validated
/// ([`load`] does that); invalid prefixes are skipped.
pub fn policy(file: &ConfigFile) -> GroupPolicy {
    let parse = |list: &[String]| list.iter().filter_map(|p| parse_prefix(p).ok()).collect();
    GroupPolicy { allow: parse(&file.policy.allow), deny: parse(&file.policy.deny) }
}

/// The names of the interfaces in this network namespace (if_nameindex(3), not /sys).
fn interface_names() -> Result<Vec<String>, nix::Error> {
    let list = nix::net::if_::if_nameindex()?;
    Ok(list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
}

/// Things worth knowing that do not stop mcrelay: ports that match no interface in the current
/// network namespace (yet), and options that are accepted but not implemented.
pub fn warnings(file: &ConfigFile) -> Vec<String> {
    match interface_names() {
        Ok(names) => validate::lint(file, &names).into_iter().map(|i| i.message).collect(),
        Err(e) => vec![format!("cannot list the network interfaces ({e}); port names not checked")],
    }
}

struct Located<'a>(&'a Path, &'a Diagnostic, &'a str);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: {}", self.0.display(), self.1.at, self.2, self.1.message)
    }
}

/// `mcrelay check-config FILE`: validates `path` without touching the system. Prints
/// `FILE: ok` (and warnings, `FILE:LINE:COL: warning: ...`, on stderr), or every error as
/// `FILE:LINE:COL: error: message` on stderr and returns a [`UsageError`] (exit status 2).
pub fn check_config(path: &Path) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(source) => {
            let err = ConfigError::Read { path: path.to_path_buf(), source };
            return Err(UsageError::from(err).into());
        }
    };
    match parse_str(&text) {
        Ok(file) => {
            match interface_names() {
                Ok(names) => {
                    for warning in locate(&text, validate::lint(&file, &names)) {
                        eprintln!("{}", Located(path, &warning, "warning"));
                    }
                }
                Err(e) => eprintln!(
                    "{}: warning: cannot list the network interfaces ({e}); port names not \
                     checked",
                    path.display()
                ),
            }
            println!("{}: ok", path.display());
            Ok(())
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("{}", Located(path, error, "error"));
            }
            let n = errors.len();
            Err(UsageError::new(format!(
                "{}: {n} error{} found; fix {} and check again",
                path.display(),
                if n == 1 { "" } else { "s" },
                if n == 1 { "it" } else { "them" },
            ))
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn errors(text: &str) -> Vec<Diagnostic> {
        parse_str(text).expect_err("should be rejected")
    }

    /// The single error of `text`: its line and message.
    fn error(text: &str) -> (usize, String) {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
        (errs[0].at.line, errs[0].message.clone())
    }

    fn assert_error(text: &str, line: usize, needle: &str) {
        let (got_line, message) = error(text);
        assert_eq!(got_line, line, "wrong line for {message:?} in:\n{text}");
        assert!(message.contains(needle), "{message:?} should contain {needle:?}");
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        assert_eq!(parse_str("").expect("valid"), ConfigFile::default());
        assert_eq!(parse_str("# nothing\n").expect("valid"), ConfigFile::default());
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
metrics_listen = "[::1]:9464"
pin_root = "/sys/fs/bpf/mcrelay"
xdp_mode = "native"

[[port]]
name = "eth1"
role = "router"
xdp_mode = "skb"
rate_limit_pps = 10000

[[port]]
name = "tap*"
fast_leave = true
per_client = true

[[static]]
group = "ff3e::1"
ports = ["tap7"]

[policy]
allow = ["239.0.0.0/8", "ff3e::/16", "224.0.0.251/32"]
deny = ["239.255.255.250"]
unknown = "flood"

[timers]
robustness = 3
query_interval = 30
query_response_interval = 2.5
last_member_interval = 0.2

[querier]
enabled = false
igmp_version = 2
mld_version = 1
"#;
        let file = parse_str(text).expect("valid");
        assert_eq!(file.metrics_listen, Some("[::1]:9464".parse::<SocketAddr>().expect("addr")));
        assert_eq!(file.xdp_mode, XdpMode::Native);
        assert_eq!(file.ports.len(), 2);
        assert_eq!(file.ports[0].role, PortRole::Router);
        assert_eq!(file.ports[0].xdp_mode, Some(XdpMode::Skb));
        assert_eq!(file.ports[0].rate_limit_pps, Some(10000));
        assert!(file.ports[1].fast_leave && file.ports[1].per_client);
        assert_eq!(file.ports[1].role, PortRole::Member);
        assert_eq!(file.port_for("tap3").map(|p| p.name.as_str()), Some("tap*"));
        assert_eq!(file.policy.unknown, UnknownGroups::Flood);
        assert_eq!(file.timers.query_interval, 30.0);
        assert_eq!(file.timers.query_response_interval, 2.5);
        assert!(!file.querier.enabled);
        let p = policy(&file);
        assert!(p.permits("224.0.0.251".parse().expect("addr")));
        assert!(!p.permits("239.255.255.250".parse().expect("addr")));
        assert!(!p.permits("238.1.1.1".parse().expect("addr")));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        assert_error("[[port]]\nname = \"eth1\n", 2, "TOML syntax");
        assert_error("a = 1\nb = = 2\n", 2, "TOML syntax");
    }

    #[test]
    fn unknown_keys_are_rejected_where_they_are() {
        assert_error("[[port]]\nname = \"eth1\"\nfast_leav = true\n", 3, "fast_leav");
        assert_error("metrics = \"x\"\n", 1, "unknown field `metrics`");
        assert_error("[timers]\nquery_interval = 60\n[timer]\n", 3, "timer");
        assert_error("[policy]\nunknown = \"flood\"\nallw = []\n", 3, "allw");
    }

    #[test]
    fn wrong_types_and_values_are_rejected_where_they_are() {
        assert_error("[[port]]\nname = \"eth1\"\nrole = \"rooter\"\n", 3, "rooter");
        assert_error("[[port]]\nname = \"eth1\"\nxdp_mode = \"fast\"\n", 3, "fast");
        assert_error("[timers]\nrobustness = -1\n", 2, "");
        assert_error("[timers]\nquery_interval = \"long\"\n", 2, "");
        assert_error("[[port]]\nrole = \"router\"\n", 1, "name");
        assert_error("metrics_listen = \"localhost\"\n", 1, "ADDRESS:PORT");
    }

    #[test]
    fn every_structural_error_is_reported() {
        let errs = errors(
            "metrics = 1\n[[port]]\nname = \"a\"\n[[port]]\nname = \"b\"\nrole = \"x\"\n\
             [[port]]\nnme = \"c\"\n[timers]\nquery_interval = \"x\"\n",
        );
        let lines: Vec<usize> = errs.iter().map(|e| e.at.line).collect();
        assert_eq!(lines, [1, 6, 8, 10], "{errs:#?}");
    }

    #[test]
    fn semantic_errors_point_at_the_offending_value() {
        let ports = "[[port]]\nname = \"eth1\"\n[[port]]\nname = \"tap*\"\n";
        assert_error(&format!("{ports}[[port]]\nname = \"eth1\"\n"), 6, "defined twice");
        assert_error(
            "[policy]\nallow = [\n  \"239.0.0.0/8\",\n  \"239.0.0.0/40\",\n]\n",
            4,
            "0 to 32",
        );
        assert_error("[policy]\ndeny = [\"10.0.0.0/8\"]\n", 2, "not a multicast prefix");
        assert_error(
            &format!("{ports}[[static]]\ngroup = \"239.1.1\"\nports = [\"eth1\"]\n"),
            6,
            "not an IPv4 or IPv6 address",
        );
        assert_error(
            &format!("{ports}[[static]]\ngroup = \"10.1.1.1\"\nports = [\"eth1\"]\n"),
            6,
            "not a multicast group",
        );
        assert_error(
            &format!("{ports}[[static]]\ngroup = \"239.1.1.1\"\nports = [\"eth1\",\n \"eth2\"]\n"),
            8,
            "'eth2' is not one of the ports",
        );
        assert_error(
            &format!(
                "{ports}[[static]]\ngroup = \"239.255.1.1\"\nports = [\"tap0\"]\n\
                 [policy]\ndeny = [\"239.255.0.0/16\"]\n"
            ),
            6,
            "not permitted",
        );
        assert_error("[timers]\nquery_interval = 10\nquery_response_interval = 10\n", 3, "shorter");
        assert_error("[timers]\nquery_response_interval = 200\n", 2, "shorter");
        assert_error("[timers]\nlast_member_interval = 0\n", 2, "more than 0");
        assert_error("[timers]\nrobustness = 9\n", 2, "1 to 7");
        assert_error("[querier]\nenabled = true\nigmp_version = 4\n", 3, "2 or 3");
        assert_error("[querier]\nmld_version = 3\n", 2, "1 or 2");
        assert_error("pin_root = \"relative\"\n", 1, "absolute");
        assert_error("[[port]]\nname = \"averyveryverylongname\"\n", 2, "longer than 15");
        assert_error("[[port]]\nname = \"tap[\"\n", 2, "glob");
    }

    #[test]
    fn rate_limits_need_a_group_prefix_and_a_rate() {
        assert_error("[[rate_limit]]\ngroup = \"10.0.0.0/8\"\npps = 10\n", 2, "group:");
        assert_error("[[rate_limit]]\ngroup = \"239.0.0.0/8\"\npps = 0\n", 3, "at least 1");
        let file = parse_str("[[rate_limit]]\ngroup = \"ff3e::/16\"\npps = 500\n").expect("valid");
        assert_eq!(file.rate_limits[0].pps, 500);
    }

    #[test]
    fn loop_guard_timers_are_checked_like_the_command_line_flags() {
        assert_error(
            "[loop_guard]\nhello_interval = 0\n",
            2,
            "hello_interval = 0: expected seconds",
        );
        assert_error(
            "[loop_guard]\nhello_interval = 2\nholdtime = 2\n",
            3,
            "hello_interval (2s) must be shorter than holdtime (2s)",
        );
        let file =
            parse_str("[loop_guard]\nhello_interval = 0.2\nholdtime = 0.7\n").expect("valid");
        assert_eq!(file.loop_guard.holdtime, 0.7);
    }

    #[test]
    fn every_semantic_error_is_reported_in_file_order() {
        let errs = errors(
            "[[port]]\nname = \"eth1\"\n[[port]]\nname = \"eth1\"\n[timers]\nrobustness = 0\n\
             [querier]\nmld_version = 7\n[policy]\nallow = [\"1.2.3.4/32\"]\n",
        );
        let lines: Vec<usize> = errs.iter().map(|e| e.at.line).collect();
        assert_eq!(lines, [4, 6, 8, 10], "{errs:#?}");
    }

    #[test]
    fn statics_may_name_interfaces_matched_by_a_port_glob() {
        parse_str(
            "[[port]]\nname = \"tap*\"\n[[static]]\ngroup = \"239.1.1.1\"\nports = [\"tap0\"]\n",
        )
        .expect("tap0 matches tap*");
    }

    #[test]
    fn unmatched_ports_are_warnings() {
        let file = parse_str(
            "[[port]]\nname = \"lo\"\n[[port]]\nname = \"nosuch-if9\"\n[[port]]\nname = \
             \"nosuch*\"\nper_client = true\nrate_limit_pps = 5\n",
        )
        .expect("valid");
        let names: Vec<String> = vec!["lo".into(), "eth0".into()];
        let lint = validate::lint(&file, &names);
        let messages: Vec<&str> = lint.iter().map(|i| i.message.as_str()).collect();
        assert_eq!(lint.len(), 2, "{messages:#?}");
        assert!(messages[0].contains("'nosuch-if9' does not exist"), "{messages:?}");
        assert!(messages[1].contains("no interface matches 'nosuch*'"), "{messages:?}");
        // `lo` exists in every network namespace.
        let live = warnings(&file);
        assert!(!live.iter().any(|w| w.contains("'lo'")), "{live:?}");
    }

    #[test]
    fn errors_render_as_file_line_column() {
        let err = ConfigError::Invalid {
            path: "/etc/mcrelay/mcrelay.toml".into(),
            errors: errors("[timers]\nrobustness = 0\n"),
        };
        assert!(
            err.to_string().starts_with("/etc/mcrelay/mcrelay.toml:2:14: robustness = 0"),
            "{err}"
        );
    }

    #[test]
    fn the_packaged_default_config_is_valid() {
        let text = include_str!("../../packaging/mcrelay.toml");
        let file = parse_str(text).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(file.timers, TimersConfig::default());
        assert_eq!(file.querier, QuerierConfig::default());
    }
}
