//! The connection pool's bookkeeping: plain Rust, generic over the connection type.
//!
//! The core never creates, checks, resets or closes a connection: those are the caller's work
//! (Python code, which must run outside any lock). It decides, under one short-held mutex, who
//! gets which idle connection, who may create one, which connections are due to be closed, and
//! who waits. Every method that retires connections pushes them onto a `retired` list that the
//! caller closes after the lock is released.
//!
//! Hand-off is fair: a returned connection (or a freed slot) goes straight to the longest waiter,
//! so a newcomer never overtakes someone who waited. Idle connections are reused newest first
//! (LIFO), which keeps the working set warm and lets the surplus age out under `max_idle`.

use crate::clock::Clock;
use crate::errors::{Error, Result};
use crate::jitter::JitterSource;
pub use crate::waiting::WaitSlice;
use crate::waiting::{Signal, Wake};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the pool needs to know of a connection: a stable identity while it is alive, so
/// `release(conn)` finds its record. The pool keeps the connection alive while it is borrowed,
/// so an address-based identity cannot be reused by another object in the meantime.
pub trait Connection {
    fn identity(&self) -> usize;
}

/// Hashes an identity (an address, already unique) with one multiply instead of SipHash: the
/// borrowed map is touched on every checkout and checkin, and its keys are not attacker-chosen.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.0 = (value as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(32);
    }
}

type IdentityMap<V> = HashMap<usize, V, BuildHasherDefault<IdentityHasher>>;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Connections kept open even when idle (refilled in the background).
    pub min_size: u32,
    /// The most connections open at once, borrowed, idle or being created.
    pub max_size: u32,
    /// How many callers may wait at once; 0 means no bound.
    pub max_waiting: u32,
    /// The longest a caller waits by default; `None` waits as long as it takes.
    pub timeout: Option<Duration>,
    /// A connection older than this is closed (when idle, or when it comes back).
    pub max_lifetime_nanos: Option<u64>,
    /// Each connection's lifetime is shortened by up to this fraction, drawn at random, so
    /// connections opened together do not all expire together.
    pub lifetime_jitter: f64,
    /// An idle connection unused for this long is closed while the pool is above `min_size`.
    pub max_idle_nanos: Option<u64>,
    /// Whether the caller checks connections on checkout (it has a check to run).
    pub checks: bool,
    /// A connection used more recently than this is handed out without a check.
    pub check_interval_nanos: u64,
    /// A connection borrowed for longer than this is reported as a possible leak.
    pub leak_threshold_nanos: Option<u64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_size: 0,
            max_size: 10,
            max_waiting: 0,
            timeout: Some(Duration::from_secs(30)),
            max_lifetime_nanos: None,
            lifetime_jitter: 0.1,
            max_idle_nanos: None,
            checks: true,
            check_interval_nanos: 500_000_000,
            leak_threshold_nanos: None,
        }
    }
}

fn check_sizes(min_size: u32, max_size: u32) -> Result<()> {
    if max_size == 0 {
        return Err(Error::invalid("max_size", "max_size must be at least 1."));
    }
    if min_size > max_size {
        return Err(Error::invalid(
            "min_size",
            format!("min_size ({min_size}) must not be larger than max_size ({max_size})."),
        ));
    }
    Ok(())
}

impl PoolConfig {
    pub fn validate(&self) -> Result<()> {
        check_sizes(self.min_size, self.max_size)?;
        if !(self.lifetime_jitter >= 0.0 && self.lifetime_jitter < 1.0) {
            return Err(Error::invalid(
                "lifetime_jitter",
                format!(
                    "lifetime_jitter must be a fraction from 0 up to (not including) 1 (got {}).",
                    self.lifetime_jitter
                ),
            ));
        }
        for (argument, value) in [
            ("max_lifetime", self.max_lifetime_nanos),
            ("max_idle", self.max_idle_nanos),
            ("leak_threshold", self.leak_threshold_nanos),
        ] {
            if value == Some(0) {
                return Err(Error::invalid(
                    argument,
                    format!("{argument} must be more than 0 seconds, or None for no limit."),
                ));
            }
        }
        Ok(())
    }
}

/// A connection the pool holds, with the times that decide its fate.
struct Entry<C> {
    conn: C,
    /// Clock reading at which it must be closed; `u64::MAX` when it has no lifetime.
    expires_at: u64,
    /// When it was last returned (or created).
    last_used: u64,
    /// Its last borrower ended with an error: check it before the next hand-out.
    suspect: bool,
}

struct Borrowed<C, T> {
    entry: Entry<C>,
    lease: u64,
    taken_at: u64,
    trace: Option<T>,
    /// False while it is handed to a waiter that has not claimed it yet.
    claimed: bool,
    leak_reported: bool,
}

/// A connection taken back from its borrower but not yet returned to the pool (it is being
/// reset). It still counts towards the pool's size.
pub struct Returning<C> {
    entry: Entry<C>,
    leaked: bool,
}

impl<C> Returning<C> {
    pub fn connection(&self) -> &C {
        &self.entry.conn
    }
}

/// What a waiter was handed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grant {
    /// A connection, already recorded as borrowed under this identity and lease.
    Connection { identity: usize, lease: u64 },
    /// A reserved slot: the waiter creates the connection.
    Create,
    /// The pool closed while it waited.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitState {
    Waiting,
    Granted(Grant),
    Left,
}

/// One caller in the queue. Its state only changes while the pool's mutex is held; its own
/// mutex is never contended and only satisfies the borrow checker.
pub struct Waiter {
    state: Mutex<WaitState>,
    signal: Signal,
    since: u64,
}

impl Waiter {
    fn state(&self) -> WaitState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: WaitState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    pub fn granted(&self) -> bool {
        matches!(self.state(), WaitState::Granted(_))
    }
}

/// What a checkout got.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<R> {
    /// A connection (as made by the caller's `take`) and its lease; `needs_check` when it was
    /// last used longer ago than the check interval, or its last borrower ended with an error.
    Ready {
        value: R,
        lease: u64,
        needs_check: bool,
    },
    /// A slot is reserved: create a connection and `admit` it, or `cancel_create` on failure.
    Create,
}

/// What an asynchronous checkout got: an outcome now, or a place in the queue.
pub enum Enqueued<R> {
    Now(Outcome<R>),
    Waiting(Arc<Waiter>),
}

/// Why a waiter leaves the queue before being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Its time ran out: a grant that raced in is kept (the caller claims it).
    TimedOut,
    /// It was cancelled or interrupted: a grant that raced in is passed on.
    Cancelled,
}

/// A connection borrowed for longer than the leak threshold, reported once.
pub struct Leak<R, T> {
    pub connection: R,
    pub held_nanos: u64,
    pub trace: Option<T>,
}

/// What housekeeping found to do besides closing: leaks to report, connections to create.
pub struct Housekeeping<R, T> {
    pub leaks: Vec<Leak<R, T>>,
    /// Slots reserved to bring the pool up to `min_size`: create each, then `admit_idle` it
    /// (`cancel_refill` on failure, `unreserve` for those not tried).
    pub to_create: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub min_size: u32,
    pub max_size: u32,
    /// Open connections: idle, borrowed, being created or being reset.
    pub size: u32,
    pub idle: u32,
    pub in_use: u32,
    pub waiting: u32,
    /// Checkouts asked for.
    pub requests: u64,
    pub created: u64,
    /// Connections retired (handed back to be closed).
    pub closed: u64,
    /// Connections discarded as broken (a failed check or reset, or a borrower's report).
    pub broken: u64,
    pub create_failures: u64,
    pub timeouts: u64,
    /// Callers refused because `max_waiting` callers were already waiting.
    pub rejected: u64,
    /// Checkouts that had to wait, and how long they waited in total and at most.
    pub waits: u64,
    pub total_wait_nanos: u64,
    pub max_wait_nanos: u64,
    pub leaks: u64,
}

