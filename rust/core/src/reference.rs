//! The reference topology (docs/design.md §8) as table specs, seen from node1: the one builder
//! the core's tests, the benches (`benches/core.rs`) and the fuzz targets share.
//!
//! node1 (172.16.2.2, pods 10.244.1.0/24) behind the gateway 172.16.2.1; node2 (172.16.3.2,
//! 10.244.2.0/24) behind a router; node3 (172.16.2.3, 10.244.3.0/24) on node1's L2.

use std::net::IpAddr;

use crate::classify::Tables;
use crate::spec::{
    Cidr, EngineSettings, MasqueradeSpec, NextHop, NodeSpec, PeerSpec, RoutingMode, TableSpec,
    TunnelSpec,
};

/// The underlay gateway's MAC.
pub const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// The MAC of an on-link peer (node3).
pub const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
/// node1's underlay address.
pub const NODE1: &str = "172.16.2.2";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a literal address")
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("a literal CIDR")
}

/// node1's start-time settings: its underlay address, the default port range.
pub fn settings() -> EngineSettings {
    EngineSettings::new(ip(NODE1))
}

/// A peer at `address` owning `pod_cidr`: its own next hop (MAC [`PEER_MAC`]) when `on_link`,
/// else none of its own (native packets to it go to the spec's gateway).
pub fn peer(name: &str, address: IpAddr, pod_cidr: &str, on_link: bool) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        address,
        pod_cidrs: vec![cidr(pod_cidr)],
        mode: None,
        tunnel_protocol: None,
        on_link,
        next_hop: on_link.then_some(NextHop {
            ip: address,
            mac: Some(PEER_MAC),
        }),
        vtep_mac: None,
        geneve_payload: None,
    }
}

/// node1 in `mode` with `peers`, the gateway resolved, masquerade off.
pub fn node1(mode: RoutingMode, peers: Vec<PeerSpec>) -> TableSpec {
    TableSpec {
        generation: 1,
        node: NodeSpec {
            name: "node1".into(),
            pod_cidrs: vec![cidr("10.244.1.0/24")],
        },
        cluster_cidrs: vec![cidr("10.244.0.0/16")],
        mode,
        native_cidrs: vec![],
        native_when_on_link: mode == RoutingMode::Hybrid,
        tunnel: TunnelSpec::default(),
        gateway: Some(NextHop {
            ip: ip("172.16.2.1"),
            mac: Some(GATEWAY_MAC),
        }),
        masquerade: MasqueradeSpec::default(),
        peers,
    }
}

/// The reference topology, hybrid with `native_when_on_link`, masquerade on: node2 through the
/// tunnel, node3 native.
pub fn hybrid() -> TableSpec {
    let mut spec = node1(
        RoutingMode::Hybrid,
        vec![
            peer("node2", ip("172.16.3.2"), "10.244.2.0/24", false),
            peer("node3", ip("172.16.2.3"), "10.244.3.0/24", true),
        ],
    );
    spec.masquerade.enabled = true;
    spec
}

/// `spec` compiled against node1's [`settings`].
pub fn tables(spec: &TableSpec) -> Tables {
    Tables::build(spec, &settings()).expect("the reference spec compiles")
}
