//! The event store: streams of events with per-stream versions and one global order, kept in
//! memory and, optionally, in a durable log (`eventlog`).
//!
//! An append takes the state lock only to check expected versions, give the events their
//! versions and positions, and queue one encoded record. Durability happens after, outside that
//! lock: the first appender to reach the log's writer writes every queued record and syncs once
//! (group commit), so threads arriving while a sync runs share the next one. Events become
//! visible to readers only once their record is durable (per the policy), in position order,
//! so no reader ever sees an event that a crash could take back.
//!
//! An I/O error while writing leaves the store failed: appends waiting on it and every later
//! append get the error, because what reached the disk is no longer known. Reopening recovers.

use crate::eventlog::{self, LogError, LogWriter, StoredEvent};
use std::collections::{HashMap, HashSet, VecDeque};

// Seeded per process (foldhash), so stream names chosen by users cannot force collisions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// When an append waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Each append writes and syncs its own record.
    Always,
    /// Appends that arrive together share one sync.
    Group,
    /// Appends are written to the operating system but not synced: a machine crash can lose
    /// the latest ones (never corrupt the log).
    Never,
}

impl Fsync {
    pub fn parse(name: &str) -> Option<Fsync> {
        match name {
            "always" => Some(Fsync::Always),
            "group" => Some(Fsync::Group),
            "never" => Some(Fsync::Never),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Group => "group",
            Fsync::Never => "never",
        }
    }
}

/// What the caller expects of a stream before its append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Any,
    NoStream,
    StreamExists,
    /// The version of the stream's last event (the first event has version 0).
    Exact(u64),
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Any => f.write_str("any"),
            Expected::NoStream => f.write_str("no_stream"),
            Expected::StreamExists => f.write_str("stream_exists"),
            Expected::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: [u8; 16],
    pub event_type: Arc<str>,
    pub data: Vec<u8>,
    pub metadata: Vec<u8>,
}

/// One stream's part of an append.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream: Arc<str>,
    pub expected: Expected,
    pub events: Vec<NewEvent>,
}

/// Where one stream's events went: the version of its last event and that event's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub version: u64,
    pub position: u64,
}

#[derive(Debug)]
pub enum StoreError {
    WrongExpectedVersion {
        stream: Arc<str>,
        expected: Expected,
        /// The stream's last version, or None when it has no events.
        actual: Option<u64>,
    },
    /// Some event ids of an append were already stored, others not, or not as that append.
    DuplicateEvent {
        id: [u8; 16],
        reason: String,
    },
    Invalid(String),
    Log(LogError),
    /// An earlier write failed; the store takes no more appends until reopened.
    Failed(String),
    Closed,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => {
                let actual = actual.map_or("no stream".to_owned(), |v| v.to_string());
                write!(
                    f,
                    "stream '{stream}': expected version {expected}, actual {actual}"
                )
            }
            StoreError::DuplicateEvent { reason, .. } => f.write_str(reason),
            StoreError::Invalid(message) | StoreError::Failed(message) => f.write_str(message),
            StoreError::Log(error) => write!(f, "{error}"),
            StoreError::Closed => f.write_str("the event store is closed"),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The largest append, encoded; bigger ones are refused before anything is stored.
pub const MAX_APPEND_BYTES: usize = 256 << 20;

struct Pending {
    first: u64,
    end: u64,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Every event given a position, the not-yet-durable ones at the end.
    events: Vec<Arc<StoredEvent>>,
    /// Positions below this are durable and visible to readers.
    visible: u64,
    streams: FastMap<Arc<str>, Vec<u64>>,
    ids: FastMap<[u8; 16], u64>,
    /// The position of the first event of every append, in order: where one ends and the
    /// next begins, which tells a retry from a reuse of ids.
    append_starts: Vec<u64>,
    types: eventlog::Interner,
    pending: VecDeque<Pending>,
    failed: Option<String>,
    closed: bool,
    /// Records in the last group written, how long its write and sync took, and whether a
    /// group-commit leader is waiting for more records: see `wait_durable`.
    last_group: usize,
    last_sync: Duration,
    leader_waiting: bool,
    /// An appender is writing a group (the others wait on `committed`).
    leader_active: bool,
    /// Threads waiting on `committed`.
    sleepers: usize,
    /// Called once when events past their position become visible (or the store closes or
    /// fails): how asyncio subscribers learn of new events without a thread each.
    watchers: Vec<(u64, Watcher)>,
}

/// A one-shot callback; see [`EventStore::watch`].
pub type Watcher = Box<dyn FnOnce() + Send>;

impl State {
    /// Adds an event, placed at the end of the log, to the log and its indexes.
    fn index(&mut self, event: Arc<StoredEvent>) {
        self.streams
            .entry(event.stream.clone())
            .or_default()
            .push(event.position);
        self.ids.insert(event.id, event.position);
        self.events.push(event);
    }

