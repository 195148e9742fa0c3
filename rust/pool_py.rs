//! Python binding of the connection pool core.
//!
//! Checkout and checkin are one call each and keep the GIL unless the caller must wait; the
//! user's callbacks (`create`, `check`, `reset`, `close`, `is_broken`) run here, outside the
//! core's lock. Problems that must not reach the caller (a failing reset or close, a leak) go
//! to `buttress.pool`'s reporters, which log them.

use crate::args::{callable, optional_callable};
use crate::clock::nanos_to_seconds;
use crate::clock_py::{parse_clock, parse_seconds, ManualClock};
use crate::errors::Error;
use crate::pool::{Connection, Enqueued, Leave, Outcome, Pool, PoolConfig, WaitSlice, Waiter};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyTuple};
use pyo3::{PyTraverseError, PyVisit};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a blocked thread sleeps with the GIL released before it looks for signals.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// A pooled Python object; its address is its identity while the pool holds it.
pub struct PyConnection(Py<PyAny>);

impl Connection for PyConnection {
    fn identity(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

fn identity_of(conn: &Bound<'_, PyAny>) -> usize {
    conn.as_ptr() as usize
}

type Core = Pool<PyConnection, Py<PyAny>>;

/// A checked-out connection and the lease it was lent under.
type Held = (Py<PyAny>, u64);

mod extract {
    crate::args::extractors! {
        name: text "name",
        min_size: count0 "min_size",
        max_size: count1 "max_size",
        optional_min_size: optional_count0 "min_size",
        optional_max_size: optional_count1 "max_size",
        max_waiting: count0 "max_waiting",
        timeout: optional_number "timeout",
        max_lifetime: optional_number "max_lifetime",
        lifetime_jitter: number "lifetime_jitter",
        max_idle: optional_number "max_idle",
        check_interval: number "check_interval",
        leak_threshold: optional_number "leak_threshold",
    }
}

fn optional_nanos(argument: &'static str, seconds: Option<f64>) -> Result<Option<u64>, Error> {
    seconds
        .map(|seconds| parse_seconds(argument, seconds))
        .transpose()
}

fn optional_duration(
    argument: &'static str,
    seconds: Option<f64>,
) -> Result<Option<Duration>, Error> {
    optional_nanos(argument, seconds).map(|nanos| nanos.map(Duration::from_nanos))
}

/// The reporters and helpers of `buttress.pool`, looked up on first use (only slow paths).
fn helper<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    name: &'static str,
) -> PyResult<Bound<'py, PyAny>> {
    cell.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("buttress.pool")?.getattr(name)?.unbind())
    })
    .map(|function| function.bind(py).clone())
}

static REPORT_PROBLEM: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static REPORT_LEAK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static CAPTURE_STACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static LEASE_AENTER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static LEASE_AEXIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// A pool of connections made by `create`, generic over what it makes.
///
/// >>> pool = ConnectionPool(dict, max_size=2)
/// >>> conn = pool.acquire()
/// >>> pool.release(conn)
/// >>> pool.stats().idle
/// 1
///
/// Waiters are served first come, first served; idle connections are reused newest first.
/// `check` runs on checkout unless the connection was used within `check_interval` seconds;
/// `reset` runs on return; a connection that fails either is closed and replaced.
#[pyclass(frozen, subclass, weakref, generic, module = "buttress._core")]
pub struct ConnectionPool {
    core: Core,
    create: Py<PyAny>,
    close: Option<Py<PyAny>>,
    check: Option<Py<PyAny>>,
    reset: Option<Py<PyAny>>,
    is_broken: Option<Py<PyAny>>,
    clock: Option<Py<ManualClock>>,
}

impl ConnectionPool {
    fn report_problem(
        &self,
        py: Python<'_>,
        event: &str,
        conn: &Bound<'_, PyAny>,
        error: PyErr,
    ) -> PyResult<()> {
        // Logs an `Exception` the pool handles itself; anything else (KeyboardInterrupt,
        // SystemExit) is handed back to be raised once the pool's bookkeeping is done.
        if !error.is_instance_of::<PyException>(py) {
            return Err(error);
        }
        let reported = helper(py, &REPORT_PROBLEM, "_report_problem")
            .and_then(|report| report.call1((event, self.core.name(), conn, error.value(py))));
        if let Err(failure) = reported {
            failure.write_unraisable(py, Some(conn));
        }
        Ok(())
    }

