//! Longest-prefix match for IPv4 and IPv6.
//!
//! # Layout (why this shape)
//!
//! Tables are built by the control plane and swapped whole, so the fast structure is
//! build-once / immutable and optimised only for lookups. It is a poptrie (Asai & Ohara,
//! SIGCOMM 2015) in flat `Vec`s, with no pointers:
//!
//! * a *direct-pointing* array indexed by the top `S` bits of the address: `S = 16` (64 Ki
//!   entries of `u32`, 256 KiB, which stays in L2) for tables of [`SMALL_TABLE`] prefixes or more,
//!   `S = 8` (1 KiB) below that, so the control plane's small tables stay in L1. An entry is
//!   either a leaf index or, with the top bit set, the index of a trie node;
//! * trie nodes of stride 6 (64 children). A node is 24 bytes: a 64-bit `vector` with one bit per
//!   child that is itself a node, a 64-bit `leafvec` with one bit where a run of identical leaves
//!   starts, and the base indices of its children (contiguous in `nodes`) and of its leaf runs
//!   (contiguous in `leaves`). A child is found with one `popcnt` of the bits below it, so a node
//!   never stores 64 slots;
//! * `leaves`: `Option<V>` stored inline, so the last load of a lookup yields the value itself.
//!
//! In a large table an IPv4 /24 costs three dependent loads (direct, one node, leaf), a /32 four
//! or five. Chains of single-child nodes (sparse, deep IPv6 prefixes) are path-compressed into
//! one skip record. A DIR-24-8 table would cost one or two loads, but its first level alone is
//! 2^24 entries (32 MiB of `u16`, 64 MiB of `u32`): random destinations then miss the caches and
//! the TLB on nearly every lookup, each table swap rebuilds and copies that much, and three or
//! four such tables per [`crate::classify::Tables`] would not fit in L3 together. The poptrie for
//! 100k random IPv4 prefixes is about 4 MiB (see `memory_bytes` and the `lpm` benchmark), and
//! measures well under the 20 ns target there.
//!
//! Prefix lengths beyond the family width are rejected, host bits are cleared, and when the same
//! prefix appears more than once the last occurrence wins (the linear oracle follows the same rule).
//!
//! `LinearLpm4` / `LinearLpm6` are the obviously-correct linear scans used as test oracles by the
//! property tests and the `lpm_vs_linear` fuzz target.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a prefix list could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LpmError {
    /// The prefix length exceeds the address width (32 for IPv4, 128 for IPv6).
    PrefixTooLong { len: u8, max: u8 },
    /// More prefixes (or trie nodes) than the 31-bit indices can address.
    TooLarge,
}

impl fmt::Display for LpmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LpmError::PrefixTooLong { len, max } => {
                write!(f, "prefix length /{len} is longer than /{max}")
            }
            LpmError::TooLarge => f.write_str("too many prefixes for one table"),
        }
    }
}

impl std::error::Error for LpmError {}

/// An address type the poptrie can index: a fixed-width big-endian bit string.
trait Key: Copy + Ord {
    /// Address width in bits.
    const BITS: u32;
    /// Returns bits `off .. off + w` counted from the most significant bit, zero-padded past
    /// `BITS` (a stride may overhang the end of the address; the padding is always zero for
    /// both queries and prefixes, so the overhang slots simply repeat the value).
    fn chunk(self, off: u32, w: u32) -> usize;
    /// Clears every bit after the first `len`.
    fn masked(self, len: u32) -> Self;
    /// Number of leading bits `self` and `other` share.
    fn common_len(self, other: Self) -> u32;
}

impl Key for u32 {
    const BITS: u32 = 32;
    #[inline(always)]
    fn chunk(self, off: u32, w: u32) -> usize {
        // Widen so that off + w may exceed 32 (the last IPv4 stride covers bits 28..34).
        (((u64::from(self) << 32) << off) >> (64 - w)) as usize
    }
    fn masked(self, len: u32) -> Self {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - len))
        }
    }
    fn common_len(self, other: Self) -> u32 {
        (self ^ other).leading_zeros()
    }
}

impl Key for u128 {
    const BITS: u32 = 128;
    #[inline(always)]
    fn chunk(self, off: u32, w: u32) -> usize {
        // off < 128 and 0 < w <= 20 by construction, so both shifts are in range.
        ((self << off) >> (128 - w)) as usize
    }
    fn masked(self, len: u32) -> Self {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - len))
        }
    }
    fn common_len(self, other: Self) -> u32 {
        (self ^ other).leading_zeros()
    }
}

