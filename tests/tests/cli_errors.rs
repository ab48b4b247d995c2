//! `mcrelay run` refuses what it cannot do: exit status 2, a message that names the problem, and
//! nothing left attached (no XDP program on any interface, no pins).

use std::process::Output;

use mcrelay_tests::{
    cmd::output_with_timeout,
    daemon::{leftover_pins, BinaryForNobody, ONE_SHOT_TIMEOUT},
    mcrelay_bin, mcrelay_output, require_testbed,
    topology::Star,
    Mcrelay, NetNs,
};

const PORT: &str = "gw0";
/// A device without native XDP.
const PLAIN: &str = "plain0";

/// A gateway namespace with one veth port ([`PORT`]) to a host namespace.
fn bed(tag: &str) -> Star {
    Star::new(tag, 1)
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
    let out = output_with_timeout(bin.command(&bed.gw, &["run", "-i", PORT]), ONE_SHOT_TIMEOUT);
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
