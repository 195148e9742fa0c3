//! Python binding of the write-behind queue. Keys are turned into plain Rust values (str,
//! bytes or int) before the queue's lock is taken, values are kept as reference-counted Python
//! objects the queue never looks into, and every wait releases the GIL.

use crate::cache_py::{key_hash, LocalCache};
use crate::clock::instant_after;
use crate::errors::Error;
use crate::writebehind::{Failed, Op, Refused, Taken, WriteQueue as Core};
use hashbrown::Equivalent;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};
use pyo3::PyTraverseError;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

mod extract {
    crate::args::extractors! {
        capacity: count1 "capacity",
        max_attempts: count1 "max_attempts",
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    Str(Arc<str>),
    Bytes(Arc<[u8]>),
    Int(i64),
    /// An int beyond 64 bits, by its decimal text.
    BigInt(Arc<str>),
}

type Value = Arc<Py<PyAny>>;

/// A key borrowed from its Python object, for lookups that need no owned `Key`. It hashes as
/// the `Key` it names: the same variants in the same order, each field hashing as the other's
/// (`&str` as `Arc<str>`, `&[u8]` as `Arc<[u8]>`, `String` as `Arc<str>`).
#[derive(Hash, Debug)]
enum KeyRef<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
    Int(i64),
    BigInt(String),
}

impl<'a> KeyRef<'a> {
    fn of(key: &'a Bound<'_, PyAny>) -> PyResult<KeyRef<'a>> {
        if let Ok(text) = key.cast::<PyString>() {
            return Ok(KeyRef::Str(text.to_str()?));
        }
        if let Ok(bytes) = key.cast::<PyBytes>() {
            return Ok(KeyRef::Bytes(bytes.as_bytes()));
        }
        if key.is_instance_of::<PyInt>() && !key.is_instance_of::<PyBool>() {
            return Ok(match key.extract::<i64>() {
                Ok(number) => KeyRef::Int(number),
                Err(_) => KeyRef::BigInt(key.str()?.to_str()?.to_owned()),
            });
        }
        Err(Error::wrong_type(
            "key",
            format!(
                "key must be a str, bytes or int (got {}).",
                key.get_type().name()?
            ),
        )
        .into())
    }

    fn to_key(&self) -> Key {
        match self {
            KeyRef::Str(text) => Key::Str(Arc::from(*text)),
            KeyRef::Bytes(bytes) => Key::Bytes(Arc::from(*bytes)),
            KeyRef::Int(number) => Key::Int(*number),
            KeyRef::BigInt(text) => Key::BigInt(Arc::from(text.as_str())),
        }
    }
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        match (self, key) {
            (KeyRef::Str(a), Key::Str(b)) => *a == &**b,
            (KeyRef::Bytes(a), Key::Bytes(b)) => *a == &**b,
            (KeyRef::Int(a), Key::Int(b)) => a == b,
            (KeyRef::BigInt(a), Key::BigInt(b)) => a.as_str() == &**b,
            _ => false,
        }
    }
}

impl Key {
    fn to_object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Key::Str(text) => PyString::new(py, text).into_any(),
            Key::Bytes(bytes) => PyBytes::new(py, bytes).into_any(),
            Key::Int(number) => number.into_pyobject(py)?.into_any(),
            Key::BigInt(text) => py.get_type::<PyInt>().call1((&**text,))?,
        })
    }
}

fn op_parts<'py>(py: Python<'py>, op: &Op<Value>) -> (Bound<'py, PyAny>, bool) {
    match op {
        Op::Put(value) => (value.bind(py).clone(), false),
        Op::Delete => (py.None().into_bound(py), true),
    }
}

/// A wait of `value` seconds: any number from 0; one longer than a `Duration` holds is
/// as long as it takes.
fn seconds(argument: &'static str, value: f64) -> PyResult<Duration> {
    if !(value >= 0.0 && value.is_finite()) {
        return Err(Error::invalid(
            argument,
            format!("{argument} must be a finite number of seconds from 0 (got {value})."),
        )
        .into());
    }
    Ok(Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX))
}

