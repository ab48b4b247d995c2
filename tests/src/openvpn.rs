//! A real OpenVPN test bed: a gateway namespace running OpenVPN servers in TLS server mode with
//! `dev tap`, VPN clients in their own namespaces reaching the gateway over "WAN" veths, and LAN
//! hosts on veth segments of the gateway.
//!
//! ```text
//!  client c0 ── eth0 ═══ wan0 ─┐                      ┌─ lan0 ═══ eth0 ── LAN host h0
//!    tap0 (OpenVPN client)      │   gateway (mcrelay)  │
//!  client c1 ── eth0 ═══ wan1 ─┤   vpntap0 (server)   ├─ lan1 ═══ eth0 ── LAN host h1
//!    tap0 (OpenVPN client)      └──────────────────────┘
//! ```
//!
//! - Certificates (CA, one server, one per client; P-256, ECDHE only: `dh none`) are made with the
//!   `openssl` CLI in a scratch directory of this run, removed when the bed is dropped.
//! - Server `i` listens on UDP port `1194 + i` with tap `vpntap<i>` and the pool
//!   `10.8.<i>.0/24` + `fd00:8:<i>::/64` (`server` / `server-ipv6`, the server is `.1`). With [`VpnOptions::servers`]
//!   at 2, client `n` uses server `n % 2`: that puts two clients on different taps, which is the
//!   only way client-to-client multicast can pass through mcrelay (mcrelay never sends a frame
//!   back out of the port it came in on, and on one shared tap both clients are that port).
//! - Clients get fixed addresses (`client-config-dir`, `10.8.<i>.<10+n>`) and keep their tap
//!   across reconnects (`persist-tun`); the server's tap has a fixed MAC (`lladdr`) and the server
//!   tells clients to reconnect at once when it stops (`explicit-exit-notify 1`). Together these
//!   make a server restart ([`VpnBed::stop_server`], [`VpnBed::start_server`]) leave the clients'
//!   taps, sockets and ARP entries intact.
//! - `client-to-client` is off unless asked for: then everything a client sends goes into the
//!   server's tap, i.e. through the gateway's kernel where mcrelay sees it, and nothing is
//!   delivered between clients behind mcrelay's back. With it on, OpenVPN itself floods a
//!   client's multicast to every other client (and still writes it into the tap).
//! - Clients have a default route over their WAN link (like a laptop whose default route is the
//!   physical NIC) and install the multicast routes into the tunnel through OpenVPN's
//!   `route-up` hook ([`CLIENT_ROUTE_SCRIPT`]): `224.0.0.0/4 dev tap0` and, for IPv6,
//!   `multicast ff00::/8 dev tap0 table local metric 1` (unless
//!   [`VpnOptions::client_route_hook`] is off; [`VpnOptions::server_extra`] adds server
//!   directives such as `push "route ..."`).
//! - The bridge variant ([`VpnOptions::bridge`]) puts the LAN veths and the server's tap into a
//!   Linux bridge `br0` (the tap through OpenVPN's `up` hook) and uses `server-bridge`, so that
//!   clients get addresses in the LAN subnet.
//!
//! Every LAN host has GRO on (it receives frames XDP redirected into its veth peer) and TX
//! checksum offload off (it may send). OpenVPN's taps need neither: frames OpenVPN writes carry
//! full checksums and a tap takes redirected frames without NAPI.
//!
//! Drop order: clients (their OpenVPN, then their namespace), servers, LAN hosts, the gateway,
//! the scratch directory. Namespaces are [`NetNs`] guards (unique names, leftovers of crashed runs
//! swept), scratch directories of dead processes are swept when a new one is made.

use std::{
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    cmd::{output_with_timeout, run_checked, COMMAND_TIMEOUT},
    netns::{veth_pair, NetNs},
    topology::Host,
};

