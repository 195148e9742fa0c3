//! Python binding of the event store. Arguments become plain Rust values before the store is
//! touched, so no Python code runs under its locks; a durable append and a subscription's wait
//! release the GIL.

use crate::errors::Error;
use crate::eventlog::StoredEvent;
use crate::eventstore::{
    AppendRequest, Appended, EventStore as Core, Expected, Fsync, NewEvent as CoreEvent,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyInt, PyList, PyString, PyTuple};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

static UUID_CLASS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn uuid_object<'py>(py: Python<'py>, id: &[u8; 16]) -> PyResult<Bound<'py, PyAny>> {
    let class = UUID_CLASS.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("uuid")?.getattr("UUID")?.unbind())
    })?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("bytes", PyBytes::new(py, id))?;
    class.bind(py).call((), Some(&kwargs))
}

/// A UUID given as a `uuid.UUID` or 16 bytes.
fn parse_id(value: &Bound<'_, PyAny>) -> PyResult<[u8; 16]> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return bytes.as_bytes().try_into().map_err(|_| {
            Error::invalid(
                "id",
                format!("id must be 16 bytes (got {}).", bytes.as_bytes().len()),
            )
            .into()
        });
    }
    if let Ok(bytes) = value.getattr(pyo3::intern!(value.py(), "bytes")) {
        if let Ok(bytes) = bytes.cast::<PyBytes>() {
            if let Ok(id) = bytes.as_bytes().try_into() {
                return Ok(id);
            }
        }
    }
    Err(Error::wrong_type(
        "id",
        format!(
            "id must be a uuid.UUID or 16 bytes (got {}).",
            value.get_type().name()?
        ),
    )
    .into())
}

fn bytes_argument(argument: &'static str, value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Ok(bytes.as_bytes().to_vec());
    }
    if let Ok(array) = value.cast::<pyo3::types::PyByteArray>() {
        return Ok(array.to_vec());
    }
    if value.is_instance_of::<pyo3::types::PyMemoryView>() {
        let copied = value.call_method0(pyo3::intern!(value.py(), "tobytes"))?;
        return Ok(copied.cast::<PyBytes>()?.as_bytes().to_vec());
    }
    Err(Error::wrong_type(
        argument,
        format!(
            "{argument} must be bytes (got {}); encode it first.",
            value.get_type().name()?
        ),
    )
    .into())
}

fn stream_argument(value: &Bound<'_, PyAny>) -> PyResult<Arc<str>> {
    let Ok(text) = value.cast::<PyString>() else {
        return Err(Error::wrong_type(
            "stream",
            format!("stream must be a str (got {}).", value.get_type().name()?),
        )
        .into());
    };
    let text = text.to_str()?;
    if text.is_empty() {
        return Err(Error::invalid("stream", "stream must not be empty.").into());
    }
    Ok(Arc::from(text))
}

fn expected_argument(value: &Bound<'_, PyAny>) -> PyResult<Expected> {
    if value.is_instance_of::<PyInt>() && !value.is_instance_of::<pyo3::types::PyBool>() {
        return value.extract::<u64>().map(Expected::Exact).map_err(|_| {
            Error::invalid(
                "expected_version",
                format!(
                    "expected_version must be a version from 0 up, or 'any', 'no_stream' or \
                     'stream_exists' (got {value})."
                ),
            )
            .into()
        });
    }
    if let Ok(text) = value.cast::<PyString>() {
        match text.to_str()? {
            "any" => return Ok(Expected::Any),
            "no_stream" => return Ok(Expected::NoStream),
            "stream_exists" => return Ok(Expected::StreamExists),
            _ => {}
        }
    }
    Err(Error::invalid(
        "expected_version",
        format!(
            "expected_version must be a version from 0 up, or 'any', 'no_stream' or \
             'stream_exists' (got {}).",
            value.repr()?
        ),
    )
    .into())
}

fn limit_argument(value: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    match value {
        None => Ok(usize::MAX),
        Some(value) if value.is_none() => Ok(usize::MAX),
        Some(value) => {
            Ok(usize::try_from(position_argument("limit", value)?).unwrap_or(usize::MAX))
        }
    }
}

