//! The in-process cache: bounded by entry count, evicting by S3-FIFO (Yang et al., "FIFO
//! queues are all you need for cache eviction", SOSP 2023), with an optional expiry per entry.
//!
//! - **Eviction.** New keys enter a small FIFO (a tenth of the capacity). A key read again
//!   while there moves to the main FIFO when it reaches the tail; one that was not is evicted
//!   and its hash remembered in a ghost FIFO, so that if it comes back soon it goes straight to
//!   the main FIFO. The main FIFO gives a key one more lap per recent read (up to three). Most
//!   one-hit wonders leave through the small FIFO without disturbing the popular keys, which
//!   is why S3-FIFO's hit ratio beats LRU's on skewed workloads.
//! - **Reads are cheap.** A hit only bumps a two-bit counter: no list is relinked, unlike LRU.
//! - **Expiry.** An entry may carry a deadline. A read of an expired entry misses and drops it;
//!   a min-heap of deadlines lets writes (and `expire`) drop expired entries before the
//!   eviction policy would, so they do not hold memory for long.
//! - **Dropped keys and values are handed back** to the caller (`Dropped`) rather than
//!   dropped here: the binding stores Python objects whose last reference may run arbitrary
//!   code, which must not happen while the cache's lock is held.
//!
//! Plain Rust: the caller supplies each key's hash and an equality test, so keys can be
//! foreign objects hashed elsewhere (the binding uses Python's own hash).

use crate::clock::Clock;
use hashbrown::HashTable;
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

const NIL: u32 = u32::MAX;
/// How many extra laps the main FIFO grants a key that keeps being read.
const MAX_FREQUENCY: u8 = 3;
/// The small FIFO's share of the capacity, as in the paper.
const SMALL_SHARE: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Segment {
    Small,
    Main,
}

struct Entry<K, V> {
    key: K,
    value: V,
    hash: u64,
    /// Deadline on the cache's clock in nanoseconds; 0 for none.
    expires: u64,
    /// Tells a deadline in the heap from a later write of the same slot.
    stamp: u64,
    frequency: u8,
    segment: Segment,
    /// Neighbours in the segment's list: `newer` towards the head, `older` towards the tail.
    newer: u32,
    older: u32,
}

#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// Lifetime counts and the current size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub len: usize,
    pub capacity: usize,
}

/// Keys and values the cache let go of, for the caller to drop once it holds no lock. Most
/// operations let go of one or two, which fit inline: a hit or a set allocates nothing.
#[derive(Debug)]
pub struct Dropped<K, V> {
    pub keys: SmallVec<[K; 2]>,
    pub values: SmallVec<[V; 2]>,
}

impl<K, V> Default for Dropped<K, V> {
    fn default() -> Self {
        Dropped {
            keys: SmallVec::new(),
            values: SmallVec::new(),
        }
    }
}

/// The hashes of keys recently evicted from the small FIFO, oldest first.
struct Ghost {
    order: VecDeque<(u64, u64)>,
    /// hash → the sequence number of its newest place in `order`.
    members: HashTable<(u64, u64)>,
    capacity: usize,
    sequence: u64,
}

impl Ghost {
    fn new(capacity: usize) -> Self {
        Ghost {
            order: VecDeque::new(),
            members: HashTable::new(),
            capacity,
            sequence: 0,
        }
    }

    fn remember(&mut self, hash: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.order.len() == self.capacity {
            if let Some((old, sequence)) = self.order.pop_front() {
                if let Ok(member) = self.members.find_entry(old, |m| m.0 == old) {
                    if member.get().1 == sequence {
                        member.remove();
                    }
                }
            }
        }
        self.sequence += 1;
        let sequence = self.sequence;
        self.order.push_back((hash, sequence));
        match self.members.find_mut(hash, |m| m.0 == hash) {
            Some(member) => member.1 = sequence,
            None => {
                self.members.insert_unique(hash, (hash, sequence), |m| m.0);
            }
        }
    }

