//! Argument extraction for the bindings: every wrong type or value names the argument in the
//! message itself (PyO3 only adds the name as a note), and an int too large for the field is a
//! `ValueError`, not an `OverflowError`.
//!
//! `#[pyo3(from_py_with = ...)]` takes a plain function, so `extractors!` stamps one small
//! function per argument around the shared conversions below.

use crate::errors::Error;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};

fn describe(value: &Bound<'_, PyAny>) -> String {
    value
        .repr()
        .map(|repr| repr.to_string())
        .unwrap_or_else(|_| "an object".to_owned())
}

/// A whole number from `min` to `u32::MAX`.
pub fn count(argument: &'static str, value: &Bound<'_, PyAny>, min: u32) -> PyResult<u32> {
    // A bool is an int to Python, but `max_size=True` is a mistake, not a size of 1.
    if !value.is_instance_of::<PyInt>() || value.is_instance_of::<PyBool>() {
        return Err(Error::wrong_type(
            argument,
            format!(
                "{argument} must be a whole number (got {}).",
                describe(value)
            ),
        )
        .into());
    }
    value
        .extract::<i64>()
        .ok()
        .and_then(|number| u32::try_from(number).ok())
        .filter(|number| *number >= min)
        .ok_or_else(|| {
            Error::invalid(
                argument,
                format!(
                    "{argument} must be a whole number from {min} to {} (got {}).",
                    u32::MAX,
                    describe(value)
                ),
            )
            .into()
        })
}

/// A real number (an int or a float), any value; ranges are checked by the cores.
pub fn number(argument: &'static str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if !(value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>())
        || value.is_instance_of::<PyBool>()
    {
        return Err(Error::wrong_type(
            argument,
            format!("{argument} must be a number (got {}).", describe(value)),
        )
        .into());
    }
    value.extract::<f64>().map_err(|_| {
        Error::invalid(
            argument,
            format!("{argument} is too large (got {}).", describe(value)),
        )
        .into()
    })
}

pub fn text(argument: &'static str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    match value.cast::<PyString>() {
        Ok(text) => Ok(text.to_str()?.to_owned()),
        Err(_) => Err(Error::wrong_type(
            argument,
            format!("{argument} must be a string (got {}).", describe(value)),
        )
        .into()),
    }
}

pub fn optional<T>(
    value: &Bound<'_, PyAny>,
    extract: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>,
) -> PyResult<Option<T>> {
    if value.is_none() {
        Ok(None)
    } else {
        extract(value).map(Some)
    }
}

/// A callable, or `None` (also for an absent argument).
pub fn optional_callable(
    argument: &'static str,
    value: Option<Bound<'_, PyAny>>,
) -> PyResult<Option<Py<PyAny>>> {
    match value {
        None => Ok(None),
        Some(value) if value.is_none() => Ok(None),
        Some(value) => callable(argument, value).map(Some),
    }
}

/// A callable, named in the error when it is not one.
pub fn callable(argument: &'static str, value: Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    if value.is_callable() {
        Ok(value.unbind())
    } else {
        Err(Error::wrong_type(
            argument,
            format!("{argument} must be callable (got {}).", describe(&value)),
        )
        .into())
    }
}

/// Stamps `fn name(value) -> PyResult<T>` extractors for `#[pyo3(from_py_with = name)]`.
macro_rules! extractors {
    ($( $name:ident : $kind:tt $arg:literal ),* $(,)?) => {
        $( $crate::args::extractors!(@one $name $kind $arg); )*
    };
    (@one $name:ident count1 $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<u32> {
            $crate::args::count($arg, value, 1)
        }
    };
    (@one $name:ident count0 $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<u32> {
            $crate::args::count($arg, value, 0)
        }
    };
    (@one $name:ident optional_count0 $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<Option<u32>> {
            $crate::args::optional(value, |value| $crate::args::count($arg, value, 0))
        }
    };
    (@one $name:ident optional_count1 $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<Option<u32>> {
            $crate::args::optional(value, |value| $crate::args::count($arg, value, 1))
        }
    };
    (@one $name:ident number $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<f64> {
            $crate::args::number($arg, value)
        }
    };
    (@one $name:ident optional_number $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<Option<f64>> {
            $crate::args::optional(value, |value| $crate::args::number($arg, value))
        }
    };
    (@one $name:ident text $arg:literal) => {
        pub fn $name(value: &pyo3::Bound<'_, pyo3::PyAny>) -> pyo3::PyResult<String> {
            $crate::args::text($arg, value)
        }
    };
}

pub(crate) use extractors;