struct Inner<C, T> {
    idle: Vec<Entry<C>>,
    borrowed: IdentityMap<Borrowed<C, T>>,
    /// Connections taken back for a reset and not yet put back.
    returning: IdentityMap<()>,
    /// Every open connection: idle, borrowed, returning, and reserved slots being created.
    live: u32,
    /// Of the reserved slots, those the housekeeper is filling; the first waiters in the queue
    /// wait for these rather than opening connections of their own.
    refilling: u32,
    queue: VecDeque<Arc<Waiter>>,
    min_size: u32,
    max_size: u32,
    closed: bool,
    next_lease: u64,
    stats: PoolStats,
}

pub struct Pool<C, T> {
    name: String,
    config: PoolConfig,
    clock: Clock,
    /// Whether anything reads connection times (checks, lifetimes, idle limit, leaks); when
    /// nothing does, checkout and checkin skip the clock.
    timed: bool,
    jitter: JitterSource,
    inner: Mutex<Inner<C, T>>,
    /// Woken when the pool falls below `min_size` or closes, for the housekeeper.
    attention: Condvar,
    /// Woken when the last connection of a closed pool is gone.
    drained: Condvar,
}

impl<C: Connection + Send, T: Send> Pool<C, T> {
    pub fn new(name: impl Into<String>, config: PoolConfig, clock: Clock) -> Result<Self> {
        config.validate()?;
        let seed = clock.now_nanos() ^ u64::from(config.max_size).rotate_left(29);
        let capacity = config.max_size.min(1024) as usize;
        Ok(Pool {
            name: name.into(),
            inner: Mutex::new(Inner {
                idle: Vec::with_capacity(capacity),
                borrowed: IdentityMap::with_capacity_and_hasher(
                    capacity,
                    BuildHasherDefault::default(),
                ),
                returning: IdentityMap::default(),
                live: 0,
                refilling: 0,
                queue: VecDeque::new(),
                min_size: config.min_size,
                max_size: config.max_size,
                closed: false,
                next_lease: 1,
                stats: PoolStats::default(),
            }),
            timed: config.checks
                || config.max_lifetime_nanos.is_some()
                || config.max_idle_nanos.is_some()
                || config.leak_threshold_nanos.is_some(),
            config,
            clock,
            jitter: JitterSource::new(seed),
            attention: Condvar::new(),
            drained: Condvar::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn lock(&self) -> MutexGuard<'_, Inner<C, T>> {
        // Nothing panics while holding the lock; a poisoned lock still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clock, when anything reads connection times; 0 otherwise.
    #[inline]
    fn now(&self) -> u64 {
        if self.timed {
            self.clock.now_nanos()
        } else {
            0
        }
    }

    fn closed_error(&self) -> Error {
        Error::PoolClosed {
            name: self.name.clone(),
        }
    }

    fn expiry_for_new(&self, now: u64) -> u64 {
        match self.config.max_lifetime_nanos {
            None => u64::MAX,
            Some(lifetime) => {
                let shortened =
                    lifetime as f64 * (1.0 - self.config.lifetime_jitter * self.jitter.next_unit());
                now.saturating_add((shortened as u64).max(1))
            }
        }
    }

    fn idle_too_long(&self, inner: &Inner<C, T>, entry: &Entry<C>, now: u64) -> bool {
        match self.config.max_idle_nanos {
            Some(max_idle) => {
                inner.live > inner.min_size && now.saturating_sub(entry.last_used) >= max_idle
            }
            None => false,
        }
    }

    fn needs_check(&self, entry: &Entry<C>, now: u64) -> bool {
        self.config.checks
            && (entry.suspect
                || now.saturating_sub(entry.last_used) >= self.config.check_interval_nanos)
    }

    /// Closes one connection's slot: the connection goes to `retired`, and the freed slot to
    /// the longest waiter (who then creates a connection).
    fn retire_locked(
        &self,
        inner: &mut Inner<C, T>,
        conn: C,
        retired: &mut Vec<C>,
        wake: &mut Vec<Arc<Waiter>>,
    ) {
        retired.push(conn);
        inner.stats.closed += 1;
        self.free_slots_locked(inner, 1, wake);
    }

    fn free_slots_locked(&self, inner: &mut Inner<C, T>, count: u32, wake: &mut Vec<Arc<Waiter>>) {
        inner.live -= count;
        self.grant_slots_locked(inner, wake);
        if inner.closed {
            if inner.live == 0 {
                self.drained.notify_all();
            }
        } else if inner.live < inner.min_size {
            self.attention.notify_all();
        }
    }

    /// Hands free slots to waiters for them to create connections in, oldest first, passing
    /// over the first few whom connections being created in the background will serve.
    fn grant_slots_locked(&self, inner: &mut Inner<C, T>, wake: &mut Vec<Arc<Waiter>>) {
        if inner.closed {
            return;
        }
        let mut covered = inner.refilling as usize;
        let mut index = 0;
        while inner.live < inner.max_size && index < inner.queue.len() {
            if inner.queue[index].state() != WaitState::Waiting {
                inner.queue.remove(index);
            } else if covered > 0 {
                covered -= 1;
                index += 1;
            } else if let Some(waiter) = inner.queue.remove(index) {
                inner.live += 1;
                self.grant_locked(waiter, Grant::Create, wake);
            }
        }
    }

    fn pop_waiting(&self, inner: &mut Inner<C, T>) -> Option<Arc<Waiter>> {
        while let Some(waiter) = inner.queue.pop_front() {
            if waiter.state() == WaitState::Waiting {
                return Some(waiter);
            }
        }
        None
    }

    fn grant_locked(&self, waiter: Arc<Waiter>, grant: Grant, wake: &mut Vec<Arc<Waiter>>) {
        waiter.set_state(WaitState::Granted(grant));
        // Callbacks call into an event loop: they run once the lock is released.
        if waiter.signal.notify() {
            wake.push(waiter);
        }
    }

    fn run_wakes(wake: Vec<Arc<Waiter>>) {
        for waiter in wake {
            waiter.signal.run();
        }
    }

    fn lend_locked<R>(
        &self,
        inner: &mut Inner<C, T>,
        entry: Entry<C>,
        now: u64,
        take: impl FnOnce(&C) -> R,
    ) -> Outcome<R> {
        let needs_check = self.needs_check(&entry, now);
        let value = take(&entry.conn);
        let lease = inner.next_lease;
        inner.next_lease += 1;
        inner.borrowed.insert(
            entry.conn.identity(),
            Borrowed {
                entry,
                lease,
                taken_at: now,
                trace: None,
                claimed: true,
                leak_reported: false,
            },
        );
        Outcome::Ready {
            value,
            lease,
            needs_check,
        }
    }

    /// Lends the newest idle connection that is still within its limits, retiring the ones
    /// that are not; `None` when none is left.
    fn lend_idle_locked<R>(
        &self,
        inner: &mut Inner<C, T>,
        now: u64,
        take: &mut Option<impl FnOnce(&C) -> R>,
        retired: &mut Vec<C>,
        wake: &mut Vec<Arc<Waiter>>,
    ) -> Option<Outcome<R>> {
        while let Some(entry) = inner.idle.pop() {
            if entry.expires_at <= now || self.idle_too_long(inner, &entry, now) {
                self.retire_locked(inner, entry.conn, retired, wake);
                continue;
            }
            let take = take
                .take()
                .expect("a checkout takes at most one connection");
            return Some(self.lend_locked(inner, entry, now, take));
        }
        None
    }

    /// Serves a caller without waiting when that is fair: nobody is queued before it, and a
    /// connection or a slot is free. A caller that `may_wait` waits for a connection being
    /// created in the background rather than opening one more.
    fn serve_now_locked<R>(
        &self,
        inner: &mut Inner<C, T>,
        may_wait: bool,
        take: &mut Option<impl FnOnce(&C) -> R>,
        retired: &mut Vec<C>,
        wake: &mut Vec<Arc<Waiter>>,
    ) -> Option<Outcome<R>> {
        if inner.queue.is_empty() {
            let now = self.now();
            if let Some(outcome) = self.lend_idle_locked(inner, now, take, retired, wake) {
                return Some(outcome);
            }
        }
        if inner.live >= inner.max_size
            || (may_wait && inner.queue.len() < inner.refilling as usize)
        {
            return None;
        }
        inner.live += 1;
        Some(Outcome::Create)
    }

    fn join_queue_locked(&self, inner: &mut Inner<C, T>, signal: Signal) -> Result<Arc<Waiter>> {
        if self.config.max_waiting > 0 && inner.queue.len() >= self.config.max_waiting as usize {
            inner.stats.rejected += 1;
            return Err(Error::PoolFull {
                name: self.name.clone(),
                max_waiting: self.config.max_waiting,
            });
        }
        let waiter = Arc::new(Waiter {
            state: Mutex::new(WaitState::Waiting),
            signal,
            since: self.clock.now_nanos(),
        });
        inner.queue.push_back(waiter.clone());
        Ok(waiter)
    }

    fn timeout_error(&self, timeout: Option<Duration>) -> Error {
        Error::PoolTimeout {
            name: self.name.clone(),
            timeout_seconds: timeout.map_or(0.0, |timeout| timeout.as_secs_f64()),
        }
    }

    /// Takes a connection, or a slot to create one in, without waiting; `None` (counted as a
    /// timeout of a caller that could not wait) when neither is free.
    pub fn try_checkout<R>(
        &self,
        take: impl FnOnce(&C) -> R,
        retired: &mut Vec<C>,
    ) -> Result<Option<Outcome<R>>> {
        let mut wake = Vec::new();
        let outcome = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(self.closed_error());
            }
            inner.stats.requests += 1;
            let served =
                self.serve_now_locked(&mut inner, false, &mut Some(take), retired, &mut wake);
            if served.is_none() {
                inner.stats.timeouts += 1;
            }
            served
        };
        Self::run_wakes(wake);
        Ok(outcome)
    }

    /// Takes a connection or a slot, blocking for at most `timeout` (the configured timeout when
    /// `None`; zero never waits). The wait runs in slices through `pause`, which may release a
    /// lock of the caller's (the GIL) and may stop the wait with an error of its own (a
    /// signal); whatever stops it, nothing granted to this caller is lost.
    pub fn checkout_with<R, E>(
        &self,
        timeout: Option<Duration>,
        take: impl FnOnce(&C) -> R,
        retired: &mut Vec<C>,
        mut pause: impl FnMut(&WaitSlice<'_>) -> std::result::Result<bool, E>,
    ) -> std::result::Result<Result<Outcome<R>>, E> {
        let timeout = timeout.or(self.config.timeout);
        let may_wait = timeout != Some(Duration::ZERO);
        let mut take = Some(take);
        let mut wake = Vec::new();
        let waiter = {
            let mut inner = self.lock();
            if inner.closed {
                return Ok(Err(self.closed_error()));
            }
            inner.stats.requests += 1;
            let served = self.serve_now_locked(&mut inner, may_wait, &mut take, retired, &mut wake);
            let waiter = match served {
                Some(outcome) => Err(Ok(outcome)),
                None if !may_wait => {
                    inner.stats.timeouts += 1;
                    Err(Err(self.timeout_error(timeout)))
                }
                None => self
                    .join_queue_locked(&mut inner, Signal::for_thread())
                    .map_err(Err),
            };
            drop(inner);
            Self::run_wakes(wake);
            match waiter {
                Ok(waiter) => waiter,
                Err(done) => return Ok(done),
            }
        };
        let take = take.take().expect("not taken before waiting");
        // Only a caller that must wait reads the clock for its deadline.
        let deadline = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
        loop {
            let remaining = match deadline {
                None => Duration::MAX,
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            };
            if remaining.is_zero() {
                return Ok(if self.leave(&waiter, Leave::TimedOut, retired) {
                    self.claim(&waiter, take)
                } else {
                    Err(self.timeout_error(timeout))
                });
            }
            let wait = |slice: Duration| self.wait_slice(&waiter, slice.min(remaining));
            match pause(&wait) {
                Ok(true) => return Ok(self.claim(&waiter, take)),
                Ok(false) => {}
                Err(interrupted) => {
                    self.leave(&waiter, Leave::Cancelled, retired);
                    return Err(interrupted);
                }
            }
        }
    }

    fn wait_slice(&self, waiter: &Waiter, slice: Duration) -> bool {
        waiter.signal.wait(self.lock(), slice, || waiter.granted())
    }
    /// Serves a caller now, or queues it with `wake`, called (outside the lock) once it has
    /// been granted something; then `claim` the grant, or `leave` to give up.
    pub fn enqueue<R>(
        &self,
        wake: Wake,
        take: impl FnOnce(&C) -> R,
        retired: &mut Vec<C>,
    ) -> Result<Enqueued<R>> {
        let mut wakes = Vec::new();
        let enqueued = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(self.closed_error());
            }
            inner.stats.requests += 1;
            match self.serve_now_locked(&mut inner, true, &mut Some(take), retired, &mut wakes) {
                Some(outcome) => Ok(Enqueued::Now(outcome)),
                None => self
                    .join_queue_locked(&mut inner, Signal::Callback(wake))
                    .map(Enqueued::Waiting),
            }
        };
        Self::run_wakes(wakes);
        enqueued
    }

