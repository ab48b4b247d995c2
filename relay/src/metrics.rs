//! Prometheus endpoint: `GET /metrics` in the OpenMetrics text format (which Prometheus
//! scrapes natively), gathered at scrape time from the same sources the CLI reads: the pinned
//! maps (per-port counters, attach mode) and the daemon's state file (groups, queriers,
//! control-plane counters). Nothing is cached between scrapes, so the endpoint shows the
//! kernel's counters even while the daemon restarts.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `mcrelay_build_info` | info | `version` |
//! | `mcrelay_dataplane_up` | gauge | - (1: the pinned maps were readable) |
//! | `mcrelay_control_up` | gauge | - (1: the daemon's state file was readable) |
//! | `mcrelay_port_info` | gauge (1) | `iface`, `ifindex`, `mode` (native/skb/tc), `role` |
//! | `mcrelay_port_standby` | gauge (0/1) | `iface`, `reason` (loop guard) |
//! | `mcrelay_port_packets_total` | counter | `iface`, `reason` (the `Counter` names) |
//! | `mcrelay_port_bytes_total` | counter | `iface`, `reason` |
//! | `mcrelay_groups` | gauge | `kind` (static/learned) |
//! | `mcrelay_group_ports` | gauge | `group`, `kind`: ports of the (*,G) entry |
//! | `mcrelay_group_source_entries` | gauge | `group`, `kind`: (S,G) entries |
//! | `mcrelay_group_members` | gauge | `group`, `kind`: ports with learned membership |
//! | `mcrelay_group_updates_total` | counter | - (group port-set changes: joins and leaves) |
//! | `mcrelay_control_received_total` | counter | - |
//! | `mcrelay_control_ignored_total` | counter | `reason` (other_port, not_membership) |
//! | `mcrelay_control_malformed_total` | counter | `reason` |
//! | `mcrelay_control_relayed_total` | counter | - |
//! | `mcrelay_queries_sent_total` | counter | - |
//! | `mcrelay_control_send_errors_total` | counter | - |
//! | `mcrelay_tc_targets_cut_total` | counter | - (port sets cut at 32 TC targets) |
//! | `mcrelay_join_to_forward_seconds` | gauge | `stat` (last, max, last_done) |
//! | `mcrelay_querier_is_self` | gauge | `port`, `family`, `address` |
//! | `mcrelay_router_ports` | gauge | - |
//! | `mcrelay_state_age_seconds` | gauge | - (age of the state file) |

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};
use relay_common::{Counter as PortCounter, LAYOUT_VERSION};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

use crate::{inspect::PortRow, paths, state::DaemonState};

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Limits that keep the endpoint from being held or exhausted by clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is answered `503 Service Unavailable` at once and
    /// closed.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (idle keep-alive included).
    pub read_timeout: Duration,
    /// The longest one connection is kept, whatever it does (slow readers of the response).
    pub connection_timeout: Duration,
    /// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS...) before the next one, so that
    /// a full descriptor table does not turn the loop into a busy one.
    pub accept_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
            accept_backoff: Duration::from_millis(100),
        }
    }
}

/// At most one accept-error log line per this interval (the others are counted in it).
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Sent to a connection over [`Limits::max_connections`].
const BUSY_RESPONSE: &[u8] = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "content-type: text/plain\r\n",
    "content-length: 29\r\n",
    "connection: close\r\n",
    "retry-after: 1\r\n",
    "\r\n",
    "too many metrics connections\n",
)
.as_bytes();

/// Serves `GET /metrics` on `listen` until the task is dropped or aborted (open connections
/// go with it). Other paths answer 404, other methods on `/metrics` 405.
///
/// The pins and the state file are those of the network namespace of the thread that first
/// polls this future (normally the daemon's only namespace).
pub async fn serve(listen: SocketAddr, pin_root: PathBuf) -> anyhow::Result<()> {
    let sources = Sources::of_current_netns(&pin_root)?;
    let listener =
        TcpListener::bind(listen).await.with_context(|| format!("metrics: binding {listen}"))?;
    tracing::debug!(address = %listener.local_addr().unwrap_or(listen), "metrics endpoint listening");
    serve_on(listener, sources).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address first), with
/// the default [`Limits`]. Never returns: accept errors are logged and survived.
pub async fn serve_on(listener: TcpListener, sources: Sources) -> anyhow::Result<()> {
    serve_with(|| listener.accept(), sources, Limits::default()).await
}

