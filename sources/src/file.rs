//! Replaying NDJSON files: bare record values, or dumps in the shape `kcat -J` prints.
//!
//! Each line is one record. A line whose first key is one of an envelope's (kcat writes
//! `{"topic"` first) is read as a `kcat -J` envelope, its keys in any order (`topic`,
//! `partition`, `offset`, `headers` as a flat name/value array, `key`, `payload`): its
//! payload is the record value, its headers are honoured, its key is kept for dead letters, and its Kafka position is kept, so a
//! dump of a real topic replays exactly as consuming the topic would. Any other line is a bare
//! record value. Blank lines are skipped.
//!
//! Workers share one cursor that hands out chunks of whole lines with their first line number,
//! so every worker stays busy and every error row can name its line.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel_operators::sym::Sym;

use crate::codec::json::{Json, Value};
use crate::error::{IngestError, SourceError, excerpt};
use crate::record::Position;
use crate::source::{Batch, Poll, Source, SourceReader};

/// Bytes handed to a worker at a time (rounded to whole lines).
const CHUNK: usize = 1 << 20;

/// The longest line read, in bytes. A longer one (a file that is not NDJSON, a dump whose
/// newlines were lost) is not held in memory: it is skipped to its end and becomes an error
/// row, and the lines after it are read as usual. Kafka records are a megabyte by default, and
/// a `kcat -J` envelope escapes its payload to a few times that at most.
pub const MAX_LINE: usize = 16 << 20;

/// The UTF-8 byte order mark some editors put at the start of a text file.
const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// How compressed files begin, their format, and the command that decompresses them.
const COMPRESSED: &[(&[u8], &str, &str)] = &[
    (b"\x1F\x8B", "gzip", "gzip"),
    (b"\x28\xB5\x2F\xFD", "zstd", "zstd"),
    (b"\xFD7zXZ\x00", "xz", "xz"),
    (b"BZh", "bzip2", "bzip2"),
];

/// A line longer than [`MAX_LINE`] that was skipped.
struct LongLine {
    line: u64,
    bytes: u64,
    head: Vec<u8>,
}

struct Cursor {
    file: File,
    /// Bytes read past the last newline of the previous chunk.
    carry: Vec<u8>,
    next_line: u64,
    eof: bool,
    /// Bytes of whole lines handed out so far (shared with [`FileSource::progress`]).
    handed: Arc<AtomicU64>,
    /// Lines skipped as too long since the readers last took them.
    long_lines: Vec<LongLine>,
    /// Whether the file's first bytes were looked at ([`Cursor::check_start`]).
    started: bool,
}

