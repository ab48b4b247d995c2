//! `mcrelay doctor`: each check is tested by creating its problem in a fresh network namespace
//! and running the real binary there (network namespace only), then, where the fix is a
//! command, applying the fix doctor printed and checking that the finding is gone.
//!
//! Nothing here sends traffic; the only daemons started (`mcrelay run`, for the XDP checks) run
//! inside namespaces the test created, under guards.

use std::process::Output;

use mcrelay_tests::{
    cmd::output_with_timeout,
    daemon::{BinaryForNobody, ONE_SHOT_TIMEOUT},
    find_program, mcrelay_bin, mcrelay_output, require_testbed,
    serde_json::Value,
    topology::Star,
    veth_pair, Mcrelay, NetNs,
};

/// Every check id doctor reports, in order.
const CHECK_IDS: [&str; 9] = [
    "multicast_route",
    "multicast_route_v6",
    "rp_filter",
    "multicast_flag",
    "forced_versions",
    "firewall",
    "bridge_querier",
    "xdp_mode",
    "veth",
];

/// The result of one `mcrelay doctor --json` run.
struct Report {
    code: i32,
    doc: Value,
    what: String,
}

impl Report {
    fn check(&self, id: &str) -> &Value {
        self.doc
            .get("checks")
            .and_then(Value::as_array)
            .and_then(|checks| {
                checks.iter().find(|c| c.get("id").and_then(Value::as_str) == Some(id))
            })
            .unwrap_or_else(|| panic!("{}: no check {id:?} in:\n{}", self.what, self.pretty()))
    }

    fn status(&self, id: &str) -> String {
        self.check(id).get("status").and_then(Value::as_str).unwrap_or("").to_owned()
    }

    fn fix(&self, id: &str) -> String {
        self.check(id).get("fix").and_then(Value::as_str).unwrap_or("").to_owned()
    }

    fn summary(&self, id: &str) -> String {
        self.check(id).get("summary").and_then(Value::as_str).unwrap_or("").to_owned()
    }

    fn pretty(&self) -> String {
        mcrelay_tests::serde_json::to_string_pretty(&self.doc).unwrap_or_default()
    }

    /// Asserts the status of check `id`.
    fn expect_status(&self, id: &str, status: &str) {
        assert_eq!(
            self.status(id),
            status,
            "{}: check {id} should be {status}; report:\n{}",
            self.what,
            self.pretty()
        );
    }

    /// Asserts that the fix of check `id` contains `needle`.
    fn expect_fix(&self, id: &str, needle: &str) {
        let fix = self.fix(id);
        assert!(
            fix.contains(needle),
            "{}: the fix of {id} should contain {needle:?}, is {fix:?}; report:\n{}",
            self.what,
            self.pretty()
        );
    }

    /// Asserts exit status 3 and problem status for `id`.
    fn expect_problem(&self, id: &str) {
        self.expect_status(id, "problem");
        assert_eq!(
            self.code,
            3,
            "{}: problems found, so exit 3; report:\n{}",
            self.what,
            self.pretty()
        );
        let problems = self.doc.get("problems").and_then(Value::as_u64).unwrap_or(0);
        assert!(problems >= 1, "{}: \"problems\" should count it:\n{}", self.what, self.pretty());
    }
}

/// Runs `mcrelay doctor --json ARGS` in `ns`; asserts exit 0 or 3 and valid JSON with every check.
fn doctor(ns: &NetNs, args: &[&str]) -> Report {
    let mut argv = vec!["doctor", "--json"];
    argv.extend_from_slice(args);
    let what = format!("`mcrelay {}` in {ns}", argv.join(" "));
    let out = mcrelay_output(ns, &argv);
    parse_report(&out, what)
}

fn parse_report(out: &Output, what: String) -> Report {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{what}: exit status should be 0 or 3, is {}; stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{what}: mcrelay panicked:\n{stderr}");
    let doc: Value = mcrelay_tests::serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{what}: invalid JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    });
    let report = Report { code, doc, what };
    for id in CHECK_IDS {
        let status = report.status(id);
        assert!(
            ["ok", "warn", "problem", "skip"].contains(&status.as_str()),
            "{}: check {id} has status {status:?}",
            report.what
        );
    }
    let any_problem = CHECK_IDS.iter().any(|id| report.status(id) == "problem");
    assert_eq!(
        report.code == 3,
        any_problem,
        "{}: exit 3 exactly when a check has a problem:\n{}",
        report.what,
        report.pretty()
    );
    report
}

