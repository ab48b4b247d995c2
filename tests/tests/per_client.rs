//! Per-client delivery on a shared port. An OpenVPN `dev tap` server floods multicast written
//! into its tap to every client but sends unicast-addressed frames only to the client with
//! that MAC; a Linux bridge with multicast snooping off does exactly the same with its ports,
//! so it stands in for OpenVPN here (tests/tests/openvpn.rs runs the real thing). Two clients
//! sit behind the gateway's shared port; only the one that joined may receive the group, and
//! mcrelay counts the copies addressed to it.

use std::{net::IpAddr, thread, time::Duration};

use mcrelay_tests::{
    daemon::{groups_json, wait_groups},
    mcrelay_output,
    netns::veth_pair_with_index,
    require_testbed, veth_pair, McastReceiver, McastSender, Mcrelay, NetNs, WireObserver,
};
use serde_json::Value;

const PORT: u16 = 5000;
const COUNT: u64 = 200;

/// Gateway `gw` with `lan0` (to a sender) and `shared0` (to a switch with two clients).
struct SharedSegment {
    // Drop order: gateway first, then the rest.
    gw: NetNs,
    sender: NetNs,
    _switch: NetNs,
    clients: [NetNs; 2],
}

impl SharedSegment {
    fn new(tag: &str) -> Self {
        let gw = NetNs::new(&format!("mcrpc{tag}-gw"));
        let sender = NetNs::new(&format!("mcrpc{tag}-s"));
        let switch = NetNs::new(&format!("mcrpc{tag}-sw"));
        let clients =
            [NetNs::new(&format!("mcrpc{tag}-c1")), NetNs::new(&format!("mcrpc{tag}-c2"))];
        veth_pair(&gw, "lan0", &sender, "eth0");
        sender.add_addr("eth0", "198.18.10.2/24");
        sender.add_addr("eth0", "fd00:6d63:10::2/64");
        sender.tx_off("eth0");
        sender.gro_on("eth0");
        switch.add_bridge("br0");
        // Like OpenVPN: multicast to everybody, unicast by learned MAC.
        switch.ip(&["link", "set", "br0", "type", "bridge", "mcast_snooping", "0"]);
        veth_pair(&gw, "shared0", &switch, "up0");
        switch.set_master("up0", "br0");
        switch.gro_on("up0");
        for (i, c) in clients.iter().enumerate() {
            let port = format!("p{i}");
            veth_pair(&switch, &port, c, "eth0");
            switch.set_master(&port, "br0");
            c.add_addr("eth0", &format!("198.18.20.{}/24", i + 2));
            c.add_addr("eth0", &format!("fd00:6d63:20::{}/64", i + 2));
            c.gro_on("eth0");
            c.tx_off("eth0");
        }
        Self { gw, sender, _switch: switch, clients }
    }
}

fn start(seg: &SharedSegment, per_client: bool) -> Mcrelay {
    start_mode(seg, per_client, "auto")
}

fn start_mode(seg: &SharedSegment, per_client: bool, mode: &str) -> Mcrelay {
    let mut args = vec!["run", "--no-pin", "-i", "lan0", "-i", "shared0", "--query-interval", "20"];
    args.extend(["--query-response-interval", "1", "--xdp-mode", mode]);
    if per_client {
        args.extend(["--per-client", "shared0"]);
    }
    Mcrelay::start_ready(&seg.gw, &args)
}

/// `clients[]` of a `groups --json` document: the per-client state of `--per-client` ports.
fn clients(doc: &Value) -> &[Value] {
    doc["clients"].as_array().map_or(&[], Vec::as_slice)
}

