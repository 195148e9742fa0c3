//! The write-behind queue: a bounded set of pending writes (a put or a delete per key) that
//! producers fill and a flusher drains in batches.
//!
//! - **Coalescing.** Only the newest pending write of a key is kept: a second write to a key
//!   that is still waiting replaces the first in place (it keeps the first one's turn).
//! - **One write per key in flight.** A key whose earlier write the flusher has taken and not
//!   yet settled is skipped by `take` until that write settles, so a database never sees two
//!   writes of one key at once, nor an older one overtake a newer one.
//! - **Retries and dead letters.** A failed write goes back to the front of the queue, unless a
//!   newer write of its key is already waiting (which supersedes it); after `max_attempts` it
//!   is handed back as a dead letter instead, so one poison entry cannot stall the rest.
//! - **Bounded.** Pending and in-flight writes together never exceed the capacity; a producer
//!   that finds it full waits (up to its deadline) or is refused.
//! - **Batches by size and time.** `take` may linger: it waits for a full batch, but never
//!   holds the oldest waiting write back longer than the linger it is given (Kafka's
//!   `linger.ms`, Hazelcast's write delay), so writes coalesce and share transactions. A retry,
//!   writes left over from a full batch, a closed queue or a thread waiting for the queue to
//!   drain end the lingering at once.
//!
//! Plain Rust: keys are any `Hash + Eq + Clone`, values anything `Clone` (the binding stores
//! reference-counted Python objects, so a clone never needs the GIL). Every call that looks a
//! key up takes any borrowed form of it (`Equivalent`), so a caller builds an owned key only
//! when a new key is queued. A write replaced by a newer one is dropped after the lock is
//! released: dropping a value may run arbitrary code (a Python `__del__`) that must not find
//! the queue locked.

use crate::clock::instant_after;
use hashbrown::{Equivalent, HashMap};
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// Seeded per process (foldhash), so keys chosen by users cannot force collisions; several
// times cheaper than SipHash on the short keys a cache sees.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A pending write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<V> {
    Put(V),
    Delete,
}

/// A write handed to the flusher: its key, what to do, and how many times it failed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken<K, V> {
    pub key: K,
    pub op: Op<V>,
    pub attempts: u32,
}

/// Why an enqueue was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue stayed full until the deadline (or the caller would not wait).
    Full,
    /// The queue was closed.
    Closed,
}

/// What became of a failed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed<V> {
    /// Queued again, first in line.
    Retried,
    /// A newer write of the key was already waiting; the failed one is dropped.
    Superseded,
    /// Out of attempts: the write, for the dead-letter handler.
    DeadLetter(Op<V>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub enqueued: u64,
    pub coalesced: u64,
    pub flushed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub superseded: u64,
    /// Writes waiting or in flight now.
    pub depth: usize,
    pub in_flight: usize,
    pub high_water: usize,
    pub capacity: usize,
}

struct Slot<V> {
    op: Op<V>,
    attempts: u32,
}

struct State<K, V> {
    /// Keys waiting, in turn order; exactly the keys of `pending`.
    order: VecDeque<K>,
    pending: FastMap<K, Slot<V>>,
    in_flight: FastMap<K, Slot<V>>,
    closed: bool,
    stats: Stats,
    /// Writes accepted per stripe of keys (by a fixed hash), so a reader can tell that a write
    /// of its key came while it read, without the queue remembering every key ever written.
    writes_by_stripe: Box<[u64; WRITE_STRIPES]>,
    /// When the oldest write now waiting was queued (None while none waits): a lingering
    /// `take` holds it back no longer than its linger from then.
    waiting_since: Option<Instant>,
    /// The writes waiting are due at once: a retry, or what a full batch left behind.
    due_now: bool,
    /// The batch size a lingering `take` waits for (0 when none lingers), so a producer wakes
    /// it only when that many writes wait, not on every write.
    lingering_for: usize,
    /// Threads waiting on each condition, so a change wakes (a system call) only when needed.
    waiting_for_space: usize,
    waiting_for_work: usize,
    waiting_for_idle: usize,
}