/// Name of the server's tap device `i` in the gateway (`vpntap0`, `vpntap1`, ...).
pub const SERVER_TAP_PREFIX: &str = "vpntap";
/// Name of every client's tap device (in the client's own namespace).
pub const CLIENT_TAP: &str = "tap0";
/// Name of the server's tun device `i` in the gateway (`vpntun0`, ...), routed variant.
pub const SERVER_TUN_PREFIX: &str = "vpntun";
/// Name of every client's tun device, routed variant.
pub const CLIENT_TUN: &str = "tun0";
/// Name of a client's and a LAN host's interface towards the gateway.
pub const HOST_IFACE: &str = "eth0";
/// The Linux bridge of the bridge variant.
pub const BRIDGE: &str = "br0";
/// First UDP port of the servers (server `i` listens on `BASE_PORT + i`).
pub const BASE_PORT: u16 = 1194;
/// How long a client may take to connect, get its addresses and ping the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long OpenVPN may take to exit after SIGTERM before it is killed (a server with
/// `explicit-exit-notify` lingers about a second to tell its clients).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Scratch directories are `TMPDIR/SCRATCH_PREFIX-PID-N`.
const SCRATCH_PREFIX: &str = "mcrovpn";

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// The `route-up` hook of every client: sends multicast into the tunnel. `$dev` is set by OpenVPN.
///
/// IPv4: the route must have no gateway. OpenVPN's own `route 224.0.0.0 240.0.0.0` always has
/// one (`via 10.8.0.1`), and then the kernel sends multicast to the gateway's unicast MAC, which
/// nothing relays. IPv6: multicast is routed by the `local` table, where the kernel has one
/// `ff00::/8` route per interface at metric 256; a route in the main table (`route-ipv6`) is
/// never consulted.
pub const CLIENT_ROUTE_SCRIPT: &str = "#!/bin/sh
# OpenVPN route-up hook: send multicast into the tunnel ($dev is set by OpenVPN).
ip route replace 224.0.0.0/4 dev \"$dev\"
ip -6 route replace multicast ff00::/8 dev \"$dev\" table local metric 1
";

/// The `up` hook of a bridged server: puts the tap into the bridge (`$1` is the tap).
pub const BRIDGE_UP_SCRIPT: &str = "#!/bin/sh
# OpenVPN up hook: make the tap a port of br0 ($1 is the tap device).
ip link set \"$1\" master br0
ip link set \"$1\" up
";

/// What to build.
#[derive(Clone, Debug)]
pub struct VpnOptions {
    /// LAN hosts, each on its own veth segment `lanN` of the gateway (or all on `br0`).
    pub lan_hosts: usize,
    /// VPN clients.
    pub clients: usize,
    /// OpenVPN server instances (taps); client `n` connects to server `n % servers`.
    pub servers: usize,
    /// OpenVPN's `client-to-client`.
    pub client_to_client: bool,
    /// The bridge variant: LAN veths and the tap in `br0`, `server-bridge` addressing.
    pub bridge: bool,
    /// Routed: `dev tun` (`topology subnet`) instead of `dev tap`; the server's device is
    /// `vpntunN`, every client's is [`CLIENT_TUN`].
    pub tun: bool,
    /// Clients run [`CLIENT_ROUTE_SCRIPT`] as their `route-up` hook (the default). Off: the
    /// clients' multicast routes are whatever OpenVPN itself installs (for the `doctor` tests).
    pub client_route_hook: bool,
    /// Lines added to every server's config (e.g. `push "route 224.0.0.0 240.0.0.0"`).
    pub server_extra: String,
}

impl Default for VpnOptions {
    fn default() -> Self {
        Self {
            lan_hosts: 2,
            clients: 2,
            servers: 1,
            client_to_client: false,
            bridge: false,
            tun: false,
            client_route_hook: true,
            server_extra: String::new(),
        }
    }
}

/// A directory under the system's temporary directory, removed (with its contents) on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `TMPDIR/mcrovpn-PID-N`, first removing leftovers of dead processes.
    pub fn new() -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_stale_scratch_dirs);
        let id = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("{SCRATCH_PREFIX}-{}-{id}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in the directory with `mode`; returns its path.
    pub fn write(&self, name: &str, contents: &str, mode: u32) -> PathBuf {
        let path = self.path.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        path
    }
}

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes `TMPDIR/mcrovpn-PID-N` directories whose process PID is gone.
fn remove_stale_scratch_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(SCRATCH_PREFIX).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let Some((pid, counter)) = rest.split_once('-') else { continue };
        if counter.parse::<u32>().is_err() {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `openssl ARGS` in `dir`; panics unless it succeeds.
fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    run_checked(cmd);
}