    /// Turns a waiter's grant into an outcome: the handed-over connection, or a slot to create
    /// one in. Fails with `PoolClosedError` when the pool closed while it waited.
    pub fn claim<R>(&self, waiter: &Waiter, take: impl FnOnce(&C) -> R) -> Result<Outcome<R>> {
        let mut inner = self.lock();
        let WaitState::Granted(grant) = waiter.state() else {
            return Err(Error::Misuse(
                "A pool waiter was claimed before anything was granted to it.".to_owned(),
            ));
        };
        waiter.set_state(WaitState::Left);
        if grant == Grant::Closed {
            return Err(self.closed_error());
        }
        let waited = self.clock.now_nanos().saturating_sub(waiter.since);
        inner.stats.waits += 1;
        inner.stats.total_wait_nanos += waited;
        inner.stats.max_wait_nanos = inner.stats.max_wait_nanos.max(waited);
        match grant {
            Grant::Closed | Grant::Create => Ok(Outcome::Create),
            Grant::Connection { identity, lease } => {
                let now = self.now();
                let borrowed = inner
                    .borrowed
                    .get_mut(&identity)
                    .filter(|borrowed| borrowed.lease == lease)
                    .expect("a handed-over connection stays borrowed until its waiter claims it");
                borrowed.claimed = true;
                borrowed.taken_at = now;
                let needs_check = self.needs_check(&borrowed.entry, now);
                Ok(Outcome::Ready {
                    value: take(&borrowed.entry.conn),
                    lease,
                    needs_check,
                })
            }
        }
    }

    /// Leaves the queue. Returns `true` when a grant had already arrived and the caller should
    /// `claim` it (only for `Leave::TimedOut`); a cancelled waiter's grant is passed on.
    pub fn leave(&self, waiter: &Arc<Waiter>, why: Leave, retired: &mut Vec<C>) -> bool {
        let mut wake = Vec::new();
        let claim = {
            let mut inner = self.lock();
            match waiter.state() {
                WaitState::Waiting => {
                    waiter.set_state(WaitState::Left);
                    inner.queue.retain(|queued| !Arc::ptr_eq(queued, waiter));
                    if why == Leave::TimedOut {
                        inner.stats.timeouts += 1;
                    }
                    false
                }
                WaitState::Left => false,
                WaitState::Granted(_) if why == Leave::TimedOut => true,
                WaitState::Granted(grant) => {
                    waiter.set_state(WaitState::Left);
                    self.pass_on_locked(&mut inner, grant, retired, &mut wake);
                    false
                }
            }
        };
        Self::run_wakes(wake);
        claim
    }