/// Bits resolved by the direct-pointing array of a large table (64 Ki entries, 256 KiB).
pub const DIRECT_BITS_LARGE: u8 = 16;
/// ... and of a small one (256 entries, 1 KiB): the control plane's tables (pod and cluster
/// CIDRs, a few hundred peers) then stay in L1 instead of spreading over 256 KiB each.
pub const DIRECT_BITS_SMALL: u8 = 8;
/// Tables with fewer prefixes than this use [`DIRECT_BITS_SMALL`].
pub const SMALL_TABLE: usize = 256;
/// Bits resolved per trie node.
const STRIDE: u32 = 6;
/// Marks a direct-array entry as a node index rather than a leaf index.
const NODE_FLAG: u32 = 1 << 31;

#[derive(Clone, Copy, Default, Debug)]
struct Node {
    /// Bit `i` set: child `i` is a node, at `base_node + rank(vector, i)`.
    vector: u64,
    /// Bit `i` set: leaf slot `i` starts a new run of leaves (its value differs from the previous
    /// leaf slot). Leaf slot `i` holds `leaves[base_leaf + popcnt(leafvec & bits 0..=i) - 1]`.
    /// `vector == 0 && leafvec == 0` (impossible for an ordinary node, which has at least one
    /// child or leaf) marks a skip node whose `base_leaf` indexes `skips`.
    leafvec: u64,
    base_leaf: u32,
    base_node: u32,
}

/// A path-compressed hop: from the skip node's depth straight to depth `to` when the key's first
/// `to` bits equal `key`, else the longest match is the inherited value `leaves[miss]`.
#[derive(Clone, Copy, Debug)]
struct Skip<K> {
    key: K,
    to: u32,
    child: u32,
    miss: u32,
}

/// One prefix during construction: normalised address, length, value index + 1 (0 = none).
type Pfx<K> = (K, u32, u32);

/// The compiled poptrie, generic over the key width.
#[derive(Clone)]
struct Poptrie<K, V> {
    direct_bits: u32,
    direct: Vec<u32>,
    nodes: Vec<Node>,
    skips: Vec<Skip<K>>,
    leaves: Vec<Option<V>>,
    prefixes: usize,
}

impl<K: Key, V: Copy> Poptrie<K, V> {
    /// `direct_bits`: `None` picks by size, else clamped to 1..=20.
    fn build(
        input: impl Iterator<Item = (K, u8, V)>,
        direct_bits: Option<u8>,
    ) -> Result<Self, LpmError> {
        let mut values: Vec<V> = Vec::new();
        let mut pfx: Vec<Pfx<K>> = Vec::new();
        for (addr, len, v) in input {
            if u32::from(len) > K::BITS {
                return Err(LpmError::PrefixTooLong {
                    len,
                    max: K::BITS as u8,
                });
            }
            if values.len() >= (NODE_FLAG - 1) as usize {
                return Err(LpmError::TooLarge);
            }
            values.push(v);
            let len = u32::from(len);
            pfx.push((addr.masked(len), len, values.len() as u32));
        }
        // Sort by (address, length, input order) and keep the last of each duplicate prefix.
        // Sorted this way the list is a pre-order walk of the binary trie: a prefix precedes
        // every longer prefix inside it, and all prefixes inside one block are contiguous.
        pfx.sort_unstable();
        pfx.dedup_by(|later, earlier| {
            if later.0 == earlier.0 && later.1 == earlier.1 {
                *earlier = *later;
                true
            } else {
                false
            }
        });
        let prefixes = pfx.len();
        let direct_bits = u32::from(match direct_bits {
            Some(bits) => bits.clamp(1, 20),
            None if prefixes < SMALL_TABLE => DIRECT_BITS_SMALL,
            None => DIRECT_BITS_LARGE,
        });
        let mut b = Builder {
            nodes: Vec::new(),
            skips: Vec::new(),
            leaves: Vec::new(),
            values: &values,
        };
        // A /0 is the inherited default of the whole space; every other prefix has len > 0.
        let (root_default, rest) = match pfx.first() {
            Some(&(_, 0, v)) => (v, &pfx[1..]),
            _ => (0, &pfx[..]),
        };
        let mut paint = vec![root_default; 1 << direct_bits];
        let mut children = Vec::new();
        expand(rest, 0, direct_bits, &mut paint, &mut children);
        let mut direct = vec![0u32; 1 << direct_bits];
        let mut child_iter = children.iter().peekable();
        // (value, leaf index) of the previous leaf slot: runs of equal slots share one leaf.
        // The index must be remembered: building a child node in between appends leaves.
        let mut prev_leaf: Option<(u32, u32)> = None;
        for (slot, entry) in direct.iter_mut().enumerate() {
            if let Some(&&(cslot, lo, hi)) = child_iter.peek() {
                if cslot == slot {
                    child_iter.next();
                    let idx = b.nodes.len();
                    if idx >= NODE_FLAG as usize {
                        return Err(LpmError::TooLarge);
                    }
                    b.nodes.push(Node::default());
                    let node = b.node(&rest[lo..hi], direct_bits, paint[slot])?;
                    b.nodes[idx] = node;
                    *entry = NODE_FLAG | idx as u32;
                    continue;
                }
            }
            let val = paint[slot];
            let leaf = match prev_leaf {
                Some((v, leaf)) if v == val => leaf,
                _ => {
                    let leaf = b.leaves.len();
                    if leaf >= NODE_FLAG as usize {
                        return Err(LpmError::TooLarge);
                    }
                    b.push_leaf(val);
                    prev_leaf = Some((val, leaf as u32));
                    leaf as u32
                }
            };
            *entry = leaf;
        }
        let Builder {
            nodes,
            skips,
            leaves,
            ..
        } = b;
        Ok(Poptrie {
            direct_bits,
            direct,
            nodes,
            skips,
            leaves,
            prefixes,
        })
    }

