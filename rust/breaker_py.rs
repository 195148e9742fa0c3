//! Python binding of the circuit breaker core: the hot forms (`call`, `with`, decorated
//! functions, `try_acquire`) run entirely here, so no Python code of buttress runs per call.

use crate::args::optional_callable;
use crate::breaker::{
    Admission, Breaker, BreakerConfig, Metrics, Outcome, Permit, State, Transitions, WindowKind,
};
use crate::clock::nanos_to_seconds;
use crate::clock_py::{parse_clock, parse_seconds, ManualClock};
use crate::errors::{circuit_open_error, Error};
use pyo3::exceptions::PyBaseException;
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple, PyType};
use pyo3::PyTraverseError;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The `CircuitState` members, indexed by the core's state number.
fn state_object(py: Python<'_>, state: State) -> PyResult<Bound<'_, PyAny>> {
    static MEMBERS: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();
    let members = MEMBERS.get_or_try_init(py, || -> PyResult<Vec<Py<PyAny>>> {
        let enum_class = py
            .import("buttress.resilience._state")?
            .getattr("CircuitState")?;
        [
            State::Closed,
            State::Open,
            State::HalfOpen,
            State::ForcedOpen,
            State::Disabled,
        ]
        .iter()
        .map(|state| Ok(enum_class.call1((state.as_str(),))?.unbind()))
        .collect()
    })?;
    Ok(members[state as usize].bind(py).clone())
}

fn method_type(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static METHOD_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    METHOD_TYPE
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("types")?.getattr("MethodType")?.unbind())
        })
        .map(|method| method.bind(py))
}

/// Turns `None`, one exception class or a tuple of them into a tuple, checking each entry.
fn exception_classes<'py>(
    py: Python<'py>,
    argument: &'static str,
    value: Option<&Bound<'py, PyAny>>,
    default: &[Bound<'py, PyType>],
) -> PyResult<Bound<'py, PyTuple>> {
    let Some(value) = value.filter(|value| !value.is_none()) else {
        return PyTuple::new(py, default);
    };
    let items: Vec<Bound<'py, PyAny>> = if let Ok(tuple) = value.cast::<PyTuple>() {
        tuple.iter().collect()
    } else if let Ok(list) = value.cast::<pyo3::types::PyList>() {
        list.iter().collect()
    } else {
        vec![value.clone()]
    };
    let base = py.get_type::<PyBaseException>();
    for item in &items {
        let is_exception_class = item
            .cast::<PyType>()
            .map(|class| class.is_subclass(&base).unwrap_or(false))
            .unwrap_or(false);
        if !is_exception_class {
            return Err(Error::wrong_type(
                argument,
                format!(
                    "{argument} must be an exception class or a tuple of them (got {}).",
                    item.repr()?
                ),
            )
            .into());
        }
    }
    PyTuple::new(py, items)
}

mod extract {
    crate::args::extractors! {
        name: text "name",
        failure_threshold: optional_count1 "failure_threshold",
        failure_rate_threshold: optional_number "failure_rate_threshold",
        slow_call_rate_threshold: optional_number "slow_call_rate_threshold",
        slow_call_duration: number "slow_call_duration",
        window_type: text "window_type",
        window_size: count1 "window_size",
        minimum_calls: count1 "minimum_calls",
        reset_timeout: number "reset_timeout",
        backoff_multiplier: number "backoff_multiplier",
        max_reset_timeout: optional_number "max_reset_timeout",
        jitter: number "jitter",
        half_open_max_calls: count1 "half_open_max_calls",
        success_threshold: count1 "success_threshold",
    }
}

/// Without an explicit cap the wait may grow tenfold under backoff, and always leaves room for
/// jitter to lengthen the wait as well as shorten it.
fn default_max_reset_timeout(reset_timeout_nanos: u64, multiplier: f64, jitter: f64) -> u64 {
    let growth = if multiplier > 1.0 { 10.0 } else { 1.0 };
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let cap = reset_timeout_nanos as f64 * growth * (1.0 + jitter);
    (cap as u64).clamp(
        reset_timeout_nanos,
        crate::breaker::MAX_OPEN_WAIT_NANOS.max(reset_timeout_nanos),
    )
}

