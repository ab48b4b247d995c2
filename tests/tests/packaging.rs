//! Packaging and operations: the systemd unit passes `systemd-analyze verify`, `cargo xtask
//! install` lays out every file (idempotently, never overwriting a configuration, writing nothing
//! with `--dry-run`), and the Prometheus endpoint reports a running daemon's ports.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, SystemTime},
};

use mcrelay_tests::{
    cmd::output_with_timeout, daemon::PIN_ROOT, find_program, mcrelay_bin, mcrelay_output,
    require_testbed, topology::Star, workspace_root, McastSender, Mcrelay,
};

/// The unit as shipped.
const UNIT: &str = "packaging/mcrelay.service";
/// How long `cargo xtask install` may take (a release build from scratch).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(1200);
/// How long `systemd-analyze verify` may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("mcrelay-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `systemd-analyze`, or `None` after printing why the test is skipped (fails under CI).
fn systemd_analyze() -> Option<PathBuf> {
    let found = find_program("systemd-analyze");
    if found.is_none() {
        mcrelay_tests::skip_or_fail(
            "systemd-analyze not found (Debian package `systemd`; `cargo xtask setup` installs it)",
        );
    }
    found
}

/// Runs `systemd-analyze verify UNIT` with `man_dir` on MANPATH (verify checks that the
/// `Documentation=man:mcrelay(1)` page exists); panics with its output on any complaint about
/// the unit.
fn verify_unit(analyze: &Path, unit: &Path, man_dir: &Path) {
    let mut cmd = Command::new(analyze);
    cmd.arg("verify").arg(unit).env("MANPATH", man_dir).env("SYSTEMD_LOG_COLOR", "0");
    let out = output_with_timeout(cmd, VERIFY_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about other units of this host are not ours to fix.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("mcrelay")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {} ({}):\n{stderr}",
        unit.display(),
        out.status
    );
}

