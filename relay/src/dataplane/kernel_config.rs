//! `CONFIG` and `ROUTER_PORTS`: the settings the XDP program reads per data frame.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, DevMapHash, HashMap, MapData};
use relay_common::{
    loop_mac_key, Config, UnknownPolicy, CONFIG_F_SOURCE_ENTRIES, CONFIG_F_STANDBY,
    RELAY_MAC_PREFIX,
};

use super::{
    error::{DataplaneError, KernelContext as _},
    policing::PolicingMaps,
    sys::is_not_found,
};

/// The loop guard's maps.
pub struct LoopMaps {
    /// `LOOP_MACS`: relay MACs whose frames are never relayed again.
    pub macs: HashMap<MapData, [u8; 8], u32>,
    /// `STANDBY_PORTS`: ifindex -> reason bits.
    pub standby: HashMap<MapData, u32, u32>,
}

/// The program's configuration, router ports and loop guard, with what userspace last wrote.
pub struct KernelConfig {
    loops: LoopMaps,
    policing: PolicingMaps,
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
        loops: LoopMaps,
        policing: PolicingMaps,
        adopted: bool,
    ) -> Result<Self, DataplaneError> {
        let mut config = Self {
            loops,
            policing,
            map,
            value: Config::default(),
            routers,
            router_ports: Vec::new(),
        };
        if adopted {
            config.value = config.map.get(&0, 0).kernel("reading CONFIG")?;
            config.router_ports = config.routers.keys().filter_map(Result::ok).collect();
        }
        if config.value.relay_mac[..3] != RELAY_MAC_PREFIX {
            // A new relay (or maps of a previous one that had none): pick the relay MAC. It
            // lives in the pinned CONFIG, so a restarted daemon keeps it.
            let mut mac = [0u8; 6];
            mac[..3].copy_from_slice(&RELAY_MAC_PREFIX);
            mac[3..].copy_from_slice(&random_bytes()[..3]);
            config.write(Config { relay_mac: mac, ..config.value })?;
        }
        Ok(config)
    }

    /// This relay's MAC (the source of every frame it relays).
    pub fn relay_mac(&self) -> [u8; 6] {
        self.value.relay_mac
    }

    /// Makes `LOOP_MACS` hold exactly `macs`.
    pub fn set_loop_macs(&mut self, macs: &BTreeSet<[u8; 6]>) -> Result<(), DataplaneError> {
        let have: Vec<[u8; 8]> = self.loops.macs.keys().filter_map(Result::ok).collect();
        for key in &have {
            if !macs.iter().any(|m| loop_mac_key(*m) == *key) {
                let _ = self.loops.macs.remove(key);
            }
        }
        for mac in macs {
            self.loops.macs.insert(loop_mac_key(*mac), 1, 0).kernel("writing LOOP_MACS")?;
        }
        Ok(())
    }

    /// Makes `STANDBY_PORTS` hold exactly `ports` (ifindex -> reason bits) and keeps the
    /// flag that makes the program look at it in line. The flag goes up after the entries
    /// and down before they go, so no frame of a standby port slips through.
    pub fn set_standby(&mut self, ports: &BTreeMap<u32, u32>) -> Result<(), DataplaneError> {
        if ports.is_empty() {
            self.write(Config { flags: self.value.flags & !CONFIG_F_STANDBY, ..self.value })?;
        }
        let have: Vec<u32> = self.loops.standby.keys().filter_map(Result::ok).collect();
        for ifindex in have {
            if !ports.contains_key(&ifindex) {
                let _ = self.loops.standby.remove(&ifindex);
            }
        }
        for (&ifindex, &reason) in ports {
            self.loops.standby.insert(ifindex, reason, 0).kernel("writing STANDBY_PORTS")?;
        }
        if !ports.is_empty() {
            self.write(Config { flags: self.value.flags | CONFIG_F_STANDBY, ..self.value })?;
        }
        Ok(())
    }

    /// The policing maps (written by [`super::policing`]).
    pub(super) fn policing(&mut self) -> &mut PolicingMaps {
        &mut self.policing
    }

    /// Sets the `mask` bits of the flags to `bits`.
    pub(super) fn set_flags(&mut self, mask: u32, bits: u32) -> Result<(), DataplaneError> {
        self.write(Config { flags: (self.value.flags & !mask) | (bits & mask), ..self.value })
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
    /// The router ports, as last set.
    pub fn router_ports(&self) -> &[u32] {
        &self.router_ports
    }

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

/// Random bytes from the kernel (for the relay MAC).
fn random_bytes() -> [u8; 8] {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into the live buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // No entropy source: fall back on the clock and the process id (uniqueness among a
        // handful of relays on one segment is all that matters).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        buf = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    buf
}