    /// Whether `hash` was remembered (and forgets it).
    fn take(&mut self, hash: u64) -> bool {
        match self.members.find_entry(hash, |m| m.0 == hash) {
            Ok(member) => {
                member.remove();
                true
            }
            Err(_) => false,
        }
    }

    fn clear(&mut self) {
        self.order.clear();
        self.members.clear();
    }
}

/// The clock read at most once per operation, and only when a deadline needs it.
struct Now<'a> {
    clock: &'a Clock,
    read: Option<u64>,
}

impl Now<'_> {
    fn get(&mut self) -> u64 {
        *self.read.get_or_insert_with(|| self.clock.now_nanos())
    }
}

/// A bounded cache with S3-FIFO eviction and per-entry deadlines. Not synchronised: the owner
/// wraps it in a lock.
pub struct S3Fifo<K, V> {
    capacity: usize,
    small_target: usize,
    table: HashTable<(u64, u32)>,
    slots: Vec<Option<Entry<K, V>>>,
    free: Vec<u32>,
    small: List,
    main: List,
    ghost: Ghost,
    deadlines: BinaryHeap<Reverse<(u64, u64, u32)>>,
    /// Live entries with a deadline; the heap is rebuilt when stale deadlines outnumber them.
    timed: usize,
    next_stamp: u64,
    clock: Clock,
    stats: Stats,
}

