//! The rulebook: every relation a [`TableSpec`] and the engine's [`EngineSettings`] must satisfy,
//! checked in one pass that reports every problem (not only the first), each with the spec key
//! path of the offending value and a message naming it. [`crate::classify::Tables::build`]
//! refuses a spec with any problem; the control plane asks [`check`] (through the bindings'
//! `check_tables`) to validate a config offline and maps each path back to the YAML key the user
//! wrote. The Python layer checks only the YAML's shape, types and key names
//! (docs/architecture.md, "One rulebook").
//!
//! [`admit`] is the same rulebook with precedence, for untrusted records (etcd discovery, the
//! cluster mesh): peers admitted one by one in spec order, a refused one taking no further part.
//!
//! The work is linear in the peers (plus a sort for the pod-CIDR overlap sweep), so the
//! reconcile of thousands of etcd peers pays no quadratic check.
//!
//! An unspecified node address (`0.0.0.0` / `::`) in the settings means "not known yet" (a
//! config whose `node.address` is resolved at start): the checks that compare against it are
//! skipped.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::spec::{Cidr, EngineSettings, PeerSpec, SpecError, TableSpec};

/// `['10.244.0.0/16', 'fd00::/48']`: a CIDR list the way the config's messages quote it.
fn quoted_list(cidrs: &[Cidr]) -> String {
    let items: Vec<String> = cidrs.iter().map(|c| format!("'{c}'")).collect();
    format!("[{}]", items.join(", "))
}

/// Why a peer at `a` cannot be reached from this node's underlay addresses.
fn family_why(a: IpAddr, settings: &EngineSettings) -> String {
    if a.is_ipv6() {
        format!(
            "is IPv6, and this node has no IPv6 underlay address (node.address {}; set \
             node.address6)",
            settings.address
        )
    } else {
        format!(
            "is IPv4, and this node's underlay is IPv6 only (node.address {}: no IPv4 underlay \
             address)",
            settings.address
        )
    }
}

fn known(a: IpAddr) -> Option<IpAddr> {
    (!a.is_unspecified()).then_some(a)
}