fn full_error(capacity: usize) -> PyErr {
    Error::WriteQueueFull { capacity }.into()
}

fn closed_error() -> PyErr {
    Error::Misuse("The write queue is closed; it takes no more writes.".to_owned()).into()
}

/// The bounded, coalescing queue of pending writes behind `buttress.WriteBehind`.
#[pyclass(frozen, module = "buttress._core")]
pub struct WriteQueue {
    core: Core<Key, Value>,
    capacity: usize,
}

impl WriteQueue {
    fn put_and_cache(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: Py<PyAny>,
        cache: &LocalCache,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let hash = key_hash(key)?;
        let cached = value.clone_ref(py);
        self.enqueue(py, key, Op::Put(Arc::new(value)), block, timeout)?;
        cache.set_hashed(key, hash, cached);
        Ok(())
    }

    fn enqueue(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        op: Op<Value>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let key = KeyRef::of(key)?;
        if !block {
            return match self.core.try_enqueue_by(&key, op, KeyRef::to_key) {
                Ok(()) => Ok(()),
                Err(Refused::Full) => Err(full_error(self.capacity)),
                Err(Refused::Closed) => Err(closed_error()),
            };
        }
        let deadline = match timeout {
            None => None,
            Some(wait) => Some(instant_after(Instant::now(), seconds("timeout", wait)?)),
        };
        let mut interrupted: Option<PyErr> = None;
        let outcome = self
            .core
            .enqueue_by(&key, op, KeyRef::to_key, deadline, |wait| {
                py.detach(|| wait(SIGNAL_CHECK_INTERVAL));
                match py.check_signals() {
                    Ok(()) => Ok(()),
                    Err(error) => {
                        interrupted = Some(error);
                        Err(Refused::Full)
                    }
                }
            });
        if let Some(error) = interrupted {
            return Err(error);
        }
        match outcome {
            Ok(()) => Ok(()),
            Err(Refused::Full) => Err(full_error(self.capacity)),
            Err(Refused::Closed) => Err(closed_error()),
        }
    }

    fn taken_tuple<'py>(
        py: Python<'py>,
        taken: &Taken<Key, Value>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let (value, deleted) = op_parts(py, &taken.op);
        PyTuple::new(
            py,
            [
                taken.key.to_object(py)?,
                value,
                taken.attempts.into_pyobject(py)?.into_any(),
                PyBool::new(py, deleted).to_owned().into_any(),
            ],
        )
    }
}

#[pymethods]
impl WriteQueue {
    #[new]
    #[pyo3(signature = (capacity, *, max_attempts = 5))]
    fn new(
        #[pyo3(from_py_with = extract::capacity)] capacity: u32,
        #[pyo3(from_py_with = extract::max_attempts)] max_attempts: u32,
    ) -> PyResult<Self> {
        let capacity = capacity as usize;
        Ok(WriteQueue {
            core: Core::new(capacity, max_attempts),
            capacity,
        })
    }

    /// Queues `key = value`; a newer write of a waiting key replaces it. When the queue is
    /// full: raises `WriteQueueFullError`, or with `block` waits up to `timeout` seconds.
    #[pyo3(signature = (key, value, *, block = false, timeout = None))]
    fn put(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: Py<PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        self.enqueue(py, key, Op::Put(Arc::new(value)), block, timeout)
    }

    /// `put`, then `cache.set(key, value)` in the same call: no other thread can queue and
    /// cache a write of the key in between, so the cache always ends with the value the
    /// queue will write last. The key is checked against the cache's rules before queuing.
    #[pyo3(signature = (key, value, cache, *, block = false, timeout = None))]
    fn put_cached(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: Py<PyAny>,
        cache: &Bound<'_, LocalCache>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        self.put_and_cache(py, key, value, cache.get(), block, timeout)
    }