pub struct WriteQueue<K, V> {
    state: Mutex<State<K, V>>,
    space: Condvar,
    work: Condvar,
    idle: Condvar,
    capacity: usize,
    max_attempts: u32,
}

impl<K: Hash + Eq + Clone + Send, V: Clone + Send> WriteQueue<K, V> {
    /// A queue holding at most `capacity` writes (waiting and in flight), retrying a failed
    /// write until it has failed `max_attempts` times.
    pub fn new(capacity: usize, max_attempts: u32) -> Self {
        assert!(capacity > 0 && max_attempts > 0);
        WriteQueue {
            state: Mutex::new(State {
                order: VecDeque::new(),
                pending: FastMap::default(),
                in_flight: FastMap::default(),
                closed: false,
                stats: Stats {
                    capacity,
                    ..Stats::default()
                },
                writes_by_stripe: Box::new([0; WRITE_STRIPES]),
                waiting_since: None,
                due_now: false,
                lingering_for: 0,
                waiting_for_space: 0,
                waiting_for_work: 0,
                waiting_for_idle: 0,
            }),
            space: Condvar::new(),
            work: Condvar::new(),
            idle: Condvar::new(),
            capacity,
            max_attempts,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a write without waiting: `Err(Full)` when there is no room for a new key.
    pub fn try_enqueue(&self, key: K, op: Op<V>) -> Result<(), Refused> {
        self.try_enqueue_by(&key, op, K::clone)
    }

    /// `try_enqueue` by a borrowed form of the key; `own` makes the owned key, only when the
    /// key is new to the queue.
    pub fn try_enqueue_by<Q: Hash + Equivalent<K> + ?Sized>(
        &self,
        key: &Q,
        op: Op<V>,
        own: impl FnOnce(&Q) -> K,
    ) -> Result<(), Refused> {
        let mut state = self.lock();
        let outcome = self.insert(&mut state, key, op, own);
        drop(state);
        outcome.map(drop)
    }

    /// Queues a write, waiting for room until `deadline` (None: as long as it takes).
    /// `wait` runs each bounded wait (the binding releases the GIL there and checks for
    /// signals between slices).
    pub fn enqueue(
        &self,
        key: K,
        op: Op<V>,
        deadline: Option<Instant>,
        wait: impl FnMut(&(dyn Fn(Duration) + Sync)) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        self.enqueue_by(&key, op, K::clone, deadline, wait)
    }

    /// `enqueue` by a borrowed form of the key, as `try_enqueue_by`.
    pub fn enqueue_by<Q: Hash + Equivalent<K> + ?Sized>(
        &self,
        key: &Q,
        op: Op<V>,
        own: impl Fn(&Q) -> K,
        deadline: Option<Instant>,
        mut wait: impl FnMut(&(dyn Fn(Duration) + Sync)) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        loop {
            let mut state = self.lock();
            match self.insert(&mut state, key, op.clone(), &own) {
                Err(Refused::Full) => {}
                outcome => {
                    drop(state);
                    return outcome.map(drop);
                }
            }
            drop(state);
            let remaining = match deadline {
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Refused::Full);
                    }
                    (deadline - now).min(Duration::from_millis(50))
                }
                None => Duration::from_millis(50),
            };
            wait(&|slice| self.wait_for_space(slice.min(remaining)))?;
        }
    }

    fn wait_for_space(&self, slice: Duration) {
        let mut state = self.lock();
        if self.has_room(&state) || state.closed {
            return;
        }
        state.waiting_for_space += 1;
        let mut state = self
            .space
            .wait_timeout(state, slice)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        state.waiting_for_space -= 1;
    }

    fn has_room(&self, state: &State<K, V>) -> bool {
        state.pending.len() + state.in_flight.len() < self.capacity
    }

    /// Queues `op` for `key`; the write it replaced, if any, for the caller to drop once the
    /// lock is released.
    fn insert<Q: Hash + Equivalent<K> + ?Sized>(
        &self,
        state: &mut State<K, V>,
        key: &Q,
        op: Op<V>,
        own: impl FnOnce(&Q) -> K,
    ) -> Result<Option<Op<V>>, Refused> {
        if state.closed {
            return Err(Refused::Closed);
        }
        if let Some(slot) = state.pending.get_mut(key) {
            // Coalesced: the newer write takes the older one's place and turn.
            let replaced = std::mem::replace(&mut slot.op, op);
            slot.attempts = 0;
            state.writes_by_stripe[stripe(key)] += 1;
            state.stats.enqueued += 1;
            state.stats.coalesced += 1;
            return Ok(Some(replaced));
        }
        if !self.has_room(state) {
            return Err(Refused::Full);
        }
        state.writes_by_stripe[stripe(key)] += 1;
        if state.pending.is_empty() {
            state.waiting_since = Some(Instant::now());
        }
        let key = own(key);
        state.pending.insert(key.clone(), Slot { op, attempts: 0 });
        state.order.push_back(key);
        state.stats.enqueued += 1;
        self.note_depth(state);
        if state.waiting_for_work > 0
            || (state.lingering_for > 0 && state.pending.len() >= state.lingering_for)
        {
            self.work.notify_one();
        }
        Ok(None)
    }

    fn note_depth(&self, state: &mut State<K, V>) {
        let depth = state.pending.len() + state.in_flight.len();
        state.stats.depth = depth;
        state.stats.in_flight = state.in_flight.len();
        state.stats.high_water = state.stats.high_water.max(depth);
    }

    /// Takes up to `max` waiting writes, oldest turn first, skipping keys with a write in
    /// flight; waits up to `timeout` when there are none. With a `linger`, it waits for `max`
    /// writes, but no longer than `linger` after the oldest of them was queued (see the
    /// module's notes for what ends that wait early). Returns nothing once the queue is
    /// closed and empty.
    pub fn take(&self, max: usize, timeout: Duration, linger: Duration) -> Vec<Taken<K, V>> {
        let deadline = instant_after(Instant::now(), timeout);
        let mut state = self.lock();
        loop {
            if let Some(due) = self.lingers_until(&state, max, linger) {
                let now = Instant::now();
                if now < due {
                    state.lingering_for = max;
                    state = self
                        .work
                        .wait_timeout(state, due - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    state.lingering_for = 0;
                    continue;
                }
            }
            let taken = self.take_now(&mut state, max);
            if !taken.is_empty() || state.closed {
                return taken;
            }
            let now = Instant::now();
            if now >= deadline {
                return taken;
            }
            state.waiting_for_work += 1;
            state = self
                .work
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            state.waiting_for_work -= 1;
        }
    }

    /// When a `take` may stop lingering for company, or None when it must not linger now.
    fn lingers_until(&self, state: &State<K, V>, max: usize, linger: Duration) -> Option<Instant> {
        let lingers = !linger.is_zero()
            && !state.pending.is_empty()
            && state.pending.len() < max
            && !state.due_now
            && !state.closed
            && state.waiting_for_idle == 0;
        lingers.then(|| {
            state
                .waiting_since
                .map_or_else(Instant::now, |since| instant_after(since, linger))
        })
    }

    fn take_now(&self, state: &mut State<K, V>, max: usize) -> Vec<Taken<K, V>> {
        let mut taken = Vec::new();
        let mut skipped = VecDeque::new();
        while taken.len() < max {
            let Some(key) = state.order.pop_front() else {
                break;
            };
            if state.in_flight.contains_key(&key) {
                skipped.push_back(key);
                continue;
            }
            let slot = state.pending.remove(&key).expect("order and pending agree");
            taken.push(Taken {
                key: key.clone(),
                op: slot.op.clone(),
                attempts: slot.attempts,
            });
            state.in_flight.insert(key, slot);
        }
        // Keys skipped for a write in flight keep their turn, ahead of the rest.
        while let Some(key) = skipped.pop_back() {
            state.order.push_front(key);
        }
        // What a batch leaves behind has waited its turn already, so it is due at once.
        state.due_now = !state.pending.is_empty();
        if state.pending.is_empty() {
            state.waiting_since = None;
        }
        self.note_depth(state);
        taken
    }

    /// Settles writes the database took: they leave the queue.
    pub fn done<'a, Q: Hash + Equivalent<K> + ?Sized + 'a>(
        &self,
        keys: impl IntoIterator<Item = &'a Q>,
    ) -> usize {
        let mut state = self.lock();
        let mut settled = Vec::new();
        for key in keys {
            if let Some(slot) = state.in_flight.remove(key) {
                settled.push(slot);
            }
        }
        state.stats.flushed += settled.len() as u64;
        self.settled(state);
        settled.len()
    }

    /// Settles a write that failed: retried first in line, dropped for a newer one, or (out
    /// of attempts) returned as a dead letter.
    pub fn failed<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<Failed<V>> {
        let mut state = self.lock();
        let (owned, mut slot) = state.in_flight.remove_entry(key)?;
        slot.attempts += 1;
        let outcome = if state.pending.contains_key(key) {
            state.stats.superseded += 1;
            Failed::Superseded
        } else if slot.attempts >= self.max_attempts {
            state.stats.dead_lettered += 1;
            Failed::DeadLetter(slot.op)
        } else {
            state.stats.retried += 1;
            if state.pending.is_empty() {
                state.waiting_since = Some(Instant::now());
            }
            state.pending.insert(owned.clone(), slot);
            state.order.push_front(owned);
            // The caller paces retries (its backoff); the retry must not linger on top of it.
            state.due_now = true;
            if state.waiting_for_work > 0 || state.lingering_for > 0 {
                self.work.notify_one();
            }
            Failed::Retried
        };
        self.settled(state);
        Some(outcome)
    }

    fn settled(&self, mut state: MutexGuard<'_, State<K, V>>) {
        self.note_depth(&mut state);
        let room = state.waiting_for_space > 0 && self.has_room(&state);
        let empty =
            state.waiting_for_idle > 0 && state.pending.is_empty() && state.in_flight.is_empty();
        drop(state);
        if room {
            self.space.notify_all();
        }
        if empty {
            self.idle.notify_all();
        }
    }

    /// The newest write of a key not yet settled: what a read must see before the database.
    pub fn read<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<Op<V>> {
        let state = self.lock();
        state
            .pending
            .get(key)
            .or_else(|| state.in_flight.get(key))
            .map(|slot| slot.op.clone())
    }

    /// Waits until nothing is waiting or in flight, up to `timeout`; true if so.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = instant_after(Instant::now(), timeout);
        let mut state = self.lock();
        loop {
            if state.pending.is_empty() && state.in_flight.is_empty() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if state.lingering_for > 0 {
                // A drain is wanted: the lingering batch goes out now.
                self.work.notify_all();
            }
            state.waiting_for_idle += 1;
            state = self
                .idle
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            state.waiting_for_idle -= 1;
        }
    }

    /// Refuses new writes; what is queued can still be taken and settled.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        drop(state);
        self.space.notify_all();
        self.work.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Every write not yet settled, waiting ones in turn order, then those in flight.
    pub fn unsettled(&self) -> Vec<(K, Op<V>)> {
        let state = self.lock();
        let waiting = state
            .order
            .iter()
            .map(|key| (key.clone(), state.pending[key].op.clone()));
        let flying = state
            .in_flight
            .iter()
            .map(|(key, slot)| (key.clone(), slot.op.clone()));
        waiting.chain(flying).collect()
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// A count that moves whenever a write of `key` is accepted (and, rarely, of another key
    /// sharing its stripe).
    pub fn writes_to<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.lock().writes_by_stripe[stripe(key)]
    }
}

