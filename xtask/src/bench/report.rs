//! The results: aligned tables, JSON records (one per scenario), an SVG chart, the targets.

use std::{collections::BTreeMap, fmt::Write as _};

use mcrelay_tests::serde_json::{json, Value};

use super::{
    boxes::MiddleBox,
    control::{self, ControlResult},
    cost::{median, CostResult},
    direct::{self, DirectRun},
    tc::{self, TcRun},
    Run,
};

/// Medians over repetitions of one (box, frame size, fan-out).
pub struct Scenario {
    pub middle_box: MiddleBox,
    pub frame_bytes: usize,
    pub fanout: usize,
    /// Mpps per member port, one per repetition.
    pub mpps: Vec<f64>,
    pub offered_mpps: Vec<f64>,
    pub leaked_mpps: Vec<f64>,
    /// mcrelay ÷ this box, per repetition (same repetition, same frame size and fan-out).
    pub mcrelay_over_box: Vec<f64>,
}

impl Scenario {
    pub fn median_mpps(&self) -> f64 {
        median(&self.mpps)
    }
}

pub struct Report<'a> {
    scenarios: Vec<Scenario>,
    costs: &'a [CostResult],
    direct: &'a [DirectRun],
    tc: &'a [TcRun],
    control: Option<&'a ControlResult>,
}

impl<'a> Report<'a> {
    pub fn new(
        runs: &[Run],
        costs: &'a [CostResult],
        direct: &'a [DirectRun],
        tc: &'a [TcRun],
        control: Option<&'a ControlResult>,
    ) -> Self {
        let mcrelay: BTreeMap<(usize, usize, usize), f64> = runs
            .iter()
            .filter(|r| r.middle_box == MiddleBox::Mcrelay)
            .map(|r| ((r.repetition, r.frame_bytes, r.fanout), r.sample.pps()))
            .collect();
        let mut by_key: BTreeMap<(usize, usize, MiddleBox), Scenario> = BTreeMap::new();
        for run in runs {
            let scenario = by_key
                .entry((run.frame_bytes, run.fanout, run.middle_box))
                .or_insert_with(|| Scenario {
                    middle_box: run.middle_box,
                    frame_bytes: run.frame_bytes,
                    fanout: run.fanout,
                    mpps: Vec::new(),
                    offered_mpps: Vec::new(),
                    leaked_mpps: Vec::new(),
                    mcrelay_over_box: Vec::new(),
                });
            let pps = run.sample.pps();
            scenario.mpps.push(pps / 1e6);
            scenario.offered_mpps.push(run.sample.offered_pps / 1e6);
            scenario.leaked_mpps.push(run.sample.leaked_pps / 1e6);
            if let Some(&m) = mcrelay.get(&(run.repetition, run.frame_bytes, run.fanout)) {
                if pps > 0.0 {
                    scenario.mcrelay_over_box.push(m / pps);
                }
            }
        }
        Self { scenarios: by_key.into_values().collect(), costs, direct, tc, control }
    }