    /// Closes connections the core retired, with the user's `close` (or the object's own
    /// `close()` method when it has one). A failing close is logged, never raised; an
    /// interrupt is raised after every connection was closed.
    fn close_retired(&self, py: Python<'_>, retired: Vec<PyConnection>) -> PyResult<()> {
        let mut interrupted = Ok(());
        for PyConnection(conn) in retired {
            let conn = conn.into_bound(py);
            let closed = match &self.close {
                Some(close) => close.call1(py, (&conn,)).map(drop),
                None => match conn.getattr(pyo3::intern!(py, "close")) {
                    Ok(method) => method.call0().map(drop),
                    Err(_) => Ok(()),
                },
            };
            if let Err(error) = closed {
                let handled = self.report_problem(py, "close", &conn, error);
                interrupted = interrupted.and(handled);
            }
        }
        interrupted
    }

    fn capture_stack(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.core.config().leak_threshold_nanos?;
        match helper(py, &CAPTURE_STACK, "_capture_stack").and_then(|capture| capture.call0()) {
            Ok(stack) => Some(stack.unbind()),
            Err(error) => {
                error.write_unraisable(py, None);
                None
            }
        }
    }

    fn lent(&self, py: Python<'_>, conn: Py<PyAny>, lease: u64) -> Held {
        if let Some(stack) = self.capture_stack(py) {
            self.core.attach_trace(conn.as_ptr() as usize, lease, stack);
        }
        (conn, lease)
    }

    /// Turns a checkout's outcome into a connection: checks an idle one when it is due (one
    /// that fails is closed and replaced, its borrower keeping its turn) and creates one in a
    /// reserved slot.
    fn finish(&self, py: Python<'_>, mut outcome: Outcome<Py<PyAny>>) -> PyResult<Held> {
        loop {
            match outcome {
                Outcome::Ready {
                    value,
                    lease,
                    needs_check,
                } => {
                    let Some(check) = self.check.as_ref().filter(|_| needs_check) else {
                        return Ok(self.lent(py, value, lease));
                    };
                    let conn = value.bind(py);
                    let (healthy, interrupted) = match check.call1(py, (conn,)) {
                        Ok(verdict) => (!verdict.bind(py).is(PyBool::new(py, false)), Ok(())),
                        Err(error) => (false, self.report_problem(py, "check", conn, error)),
                    };
                    if healthy {
                        return Ok(self.lent(py, value, lease));
                    }
                    let mut retired = Vec::new();
                    let next = self.core.replace(
                        identity_of(conn),
                        lease,
                        |conn| conn.0.clone_ref(py),
                        &mut retired,
                    );
                    let closed = self.close_retired(py, retired);
                    let next = next?;
                    if let Err(interrupt) = interrupted.and(closed) {
                        self.abandon(py, next);
                        return Err(interrupt);
                    }
                    outcome = next;
                }
                Outcome::Create => {
                    let conn = match self.create.call0(py) {
                        Ok(conn) if conn.is_none(py) => {
                            self.core.cancel_create();
                            return Err(Error::wrong_type(
                                "create",
                                "create returned None; it must return a new connection.",
                            )
                            .into());
                        }
                        Ok(conn) => conn,
                        Err(error) => {
                            self.core.cancel_create();
                            return Err(error);
                        }
                    };
                    return match self.core.admit(PyConnection(conn.clone_ref(py))) {
                        Ok(lease) => Ok(self.lent(py, conn, lease)),
                        Err((error, retired)) => {
                            self.close_retired(py, retired.into_iter().collect())?;
                            Err(error.into())
                        }
                    };
                }
            }
        }
    }

    /// Gives back what a checkout got when an interrupt stops it before the caller has it.
    fn abandon(&self, py: Python<'_>, outcome: Outcome<Py<PyAny>>) {
        match outcome {
            Outcome::Ready { value, lease, .. } => {
                let mut retired = Vec::new();
                let returned = self.core.checkin(
                    identity_of(value.bind(py)),
                    Some(lease),
                    false,
                    true,
                    &mut retired,
                );
                debug_assert!(returned.is_ok(), "the connection was lent to this caller");
                // Already raising an interrupt: a second one from a close is dropped.
                let _ = self.close_retired(py, retired);
            }
            Outcome::Create => self.core.release_slot(),
        }
    }

