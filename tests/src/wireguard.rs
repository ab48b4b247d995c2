//! A real WireGuard test bed: a gateway namespace with a WireGuard hub interface and LAN hosts on
//! veth segments, and peers in their own namespaces reaching the hub over veth "WAN" links
//! (UDP endpoints). Every WireGuard device is a `wireguard-go` process (userspace: no kernel
//! module needed) driving a tun device, i.e. an L3 port without a MAC header.
//!
//! ```text
//!  peer p0 ── eth0 ═══ wan0 ─┐                         ┌─ lan0 ═══ eth0 ── LAN host h0
//!    mcwgP-N (10.66.0.10)     │  gateway (mcrelay)      │   (198.18.0.2)
//!  peer p1 ── eth0 ═══ wan1 ─┤  hub mcwgP-N (10.66.0.1) │
//!    mcwgP-N (10.66.0.11)     └─────────────────────────┘
//! ```
//!
//! - Keys are made with `wg genkey` / `wg pubkey` in a scratch directory of this run.
//! - The hub listens on UDP port [`HUB_PORT`] (on every address of the gateway). Its peer entry
//!   for peer `n` has `AllowedIPs = 10.66.0.(10+n)/32`: WireGuard routes by AllowedIPs, so
//!   multicast the gateway writes into the hub (its queries, relayed data) reaches no peer.
//! - Peer `n` has `eth0` `10.99.n.2/24` (default route via the gateway's `wann`, like a laptop),
//!   the hub as its only peer with endpoint `10.99.n.1:HUB_PORT` and `AllowedIPs` = the tunnel
//!   subnet, the LAN subnet and `224.0.0.0/4`, and routes `198.18.0.0/16` and `224.0.0.0/4` into
//!   its WireGuard interface: its multicast data and its IGMP reports (source: its tunnel
//!   address) arrive on the hub's interface, and copies the gateway sends to its tunnel address
//!   from a LAN source get through its AllowedIPs check.
//! - IPv4 only: MLD reports have a link-local source, which no peer's `/128` AllowedIPs admits.
//!
//! wireguard-go's control socket is `/var/run/wireguard/NAME.sock` whatever the network
//! namespace, and a second instance with the name of a running one exits ("UAPI listen error:
//! unix socket in use"). Every interface therefore gets a name unique to this process
//! (`mcwg<pid in hex>-<n>`, at most 15 characters); instances and sockets left behind by a
//! crashed run (whose process is gone) are removed before the first new one starts.
//!
//! Drop order: peers (their wireguard-go, then their namespace), the hub's wireguard-go, LAN
//! hosts, the gateway, the scratch directory.

use std::{
    fmt,
    fs::{self, File},
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::net::UnixStream,
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

use crate::{
    cmd::{describe, output_with_timeout, COMMAND_TIMEOUT},
    netns::{veth_pair, NetNs},
    openvpn::{link_exists, ScratchDir},
    topology::{Host, HOST_IFACE},
};

/// Where wireguard-go puts its control sockets (`NAME.sock`), shared by all namespaces.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Prefix of every WireGuard interface this test bed makes: `mcwg<pid in hex>-<n>`.
pub const NAME_PREFIX: &str = "mcwg";
/// The hub's UDP port.
pub const HUB_PORT: u16 = 51820;
/// The hub's tunnel address (`/24`); peer `n` has `10.66.0.(10+n)`.
pub const HUB_V4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);
/// The tunnel subnet.
pub const TUNNEL_SUBNET: &str = "10.66.0.0/24";
/// The LAN hosts' subnets (host `n`: `198.18.n.0/24`).
pub const LAN_SUBNET: &str = "198.18.0.0/16";
/// How long wireguard-go may take to create its interface and control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take until a ping over the tunnel is answered both ways.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long wireguard-go may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

static NEXT_IFACE: AtomicU32 = AtomicU32::new(0);

/// A WireGuard interface name unique to this process: `mcwg<pid in hex>-<n>`.
pub fn unique_iface() -> String {
    let n = NEXT_IFACE.fetch_add(1, Ordering::Relaxed);
    let name = format!("{NAME_PREFIX}{:x}-{n}", std::process::id());
    assert!(name.len() <= MAX_IFNAME, "interface name {name} longer than {MAX_IFNAME}");
    name
}