/// Makes a CA (`ca.crt`), a server certificate (`server.crt`/`.key`, serverAuth) and one client
/// certificate per name (`NAME.crt`/`.key`, clientAuth) in `dir`, all P-256, valid two days.
pub fn make_pki(dir: &Path, clients: &[String]) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=mcrelay-test-ca",
    ]);
    openssl(dir, &ca);
    let names = std::iter::once(("server", "serverAuth"))
        .chain(clients.iter().map(|c| (c.as_str(), "clientAuth")));
    for (name, usage) in names {
        let ext = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\n\
             extendedKeyUsage={usage}\n"
        );
        fs::write(dir.join(format!("{name}.ext")), ext)
            .unwrap_or_else(|e| panic!("writing {name}.ext: {e}"));
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subject = format!("/CN={name}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// An `openvpn --config FILE` process in a network namespace, logging to a file; SIGTERM (then
/// SIGKILL) when dropped.
pub struct OpenVpn {
    child: Child,
    what: String,
    log: PathBuf,
}

impl OpenVpn {
    /// Starts OpenVPN with `config` in `ns` (network namespace only), `--cd dir`, logging to
    /// `log`.
    pub fn start(ns: &NetNs, dir: &Path, config: &Path, log: &Path) -> Self {
        let _ = fs::remove_file(log);
        let mut cmd = ns.command("openvpn");
        cmd.arg("--cd")
            .arg(dir)
            .arg("--config")
            .arg(config)
            .arg("--log")
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let what = format!("openvpn --config {} in {ns}", config.display());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self { child, what, log: log.to_path_buf() }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (showing the log) if the process has exited.
    pub fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); log:\n{}", self.what, self.log());
        }
    }

    /// SIGTERM, wait ([`STOP_TIMEOUT`]), then SIGKILL.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What runs, for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for OpenVpn {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}---", self.what, self.log());
        }
    }
}

/// One OpenVPN server instance in the gateway.
pub struct VpnServer {
    /// The process (None while stopped).
    process: Option<OpenVpn>,
    /// Its tap device in the gateway (`vpntapN`).
    pub tap: String,
    /// Its UDP port.
    pub port: u16,
    /// The server's VPN address (the tap's, or the bridge's in the bridge variant).
    pub v4: Ipv4Addr,
    config: PathBuf,
    log: PathBuf,
}

impl VpnServer {
    /// The running process; panics when stopped.
    pub fn process(&self) -> &OpenVpn {
        self.process.as_ref().expect("the server is stopped")
    }
}

/// A VPN client: an OpenVPN client process in its own namespace.
pub struct VpnClient {
    process: OpenVpn,
    /// The client's namespace.
    pub ns: NetNs,
    /// Its tap device ([`CLIENT_TAP`]).
    pub tap: String,
    /// Its WAN interface ([`HOST_IFACE`]).
    pub wan: String,
    /// Index of the server it connects to.
    pub server: usize,
    /// The IPv4 address the server gave it.
    pub v4: Ipv4Addr,
    /// Its IPv6 address (from the server's pool, or set by the test bed in the bridge variant).
    pub v6: Ipv6Addr,
    label: String,
}

impl VpnClient {
    /// The client's OpenVPN process.
    pub fn process(&self) -> &OpenVpn {
        &self.process
    }
}

impl fmt::Display for VpnClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// The whole bed; see the module documentation. Fields drop in order.
pub struct VpnBed {
    /// The VPN clients.
    pub clients: Vec<VpnClient>,
    /// The OpenVPN servers in the gateway.
    pub servers: Vec<VpnServer>,
    /// The LAN hosts (`gw_port` is the gateway's `lanN`).
    pub lan: Vec<Host>,
    /// The gateway (OpenVPN servers, mcrelay).
    pub gw: NetNs,
    /// Certificates, configurations, logs.
    pub dir: ScratchDir,
    /// The options it was built with.
    pub options: VpnOptions,
}

/// The gateway's address on the LAN bridge (bridge variant).
const BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

