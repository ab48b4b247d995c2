//! RFC 4605 proxying. On an upstream port mcrelay behaves as a host would: it reports the union
//! of what the hosts on the other ports joined (state-change records when it changes, current
//! state when the upstream router queries), from the port's own address, in the version the
//! upstream querier speaks. It never queries there (the port options say so) and the port is a
//! router port, so the data of downstream sources goes upstream too.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use super::Control;
use crate::membership::{
    engine::is_tracked, packet, Family, Forwarding, GroupRecord, Message, MessageKind, Query,
    QueryVersion, RecordType,
};

/// Reports for `groups` due on an upstream `port` at `at` (the control plane's clock).
#[derive(Debug, Clone)]
pub(super) struct Due {
    at: Duration,
    port: u32,
    groups: Vec<IpAddr>,
    /// State-change records (a repeat of a change) or current state (an answer).
    change: bool,
}

/// Time between the repeats of a state-change report (RFC 3376 8.11, Unsolicited Report
/// Interval).
const UNSOLICITED_INTERVAL: Duration = Duration::from_secs(1);

/// A pseudo-random duration in `[0, max]` (answers to queries are spread over the maximum
/// response time, as hosts do, RFC 3376 5.2).
fn random_delay(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let max_ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from(nanos.wrapping_mul(2_654_435_761)) % (max_ms + 1))
}

/// Group records per IGMPv3 / MLDv2 report (each record with a few sources stays far below
/// the MTU; the builder refuses anything larger).
const RECORDS_PER_REPORT: usize = 32;

/// The downstream membership of a group as one record: EXCLUDE(sources no port wants) when
/// some port takes every source, INCLUDE(sources some port wants) otherwise; an empty INCLUDE
/// means nobody is interested any more. `change` picks the state-change record types.
fn record(group: IpAddr, forwarding: &Forwarding, change: bool) -> GroupRecord {
    let (kind, sources) = if forwarding.any_source.is_empty() {
        let wanted = forwarding.per_source.iter().filter(|(_, p)| !p.is_empty());
        let kind = if change { RecordType::ToInclude } else { RecordType::IsInclude };
        (kind, wanted.map(|(s, _)| *s).collect())
    } else {
        let blocked = forwarding.per_source.iter().filter(|(_, p)| p.is_empty());
        let kind = if change { RecordType::ToExclude } else { RecordType::IsExclude };
        (kind, blocked.map(|(s, _)| *s).collect())
    };
    GroupRecord { kind, group, sources }
}

impl Control {
    /// The downstream membership of `group`, without the upstream ports themselves.
    fn downstream(&self, group: IpAddr) -> Forwarding {
        let mut f = self.engine.forwarding(&group);
        f.any_source.retain(|p| !self.upstream.contains_key(p));
        for ports in f.per_source.values_mut() {
            ports.retain(|p| !self.upstream.contains_key(p));
        }
        f
    }

    /// Tells every upstream port that the membership of `groups` changed: at once, and again
    /// [robustness] - 1 times, a second apart (RFC 3376 5.1).
    pub(super) fn report_upstream(&mut self, now: Duration, groups: &BTreeSet<IpAddr>) {
        let groups: Vec<IpAddr> = groups.iter().copied().filter(is_tracked).collect();
        if groups.is_empty() {
            return;
        }
        let repeats = self.engine.config().robustness.saturating_sub(1);
        let ports: Vec<u32> = self.upstream.keys().copied().collect();
        for port in ports {
            self.send_reports(port, &groups, true);
            for n in 1..=repeats {
                let at = now + UNSOLICITED_INTERVAL * n;
                self.proxy_due.push(Due { at, port, groups: groups.clone(), change: true });
            }
        }
    }

    /// Sends the upstream reports that are due.
    pub fn run_proxy_timers(&mut self) {
        if self.proxy_due.is_empty() {
            return;
        }
        let now = self.clock();
        let (due, later): (Vec<Due>, Vec<Due>) =
            std::mem::take(&mut self.proxy_due).into_iter().partition(|d| d.at <= now);
        self.proxy_due = later;
        for d in due {
            if self.upstream.contains_key(&d.port) {
                self.send_reports(d.port, &d.groups, d.change);
            }
        }
    }