/// A refused admission: nanoseconds until a retry, `None` while forced open.
#[derive(Clone, Copy)]
struct Refused(Option<u64>);

thread_local! {
    /// Permits taken by `with breaker:` on this thread, innermost last, keyed by the breaker's
    /// address. Synchronous `with` blocks nest on a thread, so a stack pairs each exit with its
    /// entry without allocating a permit object per call.
    static ENTERED: RefCell<Vec<(usize, Permit)>> = const { RefCell::new(Vec::new()) };
}

/// A circuit breaker: stops calling a failing dependency, then lets trial calls test it.
///
/// >>> breaker = CircuitBreaker("payments", failure_threshold=3, reset_timeout=10.0)
/// >>> breaker.call(lambda: 42)
/// 42
#[pyclass(frozen, subclass, weakref, module = "buttress._core")]
pub struct CircuitBreaker {
    core: Breaker,
    // Kept as a Python string: a refusal hands it to the error without copying.
    name: Py<PyString>,
    clock: Option<Py<ManualClock>>,
    record_exceptions: Py<PyTuple>,
    ignore_exceptions: Py<PyTuple>,
    result_is_failure: Option<Py<PyAny>>,
    fallback: Option<Py<PyAny>>,
    // Only transitions and (un)registration touch the listeners, never the per-call path.
    listeners: Mutex<Vec<Py<PyAny>>>,
}

impl CircuitBreaker {
    fn key(&self) -> usize {
        self as *const Self as usize
    }

    /// Admits a call, running listeners for any transition admission caused. A refusal
    /// carries the wait until a retry (`None` while forced open).
    #[inline]
    fn admit(&self, slf: &Bound<'_, Self>) -> Result<Permit, Refused> {
        let (admission, transitions) = self.core.try_acquire();
        if !transitions.is_empty() {
            self.notify(slf, transitions);
        }
        match admission {
            Admission::Permitted(permit) => Ok(permit),
            Admission::Rejected { retry_after_nanos } => Err(Refused(retry_after_nanos)),
        }
    }

    fn open_error(&self, py: Python<'_>, refused: Refused) -> PyErr {
        circuit_open_error(
            py,
            self.name.bind(py).as_any(),
            refused.0.map(nanos_to_seconds),
        )
    }

    /// How an exception counts: ignored types, and interrupts that are not `Exception`s
    /// (cancellation, `KeyboardInterrupt`, even when listed in `record_exceptions`), are
    /// ignored; recorded types are failures; any other `Exception` counts as a success, as in
    /// resilience4j.
    fn classify(&self, py: Python<'_>, error: &Bound<'_, PyAny>) -> Outcome {
        let ignore = self.ignore_exceptions.bind(py);
        if !ignore.is_empty() && error.is_instance(ignore.as_any()).unwrap_or(false) {
            return Outcome::Ignored;
        }
        if !error
            .is_instance(&py.get_type::<pyo3::exceptions::PyException>())
            .unwrap_or(false)
        {
            return Outcome::Ignored;
        }
        if error
            .is_instance(self.record_exceptions.bind(py).as_any())
            .unwrap_or(false)
        {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// How a returned value counts, asking `result_is_failure` when one was given.
    fn classify_result(&self, value: &Bound<'_, PyAny>) -> PyResult<Outcome> {
        match &self.result_is_failure {
            None => Ok(Outcome::Success),
            Some(predicate) => {
                let failed = predicate.bind(value.py()).call1((value,))?.is_truthy()?;
                Ok(if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                })
            }
        }
    }

    #[inline]
    fn record(&self, slf: &Bound<'_, Self>, permit: Permit, outcome: Outcome) {
        let transitions = self.core.record(permit, outcome);
        if !transitions.is_empty() {
            self.notify(slf, transitions);
        }
    }

    /// Records how `result` ended and hands it back unchanged.
    #[inline]
    fn finish<'py>(
        &self,
        slf: &Bound<'py, Self>,
        permit: Permit,
        result: PyResult<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        match result {
            Ok(value) => {
                if self.result_is_failure.is_none() {
                    self.record(slf, permit, Outcome::Success);
                    return Ok(value);
                }
                match self.classify_result(&value) {
                    Ok(outcome) => {
                        self.record(slf, permit, outcome);
                        Ok(value)
                    }
                    Err(predicate_error) => {
                        self.record(slf, permit, Outcome::Ignored);
                        Err(predicate_error)
                    }
                }
            }
            Err(error) => {
                let outcome = self.classify(py, error.value(py).as_any());
                self.record(slf, permit, outcome);
                Err(error)
            }
        }
    }

