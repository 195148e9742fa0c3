//! The circuit breaker's state machine: plain Rust, lock-free, no Python types.
//!
//! Everything the breaker knows lives in atomics that hold no pointers — one state word, a few
//! packed counters and the window's buckets — so the same layout can later live in shared memory
//! and serve every worker process on a host.
//!
//! The state word packs the state, a generation and the open deadline. Every transition bumps
//! the generation, and every per-state record (window buckets and totals, the consecutive-failure
//! count, the half-open permits) is tagged with the generation it belongs to. A record tagged with
//! an older generation reads as empty, so a transition never has to clear anything, and an outcome
//! reported by a call admitted under an earlier state can never touch the current one.

use crate::clock::Clock;
use crate::errors::{Error, Result};
use crate::jitter::JitterSource;
use portable_atomic::AtomicU128;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
    ForcedOpen = 3,
    Disabled = 4,
}

impl State {
    fn from_bits(bits: u64) -> State {
        match bits & STATE_MASK {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::Disabled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// The last N recorded calls.
    Count,
    /// The calls recorded in the last N whole seconds.
    Time,
}

#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Trip after this many failures in a row; `None` turns the rule off.
    pub failure_threshold: Option<u32>,
    /// Trip when failures / calls in the window reach this rate; `None` turns the rule off.
    pub failure_rate_threshold: Option<f64>,
    /// Trip when slow calls / calls in the window reach this rate; `None` turns slow-call tracking off.
    pub slow_call_rate_threshold: Option<f64>,
    pub slow_call_duration_nanos: u64,
    pub window_kind: WindowKind,
    pub window_size: u32,
    pub minimum_calls: u32,
    pub reset_timeout_nanos: u64,
    /// Each trip in a row multiplies the open wait by this factor (1.0 keeps it constant).
    pub backoff_multiplier: f64,
    pub max_reset_timeout_nanos: u64,
    /// The open wait varies by up to this fraction either way, so many clients do not retry at once.
    pub jitter: f64,
    pub half_open_max_calls: u32,
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: Some(5),
            failure_rate_threshold: None,
            slow_call_rate_threshold: None,
            slow_call_duration_nanos: 60_000_000_000,
            window_kind: WindowKind::Count,
            window_size: 100,
            minimum_calls: 10,
            reset_timeout_nanos: 30_000_000_000,
            backoff_multiplier: 1.0,
            max_reset_timeout_nanos: 300_000_000_000,
            jitter: 0.0,
            half_open_max_calls: 1,
            success_threshold: 1,
        }
    }
}

/// The open deadline is stored as wrapping milliseconds in 32 bits, so an open wait must stay
/// well inside 2^31 ms; 24 days is far beyond any sensible reset timeout.
pub const MAX_OPEN_WAIT_NANOS: u64 = 24 * 24 * 3600 * 1_000_000_000;
/// Bucket counters hold 21 bits; a count window never needs more slots than that.
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;
/// A time window is kept as one bucket per second; a day of buckets is the most allowed.
pub const MAX_TIME_WINDOW_SECONDS: u32 = 86_400;
/// The half-open permit word holds 16-bit counts.
pub const MAX_HALF_OPEN_CALLS: u32 = u16::MAX as u32;