    /// `put_cached` with `cache`, `block` and `timeout` bound once: its `set(key, value)` is
    /// a write-behind's `set` in one call into Rust.
    #[pyo3(signature = (cache, *, block = false, timeout = None))]
    fn cached_writer(
        slf: &Bound<'_, Self>,
        cache: &Bound<'_, LocalCache>,
        block: bool,
        timeout: Option<f64>,
    ) -> CachedWriter {
        CachedWriter {
            queue: slf.clone().unbind(),
            cache: cache.clone().unbind(),
            block,
            timeout,
        }
    }

    /// Queues the deletion of `key`, as `put` queues a value.
    #[pyo3(signature = (key, *, block = false, timeout = None))]
    fn delete(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        self.enqueue(py, key, Op::Delete, block, timeout)
    }

    /// Up to `max_batch` writes as `(key, value, attempts, deleted)`, oldest first, never a key
    /// already in flight; waits up to `timeout` seconds (GIL released) while there are none.
    /// With a `linger` (seconds), waits for `max_batch` writes, but holds the oldest of them
    /// back no longer than `linger`; a retry, a closed queue or a `wait_idle` cuts it short.
    #[pyo3(signature = (max_batch, timeout, *, linger = 0.0))]
    fn take<'py>(
        &self,
        py: Python<'py>,
        max_batch: usize,
        timeout: f64,
        linger: f64,
    ) -> PyResult<Bound<'py, PyList>> {
        let timeout = seconds("timeout", timeout)?;
        let linger = seconds("linger", linger)?;
        let taken = py.detach(|| self.core.take(max_batch.max(1), timeout, linger));
        let items = taken
            .iter()
            .map(|item| Self::taken_tuple(py, item))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// Settles writes the database has: they leave the queue. Returns how many were in flight.
    fn done(&self, keys: &Bound<'_, PyAny>) -> PyResult<usize> {
        let keys = keys.try_iter()?.collect::<PyResult<Vec<_>>>()?;
        let keys = keys.iter().map(KeyRef::of).collect::<PyResult<Vec<_>>>()?;
        Ok(self.core.done(keys.iter()))
    }

    /// Settles a write that failed: `("retried", None, False)`, `("superseded", None, False)`
    /// or, out of attempts, `("dead", value, deleted)`; None when the key was not in flight.
    fn failed<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Some(outcome) = self.core.failed(&KeyRef::of(key)?) else {
            return Ok(None);
        };
        let none = py.None().into_bound(py);
        let no = PyBool::new(py, false).to_owned().into_any();
        let parts = match outcome {
            Failed::Retried => [PyString::new(py, "retried").into_any(), none, no],
            Failed::Superseded => [PyString::new(py, "superseded").into_any(), none, no],
            Failed::DeadLetter(op) => {
                let (value, deleted) = op_parts(py, &op);
                [
                    PyString::new(py, "dead").into_any(),
                    value,
                    PyBool::new(py, deleted).to_owned().into_any(),
                ]
            }
        };
        Ok(Some(PyTuple::new(py, parts)?))
    }

    /// The newest unsettled write of `key` as `(value, deleted)`, or None.
    fn read<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'_, PyAny>,
    ) -> PyResult<Option<(Bound<'py, PyAny>, bool)>> {
        Ok(self
            .core
            .read(&KeyRef::of(key)?)
            .map(|op| op_parts(py, &op)))
    }

    /// Waits (GIL released) until no write is waiting or in flight; False after `timeout`.
    fn wait_idle(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let deadline = instant_after(Instant::now(), seconds("timeout", timeout)?);
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(SIGNAL_CHECK_INTERVAL);
            if py.detach(|| self.core.wait_idle(slice)) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    /// Every unsettled write as `(key, value, deleted)`: waiting ones in turn, then in flight.
    fn unsettled<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .core
            .unsettled()
            .iter()
            .map(|(key, op)| {
                let (value, deleted) = op_parts(py, op);
                PyTuple::new(
                    py,
                    [
                        key.to_object(py)?,
                        value,
                        PyBool::new(py, deleted).to_owned().into_any(),
                    ],
                )
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// Refuses new writes; what is queued can still be taken and settled.
    fn close(&self) {
        self.core.close();
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }

    /// A count that moves whenever a write of `key` is accepted (now and then also for a key
    /// sharing its stripe): a read-through compares it before and after, to tell that a write
    /// of its key came meanwhile.
    fn writes_to(&self, key: &Bound<'_, PyAny>) -> PyResult<u64> {
        Ok(self.core.writes_to(&KeyRef::of(key)?))
    }

    /// The queue's counters: enqueued, coalesced, flushed, retried, dead_lettered,
    /// superseded, depth, in_flight, high_water, capacity.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.core.stats();
        let dict = PyDict::new(py);
        dict.set_item("enqueued", stats.enqueued)?;
        dict.set_item("coalesced", stats.coalesced)?;
        dict.set_item("flushed", stats.flushed)?;
        dict.set_item("retried", stats.retried)?;
        dict.set_item("dead_lettered", stats.dead_lettered)?;
        dict.set_item("superseded", stats.superseded)?;
        dict.set_item("depth", stats.depth)?;
        dict.set_item("in_flight", stats.in_flight)?;
        dict.set_item("high_water", stats.high_water)?;
        dict.set_item("capacity", stats.capacity)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        let stats = self.core.stats();
        format!(
            "WriteQueue(capacity={}, depth={}, in_flight={})",
            self.capacity, stats.depth, stats.in_flight
        )
    }
}

/// A write-behind's `set(key, value)` over a `LocalCache`: queues the write and fills the
/// cache in one call (see `WriteQueue.put_cached`).
#[pyclass(frozen, module = "buttress._core")]
pub struct CachedWriter {
    queue: Py<WriteQueue>,
    cache: Py<LocalCache>,
    block: bool,
    timeout: Option<f64>,
}

#[pymethods]
impl CachedWriter {
    /// Queues `key = value` and caches it, as `WriteQueue.put_cached` does. A method rather
    /// than `__call__`: a bound method takes the fast calling convention, while `__call__`
    /// gets its arguments packed in a tuple.
    fn set(&self, py: Python<'_>, key: &Bound<'_, PyAny>, value: Py<PyAny>) -> PyResult<()> {
        self.queue
            .get()
            .put_and_cache(py, key, value, self.cache.get(), self.block, self.timeout)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.queue)?;
        visit.call(&self.cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn a_borrowed_key_hashes_and_compares_as_the_key_it_names() {
        let hasher = foldhash::fast::FixedState::default();
        let pairs = [
            (KeyRef::Str("user:1"), Key::Str(Arc::from("user:1"))),
            (
                KeyRef::Bytes(b"user:1"),
                Key::Bytes(Arc::from(&b"user:1"[..])),
            ),
            (KeyRef::Int(-7), Key::Int(-7)),
            (
                KeyRef::BigInt("18446744073709551616".to_owned()),
                Key::BigInt(Arc::from("18446744073709551616")),
            ),
        ];
        for (borrowed, owned) in &pairs {
            assert_eq!(hasher.hash_one(borrowed), hasher.hash_one(owned));
            assert!(borrowed.equivalent(owned));
            assert_eq!(&borrowed.to_key(), owned);
        }
        // The same text as str, bytes and big int names three different keys.
        assert!(!KeyRef::Str("1").equivalent(&Key::Bytes(Arc::from(&b"1"[..]))));
        assert!(!KeyRef::Str("1").equivalent(&Key::BigInt(Arc::from("1"))));
        assert!(!KeyRef::Int(1).equivalent(&Key::Int(2)));
    }
}