fn segment_size_argument(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    position_argument("segment_size", value)
}

fn position_argument(argument: &'static str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !value.is_instance_of::<PyInt>() || value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(Error::wrong_type(
            argument,
            format!("{argument} must be a whole number (got {}).", value.repr()?),
        )
        .into());
    }
    value.extract::<u64>().map_err(|_| {
        Error::invalid(
            argument,
            format!("{argument} must be 0 or more (got {value})."),
        )
        .into()
    })
}

/// An event to append: a type, data and metadata (bytes), and an id (a new UUID v4 unless
/// given; give your own to make a retried append idempotent).
#[pyclass(frozen, module = "buttress._core")]
pub struct NewEvent {
    core: CoreEvent,
}

#[pymethods]
impl NewEvent {
    #[new]
    #[pyo3(signature = (r#type, data = None, metadata = None, *, id = None))]
    fn new(
        r#type: &Bound<'_, PyAny>,
        data: Option<&Bound<'_, PyAny>>,
        metadata: Option<&Bound<'_, PyAny>>,
        id: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let Ok(event_type) = r#type.cast::<PyString>() else {
            return Err(Error::wrong_type(
                "type",
                format!("type must be a str (got {}).", r#type.get_type().name()?),
            )
            .into());
        };
        let event_type = event_type.to_str()?;
        if event_type.is_empty() {
            return Err(Error::invalid("type", "type must not be empty.").into());
        }
        let id = match id {
            Some(id) if !id.is_none() => parse_id(id)?,
            _ => *uuid::Uuid::new_v4().as_bytes(),
        };
        Ok(NewEvent {
            core: CoreEvent {
                id,
                event_type: Arc::from(event_type),
                data: data.map_or(Ok(Vec::new()), |d| bytes_argument("data", d))?,
                metadata: metadata.map_or(Ok(Vec::new()), |m| bytes_argument("metadata", m))?,
            },
        })
    }

    /// The event's id.
    #[getter]
    fn id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        uuid_object(py, &self.core.id)
    }

    /// The event's type name.
    #[getter]
    fn r#type(&self) -> &str {
        &self.core.event_type
    }

    /// The event's payload.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.core.data)
    }

    /// The event's metadata.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.core.metadata)
    }

    fn __repr__(&self) -> String {
        format!(
            "NewEvent(type={:?}, data=<{} bytes>, id={})",
            &*self.core.event_type,
            self.core.data.len(),
            uuid::Uuid::from_bytes(self.core.id)
        )
    }
}

/// An event as stored: its stream, version in the stream, and global position too.
#[pyclass(frozen, module = "buttress._core")]
pub struct RecordedEvent {
    event: Arc<StoredEvent>,
}

#[pymethods]
impl RecordedEvent {
    /// A recorded event from another store (the PostgreSQL backend builds its events so).
    #[new]
    #[pyo3(signature = (*, stream, version, position, r#type, data, metadata, id, timestamp))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        stream: &Bound<'_, PyAny>,
        version: u64,
        position: u64,
        r#type: &str,
        data: &Bound<'_, PyAny>,
        metadata: &Bound<'_, PyAny>,
        id: &Bound<'_, PyAny>,
        timestamp: f64,
    ) -> PyResult<Self> {
        Ok(RecordedEvent {
            event: Arc::new(StoredEvent {
                position,
                stream: stream_argument(stream)?,
                version,
                id: parse_id(id)?,
                event_type: Arc::from(r#type),
                data: bytes_argument("data", data)?,
                metadata: bytes_argument("metadata", metadata)?,
                timestamp_us: (timestamp * 1e6).round() as i64,
            }),
        })
    }

    /// The event's id.
    #[getter]
    fn id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        uuid_object(py, &self.event.id)
    }
    /// The event's type name.
    #[getter]
    fn r#type(&self) -> &str {
        &self.event.event_type
    }
    /// The event's payload.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.event.data)
    }
    /// The event's metadata.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.event.metadata)
    }
    /// The stream the event belongs to.
    #[getter]
    fn stream(&self) -> &str {
        &self.event.stream
    }
    /// The event's version in its stream (the first is 0).
    #[getter]
    fn version(&self) -> u64 {
        self.event.version
    }
    /// The event's position in the store's global order (the first is 0).
    #[getter]
    fn position(&self) -> u64 {
        self.event.position
    }
    /// When the event was appended, in seconds since the epoch (UTC).
    #[getter]
    fn timestamp(&self) -> f64 {
        self.event.timestamp_us as f64 / 1e6
    }
    fn __repr__(&self) -> String {
        format!(
            "RecordedEvent(stream={:?}, version={}, position={}, type={:?}, data=<{} bytes>)",
            &*self.event.stream,
            self.event.version,
            self.event.position,
            &*self.event.event_type,
            self.event.data.len()
        )
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<RecordedEvent>()
            .is_ok_and(|other| *other.get().event == *self.event)
    }
    fn __hash__(&self) -> u64 {
        self.event.position ^ u64::from_le_bytes(self.event.id[..8].try_into().expect("8 bytes"))
    }
}

