//! Check `tun`: routed (L3) tun devices that are not WireGuard, i.e. OpenVPN `dev tun`.
//!
//! Which side this host is on: when the process holding the tun is OpenVPN (found through
//! `/proc/PID/fdinfo`, whose `iff:` line names the tun, in this network namespace), its options
//! (command line and `--config` file) say: `server` / `server-bridge` / `mode server` make it a
//! server, anything else a client. When the owner cannot be read (not root, not OpenVPN), the
//! rule of the `wireguard` check applies: a tun is the gateway's when an mcrelay daemon runs in
//! this namespace, a client's otherwise.
//!
//! - **client**: the kernel's route for multicast (lookup of 239.255.255.250) must go out the
//!   tun, or applications and their IGMP joins use the physical NIC. On a tun (no link layer)
//!   the gateway OpenVPN puts on `route 224.0.0.0 240.0.0.0` (`via 10.8.0.1 dev tun0`) is
//!   harmless: measured, data and IGMP reports reach the server's tun. (On a tap it is not.)
//! - **server**: the pitfall measured with OpenVPN 2.6: `route 224.0.0.0 240.0.0.0` in the
//!   *server* config (not `push "route ..."`) installs `224.0.0.0/4 via 10.8.0.2 dev tun0` on
//!   the server and nothing on the clients, whose multicast then leaves through their physical
//!   NIC. And OpenVPN drops every packet a client sends from a link-local source, so MLD reports
//!   never arrive: IPv6 memberships are not learned over `dev tun` (static members instead).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rtnetlink::Handle;

use super::{
    read_sysctl,
    route::{self, Lookup, PROBE_V4},
    wireguard, Check, Context, Finding, Status,
};
use crate::ports::Link;

const ID: &str = "tun";

/// Which side of the tunnel a tun is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// What the OpenVPN process holding a tun was told (directives of its command line and config
/// file: the directive name, then its arguments, quotes removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenVpnOptions {
    pub directives: Vec<Vec<String>>,
    /// The config file, when one was read.
    pub config: Option<PathBuf>,
}

impl OpenVpnOptions {
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [String]> + 'a {
        self.directives.iter().filter(move |d| d[0] == name).map(|d| &d[1..])
    }

    /// Server (`server`, `server-bridge`, `mode server`) or client.
    pub fn side(&self) -> Side {
        let server = self.named("server").next().is_some()
            || self.named("server-bridge").next().is_some()
            || self.named("mode").any(|a| a.first().is_some_and(|m| m == "server"));
        if server {
            Side::Server
        } else {
            Side::Client
        }
    }

    /// `route NET MASK ...` directives for a multicast network, as written.
    pub fn multicast_routes(&self) -> Vec<String> {
        self.named("route")
            .filter(|args| is_multicast_route(args))
            .map(|args| format!("route {}", args.join(" ")))
            .collect()
    }

    /// Whether a `push "route NET MASK"` for a multicast network is there.
    pub fn pushes_multicast_route(&self) -> bool {
        self.named("push").any(|args| {
            let words: Vec<String> = args.join(" ").split_whitespace().map(str::to_owned).collect();
            words.first().is_some_and(|w| w == "route") && is_multicast_route(&words[1..])
        })
    }

    /// Whether the server hands out IPv6 addresses (`server-ipv6`).
    pub fn ipv6(&self) -> bool {
        self.named("server-ipv6").next().is_some()
    }
}

/// `NET [MASK]` with NET in 224.0.0.0/4.
fn is_multicast_route(args: &[String]) -> bool {
    args.first()
        .and_then(|n| n.parse::<std::net::Ipv4Addr>().ok())
        .is_some_and(|n| n.is_multicast())
}