impl Cursor {
    /// Moves the next run of whole lines into `out` and returns the number of its first line.
    fn next_chunk(&mut self, out: &mut Vec<u8>) -> std::io::Result<Option<u64>> {
        out.clear();
        std::mem::swap(out, &mut self.carry);
        loop {
            if let Some(last) = memchr::memrchr(b'\n', out) {
                if out.len() >= CHUNK || self.eof {
                    self.carry.extend_from_slice(&out[last + 1..]);
                    out.truncate(last + 1);
                    break;
                }
            } else if out.len() > MAX_LINE {
                self.skip_long_line(out)?;
                continue;
            } else if self.eof {
                break;
            }
            // Room for exactly one more chunk (a growth by doubling would leave half of each
            // buffer unused), read straight into it without zeroing it first.
            out.reserve_exact(CHUNK);
            let read = (&mut self.file).take(CHUNK as u64).read_to_end(out)?;
            if read < CHUNK {
                // Reading stops short of the limit only at the end of the file.
                self.eof = true;
            }
            if !self.started {
                self.check_start(out)?;
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        self.handed.fetch_add(out.len() as u64, Ordering::Relaxed);
        let first = self.next_line;
        self.next_line += memchr::memchr_iter(b'\n', out).count() as u64;
        if !out.ends_with(b"\n") {
            self.next_line += 1;
        }
        Ok(Some(first))
    }

    /// Looks at the file's first bytes, once `out` holds them: a byte order mark is dropped
    /// (its first record would be refused as not JSON), and a compressed file is refused by its
    /// format, where it would be read as lines of binary, each an error row, and end with none
    /// of its records.
    fn check_start(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let longest = COMPRESSED.iter().map(|(magic, ..)| magic.len()).max();
        if out.len() < longest.unwrap_or(0) && !self.eof {
            return Ok(());
        }
        self.started = true;
        for (magic, format, tool) in COMPRESSED {
            if out.starts_with(magic) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the file is {format}-compressed; Keel reads NDJSON text: decompress it \
                         first (`{tool} -dc FILE > FILE.ndjson`), or read it through a pipe \
                         (`--input <({tool} -dc FILE)`)"
                    ),
                ));
            }
        }
        if out.starts_with(BYTE_ORDER_MARK) {
            out.drain(..BYTE_ORDER_MARK.len());
            self.handed
                .fetch_add(BYTE_ORDER_MARK.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Skips the line that `out` begins and holds no end of (more than [`MAX_LINE`] bytes of
    /// it), reading on to its newline without keeping it; `out` is left holding what follows.
    fn skip_long_line(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let head = out[..crate::error::EXCERPT_BYTES + 1].to_vec();
        let mut bytes = out.len() as u64;
        let mut newline = 0;
        out.clear();
        while !self.eof {
            let read = (&mut self.file).take(CHUNK as u64).read_to_end(out)?;
            self.eof = read < CHUNK;
            if let Some(end) = memchr::memchr(b'\n', out) {
                bytes += end as u64;
                newline = 1;
                out.drain(..=end);
                break;
            }
            bytes += out.len() as u64;
            out.clear();
        }
        self.handed.fetch_add(bytes + newline, Ordering::Relaxed);
        self.long_lines.push(LongLine {
            line: self.next_line,
            bytes,
            head,
        });
        self.next_line += 1;
        Ok(())
    }
}

/// An NDJSON file replayed once.
#[derive(Clone)]
pub struct FileSource {
    path: PathBuf,
    label: Sym,
    cursor: Arc<Mutex<Option<Cursor>>>,
    /// The file's size when it was opened; `None` for a pipe or device, whose end is not known
    /// ahead.
    size: Option<u64>,
    handed: Arc<AtomicU64>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .finish()
    }
}

impl FileSource {
    /// Opens `path` for replay.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let io = |source| SourceError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let metadata = file.metadata().map_err(io)?;
        // A directory opens, and fails only at its first read: refused here, before the engine
        // (and in `keel run` its ports) start.
        if metadata.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "a directory, not a file of records (name one of its files)",
            )));
        }
        let size = metadata.is_file().then_some(metadata.len());
        let handed = Arc::new(AtomicU64::new(0));
        Ok(FileSource {
            path: path.to_owned(),
            label: Sym::new(&path.display().to_string()),
            cursor: Arc::new(Mutex::new(Some(Cursor {
                file,
                carry: Vec::new(),
                next_line: 1,
                eof: false,
                handed: handed.clone(),
                long_lines: Vec::new(),
                started: false,
            }))),
            size,
            handed,
        })
    }
}

