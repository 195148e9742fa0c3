//! The event store's durable log: segment files of checksummed records in one directory.
//!
//! The format is written down in `docs/event-log-format.md`. In short: a directory holds a
//! `LOCK` file (one writer process at a time) and segment files named by the global position of
//! their first event (`00000000000000000000.events`), each starting with an 8-byte magic. A segment
//! is a sequence of records; a record is one append (all its events, across streams, so an append
//! is all or nothing):
//!
//! ```text
//! record  = length: u32 LE | crc32c(payload): u32 LE | payload
//! payload = first position: u64 | event count: u32 | timestamp (µs since the epoch): i64
//!           | event*
//! event   = stream version: u64 | id: [u8; 16]
//!           | stream: u32 length + UTF-8 | type: u32 length + UTF-8
//!           | data: u32 length + bytes | metadata: u32 length + bytes
//! ```
//!
//! Recovery reads every segment in order. A record cut short at the end of the last segment (a
//! write the crash interrupted, or zeros a file system left there) is truncated away: it was
//! never acknowledged. Anything else that does not check out — a bad checksum with records after
//! it, a gap in positions, a damaged older segment — is refused with the file and the offset,
//! never skipped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first bytes of every segment: the format's name and version.
pub const MAGIC: &[u8; 8] = b"BTRSEVT1";
const RECORD_HEADER: usize = 8;
const PAYLOAD_HEADER: usize = 8 + 4 + 8;
/// The largest record accepted on read; appends are refused well before it.
pub const MAX_RECORD: usize = 1 << 30;

/// One event as it is stored: where it is, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: u64,
    pub stream: Arc<str>,
    pub version: u64,
    pub id: [u8; 16],
    pub event_type: Arc<str>,
    pub data: Vec<u8>,
    pub metadata: Vec<u8>,
    pub timestamp_us: i64,
}

/// Why a log could not be opened or written.
#[derive(Debug)]
pub enum LogError {
    Io {
        path: PathBuf,
        error: io::Error,
    },
    Corrupted {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    Locked {
        path: PathBuf,
    },
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            LogError::Corrupted {
                path,
                offset,
                reason,
            } => write!(
                f,
                "{} is corrupted at offset {offset}: {reason}",
                path.display()
            ),
            LogError::Locked { path } => {
                write!(f, "{} is locked by another writer", path.display())
            }
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |error| LogError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Appends one record holding `events` (consecutive positions from the first) to `out`.
pub fn encode_record(events: &[Arc<StoredEvent>], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER]);
    out.extend_from_slice(&events[0].position.to_le_bytes());
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    out.extend_from_slice(&events[0].timestamp_us.to_le_bytes());
    for event in events {
        out.extend_from_slice(&event.version.to_le_bytes());
        out.extend_from_slice(&event.id);
        for field in [
            event.stream.as_bytes(),
            event.event_type.as_bytes(),
            &event.data,
            &event.metadata,
        ] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field);
        }
    }
    let payload = &out[start + RECORD_HEADER..];
    let length = (payload.len() as u32).to_le_bytes();
    let checksum = crc32c::crc32c(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&length);
    out[start + 4..start + 8].copy_from_slice(&checksum);
}

/// The size `encode_record` will give these events (to refuse an oversized append up front).
pub fn record_size(events: &[Arc<StoredEvent>]) -> usize {
    RECORD_HEADER
        + PAYLOAD_HEADER
        + events
            .iter()
            .map(|event| {
                8 + 16
                    + 16
                    + event.stream.len()
                    + event.event_type.len()
                    + event.data.len()
                    + event.metadata.len()
            })
            .sum::<usize>()
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(count)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn field(&mut self) -> Option<&'a [u8]> {
        let length = self.u32()? as usize;
        self.take(length)
    }
}

/// Interns stream names and event types while a log is read, so equal strings share memory.
#[derive(Default)]
pub struct Interner(std::collections::HashMap<Box<str>, Arc<str>>);

impl Interner {
    pub fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(found) = self.0.get(text) {
            return found.clone();
        }
        let shared: Arc<str> = Arc::from(text);
        self.0.insert(Box::from(text), shared.clone());
        shared
    }
}

