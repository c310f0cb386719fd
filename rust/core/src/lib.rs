//! podrouter-core: every per-packet decision podrouter makes, as pure functions over byte buffers.
//!
//! This crate does no I/O, reads no clock (time is passed in as `now`), and contains no `unsafe`.
//! No function in it may panic on untrusted bytes: every parser is bounds-checked up front
//! (`new_checked`) and reports a typed error that maps onto a drop reason.
#![forbid(unsafe_code)]

pub mod classify;
pub mod datapath;
pub mod drop;
pub mod egress;
pub mod encap;
pub mod lpm;
pub mod nat;
pub mod nat_snapshot;
pub mod offload;
pub mod reference;
pub mod rules;
pub mod spec;
pub mod verdict;
pub mod wire;

pub use classify::{Peer, Tables};
pub use drop::DropReason;
pub use encap::{vxlan_inner_mac, GenevePayload, TunnelProto};
pub use spec::{
    format_mac, parse_mac, Cidr, EngineSettings, MasqueradeSpec, NextHop, NextHopId, NodeSpec,
    PeerId, PeerSpec, RoutingMode, SpecError, TableSpec, TunnelSpec,
};
pub use verdict::{Path, Verdict};