    /// Closes what a core call retired, then hands over its outcome: an interrupt raised by a
    /// close is raised once the outcome is given back.
    fn settle<R>(
        &self,
        py: Python<'_>,
        retired: Vec<PyConnection>,
        outcome: Result<R, Error>,
        abandon: impl FnOnce(R),
    ) -> PyResult<R> {
        let closed = if retired.is_empty() {
            Ok(())
        } else {
            self.close_retired(py, retired)
        };
        let outcome = outcome?;
        match closed {
            Ok(()) => Ok(outcome),
            Err(interrupt) => {
                abandon(outcome);
                Err(interrupt)
            }
        }
    }

    fn effective_timeout(&self, timeout: Option<f64>) -> PyResult<Option<Duration>> {
        Ok(optional_duration("timeout", timeout)?.or(self.core.config().timeout))
    }

    /// Checks out a connection, blocking (GIL released, signals checked) up to `timeout`
    /// (None: as long as it takes).
    fn checkout(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Held> {
        let mut retired = Vec::new();
        let pause = |wait: &WaitSlice<'_>| -> PyResult<bool> {
            if py.detach(|| wait(SIGNAL_CHECK_INTERVAL)) {
                return Ok(true);
            }
            py.check_signals().map(|()| false)
        };
        let outcome = self.core.checkout_with(
            Some(timeout.unwrap_or(Duration::MAX)),
            |conn| conn.0.clone_ref(py),
            &mut retired,
            pause,
        )?;
        let outcome = self.settle(py, retired, outcome, |outcome| self.abandon(py, outcome))?;
        self.finish(py, outcome)
    }

    /// Returns a connection: resets it (when a reset is set and it is not broken), then gives
    /// it back to the pool, which hands it to the longest waiter or keeps it idle.
    fn give_back(
        &self,
        py: Python<'_>,
        identity: usize,
        lease: Option<u64>,
        broken: bool,
        suspect: bool,
    ) -> PyResult<()> {
        let mut retired = Vec::new();
        match (&self.reset, broken) {
            (Some(reset), false) => {
                let returning = self.core.take_back(identity, lease)?;
                let conn = returning.connection().0.clone_ref(py).into_bound(py);
                let (reset_failed, interrupted) = match reset.call1(py, (&conn,)) {
                    Ok(_) => (false, Ok(())),
                    Err(error) => (true, self.report_problem(py, "reset", &conn, error)),
                };
                self.core
                    .put_back(returning, reset_failed, suspect, &mut retired);
                self.close_retired(py, retired)?;
                return interrupted;
            }
            _ => {
                self.core
                    .checkin(identity, lease, broken, suspect, &mut retired)?;
            }
        }
        if !retired.is_empty() {
            self.close_retired(py, retired)?;
        }
        Ok(())
    }

    /// Whether the error a borrower's block ended with means the connection is broken.
    fn broken_by(
        &self,
        py: Python<'_>,
        identity: usize,
        lease: u64,
        error: &Bound<'_, PyAny>,
    ) -> (bool, PyResult<()>) {
        // A failing `is_broken` counts as "broken"; an interrupt is handed back to be raised.
        let Some(is_broken) = &self.is_broken else {
            return (false, Ok(()));
        };
        let Some(conn) = self
            .core
            .with_borrowed(identity, lease, |conn| conn.0.clone_ref(py))
        else {
            return (false, Ok(()));
        };
        let conn = conn.into_bound(py);
        match is_broken.call1(py, (&conn, error)) {
            Ok(verdict) => (verdict.bind(py).is_truthy().unwrap_or(true), Ok(())),
            Err(failure) => (true, self.report_problem(py, "is_broken", &conn, failure)),
        }
    }

    fn held_to_python<'py>(py: Python<'py>, held: Held) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(
            py,
            [held.0.into_bound(py), held.1.into_pyobject(py)?.into_any()],
        )
    }
}

