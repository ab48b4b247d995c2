//! mcrelay run the way users run programs in a namespace: `ip netns exec NS mcrelay ...`.
//!
//! `ip netns exec` gives every command a private mount namespace with a fresh /sys, where
//! /sys/fs/bpf is no bpffs. The daemon must still pin in the bpffs of the namespace the command
//! was run from (here: the test's), so that the pins outlive it and every later
//! `ip netns exec NS mcrelay ...` and `nsenter --net=/run/netns/NS mcrelay ...` sees them. The
//! lock and state files in /run/mcrelay are shared by all of them too (`ip netns exec` keeps
//! /run).

use std::{
    io::{BufRead as _, BufReader},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    cmd::{describe, output_with_timeout},
    daemon::{leftover_pins, pin_root_of, port_entry, ONE_SHOT_TIMEOUT},
    groups::{is_member, port_names},
    mcrelay_bin, port_counter, require_testbed,
    topology::Star,
    McastReceiver, McastSender, Mcrelay, NetNs,
};
use serde_json::Value;

const PORT: u16 = 5000;
const BPFFS: &str = "/sys/fs/bpf";

/// How a one-shot `mcrelay` command reaches the gateway's namespace.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `ip netns exec NS mcrelay ...`: private mount namespace, fresh /sys.
    IpNetnsExec,
    /// `nsenter --net=/run/netns/NS mcrelay ...`: the caller's mounts.
    Nsenter,
}

const BOTH: [Via; 2] = [Via::IpNetnsExec, Via::Nsenter];

fn mcrelay(via: Via, ns: &NetNs, args: &[&str]) -> Command {
    let mut cmd = match via {
        Via::IpNetnsExec => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name()]);
            cmd
        }
        Via::Nsenter => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", ns.path().display()));
            cmd
        }
    };
    cmd.arg(mcrelay_bin()).args(args);
    cmd
}

fn run(via: Via, ns: &NetNs, args: &[&str]) -> (String, Output) {
    let cmd = mcrelay(via, ns, args);
    (describe(&cmd), output_with_timeout(cmd, ONE_SHOT_TIMEOUT))
}

