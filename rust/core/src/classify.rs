//! The routing decision: a [`TableSpec`] from the control plane compiled into [`Tables`], and
//! [`Tables::classify`] / [`Tables::validate_ingress`], the two questions the datapath asks per
//! packet. The rules are docs/design.md §2 as refined in docs/architecture.md ("Verdicts").
//!
//! # Compilation
//!
//! One LPM ([`IpLpm`]) answers "where is this destination" in a single lookup: cluster CIDRs map
//! to `Cluster`, peer pod CIDRs to `Peer(id)` and this node's pod CIDRs to `Local`. Because
//! [`Tables::build`] insists that every node and peer pod CIDR lies inside a cluster CIDR and that
//! pod CIDRs do not overlap, the longest match is always the most specific owner. `native_cidrs`
//! (consulted only in hybrid mode) and `non_masquerade_cidrs` (only for destinations outside the
//! cluster) are separate tables. Each peer's native and tunnel verdicts are precomputed, so
//! classification is two or three lookups and a few branches, with no allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::drop::DropReason;
use crate::encap::{GenevePayload, TunnelProto};
use crate::lpm::IpLpm;
use crate::spec::{
    Cidr, EngineSettings, MasqueradeSpec, NextHop, NextHopId, PeerId, RoutingMode, SpecError,
    TableSpec, TunnelSpec,
};
use crate::verdict::{Path, Verdict};

/// A compiled peer, as [`Tables::peers`] exposes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub address: IpAddr,
    pub pod_cidrs: Vec<Cidr>,
    /// The effective mode (override or node-wide).
    pub mode: RoutingMode,
    /// The effective tunnel protocol (override or node-wide).
    pub tunnel_protocol: TunnelProto,
    pub on_link: bool,
    /// The inner Ethernet destination of VXLAN frames to this peer (the spec's `vtep_mac`, else
    /// the synthesized one).
    pub vtep_mac: [u8; 6],
    /// The effective Geneve payload kind (override or node-wide).
    pub geneve_payload: GenevePayload,
    /// Verdict when this peer is reached natively (`Native` or a `Drop`).
    pub native: Verdict,
    /// Verdict when this peer is reached through the tunnel.
    pub tunnel: Verdict,
}

/// Where a destination lives, from the one combined LPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Local,
    Peer(PeerId),
    /// Inside a cluster CIDR but no peer owns it.
    Cluster,
}

/// The compiled, immutable routing tables. Built by [`Tables::build`], swapped whole.
#[derive(Debug, Clone)]
pub struct Tables {
    generation: u64,
    node_name: String,
    /// The engine's start-time settings these tables were compiled against.
    settings: EngineSettings,
    node_pod_cidrs: Vec<Cidr>,
    dest: IpLpm<Dest>,
    native: IpLpm<()>,
    non_masq: IpLpm<()>,
    peer_by_addr: IpLpm<PeerId>,
    peers: Vec<Peer>,
    next_hops: Vec<NextHop>,
    /// Verdict for a destination outside the cluster when masquerade applies / does not.
    outside_masq: Verdict,
    outside_native: Verdict,
    /// Verdict for an IPv6 destination outside the cluster when IPv6 masquerade applies.
    outside_masq6: Verdict,
    mode: RoutingMode,
    native_when_on_link: bool,
    tunnel: TunnelSpec,
    masquerade: MasqueradeSpec,
}

fn lpm_entries(cidrs: &[Cidr]) -> Vec<(IpAddr, u8, ())> {
    cidrs.iter().map(|c| (c.addr, c.len, ())).collect()
}

/// The verdict for a native hop: a next hop without a MAC cannot be used yet.
fn native_via(next_hops: &[NextHop], id: Option<NextHopId>, masq: bool) -> Verdict {
    match id {
        None => Verdict::Drop(DropReason::NoRoute),
        Some(id) if next_hops[id.0 as usize].mac.is_none() => {
            Verdict::Drop(DropReason::NeighborUnresolved)
        }
        Some(next_hop) if masq => Verdict::Masquerade { next_hop },
        Some(next_hop) => Verdict::Native { next_hop },
    }
}

