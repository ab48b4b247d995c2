//! `mcrelay run` refuses what it cannot do: exit status 2, a message that names the problem, and
//! nothing left attached (no XDP program on any interface, no pins).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Output,
};

use mcrelay_tests::{
    cmd::output_with_timeout,
    daemon::{leftover_pins, ONE_SHOT_TIMEOUT},
    mcrelay_bin, mcrelay_output, require_testbed, veth_pair, Mcrelay, NetNs,
};

/// A gateway namespace with one veth port (`gw0`) to a host namespace.
struct Bed {
    gw: NetNs,
    _host: NetNs,
}

const PORT: &str = "gw0";
/// A device without native XDP.
const PLAIN: &str = "plain0";

fn bed(tag: &str) -> Bed {
    let gw = NetNs::new(&format!("mcr{tag}-gw"));
    let host = NetNs::new(&format!("mcr{tag}-h"));
    veth_pair(&gw, PORT, &host, "eth0");
    host.gro_on("eth0");
    Bed { gw, _host: host }
}

/// Asserts exit status 2 and a non-empty, non-panic message on stderr; returns stderr.
fn expect_usage_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: expected exit status 2, got {}; stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.trim().is_empty(), "{what}: exit 2 without any message");
    assert!(!stderr.contains("panicked"), "{what}: mcrelay panicked:\n{stderr}");
    stderr
}

fn expect_mentions(stderr: &str, needle: &str, what: &str) {
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: the message should mention {needle:?}; stderr:\n{stderr}"
    );
}

/// No XDP program on any of `ifaces` and no pins of this namespace's instance.
fn expect_nothing_attached(ns: &NetNs, ifaces: &[&str], what: &str) {
    for iface in ifaces {
        if let Some(xdp) = ns.xdp_attachment(iface) {
            panic!("{what}: {iface} still has an XDP program attached: {xdp}");
        }
    }
    let pins = leftover_pins(ns);
    assert!(pins.is_empty(), "{what}: pins left behind: {pins:?}");
}

#[test]
fn unknown_interface_exits_2() {
    require_testbed!();
    let bed = bed("ui");
    let what = "run -i gw0 -i nosuch0";
    let out = mcrelay_output(&bed.gw, &["run", "-i", PORT, "-i", "nosuch0"]);
    let stderr = expect_usage_error(&out, what);
    expect_mentions(&stderr, "nosuch0", what);
    expect_nothing_attached(&bed.gw, &[PORT], what);
}

#[test]
fn invalid_group_exits_2() {
    require_testbed!();
    let bed = bed("ig");
    let what = "--static nonsense@gw0";
    let out = mcrelay_output(&bed.gw, &["run", "-i", PORT, "--static", "nonsense@gw0"]);
    let stderr = expect_usage_error(&out, what);
    expect_mentions(&stderr, "nonsense", what);
    expect_nothing_attached(&bed.gw, &[PORT], what);
}

#[test]
fn unicast_group_exits_2() {
    require_testbed!();
    let bed = bed("uc");
    let what = "--static 10.1.1.1@gw0";
    let out = mcrelay_output(&bed.gw, &["run", "-i", PORT, "--static", "10.1.1.1@gw0"]);
    let stderr = expect_usage_error(&out, what);
    expect_mentions(&stderr, "10.1.1.1", what);
    expect_mentions(&stderr, "multicast", what);
    expect_nothing_attached(&bed.gw, &[PORT], what);
}

#[test]
fn unprivileged_user_exits_2() {
    require_testbed!("setpriv");
    let bed = bed("up");
    let bin = BinaryForNobody::new(&mcrelay_bin());
    let what = "run as uid 65534 without capabilities";
    let mut cmd = bed.gw.command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(bin.path())
        .args(["run", "-i", PORT]);
    let out = output_with_timeout(cmd, ONE_SHOT_TIMEOUT);
    let stderr = expect_usage_error(&out, what);
    let lower = stderr.to_lowercase();
    assert!(
        ["permission", "privilege", "root", "cap_"].iter().any(|w| lower.contains(w)),
        "{what}: the message should say that privileges are missing; stderr:\n{stderr}"
    );
    expect_nothing_attached(&bed.gw, &[PORT], what);
}

/// `-i gw0 -i plain0 --xdp-mode native`: the veth attaches natively, the plain device (dummy, or
/// ifb on kernels without the dummy driver) cannot, and the veth's attachment is rolled back.
#[test]
fn failed_native_attach_is_rolled_back() {
    require_testbed!();
    let bed = bed("rb");
    let kind = bed.gw.add_plain_device(PLAIN);

    // Control: the veth alone attaches natively, and the check below does see it.
    {
        let mut relay =
            Mcrelay::start(&bed.gw, &["run", "--no-pin", "-i", PORT, "--xdp-mode", "native"]);
        relay.wait_ready();
        assert!(
            bed.gw.xdp_attachment(PORT).is_some(),
            "control run: mcrelay is ready but no XDP program shows on {PORT}"
        );
        let status = relay.stop();
        assert!(status.success(), "control run exited with {status}:\n{}", relay.stderr());
        expect_nothing_attached(&bed.gw, &[PORT], "after the control run");
    }

    let what = format!("run -i {PORT} -i {PLAIN} ({kind}) --xdp-mode native");
    let out = mcrelay_output(&bed.gw, &["run", "-i", PORT, "-i", PLAIN, "--xdp-mode", "native"]);
    let stderr = expect_usage_error(&out, &what);
    expect_mentions(&stderr, PLAIN, &what);
    expect_nothing_attached(&bed.gw, &[PORT, PLAIN], &what);
}

/// The mcrelay binary at a path that uid 65534 can execute: the original if every directory
/// above it is searchable by others, else a copy in a private temporary directory.
struct BinaryForNobody {
    path: PathBuf,
    copy_dir: Option<PathBuf>,
}

impl BinaryForNobody {
    fn new(bin: &Path) -> Self {
        let reachable =
            bin.ancestors().skip(1).all(|dir| {
                std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
            }) && std::fs::metadata(bin).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
        if reachable {
            return Self { path: bin.to_path_buf(), copy_dir: None };
        }
        let dir = std::env::temp_dir().join(format!("mcrelay-nobody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join("mcrelay");
        std::fs::copy(bin, &path).unwrap_or_else(|e| panic!("copying {}: {e}", bin.display()));
        for (p, mode) in [(&dir, 0o755), (&path, 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        }
        Self { path, copy_dir: Some(dir) }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BinaryForNobody {
    fn drop(&mut self) {
        if let Some(dir) = &self.copy_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
