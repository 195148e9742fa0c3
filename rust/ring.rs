//! Consistent hashing behind one interface, plain Rust with no Python types. Three algorithms:
//!
//! - **ketama** (the default): keys land on the same nodes as libketama and uhashring
//!   (`hash_fn="ketama"`) place them for the same nodes and weights, so a user can switch without
//!   moving data.
//! - **rendezvous** (highest random weight, weighted by the logarithm method): each key scores
//!   every node and goes to the best; balance is as even as the keys allow and a change moves
//!   exactly the keys the changed node gains or loses, at the cost of a look at every node.
//! - **jump** (Lamping and Veach's jump consistent hash): nodes are numbered buckets, balance is
//!   even and a lookup takes a few steps; nodes can only be added or removed at the end.
//!
//! Ketama:
//! Each node gets `vnodes * nodes * weight / total weight` labels `"{name}-{i}"` (libketama's
//! formula); each label's MD5 gives `replicas` points (its little-endian 32-bit words). A key
//! hashes to the first word of its MD5 and belongs to the first point above it, wrapping around.
//! With equal weights every node gets `vnodes * replicas` points whatever the others do (one
//! fewer for each point it hashes alike with a node added later, which owns that point).

use crate::errors::{Error, Result};
use crate::md5;
use crate::xxh64::{avalanche, xxh64};
use std::collections::HashMap;
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Ketama,
    Rendezvous,
    Jump,
}

