//! The crate's one error type and its one mapping to the Python exceptions of `buttress.errors`.
//!
//! The cores return [`Error`]; only [`to_py_err`] knows which Python class each variant becomes,
//! so the hierarchy under `ButtressError` is defined once, in Python, with docstrings and pickling.

use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A value outside what the argument accepts; becomes `ValueError`.
    InvalidArgument {
        argument: &'static str,
        message: String,
    },
    /// A value of the wrong kind; becomes `TypeError`.
    WrongType {
        argument: &'static str,
        message: String,
    },
    /// The breaker refused the call; `retry_after` is `None` while it is forced open.
    CircuitOpen {
        name: String,
        retry_after_seconds: Option<f64>,
    },
    /// The bulkhead had no permit to give within its limits.
    BulkheadFull {
        name: String,
        max_concurrent: u32,
        reason: FullReason,
    },
    /// No connection came within the caller's timeout.
    PoolTimeout { name: String, timeout_seconds: f64 },
    /// `max_waiting` callers were already waiting for a connection.
    PoolFull { name: String, max_waiting: u32 },
    /// The pool was closed (before or while the caller waited).
    PoolClosed { name: String },
    /// A node name the ring does not hold; becomes `KeyError`.
    UnknownNode {
        argument: &'static str,
        name: String,
    },
    /// A lookup on a ring without nodes; becomes `buttress.EmptyRingError`.
    EmptyRing,
    /// A permit's outcome may be recorded once; becomes `RuntimeError`.
    PermitAlreadyRecorded,
    /// An API used out of order (for example `__exit__` without `__enter__`); becomes `RuntimeError`.
    Misuse(String),
    /// An append's expected version did not match the stream.
    WrongExpectedVersion {
        stream: String,
        expected: String,
        actual: Option<u64>,
    },
    /// An append reused event ids in a way a retry would not.
    DuplicateEvent { id: [u8; 16], message: String },
    /// A log file that does not check out, and not at its torn tail.
    StoreCorrupted {
        path: String,
        offset: u64,
        reason: String,
    },
    /// Another writer holds the log directory's lock.
    StoreLocked { path: String },
    /// The store failed a write earlier and takes no more appends.
    StoreFailed(String),
    /// The store was closed.
    StoreClosed,
    /// An operating-system error on a file; becomes `OSError`.
    Io { path: String, message: String },
    /// The write-behind queue had no room for another key.
    WriteQueueFull { capacity: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// Every permit was taken and waiting was not allowed or the wait queue was full.
    NoCapacity,
    /// The caller waited the longest it was allowed to.
    TimedOut,
}

impl FullReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FullReason::NoCapacity => "full",
            FullReason::TimedOut => "timeout",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(argument: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument,
            message: message.into(),
        }
    }

    pub fn wrong_type(argument: &'static str, message: impl Into<String>) -> Self {
        Error::WrongType {
            argument,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { message, .. } | Error::WrongType { message, .. } => {
                f.write_str(message)
            }
            // The user-facing sentences for these live in `buttress.errors`, where the
            // exception classes format them; this text only serves Rust-side debugging.
            Error::CircuitOpen { name, .. } => write!(f, "circuit breaker '{name}' is open"),
            Error::BulkheadFull { name, reason, .. } => {
                write!(f, "bulkhead '{name}' is full ({})", reason.as_str())
            }
            Error::PoolTimeout { name, .. } => write!(f, "pool '{name}' timed out"),
            Error::PoolFull { name, .. } => write!(f, "pool '{name}' has too many waiters"),
            Error::PoolClosed { name } => write!(f, "pool '{name}' is closed"),
            Error::UnknownNode { argument, name } => {
                write!(f, "{argument} '{name}' is not a node of this ring.")
            }
            Error::EmptyRing => f.write_str(
                "The hash ring has no nodes, so no key can be placed; add a node first.",
            ),
            Error::PermitAlreadyRecorded => f.write_str(
                "This permit's outcome was already recorded; record each permit exactly once.",
            ),
            Error::Misuse(message) | Error::StoreFailed(message) => f.write_str(message),
            Error::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => write!(
                f,
                "stream '{stream}': expected version {expected}, actual {actual:?}"
            ),
            Error::DuplicateEvent { message, .. } => f.write_str(message),
            Error::StoreCorrupted {
                path,
                offset,
                reason,
            } => write!(f, "{path} is corrupted at offset {offset}: {reason}"),
            Error::StoreLocked { path } => write!(f, "{path} is locked by another writer"),
            Error::StoreClosed => f.write_str("The event store is closed."),
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::WriteQueueFull { capacity } => {
                write!(f, "the write queue is full ({capacity} writes)")
            }
        }
    }
}

impl std::error::Error for Error {}

/// The exception classes of `buttress.errors`, looked up once: raising must stay cheap.
fn error_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &'static str,
) -> PyResult<&'py Bound<'py, PyType>> {
    cell.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("buttress.errors")?
                .getattr(name)?
                .cast_into::<PyType>()?
                .unbind(),
        )
    })
    .map(|class| class.bind(py))
}

static CIRCUIT_OPEN_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static BULKHEAD_FULL_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static POOL_TIMEOUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static POOL_FULL_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static POOL_CLOSED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static EMPTY_RING_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static WRONG_EXPECTED_VERSION_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DUPLICATE_EVENT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static STORE_CORRUPTED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static STORE_LOCKED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static STORE_FAILED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static STORE_CLOSED_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static WRITE_QUEUE_FULL_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn uuid_text(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).hyphenated().to_string()
}

