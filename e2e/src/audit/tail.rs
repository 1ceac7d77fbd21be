//! Reading the audit log from a byte offset on, so a caller that polls it (the bench, a
//! test waiting for quiet) parses each line once.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::event::{AuditEvent, parse_line_checked};

/// A position in an audit log file.
#[derive(Debug, Clone)]
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    /// The inode read last: a new one means the API server rotated the log.
    inode: Option<u64>,
    /// Kept lines that were no audit event.
    unreadable: usize,
}

impl LogTail {
    /// Reads the whole file on the first call.
    pub fn from_start(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            inode: None,
            unreadable: 0,
        }
    }

    /// Starts at the current end of the file: only events from now on are read.
    pub fn from_now(path: PathBuf) -> Self {
        let metadata = std::fs::metadata(&path).ok();
        Self {
            offset: metadata.as_ref().map_or(0, |m| m.len()),
            inode: metadata.map(|m| m.ino()),
            path,
            unreadable: 0,
        }
    }

    /// The completed events appended since the last call whose raw line passes `keep` (a
    /// cheap substring test saves parsing lines the caller does not want). A line still
    /// being written is left for the next call.
    pub fn read_new(&mut self, keep: impl Fn(&str) -> bool) -> anyhow::Result<Vec<AuditEvent>> {
        let metadata = std::fs::metadata(&self.path)?;
        let mut events = Vec::new();
        let rotated = self.inode.is_some_and(|inode| inode != metadata.ino());
        if rotated || metadata.len() < self.offset {
            // Rotated (--audit-log-maxsize): finish the rotated file, then start the new one.
            if let Some(previous) = rotated_file(&self.path) {
                let lines = Lines {
                    keep: &keep,
                    events: &mut events,
                    unreadable: &mut self.unreadable,
                };
                read_from(&previous, self.offset, lines)?;
            }
            self.offset = 0;
        }
        self.inode = Some(metadata.ino());
        let lines = Lines {
            keep: &keep,
            events: &mut events,
            unreadable: &mut self.unreadable,
        };
        self.offset = read_from(&self.path, self.offset, lines)?;
        Ok(events)
    }

    /// Lines (passing `keep`) read so far that were no audit event: a torn line means the
    /// API server lost events (kube-apiserver.log says why, e.g. no space left on device),
    /// and every check over the log is then over an incomplete log.
    pub fn unreadable_lines(&self) -> usize {
        self.unreadable
    }
}

/// Where the lines of one read go.
struct Lines<'a, F> {
    keep: &'a F,
    events: &'a mut Vec<AuditEvent>,
    unreadable: &'a mut usize,
}

/// Appends the complete lines of `path` from `offset` on to `lines`; returns the offset
/// after the last complete line.
fn read_from<F: Fn(&str) -> bool>(
    path: &Path,
    mut offset: u64,
    lines: Lines<'_, F>,
) -> anyhow::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line)?;
        if read == 0 || !line.ends_with('\n') {
            return Ok(offset);
        }
        offset += read as u64;
        if !(lines.keep)(&line) {
            continue;
        }
        match parse_line_checked(&line) {
            Ok(Some(event)) => lines.events.push(event),
            Ok(None) => {}
            Err(_) => *lines.unreadable += 1,
        }
    }
}

/// The file the API server's log writer (lumberjack) last rotated `path` into: it renames
/// `audit.log` to `audit-<timestamp>.log` beside it, so the newest name sorts last.
fn rotated_file(path: &Path) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_str()?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let (prefix, suffix) = (format!("{stem}-"), format!(".{extension}"));
    std::fs::read_dir(path.parent()?)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|candidate| {
            candidate
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&suffix))
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::synthetic::Line;

    fn line(name: &str) -> String {
        Line::new("patch", "test", "statefulsets", "ns", name).to_json() + "\n"
    }

    fn names(events: &[AuditEvent]) -> Vec<&str> {
        events.iter().map(AuditEvent::name).collect()
    }

    #[test]
    fn a_rotated_log_is_finished_before_the_new_one_is_read() {
        let dir = std::env::temp_dir().join(format!("shardop-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        std::fs::write(&log, line("a") + &line("b")).unwrap();
        let mut tail = LogTail::from_start(log.clone());
        assert_eq!(names(&tail.read_new(|_| true).unwrap()), ["a", "b"]);
        // More lines, then rotation: the old file is renamed and a new one started.
        std::fs::write(&log, line("a") + &line("b") + &line("c")).unwrap();
        std::fs::rename(&log, dir.join("audit-2026-12-01T13-00-00.000.log")).unwrap();
        std::fs::write(&log, line("d") + &line("e") + &line("f") + &line("g")).unwrap();
        let after = tail.read_new(|_| true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names(&after), ["c", "d", "e", "f", "g"]);
        assert_eq!(tail.unreadable_lines(), 0);
    }

    #[test]
    fn a_torn_line_is_counted_as_unreadable() {
        let dir = std::env::temp_dir().join(format!("shardop-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        let torn = line("a")[..60].to_owned() + &line("b");
        std::fs::write(&log, torn + &line("c")).unwrap();
        let mut tail = LogTail::from_start(log);
        let events = tail.read_new(|_| true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names(&events), ["c"]);
        assert_eq!(tail.unreadable_lines(), 1);
    }
}