/// Runs `mcrelay ARGS` (`--json`) and parses its stdout; panics unless it exits 0.
fn json(via: Via, ns: &NetNs, args: &[&str]) -> Value {
    let (what, out) = run(via, ns, args);
    assert!(
        out.status.success(),
        "`{what}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("`{what}` printed invalid JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Runs `mcrelay ARGS`; panics if it succeeds; returns its stderr.
fn fails(via: Via, ns: &NetNs, args: &[&str]) -> String {
    let (what, out) = run(via, ns, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`{what}` succeeded:\n{}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

fn xdp_ports<'a>(ns: &NetNs, ports: &[&'a str]) -> Vec<&'a str> {
    ports.iter().copied().filter(|p| ns.xdp_attachment(p).is_some()).collect()
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Runs `ip netns exec NS mcrelay detach` when dropped (after the daemon guard, declared
/// later, has stopped the daemon), so that a failing test leaves no pins or XDP programs.
struct Detach<'a>(&'a NetNs);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let _ = mcrelay(Via::IpNetnsExec, self.0, &["detach"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The daemon started with `ip netns exec` pins in the test's (the host's) bpffs; every later
/// `ip netns exec` and `nsenter --net` command finds its pins, lock and state, while it runs and
/// after it exited, until `mcrelay detach` removes everything.
#[test]
fn ip_netns_exec_pins_outlive_the_daemon_and_every_command_sees_them() {
    require_testbed!("nsenter", "stat");
    let group = addr("239.31.0.1");
    let star = Star::new("nx", 2);
    let [s, r] = &star.hosts[..] else { unreachable!() };
    let gw = &star.gw;
    let ports = star.gw_ports();
    let _detach = Detach(gw);

    // The premise: a command run by `ip netns exec` has no bpffs at /sys/fs/bpf.
    let mut stat = Command::new("ip");
    stat.args(["netns", "exec", gw.name(), "stat", "-f", "-c", "%T", BPFFS]);
    let fs_type = String::from_utf8_lossy(&output_with_timeout(stat, ONE_SHOT_TIMEOUT).stdout)
        .trim()
        .to_owned();
    assert_ne!(
        fs_type, "bpf_fs",
        "`ip netns exec` kept the host's bpffs: this test proves nothing"
    );

    let statics = format!("{group}@{}", r.gw_port);
    let mut args = vec!["run"];
    for p in &ports {
        args.extend(["-i", p]);
    }
    args.extend(["--static", &statics]);
    let mut relay = Mcrelay::start_command(mcrelay(Via::IpNetnsExec, gw, &args));
    relay.wait_ready();
    assert!(
        relay.stderr().contains("of the mount namespace of"),
        "the daemon did not say which bpffs it uses:\n{}",
        relay.stderr()
    );
    // The pins are in the host's bpffs (the test's /sys/fs/bpf), not in a private one.
    assert!(
        !leftover_pins(gw).is_empty(),
        "no pins under {} in the host's bpffs; daemon stderr:\n{}",
        pin_root_of(gw).display(),
        relay.stderr()
    );

    // While it runs: both ways of entering the namespace see its ports, counters and state.
    for via in BOTH {
        let doc = json(via, gw, &["ports", "--json"]);
        assert_eq!(sorted(port_names(&doc)), ports, "{via:?} ports:\n{doc:#}");
        let doc = json(via, gw, &["stats", "--json"]);
        for p in &ports {
            assert!(port_entry(&doc, p).is_some(), "{via:?} stats without {p}:\n{doc:#}");
        }
        // `control` is only in the running daemon's state file (/run/mcrelay): shared.
        let doc = json(via, gw, &["groups", "--json"]);
        assert!(is_member(&doc, group, &r.gw_port), "{via:?} groups:\n{doc:#}");
        assert!(doc.get("control").is_some(), "{via:?} groups not from the state file:\n{doc:#}");
        // The lock (/run/mcrelay) is shared: detach refuses while the daemon runs.
        let stderr = fails(via, gw, &["detach"]);
        assert!(stderr.contains("running"), "{via:?} detach: {stderr}");
        assert!(!leftover_pins(gw).is_empty(), "{via:?} detach removed pins");
    }
    // `reload` finds the daemon's pid through the shared lock file.
    let (what, out) = run(Via::IpNetnsExec, gw, &["reload"]);
    assert!(out.status.success(), "`{what}`: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.stderr().contains("reloaded") {
        assert!(Instant::now() < deadline, "no reload after `{what}`:\n{}", relay.stderr());
        thread::sleep(Duration::from_millis(20));
    }

    let status = relay.stop();
    assert!(status.success(), "daemon exited with {status}:\n{}", relay.stderr());
    assert!(relay.stderr().contains("stay pinned"), "{}", relay.stderr());
    drop(relay);

    // After the daemon: links and maps stay (a private bpffs would have gone with it).
    assert!(!leftover_pins(gw).is_empty(), "the pins went with the daemon");
    assert_eq!(xdp_ports(gw, &ports), ports, "XDP went with the daemon");
    for via in BOTH {
        let doc = json(via, gw, &["ports", "--json"]);
        assert_eq!(sorted(port_names(&doc)), ports, "{via:?} ports after exit:\n{doc:#}");
        let doc = json(via, gw, &["groups", "--json"]);
        assert!(is_member(&doc, group, &r.gw_port), "{via:?} groups after exit:\n{doc:#}");
    }
    // ... and keep forwarding, counted in the pinned maps.
    let forwarded = |via| {
        port_counter(&json(via, gw, &["stats", "--json"]), &s.gw_port, "packets", "forwarded")
    };
    let before = forwarded(Via::IpNetnsExec);
    let rx = McastReceiver::join(&r.ns, group, PORT, &r.iface);
    McastSender::new(&s.ns, &s.iface).send_numbered(group, PORT, 50, Duration::from_millis(1));
    assert_eq!(rx.wait_for(50, Duration::from_secs(10)), 50, "{rx}: no forwarding after exit");
    for via in BOTH {
        let after = forwarded(via);
        assert!(after >= before + 50, "{via:?}: forwarded {before} -> {after}");
    }

    // `ip netns exec NS mcrelay detach` removes everything, wherever it is looked at.
    let (what, out) = run(Via::IpNetnsExec, gw, &["detach"]);
    assert!(out.status.success(), "`{what}`: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"), "{out:?}");
    assert_eq!(xdp_ports(gw, &ports), Vec::<&str>::new(), "detach left XDP attached");
    assert!(leftover_pins(gw).is_empty(), "detach left pins: {:?}", leftover_pins(gw));
    assert!(!pin_root_of(gw).exists(), "{} is still there", pin_root_of(gw).display());
    for via in BOTH {
        let stderr = fails(via, gw, &["ports", "--json"]);
        assert!(stderr.contains("does not exist"), "{via:?} ports after detach: {stderr}");
    }
}

/// A process in a private mount namespace without bpffs at /sys/fs/bpf (a host that has not
/// mounted one yet), killed when dropped (and when the test thread dies).
struct BareMountNs {
    child: Child,
}

impl BareMountNs {
    fn start() -> Self {
        let mut cmd = Command::new("unshare");
        // Private propagation: the umount stays in the new namespace.
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"]).arg(format!(
            "while umount {BPFFS} 2>/dev/null; do :; done; echo ready; exec sleep 600"
        ));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        // SAFETY: prctl(2) is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("`{}`: {e}", describe(&cmd)));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        let holder = Self { child };
        assert_eq!(line.trim(), "ready", "`{}` did not start", describe(&cmd));
        holder
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its /sys/fs/bpf, seen from here.
    fn bpffs(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{BPFFS}", self.pid()))
    }
}

impl Drop for BareMountNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dev_of(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).dev()
}

