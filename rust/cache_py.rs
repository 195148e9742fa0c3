//! Python binding of the in-process cache. Keys and values are kept as Python objects; a key
//! is found by Python's own hash and equality, like a dict finds it.
//!
//! The cache's state is guarded by the GIL rather than a lock of its own (a lock's two atomic
//! operations were a quarter of a hit's cost). That is sound because nothing that touches the
//! state runs Python code, so no other thread can take the GIL meanwhile, and nothing can
//! re-enter: keys are limited to the built-in types whose hash and equality are plain C (str,
//! bytes, int, float, bool, None, and tuples of those), hashes are taken before the state is
//! touched, and every key and value the cache lets go of is dropped afterwards (a last
//! reference can run a `__del__`).

use crate::cache::{Dropped, S3Fifo};
use crate::clock::{nanos_to_seconds, seconds_to_nanos};
use crate::clock_py::{parse_clock, ManualClock};
use crate::errors::Error;
use pyo3::exceptions::PyKeyError;
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString, PyTuple};
use pyo3::PyTraverseError;
use std::cell::UnsafeCell;

mod extract {
    crate::args::extractors! {
        max_size: count1 "max_size",
        ttl: optional_number "ttl",
    }
}

type Core = S3Fifo<Py<PyAny>, Py<PyAny>>;

/// State that only a thread holding the GIL touches, and only through `with`, whose closures
/// run no Python code (see the module's notes). This crate is built for CPython's stable ABI,
/// which exists only for interpreters with a GIL.
struct GilGuarded<T>(UnsafeCell<T>);

// SAFETY: every access goes through `with` (which takes a GIL token) or, in the collector's
// traversal, `visit`; the GIL serialises them, and none runs Python code that could let
// another thread in or call back into the cache.
unsafe impl<T: Send> Sync for GilGuarded<T> {}

impl<T> GilGuarded<T> {
    fn new(value: T) -> Self {
        GilGuarded(UnsafeCell::new(value))
    }

    fn with<R>(&self, _py: Python<'_>, use_state: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: the token proves this thread holds the GIL, so no other thread is inside
        // `with`; `use_state` runs no Python code and never calls `with` again, so this
        // thread is not inside it twice.
        use_state(unsafe { &mut *self.0.get() })
    }

    /// For `__traverse__`, which gets no GIL token but runs with the GIL held, from a
    /// collection that Python code started (never from inside `with`).
    fn visit<R>(&self, use_state: impl FnOnce(&T) -> R) -> R {
        // SAFETY: as for `with`: the collector holds the GIL and cannot start inside `with`,
        // whose closures allocate no Python objects.
        use_state(unsafe { &*self.0.get() })
    }
}
type Graveyard = Dropped<Py<PyAny>, Py<PyAny>>;

/// Whether `key`'s hash and equality are built-in C code that cannot run Python code.
fn plain_key(key: &Bound<'_, PyAny>) -> bool {
    if key.is_exact_instance_of::<PyString>()
        || key.is_exact_instance_of::<PyInt>()
        || key.is_exact_instance_of::<PyBytes>()
        || key.is_exact_instance_of::<PyFloat>()
        || key.is_exact_instance_of::<PyBool>()
        || key.is_none()
    {
        return true;
    }
    match key.cast_exact::<PyTuple>() {
        Ok(items) => items.iter().all(|item| plain_key(&item)),
        Err(_) => false,
    }
}

/// The type that makes `key` unusable, down to the element of a tuple that does.
fn describe_key(key: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(items) = key.cast_exact::<PyTuple>() {
        if let Some(bad) = items.iter().find(|item| !plain_key(item)) {
            return Ok(format!("a tuple holding {}", describe_key(&bad)?));
        }
    }
    Ok(key.get_type().name()?.to_string())
}