impl VpnBed {
    /// Builds the bed and waits until every client is connected (see [`VpnBed::wait_connected`]).
    /// Namespace names start with `mcr{tag}-`.
    pub fn new(tag: &str, options: VpnOptions) -> Self {
        assert!(options.servers >= 1 && options.servers < 100, "1..100 servers");
        assert!(options.clients < 100 && options.lan_hosts < 100, "fewer than 100 hosts");
        assert!(!(options.bridge && options.servers != 1), "the bridge variant has one server");
        assert!(!(options.bridge && options.tun), "a tun cannot be bridged");
        let dir = ScratchDir::new();
        let client_names: Vec<String> = (0..options.clients).map(|n| format!("c{n}")).collect();
        make_pki(dir.path(), &client_names);
        dir.write("mcast-routes.sh", CLIENT_ROUTE_SCRIPT, 0o755);
        dir.write("bridge-up.sh", BRIDGE_UP_SCRIPT, 0o755);

        let gw = NetNs::new(&format!("mcr{tag}-gw"));
        // The gateway routes unicast between LAN, WAN and VPN (not needed for multicast).
        gw.sysctl("net/ipv4/ip_forward", "1");
        if options.bridge {
            gw.add_bridge(BRIDGE);
            gw.add_addr(BRIDGE, &format!("{BRIDGE_V4}/24"));
            gw.add_addr(BRIDGE, "fd00:6d63::1/64");
        }
        let mut lan = Vec::with_capacity(options.lan_hosts);
        for n in 0..options.lan_hosts {
            let ns = NetNs::new(&format!("mcr{tag}-h{n}"));
            let gw_port = format!("lan{n}");
            veth_pair(&gw, &gw_port, &ns, HOST_IFACE);
            let octet = n as u8;
            let (v4, v6, prefix) = if options.bridge {
                let v4 = Ipv4Addr::new(198, 18, 0, 10 + octet);
                (v4, Ipv6Addr::new(0xfd00, 0x6d63, 0, 0, 0, 0, 0, 0x10 + u16::from(octet)), 24)
            } else {
                let v4 = Ipv4Addr::new(198, 18, octet, 2);
                (v4, Ipv6Addr::new(0xfd00, 0x6d63, 0, u16::from(octet), 0, 0, 0, 2), 24)
            };
            ns.add_addr(HOST_IFACE, &format!("{v4}/{prefix}"));
            ns.add_addr(HOST_IFACE, &format!("{v6}/64"));
            ns.gro_on(HOST_IFACE);
            ns.tx_off(HOST_IFACE);
            if options.bridge {
                gw.set_master(&gw_port, BRIDGE);
                ns.ip(&["route", "add", "default", "via", &BRIDGE_V4.to_string()]);
            } else {
                gw.add_addr(&gw_port, &format!("198.18.{octet}.1/24"));
                ns.ip(&["route", "add", "default", "via", &format!("198.18.{octet}.1")]);
            }
            lan.push(Host { ns, iface: HOST_IFACE.to_string(), gw_port, v4, v6 });
        }

        // Fixed client addresses (client-config-dir): a client that reconnects after a server
        // restart pulls the same options and keeps its tap (persist-tun). With pool addresses
        // handed out in connection order, clients may swap addresses, and OpenVPN then closes
        // and reopens the tap ("Pulled options changed on restart"), dropping its memberships.
        let ccd = dir.path().join("ccd");
        fs::create_dir_all(&ccd).unwrap_or_else(|e| panic!("creating {}: {e}", ccd.display()));
        for (n, name) in client_names.iter().enumerate() {
            let server = n % options.servers;
            let host = 10 + n;
            let push = if options.bridge {
                format!("ifconfig-push 198.18.0.{} 255.255.255.0\n", 100 + n)
            } else {
                format!(
                    "ifconfig-push 10.8.{server}.{host} 255.255.255.0\n\
                     ifconfig-ipv6-push fd00:8:{server}::{host}/64 fd00:8:{server}::1\n"
                )
            };
            dir.write(&format!("ccd/{name}"), &push, 0o644);
        }

        let mut servers = Vec::with_capacity(options.servers);
        for i in 0..options.servers {
            let tap = if options.tun {
                format!("{SERVER_TUN_PREFIX}{i}")
            } else {
                format!("{SERVER_TAP_PREFIX}{i}")
            };
            let device = if options.tun {
                format!("dev {tap}\ndev-type tun\ntopology subnet\n")
            } else {
                format!("dev {tap}\ndev-type tap\nlladdr 02:6d:63:76:00:{i:02x}\n")
            };
            let port = BASE_PORT + i as u16;
            let (v4, addressing) = if options.bridge {
                (BRIDGE_V4, format!("server-bridge {BRIDGE_V4} 255.255.255.0 198.18.0.100 198.18.0.199\nscript-security 2\nup {}/bridge-up.sh\n", dir.path().display()))
            } else {
                (
                    Ipv4Addr::new(10, 8, i as u8, 1),
                    format!("server 10.8.{i}.0 255.255.255.0\nserver-ipv6 fd00:8:{i}::/64\n"),
                )
            };
            let c2c = if options.client_to_client { "client-to-client\n" } else { "" };
            let extra = if options.server_extra.is_empty() {
                String::new()
            } else {
                format!("{}\n", options.server_extra.trim_end())
            };
            let config = dir.write(
                &format!("server{i}.conf"),
                &format!(
                    "# OpenVPN server {i} of the mcrelay test bed\n\
                     {device}\
                     proto udp\nport {port}\n\
                     {addressing}{c2c}{extra}\
                     client-config-dir ccd\n\
                     ca ca.crt\ncert server.crt\nkey server.key\ndh none\n\
                     keepalive 1 5\nexplicit-exit-notify 1\nverb 3\n"
                ),
                0o600,
            );
            let log = dir.path().join(format!("server{i}.log"));
            let process = Some(OpenVpn::start(&gw, dir.path(), &config, &log));
            servers.push(VpnServer { process, tap, port, v4, config, log });
        }

        let mut clients = Vec::with_capacity(options.clients);
        let (client_dev, client_dev_type) =
            if options.tun { (CLIENT_TUN, "tun") } else { (CLIENT_TAP, "tap") };
        let route_hook = if options.client_route_hook {
            format!("script-security 2\nroute-up {}/mcast-routes.sh\n", dir.path().display())
        } else {
            String::new()
        };
        for (n, name) in client_names.iter().enumerate() {
            let ns = NetNs::new(&format!("mcr{tag}-{name}"));
            let wan_gw = format!("wan{n}");
            veth_pair(&gw, &wan_gw, &ns, HOST_IFACE);
            gw.add_addr(&wan_gw, &format!("10.99.{n}.1/24"));
            ns.add_addr(HOST_IFACE, &format!("10.99.{n}.2/24"));
            // Like a laptop: the default route points at the physical NIC.
            ns.ip(&["route", "add", "default", "via", &format!("10.99.{n}.1")]);
            let server = n % options.servers;
            let config = dir.write(
                &format!("{name}.conf"),
                &format!(
                    "# OpenVPN client {name} of the mcrelay test bed\n\
                     client\ndev {client_dev}\ndev-type {client_dev_type}\nproto udp\n\
                     remote 10.99.{n}.1 {}\nnobind\nconnect-retry 1 1\n\
                     ca ca.crt\ncert {name}.crt\nkey {name}.key\nremote-cert-tls server\n\
                     persist-tun\n{route_hook}verb 3\n",
                    servers[server].port,
                ),
                0o600,
            );
            let log = dir.path().join(format!("{name}.log"));
            let process = OpenVpn::start(&ns, dir.path(), &config, &log);
            let label = format!("VPN client {name} ({client_dev} in {ns}, server {server})");
            clients.push(VpnClient {
                process,
                ns,
                tap: client_dev.to_string(),
                wan: HOST_IFACE.to_string(),
                server,
                v4: Ipv4Addr::UNSPECIFIED,
                v6: Ipv6Addr::UNSPECIFIED,
                label,
            });
        }
        let mut bed = Self { clients, servers, lan, gw, dir, options };
        bed.wait_connected();
        bed
    }

