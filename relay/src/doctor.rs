//! `mcrelay doctor`: diagnoses the host's multicast set-up and prints the exact fixes.
//!
//! Works without the daemon and without BPF privileges: everything comes from read-only netlink
//! (links, route lookups), `/proc/sys/net` (per network namespace), the read-only ethtool ioctls
//! and, when installed, `nft` / `iptables-save` and `wg show` (WireGuard peers); for OpenVPN
//! `dev tun` it reads which process holds the tun (`/proc/PID/fdinfo`) and that process's
//! command line and config file. It never reads /sys/class/net (under nsenter it can show
//! another namespace).
//!
//! Each check yields one [`Check`]: an id, a status (ok / warn / problem / skip), a summary, the
//! individual findings and the exact fix commands. `run` prints them (text or `--json`) and
//! returns 3 when any check found a problem, 0 otherwise (warnings alone do not fail).

mod firewall;
mod links;
mod route;
mod sysctl;
mod tun;
mod wireguard;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::{cli::DoctorArgs, ports::Link, usage_bail};

/// Exit status when at least one check found a problem.
pub const EXIT_PROBLEMS: i32 = 3;

/// How bad a finding is. Ordered: a check takes the worst status of its findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// The check could not run here (missing tool, nothing to look at).
    Skip,
    Ok,
    Warn,
    Problem,
}

impl Status {
    /// The JSON spelling (`ok`, `warn`, `problem`, `skip`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Skip => "skip",
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Problem => "problem",
        }
    }

    /// The text spelling (`OK`, `WARN`, `PROBLEM`, `SKIP`).
    pub fn label(self) -> &'static str {
        match self {
            Status::Skip => "SKIP",
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Problem => "PROBLEM",
        }
    }
}

/// One thing a check found (an interface, a rule, a route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    /// The interface (or rule, table, ...) concerned, when there is one.
    pub subject: Option<String>,
    pub message: String,
    /// Exact commands that fix it (run in this network namespace unless the message says
    /// otherwise).
    pub fix: Vec<String>,
    /// Alternatives to `fix` and background, printed after it.
    pub notes: Vec<String>,
}