    #[inline(always)]
    fn lookup(&self, key: K) -> Option<V> {
        let d = self.direct[key.chunk(0, self.direct_bits)];
        if d & NODE_FLAG == 0 {
            return self.leaves[d as usize];
        }
        let mut node = self.nodes[(d & !NODE_FLAG) as usize];
        let mut off = self.direct_bits;
        loop {
            let idx = key.chunk(off, STRIDE) as u32;
            let bit = 1u64 << idx;
            if node.vector & bit != 0 {
                let rank = (node.vector & (bit - 1)).count_ones();
                node = self.nodes[(node.base_node + rank) as usize];
                off += STRIDE;
            } else if node.leafvec != 0 {
                let rank = (node.leafvec & (u64::MAX >> (63 - idx))).count_ones();
                // rank >= 1: the first leaf slot of every node starts a run.
                return self.leaves[(node.base_leaf + rank - 1) as usize];
            } else {
                // A skip node (no child, no leaf): checked only on this otherwise-final branch,
                // so ordinary nodes pay nothing for path compression.
                let s = &self.skips[node.base_leaf as usize];
                if key.masked(s.to) != s.key {
                    return self.leaves[s.miss as usize];
                }
                node = self.nodes[s.child as usize];
                off = s.to;
            }
        }
    }

    fn memory_bytes(&self) -> usize {
        self.direct.len() * 4
            + self.nodes.len() * std::mem::size_of::<Node>()
            + self.skips.len() * std::mem::size_of::<Skip<K>>()
            + self.leaves.len() * std::mem::size_of::<Option<V>>()
    }
}

/// Paints `paint` (one entry per slot of the block at depth `d`, `w` bits wide) with the value of
/// the longest prefix of length `d < len <= d + w` covering each slot (entries not covered keep
/// their inherited value), and lists the slots that need a child node: those holding a prefix
/// longer than `d + w`, as `(slot, lo, hi)` ranges of `pfx`.
///
/// Precondition: `pfx` is sorted, every prefix has `len > d` and lies inside the block.
fn expand<K: Key>(
    pfx: &[Pfx<K>],
    d: u32,
    w: u32,
    paint: &mut [u32],
    children: &mut Vec<(usize, usize, usize)>,
) {
    let mut short: Vec<(u32, usize, u32)> = Vec::new();
    let mut i = 0;
    while i < pfx.len() {
        let (addr, len, val) = pfx[i];
        let slot = addr.chunk(d, w);
        if len <= d + w {
            short.push((len, slot, val));
            i += 1;
        } else {
            // All longer prefixes in this slot are contiguous (see the sort in `build`).
            let lo = i;
            while i < pfx.len() && pfx[i].1 > d + w && pfx[i].0.chunk(d, w) == slot {
                i += 1;
            }
            children.push((slot, lo, i));
        }
    }
    // Shorter first, so that longer prefixes overwrite the slots they share.
    short.sort_by_key(|&(len, _, _)| len);
    for (len, slot, val) in short {
        let span = 1usize << (d + w - len);
        paint[slot..slot + span].fill(val);
    }
}