    /// The watchers that are due, taken out to be called once the lock is released.
    fn due_watchers(&mut self) -> Vec<Watcher> {
        if self.watchers.is_empty() {
            return Vec::new();
        }
        let everyone = self.closed || self.failed.is_some();
        let visible = self.visible;
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.watchers)
            .into_iter()
            .partition(|(after, _)| everyone || visible > *after);
        self.watchers = waiting;
        due.into_iter().map(|(_, watcher)| watcher).collect()
    }
}

fn call_all(watchers: Vec<Watcher>) {
    for watcher in watchers {
        watcher();
    }
}

pub struct EventStore {
    state: Mutex<State>,
    /// Signalled whenever `visible` advances, the store fails or it closes.
    committed: Condvar,
    /// Signalled when a record is queued while a group-commit leader waits for company.
    staged: Condvar,
    /// Appends under way (queued or waiting for their sync): how many records a group commit
    /// can expect to gather.
    appending: AtomicUsize,
    writer: Mutex<Option<LogWriter>>,
    fsync: Option<Fsync>,
    /// Bytes cut from a torn tail when the log was opened.
    pub truncated_bytes: u64,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as i64)
}

impl EventStore {
    /// A store that lives in memory only.
    pub fn in_memory() -> EventStore {
        EventStore {
            state: Mutex::new(State::default()),
            committed: Condvar::new(),
            staged: Condvar::new(),
            appending: AtomicUsize::new(0),
            writer: Mutex::new(None),
            fsync: None,
            truncated_bytes: 0,
        }
    }

    /// Opens (or creates) the durable store in `dir`.
    pub fn open(dir: &Path, fsync: Fsync, max_segment: u64) -> StoreResult<EventStore> {
        let (writer, recovered) = LogWriter::open(dir, max_segment).map_err(StoreError::Log)?;
        let mut state = State::default();
        for event in recovered.events {
            state.index(Arc::new(event));
        }
        state.visible = state.events.len() as u64;
        state.append_starts = recovered.appends;
        Ok(EventStore {
            state: Mutex::new(state),
            committed: Condvar::new(),
            staged: Condvar::new(),
            appending: AtomicUsize::new(0),
            writer: Mutex::new(Some(writer)),
            fsync: Some(fsync),
            truncated_bytes: recovered.truncated_bytes,
        })
    }

    pub fn is_durable(&self) -> bool {
        self.fsync.is_some()
    }