    fn scenario(
        &self,
        frame_bytes: usize,
        fanout: usize,
        middle_box: MiddleBox,
    ) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| {
            s.frame_bytes == frame_bytes && s.fanout == fanout && s.middle_box == middle_box
        })
    }

    fn frame_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self.scenarios.iter().map(|s| s.frame_bytes).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    fn fanouts(&self) -> Vec<usize> {
        let mut fanouts: Vec<usize> = self.scenarios.iter().map(|s| s.fanout).collect();
        fanouts.sort_unstable();
        fanouts.dedup();
        fanouts
    }

    fn repetitions(&self) -> usize {
        self.scenarios.iter().map(|s| s.mpps.len()).max().unwrap_or(0)
    }

    /// The forwarding tables (one per frame size), the cost table and the targets.
    pub fn table(&self) -> String {
        let mut out = direct::table(self.direct);
        out.push_str(&tc::table(self.tc));
        if !self.scenarios.is_empty() {
            out.push_str(
                "Veth-through mode (generator on the sender's veth, counted at the receivers):\n",
            );
        }
        let fanouts = self.fanouts();
        for size in self.frame_sizes() {
            let _ = writeln!(
                out,
                "{size}-byte frames: Mpps per member port, median of {} [mcrelay / box, median of per-repetition ratios]",
                self.repetitions()
            );
            let _ = write!(out, "{:<10}", "box");
            for f in &fanouts {
                let _ = write!(out, " {:>18}", format!("fan-out {f}"));
            }
            let _ = writeln!(out, " {:>9}", "offered");
            for middle_box in MiddleBox::ALL {
                let _ = write!(out, "{:<10}", middle_box.name());
                let mut offered = Vec::new();
                for &f in &fanouts {
                    let cell = match self.scenario(size, f, middle_box) {
                        Some(s) => {
                            offered.extend(&s.offered_mpps);
                            if middle_box == MiddleBox::Mcrelay {
                                format!("{:.3}", s.median_mpps())
                            } else {
                                format!(
                                    "{:.3} [{:.2}x]",
                                    s.median_mpps(),
                                    median(&s.mcrelay_over_box)
                                )
                            }
                        }
                        None => "-".to_owned(),
                    };
                    let _ = write!(out, " {cell:>18}");
                }
                let _ = writeln!(out, " {:>9.2}", median(&offered));
            }
            out.push('\n');
        }
        if !self.costs.is_empty() {
            let _ = writeln!(
                out,
                "Per-packet cost, ns per run (BPF_PROG_TEST_RUN repeat, median), daemon memory"
            );
            let _ = writeln!(
                out,
                "{:>7} {:>5} {:>7} {:>7} {:>8} {:>7} {:>7} {:>9} {:>14} {:>9} {:>9} {:>8}",
                "groups",
                "ports",
                "hit",
                "miss",
                "unicast",
                "igmp",
                "empty",
                "bare-hit",
                "unicast-empty",
                "RSS KiB",
                "maps KiB",
                "start s"
            );
            for c in self.costs {
                let k = |kind: &str| c.mcrelay_ns.get(kind).copied().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:>7} {:>5} {:>7.1} {:>7.1} {:>8.1} {:>7.1} {:>7.1} {:>9.1} {:>14.1} {:>9} {:>9} {:>8.2}",
                    c.groups, c.ports, k("hit"), k("miss"), k("unicast"), k("igmp"), c.empty_ns,
                    c.bare_ns, k("unicast") - c.empty_ns, c.rss_kib, c.map_kib, c.startup_s
                );
            }
            if let Some(rate) = self.group_writes_per_s() {
                let _ = writeln!(
                    out,
                    "daemon start-up wrote static groups at {rate:.0} groups/s (map writer, no IGMP)"
                );
            }
            if let Some(c) = self.costs.last() {
                let stats: Vec<String> = c.prog.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = writeln!(out, "mcrelay_xdp: {}", stats.join(", "));
            }
            out.push('\n');
        }
        if let Some(c) = self.control {
            out.push_str(&control::table(c, self.group_writes_per_s()));
        }
        out.push_str("Performance targets (docs/performance.md), this run:\n");
        for line in self.targets() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    /// Groups per second the daemon wrote at start-up: the difference between the largest and
    /// the smallest static set over the difference in start-up time.
    pub fn group_writes_per_s(&self) -> Option<f64> {
        let (first, last) = (self.costs.first()?, self.costs.last()?);
        if last.groups == first.groups {
            return (last.startup_s > 0.0).then(|| last.groups as f64 / last.startup_s);
        }
        let dt = last.startup_s - first.startup_s;
        (last.groups > first.groups && dt > 0.0).then(|| (last.groups - first.groups) as f64 / dt)
    }

    /// One line per target with the evidence and MET / NOT MET.
    pub fn targets(&self) -> Vec<String> {
        let mut lines = direct::targets(self.direct);
        let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
        for (peer, want, what) in [
            (MiddleBox::Bare, 0.9, ">= 90% of bare"),
            (MiddleBox::Bridge, 4.0, ">= 4x bridge"),
            (MiddleBox::Mfc, 5.0, ">= 5x MFC"),
        ] {
            for size in self.frame_sizes() {
                let ratios: Vec<(usize, f64)> = self
                    .fanouts()
                    .into_iter()
                    .filter_map(|f| {
                        let s = self.scenario(size, f, peer)?;
                        let r = median(&s.mcrelay_over_box);
                        // Against bare the target is a fraction: mcrelay / bare.
                        Some((f, r))
                    })
                    .collect();
                if ratios.is_empty() {
                    continue;
                }
                let ok = ratios.iter().all(|&(_, r)| r >= want);
                let shown: Vec<String> =
                    ratios.iter().map(|(f, r)| format!("{f}:{r:.2}")).collect();
                lines.push(format!(
                    "{what:<15} {size:>4} B, mcrelay/{peer} by fan-out {}: {}",
                    shown.join(" "),
                    verdict(ok)
                ));
            }
        }
        if let Some(c) = self.costs.first() {
            let overhead = c.mcrelay_ns.get("unicast").copied().unwrap_or_default() - c.empty_ns;
            lines.push(format!(
                "unicast <= +10 ns  {:.1} ns over the empty program: {}",
                overhead,
                verdict(overhead <= 10.0)
            ));
        }
        if let (Some(first), Some(last)) = (self.costs.first(), self.costs.last()) {
            if last.groups > first.groups {
                let h = |c: &CostResult| c.mcrelay_ns.get("hit").copied().unwrap_or_default();
                let growth = if h(first) > 0.0 { h(last) / h(first) - 1.0 } else { 0.0 };
                lines.push(format!(
                    "flat at scale      hit {:.1} ns at {} groups, {:.1} ns at {} groups x {} ports ({:+.0}%); RSS {} KiB, maps {} KiB: {}",
                    h(first),
                    first.groups,
                    h(last),
                    last.groups,
                    last.ports,
                    growth * 100.0,
                    last.rss_kib,
                    last.map_kib,
                    verdict(growth.abs() <= 0.25)
                ));
            }
        }
        lines
    }

    /// JSON: `{"scenarios": [...], "costs": [...], "targets": [...]}`, one record per scenario.
    pub fn json(&self) -> String {
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|s| {
                json!({
                    "kind": "forward",
                    "box": s.middle_box.name(),
                    "description": s.middle_box.describe(),
                    "frame_bytes": s.frame_bytes,
                    "fanout": s.fanout,
                    "mpps_median": s.median_mpps(),
                    "mpps_runs": s.mpps,
                    "offered_mpps_median": median(&s.offered_mpps),
                    "leaked_mpps_median": median(&s.leaked_mpps),
                    "mcrelay_over_box_median": (s.middle_box != MiddleBox::Mcrelay).then(|| median(&s.mcrelay_over_box)),
                    "mcrelay_over_box_runs": s.mcrelay_over_box,
                })
            })
            .collect();
        let costs: Vec<Value> = self
            .costs
            .iter()
            .map(|c| {
                json!({
                    "kind": "cost",
                    "groups": c.groups,
                    "ports": c.ports,
                    "mcrelay_ns": c.mcrelay_ns,
                    "empty_ns": c.empty_ns,
                    "bare_hit_ns": c.bare_ns,
                    "unicast_overhead_ns": c.mcrelay_ns.get("unicast").copied().unwrap_or_default() - c.empty_ns,
                    "daemon_rss_kib": c.rss_kib,
                    "daemon_map_kib": c.map_kib,
                    "daemon_startup_s": c.startup_s,
                    "program": c.prog,
                })
            })
            .collect();
        let doc = json!({
            "direct": direct::json(self.direct),
            "tc": tc::json(self.tc),
            "control": self.control.map(|c| control::json(c, self.group_writes_per_s())),
            "scenarios": scenarios,
            "costs": costs,
            "static_group_writes_per_s": self.group_writes_per_s(),
            "targets": self.targets(),
        });
        let mut text = mcrelay_tests::serde_json::to_string_pretty(&doc).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Mpps per member port against fan-out, one panel per frame size, log scale.
    pub fn svg(&self) -> String {
        const PANEL_W: f64 = 420.0;
        const PANEL_H: f64 = 300.0;
        const LEFT: f64 = 60.0;
        const TOP: f64 = 40.0;
        const GAP: f64 = 80.0;
        let colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#7f7f7f"];
        let sizes = self.frame_sizes();
        let fanouts = self.fanouts();
        let width = LEFT + sizes.len() as f64 * (PANEL_W + GAP) + 120.0;
        let height = TOP + PANEL_H + 70.0;
        let all: Vec<f64> =
            self.scenarios.iter().map(Scenario::median_mpps).filter(|v| *v > 0.0).collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1e-4).log10().floor();
        let hi = all.iter().copied().fold(0.0, f64::max).max(1e-3).log10().ceil().max(lo + 1.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        for (p, &size) in sizes.iter().enumerate() {
            let x0 = LEFT + p as f64 * (PANEL_W + GAP);
            let x_of = |i: usize| {
                if fanouts.len() <= 1 {
                    x0 + PANEL_W / 2.0
                } else {
                    x0 + i as f64 * PANEL_W / (fanouts.len() - 1) as f64
                }
            };
            let y_of =
                |v: f64| TOP + PANEL_H - (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * PANEL_H;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{size}-byte frames: Mpps per member port</text>"#,
                x0 + PANEL_W / 2.0,
                TOP - 15.0
            );
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="black"/>"#
            );
            let mut decade = lo;
            while decade <= hi + 1e-9 {
                let y = y_of(10f64.powf(decade));
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                    x0 + PANEL_W,
                    x0 - 5.0,
                    y + 4.0,
                    10f64.powf(decade)
                );
                decade += 1.0;
            }
            for (i, f) in fanouts.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{f}</text>"#,
                    x_of(i),
                    TOP + PANEL_H + 18.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">fan-out (egress ports)</text>"#,
                x0 + PANEL_W / 2.0,
                TOP + PANEL_H + 38.0
            );
            for (b, middle_box) in MiddleBox::ALL.iter().enumerate() {
                let points: Vec<String> = fanouts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &f)| {
                        let v = self.scenario(size, f, *middle_box)?.median_mpps();
                        (v > 0.0).then(|| format!("{:.1},{:.1}", x_of(i), y_of(v)))
                    })
                    .collect();
                let color = colors[b % colors.len()];
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                    points.join(" ")
                );
                for point in &points {
                    let (x, y) = point.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
                }
            }
        }
        let lx = LEFT + sizes.len() as f64 * (PANEL_W + GAP) - GAP + 20.0;
        for (b, middle_box) in MiddleBox::ALL.iter().enumerate() {
            let y = TOP + 20.0 + b as f64 * 20.0;
            let color = colors[b % colors.len()];
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 20.0,
                lx + 25.0,
                y + 4.0,
                middle_box.name()
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testbed::Sample, *};

    fn run(repetition: usize, middle_box: MiddleBox, fanout: usize, mpps: f64) -> Run {
        Run {
            repetition,
            middle_box,
            frame_bytes: 64,
            fanout,
            sample: Sample {
                offered_pps: 9e6,
                member_pps: vec![mpps * 1e6; fanout],
                leaked_pps: 0.0,
            },
        }
    }

    #[test]
    fn ratios_are_taken_within_a_repetition() {
        let runs = [
            run(0, MiddleBox::Mcrelay, 1, 4.0),
            run(0, MiddleBox::Bridge, 1, 1.0),
            run(1, MiddleBox::Mcrelay, 1, 2.0),
            run(1, MiddleBox::Bridge, 1, 0.4),
        ];
        let report = Report::new(&runs, &[], &[], &[], None);
        let bridge = report.scenario(64, 1, MiddleBox::Bridge).expect("bridge scenario");
        assert_eq!(bridge.mcrelay_over_box, vec![4.0, 5.0]);
        assert!(report.table().contains("[4.50x]"));
        assert!(report.svg().starts_with("<svg"));
        let doc: Value = mcrelay_tests::serde_json::from_str(&report.json()).expect("valid JSON");
        assert_eq!(doc["scenarios"].as_array().map(Vec::len), Some(2));
    }
}