#[pymethods]
impl ConnectionPool {
    #[new]
    #[pyo3(signature = (
        create, *, close = None, check = None, reset = None, is_broken = None,
        name = "pool".to_owned(), min_size = 0, max_size = 10, timeout = Some(30.0),
        max_waiting = 0, max_lifetime = None, lifetime_jitter = 0.1, max_idle = None,
        check_interval = 0.5, leak_threshold = None, clock = None
    ))]
    #[pyo3(
        text_signature = "(create, *, close=None, check=None, reset=None, is_broken=None, name='pool', min_size=0, max_size=10, timeout=30.0, max_waiting=0, max_lifetime=None, lifetime_jitter=0.1, max_idle=None, check_interval=0.5, leak_threshold=None, clock=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        create: Bound<'_, PyAny>,
        close: Option<Bound<'_, PyAny>>,
        check: Option<Bound<'_, PyAny>>,
        reset: Option<Bound<'_, PyAny>>,
        is_broken: Option<Bound<'_, PyAny>>,
        #[pyo3(from_py_with = extract::name)] name: String,
        #[pyo3(from_py_with = extract::min_size)] min_size: u32,
        #[pyo3(from_py_with = extract::max_size)] max_size: u32,
        #[pyo3(from_py_with = extract::timeout)] timeout: Option<f64>,
        #[pyo3(from_py_with = extract::max_waiting)] max_waiting: u32,
        #[pyo3(from_py_with = extract::max_lifetime)] max_lifetime: Option<f64>,
        #[pyo3(from_py_with = extract::lifetime_jitter)] lifetime_jitter: f64,
        #[pyo3(from_py_with = extract::max_idle)] max_idle: Option<f64>,
        #[pyo3(from_py_with = extract::check_interval)] check_interval: f64,
        #[pyo3(from_py_with = extract::leak_threshold)] leak_threshold: Option<f64>,
        clock: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let create = callable("create", create)?;
        let close = optional_callable("close", close)?;
        let check = optional_callable("check", check)?;
        let reset = optional_callable("reset", reset)?;
        let is_broken = optional_callable("is_broken", is_broken)?;
        let (clock, core_clock) = parse_clock(clock)?;
        let config = PoolConfig {
            min_size,
            max_size,
            max_waiting,
            timeout: optional_duration("timeout", timeout)?,
            max_lifetime_nanos: optional_nanos("max_lifetime", max_lifetime)?,
            lifetime_jitter,
            max_idle_nanos: optional_nanos("max_idle", max_idle)?,
            checks: check.is_some(),
            check_interval_nanos: parse_seconds("check_interval", check_interval)?,
            leak_threshold_nanos: optional_nanos("leak_threshold", leak_threshold)?,
        };
        Ok(ConnectionPool {
            core: Pool::new(name, config, core_clock)?,
            create,
            close,
            check,
            reset,
            is_broken,
            clock,
        })
    }

    /// Checks out a connection, waiting up to `timeout` seconds (default: the pool's timeout;
    /// None waits as long as it takes). Return it with `release(conn)`.
    ///
    /// Raises `PoolTimeoutError` when none came in time, `PoolFullError` when `max_waiting`
    /// callers already wait, `PoolClosedError` once the pool is closed, and whatever `create`
    /// raised when a new connection could not be made.
    #[pyo3(signature = (timeout = None))]
    fn acquire(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::timeout)] timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let timeout = self.effective_timeout(timeout)?;
        self.checkout(py, timeout).map(|(conn, _)| conn)
    }

    /// Returns a connection taken with `acquire`. `broken=True` closes it instead (its slot
    /// is refilled). Returning one twice, or one the pool did not lend, raises `ValueError`.
    #[pyo3(signature = (conn, *, broken = false))]
    fn release(&self, conn: &Bound<'_, PyAny>, broken: bool) -> PyResult<()> {
        self.give_back(conn.py(), identity_of(conn), None, broken, false)
    }

    /// A context manager that checks out a connection on entry and always returns it on exit,
    /// also on exceptions and cancellation; works with `with` and `async with`.
    #[pyo3(signature = (timeout = None))]
    fn connection(
        slf: &Bound<'_, Self>,
        #[pyo3(from_py_with = extract::timeout)] timeout: Option<f64>,
    ) -> PyResult<PoolLease> {
        Ok(PoolLease {
            pool: slf.clone().unbind(),
            timeout: slf.get().effective_timeout(timeout)?,
            identity: AtomicUsize::new(0),
            lease: AtomicU64::new(0),
        })
    }

    /// For the asyncio twin: a `(conn, lease)` pair now, or a `PoolWaiter` whose `wake()` is
    /// called once something was handed to it (then `_claim` it). With `may_wait` false it
    /// never queues: no free connection raises `PoolTimeoutError`.
    #[pyo3(signature = (wake, may_wait))]
    fn _enqueue<'py>(
        &self,
        py: Python<'py>,
        wake: Py<PyAny>,
        may_wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut retired = Vec::new();
        let enqueued = if may_wait {
            let wake = Box::new(move || {
                Python::attach(|py| {
                    if let Err(error) = wake.call0(py) {
                        error.write_unraisable(py, None);
                    }
                })
            });
            self.core
                .enqueue(wake, |conn| conn.0.clone_ref(py), &mut retired)
        } else {
            self.core
                .try_checkout(|conn| conn.0.clone_ref(py), &mut retired)
                .and_then(|outcome| {
                    outcome
                        .map(Enqueued::Now)
                        .ok_or_else(|| Error::PoolTimeout {
                            name: self.core.name().to_owned(),
                            timeout_seconds: 0.0,
                        })
                })
        };
        let enqueued = self.settle(py, retired, enqueued, |enqueued| match enqueued {
            Enqueued::Now(outcome) => self.abandon(py, outcome),
            Enqueued::Waiting(waiter) => {
                let mut retired = Vec::new();
                self.core.leave(&waiter, Leave::Cancelled, &mut retired);
                let _ = self.close_retired(py, retired);
            }
        })?;
        match enqueued {
            Enqueued::Now(outcome) => {
                let held = self.finish(py, outcome)?;
                Ok(Self::held_to_python(py, held)?.into_any())
            }
            Enqueued::Waiting(waiter) => Ok(Bound::new(py, PoolWaiter { waiter })?.into_any()),
        }
    }

    /// For the asyncio twin: what was handed to a woken waiter, as `(conn, lease)`.
    fn _claim<'py>(&self, py: Python<'py>, waiter: &PoolWaiter) -> PyResult<Bound<'py, PyTuple>> {
        let outcome = self
            .core
            .claim(&waiter.waiter, |conn| conn.0.clone_ref(py))?;
        let held = self.finish(py, outcome)?;
        Self::held_to_python(py, held)
    }

    /// For the asyncio twin: leaves the queue. True when the wait timed out just as something
    /// was handed over (claim it then); a cancelled waiter's grant is passed on.
    fn _leave(&self, py: Python<'_>, waiter: &PoolWaiter, timed_out: bool) -> PyResult<bool> {
        let why = if timed_out {
            Leave::TimedOut
        } else {
            Leave::Cancelled
        };
        let mut retired = Vec::new();
        let claim = self.core.leave(&waiter.waiter, why, &mut retired);
        self.close_retired(py, retired)?;
        Ok(claim)
    }

    /// Returns a connection lent under `lease` (internal: leases and the asyncio twin).
    #[pyo3(signature = (conn, lease, *, broken = false, suspect = false))]
    fn _give_back(
        &self,
        conn: &Bound<'_, PyAny>,
        lease: u64,
        broken: bool,
        suspect: bool,
    ) -> PyResult<()> {
        self.give_back(conn.py(), identity_of(conn), Some(lease), broken, suspect)
    }

    /// One round of housekeeping: closes idle connections past their lifetime or idle limit,
    /// reports leaks, and creates connections up to `min_size`. Returns the seconds until the
    /// next round could have work, or None when only a change in the pool could bring some.
    fn _housekeep(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        let mut retired = Vec::new();
        let work = self
            .core
            .housekeep(|conn| conn.0.clone_ref(py), &mut retired);
        let mut outcome = self.close_retired(py, retired);
        for leak in work.leaks {
            let reported = helper(py, &REPORT_LEAK, "_report_leak").and_then(|report| {
                report.call1((
                    self.core.name(),
                    leak.connection,
                    nanos_to_seconds(leak.held_nanos),
                    leak.trace,
                ))
            });
            if let Err(error) = reported {
                error.write_unraisable(py, None);
            }
        }
        // Every reserved slot is either filled or given back, whatever happens on the way; after
        // one failed create the rest are given back untried (the housekeeper backs off).
        let mut reserved = work.to_create;
        while reserved > 0 && outcome.is_ok() {
            reserved -= 1;
            let failure = match self.create.call0(py) {
                Ok(conn) if !conn.is_none(py) => {
                    let mut retired = Vec::new();
                    let admitted = self.core.admit_idle(PyConnection(conn), &mut retired);
                    outcome = self.close_retired(py, retired);
                    match admitted {
                        Ok(()) => continue,
                        Err(error) => {
                            // The core freed the slot and counted the failure.
                            let handled =
                                self.report_problem(py, "create", py.None().bind(py), error.into());
                            outcome = outcome.and(handled);
                            break;
                        }
                    }
                }
                Ok(_) => Error::wrong_type(
                    "create",
                    "create returned None; it must return a new connection.",
                )
                .into(),
                Err(error) => error,
            };
            self.core.cancel_refill();
            outcome = self.report_problem(py, "create", py.None().bind(py), failure);
            break;
        }
        self.core.unreserve(reserved);
        outcome?;
        let now = self.core.clock().now_nanos();
        Ok(self
            .core
            .next_housekeeping()
            .map(|next| nanos_to_seconds(next.saturating_sub(now))))
    }

    /// Sleeps with the GIL released until the pool needs housekeeping or `seconds` pass.
    fn _wait_for_attention(&self, py: Python<'_>, seconds: f64) -> PyResult<()> {
        let slice = Duration::from_nanos(parse_seconds("seconds", seconds)?);
        py.detach(|| self.core.wait_for_attention(slice));
        Ok(())
    }

    /// Changes the pool's sizes. Idle connections past the new `max_size` close at once,
    /// borrowed ones when they come back; new room goes to waiters first.
    #[pyo3(signature = (min_size = None, max_size = None))]
    fn resize(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::optional_min_size)] min_size: Option<u32>,
        #[pyo3(from_py_with = extract::optional_max_size)] max_size: Option<u32>,
    ) -> PyResult<()> {
        let stats = self.core.stats();
        let mut retired = Vec::new();
        let resized = self.core.resize(
            min_size.unwrap_or(stats.min_size),
            max_size.unwrap_or(stats.max_size),
            &mut retired,
        );
        self.close_retired(py, retired)?;
        Ok(resized?)
    }

    /// Closes the pool: idle connections now, borrowed ones as they come back; waiters fail
    /// with `PoolClosedError`. Waits up to `timeout` seconds (None: as long as it takes) for
    /// borrowed connections to come back and returns whether all of them did.
    #[pyo3(signature = (timeout = Some(5.0)))]
    #[pyo3(text_signature = "(self, timeout=5.0)")]
    fn close(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::timeout)] timeout: Option<f64>,
    ) -> PyResult<bool> {
        let timeout = optional_duration("timeout", timeout)?;
        let mut retired = Vec::new();
        self.core.close(&mut retired);
        self.close_retired(py, retired)?;
        let deadline = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
        loop {
            let remaining = deadline.map_or(SIGNAL_CHECK_INTERVAL, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            });
            let slice = remaining.min(SIGNAL_CHECK_INTERVAL);
            if py.detach(|| self.core.wait_drained(slice)) {
                return Ok(true);
            }
            if remaining.is_zero() {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    /// True once `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }

    /// The pool's name, carried by its errors and log records.
    #[getter]
    fn name(&self) -> &str {
        self.core.name()
    }

    /// Connections kept open even when idle.
    #[getter]
    fn min_size(&self) -> u32 {
        self.core.stats().min_size
    }

    /// The most connections open at once.
    #[getter]
    fn max_size(&self) -> u32 {
        self.core.stats().max_size
    }

    /// The default longest wait for a connection, in seconds; None waits as long as it takes.
    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.core
            .config()
            .timeout
            .map(|timeout| timeout.as_secs_f64())
    }

    /// How many callers may wait at once; 0 means no bound.
    #[getter]
    fn max_waiting(&self) -> u32 {
        self.core.config().max_waiting
    }

    /// The seconds after which a connection is reported as leaked, or None.
    #[getter]
    fn leak_threshold(&self) -> Option<f64> {
        self.core
            .config()
            .leak_threshold_nanos
            .map(nanos_to_seconds)
    }

    /// Whether the pool needs a housekeeper thread (sizes, lifetimes, idle limit, leaks).
    #[getter]
    fn _needs_housekeeping(&self) -> bool {
        let config = self.core.config();
        self.core.stats().min_size > 0
            || config.max_lifetime_nanos.is_some()
            || config.max_idle_nanos.is_some()
            || config.leak_threshold_nanos.is_some()
    }

    /// The manual clock this pool reads, or None for the monotonic clock.
    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|clock| clock.clone_ref(py))
    }

    /// A snapshot of the pool's sizes and lifetime counts.
    fn stats(&self) -> PoolStats {
        let stats = self.core.stats();
        PoolStats {
            min_size: stats.min_size,
            max_size: stats.max_size,
            size: stats.size,
            idle: stats.idle,
            in_use: stats.in_use,
            waiting: stats.waiting,
            requests: stats.requests,
            created: stats.created,
            closed: stats.closed,
            broken: stats.broken,
            create_failures: stats.create_failures,
            timeouts: stats.timeouts,
            rejected: stats.rejected,
            waits: stats.waits,
            total_wait: nanos_to_seconds(stats.total_wait_nanos),
            max_wait: nanos_to_seconds(stats.max_wait_nanos),
            leaks: stats.leaks,
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (_exc_type, _exc_value, _traceback))]
    fn __exit__(
        slf: &Bound<'_, Self>,
        _exc_type: &Bound<'_, PyAny>,
        _exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        // Through the attribute, so a subclass's close (which stops its housekeeper) runs.
        slf.call_method0(pyo3::intern!(slf.py(), "close"))?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let stats = self.core.stats();
        format!(
            "ConnectionPool(name='{}', size={}, idle={}, in_use={}, waiting={}, max_size={}{})",
            self.core.name(),
            stats.size,
            stats.idle,
            stats.in_use,
            stats.waiting,
            stats.max_size,
            if self.core.is_closed() {
                ", closed"
            } else {
                ""
            }
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.create)?;
        visit.call(&self.close)?;
        visit.call(&self.check)?;
        visit.call(&self.reset)?;
        visit.call(&self.is_broken)?;
        visit.call(&self.clock)?;
        self.core.try_visit(|conn| visit.call(&conn.0))?;
        Ok(())
    }
}