    /// Waits ([`CONNECT_TIMEOUT`]) until every client's tap has its IPv4 (and IPv6) address, the
    /// multicast routes point into the tunnel (with the route-up hook) and the server answers a
    /// ping through it; records
    /// the addresses. Panics with the OpenVPN logs otherwise.
    pub fn wait_connected(&mut self) {
        let bridge = self.options.bridge;
        let hook = self.options.client_route_hook;
        for n in 0..self.clients.len() {
            let server_v4 = self.servers[self.clients[n].server].v4;
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            loop {
                let client = &mut self.clients[n];
                client.process.check_running();
                if let Some((v4, v6)) = connected(client, server_v4, bridge, hook) {
                    client.v4 = v4;
                    client.v6 = v6;
                    break;
                }
                if Instant::now() >= deadline {
                    let server = &self.servers[client.server];
                    panic!(
                        "{client} not connected after {CONNECT_TIMEOUT:?}; client log:\n{}\n\
                         server log ({}):\n{}",
                        client.process.log(),
                        server.config.display(),
                        server.process.as_ref().map(OpenVpn::log).unwrap_or_default()
                    );
                }
                thread::sleep(Duration::from_millis(100));
            }
            if bridge && self.clients[n].v6.is_unspecified() {
                let v6 = Ipv6Addr::new(0xfd00, 0x6d63, 0, 0, 0, 0, 0, 0x100 + n as u16);
                self.clients[n].ns.add_addr(CLIENT_TAP, &format!("{v6}/64"));
                self.clients[n].v6 = v6;
            }
        }
    }

