//! `mcrelay doctor`: each check is tested by creating its problem in a fresh network namespace
//! and running the real binary there (network namespace only), then, where the fix is a
//! command, applying the fix doctor printed and checking that the finding is gone.
//!
//! Nothing here sends traffic; the only daemons started (`mcrelay run`, for the XDP checks) run
//! inside namespaces the test created, under guards.

use std::{
    fs,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    addr,
    cmd::{output_with_timeout, run_checked},
    daemon::{BinaryForNobody, ONE_SHOT_TIMEOUT},
    find_program, mcast, mcrelay_bin, mcrelay_output,
    openvpn::{VpnBed, VpnOptions, CLIENT_TUN},
    require_testbed,
    serde_json::Value,
    topology::Star,
    veth_pair, Mcrelay, NetNs, WireObserver,
};

/// Every check id doctor reports, in order.
const CHECK_IDS: [&str; 11] = [
    "multicast_route",
    "multicast_route_v6",
    "rp_filter",
    "multicast_flag",
    "forced_versions",
    "firewall",
    "bridge_querier",
    "xdp_mode",
    "veth",
    "wireguard",
    "tun",
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

    /// The fix commands of check `id`, one by one.
    fn fixes(&self, id: &str) -> Vec<String> {
        self.check(id)
            .get("fixes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Every message and note of check `id`, one per line.
    fn texts(&self, id: &str) -> String {
        let mut out = String::new();
        for finding in
            self.check(id).get("findings").and_then(Value::as_array).into_iter().flatten()
        {
            out.push_str(finding.get("message").and_then(Value::as_str).unwrap_or(""));
            out.push('\n');
            for note in finding.get("notes").and_then(Value::as_array).into_iter().flatten() {
                out.push_str(note.as_str().unwrap_or(""));
                out.push('\n');
            }
        }
        out
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

// ---------------------------------------------------------------------------------------------
// Routed VPNs: WireGuard (wireguard-go) and OpenVPN `dev tun`.

/// wireguard-go's control sockets: one directory for every network namespace.
const WG_SOCKET_DIR: &str = "/var/run/wireguard";
/// Interface names of this file: `mcdw<pid in hex>-<n>` (at most 15 characters).
const WG_PREFIX: &str = "mcdw";

static NEXT_WG: AtomicU32 = AtomicU32::new(0);

/// A `wireguard-go -f NAME` process in a namespace. The name is unique to this test process
/// (the socket directory is shared by all namespaces, and a second wireguard-go with a running
/// one's name exits). Dropping it kills the process, deletes the link and removes the socket;
/// sockets of crashed earlier runs (whose process is gone) are removed before the first start.
struct WireguardGo {
    child: Child,
    ns_name: String,
    name: String,
    socket: PathBuf,
}

impl WireguardGo {
    fn start(ns: &NetNs) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_stale_wg_sockets);
        let name = format!(
            "{WG_PREFIX}{:x}-{}",
            std::process::id(),
            NEXT_WG.fetch_add(1, Ordering::Relaxed)
        );
        assert!(name.len() <= 15, "interface name {name} too long");
        let socket = Path::new(WG_SOCKET_DIR).join(format!("{name}.sock"));
        let _ = fs::remove_file(&socket);
        let mut cmd = ns.command("wireguard-go");
        cmd.args(["-f", &name]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting wireguard-go in {ns}: {e}"));
        let mut wg = Self { child, ns_name: ns.name().to_owned(), name, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(wg.socket.exists() && mcrelay_tests::openvpn::link_exists(ns, &wg.name)) {
            if let Ok(Some(status)) = wg.child.try_wait() {
                panic!("wireguard-go {} in {ns} exited: {status}", wg.name);
            }
            assert!(Instant::now() < deadline, "wireguard-go {} in {ns}: no socket/link", wg.name);
            thread::sleep(Duration::from_millis(20));
        }
        wg
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.ns_name, "link", "del", &self.name]);
        let _ = output_with_timeout(cmd, ONE_SHOT_TIMEOUT);
        let _ = fs::remove_file(&self.socket);
    }
}

/// Removes `mcdw<pid>-<n>.sock` whose process `pid` is gone.
fn remove_stale_wg_sockets() {
    let Ok(entries) = fs::read_dir(WG_SOCKET_DIR) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(WG_PREFIX).and_then(|r| r.strip_suffix(".sock")) else {
            continue;
        };
        let Some(pid) = rest.split_once('-').and_then(|(p, _)| u32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A fresh WireGuard public key (`wg genkey | wg pubkey`).
fn wg_pubkey() -> String {
    let private = run_checked({
        let mut c = Command::new("wg");
        c.arg("genkey");
        c
    });
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(private.as_bytes()).expect("writing to wg pubkey");
    }
    let out = child.wait_with_output().expect("wg pubkey");
    assert!(out.status.success(), "wg pubkey failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A VPN client's namespace (physical NIC `phys0`, default route through it) with a
/// wireguard-go interface `10.77.0.2/24`, up, and one peer (the hub) with `allowed`.
fn wg_client(tag: &str, allowed: &str) -> (Client, WireguardGo, String) {
    let c = client(tag);
    let wg = WireguardGo::start(&c.ns);
    c.ns.add_addr(&wg.name, "10.77.0.2/24");
    c.ns.link_up(&wg.name);
    let key = wg_pubkey();
    c.ns.exec(&["wg", "set", &wg.name, "peer", &key, "allowed-ips", allowed]);
    (c, wg, key)
}

/// The peer side: AllowedIPs without 224.0.0.0/4 and no route into the tunnel are both flagged
/// with their fixes, which work.
#[test]
fn wireguard_peer_needs_multicast_allowed_ips_and_route() {
    require_testbed!("wireguard-go", "wg", "unshare");
    let (c, wg, key) = wg_client("wgp", "10.77.0.1/32");
    let ns = &c.ns;
    let iface = wg.name.as_str();
    let allowed_fix = format!("wg set {iface} peer {key} allowed-ips 10.77.0.1/32,224.0.0.0/4");
    let route_fix = format!("ip route replace 224.0.0.0/4 dev {iface}");

    for args in [vec!["--iface", iface], vec![]] {
        let report = doctor(ns, &args);
        report.expect_problem("wireguard");
        assert_eq!(report.fixes("wireguard"), vec![allowed_fix.clone(), route_fix.clone()]);
        assert!(report.summary("wireguard").contains("AllowedIPs"), "{}", report.pretty());
        assert!(report.texts("wireguard").contains("AllowedIPs = 10.77.0.1/32, 224.0.0.0/4"));
        assert!(report.summary("wireguard").contains("phys0"), "{}", report.pretty());
    }
    // The text form prints the fixes.
    let out = mcrelay_output(ns, &["doctor", "--iface", iface]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("fix: {allowed_fix}")), "{text}");

    // AllowedIPs fixed, the route still missing.
    apply_fix(ns, &allowed_fix);
    let report = doctor(ns, &["--iface", iface]);
    report.expect_problem("wireguard");
    assert_eq!(report.fixes("wireguard"), vec![route_fix.clone()], "{}", report.pretty());

    apply_fix(ns, &route_fix);
    let report = doctor(ns, &["--iface", iface]);
    report.expect_status("wireguard", "ok");
    report.expect_status("multicast_route", "ok");
    report.expect_status("tun", "ok");

    // Without wireguard-tools the check says it was skipped, and why. (`wg` hidden in a private
    // mount namespace: /dev/null bound over it is no regular file.)
    let hide = format!(
        "for p in /usr/bin/wg /usr/sbin/wg /bin/wg /sbin/wg; do [ -f $p ] && mount --bind \
         /dev/null $p; done; exec {} doctor --json --iface {iface}",
        mcrelay_bin().display()
    );
    let mut cmd = ns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &hide]);
    let report = parse_report(
        &output_with_timeout(cmd, ONE_SHOT_TIMEOUT),
        format!("doctor without wg in {ns}"),
    );
    report.expect_status("wireguard", "skip");
    assert!(report.summary("wireguard").contains("wireguard-tools"), "{}", report.pretty());

    // A full tunnel covers multicast too; the route is what wg-quick adds for it.
    let (c, wg, _) = wg_client("wgf", "0.0.0.0/0");
    c.ns.ip(&["route", "replace", "224.0.0.0/4", "dev", &wg.name]);
    doctor(&c.ns, &["--iface", &wg.name]).expect_status("wireguard", "ok");
}

/// A hub (two peers): per-client delivery is explained, and a peer owning 224.0.0.0/4 is flagged.
#[test]
fn wireguard_hub_peer_owning_multicast() {
    require_testbed!("wireguard-go", "wg");
    let (c, wg, first) = wg_client("wgh", "10.77.0.1/32,224.0.0.0/4");
    let ns = &c.ns;
    let iface = wg.name.as_str();
    let second = wg_pubkey();
    ns.exec(&["wg", "set", iface, "peer", &second, "allowed-ips", "10.77.0.3/32"]);
    let report = doctor(ns, &[]);
    report.expect_status("wireguard", "warn");
    assert!(report.summary("wireguard").contains(&first), "{}", report.pretty());
    assert!(report.summary("wireguard").contains("owns multicast"), "{}", report.pretty());
    report
        .expect_fix("wireguard", &format!("wg set {iface} peer {first} allowed-ips 10.77.0.1/32"));
    apply_fix(ns, &report.fix("wireguard"));
    let report = doctor(ns, &["--iface", iface]);
    report.expect_status("wireguard", "ok");
    assert!(
        report.texts("wireguard").contains(&format!("--per-client {iface}")),
        "{}",
        report.pretty()
    );
}

/// wireguard-go's socket directory is shared: a plain tun with the same name in another namespace
/// is not taken for WireGuard (the socket is not in that namespace's /proc/net/unix).
#[test]
fn wireguard_socket_of_another_namespace() {
    require_testbed!("wireguard-go", "wg");
    let (_c, wg, _) = wg_client("wgo", "10.77.0.1/32");
    let other = client("wgx");
    other.ns.ip(&["tuntap", "add", &wg.name, "mode", "tun"]);
    other.ns.link_up(&wg.name);
    let report = doctor(&other.ns, &["--iface", &wg.name]);
    report.expect_status("wireguard", "ok");
    assert!(report.summary("wireguard").contains("not a WireGuard"), "{}", report.pretty());
    // It is a tun without the route: the tun check flags it.
    report.expect_problem("tun");
}

/// Sends `count` datagrams to `group` from `ns` the way an application that picks no interface
/// does: the kernel's route decides where they go (TTL 8).
fn send_by_route(ns: &NetNs, group: IpAddr, port: u16, count: u64) {
    ns.in_netns(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.set_multicast_ttl_v4(8).expect("ttl");
        for seq in 0..count {
            // No route at all is a send error: counted as not sent.
            let _ =
                socket.send_to(mcast::payload(group, seq).as_bytes(), SocketAddr::new(group, port));
            thread::sleep(Duration::from_millis(20));
        }
    });
}

/// Whether multicast a client application sends reaches the OpenVPN server's tun.
fn reaches_server(bed: &VpnBed, group: IpAddr) -> bool {
    let wire = WireObserver::new(&bed.gw, &bed.servers[0].tap);
    send_by_route(&bed.clients[0].ns, group, 5001, 5);
    wire.wait_for(group, 5, Duration::from_secs(3)) == 5
}

fn tun_bed(tag: &str, server_extra: &str) -> VpnBed {
    VpnBed::new(
        tag,
        VpnOptions {
            tun: true,
            lan_hosts: 0,
            clients: 1,
            client_route_hook: false,
            server_extra: server_extra.to_owned(),
            ..VpnOptions::default()
        },
    )
}

/// OpenVPN `dev tun`, the route pushed: OpenVPN installs it with a gateway, which on a tun is
/// harmless (multicast reaches the server), and doctor passes it.
#[test]
fn openvpn_tun_client_with_pushed_route() {
    require_testbed!("openvpn", "openssl", "ping");
    let bed = tun_bed("dtp", "push \"route 224.0.0.0 240.0.0.0\"");
    let ns = &bed.clients[0].ns;
    let route = ns.ip(&["route", "show", "224.0.0.0/4"]);
    assert!(route.contains("via 10.8.0.1") && route.contains(CLIENT_TUN), "route: {route}");
    assert!(reaches_server(&bed, addr("239.31.1.1")), "{}", bed.logs());
    let report = doctor(ns, &["--iface", CLIENT_TUN]);
    report.expect_status("tun", "ok");
    report.expect_status("multicast_route", "ok");
    assert!(report.texts("tun").contains("client side, OpenVPN"), "{}", report.pretty());
    // The server: pushed, so no route warning; IPv6 clients (server-ipv6): MLD is not learned.
    let server = doctor(&bed.gw, &[]);
    server.expect_status("tun", "warn");
    assert!(server.summary("tun").contains("link-local"), "{}", server.pretty());
    assert!(!server.summary("tun").contains("pushed"), "{}", server.pretty());
}

/// The pitfall measured: `route 224.0.0.0 240.0.0.0` in the server config (not pushed) routes
/// the server only; the client's multicast leaves through its physical NIC. Doctor flags both
/// sides, and the client fix it prints makes multicast reach the server.
#[test]
fn openvpn_tun_route_in_server_config_is_not_pushed() {
    require_testbed!("openvpn", "openssl", "ping");
    let bed = tun_bed("dtn", "route 224.0.0.0 240.0.0.0");
    let tun = bed.servers[0].tap.clone();
    let server_route = bed.gw.ip(&["route", "show", "224.0.0.0/4"]);
    assert!(server_route.contains(&tun), "server route: {server_route}");
    let ns = &bed.clients[0].ns;
    assert_eq!(ns.ip(&["route", "show", "224.0.0.0/4"]).trim(), "", "the client got a route");
    assert!(!reaches_server(&bed, addr("239.31.2.1")), "multicast reached the server");

    let server = doctor(&bed.gw, &["--iface", &tun]);
    server.expect_status("tun", "warn");
    assert!(server.summary("tun").contains("not pushed"), "{}", server.pretty());
    server.expect_fix("tun", "by `push \"route 224.0.0.0 240.0.0.0\"`");

    let report = doctor(ns, &["--iface", CLIENT_TUN]);
    report.expect_problem("tun");
    assert!(report.summary("tun").contains("out eth0"), "{}", report.pretty());
    assert_eq!(report.fixes("tun"), vec![format!("ip route replace 224.0.0.0/4 dev {CLIENT_TUN}")]);
    assert!(report.texts("tun").contains("without `push`"), "{}", report.pretty());
    apply_fix(ns, &report.fix("tun"));
    doctor(ns, &["--iface", CLIENT_TUN]).expect_status("tun", "ok");
    assert!(reaches_server(&bed, addr("239.31.2.2")), "{}", bed.logs());
}