impl Source for FileSource {
    fn open(&self, _worker: usize, _workers: usize) -> Result<Box<dyn SourceReader>, SourceError> {
        Ok(Box::new(FileReader {
            source: self.clone(),
            chunk: Arc::default(),
            spare: SpareChunks::default(),
            at: 0,
            line: 0,
        }))
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    /// The share of the file's bytes (its size when it was opened) handed to the readers, so
    /// its lines need not be counted first: it runs ahead of the records made of them by the
    /// chunk each reader holds (and of the records counted, by up to an epoch). A file that
    /// grows while read stops at 1; a pipe tells nothing.
    fn progress(&self) -> Option<f64> {
        let handed = self.handed.load(Ordering::Relaxed);
        Some(match self.size? {
            0 => 1.0,
            size => (handed as f64 / size as f64).min(1.0),
        })
    }
}

/// Chunks a reader keeps for reuse once no batch holds them.
const SPARE_CHUNKS: usize = 3;

struct FileReader {
    source: FileSource,
    /// The chunk being read; batches hold it too while they hold records of it, so its lines
    /// are never copied.
    chunk: Arc<Vec<u8>>,
    spare: SpareChunks,
    at: usize,
    line: u64,
}

/// Earlier chunks, reused once no batch holds them (a fresh one would be allocated and first
/// touched for every megabyte read).
#[derive(Default)]
struct SpareChunks(Vec<Arc<Vec<u8>>>);

impl SpareChunks {
    /// An empty buffer for the next chunk: a spare one no batch holds any more, else a new one.
    fn take(&mut self) -> Vec<u8> {
        let free = self
            .0
            .iter()
            .position(|chunk| Arc::strong_count(chunk) == 1);
        free.and_then(|i| Arc::try_unwrap(self.0.swap_remove(i)).ok())
            .unwrap_or_default()
    }

    /// Puts a chunk that was read aside for reuse.
    fn put(&mut self, chunk: Arc<Vec<u8>>) {
        if chunk.capacity() > 0 && self.0.len() < SPARE_CHUNKS {
            self.0.push(chunk);
        }
    }
}

impl SourceReader for FileReader {
    fn next_batch(&mut self, batch: &mut Batch, max: usize) -> Result<Poll, SourceError> {
        let start = batch.len();
        while batch.len() - start < max {
            if self.at >= self.chunk.len() {
                let mut guard = self
                    .source
                    .cursor
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(cursor) = guard.as_mut() else {
                    break;
                };
                let mut buffer = self.spare.take();
                let next = match cursor.next_chunk(&mut buffer) {
                    Ok(next) => next,
                    Err(source) => {
                        // The file is done for every reader, not read on as something else.
                        *guard = None;
                        return Err(SourceError::Io {
                            path: self.source.path.clone(),
                            source,
                        });
                    }
                };
                for long in cursor.long_lines.drain(..) {
                    batch.refuse(self.too_long(long.line, long.bytes, &long.head));
                }
                let done = std::mem::replace(&mut self.chunk, Arc::new(buffer));
                self.spare.put(done);
                match next {
                    Some(first) => {
                        self.line = first;
                        self.at = 0;
                    }
                    None => {
                        *guard = None;
                        break;
                    }
                }
            }
            let rest = &self.chunk[self.at..];
            let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            if end > MAX_LINE {
                // Held whole (its end came with the read that took it past the limit), but
                // refused all the same.
                batch.refuse(self.too_long(self.line, end as u64, rest));
            } else {
                let position = Position::File {
                    path: self.source.label,
                    line: self.line,
                };
                push_line(batch, position, &self.chunk, self.at..self.at + end);
            }
            self.at += end + 1;
            self.line += 1;
        }
        Ok(if batch.len() > start {
            Poll::Ready
        } else {
            Poll::Done
        })
    }
}

impl FileReader {
    /// The error row of line `line`, `bytes` long (without its newline), which begins `head`.
    fn too_long(&self, line: u64, bytes: u64, head: &[u8]) -> IngestError {
        IngestError {
            position: Position::File {
                path: self.source.label,
                line,
            },
            reason: format!("line is longer than {MAX_LINE} bytes ({bytes} bytes); skipped"),
            event_type: None,
            tenant_id: None,
            excerpt: excerpt(head),
        }
    }
}

/// A header name or value: a string (JSON `null`, which kcat prints for a header without a
/// value, is empty).
fn header_text(json: &mut Json<'_>) -> Result<String, Bad> {
    match json.scalar()? {
        Ok(Value::Str(text)) => Ok(text.get().into_owned()),
        Ok(Value::Null) => Ok(String::new()),
        _ => Err(Bad("headers: names and values must be strings".to_owned())),
    }
}

/// Why an envelope cannot be read, in words; its JSON errors too.
struct Bad(String);

impl From<crate::codec::json::JsonError> for Bad {
    fn from(error: crate::codec::json::JsonError) -> Self {
        Bad(error.to_string())
    }
}

/// Adds the line at `range` of `chunk` to the batch: a `kcat -J` envelope, a bare record
/// (shared with the batch, not copied), or nothing if blank.
fn push_line(batch: &mut Batch, position: Position, chunk: &Arc<Vec<u8>>, range: Range<usize>) {
    let line = &chunk[range.clone()];
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return;
    }
    if is_envelope(trimmed) {
        if let Err(reason) = push_kcat(batch, trimmed) {
            batch.refuse(IngestError {
                position,
                reason: format!("kcat envelope: {reason}"),
                event_type: None,
                tenant_id: None,
                excerpt: excerpt(trimmed),
            });
        }
    } else {
        let start = range.start + (line.len() - line.trim_ascii_start().len());
        batch.push_shared(position, chunk, start..start + trimmed.len());
    }
}