/// The node's underlay addresses with their keys (`None`: not known yet).
fn node_addresses(settings: &EngineSettings) -> [(&'static str, Option<IpAddr>); 2] {
    [
        ("node.address", known(settings.address)),
        (
            "node.address6",
            settings.address6.map(IpAddr::V6).and_then(known),
        ),
    ]
}

/// Where a rule files a problem: `(code, path, other, values, message)`, as
/// [`SpecError::rule`] takes them.
trait Report: FnMut(&'static str, String, Option<String>, Vec<String>, String) {}
impl<F: FnMut(&'static str, String, Option<String>, Vec<String>, String)> Report for F {}

fn in_cluster(spec: &TableSpec, c: &Cidr) -> bool {
    spec.cluster_cidrs.iter().any(|k| k.covers(c))
}

fn outside_cluster(bad: &mut impl Report, spec: &TableSpec, path: String, c: &Cidr) {
    bad(
        "pod_cidr_outside_cluster",
        path,
        None,
        vec![c.to_string()],
        format!(
            "'{c}' is not inside the cluster pod CIDRs {}",
            quoted_list(&spec.cluster_cidrs)
        ),
    );
}

fn cluster_contains_peer(bad: &mut impl Report, i: usize, net: &Cidr, p: usize, a: IpAddr) {
    bad(
        "cluster_contains_peer_address",
        format!("cluster_cidrs[{i}]"),
        Some(format!("peers[{p}].address")),
        vec![net.to_string(), a.to_string()],
        format!("'{net}' contains peers[{p}].address {a}"),
    );
}

/// `c` at `path` overlaps `other` at `other_path`, a pod CIDR of `owner`.
fn pod_cidr_overlap(
    bad: &mut impl Report,
    path: String,
    c: &Cidr,
    (other_path, owner, other): (String, String, Cidr),
) {
    bad(
        "pod_cidr_overlap",
        path,
        Some(other_path),
        vec![c.to_string(), other.to_string()],
        format!("'{c}' overlaps {owner}'s pod CIDR '{other}'"),
    );
}

/// Which peer holds each name and each address so far (the first to, by spec index).
struct Taken<'a> {
    names: HashMap<&'a str, usize>,
    addresses: HashMap<IpAddr, usize>,
}

impl<'a> Taken<'a> {
    fn with_capacity(n: usize) -> Self {
        Taken {
            names: HashMap::with_capacity(n),
            addresses: HashMap::with_capacity(n),
        }
    }

    /// Peer `p` holds its name and its address where no peer before it does.
    fn hold(&mut self, p: usize, peer: &'a PeerSpec) {
        self.names.entry(&peer.name).or_insert(p);
        self.addresses.entry(peer.address).or_insert(p);
    }
}

/// The rules of one peer (`spec.peers[p]`), for [`check`] and [`admit`] alike, in this order:
/// its name (not the node's, not held in `taken`), its address (not the node's, of a family
/// the node has an underlay address in, not held in `taken`), with `contained` the cluster
/// CIDRs (but `/0`) that contain the address ([`check`] files those with the cluster CIDRs),
/// then each pod CIDR: inside the cluster, and disjoint from the one `overlap` finds for it
/// (key path, owner, CIDR; [`check`] sweeps for overlaps after all the peers).
fn peer_rules(
    spec: &TableSpec,
    settings: &EngineSettings,
    p: usize,
    taken: &Taken,
    contained: bool,
    mut overlap: impl FnMut(usize, &Cidr) -> Option<(String, String, Cidr)>,
    bad: &mut impl Report,
) {
    let peer = &spec.peers[p];
    let at = |key: &str| format!("peers[{p}].{key}");
    if peer.name == spec.node.name {
        bad(
            "name_is_node",
            at("name"),
            Some("node.name".into()),
            vec![peer.name.clone()],
            format!("'{}' is this node's own name", peer.name),
        );
    }
    if let Some(q) = taken.names.get(peer.name.as_str()) {
        bad(
            "name_taken",
            at("name"),
            Some(format!("peers[{q}].name")),
            vec![peer.name.clone()],
            format!("'{}' is also peers[{q}]", peer.name),
        );
    }
    let a = peer.address;
    if let Some((key, _)) = node_addresses(settings).iter().find(|(_, n)| *n == Some(a)) {
        bad(
            "address_is_node",
            at("address"),
            Some((*key).into()),
            vec![a.to_string()],
            format!("'{a}' is this node's own address"),
        );
    }
    if settings.source_for(a).is_none() {
        bad(
            "address_family",
            at("address"),
            Some("node.address".into()),
            vec![a.to_string(), settings.address.to_string()],
            format!("'{a}' {}", family_why(a, settings)),
        );
    }
    if let Some(q) = taken.addresses.get(&a) {
        bad(
            "address_taken",
            at("address"),
            Some(format!("peers[{q}].address")),
            vec![a.to_string()],
            format!("'{a}' is also peers[{q}]"),
        );
    }
    if contained {
        for (i, net) in spec.cluster_cidrs.iter().enumerate() {
            if net.prefix_len() != 0 && net.contains(a) {
                cluster_contains_peer(bad, i, net, p, a);
            }
        }
    }
    for (i, c) in peer.pod_cidrs.iter().enumerate() {
        let path = format!("peers[{p}].pod_cidrs[{i}]");
        if !in_cluster(spec, c) {
            outside_cluster(bad, spec, path.clone(), c);
        }
        if let Some(clash) = overlap(i, c) {
            pod_cidr_overlap(bad, path, c, clash);
        }
    }
}

/// Every problem of `spec` compiled against `settings`, in a stable order: the settings, the
/// tunnel, the cluster CIDRs, `native_cidrs`, the masquerade address, this node's pod CIDRs,
/// each peer (name, address, pod CIDRs), then pod-CIDR overlaps. Empty: the spec compiles.
///
/// Each problem names its rule ([`SpecError::code`]), the other party of a relation
/// ([`SpecError::other`]: a key path) and the values involved ([`SpecError::values`]), so a
/// caller can word it for its own keys; [`SpecError::message`] words it for the spec's.
pub fn check(spec: &TableSpec, settings: &EngineSettings) -> Vec<SpecError> {
    let mut out = settings.problems();
    let mut bad =
        |code: &'static str,
         path: String,
         other: Option<String>,
         values: Vec<String>,
         message: String| { out.push(SpecError::rule(code, path, other, values, message)) };

    if spec.tunnel.vni > crate::wire::vxlan::MAX_VNI {
        bad(
            "vni_width",
            "tunnel.vni".into(),
            None,
            vec![spec.tunnel.vni.to_string()],
            format!("{} does not fit in 24 bits", spec.tunnel.vni),
        );
    }
    for (key, port) in [
        ("tunnel.vxlan_port", spec.tunnel.vxlan_port),
        ("tunnel.geneve_port", spec.tunnel.geneve_port),
    ] {
        if port == 0 {
            bad(
                "tunnel_port_zero",
                key.into(),
                None,
                vec!["0".into()],
                "port 0 is not a tunnel port".into(),
            );
        }
    }
    if spec.tunnel.vxlan_port == spec.tunnel.geneve_port && spec.tunnel.vxlan_port != 0 {
        bad(
            "tunnel_ports_equal",
            "tunnel.geneve_port".into(),
            Some("tunnel.vxlan_port".into()),
            vec![spec.tunnel.geneve_port.to_string()],
            format!("{} is also the VXLAN port", spec.tunnel.geneve_port),
        );
    }

    // Pod space that swallows underlay addresses would route the node's own traffic to its peers
    // (or into the datapath, which drops it): the node cuts itself off.
    let node_addrs = node_addresses(settings);
    for (i, net) in spec.cluster_cidrs.iter().enumerate() {
        let path = format!("cluster_cidrs[{i}]");
        if net.prefix_len() == 0 {
            bad(
                "cluster_cidr_everything",
                path,
                None,
                vec![net.to_string()],
                format!("'{net}' covers every address (the node's and the internet's)"),
            );
            continue;
        }
        for (key, a) in node_addrs {
            if let Some(a) = a.filter(|a| net.contains(*a)) {
                bad(
                    "cluster_contains_node_address",
                    path.clone(),
                    Some(key.into()),
                    vec![net.to_string(), a.to_string()],
                    format!("'{net}' contains this node's address {a} ({key})"),
                );
            }
        }
        for (j, p) in spec.peers.iter().enumerate() {
            if net.contains(p.address) {
                cluster_contains_peer(&mut bad, i, net, j, p.address);
            }
        }
    }
    let overlaps_cluster = |net: &Cidr| {
        spec.cluster_cidrs
            .iter()
            .any(|c| c.covers(net) || net.covers(c))
    };
    for (i, net) in spec.native_cidrs.iter().enumerate() {
        let path = format!("native_cidrs[{i}]");
        if net.prefix_len() == 0 {
            bad(
                "native_cidr_everything",
                path,
                None,
                vec![net.to_string()],
                format!("'{net}' covers every address"),
            );
        } else if !overlaps_cluster(net) {
            bad(
                "native_cidr_outside_cluster",
                path,
                None,
                vec![net.to_string()],
                format!("'{net}' does not overlap the cluster pod CIDRs"),
            );
        }
    }
    if let Some(a6) = settings.masquerade_address6 {
        for (i, net) in spec.cluster_cidrs.iter().enumerate() {
            if net.contains(a6.into()) {
                bad(
                    "masquerade_address6_in_cluster",
                    "masquerade.address6".into(),
                    Some(format!("cluster_cidrs[{i}]")),
                    vec![a6.to_string(), net.to_string()],
                    format!("'{a6}' is inside the cluster pod CIDR '{net}'"),
                );
            }
        }
    }

    // Every pod CIDR with its key path and owner, for the overlap sweep and its messages.
    let mut owned: Vec<(Cidr, String, String)> = Vec::new();
    for (i, c) in spec.node.pod_cidrs.iter().enumerate() {
        let path = format!("node.pod_cidrs[{i}]");
        if !in_cluster(spec, c) {
            outside_cluster(&mut bad, spec, path.clone(), c);
        }
        owned.push((*c, path, "node".into()));
    }
    let mut taken = Taken::with_capacity(spec.peers.len());
    for (p, peer) in spec.peers.iter().enumerate() {
        peer_rules(spec, settings, p, &taken, false, |_, _| None, &mut bad);
        taken.hold(p, peer);
        for (i, c) in peer.pod_cidrs.iter().enumerate() {
            owned.push((
                *c,
                format!("peers[{p}].pod_cidrs[{i}]"),
                format!("peers[{p}]"),
            ));
        }
    }

    // Pod CIDRs must be disjoint, or the LPM would pick one owner. Prefixes either nest or are
    // disjoint, so after sorting by (family, start) an overlap is a start at or before the
    // furthest end seen so far in the same family; each overlapping CIDR is reported once,
    // under the later of the two owners in spec order.
    let mut sweep: Vec<(bool, u128, u128, usize)> = owned
        .iter()
        .enumerate()
        .map(|(i, (c, _, _))| {
            let (v6, lo, hi) = c.bounds();
            (v6, lo, hi, i)
        })
        .collect();
    sweep.sort_unstable();
    let mut overlaps: Vec<(usize, usize)> = Vec::new();
    let mut open: Option<(bool, u128, usize)> = None;
    for &(v6, lo, hi, i) in &sweep {
        if let Some((fam, end, j)) = open {
            if fam == v6 && lo <= end {
                overlaps.push(if i > j { (i, j) } else { (j, i) });
            }
        }
        let extends = match open {
            Some((fam, end, _)) => fam != v6 || hi > end,
            None => true,
        };
        if extends {
            open = Some((v6, hi, i));
        }
    }
    overlaps.sort_unstable();
    for (a, b) in overlaps {
        let (net, path, _) = &owned[a];
        let (other, other_path, owner) = &owned[b];
        pod_cidr_overlap(
            &mut bad,
            path.clone(),
            net,
            (other_path.clone(), owner.clone(), *other),
        );
    }
    out
}

/// Disjoint pod CIDRs per family with their key paths and owners, for an O(log n) "does this
/// overlap anything admitted?" ([`admit`]).
#[derive(Default)]
struct Admitted {
    // (v6, first address) -> (last address, key path, owner, the CIDR)
    nets: BTreeMap<(bool, u128), (u128, String, String, Cidr)>,
}

impl Admitted {
    fn find(&self, c: &Cidr) -> Option<&(u128, String, String, Cidr)> {
        let (v6, lo, hi) = c.bounds();
        // disjoint intervals: only the last one starting at or before `hi` can reach `lo`
        self.nets
            .range((v6, 0)..=(v6, hi))
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.0 >= lo)
    }

    fn add(&mut self, c: &Cidr, path: String, owner: String) {
        if self.find(c).is_none() {
            let (v6, lo, hi) = c.bounds();
            self.nets.insert((v6, lo), (hi, path, owner, *c));
        }
    }
}

/// The peers' problems with precedence, for admitting untrusted records (discovery): the peers
/// before `first` and the node always win; the peers from `first` on are admitted one by one in
/// spec order, each against the node, those peers and the peers admitted before it. A peer with
/// a problem (the same codes, paths and messages as [`check`]; rules named in `skip` are not
/// applied) is refused: its problems are returned and it takes no further part, so a younger
/// peer is never refused for a conflict with a refused one. Problems of the node, the settings
/// and the peers before `first` are [`check`]'s, not returned here. Linear in the peers (hash
/// maps, an ordered map of the admitted pod CIDRs).
pub fn admit(
    spec: &TableSpec,
    settings: &EngineSettings,
    first: usize,
    skip: &[&str],
) -> Vec<SpecError> {
    let mut out = Vec::new();
    let mut nets = Admitted::default();
    for (i, c) in spec.node.pod_cidrs.iter().enumerate() {
        nets.add(c, format!("node.pod_cidrs[{i}]"), "node".into());
    }
    let mut taken = Taken::with_capacity(spec.peers.len());
    for (p, peer) in spec.peers.iter().enumerate() {
        let fixed = p < first;
        let mut mine: Vec<SpecError> = Vec::new();
        let mut bad = |code: &'static str,
                       path: String,
                       other: Option<String>,
                       values: Vec<String>,
                       message: String| {
            if !fixed && !skip.contains(&code) {
                mine.push(SpecError::rule(code, path, other, values, message));
            }
        };
        // an admitted pod CIDR, else one of the peer's own before it
        let overlap = |i: usize, c: &Cidr| {
            nets.find(c)
                .map(|(_, op, ow, oc)| (op.clone(), ow.clone(), *oc))
                .or_else(|| {
                    peer.pod_cidrs[..i]
                        .iter()
                        .enumerate()
                        .find(|(_, o)| o.covers(c) || c.covers(o))
                        .map(|(j, o)| {
                            (
                                format!("peers[{p}].pod_cidrs[{j}]"),
                                format!("peers[{p}]"),
                                *o,
                            )
                        })
                })
        };
        peer_rules(spec, settings, p, &taken, true, overlap, &mut bad);
        if mine.is_empty() {
            taken.hold(p, peer);
            for (i, c) in peer.pod_cidrs.iter().enumerate() {
                nets.add(
                    c,
                    format!("peers[{p}].pod_cidrs[{i}]"),
                    format!("peers[{p}]"),
                );
            }
        }
        out.extend(mine);
    }
    out
}

/// The first problem of [`check`], if any.
pub fn first_problem(spec: &TableSpec, settings: &EngineSettings) -> Result<(), SpecError> {
    match check(spec, settings).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
