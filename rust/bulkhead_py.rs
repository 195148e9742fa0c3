//! Python binding of the bulkhead core: blocking waits release the GIL in slices and look for
//! signals between them, so Ctrl-C works and an interrupted wait never keeps a permit.

use crate::bulkhead::{self, BulkheadConfig, Enqueued, WaitSlice, Waiter};
use crate::clock_py::parse_seconds;
use crate::errors::Error;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;
use std::time::Duration;

/// How long a blocked thread sleeps with the GIL released before it looks for signals.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

fn optional_seconds(
    argument: &'static str,
    seconds: Option<f64>,
) -> Result<Option<Duration>, Error> {
    seconds
        .map(|seconds| parse_seconds(argument, seconds).map(Duration::from_nanos))
        .transpose()
}

mod extract {
    crate::args::extractors! {
        name: text "name",
        max_concurrent: count1 "max_concurrent",
        max_waiting: count0 "max_waiting",
        max_wait: optional_number "max_wait",
        timeout: optional_number "timeout",
    }
}

/// A partition that admits at most `max_concurrent` calls at once.
///
/// Callers past the limit wait in FIFO order, at most `max_waiting` of them and for at most
/// `max_wait` seconds (None: as long as it takes); past that `BulkheadFullError` is raised.
///
/// >>> bulkhead = Bulkhead("search", max_concurrent=10, max_waiting=20, max_wait=0.5)
/// >>> with bulkhead:
/// ...     pass
#[pyclass(frozen, subclass, weakref, module = "buttress._core")]
pub struct Bulkhead {
    core: bulkhead::Bulkhead,
}

impl Bulkhead {
    fn acquire_blocking(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<()> {
        let pause = |wait: &WaitSlice<'_>| -> PyResult<bool> {
            if py.detach(|| wait(SIGNAL_CHECK_INTERVAL)) {
                return Ok(true);
            }
            py.check_signals().map(|()| false)
        };
        Ok(self.core.acquire_with(timeout, pause)??)
    }

    fn release_permit(&self) -> PyResult<()> {
        Ok(self.core.release()?)
    }
}

