//! [`DropReason`]: why a packet was dropped, the one vocabulary every per-packet decision (the
//! tables, decapsulation, NAT, the datapath) reports its refusals in.

use std::fmt;

/// Why a packet was dropped. [`DropReason::as_str`] is the `reason` label of
/// `podrouter_drops_total`, stable across releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No rule sends the destination anywhere (cluster address of no peer, no gateway, ...).
    NoRoute,
    /// A header field the protocol forbids, or mixed address families.
    Malformed,
    /// The buffer ends before a length the packet promises.
    Truncated,
    /// IPv4 header checksum wrong.
    BadChecksum,
    /// Encapsulated packet from an underlay address that is no known peer.
    UnknownPeer,
    /// Inner source outside the sending peer's pod CIDRs.
    SpoofedInnerSource,
    /// Inner destination outside this node's pod CIDRs.
    NotLocalDestination,
    /// Tunnel VNI differs from ours.
    BadVni,
    /// VXLAN without the I flag (RFC 7348 §5).
    BadVxlanFlags,
    /// Geneve version other than 0 (RFC 8926 §3.4).
    GeneveVersion,
    /// Geneve option with the critical bit that podrouter does not understand (RFC 8926 §3.5.1).
    GeneveCriticalOption,
    /// Geneve OAM frame: not data.
    GeneveOam,
    /// Tunnel payload neither IPv4 nor IPv6.
    UnsupportedInnerProtocol,
    /// Outer IPv4 header or UDP checksum wrong.
    BadOuterChecksum,
    /// Outer IPv4 fragment (tunnels are sent DF; podrouter does not reassemble).
    OuterFragment,
    /// Outer CE over a Not-ECT inner packet (RFC 6040 §4.2).
    EcnDrop,
    /// The native next hop's MAC is not resolved yet.
    NeighborUnresolved,
    /// No free masquerade port for this remote endpoint, or the table is full.
    NatExhausted,
    /// A packet to the masquerade address that matches no translation, or a pod packet of an
    /// unknown flow that cannot open one (a TCP segment other than a SYN, an RST).
    NatNoMapping,
    /// The pod already holds `masquerade.max_entries_per_pod` translations.
    NatPodLimit,
    /// A reply RST whose sequence number is outside the connection's window (RFC 5961 §3).
    NatRstOutOfWindow,
    /// TTL / hop limit would reach zero.
    TtlExceeded,
    /// Well formed but not something podrouter handles (protocol, fragment through NAT, ...).
    Unsupported,
    /// Encapsulated datagram whose outer UDP source port lies in this node's masquerade port
    /// range: what a pod's hand-made tunnel datagram looks like after a peer masqueraded it
    /// (tunnel senders use [`crate::encap::SOURCE_PORT_MIN`]..=[`crate::encap::SOURCE_PORT_MAX`]).
    TunnelSourcePort,
}

impl DropReason {
    /// Every reason, in declaration order (the I/O layer keeps one counter per entry).
    pub const ALL: [DropReason; 24] = [
        DropReason::NoRoute,
        DropReason::Malformed,
        DropReason::Truncated,
        DropReason::BadChecksum,
        DropReason::UnknownPeer,
        DropReason::SpoofedInnerSource,
        DropReason::NotLocalDestination,
        DropReason::BadVni,
        DropReason::BadVxlanFlags,
        DropReason::GeneveVersion,
        DropReason::GeneveCriticalOption,
        DropReason::GeneveOam,
        DropReason::UnsupportedInnerProtocol,
        DropReason::BadOuterChecksum,
        DropReason::OuterFragment,
        DropReason::EcnDrop,
        DropReason::NeighborUnresolved,
        DropReason::NatExhausted,
        DropReason::NatNoMapping,
        DropReason::NatPodLimit,
        DropReason::NatRstOutOfWindow,
        DropReason::TtlExceeded,
        DropReason::Unsupported,
        DropReason::TunnelSourcePort,
    ];

    /// Stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::Malformed => "malformed",
            DropReason::Truncated => "truncated",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::SpoofedInnerSource => "spoofed_inner_source",
            DropReason::NotLocalDestination => "not_local_destination",
            DropReason::BadVni => "bad_vni",
            DropReason::BadVxlanFlags => "bad_vxlan_flags",
            DropReason::GeneveVersion => "geneve_version",
            DropReason::GeneveCriticalOption => "geneve_critical_option",
            DropReason::GeneveOam => "geneve_oam",
            DropReason::UnsupportedInnerProtocol => "unsupported_inner_protocol",
            DropReason::BadOuterChecksum => "bad_outer_checksum",
            DropReason::OuterFragment => "outer_fragment",
            DropReason::EcnDrop => "ecn_drop",
            DropReason::NeighborUnresolved => "neighbor_unresolved",
            DropReason::NatExhausted => "nat_exhausted",
            DropReason::NatNoMapping => "nat_no_mapping",
            DropReason::NatPodLimit => "nat_pod_limit",
            DropReason::NatRstOutOfWindow => "nat_rst_out_of_window",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::Unsupported => "unsupported",
            DropReason::TunnelSourcePort => "tunnel_source_port",
        }
    }

    /// Position in [`DropReason::ALL`], for counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<crate::wire::Error> for DropReason {
    fn from(e: crate::wire::Error) -> Self {
        use crate::wire::Error as E;
        match e {
            E::Truncated => DropReason::Truncated,
            E::Malformed => DropReason::Malformed,
            E::Unsupported => DropReason::Unsupported,
            E::BadChecksum => DropReason::BadChecksum,
            E::UnknownCriticalOption => DropReason::GeneveCriticalOption,
        }
    }
}

impl From<crate::encap::DecapError> for DropReason {
    fn from(e: crate::encap::DecapError) -> Self {
        use crate::encap::DecapError as E;
        match e {
            E::Truncated => DropReason::Truncated,
            E::Malformed => DropReason::Malformed,
            E::BadVxlanFlags => DropReason::BadVxlanFlags,
            E::GeneveVersion => DropReason::GeneveVersion,
            E::GeneveCriticalOption => DropReason::GeneveCriticalOption,
            E::GeneveOam => DropReason::GeneveOam,
            E::UnsupportedInnerProtocol => DropReason::UnsupportedInnerProtocol,
            E::BadOuterChecksum => DropReason::BadOuterChecksum,
            E::EcnDrop => DropReason::EcnDrop,
            E::OuterFragment => DropReason::OuterFragment,
            E::Unsupported => DropReason::Unsupported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reason_names_are_unique_snake_case() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(r
                .as_str()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
        for e in crate::encap::DecapError::ALL {
            // The decap reasons keep their names when they become drop reasons.
            assert_eq!(DropReason::from(e).as_str(), e.as_str());
        }
    }
}