impl Tables {
    /// Validates and compiles a spec against the engine's start-time `settings` (the node's
    /// underlay addresses, the masquerade port range and IPv6 address). Refuses a spec the
    /// rulebook ([`crate::rules::check`]) finds any problem in, with the first problem's key path;
    /// [`Tables::check`] lists them all.
    pub fn build(spec: &TableSpec, settings: &EngineSettings) -> Result<Tables, SpecError> {
        crate::rules::first_problem(spec, settings)?;
        let lpm_err = |path: &str| {
            let path = path.to_string();
            move |e: crate::lpm::LpmError| SpecError::new(path.clone(), e.to_string())
        };
        // Cluster first, then pod CIDRs: a pod CIDR equal to a cluster CIDR must win the tie.
        let mut dest: Vec<(IpAddr, u8, Dest)> = spec
            .cluster_cidrs
            .iter()
            .map(|c| (c.addr, c.len, Dest::Cluster))
            .collect();
        dest.extend(
            spec.node
                .pod_cidrs
                .iter()
                .map(|c| (c.addr, c.len, Dest::Local)),
        );
        for (p, peer) in spec.peers.iter().enumerate() {
            let id = PeerId(p as u32);
            dest.extend(
                peer.pod_cidrs
                    .iter()
                    .map(|c| (c.addr, c.len, Dest::Peer(id))),
            );
        }
        let dest = IpLpm::build(&dest).map_err(lpm_err("cluster_cidrs"))?;
        let native =
            IpLpm::build(&lpm_entries(&spec.native_cidrs)).map_err(lpm_err("native_cidrs"))?;
        let non_masq = IpLpm::build(&lpm_entries(&spec.masquerade.non_masquerade_cidrs))
            .map_err(lpm_err("masquerade.non_masquerade_cidrs"))?;
        let peer_addrs: Vec<(IpAddr, u8, PeerId)> = spec
            .peers
            .iter()
            .enumerate()
            .map(|(p, peer)| {
                let len = if peer.address.is_ipv4() { 32 } else { 128 };
                (peer.address, len, PeerId(p as u32))
            })
            .collect();
        let peer_by_addr = IpLpm::build(&peer_addrs).map_err(lpm_err("peers"))?;

        let mut next_hops = Vec::new();
        let gateway = spec.gateway.map(|g| {
            next_hops.push(g);
            NextHopId(0)
        });
        // The IPv6 masquerade next hop (shares the gateway's entry when it is the same).
        let gateway6 = spec.masquerade.gateway6.map(|g| {
            let id = next_hops.iter().position(|x| *x == g).unwrap_or_else(|| {
                next_hops.push(g);
                next_hops.len() - 1
            });
            NextHopId(id as u32)
        });
        let mut peers = Vec::with_capacity(spec.peers.len());
        for (p, ps) in spec.peers.iter().enumerate() {
            let nh = match ps.next_hop {
                Some(nh) => {
                    // Peers behind the same router share one next-hop entry.
                    let id = match next_hops.iter().position(|x| *x == nh) {
                        Some(i) => i,
                        None => {
                            next_hops.push(nh);
                            next_hops.len() - 1
                        }
                    };
                    Some(NextHopId(id as u32))
                }
                // An on-link peer is its own next hop, and its MAC is not known yet.
                None if ps.on_link => None,
                None => gateway,
            };
            let native = match (ps.next_hop, ps.on_link) {
                (None, true) => Verdict::Drop(DropReason::NeighborUnresolved),
                _ => native_via(&next_hops, nh, false),
            };
            let proto = ps.tunnel_protocol.unwrap_or(spec.tunnel.protocol);
            peers.push(Peer {
                name: ps.name.clone(),
                address: ps.address,
                pod_cidrs: ps.pod_cidrs.clone(),
                mode: ps.mode.unwrap_or(spec.mode),
                tunnel_protocol: proto,
                on_link: ps.on_link,
                vtep_mac: ps
                    .vtep_mac
                    .unwrap_or_else(|| crate::encap::vxlan_inner_mac(ps.address)),
                geneve_payload: ps.geneve_payload.unwrap_or(spec.tunnel.geneve_payload),
                native,
                tunnel: Verdict::Tunnel {
                    peer: PeerId(p as u32),
                    proto,
                    vni: spec.tunnel.vni,
                    remote: ps.address,
                    port: spec.tunnel.port(proto),
                },
            });
        }
        Ok(Tables {
            generation: spec.generation,
            node_name: spec.node.name.clone(),
            settings: *settings,
            node_pod_cidrs: spec.node.pod_cidrs.clone(),
            dest,
            native,
            non_masq,
            peer_by_addr,
            outside_masq: native_via(&next_hops, gateway, true),
            outside_native: native_via(&next_hops, gateway, false),
            outside_masq6: native_via(&next_hops, gateway6, true),
            peers,
            next_hops,
            mode: spec.mode,
            native_when_on_link: spec.native_when_on_link,
            tunnel: spec.tunnel,
            masquerade: spec.masquerade.clone(),
        })
    }

    /// Every problem [`Tables::build`] would refuse `spec` for (empty: it compiles), each with its
    /// key path: the core's rulebook, [`crate::rules::check`].
    pub fn check(spec: &TableSpec, settings: &EngineSettings) -> Vec<SpecError> {
        crate::rules::check(spec, settings)
    }

    /// Decides what to do with a packet from `src` to `dst` that left a local pod.
    ///
    /// 1. `dst` in this node's pod CIDRs: `Local`.
    /// 2. `dst` in the cluster: the owning peer (none: `Drop(no_route)`), then its mode (override
    ///    or node-wide): native -> `Native`, tunnel -> `Tunnel`, hybrid -> `Native` if `dst` is in
    ///    `native_cidrs` or (`native_when_on_link` and the peer is on-link), else `Tunnel`.
    /// 3. Outside the cluster: `Masquerade` when masquerade is enabled, `dst` is not in
    ///    `non_masquerade_cidrs` and `src` is one of our pods (only they are translated; the
    ///    node's own traffic keeps its address): IPv4 via the gateway to the IPv4 node address
    ///    (`Drop(no_route)` on an IPv6-only underlay, which has none), IPv6 via
    ///    `masquerade.gateway6` to `masquerade.address6` (unset: IPv6 leaves untranslated).
    ///    Otherwise `Native` via the gateway.
    ///
    /// A native verdict whose next hop has no MAC yet is `Drop(neighbor_unresolved)`; no gateway is
    /// `Drop(no_route)`. Mixed address families are `Drop(malformed)`.
    #[inline]
    pub fn classify(&self, src: IpAddr, dst: IpAddr) -> Verdict {
        if src.is_ipv4() != dst.is_ipv4() {
            return Verdict::Drop(DropReason::Malformed);
        }
        match self.dest.lookup(dst) {
            Some(Dest::Local) => Verdict::Local,
            Some(Dest::Peer(id)) => {
                let peer = &self.peers[id.0 as usize];
                if self.goes_native(peer, dst) {
                    peer.native
                } else {
                    peer.tunnel
                }
            }
            Some(Dest::Cluster) => Verdict::Drop(DropReason::NoRoute),
            None => {
                if !self.masquerade.enabled
                    || self.non_masq.contains(dst)
                    || self.dest.lookup(src) != Some(Dest::Local)
                {
                    return self.outside_native;
                }
                match (dst, self.settings.address) {
                    (IpAddr::V4(_), IpAddr::V4(_)) => self.outside_masq,
                    // an IPv6-only underlay has no IPv4 address to translate to: never let an
                    // IPv4 pod packet out untranslated (docs/masquerade.md)
                    (IpAddr::V4(_), IpAddr::V6(_)) => Verdict::Drop(DropReason::NoRoute),
                    (IpAddr::V6(_), _) if self.settings.masquerade_address6.is_some() => {
                        self.outside_masq6
                    }
                    (IpAddr::V6(_), _) => self.outside_native,
                }
            }
        }
    }