/// The keys of a `kcat -J` envelope. No event record has one as its first key, so a line whose
/// first key is one of them is an envelope, whatever the order of its keys.
const ENVELOPE_KEYS: [&[u8]; 9] = [
    b"topic",
    b"partition",
    b"offset",
    b"tstype",
    b"ts",
    b"broker",
    b"headers",
    b"key",
    b"payload",
];

/// Whether a line is a `kcat -J` envelope: kcat writes `{"topic":` first, other tools may put
/// space after the brace or the keys in another order (`jq -S` sorts them: `broker` first).
fn is_envelope(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"{") else {
        return false;
    };
    let Some(key) = rest.trim_ascii_start().strip_prefix(b"\"") else {
        return false;
    };
    key.iter()
        .take(10)
        .position(|&b| b == b'"')
        .is_some_and(|end| ENVELOPE_KEYS.contains(&&key[..end]))
}

fn push_kcat(batch: &mut Batch, line: &[u8]) -> Result<(), String> {
    let line = std::str::from_utf8(line).map_err(|_| "not valid UTF-8".to_owned())?;
    let mut json = Json::new(line);
    let mut topic = None;
    let mut partition = None;
    let mut offset = None;
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut payload = None;
    let mut record_key = None;
    json.object(|json, key| {
        match &*key.get() {
            "topic" => topic = Some(json.string()?.get().into_owned()),
            "partition" => partition = json.scalar()?.ok(),
            "offset" => offset = json.scalar()?.ok(),
            "key" => {
                record_key = match json.scalar()? {
                    Ok(Value::Str(text)) => Some(text.get().into_owned()),
                    _ => None,
                }
            }
            // kcat prints the value as a JSON string; a dump that kept it as JSON is read too.
            "payload" if matches!(json.peek(), Some(b'{' | b'[')) => {
                payload = Some(Ok(json.raw()?.to_owned()));
            }
            "payload" => {
                payload = match json.scalar()? {
                    Ok(Value::Str(text)) => Some(Ok(text.get().into_owned())),
                    Ok(Value::Null) => None,
                    Ok(other) => Some(Err(format!(
                        "payload is {}, not the record's value as text",
                        match other {
                            Value::Num(_) => "a number",
                            _ => "a boolean",
                        }
                    ))),
                    Err(_) => None,
                }
            }
            "headers" if json.peek() == Some(b'[') => {
                // kcat's flat list of names and values, or a list of [name, value] pairs.
                let mut flat = Vec::new();
                json.array(|json| {
                    if json.peek() == Some(b'[') {
                        let mut pair = 0;
                        json.array(|json| {
                            flat.push(header_text(json)?);
                            pair += 1;
                            Ok::<(), Bad>(())
                        })?;
                        if pair == 2 {
                            Ok(())
                        } else {
                            Err(Bad("headers: a pair is not [name, value]".to_owned()))
                        }
                    } else {
                        flat.push(header_text(json)?);
                        Ok(())
                    }
                })?;
                if flat.len() % 2 == 1 {
                    return Err(Bad("headers: a name without its value".to_owned()));
                }
                headers = flat
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
            }
            "headers" if json.peek() == Some(b'n') => json.skip()?,
            "headers" => {
                return Err(Bad(
                    "headers: expected a list of names and values, as kcat -J prints them"
                        .to_owned(),
                ));
            }
            _ => json.skip()?,
        }
        Ok::<(), Bad>(())
    })
    .map_err(|Bad(reason)| reason)?;
    // kcat prints numbers; integer text in a string is read as well.
    let number = |value: Option<Value<'_>>, name: &str| match value {
        Some(Value::Num(n)) => n
            .parse::<i64>()
            .map_err(|_| format!("{name} {n} is not an integer")),
        Some(Value::Str(text)) => text
            .get()
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{name} {:?} is not an integer", text.get())),
        Some(_) => Err(format!("{name} is not an integer")),
        None => Err(format!("{name} missing")),
    };
    let partition = i32::try_from(number(partition, "partition")?)
        .map_err(|_| "partition out of range".to_owned())?;
    let offset = number(offset, "offset")?;
    let topic = topic.ok_or("topic missing")?;
    let payload = payload.ok_or("payload is null or missing (a tombstone)")??;
    let position = Position::Kafka {
        topic: Sym::new(&topic),
        partition,
        offset,
    };
    batch.push(
        position,
        payload.as_bytes(),
        headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
    );
    if let Some(key) = record_key {
        batch.set_key(key.as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A directory is refused when the source opens, not at its first read.
    #[test]
    fn a_directory_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let error = FileSource::open(dir.path()).expect_err("refused");
        let message = error.to_string();
        assert!(
            message.contains("a directory, not a file of records"),
            "{message}"
        );
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }

    /// Position, value, tenant header and key of a record read back.
    type ReadBack = (String, String, Option<String>, Option<String>);

    fn read_all(path: &Path, workers: usize) -> (Vec<ReadBack>, Vec<IngestError>) {
        let source = FileSource::open(path).unwrap();
        let mut records = Vec::new();
        let mut refused = Vec::new();
        let mut readers: Vec<_> = (0..workers)
            .map(|w| source.open(w, workers).unwrap())
            .collect();
        let mut done = vec![false; workers];
        while done.iter().any(|d| !d) {
            for (w, reader) in readers.iter_mut().enumerate() {
                let mut batch = Batch::default();
                if reader.next_batch(&mut batch, 3).unwrap() == Poll::Done {
                    done[w] = true;
                }
                for r in batch.records() {
                    records.push((
                        r.position.to_string(),
                        String::from_utf8(r.value.to_vec()).unwrap(),
                        r.headers.tenant_id.map(|t| t.into_owned()),
                        r.headers
                            .key
                            .map(|k| String::from_utf8_lossy(&k).into_owned()),
                    ));
                }
                refused.extend(batch.take_refused());
            }
        }
        records.sort();
        (records, refused)
    }

    #[test]
    fn bare_and_kcat_lines_with_positions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.ndjson");
        let mut f = File::create(&path).unwrap();
        writeln!(f, r#"{{"event_type":"a"}}"#).unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"topic":"analytics_events","partition":2,"offset":41,"tstype":"create","ts":1,"broker":1,"headers":["tenant_id","t-1","event_type","viewer_connect"],"key":"k","payload":"{{\"event_type\":\"b\"}}"}}"#).unwrap();
        writeln!(
            f,
            r#"{{"topic":"analytics_events","partition":2,"offset":42,"key":"k","payload":null}}"#
        )
        .unwrap();
        write!(f, r#"{{"event_type":"c"}}"#).unwrap();
        drop(f);
        for workers in [1, 3] {
            let (records, refused) = read_all(&path, workers);
            assert_eq!(
                records,
                vec![
                    (
                        "file:".to_owned() + &path.display().to_string() + ":1",
                        r#"{"event_type":"a"}"#.to_owned(),
                        None,
                        None
                    ),
                    (
                        "file:".to_owned() + &path.display().to_string() + ":5",
                        r#"{"event_type":"c"}"#.to_owned(),
                        None,
                        None
                    ),
                    (
                        "kafka:analytics_events/2@41".to_owned(),
                        r#"{"event_type":"b"}"#.to_owned(),
                        Some("t-1".to_owned()),
                        Some("k".to_owned())
                    ),
                ]
            );
            assert_eq!(refused.len(), 1);
            assert_eq!(
                refused[0].reason,
                "kcat envelope: payload is null or missing (a tombstone)"
            );
            assert_eq!(
                refused[0].position.to_string(),
                format!("file:{}:4", path.display())
            );
        }
    }

    /// Writes lines 1..=`lines` of `path`, line `i` being `line(i)`.
    fn write_lines(path: &Path, lines: usize, line: impl Fn(usize) -> String) {
        let mut f = std::io::BufWriter::new(File::create(path).unwrap());
        for i in 1..=lines {
            writeln!(f, "{}", line(i)).unwrap();
        }
        f.flush().unwrap();
    }

    #[test]
    fn large_files_keep_line_numbers_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.ndjson");
        let lines = 60_000;
        write_lines(&path, lines, |i| {
            format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(i % 50))
        });
        let (records, _) = read_all(&path, 2);
        assert_eq!(records.len(), lines);
        for (position, value, _, _) in &records {
            let line: usize = position.rsplit(':').next().unwrap().parse().unwrap();
            assert!(
                value.starts_with(&format!(r#"{{"n":{line},"#)),
                "{position} holds {value}"
            );
        }
    }

    /// Lines are shared with the batch, not copied: a batch that holds records of several
    /// chunks keeps every one intact, without its surrounding blanks and carriage return,
    /// while the reader moves on and reuses the chunks batches no longer hold.
    #[test]
    fn batches_keep_their_lines_while_chunks_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks.ndjson");
        let lines = 100_000;
        // Leading blanks on every line, trailing blanks and CRLF on some.
        write_lines(&path, lines, |i| {
            let end = if i % 3 == 0 { " \t\r" } else { "" };
            format!(r#"  {{"n":{i},"pad":"{}"}}{end}"#, "y".repeat(i % 40))
        });
        let source = FileSource::open(&path).unwrap();
        let mut reader = source.open(0, 1).unwrap();
        let mut batch = Batch::default();
        let mut next = 1;
        // 30,000 lines of about 45 bytes span two or three 1 MiB chunks.
        while reader.next_batch(&mut batch, 30_000).unwrap() == Poll::Ready {
            for record in batch.records() {
                let expected = format!(r#"{{"n":{next},"pad":"{}"}}"#, "y".repeat(next % 40));
                assert_eq!(record.value, expected.as_bytes(), "line {next}");
                assert_eq!(
                    record.position.to_string(),
                    format!("file:{}:{next}", path.display())
                );
                next += 1;
            }
            batch.clear();
        }
        assert_eq!(next, lines + 1);
    }

    /// Progress is the share of bytes handed to readers: it starts at nothing, grows a chunk at
    /// a time while records are read, and ends at the whole file, a last line without its
    /// newline included.
    #[test]
    fn progress_is_the_share_of_bytes_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.ndjson");
        write_lines(&path, 80_000, |i| {
            format!(r#"{{"n":{i},"pad":"{}"}}"#, "z".repeat(i % 30))
        });
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"n":"last"}"#)
            .unwrap();
        let size = std::fs::metadata(&path).unwrap().len() as f64;
        let source = FileSource::open(&path).unwrap();
        assert_eq!(source.progress(), Some(0.0));
        let mut reader = source.open(0, 1).unwrap();
        let (mut batch, mut seen, mut records) = (Batch::default(), Vec::new(), 0);
        while reader.next_batch(&mut batch, 10_000).unwrap() == Poll::Ready {
            records += batch.len();
            batch.clear();
            seen.push(source.progress().unwrap());
        }
        assert_eq!(records, 80_001);
        // The first megabyte's whole lines, of a file of about 2.9; then some of the rest.
        assert!(
            seen[0] > 0.3 && seen[0] < 0.4 && seen[0] * size <= 1_048_576.0,
            "{seen:?}"
        );
        assert!(seen.iter().any(|&s| s > 0.6 && s < 1.0), "{seen:?}");
        // Every byte handed out once, carried ones and the last line's included.
        assert_eq!(source.handed.load(Ordering::Relaxed), size as u64);
        assert_eq!(source.progress(), Some(1.0));
        // An empty file counts as all read from the start; a pipe's end is not known.
        let empty = dir.path().join("empty.ndjson");
        File::create(&empty).unwrap();
        assert_eq!(FileSource::open(&empty).unwrap().progress(), Some(1.0));
        let pipe = FileSource::open(Path::new("/dev/null")).unwrap();
        assert_eq!(pipe.progress(), None);
    }

    /// A line too long to hold (here one of them the file's last, without its newline) is
    /// skipped to its end as an error row, and the lines around it are read with their numbers.
    #[test]
    fn over_long_lines_are_skipped_as_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.ndjson");
        let mut f = std::io::BufWriter::new(File::create(&path).unwrap());
        let long = MAX_LINE + 3 * CHUNK + 17;
        writeln!(f, r#"{{"n":1}}"#).unwrap();
        writeln!(f, "{}", "x".repeat(long)).unwrap();
        writeln!(f, r#"{{"n":3}}"#).unwrap();
        // Exactly as long as allowed, then one byte longer: its end comes with the read that
        // takes it past the limit.
        writeln!(f, r#"{{"n":4,"pad":"{}"}}"#, "p".repeat(MAX_LINE - 16)).unwrap();
        writeln!(f, "{}", "z".repeat(MAX_LINE + 1)).unwrap();
        writeln!(f, r#"{{"n":6}}"#).unwrap();
        write!(f, "{}", "y".repeat(MAX_LINE + 1)).unwrap();
        f.flush().unwrap();
        drop(f);
        for workers in [1, 2] {
            let (records, refused) = read_all(&path, workers);
            let at = |line: u64| format!("file:{}:{line}", path.display());
            // Positions and lengths only: a failure would print the long values.
            let read: Vec<_> = records.iter().map(|r| (r.0.clone(), r.1.len())).collect();
            assert_eq!(
                read,
                [(at(1), 7), (at(3), 7), (at(4), MAX_LINE), (at(6), 7)]
            );
            let errors: Vec<_> = refused
                .iter()
                .map(|e| (e.position.to_string(), e.reason.clone(), e.excerpt.clone()))
                .collect();
            let reason = |bytes: usize| {
                format!("line is longer than {MAX_LINE} bytes ({bytes} bytes); skipped")
            };
            let excerpt = |c: &str| c.repeat(crate::error::EXCERPT_BYTES) + "…";
            assert_eq!(
                errors,
                [
                    (at(2), reason(long), excerpt("x")),
                    (at(5), reason(MAX_LINE + 1), excerpt("z")),
                    (at(7), reason(MAX_LINE + 1), excerpt("y")),
                ]
            );
        }
        let source = FileSource::open(&path).unwrap();
        let mut reader = source.open(0, 1).unwrap();
        while reader.next_batch(&mut Batch::default(), 10).unwrap() == Poll::Ready {}
        assert_eq!(source.progress(), Some(1.0));
        assert_eq!(
            source.handed.load(Ordering::Relaxed),
            std::fs::metadata(&path).unwrap().len()
        );
    }

    #[test]
    fn kcat_envelopes_in_other_spellings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.ndjson");
        let lines = [
            // Space after the brace, offset and partition as text, headers as pairs.
            r#"{ "topic":"t","partition":"1","offset":"6","headers":[["tenant_id","t-1"],["event_type",null]],"payload":"{\"a\":1}"}"#,
            // The value kept as JSON.
            r#"{"topic":"t","partition":1,"offset":7,"payload":{"a":2}}"#,
            r#"{"topic":"t","partition":1,"offset":8,"payload":5}"#,
            r#"{"topic":"t","partition":1,"offset":9,"headers":["tenant_id"],"payload":"{}"}"#,
            r#"{"topic":"t","partition":1,"offset":10,"headers":[1,2],"payload":"{}"}"#,
            r#"{"topic":"t","partition":1,"offset":11,"headers":{"a":"b"},"payload":"{}"}"#,
            r#"{"topic":"t","partition":1,"offset":13,"headers":[["a","b","c"],["d"]],"payload":"{}"}"#,
            r#"{"topic":"t","partition":1,"offset":"x","payload":"{}"}"#,
            r#"{"topic":"t","partition":1,"offset":12,"payload":null}"#,
            // Keys sorted, as `jq -S` writes them.
            r#"{"broker":1,"headers":[],"key":"k","offset":14,"partition":1,"payload":"{\"a\":3}","topic":"t","ts":1,"tstype":"create"}"#,
            r#"{"offset":15,"partition":1,"payload":"{\"a\":4}","topic":"t"}"#,
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let (records, refused) = read_all(&path, 1);
        assert_eq!(
            records,
            [
                // (Sorted as text.)
                (
                    "kafka:t/1@14".to_owned(),
                    r#"{"a":3}"#.to_owned(),
                    None,
                    Some("k".to_owned())
                ),
                (
                    "kafka:t/1@15".to_owned(),
                    r#"{"a":4}"#.to_owned(),
                    None,
                    None
                ),
                (
                    "kafka:t/1@6".to_owned(),
                    r#"{"a":1}"#.to_owned(),
                    Some("t-1".to_owned()),
                    None
                ),
                (
                    "kafka:t/1@7".to_owned(),
                    r#"{"a":2}"#.to_owned(),
                    None,
                    None
                ),
            ]
        );
        let reasons: Vec<&str> = refused.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "kcat envelope: payload is a number, not the record's value as text",
                "kcat envelope: headers: a name without its value",
                "kcat envelope: headers: names and values must be strings",
                "kcat envelope: headers: expected a list of names and values, as kcat -J prints them",
                "kcat envelope: headers: a pair is not [name, value]",
                "kcat envelope: offset \"x\" is not an integer",
                "kcat envelope: payload is null or missing (a tombstone)",
            ]
        );
    }

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bom.ndjson");
        std::fs::write(&path, b"\xEF\xBB\xBF{\"a\":1}\n{\"b\":2}\n").unwrap();
        let (records, refused) = read_all(&path, 1);
        assert!(refused.is_empty(), "{refused:?}");
        let values: Vec<&str> = records.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(values, [r#"{"a":1}"#, r#"{"b":2}"#]);
        // Only at the start: elsewhere it is the line's own text.
        std::fs::write(&path, b"{\"a\":1}\n\xEF\xBB\xBF{\"b\":2}\n").unwrap();
        let (records, _) = read_all(&path, 1);
        assert_eq!(records[1].1, "\u{feff}{\"b\":2}");
        let source = FileSource::open(&path).unwrap();
        let mut reader = source.open(0, 1).unwrap();
        while reader.next_batch(&mut Batch::default(), 10).unwrap() == Poll::Ready {}
        assert_eq!(source.progress(), Some(1.0));
    }

    #[test]
    fn compressed_files_are_refused_by_their_format() {
        let dir = tempfile::tempdir().unwrap();
        for (magic, format, _) in COMPRESSED {
            let path = dir.path().join(format!("events.{format}"));
            let mut bytes = magic.to_vec();
            bytes.extend_from_slice(b"\x00\x01binary\n\xFF");
            std::fs::write(&path, &bytes).unwrap();
            let source = FileSource::open(&path).unwrap();
            let mut reader = source.open(0, 1).unwrap();
            let error = reader
                .next_batch(&mut Batch::default(), 10)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("the file is {format}-compressed")),
                "{error}"
            );
        }
        // A file shorter than the longest mark is looked at once it has ended.
        let path = dir.path().join("short.ndjson");
        std::fs::write(&path, b"BZ\n").unwrap();
        let (records, _) = read_all(&path, 1);
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let error = FileSource::open(Path::new("/nonexistent/events.ndjson")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot read /nonexistent/events.ndjson:"),
            "{error}"
        );
    }
}