/// Runs a fix command doctor printed (`ip ...`, `sysctl -w ...`, `ethtool ...`, `nft ...`) in
/// `ns`.
fn apply_fix(ns: &NetNs, fix: &str) {
    for command in fix.split("; ") {
        let argv: Vec<&str> = command.split_whitespace().collect();
        assert!(!argv.is_empty(), "empty fix command in {fix:?}");
        ns.exec(&argv);
    }
}

/// A namespace with one veth (`phys0`, standing in for the physical NIC) to a peer namespace,
/// with an address and a default route through it, as on a VPN client.
struct Client {
    ns: NetNs,
    _peer: NetNs,
}

fn client(tag: &str) -> Client {
    let ns = NetNs::new(&format!("mcrd{tag}-c"));
    let peer = NetNs::new(&format!("mcrd{tag}-p"));
    veth_pair(&ns, "phys0", &peer, "lan0");
    ns.add_addr("phys0", "198.18.7.2/24");
    ns.ip(&["route", "add", "default", "via", "198.18.7.1"]);
    Client { ns, _peer: peer }
}

#[test]
fn clean_namespace_has_no_problem() {
    require_testbed!();
    let c = client("ok");
    let report = doctor(&c.ns, &[]);
    assert_eq!(report.code, 0, "a clean namespace: exit 0; report:\n{}", report.pretty());
    report.expect_status("multicast_route", "ok");
    report.expect_status("multicast_flag", "ok");
    report.expect_status("bridge_querier", "ok");
    report.expect_status("xdp_mode", "ok");
    // The text form: one line per check, starting with its status.
    let out = mcrelay_output(&c.ns, &["doctor"]);
    assert_eq!(out.status.code(), Some(0), "text run: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for id in CHECK_IDS {
        assert!(
            text.lines().any(|l| {
                let mut words = l.split_whitespace();
                matches!(words.next(), Some("OK" | "WARN" | "PROBLEM" | "SKIP"))
                    && words.next() == Some(&format!("{id}:"))
            }),
            "text output has no status line for {id}:\n{text}"
        );
    }
}

#[test]
fn unknown_iface_is_a_usage_error() {
    require_testbed!();
    let c = client("ui");
    let out = mcrelay_output(&c.ns, &["doctor", "--iface", "nosuch0"]);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch0"));
}

/// The story: 224.0.0.0/4 points at the physical NIC while the VPN's tap0 exists.
#[test]
fn multicast_route_to_the_nic_instead_of_the_vpn() {
    require_testbed!();
    let c = client("rt");
    let ns = &c.ns;
    ns.ip(&["tuntap", "add", "tap0", "mode", "tap"]);
    ns.link_up("tap0");
    ns.add_addr("tap0", "198.18.8.2/24");
    ns.ip(&["route", "add", "224.0.0.0/4", "dev", "phys0"]);

    let report = doctor(ns, &["--iface", "tap0"]);
    report.expect_problem("multicast_route");
    report.expect_fix("multicast_route", "ip route replace 224.0.0.0/4 dev tap0");
    assert!(report.summary("multicast_route").contains("phys0"), "{}", report.pretty());
    // IPv6: the kernel's ff00::/8 of phys0 in the local table wins (tap0 has no carrier).
    report.expect_problem("multicast_route_v6");
    report.expect_fix("multicast_route_v6", "ff00::/8 dev tap0 table local");

    // Without --iface: a warning naming the VPN interface.
    let report = doctor(ns, &[]);
    report.expect_status("multicast_route", "warn");
    assert!(report.summary("multicast_route").contains("tap0"), "{}", report.pretty());

    // The printed fixes work.
    let report = doctor(ns, &["--iface", "tap0"]);
    apply_fix(ns, &report.fix("multicast_route"));
    apply_fix(ns, &report.fix("multicast_route_v6"));
    let report = doctor(ns, &["--iface", "tap0"]);
    report.expect_status("multicast_route", "ok");
    report.expect_status("multicast_route_v6", "ok");

    // A gateway on the multicast route: frames would go to the gateway's unicast MAC.
    ns.ip(&["route", "replace", "224.0.0.0/4", "via", "198.18.8.1", "dev", "tap0", "onlink"]);
    let report = doctor(ns, &["--iface", "tap0"]);
    report.expect_problem("multicast_route");
    assert!(report.summary("multicast_route").contains("gateway"), "{}", report.pretty());
    apply_fix(ns, &report.fix("multicast_route"));
    doctor(ns, &["--iface", "tap0"]).expect_status("multicast_route", "ok");
}

