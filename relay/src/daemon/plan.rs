//! The settings checked against the interfaces that exist: which ports to attach now, and the
//! static groups by port name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{error::UsageError, ports, ports::Link, settings::Settings};

/// A validated `run` request.
#[derive(Debug)]
pub struct Plan {
    pub settings: Settings,
    /// Interfaces that exist now and match the patterns.
    pub ports: Vec<Link>,
    /// Static groups: interface names per group (all sources).
    pub statics: BTreeMap<IpAddr, BTreeSet<String>>,
}

impl Plan {
    /// Resolves the interface patterns against `links`. Touches nothing.
    pub fn new(settings: Settings, links: &[Link]) -> Result<Self, UsageError> {
        let patterns = &settings.patterns;
        let ports = ports::resolve(patterns, links, |w| tracing::warn!("{w}"))?;
        // A name given to --static, --fast-leave or --router-port must be one of the ports, or
        // match an -i glob (an interface that may appear later).
        let known = |name: &String| {
            ports.iter().any(|p| p.name == *name) || ports::matches_any(patterns, name)
        };
        let mut statics: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for st in &settings.statics {
            if let Some(name) = st.ifaces.iter().find(|n| !known(n)) {
                return Err(UsageError::new(format!(
                    "--static {}@...: interface {name} is not one of the -i interfaces",
                    st.group
                )));
            }
            statics.entry(st.group).or_default().extend(st.ifaces.iter().cloned());
        }
        for (flag, names) in [
            ("fast-leave", &settings.fast_leave),
            ("router-port", &settings.router_ports),
            ("no-learn-routers", &settings.no_learn_routers),
            ("upstream", &settings.upstream),
        ] {
            if let Some(name) = names.iter().find(|n| !known(n)) {
                return Err(UsageError::new(format!(
                    "--{flag} {name}: not one of the -i interfaces"
                )));
            }
        }
        Ok(Self { settings, ports, statics })
    }

    /// Whether interface `name` is one mcrelay should relay on.
    pub fn wants(&self, name: &str) -> bool {
        ports::matches_any(&self.settings.patterns, name)
    }
}