    /// Stops server `i` (SIGTERM; its tap goes away) and waits until its tap is gone.
    pub fn stop_server(&mut self, i: usize) {
        let server = &mut self.servers[i];
        if let Some(mut process) = server.process.take() {
            process.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while link_exists(&self.gw, &server.tap) {
            if Instant::now() >= deadline {
                panic!("{} still exists 30 s after OpenVPN stopped", server.tap);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts server `i` again (same configuration: a new tap with the same name).
    pub fn start_server(&mut self, i: usize) {
        let server = &mut self.servers[i];
        assert!(server.process.is_none(), "server {i} is running");
        server.process =
            Some(OpenVpn::start(&self.gw, self.dir.path(), &server.config, &server.log));
    }

    /// `-i lan0 -i lan1 ... -i vpntap0 ...` for `mcrelay run`.
    pub fn iface_args(&self) -> Vec<String> {
        self.lan
            .iter()
            .map(|h| h.gw_port.clone())
            .chain(self.servers.iter().map(|s| s.tap.clone()))
            .flat_map(|iface| ["-i".to_string(), iface])
            .collect()
    }

    /// Every OpenVPN log, for messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for s in &self.servers {
            if let Some(p) = &s.process {
                text.push_str(&format!("--- {} ---\n{}", p.describe(), p.log()));
            }
        }
        for c in &self.clients {
            text.push_str(&format!("--- {} ---\n{}", c.process.describe(), c.process.log()));
        }
        text
    }
}

/// Whether `iface` exists in `ns` (by name).
pub fn link_exists(ns: &NetNs, iface: &str) -> bool {
    ns.in_netns(|| nix::net::if_::if_nametoindex(iface).is_ok())
}

/// The client's (IPv4, IPv6) addresses once it is fully connected, else `None`.
fn connected(
    client: &VpnClient,
    server_v4: Ipv4Addr,
    bridge: bool,
    hook: bool,
) -> Option<(Ipv4Addr, Ipv6Addr)> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", client.ns.name(), "-j", "addr", "show", "dev", &client.tap]);
    let out = output_with_timeout(cmd, COMMAND_TIMEOUT);
    if !out.status.success() {
        return None;
    }
    let doc: Value = serde_json::from_slice(&out.stdout).ok()?;
    let addrs = doc.get(0)?.get("addr_info")?.as_array()?.clone();
    let find = |family: &str| {
        addrs
            .iter()
            .filter(|a| a["family"] == family && a["scope"] == "global")
            .find_map(|a| a["local"].as_str()?.parse::<IpAddr>().ok())
    };
    let Some(IpAddr::V4(v4)) = find("inet") else { return None };
    let v6 = match find("inet6") {
        Some(IpAddr::V6(v6)) => v6,
        _ if bridge => Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    // The route-up hook has run (it runs after OpenVPN's own routes).
    if hook && !client.ns.ip(&["route", "show", "224.0.0.0/4"]).contains(&client.tap) {
        return None;
    }
    let mut ping = client.ns.command("ping");
    ping.args(["-c", "1", "-W", "1", &server_v4.to_string()]);
    output_with_timeout(ping, COMMAND_TIMEOUT).status.success().then_some((v4, v6))
}