/// The process id in an interface (or socket) name `mcwg<pid in hex>-<n>[.sock]`.
fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let rest = rest.strip_suffix(".sock").unwrap_or(rest);
    let (pid, counter) = rest.split_once('-')?;
    counter.parse::<u32>().ok()?;
    u32::from_str_radix(pid, 16).ok()
}

fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The control socket of interface `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Kills wireguard-go processes of this test bed whose owning test process is gone and removes
/// their control sockets (a SIGKILLed wireguard-go leaves its socket behind).
pub fn remove_stale_instances() {
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
            let mut args = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a));
            let is_wg = args.next().is_some_and(|a| a.ends_with("wireguard-go"));
            if !is_wg {
                continue;
            }
            let stale = args
                .filter_map(|a| owner_of(&a))
                .any(|owner| owner != std::process::id() && !process_exists(owner));
            if stale {
                eprintln!("killing wireguard-go (pid {pid}) left behind by a crashed test run");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let Ok(entries) = fs::read_dir(SOCKET_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_of(&name) else { continue };
        if owner != std::process::id() && !process_exists(owner) {
            eprintln!("removing {} left behind by a crashed test run", entry.path().display());
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A `wireguard-go -f IFACE` process in a network namespace (its tun device lives there),
/// logging to a file. SIGTERM (then SIGKILL) when dropped, and its control socket removed.
pub struct WireGuardGo {
    child: Child,
    iface: String,
    what: String,
    log: PathBuf,
}

impl WireGuardGo {
    /// Starts wireguard-go for `iface` in `ns` (network namespace only), verbose log in `log`,
    /// and waits until the interface and the control socket exist.
    pub fn start(ns: &NetNs, iface: &str, log: &Path) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(remove_stale_instances);
        let socket = socket_path(iface);
        // A socket nobody listens on is a leftover (wireguard-go would replace it anyway); one
        // somebody listens on means the name is taken, and wireguard-go would exit.
        if socket.exists() && UnixStream::connect(&socket).is_err() {
            let _ = fs::remove_file(&socket);
        }
        let file = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let file2 = file.try_clone().unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let mut cmd = ns.command("wireguard-go");
        cmd.arg("-f")
            .arg(iface)
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", "verbose")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        let what = format!("`{}` in {ns}", describe(&cmd));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let mut wg = Self { child, iface: iface.to_string(), what, log: log.to_path_buf() };
        let deadline = Instant::now() + START_TIMEOUT;
        while !(socket.exists() && link_exists(ns, iface)) {
            wg.check_running();
            if Instant::now() >= deadline {
                panic!(
                    "{}: no interface or no {} after {START_TIMEOUT:?}",
                    wg.what,
                    socket.display()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        wg
    }

    /// The interface.
    pub fn iface(&self) -> &str {
        &self.iface
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

    /// SIGTERM (wireguard-go closes its tun, which removes the interface, and its socket), wait
    /// [`STOP_TIMEOUT`], then SIGKILL; the socket is removed in any case.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !matches!(self.child.try_wait(), Ok(Some(_))) {
                if Instant::now() >= deadline {
                    eprintln!("{} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it", self.what);
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = fs::remove_file(socket_path(&self.iface));
    }

    /// What runs, for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}---", self.what, self.log());
        }
    }
}

/// A WireGuard key pair (base64, as `wg` prints it); the private key is also in a file (0600)
/// for `wg set ... private-key FILE`.
pub struct KeyPair {
    /// The private key's file.
    pub private_file: PathBuf,
    /// The public key.
    pub public: String,
}

/// `wg genkey` into `dir/NAME.key`, `wg pubkey` of it.
pub fn make_key(dir: &ScratchDir, name: &str) -> KeyPair {
    let mut genkey = Command::new("wg");
    genkey.arg("genkey");
    let private = crate::cmd::run_checked(genkey);
    let private_file = dir.write(&format!("{name}.key"), &private, 0o600);
    let key = File::open(&private_file)
        .unwrap_or_else(|e| panic!("opening {}: {e}", private_file.display()));
    let out = Command::new("wg")
        .arg("pubkey")
        .stdin(key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `wg pubkey`: {e}"));
    assert!(
        out.status.success(),
        "`wg pubkey` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    KeyPair { private_file, public }
}

/// One WireGuard peer: wireguard-go in its own namespace, connected to the hub.
pub struct WgPeer {
    process: WireGuardGo,
    /// The peer's namespace.
    pub ns: NetNs,
    /// Its WireGuard interface (a unique name, see the module documentation).
    pub iface: String,
    /// Its WAN interface ([`HOST_IFACE`]).
    pub wan: String,
    /// Its tunnel address (`10.66.0.(10+n)`).
    pub v4: Ipv4Addr,
    /// Its public key.
    pub public_key: String,
    label: String,
}

impl WgPeer {
    /// The peer's wireguard-go process.
    pub fn process(&self) -> &WireGuardGo {
        &self.process
    }
}

impl fmt::Display for WgPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct WgOptions {
    /// LAN hosts, each on its own veth segment `lanN` of the gateway.
    pub lan_hosts: usize,
    /// WireGuard peers.
    pub peers: usize,
}

impl Default for WgOptions {
    fn default() -> Self {
        Self { lan_hosts: 1, peers: 2 }
    }
}

/// The whole bed; see the module documentation. Fields drop in order.
pub struct WgBed {
    /// The peers.
    pub peers: Vec<WgPeer>,
    hub: WireGuardGo,
    /// The hub's WireGuard interface in the gateway.
    pub hub_iface: String,
    /// The LAN hosts (`198.18.N.2/24`, `fd00:6d63:0:N::2/64`; `gw_port` is the gateway's `lanN`,
    /// `198.18.N.1/24`).
    pub lan: Vec<Host>,
    /// The gateway (the hub, mcrelay).
    pub gw: NetNs,
    /// Keys and logs.
    pub dir: ScratchDir,
}

impl WgBed {
    /// Builds the bed and waits until every peer answers a ping over the tunnel and the hub
    /// answers each peer's. Namespace names start with `mcr{tag}-`.
    pub fn new(tag: &str, options: WgOptions) -> Self {
        assert!(options.peers < 100 && options.lan_hosts < 100, "fewer than 100 hosts");
        let dir = ScratchDir::new();
        let gw = NetNs::new(&format!("mcr{tag}-gw"));
        // The gateway routes unicast between LAN and tunnel (not needed for multicast).
        gw.sysctl("net/ipv4/ip_forward", "1");
        let mut lan = Vec::with_capacity(options.lan_hosts);
        for n in 0..options.lan_hosts {
            let ns = NetNs::new(&format!("mcr{tag}-h{n}"));
            let gw_port = format!("lan{n}");
            veth_pair(&gw, &gw_port, &ns, HOST_IFACE);
            let octet = n as u8;
            let v4 = Ipv4Addr::new(198, 18, octet, 2);
            let v6 = Ipv6Addr::new(0xfd00, 0x6d63, 0, u16::from(octet), 0, 0, 0, 2);
            ns.add_addr(HOST_IFACE, &format!("{v4}/24"));
            ns.add_addr(HOST_IFACE, &format!("{v6}/64"));
            ns.gro_on(HOST_IFACE);
            ns.tx_off(HOST_IFACE);
            gw.add_addr(&gw_port, &format!("198.18.{octet}.1/24"));
            ns.ip(&["route", "add", "default", "via", &format!("198.18.{octet}.1")]);
            lan.push(Host { ns, iface: HOST_IFACE.to_string(), gw_port, v4, v6 });
        }

        let hub_iface = unique_iface();
        let hub_key = make_key(&dir, "hub");
        let hub = WireGuardGo::start(&gw, &hub_iface, &dir.path().join("hub.log"));
        wg_set(
            &gw,
            &[
                &hub_iface,
                "private-key",
                &path_str(&hub_key.private_file),
                "listen-port",
                &HUB_PORT.to_string(),
            ],
        );
        gw.add_addr(&hub_iface, &format!("{HUB_V4}/24"));
        gw.link_up(&hub_iface);

        let mut peers = Vec::with_capacity(options.peers);
        for n in 0..options.peers {
            let ns = NetNs::new(&format!("mcr{tag}-p{n}"));
            let wan_gw = format!("wan{n}");
            veth_pair(&gw, &wan_gw, &ns, HOST_IFACE);
            gw.add_addr(&wan_gw, &format!("10.99.{n}.1/24"));
            ns.add_addr(HOST_IFACE, &format!("10.99.{n}.2/24"));
            // Like a laptop: the default route points at the physical NIC.
            ns.ip(&["route", "add", "default", "via", &format!("10.99.{n}.1")]);

            let iface = unique_iface();
            let key = make_key(&dir, &format!("p{n}"));
            let v4 = Ipv4Addr::new(10, 66, 0, 10 + n as u8);
            wg_set(&gw, &[&hub_iface, "peer", &key.public, "allowed-ips", &format!("{v4}/32")]);
            let process = WireGuardGo::start(&ns, &iface, &dir.path().join(format!("p{n}.log")));
            let allowed = format!("{TUNNEL_SUBNET},{LAN_SUBNET},224.0.0.0/4");
            wg_set(
                &ns,
                &[
                    &iface,
                    "private-key",
                    &path_str(&key.private_file),
                    "peer",
                    &hub_key.public,
                    "allowed-ips",
                    &allowed,
                    "endpoint",
                    &format!("10.99.{n}.1:{HUB_PORT}"),
                ],
            );
            ns.add_addr(&iface, &format!("{v4}/24"));
            ns.link_up(&iface);
            ns.ip(&["route", "add", LAN_SUBNET, "dev", &iface]);
            ns.ip(&["route", "add", "224.0.0.0/4", "dev", &iface]);
            let label = format!("WireGuard peer p{n} ({iface} {v4} in {ns})");
            peers.push(WgPeer {
                process,
                ns,
                iface,
                wan: HOST_IFACE.to_string(),
                v4,
                public_key: key.public,
                label,
            });
        }
        let mut bed = Self { peers, hub, hub_iface, lan, gw, dir };
        bed.wait_connected();
        bed
    }

    /// Waits ([`CONNECT_TIMEOUT`]) until every peer's ping to the hub's tunnel address and the
    /// gateway's ping to every peer's are answered (the first ping starts the handshake; the
    /// hub learns the peer's endpoint from it). Panics with the logs otherwise.
    pub fn wait_connected(&mut self) {
        for n in 0..self.peers.len() {
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            loop {
                self.hub.check_running();
                self.peers[n].process.check_running();
                let peer = &self.peers[n];
                if ping(&peer.ns, HUB_V4) && ping(&self.gw, peer.v4) {
                    break;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "{peer}: no ping over the tunnel after {CONNECT_TIMEOUT:?}; \
                         wg show:\n{}\nlogs:\n{}",
                        wg_show(&self.gw),
                        self.logs()
                    );
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `-i lan0 ... -i HUB` for `mcrelay run`.
    pub fn iface_args(&self) -> Vec<String> {
        self.lan
            .iter()
            .map(|h| h.gw_port.clone())
            .chain(std::iter::once(self.hub_iface.clone()))
            .flat_map(|iface| ["-i".to_string(), iface])
            .collect()
    }

    /// The hub's wireguard-go process.
    pub fn hub(&self) -> &WireGuardGo {
        &self.hub
    }

    /// Every wireguard-go log, for messages.
    pub fn logs(&self) -> String {
        let mut text = format!("--- {} ---\n{}", self.hub.describe(), self.hub.log());
        for p in &self.peers {
            text.push_str(&format!("--- {} ---\n{}", p.process.describe(), p.process.log()));
        }
        text
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `wg set ARGS` in `ns` (wg finds the userspace device through its control socket).
fn wg_set(ns: &NetNs, args: &[&str]) {
    let mut argv = vec!["wg", "set"];
    argv.extend_from_slice(args);
    ns.exec(&argv);
}

/// `wg show` (every userspace device, whatever its namespace), for messages.
fn wg_show(ns: &NetNs) -> String {
    let mut cmd = ns.command("wg");
    cmd.arg("show");
    let out = output_with_timeout(cmd, COMMAND_TIMEOUT);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Whether one ping from `ns` to `to` is answered within a second.
fn ping(ns: &NetNs, to: Ipv4Addr) -> bool {
    let mut cmd = ns.command("ping");
    cmd.args(["-c", "1", "-W", "1", &to.to_string()]);
    output_with_timeout(cmd, COMMAND_TIMEOUT).status.success()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_carry_the_owner() {
        let name = unique_iface();
        assert!(name.len() <= MAX_IFNAME, "{name}");
        assert_eq!(owner_of(&name), Some(std::process::id()));
        assert_eq!(owner_of(&format!("{name}.sock")), Some(std::process::id()));
        assert_eq!(owner_of("mcwg3fffff-9999"), Some(0x3fffff));
        assert_eq!(owner_of("wg0.sock"), None);
        assert_eq!(owner_of("mcwgzz-1"), None);
        assert_eq!(owner_of("mcwg12-x"), None);
    }
}