impl<K, V> S3Fifo<K, V> {
    /// A cache of at most `capacity` entries (at least 1, at most `u32::MAX - 1`).
    pub fn new(capacity: usize, clock: Clock) -> Self {
        assert!(
            (1..NIL as usize).contains(&capacity),
            "capacity out of range"
        );
        let small_target = (capacity / SMALL_SHARE).max(1);
        S3Fifo {
            capacity,
            small_target,
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            small: List::EMPTY,
            main: List::EMPTY,
            ghost: Ghost::new(capacity - small_target.min(capacity - 1)),
            deadlines: BinaryHeap::new(),
            timed: 0,
            next_stamp: 0,
            clock,
            stats: Stats {
                capacity,
                ..Stats::default()
            },
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Entries stored, counting expired ones not dropped yet (`expire` drops them).
    pub fn len(&self) -> usize {
        self.small.len + self.main.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> Stats {
        Stats {
            len: self.len(),
            ..self.stats
        }
    }

    fn find(&self, hash: u64, mut eq: impl FnMut(&K) -> bool) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&(h, slot)| {
                h == hash
                    && slots[slot as usize]
                        .as_ref()
                        .is_some_and(|entry| eq(&entry.key))
            })
            .map(|&(_, slot)| slot)
    }

    fn entry(&self, slot: u32) -> &Entry<K, V> {
        self.slots[slot as usize]
            .as_ref()
            .expect("a linked slot holds an entry")
    }

    fn entry_mut(&mut self, slot: u32) -> &mut Entry<K, V> {
        self.slots[slot as usize]
            .as_mut()
            .expect("a linked slot holds an entry")
    }

    fn is_expired(&self, slot: u32, now: &mut Now<'_>) -> bool {
        let expires = self.entry(slot).expires;
        expires != 0 && now.get() >= expires
    }

    /// The value of a live entry, counting a hit (and a read for eviction) or a miss. An
    /// expired entry is dropped and misses.
    pub fn get(
        &mut self,
        hash: u64,
        eq: impl FnMut(&K) -> bool,
        dropped: &mut Dropped<K, V>,
    ) -> Option<&V> {
        let Some(slot) = self.find(hash, eq) else {
            self.stats.misses += 1;
            return None;
        };
        let clock = self.clock.clone();
        let mut now = Now {
            clock: &clock,
            read: None,
        };
        if self.is_expired(slot, &mut now) {
            self.remove_slot(slot, dropped);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            return None;
        }
        self.stats.hits += 1;
        let entry = self.entry_mut(slot);
        entry.frequency = (entry.frequency + 1).min(MAX_FREQUENCY);
        Some(&self.entry(slot).value)
    }

    /// Whether a live entry is stored, without counting a read.
    pub fn contains(&mut self, hash: u64, eq: impl FnMut(&K) -> bool) -> bool {
        let Some(slot) = self.find(hash, eq) else {
            return false;
        };
        let clock = self.clock.clone();
        let mut now = Now {
            clock: &clock,
            read: None,
        };
        !self.is_expired(slot, &mut now)
    }

    /// Stores `key = value`, replacing the value of an equal key, with a deadline `ttl`
    /// nanoseconds from now (`None`: no deadline). Makes room first by dropping expired
    /// entries, then by eviction.
    pub fn insert(
        &mut self,
        key: K,
        value: V,
        hash: u64,
        ttl: Option<u64>,
        eq: impl FnMut(&K) -> bool,
        dropped: &mut Dropped<K, V>,
    ) {
        let clock = self.clock.clone();
        let mut now = Now {
            clock: &clock,
            read: None,
        };
        if !self.deadlines.is_empty() {
            self.drop_expired(now.get(), dropped);
        }
        let expires = ttl.map_or(0, |ttl| now.get().saturating_add(ttl).max(1));
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let slot = if let Some(slot) = self.find(hash, eq) {
            let entry = self.entry_mut(slot);
            let old = std::mem::replace(&mut entry.value, value);
            let was_timed = entry.expires != 0;
            entry.expires = expires;
            entry.stamp = stamp;
            entry.frequency = (entry.frequency + 1).min(MAX_FREQUENCY);
            dropped.values.push(old);
            dropped.keys.push(key);
            self.timed = self.timed + usize::from(expires != 0) - usize::from(was_timed);
            self.stats.updates += 1;
            slot
        } else {
            while self.len() >= self.capacity {
                self.evict(&mut now, dropped);
            }
            let segment = if self.ghost.take(hash) {
                Segment::Main
            } else {
                Segment::Small
            };
            let entry = Entry {
                key,
                value,
                hash,
                expires,
                stamp,
                frequency: 0,
                segment,
                newer: NIL,
                older: NIL,
            };
            let slot = match self.free.pop() {
                Some(slot) => {
                    self.slots[slot as usize] = Some(entry);
                    slot
                }
                None => {
                    self.slots.push(Some(entry));
                    (self.slots.len() - 1) as u32
                }
            };
            self.push_head(slot);
            self.table.insert_unique(hash, (hash, slot), |&(h, _)| h);
            self.timed += usize::from(expires != 0);
            self.stats.inserts += 1;
            slot
        };
        if expires != 0 {
            self.deadlines.push(Reverse((expires, stamp, slot)));
        }
    }

    /// Removes the entry of an equal key; whether a live one was there.
    pub fn remove(
        &mut self,
        hash: u64,
        eq: impl FnMut(&K) -> bool,
        dropped: &mut Dropped<K, V>,
    ) -> bool {
        let Some(slot) = self.find(hash, eq) else {
            return false;
        };
        let clock = self.clock.clone();
        let mut now = Now {
            clock: &clock,
            read: None,
        };
        let live = !self.is_expired(slot, &mut now);
        self.remove_slot(slot, dropped);
        if live {
            self.stats.deletes += 1;
        } else {
            self.stats.expirations += 1;
        }
        live
    }

    /// Drops every expired entry now; how many.
    pub fn expire(&mut self, dropped: &mut Dropped<K, V>) -> usize {
        if self.deadlines.is_empty() {
            return 0;
        }
        let now = self.clock.now_nanos();
        self.drop_expired(now, dropped)
    }

    /// Empties the cache (the counts stay).
    pub fn clear(&mut self, dropped: &mut Dropped<K, V>) {
        for entry in self.slots.drain(..).flatten() {
            dropped.keys.push(entry.key);
            dropped.values.push(entry.value);
        }
        self.table.clear();
        self.free.clear();
        self.small = List::EMPTY;
        self.main = List::EMPTY;
        self.ghost.clear();
        self.deadlines.clear();
        self.timed = 0;
    }

    /// Visits every stored key and value (for a garbage collector's traversal).
    pub fn for_each(&self, mut visit: impl FnMut(&K, &V)) {
        for entry in self.slots.iter().flatten() {
            visit(&entry.key, &entry.value);
        }
    }

    fn drop_expired(&mut self, now: u64, dropped: &mut Dropped<K, V>) -> usize {
        let mut count = 0;
        while let Some(&Reverse((deadline, stamp, slot))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let current = self.slots[slot as usize]
                .as_ref()
                .is_some_and(|entry| entry.stamp == stamp);
            if current {
                self.remove_slot(slot, dropped);
                self.stats.expirations += 1;
                count += 1;
            }
        }
        if self.deadlines.len() > 2 * self.timed + 64 {
            let slots = &self.slots;
            self.deadlines = slots
                .iter()
                .enumerate()
                .filter_map(|(slot, entry)| {
                    let entry = entry.as_ref()?;
                    (entry.expires != 0).then_some(Reverse((
                        entry.expires,
                        entry.stamp,
                        slot as u32,
                    )))
                })
                .collect();
        }
        count
    }

    /// Evicts one entry: from the small FIFO while it holds its share (or the main FIFO is
    /// empty), else from the main FIFO.
    fn evict(&mut self, now: &mut Now<'_>, dropped: &mut Dropped<K, V>) {
        loop {
            let evicted = if self.small.len >= self.small_target || self.main.len == 0 {
                self.evict_small(now, dropped)
            } else {
                self.evict_main(now, dropped)
            };
            if evicted {
                return;
            }
        }
    }

    fn evict_small(&mut self, now: &mut Now<'_>, dropped: &mut Dropped<K, V>) -> bool {
        while self.small.tail != NIL {
            let slot = self.small.tail;
            if self.is_expired(slot, now) {
                self.remove_slot(slot, dropped);
                self.stats.expirations += 1;
                return true;
            }
            let entry = self.entry(slot);
            if entry.frequency > 0 {
                self.unlink(slot);
                let entry = self.entry_mut(slot);
                entry.frequency = 0;
                entry.segment = Segment::Main;
                self.push_head(slot);
            } else {
                self.ghost.remember(entry.hash);
                self.remove_slot(slot, dropped);
                self.stats.evictions += 1;
                return true;
            }
        }
        false
    }

    fn evict_main(&mut self, now: &mut Now<'_>, dropped: &mut Dropped<K, V>) -> bool {
        while self.main.tail != NIL {
            let slot = self.main.tail;
            if self.is_expired(slot, now) {
                self.remove_slot(slot, dropped);
                self.stats.expirations += 1;
                return true;
            }
            let entry = self.entry_mut(slot);
            if entry.frequency > 0 {
                entry.frequency -= 1;
                self.unlink(slot);
                self.push_head(slot);
            } else {
                self.remove_slot(slot, dropped);
                self.stats.evictions += 1;
                return true;
            }
        }
        false
    }

    fn list_mut(&mut self, segment: Segment) -> &mut List {
        match segment {
            Segment::Small => &mut self.small,
            Segment::Main => &mut self.main,
        }
    }

    fn push_head(&mut self, slot: u32) {
        let segment = self.entry(slot).segment;
        let head = self.list_mut(segment).head;
        {
            let entry = self.entry_mut(slot);
            entry.newer = NIL;
            entry.older = head;
        }
        if head != NIL {
            self.entry_mut(head).newer = slot;
        }
        let list = self.list_mut(segment);
        list.head = slot;
        if list.tail == NIL {
            list.tail = slot;
        }
        list.len += 1;
    }

    fn unlink(&mut self, slot: u32) {
        let (segment, newer, older) = {
            let entry = self.entry(slot);
            (entry.segment, entry.newer, entry.older)
        };
        if newer != NIL {
            self.entry_mut(newer).older = older;
        }
        if older != NIL {
            self.entry_mut(older).newer = newer;
        }
        let list = self.list_mut(segment);
        if list.head == slot {
            list.head = older;
        }
        if list.tail == slot {
            list.tail = newer;
        }
        list.len -= 1;
    }

    fn remove_slot(&mut self, slot: u32, dropped: &mut Dropped<K, V>) {
        self.unlink(slot);
        let entry = self.slots[slot as usize]
            .take()
            .expect("a linked slot holds an entry");
        if let Ok(found) = self
            .table
            .find_entry(entry.hash, |&(_, candidate)| candidate == slot)
        {
            found.remove();
        }
        if entry.expires != 0 {
            self.timed -= 1;
        }
        self.free.push(slot);
        dropped.keys.push(entry.key);
        dropped.values.push(entry.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualTime;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn hash(key: u64) -> u64 {
        key.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    struct Fixture {
        cache: S3Fifo<u64, String>,
        time: Arc<ManualTime>,
        dropped: Dropped<u64, String>,
    }

    impl Fixture {
        fn new(capacity: usize) -> Self {
            let time = Arc::new(ManualTime::new(0));
            Fixture {
                cache: S3Fifo::new(capacity, Clock::Manual(time.clone())),
                time,
                dropped: Dropped::default(),
            }
        }

        fn set(&mut self, key: u64, ttl: Option<u64>) {
            self.cache.insert(
                key,
                format!("v{key}"),
                hash(key),
                ttl,
                |k| *k == key,
                &mut self.dropped,
            );
        }

        fn get(&mut self, key: u64) -> Option<String> {
            self.cache
                .get(hash(key), |k| *k == key, &mut self.dropped)
                .cloned()
        }
    }

    #[test]
    fn stores_replaces_and_removes() {
        let mut f = Fixture::new(10);
        f.set(1, None);
        assert_eq!(f.get(1).as_deref(), Some("v1"));
        f.cache
            .insert(1, "new".into(), hash(1), None, |k| *k == 1, &mut f.dropped);
        assert_eq!(f.get(1).as_deref(), Some("new"));
        assert_eq!(f.dropped.values.as_slice(), ["v1".to_owned()]);
        assert_eq!(f.cache.len(), 1);
        assert!(f.cache.remove(hash(1), |k| *k == 1, &mut f.dropped));
        assert!(!f.cache.remove(hash(1), |k| *k == 1, &mut f.dropped));
        assert_eq!(f.get(1), None);
        let stats = f.cache.stats();
        assert_eq!(
            (
                stats.hits,
                stats.misses,
                stats.inserts,
                stats.updates,
                stats.deletes
            ),
            (2, 1, 1, 1, 1)
        );
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let mut f = Fixture::new(50);
        for key in 0..1000 {
            f.set(key, None);
            if key % 3 == 0 {
                f.get(key / 2);
            }
            assert!(f.cache.len() <= 50);
        }
        assert_eq!(f.cache.len(), 50);
        assert_eq!(f.cache.stats().evictions, 950);
        // Every evicted entry was handed back.
        assert_eq!(f.dropped.values.len(), 950);
    }

    #[test]
    fn a_scan_of_new_keys_does_not_flush_the_popular_ones() {
        let mut f = Fixture::new(100);
        for key in 0..50 {
            f.set(key, None);
        }
        for _ in 0..3 {
            for key in 0..50 {
                f.get(key);
            }
        }
        for key in 1000..1500 {
            f.set(key, None);
        }
        let kept = (0..50).filter(|&key| f.get(key).is_some()).count();
        assert_eq!(kept, 50, "the popular keys survive a scan");
    }

    #[test]
    fn a_key_evicted_from_the_small_queue_and_back_soon_goes_to_main() {
        let mut f = Fixture::new(20);
        f.set(7, None);
        for key in 100..130 {
            f.set(key, None);
        }
        assert_eq!(f.get(7), None);
        f.set(7, None);
        let slot = f.cache.find(hash(7), |k| *k == 7).unwrap();
        assert_eq!(f.cache.entry(slot).segment, Segment::Main);
    }

    #[test]
    fn entries_expire_on_read_and_on_writes() {
        let mut f = Fixture::new(10);
        f.set(1, Some(1_000));
        f.set(2, Some(5_000));
        f.set(3, None);
        f.time.advance(1_000);
        assert_eq!(f.get(1), None);
        assert_eq!(f.cache.stats().expirations, 1);
        f.time.advance(4_000);
        // A write drops what expired before it looks for room.
        f.set(4, None);
        assert_eq!(f.cache.len(), 2);
        assert_eq!(f.cache.stats().expirations, 2);
        assert_eq!(f.get(3).as_deref(), Some("v3"));
    }

    #[test]
    fn rewriting_a_key_moves_or_clears_its_deadline() {
        let mut f = Fixture::new(10);
        f.set(1, Some(1_000));
        f.set(1, None);
        f.time.advance(2_000);
        assert_eq!(f.get(1).as_deref(), Some("v1"));
        f.set(1, Some(1_000));
        f.set(1, Some(10_000));
        f.time.advance(5_000);
        assert_eq!(f.cache.expire(&mut f.dropped), 0);
        assert_eq!(f.get(1).as_deref(), Some("v1"));
        f.time.advance(5_000);
        assert_eq!(f.cache.expire(&mut f.dropped), 1);
        assert!(f.cache.is_empty());
    }

    #[test]
    fn stale_deadlines_do_not_pile_up() {
        let mut f = Fixture::new(4);
        for round in 0..10_000u64 {
            f.set(round % 4, Some(1_000_000));
        }
        assert!(f.cache.deadlines.len() <= 2 * f.cache.timed + 64);
    }

    #[test]
    fn expired_entries_are_evicted_before_live_ones() {
        let mut f = Fixture::new(3);
        f.set(1, None);
        f.get(1);
        f.set(2, Some(10));
        f.set(3, None);
        f.get(3);
        f.time.advance(10);
        f.cache.deadlines.clear(); // only the eviction path can find it now
        f.set(4, None);
        assert_eq!(f.get(2), None);
        assert!(f.get(1).is_some() && f.get(3).is_some() && f.get(4).is_some());
        assert_eq!(f.cache.stats().evictions, 0);
    }

    #[test]
    fn clear_hands_everything_back() {
        let mut f = Fixture::new(10);
        for key in 0..10 {
            f.set(key, Some(100));
        }
        f.cache.clear(&mut f.dropped);
        assert_eq!(f.dropped.keys.len(), 10);
        assert!(f.cache.is_empty());
        f.set(3, None);
        assert_eq!(f.get(3).as_deref(), Some("v3"));
    }

    #[test]
    fn agrees_with_a_map_on_what_it_still_holds() {
        // A small xorshift keeps the test deterministic without a dependency.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut f = Fixture::new(32);
        let mut model: HashMap<u64, String> = HashMap::new();
        for step in 0..20_000u64 {
            let key = next() % 100;
            match next() % 4 {
                0 | 1 => {
                    let value = format!("{key}@{step}");
                    f.cache.insert(
                        key,
                        value.clone(),
                        hash(key),
                        None,
                        |k| *k == key,
                        &mut f.dropped,
                    );
                    model.insert(key, value);
                }
                2 => {
                    if let Some(value) = f.get(key) {
                        assert_eq!(model.get(&key), Some(&value));
                    }
                }
                _ => {
                    f.cache.remove(hash(key), |k| *k == key, &mut f.dropped);
                    model.remove(&key);
                }
            }
            assert!(f.cache.len() <= 32);
            assert_eq!(f.cache.small.len + f.cache.main.len, f.cache.table.len());
        }
    }
}