struct Builder<'a, K, V> {
    nodes: Vec<Node>,
    skips: Vec<Skip<K>>,
    leaves: Vec<Option<V>>,
    values: &'a [V],
}

impl<K: Key, V: Copy> Builder<'_, K, V> {
    fn push_leaf(&mut self, val: u32) {
        let v = if val == 0 {
            None
        } else {
            Some(self.values[val as usize - 1])
        };
        self.leaves.push(v);
    }

    /// Builds the node for the block at depth `d` holding `pfx` (all longer than `d`), whose
    /// addresses not covered by any of them resolve to `inherited`.
    fn node(&mut self, pfx: &[Pfx<K>], d: u32, inherited: u32) -> Result<Node, LpmError> {
        // Path compression: when every prefix below shares the next two or more strides (and
        // all are longer than that), one skip record replaces the chain of single-child nodes.
        // Deep, sparse IPv6 tables (a lone /64 or /128 under a /32) otherwise cost a dependent
        // load per 6 bits.
        if let (Some(first), Some(last)) = (pfx.first(), pfx.last()) {
            let min_len = pfx.iter().map(|p| p.1).min().unwrap_or(0);
            let common = first.0.common_len(last.0).min(min_len - 1);
            let to = d + (common.saturating_sub(d) / STRIDE) * STRIDE;
            if to >= d + 2 * STRIDE {
                let skip = u32::try_from(self.skips.len()).map_err(|_| LpmError::TooLarge)?;
                let child = u32::try_from(self.nodes.len()).map_err(|_| LpmError::TooLarge)?;
                if child >= NODE_FLAG {
                    return Err(LpmError::TooLarge);
                }
                self.push_leaf(inherited);
                let miss = (self.leaves.len() - 1) as u32;
                self.skips.push(Skip {
                    key: first.0.masked(to),
                    to,
                    child,
                    miss,
                });
                self.nodes.push(Node::default());
                let node = self.node(pfx, to, inherited)?;
                self.nodes[child as usize] = node;
                return Ok(Node {
                    base_leaf: skip,
                    ..Node::default()
                });
            }
        }
        let mut paint = [inherited; 64];
        let mut children = Vec::new();
        expand(pfx, d, STRIDE, &mut paint, &mut children);
        let mut node = Node {
            base_leaf: u32::try_from(self.leaves.len()).map_err(|_| LpmError::TooLarge)?,
            base_node: u32::try_from(self.nodes.len()).map_err(|_| LpmError::TooLarge)?,
            ..Node::default()
        };
        if self.nodes.len() + children.len() >= NODE_FLAG as usize {
            return Err(LpmError::TooLarge);
        }
        for &(slot, _, _) in &children {
            node.vector |= 1 << slot;
        }
        let mut prev: Option<u32> = None;
        for (slot, &val) in paint.iter().enumerate() {
            if node.vector & (1 << slot) != 0 {
                continue;
            }
            if prev != Some(val) {
                node.leafvec |= 1 << slot;
                self.push_leaf(val);
                prev = Some(val);
            }
        }
        // Children of one node are contiguous: reserve the block first, then fill it depth-first.
        let base = self.nodes.len();
        self.nodes.resize(base + children.len(), Node::default());
        for (k, &(slot, lo, hi)) in children.iter().enumerate() {
            let child = self.node(&pfx[lo..hi], d + STRIDE, paint[slot])?;
            self.nodes[base + k] = child;
        }
        Ok(node)
    }
}