/// Splits one config line into words; double-quoted strings are one word (OpenVPN's `push`).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The directives of an OpenVPN config file (comments, blank lines and inline `<ca>...</ca>`
/// blocks skipped; a leading `--` is allowed).
pub fn parse_config(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(tag) = &block {
            if line == format!("</{tag}>") {
                block = None;
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(tag) = line.strip_prefix('<').and_then(|t| t.strip_suffix('>')) {
            block = Some(tag.to_owned());
            continue;
        }
        let mut w = words(line);
        if let Some(first) = w.first_mut() {
            if let Some(name) = first.strip_prefix("--") {
                *first = name.to_owned();
            }
            out.push(w);
        }
    }
    out
}

/// The directives of an OpenVPN command line (`--name args...`).
pub fn parse_argv(argv: &[String]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for arg in argv.iter().skip(1) {
        if let Some(name) = arg.strip_prefix("--") {
            out.push(vec![name.to_owned()]);
        } else if let Some(last) = out.last_mut() {
            last.push(arg.clone());
        } else {
            // `openvpn FILE`: a lone config file.
            out.push(vec!["config".into(), arg.clone()]);
        }
    }
    out
}

/// The process holding tun `name` in this network namespace: its pid.
fn tun_owner(name: &str) -> Option<u32> {
    let ours = std::fs::read_link("/proc/self/ns/net").ok()?;
    let wanted = format!("iff:\t{name}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() != Some(&ours) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_to_string(fd.path()).is_ok_and(|t| t.lines().any(|l| l == wanted)) {
                return Some(pid);
            }
        }
    }
    None
}

/// The OpenVPN options of process `pid`, when it is OpenVPN and readable.
fn openvpn_of(pid: u32) -> Option<OpenVpnOptions> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let program = Path::new(argv.first()?).file_name()?.to_string_lossy().into_owned();
    if !program.starts_with("openvpn") {
        return None;
    }
    let mut options = OpenVpnOptions { directives: parse_argv(&argv), config: None };
    let config = options.named("config").next().and_then(|a| a.first().cloned());
    if let Some(config) = config {
        let base = options
            .named("cd")
            .next()
            .and_then(|a| a.first().map(PathBuf::from))
            .or_else(|| std::fs::read_link(format!("/proc/{pid}/cwd")).ok())
            .unwrap_or_default();
        let path = base.join(&config);
        if let Ok(text) = std::fs::read_to_string(&path) {
            options.directives.extend(parse_config(&text));
            options.config = Some(path);
        }
    }
    Some(options)
}

/// What is known about one tun.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunInfo {
    /// The OpenVPN options, when the owner is OpenVPN and readable.
    pub openvpn: Option<OpenVpnOptions>,
    /// The owner could be read and is not OpenVPN.
    pub not_openvpn: bool,
    pub relay_running: bool,
    /// IPv6 is enabled on the tun.
    pub ipv6: bool,
}

impl TunInfo {
    pub fn side(&self) -> Side {
        match &self.openvpn {
            Some(o) => o.side(),
            None if self.relay_running => Side::Server,
            None => Side::Client,
        }
    }
}

/// The tun devices this check looks at: L3 tuns that are not WireGuard (`--iface` only, when
/// given).
fn tuns(ctx: &Context) -> Vec<&Link> {
    ctx.links
        .iter()
        .filter(|l| ctx.iface.as_deref().is_none_or(|i| i == l.name))
        .filter(|l| l.is_tun() && !l.ether && (l.up || ctx.iface.is_some()))
        .filter(|l| wireguard::flavor(l).is_none())
        .collect()
}