impl BreakerConfig {
    /// Checks every field, naming the argument at fault in whole sentences.
    pub fn validate(&self) -> Result<()> {
        if self.failure_threshold == Some(0) {
            return Err(Error::invalid(
                "failure_threshold",
                "failure_threshold must be at least 1, or None to trip on rates only.",
            ));
        }
        for (argument, rate) in [
            ("failure_rate_threshold", self.failure_rate_threshold),
            ("slow_call_rate_threshold", self.slow_call_rate_threshold),
        ] {
            if let Some(rate) = rate {
                if !(rate > 0.0 && rate <= 1.0) {
                    return Err(Error::invalid(
                        argument,
                        format!("{argument} must be a rate above 0 and at most 1 (got {rate})."),
                    ));
                }
            }
        }
        if self.window_size == 0 {
            return Err(Error::invalid(
                "window_size",
                "window_size must be at least 1.",
            ));
        }
        match self.window_kind {
            WindowKind::Count if self.window_size > MAX_COUNT_WINDOW => {
                return Err(Error::invalid(
                    "window_size",
                    format!("window_size of a count window may be at most {MAX_COUNT_WINDOW} calls (got {}).", self.window_size),
                ))
            }
            WindowKind::Time if self.window_size > MAX_TIME_WINDOW_SECONDS => {
                return Err(Error::invalid(
                    "window_size",
                    format!("window_size of a time window may be at most {MAX_TIME_WINDOW_SECONDS} seconds (got {}).", self.window_size),
                ))
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(Error::invalid(
                "minimum_calls",
                "minimum_calls must be at least 1.",
            ));
        }
        if self.reset_timeout_nanos == 0 || self.reset_timeout_nanos > MAX_OPEN_WAIT_NANOS {
            return Err(Error::invalid(
                "reset_timeout",
                "reset_timeout must be above 0 seconds and at most 24 days.",
            ));
        }
        if !(self.backoff_multiplier.is_finite() && self.backoff_multiplier >= 1.0) {
            return Err(Error::invalid(
                "backoff_multiplier",
                format!(
                    "backoff_multiplier must be a finite number of at least 1.0 (got {}).",
                    self.backoff_multiplier
                ),
            ));
        }
        if self.max_reset_timeout_nanos < self.reset_timeout_nanos
            || self.max_reset_timeout_nanos > MAX_OPEN_WAIT_NANOS
        {
            return Err(Error::invalid(
                "max_reset_timeout",
                "max_reset_timeout must be at least reset_timeout and at most 24 days.",
            ));
        }
        if !(self.jitter >= 0.0 && self.jitter < 1.0) {
            return Err(Error::invalid(
                "jitter",
                format!(
                    "jitter must be a fraction from 0 up to (not including) 1 (got {}).",
                    self.jitter
                ),
            ));
        }
        if self.half_open_max_calls == 0 || self.half_open_max_calls > MAX_HALF_OPEN_CALLS {
            return Err(Error::invalid(
                "half_open_max_calls",
                format!("half_open_max_calls must be from 1 to {MAX_HALF_OPEN_CALLS}."),
            ));
        }
        if self.success_threshold == 0 || self.success_threshold > MAX_HALF_OPEN_CALLS {
            return Err(Error::invalid(
                "success_threshold",
                format!("success_threshold must be from 1 to {MAX_HALF_OPEN_CALLS}."),
            ));
        }
        Ok(())
    }

    /// Like resilience4j, a count window can never hold more calls than its size, so the
    /// minimum is clamped to the size rather than making the rate rules unreachable.
    fn effective_minimum_calls(&self) -> u32 {
        match self.window_kind {
            WindowKind::Count => self.minimum_calls.min(self.window_size),
            WindowKind::Time => self.minimum_calls,
        }
    }

    fn tracks_slow_calls(&self) -> bool {
        self.slow_call_rate_threshold.is_some()
    }

    fn uses_window(&self) -> bool {
        self.failure_rate_threshold.is_some() || self.slow_call_rate_threshold.is_some()
    }
}

// ---- packed words -------------------------------------------------------------------------

const STATE_MASK: u64 = 0b111;
const GEN_BITS: u32 = 29;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

#[inline]
fn pack_state(state: State, generation: u32, deadline_ms: u32) -> u64 {
    (state as u64) | (((generation & GEN_MASK) as u64) << 3) | ((deadline_ms as u64) << 32)
}

#[inline]
fn state_generation(word: u64) -> u32 {
    ((word >> 3) as u32) & GEN_MASK
}

#[inline]
fn state_deadline_ms(word: u64) -> u32 {
    (word >> 32) as u32
}

/// `true` when generation `a` came after `b`, allowing for the 29-bit counter to wrap.
#[inline]
fn generation_after(a: u32, b: u32) -> bool {
    let diff = a.wrapping_sub(b) & GEN_MASK;
    diff != 0 && diff < (1 << (GEN_BITS - 1))
}

/// A window bucket: generation (32) | tag (32, the second for time windows) | calls (22) |
/// failures (21) | slow calls (21). Counters saturate rather than overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Bucket {
    generation: u32,
    tag: u32,
    counts: Counts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counts {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

const CALLS_MAX: u32 = (1 << 22) - 1;
const SMALL_MAX: u32 = (1 << 21) - 1;

impl Bucket {
    fn pack(self) -> u128 {
        (self.generation as u128)
            | ((self.tag as u128) << 32)
            | (((self.counts.calls & CALLS_MAX) as u128) << 64)
            | (((self.counts.failures & SMALL_MAX) as u128) << 86)
            | (((self.counts.slow & SMALL_MAX) as u128) << 107)
    }

    fn unpack(word: u128) -> Bucket {
        Bucket {
            generation: word as u32,
            tag: (word >> 32) as u32,
            counts: Counts {
                calls: ((word >> 64) as u32) & CALLS_MAX,
                failures: ((word >> 86) as u32) & SMALL_MAX,
                slow: ((word >> 107) as u32) & SMALL_MAX,
            },
        }
    }
}

/// How a new record meets the bucket already in its slot (same generation).
enum Merge {
    /// Same second of a time window: add to it.
    Add,
    /// An expired bucket, or a count-window slot: take its place.
    Replace,
    /// The slot already moved past this record's time: leave it.
    Drop,
}

/// Window totals: generation (32) | calls (32) | failures (32) | slow (32). Fields change with
/// wrapping arithmetic because a concurrent replacement may subtract a bucket's counts before
/// the thread that filled it has added them; the sum settles once both have run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Totals {
    generation: u32,
    counts: Counts,
}

impl Totals {
    fn pack(self) -> u128 {
        (self.generation as u128)
            | ((self.counts.calls as u128) << 32)
            | ((self.counts.failures as u128) << 64)
            | ((self.counts.slow as u128) << 96)
    }

    fn unpack(word: u128) -> Totals {
        Totals {
            generation: word as u32,
            counts: Counts {
                calls: (word >> 32) as u32,
                failures: (word >> 64) as u32,
                slow: (word >> 96) as u32,
            },
        }
    }
}

impl Counts {
    fn of(failed: bool, slow: bool) -> Counts {
        Counts {
            calls: 1,
            failures: failed as u32,
            slow: slow as u32,
        }
    }

    fn saturating_add(self, other: Counts) -> Counts {
        Counts {
            calls: (self.calls + other.calls).min(CALLS_MAX),
            failures: (self.failures + other.failures).min(SMALL_MAX),
            slow: (self.slow + other.slow).min(SMALL_MAX),
        }
    }

    fn wrapping_add(self, other: Counts) -> Counts {
        Counts {
            calls: self.calls.wrapping_add(other.calls),
            failures: self.failures.wrapping_add(other.failures),
            slow: self.slow.wrapping_add(other.slow),
        }
    }

    fn wrapping_sub(self, other: Counts) -> Counts {
        Counts {
            calls: self.calls.wrapping_sub(other.calls),
            failures: self.failures.wrapping_sub(other.failures),
            slow: self.slow.wrapping_sub(other.slow),
        }
    }

    /// Totals caught between a subtraction and the matching addition show a wrapped field.
    fn settled(self) -> bool {
        const HALF: u32 = 1 << 31;
        self.calls < HALF
            && self.failures <= self.calls
            && self.slow <= self.calls
            && self.failures < HALF
    }
}

/// Packs (generation, count) for the consecutive-failure counter.
#[inline]
fn pack_pair(generation: u32, count: u32) -> u64 {
    (generation as u64) | ((count as u64) << 32)
}

#[inline]
fn unpack_pair(word: u64) -> (u32, u32) {
    (word as u32, (word >> 32) as u32)
}

/// Moves the value of a (generation, value) word: a word of an earlier generation starts from 0,
/// a word of a later one means the caller is stale (`None`). Returns (old, new) value; an
/// unchanged value in the same generation is not written.
fn update_tagged(
    word: &AtomicU64,
    generation: u32,
    next: impl Fn(u32) -> u32,
) -> Option<(u32, u32)> {
    let mut current = word.load(Ordering::Acquire);
    loop {
        let (word_generation, value) = unpack_pair(current);
        let value = if word_generation == generation {
            value
        } else if generation_after(generation, word_generation) {
            0
        } else {
            return None;
        };
        let updated = next(value);
        if updated == value && word_generation == generation {
            return Some((value, updated));
        }
        match word.compare_exchange_weak(
            current,
            pack_pair(generation, updated),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Some((value, updated)),
            Err(seen) => current = seen,
        }
    }
}

/// Packs (generation, calls in flight, successes) for the half-open permits.
#[inline]
fn pack_half_open(generation: u32, in_flight: u32, successes: u32) -> u64 {
    (generation as u64) | ((in_flight as u64) << 32) | ((successes as u64) << 48)
}

#[inline]
fn unpack_half_open(word: u64) -> (u32, u32, u32) {
    (
        word as u32,
        ((word >> 32) as u32) & 0xFFFF,
        ((word >> 48) as u32) & 0xFFFF,
    )
}

// ---- admission and outcomes ---------------------------------------------------------------

/// What a caller holds between admission and recording its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    pub generation: u32,
    pub state: State,
    /// Clock reading at admission, taken only when slow calls are tracked.
    pub started_nanos: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    Permitted(Permit),
    /// Refused; `retry_after_nanos` is `None` while forced open.
    Rejected {
        retry_after_nanos: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Neither success nor failure (an ignored exception, a cancellation): releases the permit.
    Ignored,
}

/// Up to two transitions can follow from one operation (open to half-open, then a trial call's
/// result); the binding calls listeners for each in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transitions {
    items: [Option<Transition>; 2],
}

