//! What the tables decide for a packet: a [`Verdict`], and the [`Path`] a forwarded packet took
//! (the metrics label).

use std::fmt;
use std::net::IpAddr;

use crate::drop::DropReason;
use crate::encap::TunnelProto;
use crate::spec::{NextHopId, PeerId};

/// The path a forwarded packet took: the `path` label of `podrouter_packets_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    Native,
    Vxlan,
    Geneve,
    Masquerade,
    Local,
}

impl Path {
    /// Every path, in declaration order.
    pub const ALL: [Path; 5] = [
        Path::Native,
        Path::Vxlan,
        Path::Geneve,
        Path::Masquerade,
        Path::Local,
    ];

    /// `native`, `vxlan`, `geneve`, `masquerade`, `local`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Path::Native => "native",
            Path::Vxlan => "vxlan",
            Path::Geneve => "geneve",
            Path::Masquerade => "masquerade",
            Path::Local => "local",
        }
    }

    /// Position in [`Path::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The path of a tunnel protocol.
    pub const fn tunnel(proto: TunnelProto) -> Path {
        match proto {
            TunnelProto::Vxlan => Path::Vxlan,
            TunnelProto::Geneve => Path::Geneve,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a packet from a local pod (docs/architecture.md, "Verdicts").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The destination is in this node's pod CIDRs: hand it to the kernel.
    Local,
    /// Send the packet unchanged to `next_hop` on the underlay.
    Native {
        next_hop: NextHopId,
    },
    /// Encapsulate to the peer's underlay address.
    Tunnel {
        peer: PeerId,
        proto: TunnelProto,
        vni: u32,
        remote: IpAddr,
        port: u16,
    },
    /// Source-NAT to the node address, then out natively via the gateway.
    Masquerade {
        next_hop: NextHopId,
    },
    Drop(DropReason),
}

impl Verdict {
    /// The metrics path label, `None` for a drop.
    pub const fn path(&self) -> Option<Path> {
        match self {
            Verdict::Local => Some(Path::Local),
            Verdict::Native { .. } => Some(Path::Native),
            Verdict::Tunnel { proto, .. } => Some(Path::tunnel(*proto)),
            Verdict::Masquerade { .. } => Some(Path::Masquerade),
            Verdict::Drop(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names() {
        assert_eq!(
            Path::ALL.map(|p| p.as_str()),
            ["native", "vxlan", "geneve", "masquerade", "local"]
        );
    }
}
