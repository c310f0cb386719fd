//! The pure offload code: what a NIC would do in hardware, done in software over byte slices.
//!
//! * [`vnet`]: the virtio-net header that carries offload metadata on TUN reads and writes and on
//!   AF_PACKET frames, and userspace TSO/USO segmentation of a GSO super-packet;
//! * [`gro`]: TCP coalescing of decapsulated packets into one super-packet per TUN write;
//! * [`tnl`]: the UDP-tunnel GSO header (one encapsulated super-packet to a TAP, Linux 6.17+);
//! * [`csum`]: the Internet checksum tuned for whole payloads (segmentation sums every byte).
//!
//! No I/O and no `unsafe`, like the rest of the crate; every function is total on untrusted bytes
//! (fuzzed by rust/fuzz's `vnet_segment`, `gro_coalesce` and `csum` targets). The I/O engine
//! (rust/io) reads and writes the bytes; [`crate::egress`] decides what each TUN read becomes.

pub mod csum;
pub mod gro;
pub mod tnl;
pub mod vnet;