macro_rules! lpm_family {
    ($(#[$doc:meta])* $name:ident, $lin:ident, $addr:ty, $key:ty, $bits:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name<V> {
            t: Poptrie<$key, V>,
        }

        impl<V: Copy> $name<V> {
            /// Compiles `(network, prefix length, value)` triples. Host bits are cleared; a
            /// prefix listed twice keeps its last value. Fails on a length beyond the width.
            pub fn build(prefixes: &[($addr, u8, V)]) -> Result<Self, LpmError> {
                Self::from_prefixes(prefixes.iter().copied())
            }

            /// Like [`Self::build`], from any iterator.
            pub fn from_prefixes(
                prefixes: impl IntoIterator<Item = ($addr, u8, V)>,
            ) -> Result<Self, LpmError> {
                let it = prefixes.into_iter().map(|(a, l, v)| (<$key>::from(a), l, v));
                Ok(Self { t: Poptrie::build(it, None)? })
            }

            /// Like [`Self::build`] with the direct-pointing width forced (clamped to 1..=20)
            /// instead of chosen by size: for tests that must cover both layouts, and tuning.
            pub fn build_with_direct_bits(
                prefixes: &[($addr, u8, V)],
                direct_bits: u8,
            ) -> Result<Self, LpmError> {
                let it = prefixes.iter().map(|&(a, l, v)| (<$key>::from(a), l, v));
                Ok(Self { t: Poptrie::build(it, Some(direct_bits))? })
            }

            /// A table that matches nothing.
            pub fn empty() -> Self {
                Self::from_prefixes(std::iter::empty()).expect("an empty table always builds")
            }

            /// The value of the longest prefix containing `addr`.
            #[inline]
            pub fn lookup(&self, addr: $addr) -> Option<V> {
                self.t.lookup(<$key>::from(addr))
            }

            /// [`Self::lookup`] on the address as a host-order integer.
            #[inline]
            pub fn lookup_bits(&self, addr: $key) -> Option<V> {
                self.t.lookup(addr)
            }

            /// True if some prefix contains `addr`.
            #[inline]
            pub fn contains(&self, addr: $addr) -> bool {
                self.lookup(addr).is_some()
            }

            /// Number of distinct prefixes.
            pub fn len(&self) -> usize {
                self.t.prefixes
            }

            /// True if the table holds no prefix.
            pub fn is_empty(&self) -> bool {
                self.t.prefixes == 0
            }

            /// Heap bytes held by the compiled table.
            pub fn memory_bytes(&self) -> usize {
                self.t.memory_bytes()
            }
        }

        impl<V: Copy> fmt::Debug for $name<V> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("prefixes", &self.t.prefixes)
                    .field("nodes", &self.t.nodes.len())
                    .field("leaves", &self.t.leaves.len())
                    .finish()
            }
        }

        /// Linear-scan oracle with the same semantics as the fast table (longest prefix wins,
        /// among equal prefixes the one listed last). For tests and fuzzing only.
        #[derive(Clone, Debug)]
        pub struct $lin<V> {
            entries: Vec<($key, u32, V)>,
        }

        impl<V: Copy> $lin<V> {
            /// Same input rules as the fast table.
            pub fn build(prefixes: &[($addr, u8, V)]) -> Result<Self, LpmError> {
                let mut entries = Vec::with_capacity(prefixes.len());
                for &(a, len, v) in prefixes {
                    if u32::from(len) > $bits {
                        return Err(LpmError::PrefixTooLong { len, max: $bits });
                    }
                    let len = u32::from(len);
                    entries.push((<$key>::from(a).masked(len), len, v));
                }
                Ok(Self { entries })
            }

            /// The value of the longest prefix containing `addr`.
            pub fn lookup(&self, addr: $addr) -> Option<V> {
                let a = <$key>::from(addr);
                let mut best: Option<(u32, V)> = None;
                for &(net, len, v) in &self.entries {
                    if a.masked(len) == net && best.map_or(true, |(bl, _)| len >= bl) {
                        best = Some((len, v));
                    }
                }
                best.map(|(_, v)| v)
            }
        }
    };
}

lpm_family!(
    /// Longest-prefix match over IPv4 prefixes (immutable once built).
    Lpm4, LinearLpm4, Ipv4Addr, u32, 32
);
lpm_family!(
    /// Longest-prefix match over IPv6 prefixes (immutable once built).
    Lpm6, LinearLpm6, Ipv6Addr, u128, 128
);

/// A dual-stack pair of tables: IPv4 and IPv6 prefixes in one value.
#[derive(Clone)]
pub struct IpLpm<V> {
    pub v4: Lpm4<V>,
    pub v6: Lpm6<V>,
}

