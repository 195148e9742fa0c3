//! The bulkhead's permit accounting: plain Rust, no Python types.
//!
//! One mutex guards the count of active calls and the FIFO queue of waiters. A release with
//! waiters hands its permit straight to the head of the queue (the count never dips), so a
//! newcomer can never overtake someone who waited. Waiters are threads (woken by a condition
//! variable on the same mutex) or callbacks (for asyncio, which must not block a thread).

use crate::errors::{Error, FullReason, Result};
pub use crate::waiting::WaitSlice;
use crate::waiting::{Signal, Wake};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BulkheadConfig {
    pub max_concurrent: u32,
    /// How many callers may wait for a permit at once; more are refused at once.
    pub max_waiting: u32,
    /// The longest a caller waits by default; `None` waits as long as it takes.
    pub max_wait: Option<Duration>,
}

impl BulkheadConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_concurrent == 0 {
            return Err(Error::invalid(
                "max_concurrent",
                "max_concurrent must be at least 1.",
            ));
        }
        Ok(())
    }
}

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const ABANDONED: u8 = 2;

/// One caller in the queue. Its `state` only changes under the bulkhead's mutex.
pub struct Waiter {
    state: AtomicU8,
    signal: Signal,
}

impl Waiter {
    pub fn granted(&self) -> bool {
        self.state.load(Ordering::Acquire) == GRANTED
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub active: u32,
    pub waiting: u32,
    pub max_observed: u32,
    pub accepted: u64,
    pub rejected: u64,
    pub timed_out: u64,
}

struct Inner {
    active: u32,
    queue: VecDeque<Arc<Waiter>>,
    stats: Stats,
}

pub struct Bulkhead {
    name: String,
    config: BulkheadConfig,
    // One mutex for the count and the queue: a hand-off must see both at once, and the
    // critical sections are a few instructions, far shorter than a Python call.
    inner: Mutex<Inner>,
}

/// What an asynchronous acquire got: a permit now, or a place in the queue.
pub enum Enqueued {
    Acquired,
    Waiting(Arc<Waiter>),
}

impl Bulkhead {
    pub fn new(name: impl Into<String>, config: BulkheadConfig) -> Result<Bulkhead> {
        config.validate()?;
        Ok(Bulkhead {
            name: name.into(),
            config,
            inner: Mutex::new(Inner {
                active: 0,
                queue: VecDeque::new(),
                stats: Stats::default(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &BulkheadConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock, but a poisoned lock still holds valid counts.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn full(&self, reason: FullReason) -> Error {
        Error::BulkheadFull {
            name: self.name.clone(),
            max_concurrent: self.config.max_concurrent,
            reason,
        }
    }

    /// Takes a permit if one is free and nobody is queued for it.
    fn take_free(&self, inner: &mut Inner) -> bool {
        if inner.active < self.config.max_concurrent && inner.queue.is_empty() {
            inner.active += 1;
            inner.stats.accepted += 1;
            inner.stats.max_observed = inner.stats.max_observed.max(inner.active);
            true
        } else {
            false
        }
    }

    /// Takes a permit without waiting; `false` (counted as a rejection) when none is free.
    pub fn try_acquire(&self) -> bool {
        let mut inner = self.lock();
        if self.take_free(&mut inner) {
            return true;
        }
        inner.stats.rejected += 1;
        false
    }

    fn join_queue(&self, inner: &mut Inner, signal: Signal) -> Result<Arc<Waiter>> {
        if inner.queue.len() >= self.config.max_waiting as usize {
            inner.stats.rejected += 1;
            return Err(self.full(FullReason::NoCapacity));
        }
        let waiter = Arc::new(Waiter {
            state: AtomicU8::new(WAITING),
            signal,
        });
        inner.queue.push_back(waiter.clone());
        Ok(waiter)
    }

    /// Takes a permit, blocking the thread for at most `timeout` (the configured `max_wait`
    /// when `None`; zero never waits).
    pub fn acquire(&self, timeout: Option<Duration>) -> Result<()> {
        let never_interrupted = |wait: &WaitSlice<'_>| Ok::<bool, ()>(wait(Duration::MAX));
        match self.acquire_with(timeout, never_interrupted) {
            Ok(result) => result,
            Err(()) => unreachable!("this wait is never interrupted"),
        }
    }

    /// Takes a permit, waiting in slices through `pause`, which runs one slice (for example
    /// with the GIL released) and may stop the wait with an error of its own (a signal).
    /// Whatever stops the wait, the caller never ends up holding a permit it does not know of.
    pub fn acquire_with<E>(
        &self,
        timeout: Option<Duration>,
        mut pause: impl FnMut(&WaitSlice<'_>) -> std::result::Result<bool, E>,
    ) -> std::result::Result<Result<()>, E> {
        let timeout = timeout.or(self.config.max_wait);
        let waiter = {
            let mut inner = self.lock();
            if self.take_free(&mut inner) {
                return Ok(Ok(()));
            }
            if timeout == Some(Duration::ZERO) {
                inner.stats.rejected += 1;
                return Ok(Err(self.full(FullReason::NoCapacity)));
            }
            match self.join_queue(&mut inner, Signal::for_thread()) {
                Ok(waiter) => waiter,
                Err(error) => return Ok(Err(error)),
            }
        };
        let deadline = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
        loop {
            let remaining = match deadline {
                None => Duration::MAX,
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            };
            if remaining.is_zero() {
                return Ok(if self.abandon(&waiter, true) {
                    Ok(())
                } else {
                    Err(self.full(FullReason::TimedOut))
                });
            }
            let wait = |slice: Duration| self.wait_slice(&waiter, slice.min(remaining));
            match pause(&wait) {
                Ok(true) => return Ok(Ok(())),
                Ok(false) => {}
                Err(interrupted) => {
                    if self.abandon(&waiter, false) {
                        // The permit arrived just as the wait was interrupted: give it back.
                        let _ = self.release();
                    }
                    return Err(interrupted);
                }
            }
        }
    }

    /// Waits for at most `slice`; `true` once the waiter holds a permit.
    fn wait_slice(&self, waiter: &Waiter, slice: Duration) -> bool {
        waiter.signal.wait(self.lock(), slice, || waiter.granted())
    }
    /// Takes a permit now or joins the queue with `wake`, called once the permit is handed over.
    pub fn enqueue_callback(&self, wake: Wake) -> Result<Enqueued> {
        let mut inner = self.lock();
        if self.take_free(&mut inner) {
            return Ok(Enqueued::Acquired);
        }
        self.join_queue(&mut inner, Signal::Callback(wake))
            .map(Enqueued::Waiting)
    }

    fn abandon_locked(&self, inner: &mut Inner, waiter: &Arc<Waiter>) -> bool {
        if waiter.state.load(Ordering::Acquire) == GRANTED {
            return true;
        }
        waiter.state.store(ABANDONED, Ordering::Release);
        inner.queue.retain(|queued| !Arc::ptr_eq(queued, waiter));
        false
    }

    /// Leaves the queue (timeout, cancellation, interrupt). Returns `true` when the permit had
    /// already been handed over, in which case the caller owns it and must release it.
    pub fn abandon(&self, waiter: &Arc<Waiter>, timed_out: bool) -> bool {
        let mut inner = self.lock();
        let granted = self.abandon_locked(&mut inner, waiter);
        if !granted && timed_out {
            inner.stats.rejected += 1;
            inner.stats.timed_out += 1;
        }
        granted
    }

    /// Gives a permit back, handing it to the longest waiter if there is one.
    pub fn release(&self) -> Result<()> {
        let wake = {
            let mut inner = self.lock();
            if inner.active == 0 {
                return Err(Error::Misuse(format!(
                    "Bulkhead '{}' was released more times than it was acquired.",
                    self.name
                )));
            }
            let mut handed = None;
            while let Some(waiter) = inner.queue.pop_front() {
                if waiter.state.load(Ordering::Acquire) == WAITING {
                    waiter.state.store(GRANTED, Ordering::Release);
                    inner.stats.accepted += 1;
                    handed = Some(waiter);
                    break;
                }
            }
            match handed {
                None => {
                    inner.active -= 1;
                    None
                }
                Some(waiter) => waiter.signal.notify().then_some(waiter),
            }
        };
        // Callbacks run outside the lock: they call into the event loop.
        if let Some(waiter) = wake {
            waiter.signal.run();
        }
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        Stats {
            active: inner.active,
            waiting: inner.queue.len() as u32,
            ..inner.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicUsize};

    fn bulkhead(max_concurrent: u32, max_waiting: u32, max_wait: Option<Duration>) -> Bulkhead {
        Bulkhead::new(
            "test",
            BulkheadConfig {
                max_concurrent,
                max_waiting,
                max_wait,
            },
        )
        .unwrap()
    }

    #[test]
    fn refuses_past_the_limit_without_waiting() {
        let bulkhead = bulkhead(2, 0, Some(Duration::ZERO));
        assert!(bulkhead.try_acquire());
        assert!(bulkhead.acquire(None).is_ok());
        assert!(matches!(
            bulkhead.acquire(None),
            Err(Error::BulkheadFull {
                reason: FullReason::NoCapacity,
                ..
            })
        ));
        bulkhead.release().unwrap();
        assert!(bulkhead.try_acquire());
        let stats = bulkhead.stats();
        assert_eq!(
            (stats.active, stats.rejected, stats.max_observed),
            (2, 1, 2)
        );
    }

    #[test]
    fn waiter_times_out_and_leaves_the_queue() {
        let bulkhead = bulkhead(1, 4, Some(Duration::from_millis(20)));
        bulkhead.acquire(None).unwrap();
        let error = bulkhead.acquire(None).unwrap_err();
        assert!(matches!(
            error,
            Error::BulkheadFull {
                reason: FullReason::TimedOut,
                ..
            }
        ));
        assert_eq!(bulkhead.stats().waiting, 0);
        assert_eq!(bulkhead.stats().timed_out, 1);
    }

    #[test]
    fn release_hands_over_in_fifo_order() {
        let bulkhead = Arc::new(bulkhead(1, 8, None));
        bulkhead.acquire(None).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for id in 0..4 {
            let (shared, order) = (bulkhead.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                shared.acquire(None).unwrap();
                order.lock().unwrap().push(id);
                shared.release().unwrap();
            }));
            while bulkhead.stats().waiting < id + 1 {
                std::thread::yield_now();
            }
        }
        bulkhead.release().unwrap();
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(bulkhead.stats().active, 0);
    }

    #[test]
    fn callback_waiters_are_woken_and_can_abandon() {
        let bulkhead = bulkhead(1, 8, None);
        bulkhead.acquire(None).unwrap();
        let woken = Arc::new(AtomicUsize::new(0));
        let counter = woken.clone();
        let Enqueued::Waiting(first) = bulkhead
            .enqueue_callback(Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap()
        else {
            panic!("the bulkhead is full, so the caller must wait");
        };
        let Enqueued::Waiting(second) = bulkhead.enqueue_callback(Box::new(|| {})).unwrap() else {
            panic!("the bulkhead is full, so the caller must wait");
        };
        assert!(!bulkhead.abandon(&first, false));
        bulkhead.release().unwrap();
        assert_eq!(
            woken.load(Ordering::SeqCst),
            0,
            "the abandoned waiter is skipped"
        );
        assert!(second.granted());
        assert!(
            bulkhead.abandon(&second, false),
            "granted before abandoning"
        );
        bulkhead.release().unwrap();
        assert_eq!(bulkhead.stats().active, 0);
    }

    #[test]
    fn threads_never_exceed_the_limit_and_return_every_permit() {
        let bulkhead = bulkhead(3, 64, Some(Duration::from_millis(50)));
        let inside = AtomicI64::new(0);
        let peak = AtomicI64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        if bulkhead.acquire(None).is_ok() {
                            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                            bulkhead.release().unwrap();
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 3);
        let stats = bulkhead.stats();
        assert_eq!((stats.active, stats.waiting), (0, 0));
    }

    #[test]
    fn over_release_is_refused() {
        let bulkhead = bulkhead(1, 0, None);
        assert!(matches!(bulkhead.release(), Err(Error::Misuse(_))));
    }
}