    fn notify(&self, slf: &Bound<'_, Self>, transitions: Transitions) {
        let py = slf.py();
        let listeners: Vec<Py<PyAny>> = {
            let guard = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            guard
                .iter()
                .map(|listener| listener.clone_ref(py))
                .collect()
        };
        if listeners.is_empty() {
            return;
        }
        for transition in transitions.iter() {
            let states = state_object(py, transition.from)
                .and_then(|from| Ok((from, state_object(py, transition.to)?)));
            let (from, to) = match states {
                Ok(states) => states,
                Err(error) => {
                    error.write_unraisable(py, Some(slf.as_any()));
                    return;
                }
            };
            for listener in &listeners {
                // A listener's failure must not turn the caller's result into an error.
                if let Err(error) = listener.bind(py).call1((slf, &from, &to)) {
                    error.write_unraisable(py, Some(listener.bind(py)));
                }
            }
        }
    }

    /// `breaker.call(func, *args, **kwargs)`: admits, calls, records; a refusal raises
    /// `CircuitOpenError` or returns the fallback's result.
    fn call_through<'py>(
        slf: &Bound<'py, Self>,
        func: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        if !func.is_callable() {
            return Err(Error::wrong_type(
                "func",
                format!("func must be callable (got {}).", func.repr()?),
            )
            .into());
        }
        match this.admit(slf) {
            Ok(permit) => {
                let result = func.call(args, kwargs);
                this.finish(slf, permit, result)
            }
            Err(refused) => this.rejected(slf.py(), refused, args, kwargs),
        }
    }

    fn rejected<'py>(
        &self,
        py: Python<'py>,
        refused: Refused,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match &self.fallback {
            Some(fallback) => fallback.bind(py).call(args, kwargs),
            None => Err(self.open_error(py, refused)),
        }
    }
}

