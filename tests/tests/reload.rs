//! Configuration file and reload: `mcrelay run --config FILE`, then `mcrelay reload` (SIGHUP)
//! applies a changed file as a difference while a stream flows; an invalid file is rejected
//! and the running state kept.

use std::{
    net::IpAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    daemon::attached_ports as port_names, mcrelay_output, require_testbed, topology::Star,
    McastReceiver, McastSender, Mcrelay, NetNs,
};

const PORT: u16 = 5000;

struct TempConfig {
    dir: PathBuf,
}

impl TempConfig {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mcrelay-reload-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("mcrelay.toml")
    }

    fn write(&self, text: &str) {
        let tmp = self.dir.join("next.toml");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.path()).expect("replace config");
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `mcrelay reload`, which must report that the new file is in force.
fn reload(gw: &NetNs) {
    let out = mcrelay_output(gw, &["reload"]);
    assert!(out.status.success(), "mcrelay reload: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("reloaded"), "mcrelay reload printed: {stdout}");
}

fn config(ports: &[&str], group: IpAddr, members: &[&str]) -> String {
    let mut text = String::from("# written by tests/tests/reload.rs\n");
    for p in ports {
        text.push_str(&format!("[[port]]\nname = \"{p}\"\n\n"));
    }
    let members: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    text.push_str(&format!("[[static]]\ngroup = \"{group}\"\nports = [{}]\n", members.join(", ")));
    text.push_str("\n[timers]\nquery_interval = 20\nquery_response_interval = 1\n");
    text
}

#[test]
fn reload_adds_a_port_without_losing_a_packet() {
    require_testbed!();
    let group: IpAddr = "239.40.0.1".parse().expect("group");
    let star = Star::new("rl", 3);
    let [s, r1, r2] = &star.hosts[..] else { unreachable!() };
    let cfg = TempConfig::new("add");
    cfg.write(&config(&["gw0", "gw1"], group, &["gw1"]));
    let path = cfg.path();
    let path = path.to_str().expect("utf-8 path");
    let mut relay = Mcrelay::start_ready(&star.gw, &["run", "--config", path]);
    assert_eq!(port_names(&star.gw), ["gw0", "gw1"]);
    let rx1 = McastReceiver::join(&r1.ns, group, PORT, &r1.iface);
    let rx2 = McastReceiver::join(&r2.ns, group, PORT, &r2.iface);

    const TOTAL: u64 = 40_000;
    let sender = McastSender::new(&s.ns, &s.iface);
    let start = Instant::now();
    for seq in 0..TOTAL {
        sender.send(group, PORT, seq).unwrap_or_else(|e| panic!("send {seq}: {e}"));
        if seq == TOTAL / 2 {
            cfg.write(&config(&["gw0", "gw1", "gw2"], group, &["gw1", "gw2"]));
            reload(&star.gw);
        }
        // About 20,000 datagrams per second.
        let due = start + Duration::from_micros(seq * 50);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    assert_eq!(
        rx1.wait_for(TOTAL, Duration::from_secs(20)),
        TOTAL,
        "{rx1}: lost across the reload"
    );
    assert!(rx2.wait_for(1, Duration::from_secs(20)) > 0, "{rx2}: the added port never received");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(rx1.distinct(), TOTAL, "{rx1}: duplicates");
    let names = port_names(&star.gw);
    assert_eq!(names, ["gw0", "gw1", "gw2"], "each port attached once after the reload");
    assert!(relay.stderr().contains("reloaded"), "{}", relay.stderr());

    // An invalid file is rejected; the running state stays, and `mcrelay reload` says so:
    // exit status 2 with the file's errors at their line, as check-config prints them.
    cfg.write("[[port]]\nname = \"gw0\"\nbogus_key = 1\n");
    let out = mcrelay_output(&star.gw, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a refused reload must fail: {stderr}");
    assert!(stderr.contains(&format!("{path}:3:")), "the error names the line: {stderr}");
    assert!(stderr.contains("previous one stays in force"), "{stderr}");
    assert!(relay.stderr().contains("reload rejected"), "{}", relay.stderr());
    assert_eq!(port_names(&star.gw), ["gw0", "gw1", "gw2"], "state changed by an invalid reload");
    let before = rx2.count();
    sender.send(group, PORT, TOTAL + 1).expect("send");
    assert!(rx2.wait_for(before + 1, Duration::from_secs(10)) > before, "forwarding broke");

    // Removing a port on reload detaches it.
    cfg.write(&config(&["gw0", "gw1"], group, &["gw1"]));
    reload(&star.gw);
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_names(&star.gw) != ["gw0", "gw1"] {
        assert!(Instant::now() < deadline, "gw2 still attached: {:?}", port_names(&star.gw));
        thread::sleep(Duration::from_millis(20));
    }
    assert!(star.gw.xdp_attachment("gw2").is_none(), "gw2 still has XDP after removal");
    let _ = relay.stop();
    let _ = mcrelay_output(&star.gw, &["detach"]);
}