/// Writes `mcrelay man` of `bin` to `dir/man1/mcrelay.1`.
fn write_man_page(bin: &Path, dir: &Path) {
    let out = output_with_timeout(
        {
            let mut cmd = Command::new(bin);
            cmd.arg("man");
            cmd
        },
        VERIFY_TIMEOUT,
    );
    assert!(out.status.success(), "mcrelay man failed: {}", String::from_utf8_lossy(&out.stderr));
    let page = dir.join("man1/mcrelay.1");
    std::fs::create_dir_all(dir.join("man1")).unwrap_or_else(|e| panic!("mkdir man1: {e}"));
    std::fs::write(&page, &out.stdout)
        .unwrap_or_else(|e| panic!("writing {}: {e}", page.display()));
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else { return };
    let bin = mcrelay_bin();
    let dir = TempDir::new("unit");
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let shipped = std::fs::read_to_string(workspace_root().join(UNIT))
        .unwrap_or_else(|e| panic!("reading {UNIT}: {e}"));
    assert!(
        shipped.contains("ExecStart=/usr/local/bin/mcrelay run --config /etc/mcrelay/mcrelay.toml")
    );
    let unit = dir.path().join("mcrelay.service");
    std::fs::write(&unit, shipped.replace("/usr/local/bin/mcrelay", &bin.display().to_string()))
        .unwrap_or_else(|e| panic!("writing {}: {e}", unit.display()));
    let man = dir.path().join("man");
    write_man_page(&bin, &man);
    verify_unit(&analyze, &unit, &man);

    // And verify does catch a broken unit (so the check above means something).
    let broken = dir.path().join("broken/mcrelay.service");
    std::fs::create_dir_all(dir.path().join("broken")).unwrap_or_else(|e| panic!("mkdir: {e}"));
    std::fs::write(&broken, shipped.replace("/usr/local/bin/mcrelay", "/nonexistent/mcrelay"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", broken.display()));
    let mut cmd = Command::new(&analyze);
    cmd.arg("verify").arg(&broken).env("MANPATH", &man);
    let out = output_with_timeout(cmd, VERIFY_TIMEOUT);
    assert!(!out.status.success(), "systemd-analyze verify accepted a missing ExecStart binary");
}

/// `cargo xtask install ARGS` from the workspace root.
fn xtask_install(args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args(["xtask", "install"]).args(args);
    let out = output_with_timeout(cmd, INSTALL_TIMEOUT);
    assert!(
        out.status.success(),
        "cargo xtask install {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every file an install under `prefix` must create (the configuration separately).
fn installed_files(prefix: &Path) -> Vec<PathBuf> {
    [
        "bin/mcrelay",
        "lib/systemd/system/mcrelay.service",
        "share/man/man1/mcrelay.1",
        "share/bash-completion/completions/mcrelay",
        "share/zsh/site-functions/_mcrelay",
        "share/fish/vendor_completions.d/mcrelay.fish",
    ]
    .iter()
    .map(|p| prefix.join(p))
    .collect()
}

/// Path -> (modification time, content) of every file under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, SystemTime, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, SystemTime, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                let modified =
                    entry.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                let content = std::fs::read(&path).unwrap_or_default();
                out.push((path, modified, content));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn xtask_install_into_a_prefix() {
    let dir = TempDir::new("install");
    let prefix = dir.path().join("root");
    let prefix_str = prefix.display().to_string();

    // --dry-run on a prefix that does not exist yet: prints the plan, creates nothing.
    let out = xtask_install(&["--prefix", &prefix_str, "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("would install"), "dry run printed no plan:\n{stdout}");
    assert!(!prefix.exists(), "--dry-run created {}", prefix.display());

    // A real install.
    xtask_install(&["--prefix", &prefix_str]);
    for file in installed_files(&prefix) {
        assert!(file.is_file(), "{} was not installed", file.display());
        assert!(std::fs::metadata(&file).is_ok_and(|m| m.len() > 0), "{} is empty", file.display());
    }
    let binary = prefix.join("bin/mcrelay");
    let mode = std::fs::metadata(&binary).map(|m| m.permissions().mode()).unwrap_or(0);
    assert_eq!(mode & 0o755, 0o755, "{} is not executable ({mode:o})", binary.display());
    let version =
        Command::new(&binary).arg("--version").output().expect("running mcrelay --version");
    assert!(version.status.success(), "{} --version failed", binary.display());
    let unit_path = prefix.join("lib/systemd/system/mcrelay.service");
    let unit = std::fs::read_to_string(&unit_path).expect("reading the installed unit");
    let exec_start = format!(
        "ExecStart={prefix_str}/bin/mcrelay run --config {prefix_str}/etc/mcrelay/mcrelay.toml"
    );
    assert!(unit.contains(&exec_start), "the installed unit should say {exec_start:?}:\n{unit}");
    let config = prefix.join("etc/mcrelay/mcrelay.toml");
    let shipped_config = workspace_root().join("packaging/mcrelay.toml");
    if shipped_config.is_file() {
        assert_eq!(
            std::fs::read(&config).ok(),
            std::fs::read(&shipped_config).ok(),
            "{} should be a copy of packaging/mcrelay.toml",
            config.display()
        );
    } else {
        eprintln!("note: packaging/mcrelay.toml does not exist yet; no default config to install");
    }
    // The installed unit, as installed, passes verify (binary and man page under the prefix).
    if let Some(analyze) = systemd_analyze() {
        verify_unit(&analyze, &unit_path, &prefix.join("share/man"));
    }

    // A locally changed configuration survives a second install, which changes nothing else.
    std::fs::create_dir_all(config.parent().expect("config dir")).expect("mkdir etc/mcrelay");
    let local = b"# changed by the administrator\n";
    std::fs::write(&config, local).expect("writing a local config");
    let before = snapshot(&prefix);
    std::thread::sleep(Duration::from_millis(20));
    xtask_install(&["--prefix", &prefix_str]);
    assert_eq!(std::fs::read(&config).ok().as_deref(), Some(&local[..]), "config overwritten");
    let after = snapshot(&prefix);
    assert_eq!(
        before.iter().map(|f| &f.0).collect::<Vec<_>>(),
        after.iter().map(|f| &f.0).collect::<Vec<_>>(),
        "a second install must install the same files"
    );
    // A file whose content did not change must not have been rewritten. (Content itself may
    // change when the sources changed between the two builds.)
    for (old, new) in before.iter().zip(&after) {
        if old.2 == new.2 {
            assert_eq!(old.1, new.1, "{} was rewritten with the same content", old.0.display());
        }
    }

    // --dry-run on the installed prefix changes nothing either.
    let out = xtask_install(&["--prefix", &prefix_str, "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("would keep the existing configuration") || !shipped_config.is_file(),
        "{stdout}"
    );
    assert_eq!(
        snapshot(&prefix).iter().map(|f| (&f.0, f.1)).collect::<Vec<_>>(),
        after.iter().map(|f| (&f.0, f.1)).collect::<Vec<_>>(),
        "--dry-run changed files"
    );
}

/// `GET path` over HTTP/1.0 with a plain socket; returns (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("sending the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The value of the sample `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_endpoint_reports_the_daemons_ports() {
    require_testbed!();
    let star = Star::new("met", 2);
    let group: IpAddr = "239.7.7.7".parse().expect("group");
    let statics = format!("{group}@gw1");
    let mut args = vec!["run".to_owned()];
    args.extend(star.iface_args());
    args.extend(["--static".to_owned(), statics]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = Mcrelay::start(&star.gw, &args);
    relay.wait_ready();

    // Traffic from host 0 to the static group: forwarded on gw0.
    let sender = McastSender::new(&star.hosts[0].ns, &star.hosts[0].iface);
    sender.send_numbered(group, 5000, 20, Duration::from_millis(1));

    // The endpoint, run in-process in the gateway's namespace against the daemon's pins.
    let (status, text, missing) = star.gw.in_netns(|| {
        let endpoint = relay::metrics::Background::spawn(
            "127.0.0.1:0".parse().expect("address"),
            Path::new(PIN_ROOT),
        )
        .expect("starting the metrics endpoint");
        let addr = endpoint.local_addr();
        let (missing, _) = http_get(addr, "/nonexistent");
        // Counters may lag a scrape behind the last frames: retry until forwarded shows.
        let mut last = (String::new(), String::new());
        for _ in 0..50 {
            last = http_get(addr, "/metrics");
            let forwarded =
                sample(&last.1, r#"mcrelay_port_packets_total{iface="gw0",reason="forwarded"}"#);
            if forwarded.is_some_and(|n| n >= 20.0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (last.0, last.1, missing)
    });
    assert!(missing.contains(" 404 "), "GET /nonexistent: {missing}");
    assert!(status.contains(" 200 "), "GET /metrics: {status}\n{text}");
    let ctx = || format!("metrics:\n{text}\n--- daemon stderr ---\n{}", relay.stderr());
    assert_eq!(sample(&text, "mcrelay_dataplane_up"), Some(1.0), "{}", ctx());
    assert!(
        text.lines().any(|l| l.starts_with("mcrelay_build_info{version=\"") && l.ends_with(" 1")),
        "{}",
        ctx()
    );
    for port in ["gw0", "gw1"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("mcrelay_port_info{{iface=\"{port}\""))
                && l.contains("mode=\"")),
            "no mcrelay_port_info for {port}; {}",
            ctx()
        );
        for reason in ["forwarded", "drop_no_members", "malformed"] {
            let series =
                format!("mcrelay_port_packets_total{{iface=\"{port}\",reason=\"{reason}\"}}");
            assert!(sample(&text, &series).is_some(), "no {series}; {}", ctx());
        }
    }
    let forwarded = sample(&text, r#"mcrelay_port_packets_total{iface="gw0",reason="forwarded"}"#)
        .unwrap_or_default();
    assert!(forwarded >= 20.0, "expected >= 20 forwarded on gw0, got {forwarded}; {}", ctx());
    let bytes = sample(&text, r#"mcrelay_port_bytes_total{iface="gw0",reason="forwarded"}"#)
        .unwrap_or_default();
    assert!(bytes >= forwarded * 42.0, "forwarded bytes {bytes} for {forwarded} frames; {}", ctx());
    // The state file: the static group with its one port, queriers per port.
    if sample(&text, "mcrelay_control_up") == Some(1.0) {
        let ports =
            sample(&text, &format!("mcrelay_group_ports{{group=\"{group}\",kind=\"static\"}}"));
        assert!(ports.is_some_and(|n| n >= 1.0), "static group without ports; {}", ctx());
        assert!(
            sample(&text, r#"mcrelay_groups{kind="static"}"#).is_some_and(|n| n >= 1.0),
            "{}",
            ctx()
        );
        assert!(text.contains("mcrelay_querier_is_self{port=\"gw"), "{}", ctx());
    } else {
        panic!("the daemon's state file was not readable; {}", ctx());
    }

    let status = relay.stop();
    assert!(status.success(), "mcrelay exited with {status}:\n{}", relay.stderr());
    // Links and maps may stay pinned for a hitless restart: remove them.
    let out = mcrelay_output(&star.gw, &["detach"]);
    assert!(out.status.success(), "mcrelay detach: {}", String::from_utf8_lossy(&out.stderr));
}
