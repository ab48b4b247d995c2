//! The event loop: one handler per event (a signal, a control frame, a link change, a timer).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::{
    sync::mpsc::UnboundedReceiver,
    time::{interval, sleep_until, Instant, Interval, MissedTickBehavior},
};

use super::{Daemon, Signals};
use crate::{capture::Received, paths, ports::LinkEvent, state};

/// Most control frames handled before the maps are written (and timers and signals get a
/// turn).
const BURST: usize = 256;

/// Something the daemon reacts to.
enum Event {
    /// SIGTERM or SIGINT: stop.
    Stop(&'static str),
    /// SIGHUP: read the configuration again.
    Reload,
    /// An IGMP/MLD frame or a relay hello.
    Frame(Received),
    /// The packet socket failed.
    SocketFailed(std::io::Error),
    /// Time to send hellos and re-evaluate the loop guard.
    HelloTimer,
    /// An interface appeared, changed or vanished; `None`: the monitor stopped.
    Link(Option<LinkEvent>),
    /// A membership timer is due.
    MembershipTimer,
    /// One membership interval after a take-over.
    AdoptionEnds,
    /// systemd's watchdog wants a sign of life.
    Watchdog,
    /// Time to write the state file (if anything changed, and at least once a second).
    Flush,
}

/// The timers and bookkeeping of the loop.
struct Loop {
    signals: Signals,
    links: UnboundedReceiver<LinkEvent>,
    links_closed: bool,
    flush: Interval,
    flushes: u64,
    hello: Interval,
    watchdog: Option<Interval>,
    adoption_ends: Instant,
    /// When the frame being handled arrived (join-to-forwarding latency).
    received_at: Option<Instant>,
    last_status: String,
    state_path: std::path::PathBuf,
    /// Reloads handled (the verdict's sequence number).
    reloads: u64,
}

impl Daemon {
    /// Handles events until a stop signal arrives. Only a broken packet socket ends it early.
    pub(super) async fn serve(
        &mut self,
        signals: Signals,
        links: UnboundedReceiver<LinkEvent>,
    ) -> anyhow::Result<()> {
        let mut flush = interval(Duration::from_millis(250));
        flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut hello = interval(self.plan.settings.hello_interval);
        hello.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // systemd's watchdog (WatchdogSec=): ping at half the interval.
        let watchdog = sd_notify::watchdog_enabled().map(|d| interval(d / 2));
        let mut lp = Loop {
            signals,
            links,
            links_closed: false,
            flush,
            flushes: 0,
            hello,
            watchdog,
            adoption_ends: self.start + self.control.membership_interval(),
            received_at: None,
            last_status: String::new(),
            state_path: paths::state_file()?,
            reloads: 0,
        };
        loop {
            match self.next_event(&mut lp).await {
                Event::Stop(signal) => {
                    tracing::info!("{signal}");
                    return Ok(());
                }
                Event::SocketFailed(e) => {
                    return Err(anyhow::Error::new(e).context("receiving on the packet socket"))
                }
                Event::Reload => {
                    lp.reloads += 1;
                    self.on_reload(lp.reloads).await;
                }
                Event::Frame(frame) => {
                    lp.received_at = Some(Instant::now());
                    self.on_frame(&frame);
                }
                Event::HelloTimer => self.on_hello_timer(),
                Event::Link(event) => self.on_link(event, &mut lp.links_closed).await,
                Event::MembershipTimer => self.control.tick(self.start.elapsed()),
                Event::AdoptionEnds => self.on_adoption_end(),
                Event::Watchdog => {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
                Event::Flush => self.on_flush(&mut lp),
            }
            self.after_event(lp.received_at.take());
        }
    }

    /// Waits for the next event.
    async fn next_event(&self, lp: &mut Loop) -> Event {
        let deadline = self
            .control
            .next_deadline()
            .map_or(self.start + Duration::from_secs(3600), |d| self.start + d);
        let adopting = self.control.adopting();
        let watching = lp.watchdog.is_some();
        tokio::select! {
            _ = lp.signals.term.recv() => Event::Stop("SIGTERM"),
            _ = lp.signals.int.recv() => Event::Stop("SIGINT"),
            _ = lp.signals.hup.recv() => Event::Reload,
            received = self.control.recv() => match received {
                Ok(frame) => Event::Frame(frame),
                Err(e) => Event::SocketFailed(e),
            },
            _ = lp.hello.tick() => Event::HelloTimer,
            event = lp.links.recv(), if !lp.links_closed => Event::Link(event),
            () = sleep_until(deadline) => Event::MembershipTimer,
            () = sleep_until(lp.adoption_ends), if adopting => Event::AdoptionEnds,
            _ = async { lp.watchdog.as_mut().expect("watchdog interval").tick().await }, if watching => Event::Watchdog,
            _ = lp.flush.tick() => Event::Flush,
        }
    }

    /// SIGHUP. The verdict is logged and left for `mcrelay reload`.
    async fn on_reload(&mut self, seq: u64) {
        let _ = sd_notify::notify(&[NotifyState::Reloading]);
        let result = self.reload().await;
        let verdict = match &result {
            Ok(summary) => {
                tracing::info!("reloaded: {summary}");
                (true, summary.clone(), false)
            }
            Err(e) => {
                tracing::error!("reload rejected, running state kept: {e:#}");
                let usage = e.chain().any(|c| {
                    c.downcast_ref::<crate::error::UsageError>().is_some()
                        || c.downcast_ref::<crate::config::ConfigError>().is_some()
                });
                (false, format!("{e:#}"), usage)
            }
        };
        let (applied, message, usage) = verdict;
        let verdict =
            state::ReloadVerdict { pid: std::process::id(), seq, applied, message, usage };
        if let Err(e) = paths::reload_file().and_then(|path| verdict.write(&path)) {
            tracing::warn!("leaving the reload verdict for `mcrelay reload`: {e:#}");
        }
        let _ = sd_notify::notify(&[NotifyState::Ready]);
        self.control.mark_dirty();
    }

    /// A control frame or hello arrived. Frames queued behind it (a burst) are handled too,
    /// up to [`BURST`], so that their map writes go out in one round.
    fn on_frame(&mut self, frame: &Received) {
        let now = self.start.elapsed();
        self.control.on_frame(now, frame.ifindex, &frame.frame);
        for _ in 1..BURST {
            match self.control.try_recv() {
                Ok(Some(next)) => self.control.on_frame(now, next.ifindex, &next.frame),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("reading queued control frames: {e}");
                    break;
                }
            }
        }
        if self.control.hello_due() {
            self.control.send_hellos();
        }
        self.apply_loop_guard(now);
    }