    /// Step 2 of [`Tables::classify`]: whether `dst`, inside `peer`'s pod CIDRs, is reached
    /// natively (the peer's mode; in hybrid mode `native_when_on_link` and an on-link peer, or
    /// `dst` in `native_cidrs`) rather than through the tunnel.
    #[inline]
    fn goes_native(&self, peer: &Peer, dst: IpAddr) -> bool {
        match peer.mode {
            RoutingMode::Native => true,
            RoutingMode::Tunnel => false,
            RoutingMode::Hybrid => {
                (self.native_when_on_link && peer.on_link) || self.native.contains(dst)
            }
        }
    }

    /// The path packets to `dst` take when `dst` lies in a peer's pod CIDRs: [`Path::Native`] or
    /// the peer's tunnel path, decided by the same rule as [`Tables::classify`] but whether or not
    /// the next hop is resolved yet (classify says `neighbor_unresolved` then). The control plane's
    /// route plan asks this for each destination it routes into the datapath, so the route's MTU
    /// follows the path the datapath takes. `None` outside every peer's pod CIDRs.
    pub fn peer_path(&self, dst: IpAddr) -> Option<(PeerId, Path)> {
        match self.dest.lookup(dst) {
            Some(Dest::Peer(id)) => {
                let peer = &self.peers[id.0 as usize];
                let path = if self.goes_native(peer, dst) {
                    Path::Native
                } else {
                    Path::tunnel(peer.tunnel_protocol)
                };
                Some((id, path))
            }
            _ => None,
        }
    }

    /// Checks a decapsulated packet: the outer source must be a known peer, the VNI ours, the
    /// inner source inside that peer's pod CIDRs and the inner destination one of our pods.
    /// Returns the sending peer.
    pub fn validate_ingress(
        &self,
        outer_src: IpAddr,
        vni: u32,
        inner_src: IpAddr,
        inner_dst: IpAddr,
    ) -> Result<PeerId, DropReason> {
        let peer = self
            .peer_by_addr
            .lookup(outer_src)
            .ok_or(DropReason::UnknownPeer)?;
        if vni != self.tunnel.vni {
            return Err(DropReason::BadVni);
        }
        if inner_src.is_ipv4() != inner_dst.is_ipv4() {
            return Err(DropReason::Malformed);
        }
        if self.dest.lookup(inner_src) != Some(Dest::Peer(peer)) {
            return Err(DropReason::SpoofedInnerSource);
        }
        if self.dest.lookup(inner_dst) != Some(Dest::Local) {
            return Err(DropReason::NotLocalDestination);
        }
        Ok(peer)
    }

    /// The spec's generation number (`podrouter_table_generation`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The engine's start-time settings these tables were compiled against.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// This node's IPv4 underlay address: the masquerade address and the filter of the
    /// masquerade reply socket. `0.0.0.0` on an IPv6-only underlay (which has no IPv4 masquerade:
    /// `classify` drops IPv4 pod packets leaving the cluster there).
    pub fn node_address(&self) -> Ipv4Addr {
        self.settings.address4()
    }

    /// This node's primary underlay address (`node.address`, either family).
    pub fn underlay_address(&self) -> IpAddr {
        self.settings.address
    }

    /// The dual-stack underlay's IPv6 address (`node.address6`), if any.
    pub fn underlay_address6(&self) -> Option<Ipv6Addr> {
        self.settings.address6
    }

    /// The IPv6 masquerade address (`masquerade.address6`), if IPv6 pods are translated.
    pub fn masquerade_address6(&self) -> Option<Ipv6Addr> {
        self.settings.masquerade_address6
    }

    /// The outer source towards an underlay address of `remote`'s family, if this node has one.
    pub fn underlay_source_for(&self, remote: IpAddr) -> Option<IpAddr> {
        self.settings.source_for(remote)
    }

    /// This node's pod CIDRs.
    pub fn node_pod_cidrs(&self) -> &[Cidr] {
        &self.node_pod_cidrs
    }

