//! The core's rulebook (`rules::check`): every problem of a table spec at once, each with its key
//! path, the first of them refused by `Tables::build`; linear in the peers.

use std::net::IpAddr;

use podrouter_core::reference::{hybrid, peer, settings};
use podrouter_core::rules::check;
use podrouter_core::{Cidr, EngineSettings, PeerId, SpecError, TableSpec, Tables};

fn c(s: &str) -> Cidr {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn lines(spec: &TableSpec, settings: &EngineSettings) -> Vec<String> {
    check(spec, settings)
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn a_good_spec_has_no_problems() {
    assert!(check(&hybrid(), &settings()).is_empty());
    assert!(Tables::build(&hybrid(), &settings()).is_ok());
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut s = hybrid();
    s.peers
        .push(peer("node1", ip("172.16.2.2"), "10.99.0.0/24", false));
    s.peers
        .push(peer("node2", ip("172.16.3.2"), "10.244.2.128/25", false));
    s.native_cidrs = vec![c("10.250.0.0/16"), c("0.0.0.0/0")];
    s.tunnel.vni = 1 << 24;
    let mut st = settings();
    st.port_range = (9, 8);
    assert_eq!(
        lines(&s, &st),
        [
            "masquerade.port_range: [9, 8] is not a port range",
            "tunnel.vni: 16777216 does not fit in 24 bits",
            "native_cidrs[0]: '10.250.0.0/16' does not overlap the cluster pod CIDRs",
            "native_cidrs[1]: '0.0.0.0/0' covers every address",
            "peers[2].name: 'node1' is this node's own name",
            "peers[2].address: '172.16.2.2' is this node's own address",
            "peers[2].pod_cidrs[0]: '10.99.0.0/24' is not inside the cluster pod CIDRs \
             ['10.244.0.0/16']",
            "peers[3].name: 'node2' is also peers[0]",
            "peers[3].address: '172.16.3.2' is also peers[0]",
            "peers[3].pod_cidrs[0]: '10.244.2.128/25' overlaps peers[0]'s pod CIDR \
             '10.244.2.0/24'",
        ]
    );
    // build refuses with the first of them
    let e = Tables::build(&s, &st).unwrap_err();
    assert_eq!(e.path, "masquerade.port_range");
}

#[test]
fn address_space_rules() {
    let mut s = hybrid();
    s.cluster_cidrs = vec![c("10.244.0.0/16"), c("172.16.0.0/16"), c("::/0")];
    let mut st = settings();
    st.masquerade_address6 = Some("fd00::1".parse().unwrap());
    let got = lines(&s, &st);
    assert!(got.contains(
        &"cluster_cidrs[1]: '172.16.0.0/16' contains this node's address 172.16.2.2 \
          (node.address)"
            .to_string()
    ));
    assert!(got.contains(
        &"cluster_cidrs[1]: '172.16.0.0/16' contains peers[1].address 172.16.2.3".to_string()
    ));
    assert!(got.contains(
        &"cluster_cidrs[2]: '::/0' covers every address (the node's and the internet's)"
            .to_string()
    ));
    // ::/0 is skipped for containment, so the IPv6 masquerade address is named once
    assert_eq!(
        got.iter()
            .filter(|l| l.starts_with("masquerade.address6"))
            .count(),
        1,
        "{got:?}"
    );
    // an unknown node address (resolved at start) is not compared
    let unknown = EngineSettings::new(ip("0.0.0.0"));
    s.cluster_cidrs = vec![c("0.0.0.0/8"), c("10.244.0.0/16")];
    assert!(lines(&s, &unknown).is_empty(), "{:?}", lines(&s, &unknown));
}

#[test]
fn nested_overlaps_each_name_their_cidr() {
    let mut s = hybrid();
    // peers[2]'s /20 swallows the node's, node2's and node3's pod CIDRs
    s.peers
        .push(peer("big", ip("172.16.3.9"), "10.244.0.0/20", false));
    let got = lines(&s, &settings());
    assert_eq!(
        got,
        [
            "peers[2].pod_cidrs[0]: '10.244.0.0/20' overlaps node's pod CIDR '10.244.1.0/24'",
            "peers[2].pod_cidrs[0]: '10.244.0.0/20' overlaps peers[0]'s pod CIDR \
             '10.244.2.0/24'",
            "peers[2].pod_cidrs[0]: '10.244.0.0/20' overlaps peers[1]'s pod CIDR \
             '10.244.3.0/24'",
        ]
    );
}

#[test]
fn five_thousand_peers_check_clean_and_compile() {
    let mut s = hybrid();
    s.cluster_cidrs = vec![c("10.0.0.0/8")];
    s.node.pod_cidrs = vec![c("10.0.0.0/24")];
    s.peers = (1..=5000u32)
        .map(|i| {
            let a = IpAddr::from([172, 17, (i >> 8) as u8, i as u8]);
            let p = format!("10.{}.{}.0/24", i >> 8, i & 255);
            peer(&format!("n{i}"), a, &p, false)
        })
        .collect();
    assert!(check(&s, &settings()).is_empty());
    let t = Tables::build(&s, &settings()).unwrap();
    assert_eq!(t.peer_by_address(ip("172.17.19.136")), Some(PeerId(4999)));
    // one duplicate among them is found, under the later index
    s.peers[4000].address = s.peers[10].address;
    assert_eq!(
        lines(&s, &settings()),
        ["peers[4000].address: '172.17.0.11' is also peers[10]"]
    );
}

#[test]
fn problems_carry_their_rule_other_party_and_values() {
    let mut s = hybrid();
    s.cluster_cidrs.push(c("172.16.9.0/24"));
    s.peers
        .push(peer("late", ip("172.16.3.2"), "10.244.2.128/25", false));
    s.peers
        .push(peer("self", ip("172.16.2.2"), "10.99.0.0/24", false));
    s.peers
        .push(peer("inside", ip("172.16.9.9"), "10.244.7.0/24", false));
    let got: Vec<(&str, String, Option<String>, Vec<String>)> = check(&s, &settings())
        .into_iter()
        .map(|e| (e.code, e.path, e.other, e.values))
        .collect();
    let own = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for want in [
        (
            "cluster_contains_peer_address",
            "cluster_cidrs[1]".to_string(),
            Some("peers[4].address".to_string()),
            own(&["172.16.9.0/24", "172.16.9.9"]),
        ),
        (
            "address_taken",
            "peers[2].address".into(),
            Some("peers[0].address".into()),
            own(&["172.16.3.2"]),
        ),
        (
            "address_is_node",
            "peers[3].address".into(),
            Some("node.address".into()),
            own(&["172.16.2.2"]),
        ),
        (
            "pod_cidr_outside_cluster",
            "peers[3].pod_cidrs[0]".into(),
            None,
            own(&["10.99.0.0/24"]),
        ),
        (
            "pod_cidr_overlap",
            "peers[2].pod_cidrs[0]".into(),
            Some("peers[0].pod_cidrs[0]".into()),
            own(&["10.244.2.128/25", "10.244.2.0/24"]),
        ),
    ] {
        assert!(got.contains(&want), "{want:?} not in {got:?}");
    }
    assert_eq!(got.len(), 5, "{got:?}");
    // the settings' own problems are structured too
    let mut st = settings();
    st.port_range = (9, 8);
    let e = &check(&hybrid(), &st)[0];
    assert_eq!((e.code, e.values.clone()), ("port_range", own(&["9", "8"])));
}

#[test]
fn admit_lets_the_earlier_win_and_a_refused_peer_block_nobody() {
    use podrouter_core::rules::admit;
    let mut s = hybrid(); // node2 (10.244.2.0/24) and node3 always win: `first` = 2
    s.cluster_cidrs = vec![c("10.244.0.0/16")];
    let add = |s: &mut TableSpec, name: &str, a: &str, cidr: &str| {
        s.peers.push(peer(name, ip(a), cidr, false));
    };
    add(&mut s, "rogue", "172.16.2.2", "10.244.64.0/18"); // this node's address: refused
    add(&mut s, "a", "172.16.9.1", "10.244.65.0/24"); // inside the rogue's only: admitted
    add(&mut s, "b", "172.16.9.2", "10.244.65.128/25"); // inside a's: refused
    add(&mut s, "c", "172.16.9.1", "10.244.80.0/24"); // a's address: refused
    add(&mut s, "d", "172.16.9.4", "10.244.2.0/25"); // inside node2's: refused
    add(&mut s, "e", "2001:db8::1", "10.244.81.0/24"); // no IPv6 underlay: skipped rule
    let got: Vec<String> = admit(&s, &settings(), 2, &["address_family"])
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        got,
        [
            "peers[2].address: '172.16.2.2' is this node's own address",
            "peers[4].pod_cidrs[0]: '10.244.65.128/25' overlaps peers[3]'s pod CIDR \
             '10.244.65.0/24'",
            "peers[5].address: '172.16.9.1' is also peers[3]",
            "peers[6].pod_cidrs[0]: '10.244.2.0/25' overlaps peers[0]'s pod CIDR '10.244.2.0/24'",
        ]
    );
    // without the skip the IPv6 peer is refused too; `check` names the problems `admit` shares
    // in the same words
    let all = admit(&s, &settings(), 2, &[]);
    assert_eq!(all.last().unwrap().code, "address_family");
    let checked: Vec<SpecError> = check(&s, &settings());
    for e in &all[..1] {
        assert!(checked.contains(e), "{e} not in check's {checked:?}");
    }
    // linear: 5000 candidates against each other
    let mut big = hybrid();
    big.cluster_cidrs = vec![c("10.0.0.0/8")];
    big.node.pod_cidrs = vec![c("10.0.0.0/24")];
    big.peers = (1..=5000u32)
        .map(|i| {
            let a = IpAddr::from([172, 17, (i >> 8) as u8, i as u8]);
            peer(
                &format!("n{i}"),
                a,
                &format!("10.{}.{}.0/24", i >> 8, i & 255),
                false,
            )
        })
        .collect();
    big.peers[4000].pod_cidrs = vec![c("10.0.11.0/25")]; // inside n11's
    let t = std::time::Instant::now();
    let got = admit(&big, &settings(), 0, &[]);
    assert!(t.elapsed().as_secs() < 2);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].other.as_deref(), Some("peers[10].pod_cidrs[0]"));
}