#[pymethods]
impl CircuitBreaker {
    #[new]
    #[pyo3(signature = (
        name = "default".to_owned(),
        *,
        failure_threshold = 5,
        failure_rate_threshold = None,
        slow_call_rate_threshold = None,
        slow_call_duration = 60.0,
        window_type = "count".to_owned(),
        window_size = 100,
        minimum_calls = 10,
        reset_timeout = 30.0,
        backoff_multiplier = 1.0,
        max_reset_timeout = None,
        jitter = 0.0,
        half_open_max_calls = 1,
        success_threshold = 1,
        record_exceptions = None,
        ignore_exceptions = None,
        result_is_failure = None,
        fallback = None,
        clock = None,
    ))]
    #[pyo3(
        text_signature = "(name='default', *, failure_threshold=5, failure_rate_threshold=None, \
        slow_call_rate_threshold=None, slow_call_duration=60.0, window_type='count', window_size=100, \
        minimum_calls=10, reset_timeout=30.0, backoff_multiplier=1.0, max_reset_timeout=None, \
        jitter=0.0, half_open_max_calls=1, success_threshold=1, record_exceptions=None, \
        ignore_exceptions=None, result_is_failure=None, fallback=None, clock=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        #[pyo3(from_py_with = extract::name)] name: String,
        #[pyo3(from_py_with = extract::failure_threshold)] failure_threshold: Option<u32>,
        #[pyo3(from_py_with = extract::failure_rate_threshold)] failure_rate_threshold: Option<f64>,
        #[pyo3(from_py_with = extract::slow_call_rate_threshold)] slow_call_rate_threshold: Option<
            f64,
        >,
        #[pyo3(from_py_with = extract::slow_call_duration)] slow_call_duration: f64,
        #[pyo3(from_py_with = extract::window_type)] window_type: String,
        #[pyo3(from_py_with = extract::window_size)] window_size: u32,
        #[pyo3(from_py_with = extract::minimum_calls)] minimum_calls: u32,
        #[pyo3(from_py_with = extract::reset_timeout)] reset_timeout: f64,
        #[pyo3(from_py_with = extract::backoff_multiplier)] backoff_multiplier: f64,
        #[pyo3(from_py_with = extract::max_reset_timeout)] max_reset_timeout: Option<f64>,
        #[pyo3(from_py_with = extract::jitter)] jitter: f64,
        #[pyo3(from_py_with = extract::half_open_max_calls)] half_open_max_calls: u32,
        #[pyo3(from_py_with = extract::success_threshold)] success_threshold: u32,
        record_exceptions: Option<Bound<'_, PyAny>>,
        ignore_exceptions: Option<Bound<'_, PyAny>>,
        result_is_failure: Option<Bound<'_, PyAny>>,
        fallback: Option<Bound<'_, PyAny>>,
        clock: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let window_kind = match window_type.as_str() {
            "count" => WindowKind::Count,
            "time" => WindowKind::Time,
            other => {
                return Err(Error::invalid(
                    "window_type",
                    format!("window_type must be 'count' or 'time' (got {other:?})."),
                )
                .into())
            }
        };
        let reset_timeout_nanos = parse_seconds("reset_timeout", reset_timeout)?;
        let config = BreakerConfig {
            failure_threshold,
            failure_rate_threshold,
            slow_call_rate_threshold,
            slow_call_duration_nanos: parse_seconds("slow_call_duration", slow_call_duration)?,
            window_kind,
            window_size,
            minimum_calls,
            reset_timeout_nanos,
            backoff_multiplier,
            max_reset_timeout_nanos: match max_reset_timeout {
                Some(seconds) => parse_seconds("max_reset_timeout", seconds)?,
                None => default_max_reset_timeout(reset_timeout_nanos, backoff_multiplier, jitter),
            },
            jitter,
            half_open_max_calls,
            success_threshold,
        };
        let (clock, core_clock) = parse_clock(clock)?;
        let exception = py.get_type::<pyo3::exceptions::PyException>();
        let record_exceptions = exception_classes(
            py,
            "record_exceptions",
            record_exceptions.as_ref(),
            &[exception],
        )?;
        let ignore_exceptions =
            exception_classes(py, "ignore_exceptions", ignore_exceptions.as_ref(), &[])?;
        let result_is_failure = optional_callable("result_is_failure", result_is_failure)?;
        let fallback = optional_callable("fallback", fallback)?;
        let core = Breaker::new(config, core_clock)?;
        Ok(CircuitBreaker {
            core,
            name: PyString::new(py, &name).unbind(),
            clock,
            record_exceptions: record_exceptions.unbind(),
            ignore_exceptions: ignore_exceptions.unbind(),
            result_is_failure,
            fallback,
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// The breaker's name, carried by `CircuitOpenError`.
    #[getter]
    fn name(&self, py: Python<'_>) -> Py<PyString> {
        self.name.clone_ref(py)
    }

    /// The current `CircuitState`; an open breaker whose wait is over reads as half-open.
    #[getter]
    fn state<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        let (state, transitions) = this.core.state();
        if !transitions.is_empty() {
            this.notify(slf, transitions);
        }
        state_object(slf.py(), state)
    }

    /// Seconds until an open breaker admits a trial call: 0.0 unless open, None when forced open.
    #[getter]
    fn retry_after(&self) -> Option<f64> {
        self.core.retry_after_nanos().map(nanos_to_seconds)
    }

    /// What a refused call returns instead of raising, or None.
    #[getter]
    fn fallback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.fallback
            .as_ref()
            .map(|fallback| fallback.clone_ref(py))
    }

    /// The manual clock this breaker reads, or None for the monotonic clock.
    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|clock| clock.clone_ref(py))
    }

    /// Admits a call without raising: a `CircuitPermit` to record the outcome on, or None.
    fn try_acquire(slf: &Bound<'_, Self>) -> PyResult<Option<CircuitPermit>> {
        let this = slf.get();
        Ok(this
            .admit(slf)
            .ok()
            .map(|permit| CircuitPermit::new(slf, permit)))
    }

    /// Admits a call or raises `CircuitOpenError`; record the outcome on the returned permit.
    fn acquire(slf: &Bound<'_, Self>) -> PyResult<CircuitPermit> {
        let this = slf.get();
        match this.admit(slf) {
            Ok(permit) => Ok(CircuitPermit::new(slf, permit)),
            Err(refused) => Err(this.open_error(slf.py(), refused)),
        }
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        match this.admit(slf) {
            Ok(permit) => {
                ENTERED.with(|stack| stack.borrow_mut().push((this.key(), permit)));
                Ok(())
            }
            Err(refused) => Err(this.open_error(slf.py(), refused)),
        }
    }

    #[pyo3(signature = (_exc_type, exc_value, _traceback))]
    fn __exit__(
        slf: &Bound<'_, Self>,
        _exc_type: &Bound<'_, PyAny>,
        exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let this = slf.get();
        let key = this.key();
        let permit = ENTERED.with(|stack| {
            let mut stack = stack.borrow_mut();
            let position = stack.iter().rposition(|(owner, _)| *owner == key)?;
            Some(stack.remove(position).1)
        });
        let Some(permit) = permit else {
            return Err(Error::Misuse(format!(
                "Circuit breaker '{}' was exited on a thread that did not enter it; use `with breaker:` on one thread, or `async with breaker:` in coroutines.",
                this.name
            ))
            .into());
        };
        let outcome = if exc_value.is_none() {
            Outcome::Success
        } else {
            this.classify(slf.py(), exc_value)
        };
        this.record(slf, permit, outcome);
        Ok(false)
    }

    /// Forces the breaker open: every call is refused until `reset()`.
    fn force_open(slf: &Bound<'_, Self>) {
        let this = slf.get();
        let transitions = this.core.transition_to(State::ForcedOpen);
        this.notify(slf, transitions);
    }

    /// Disables the breaker: every call is admitted and nothing is counted until `reset()`.
    fn disable(slf: &Bound<'_, Self>) {
        let this = slf.get();
        let transitions = this.core.transition_to(State::Disabled);
        this.notify(slf, transitions);
    }

    /// Closes the breaker and starts a fresh window, whatever its state.
    fn reset(slf: &Bound<'_, Self>) {
        let this = slf.get();
        let transitions = this.core.transition_to(State::Closed);
        this.notify(slf, transitions);
    }

    /// Calls `listener(breaker, old_state, new_state)` after every transition.
    fn add_listener(&self, listener: Bound<'_, PyAny>) -> PyResult<()> {
        let listener = optional_callable("listener", Some(listener))?.ok_or_else(|| {
            Error::wrong_type("listener", "listener must be callable (got None).")
        })?;
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(listener);
        Ok(())
    }

    /// Stops calling `listener`; raises ValueError when it was not added.
    fn remove_listener(&self, listener: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let mut position = None;
        for (index, known) in listeners.iter().enumerate() {
            if known.bind(listener.py()).eq(listener)? {
                position = Some(index);
                break;
            }
        }
        match position {
            Some(index) => {
                listeners.remove(index);
                Ok(())
            }
            None => Err(Error::invalid(
                "listener",
                "listener was never added to this breaker, so it cannot be removed.",
            )
            .into()),
        }
    }

    /// A snapshot of the state, the window's rates and the lifetime counts.
    fn metrics(slf: &Bound<'_, Self>) -> PyResult<BreakerMetrics> {
        let this = slf.get();
        // Like `state`, a snapshot first moves an expired open breaker to half-open.
        let (_, transitions) = this.core.state();
        if !transitions.is_empty() {
            this.notify(slf, transitions);
        }
        BreakerMetrics::from_core(slf.py(), this.core.metrics())
    }

    fn __repr__(&self) -> String {
        format!(
            "CircuitBreaker(name='{}', state='{}')",
            self.name,
            self.core.metrics().state.as_str()
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.clock)?;
        visit.call(&self.record_exceptions)?;
        visit.call(&self.ignore_exceptions)?;
        visit.call(&self.result_is_failure)?;
        visit.call(&self.fallback)?;
        // try_lock: the collector must never block; a listener list being edited right now
        // is simply not traversed this round.
        if let Ok(listeners) = self.listeners.try_lock() {
            for listener in listeners.iter() {
                visit.call(listener)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.clear();
        }
    }
}

