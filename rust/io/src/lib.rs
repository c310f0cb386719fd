//! podrouter-io: the I/O engine around `podrouter-core`.
//!
//! TUN (`IFF_VNET_HDR`, TSO/USO offload), tunnel UDP sockets (`recvmmsg` + UDP GRO, `sendmmsg` +
//! UDP GSO), AF_PACKET on the underlay (with `PACKET_VNET_HDR` so native TCP leaves as GSO
//! super-packets), worker threads with lock-free table swaps, counters. Every packet decision and
//! rewrite (segmentation, GRO coalescing, checksums, encapsulation, NAT) is `podrouter-core`'s
//! (`podrouter_core::egress`, `datapath`, `offload`); this crate reads, writes, batches and counts.
//!
//! This is the only crate in podrouter with `unsafe` code: raw syscalls through `libc`. Each
//! `unsafe` block carries a `// SAFETY:` comment.

pub mod af_packet;
pub mod blast;
pub mod counters;
pub mod events;
pub mod handover;
pub mod nat_persist;
mod sys;
pub mod tap;
pub mod tun;
pub mod udp;
pub mod worker;

pub use events::{Event, EventRing};
pub use worker::{drop_reason_names, Engine, EngineConfig, NatPressure, OffloadInfo};
