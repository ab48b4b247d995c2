//! `CONFIG` and `ROUTER_PORTS`: the settings the XDP program reads per data frame.

use aya::maps::{Array, DevMapHash, MapData};
use relay_common::{Config, UnknownPolicy, CONFIG_F_SOURCE_ENTRIES};

use super::{
    error::{DataplaneError, KernelContext as _},
    sys::is_not_found,
};

/// The program's configuration and router ports, with what userspace last wrote.
pub struct KernelConfig {
    map: Array<MapData, Config>,
    /// What `CONFIG` holds.
    value: Config,
    routers: DevMapHash<MapData>,
    /// Ports in `ROUTER_PORTS`.
    router_ports: Vec<u32>,
}

impl KernelConfig {
    /// Wraps the maps; with `adopted`, reads what a previous daemon left in them.
    pub fn new(
        map: Array<MapData, Config>,
        routers: DevMapHash<MapData>,
        adopted: bool,
    ) -> Result<Self, DataplaneError> {
        let mut config = Self { map, value: Config::default(), routers, router_ports: Vec::new() };
        if adopted {
            config.value = config.map.get(&0, 0).kernel("reading CONFIG")?;
            config.router_ports = config.routers.keys().filter_map(Result::ok).collect();
        }
        Ok(config)
    }

    fn write(&mut self, value: Config) -> Result<(), DataplaneError> {
        if value == self.value {
            return Ok(());
        }
        self.map.set(0, value, 0).kernel("writing CONFIG")?;
        self.value = value;
        Ok(())
    }

    /// Changes what happens to data for groups without a port set.
    pub fn set_unknown_policy(&mut self, unknown: UnknownPolicy) -> Result<(), DataplaneError> {
        let value = Config { unknown_policy: unknown as u32, ..self.value };
        // Force the write: the map starts zeroed, which equals the default config.
        self.value.unknown_policy = u32::MAX;
        self.write(value)
    }

    /// Whether the program looks (S,G) entries up (raise it before the first one appears).
    pub fn set_source_entries(&mut self, on: bool) -> Result<(), DataplaneError> {
        let flags = if on {
            self.value.flags | CONFIG_F_SOURCE_ENTRIES
        } else {
            self.value.flags & !CONFIG_F_SOURCE_ENTRIES
        };
        self.write(Config { flags, ..self.value })
    }

    /// Sets the ports that lead to multicast routers (targets for unknown groups).
    pub fn set_router_ports(&mut self, ifindexes: &[u32]) -> Result<(), DataplaneError> {
        if ifindexes.is_empty() {
            // No router port left: make the program stop using the map before emptying it, so
            // no frame is redirected into an empty map meanwhile.
            self.write(Config { router_ports: 0, ..self.value })?;
        }
        for &old in &self.router_ports {
            if !ifindexes.contains(&old) {
                if let Err(e) = self.routers.remove(old) {
                    if !is_not_found(&e) {
                        return Err(e).kernel("writing ROUTER_PORTS");
                    }
                }
            }
        }
        for &ifindex in ifindexes {
            self.routers.insert(ifindex, ifindex, None, 0).kernel("writing ROUTER_PORTS")?;
        }
        self.router_ports = ifindexes.to_vec();
        self.write(Config { router_ports: ifindexes.len() as u32, ..self.value })
    }
}