/// Where an append put a stream's events: the version of its last event and that event's
/// global position.
#[pyclass(frozen, module = "buttress._core", get_all)]
pub struct AppendResult {
    /// The stream's version after the append (the version of its last event).
    version: u64,
    /// The global position of the stream's last appended event.
    position: u64,
}

#[pymethods]
impl AppendResult {
    #[new]
    fn new(version: u64, position: u64) -> Self {
        AppendResult { version, position }
    }

    fn __repr__(&self) -> String {
        format!(
            "AppendResult(version={}, position={})",
            self.version, self.position
        )
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<AppendResult>().is_ok_and(|other| {
            other.get().version == self.version && other.get().position == self.position
        })
    }
    fn __hash__(&self) -> u64 {
        self.version.rotate_left(32) ^ self.position
    }
}

impl From<Appended> for AppendResult {
    fn from(appended: Appended) -> Self {
        AppendResult {
            version: appended.version,
            position: appended.position,
        }
    }
}

/// Streams of events with optimistic concurrency, in memory or in a durable log.
#[pyclass(frozen, subclass, module = "buttress._core")]
pub struct EventStore {
    core: Arc<Core>,
    path: Option<PathBuf>,
}

fn events_of(events: &Bound<'_, PyAny>) -> PyResult<Vec<CoreEvent>> {
    let collect = |item: Bound<'_, PyAny>| -> PyResult<CoreEvent> {
        match item.cast::<NewEvent>() {
            Ok(event) => Ok(event.get().core.clone()),
            Err(_) => Err(Error::wrong_type(
                "events",
                format!(
                    "events must hold NewEvent objects (got {}).",
                    item.get_type().name()?
                ),
            )
            .into()),
        }
    };
    if let Ok(list) = events.cast::<PyList>() {
        return list.iter().map(collect).collect();
    }
    if let Ok(event) = events.cast::<NewEvent>() {
        return Ok(vec![event.get().core.clone()]);
    }
    if events.is_instance_of::<PyString>() || events.is_instance_of::<PyBytes>() {
        return Err(
            Error::wrong_type("events", "events must be a list of NewEvent objects.").into(),
        );
    }
    events
        .try_iter()
        .map_err(|_| {
            PyErr::from(Error::wrong_type(
                "events",
                "events must be a NewEvent or an iterable of them.",
            ))
        })?
        .map(|item| collect(item?))
        .collect()
}

impl EventStore {
    fn run_append(&self, py: Python<'_>, requests: Vec<AppendRequest>) -> PyResult<Vec<Appended>> {
        let core = &self.core;
        let appended = if core.is_durable() {
            py.detach(|| core.append(requests))
        } else {
            core.append(requests)
        };
        appended.map_err(|error| Error::from(error).into())
    }

    fn recorded<'py>(
        py: Python<'py>,
        events: Vec<Arc<StoredEvent>>,
    ) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, events.into_iter().map(|event| RecordedEvent { event }))
    }
}