impl Transitions {
    fn push(&mut self, transition: Transition) {
        if self.items[0].is_none() {
            self.items[0] = Some(transition);
        } else {
            self.items[1] = Some(transition);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items[0].is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = Transition> + '_ {
        self.items.iter().flatten().copied()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    pub state: State,
    /// Failure rate over the window, or `None` before `minimum_calls` calls were seen.
    pub failure_rate: Option<f64>,
    pub slow_call_rate: Option<f64>,
    pub window: Counts,
    pub successes: u64,
    pub failures: u64,
    pub slow_calls: u64,
    pub ignored: u64,
    pub rejected: u64,
    pub transitions: u64,
    pub consecutive_failures: u32,
    pub consecutive_trips: u32,
}

/// The breaker: configuration plus the block of atomics that is its whole state.
pub struct Breaker {
    config: BreakerConfig,
    clock: Clock,
    state: AtomicU64,
    consecutive_failures: AtomicU64,
    half_open: AtomicU64,
    consecutive_trips: AtomicU32,
    window_cursor: AtomicU64,
    window_swept: AtomicU64,
    open_deadline_ms: AtomicU64,
    totals: AtomicU128,
    buckets: Box<[AtomicU128]>,
    jitter: JitterSource,
    successes: AtomicU64,
    failures: AtomicU64,
    slow_calls: AtomicU64,
    ignored: AtomicU64,
    rejected: AtomicU64,
    transitions: AtomicU64,
}

const NANOS_PER_MS: u64 = 1_000_000;
const NANOS_PER_SECOND: u64 = 1_000_000_000;

impl Breaker {
    pub fn new(config: BreakerConfig, clock: Clock) -> Result<Breaker> {
        config.validate()?;
        let bucket_count = if config.uses_window() {
            config.window_size as usize
        } else {
            0
        };
        let seed = clock.now_nanos() ^ (bucket_count as u64).rotate_left(17);
        Ok(Breaker {
            clock,
            state: AtomicU64::new(pack_state(State::Closed, 0, 0)),
            consecutive_failures: AtomicU64::new(pack_pair(0, 0)),
            half_open: AtomicU64::new(pack_half_open(0, 0, 0)),
            consecutive_trips: AtomicU32::new(0),
            window_cursor: AtomicU64::new(0),
            window_swept: AtomicU64::new(pack_pair(0, 0)),
            open_deadline_ms: AtomicU64::new(0),
            totals: AtomicU128::new(0),
            buckets: (0..bucket_count).map(|_| AtomicU128::new(0)).collect(),
            jitter: JitterSource::new(seed),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slow_calls: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            config,
        })
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The current state, first moving an expired open state to half-open.
    pub fn state(&self) -> (State, Transitions) {
        let mut transitions = Transitions::default();
        loop {
            let word = self.state.load(Ordering::Acquire);
            let state = State::from_bits(word);
            if state == State::Open {
                let now = self.clock.now_nanos();
                if self.deadline_passed(word, now) {
                    if let Some(transition) = self.try_transition(word, State::HalfOpen, now) {
                        transitions.push(transition);
                    }
                    continue;
                }
            }
            return (state, transitions);
        }
    }

    /// Admits or refuses one call without blocking; the hot path in the closed state is one load.
    #[inline]
    pub fn try_acquire(&self) -> (Admission, Transitions) {
        let word = self.state.load(Ordering::Acquire);
        if State::from_bits(word) == State::Closed {
            return (
                Admission::Permitted(Permit {
                    generation: state_generation(word),
                    state: State::Closed,
                    started_nanos: self.start_time(),
                }),
                Transitions::default(),
            );
        }
        self.try_acquire_slow(word)
    }

    #[inline]
    fn start_time(&self) -> u64 {
        if self.config.tracks_slow_calls() {
            self.clock.now_nanos()
        } else {
            0
        }
    }

    #[cold]
    fn try_acquire_slow(&self, mut word: u64) -> (Admission, Transitions) {
        let mut transitions = Transitions::default();
        loop {
            let generation = state_generation(word);
            match State::from_bits(word) {
                State::Closed | State::Disabled => {
                    let permit = Permit {
                        generation,
                        state: State::from_bits(word),
                        started_nanos: self.start_time(),
                    };
                    return (Admission::Permitted(permit), transitions);
                }
                State::ForcedOpen => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    let rejected = Admission::Rejected {
                        retry_after_nanos: None,
                    };
                    return (rejected, transitions);
                }
                State::Open => {
                    let now = self.clock.now_nanos();
                    if self.deadline_passed(word, now) {
                        if let Some(transition) = self.try_transition(word, State::HalfOpen, now) {
                            transitions.push(transition);
                        }
                    } else {
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                        let deadline_nanos = self.deadline_in_nanos(word, now);
                        let rejected = Admission::Rejected {
                            retry_after_nanos: Some(deadline_nanos.saturating_sub(now)),
                        };
                        return (rejected, transitions);
                    }
                }
                State::HalfOpen => {
                    if let Some(admission) = self.admit_half_open(generation) {
                        return (admission, transitions);
                    }
                }
            }
            word = self.state.load(Ordering::Acquire);
        }
    }

    /// Takes a half-open permit if one is free; `None` when the state moved on meanwhile.
    fn admit_half_open(&self, generation: u32) -> Option<Admission> {
        let mut current = self.half_open.load(Ordering::Acquire);
        loop {
            let (word_generation, in_flight, successes) = unpack_half_open(current);
            // Trial calls still running from an earlier half-open period stay counted: they are
            // inside the dependency too. Only the successes start afresh.
            let successes = if word_generation == generation {
                successes
            } else if generation_after(generation, word_generation) {
                0
            } else {
                return None;
            };
            if in_flight >= self.config.half_open_max_calls {
                if state_generation(self.state.load(Ordering::Acquire)) != generation {
                    return None;
                }
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return Some(Admission::Rejected {
                    retry_after_nanos: Some(0),
                });
            }
            let next = pack_half_open(generation, in_flight + 1, successes);
            match self.half_open.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Admission::Permitted(Permit {
                        generation,
                        state: State::HalfOpen,
                        started_nanos: self.start_time(),
                    }))
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Records how an admitted call ended. Returns the transitions it caused.
    #[inline]
    pub fn record(&self, permit: Permit, outcome: Outcome) -> Transitions {
        if permit.state == State::Disabled {
            // Like resilience4j, a disabled breaker neither decides nor counts.
            return Transitions::default();
        }
        let slow = outcome != Outcome::Ignored
            && self.config.tracks_slow_calls()
            && self.clock.now_nanos().saturating_sub(permit.started_nanos)
                >= self.config.slow_call_duration_nanos;
        match outcome {
            Outcome::Success => self.successes.fetch_add(1, Ordering::Relaxed),
            Outcome::Failure => self.failures.fetch_add(1, Ordering::Relaxed),
            Outcome::Ignored => self.ignored.fetch_add(1, Ordering::Relaxed),
        };
        if slow {
            self.slow_calls.fetch_add(1, Ordering::Relaxed);
        }
        match permit.state {
            State::Closed => self.record_closed(permit.generation, outcome, slow),
            State::HalfOpen => self.record_half_open(permit.generation, outcome, slow),
            _ => Transitions::default(),
        }
    }

    fn record_closed(&self, generation: u32, outcome: Outcome, slow: bool) -> Transitions {
        let failed = match outcome {
            Outcome::Ignored => return Transitions::default(),
            Outcome::Failure => true,
            Outcome::Success => false,
        };
        // Only a call admitted in the current closed period may touch its run and window.
        if !self.is_current(State::Closed, generation) {
            return Transitions::default();
        }
        let Some(run) = self.record_consecutive(generation, failed) else {
            return Transitions::default();
        };
        let mut trip = self
            .config
            .failure_threshold
            .is_some_and(|threshold| run >= threshold);
        if !trip && self.config.uses_window() {
            if let Some(counts) = self.record_window(generation, failed, slow) {
                trip = self.rates_exceeded(counts);
            }
        }
        let mut transitions = Transitions::default();
        if trip {
            let word = self.state.load(Ordering::Acquire);
            if State::from_bits(word) == State::Closed && state_generation(word) == generation {
                if let Some(transition) =
                    self.try_transition(word, State::Open, self.clock.now_nanos())
                {
                    transitions.push(transition);
                }
            }
        }
        transitions
    }

    #[inline]
    fn is_current(&self, state: State, generation: u32) -> bool {
        let word = self.state.load(Ordering::Acquire);
        State::from_bits(word) == state && state_generation(word) == generation
    }

    /// Updates the run of failures; `None` when the record belongs to an earlier generation.
    fn record_consecutive(&self, generation: u32, failed: bool) -> Option<u32> {
        let next = |run: u32| if failed { run.saturating_add(1) } else { 0 };
        update_tagged(&self.consecutive_failures, generation, next).map(|(_, run)| run)
    }

    fn rates_exceeded(&self, counts: Counts) -> bool {
        if counts.calls < self.config.effective_minimum_calls() || counts.calls == 0 {
            return false;
        }
        let calls = counts.calls as f64;
        let over = |threshold: Option<f64>, count: u32| {
            threshold.is_some_and(|threshold| count as f64 / calls >= threshold)
        };
        over(self.config.failure_rate_threshold, counts.failures)
            || over(self.config.slow_call_rate_threshold, counts.slow)
    }

    /// Puts one call into the window and returns the window's totals when they changed and
    /// are settled; `None` when nothing changed, the record is stale, or totals are mid-update.
    fn record_window(&self, generation: u32, failed: bool, slow: bool) -> Option<Counts> {
        let outcome = Counts::of(failed, slow);
        match self.config.window_kind {
            WindowKind::Count => {
                let index = self.next_count_slot(generation)?;
                let mine = Bucket {
                    generation,
                    tag: 0,
                    counts: outcome,
                };
                self.put_bucket(index, mine, |_| Merge::Replace)
            }
            WindowKind::Time => {
                let full_second = self.clock.now_nanos() / NANOS_PER_SECOND;
                // Tags keep 32 bits and compare with wrap-around; the slot comes from the full
                // second, so consecutive seconds never share a slot across the wrap.
                let second = full_second as u32;
                let swept = self.sweep_expired(generation, second);
                let index = (full_second % self.buckets.len() as u64) as usize;
                let mine = Bucket {
                    generation,
                    tag: second,
                    counts: outcome,
                };
                let changed = self.put_bucket(index, mine, |existing| {
                    let ahead = existing.tag.wrapping_sub(second);
                    if existing.counts == Counts::default() {
                        Merge::Replace
                    } else if ahead == 0 {
                        Merge::Add
                    } else if ahead < (1 << 31) {
                        // The bucket already holds a later second: this reading is so old its
                        // call has left the window.
                        Merge::Drop
                    } else {
                        Merge::Replace
                    }
                });
                changed.or(swept)
            }
        }
    }

    /// Claims the next slot of a count window for `generation`. The cursor is tagged with its
    /// generation so a stale record can never take a slot from the current window.
    fn next_count_slot(&self, generation: u32) -> Option<usize> {
        let size = self.buckets.len() as u32;
        update_tagged(&self.window_cursor, generation, |index| (index + 1) % size)
            .map(|(index, _)| index as usize)
    }

    /// Writes `mine` into bucket `index`: added to the existing bucket when `accumulates` says
    /// so, replacing it otherwise, then moves the totals by the difference.
    fn put_bucket(
        &self,
        index: usize,
        mine: Bucket,
        merge: impl Fn(&Bucket) -> Merge,
    ) -> Option<Counts> {
        let slot = &self.buckets[index];
        let mut current = slot.load(Ordering::Acquire);
        let (added, removed) = loop {
            let existing = Bucket::unpack(current);
            if existing.generation != mine.generation
                && generation_after(existing.generation, mine.generation)
            {
                return None;
            }
            let (next, added, removed) = if existing.generation != mine.generation {
                // A bucket of an earlier period reads as empty.
                (mine, mine.counts, Counts::default())
            } else {
                match merge(&existing) {
                    Merge::Add => {
                        let next = Bucket {
                            counts: existing.counts.saturating_add(mine.counts),
                            ..existing
                        };
                        (next, mine.counts, Counts::default())
                    }
                    Merge::Replace => (mine, mine.counts, existing.counts),
                    Merge::Drop => return None,
                }
            };
            if next == existing {
                // The slot already says exactly this (a success replacing a success).
                return None;
            }
            match slot.compare_exchange_weak(
                current,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break (added, removed),
                Err(seen) => current = seen,
            }
        };
        if added == removed {
            return None;
        }
        self.move_totals(mine.generation, added, removed)
    }

    fn move_totals(&self, generation: u32, added: Counts, removed: Counts) -> Option<Counts> {
        let mut current = self.totals.load(Ordering::Acquire);
        loop {
            let totals = Totals::unpack(current);
            let base = if totals.generation == generation {
                totals.counts
            } else if generation_after(generation, totals.generation) {
                Counts::default()
            } else {
                return None;
            };
            let counts = base.wrapping_add(added).wrapping_sub(removed);
            let next = Totals { generation, counts };
            match self.totals.compare_exchange_weak(
                current,
                next.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return counts.settled().then_some(counts),
                Err(seen) => current = seen,
            }
        }
    }

    /// Empties the buckets of `generation` that fell out of the time window ending at `second`;
    /// runs at most once per second. Returns the totals when anything was removed.
    fn sweep_expired(&self, generation: u32, second: u32) -> Option<Counts> {
        let swept = self.window_swept.load(Ordering::Acquire);
        let (swept_generation, swept_second) = unpack_pair(swept);
        // Any other second is due: a reading that lags another thread's only clears what has
        // expired for both, so no wrap-around comparison is needed.
        let due = if swept_generation == generation {
            second != swept_second
        } else {
            generation_after(generation, swept_generation)
        };
        let claim = pack_pair(generation, second);
        if !due
            || self
                .window_swept
                .compare_exchange(swept, claim, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        let size = self.buckets.len() as u32;
        let mut latest = None;
        for slot in self.buckets.iter() {
            let mut current = slot.load(Ordering::Acquire);
            loop {
                let bucket = Bucket::unpack(current);
                let expired = bucket.generation == generation
                    && bucket.counts != Counts::default()
                    && second.wrapping_sub(bucket.tag) >= size
                    && second.wrapping_sub(bucket.tag) < (1 << 31);
                if !expired {
                    break;
                }
                let emptied = Bucket {
                    counts: Counts::default(),
                    ..bucket
                };
                match slot.compare_exchange_weak(
                    current,
                    emptied.pack(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        if let Some(counts) =
                            self.move_totals(generation, Counts::default(), bucket.counts)
                        {
                            latest = Some(counts);
                        }
                        break;
                    }
                    Err(seen) => current = seen,
                }
            }
        }
        latest
    }

    fn record_half_open(&self, generation: u32, outcome: Outcome, slow: bool) -> Transitions {
        // A slow trial call means the dependency is still unhealthy, so it counts as a failure.
        let failed = outcome == Outcome::Failure || slow;
        let succeeded = outcome == Outcome::Success && !slow;
        let mut current = self.half_open.load(Ordering::Acquire);
        let successes = loop {
            let (word_generation, in_flight, successes) = unpack_half_open(current);
            // Every trial call gives its slot back, also one of an earlier half-open period;
            // only a call of the current period counts toward closing.
            let current_period = word_generation == generation;
            let successes = successes + (succeeded && current_period) as u32;
            let next = pack_half_open(word_generation, in_flight.saturating_sub(1), successes);
            match self.half_open.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if current_period => break successes,
                Ok(_) => return Transitions::default(),
                Err(seen) => current = seen,
            }
        };
        let target = if failed {
            State::Open
        } else if succeeded && successes >= self.config.success_threshold {
            State::Closed
        } else {
            return Transitions::default();
        };
        let mut transitions = Transitions::default();
        let word = self.state.load(Ordering::Acquire);
        if State::from_bits(word) == State::HalfOpen && state_generation(word) == generation {
            if let Some(transition) = self.try_transition(word, target, self.clock.now_nanos()) {
                transitions.push(transition);
            }
        }
        transitions
    }

    /// Moves from the state in `word` to `target` if nobody else moved it first.
    fn try_transition(&self, word: u64, target: State, now_nanos: u64) -> Option<Transition> {
        let from = State::from_bits(word);
        let generation = state_generation(word).wrapping_add(1) & GEN_MASK;
        let trips = self.consecutive_trips.load(Ordering::Acquire);
        let (deadline_ms, next_trips) = match target {
            State::Open => {
                let trips = trips.saturating_add(1);
                let wait = self.open_wait_nanos(trips);
                let deadline = (now_nanos + wait).div_ceil(NANOS_PER_MS);
                (deadline, trips)
            }
            State::Closed => (0, 0),
            _ => (0, trips),
        };
        let next = pack_state(target, generation, deadline_ms as u32);
        self.state
            .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        if target == State::Open {
            self.open_deadline_ms.store(deadline_ms, Ordering::Release);
        }
        self.consecutive_trips.store(next_trips, Ordering::Release);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        Some(Transition { from, to: target })
    }

    /// The open wait after `trips` trips in a row: reset timeout grown by the multiplier,
    /// capped, then spread by jitter (and capped again so the cap holds).
    fn open_wait_nanos(&self, trips: u32) -> u64 {
        let config = &self.config;
        let base = config.reset_timeout_nanos as f64;
        let grown = base
            * config
                .backoff_multiplier
                .powi(trips.saturating_sub(1).min(1024) as i32);
        let capped = grown.min(config.max_reset_timeout_nanos as f64);
        let spread = if config.jitter > 0.0 {
            let unit = self.jitter.next_unit();
            capped * (1.0 + config.jitter * (2.0 * unit - 1.0))
        } else {
            capped
        };
        (spread
            .min(config.max_reset_timeout_nanos as f64)
            .max(NANOS_PER_MS as f64)) as u64
    }

    /// Moves to `target` whatever the current state (operator actions: force open, disable, reset).
    pub fn transition_to(&self, target: State) -> Transitions {
        let mut transitions = Transitions::default();
        loop {
            let word = self.state.load(Ordering::Acquire);
            let current = State::from_bits(word);
            if current == target && target == State::Closed {
                // Resetting a closed breaker starts a fresh window and forgets the run of
                // failures: a new generation, but no transition to report.
                let next = pack_state(State::Closed, state_generation(word).wrapping_add(1), 0);
                if self
                    .state
                    .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.consecutive_trips.store(0, Ordering::Release);
                    return transitions;
                }
                continue;
            }
            if current == target && target != State::Open {
                return transitions;
            }
            if let Some(transition) = self.try_transition(word, target, self.clock.now_nanos()) {
                transitions.push(transition);
                return transitions;
            }
        }
    }

    /// The open deadline in clock milliseconds. The state word keeps only its low 32 bits (so
    /// state, generation and deadline change in one atomic step); the full value is written to
    /// `open_deadline_ms` right after the transition. Until that store lands, the low bits are
    /// completed from `now`, which is then within moments of the trip.
    fn deadline_ms(&self, word: u64, now_nanos: u64) -> u64 {
        let low = state_deadline_ms(word);
        let full = self.open_deadline_ms.load(Ordering::Acquire);
        if full as u32 == low {
            return full;
        }
        let now_ms = now_nanos / NANOS_PER_MS;
        let ahead = low.wrapping_sub(now_ms as u32);
        if ahead < (1 << 31) {
            now_ms + ahead as u64
        } else {
            now_ms.saturating_sub((now_ms as u32).wrapping_sub(low) as u64)
        }
    }

    #[inline]
    fn deadline_passed(&self, word: u64, now_nanos: u64) -> bool {
        now_nanos / NANOS_PER_MS >= self.deadline_ms(word, now_nanos)
    }

    /// The deadline in clock nanoseconds.
    fn deadline_in_nanos(&self, word: u64, now_nanos: u64) -> u64 {
        self.deadline_ms(word, now_nanos) * NANOS_PER_MS
    }

    /// Seconds until an open breaker admits a trial call (0 when it admits now, `None` when forced open).
    pub fn retry_after_nanos(&self) -> Option<u64> {
        let word = self.state.load(Ordering::Acquire);
        match State::from_bits(word) {
            State::ForcedOpen => None,
            State::Open => {
                let now = self.clock.now_nanos();
                Some(self.deadline_in_nanos(word, now).saturating_sub(now))
            }
            _ => Some(0),
        }
    }

    /// Sums the window as it stands now, counting only buckets of the current closed period.
    fn window_counts(&self, generation: u32, now_nanos: u64) -> Counts {
        let second = (now_nanos / NANOS_PER_SECOND) as u32;
        let size = self.buckets.len() as u32;
        self.buckets
            .iter()
            .map(|slot| Bucket::unpack(slot.load(Ordering::Acquire)))
            .filter(|bucket| bucket.generation == generation)
            .filter(|bucket| match self.config.window_kind {
                WindowKind::Count => true,
                WindowKind::Time => second.wrapping_sub(bucket.tag) < size,
            })
            .fold(Counts::default(), |sum, bucket| {
                sum.wrapping_add(bucket.counts)
            })
    }

    pub fn metrics(&self) -> Metrics {
        let word = self.state.load(Ordering::Acquire);
        let state = State::from_bits(word);
        let generation = state_generation(word);
        let window = if state == State::Closed {
            self.window_counts(generation, self.clock.now_nanos())
        } else {
            Counts::default()
        };
        let rate = |count: u32| {
            (window.calls >= self.config.effective_minimum_calls() && window.calls > 0)
                .then(|| count as f64 / window.calls as f64)
        };
        let (run_generation, run) = unpack_pair(self.consecutive_failures.load(Ordering::Acquire));
        Metrics {
            state,
            failure_rate: rate(window.failures),
            slow_call_rate: rate(window.slow),
            window,
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            slow_calls: self.slow_calls.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            transitions: self.transitions.load(Ordering::Relaxed),
            consecutive_failures: if run_generation == generation && state == State::Closed {
                run
            } else {
                0
            },
            consecutive_trips: self.consecutive_trips.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualTime;
    use std::sync::Arc;

    const SECOND: u64 = NANOS_PER_SECOND;

    fn manual(config: BreakerConfig) -> (Breaker, Arc<ManualTime>) {
        let time = Arc::new(ManualTime::new(0));
        let breaker = Breaker::new(config, Clock::Manual(time.clone())).unwrap();
        (breaker, time)
    }

    fn admit(breaker: &Breaker) -> Permit {
        match breaker.try_acquire().0 {
            Admission::Permitted(permit) => permit,
            rejected => panic!("expected a permit, got {rejected:?}"),
        }
    }

    fn run(breaker: &Breaker, outcome: Outcome) -> Transitions {
        let permit = admit(breaker);
        breaker.record(permit, outcome)
    }

    #[test]
    fn trips_after_consecutive_failures_and_rejects_until_timeout() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(3),
            reset_timeout_nanos: 10 * SECOND,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Success);
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.state().0, State::Closed);
        let transitions = run(&breaker, Outcome::Failure);
        assert_eq!(
            transitions.iter().collect::<Vec<_>>(),
            vec![Transition {
                from: State::Closed,
                to: State::Open
            }]
        );
        time.advance(4 * SECOND);
        assert_eq!(
            breaker.try_acquire().0,
            Admission::Rejected {
                retry_after_nanos: Some(6 * SECOND)
            }
        );
        time.advance(6 * SECOND);
        let (admission, transitions) = breaker.try_acquire();
        assert!(matches!(admission, Admission::Permitted(p) if p.state == State::HalfOpen));
        assert_eq!(transitions.iter().count(), 1);
    }

    #[test]
    fn half_open_limits_concurrent_trials_and_closes_on_successes() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(1),
            reset_timeout_nanos: SECOND,
            half_open_max_calls: 2,
            success_threshold: 3,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        time.advance(SECOND);
        let first = admit(&breaker);
        let second = admit(&breaker);
        assert!(matches!(
            breaker.try_acquire().0,
            Admission::Rejected { .. }
        ));
        breaker.record(first, Outcome::Success);
        breaker.record(second, Outcome::Success);
        assert_eq!(breaker.state().0, State::HalfOpen);
        let transitions = run(&breaker, Outcome::Success);
        assert_eq!(breaker.state().0, State::Closed);
        assert_eq!(transitions.iter().next().unwrap().to, State::Closed);
    }

