//! Python binding of the manual clock.

use crate::clock::{nanos_to_seconds, seconds_to_nanos, Clock, ManualTime};
use crate::errors::Error;
use pyo3::prelude::*;
use std::sync::Arc;

mod extract {
    crate::args::extractors! {
        start: number "start",
        seconds: number "seconds",
    }
}

/// A clock that moves only when told to: pass it as `clock=` so tests never sleep.
///
/// >>> clock = ManualClock()
/// >>> clock.advance(1.5)
/// >>> clock.now()
/// 1.5
#[pyclass(frozen, module = "buttress._core")]
pub struct ManualClock {
    pub(crate) time: Arc<ManualTime>,
}

pub(crate) fn parse_seconds(argument: &'static str, seconds: f64) -> Result<u64, Error> {
    seconds_to_nanos(seconds).ok_or_else(|| {
        Error::invalid(
            argument,
            format!(
                "{argument} must be a number of seconds from 0 up to about 584 years (got {seconds})."
            ),
        )
    })
}

#[pymethods]
impl ManualClock {
    #[new]
    #[pyo3(signature = (start = 0.0))]
    fn new(#[pyo3(from_py_with = extract::start)] start: f64) -> PyResult<Self> {
        let start = parse_seconds("start", start)?;
        Ok(ManualClock {
            time: Arc::new(ManualTime::new(start)),
        })
    }

    /// The clock's reading in seconds.
    fn now(&self) -> f64 {
        nanos_to_seconds(self.time.now_nanos())
    }

    /// Moves the clock forward by `seconds`.
    fn advance(&self, #[pyo3(from_py_with = extract::seconds)] seconds: f64) -> PyResult<()> {
        self.time.advance(parse_seconds("seconds", seconds)?);
        Ok(())
    }

    /// Moves the clock to `seconds`; a monotonic clock never goes back, so an earlier time fails.
    fn set(&self, #[pyo3(from_py_with = extract::seconds)] seconds: f64) -> PyResult<()> {
        let nanos = parse_seconds("seconds", seconds)?;
        self.time.set(nanos).map_err(|current| {
            Error::invalid(
                "seconds",
                format!(
                    "seconds must not be earlier than the clock's current {} (got {seconds}); a manual clock only moves forward.",
                    nanos_to_seconds(current)
                ),
            )
            .into()
        })
    }

    fn __repr__(&self) -> String {
        format!("ManualClock(now={})", self.now())
    }
}

/// The `clock=` argument: a `ManualClock` (kept, to hand back from a `clock` property) or None
/// for the monotonic clock.
pub(crate) fn parse_clock(
    clock: Option<Bound<'_, PyAny>>,
) -> PyResult<(Option<Py<ManualClock>>, Clock)> {
    match clock {
        None => Ok((None, Clock::monotonic())),
        Some(clock) if clock.is_none() => Ok((None, Clock::monotonic())),
        Some(clock) => match clock.cast::<ManualClock>() {
            Ok(manual) => Ok((Some(manual.clone().unbind()), manual.get().clock())),
            Err(_) => Err(Error::wrong_type(
                "clock",
                format!(
                    "clock must be a buttress.ManualClock or None (got {}).",
                    clock.repr()?
                ),
            )
            .into()),
        },
    }
}

impl ManualClock {
    pub(crate) fn clock(&self) -> Clock {
        Clock::Manual(self.time.clone())
    }
}