/// Where the namespace `ip netns exec` was run from has no bpffs, the daemon mounts one there:
/// from a thread that entered that mount namespace (mount(2) cannot reach into another one),
/// leaving the caller's own mounts alone, and only once.
#[test]
fn bpffs_is_mounted_in_another_mount_namespace() {
    require_testbed!("unshare");
    mcrelay_tests::daemon::ensure_bpffs();
    let host_dev = dev_of(Path::new(BPFFS));
    let bare = BareMountNs::start();
    assert!(is_bpffs(Path::new(BPFFS)), "the host lost its bpffs");
    assert!(!is_bpffs(&bare.bpffs()), "{} is still a bpffs", bare.bpffs().display());

    relay::bpffs::mount_in_namespace_of(bare.pid()).expect("mounting bpffs there");
    assert!(is_bpffs(&bare.bpffs()), "{} is no bpffs", bare.bpffs().display());
    let dev = dev_of(&bare.bpffs());
    assert_ne!(dev, host_dev, "that is the host's bpffs, not a new mount");
    assert!(is_bpffs(Path::new(BPFFS)), "the host lost its bpffs");
    assert_eq!(dev_of(Path::new(BPFFS)), host_dev, "the host's /sys/fs/bpf changed");

    // Once only: a second call finds it mounted and stacks nothing on top.
    relay::bpffs::mount_in_namespace_of(bare.pid()).expect("second call");
    assert_eq!(dev_of(&bare.bpffs()), dev, "mounted a second time");
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", bare.pid())).expect("mountinfo");
    let mounts = mountinfo.lines().filter(|l| l.split(' ').nth(4) == Some(BPFFS)).count();
    assert_eq!(mounts, 1, "{mountinfo}");
}