/// Runs the check.
pub async fn check(handle: &Handle, ctx: &Context) -> anyhow::Result<Check> {
    let found = tuns(ctx);
    if found.is_empty() {
        let summary = match &ctx.iface {
            Some(iface) => format!("{iface} is no routed tun device (OpenVPN `dev tun`)"),
            None => "no routed tun device (OpenVPN `dev tun`)".to_owned(),
        };
        return Ok(Check { id: ID, status: Status::Ok, summary, findings: Vec::new() });
    }
    let relay_running = crate::instance::is_running();
    let v4 = route::lookup(handle, IpAddr::V4(PROBE_V4)).await?;
    let mut findings = Vec::new();
    for link in &found {
        let owner = tun_owner(&link.name);
        let openvpn = owner.and_then(openvpn_of);
        let not_openvpn = owner.is_some() && openvpn.is_none();
        let ipv6 = read_sysctl(&format!("net/ipv6/conf/{}/disable_ipv6", link.name)).as_deref()
            == Some("0");
        let info = TunInfo { openvpn, not_openvpn, relay_running, ipv6 };
        findings.extend(judge(ctx, link, &info, &v4));
    }
    let names: Vec<&str> = found.iter().map(|l| l.name.as_str()).collect();
    Ok(Check::from_findings(
        ID,
        Status::Ok,
        format!("routed tun {}: multicast routes and OpenVPN options fit", names.join(", ")),
        findings,
    ))
}

/// The client-side ways to get the route from OpenVPN.
fn openvpn_client_notes(name: &str) -> [String; 2] {
    [
        format!(
            "OpenVPN: `push \"route 224.0.0.0 240.0.0.0\"` in the server config, or `route \
             224.0.0.0 240.0.0.0` in this client's config (on `dev tun` the gateway OpenVPN puts \
             on the route is harmless), or a route-up script running: ip route replace \
             224.0.0.0/4 dev \"$dev\" ({name} here)"
        ),
        "pitfall: `route 224.0.0.0 240.0.0.0` in the server config without `push` installs the \
         route on the server only; clients get none"
            .to_owned(),
    ]
}