    /// Gives an unclaimed grant to the next waiter, or back to the pool.
    fn pass_on_locked(
        &self,
        inner: &mut Inner<C, T>,
        grant: Grant,
        retired: &mut Vec<C>,
        wake: &mut Vec<Arc<Waiter>>,
    ) {
        match grant {
            Grant::Closed => {}
            // The reserved slot was never used: it frees without counting as a close.
            Grant::Create => self.free_slots_locked(inner, 1, wake),
            Grant::Connection { identity, .. } => {
                let borrowed = inner
                    .borrowed
                    .remove(&identity)
                    .expect("a handed-over connection stays borrowed until its waiter claims it");
                self.put_back_locked(inner, borrowed.entry, retired, wake);
            }
        }
    }

    fn holds_locked(&self, inner: &Inner<C, T>, identity: usize) -> bool {
        inner.borrowed.contains_key(&identity)
            || inner.returning.contains_key(&identity)
            || inner
                .idle
                .iter()
                .any(|entry| entry.conn.identity() == identity)
    }

    fn duplicate_error(&self) -> Error {
        Error::invalid(
            "create",
            format!(
                "create returned a connection pool '{}' already holds; it must return a new \
                 connection on every call.",
                self.name
            ),
        )
    }

    fn new_entry(&self, conn: C, now: u64) -> Entry<C> {
        Entry {
            expires_at: self.expiry_for_new(now),
            last_used: now,
            suspect: false,
            conn,
        }
    }

    /// Records a connection the caller created in a reserved slot as borrowed by it. When the
    /// pool closed in the meantime the connection comes back to be closed; a connection the
    /// pool already holds is refused (and not to be closed: someone holds it).
    pub fn admit(&self, conn: C) -> std::result::Result<u64, (Error, Option<C>)> {
        let mut wake = Vec::new();
        let admitted = {
            let mut inner = self.lock();
            if self.holds_locked(&inner, conn.identity()) {
                inner.stats.create_failures += 1;
                self.free_slots_locked(&mut inner, 1, &mut wake);
                Err((self.duplicate_error(), None))
            } else if inner.closed {
                inner.stats.created += 1;
                inner.stats.closed += 1;
                self.free_slots_locked(&mut inner, 1, &mut wake);
                Err((self.closed_error(), Some(conn)))
            } else {
                inner.stats.created += 1;
                let now = self.now();
                let entry = self.new_entry(conn, now);
                match self.lend_locked(&mut inner, entry, now, |_| ()) {
                    Outcome::Ready { lease, .. } => Ok(lease),
                    Outcome::Create => unreachable!("lending always hands out the connection"),
                }
            }
        };
        Self::run_wakes(wake);
        admitted
    }

    /// Records a connection created by the housekeeper in a slot `housekeep` reserved: handed
    /// to the longest waiter or kept idle; retired (into `retired`) when the pool closed in
    /// the meantime. A connection the pool already holds is refused.
    pub fn admit_idle(&self, conn: C, retired: &mut Vec<C>) -> Result<()> {
        let mut wake = Vec::new();
        let admitted = {
            let mut inner = self.lock();
            inner.refilling -= 1;
            if self.holds_locked(&inner, conn.identity()) {
                inner.stats.create_failures += 1;
                self.free_slots_locked(&mut inner, 1, &mut wake);
                Err(self.duplicate_error())
            } else {
                inner.stats.created += 1;
                let entry = self.new_entry(conn, self.now());
                self.put_back_locked(&mut inner, entry, retired, &mut wake);
                Ok(())
            }
        };
        Self::run_wakes(wake);
        admitted
    }

    /// A reserved slot's connection could not be created: the slot goes to the next waiter.
    pub fn cancel_create(&self) {
        self.free_reserved(1, false, true);
    }

    /// Gives back a reserved slot that will not be used (its caller was interrupted).
    pub fn release_slot(&self) {
        self.free_reserved(1, false, false);
    }

    /// The housekeeper could not create a connection in a slot `housekeep` reserved.
    pub fn cancel_refill(&self) {
        self.free_reserved(1, true, true);
    }

    /// Gives back slots `housekeep` reserved that the housekeeper will not try to fill.
    pub fn unreserve(&self, count: u32) {
        if count > 0 {
            self.free_reserved(count, true, false);
        }
    }

    fn free_reserved(&self, count: u32, refill: bool, failed: bool) {
        let mut wake = Vec::new();
        {
            let mut inner = self.lock();
            if refill {
                inner.refilling -= count;
            }
            if failed {
                inner.stats.create_failures += 1;
            }
            self.free_slots_locked(&mut inner, count, &mut wake);
        }
        Self::run_wakes(wake);
    }

    /// Keeps where a borrowed connection was taken (a stack), for its leak report.
    pub fn attach_trace(&self, identity: usize, lease: u64, trace: T) {
        let mut inner = self.lock();
        if let Some(borrowed) = inner.borrowed.get_mut(&identity) {
            if borrowed.lease == lease {
                borrowed.trace = Some(trace);
            }
        }
    }

    fn not_borrowed_error(&self, inner: &Inner<C, T>, identity: usize, handed_on: bool) -> Error {
        let idle = inner
            .idle
            .iter()
            .any(|entry| entry.conn.identity() == identity);
        Error::invalid(
            "conn",
            if idle || handed_on || inner.returning.contains_key(&identity) {
                format!(
                    "conn was already returned to pool '{}'; return each connection once.",
                    self.name
                )
            } else {
                format!(
                    "conn is not checked out from pool '{}': it was already returned, or it \
                     came from somewhere else.",
                    self.name
                )
            },
        )
    }

    fn take_back_locked(
        &self,
        inner: &mut Inner<C, T>,
        identity: usize,
        lease: Option<u64>,
    ) -> Result<Returning<C>> {
        match inner.borrowed.get(&identity) {
            // Handed to a waiter that has not claimed it: its borrower already returned it.
            Some(borrowed) if !borrowed.claimed => {
                return Err(self.not_borrowed_error(inner, identity, true))
            }
            Some(borrowed) if lease.is_none_or(|lease| lease == borrowed.lease) => {}
            Some(_) => {
                return Err(Error::Misuse(format!(
                    "This connection was already returned to pool '{}' through this lease, and \
                     has been lent out again since; return each connection once.",
                    self.name
                )))
            }
            None => return Err(self.not_borrowed_error(inner, identity, false)),
        }
        let borrowed = inner
            .borrowed
            .remove(&identity)
            .expect("looked up just above");
        Ok(Returning {
            entry: borrowed.entry,
            leaked: borrowed.leak_reported,
        })
    }

    /// Takes a connection back from its borrower so the caller can reset it, then `put_back`.
    /// `lease`, when given, must be the one the connection was lent under.
    pub fn take_back(&self, identity: usize, lease: Option<u64>) -> Result<Returning<C>> {
        let mut inner = self.lock();
        let returning = self.take_back_locked(&mut inner, identity, lease)?;
        inner.returning.insert(identity, ());
        Ok(returning)
    }

    fn put_back_locked(
        &self,
        inner: &mut Inner<C, T>,
        mut entry: Entry<C>,
        retired: &mut Vec<C>,
        wake: &mut Vec<Arc<Waiter>>,
    ) {
        let now = self.now();
        if inner.closed || entry.expires_at <= now || inner.live > inner.max_size {
            self.retire_locked(inner, entry.conn, retired, wake);
            return;
        }
        entry.last_used = now;
        match self.pop_waiting(inner) {
            Some(waiter) => {
                let identity = entry.conn.identity();
                let lease = inner.next_lease;
                inner.next_lease += 1;
                inner.borrowed.insert(
                    identity,
                    Borrowed {
                        entry,
                        lease,
                        taken_at: now,
                        trace: None,
                        claimed: false,
                        leak_reported: false,
                    },
                );
                self.grant_locked(waiter, Grant::Connection { identity, lease }, wake);
            }
            None => inner.idle.push(entry),
        }
    }

