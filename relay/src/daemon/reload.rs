//! SIGHUP: read the configuration again and apply the difference.

use super::{Daemon, Plan};
use crate::ports;

impl Daemon {
    /// Everything is validated first; an invalid configuration changes nothing. Groups whose
    /// ports did not change are not touched. Returns a summary of the changes.
    pub(super) async fn reload(&mut self) -> anyhow::Result<String> {
        let settings = self.source.load()?;
        let links = ports::list(&self.handle).await?;
        let plan = Plan::new(settings, &links)?;
        let mut changes = Vec::new();
        let (old, new) = (&self.plan.settings, &plan.settings);
        if new.membership != old.membership
            || new.hello_interval != old.hello_interval
            || new.hello_holdtime != old.hello_holdtime
        {
            changes.push("timer changes take effect after a restart".to_string());
        }
        if new.pin_root != old.pin_root {
            changes.push("pin_root changes take effect after a restart".to_string());
        }
        if new.metrics_listen != old.metrics_listen {
            changes.push("metrics_listen changes take effect after a restart".to_string());
        }
        if new.limits != old.limits
            || new.max_clients_per_port != old.max_clients_per_port
            || new.report_rate_per_port != old.report_rate_per_port
        {
            self.control.set_limits(new.limits, new.max_clients_per_port, new.report_rate_per_port);
            changes.push("limits".to_string());
        }
        if new.unknown != old.unknown {
            self.dp.set_unknown_policy(new.unknown.into())?;
            changes.push(format!("unknown groups: {:?}", new.unknown));
        }
        if new.pin != old.pin {
            self.dp.set_pin_links(new.pin);
            changes.push(format!("pin: {}", new.pin));
        }
        let old = std::mem::replace(&mut self.plan, plan);

        // Ports no longer wanted.
        let gone: Vec<u32> = self
            .control
            .ports()
            .filter(|(_, name)| !self.plan.wants(name))
            .map(|(i, _)| i)
            .collect();
        for ifindex in gone {
            if let Some(name) = self.remove_port(ifindex, true).await {
                changes.push(format!("-{name}"));
            }
        }
        // Ports newly wanted.
        for link in links {
            if !self.control.has_port(link.index) && self.plan.wants(&link.name) {
                let (index, name) = (link.index, link.name.clone());
                self.on_link_new(link).await;
                if self.control.has_port(index) {
                    changes.push(format!("+{name}"));
                }
            }
        }
        // Per-port options (fast leave, router role, querier) of the ports that stay.
        let staying: Vec<(u32, String)> =
            self.control.ports().map(|(i, n)| (i, n.to_owned())).collect();
        for (ifindex, name) in staying {
            if old.settings.port_options(&name) != self.plan.settings.port_options(&name) {
                let opts = self.port_options(&name, ifindex).await?;
                self.control.set_port_options(self.start.elapsed(), ifindex, opts);
                changes.push(format!("options of {name}"));
            }
        }
        if old.statics != self.plan.statics {
            changes.push("static groups".into());
        }
        self.control.set_statics(&mut self.dp, &self.plan.statics);
        if old.settings.policy != self.plan.settings.policy
            || old.settings.group_rates != self.plan.settings.group_rates
        {
            self.apply_policing()?;
        }
        if old.settings.policy != self.plan.settings.policy {
            changes.push("group policy".into());
            self.control.set_policy(&mut self.dp, self.plan.settings.policy.clone());
        }
        if old.settings.group_rates != self.plan.settings.group_rates {
            changes.push("group rate limits".into());
        }
        let names: Vec<(u32, String)> =
            self.control.ports().map(|(i, n)| (i, n.to_owned())).collect();
        for (ifindex, name) in names {
            let rate = self.plan.settings.port_rate(&name);
            if rate != old.settings.port_rate(&name) {
                self.dp.set_port_rate(ifindex, rate)?;
                changes.push(format!("rate limit of {name}"));
            }
        }
        Ok(if changes.is_empty() { "no change".into() } else { changes.join(", ") })
    }
}