fn run_case(tag: &str, group: IpAddr) {
    let seg = SharedSegment::new(tag);
    let [c1, c2] = &seg.clients;

    // Control: without per-client delivery the shared segment floods to both clients.
    {
        let relay = start(&seg, false);
        let wire2 = WireObserver::new(c2, "eth0");
        let rx1 = McastReceiver::join(c1, group, PORT, "eth0");
        thread::sleep(Duration::from_millis(300));
        McastSender::new(&seg.sender, "eth0").send_numbered(
            group,
            PORT,
            COUNT,
            Duration::from_millis(1),
        );
        assert_eq!(rx1.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{rx1} (control run)");
        assert_eq!(
            wire2.wait_for(group, COUNT, Duration::from_secs(5)),
            COUNT,
            "control run: flooding expected"
        );
        drop(relay);
    }

    let relay = start(&seg, true);
    let wire2 = WireObserver::new(c2, "eth0");
    let rx1 = McastReceiver::join(c1, group, PORT, "eth0");
    // Wait until the client is known (its report passed through the switch).
    wait_groups(&seg.gw, "the client to be learned", Duration::from_secs(20), |d| {
        clients(d).iter().any(|c| {
            c["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g.as_str() == Some(&group.to_string()))
        })
    });
    McastSender::new(&seg.sender, "eth0").send_numbered(
        group,
        PORT,
        COUNT,
        Duration::from_millis(1),
    );
    assert_eq!(rx1.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{rx1}: the joined client");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(rx1.distinct(), COUNT, "{rx1}: duplicates");
    assert_eq!(wire2.count(group), 0, "{wire2}: the other client got copies");
    // The state file is rewritten at least once a second: poll for the counters.
    let total = |d: &Value| clients(d).iter().filter_map(|c| c["copies"].as_u64()).sum::<u64>();
    let (doc, _) = wait_groups(&seg.gw, "the copies to be counted", Duration::from_secs(10), |d| {
        total(d) >= COUNT
    });
    eprintln!("{tag}: per-client copies: {:?}", clients(&doc));
    assert_eq!(total(&doc), COUNT, "copies counted per client:\n{doc:#}");

    // The client leaves: copies stop (the port-level state expires later, nothing floods).
    drop(rx1);
    wait_groups(&seg.gw, "the client leave to be applied", Duration::from_secs(20), |d| {
        !clients(d).iter().any(|c| !c["groups"].as_array().is_none_or(|g| g.is_empty()))
    });
    drop(relay);
    let _ = mcrelay_output(&seg.gw, &["detach"]);
}

#[test]
fn per_client_copies_reach_only_the_joined_client_ipv4() {
    require_testbed!();
    run_case("4", "239.50.0.1".parse().expect("group"));
}

#[test]
fn per_client_copies_reach_only_the_joined_client_ipv6() {
    require_testbed!();
    run_case("6", "ff1e::50:1".parse().expect("group"));
}

/// Both clients joined: each gets exactly one copy of every datagram, addressed to itself — in
/// native mode and in generic (skb) mode, where the copies are clones of one skb and each
/// egress program must rewrite its own copy only.
fn two_clients(tag: &str, mode: &str) {
    let group: IpAddr = "239.50.1.1".parse().expect("group");
    let seg = SharedSegment::new(tag);
    let [c1, c2] = &seg.clients;
    let _relay = start_mode(&seg, true, mode);
    let (rx1, rx2) = (
        McastReceiver::join(c1, group, PORT, "eth0"),
        McastReceiver::join(c2, group, PORT, "eth0"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let doc = groups_json(&seg.gw);
        let n = clients(&doc)
            .iter()
            .filter(|c| {
                c["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|g| g.as_str() == Some("239.50.1.1"))
            })
            .count();
        if n == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "both clients not learned:\n{doc:#}");
        thread::sleep(Duration::from_millis(20));
    }
    McastSender::new(&seg.sender, "eth0").send_numbered(
        group,
        PORT,
        COUNT,
        Duration::from_millis(1),
    );
    for rx in [&rx1, &rx2] {
        assert_eq!(rx.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{rx} ({mode})");
    }
    thread::sleep(Duration::from_millis(500));
    for rx in [&rx1, &rx2] {
        assert_eq!(
            rx.count(),
            COUNT,
            "{rx} ({mode}): duplicates - copies addressed to the other client?"
        );
        assert_eq!(rx.distinct(), COUNT, "{rx} ({mode})");
    }
    let per_client = |d: &Value| -> Vec<u64> {
        clients(d).iter().filter_map(|c| c["copies"].as_u64()).collect()
    };
    let (doc, _) = wait_groups(&seg.gw, "the copies to be counted", Duration::from_secs(10), |d| {
        per_client(d).iter().sum::<u64>() >= 2 * COUNT
    });
    assert_eq!(per_client(&doc), [COUNT, COUNT], "copies per client ({mode}):\n{doc:#}");
}

#[test]
fn two_joined_clients_each_get_their_own_copy_native() {
    require_testbed!();
    two_clients("2n", "native");
}

#[test]
fn two_joined_clients_each_get_their_own_copy_skb() {
    require_testbed!();
    two_clients("2s", "skb");
}

/// Two per-client ports whose ifindexes are 32,768 apart (40000 and 7232): per-client keys
/// once kept 15 bits of the ifindex, so the two ports' copies aliased and one client got
/// nothing. Each port has one joined client; each must get every datagram exactly once.
#[test]
fn per_client_ports_with_ifindexes_above_32768_do_not_alias() {
    require_testbed!();
    let group: IpAddr = "239.50.2.1".parse().expect("group");
    let gw = NetNs::new("mcrpchi-gw");
    let sender = NetNs::new("mcrpchi-s");
    let clients = [NetNs::new("mcrpchi-c1"), NetNs::new("mcrpchi-c2")];
    veth_pair(&gw, "lan0", &sender, "eth0");
    sender.add_addr("eth0", "198.18.30.2/24");
    sender.tx_off("eth0");
    sender.gro_on("eth0");
    for (i, (c, index)) in clients.iter().zip([40_000u32, 40_000 - 32_768]).enumerate() {
        let port = format!("shared{i}");
        veth_pair_with_index(&gw, &port, index, c, "eth0");
        assert_eq!(gw.ifindex(&port), index, "{port} got the ifindex asked for");
        c.add_addr("eth0", &format!("198.18.3{}.2/24", i + 1));
        c.gro_on("eth0");
        c.tx_off("eth0");
    }
    let args = [
        "run",
        "--no-pin",
        "-i",
        "lan0",
        "-i",
        "shared0",
        "-i",
        "shared1",
        "--per-client",
        "shared*",
        "--query-interval",
        "20",
        "--query-response-interval",
        "1",
    ];
    let _relay = Mcrelay::start_ready(&gw, &args);
    let rx: Vec<McastReceiver> =
        clients.iter().map(|c| McastReceiver::join(c, group, PORT, "eth0")).collect();
    wait_groups(&gw, "both clients to be learned", Duration::from_secs(20), |d| {
        clients_of(d)
            .iter()
            .filter(|c| c["groups"].as_array().is_some_and(|g| !g.is_empty()))
            .count()
            == 2
    });
    McastSender::new(&sender, "eth0").send_numbered(group, PORT, COUNT, Duration::from_millis(1));
    for r in &rx {
        assert_eq!(r.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{r}");
    }
    thread::sleep(Duration::from_millis(300));
    for r in &rx {
        assert_eq!(r.count(), COUNT, "{r}: duplicates");
    }
}

fn clients_of(doc: &Value) -> Vec<Value> {
    clients(doc).to_vec()
}

/// A client that forges many MACs cannot push a real client out: clients are admitted first
/// come, up to `max_clients_per_port` (32 by default; the copy set holds 32), and the forged
/// joins beyond that are refused and counted. (Before, the 32 lowest MACs won, so forged
/// `02:00:00:00:00:xx` joins took every slot.)
#[test]
fn a_client_forging_macs_cannot_push_out_a_real_one() {
    require_testbed!();
    use relay::membership::packet::{self, Message, MessageKind};
    let group: IpAddr = "239.50.2.1".parse().expect("group");
    let seg = SharedSegment::new("fg");
    let [c1, c2] = &seg.clients;
    let _relay = start(&seg, true);
    let rx1 = McastReceiver::join(c1, group, PORT, "eth0");
    wait_groups(&seg.gw, "the real client to be learned", Duration::from_secs(20), |d| {
        !clients(d).is_empty()
    });
    // 40 forged clients join from the other client's wire.
    let forged: Vec<Vec<u8>> = (1..=40u8)
        .map(|n| {
            let source = "198.18.20.3".parse().expect("address");
            let msg = Message { source, kind: MessageKind::V2Report { group } };
            packet::build([0x02, 0, 0, 0, 0, n], &msg).expect("report")
        })
        .collect();
    mcrelay_tests::loops::send_frames(c2, "eth0", &forged);
    let (doc, _) = wait_groups(&seg.gw, "forged joins refused", Duration::from_secs(20), |d| {
        d["control"]["refused"]["max_clients_per_port"].as_u64().unwrap_or(0) >= 9
    });
    assert_eq!(clients(&doc).len(), 32, "{doc:#}");
    McastSender::new(&seg.sender, "eth0").send_numbered(
        group,
        PORT,
        COUNT,
        Duration::from_millis(1),
    );
    assert_eq!(rx1.wait_for(COUNT, Duration::from_secs(20)), COUNT, "{rx1}: the real client");
}