    fn return_locked(
        &self,
        inner: &mut Inner<C, T>,
        mut entry: Entry<C>,
        broken: bool,
        suspect: bool,
        retired: &mut Vec<C>,
        wake: &mut Vec<Arc<Waiter>>,
    ) {
        if broken {
            inner.stats.broken += 1;
            self.retire_locked(inner, entry.conn, retired, wake);
        } else {
            entry.suspect = suspect;
            self.put_back_locked(inner, entry, retired, wake);
        }
    }

    /// Returns a connection taken back with `take_back`. A broken one is retired and its slot
    /// goes to the next waiter; `suspect` asks for a check before its next hand-out. Returns
    /// whether the connection had been reported as leaked.
    pub fn put_back(
        &self,
        returning: Returning<C>,
        broken: bool,
        suspect: bool,
        retired: &mut Vec<C>,
    ) -> bool {
        let mut wake = Vec::new();
        {
            let mut inner = self.lock();
            inner.returning.remove(&returning.entry.conn.identity());
            self.return_locked(
                &mut inner,
                returning.entry,
                broken,
                suspect,
                retired,
                &mut wake,
            );
        }
        Self::run_wakes(wake);
        returning.leaked
    }

    /// `take_back` and `put_back` in one step, for pools without a reset. Returns whether the
    /// connection had been reported as leaked.
    pub fn checkin(
        &self,
        identity: usize,
        lease: Option<u64>,
        broken: bool,
        suspect: bool,
        retired: &mut Vec<C>,
    ) -> Result<bool> {
        let mut wake = Vec::new();
        let leaked = {
            let mut inner = self.lock();
            let returning = self.take_back_locked(&mut inner, identity, lease)?;
            self.return_locked(
                &mut inner,
                returning.entry,
                broken,
                suspect,
                retired,
                &mut wake,
            );
            returning.leaked
        };
        Self::run_wakes(wake);
        Ok(leaked)
    }

    /// Replaces a borrowed connection that failed its check: it is retired (into `retired`),
    /// and its borrower keeps its turn: it gets the newest idle connection, or keeps the slot
    /// to create a new one in. Fails with `PoolClosedError` when the pool closed meanwhile.
    pub fn replace<R>(
        &self,
        identity: usize,
        lease: u64,
        take: impl FnOnce(&C) -> R,
        retired: &mut Vec<C>,
    ) -> Result<Outcome<R>> {
        let mut wake = Vec::new();
        let replaced = {
            let mut inner = self.lock();
            let returning = self.take_back_locked(&mut inner, identity, Some(lease))?;
            inner.stats.broken += 1;
            inner.stats.closed += 1;
            retired.push(returning.entry.conn);
            if inner.closed {
                self.free_slots_locked(&mut inner, 1, &mut wake);
                Err(self.closed_error())
            } else {
                // The broken connection's slot is the borrower's until it has another one.
                let now = self.now();
                let mut take = Some(take);
                match self.lend_idle_locked(&mut inner, now, &mut take, retired, &mut wake) {
                    Some(outcome) => {
                        self.free_slots_locked(&mut inner, 1, &mut wake);
                        Ok(outcome)
                    }
                    None => Ok(Outcome::Create),
                }
            }
        };
        Self::run_wakes(wake);
        replaced
    }

    /// Closes idle connections past their lifetime or idle limit, reports borrowed ones held
    /// past the leak threshold (once each), and reserves slots to refill up to `min_size`.
    pub fn housekeep<R>(
        &self,
        describe: impl Fn(&C) -> R,
        retired: &mut Vec<C>,
    ) -> Housekeeping<R, T> {
        let mut wake = Vec::new();
        let mut leaks = Vec::new();
        let to_create = {
            let mut inner = self.lock();
            let now = self.now();
            // Oldest idle first (the bottom of the LIFO stack), so the newest stay.
            let mut index = 0;
            while index < inner.idle.len() {
                let entry = &inner.idle[index];
                if entry.expires_at <= now || self.idle_too_long(&inner, entry, now) {
                    let entry = inner.idle.remove(index);
                    self.retire_locked(&mut inner, entry.conn, retired, &mut wake);
                } else {
                    index += 1;
                }
            }
            if let Some(threshold) = self.config.leak_threshold_nanos {
                let mut found = 0;
                for borrowed in inner.borrowed.values_mut() {
                    let held = now.saturating_sub(borrowed.taken_at);
                    if borrowed.claimed && !borrowed.leak_reported && held >= threshold {
                        borrowed.leak_reported = true;
                        found += 1;
                        leaks.push(Leak {
                            connection: describe(&borrowed.entry.conn),
                            held_nanos: held,
                            trace: borrowed.trace.take(),
                        });
                    }
                }
                inner.stats.leaks += found;
            }
            if inner.closed {
                0
            } else {
                let missing = inner.min_size.saturating_sub(inner.live);
                inner.live += missing;
                inner.refilling += missing;
                missing
            }
        };
        Self::run_wakes(wake);
        Housekeeping { leaks, to_create }
    }

    /// The earliest time (clock nanos) at which housekeeping could have something to do, so a
    /// housekeeper can sleep until then; `None` when only a change in the pool could matter.
    pub fn next_housekeeping(&self) -> Option<u64> {
        let inner = self.lock();
        let now = self.clock.now_nanos();
        // A connection borrowed, returned or created from now on is due no sooner than one
        // full threshold from now, so the housekeeper never sleeps past that.
        let mut next = [
            self.config.leak_threshold_nanos,
            self.config.max_idle_nanos,
            self.config
                .max_lifetime_nanos
                .map(|lifetime| (lifetime as f64 * (1.0 - self.config.lifetime_jitter)) as u64),
        ]
        .into_iter()
        .flatten()
        .map(|window| now.saturating_add(window))
        .min()
        .unwrap_or(u64::MAX);
        for entry in &inner.idle {
            next = next.min(entry.expires_at);
            if let Some(max_idle) = self.config.max_idle_nanos {
                next = next.min(entry.last_used.saturating_add(max_idle));
            }
        }
        if let Some(threshold) = self.config.leak_threshold_nanos {
            for borrowed in inner.borrowed.values() {
                if !borrowed.leak_reported {
                    next = next.min(borrowed.taken_at.saturating_add(threshold));
                }
            }
        }
        if !inner.closed && inner.live < inner.min_size {
            next = 0;
        }
        (next != u64::MAX).then_some(next)
    }