    /// True if `ip` is one of this node's pod addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.dest.lookup(ip) == Some(Dest::Local)
    }

    /// The node-wide routing mode.
    pub fn mode(&self) -> RoutingMode {
        self.mode
    }

    /// Tunnel settings (protocol, VNI, ports).
    pub fn tunnel(&self) -> &TunnelSpec {
        &self.tunnel
    }

    /// Masquerade settings that a swap may change (enabled, exceptions, IPv6 next hop).
    pub fn masquerade(&self) -> &MasqueradeSpec {
        &self.masquerade
    }

    /// Compiled peers, indexed by [`PeerId`].
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// One peer, if `id` is in range.
    pub fn peer(&self, id: PeerId) -> Option<&Peer> {
        self.peers.get(id.0 as usize)
    }

    /// The inner Ethernet destination for VXLAN frames to peer `id` (its configured VTEP MAC or
    /// the synthesized one; the synthesized one of `remote` if `id` is out of range).
    pub fn peer_vtep_mac(&self, id: PeerId, remote: IpAddr) -> [u8; 6] {
        self.peer(id)
            .map_or_else(|| crate::encap::vxlan_inner_mac(remote), |p| p.vtep_mac)
    }

    /// This node's VTEP MAC: the inner Ethernet source of every VXLAN frame it sends, the address
    /// a kernel (Flannel-style) peer must point its neighbour and FDB entries for this node at.
    pub fn vtep_mac(&self) -> [u8; 6] {
        crate::encap::vxlan_inner_mac(self.settings.address)
    }

    /// What a `Verdict::Tunnel` encapsulates with: from this node's address and VTEP MAC to the
    /// peer's underlay address, port and VTEP MAC, with the peer's Geneve payload kind (the
    /// node-wide one if `peer` is out of range).
    pub fn encap_params(
        &self,
        peer: PeerId,
        proto: TunnelProto,
        vni: u32,
        remote: IpAddr,
        port: u16,
    ) -> crate::encap::EncapParams {
        crate::encap::EncapParams {
            proto,
            vni,
            // A peer of a family we have no address in is refused when the tables are built.
            src: self
                .underlay_source_for(remote)
                .unwrap_or(self.settings.address),
            dst: remote,
            dst_port: port,
            inner_src_mac: self.vtep_mac(),
            // a kernel vxlan peer only accepts frames addressed to its own MAC (`vtep_mac`)
            inner_dst_mac: self.peer_vtep_mac(peer, remote),
            geneve_payload: self
                .peer(peer)
                .map_or(self.tunnel.geneve_payload, |p| p.geneve_payload),
        }
    }

    /// The peer whose underlay address is `addr`.
    pub fn peer_by_address(&self, addr: IpAddr) -> Option<PeerId> {
        self.peer_by_addr.lookup(addr)
    }

    /// Next hops, indexed by [`NextHopId`] (the gateway, if any, is id 0).
    pub fn next_hops(&self) -> &[NextHop] {
        &self.next_hops
    }

    /// One next hop, if `id` is in range.
    pub fn next_hop(&self, id: NextHopId) -> Option<&NextHop> {
        self.next_hops.get(id.0 as usize)
    }

    /// Heap bytes of the compiled LPMs (a rough size of the table for status output).
    pub fn lpm_memory_bytes(&self) -> usize {
        self.dest.memory_bytes()
            + self.native.memory_bytes()
            + self.non_masq.memory_bytes()
            + self.peer_by_addr.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{NodeSpec, PeerSpec};
    use crate::verdict::Path;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const N3_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];

    /// docs/design.md §8: node1 (172.16.2.2, 10.244.1.0/24); node2 behind the router R
    /// (172.16.3.2, 10.244.2.0/24); node3 on node1's L2 (172.16.2.3, 10.244.3.0/24).
    fn spec() -> TableSpec {
        TableSpec {
            generation: 7,
            node: NodeSpec {
                name: "node1".into(),
                pod_cidrs: vec![c("10.244.1.0/24"), c("fd00:10:244:1::/64")],
            },
            cluster_cidrs: vec![c("10.244.0.0/16"), c("fd00:10:244::/48")],
            mode: RoutingMode::Tunnel,
            native_cidrs: vec![],
            native_when_on_link: false,
            tunnel: TunnelSpec::default(),
            gateway: Some(NextHop {
                ip: ip("172.16.2.1"),
                mac: Some(GW_MAC),
            }),
            masquerade: MasqueradeSpec {
                enabled: true,
                non_masquerade_cidrs: vec![c("192.168.0.0/16")],
                gateway6: None,
            },
            peers: vec![
                PeerSpec {
                    name: "node2".into(),
                    address: ip("172.16.3.2"),
                    pod_cidrs: vec![c("10.244.2.0/24"), c("fd00:10:244:2::/64")],
                    mode: None,
                    tunnel_protocol: None,
                    on_link: false,
                    next_hop: Some(NextHop {
                        ip: ip("172.16.2.1"),
                        mac: Some(GW_MAC),
                    }),
                    vtep_mac: None,
                    geneve_payload: None,
                },
                PeerSpec {
                    name: "node3".into(),
                    address: ip("172.16.2.3"),
                    pod_cidrs: vec![c("10.244.3.0/24")],
                    mode: None,
                    tunnel_protocol: None,
                    on_link: true,
                    next_hop: Some(NextHop {
                        ip: ip("172.16.2.3"),
                        mac: Some(N3_MAC),
                    }),
                    vtep_mac: None,
                    geneve_payload: None,
                },
            ],
        }
    }

    /// node1's start-time settings: its IPv4 underlay address, the default port range.
    fn settings() -> EngineSettings {
        EngineSettings {
            port_range: (61000, 65535),
            ..EngineSettings::new(ip("172.16.2.2"))
        }
    }

    fn tables(f: impl FnOnce(&mut TableSpec)) -> Tables {
        tables_with(|s, _| f(s))
    }

    fn build_with(
        f: impl FnOnce(&mut TableSpec, &mut EngineSettings),
    ) -> Result<Tables, SpecError> {
        let (mut s, mut e) = (spec(), settings());
        f(&mut s, &mut e);
        Tables::build(&s, &e)
    }

    fn tables_with(f: impl FnOnce(&mut TableSpec, &mut EngineSettings)) -> Tables {
        build_with(f).unwrap()
    }

    fn tunnel_to(t: &Tables, peer: u32, proto: TunnelProto) -> Verdict {
        let p = &t.peers()[peer as usize];
        Verdict::Tunnel {
            peer: PeerId(peer),
            proto,
            vni: 1,
            remote: p.address,
            port: proto.default_port(),
        }
    }

    fn native_mac(t: &Tables, v: Verdict) -> Option<[u8; 6]> {
        match v {
            Verdict::Native { next_hop } | Verdict::Masquerade { next_hop } => {
                t.next_hop(next_hop).unwrap().mac
            }
            _ => None,
        }
    }

    const POD: &str = "10.244.1.10";

    #[test]
    fn local_destination() {
        let t = tables(|_| {});
        assert_eq!(t.classify(ip(POD), ip("10.244.1.20")), Verdict::Local);
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("fd00:10:244:1::b")),
            Verdict::Local
        );
        assert!(t.is_local(ip("10.244.1.255")));
        assert_eq!(
            t.classify(ip(POD), ip("10.244.1.20")).path(),
            Some(Path::Local)
        );
    }

    #[test]
    fn tunnel_mode_tunnels_to_every_peer() {
        let t = tables(|_| {});
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            tunnel_to(&t, 0, TunnelProto::Vxlan)
        );
        assert_eq!(
            t.classify(ip(POD), ip("10.244.3.5")),
            tunnel_to(&t, 1, TunnelProto::Vxlan)
        );
        // IPv6 inner over the IPv4 underlay.
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("fd00:10:244:2::5")),
            tunnel_to(&t, 0, TunnelProto::Vxlan)
        );
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")).path(),
            Some(Path::Vxlan)
        );
    }

    #[test]
    fn geneve_node_default_and_custom_ports() {
        let t = tables(|s| {
            s.tunnel.protocol = TunnelProto::Geneve;
            s.tunnel.geneve_port = 16081;
            s.tunnel.vni = 42;
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            Verdict::Tunnel {
                peer: PeerId(0),
                proto: TunnelProto::Geneve,
                vni: 42,
                remote: ip("172.16.3.2"),
                port: 16081
            }
        );
    }

    #[test]
    fn native_mode_uses_each_peers_next_hop() {
        let t = tables(|s| s.mode = RoutingMode::Native);
        let v = t.classify(ip(POD), ip("10.244.2.5"));
        assert!(matches!(v, Verdict::Native { .. }));
        assert_eq!(native_mac(&t, v), Some(GW_MAC));
        let v = t.classify(ip(POD), ip("10.244.3.5"));
        assert_eq!(native_mac(&t, v), Some(N3_MAC));
        assert_eq!(v.path(), Some(Path::Native));
    }

    #[test]
    fn cluster_address_of_no_peer_has_no_route() {
        let t = tables(|_| {});
        assert_eq!(
            t.classify(ip(POD), ip("10.244.99.1")),
            Verdict::Drop(DropReason::NoRoute)
        );
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("fd00:10:244:99::1")),
            Verdict::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn per_peer_overrides() {
        // Node default vxlan/tunnel; node2 speaks geneve, node3 is forced native.
        let t = tables(|s| {
            s.peers[0].tunnel_protocol = Some(TunnelProto::Geneve);
            s.peers[1].mode = Some(RoutingMode::Native);
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            tunnel_to(&t, 0, TunnelProto::Geneve)
        );
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")).path(),
            Some(Path::Geneve)
        );
        let v = t.classify(ip(POD), ip("10.244.3.5"));
        assert_eq!(native_mac(&t, v), Some(N3_MAC));
        // And the other way round: node-wide native with one peer forced into a tunnel.
        let t = tables(|s| {
            s.mode = RoutingMode::Native;
            s.peers[0].mode = Some(RoutingMode::Tunnel);
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            tunnel_to(&t, 0, TunnelProto::Vxlan)
        );
        assert!(matches!(
            t.classify(ip(POD), ip("10.244.3.5")),
            Verdict::Native { .. }
        ));
    }

    #[test]
    fn hybrid_native_when_on_link() {
        // The reference topology: native to node3 (same L2), tunnel to node2 (behind R).
        let t = tables(|s| {
            s.mode = RoutingMode::Hybrid;
            s.native_when_on_link = true;
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            tunnel_to(&t, 0, TunnelProto::Vxlan)
        );
        let v = t.classify(ip(POD), ip("10.244.3.5"));
        assert_eq!(native_mac(&t, v), Some(N3_MAC));
        // Without the flag, on-link alone does not make it native.
        let t = tables(|s| s.mode = RoutingMode::Hybrid);
        assert_eq!(
            t.classify(ip(POD), ip("10.244.3.5")),
            tunnel_to(&t, 1, TunnelProto::Vxlan)
        );
    }

    #[test]
    fn hybrid_native_cidrs() {
        // native_cidrs covers only part of node2's pod CIDR: the rule is per destination.
        let t = tables(|s| {
            s.mode = RoutingMode::Hybrid;
            s.native_cidrs = vec![c("10.244.2.128/25"), c("10.244.3.0/24")];
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            tunnel_to(&t, 0, TunnelProto::Vxlan)
        );
        let v = t.classify(ip(POD), ip("10.244.2.200"));
        assert_eq!(native_mac(&t, v), Some(GW_MAC));
        let v = t.classify(ip(POD), ip("10.244.3.1"));
        assert_eq!(native_mac(&t, v), Some(N3_MAC));
        // A peer override beats hybrid: tunnel forced even inside native_cidrs.
        let t = tables(|s| {
            s.mode = RoutingMode::Hybrid;
            s.native_cidrs = vec![c("10.244.0.0/17")];
            s.peers[1].mode = Some(RoutingMode::Tunnel);
            s.peers[1].tunnel_protocol = Some(TunnelProto::Geneve);
        });
        assert!(matches!(
            t.classify(ip(POD), ip("10.244.2.9")),
            Verdict::Native { .. }
        ));
        assert_eq!(
            t.classify(ip(POD), ip("10.244.3.9")),
            tunnel_to(&t, 1, TunnelProto::Geneve)
        );
        // A peer may opt into hybrid while the node tunnels.
        let t = tables(|s| {
            s.native_when_on_link = true;
            s.peers[1].mode = Some(RoutingMode::Hybrid);
        });
        assert!(matches!(
            t.classify(ip(POD), ip("10.244.3.9")),
            Verdict::Native { .. }
        ));
    }

    #[test]
    fn peer_path_is_the_classify_rule_without_the_next_hop() {
        // hybrid with native_cidrs over half of node2's CIDR; node3 on-link but not resolved yet
        let t = tables(|s| {
            s.mode = RoutingMode::Hybrid;
            s.native_when_on_link = true;
            s.native_cidrs = vec![c("10.244.2.128/25")];
            s.peers[1].next_hop = None;
            s.peers[0].tunnel_protocol = Some(TunnelProto::Geneve);
        });
        assert_eq!(
            t.peer_path(ip("10.244.2.5")),
            Some((PeerId(0), Path::Geneve))
        );
        assert_eq!(
            t.peer_path(ip("10.244.2.200")),
            Some((PeerId(0), Path::Native))
        );
        // classify drops it until the neighbour answers; the route still goes the native way
        assert_eq!(
            t.classify(ip(POD), ip("10.244.3.5")),
            Verdict::Drop(DropReason::NeighborUnresolved)
        );
        assert_eq!(
            t.peer_path(ip("10.244.3.5")),
            Some((PeerId(1), Path::Native))
        );
        // and wherever classify forwards to a peer, both agree
        for (src, dst) in [
            (POD, "10.244.2.5"),
            (POD, "10.244.2.200"),
            ("fd00:10:244:1::a", "fd00:10:244:2::9"),
        ] {
            let v = t.classify(ip(src), ip(dst));
            assert_eq!(t.peer_path(ip(dst)).map(|p| p.1), v.path(), "{dst}");
        }
        // not a peer's: local, cluster space without an owner, outside the cluster
        for dst in ["10.244.1.5", "10.244.9.1", "8.8.8.8"] {
            assert_eq!(t.peer_path(ip(dst)), None, "{dst}");
        }
    }

    #[test]
    fn native_next_hop_resolution() {
        // Off-link peer without an explicit next hop: the gateway.
        let t = tables(|s| {
            s.mode = RoutingMode::Native;
            s.peers[0].next_hop = None;
        });
        let v = t.classify(ip(POD), ip("10.244.2.5"));
        assert_eq!(
            v,
            Verdict::Native {
                next_hop: NextHopId(0)
            }
        );
        // On-link peer whose MAC is not resolved.
        let t = tables(|s| {
            s.mode = RoutingMode::Native;
            s.peers[1].next_hop = None;
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.3.5")),
            Verdict::Drop(DropReason::NeighborUnresolved)
        );
        let t = tables(|s| {
            s.mode = RoutingMode::Native;
            s.peers[1].next_hop.as_mut().unwrap().mac = None;
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.3.5")),
            Verdict::Drop(DropReason::NeighborUnresolved)
        );
        // Off-link, no next hop and no gateway.
        let t = tables(|s| {
            s.mode = RoutingMode::Native;
            s.peers[0].next_hop = None;
            s.gateway = None;
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.244.2.5")),
            Verdict::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn masquerade_outside_cluster() {
        let t = tables(|_| {});
        let v = t.classify(ip(POD), ip("203.0.113.7"));
        assert_eq!(
            v,
            Verdict::Masquerade {
                next_hop: NextHopId(0)
            }
        );
        assert_eq!(v.path(), Some(Path::Masquerade));
        // non_masquerade_cidrs: native via the gateway, pod address kept.
        assert_eq!(
            t.classify(ip(POD), ip("192.168.1.1")),
            Verdict::Native {
                next_hop: NextHopId(0)
            }
        );
        // The node's own traffic (not a pod source) is not translated.
        assert_eq!(
            t.classify(ip("172.16.2.2"), ip("203.0.113.7")),
            Verdict::Native {
                next_hop: NextHopId(0)
            }
        );
        // IPv6 without masquerade.address6: untranslated.
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("2001:db8::1")),
            Verdict::Native {
                next_hop: NextHopId(0)
            }
        );
        // Masquerade disabled.
        let t = tables(|s| s.masquerade.enabled = false);
        assert_eq!(
            t.classify(ip(POD), ip("203.0.113.7")),
            Verdict::Native {
                next_hop: NextHopId(0)
            }
        );
        // No gateway, or gateway MAC unknown.
        let t = tables(|s| s.gateway = None);
        assert_eq!(
            t.classify(ip(POD), ip("203.0.113.7")),
            Verdict::Drop(DropReason::NoRoute)
        );
        let t = tables(|s| s.gateway.as_mut().unwrap().mac = None);
        assert_eq!(
            t.classify(ip(POD), ip("203.0.113.7")),
            Verdict::Drop(DropReason::NeighborUnresolved)
        );
    }

    #[test]
    fn masquerade6_outside_cluster() {
        const GW6_MAC: [u8; 6] = [2, 0, 0, 0, 0, 6];
        let with6 = |s: &mut TableSpec, e: &mut EngineSettings| {
            e.masquerade_address6 = Some("2001:db8:2::2".parse().unwrap());
            s.masquerade.gateway6 = Some(NextHop {
                ip: ip("2001:db8:2::1"),
                mac: Some(GW6_MAC),
            });
            s.masquerade
                .non_masquerade_cidrs
                .push(c("2001:db8:99::/48"));
        };
        let t = tables_with(with6);
        let v = t.classify(ip("fd00:10:244:1::a"), ip("2001:db8::1"));
        let Verdict::Masquerade { next_hop } = v else {
            panic!("{v:?}");
        };
        assert_eq!(t.next_hop(next_hop).unwrap().mac, Some(GW6_MAC));
        // IPv4 is unchanged: the IPv4 gateway.
        assert_eq!(
            t.classify(ip(POD), ip("203.0.113.7")),
            Verdict::Masquerade {
                next_hop: NextHopId(0)
            }
        );
        // An IPv6 non_masquerade_cidrs destination and the node's own source stay native.
        let native = Verdict::Native {
            next_hop: NextHopId(0),
        };
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("2001:db8:99::1")),
            native
        );
        assert_eq!(t.classify(ip("2001:db8:2::2"), ip("2001:db8::1")), native);
        // Cluster destinations are never masqueraded.
        assert!(matches!(
            t.classify(ip("fd00:10:244:1::a"), ip("fd00:10:244:2::1")),
            Verdict::Tunnel { .. }
        ));
        // The IPv6 gateway unresolved (NDP pending) or missing.
        let t = tables_with(|s, e| {
            with6(s, e);
            s.masquerade.gateway6.as_mut().unwrap().mac = None;
        });
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("2001:db8::1")),
            Verdict::Drop(DropReason::NeighborUnresolved)
        );
        let t = tables_with(|s, e| {
            with6(s, e);
            s.masquerade.gateway6 = None;
        });
        assert_eq!(
            t.classify(ip("fd00:10:244:1::a"), ip("2001:db8::1")),
            Verdict::Drop(DropReason::NoRoute)
        );
        // An IPv6-only underlay: IPv6 pods are translated, an IPv4 pod's packet has no IPv4
        // address to take and is dropped rather than leaving untranslated.
        let t = tables_with(|s, e| {
            with6(s, e);
            e.address = ip("2001:db8:2::2");
            s.peers.clear();
        });
        assert!(matches!(
            t.classify(ip("fd00:10:244:1::a"), ip("2001:db8::1")),
            Verdict::Masquerade { .. }
        ));
        assert_eq!(
            t.classify(ip(POD), ip("203.0.113.7")),
            Verdict::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn mixed_families_are_malformed() {
        let t = tables(|_| {});
        assert_eq!(
            t.classify(ip(POD), ip("fd00:10:244:2::1")),
            Verdict::Drop(DropReason::Malformed)
        );
    }

    /// IPv6 underlay: an IPv6 node with an IPv6 peer tunnels to it from the IPv6 address; a
    /// dual-stack node (address + address6) reaches a v4 peer from the v4 address and a v6 peer
    /// from the v6 one; a peer of a family the node has no address in, a v6 `address6` next to a
    /// v6 `address`, and a peer at the node's `address6` are refused with the key.
    #[test]
    fn ipv6_and_dual_stack_underlay() {
        let v6_only = tables_with(|s, e| {
            e.address = ip("2001:db8:2::2");
            s.peers[0].address = ip("2001:db8:3::2");
            s.peers[1].address = ip("2001:db8:2::3");
        });
        let Verdict::Tunnel { peer, remote, .. } = v6_only.classify(ip(POD), ip("10.244.2.9"))
        else {
            panic!("not a tunnel verdict");
        };
        assert_eq!(remote, ip("2001:db8:3::2"));
        let p = v6_only.encap_params(peer, TunnelProto::Vxlan, 1, remote, 4789);
        assert_eq!((p.src, p.dst), (ip("2001:db8:2::2"), remote));
        assert_eq!(
            v6_only.peer_by_address(ip("2001:db8:3::2")),
            Some(PeerId(0))
        );
        assert_eq!(v6_only.peer_by_address(ip("172.16.3.2")), None);
        assert_eq!(v6_only.node_address(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(v6_only.vtep_mac(), [0x02, 0x76, 0, 0, 0, 2]);
        assert_eq!(
            v6_only.validate_ingress(ip("2001:db8:3::2"), 1, ip("10.244.2.5"), ip(POD)),
            Ok(PeerId(0))
        );
        assert_eq!(
            v6_only.validate_ingress(ip("2001:db8:3::9"), 1, ip("10.244.2.5"), ip(POD)),
            Err(DropReason::UnknownPeer)
        );

        let dual = tables_with(|s, e| {
            e.address6 = Some("2001:db8:2::2".parse().unwrap());
            s.peers[0].address = ip("2001:db8:3::2");
        });
        let src_for = |t: &Tables, remote: &str| {
            let r = ip(remote);
            t.encap_params(PeerId(0), TunnelProto::Geneve, 1, r, 6081)
                .src
        };
        assert_eq!(src_for(&dual, "2001:db8:3::2"), ip("2001:db8:2::2"));
        assert_eq!(src_for(&dual, "172.16.2.3"), ip("172.16.2.2"));
        assert_eq!(dual.node_address(), v4("172.16.2.2"));
        assert_eq!(dual.peer_by_address(ip("172.16.2.3")), Some(PeerId(1)));

        let e = build_with(|s, _| s.peers[0].address = ip("2001:db8:3::2")).unwrap_err();
        assert_eq!(e.path, "peers[0].address");
        assert!(e.message.contains("no IPv6 underlay address"), "{e:?}");
        let e = build_with(|_, e| e.address = ip("2001:db8:2::2")).unwrap_err();
        assert_eq!(e.path, "peers[0].address");
        assert!(e.message.contains("no IPv4 underlay address"), "{e:?}");
        let e = build_with(|_, e| {
            e.address = ip("2001:db8:2::2");
            e.address6 = Some("2001:db8:2::3".parse().unwrap());
        })
        .unwrap_err();
        assert_eq!(e.path, "node.address6");
        let e = build_with(|s, e| {
            e.address6 = Some("2001:db8:2::2".parse().unwrap());
            s.peers[1].address = ip("2001:db8:2::2");
        })
        .unwrap_err();
        assert_eq!(e.path, "peers[1].address");
    }

    #[test]
    fn ingress_validation() {
        let t = tables(|_| {});
        let n2 = ip("172.16.3.2");
        assert_eq!(
            t.validate_ingress(n2, 1, ip("10.244.2.5"), ip(POD)),
            Ok(PeerId(0))
        );
        assert_eq!(
            t.validate_ingress(n2, 1, ip("fd00:10:244:2::5"), ip("fd00:10:244:1::a")),
            Ok(PeerId(0))
        );
        assert_eq!(
            t.validate_ingress(ip("172.16.9.9"), 1, ip("10.244.2.5"), ip(POD)),
            Err(DropReason::UnknownPeer)
        );
        assert_eq!(
            t.validate_ingress(n2, 2, ip("10.244.2.5"), ip(POD)),
            Err(DropReason::BadVni)
        );
        // node2 sending node3's pod address.
        assert_eq!(
            t.validate_ingress(n2, 1, ip("10.244.3.5"), ip(POD)),
            Err(DropReason::SpoofedInnerSource)
        );
        assert_eq!(
            t.validate_ingress(n2, 1, ip("203.0.113.1"), ip(POD)),
            Err(DropReason::SpoofedInnerSource)
        );
        assert_eq!(
            t.validate_ingress(n2, 1, ip("10.244.2.5"), ip("10.244.3.1")),
            Err(DropReason::NotLocalDestination)
        );
        assert_eq!(
            t.validate_ingress(n2, 1, ip("10.244.2.5"), ip("fd00:10:244:1::a")),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn spec_errors_name_the_key() {
        let bad = |f: fn(&mut TableSpec)| {
            let mut s = spec();
            f(&mut s);
            Tables::build(&s, &settings()).unwrap_err()
        };
        let e = bad(|s| {
            s.peers[1]
                .pod_cidrs
                .push("10.244.2.128/25".parse().unwrap())
        });
        assert_eq!(e.path, "peers[1].pod_cidrs[1]");
        assert!(
            e.message
                .contains("overlaps peers[0]'s pod CIDR '10.244.2.0/24'"),
            "{e}"
        );
        let e = bad(|s| s.peers[0].pod_cidrs = vec!["10.244.0.0/20".parse().unwrap()]);
        assert_eq!(e.path, "peers[0].pod_cidrs[0]");
        assert!(e.message.contains("node's pod CIDR '10.244.1.0/24'"), "{e}");
        let e = bad(|s| s.peers[0].pod_cidrs = vec!["10.99.0.0/24".parse().unwrap()]);
        assert_eq!(
            e.to_string(),
            "peers[0].pod_cidrs[0]: '10.99.0.0/24' is not inside the cluster pod CIDRs \
             ['10.244.0.0/16', 'fd00:10:244::/48']"
        );
        let e = bad(|s| s.tunnel.vni = 1 << 24);
        assert_eq!(e.path, "tunnel.vni");
        let e = build_with(|_, e| e.port_range = (65000, 64000)).unwrap_err();
        assert_eq!(e.path, "masquerade.port_range");
        let e = bad(|s| s.peers[1].address = "172.16.3.2".parse().unwrap());
        assert_eq!(e.path, "peers[1].address");
        let e = bad(|s| s.peers[0].address = "172.16.2.2".parse().unwrap());
        assert_eq!(e.path, "peers[0].address");
        let e = bad(|s| s.tunnel.geneve_port = 4789);
        assert_eq!(e.path, "tunnel.geneve_port");
    }

    #[test]
    fn pod_cidr_may_equal_a_cluster_cidr() {
        let t = tables(|s| {
            s.cluster_cidrs.push("10.250.0.0/24".parse().unwrap());
            s.peers[1].pod_cidrs.push("10.250.0.0/24".parse().unwrap());
        });
        assert_eq!(
            t.classify(ip(POD), ip("10.250.0.1")),
            tunnel_to(&t, 1, TunnelProto::Vxlan)
        );
    }
}