impl<V: Copy> fmt::Debug for IpLpm<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpLpm")
            .field("v4", &self.v4)
            .field("v6", &self.v6)
            .finish()
    }
}

impl<V: Copy> IpLpm<V> {
    /// Compiles mixed-family prefixes; each goes to its family's table.
    pub fn build(prefixes: &[(IpAddr, u8, V)]) -> Result<Self, LpmError> {
        let v4 = Lpm4::from_prefixes(prefixes.iter().filter_map(|&(a, l, v)| match a {
            IpAddr::V4(a) => Some((a, l, v)),
            IpAddr::V6(_) => None,
        }))?;
        let v6 = Lpm6::from_prefixes(prefixes.iter().filter_map(|&(a, l, v)| match a {
            IpAddr::V6(a) => Some((a, l, v)),
            IpAddr::V4(_) => None,
        }))?;
        Ok(Self { v4, v6 })
    }

    /// A table that matches nothing.
    pub fn empty() -> Self {
        Self {
            v4: Lpm4::empty(),
            v6: Lpm6::empty(),
        }
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(a),
            IpAddr::V6(a) => self.v6.lookup(a),
        }
    }

    /// True if some prefix contains `addr`.
    #[inline]
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.lookup(addr).is_some()
    }

    /// Number of distinct prefixes over both families.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True if neither family holds a prefix.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Heap bytes held by both tables.
    pub fn memory_bytes(&self) -> usize {
        self.v4.memory_bytes() + self.v6.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_matches_nothing() {
        let t: Lpm4<u32> = Lpm4::empty();
        assert_eq!(t.lookup(v4("1.2.3.4")), None);
        assert!(t.is_empty());
        let t: Lpm6<u32> = Lpm6::empty();
        assert_eq!(t.lookup(v6("::1")), None);
    }

    #[test]
    fn default_route_and_host_routes() {
        let t = Lpm4::build(&[
            (v4("0.0.0.0"), 0, 0),
            (v4("10.0.0.0"), 8, 8),
            (v4("10.244.0.0"), 16, 16),
            (v4("10.244.1.0"), 24, 24),
            (v4("10.244.1.7"), 32, 32),
            (v4("10.244.1.6"), 31, 31),
            (v4("255.255.255.255"), 32, 99),
        ])
        .unwrap();
        assert_eq!(t.lookup(v4("1.1.1.1")), Some(0));
        assert_eq!(t.lookup(v4("10.1.1.1")), Some(8));
        assert_eq!(t.lookup(v4("10.244.9.1")), Some(16));
        assert_eq!(t.lookup(v4("10.244.1.1")), Some(24));
        assert_eq!(t.lookup(v4("10.244.1.7")), Some(32));
        assert_eq!(t.lookup(v4("10.244.1.6")), Some(31));
        assert_eq!(t.lookup(v4("10.244.1.8")), Some(24));
        assert_eq!(t.lookup(v4("255.255.255.255")), Some(99));
        assert_eq!(t.lookup(v4("255.255.255.254")), Some(0));
        assert_eq!(t.len(), 7);
    }

    #[test]
    fn host_bits_are_cleared_and_last_duplicate_wins() {
        let t = Lpm4::build(&[(v4("10.244.1.77"), 24, 1), (v4("10.244.1.0"), 24, 2)]).unwrap();
        assert_eq!(t.lookup(v4("10.244.1.200")), Some(2));
        assert_eq!(t.len(), 1);
        let lin =
            LinearLpm4::build(&[(v4("10.244.1.77"), 24, 1), (v4("10.244.1.0"), 24, 2)]).unwrap();
        assert_eq!(lin.lookup(v4("10.244.1.200")), Some(2));
    }

    #[test]
    fn rejects_long_prefixes() {
        assert_eq!(
            Lpm4::build(&[(v4("10.0.0.0"), 33, ())]).unwrap_err(),
            LpmError::PrefixTooLong { len: 33, max: 32 }
        );
        assert!(LinearLpm4::build(&[(v4("10.0.0.0"), 33, ())]).is_err());
        assert_eq!(
            Lpm6::build(&[(v6("::"), 129, ())]).unwrap_err(),
            LpmError::PrefixTooLong { len: 129, max: 128 }
        );
        assert!(LinearLpm6::build(&[(v6("::"), 129, ())]).is_err());
    }

    #[test]
    fn ipv6_deep_prefixes() {
        let t = Lpm6::build(&[
            (v6("fd00::"), 8, 1),
            (v6("fd00:10:244::"), 48, 2),
            (v6("fd00:10:244:1::"), 64, 3),
            (v6("fd00:10:244:1::7"), 128, 4),
            (v6("fd00:10:244:1::6"), 127, 5),
            (v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 128, 6),
        ])
        .unwrap();
        assert_eq!(t.lookup(v6("fd01::1")), Some(1));
        assert_eq!(t.lookup(v6("fd00:10:244:2::1")), Some(2));
        assert_eq!(t.lookup(v6("fd00:10:244:1::1")), Some(3));
        assert_eq!(t.lookup(v6("fd00:10:244:1::7")), Some(4));
        assert_eq!(t.lookup(v6("fd00:10:244:1::6")), Some(5));
        assert_eq!(t.lookup(v6("fd00:10:244:1::8")), Some(3));
        assert_eq!(
            t.lookup(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(6)
        );
        assert_eq!(
            t.lookup(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")),
            None
        );
        assert_eq!(t.lookup(v6("2001:db8::1")), None);
    }

    #[test]
    fn dual_stack() {
        let t = IpLpm::build(&[
            ("10.244.0.0".parse().unwrap(), 16, 'a'),
            ("fd00:10:244::".parse().unwrap(), 48, 'b'),
        ])
        .unwrap();
        assert_eq!(t.lookup("10.244.3.3".parse().unwrap()), Some('a'));
        assert_eq!(t.lookup("fd00:10:244::3".parse().unwrap()), Some('b'));
        assert_eq!(t.lookup("10.245.0.1".parse().unwrap()), None);
        assert_eq!(t.len(), 2);
    }

    /// Deterministic xorshift so the exhaustive comparison needs no dev-dependency.
    fn rng(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn matches_linear_oracle_on_dense_random_tables() {
        let mut s = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20 {
            let n = 1 + (rng(&mut s) % 300) as usize;
            let mut p4 = Vec::new();
            let mut p6 = Vec::new();
            for i in 0..n {
                // Cluster the prefixes under a few roots so they overlap a lot.
                let base = (rng(&mut s) as u32 & 0x0303_ffff) | 0x0a00_0000;
                p4.push((Ipv4Addr::from(base), (rng(&mut s) % 33) as u8, i as u32));
                let base6 = (u128::from(rng(&mut s)) << 64 | u128::from(rng(&mut s)))
                    & 0x0003_0000_0000_00ff_ffff_0000_0000_ffff
                    | 0xfd00 << 112;
                p6.push((Ipv6Addr::from(base6), (rng(&mut s) % 129) as u8, i as u32));
            }
            // Alternate the direct-pointing width so both layouts (and odd ones) are covered.
            let bits = [16u8, 8, 1, 20, 11][round % 5];
            let f4 = Lpm4::build_with_direct_bits(&p4, bits).unwrap();
            let f6 = Lpm6::build_with_direct_bits(&p6, bits).unwrap();
            let (l4, l6) = (
                LinearLpm4::build(&p4).unwrap(),
                LinearLpm6::build(&p6).unwrap(),
            );
            for _ in 0..2000 {
                let a = Ipv4Addr::from(rng(&mut s) as u32);
                assert_eq!(f4.lookup(a), l4.lookup(a), "round {round} v4 {a}");
                let pick = &p4[(rng(&mut s) as usize) % n];
                let noise = (rng(&mut s) as u32).checked_shr((rng(&mut s) % 33) as u32);
                let a = u32::from(pick.0) ^ noise.unwrap_or(0);
                let a = Ipv4Addr::from(a);
                assert_eq!(f4.lookup(a), l4.lookup(a), "round {round} v4 {a}");
                let pick = &p6[(rng(&mut s) as usize) % n];
                let noise = (u128::from(rng(&mut s)) << 64 | u128::from(rng(&mut s)))
                    .checked_shr((rng(&mut s) % 129) as u32);
                let a = Ipv6Addr::from(u128::from(pick.0) ^ noise.unwrap_or(0));
                assert_eq!(f6.lookup(a), l6.lookup(a), "round {round} v6 {a}");
            }
        }
    }
}
