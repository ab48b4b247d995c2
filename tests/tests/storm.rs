//! Policy and storm control in the dataplane: a denied group is dropped (`drop_policy`) whatever
//! would forward it (flooding, router ports, a joined member); a rate limit drops what exceeds
//! it (`drop_rate_limit`), per group, so that a flood of one group does not starve another,
//! and per ingress port.

use std::{net::IpAddr, path::PathBuf, thread, time::Duration};

use mcrelay_tests::{
    addr,
    daemon::{port_counter, stats_json},
    require_testbed,
    topology::{Host, Star},
    McastReceiver, McastSender, Mcrelay,
};

const PORT: u16 = 5000;
const COUNT: u64 = 200;
const INTERVAL: Duration = Duration::from_millis(1);
const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(500);

/// A configuration file for one test, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(tag: &str, text: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("mcrelay-storm-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn join(host: &Host, group: IpAddr) -> McastReceiver {
    McastReceiver::join(&host.ns, group, PORT, &host.iface)
}

fn sender(host: &Host) -> McastSender {
    McastSender::new(&host.ns, &host.iface)
}

fn relay(star: &Star, extra: &[&str]) -> Mcrelay {
    star.start_relay(extra)
}

/// `[policy] deny` wins over `--unknown flood`, over a learned router port and over a member
/// that joined: the denied group reaches nobody and is counted as `drop_policy` on the ingress
/// port; an allowed group next to it flows (so the test can fail).
#[test]
fn denied_groups_are_dropped_whatever_would_forward_them() {
    require_testbed!();
    let star = Star::new("pd", 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!() };
    let config = TempConfig::new("deny", "[policy]\ndeny = [\"239.66.0.0/16\"]\n");
    let router_port = r2.gw_port.clone();
    let _relay = relay(
        &star,
        &["--config", config.arg(), "--unknown", "flood", "--router-port", &router_port],
    );
    let (denied, allowed) = (addr("239.66.1.1"), addr("239.67.1.1"));
    let rx_denied = join(r1, denied);
    let rx_allowed = join(r1, allowed);
    let tx = sender(s);
    tx.send_numbered(denied, PORT, COUNT, INTERVAL);
    tx.send_numbered(allowed, PORT, COUNT, INTERVAL);
    assert_eq!(rx_allowed.wait_for(COUNT, TIMEOUT), COUNT, "{rx_allowed}: the allowed group");
    thread::sleep(QUIET);
    assert_eq!(rx_denied.count(), 0, "{rx_denied}: a denied group was relayed");
    let stats = stats_json(&star.gw);
    assert_eq!(port_counter(&stats, &s.gw_port, "packets", "drop_policy"), COUNT, "{stats:#}");
}

/// Per-group limits: every group of the prefix has its own budget. One group flooded far past
/// its limit loses the excess (`drop_rate_limit`); a second group of the same prefix, sent at
/// a rate within the limit at the same time, loses nothing.
#[test]
fn a_flood_of_one_group_does_not_starve_another() {
    require_testbed!();
    let star = Star::new("rg", 2);
    let [s, r1] = &star.hosts[..] else { unreachable!() };
    let (flood, calm) = (addr("239.77.0.1"), addr("239.77.0.2"));
    let statics = [format!("{flood}@{}", r1.gw_port), format!("{calm}@{}", r1.gw_port)];
    let _relay = relay(
        &star,
        &["--rate-limit", "239.77.0.0/16=200", "--static", &statics[0], "--static", &statics[1]],
    );
    let rx_flood = join(r1, flood);
    let rx_calm = join(r1, calm);
    const FLOOD: u64 = 20_000;
    const CALM: u64 = 100;
    let flooder = {
        let tx = sender(s);
        thread::spawn(move || tx.send_numbered(flood, PORT, FLOOD, Duration::ZERO))
    };
    // 100 packets 10 ms apart: half the limit.
    sender(s).send_numbered(calm, PORT, CALM, Duration::from_millis(10));
    flooder.join().expect("flood sender");
    assert_eq!(rx_calm.wait_for(CALM, TIMEOUT), CALM, "{rx_calm}: starved by the other group");
    thread::sleep(QUIET);
    let through = rx_flood.count();
    assert!(through > 0, "{rx_flood}: nothing of the flooded group went through");
    assert!(through < FLOOD / 4, "{rx_flood}: {through} of {FLOOD} flood packets went through");
    let stats = stats_json(&star.gw);
    let dropped = port_counter(&stats, &s.gw_port, "packets", "drop_rate_limit");
    assert!(dropped >= FLOOD - through - 1000, "drop_rate_limit {dropped}, through {through}");
}

/// `[[port]] rate_limit_pps`: data arriving on that port beyond the rate is dropped and
/// counted there; other ports are not limited.
#[test]
fn a_port_rate_limit_caps_what_a_port_may_send() {
    require_testbed!();
    let star = Star::new("rp", 3);
    let [s, r1, quiet] = &star.hosts[..] else { unreachable!() };
    let text = format!(
        "[[port]]\nname = \"{}\"\nrate_limit_pps = 100\n\n[[port]]\nname = \"{}\"\n\n[[port]]\nname = \"{}\"\n",
        s.gw_port, r1.gw_port, quiet.gw_port
    );
    let config = TempConfig::new("port", &text);
    let group = addr("239.78.0.1");
    let member = format!("{group}@{}", r1.gw_port);
    let _relay =
        Mcrelay::start_ready(&star.gw, &["run", "--config", config.arg(), "--static", &member]);
    let rx = join(r1, group);
    const SENT: u64 = 10_000;
    sender(s).send_numbered(group, PORT, SENT, Duration::ZERO);
    // The other port is not limited: all of its packets arrive.
    sender(quiet).send_numbered(group, PORT + 1, COUNT, INTERVAL);
    thread::sleep(QUIET);
    let through = rx.count();
    assert!(through > 0 && through < SENT / 4, "{rx}: {through} of {SENT} passed a 100 pps limit");
    let stats = stats_json(&star.gw);
    assert!(port_counter(&stats, &s.gw_port, "packets", "drop_rate_limit") > SENT / 2, "{stats:#}");
    assert_eq!(port_counter(&stats, &quiet.gw_port, "packets", "drop_rate_limit"), 0, "{stats:#}");
    assert_eq!(port_counter(&stats, &quiet.gw_port, "packets", "forwarded"), COUNT, "{stats:#}");
}
