//! Least privilege: the daemon works with exactly the capabilities and groups the systemd unit
//! gives it (packaging/mcrelay.service, read here, so the test follows the unit), and what it
//! leaves behind (pins, state file, lock) is readable by root and the `mcrelay` group only.
//!
//! The daemon runs under `setpriv` (util-linux) as root with the unit's
//! `CapabilityBoundingSet=`/`AmbientCapabilities=`, `SupplementaryGroups=` and
//! `NoNewPrivileges=`. The `mcrelay` group is a temporary group (removed by a guard, also on
//! panic) that the daemon is pointed at with `MCRELAY_GROUP`; the CLI runs as a numeric uid
//! that is not root, once as a member of that group and once not.

use std::{
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use mcrelay_tests::{
    addr,
    cmd::{describe, output_with_timeout, run_checked},
    daemon::{mcrelay_bin, pin_root_of, wait_member, ONE_SHOT_TIMEOUT},
    require_testbed,
    topology::Star,
    workspace_root, McastReceiver, McastSender, Mcrelay,
};
use serde_json::Value;

/// UDP port of the test group.
const PORT: u16 = 5000;
/// Datagrams sent.
const COUNT: u64 = 100;
const INTERVAL: Duration = Duration::from_millis(1);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// The unit's privileges, as `setpriv` needs them.
struct UnitPrivileges {
    /// Capability names without `CAP_`, lower case (`net_admin`).
    capabilities: Vec<String>,
    /// Bit mask of those capabilities, as /proc/PID/status shows it.
    mask: u64,
    /// `SupplementaryGroups=` names the `mcrelay` group.
    in_mcrelay_group: bool,
    no_new_privileges: bool,
}

fn capability_number(name: &str) -> u32 {
    match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_FOWNER" => 3,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_BROADCAST" => 11,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_IPC_LOCK" => 14,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("capability {other} of the unit is not in this test's table; add it"),
    }
}

/// Reads packaging/mcrelay.service.
fn unit_privileges() -> UnitPrivileges {
    let path = workspace_root().join("packaging/mcrelay.service");
    let unit = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let setting = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .flat_map(|value| value.split_whitespace().map(str::to_owned))
            .collect()
    };
    let mut bounding = setting("CapabilityBoundingSet");
    let mut ambient = setting("AmbientCapabilities");
    bounding.sort();
    ambient.sort();
    assert!(!bounding.is_empty(), "{} has no CapabilityBoundingSet=", path.display());
    assert_eq!(bounding, ambient, "the unit's bounding and ambient sets differ");
    UnitPrivileges {
        mask: bounding.iter().fold(0, |mask, cap| mask | 1 << capability_number(cap)),
        capabilities: bounding
            .iter()
            .map(|cap| cap.trim_start_matches("CAP_").to_ascii_lowercase())
            .collect(),
        in_mcrelay_group: setting("SupplementaryGroups").iter().any(|g| g == "mcrelay"),
        no_new_privileges: setting("NoNewPrivileges").iter().any(|v| v == "yes" || v == "true"),
    }
}

/// A temporary system group, deleted when dropped.
struct TempGroup {
    name: String,
    gid: u32,
}

impl TempGroup {
    fn new(tag: &str) -> Self {
        let name = format!("mcrt{tag}{}", std::process::id());
        let _ = Command::new("groupdel").arg(&name).output();
        run_checked({
            let mut cmd = Command::new("groupadd");
            cmd.args(["--system", &name]);
            cmd
        });
        let gid = nix::unistd::Group::from_name(&name)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("group {name} not found after groupadd"))
            .gid
            .as_raw();
        Self { name, gid }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// `mcrelay run ARGS` in the star's gateway namespace under `setpriv` with exactly the unit's
/// privileges (as root, like the unit), pointed at `group`.
fn start_like_the_unit(star: &Star, privileges: &UnitPrivileges, group: &TempGroup) -> Mcrelay {
    let caps = format!(
        "-all,{}",
        privileges.capabilities.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",")
    );
    let mut cmd = star.gw.command("setpriv");
    cmd.args(["--bounding-set", &caps, "--inh-caps", &caps, "--ambient-caps", &caps]);
    if privileges.in_mcrelay_group {
        cmd.args(["--groups", &group.gid.to_string()]);
    } else {
        cmd.arg("--clear-groups");
    }
    if privileges.no_new_privileges {
        cmd.arg("--no-new-privs");
    }
    cmd.arg("--").arg(mcrelay_bin()).arg("run").args(star.iface_args());
    cmd.env("MCRELAY_GROUP", &group.name);
    let mut relay = Mcrelay::start_command(cmd);
    relay.wait_ready();
    relay
}

/// The capability sets of process `pid` (`CapEff`, `CapPrm`, `CapBnd`, `CapAmb`).
fn capability_sets(pid: u32) -> Vec<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            if !["CapEff", "CapPrm", "CapBnd", "CapAmb"].contains(&key) {
                return None;
            }
            Some((key.to_owned(), u64::from_str_radix(value.trim(), 16).ok()?))
        })
        .collect()
}

/// A uid no account uses, for this test process.
fn unprivileged_uid() -> u32 {
    61_000 + std::process::id() % 4_000
}