#[test]
fn strict_rp_filter_warns() {
    require_testbed!();
    let c = client("rp");
    c.ns.sysctl("net/ipv4/conf/phys0/rp_filter", "1");
    let report = doctor(&c.ns, &[]);
    report.expect_status("rp_filter", "warn");
    report.expect_fix("rp_filter", "sysctl -w net.ipv4.conf.phys0.rp_filter=2");
    apply_fix(&c.ns, &report.fix("rp_filter"));
    doctor(&c.ns, &[]).expect_status("rp_filter", "ok");
    // Strict through `all` (the kernel uses the maximum of `all` and the interface's).
    c.ns.sysctl("net/ipv4/conf/phys0/rp_filter", "0");
    c.ns.sysctl("net/ipv4/conf/all/rp_filter", "1");
    let report = doctor(&c.ns, &["--iface", "phys0"]);
    report.expect_status("rp_filter", "warn");
    report.expect_fix("rp_filter", "sysctl -w net.ipv4.conf.all.rp_filter=2");
}

#[test]
fn interface_without_multicast_flag() {
    require_testbed!();
    let c = client("mf");
    c.ns.ip(&["link", "set", "phys0", "multicast", "off"]);
    let report = doctor(&c.ns, &[]);
    report.expect_problem("multicast_flag");
    report.expect_fix("multicast_flag", "ip link set dev phys0 multicast on");
    apply_fix(&c.ns, &report.fix("multicast_flag"));
    doctor(&c.ns, &[]).expect_status("multicast_flag", "ok");
}

#[test]
fn forced_igmp_and_mld_versions_differ() {
    require_testbed!();
    let c = client("fv");
    let other = NetNs::new("mcrdfv-o");
    veth_pair(&c.ns, "lan1", &other, "eth0");
    doctor(&c.ns, &[]).expect_status("forced_versions", "ok");

    c.ns.sysctl("net/ipv4/conf/phys0/force_igmp_version", "2");
    let report = doctor(&c.ns, &[]);
    report.expect_status("forced_versions", "warn");
    let summary = report.summary("forced_versions");
    assert!(summary.contains("phys0") && summary.contains("lan1"), "{}", report.pretty());
    report.expect_fix("forced_versions", "sysctl -w net.ipv4.conf.phys0.force_igmp_version=0");
    apply_fix(&c.ns, &report.fix("forced_versions"));
    doctor(&c.ns, &[]).expect_status("forced_versions", "ok");

    c.ns.sysctl("net/ipv6/conf/lan1/force_mld_version", "1");
    let report = doctor(&c.ns, &[]);
    report.expect_status("forced_versions", "warn");
    assert!(report.summary("forced_versions").contains("MLD"), "{}", report.pretty());
    report.expect_fix("forced_versions", "sysctl -w net.ipv6.conf.lan1.force_mld_version=0");
}

#[test]
fn bridge_snooping_without_querier() {
    require_testbed!();
    let c = client("br");
    c.ns.ip(&["link", "add", "br7", "type", "bridge", "mcast_snooping", "1", "mcast_querier", "0"]);
    c.ns.link_up("br7");
    let report = doctor(&c.ns, &[]);
    report.expect_problem("bridge_querier");
    report.expect_fix("bridge_querier", "ip link set dev br7 type bridge mcast_querier 1");
    apply_fix(&c.ns, &report.fix("bridge_querier"));
    doctor(&c.ns, &[]).expect_status("bridge_querier", "ok");
    // Snooping off floods, which is not this check's concern.
    c.ns.ip(&["link", "set", "br7", "type", "bridge", "mcast_querier", "0", "mcast_snooping", "0"]);
    doctor(&c.ns, &[]).expect_status("bridge_querier", "ok");
}

#[test]
fn firewall_rule_dropping_igmp() {
    require_testbed!();
    if find_program("nft").is_none() {
        eprintln!("SKIPPED: `nft` is not installed (apt-get install nftables)");
        return;
    }
    let c = client("fw");
    doctor(&c.ns, &[]).expect_status("firewall", "ok");
    c.ns.exec(&["nft", "add", "table", "inet", "mcrdtest"]);
    c.ns.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "mcrdtest",
        "input",
        "{ type filter hook input priority 0 ; policy accept ; }",
    ]);
    c.ns.exec(&[
        "nft", "add", "rule", "inet", "mcrdtest", "input", "ip", "protocol", "igmp", "drop",
    ]);
    let report = doctor(&c.ns, &[]);
    report.expect_problem("firewall");
    report.expect_fix("firewall", "nft delete rule inet mcrdtest input handle");
    assert!(report.summary("firewall").contains("IGMP"), "{}", report.pretty());
    apply_fix(&c.ns, &report.fix("firewall"));
    doctor(&c.ns, &[]).expect_status("firewall", "ok");

    // Multicast destinations and MLD.
    c.ns.exec(&[
        "nft", "add", "rule", "inet", "mcrdtest", "input", "ip6", "daddr", "ff00::/8", "reject",
    ]);
    let report = doctor(&c.ns, &[]);
    report.expect_problem("firewall");
    assert!(report.summary("firewall").contains("IPv6 multicast"), "{}", report.pretty());
}

