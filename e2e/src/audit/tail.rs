//! Reading the audit log from a byte offset on, so a caller that polls it (the bench, a
//! test waiting for quiet) parses each line once.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use super::event::{AuditEvent, parse_line};

/// A position in an audit log file.
#[derive(Debug, Clone)]
pub struct LogTail {
    path: PathBuf,
    offset: u64,
}

impl LogTail {
    /// Reads the whole file on the first call.
    pub fn from_start(path: PathBuf) -> Self {
        Self { path, offset: 0 }
    }

    /// Starts at the current end of the file: only events from now on are read.
    pub fn from_now(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self { path, offset }
    }

    /// The completed events appended since the last call whose raw line passes `keep` (a
    /// cheap substring test saves parsing lines the caller does not want). A line still
    /// being written is left for the next call.
    pub fn read_new(&mut self, keep: impl Fn(&str) -> bool) -> anyhow::Result<Vec<AuditEvent>> {
        let mut file = std::fs::File::open(&self.path)?;
        let len = file.metadata()?.len();
        if len < self.offset {
            // Rotated (--audit-log-maxsize): continue at the start of the new file.
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut events = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            self.offset += read as u64;
            if keep(&line)
                && let Some(event) = parse_line(&line)
            {
                events.push(event);
            }
        }
        Ok(events)
    }
}