/// One admitted call's ticket: record its outcome exactly once.
///
/// >>> breaker = CircuitBreaker("search")
/// >>> permit = breaker.try_acquire()
/// >>> if permit is not None:
/// ...     permit.success()
#[pyclass(frozen, module = "buttress._core")]
pub struct CircuitPermit {
    breaker: Py<CircuitBreaker>,
    permit: Permit,
    recorded: AtomicBool,
}

impl CircuitPermit {
    fn new(breaker: &Bound<'_, CircuitBreaker>, permit: Permit) -> Self {
        CircuitPermit {
            breaker: breaker.clone().unbind(),
            permit,
            recorded: AtomicBool::new(false),
        }
    }

    fn settle(&self, py: Python<'_>, outcome: Outcome) -> PyResult<()> {
        if self.recorded.swap(true, Ordering::AcqRel) {
            return Err(Error::PermitAlreadyRecorded.into());
        }
        let breaker = self.breaker.bind(py);
        breaker.get().record(breaker, self.permit, outcome);
        Ok(())
    }
}

#[pymethods]
impl CircuitPermit {
    /// Records a success.
    fn success(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py, Outcome::Success)
    }

    /// Records a failure.
    fn failure(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py, Outcome::Failure)
    }

    /// Releases the permit without counting the call either way.
    fn ignore(&self, py: Python<'_>) -> PyResult<()> {
        self.settle(py, Outcome::Ignored)
    }

    /// Records `error` as the breaker classifies it (recorded, ignored or other exception).
    fn record_exception(&self, error: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = error.py();
        if !error.is_instance_of::<PyBaseException>() {
            return Err(Error::wrong_type(
                "error",
                format!(
                    "error must be an exception instance (got {}).",
                    error.repr()?
                ),
            )
            .into());
        }
        let outcome = self.breaker.get().classify(py, error);
        self.settle(py, outcome)
    }

    /// Records a returned value, asking the breaker's `result_is_failure` when it has one.
    fn record_result(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = value.py();
        match self.breaker.get().classify_result(value) {
            Ok(outcome) => self.settle(py, outcome),
            Err(error) => {
                self.settle(py, Outcome::Ignored)?;
                Err(error)
            }
        }
    }

    /// True once an outcome was recorded.
    #[getter]
    fn recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (_exc_type, exc_value, _traceback))]
    fn __exit__(
        &self,
        _exc_type: &Bound<'_, PyAny>,
        exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        if self.recorded.load(Ordering::Acquire) {
            return Ok(false);
        }
        if exc_value.is_none() {
            self.success(exc_value.py())?;
        } else {
            self.record_exception(exc_value)?;
        }
        Ok(false)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.breaker)
    }
}