#[pymethods]
impl Bulkhead {
    #[new]
    #[pyo3(signature = (name = "default".to_owned(), *, max_concurrent = 25, max_waiting = 100, max_wait = 0.0))]
    #[pyo3(
        text_signature = "(name='default', *, max_concurrent=25, max_waiting=100, max_wait=0.0)"
    )]
    fn new(
        #[pyo3(from_py_with = extract::name)] name: String,
        #[pyo3(from_py_with = extract::max_concurrent)] max_concurrent: u32,
        #[pyo3(from_py_with = extract::max_waiting)] max_waiting: u32,
        #[pyo3(from_py_with = extract::max_wait)] max_wait: Option<f64>,
    ) -> PyResult<Self> {
        let config = BulkheadConfig {
            max_concurrent,
            max_waiting,
            max_wait: optional_seconds("max_wait", max_wait)?,
        };
        Ok(Bulkhead {
            core: bulkhead::Bulkhead::new(name, config)?,
        })
    }

    /// The partition's name, carried by `BulkheadFullError`.
    #[getter]
    fn name(&self) -> &str {
        self.core.name()
    }

    /// How many calls may hold a permit at once.
    #[getter]
    fn max_concurrent(&self) -> u32 {
        self.core.config().max_concurrent
    }

    /// How many callers may wait for a permit at once.
    #[getter]
    fn max_waiting(&self) -> u32 {
        self.core.config().max_waiting
    }

    /// The default longest wait in seconds; None waits as long as it takes.
    #[getter]
    fn max_wait(&self) -> Option<f64> {
        self.core.config().max_wait.map(|wait| wait.as_secs_f64())
    }

    /// Takes a permit if one is free now; never waits.
    fn try_acquire(&self) -> bool {
        self.core.try_acquire()
    }

    /// Takes a permit, waiting up to `timeout` seconds (default: `max_wait`) with the GIL released.
    ///
    /// Raises `BulkheadFullError` when no permit came in time or the wait queue is full.
    #[pyo3(signature = (timeout = None))]
    fn acquire(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::timeout)] timeout: Option<f64>,
    ) -> PyResult<()> {
        let timeout = optional_seconds("timeout", timeout)?;
        self.acquire_blocking(py, timeout)
    }

    /// Gives a permit back (to the longest waiter, if any).
    fn release(&self) -> PyResult<()> {
        self.release_permit()
    }

    /// Calls `func(*args, **kwargs)` holding a permit, returned however the call ends.
    #[pyo3(signature = (func, /, *args, **kwargs))]
    fn call<'py>(
        &self,
        func: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !func.is_callable() {
            return Err(Error::wrong_type(
                "func",
                format!("func must be callable (got {}).", func.repr()?),
            )
            .into());
        }
        self.acquire_blocking(func.py(), None)?;
        let result = func.call(args, kwargs);
        self.release_permit()?;
        result
    }

    fn __enter__(&self, py: Python<'_>) -> PyResult<()> {
        self.acquire_blocking(py, None)
    }

    #[pyo3(signature = (_exc_type, _exc_value, _traceback))]
    fn __exit__(
        &self,
        _exc_type: &Bound<'_, PyAny>,
        _exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.release_permit()?;
        Ok(false)
    }

    /// For the asyncio twin: takes a permit now (returns None) or queues a waiter that calls
    /// `wake()` once the permit is handed over. Raises `BulkheadFullError` when it may not wait.
    #[pyo3(signature = (wake, timeout = None))]
    fn _enqueue(
        &self,
        wake: Py<PyAny>,
        #[pyo3(from_py_with = extract::timeout)] timeout: Option<f64>,
    ) -> PyResult<Option<BulkheadWaiter>> {
        let timeout = optional_seconds("timeout", timeout)?.or(self.core.config().max_wait);
        if timeout == Some(Duration::ZERO) {
            self.core.acquire(Some(Duration::ZERO))?;
            return Ok(None);
        }
        let wake = Box::new(move || {
            Python::attach(|py| {
                if let Err(error) = wake.call0(py) {
                    error.write_unraisable(py, None);
                }
            })
        });
        Ok(match self.core.enqueue_callback(wake)? {
            Enqueued::Acquired => None,
            Enqueued::Waiting(waiter) => Some(BulkheadWaiter { waiter }),
        })
    }

    /// Leaves the queue; True when the permit had already been handed over (release it then).
    /// A `timed_out` waiter that got nothing counts as a rejection.
    #[pyo3(signature = (waiter, timed_out))]
    fn _abandon(&self, waiter: &BulkheadWaiter, timed_out: bool) -> bool {
        self.core.abandon(&waiter.waiter, timed_out)
    }

    /// A snapshot of active and waiting calls and lifetime counts.
    fn stats(&self) -> BulkheadStats {
        let stats = self.core.stats();
        BulkheadStats {
            active: stats.active,
            waiting: stats.waiting,
            max_observed: stats.max_observed,
            accepted: stats.accepted,
            rejected: stats.rejected,
            timed_out: stats.timed_out,
        }
    }

    fn __repr__(&self) -> String {
        let stats = self.core.stats();
        format!(
            "Bulkhead(name='{}', max_concurrent={}, active={}, waiting={})",
            self.core.name(),
            self.core.config().max_concurrent,
            stats.active,
            stats.waiting
        )
    }
}

/// A queued asyncio caller of a bulkhead.
#[pyclass(frozen, module = "buttress._core")]
pub struct BulkheadWaiter {
    waiter: Arc<Waiter>,
}

#[pymethods]
impl BulkheadWaiter {
    /// True once a permit was handed to this waiter.
    #[getter]
    fn granted(&self) -> bool {
        self.waiter.granted()
    }
}

/// A snapshot of a bulkhead's load.
#[pyclass(frozen, get_all, module = "buttress._core")]
pub struct BulkheadStats {
    /// Calls holding a permit now.
    active: u32,
    /// Callers queued for a permit now.
    waiting: u32,
    /// The most calls that ever held a permit at once.
    max_observed: u32,
    /// Permits given out since creation.
    accepted: u64,
    /// Callers refused since creation (full, or timed out).
    rejected: u64,
    /// Of the refused, those that waited the longest allowed.
    timed_out: u64,
}

#[pymethods]
impl BulkheadStats {
    fn __repr__(&self) -> String {
        format!(
            "BulkheadStats(active={}, waiting={}, max_observed={}, accepted={}, rejected={}, timed_out={})",
            self.active, self.waiting, self.max_observed, self.accepted, self.rejected, self.timed_out
        )
    }
}
