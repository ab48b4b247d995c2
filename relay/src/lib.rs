//! mcrelay: eBPF/XDP-accelerated multicast relay. The `mcrelay` binary is a thin shell over
//! this library; see docs/architecture.md for how the pieces fit.

pub mod bpffs;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod doctor;
pub mod error;
pub mod groups;
pub mod inspect;
pub mod instance;
pub mod loop_guard;
pub mod manpage;
pub mod membership;
pub mod metrics;
pub mod options;
pub mod paths;
pub mod ports;
pub mod reconciler;
pub mod settings;
pub mod state;

pub use dataplane::EBPF_OBJECT;