/// Holds one checkout of a pool for a `with` or `async with` block.
///
/// >>> pool = ConnectionPool(list, max_size=2)
/// >>> with pool.connection() as conn:
/// ...     conn.append("used")
/// >>> pool.acquire()
/// ['used']
#[pyclass(frozen, generic, module = "buttress._core")]
pub struct PoolLease {
    pool: Py<ConnectionPool>,
    timeout: Option<Duration>,
    // The checkout held, as the connection's identity (0: none) and lease. The pool keeps the
    // connection itself alive while it is borrowed, so two atomics are all a lease needs.
    identity: AtomicUsize,
    lease: AtomicU64,
}

impl PoolLease {
    fn hold(&self, identity: usize, lease: u64) -> PyResult<()> {
        // Claim the empty lease first, so a second entry cannot overwrite the first's lease.
        if self
            .identity
            .compare_exchange(0, RESERVED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(Error::Misuse(
                "This connection() block was entered twice; each `with pool.connection()` \
                 holds one connection."
                    .to_owned(),
            )
            .into());
        }
        self.lease.store(lease, Ordering::Relaxed);
        // Release: whoever takes the identity also sees the lease stored before it.
        self.identity.store(identity, Ordering::Release);
        Ok(())
    }
}

/// A lease's identity while its entry is storing the lease (no object lives at this address).
const RESERVED: usize = usize::MAX;

