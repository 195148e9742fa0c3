//! A consistent-hash ring in ketama mode: keys land on the same nodes as libketama and
//! uhashring (`hash_fn="ketama"`) place them for the same nodes and weights, so a user can switch
//! without moving data. Plain Rust, no Python types.
//!
//! Each node gets `vnodes * nodes * weight / total weight` labels `"{name}-{i}"` (libketama's
//! formula); each label's MD5 gives `replicas` points (its little-endian 32-bit words). A key
//! hashes to the first word of its MD5 and belongs to the first point above it, wrapping around.
//! With equal weights every node gets `vnodes * replicas` points whatever the others do (one
//! fewer for each point it hashes alike with a node added later, which owns that point).

use crate::errors::{Error, Result};
use crate::md5;
use std::collections::HashMap;
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Labels per node at average weight (libketama and uhashring: 40).
    pub vnodes: u32,
    /// Points per label, 1 to 4: the MD5 words used (libketama and uhashring: 4).
    pub replicas: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
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
    /// How many nodes own at least one point (a tiny weight can leave a node with none).
    placed_nodes: usize,
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
            staged.by_name.insert(name.to_owned(), staged.nodes.len());
            staged.nodes.push(Node {
                name: name.to_owned(),
                weight,
            });
        }
        staged.rebuild();
        *self = staged;
        Ok(())
    }

    pub fn remove_node(&mut self, name: &str) -> Result<()> {
        let index = self.find(name)?;
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
        if self.nodes[index].weight != weight {
            self.nodes[index].weight = weight;
            self.rebuild();
        }
        Ok(())
    }

    fn rebuild(&mut self) {
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
        self.lookup_point(key_point(key))
    }

    /// The owners of many keys: short keys are hashed `md5::LANES` at a time.
    pub fn lookup_many(&self, keys: &[&[u8]], owners: &mut Vec<usize>) -> Result<()> {
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
        if n == 0 || self.points.is_empty() {
            return Ok(found);
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
            replicas: 4,
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
            vnodes: 40,
            replicas: 5
        })
        .is_err());
        let empty = Ring::new(RingConfig::default()).unwrap();
        assert_eq!(empty.lookup(b"k"), None);
    }
}