/// `CircuitOpenError(name, retry_after)`; the breaker passes its name as a cached Python string.
pub fn circuit_open_error(
    py: Python<'_>,
    name: &Bound<'_, PyAny>,
    retry_after_seconds: Option<f64>,
) -> PyErr {
    match error_class(py, &CIRCUIT_OPEN_ERROR, "CircuitOpenError") {
        Ok(class) => PyErr::from_type(class.clone(), (name.clone().unbind(), retry_after_seconds)),
        Err(import_failure) => import_failure,
    }
}

/// The one place a Rust error becomes a Python exception.
pub fn to_py_err(py: Python<'_>, error: Error) -> PyErr {
    let built = match &error {
        Error::InvalidArgument { .. } => return PyValueError::new_err(error.to_string()),
        Error::WrongType { .. } => return PyTypeError::new_err(error.to_string()),
        Error::PermitAlreadyRecorded | Error::Misuse(_) => {
            return PyRuntimeError::new_err(error.to_string())
        }
        Error::UnknownNode { .. } => return PyKeyError::new_err(error.to_string()),
        Error::EmptyRing => error_class(py, &EMPTY_RING_ERROR, "EmptyRingError")
            .map(|class| PyErr::from_type(class.clone(), error.to_string())),
        Error::CircuitOpen {
            name,
            retry_after_seconds,
        } => {
            let name = pyo3::types::PyString::new(py, name);
            return circuit_open_error(py, name.as_any(), *retry_after_seconds);
        }
        Error::BulkheadFull {
            name,
            max_concurrent,
            reason,
        } => error_class(py, &BULKHEAD_FULL_ERROR, "BulkheadFullError").map(|class| {
            PyErr::from_type(
                class.clone(),
                (name.clone(), *max_concurrent, reason.as_str()),
            )
        }),
        Error::PoolTimeout {
            name,
            timeout_seconds,
        } => error_class(py, &POOL_TIMEOUT_ERROR, "PoolTimeoutError")
            .map(|class| PyErr::from_type(class.clone(), (name.clone(), *timeout_seconds))),
        Error::PoolFull { name, max_waiting } => error_class(py, &POOL_FULL_ERROR, "PoolFullError")
            .map(|class| PyErr::from_type(class.clone(), (name.clone(), *max_waiting))),
        Error::PoolClosed { name } => error_class(py, &POOL_CLOSED_ERROR, "PoolClosedError")
            .map(|class| PyErr::from_type(class.clone(), (name.clone(),))),
        Error::Io { .. } => return pyo3::exceptions::PyOSError::new_err(error.to_string()),
        Error::WrongExpectedVersion {
            stream,
            expected,
            actual,
        } => error_class(
            py,
            &WRONG_EXPECTED_VERSION_ERROR,
            "WrongExpectedVersionError",
        )
        .map(|class| PyErr::from_type(class.clone(), (stream.clone(), expected.clone(), *actual))),
        Error::DuplicateEvent { id, message } => {
            error_class(py, &DUPLICATE_EVENT_ERROR, "DuplicateEventError")
                .map(|class| PyErr::from_type(class.clone(), (uuid_text(id), message.clone())))
        }
        Error::StoreCorrupted {
            path,
            offset,
            reason,
        } => error_class(py, &STORE_CORRUPTED_ERROR, "StoreCorruptedError")
            .map(|class| PyErr::from_type(class.clone(), (path.clone(), *offset, reason.clone()))),
        Error::StoreLocked { path } => error_class(py, &STORE_LOCKED_ERROR, "StoreLockedError")
            .map(|class| PyErr::from_type(class.clone(), (path.clone(),))),
        Error::StoreFailed(message) => {
            error_class(py, &STORE_FAILED_ERROR, "EventStoreFailedError")
                .map(|class| PyErr::from_type(class.clone(), (message.clone(),)))
        }
        Error::StoreClosed => error_class(py, &STORE_CLOSED_ERROR, "EventStoreClosedError")
            .map(|class| PyErr::from_type(class.clone(), ())),
        Error::WriteQueueFull { capacity } => {
            error_class(py, &WRITE_QUEUE_FULL_ERROR, "WriteQueueFullError")
                .map(|class| PyErr::from_type(class.clone(), (*capacity,)))
        }
    };
    built.unwrap_or_else(|import_failure| import_failure)
}

impl From<Error> for PyErr {
    fn from(error: Error) -> Self {
        Python::attach(|py| to_py_err(py, error))
    }
}

impl From<crate::eventstore::StoreError> for Error {
    fn from(error: crate::eventstore::StoreError) -> Self {
        use crate::eventlog::LogError;
        use crate::eventstore::StoreError;
        match error {
            StoreError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => Error::WrongExpectedVersion {
                stream: stream.to_string(),
                expected: expected.to_string(),
                actual,
            },
            StoreError::DuplicateEvent { id, reason } => Error::DuplicateEvent {
                id,
                message: reason,
            },
            StoreError::Invalid(message) => Error::invalid("events", message),
            StoreError::Failed(message) => Error::StoreFailed(message),
            StoreError::Closed => Error::StoreClosed,
            StoreError::Log(LogError::Io { path, error }) => Error::Io {
                path: path.display().to_string(),
                message: error.to_string(),
            },
            StoreError::Log(LogError::Corrupted {
                path,
                offset,
                reason,
            }) => Error::StoreCorrupted {
                path: path.display().to_string(),
                offset,
                reason,
            },
            StoreError::Log(LogError::Locked { path }) => Error::StoreLocked {
                path: path.display().to_string(),
            },
        }
    }
}