#[pymethods]
impl PoolLease {
    /// The pool this lease checks out from.
    #[getter]
    fn pool(&self, py: Python<'_>) -> Py<ConnectionPool> {
        self.pool.clone_ref(py)
    }

    /// The longest wait for a connection in seconds; None waits as long as it takes.
    #[getter]
    fn timeout(&self) -> Option<f64> {
        self.timeout.map(|timeout| timeout.as_secs_f64())
    }

    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let pool = self.pool.get();
        let (conn, lease) = pool.checkout(py, self.timeout)?;
        let identity = conn.as_ptr() as usize;
        if let Err(error) = self.hold(identity, lease) {
            pool.give_back(py, identity, Some(lease), false, false)?;
            return Err(error);
        }
        Ok(conn)
    }

    #[pyo3(signature = (_exc_type, exc_value, _traceback))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let identity = self.identity.swap(0, Ordering::Acquire);
        if identity == 0 || identity == RESERVED {
            return Err(Error::Misuse(
                "This connection() block was exited without holding a connection.".to_owned(),
            )
            .into());
        }
        let lease = self.lease.load(Ordering::Relaxed);
        let pool = self.pool.get();
        let failed = !exc_value.is_none();
        let (broken, interrupted) = if failed {
            pool.broken_by(py, identity, lease, exc_value)
        } else {
            (false, Ok(()))
        };
        pool.give_back(py, identity, Some(lease), broken, failed)?;
        interrupted.map(|()| false)
    }

    /// Records the connection an asynchronous entry checked out (internal).
    fn _hold(&self, conn: &Bound<'_, PyAny>, lease: u64) -> PyResult<()> {
        self.hold(identity_of(conn), lease)
    }

    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        helper(slf.py(), &LEASE_AENTER, "_lease_aenter")?.call1((slf,))
    }

    #[pyo3(signature = (exc_type, exc_value, traceback))]
    fn __aexit__<'py>(
        slf: &Bound<'py, Self>,
        exc_type: &Bound<'py, PyAny>,
        exc_value: &Bound<'py, PyAny>,
        traceback: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        helper(slf.py(), &LEASE_AEXIT, "_lease_aexit")?.call1((slf, exc_type, exc_value, traceback))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.pool)
    }
}

