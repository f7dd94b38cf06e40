//! The adapter's write-ahead log: one file per trigger in a directory, written to a temporary
//! name, flushed to disk, renamed into place and the directory flushed, all before Mist gets
//! its answer. File names sort by arrival, so the forwarder drains oldest first; a forwarded
//! trigger's file is removed, a trigger Decklog refuses for good is set aside as `.dead` with
//! the reason beside it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use crate::proto::MistTrigger;

/// Extension of a pending trigger.
const PENDING: &str = "pb";

/// A log directory.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    seq: AtomicU64,
}

impl Wal {
    /// Opens (creating) `dir`; returns the log and the triggers still pending there, oldest
    /// first. Half-written files of an interrupted write are removed: their triggers were never
    /// acknowledged.
    pub fn open(dir: &Path) -> io::Result<(Wal, Vec<PathBuf>)> {
        fs::create_dir_all(dir)?;
        let mut pending = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => fs::remove_file(&path)?,
                Some(PENDING) => pending.push(path),
                _ => {}
            }
        }
        pending.sort();
        Ok((
            Wal {
                dir: dir.to_owned(),
                seq: AtomicU64::new(0),
            },
            pending,
        ))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `trigger` durably; returns its file.
    pub fn append(&self, trigger: &MistTrigger, received_ms: i64) -> io::Result<PathBuf> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let id: String = trigger.request_id.chars().take(16).collect();
        let name = format!("{received_ms:013}-{seq:010}-{id}");
        let temporary = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(format!("{name}.{PENDING}"));
        let mut file = File::create(&temporary)?;
        file.write_all(&trigger.encode_to_vec())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temporary, &path)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// Reads a pending trigger.
    pub fn read(path: &Path) -> io::Result<MistTrigger> {
        let bytes = fs::read(path)?;
        MistTrigger::decode(&bytes[..]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Forgets a forwarded trigger.
    pub fn remove(path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Sets aside a trigger that can never be forwarded, with the reason in a `.reason` file.
    pub fn bury(path: &Path, reason: &str) -> io::Result<()> {
        fs::write(path.with_extension("reason"), reason)?;
        fs::rename(path, path.with_extension("dead"))
    }

    /// Triggers set aside so far.
    pub fn dead(&self) -> io::Result<usize> {
        Ok(fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "dead"))
            .count())
    }
}