/// `mcrelay ARGS` in `star`'s gateway namespace as a non-root user, a member of `group` or not.
fn mcrelay_as_user(star: &Star, group: Option<&TempGroup>, args: &[&str]) -> Output {
    let uid = unprivileged_uid().to_string();
    let mut cmd = star.gw.command("setpriv");
    cmd.args(["--reuid", &uid, "--regid", &uid]);
    match group {
        Some(group) => cmd.args(["--groups", &group.gid.to_string()]),
        None => cmd.arg("--clear-groups"),
    };
    cmd.arg("--").arg(mcrelay_bin()).args(args);
    let what = describe(&cmd);
    let out = output_with_timeout(cmd, ONE_SHOT_TIMEOUT);
    eprintln!("`{what}`: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn json_of(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} as a member of the group failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: invalid JSON ({e})"))
}

/// The pin directory of the current layout under `ns_dir` (`ns-<id>/v<N>`).
fn layout_dir(ns_dir: &Path) -> PathBuf {
    std::fs::read_dir(ns_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", ns_dir.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('v')))
        .unwrap_or_else(|| panic!("no v<N> directory in {}", ns_dir.display()))
}

fn assert_mode(path: &Path, mode: u32, gid: u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {}", path.display());
    assert_eq!(meta.gid(), gid, "group of {}", path.display());
    assert_eq!(meta.uid(), 0, "owner of {}", path.display());
}

fn groups_of(doc: &Value, group: IpAddr) -> Vec<String> {
    doc["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["group"].as_str() == Some(&group.to_string()))
        .flat_map(|g| g["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect()
}

/// The daemon under exactly the unit's capabilities attaches, learns a join and forwards; its
/// capability sets are exactly the unit's.
#[test]
fn daemon_works_with_exactly_the_units_capabilities() {
    require_testbed!("setpriv", "groupadd", "groupdel");
    let privileges = unit_privileges();
    let group = TempGroup::new("c");
    let star = Star::new("prc", 2);
    let relay = start_like_the_unit(&star, &privileges, &group);
    for (set, mask) in capability_sets(relay.pid()) {
        assert_eq!(mask, privileges.mask, "{set} of the daemon: {mask:#x}");
    }

    let (s, r) = (&star.hosts[0], &star.hosts[1]);
    let group_addr = addr("239.7.7.7");
    let rx = McastReceiver::join(&r.ns, group_addr, PORT, &r.iface);
    wait_member(&star.gw, group_addr, &r.gw_port, DELIVERY_TIMEOUT);
    McastSender::new(&s.ns, &s.iface).send_numbered(group_addr, PORT, COUNT, INTERVAL);
    assert_eq!(rx.wait_for(COUNT, DELIVERY_TIMEOUT), COUNT, "{rx}");
    assert!(
        !relay.stderr().contains("cannot give"),
        "the daemon could not chgrp:\n{}",
        relay.stderr()
    );
}

/// Pins and state are 0640/0750 root:mcrelay; a non-root member of the group reads `groups`,
/// `ports` and `stats`; a non-member gets exit status 2 and a message that says what to do.
#[test]
fn the_mcrelay_group_reads_groups_ports_and_stats() {
    require_testbed!("setpriv", "groupadd", "groupdel");
    let privileges = unit_privileges();
    let group = TempGroup::new("g");
    let star = Star::new("prg", 2);
    let _relay = start_like_the_unit(&star, &privileges, &group);
    let r = &star.hosts[1];
    let group_addr = addr("239.7.7.8");
    let _rx = McastReceiver::join(&r.ns, group_addr, PORT, &r.iface);
    wait_member(&star.gw, group_addr, &r.gw_port, DELIVERY_TIMEOUT);

    let ns_dir = pin_root_of(&star.gw);
    let pins = layout_dir(&ns_dir);
    let gid = group.gid;
    assert_mode(&ns_dir, 0o750, gid);
    assert_mode(&pins, 0o750, gid);
    for map in ["PORTS", "PORT_STATS", "GROUP_PORTS", "CONFIG"] {
        assert_mode(&pins.join(map), 0o640, gid);
    }
    let inode = std::fs::metadata(star.gw.path()).expect("netns inode").ino();
    for file in ["state.json", "lock"] {
        assert_mode(Path::new(&format!("/run/mcrelay/ns-{inode}.{file}")), 0o640, gid);
    }

    let doc = json_of(&mcrelay_as_user(&star, Some(&group), &["groups", "--json"]), "groups");
    assert_eq!(groups_of(&doc, group_addr), vec![r.gw_port.as_str()], "groups as a member: {doc}");
    let doc = json_of(&mcrelay_as_user(&star, Some(&group), &["ports", "--json"]), "ports");
    assert_eq!(doc["ports"].as_array().map(Vec::len), Some(2), "ports as a member: {doc}");
    let doc = json_of(&mcrelay_as_user(&star, Some(&group), &["stats", "--json"]), "stats");
    assert_eq!(doc["ports"].as_array().map(Vec::len), Some(2), "stats as a member: {doc}");

    for args in [&["groups", "--json"][..], &["ports"], &["stats"]] {
        let out = mcrelay_as_user(&star, None, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} as a non-member: {stderr}");
        assert!(
            stderr.contains("Permission denied")
                && stderr.contains("`mcrelay` group")
                && stderr.contains("sudo"),
            "{args:?} as a non-member should say to join the mcrelay group or use sudo: {stderr}"
        );
    }
}