    /// An upstream router's query: answer with the current state of the groups it asks
    /// about (all of them for a general query), and note an older querier version.
    pub(super) fn on_upstream_query(&mut self, port: u32, from: IpAddr, query: &Query) {
        let now = self.clock();
        let family = query.version.family();
        let older = matches!(
            query.version,
            QueryVersion::IgmpV1 | QueryVersion::IgmpV2 | QueryVersion::MldV1
        );
        if let Some(versions) = self.upstream.get_mut(&port) {
            let v6 = family == Family::V6;
            if older {
                versions.insert(v6);
            } else {
                versions.remove(&v6);
            }
        }
        let groups: Vec<IpAddr> = match query.group {
            Some(group) => vec![group],
            None => self
                .engine
                .groups(Duration::ZERO)
                .map(|g| g.group)
                .filter(|g| Family::of(g) == family)
                .collect(),
        };
        let at = now + random_delay(query.max_resp);
        tracing::debug!(port = self.name(port), querier = %from, groups = groups.len(), in_ms = (at - now).as_millis() as u64, "answering an upstream query");
        self.proxy_due.push(Due { at, port, groups, change: false });
    }

    /// Reports `groups` on the upstream `port`, one family at a time.
    fn send_reports(&mut self, port: u32, groups: &[IpAddr], change: bool) {
        for family in [Family::V4, Family::V6] {
            let mine: Vec<IpAddr> =
                groups.iter().copied().filter(|g| Family::of(g) == family).collect();
            if mine.is_empty() {
                continue;
            }
            let Some(source) = self.engine.port_address(port, family) else { continue };
            if family == Family::V6 && source.is_unspecified() {
                // Hosts and routers drop MLD from :: (RFC 3810 5.2.13); wait for an address.
                self.counters.queries_skipped_no_address += 1;
                continue;
            }
            let older =
                self.upstream.get(&port).is_some_and(|v| v.contains(&(family == Family::V6)));
            let messages: Vec<MessageKind> = if older {
                mine.iter()
                    .map(|&group| {
                        if self.downstream(group).is_empty() {
                            MessageKind::Leave { group }
                        } else {
                            MessageKind::V2Report { group }
                        }
                    })
                    .collect()
            } else {
                let records: Vec<GroupRecord> =
                    mine.iter().map(|&g| record(g, &self.downstream(g), change)).collect();
                records
                    .chunks(RECORDS_PER_REPORT)
                    .map(|chunk| MessageKind::V3Report { records: chunk.to_vec() })
                    .collect()
            };
            for kind in messages {
                self.send_message(port, Message { source, kind });
            }
        }
    }

    /// Builds and sends one message out of `port` from its MAC.
    fn send_message(&mut self, port: u32, msg: Message) {
        let Some(mac) = self.macs.get(&port).copied() else { return };
        match packet::build(mac, &msg) {
            Ok(frame) => match self.socket.send(port, &frame) {
                Ok(()) => self.counters.reports_sent += 1,
                Err(e) => {
                    self.counters.send_errors += 1;
                    tracing::debug!(port = self.name(port), "sending a report upstream: {e}");
                }
            },
            Err(e) => tracing::warn!("building a report for upstream: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn the_union_of_downstream_memberships_is_one_record() {
        let g = a("239.1.1.1");
        let mut f = Forwarding::default();
        assert_eq!(record(g, &f, true).kind, RecordType::ToInclude, "nobody: leave");
        assert!(record(g, &f, true).sources.is_empty());
        f.per_source = BTreeMap::from([(a("10.0.0.1"), BTreeSet::from([3]))]);
        let r = record(g, &f, false);
        assert_eq!((r.kind, r.sources), (RecordType::IsInclude, vec![a("10.0.0.1")]));
        // Some port takes every source but one that nobody wants.
        f.any_source = BTreeSet::from([4]);
        f.per_source = BTreeMap::from([
            (a("10.0.0.9"), BTreeSet::new()),
            (a("10.0.0.1"), BTreeSet::from([3, 4])),
        ]);
        let r = record(g, &f, true);
        assert_eq!((r.kind, r.sources), (RecordType::ToExclude, vec![a("10.0.0.9")]));
    }
}
