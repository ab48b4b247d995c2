//! Membership learning: IGMP/MLD parsing and building ([`packet`]) and the router-side state
//! machines ([`engine`]) of RFC 3376 / RFC 3810, with querier election and router-port
//! learning. Pure logic: no sockets, no BPF; time is passed in as a monotonic `Duration`.

mod clients;
pub mod engine;
pub mod packet;
mod remembered;

pub use clients::{ClientId, Clients};
pub use engine::{
    Action, CompatMode, Config, Engine, FilterMode, Forwarding, GroupSnapshot, IgmpVersion, Limits,
    MldVersion, PortOptions, PortSnapshot, QuerierStatus, Refusal, Refused, RouterEvent,
    RouterSignal, SourceSnapshot,
};
pub use packet::{
    build, build_query, parse, parse_ip, BuildError, Family, GroupRecord, Message, MessageKind,
    ParseError, Query, QueryVersion, RecordType,
};
pub use remembered::Remembered;

/// What the engine asks the daemon to send (see [`packet::build_query`]).
pub type QuerySpec = Query;