impl Drop for CircuitPermit {
    fn drop(&mut self) {
        // A permit dropped unrecorded must still give back its half-open slot; an ignored
        // outcome never causes a transition, so no listener has to run here.
        if !self.recorded.swap(true, Ordering::AcqRel) {
            self.breaker
                .get()
                .core
                .record(self.permit, Outcome::Ignored);
        }
    }
}

/// A function wrapped by `@breaker`: each call goes through the breaker, all in Rust.
#[pyclass(frozen, dict, weakref, module = "buttress._core")]
pub struct BreakerFunction {
    breaker: Py<CircuitBreaker>,
    func: Py<PyAny>,
}

#[pymethods]
impl BreakerFunction {
    #[new]
    fn new(breaker: Bound<'_, CircuitBreaker>, func: Bound<'_, PyAny>) -> PyResult<Self> {
        if !func.is_callable() {
            return Err(Error::wrong_type(
                "func",
                format!("func must be callable (got {}).", func.repr()?),
            )
            .into());
        }
        Ok(BreakerFunction {
            breaker: breaker.unbind(),
            func: func.unbind(),
        })
    }

    #[pyo3(signature = (*args, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let breaker = self.breaker.bind(py);
        let this = breaker.get();
        match this.admit(breaker) {
            Ok(permit) => {
                let result = self.func.bind(py).call(args, kwargs);
                this.finish(breaker, permit, result)
            }
            Err(refused) => this.rejected(py, refused, args, kwargs),
        }
    }

    /// Binds like a function, so a decorated method receives its instance.
    fn __get__<'py>(
        slf: &Bound<'py, Self>,
        instance: &Bound<'py, PyAny>,
        _owner: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if instance.is_none() {
            return Ok(slf.clone().into_any());
        }
        method_type(slf.py())?.call1((slf, instance))
    }

    /// The breaker this function calls through.
    #[getter]
    fn breaker(&self, py: Python<'_>) -> Py<CircuitBreaker> {
        self.breaker.clone_ref(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<BreakerFunction {} through {}>",
            self.func.bind(py).repr()?,
            self.breaker.get().__repr__()
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.breaker)?;
        visit.call(&self.func)
    }
}