/// The findings for one tun (pure, unit-tested).
pub fn judge(ctx: &Context, link: &Link, info: &TunInfo, v4: &Lookup) -> Vec<Finding> {
    let name = &link.name;
    let mut findings = Vec::new();
    let into_tun = matches!(v4, Lookup::Route { oif: Some(oif), .. } if ctx.name_of(*oif) == *name);
    let owner = match (&info.openvpn, info.not_openvpn) {
        (Some(o), _) => match &o.config {
            Some(path) => format!("OpenVPN ({})", path.display()),
            None => "OpenVPN".to_owned(),
        },
        (None, true) => "not OpenVPN".to_owned(),
        (None, false) if info.relay_running => "owner unknown; mcrelay runs here".to_owned(),
        (None, false) => "owner unknown; mcrelay does not run here".to_owned(),
    };
    match info.side() {
        Side::Client => {
            // A tun of some other program (not OpenVPN) is only judged when named.
            let focus = ctx.iface.as_deref() == Some(name.as_str());
            if info.not_openvpn && !focus {
                findings.push(
                    Finding::new(
                        Status::Ok,
                        format!(
                            "{name}: held by a program that is not OpenVPN; not checked (name it \
                             with --iface {name} if it should carry multicast)"
                        ),
                    )
                    .subject(name),
                );
            } else if into_tun {
                findings.push(
                    Finding::new(
                        Status::Ok,
                        format!("{name} (client side, {owner}): multicast goes out {name}"),
                    )
                    .subject(name),
                );
            } else {
                let now = match v4 {
                    Lookup::Route { oif, .. } => format!(
                        "out {}, not {name}",
                        oif.map_or_else(|| "(no device)".to_owned(), |i| ctx.name_of(i))
                    ),
                    Lookup::NoRoute(err) => format!("nowhere (no route: {err}), not out {name}"),
                };
                let [how, pitfall] = openvpn_client_notes(name);
                findings.push(
                    Finding::new(
                        // Without --iface and without OpenVPN's word that this is a client
                        // (owner unknown): a warning, like `multicast_route`.
                        if focus || info.openvpn.is_some() {
                            Status::Problem
                        } else {
                            Status::Warn
                        },
                        format!(
                            "{name} (client side, {owner}): the kernel sends multicast \
                             ({PROBE_V4}) {now}: multicast data and IGMP joins never enter the \
                             tunnel"
                        ),
                    )
                    .subject(name)
                    .fix(route::fix_v4(name))
                    .note(how)
                    .note(pitfall),
                );
            }
        }
        Side::Server => {
            let unpushed = info
                .openvpn
                .as_ref()
                .filter(|o| !o.pushes_multicast_route())
                .map(|o| o.multicast_routes())
                .unwrap_or_default();
            if let Some(directive) = unpushed.first() {
                let file = info
                    .openvpn
                    .as_ref()
                    .and_then(|o| o.config.as_ref())
                    .map_or_else(|| "the server config".to_owned(), |p| p.display().to_string());
                let here = if into_tun {
                    format!(" (here multicast goes into {name}, also this host's own)")
                } else {
                    String::new()
                };
                let pushed = format!("push \"{directive}\"");
                findings.push(
                    Finding::new(
                        Status::Warn,
                        format!(
                            "{name} (server side, {owner}): `{directive}` in the server config \
                             routes this server only{here}; it is not pushed, so clients get no \
                             multicast route and send multicast and IGMP joins out their \
                             physical NIC"
                        ),
                    )
                    .subject(name)
                    .fix(format!("in {file}: replace `{directive}` by `{pushed}`"))
                    .note("then restart the server; clients get the route at their next connect")
                    .note(format!(
                        "to check a client: mcrelay doctor --iface TUN on it (TUN: its tun, e.g. \
                         tun0); on the server, mcrelay's TC program needs no route into {name}"
                    )),
                );
            } else {
                findings.push(
                    Finding::new(Status::Ok, format!("{name}: server side ({owner})"))
                        .subject(name)
                        .note(
                            "clients need multicast routed into their tun: push \"route \
                             224.0.0.0 240.0.0.0\" in the server config (check a client with \
                             `mcrelay doctor --iface tun0` there)",
                        ),
                );
            }
            let ipv6 = info.ipv6 || info.openvpn.as_ref().is_some_and(OpenVpnOptions::ipv6);
            if ipv6 && !info.not_openvpn {
                findings.push(
                    Finding::new(
                        Status::Warn,
                        format!(
                            "{name}: OpenVPN `dev tun` drops every client packet whose source is \
                             link-local, and MLD reports always are: IPv6 memberships are never \
                             learned on {name} (IPv4 IGMP is)"
                        ),
                    )
                    .subject(name)
                    .fix(format!("mcrelay run -i LAN -i {name} --static GROUP@{name}"))
                    .note(format!(
                        "GROUP: each IPv6 group the clients want (e.g. ff1e::1), one --static \
                         each (config: a [[static]] entry with ports = [\"{name}\"]); LAN: the \
                         LAN port(s)"
                    )),
                );
            }
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tun() -> Link {
        let mut l = Link::for_tests(4, "tun0", Some("tun"));
        l.ether = false;
        l
    }

    fn ctx() -> Context {
        Context::new(vec![Link::for_tests(2, "eth0", None), tun()], Some("tun0".into()))
    }

    fn opts(config: &str) -> OpenVpnOptions {
        OpenVpnOptions { directives: parse_config(config), config: Some("/etc/s.conf".into()) }
    }

    #[test]
    fn config_parsing() {
        let text = "# c\n;x\nserver 10.8.0.0 255.255.255.0\npush \"route 224.0.0.0 240.0.0.0\"\n\
                    <ca>\nroute 1.2.3.4\n</ca>\n--route 239.0.0.0 255.0.0.0\n";
        let d = parse_config(text);
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[1], vec!["push", "route 224.0.0.0 240.0.0.0"]);
        let o = OpenVpnOptions { directives: d, config: None };
        assert_eq!(o.side(), Side::Server);
        assert!(o.pushes_multicast_route());
        assert_eq!(o.multicast_routes(), vec!["route 239.0.0.0 255.0.0.0"]);
        let argv: Vec<String> = ["openvpn", "--cd", "/x", "--config", "c.conf", "--client"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let d = parse_argv(&argv);
        assert_eq!(d, vec![vec!["cd", "/x"], vec!["config", "c.conf"], vec!["client"]]);
    }

    #[test]
    fn client_without_route_into_the_tun() {
        let info = TunInfo {
            openvpn: Some(opts("client\ndev tun\n")),
            not_openvpn: false,
            relay_running: false,
            ipv6: true,
        };
        let eth = Lookup::Route { oif: Some(2), gateway: None };
        let check = Check::from_findings(ID, Status::Ok, "ok", judge(&ctx(), &tun(), &info, &eth));
        assert_eq!(check.status, Status::Problem);
        assert_eq!(check.fixes(), vec!["ip route replace 224.0.0.0/4 dev tun0"]);
        // OpenVPN's pushed route has a gateway: fine on a tun.
        let via = Lookup::Route { oif: Some(4), gateway: Some("10.8.0.1".parse().expect("ip")) };
        let check = Check::from_findings(ID, Status::Ok, "ok", judge(&ctx(), &tun(), &info, &via));
        assert_eq!(check.status, Status::Ok);
    }

    #[test]
    fn server_route_not_pushed() {
        let info = TunInfo {
            openvpn: Some(opts("server 10.8.0.0 255.255.255.0\nroute 224.0.0.0 240.0.0.0\n")),
            not_openvpn: false,
            relay_running: false,
            ipv6: false,
        };
        let via = Lookup::Route { oif: Some(4), gateway: Some("10.8.0.2".parse().expect("ip")) };
        let check = Check::from_findings(ID, Status::Ok, "ok", judge(&ctx(), &tun(), &info, &via));
        assert_eq!(check.status, Status::Warn);
        assert_eq!(
            check.fixes(),
            vec![
                "in /etc/s.conf: replace `route 224.0.0.0 240.0.0.0` by `push \"route 224.0.0.0 \
                 240.0.0.0\"`"
            ]
        );
        // Pushed as well: fine; IPv6 pool: the MLD warning.
        let info = TunInfo {
            openvpn: Some(opts(
                "server 10.8.0.0 255.255.255.0\nserver-ipv6 fd00::/64\npush \"route 224.0.0.0 \
                 240.0.0.0\"\n",
            )),
            ..info
        };
        let check = Check::from_findings(ID, Status::Ok, "ok", judge(&ctx(), &tun(), &info, &via));
        assert_eq!(check.status, Status::Warn);
        assert!(check.summary.contains("link-local"), "{}", check.summary);
    }

    #[test]
    fn other_programs_tun_is_judged_only_when_named() {
        let info = TunInfo { openvpn: None, not_openvpn: true, relay_running: false, ipv6: false };
        let eth = Lookup::Route { oif: Some(2), gateway: None };
        let unfocused = Context::new(vec![Link::for_tests(2, "eth0", None), tun()], None);
        let check =
            Check::from_findings(ID, Status::Ok, "ok", judge(&unfocused, &tun(), &info, &eth));
        assert_eq!(check.status, Status::Ok);
        let check = Check::from_findings(ID, Status::Ok, "ok", judge(&ctx(), &tun(), &info, &eth));
        assert_eq!(check.status, Status::Problem);
        // Owner unknown, not named: a warning.
        let info = TunInfo { not_openvpn: false, ..info };
        let check =
            Check::from_findings(ID, Status::Ok, "ok", judge(&unfocused, &tun(), &info, &eth));
        assert_eq!(check.status, Status::Warn);
    }

    #[test]
    fn unknown_owner_follows_the_relay() {
        let mut info =
            TunInfo { openvpn: None, not_openvpn: false, relay_running: true, ipv6: false };
        assert_eq!(info.side(), Side::Server);
        info.relay_running = false;
        assert_eq!(info.side(), Side::Client);
    }
}