impl Algorithm {
    pub fn parse(name: &str) -> Result<Algorithm> {
        match name {
            "ketama" => Ok(Algorithm::Ketama),
            "rendezvous" => Ok(Algorithm::Rendezvous),
            "jump" => Ok(Algorithm::Jump),
            _ => Err(Error::invalid(
                "algorithm",
                format!("algorithm must be 'ketama', 'rendezvous' or 'jump' (got '{name}')."),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ketama => "ketama",
            Algorithm::Rendezvous => "rendezvous",
            Algorithm::Jump => "jump",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    pub algorithm: Algorithm,
    /// Labels per node at average weight (libketama and uhashring: 40).
    pub vnodes: u32,
    /// Points per label, 1 to 4: the MD5 words used (libketama and uhashring: 4).
    pub replicas: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            algorithm: Algorithm::Ketama,
            vnodes: 40,
            replicas: 4,
        }
    }
}

impl RingConfig {
    pub fn validate(&self) -> Result<()> {
        if self.vnodes == 0 {
            return Err(Error::invalid("vnodes", "vnodes must be at least 1."));
        }
        if !(1..=4).contains(&self.replicas) {
            return Err(Error::invalid(
                "replicas",
                format!(
                    "replicas must be from 1 to 4, the 32-bit words of an MD5 digest (got {}).",
                    self.replicas
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    name: String,
    weight: u32,
    /// The node's own hash, which rendezvous mixes with each key's.
    seed: u64,
}

impl Node {
    fn new(name: &str, weight: u32) -> Node {
        Node {
            name: name.to_owned(),
            weight,
            seed: xxh64(name.as_bytes(), 0),
        }
    }
}

/// The ring: nodes in the order they were added (ketama breaks point ties by it), and the
/// sorted points with the index of the node that owns each.
#[derive(Clone, Debug)]
pub struct Ring {
    config: RingConfig,
    nodes: Vec<Node>,
    by_name: HashMap<String, usize>,
    points: Vec<u32>,
    owners: Vec<u32>,
    /// `buckets[b]` is the index of the first point whose top `bucket_bits` bits are at least
    /// `b`: a lookup scans only its bucket (about one point) instead of searching them all.
    buckets: Vec<u32>,
    bucket_bits: u32,
    /// How many nodes can own keys (in ketama, a tiny weight can leave a node with no point).
    placed_nodes: usize,
    /// Whether every node has the same weight (rendezvous then compares raw scores).
    uniform: bool,
}

fn check_weight(weight: u32) -> Result<()> {
    if weight == 0 {
        return Err(Error::invalid(
            "weight",
            "weight must be a whole number of at least 1.",
        ));
    }
    Ok(())
}

/// Lamping and Veach's jump consistent hash: the bucket in `0..buckets` for a 64-bit key.
#[inline]
pub fn jump(mut key: u64, buckets: usize) -> usize {
    let (mut bucket, mut next) = (-1i64, 0i64);
    while next < buckets as i64 {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as usize
}

/// The point a key hashes to: the first word of its MD5.
#[inline]
pub fn key_point(key: &[u8]) -> u32 {
    md5::digest_words(key)[0]
}

impl Ring {
    pub fn new(config: RingConfig) -> Result<Ring> {
        config.validate()?;
        Ok(Ring {
            config,
            nodes: Vec::new(),
            by_name: HashMap::new(),
            points: Vec::new(),
            owners: Vec::new(),
            buckets: vec![0, 0],
            bucket_bits: 0,
            placed_nodes: 0,
            uniform: true,
        })
    }

    pub fn config(&self) -> RingConfig {
        self.config
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node names and weights in the order they were added.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, u32)> {
        self.nodes
            .iter()
            .map(|node| (node.name.as_str(), node.weight))
    }

    pub fn name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn weight(&self, name: &str) -> Result<u32> {
        self.find(name).map(|index| self.nodes[index].weight)
    }

    /// How many nodes can own keys.
    pub fn placed_nodes(&self) -> usize {
        self.placed_nodes
    }

    /// How many points the ring holds in all.
    pub fn point_count(&self) -> usize {
        self.points.len()
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.index_of(name).ok_or_else(|| Error::UnknownNode {
            argument: "name",
            name: name.to_owned(),
        })
    }

    /// Adds a node; a name already on the ring is refused (change weights with `set_weight`).
    pub fn add_node(&mut self, name: &str, weight: u32) -> Result<()> {
        self.add_nodes_as("name", [(name, weight)])
    }

    /// Adds several nodes with one rebuild; nothing is added when one of them is refused.
    pub fn add_nodes<'a>(&mut self, nodes: impl IntoIterator<Item = (&'a str, u32)>) -> Result<()> {
        self.add_nodes_as("nodes", nodes)
    }

    fn add_nodes_as<'a>(
        &mut self,
        argument: &'static str,
        nodes: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> Result<()> {
        let mut staged = self.clone();
        for (name, weight) in nodes {
            check_weight(weight)?;
            if staged.by_name.contains_key(name) {
                let message = if argument == "name" {
                    format!(
                        "name '{name}' is already a node of this ring; change its weight with \
                         set_weight(), or remove it first."
                    )
                } else {
                    format!("nodes names '{name}' twice; each node appears once.")
                };
                return Err(Error::invalid(argument, message));
            }
            if staged.config.algorithm == Algorithm::Jump && weight != 1 {
                return Err(Error::invalid(
                    "weight",
                    "weight must be 1 with the jump algorithm: its buckets are all equal.",
                ));
            }
            staged.by_name.insert(name.to_owned(), staged.nodes.len());
            staged.nodes.push(Node::new(name, weight));
        }
        staged.rebuild();
        *self = staged;
        Ok(())
    }

    pub fn remove_node(&mut self, name: &str) -> Result<()> {
        let index = self.find(name)?;
        if self.config.algorithm == Algorithm::Jump && index + 1 != self.nodes.len() {
            return Err(Error::invalid(
                "name",
                format!(
                    "name '{name}' is not the last node; the jump algorithm numbers its nodes, so \
                     only the last one can be removed without moving other keys (use \
                     'rendezvous' or 'ketama' to remove any node)."
                ),
            ));
        }
        self.nodes.remove(index);
        self.by_name = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| (node.name.clone(), index))
            .collect();
        self.rebuild();
        Ok(())
    }

    pub fn set_weight(&mut self, name: &str, weight: u32) -> Result<()> {
        check_weight(weight)?;
        let index = self.find(name)?;
        if self.config.algorithm == Algorithm::Jump && weight != 1 {
            return Err(Error::invalid(
                "weight",
                "weight must be 1 with the jump algorithm: its buckets are all equal.",
            ));
        }
        if self.nodes[index].weight != weight {
            self.nodes[index].weight = weight;
            self.rebuild();
        }
        Ok(())
    }

    fn rebuild(&mut self) {
        self.uniform = self
            .nodes
            .windows(2)
            .all(|pair| pair[0].weight == pair[1].weight);
        if self.config.algorithm != Algorithm::Ketama {
            self.placed_nodes = self.nodes.len();
            return;
        }
        let total_weight: u64 = self.nodes.iter().map(|node| u64::from(node.weight)).sum();
        let count = self.nodes.len() as u64;
        let replicas = self.config.replicas as usize;
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        let mut label = String::new();
        for (index, node) in self.nodes.iter().enumerate() {
            // libketama's share of points, in integer arithmetic as uhashring computes it.
            let labels =
                u64::from(self.config.vnodes) * count * u64::from(node.weight) / total_weight;
            for number in 0..labels {
                label.clear();
                write!(label, "{}-{}", node.name, number).expect("writing to a String");
                let words = md5::digest_words(label.as_bytes());
                for word in &words[..replicas] {
                    pairs.push((*word, index as u32));
                }
            }
        }
        // When two nodes hash a point alike, the one added later owns it, as in uhashring.
        pairs.sort_unstable();
        pairs.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                earlier.1 = later.1;
                true
            } else {
                false
            }
        });
        self.points = pairs.iter().map(|pair| pair.0).collect();
        self.owners = pairs.iter().map(|pair| pair.1).collect();
        self.placed_nodes = self
            .points_per_node()
            .into_iter()
            .filter(|count| *count > 0)
            .count();
        // About one point per bucket, from 2^4 to 2^16 buckets.
        self.bucket_bits = (usize::BITS - self.points.len().leading_zeros()).clamp(4, 16);
        let shift = 32 - self.bucket_bits;
        let mut next = 0usize;
        self.buckets = (0..=(1u64 << self.bucket_bits))
            .map(|bucket| {
                while next < self.points.len() && u64::from(self.points[next] >> shift) < bucket {
                    next += 1;
                }
                next as u32
            })
            .collect();
    }

    /// The index in `points` of the first point above `point`, wrapping to the start.
    #[inline]
    fn position(&self, point: u32) -> usize {
        let bucket = (point >> (32 - self.bucket_bits)) as usize;
        let (start, end) = (
            self.buckets[bucket] as usize,
            self.buckets[bucket + 1] as usize,
        );
        // Every point in later buckets is above `point`, so the answer is in this bucket or
        // is the next bucket's first point.
        let position = start
            + self.points[start..end]
                .iter()
                .take_while(|&&candidate| candidate <= point)
                .count();
        if position == self.points.len() {
            0
        } else {
            position
        }
    }

    /// The node (its index) that owns a key's point, or `None` while the ring has no points.
    #[inline]
    pub fn lookup_point(&self, point: u32) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        Some(self.owners[self.position(point)] as usize)
    }

    pub fn lookup(&self, key: &[u8]) -> Option<usize> {
        match self.config.algorithm {
            Algorithm::Ketama => self.lookup_point(key_point(key)),
            Algorithm::Rendezvous => self.rendezvous_best(xxh64(key, 0)),
            Algorithm::Jump => {
                (!self.nodes.is_empty()).then(|| jump(xxh64(key, 0), self.nodes.len()))
            }
        }
    }

    /// A node's rendezvous score for a key: higher wins. Weighted by the logarithm method, so
    /// a node's share of keys is its share of the total weight.
    #[inline]
    fn rendezvous_score(&self, key_hash: u64, node: &Node) -> f64 {
        let mixed = avalanche(key_hash ^ node.seed);
        if self.uniform {
            return mixed as f64;
        }
        // A uniform draw strictly inside (0, 1) from the top 53 bits.
        let unit = ((mixed >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        f64::from(node.weight) / -unit.ln()
    }

    fn rendezvous_best(&self, key_hash: u64) -> Option<usize> {
        if self.uniform {
            // Integer scores: the exact comparison, ties to the earlier node.
            return (0..self.nodes.len())
                .rev()
                .max_by_key(|index| avalanche(key_hash ^ self.nodes[*index].seed));
        }
        let mut best: Option<(usize, f64)> = None;
        for (index, node) in self.nodes.iter().enumerate() {
            let score = self.rendezvous_score(key_hash, node);
            if best.is_none_or(|(_, top)| score > top) {
                best = Some((index, score));
            }
        }
        best.map(|(index, _)| index)
    }

    /// The owners of many keys: short keys are hashed `md5::LANES` at a time.
    pub fn lookup_many(&self, keys: &[&[u8]], owners: &mut Vec<usize>) -> Result<()> {
        if self.config.algorithm != Algorithm::Ketama {
            owners.reserve(keys.len());
            for key in keys {
                owners.push(self.lookup(key).ok_or(Error::EmptyRing)?);
            }
            return Ok(());
        }
        if self.points.is_empty() {
            return if keys.is_empty() {
                Ok(())
            } else {
                Err(Error::EmptyRing)
            };
        }
        owners.reserve(keys.len());
        let mut short: Vec<&[u8]> = Vec::with_capacity(md5::LANES);
        let mut slots: Vec<usize> = Vec::with_capacity(md5::LANES);
        let flush = |short: &mut Vec<&[u8]>, slots: &mut Vec<usize>, owners: &mut Vec<usize>| {
            let words = md5::first_words(short);
            for (slot, word) in slots.iter().zip(words) {
                owners[*slot] = self.owners[self.position(word)] as usize;
            }
            short.clear();
            slots.clear();
        };
        for key in keys {
            let slot = owners.len();
            if key.len() <= md5::MAX_SHORT {
                owners.push(0);
                short.push(key);
                slots.push(slot);
                if short.len() == md5::LANES {
                    flush(&mut short, &mut slots, owners);
                }
            } else {
                owners.push(self.owners[self.position(key_point(key))] as usize);
            }
        }
        if !short.is_empty() {
            flush(&mut short, &mut slots, owners);
        }
        Ok(())
    }

    /// The first `n` distinct nodes met walking the ring from the key's point: the key's owner,
    /// then the next nodes clockwise (its replicas).
    pub fn lookup_n(&self, key: &[u8], n: usize) -> Result<Vec<usize>> {
        if n > self.nodes.len() {
            return Err(Error::invalid(
                "n",
                format!(
                    "n must not be more than the ring's {} nodes (got {n}).",
                    self.nodes.len()
                ),
            ));
        }
        if n > self.placed_nodes {
            return Err(Error::invalid(
                "n",
                format!(
                    "n must not be more than the {} nodes that own points on the ring (got {n}); \
                     the others' weights are too small for any point at this vnodes.",
                    self.placed_nodes
                ),
            ));
        }
        let mut found = Vec::with_capacity(n);
        if n == 0 || self.placed_nodes == 0 {
            return Ok(found);
        }
        match self.config.algorithm {
            Algorithm::Ketama => {}
            Algorithm::Rendezvous => {
                let key_hash = xxh64(key, 0);
                let mut scored: Vec<(usize, f64)> = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(index, node)| (index, self.rendezvous_score(key_hash, node)))
                    .collect();
                // Best first; equal scores keep node order, as `rendezvous_best` does.
                scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                found.extend(scored.into_iter().take(n).map(|(index, _)| index));
                return Ok(found);
            }
            Algorithm::Jump => {
                // The owner, then the buckets later replicas of the key hash to, skipping
                // repeats; a full sweep of the rest settles any that are left.
                let key_hash = xxh64(key, 0);
                for replica in 0..(4 * n as u64) {
                    let hash = if replica == 0 {
                        key_hash
                    } else {
                        avalanche(key_hash.wrapping_add(replica))
                    };
                    let bucket = jump(hash, self.nodes.len());
                    if !found.contains(&bucket) {
                        found.push(bucket);
                        if found.len() == n {
                            return Ok(found);
                        }
                    }
                }
                for bucket in 0..self.nodes.len() {
                    if !found.contains(&bucket) {
                        found.push(bucket);
                        if found.len() == n {
                            break;
                        }
                    }
                }
                return Ok(found);
            }
        }
        let start = self.position(key_point(key));
        for step in 0..self.points.len() {
            let owner = self.owners[(start + step) % self.points.len()] as usize;
            if !found.contains(&owner) {
                found.push(owner);
                if found.len() == n {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// Points owned by each node, in node order.
    pub fn points_per_node(&self) -> Vec<usize> {
        let mut counts = vec![0; self.nodes.len()];
        for owner in &self.owners {
            counts[*owner as usize] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        let mut ring = Ring::new(RingConfig::default()).unwrap();
        ring.add_nodes(names.iter().map(|name| (*name, 1))).unwrap();
        ring
    }

    fn owner<'a>(ring: &'a Ring, key: &str) -> &'a str {
        ring.name(ring.lookup(key.as_bytes()).unwrap())
    }

    #[test]
    fn equal_weights_give_every_node_vnodes_times_replicas_points() {
        let ring = ring(&["a", "b", "c"]);
        assert_eq!(ring.points_per_node(), vec![160, 160, 160]);
        assert_eq!(ring.point_count(), 480);
    }

    #[test]
    fn placements_match_uhashring() {
        // Computed with uhashring 2.x: HashRing(["node1", "node2", "node3"], hash_fn="ketama").
        let ring = ring(&["node1", "node2", "node3"]);
        let expected = [
            ("alpha", "node2"),
            ("beta", "node2"),
            ("gamma", "node3"),
            ("user:42", "node1"),
        ];
        for (key, node) in expected {
            assert_eq!(owner(&ring, key), node, "{key}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let before = ring(&["a", "b", "c", "d"]);
        let mut after = before.clone();
        after.remove_node("c").unwrap();
        for number in 0..5_000 {
            let key = format!("key-{number}");
            let was = owner(&before, &key);
            if was != "c" {
                assert_eq!(
                    owner(&after, &key),
                    was,
                    "{key} moved though its node stayed"
                );
            }
        }
    }

    #[test]
    fn lookup_n_returns_distinct_nodes_starting_with_the_owner() {
        let ring = ring(&["a", "b", "c", "d"]);
        for number in 0..500 {
            let key = format!("key-{number}");
            let nodes = ring.lookup_n(key.as_bytes(), 3).unwrap();
            assert_eq!(nodes.len(), 3);
            assert_eq!(Some(nodes[0]), ring.lookup(key.as_bytes()));
            assert!(nodes[0] != nodes[1] && nodes[1] != nodes[2] && nodes[0] != nodes[2]);
        }
        assert!(matches!(
            ring.lookup_n(b"k", 5),
            Err(Error::InvalidArgument { argument: "n", .. })
        ));
    }

    #[test]
    fn bucketed_positions_agree_with_a_binary_search() {
        for names in [
            &["a"][..],
            &["a", "b", "c"],
            &["n1", "n2", "n3", "n4", "n5", "n6", "n7"],
        ] {
            let ring = ring(names);
            let mut point: u32 = 0x9E37_79B9;
            for _ in 0..20_000 {
                point = point.wrapping_mul(0x0019_660D).wrapping_add(0x3C6E_F35F);
                let search = ring.points.partition_point(|&candidate| candidate <= point);
                let expected = if search == ring.points.len() {
                    0
                } else {
                    search
                };
                assert_eq!(ring.position(point), expected, "point {point:#x}");
            }
            for &edge in &[0, u32::MAX, ring.points[0], *ring.points.last().unwrap()] {
                let search = ring.points.partition_point(|&candidate| candidate <= edge);
                let expected = if search == ring.points.len() {
                    0
                } else {
                    search
                };
                assert_eq!(ring.position(edge), expected, "edge {edge:#x}");
            }
        }
    }

    #[test]
    fn batch_lookups_agree_with_single_ones() {
        let ring = ring(&["a", "b", "c", "d", "e"]);
        let keys: Vec<String> = (0..203)
            .map(|number| {
                if number % 17 == 0 {
                    format!("a long key, longer than one MD5 block can take: {number:060}")
                } else {
                    format!("key-{number}")
                }
            })
            .collect();
        let slices: Vec<&[u8]> = keys.iter().map(|key| key.as_bytes()).collect();
        let mut owners = Vec::new();
        ring.lookup_many(&slices, &mut owners).unwrap();
        let singles: Vec<usize> = slices.iter().map(|key| ring.lookup(key).unwrap()).collect();
        assert_eq!(owners, singles);
    }

    #[test]
    fn lookup_n_refuses_more_nodes_than_own_points() {
        let mut ring = Ring::new(RingConfig {
            vnodes: 1,
            ..RingConfig::default()
        })
        .unwrap();
        ring.add_nodes([("a", 1), ("b", 10)]).unwrap();
        assert_eq!(ring.points_per_node()[0], 0, "a is too light for a point");
        assert!(matches!(
            ring.lookup_n(b"k", 2),
            Err(Error::InvalidArgument { argument: "n", .. })
        ));
        assert_eq!(ring.lookup_n(b"k", 1).unwrap().len(), 1);
    }

    fn ring_of(algorithm: Algorithm, nodes: &[(&str, u32)]) -> Ring {
        let mut ring = Ring::new(RingConfig {
            algorithm,
            ..RingConfig::default()
        })
        .unwrap();
        ring.add_nodes(nodes.iter().copied()).unwrap();
        ring
    }

    fn shares(ring: &Ring, keys: usize) -> Vec<f64> {
        let mut counts = vec![0usize; ring.len()];
        for number in 0..keys {
            counts[ring.lookup(format!("key-{number}").as_bytes()).unwrap()] += 1;
        }
        counts
            .into_iter()
            .map(|count| count as f64 / keys as f64)
            .collect()
    }

    #[test]
    fn jump_matches_the_published_algorithm() {
        // From the jump-consistent-hash package, a port of the paper's C++ code.
        let cases = [
            (0, 1, 0),
            (1, 1, 0),
            (256, 1024, 520),
            (0xDEAD_10CC, 1, 0),
            (0xDEAD_10CC, 2, 1),
            (0xDEAD_10CC, 3, 1),
            (0xDEAD_10CC, 100, 94),
            (u64::MAX, 1000, 313),
            (123_456_789, 7, 0),
        ];
        for (key, buckets, bucket) in cases {
            assert_eq!(jump(key, buckets), bucket, "jump({key}, {buckets})");
        }
    }

    #[test]
    fn rendezvous_and_jump_spread_keys_by_weight_and_move_only_what_they_must() {
        let nodes: Vec<(String, u32)> = (0..10).map(|index| (format!("n{index}"), 1)).collect();
        let nodes: Vec<(&str, u32)> = nodes.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        for algorithm in [Algorithm::Rendezvous, Algorithm::Jump] {
            let before = ring_of(algorithm, &nodes);
            for share in shares(&before, 50_000) {
                assert!((share - 0.1).abs() < 0.01, "{algorithm:?}: share {share}");
            }
            let mut after = before.clone();
            after.remove_node("n9").unwrap();
            for number in 0..5_000 {
                let key = format!("key-{number}");
                let was = before.lookup(key.as_bytes()).unwrap();
                if was != 9 {
                    assert_eq!(
                        after.lookup(key.as_bytes()),
                        Some(was),
                        "{algorithm:?} {key}"
                    );
                }
            }
        }
        let weighted = ring_of(Algorithm::Rendezvous, &[("a", 1), ("b", 3)]);
        let share = shares(&weighted, 50_000)[1];
        assert!((share - 0.75).abs() < 0.01, "b's share {share}");
    }

    #[test]
    fn rendezvous_and_jump_replicas_are_distinct_and_start_with_the_owner() {
        let names = [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)];
        for algorithm in [Algorithm::Rendezvous, Algorithm::Jump] {
            let ring = ring_of(algorithm, &names);
            for number in 0..300 {
                let key = format!("key-{number}");
                let nodes = ring.lookup_n(key.as_bytes(), 5).unwrap();
                assert_eq!(Some(nodes[0]), ring.lookup(key.as_bytes()));
                let mut sorted = nodes.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, vec![0, 1, 2, 3, 4], "{algorithm:?}");
            }
        }
    }

    #[test]
    fn jump_refuses_what_it_cannot_do() {
        let mut ring = ring_of(Algorithm::Jump, &[("a", 1), ("b", 1), ("c", 1)]);
        assert!(matches!(
            ring.remove_node("a"),
            Err(Error::InvalidArgument {
                argument: "name",
                ..
            })
        ));
        assert!(matches!(
            ring.add_node("d", 2),
            Err(Error::InvalidArgument {
                argument: "weight",
                ..
            })
        ));
        ring.remove_node("c").unwrap();
        assert_eq!(ring.len(), 2);
    }

    #[test]
    fn bad_input_names_the_argument_and_changes_nothing() {
        let mut ring = ring(&["a"]);
        assert!(matches!(
            ring.add_node("b", 0),
            Err(Error::InvalidArgument {
                argument: "weight",
                ..
            })
        ));
        assert!(matches!(
            ring.add_node("a", 1),
            Err(Error::InvalidArgument {
                argument: "name",
                ..
            })
        ));
        assert!(matches!(
            ring.remove_node("zz"),
            Err(Error::UnknownNode {
                argument: "name",
                ..
            })
        ));
        assert!(ring
            .add_nodes([("b", 1), ("b", 2)])
            .is_err_and(|error| matches!(
                error,
                Error::InvalidArgument {
                    argument: "nodes",
                    ..
                }
            )));
        assert_eq!(ring.len(), 1);
        assert!(Ring::new(RingConfig {
            replicas: 5,
            ..RingConfig::default()
        })
        .is_err());
        let empty = Ring::new(RingConfig::default()).unwrap();
        assert_eq!(empty.lookup(b"k"), None);
    }
}
