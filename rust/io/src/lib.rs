//! podrouter-io: the I/O engine around `podrouter-core`.
//!
//! TUN (`IFF_VNET_HDR`, TSO/USO offload, userspace segmentation), tunnel UDP sockets (`recvmmsg` +
//! UDP GRO, `sendmmsg` + UDP GSO), AF_PACKET on the underlay (with `PACKET_VNET_HDR` so native TCP
//! leaves as GSO super-packets), worker threads with lock-free table swaps, counters.
//!
//! This is the only crate in podrouter with `unsafe` code: raw syscalls through `libc`. Each
//! `unsafe` block carries a `// SAFETY:` comment; the packet logic itself (segmentation, checksums,
//! header rewriting) is safe code over byte slices and never panics on untrusted input.

pub mod af_packet;
pub mod blast;
pub mod counters;
pub mod csum;
pub mod events;
pub mod gro;
pub mod handover;
pub mod nat_persist;
mod sys;
pub mod tun;
pub mod udp;
pub mod vnet;
pub mod worker;

pub use events::{Event, EventRing};
pub use worker::{drop_reason_names, Engine, EngineConfig, NatPressure, OffloadInfo};