const WRITE_STRIPES: usize = 1024;

fn stripe<Q: Hash + ?Sized>(key: &Q) -> usize {
    (foldhash::fast::FixedState::default().hash_one(key) as usize) % WRITE_STRIPES
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn never_wait(_: &(dyn Fn(Duration) + Sync)) -> Result<(), Refused> {
        Err(Refused::Full)
    }

    fn keys<K: Copy, V>(taken: &[Taken<K, V>]) -> Vec<K> {
        taken.iter().map(|t| t.key).collect()
    }

    #[test]
    fn the_newest_write_of_a_key_keeps_the_first_ones_turn() {
        let queue = WriteQueue::new(10, 3);
        queue.try_enqueue("a", Op::Put(1)).unwrap();
        queue.try_enqueue("b", Op::Put(1)).unwrap();
        queue.try_enqueue("a", Op::Put(2)).unwrap();
        queue.try_enqueue("a", Op::Delete).unwrap();
        let taken = queue.take(10, Duration::ZERO, Duration::ZERO);
        assert_eq!(keys(&taken), ["a", "b"]);
        assert_eq!(taken[0].op, Op::Delete);
        let stats = queue.stats();
        assert_eq!((stats.enqueued, stats.coalesced), (4, 2));
    }

    #[test]
    fn a_key_in_flight_is_not_taken_again_until_it_settles() {
        let queue = WriteQueue::new(10, 3);
        queue.try_enqueue("a", Op::Put(1)).unwrap();
        assert_eq!(keys(&queue.take(10, Duration::ZERO, Duration::ZERO)), ["a"]);
        queue.try_enqueue("a", Op::Put(2)).unwrap();
        queue.try_enqueue("b", Op::Put(1)).unwrap();
        assert_eq!(keys(&queue.take(10, Duration::ZERO, Duration::ZERO)), ["b"]);
        assert_eq!(
            queue.read(&"a"),
            Some(Op::Put(2)),
            "reads see the newest write"
        );
        queue.done([&"a"]);
        let again = queue.take(10, Duration::ZERO, Duration::ZERO);
        assert_eq!(again[0].op, Op::Put(2));
    }

    #[test]
    fn failures_retry_first_then_become_dead_letters() {
        let queue = WriteQueue::new(10, 2);
        queue.try_enqueue("bad", Op::Put(1)).unwrap();
        queue.try_enqueue("good", Op::Put(1)).unwrap();
        assert_eq!(
            keys(&queue.take(1, Duration::ZERO, Duration::ZERO)),
            ["bad"]
        );
        assert_eq!(queue.failed(&"bad"), Some(Failed::Retried));
        let taken = queue.take(10, Duration::ZERO, Duration::ZERO);
        assert_eq!(keys(&taken), ["bad", "good"]);
        assert_eq!(taken[0].attempts, 1);
        assert_eq!(queue.failed(&"bad"), Some(Failed::DeadLetter(Op::Put(1))));
        queue.done([&"good"]);
        assert!(queue.wait_idle(Duration::ZERO));
        let stats = queue.stats();
        assert_eq!(
            (
                stats.retried,
                stats.dead_lettered,
                stats.flushed,
                stats.depth
            ),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn a_newer_write_supersedes_a_failed_one() {
        let queue = WriteQueue::new(10, 5);
        queue.try_enqueue("a", Op::Put(1)).unwrap();
        queue.take(10, Duration::ZERO, Duration::ZERO);
        queue.try_enqueue("a", Op::Put(2)).unwrap();
        assert_eq!(queue.failed(&"a"), Some(Failed::Superseded));
        assert_eq!(
            queue.take(10, Duration::ZERO, Duration::ZERO)[0].op,
            Op::Put(2)
        );
    }

    #[test]
    fn a_full_queue_refuses_new_keys_but_coalesces() {
        let queue = WriteQueue::new(2, 1);
        queue.try_enqueue("a", Op::Put(1)).unwrap();
        queue.try_enqueue("b", Op::Put(1)).unwrap();
        assert_eq!(queue.try_enqueue("c", Op::Put(1)), Err(Refused::Full));
        queue.try_enqueue("a", Op::Put(2)).unwrap();
        assert_eq!(
            queue.enqueue("c", Op::Put(1), None, never_wait),
            Err(Refused::Full)
        );
        let deadline = Some(Instant::now() + Duration::from_millis(20));
        let started = Instant::now();
        assert_eq!(
            queue.enqueue("c", Op::Put(1), deadline, |wait| {
                wait(Duration::from_millis(5));
                Ok(())
            }),
            Err(Refused::Full)
        );
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(queue.stats().high_water, 2);
    }

    #[test]
    fn a_waiting_producer_gets_in_when_a_write_settles() {
        let queue = Arc::new(WriteQueue::new(1, 1));
        queue.try_enqueue(1u32, Op::Put(1u32)).unwrap();
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                queue.enqueue(2, Op::Put(2), None, |wait| {
                    wait(Duration::from_millis(50));
                    Ok(())
                })
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        let taken = queue.take(1, Duration::ZERO, Duration::ZERO);
        queue.done(taken.iter().map(|t| &t.key));
        producer.join().unwrap().unwrap();
        assert_eq!(
            queue.take(1, Duration::from_secs(1), Duration::ZERO)[0].key,
            2
        );
    }

    #[test]
    fn closing_refuses_writes_and_ends_waiting() {
        let queue = WriteQueue::new(4, 1);
        queue.try_enqueue("a", Op::Put(1)).unwrap();
        queue.close();
        assert_eq!(queue.try_enqueue("b", Op::Put(1)), Err(Refused::Closed));
        assert_eq!(
            keys(&queue.take(10, Duration::from_secs(5), Duration::ZERO)),
            ["a"]
        );
        let started = Instant::now();
        assert!(queue
            .take(10, Duration::from_secs(5), Duration::ZERO)
            .is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_lingering_take_holds_a_lone_write_no_longer_than_its_linger() {
        let queue = WriteQueue::new(100, 3);
        queue.try_enqueue(1u32, Op::Put(1u32)).unwrap();
        let started = Instant::now();
        let taken = queue.take(10, Duration::from_secs(5), Duration::from_millis(40));
        let waited = started.elapsed();
        assert_eq!(keys(&taken), [1]);
        assert!(waited >= Duration::from_millis(35), "left after {waited:?}");
        assert!(waited < Duration::from_secs(2), "left after {waited:?}");
    }

    #[test]
    fn the_linger_counts_from_the_oldest_write_not_from_the_take() {
        let queue = WriteQueue::new(100, 3);
        queue.try_enqueue(1u32, Op::Put(1u32)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        queue.take(10, Duration::from_secs(5), Duration::from_millis(250));
        // Counted from the take, it would wait 250 ms.
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn a_full_batch_ends_the_linger() {
        let queue = Arc::new(WriteQueue::new(100, 3));
        queue.try_enqueue(0u32, Op::Put(0u32)).unwrap();
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                for key in 1..4 {
                    queue.try_enqueue(key, Op::Put(key)).unwrap();
                }
            })
        };
        let started = Instant::now();
        let taken = queue.take(4, Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(taken.len(), 4);
        assert!(started.elapsed() < Duration::from_secs(5));
        producer.join().unwrap();
    }

    #[test]
    fn a_drain_closing_or_a_retry_ends_the_linger() {
        let linger = Duration::from_secs(30);
        // A thread waiting for the queue to drain.
        let queue = Arc::new(WriteQueue::new(100, 3));
        queue.try_enqueue(1u32, Op::Put(1u32)).unwrap();
        let drainer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.wait_idle(Duration::from_secs(10)))
        };
        let taken = queue.take(10, Duration::from_secs(5), linger);
        queue.done(taken.iter().map(|t| &t.key));
        assert!(drainer.join().unwrap());
        // Closing.
        let queue = Arc::new(WriteQueue::new(100, 3));
        queue.try_enqueue(1u32, Op::Put(1u32)).unwrap();
        let closer = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                queue.close();
            })
        };
        let started = Instant::now();
        assert_eq!(keys(&queue.take(10, Duration::from_secs(5), linger)), [1]);
        assert!(started.elapsed() < Duration::from_secs(5));
        closer.join().unwrap();
        // A retry (the caller paces it) and what a full batch leaves are due at once.
        let queue = WriteQueue::new(100, 3);
        for key in 0..3u32 {
            queue.try_enqueue(key, Op::Put(key)).unwrap();
        }
        let started = Instant::now();
        assert_eq!(keys(&queue.take(2, Duration::ZERO, linger)), [0, 1]);
        assert_eq!(keys(&queue.take(2, Duration::ZERO, linger)), [2]);
        assert_eq!(queue.failed(&2), Some(Failed::Retried));
        assert_eq!(keys(&queue.take(2, Duration::ZERO, linger)), [2]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn huge_waits_do_not_overflow() {
        let queue: WriteQueue<u32, u32> = WriteQueue::new(4, 1);
        queue.try_enqueue(1, Op::Put(1)).unwrap();
        assert_eq!(keys(&queue.take(4, Duration::MAX, Duration::ZERO)), [1]);
        queue.done([&1]);
        assert!(queue.wait_idle(Duration::MAX));
        queue.close();
        assert!(queue.take(4, Duration::MAX, Duration::MAX).is_empty());
    }

    #[test]
    fn threads_lose_nothing_and_never_fly_a_key_twice() {
        let queue = Arc::new(WriteQueue::new(64, 3));
        let producers: Vec<_> = (0..4u32)
            .map(|t| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    for n in 0..2000u32 {
                        let key = n % 50;
                        queue
                            .enqueue(key, Op::Put(t * 10_000 + n), None, |wait| {
                                wait(Duration::from_millis(5));
                                Ok(())
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        let mut last = HashMap::new();
        let flusher = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let mut seen: HashMap<u32, u32> = HashMap::new();
                loop {
                    let taken = queue.take(16, Duration::from_millis(50), Duration::ZERO);
                    if taken.is_empty() && queue.is_closed() {
                        return seen;
                    }
                    let mut flying = std::collections::HashSet::new();
                    for item in &taken {
                        assert!(flying.insert(item.key), "a key twice in one batch");
                        if let Op::Put(value) = item.op {
                            seen.insert(item.key, value);
                        }
                    }
                    queue.done(taken.iter().map(|t| &t.key));
                }
            })
        };
        for producer in producers {
            producer.join().unwrap();
        }
        assert!(queue.wait_idle(Duration::from_secs(10)));
        queue.close();
        last.extend(flusher.join().unwrap());
        assert_eq!(last.len(), 50);
        let stats = queue.stats();
        assert_eq!(stats.enqueued, 8000);
        assert_eq!(stats.flushed + stats.coalesced, 8000);
        assert!(stats.high_water <= 64);
    }

    #[test]
    fn the_write_count_of_a_key_moves_with_its_writes_only() {
        let queue: WriteQueue<u32, u32> = WriteQueue::new(100, 3);
        let before = queue.writes_to(&7);
        queue.try_enqueue(7, Op::Put(1)).unwrap();
        queue.try_enqueue(7, Op::Delete).unwrap();
        assert_eq!(queue.writes_to(&7), before + 2);
        let others: Vec<u32> = (100..200).filter(|k| stripe(k) != stripe(&7u32)).collect();
        for key in &others {
            queue.try_enqueue(*key, Op::Put(0)).ok();
        }
        assert_eq!(queue.writes_to(&7), before + 2);
    }
}