/// Python's hash of `key`, spread over the high bits the hash table probes with (the hash of a
/// small int is the int itself).
pub(crate) fn key_hash(key: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !plain_key(key) {
        return Err(Error::wrong_type(
            "key",
            format!(
                "key must be a str, bytes, int, float, bool, None or a tuple of those (got {}).",
                describe_key(key)?
            ),
        )
        .into());
    }
    let spread = (key.hash()? as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Ok(spread ^ (spread >> 32))
}

/// Python's `stored == key`, for keys `plain_key` accepted.
fn same_key(stored: &Py<PyAny>, key: &Bound<'_, PyAny>) -> bool {
    if stored.as_ptr() == key.as_ptr() {
        return true;
    }
    // SAFETY: both pointers are live objects (the cache holds `stored`, the caller `key`) and
    // the GIL is held. The comparison of built-in types runs no Python code; should it fail
    // (out of memory) the error is cleared and the keys count as different.
    unsafe {
        match ffi::PyObject_RichCompareBool(stored.as_ptr(), key.as_ptr(), ffi::Py_EQ) {
            1 => true,
            0 => false,
            _ => {
                ffi::PyErr_Clear();
                false
            }
        }
    }
}

fn ttl_nanos(ttl: Option<f64>) -> PyResult<Option<u64>> {
    match ttl {
        None => Ok(None),
        // Under half a nanosecond rounds to 0, which would be no lifetime at all.
        Some(seconds) => match seconds_to_nanos(seconds) {
            Some(nanos) if nanos > 0 => Ok(Some(nanos)),
            _ => Err(Error::invalid(
                "ttl",
                format!(
                    "ttl must be a number of seconds from 1e-9 up to about 584 years, or None \
                     (got {seconds})."
                ),
            )
            .into()),
        },
    }
}

/// A bounded, thread-safe in-process cache with an optional expiry per entry.
///
/// Evicts by S3-FIFO, whose hit ratio on skewed workloads is at least LRU's and whose hits
/// only bump a counter. `ttl` (seconds) is the default lifetime of an entry; `set` can give
/// one its own.
///
/// >>> cache = LocalCache(1000, ttl=60)
/// >>> cache.set("user:1", {"name": "Ada"})
/// >>> cache.get("user:1")
/// {'name': 'Ada'}
/// >>> cache.get("user:2", "absent")
/// 'absent'
#[pyclass(frozen, weakref, module = "buttress._core")]
pub struct LocalCache {
    core: GilGuarded<Core>,
    ttl: Option<u64>,
    clock: Option<Py<ManualClock>>,
}

impl LocalCache {
    fn lookup(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        let hash = key_hash(key)?;
        let mut dropped = Graveyard::default();
        let found = self.core.with(py, |core| {
            core.get(hash, |stored| same_key(stored, key), &mut dropped)
                .map(|value| value.clone_ref(py))
        });
        drop(dropped);
        Ok(found)
    }

    fn store(&self, key: &Bound<'_, PyAny>, value: Py<PyAny>, ttl: Option<u64>) -> PyResult<()> {
        self.store_hashed(key, key_hash(key)?, value, ttl);
        Ok(())
    }

    /// Caches `key = value` with the cache's own ttl, `hash` being `key_hash(key)`.
    pub(crate) fn set_hashed(&self, key: &Bound<'_, PyAny>, hash: u64, value: Py<PyAny>) {
        self.store_hashed(key, hash, value, self.ttl);
    }

    fn store_hashed(&self, key: &Bound<'_, PyAny>, hash: u64, value: Py<PyAny>, ttl: Option<u64>) {
        let mut dropped = Graveyard::default();
        let owned = key.clone().unbind();
        self.core.with(key.py(), |core| {
            core.insert(
                owned,
                value,
                hash,
                ttl,
                |stored| same_key(stored, key),
                &mut dropped,
            )
        });
        drop(dropped);
    }

    fn discard(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let hash = key_hash(key)?;
        let mut dropped = Graveyard::default();
        let removed = self.core.with(key.py(), |core| {
            core.remove(hash, |stored| same_key(stored, key), &mut dropped)
        });
        drop(dropped);
        Ok(removed)
    }
}

#[pymethods]
impl LocalCache {
    #[new]
    #[pyo3(signature = (max_size, *, ttl = None, clock = None))]
    fn new(
        #[pyo3(from_py_with = extract::max_size)] max_size: u32,
        #[pyo3(from_py_with = extract::ttl)] ttl: Option<f64>,
        clock: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        if max_size == u32::MAX {
            return Err(Error::invalid(
                "max_size",
                format!(
                    "max_size must be a whole number from 1 to {} (got {max_size}).",
                    u32::MAX - 1
                ),
            )
            .into());
        }
        let ttl = ttl_nanos(ttl)?;
        let (clock, core_clock) = parse_clock(clock)?;
        Ok(LocalCache {
            core: GilGuarded::new(S3Fifo::new(max_size as usize, core_clock)),
            ttl,
            clock,
        })
    }

    /// Async front ends call an in-process cache directly rather than in a worker thread.
    #[classattr]
    fn blocking() -> bool {
        false
    }

    /// The value cached for `key`, or `default` when there is none (or it expired).
    #[pyo3(signature = (key, default = None))]
    fn get(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        default: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        Ok(match self.lookup(py, key)? {
            Some(value) => value,
            None => default.unwrap_or_else(|| py.None()),
        })
    }

    /// Caches `key = value` for `ttl` seconds (None: the cache's own `ttl`), evicting an entry
    /// when the cache is full.
    #[pyo3(signature = (key, value, ttl = None))]
    fn set(
        &self,
        key: &Bound<'_, PyAny>,
        value: Py<PyAny>,
        #[pyo3(from_py_with = extract::ttl)] ttl: Option<f64>,
    ) -> PyResult<()> {
        let ttl = ttl_nanos(ttl)?.or(self.ttl);
        self.store(key, value, ttl)
    }

    /// Drops the entry of `key`; whether a live one was there.
    fn delete(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.discard(key)
    }

    fn __getitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.lookup(py, key)?
            .ok_or_else(|| PyKeyError::new_err((key.clone().unbind(),)))
    }

    fn __setitem__(&self, key: &Bound<'_, PyAny>, value: Py<PyAny>) -> PyResult<()> {
        self.store(key, value, self.ttl)
    }

    fn __delitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        if self.discard(key)? {
            Ok(())
        } else {
            Err(PyKeyError::new_err((key.clone().unbind(),)))
        }
    }

    /// Whether a live entry of `key` is cached; does not count as a read.
    fn __contains__(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let hash = key_hash(key)?;
        Ok(self.core.with(key.py(), |core| {
            core.contains(hash, |stored| same_key(stored, key))
        }))
    }

    /// The live entries (expired ones are dropped first).
    fn __len__(&self, py: Python<'_>) -> usize {
        let mut dropped = Graveyard::default();
        let len = self.core.with(py, |core| {
            core.expire(&mut dropped);
            core.len()
        });
        drop(dropped);
        len
    }

    /// Drops every expired entry now and returns how many. Expired entries are otherwise
    /// dropped when read, by later writes, or by eviction.
    fn expire(&self, py: Python<'_>) -> usize {
        let mut dropped = Graveyard::default();
        let count = self.core.with(py, |core| core.expire(&mut dropped));
        drop(dropped);
        count
    }

    /// Empties the cache; the counts in `stats()` stay.
    fn clear(&self, py: Python<'_>) {
        let mut dropped = Graveyard::default();
        self.core.with(py, |core| core.clear(&mut dropped));
        drop(dropped);
    }

    /// The most entries the cache holds.
    #[getter]
    fn max_size(&self, py: Python<'_>) -> usize {
        self.core.with(py, |core| core.capacity())
    }

    /// The default lifetime of an entry in seconds, or None.
    #[getter]
    fn ttl(&self) -> Option<f64> {
        self.ttl.map(nanos_to_seconds)
    }

    /// The manual clock this cache reads, or None for the monotonic clock.
    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|clock| clock.clone_ref(py))
    }

    /// Lifetime counts (hits, misses, inserts, updates, deletes, evictions, expirations) and
    /// the current `size` (counting expired entries not dropped yet) and `max_size`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.core.with(py, |core| core.stats());
        let dict = PyDict::new(py);
        dict.set_item("hits", stats.hits)?;
        dict.set_item("misses", stats.misses)?;
        dict.set_item("inserts", stats.inserts)?;
        dict.set_item("updates", stats.updates)?;
        dict.set_item("deletes", stats.deletes)?;
        dict.set_item("evictions", stats.evictions)?;
        dict.set_item("expirations", stats.expirations)?;
        dict.set_item("size", stats.len)?;
        dict.set_item("max_size", stats.capacity)?;
        Ok(dict)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let stats = self.core.with(py, |core| core.stats());
        format!(
            "LocalCache(max_size={}, size={})",
            stats.capacity, stats.len
        )
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.clock)?;
        self.core.visit(|core| {
            let mut outcome = Ok(());
            core.for_each(|key, value| {
                if outcome.is_ok() {
                    outcome = visit.call(key).and_then(|()| visit.call(value));
                }
            });
            outcome
        })
    }

    fn __clear__(&self) {
        // The collector calls this with the GIL held, so attaching only fetches the token.
        Python::attach(|py| self.clear(py));
    }
}