    /// The hello interval passed.
    fn on_hello_timer(&mut self) {
        self.control.hello_due();
        self.control.send_hellos();
        self.apply_loop_guard(self.start.elapsed());
    }

    fn apply_loop_guard(&mut self, now: Duration) {
        if let Err(e) = self.control.update_loop_guard(now, &mut self.dp) {
            tracing::warn!("loop guard: {e:#}");
        }
    }

    /// A link notification.
    async fn on_link(&mut self, event: Option<LinkEvent>, closed: &mut bool) {
        match event {
            Some(LinkEvent::New(link)) => self.on_link_new(link).await,
            Some(LinkEvent::Addresses(ifindex)) => self.on_addresses(ifindex).await,
            Some(LinkEvent::Removed(ifindex)) => {
                if let Some(name) = self.remove_port(ifindex, false).await {
                    tracing::info!(iface = %name, ifindex, "interface vanished; dropped its port state");
                }
            }
            None => {
                *closed = true;
                tracing::error!(
                    "the netlink link monitor stopped: interfaces that appear or vanish from now \
                     on are not noticed (restart mcrelay)"
                );
            }
        }
    }

    /// An interface appeared (or changed): attach when it matches and is new.
    pub(super) async fn on_link_new(&mut self, link: crate::ports::Link) {
        if self.control.has_port(link.index) || !self.plan.wants(&link.name) {
            return;
        }
        tracing::info!(iface = %link.name, ifindex = link.index, "interface appeared");
        match self.add_port(&link).await {
            Ok(()) => self.control.set_statics(&mut self.dp, &self.plan.statics),
            Err(e) => {
                tracing::warn!(iface = %link.name, "could not attach to a new interface: {e:#}");
                self.remove_port(link.index, true).await;
            }
        }
    }

    /// A port's addresses changed: queries go out from the new ones (a tap that got its
    /// link-local address only after mcrelay attached starts its MLD queries now).
    async fn on_addresses(&mut self, ifindex: u32) {
        let Some(name) =
            self.control.ports().find(|(i, _)| *i == ifindex).map(|(_, n)| n.to_owned())
        else {
            return;
        };
        match self.port_options(&name, ifindex).await {
            Ok(opts) => {
                tracing::debug!(iface = %name, ipv4 = ?opts.ipv4, ipv6 = ?opts.ipv6, "port addresses");
                self.control.set_port_options(self.start.elapsed(), ifindex, opts);
            }
            Err(e) => tracing::warn!(iface = %name, "reading the port's addresses: {e:#}"),
        }
    }

    /// One membership interval after a take-over.
    fn on_adoption_end(&mut self) {
        tracing::info!(
            "membership interval since take-over passed: dropping adopted port sets nobody renewed"
        );
        self.control.end_adoption(&mut self.dp);
    }

    /// Writes the state file after changes, and at least once a second: counters (per-client
    /// copies, remaining timers) move without any control-plane event.
    fn on_flush(&mut self, lp: &mut Loop) {
        lp.flushes += 1;
        self.control.poll_capture_drops();
        self.control.run_proxy_timers();
        if !(self.control.take_dirty() || lp.flushes.is_multiple_of(4)) {
            return;
        }
        let status = self.control.status_line();
        if status != lp.last_status {
            let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
            lp.last_status = status;
        }
        let snapshot = self.control.snapshot(self.start.elapsed(), &self.dp);
        if let Err(e) = state::write(&lp.state_path, &snapshot) {
            tracing::warn!("{e:#}");
        }
    }

    /// After every event: expire per-client memberships and write what changed to the maps.
    /// A failed map write (full map, a port that vanished under us) must not end the daemon:
    /// it is logged, and the group is written again on its next change.
    fn after_event(&mut self, received_at: Option<Instant>) {
        self.control.expire_clients(self.start.elapsed());
        let wrote = match self.control.process_actions(&mut self.dp) {
            Ok(wrote) => wrote,
            Err(e) => {
                self.control.count_map_error();
                tracing::error!("updating the maps: {e:#}");
                false
            }
        };
        if let (true, Some(at)) = (wrote, received_at) {
            let done = at.elapsed().as_micros() as u64;
            let visible = self
                .dp
                .last_publish()
                .map_or(done, |p| p.saturating_duration_since(at.into_std()).as_micros() as u64);
            self.control.record_update_latency(visible, done);
            tracing::debug!(visible_us = visible, done_us = done, "report applied to the maps");
        }
    }
}