#[pymethods]
impl EventStore {
    #[new]
    #[pyo3(signature = (path = None, *, fsync = "group", segment_size = 67108864))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        fsync: &str,
        #[pyo3(from_py_with = segment_size_argument)] segment_size: u64,
    ) -> PyResult<Self> {
        let Some(policy) = Fsync::parse(fsync) else {
            return Err(Error::invalid(
                "fsync",
                format!("fsync must be 'always', 'group' or 'never' (got '{fsync}')."),
            )
            .into());
        };
        if segment_size < 4096 {
            return Err(Error::invalid(
                "segment_size",
                format!("segment_size must be at least 4096 bytes (got {segment_size})."),
            )
            .into());
        }
        let core = match &path {
            None => Core::in_memory(),
            Some(dir) => py
                .detach(|| Core::open(dir, policy, segment_size))
                .map_err(Error::from)?,
        };
        Ok(EventStore {
            core: Arc::new(core),
            path,
        })
    }

    /// Appends `events` to `stream` if it is at `expected_version` ('any', 'no_stream',
    /// 'stream_exists' or the version of its last event); all of them or none.
    #[pyo3(signature = (stream, events, expected_version = None))]
    fn append(
        &self,
        py: Python<'_>,
        stream: &Bound<'_, PyAny>,
        events: &Bound<'_, PyAny>,
        expected_version: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<AppendResult> {
        let request = AppendRequest {
            stream: stream_argument(stream)?,
            expected: match expected_version {
                Some(value) if !value.is_none() => expected_argument(value)?,
                _ => Expected::Any,
            },
            events: events_of(events)?,
        };
        let mut appended = self.run_append(py, vec![request])?;
        Ok(appended.remove(0).into())
    }

    /// Appends to several streams atomically: `appends` holds `(stream, events,
    /// expected_version)` tuples; every stream's events are stored, or none.
    fn append_many(
        &self,
        py: Python<'_>,
        appends: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<AppendResult>> {
        let mut requests = Vec::new();
        for item in appends.try_iter().map_err(|_| {
            PyErr::from(Error::wrong_type(
                "appends",
                "appends must be an iterable of (stream, events, expected_version) tuples.",
            ))
        })? {
            let item = item?;
            let tuple = item
                .cast::<PyTuple>()
                .ok()
                .filter(|t| t.len() == 3)
                .ok_or_else(|| {
                    PyErr::from(Error::wrong_type(
                        "appends",
                        "appends must hold (stream, events, expected_version) tuples.",
                    ))
                })?;
            requests.push(AppendRequest {
                stream: stream_argument(&tuple.get_item(0)?)?,
                events: events_of(&tuple.get_item(1)?)?,
                expected: {
                    let value = tuple.get_item(2)?;
                    if value.is_none() {
                        Expected::Any
                    } else {
                        expected_argument(&value)?
                    }
                },
            });
        }
        Ok(self
            .run_append(py, requests)?
            .into_iter()
            .map(AppendResult::from)
            .collect())
    }

    /// A stream's events from `from_version` (the first, by default), or with `backwards` from
    /// `from_version` (the last, by default) down; at most `limit` of them.
    #[pyo3(signature = (stream, from_version = None, *, backwards = false, limit = None))]
    fn read_stream<'py>(
        &self,
        py: Python<'py>,
        stream: &Bound<'_, PyAny>,
        from_version: Option<&Bound<'_, PyAny>>,
        backwards: bool,
        limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let stream = stream_argument(stream)?;
        let from = match from_version {
            Some(value) if !value.is_none() => Some(position_argument("from_version", value)?),
            _ => None,
        };
        let limit = limit_argument(limit)?;
        Self::recorded(py, self.core.read_stream(&stream, from, backwards, limit))
    }

    /// Every stream's events in global order, from `from_position`; at most `limit` of them.
    #[pyo3(signature = (from_position = None, *, limit = None))]
    fn read_all<'py>(
        &self,
        py: Python<'py>,
        from_position: Option<&Bound<'_, PyAny>>,
        limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let from = match from_position {
            Some(value) if !value.is_none() => position_argument("from_position", value)?,
            _ => 0,
        };
        let limit = limit_argument(limit)?;
        Self::recorded(py, self.core.read_all(from, limit))
    }

    /// The version of a stream's last event, or None when it has none.
    fn stream_version(&self, stream: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        Ok(self.core.stream_version(&stream_argument(stream)?))
    }

    /// The names of the streams that have events, sorted.
    fn streams(&self) -> Vec<String> {
        let mut names: Vec<String> = self.core.streams().iter().map(|s| s.to_string()).collect();
        names.sort();
        names
    }

    /// The position the next event will get: how many events the store holds.
    #[getter]
    fn head(&self) -> u64 {
        self.core.head()
    }

    /// The log directory, or None for an in-memory store.
    #[getter]
    fn path(&self) -> Option<PathBuf> {
        self.path.clone()
    }

    /// The fsync policy of a durable store, or None in memory.
    #[getter]
    fn fsync(&self) -> Option<&'static str> {
        self.core.fsync().map(Fsync::name)
    }

    /// Bytes of a torn last record cut from the log when it was opened (0 when none).
    #[getter]
    fn recovered_truncated_bytes(&self) -> u64 {
        self.core.truncated_bytes
    }

    /// Up to `limit` events from `from_position` on that pass the filters, and the position to
    /// continue from; waits up to `timeout` seconds (None: forever) while there are none.
    #[pyo3(signature = (from_position, limit, timeout, stream_prefix = None, event_types = None))]
    fn poll<'py>(
        &self,
        py: Python<'py>,
        from_position: u64,
        limit: usize,
        timeout: Option<f64>,
        stream_prefix: Option<String>,
        event_types: Option<HashSet<String>>,
    ) -> PyResult<(Bound<'py, PyList>, u64)> {
        let deadline = match timeout {
            Some(seconds) if !(seconds >= 0.0 && seconds.is_finite()) => {
                return Err(Error::invalid(
                    "timeout",
                    format!("timeout must be a number of seconds from 0, or None (got {seconds})."),
                )
                .into())
            }
            Some(seconds) => Some(Instant::now() + Duration::from_secs_f64(seconds)),
            None => None,
        };
        let filter = |event: &StoredEvent| {
            stream_prefix
                .as_deref()
                .is_none_or(|prefix| event.stream.starts_with(prefix))
                && event_types
                    .as_ref()
                    .is_none_or(|types| types.contains(&*event.event_type))
        };
        let mut from = from_position;
        loop {
            let slice = match deadline {
                None => SIGNAL_CHECK_INTERVAL,
                Some(deadline) => deadline
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK_INTERVAL),
            };
            let core = &self.core;
            let (found, next) = py
                .detach(|| core.poll(from, limit.max(1), Some(slice), &filter))
                .map_err(Error::from)?;
            from = next;
            let expired = deadline.is_some_and(|deadline| Instant::now() >= deadline);
            if !found.is_empty() || expired || self.core.is_closed() {
                return Ok((Self::recorded(py, found)?, from));
            }
            py.check_signals()?;
        }
    }

    /// Calls `callback()` once an event past `after` is visible or the store closes, from
    /// whichever thread makes it so (at once if it already is); for asyncio subscribers.
    /// Exceptions from the callback are reported as unraisable, never to the appender.
    fn _watch(&self, after: u64, callback: Py<PyAny>) {
        self.core.watch(
            after,
            Box::new(move || {
                Python::attach(|py| {
                    if let Err(error) = callback.call0(py) {
                        error.write_unraisable(py, Some(callback.bind(py)));
                    }
                })
            }),
        );
    }

    /// Writes what is queued, syncs, and closes the log; later appends raise
    /// `EventStoreClosedError`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let core = &self.core;
        py.detach(|| core.close())
            .map_err(|error| Error::from(error).into())
    }

    /// Whether the store was closed.
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }

    fn __repr__(&self) -> String {
        match &self.path {
            None => format!("EventStore(in memory, head={})", self.core.head()),
            Some(path) => format!(
                "EventStore({:?}, fsync={:?}, head={})",
                path.display().to_string(),
                self.core.fsync().map_or("none", Fsync::name),
                self.core.head()
            ),
        }
    }
}