fn decode_payload(
    payload: &[u8],
    interner: &mut Interner,
    out: &mut Vec<StoredEvent>,
) -> Result<(), String> {
    let mut reader = Reader {
        bytes: payload,
        at: 0,
    };
    let truncated = || "the record ends inside an event".to_owned();
    let first = reader.u64().ok_or_else(truncated)?;
    let count = reader.u32().ok_or_else(truncated)?;
    let timestamp_us = reader.u64().ok_or_else(truncated)? as i64;
    if count == 0 {
        return Err("the record holds no events".to_owned());
    }
    for index in 0..u64::from(count) {
        let version = reader.u64().ok_or_else(truncated)?;
        let id: [u8; 16] = reader
            .take(16)
            .ok_or_else(truncated)?
            .try_into()
            .map_err(|_| truncated())?;
        let stream = reader.field().ok_or_else(truncated)?;
        let event_type = reader.field().ok_or_else(truncated)?;
        let data = reader.field().ok_or_else(truncated)?;
        let metadata = reader.field().ok_or_else(truncated)?;
        let stream = std::str::from_utf8(stream).map_err(|_| "a stream name is not UTF-8")?;
        let event_type =
            std::str::from_utf8(event_type).map_err(|_| "an event type is not UTF-8")?;
        out.push(StoredEvent {
            position: first + index,
            stream: interner.intern(stream),
            version,
            id,
            event_type: interner.intern(event_type),
            data: data.to_vec(),
            metadata: metadata.to_vec(),
            timestamp_us,
        });
    }
    if reader.at != payload.len() {
        return Err("the record has bytes after its last event".to_owned());
    }
    Ok(())
}

/// Whether `bytes` starts with a whole payload (its events all there) whose CRC is `checksum`.
fn intact_payload(bytes: &[u8], checksum: u32) -> bool {
    let mut reader = Reader { bytes, at: 0 };
    let header = (|| {
        reader.take(8)?;
        let count = reader.u32()?;
        reader.take(8)?;
        Some(count)
    })();
    let Some(count) = header else { return false };
    for _ in 0..count {
        let whole = (|| {
            reader.take(8 + 16)?;
            for _ in 0..4 {
                reader.field()?;
            }
            Some(())
        })();
        if whole.is_none() {
            return false;
        }
    }
    count > 0 && crc32c::crc32c(&bytes[..reader.at]) == checksum
}

/// The segment files of a directory, by the position of their first event.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".events") else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(first) = stem.parse::<u64>() {
                found.push((first, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.events"))
}

/// What opening a log found.
pub struct Recovered {
    pub events: Vec<StoredEvent>,
    /// The position of the first event of every record (every append), in order.
    pub appends: Vec<u64>,
    /// Bytes cut from the end of the last segment: a record whose write never finished.
    pub truncated_bytes: u64,
}

/// Appends records to the newest segment, rolling to a new one past the size limit.
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    size: u64,
    max_segment: u64,
    // Held open for the writer's life: the lock goes with it.
    _lock: File,
}

impl LogWriter {
    /// Opens (creating if need be) the log in `dir`, takes its lock, recovers what it holds,
    /// and returns a writer positioned after the last whole record.
    pub fn open(dir: &Path, max_segment: u64) -> Result<(LogWriter, Recovered), LogError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(LogError::Locked { path: lock_path }),
            Err(fs::TryLockError::Error(error)) => {
                return Err(LogError::Io {
                    path: lock_path,
                    error,
                })
            }
        }
        let found = segments(dir)?;
        let mut events = Vec::new();
        let mut appends = Vec::new();
        let mut interner = Interner::default();
        let mut truncated_bytes = 0;
        let mut next = 0u64;
        let last = found.len().checked_sub(1);
        let mut tail: Option<(PathBuf, u64)> = None;
        for (index, (first, path)) in found.iter().enumerate() {
            let is_last = Some(index) == last;
            let bytes = fs::read(path).map_err(io_error(path))?;
            if *first != next {
                return Err(LogError::Corrupted {
                    path: path.clone(),
                    offset: 0,
                    reason: format!(
                        "the segment starts at position {first}, but the one before ends at {next}"
                    ),
                });
            }
            let good = scan_segment(
                path,
                &bytes,
                is_last,
                next,
                &mut interner,
                &mut events,
                &mut appends,
            )?;
            next = events.last().map_or(0, |event| event.position + 1);
            if is_last {
                truncated_bytes = bytes.len() as u64 - good;
                tail = Some((path.clone(), good));
            }
        }
        let (path, size) = match tail {
            Some((path, good)) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                if truncated_bytes > 0 {
                    file.set_len(good).map_err(io_error(&path))?;
                    file.sync_all().map_err(io_error(&path))?;
                }
                (path, good)
            }
            None => (segment_path(dir, 0), 0),
        };
        let mut writer = LogWriter {
            dir: dir.to_owned(),
            file: open_append(&path)?,
            path,
            size,
            max_segment,
            _lock: lock,
        };
        if writer.size < MAGIC.len() as u64 {
            writer.start_segment()?;
        }
        Ok((
            writer,
            Recovered {
                events,
                appends,
                truncated_bytes,
            },
        ))
    }

    /// Writes whole records (`first` is the position of their first event), then, with
    /// `sync`, waits until they are on disk.
    pub fn write(&mut self, first: u64, records: &[u8], sync: bool) -> Result<(), LogError> {
        if self.size >= self.max_segment {
            self.roll(first)?;
        }
        self.file.write_all(records).map_err(io_error(&self.path))?;
        self.size += records.len() as u64;
        if sync {
            self.file.sync_data().map_err(io_error(&self.path))?;
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io_error(&self.path))
    }

    fn roll(&mut self, first: u64) -> Result<(), LogError> {
        // Whatever the policy, a full segment is on disk before the next starts, so recovery
        // only ever finds a torn record in the newest segment.
        self.sync()?;
        self.path = segment_path(&self.dir, first);
        self.file = open_append(&self.path)?;
        self.size = 0;
        self.start_segment()
    }

    fn start_segment(&mut self) -> Result<(), LogError> {
        self.file.set_len(0).map_err(io_error(&self.path))?;
        self.file.write_all(MAGIC).map_err(io_error(&self.path))?;
        self.file.sync_all().map_err(io_error(&self.path))?;
        self.size = MAGIC.len() as u64;
        // The new file's name must survive a crash too.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))
    }
}

fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(path))
}

/// Reads the records of one segment into `events`; returns how many bytes are good. Only in
/// the last segment may the end be torn.
fn scan_segment(
    path: &Path,
    bytes: &[u8],
    is_last: bool,
    mut next: u64,
    interner: &mut Interner,
    events: &mut Vec<StoredEvent>,
    appends: &mut Vec<u64>,
) -> Result<u64, LogError> {
    let corrupted = |offset: usize, reason: String| LogError::Corrupted {
        path: path.to_owned(),
        offset: offset as u64,
        reason,
    };
    if bytes.len() < MAGIC.len() {
        // A segment created but never given its header: only the newest can be like that.
        return if is_last && bytes.iter().all(|&b| b == 0) {
            Ok(0)
        } else {
            Err(corrupted(
                0,
                "the file is too short for a segment header".to_owned(),
            ))
        };
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupted(
            0,
            "the file does not start with the segment magic".to_owned(),
        ));
    }
    let mut offset = MAGIC.len();
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let torn = |reason: &str| -> Result<u64, LogError> {
            if is_last {
                Ok(offset as u64)
            } else {
                Err(corrupted(
                    offset,
                    format!("{reason} in a segment that is not the newest"),
                ))
            }
        };
        if rest.len() < RECORD_HEADER {
            return torn("a record header is cut short");
        }
        let length = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let all_zero_after = rest.iter().all(|&b| b == 0);
        if length == 0 || length > MAX_RECORD {
            if all_zero_after {
                return torn("zeros follow the last record");
            }
            return Err(corrupted(offset, format!("a record claims {length} bytes")));
        }
        let Some(payload) = rest.get(RECORD_HEADER..RECORD_HEADER + length) else {
            // A torn write ends the file inside its record. But a whole record whose length
            // field alone was damaged also seems to run past the end: its payload still
            // decodes and matches its checksum, and then the damage is refused.
            if intact_payload(&rest[RECORD_HEADER..], checksum) {
                return Err(corrupted(
                    offset,
                    format!("a record's length field claims {length} bytes, past the end of the file, but the record is whole"),
                ));
            }
            return torn("a record is cut short");
        };
        if crc32c::crc32c(payload) != checksum {
            let ends_file = RECORD_HEADER + length == rest.len();
            if ends_file || all_zero_after {
                return torn("the last record's checksum does not match");
            }
            return Err(corrupted(
                offset,
                "a record's checksum does not match, and records follow it".to_owned(),
            ));
        }
        let before = events.len();
        decode_payload(payload, interner, events).map_err(|reason| corrupted(offset, reason))?;
        if events[before].position != next {
            let found = events[before].position;
            events.truncate(before);
            return Err(corrupted(
                offset,
                format!("the record starts at position {found}, expected {next}"),
            ));
        }
        appends.push(next);
        next = events.last().expect("a record holds events").position + 1;
        offset += RECORD_HEADER + length;
    }
    Ok(offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: u64, stream: &str, version: u64, data: &[u8]) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            position,
            stream: Arc::from(stream),
            version,
            id: [position as u8; 16],
            event_type: Arc::from("Happened"),
            data: data.to_vec(),
            metadata: b"meta".to_vec(),
            timestamp_us: 1_700_000_000_000_000,
        })
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "buttress-log-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn write_records(dir: &Path, batches: &[Vec<Arc<StoredEvent>>], max_segment: u64) {
        let (mut writer, _) = LogWriter::open(dir, max_segment).unwrap();
        for batch in batches {
            let mut bytes = Vec::new();
            encode_record(batch, &mut bytes);
            assert_eq!(bytes.len(), record_size(batch));
            writer.write(batch[0].position, &bytes, true).unwrap();
        }
    }

    fn batches() -> Vec<Vec<Arc<StoredEvent>>> {
        vec![
            vec![event(0, "a", 0, b"one"), event(1, "b", 0, b"")],
            vec![event(2, "a", 1, &[0; 100])],
            vec![event(3, "c", 0, b"three")],
        ]
    }

    fn newest_segment(dir: &Path) -> PathBuf {
        segments(dir).unwrap().pop().unwrap().1
    }

    #[test]
    fn records_round_trip_across_segments() {
        let dir = temp_dir("round-trip");
        write_records(&dir, &batches(), 64);
        assert!(
            segments(&dir).unwrap().len() > 1,
            "a tiny segment size rolls"
        );
        let (_, recovered) = LogWriter::open(&dir, 64).unwrap();
        let expected: Vec<StoredEvent> = batches()
            .concat()
            .into_iter()
            .map(|e| (*e).clone())
            .collect();
        assert_eq!(recovered.events, expected);
        assert_eq!(recovered.truncated_bytes, 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_truncated_and_appends_continue() {
        let dir = temp_dir("torn");
        write_records(&dir, &batches(), 1 << 20);
        let path = newest_segment(&dir);
        let full = fs::read(&path).unwrap();
        for cut in 1..20 {
            fs::write(&path, &full[..full.len() - cut]).unwrap();
            let (mut writer, recovered) = LogWriter::open(&dir, 1 << 20).unwrap();
            assert_eq!(
                recovered.events.len(),
                3,
                "the last record is gone, cut {cut}"
            );
            assert!(recovered.truncated_bytes > 0);
            let mut bytes = Vec::new();
            encode_record(&[event(3, "d", 0, b"again")], &mut bytes);
            writer.write(3, &bytes, true).unwrap();
            drop(writer);
            let (_, again) = LogWriter::open(&dir, 1 << 20).unwrap();
            assert_eq!(again.events.len(), 4);
            assert_eq!(&*again.events[3].stream, "d");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zeros_after_the_last_record_are_a_torn_tail() {
        let dir = temp_dir("zeros");
        write_records(&dir, &batches(), 1 << 20);
        let path = newest_segment(&dir);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0; 4096]);
        fs::write(&path, &bytes).unwrap();
        let (_, recovered) = LogWriter::open(&dir, 1 << 20).unwrap();
        assert_eq!(recovered.events.len(), 4);
        assert_eq!(recovered.truncated_bytes, 4096);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damage_before_the_tail_is_refused_with_file_and_offset() {
        let dir = temp_dir("damage");
        write_records(&dir, &batches(), 1 << 20);
        let path = newest_segment(&dir);
        let mut bytes = fs::read(&path).unwrap();
        let first_payload = MAGIC.len() + RECORD_HEADER + 3;
        bytes[first_payload] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        match LogWriter::open(&dir, 1 << 20) {
            Err(LogError::Corrupted {
                path: at, offset, ..
            }) => {
                assert_eq!(at, path);
                assert_eq!(offset, MAGIC.len() as u64);
            }
            other => panic!("expected corruption, got {:?}", other.err()),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_length_field_is_refused_not_taken_for_a_torn_tail() {
        let dir = temp_dir("length");
        write_records(&dir, &batches(), 1 << 20);
        let path = newest_segment(&dir);
        let original = fs::read(&path).unwrap();
        // The first record's length now runs past the end of the file, by a little or a lot.
        for (byte, flip) in [(1, 0x10), (3, 0x7f)] {
            let mut bytes = original.clone();
            bytes[MAGIC.len() + byte] ^= flip;
            fs::write(&path, &bytes).unwrap();
            assert!(matches!(
                LogWriter::open(&dir, 1 << 20),
                Err(LogError::Corrupted { offset, .. }) if offset == MAGIC.len() as u64
            ));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damage_in_an_older_segment_is_refused_even_at_its_end() {
        let dir = temp_dir("older");
        write_records(&dir, &batches(), 64);
        let first = segments(&dir).unwrap()[0].1.clone();
        let bytes = fs::read(&first).unwrap();
        fs::write(&first, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            LogWriter::open(&dir, 64),
            Err(LogError::Corrupted { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = temp_dir("lock");
        let (writer, _) = LogWriter::open(&dir, 1 << 20).unwrap();
        assert!(matches!(
            LogWriter::open(&dir, 1 << 20),
            Err(LogError::Locked { .. })
        ));
        drop(writer);
        assert!(LogWriter::open(&dir, 1 << 20).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }
}