/// A queued asyncio caller of a pool.
#[pyclass(frozen, module = "buttress._core")]
pub struct PoolWaiter {
    waiter: Arc<Waiter>,
}

#[pymethods]
impl PoolWaiter {
    /// True once a connection or a slot was handed to this waiter.
    #[getter]
    fn granted(&self) -> bool {
        self.waiter.granted()
    }
}

/// A snapshot of a connection pool.
#[pyclass(frozen, get_all, module = "buttress._core")]
pub struct PoolStats {
    /// Connections kept open even when idle.
    min_size: u32,
    /// The most connections open at once.
    max_size: u32,
    /// Open connections: idle, in use, being created or reset.
    size: u32,
    /// Connections waiting in the pool to be checked out.
    idle: u32,
    /// Connections checked out, being created, or being reset.
    in_use: u32,
    /// Callers waiting for a connection.
    waiting: u32,
    /// Checkouts asked for since creation.
    requests: u64,
    /// Connections created.
    created: u64,
    /// Connections closed.
    closed: u64,
    /// Connections discarded as broken: a failed check or reset, or a borrower's report.
    broken: u64,
    /// Attempts to create a connection that failed.
    create_failures: u64,
    /// Callers that waited the longest allowed and got nothing.
    timeouts: u64,
    /// Callers refused because `max_waiting` callers already waited.
    rejected: u64,
    /// Checkouts that had to wait.
    waits: u64,
    /// Seconds spent waiting, summed over every checkout that waited.
    total_wait: f64,
    /// The longest any checkout waited, in seconds.
    max_wait: f64,
    /// Connections reported as leaked (held past `leak_threshold`).
    leaks: u64,
}

#[pymethods]
impl PoolStats {
    fn __repr__(&self) -> String {
        format!(
            "PoolStats(size={}, idle={}, in_use={}, waiting={}, min_size={}, max_size={}, \
             requests={}, created={}, closed={}, broken={}, create_failures={}, timeouts={}, \
             rejected={}, waits={}, total_wait={:.6}, max_wait={:.6}, leaks={})",
            self.size,
            self.idle,
            self.in_use,
            self.waiting,
            self.min_size,
            self.max_size,
            self.requests,
            self.created,
            self.closed,
            self.broken,
            self.create_failures,
            self.timeouts,
            self.rejected,
            self.waits,
            self.total_wait,
            self.max_wait,
            self.leaks
        )
    }
}
