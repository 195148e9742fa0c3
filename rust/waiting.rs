//! What the queues of the bulkhead and the pool share: how a queued caller is woken, and the
//! sliced blocking wait of a thread.

use std::sync::{Condvar, MutexGuard};
use std::time::Duration;

/// Called once a queued callback waiter was served (it calls into an event loop).
pub type Wake = Box<dyn Fn() + Send + Sync>;

/// Waits up to the given time; `true` once the waiter was served.
pub type WaitSlice<'a> = dyn Fn(Duration) -> bool + Sync + 'a;

/// How a queued caller learns it was served: a blocked thread is notified on its own condition
/// variable (paired with the queue's mutex); an asyncio waiter gets a callback.
pub enum Signal {
    Thread(Condvar),
    Callback(Wake),
}

impl Signal {
    pub fn for_thread() -> Self {
        Signal::Thread(Condvar::new())
    }

    /// Wakes a thread at once (the queue's lock is held); `true` when this is a callback,
    /// which the caller must run with `run` once the lock is released.
    pub fn notify(&self) -> bool {
        match self {
            Signal::Thread(condvar) => {
                condvar.notify_one();
                false
            }
            Signal::Callback(_) => true,
        }
    }

    /// Runs a callback waiter's wake-up (outside the queue's lock).
    pub fn run(&self) {
        if let Signal::Callback(wake) = self {
            wake();
        }
    }

    /// Holding the queue's lock, waits at most `slice` unless `served()` already holds, and
    /// returns whether it holds after. A callback waiter never blocks.
    pub fn wait<T>(
        &self,
        guard: MutexGuard<'_, T>,
        slice: Duration,
        served: impl Fn() -> bool,
    ) -> bool {
        if served() {
            return true;
        }
        let Signal::Thread(condvar) = self else {
            return false;
        };
        // Condvar waits cap their own timeout; a spurious wake-up just returns early.
        let guard = condvar
            .wait_timeout(guard, slice.min(Duration::from_secs(3600)))
            .unwrap_or_else(|e| e.into_inner())
            .0;
        drop(guard);
        served()
    }
}
