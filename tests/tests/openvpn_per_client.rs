//! Per-client delivery through a real OpenVPN server (`dev tap`): two clients on one server,
//! one joins. Without `--per-client` OpenVPN floods every multicast frame written into its tap
//! to both clients; with it, mcrelay writes one copy addressed to the joined client's MAC and
//! OpenVPN delivers it to that client only. Copies are counted per client.

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use mcrelay_tests::{
    mcrelay_json, mcrelay_output,
    openvpn::{VpnBed, VpnOptions},
    require_testbed, McastReceiver, McastSender, Mcrelay, WireObserver,
};
use serde_json::Value;

const PORT: u16 = 5000;
const COUNT: u64 = 100;

fn clients(doc: &Value) -> Vec<Value> {
    doc["clients"].as_array().cloned().unwrap_or_default()
}

fn case(tag: &str, group: IpAddr) {
    let bed = VpnBed::new(tag, VpnOptions::default());
    let [h0, _h1] = &bed.lan[..] else { unreachable!() };
    let [c0, c1] = &bed.clients[..] else { unreachable!() };
    let tap = bed.servers[0].tap.clone();
    let mut args: Vec<String> = vec!["run".into(), "--no-pin".into()];
    args.extend(bed.iface_args());
    args.extend(["--per-client".into(), tap.clone()]);
    args.extend(["--query-interval", "5", "--query-response-interval", "1"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = Mcrelay::start(&bed.gw, &args);
    relay.wait_ready();

    let other = WireObserver::new(&c1.ns, &c1.tap);
    let rx = McastReceiver::join(&c0.ns, group, PORT, &c0.tap);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = mcrelay_json(&bed.gw, &["groups", "--json"]);
        let known = clients(&doc).iter().any(|c| {
            c["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g.as_str() == Some(&group.to_string()))
        });
        if known {
            break;
        }
        assert!(Instant::now() < deadline, "the joined VPN client was never learned:\n{doc:#}");
        thread::sleep(Duration::from_millis(20));
    }
    McastSender::new(&h0.ns, &h0.iface).send_numbered(group, PORT, COUNT, Duration::from_millis(2));
    assert_eq!(rx.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{rx}: the joined client");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.distinct(), COUNT, "{rx}: duplicates");
    assert_eq!(
        other.count(group),
        0,
        "{other}: OpenVPN delivered a copy to the client that did not join"
    );
    // The state file is rewritten at least once a second: poll for the counters.
    let total = |d: &Value| clients(d).iter().filter_map(|c| c["copies"].as_u64()).sum::<u64>();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut doc = mcrelay_json(&bed.gw, &["groups", "--json"]);
    while total(&doc) < COUNT && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        doc = mcrelay_json(&bed.gw, &["groups", "--json"]);
    }
    let list = clients(&doc);
    eprintln!("{tag}: per-client copies on {tap}: {list:?}");
    assert_eq!(total(&doc), COUNT, "copies per client: {list:?}");
    let status = relay.stop();
    assert!(status.success(), "{status}");
    let _ = mcrelay_output(&bed.gw, &["detach"]);
}

#[test]
fn openvpn_per_client_delivery_ipv4() {
    require_testbed!("openvpn", "openssl");
    case("pc4", "239.60.0.1".parse().expect("group"));
}

#[test]
fn openvpn_per_client_delivery_ipv6() {
    require_testbed!("openvpn", "openssl");
    case("pc6", "ff1e::60:1".parse().expect("group"));
}