    #[test]
    fn trial_calls_of_an_earlier_half_open_period_keep_their_slots() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(1),
            reset_timeout_nanos: SECOND,
            half_open_max_calls: 2,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        time.advance(SECOND);
        let slow_trial = admit(&breaker);
        run(&breaker, Outcome::Failure); // another trial fails: open again
        time.advance(SECOND);
        let trial = admit(&breaker); // the slow trial still holds one of the two slots
        assert!(matches!(
            breaker.try_acquire().0,
            Admission::Rejected { .. }
        ));
        breaker.record(slow_trial, Outcome::Success); // stale: frees its slot, closes nothing
        assert_eq!(breaker.state().0, State::HalfOpen);
        let another = admit(&breaker);
        breaker.record(trial, Outcome::Success);
        assert_eq!(breaker.state().0, State::Closed);
        breaker.record(another, Outcome::Ignored);
    }

    #[test]
    fn half_open_failure_reopens_with_backoff() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(1),
            reset_timeout_nanos: SECOND,
            backoff_multiplier: 2.0,
            max_reset_timeout_nanos: 3 * SECOND,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.retry_after_nanos(), Some(SECOND));
        time.advance(SECOND);
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.retry_after_nanos(), Some(2 * SECOND));
        time.advance(2 * SECOND);
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.retry_after_nanos(), Some(3 * SECOND), "capped");
        time.advance(3 * SECOND);
        run(&breaker, Outcome::Success);
        assert_eq!(breaker.state().0, State::Closed);
        run(&breaker, Outcome::Failure);
        assert_eq!(
            breaker.retry_after_nanos(),
            Some(SECOND),
            "trips reset on close"
        );
    }

    #[test]
    fn stale_outcomes_do_not_touch_the_new_state() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(2),
            reset_timeout_nanos: SECOND,
            ..BreakerConfig::default()
        });
        let early = admit(&breaker);
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Failure);
        time.advance(SECOND);
        run(&breaker, Outcome::Success);
        assert_eq!(breaker.state().0, State::Closed);
        // Admitted in the first closed period; its failure must not count toward the new one.
        breaker.record(early, Outcome::Failure);
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.state().0, State::Closed);
        assert_eq!(breaker.metrics().consecutive_failures, 1);
    }

    #[test]
    fn stale_outcome_takes_no_slot_from_the_count_window() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(0.5),
            window_size: 4,
            minimum_calls: 4,
            reset_timeout_nanos: SECOND,
            ..BreakerConfig::default()
        });
        let long_call = admit(&breaker);
        for _ in 0..4 {
            run(&breaker, Outcome::Failure);
        }
        time.advance(SECOND);
        run(&breaker, Outcome::Success);
        for outcome in [
            Outcome::Failure,
            Outcome::Success,
            Outcome::Success,
            Outcome::Success,
        ] {
            run(&breaker, outcome);
        }
        breaker.record(long_call, Outcome::Success);
        run(&breaker, Outcome::Success);
        run(&breaker, Outcome::Failure); // the window is S S S F now: a rate of 0.25
        assert_eq!(breaker.state().0, State::Closed);
    }

    #[test]
    fn stale_outcome_does_not_sweep_for_the_current_window() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(0.5),
            window_kind: WindowKind::Time,
            window_size: 2,
            minimum_calls: 3,
            ..BreakerConfig::default()
        });
        let stale = admit(&breaker);
        breaker.transition_to(State::Closed);
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Failure);
        time.advance(5 * SECOND);
        breaker.record(stale, Outcome::Success);
        run(&breaker, Outcome::Success);
        assert_eq!(breaker.metrics().window.calls, 1);
        assert_eq!(breaker.state().0, State::Closed);
    }

    #[test]
    fn an_open_breaker_left_alone_for_weeks_still_expires() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(1),
            reset_timeout_nanos: SECOND,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        time.advance(60 * 86_400 * SECOND);
        assert_eq!(breaker.retry_after_nanos(), Some(0));
        assert!(matches!(
            breaker.try_acquire().0,
            Admission::Permitted(Permit {
                state: State::HalfOpen,
                ..
            })
        ));
    }

    #[test]
    fn time_window_works_at_clock_readings_past_two_to_the_31_seconds() {
        let time = Arc::new(ManualTime::new(((1u64 << 31) + 5) * SECOND));
        let breaker = Breaker::new(
            BreakerConfig {
                failure_threshold: None,
                failure_rate_threshold: Some(0.5),
                window_kind: WindowKind::Time,
                window_size: 1,
                minimum_calls: 2,
                ..BreakerConfig::default()
            },
            Clock::Manual(time.clone()),
        )
        .unwrap();
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.metrics().window.calls, 1);
        time.advance(10 * SECOND);
        run(&breaker, Outcome::Success);
        assert_eq!(breaker.state().0, State::Closed);
    }

    #[test]
    fn time_window_keeps_consecutive_seconds_apart_across_the_32_bit_wrap() {
        let time = Arc::new(ManualTime::new(((1u64 << 32) - 3) * SECOND));
        let breaker = Breaker::new(
            BreakerConfig {
                failure_threshold: None,
                failure_rate_threshold: Some(0.25),
                window_kind: WindowKind::Time,
                window_size: 3,
                minimum_calls: 5,
                ..BreakerConfig::default()
            },
            Clock::Manual(time.clone()),
        )
        .unwrap();
        for _ in 0..3 {
            time.advance(SECOND);
            run(&breaker, Outcome::Success);
        }
        assert_eq!(breaker.metrics().window.calls, 3);
    }

    #[test]
    fn count_window_trips_on_failure_rate_after_minimum_calls() {
        let (breaker, _) = manual(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(0.5),
            window_size: 4,
            minimum_calls: 4,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Success);
        assert_eq!(breaker.state().0, State::Closed);
        assert_eq!(breaker.metrics().failure_rate, None);
        run(&breaker, Outcome::Success);
        assert_eq!(breaker.state().0, State::Open);
    }

    #[test]
    fn count_window_forgets_the_oldest_call() {
        let (breaker, _) = manual(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(0.75),
            window_size: 4,
            minimum_calls: 4,
            ..BreakerConfig::default()
        });
        for outcome in [Outcome::Failure, Outcome::Failure, Outcome::Success] {
            run(&breaker, outcome);
        }
        run(&breaker, Outcome::Success);
        let metrics = breaker.metrics();
        assert_eq!(metrics.window.calls, 4);
        assert_eq!(metrics.window.failures, 2);
        run(&breaker, Outcome::Failure); // replaces the first failure
        assert_eq!(breaker.metrics().window.failures, 2);
        run(&breaker, Outcome::Failure); // replaces the second failure
        run(&breaker, Outcome::Failure); // replaces a success: 3 of 4 fail
        assert_eq!(breaker.state().0, State::Open);
    }

    #[test]
    fn time_window_drops_buckets_older_than_the_window() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(0.5),
            window_kind: WindowKind::Time,
            window_size: 10,
            minimum_calls: 4,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        run(&breaker, Outcome::Failure);
        time.advance(10 * SECOND);
        run(&breaker, Outcome::Success);
        run(&breaker, Outcome::Success);
        run(&breaker, Outcome::Failure);
        let metrics = breaker.metrics();
        assert_eq!(metrics.window.calls, 3);
        assert_eq!(breaker.state().0, State::Closed);
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.state().0, State::Open);
    }

    #[test]
    fn slow_calls_trip_on_slow_rate() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: None,
            slow_call_rate_threshold: Some(1.0),
            slow_call_duration_nanos: SECOND,
            window_size: 2,
            minimum_calls: 2,
            ..BreakerConfig::default()
        });
        for _ in 0..2 {
            let permit = admit(&breaker);
            time.advance(2 * SECOND);
            breaker.record(permit, Outcome::Success);
        }
        assert_eq!(breaker.state().0, State::Open);
        assert_eq!(breaker.metrics().slow_calls, 2);
    }

    #[test]
    fn forced_open_and_disabled() {
        let (breaker, _) = manual(BreakerConfig::default());
        breaker.transition_to(State::ForcedOpen);
        assert_eq!(
            breaker.try_acquire().0,
            Admission::Rejected {
                retry_after_nanos: None
            }
        );
        breaker.transition_to(State::Disabled);
        for _ in 0..20 {
            run(&breaker, Outcome::Failure);
        }
        assert_eq!(breaker.state().0, State::Disabled);
        breaker.transition_to(State::Closed);
        assert_eq!(breaker.state().0, State::Closed);
        assert_eq!(breaker.metrics().transitions, 3);
        run(&breaker, Outcome::Failure);
        assert_eq!(breaker.metrics().consecutive_failures, 1);
        breaker.transition_to(State::Closed);
        assert_eq!(
            breaker.metrics().consecutive_failures,
            0,
            "reset starts afresh"
        );
        assert_eq!(
            breaker.metrics().transitions,
            3,
            "closed to closed is no transition"
        );
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(1),
            reset_timeout_nanos: 10 * SECOND,
            max_reset_timeout_nanos: 100 * SECOND,
            jitter: 0.5,
            ..BreakerConfig::default()
        });
        let mut seen = Vec::new();
        for _ in 0..50 {
            breaker.transition_to(State::Closed);
            run(&breaker, Outcome::Failure);
            let wait = breaker.retry_after_nanos().unwrap();
            assert!((5 * SECOND - NANOS_PER_MS..=15 * SECOND + NANOS_PER_MS).contains(&wait));
            seen.push(wait);
            time.advance(SECOND);
        }
        seen.sort();
        seen.dedup();
        assert!(seen.len() > 10, "jitter should spread the waits");
    }

    #[test]
    fn bad_config_names_the_argument() {
        let cases: Vec<(BreakerConfig, &str)> = vec![
            (
                BreakerConfig {
                    failure_rate_threshold: Some(1.5),
                    ..BreakerConfig::default()
                },
                "failure_rate_threshold",
            ),
            (
                BreakerConfig {
                    window_size: 0,
                    ..BreakerConfig::default()
                },
                "window_size",
            ),
            (
                BreakerConfig {
                    half_open_max_calls: 0,
                    ..BreakerConfig::default()
                },
                "half_open_max_calls",
            ),
        ];
        for (config, argument) in cases {
            match config.validate() {
                Err(Error::InvalidArgument { argument: got, .. }) => assert_eq!(got, argument),
                other => panic!("expected an error naming {argument}, got {other:?}"),
            }
        }
    }

    #[test]
    fn threads_never_exceed_half_open_permits() {
        use std::sync::atomic::AtomicI64;
        let (breaker, time) = manual(BreakerConfig {
            failure_threshold: Some(1),
            reset_timeout_nanos: SECOND,
            half_open_max_calls: 3,
            success_threshold: MAX_HALF_OPEN_CALLS,
            ..BreakerConfig::default()
        });
        run(&breaker, Outcome::Failure);
        time.advance(SECOND);
        let inside = AtomicI64::new(0);
        let peak = AtomicI64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..2000 {
                        if let Admission::Permitted(permit) = breaker.try_acquire().0 {
                            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            std::hint::spin_loop();
                            inside.fetch_sub(1, Ordering::SeqCst);
                            breaker.record(permit, Outcome::Success);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(breaker.state().0, State::HalfOpen);
        let (_, in_flight, _) = unpack_half_open(breaker.half_open.load(Ordering::SeqCst));
        assert_eq!(in_flight, 0, "every permit came back");
    }

    #[test]
    fn concurrent_window_totals_match_the_buckets() {
        let (breaker, _) = manual(BreakerConfig {
            failure_threshold: None,
            failure_rate_threshold: Some(1.0),
            window_size: 7,
            minimum_calls: 7,
            ..BreakerConfig::default()
        });
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let breaker = &breaker;
                scope.spawn(move || {
                    for i in 0..5000 {
                        let outcome = if (i + thread) % 3 == 0 {
                            Outcome::Failure
                        } else {
                            Outcome::Success
                        };
                        // All seven slots may fail at once and trip it; keep going either way.
                        if let Admission::Permitted(permit) = breaker.try_acquire().0 {
                            breaker.record(permit, outcome);
                        }
                    }
                });
            }
        });
        let totals = Totals::unpack(breaker.totals.load(Ordering::SeqCst));
        let summed = breaker.window_counts(totals.generation, 0);
        assert_eq!(totals.counts, summed);
        assert!(summed.calls <= 7);
    }
}