    pub fn fsync(&self) -> Option<Fsync> {
        self.fsync
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held cannot leave the state half-updated in a way later
        // calls would trust: appends mutate it only after every check has passed.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends atomically: every request's events, or (on any error) none of them.
    pub fn append(&self, requests: Vec<AppendRequest>) -> StoreResult<Vec<Appended>> {
        if self.fsync.is_none() {
            return self.stage(requests).map(|(results, _)| results);
        }
        self.appending.fetch_add(1, Ordering::Relaxed);
        let outcome = self
            .stage(requests)
            .and_then(|(results, end)| self.wait_durable(end).map(|()| results));
        self.appending.fetch_sub(1, Ordering::Relaxed);
        outcome
    }

    /// Checks, places and queues an append; returns its results and the position after it.
    fn stage(&self, requests: Vec<AppendRequest>) -> StoreResult<(Vec<Appended>, u64)> {
        if requests.is_empty() {
            return Err(StoreError::Invalid(
                "An append needs at least one stream.".to_owned(),
            ));
        }
        let mut state = self.lock();
        if state.closed {
            return Err(StoreError::Closed);
        }
        if let Some(reason) = &state.failed {
            return Err(StoreError::Failed(reason.clone()));
        }
        // The append's shape first: a retry must be a well-formed append too.
        let several_events = requests.len() > 1 || requests[0].events.len() > 1;
        let mut seen_ids = FastSet::default();
        for (index, request) in requests.iter().enumerate() {
            if requests[..index].iter().any(|r| r.stream == request.stream) {
                return Err(StoreError::Invalid(format!(
                    "Stream '{}' appears twice in one append; put its events in one request.",
                    request.stream
                )));
            }
            if request.events.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "Stream '{}' has no events in this append; give it at least one.",
                    request.stream
                )));
            }
            if several_events {
                for event in &request.events {
                    if !seen_ids.insert(event.id) {
                        return Err(StoreError::DuplicateEvent {
                            id: event.id,
                            reason: "The same event id appears twice in one append.".to_owned(),
                        });
                    }
                }
            }
        }
        let known = requests
            .iter()
            .flat_map(|request| &request.events)
            .any(|event| state.ids.contains_key(&event.id));
        if known {
            // A retry returns what the original got; any other reuse of an id is refused.
            let replayed = replay(&state, &requests)?;
            let end = replayed.iter().map(|r| r.position + 1).max().unwrap_or(0);
            return Ok((replayed, end));
        }
        // From here no event id of this append is stored yet.
        for request in &requests {
            let actual = state
                .streams
                .get(&request.stream)
                .and_then(|positions| positions.len().checked_sub(1))
                .map(|last| last as u64);
            let matches = match request.expected {
                Expected::Any => true,
                Expected::NoStream => actual.is_none(),
                Expected::StreamExists => actual.is_some(),
                Expected::Exact(version) => actual == Some(version),
            };
            if !matches {
                return Err(StoreError::WrongExpectedVersion {
                    stream: request.stream.clone(),
                    expected: request.expected,
                    actual,
                });
            }
        }
        if self.fsync.is_some() {
            let size: usize = requests
                .iter()
                .flat_map(|r| r.events.iter().map(move |e| (r, e)))
                .map(|(r, e)| {
                    48 + r.stream.len() + e.event_type.len() + e.data.len() + e.metadata.len()
                })
                .sum();
            if size > MAX_APPEND_BYTES {
                return Err(StoreError::Invalid(format!(
                    "The append is larger than {} MiB; split it into smaller appends.",
                    MAX_APPEND_BYTES >> 20
                )));
            }
        }
        // Every check passed: nothing below fails, so the state never holds half an append.
        let timestamp_us = now_us();
        let first = state.events.len() as u64;
        let mut position = first;
        let mut placed = Vec::new();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            // The stream's existing name, so all its events share one string.
            let (stream, start_version) = match state.streams.get_key_value(&request.stream) {
                Some((name, positions)) => (name.clone(), positions.len() as u64),
                None => (request.stream, 0),
            };
            let mut version = start_version;
            for event in request.events {
                let event_type = state.types.intern(&event.event_type);
                placed.push(Arc::new(StoredEvent {
                    position,
                    stream: stream.clone(),
                    version,
                    id: event.id,
                    event_type,
                    data: event.data,
                    metadata: event.metadata,
                    timestamp_us,
                }));
                position += 1;
                version += 1;
            }
            results.push(Appended {
                version: version - 1,
                position: position - 1,
            });
        }
        if self.fsync.is_some() {
            let mut bytes = Vec::with_capacity(eventlog::record_size(&placed));
            eventlog::encode_record(&placed, &mut bytes);
            state.pending.push_back(Pending {
                first,
                end: position,
                bytes,
            });
            if state.leader_waiting {
                self.staged.notify_one();
            }
        }
        state.append_starts.push(first);
        for event in placed {
            state.index(event);
        }
        if self.fsync.is_none() {
            state.visible = position;
            self.announce(state);
        }
        Ok((results, position))
    }

    /// Waits until every position below `end` is durable, writing the queued records itself
    /// when no other appender is.
    fn wait_durable(&self, end: u64) -> StoreResult<()> {
        let Some(fsync) = self.fsync else {
            return Ok(());
        };
        let mut state = self.lock();
        loop {
            if state.visible >= end {
                return Ok(());
            }
            if let Some(reason) = &state.failed {
                return Err(StoreError::Failed(reason.clone()));
            }
            if state.leader_active || state.closed {
                // Another appender is writing (or close() is): its write may hold this record.
                state = self.sleep(state, None);
                continue;
            }
            // This appender leads the next group: it writes what is queued, its own included.
            state.leader_active = true;
            if fsync == Fsync::Group {
                state = self.gather(state);
            }
            let mut batch = Vec::new();
            let mut first = None;
            let mut batch_end = state.visible;
            let mut records = 0;
            while let Some(next) = state.pending.pop_front() {
                first.get_or_insert(next.first);
                batch.extend_from_slice(&next.bytes);
                batch_end = next.end;
                records += 1;
                if fsync == Fsync::Always {
                    break;
                }
            }
            drop(state);
            let (written, took) = match first {
                None => (Ok(()), Duration::ZERO),
                Some(first) => {
                    let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                    let started = Instant::now();
                    let written = match writer.as_mut() {
                        Some(log) => log.write(first, &batch, fsync != Fsync::Never),
                        None => Err(LogError::Io {
                            path: std::path::PathBuf::new(),
                            error: std::io::Error::other("the log was closed"),
                        }),
                    };
                    (written, started.elapsed())
                }
            };
            state = self.lock();
            state.leader_active = false;
            state.last_group = records;
            state.last_sync = took;
            match written {
                Ok(()) => state.visible = state.visible.max(batch_end),
                Err(error) => {
                    state.failed = Some(format!(
                        "The event store failed to write its log and takes no more appends; \
                         reopen it to recover what reached the disk ({error})."
                    ));
                }
            }
            self.announce(state);
            state = self.lock();
        }
    }

    /// Waits for `committed` (at most `timeout`), counted so that announcing a change costs
    /// nothing when nobody waits.
    fn sleep<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        state.sleepers += 1;
        let mut state = match timeout {
            None => self
                .committed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner()),
            Some(timeout) => {
                self.committed
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        state.sleepers -= 1;
        state
    }

    /// Releases the state after a change readers may wait for, and wakes them: sleepers
    /// (only when there are some, as a wake-up is a system call) and due watchers.
    fn announce(&self, mut state: MutexGuard<'_, State>) {
        let due = state.due_watchers();
        let sleepers = state.sleepers > 0;
        drop(state);
        if sleepers {
            self.committed.notify_all();
        }
        call_all(due);
    }

    /// A group-commit leader's short wait for company: when the last group held several
    /// records, or other appends are under way, the threads that just got their answer are
    /// about to queue their next records, so waiting up to one sync's time for them (at most
    /// 2 ms) lets one sync serve them all. Alone, a leader never waits.
    fn gather<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let expected = state
            .last_group
            .max(self.appending.load(Ordering::Relaxed))
            .min(64);
        if state.pending.len() >= expected {
            return state;
        }
        let deadline = Instant::now() + state.last_sync.min(Duration::from_millis(2));
        state.leader_waiting = true;
        while state.pending.len() < expected && !state.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .staged
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.leader_waiting = false;
        state
    }

    /// The events of a stream from `from_version` (forwards) or down from it (backwards).
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: Option<u64>,
        backwards: bool,
        limit: usize,
    ) -> Vec<Arc<StoredEvent>> {
        let state = self.lock();
        let Some(positions) = state.streams.get(stream) else {
            return Vec::new();
        };
        let visible = positions.partition_point(|&p| p < state.visible);
        let positions = &positions[..visible];
        let pick = |&p: &u64| state.events[p as usize].clone();
        if backwards {
            let top = match from_version {
                None => positions.len(),
                Some(v) => (v as usize).saturating_add(1).min(positions.len()),
            };
            positions[..top]
                .iter()
                .rev()
                .take(limit)
                .map(pick)
                .collect()
        } else {
            let start = from_version.unwrap_or(0).min(positions.len() as u64) as usize;
            positions[start..].iter().take(limit).map(pick).collect()
        }
    }

    /// The events of every stream in global order from `from_position`.
    pub fn read_all(&self, from_position: u64, limit: usize) -> Vec<Arc<StoredEvent>> {
        let state = self.lock();
        let start = from_position.min(state.visible) as usize;
        let end = state.visible as usize;
        state.events[start..end]
            .iter()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Up to `limit` visible events from `from_position` that pass `filter`, and the position
    /// to continue from; waits up to `timeout` for one when there is none yet.
    pub fn poll(
        &self,
        from_position: u64,
        limit: usize,
        timeout: Option<Duration>,
        filter: &dyn Fn(&StoredEvent) -> bool,
    ) -> StoreResult<(Vec<Arc<StoredEvent>>, u64)> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.lock();
        let mut next = from_position;
        loop {
            let mut found = Vec::new();
            let end = state.visible;
            while next < end && found.len() < limit {
                let event = &state.events[next as usize];
                if filter(event) {
                    found.push(event.clone());
                }
                next += 1;
            }
            if !found.is_empty() || state.closed {
                return Ok((found, next));
            }
            if let Some(reason) = &state.failed {
                return Err(StoreError::Failed(reason.clone()));
            }
            let wait = match deadline {
                None => Duration::from_secs(3600),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok((found, next));
                    }
                    deadline - now
                }
            };
            state = self.sleep(state, Some(wait));
        }
    }

    /// The version of a stream's last visible event, or None.
    pub fn stream_version(&self, stream: &str) -> Option<u64> {
        let state = self.lock();
        let positions = state.streams.get(stream)?;
        let visible = positions.partition_point(|&p| p < state.visible);
        (visible as u64).checked_sub(1)
    }

    /// The streams that have visible events, in no particular order.
    pub fn streams(&self) -> Vec<Arc<str>> {
        let state = self.lock();
        state
            .streams
            .iter()
            .filter(|(_, positions)| positions.first().is_some_and(|&p| p < state.visible))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Calls `watcher` once an event at a position past `after` is visible, or the store
    /// closes or fails: at once (here) if that is already so, else from the appender that
    /// makes it so, after the store's locks are released.
    pub fn watch(&self, after: u64, watcher: Watcher) {
        let mut state = self.lock();
        if state.visible > after || state.closed || state.failed.is_some() {
            drop(state);
            watcher();
        } else {
            state.watchers.push((after, watcher));
        }
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The position the next appended event will get (= how many events are visible).
    pub fn head(&self) -> u64 {
        self.lock().visible
    }

    /// Writes what is queued, syncs, and refuses further appends; waiters get their answer.
    pub fn close(&self) -> StoreResult<()> {
        let mut state = self.lock();
        if state.closed {
            return Ok(());
        }
        // No append queues anything from here; the group being written finishes first.
        state.closed = true;
        self.staged.notify_all();
        while state.leader_active {
            state = self.sleep(state, None);
        }
        drop(state);
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = self.lock();
        let mut result = Ok(());
        if let Some(log) = writer.as_mut() {
            if state.failed.is_none() {
                while let Some(pending) = state.pending.pop_front() {
                    if let Err(error) = log.write(pending.first, &pending.bytes, false) {
                        state.failed = Some(format!("The log failed while closing: {error}"));
                        break;
                    }
                    state.visible = pending.end;
                }
                if state.failed.is_none() {
                    if let Err(error) = log.sync() {
                        state.failed = Some(format!("The log failed while closing: {error}"));
                    }
                }
            }
            if let Some(reason) = &state.failed {
                result = Err(StoreError::Failed(reason.clone()));
            }
        }
        *writer = None;
        drop(writer);
        self.announce(state);
        result
    }
}

/// The original results of an append whose event ids are all stored already, by one earlier
/// append holding exactly these events (each stream's in the same order); an error otherwise.
fn replay(state: &State, requests: &[AppendRequest]) -> StoreResult<Vec<Appended>> {
    let (known_id, known_position) = requests
        .iter()
        .flat_map(|request| &request.events)
        .find_map(|event| state.ids.get(&event.id).map(|&p| (event.id, p)))
        .expect("replay is only called when an id is stored");
    // The earlier append that stored it: the last one to start at or before its position.
    let index = state
        .append_starts
        .partition_point(|&start| start <= known_position)
        - 1;
    let start = state.append_starts[index];
    let end = state
        .append_starts
        .get(index + 1)
        .copied()
        .unwrap_or(state.events.len() as u64);
    let total: usize = requests.iter().map(|request| request.events.len()).sum();
    if end - start != total as u64 {
        return Err(partial(known_id));
    }
    let mut results = Vec::with_capacity(requests.len());
    for request in requests {
        let mut last: Option<&StoredEvent> = None;
        for event in &request.events {
            let Some(&position) = state.ids.get(&event.id) else {
                return Err(partial(known_id));
            };
            let recorded = &state.events[position as usize];
            let in_place = (start..end).contains(&position)
                && recorded.stream == request.stream
                && last.is_none_or(|previous| position == previous.position + 1);
            if !in_place {
                return Err(partial(known_id));
            }
            last = Some(recorded);
        }
        let last = last.expect("every request has events");
        results.push(Appended {
            version: last.version,
            position: last.position,
        });
    }
    Ok(results)
}

fn partial(id: [u8; 16]) -> StoreError {
    StoreError::DuplicateEvent {
        id,
        reason: "Some of this append's event ids are already stored, but not as this same \
                 append (other ids, another stream or another order); a retried append must \
                 repeat the original exactly."
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_event(n: u8) -> NewEvent {
        NewEvent {
            id: [n; 16],
            event_type: Arc::from("Happened"),
            data: vec![n],
            metadata: Vec::new(),
        }
    }

    fn request(stream: &str, expected: Expected, ids: &[u8]) -> AppendRequest {
        AppendRequest {
            stream: Arc::from(stream),
            expected,
            events: ids.iter().map(|&n| new_event(n)).collect(),
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "buttress-store-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn expected_versions_are_enforced() {
        let store = EventStore::in_memory();
        let first = store
            .append(vec![request("a", Expected::NoStream, &[1, 2])])
            .unwrap();
        assert_eq!(
            first,
            vec![Appended {
                version: 1,
                position: 1
            }]
        );
        for expected in [Expected::NoStream, Expected::Exact(0), Expected::Exact(5)] {
            match store.append(vec![request("a", expected, &[3])]) {
                Err(StoreError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, Some(1)),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            store.append(vec![request("b", Expected::StreamExists, &[3])]),
            Err(StoreError::WrongExpectedVersion { actual: None, .. })
        ));
        store
            .append(vec![request("a", Expected::Exact(1), &[3])])
            .unwrap();
        store
            .append(vec![request("a", Expected::StreamExists, &[4])])
            .unwrap();
        store
            .append(vec![request("a", Expected::Any, &[5])])
            .unwrap();
        assert_eq!(store.stream_version("a"), Some(4));
        assert_eq!(store.head(), 5);
    }

    #[test]
    fn a_retried_append_returns_the_original_result() {
        let store = EventStore::in_memory();
        let original = store
            .append(vec![request("a", Expected::NoStream, &[1, 2])])
            .unwrap();
        store
            .append(vec![request("a", Expected::Any, &[3])])
            .unwrap();
        let again = store
            .append(vec![request("a", Expected::NoStream, &[1, 2])])
            .unwrap();
        assert_eq!(again, original);
        assert_eq!(store.head(), 3);
        // Part of it again, or in another stream, is refused.
        assert!(matches!(
            store.append(vec![request("a", Expected::Any, &[2, 9])]),
            Err(StoreError::DuplicateEvent { .. })
        ));
        assert!(matches!(
            store.append(vec![request("b", Expected::Any, &[1, 2])]),
            Err(StoreError::DuplicateEvent { .. })
        ));
        assert!(matches!(
            store.append(vec![request("a", Expected::Any, &[2, 1])]),
            Err(StoreError::DuplicateEvent { .. })
        ));
        assert_eq!(store.head(), 3);
    }

    #[test]
    fn only_a_whole_earlier_append_counts_as_a_retry() {
        let store = EventStore::in_memory();
        store
            .append(vec![request("s", Expected::Any, &[1, 2, 3])])
            .unwrap();
        store
            .append(vec![request("s", Expected::Any, &[4])])
            .unwrap();
        for ids in [&[1][..], &[2, 3], &[3, 4], &[1, 2, 3, 4]] {
            assert!(
                matches!(
                    store.append(vec![request("s", Expected::Any, ids)]),
                    Err(StoreError::DuplicateEvent { .. })
                ),
                "{ids:?}"
            );
        }
        assert!(matches!(
            store.append(vec![
                request("s", Expected::Any, &[1, 2]),
                request("t", Expected::Any, &[3])
            ]),
            Err(StoreError::DuplicateEvent { .. })
        ));
        assert_eq!(
            store
                .append(vec![request("s", Expected::Any, &[1, 2, 3])])
                .unwrap(),
            vec![Appended {
                version: 2,
                position: 2
            }]
        );
        assert_eq!(store.head(), 4);
    }

    #[test]
    fn multi_stream_appends_are_all_or_nothing() {
        let store = EventStore::in_memory();
        store
            .append(vec![request("a", Expected::Any, &[1])])
            .unwrap();
        let refused = store.append(vec![
            request("b", Expected::NoStream, &[2]),
            request("a", Expected::NoStream, &[3]),
        ]);
        assert!(refused.is_err());
        assert_eq!(store.head(), 1);
        assert_eq!(store.stream_version("b"), None);
        let done = store
            .append(vec![
                request("b", Expected::NoStream, &[2]),
                request("a", Expected::Exact(0), &[3, 4]),
            ])
            .unwrap();
        assert_eq!(
            done,
            vec![
                Appended {
                    version: 0,
                    position: 1
                },
                Appended {
                    version: 2,
                    position: 3
                }
            ]
        );
    }

    #[test]
    fn reads_go_forwards_and_backwards() {
        let store = EventStore::in_memory();
        for n in 0..10u8 {
            let stream = if n % 2 == 0 { "even" } else { "odd" };
            store
                .append(vec![request(stream, Expected::Any, &[n + 1])])
                .unwrap();
        }
        let versions = |events: Vec<Arc<StoredEvent>>| -> Vec<u64> {
            events.iter().map(|e| e.version).collect()
        };
        assert_eq!(
            versions(store.read_stream("even", None, false, 100)),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(
            versions(store.read_stream("even", Some(3), false, 100)),
            [3, 4]
        );
        assert_eq!(versions(store.read_stream("even", None, true, 2)), [4, 3]);
        assert_eq!(
            versions(store.read_stream("even", Some(1), true, 100)),
            [1, 0]
        );
        assert_eq!(versions(store.read_stream("even", Some(99), true, 1)), [4]);
        assert!(store.read_stream("none", None, false, 100).is_empty());
        let all: Vec<u64> = store.read_all(7, 100).iter().map(|e| e.position).collect();
        assert_eq!(all, [7, 8, 9]);
    }

    #[test]
    fn a_durable_store_reopens_with_everything_acknowledged() {
        for fsync in [Fsync::Always, Fsync::Group, Fsync::Never] {
            let dir = temp_dir(fsync.name());
            {
                let store = EventStore::open(&dir, fsync, 256).unwrap();
                for n in 0..50u8 {
                    let expected = match n {
                        0 => Expected::NoStream,
                        n => Expected::Exact(u64::from(n) - 1),
                    };
                    store
                        .append(vec![request("s", expected, &[n + 1])])
                        .unwrap();
                }
                store.close().unwrap();
                assert!(matches!(
                    store.append(vec![request("s", Expected::Any, &[200])]),
                    Err(StoreError::Closed)
                ));
            }
            let store = EventStore::open(&dir, fsync, 256).unwrap();
            assert_eq!(store.head(), 50);
            assert_eq!(store.stream_version("s"), Some(49));
            let again = store
                .append(vec![request("s", Expected::Any, &[10])])
                .unwrap();
            assert_eq!(
                again,
                vec![Appended {
                    version: 9,
                    position: 9
                }],
                "ids survive reopening"
            );
            drop(store);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn threads_share_syncs_and_lose_nothing() {
        let dir = temp_dir("threads");
        let store = Arc::new(EventStore::open(&dir, Fsync::Group, 1 << 20).unwrap());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for n in 0..50u8 {
                        let mut id = [t; 16];
                        id[1] = n;
                        let stream = format!("t{t}");
                        let expected = if n == 0 {
                            Expected::NoStream
                        } else {
                            Expected::Exact(u64::from(n) - 1)
                        };
                        store
                            .append(vec![AppendRequest {
                                stream: Arc::from(stream.as_str()),
                                expected,
                                events: vec![NewEvent {
                                    id,
                                    event_type: Arc::from("T"),
                                    data: vec![n],
                                    metadata: vec![],
                                }],
                            }])
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(store.head(), 200);
        store.close().unwrap();
        drop(store);
        let store = EventStore::open(&dir, Fsync::Group, 1 << 20).unwrap();
        for t in 0..4 {
            let events = store.read_stream(&format!("t{t}"), None, false, 1000);
            let data: Vec<u8> = events.iter().map(|e| e.data[0]).collect();
            assert_eq!(data, (0..50).collect::<Vec<u8>>());
        }
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn poll_waits_for_new_events_and_filters() {
        let store = Arc::new(EventStore::in_memory());
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                store
                    .poll(0, 10, Some(Duration::from_secs(10)), &|e| &*e.stream == "b")
                    .unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        store
            .append(vec![request("a", Expected::Any, &[1])])
            .unwrap();
        store
            .append(vec![request("b", Expected::Any, &[2])])
            .unwrap();
        let (found, next) = waiter.join().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(&*found[0].stream, "b");
        assert_eq!(next, 2);
        let (none, next) = store
            .poll(2, 10, Some(Duration::from_millis(10)), &|_| true)
            .unwrap();
        assert!(none.is_empty());
        assert_eq!(next, 2);
    }
}
