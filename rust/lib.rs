//! buttress: distributed-systems patterns for Python with Rust hot paths.
//!
//! Each core is a plain-Rust module with its own unit tests (`breaker`, `bulkhead`, `cache`, `pool`, `ring`, `eventstore` with its log `eventlog`, `clock`,
//! `jitter`, `md5`);
//! each `*_py` module is the thin PyO3 binding for one core; `errors` maps the crate's one error
//! type to Python exceptions.

mod args;
pub mod breaker;
mod breaker_py;
pub mod bulkhead;
mod bulkhead_py;
pub mod cache;
mod cache_py;
pub mod clock;
mod clock_py;
pub mod errors;
pub mod eventlog;
pub mod eventstore;
mod eventstore_py;
pub mod jitter;
pub mod md5;
pub mod pool;
mod pool_py;
pub mod ring;
mod ring_py;
pub mod waiting;
pub mod writebehind;
mod writebehind_py;
pub mod xxh64;

use pyo3::prelude::*;

#[pymodule]
mod _core {
    #[pymodule_export]
    use crate::breaker_py::{BreakerFunction, BreakerMetrics, CircuitBreaker, CircuitPermit};
    #[pymodule_export]
    use crate::bulkhead_py::{Bulkhead, BulkheadStats, BulkheadWaiter};
    #[pymodule_export]
    use crate::cache_py::LocalCache;
    #[pymodule_export]
    use crate::clock_py::ManualClock;
    #[pymodule_export]
    use crate::eventstore_py::{AppendResult, EventStore, NewEvent, RecordedEvent};
    #[pymodule_export]
    use crate::pool_py::{ConnectionPool, PoolLease, PoolStats, PoolWaiter};
    #[pymodule_export]
    use crate::ring_py::HashRing;
    #[pymodule_export]
    use crate::writebehind_py::{CachedWriter, WriteQueue};

    #[pymodule_init]
    fn init(module: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        crate::breaker_py::install_call(module.py())?;
        module.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