/// A snapshot of a breaker: state, window rates and lifetime counts.
#[pyclass(frozen, get_all, module = "buttress._core")]
pub struct BreakerMetrics {
    /// The `CircuitState` when the snapshot was taken.
    state: Py<PyAny>,
    /// Failures / calls in the window, or None before `minimum_calls` calls were seen.
    failure_rate: Option<f64>,
    /// Slow calls / calls in the window, or None before `minimum_calls` calls were seen.
    slow_call_rate: Option<f64>,
    /// Calls in the current window (0 unless closed).
    window_calls: u32,
    /// Failed calls in the current window (0 unless closed).
    window_failures: u32,
    /// Slow calls in the current window (0 unless closed).
    window_slow_calls: u32,
    /// Calls whose outcome counted (successes + failures) since creation.
    calls: u64,
    /// Calls recorded as successes since creation.
    successes: u64,
    /// Calls recorded as failures since creation.
    failures: u64,
    /// Calls slower than `slow_call_duration` since creation (tracked when a slow-call rate is set).
    slow_calls: u64,
    /// Calls released without counting (ignored exceptions, cancellations) since creation.
    ignored: u64,
    /// Calls refused since creation.
    rejected: u64,
    /// State transitions since creation.
    transitions: u64,
    /// Failures in a row in the current closed period.
    consecutive_failures: u32,
    /// Trips in a row without closing in between (drives the backoff).
    consecutive_trips: u32,
}

impl BreakerMetrics {
    fn from_core(py: Python<'_>, metrics: Metrics) -> PyResult<Self> {
        Ok(BreakerMetrics {
            state: state_object(py, metrics.state)?.unbind(),
            failure_rate: metrics.failure_rate,
            slow_call_rate: metrics.slow_call_rate,
            window_calls: metrics.window.calls,
            window_failures: metrics.window.failures,
            window_slow_calls: metrics.window.slow,
            calls: metrics.successes + metrics.failures,
            successes: metrics.successes,
            failures: metrics.failures,
            slow_calls: metrics.slow_calls,
            ignored: metrics.ignored,
            rejected: metrics.rejected,
            transitions: metrics.transitions,
            consecutive_failures: metrics.consecutive_failures,
            consecutive_trips: metrics.consecutive_trips,
        })
    }
}

#[pymethods]
impl BreakerMetrics {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "BreakerMetrics(state={}, failure_rate={:?}, slow_call_rate={:?}, calls={}, failures={}, slow_calls={}, rejected={}, transitions={})",
            self.state.bind(py).repr()?,
            self.failure_rate,
            self.slow_call_rate,
            self.calls,
            self.failures,
            self.slow_calls,
            self.rejected,
            self.transitions
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.state)
    }
}