    /// Sleeps (the calling thread) until the pool needs attention or `slice` passes.
    pub fn wait_for_attention(&self, slice: Duration) {
        let inner = self.lock();
        if inner.closed || inner.live < inner.min_size {
            return;
        }
        let _ = self
            .attention
            .wait_timeout(inner, slice)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Changes the sizes. Idle connections past the new maximum are retired now, borrowed
    /// ones when they come back; new room goes to waiters first.
    pub fn resize(&self, min_size: u32, max_size: u32, retired: &mut Vec<C>) -> Result<()> {
        check_sizes(min_size, max_size)?;
        let mut wake = Vec::new();
        {
            let mut inner = self.lock();
            if inner.closed {
                return Err(self.closed_error());
            }
            inner.min_size = min_size;
            inner.max_size = max_size;
            // Oldest idle first.
            while inner.live > max_size && !inner.idle.is_empty() {
                let entry = inner.idle.remove(0);
                self.retire_locked(&mut inner, entry.conn, retired, &mut wake);
            }
            self.grant_slots_locked(&mut inner, &mut wake);
            if inner.live < min_size {
                self.attention.notify_all();
            }
        }
        Self::run_wakes(wake);
        Ok(())
    }

    /// Closes the pool: idle connections are retired now, borrowed ones when they come back,
    /// and every waiter is woken to fail with `PoolClosedError`. Closing twice does nothing.
    pub fn close(&self, retired: &mut Vec<C>) {
        let mut wake = Vec::new();
        {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            inner.closed = true;
            while let Some(entry) = inner.idle.pop() {
                self.retire_locked(&mut inner, entry.conn, retired, &mut wake);
            }
            while let Some(waiter) = self.pop_waiting(&mut inner) {
                self.grant_locked(waiter, Grant::Closed, &mut wake);
            }
            if inner.live == 0 {
                self.drained.notify_all();
            }
            self.attention.notify_all();
        }
        Self::run_wakes(wake);
    }

    /// Waits up to `slice` for a closed pool's last connection to come back; `true` once none
    /// is out.
    pub fn wait_drained(&self, slice: Duration) -> bool {
        let inner = self.lock();
        if inner.live == 0 {
            return true;
        }
        let (inner, _) = self
            .drained
            .wait_timeout(inner, slice)
            .unwrap_or_else(|e| e.into_inner());
        inner.live == 0
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Calls `visit` on every connection the pool holds, unless the pool is busy right now (the
    /// garbage collector must never block); `false` when it was busy.
    pub fn try_visit<E>(
        &self,
        mut visit: impl FnMut(&C) -> std::result::Result<(), E>,
    ) -> std::result::Result<bool, E> {
        let Ok(inner) = self.inner.try_lock() else {
            return Ok(false);
        };
        for entry in &inner.idle {
            visit(&entry.conn)?;
        }
        for borrowed in inner.borrowed.values() {
            visit(&borrowed.entry.conn)?;
        }
        Ok(true)
    }

    /// Runs `f` on a connection lent out under `lease`, if it still is.
    pub fn with_borrowed<R>(
        &self,
        identity: usize,
        lease: u64,
        f: impl FnOnce(&C) -> R,
    ) -> Option<R> {
        let inner = self.lock();
        inner
            .borrowed
            .get(&identity)
            .filter(|borrowed| borrowed.lease == lease)
            .map(|borrowed| f(&borrowed.entry.conn))
    }

    /// Whether `identity` is a connection this pool has lent out now.
    pub fn is_borrowed(&self, identity: usize) -> bool {
        self.lock().borrowed.contains_key(&identity)
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            min_size: inner.min_size,
            max_size: inner.max_size,
            size: inner.live,
            idle: inner.idle.len() as u32,
            in_use: inner.live - inner.idle.len() as u32,
            waiting: inner
                .queue
                .iter()
                .filter(|waiter| waiter.state() == WaitState::Waiting)
                .count() as u32,
            ..inner.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualTime;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

    /// A fake connection: its number is its identity.
    #[derive(Debug, PartialEq, Eq)]
    struct Fake(usize);

    impl Connection for Fake {
        fn identity(&self) -> usize {
            self.0
        }
    }

    type TestPool = Pool<Fake, &'static str>;

    fn pool_with(config: PoolConfig) -> (TestPool, Arc<ManualTime>) {
        let time = Arc::new(ManualTime::new(0));
        let pool = Pool::new("test", config, Clock::Manual(time.clone())).unwrap();
        (pool, time)
    }

    fn sized(max_size: u32) -> PoolConfig {
        PoolConfig {
            max_size,
            timeout: Some(Duration::ZERO),
            ..PoolConfig::default()
        }
    }

    fn no_wait(pool: &TestPool) -> Result<Outcome<usize>> {
        let mut retired = Vec::new();
        let result = no_wait_retiring(pool, &mut retired);
        assert!(retired.is_empty());
        result
    }

    fn no_wait_retiring(pool: &TestPool, retired: &mut Vec<Fake>) -> Result<Outcome<usize>> {
        pool.checkout_with(
            Some(Duration::ZERO),
            |conn: &Fake| conn.0,
            retired,
            |_: &WaitSlice<'_>| Ok::<bool, ()>(false),
        )
        .unwrap()
    }

    /// Queues a caller that must wait (the pool is full), woken by a callback that does nothing.
    fn queue(pool: &TestPool) -> Arc<Waiter> {
        match pool.enqueue(Box::new(|| {}), |conn: &Fake| conn.0, &mut Vec::new()) {
            Ok(Enqueued::Waiting(waiter)) => waiter,
            _ => panic!("the pool is full, so the caller must wait"),
        }
    }

    /// Checks out one connection, creating connection `next` when the pool grants a slot.
    fn borrow(pool: &TestPool, next: usize) -> (usize, u64) {
        match no_wait(pool).unwrap() {
            Outcome::Ready { value, lease, .. } => (value, lease),
            Outcome::Create => (next, pool.admit(Fake(next)).map_err(|e| e.0).unwrap()),
        }
    }

    #[test]
    fn creates_up_to_max_size_then_times_out() {
        let (pool, _) = pool_with(sized(2));
        assert_eq!(borrow(&pool, 1).0, 1);
        assert_eq!(borrow(&pool, 2).0, 2);
        assert!(matches!(no_wait(&pool), Err(Error::PoolTimeout { .. })));
        let stats = pool.stats();
        assert_eq!(
            (stats.size, stats.in_use, stats.created, stats.timeouts),
            (2, 2, 2, 1)
        );
    }

    #[test]
    fn idle_connections_are_reused_newest_first() {
        let (pool, time) = pool_with(sized(3));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        borrow(&pool, 2);
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        time.advance(1);
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        assert_eq!(borrow(&pool, 9).0, 2);
        assert_eq!(borrow(&pool, 9).0, 1);
        assert!(retired.is_empty());
    }

    #[test]
    fn releasing_twice_or_a_stranger_names_the_argument() {
        let (pool, _) = pool_with(sized(2));
        let mut retired = Vec::new();
        let (_, lease) = borrow(&pool, 1);
        pool.checkin(1, Some(lease), false, false, &mut retired)
            .unwrap();
        let twice = pool
            .checkin(1, None, false, false, &mut retired)
            .unwrap_err();
        assert!(matches!(
            twice,
            Error::InvalidArgument {
                argument: "conn",
                ..
            }
        ));
        assert!(twice.to_string().contains("already returned"));
        let stranger = pool
            .checkin(7, None, false, false, &mut retired)
            .unwrap_err();
        assert!(stranger.to_string().contains("somewhere else"));
        // A stale lease cannot return the connection its next borrower holds.
        let (again, _) = borrow(&pool, 2);
        assert_eq!(again, 1);
        assert!(matches!(
            pool.checkin(1, Some(lease), false, false, &mut retired),
            Err(Error::Misuse(_))
        ));
        assert_eq!(pool.stats().in_use, 1);
    }

    #[test]
    fn a_check_is_asked_for_only_outside_the_window_or_after_an_error() {
        let (pool, time) = pool_with(PoolConfig {
            check_interval_nanos: 100,
            ..sized(1)
        });
        let mut retired = Vec::new();
        borrow(&pool, 1);
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        let needs = |pool: &TestPool| match no_wait(pool).unwrap() {
            Outcome::Ready { needs_check, .. } => needs_check,
            Outcome::Create => panic!("an idle connection was expected"),
        };
        assert!(!needs(&pool));
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        time.advance(100);
        assert!(needs(&pool));
        pool.checkin(1, None, false, true, &mut retired).unwrap();
        assert!(needs(&pool), "the last borrower ended with an error");
    }

    #[test]
    fn lifetime_is_enforced_on_checkout_and_return_with_jitter() {
        let (pool, time) = pool_with(PoolConfig {
            max_lifetime_nanos: Some(1_000),
            lifetime_jitter: 0.5,
            ..sized(2)
        });
        let mut retired = Vec::new();
        borrow(&pool, 1);
        borrow(&pool, 2);
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        time.advance(1_000);
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        assert_eq!(
            retired,
            vec![Fake(2)],
            "expired while borrowed: closed on return"
        );
        assert_eq!(
            no_wait_retiring(&pool, &mut retired).unwrap(),
            Outcome::Create,
            "the expired idle one is skipped and retired"
        );
        assert_eq!(retired, vec![Fake(2), Fake(1)]);
        assert_eq!(pool.stats().closed, 2);
    }

    #[test]
    fn jitter_spreads_expiry_within_the_lifetime() {
        let (pool, _) = pool_with(PoolConfig {
            max_lifetime_nanos: Some(1_000_000),
            lifetime_jitter: 0.2,
            ..PoolConfig::default()
        });
        let expiries: Vec<u64> = (0..200).map(|_| pool.expiry_for_new(0)).collect();
        assert!(expiries.iter().all(|e| (800_000..=1_000_000).contains(e)));
        let distinct: std::collections::HashSet<_> = expiries.iter().collect();
        assert!(distinct.len() > 150);
    }

    #[test]
    fn idle_connections_above_min_size_are_closed_after_max_idle() {
        let (pool, time) = pool_with(PoolConfig {
            min_size: 1,
            max_idle_nanos: Some(50),
            ..sized(3)
        });
        let mut retired = Vec::new();
        for id in 1..=3 {
            borrow(&pool, id);
        }
        for id in 1..=3 {
            pool.checkin(id, None, false, false, &mut retired).unwrap();
        }
        time.advance(50);
        let work = pool.housekeep(|conn| conn.0, &mut retired);
        assert_eq!(work.to_create, 0);
        assert_eq!(
            retired,
            vec![Fake(1), Fake(2)],
            "oldest first, down to min_size"
        );
        assert_eq!(pool.stats().idle, 1);
    }

    #[test]
    fn housekeeping_refills_to_min_size_and_reports_leaks_once() {
        let (pool, time) = pool_with(PoolConfig {
            min_size: 2,
            leak_threshold_nanos: Some(10),
            ..sized(4)
        });
        let mut retired = Vec::new();
        let work = pool.housekeep(|conn| conn.0, &mut retired);
        assert_eq!(work.to_create, 2);
        pool.admit_idle(Fake(1), &mut retired).unwrap();
        pool.cancel_create();
        assert_eq!(pool.stats().size, 1);
        assert_eq!(pool.housekeep(|conn| conn.0, &mut retired).to_create, 1);
        pool.admit_idle(Fake(2), &mut retired).unwrap();
        let (id, _) = borrow(&pool, 9);
        time.advance(10);
        let leaks = pool.housekeep(|conn| conn.0, &mut retired).leaks;
        assert_eq!(leaks.len(), 1);
        assert_eq!((leaks[0].connection, leaks[0].held_nanos), (id, 10));
        assert!(pool.housekeep(|conn| conn.0, &mut retired).leaks.is_empty());
        assert!(pool.checkin(id, None, false, false, &mut retired).unwrap());
        assert_eq!(pool.stats().leaks, 1);
    }

    #[test]
    fn returns_hand_over_to_waiters_in_fifo_order() {
        let time = Arc::new(ManualTime::new(0));
        let pool: Arc<TestPool> = Arc::new(
            Pool::new(
                "fifo",
                PoolConfig {
                    max_size: 1,
                    timeout: None,
                    ..PoolConfig::default()
                },
                Clock::Manual(time),
            )
            .unwrap(),
        );
        borrow(&pool, 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for id in 0..4 {
            let (shared, order) = (pool.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                let mut retired = Vec::new();
                let outcome = shared
                    .checkout_with(
                        None,
                        |conn: &Fake| conn.0,
                        &mut retired,
                        |wait: &WaitSlice<'_>| Ok::<bool, ()>(wait(Duration::from_millis(10))),
                    )
                    .unwrap()
                    .unwrap();
                let Outcome::Ready { value, lease, .. } = outcome else {
                    panic!("the connection is handed over, not a slot");
                };
                order.lock().unwrap().push(id);
                shared
                    .checkin(value, Some(lease), false, false, &mut retired)
                    .unwrap();
            }));
            while pool.stats().waiting < id + 1 {
                std::thread::yield_now();
            }
        }
        pool.checkin(1, None, false, false, &mut Vec::new())
            .unwrap();
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        let stats = pool.stats();
        assert_eq!(
            (stats.size, stats.idle, stats.waiting, stats.waits),
            (1, 1, 0, 4)
        );
    }

    #[test]
    fn a_broken_connection_frees_its_slot_for_a_waiter_to_create_in() {
        let (pool, _) = pool_with(sized(1));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let woken = Arc::new(AtomicBool::new(false));
        let flag = woken.clone();
        let Enqueued::Waiting(waiter) = pool
            .enqueue(
                Box::new(move || flag.store(true, Ordering::SeqCst)),
                |conn: &Fake| conn.0,
                &mut retired,
            )
            .unwrap()
        else {
            panic!("the pool is full, so the caller must wait");
        };
        pool.checkin(1, None, true, false, &mut retired).unwrap();
        assert_eq!(retired, vec![Fake(1)]);
        assert!(woken.load(Ordering::SeqCst));
        assert_eq!(
            pool.claim(&waiter, |conn: &Fake| conn.0).unwrap(),
            Outcome::Create
        );
        assert!(pool.admit(Fake(2)).is_ok());
        let stats = pool.stats();
        assert_eq!((stats.size, stats.broken, stats.closed), (1, 1, 1));
    }

    #[test]
    fn a_cancelled_waiter_passes_its_grant_on() {
        let (pool, _) = pool_with(sized(1));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let waiter = queue(&pool);
            waiters.push(waiter);
        }
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        assert!(waiters[0].granted() && !waiters[1].granted());
        assert!(!pool.leave(&waiters[0], Leave::Cancelled, &mut retired));
        assert!(
            waiters[1].granted(),
            "the connection moved on to the next waiter"
        );
        assert!(matches!(
            pool.claim(&waiters[1], |conn: &Fake| conn.0),
            Ok(Outcome::Ready { value: 1, .. })
        ));
        // A timed-out waiter whose grant raced in keeps it.
        let late = queue(&pool);
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        assert!(pool.leave(&late, Leave::TimedOut, &mut retired));
        assert!(pool.claim(&late, |conn: &Fake| conn.0).is_ok());
        assert_eq!(pool.stats().timeouts, 0);
    }

    #[test]
    fn max_waiting_bounds_the_queue() {
        let (pool, _) = pool_with(PoolConfig {
            max_waiting: 1,
            ..sized(1)
        });
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let first = pool.enqueue(Box::new(|| {}), |conn: &Fake| conn.0, &mut retired);
        assert!(matches!(first, Ok(Enqueued::Waiting(_))));
        let second = pool.enqueue(Box::new(|| {}), |conn: &Fake| conn.0, &mut retired);
        assert!(matches!(
            second,
            Err(Error::PoolFull { max_waiting: 1, .. })
        ));
        assert_eq!(pool.stats().rejected, 1);
    }

    #[test]
    fn close_retires_idle_wakes_waiters_and_drains_as_borrowed_return() {
        let (pool, _) = pool_with(sized(2));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        borrow(&pool, 2);
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        borrow(&pool, 9);
        let waiter = queue(&pool);
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        // Handed to the waiter, which has not claimed it yet.
        pool.close(&mut retired);
        assert!(matches!(
            pool.claim(&waiter, |conn: &Fake| conn.0),
            Ok(Outcome::Ready { value: 2, .. })
        ));
        assert!(!pool.wait_drained(Duration::ZERO));
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        assert_eq!(retired, vec![Fake(1), Fake(2)]);
        assert!(pool.wait_drained(Duration::ZERO));
        assert!(matches!(no_wait(&pool), Err(Error::PoolClosed { .. })));
    }

    #[test]
    fn close_fails_waiters_that_got_nothing() {
        let (pool, _) = pool_with(sized(1));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let waiter = queue(&pool);
        pool.close(&mut retired);
        assert!(matches!(
            pool.claim(&waiter, |conn: &Fake| conn.0),
            Err(Error::PoolClosed { .. })
        ));
    }

    #[test]
    fn resize_grows_for_waiters_and_shrinks_as_connections_return() {
        let (pool, _) = pool_with(sized(1));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let waiter = queue(&pool);
        pool.resize(0, 2, &mut retired).unwrap();
        assert_eq!(
            pool.claim(&waiter, |conn: &Fake| conn.0).unwrap(),
            Outcome::Create
        );
        pool.admit(Fake(2)).map_err(|e| e.0).unwrap();
        pool.resize(0, 1, &mut retired).unwrap();
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        assert_eq!(
            retired,
            vec![Fake(2)],
            "over the new maximum: closed on return"
        );
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        assert_eq!(pool.stats().size, 1);
        assert!(matches!(
            pool.resize(3, 2, &mut retired),
            Err(Error::InvalidArgument {
                argument: "min_size",
                ..
            })
        ));
    }

    #[test]
    fn a_factory_that_returns_a_held_connection_is_refused() {
        let (pool, _) = pool_with(sized(3));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        assert_eq!(no_wait(&pool).unwrap(), Outcome::Create);
        let (error, returned) = pool.admit(Fake(1)).unwrap_err();
        assert!(matches!(
            error,
            Error::InvalidArgument {
                argument: "create",
                ..
            }
        ));
        assert!(returned.is_none(), "the held connection must not be closed");
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        assert!(pool.housekeep(|conn| conn.0, &mut retired).to_create == 0);
        let stats = pool.stats();
        assert_eq!((stats.size, stats.idle, stats.create_failures), (1, 1, 1));
        pool.resize(2, 3, &mut retired).unwrap();
        assert_eq!(pool.housekeep(|conn| conn.0, &mut retired).to_create, 1);
        assert!(pool.admit_idle(Fake(1), &mut retired).is_err());
        assert_eq!(pool.stats().size, 1);
    }

    #[test]
    fn a_connection_handed_to_a_waiter_cannot_be_returned_again() {
        let (pool, _) = pool_with(sized(1));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let waiter = queue(&pool);
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        let again = pool
            .checkin(1, None, false, false, &mut retired)
            .unwrap_err();
        assert!(again.to_string().contains("already returned"), "{again}");
        assert!(matches!(
            pool.claim(&waiter, |conn: &Fake| conn.0),
            Ok(Outcome::Ready { value: 1, .. })
        ));
    }

    #[test]
    fn a_connection_being_reset_counts_as_held() {
        let (pool, _) = pool_with(sized(2));
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let returning = pool.take_back(1, None).unwrap();
        assert_eq!(no_wait(&pool).unwrap(), Outcome::Create);
        assert!(pool.admit(Fake(1)).is_err(), "connection 1 is being reset");
        assert!(pool.checkin(1, None, false, false, &mut retired).is_err());
        pool.put_back(returning, false, false, &mut retired);
        assert_eq!(borrow(&pool, 9).0, 1);
    }

    #[test]
    fn a_replaced_connection_keeps_its_borrowers_turn() {
        let (pool, _) = pool_with(sized(2));
        let mut retired = Vec::new();
        let (_, lease) = borrow(&pool, 1);
        borrow(&pool, 2);
        pool.checkin(2, None, false, false, &mut retired).unwrap();
        // Connection 1 failed its check: its borrower gets the idle connection 2 instead.
        let next = pool.replace(1, lease, |conn: &Fake| conn.0, &mut retired);
        assert!(matches!(next, Ok(Outcome::Ready { value: 2, .. })));
        assert_eq!(retired, vec![Fake(1)]);
        // Connection 2 fails too and nothing is idle: the borrower keeps the slot to create in.
        let Ok(Outcome::Ready { lease, .. }) = next else {
            unreachable!()
        };
        borrow(&pool, 3);
        let waiter = queue(&pool);
        assert_eq!(
            pool.replace(2, lease, |conn: &Fake| conn.0, &mut retired)
                .unwrap(),
            Outcome::Create
        );
        assert!(!waiter.granted(), "the waiter behind did not overtake");
        let stats = pool.stats();
        assert_eq!((stats.size, stats.broken, stats.closed), (2, 2, 2));
    }

    #[test]
    fn a_hand_off_is_checked_when_the_interval_is_zero() {
        let (pool, _) = pool_with(PoolConfig {
            check_interval_nanos: 0,
            ..sized(1)
        });
        let mut retired = Vec::new();
        borrow(&pool, 1);
        let waiter = queue(&pool);
        pool.checkin(1, None, false, false, &mut retired).unwrap();
        assert!(matches!(
            pool.claim(&waiter, |conn: &Fake| conn.0),
            Ok(Outcome::Ready {
                needs_check: true,
                ..
            })
        ));
    }

    #[test]
    fn waiters_wait_for_background_refills_instead_of_opening_more() {
        let (pool, _) = pool_with(PoolConfig {
            min_size: 1,
            timeout: None,
            ..sized(3)
        });
        let mut retired = Vec::new();
        assert_eq!(pool.housekeep(|conn| conn.0, &mut retired).to_create, 1);
        let Enqueued::Waiting(first) = pool
            .enqueue(Box::new(|| {}), |conn: &Fake| conn.0, &mut retired)
            .unwrap()
        else {
            panic!("a refill is on its way, so the first caller waits for it");
        };
        assert!(matches!(
            pool.enqueue(Box::new(|| {}), |conn: &Fake| conn.0, &mut retired),
            Ok(Enqueued::Now(Outcome::Create))
        ));
        // A caller that cannot wait opens its own.
        assert_eq!(no_wait(&pool).unwrap(), Outcome::Create);
        // The refill fails: the first waiter gets the slot to create in.
        pool.cancel_refill();
        assert_eq!(
            pool.claim(&first, |conn: &Fake| conn.0).unwrap(),
            Outcome::Create
        );
        assert_eq!(pool.stats().size, 3);
    }

    #[test]
    fn bad_configuration_names_the_argument() {
        let cases = [
            (sized(0), "max_size"),
            (
                PoolConfig {
                    min_size: 3,
                    ..sized(2)
                },
                "min_size",
            ),
            (
                PoolConfig {
                    lifetime_jitter: 1.0,
                    ..sized(2)
                },
                "lifetime_jitter",
            ),
            (
                PoolConfig {
                    max_idle_nanos: Some(0),
                    ..sized(2)
                },
                "max_idle",
            ),
        ];
        for (config, name) in cases {
            match TestPool::new("bad", config, Clock::monotonic()) {
                Err(Error::InvalidArgument { argument, .. }) => assert_eq!(argument, name),
                _ => panic!("{name} should be refused"),
            }
        }
    }

    #[test]
    fn threads_never_share_a_connection_or_exceed_max_size() {
        let pool: Arc<Pool<Fake, ()>> = Arc::new(
            Pool::new(
                "stress",
                PoolConfig {
                    max_size: 4,
                    timeout: None,
                    ..PoolConfig::default()
                },
                Clock::monotonic(),
            )
            .unwrap(),
        );
        let holders: Arc<Vec<AtomicU32>> = Arc::new((0..4096).map(|_| AtomicU32::new(0)).collect());
        let next_id = Arc::new(AtomicUsize::new(1));
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (pool, holders, next_id) = (pool.clone(), holders.clone(), next_id.clone());
                scope.spawn(move || {
                    let mut retired = Vec::new();
                    for round in 0..2_000 {
                        let outcome = pool
                            .checkout_with(
                                None,
                                |conn: &Fake| conn.0,
                                &mut retired,
                                |wait: &WaitSlice<'_>| {
                                    Ok::<bool, ()>(wait(Duration::from_millis(5)))
                                },
                            )
                            .unwrap()
                            .unwrap();
                        let (id, lease) = match outcome {
                            Outcome::Ready { value, lease, .. } => (value, lease),
                            Outcome::Create => {
                                let id = next_id.fetch_add(1, Ordering::SeqCst);
                                (id, pool.admit(Fake(id)).map_err(|e| e.0).unwrap())
                            }
                        };
                        assert_eq!(holders[id].fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        holders[id].fetch_sub(1, Ordering::SeqCst);
                        let broken = (round + thread) % 97 == 0;
                        pool.checkin(id, Some(lease), broken, false, &mut retired)
                            .unwrap();
                    }
                });
            }
        });
        let stats = pool.stats();
        assert!(stats.size <= 4 && stats.in_use == 0 && stats.waiting == 0);
        assert_eq!(stats.created - stats.closed, u64::from(stats.size));
    }
}