/// The accept loop, with `accept` standing for the listener's (tests inject failures).
async fn serve_with<A, F>(mut accept: A, sources: Sources, limits: Limits) -> anyhow::Result<()>
where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<(TcpStream, SocketAddr)>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut accept_errors = AcceptErrors::default();
    loop {
        let (stream, peer) = match accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_errors.note(&e);
                tokio::time::sleep(limits.accept_backoff).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Best effort, without waiting: the client learns why, nobody is held up.
            let _ = stream.try_write(BUSY_RESPONSE);
            tracing::debug!(%peer, "metrics: {} connections open, refusing one more", limits.max_connections);
            continue;
        };
        let sources = sources.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(respond(&request, sources).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics connection: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
            }
        });
    }
}

/// Rate-limited logging of failed `accept`s.
#[derive(Debug, Default)]
struct AcceptErrors {
    last_logged: Option<std::time::Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// Logs `e` unless an error was logged within [`ACCEPT_ERROR_LOG_INTERVAL`]; returns
    /// whether it logged.
    fn note(&mut self, e: &std::io::Error) -> bool {
        let now = std::time::Instant::now();
        if self.last_logged.is_some_and(|t| now.duration_since(t) < ACCEPT_ERROR_LOG_INTERVAL) {
            self.suppressed += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(
            "metrics: accepting a connection failed: {e} (retrying; {suppressed} more such \
             errors since the last message)"
        );
        self.last_logged = Some(now);
        true
    }
}

/// An endpoint running on a thread of its own (with its own single-threaded tokio runtime),
/// stopped when dropped. For callers without a tokio runtime, and tests.
pub struct Background {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Binds `listen` now (port 0 picks a free port: see [`Background::local_addr`]) and
    /// serves from a new thread. The thread inherits the caller's network namespace, and the
    /// sources are those of that namespace.
    pub fn spawn(listen: SocketAddr, pin_root: &Path) -> anyhow::Result<Self> {
        let sources = Sources::of_current_netns(pin_root)?;
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("metrics: binding {listen}"))?;
        let local_addr = listener.local_addr().context("metrics: local address")?;
        listener.set_nonblocking(true).context("metrics: non-blocking listener")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("metrics: tokio runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mcrelay-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => return tracing::warn!("metrics: listener: {e}"),
                    };
                    tokio::select! {
                        result = serve_on(listener, sources) => {
                            if let Err(e) = result {
                                tracing::warn!("metrics endpoint stopped: {e:#}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
            })
            .context("metrics: starting the thread")?;
        Ok(Self { local_addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where one instance keeps what the endpoint reports.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The pinned maps (`paths::pin_dir`).
    pub pin_dir: PathBuf,
    /// The daemon's state file (`paths::state_file`).
    pub state_file: PathBuf,
}

impl Sources {
    /// The pins under `pin_root` and the state file of the calling thread's network namespace.
    ///
    /// Same layout as [`paths::pin_dir`] and [`paths::state_file`], but keyed by
    /// `/proc/thread-self/ns/net` rather than `/proc/self/ns/net` (the main thread's), so that
    /// a thread that entered another namespace (tests, a future multi-namespace daemon) reports
    /// on that namespace's instance.
    pub fn of_current_netns(pin_root: &Path) -> anyhow::Result<Self> {
        let id = std::fs::metadata("/proc/thread-self/ns/net")
            .context("reading /proc/thread-self/ns/net")?
            .ino();
        Ok(Self {
            pin_dir: pin_root.join(format!("ns-{id}")).join(format!("v{LAYOUT_VERSION}")),
            state_file: Path::new(paths::RUN_DIR).join(format!("ns-{id}.state.json")),
        })
    }
}

type Response = hyper::Response<Full<Bytes>>;

async fn respond(request: &hyper::Request<Incoming>, sources: Sources) -> Response {
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    // Map lookups and the file read block: off the runtime's worker threads.
    let snapshot = match tokio::task::spawn_blocking(move || Snapshot::gather(&sources)).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            tracing::warn!("metrics: gathering failed: {e}");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "gathering the metrics failed\n");
        }
    };
    match render(&snapshot) {
        Ok(text) => hyper::Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response\n")),
        Err(e) => {
            tracing::warn!("metrics: encoding failed: {e:#}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    response
}

/// What one scrape reports: each source is `None` when it could not be read (no daemon).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Ports and their counters from the pinned maps.
    pub ports: Option<Vec<PortRow>>,
    /// The daemon's state file, and its age in milliseconds.
    pub state: Option<(DaemonState, u64)>,
}

impl Snapshot {
    /// Reads the pinned maps and the state file now.
    pub fn gather(sources: &Sources) -> Self {
        let ports = crate::inspect::read_ports(&sources.pin_dir)
            .map_err(|e| tracing::debug!("metrics: pinned maps: {e:#}"))
            .ok();
        let state = if sources.state_file.exists() {
            crate::state::read(&sources.state_file)
                .map_err(|e| tracing::debug!("metrics: state file: {e:#}"))
                .ok()
                .map(|state| {
                    let age = crate::state::unix_ms().saturating_sub(state.written_unix_ms);
                    (state, age)
                })
        } else {
            None
        };
        Self { ports, state }
    }
}

type Labels = Vec<(String, String)>;

fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Renders a snapshot in the OpenMetrics text format.
pub fn render(snapshot: &Snapshot) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("mcrelay");
    registry.register(
        "build",
        "mcrelay version",
        Info::new(labels([("version", env!("CARGO_PKG_VERSION"))])),
    );
    gauge(
        &mut registry,
        "dataplane_up",
        "1 when the pinned maps of this namespace's instance were readable",
        i64::from(snapshot.ports.is_some()),
    );
    gauge(
        &mut registry,
        "control_up",
        "1 when the daemon's state file was readable",
        i64::from(snapshot.state.is_some()),
    );
    if let Some(ports) = &snapshot.ports {
        render_ports(&mut registry, ports);
    }
    if let Some((state, age_ms)) = &snapshot.state {
        render_state(&mut registry, state, *age_ms);
    }
    let mut text = String::new();
    encode(&mut text, &registry).context("encoding metrics")?;
    Ok(text)
}

fn render_ports(registry: &mut Registry, ports: &[PortRow]) {
    let info = Family::<Labels, Gauge>::default();
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let standby = Family::<Labels, Gauge>::default();
    for port in ports {
        let ifindex = port.ifindex.to_string();
        standby
            .get_or_create(&labels([("iface", &port.iface), ("reason", port.standby_reason)]))
            .set(i64::from(!port.standby_reason.is_empty()));
        info.get_or_create(&labels([
            ("iface", &port.iface),
            ("ifindex", &ifindex),
            ("mode", port.mode),
            ("role", port.role),
        ]))
        .set(1);
        for c in PortCounter::ALL {
            let key = labels([("iface", &port.iface), ("reason", c.name())]);
            packets.get_or_create(&key).inc_by(port.counters.packets[c as usize]);
            bytes.get_or_create(&key).inc_by(port.counters.bytes[c as usize]);
        }
    }
    registry.register(
        "port_info",
        "Attached port: attach mode (native, skb, tc) and role (member, router); value 1",
        info,
    );
    registry.register(
        "port_standby",
        "1 while the loop guard keeps the port in standby (it relays nothing and gets no \
         copies), with the reason",
        standby,
    );
    registry.register(
        "port_packets",
        "Multicast-MAC frames received on the port, by what happened to them",
        packets,
    );
    registry.register(
        "port_bytes",
        "Bytes of multicast-MAC frames received on the port, by what happened to them",
        bytes,
    );
}

/// The control plane's counters.
fn render_control(registry: &mut Registry, c: &crate::state::ControlCounters) {
    counter(
        registry,
        "group_updates",
        "Changes of a group's port set written to the dataplane (joins and leaves)",
        c.group_updates,
    );
    counter(
        registry,
        "control_received",
        "IGMP/MLD/PIM frames received on ports by the control loop",
        c.received,
    );
    let ignored = Family::<Labels, Counter>::default();
    ignored.get_or_create(&labels([("reason", "other_port")])).inc_by(c.ignored_other_port);
    ignored.get_or_create(&labels([("reason", "not_membership")])).inc_by(c.ignored_not_membership);
    ignored.get_or_create(&labels([("reason", "loop")])).inc_by(c.ignored_loop);
    ignored.get_or_create(&labels([("reason", "rate_limited")])).inc_by(c.rate_limited);
    ignored
        .get_or_create(&labels([("reason", "router_signal_on_no_learn_port")]))
        .inc_by(c.router_signals_ignored);
    registry.register("control_ignored", "Control frames ignored, by reason", ignored);
    let refused = Family::<Labels, Counter>::default();
    for (reason, n) in &c.refused {
        refused.get_or_create(&labels([("reason", reason)])).inc_by(*n);
    }
    registry.register(
        "memberships_refused",
        "Memberships not taken: a limit ([limits]) or an any-source join to an SSM group",
        refused,
    );
    counter(
        registry,
        "control_dropped",
        "Control frames the kernel dropped because the daemon's receive queue was full",
        c.capture_drops,
    );
    counter(
        registry,
        "hellos_received",
        "Loop-guard hellos received from relays",
        c.hellos_received,
    );
    counter(
        registry,
        "map_write_errors",
        "Group map writes that failed (retried on the next round)",
        c.map_errors,
    );
    counter(
        registry,
        "tc_targets_cut",
        "Port-set writes whose TC array was cut at 32 ports and peers (the rest get no TC copy)",
        c.tc_targets_cut,
    );
    counter(
        registry,
        "queries_skipped_no_address",
        "MLD queries not sent because the port had no IPv6 link-local address yet",
        c.queries_skipped_no_address,
    );
    let malformed = Family::<Labels, Counter>::default();
    for (reason, n) in &c.malformed {
        malformed.get_or_create(&labels([("reason", reason)])).inc_by(*n);
    }
    registry.register("control_malformed", "Malformed control messages, by reason", malformed);
    counter(
        registry,
        "control_relayed",
        "Reports and leaves relayed to router ports, queries of other queriers relayed to other \
         ports (RFC 4541)",
        c.relayed,
    );
    counter(registry, "queries_sent", "General and specific queries sent", c.queries_sent);
    counter(
        registry,
        "control_send_errors",
        "Control frames that could not be sent",
        c.send_errors,
    );
}

fn render_state(registry: &mut Registry, state: &DaemonState, age_ms: u64) {
    let groups = Family::<Labels, Gauge>::default();
    for kind in ["static", "learned"] {
        groups.get_or_create(&labels([("kind", kind)])).set(0);
    }
    let group_ports = Family::<Labels, Gauge>::default();
    let group_sources = Family::<Labels, Gauge>::default();
    let group_members = Family::<Labels, Gauge>::default();
    for g in &state.groups {
        groups.get_or_create(&labels([("kind", &g.kind)])).inc();
        let key = labels([("group", &g.group), ("kind", &g.kind)]);
        group_ports.get_or_create(&key).set(count(g.ports.len()));
        group_sources.get_or_create(&key).set(count(g.sources.len()));
        group_members.get_or_create(&key).set(count(g.members.len()));
    }
    registry.register("groups", "Groups with a port set, by kind", groups);
    registry.register(
        "group_ports",
        "Ports in the group's any-source (*,G) entry (static, learned and router ports)",
        group_ports,
    );
    registry.register(
        "group_source_entries",
        "Source-specific (S,G) entries of the group",
        group_sources,
    );
    registry.register(
        "group_members",
        "Ports with learned (IGMP/MLD) membership in the group",
        group_members,
    );

    render_control(registry, &state.control);
    let latency = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (stat, us) in [
        ("last", state.control.last_update_us),
        ("max", state.control.max_update_us),
        ("last_done", state.control.last_update_done_us),
    ] {
        latency.get_or_create(&labels([("stat", stat)])).set(us as f64 / 1e6);
    }
    registry.register_with_unit(
        "join_to_forward",
        "From a report's arrival to the map update it caused (last, max; last_done: until \
         the update syscall returned)",
        Unit::Seconds,
        latency,
    );
    let queriers = Family::<Labels, Gauge>::default();
    for q in &state.queriers {
        queriers
            .get_or_create(&labels([
                ("port", &q.port),
                ("family", &q.family),
                ("address", &q.address),
            ]))
            .set(i64::from(q.is_self));
    }
    registry.register(
        "querier_is_self",
        "Elected querier per port and family: 1 when it is mcrelay",
        queriers,
    );
    gauge(
        registry,
        "router_ports",
        "Ports leading to multicast routers",
        count(state.router_ports.len()),
    );
    let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    age.set(age_ms as f64 / 1000.0);
    registry.register_with_unit(
        "state_age",
        "Age of the daemon's state file (rewritten after changes)",
        Unit::Seconds,
        age,
    );
}

#[cfg(test)]
mod tests {
    use relay_common::PortCounters;

    use super::*;
    use crate::state::{GroupState, MemberState, QuerierState, SourcePorts};

    fn port(iface: &str, ifindex: u32, forwarded: u64) -> PortRow {
        let mut counters = PortCounters::default();
        counters.packets[PortCounter::Forwarded as usize] = forwarded;
        counters.bytes[PortCounter::Forwarded as usize] = forwarded * 100;
        counters.packets[PortCounter::Malformed as usize] = 2;
        PortRow {
            iface: iface.into(),
            ifindex,
            mode: "native",
            role: "member",
            standby_reason: "",
            receives_copies: true,
            counters,
        }
    }

    fn state() -> DaemonState {
        let mut control = crate::control::ControlCounters {
            received: 7,
            queries_sent: 3,
            group_updates: 5,
            relayed: 1,
            max_update_us: 1500,
            ..Default::default()
        };
        control.malformed.insert("bad_checksum".into(), 4);
        DaemonState {
            written_unix_ms: 0,
            pid: 1,
            groups: vec![
                GroupState {
                    group: "239.1.1.1".into(),
                    kind: "static".into(),
                    ports: vec!["b0".into(), "c0".into()],
                    sources: vec![],
                    members: vec![],
                },
                GroupState {
                    group: "ff3e::1".into(),
                    kind: "learned".into(),
                    ports: vec![],
                    sources: vec![SourcePorts {
                        source: "fd00::1".into(),
                        ports: vec!["b0".into()],
                    }],
                    members: vec![MemberState {
                        port: "b0".into(),
                        mode: "include".into(),
                        timer_ms: None,
                        compat: "mldv2".into(),
                        sources: vec![],
                    }],
                },
            ],
            queriers: vec![QuerierState {
                port: "b0".into(),
                family: "ipv4".into(),
                address: "198.18.1.1".into(),
                is_self: true,
            }],
            router_ports: vec![],
            control,
            clients: vec![],
            not_taken: vec![],
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn renders_ports_groups_and_control() {
        let text = render(&Snapshot {
            ports: Some(vec![port("b0", 3, 10), port("c0", 4, 0)]),
            state: Some((state(), 1500)),
        })
        .expect("render");
        let lines = lines(&text);
        for expected in [
            format!("mcrelay_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
            "mcrelay_dataplane_up 1".into(),
            "mcrelay_control_up 1".into(),
            "mcrelay_port_info{iface=\"b0\",ifindex=\"3\",mode=\"native\",role=\"member\"} 1"
                .into(),
            "mcrelay_port_standby{iface=\"b0\",reason=\"\"} 0".into(),
            "mcrelay_port_packets_total{iface=\"b0\",reason=\"forwarded\"} 10".into(),
            "mcrelay_port_bytes_total{iface=\"b0\",reason=\"forwarded\"} 1000".into(),
            "mcrelay_port_packets_total{iface=\"c0\",reason=\"malformed\"} 2".into(),
            "mcrelay_port_packets_total{iface=\"c0\",reason=\"drop_no_members\"} 0".into(),
            "mcrelay_groups{kind=\"static\"} 1".into(),
            "mcrelay_groups{kind=\"learned\"} 1".into(),
            "mcrelay_group_ports{group=\"239.1.1.1\",kind=\"static\"} 2".into(),
            "mcrelay_group_source_entries{group=\"ff3e::1\",kind=\"learned\"} 1".into(),
            "mcrelay_group_members{group=\"ff3e::1\",kind=\"learned\"} 1".into(),
            "mcrelay_group_updates_total 5".into(),
            "mcrelay_control_received_total 7".into(),
            "mcrelay_control_malformed_total{reason=\"bad_checksum\"} 4".into(),
            "mcrelay_control_relayed_total 1".into(),
            "mcrelay_queries_sent_total 3".into(),
            "mcrelay_join_to_forward_seconds{stat=\"max\"} 0.0015".into(),
            "mcrelay_querier_is_self{port=\"b0\",family=\"ipv4\",address=\"198.18.1.1\"} 1".into(),
            "mcrelay_router_ports 0".into(),
            "mcrelay_state_age_seconds 1.5".into(),
        ] {
            assert!(lines.contains(&expected.as_str()), "missing {expected:?} in:\n{text}");
        }
        assert!(text.contains("# TYPE mcrelay_port_packets counter"), "{text}");
        assert!(text.contains("# TYPE mcrelay_build info"), "{text}");
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    }

    #[test]
    fn without_a_daemon_only_build_info_and_up_gauges() {
        let text = render(&Snapshot::default()).expect("render");
        assert!(text.contains("mcrelay_dataplane_up 0"), "{text}");
        assert!(text.contains("mcrelay_control_up 0"), "{text}");
        assert!(text.contains("mcrelay_build_info{"), "{text}");
        assert!(!text.contains("mcrelay_port_"), "{text}");
        assert!(!text.contains("mcrelay_groups"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut row = port("we\"ird", 9, 1);
        row.iface = "we\"ird\\".into();
        let text = render(&Snapshot { ports: Some(vec![row]), state: None }).expect("render");
        assert!(text.contains(r#"iface="we\"ird\\""#), "{text}");
    }

    /// A server with `limits` on a thread of its own whose first `failing_accepts` accepts
    /// fail with EMFILE; stopped when the returned sender drops.
    fn spawn_server(
        limits: Limits,
        failing_accepts: usize,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("non-blocking");
        let dir = std::env::temp_dir().join(format!("mcrelay-metrics-{}", std::process::id()));
        let sources =
            Sources { pin_dir: dir.join("no-pins"), state_file: dir.join("no-state.json") };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("listener");
                let mut failures = failing_accepts;
                let accept = || {
                    let fail = failures > 0;
                    failures = failures.saturating_sub(1);
                    let listener = &listener;
                    async move {
                        if fail {
                            return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
                        }
                        listener.accept().await
                    }
                };
                tokio::select! {
                    _ = serve_with(accept, sources, limits) => {}
                    _ = stopped => {}
                }
            });
        });
        (addr, stop)
    }

    /// `GET /metrics` over HTTP/1.0; the status line (empty when the server closed at once).
    fn scrape(addr: SocketAddr) -> String {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text.lines().next().unwrap_or_default().to_owned()
    }

    fn test_limits() -> Limits {
        Limits {
            max_connections: 2,
            read_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(1),
            accept_backoff: Duration::from_millis(10),
        }
    }

    #[test]
    fn connections_over_the_cap_get_503_until_idle_ones_time_out() {
        let limits = test_limits();
        let (addr, _stop) = spawn_server(limits, 0);
        assert!(scrape(addr).contains("200"), "a scrape before the idle connections");
        // Idle clients take every slot (one more than the cap, to be sure).
        let idle: Vec<_> = (0..=limits.max_connections)
            .map(|_| std::net::TcpStream::connect(addr).expect("idle connect"))
            .collect();
        let busy = scrape(addr);
        assert!(busy.contains("503"), "a scrape while the cap is held: {busy:?}");
        // The idle connections are closed after their timeouts; the endpoint answers again.
        let deadline = std::time::Instant::now() + limits.connection_timeout * 5;
        loop {
            std::thread::sleep(limits.read_timeout);
            let status = scrape(addr);
            if status.contains("200") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still {status:?} after the idle connections should have timed out"
            );
        }
        drop(idle);
    }

    #[test]
    fn accept_errors_are_survived() {
        let (addr, _stop) = spawn_server(test_limits(), 5);
        let status = scrape(addr);
        assert!(status.contains("200"), "a scrape after five failed accepts: {status:?}");
    }

    #[test]
    fn accept_errors_are_logged_at_most_once_per_interval() {
        let mut errors = AcceptErrors::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(errors.note(&emfile));
        assert!(!errors.note(&emfile));
        assert!(!errors.note(&emfile));
        assert_eq!(errors.suppressed, 2);
        errors.last_logged = std::time::Instant::now().checked_sub(ACCEPT_ERROR_LOG_INTERVAL);
        assert!(errors.note(&emfile));
        assert_eq!(errors.suppressed, 0);
    }

    #[test]
    fn sources_follow_the_pin_and_run_layout() {
        let sources = Sources::of_current_netns(Path::new("/x")).expect("netns id");
        let dir = paths::pin_dir(Path::new("/x")).expect("pin dir");
        // The test thread is in the process's namespace, so both derivations agree.
        assert_eq!(sources.pin_dir, dir);
        assert_eq!(sources.state_file, paths::state_file().expect("state file"));
    }
}