impl Finding {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self { status, subject: None, message: message.into(), fix: Vec::new(), notes: Vec::new() }
    }

    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    pub fn fix(mut self, command: impl Into<String>) -> Self {
        self.fix.push(command.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable id (`multicast_route`, `rp_filter`, ...).
    pub id: &'static str,
    pub status: Status,
    /// One line: what was found, or what is fine.
    pub summary: String,
    pub findings: Vec<Finding>,
}

impl Check {
    /// A check whose status is the worst of `findings` (or `ok_status` when there are none that
    /// are worse than ok) and whose summary is `ok_summary` when nothing is wrong, else the
    /// messages of the findings that are wrong.
    pub fn from_findings(
        id: &'static str,
        ok_status: Status,
        ok_summary: impl Into<String>,
        findings: Vec<Finding>,
    ) -> Self {
        let worst = findings.iter().map(|f| f.status).max().unwrap_or(ok_status).max(ok_status);
        let summary = if worst <= Status::Ok {
            ok_summary.into()
        } else {
            findings
                .iter()
                .filter(|f| f.status == worst)
                .map(|f| f.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        };
        Self { id, status: worst, summary, findings }
    }

    /// A check that could not run.
    pub fn skipped(id: &'static str, why: impl Into<String>) -> Self {
        Self { id, status: Status::Skip, summary: why.into(), findings: Vec::new() }
    }

    /// Every fix command of the findings at warn level or worse, in order, without duplicates.
    pub fn fixes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for finding in self.findings.iter().filter(|f| f.status >= Status::Warn) {
            for command in &finding.fix {
                if !out.contains(command) {
                    out.push(command.clone());
                }
            }
        }
        out
    }

    /// The JSON object of this check.
    pub fn to_json(&self) -> Value {
        let fixes = self.fixes();
        let fix = if fixes.is_empty() { Value::Null } else { Value::String(fixes.join("; ")) };
        let findings: Vec<Value> = self
            .findings
            .iter()
            .map(|f| {
                json!({
                    "status": f.status.as_str(),
                    "subject": f.subject,
                    "message": f.message,
                    "fix": f.fix,
                    "notes": f.notes,
                })
            })
            .collect();
        json!({
            "id": self.id,
            "status": self.status.as_str(),
            "summary": self.summary,
            "fix": fix,
            "fixes": fixes,
            "findings": findings,
        })
    }

    /// The text form: `STATUS id: summary`, then indented findings and `fix: ...` lines.
    pub fn to_text(&self) -> String {
        let mut out = format!("{:<7} {}: {}\n", self.status.label(), self.id, self.summary);
        for finding in &self.findings {
            let show = finding.status >= Status::Warn || self.status <= Status::Ok;
            if !show {
                continue;
            }
            // The summary already says it when it is this finding's message alone.
            if finding.message != self.summary {
                let subject = finding
                    .subject
                    .as_deref()
                    .filter(|s| !finding.message.contains(s))
                    .map(|s| format!("{s}: "))
                    .unwrap_or_default();
                let tag = if finding.status >= Status::Warn && self.findings.len() > 1 {
                    format!("[{}] ", finding.status.label().to_lowercase())
                } else {
                    String::new()
                };
                out.push_str(&format!("    {tag}{subject}{}\n", finding.message));
            }
            for command in &finding.fix {
                out.push_str(&format!("      fix: {command}\n"));
            }
            for note in &finding.notes {
                out.push_str(&format!("      {note}\n"));
            }
        }
        out
    }
}

/// Everything the checks share: the interfaces of this namespace and the `--iface` focus.
pub struct Context {
    pub links: Vec<Link>,
    pub by_index: BTreeMap<u32, usize>,
    /// `--iface`, validated to exist.
    pub iface: Option<String>,
}

impl Context {
    pub fn new(links: Vec<Link>, iface: Option<String>) -> Self {
        let by_index = links.iter().enumerate().map(|(i, l)| (l.index, i)).collect();
        Self { links, by_index, iface }
    }

    pub fn link(&self, index: u32) -> Option<&Link> {
        self.by_index.get(&index).map(|&i| &self.links[i])
    }

    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn name_of(&self, index: u32) -> String {
        self.link(index).map_or_else(|| format!("ifindex {index}"), |l| l.name.clone())
    }

    /// Interfaces that can carry multicast to peers: up, not loopback.
    pub fn candidate_ports(&self) -> impl Iterator<Item = &Link> {
        self.links.iter().filter(|l| l.up && !l.loopback)
    }
}

/// Runs every check and prints the report; returns the exit status (0: no problem found, 3:
/// problems found).
pub async fn run(args: &DoctorArgs) -> anyhow::Result<i32> {
    let checks = collect(args.iface.as_deref()).await?;
    if args.json {
        println!("{}", report_json(&checks));
    } else {
        print!("{}", report_text(&checks));
    }
    Ok(exit_status(&checks))
}

/// Runs every check in this network namespace.
pub async fn collect(iface: Option<&str>) -> anyhow::Result<Vec<Check>> {
    let handle = crate::ports::connect()?;
    let links = crate::ports::list(&handle).await?;
    if let Some(name) = iface {
        if !links.iter().any(|l| l.name == name) {
            usage_bail!("--iface {name}: no such interface in this network namespace");
        }
    }
    let ctx = Context::new(links, iface.map(str::to_owned));
    let mut checks = Vec::new();
    checks.push(route::check_v4(&handle, &ctx).await?);
    checks.push(route::check_v6(&handle, &ctx).await?);
    checks.push(sysctl::check_rp_filter(&ctx));
    checks.push(links::check_multicast_flag(&ctx));
    checks.push(sysctl::check_forced_versions(&ctx));
    checks.push(firewall::check(&ctx));
    checks.push(links::check_bridge_querier(&ctx));
    checks.push(links::check_xdp_mode(&ctx));
    checks.push(links::check_veth(&ctx));
    checks.push(wireguard::check(&handle, &ctx).await?);
    checks.push(tun::check(&handle, &ctx).await?);
    Ok(checks)
}

/// 3 when any check found a problem, else 0.
pub fn exit_status(checks: &[Check]) -> i32 {
    if checks.iter().any(|c| c.status == Status::Problem) {
        EXIT_PROBLEMS
    } else {
        0
    }
}

/// `{"checks":[...],"problems":N,"warnings":N}`.
pub fn report_json(checks: &[Check]) -> Value {
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    json!({
        "checks": checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        "problems": count(Status::Problem),
        "warnings": count(Status::Warn),
    })
}

/// One block per check and a closing line with the counts.
pub fn report_text(checks: &[Check]) -> String {
    let mut out: String = checks.iter().map(Check::to_text).collect();
    let problems = checks.iter().filter(|c| c.status == Status::Problem).count();
    let warnings = checks.iter().filter(|c| c.status == Status::Warn).count();
    out.push_str(&format!("{problems} problem(s), {warnings} warning(s)\n"));
    out
}

/// `sysctl -w` for a `/proc/sys` key given with slashes (`net/ipv4/conf/eth0/rp_filter`): the
/// dotted form, or the slash form when an interface name contains a dot (VLANs: `eth0.100`).
pub fn sysctl_command(key: &str, value: &str) -> String {
    let parts: Vec<&str> = key.split('/').collect();
    if parts.iter().any(|p| p.contains('.')) {
        format!("sysctl -w {key}={value}")
    } else {
        format!("sysctl -w {}={value}", parts.join("."))
    }
}

/// Reads `/proc/sys/KEY` (with slashes), trimmed.
pub fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(std::path::Path::new("/proc/sys").join(key))
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_order_and_exit() {
        let ok = Check::from_findings("a", Status::Ok, "fine", vec![]);
        let warn = Check::from_findings(
            "b",
            Status::Ok,
            "fine",
            vec![Finding::new(Status::Warn, "meh").fix("do x")],
        );
        assert_eq!(ok.status, Status::Ok);
        assert_eq!(ok.summary, "fine");
        assert_eq!(warn.status, Status::Warn);
        assert_eq!(warn.summary, "meh");
        assert_eq!(exit_status(&[ok.clone(), warn.clone()]), 0);
        let bad = Check::from_findings(
            "c",
            Status::Ok,
            "fine",
            vec![
                Finding::new(Status::Problem, "broken").fix("do y"),
                Finding::new(Status::Problem, "broken2").fix("do y"),
            ],
        );
        assert_eq!(bad.summary, "broken; broken2");
        assert_eq!(bad.fixes(), vec!["do y".to_owned()]);
        assert_eq!(exit_status(&[ok, warn, bad.clone()]), 3);
        let doc = report_json(&[bad]);
        assert_eq!(doc["problems"], 1);
        assert_eq!(doc["checks"][0]["id"], "c");
        assert_eq!(doc["checks"][0]["status"], "problem");
        assert_eq!(doc["checks"][0]["fix"], "do y");
    }

    #[test]
    fn sysctl_commands() {
        assert_eq!(
            sysctl_command("net/ipv4/conf/eth0/rp_filter", "2"),
            "sysctl -w net.ipv4.conf.eth0.rp_filter=2"
        );
        assert_eq!(
            sysctl_command("net/ipv4/conf/eth0.100/rp_filter", "2"),
            "sysctl -w net/ipv4/conf/eth0.100/rp_filter=2"
        );
    }
}