#[test]
fn iptables_rule_dropping_multicast() {
    require_testbed!();
    if find_program("iptables").is_none() {
        eprintln!("SKIPPED: `iptables` is not installed (apt-get install iptables)");
        return;
    }
    let c = client("ipt");
    c.ns.exec(&["iptables", "-A", "INPUT", "-d", "224.0.0.0/4", "-j", "DROP"]);
    let report = doctor(&c.ns, &[]);
    report.expect_problem("firewall");
    assert!(report.summary("firewall").contains("IPv4 multicast"), "{}", report.pretty());
    // Through nft (iptables-nft) or iptables-save: either way a command that removes it.
    let fix = report.fix("firewall");
    assert!(
        fix.contains("nft delete rule") || fix.contains("iptables -t filter -D INPUT"),
        "{}",
        report.pretty()
    );
}

/// A gateway namespace with a veth port `gw0` to a host namespace whose end has GRO on.
fn gateway(tag: &str) -> Star {
    Star::new(&format!("d{tag}"), 1)
}

#[test]
fn xdp_in_generic_mode_on_a_veth() {
    require_testbed!();
    let g = gateway("xg");
    let mut relay = Mcrelay::start(&g.gw, &["run", "-i", "gw0", "--xdp-mode", "skb"]);
    relay.wait_ready();
    let report = doctor(&g.gw, &[]);
    report.expect_status("xdp_mode", "warn");
    report.expect_fix("xdp_mode", "mcrelay run -i gw0 --xdp-mode native");
    // The peer is in another namespace: said, not failed.
    assert_ne!(report.status("veth"), "problem", "{}", report.pretty());
    relay.stop();

    let mut relay = Mcrelay::start(&g.gw, &["run", "-i", "gw0", "--xdp-mode", "native"]);
    relay.wait_ready();
    doctor(&g.gw, &[]).expect_status("xdp_mode", "ok");
}

/// Both ends of a veth in the relay's namespace: the peer of an XDP port with GRO off drops
/// every redirected frame; TX checksum offload on the peer leaves partial checksums.
#[test]
fn veth_peer_without_gro() {
    require_testbed!();
    let g = gateway("vg");
    g.gw.ip(&["link", "add", "rp0", "type", "veth", "peer", "name", "rp1"]);
    g.gw.link_up("rp0");
    g.gw.link_up("rp1");
    g.gw.exec(&["ethtool", "-K", "rp1", "gro", "off"]);

    // Before the relay runs: --iface names the port, a warning.
    let report = doctor(&g.gw, &["--iface", "rp0"]);
    report.expect_status("veth", "warn");
    report.expect_fix("veth", "ethtool -K rp1 gro on");

    let mut relay = Mcrelay::start(&g.gw, &["run", "-i", "rp0", "-i", "gw0"]);
    relay.wait_ready();
    let report = doctor(&g.gw, &[]);
    report.expect_problem("veth");
    report.expect_fix("veth", "ethtool -K rp1 gro on");
    report.expect_fix("veth", "ethtool -K rp1 tx off");
    apply_fix(&g.gw, &report.fix("veth"));
    let report = doctor(&g.gw, &[]);
    report.expect_status("veth", "ok");
    relay.stop();
}

/// Doctor needs no privileges: as uid 65534 without capabilities it still reports (the
/// firewall check may be skipped: reading the rule set needs CAP_NET_ADMIN).
#[test]
fn runs_without_privileges() {
    require_testbed!("setpriv");
    let c = client("np");
    c.ns.ip(&["link", "set", "phys0", "multicast", "off"]);
    let bin = BinaryForNobody::new(&mcrelay_bin());
    let out = output_with_timeout(bin.command(&c.ns, &["doctor", "--json"]), ONE_SHOT_TIMEOUT);
    let report = parse_report(&out, format!("unprivileged doctor in {}", c.ns));
    report.expect_problem("multicast_flag");
    assert_ne!(report.status("firewall"), "problem", "{}", report.pretty());
}
