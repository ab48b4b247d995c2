//! The per-port counters: `PORT_STATS`, a per-CPU array the program indexes with
//! [`port_slot`]`(ifindex)` (no hashing on the packet path), each slot naming the port that holds
//! it, and `PORT_STATS_SPILL`, a per-CPU hash by ifindex for the ports whose slot another port
//! holds. The daemon writes both ([`PortStats::register`], [`PortStats::forget`]); the daemon and
//! the CLI read a port's counters with [`PortStats::counters`].

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use relay_common::{port_slot, PortCounters, PortSlot};

use super::{
    error::{DataplaneError, KernelContext as _},
    sys::cpus,
};

/// `PORT_STATS` and `PORT_STATS_SPILL`.
pub struct PortStats {
    slots: PerCpuArray<MapData, PortSlot>,
    spill: PerCpuHashMap<MapData, u32, PortCounters>,
}

impl PortStats {
    pub fn new(
        slots: PerCpuArray<MapData, PortSlot>,
        spill: PerCpuHashMap<MapData, u32, PortCounters>,
    ) -> Self {
        Self { slots, spill }
    }

    /// The port holding `ifindex`'s slot (0: free), as CPU 0's copy has it (the daemon writes
    /// the same owner into every CPU's copy).
    fn owner(&self, ifindex: u32) -> Option<u32> {
        let values = self.slots.get(&port_slot(ifindex), 0).ok()?;
        values.iter().next().map(|s| s.ifindex)
    }

    /// Whether the port has counters (in its slot or in the spill map).
    pub fn has(&self, ifindex: u32) -> bool {
        self.owner(ifindex) == Some(ifindex) || self.spill.get(&ifindex, 0).is_ok()
    }

    /// Zeroed counters for a port: its slot when the slot is free (or its own already), else
    /// an entry in the spill map.
    pub fn register(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let cpus = cpus().kernel("counting CPUs")?;
        match self.owner(ifindex) {
            Some(owner) if owner == 0 || owner == ifindex => {
                let slot = PortSlot { ifindex, ..PortSlot::default() };
                let values =
                    PerCpuValues::try_from(vec![slot; cpus]).kernel("sizing PORT_STATS")?;
                self.slots
                    .set(port_slot(ifindex), values, 0)
                    .kernel("claiming the PORT_STATS slot")?;
                // Counted in the slot from now on.
                let _ = self.spill.remove(&ifindex);
                Ok(())
            }
            _ => {
                let zero = PerCpuValues::try_from(vec![PortCounters::default(); cpus])
                    .kernel("sizing PORT_STATS_SPILL")?;
                self.spill.insert(ifindex, zero, 0).kernel("creating the PORT_STATS_SPILL entry")
            }
        }
    }

    /// Frees the port's slot (or its spill entry); best effort.
    pub fn forget(&mut self, ifindex: u32) {
        if self.owner(ifindex) == Some(ifindex) {
            if let Ok(cpus) = cpus() {
                if let Ok(values) = PerCpuValues::try_from(vec![PortSlot::default(); cpus]) {
                    if let Err(e) = self.slots.set(port_slot(ifindex), values, 0) {
                        tracing::warn!("freeing the PORT_STATS slot of ifindex {ifindex}: {e}");
                    }
                }
            }
        }
        let _ = self.spill.remove(&ifindex);
    }

    /// A port's counters, summed over the CPUs.
    pub fn counters(&self, ifindex: u32) -> Result<PortCounters, DataplaneError> {
        let mut total = PortCounters::default();
        if self.owner(ifindex) == Some(ifindex) {
            for s in self.slots.get(&port_slot(ifindex), 0).kernel("reading PORT_STATS")?.iter() {
                total.accumulate(&s.counters);
            }
            return Ok(total);
        }
        for c in self.spill.get(&ifindex, 0).kernel("reading PORT_STATS_SPILL")?.iter() {
            total.accumulate(c);
        }
        Ok(total)
    }
}