// ---- `CircuitBreaker.call`, by hand ----------------------------------------------------------
//
// PyO3 gives any method that takes `**kwargs` CPython's tuple-and-dict calling convention, so
// every `breaker.call(func)` would build a tuple of its arguments only to slice it again. As a
// METH_FASTCALL | METH_KEYWORDS method it reads CPython's argument array directly and builds
// only what `func` itself needs, which makes `call` as cheap as a decorated function.

const CALL_DOC: &std::ffi::CStr = c"call($self, func, /, *args, **kwargs)
--

Calls `func(*args, **kwargs)` through the breaker and records how it ended.

Raises `CircuitOpenError` (or returns the fallback's result) when the breaker refuses.";

/// Installs `call` on the class; run once when the module initialises.
pub(crate) fn install_call(py: Python<'_>) -> PyResult<()> {
    let definition: &'static mut ffi::PyMethodDef = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: c"call".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: call_fastcall,
        },
        ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: CALL_DOC.as_ptr(),
    }));
    let class = py.get_type::<CircuitBreaker>();
    // SAFETY: the definition is leaked, so it outlives the descriptor; the class pointer is a
    // live type object held by `class`.
    let descriptor = unsafe { ffi::PyDescr_NewMethod(class.as_type_ptr(), definition) };
    // SAFETY: PyDescr_NewMethod returns a new reference, or null with an exception set.
    let descriptor = unsafe { Bound::from_owned_ptr_or_err(py, descriptor)? };
    class.setattr("call", descriptor)
}

/// The METH_FASTCALL | METH_KEYWORDS entry point of `CircuitBreaker.call`.
unsafe extern "C" fn call_fastcall(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython only calls a method from a thread attached to the interpreter.
    let py = unsafe { Python::assume_attached() };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: CPython passes `slf`, then `nargs` positional arguments followed by one value
        // per name in `kwnames` (a tuple, or null), all borrowed for the length of the call.
        unsafe { call_from_array(py, slf, args, nargs, kwnames) }
    }));
    let result = outcome.unwrap_or_else(|_| {
        Err(pyo3::panic::PanicException::new_err(
            "buttress panicked inside CircuitBreaker.call; please report this as a bug.",
        ))
    });
    match result {
        Ok(value) => value.into_ptr(),
        Err(error) => {
            error.restore(py);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// The arguments must be those CPython passes to a METH_FASTCALL | METH_KEYWORDS method.
unsafe fn call_from_array<'py>(
    py: Python<'py>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `slf` is a live object borrowed for the call (the caller's contract).
    let slf = unsafe { Bound::from_borrowed_ptr(py, slf) };
    let slf = slf.cast::<CircuitBreaker>()?;
    let count = usize::try_from(nargs).unwrap_or(0);
    let names = if kwnames.is_null() {
        None
    } else {
        // SAFETY: a non-null `kwnames` is a live tuple of names borrowed for the call.
        Some(unsafe { Bound::from_borrowed_ptr(py, kwnames) }.cast_into::<PyTuple>()?)
    };
    let keywords = names.as_ref().map_or(0, |names| names.len());
    let array: &[*mut ffi::PyObject] = if count + keywords == 0 {
        &[]
    } else {
        // SAFETY: CPython's array holds `nargs` positional values then one per keyword name.
        unsafe { std::slice::from_raw_parts(args, count + keywords) }
    };
    // SAFETY: every pointer in the array is a live object borrowed for the call.
    let borrow = |pointer: &*mut ffi::PyObject| unsafe { Bound::from_borrowed_ptr(py, *pointer) };
    let (positional, values) = array.split_at(count);
    let Some((func, rest)) = positional.split_first() else {
        return Err(Error::wrong_type(
            "func",
            "call() needs the function to call: breaker.call(func, *args, **kwargs).",
        )
        .into());
    };
    let rest = PyTuple::new(py, rest.iter().map(borrow))?;
    let kwargs = match names {
        None => None,
        Some(names) => {
            let kwargs = PyDict::new(py);
            for (name, value) in names.iter().zip(values.iter().map(borrow)) {
                kwargs.set_item(name, value)?;
            }
            Some(kwargs)
        }
    };
    CircuitBreaker::call_through(slf, &borrow(func), &rest, kwargs.as_ref())
}
