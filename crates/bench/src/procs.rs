//! Resource use of the processes under test, read from `/proc`.

/// Resident memory and CPU time of one process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// Resident set size in MiB.
    pub rss_mib: f64,
    /// User + system CPU time so far, in seconds.
    pub cpu_s: f64,
}

/// Samples process `pid`, or `None` when it is gone.
pub fn sample(pid: u32) -> Option<ProcessSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ProcessSample {
        rss_mib: rss_kib / 1024.0,
        cpu_s: cpu_seconds_from_stat(&stat)?,
    })
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn cpu_seconds_from_stat(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 0 is the state (stat field 3): utime and stime are fields 14, 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI shardop targets.
    Some((utime + stime) / 100.0)
}

/// The pid of a process whose command line starts with `binary_path`-like name `name`
/// and mentions `marker` (e.g. the cluster directory), if any.
pub fn find_pid(name: &str, marker: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let program = std::str::from_utf8(args.first()?).ok()?;
            let mentions = String::from_utf8_lossy(&cmdline).contains(marker);
            (program.rsplit('/').next() == Some(name) && mentions).then_some(pid)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat =
            "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(cpu_seconds_from_stat(stat), Some(3.0));
    }

    #[test]
    fn samples_this_process() {
        let own = sample(std::process::id()).unwrap();
        assert!(own.rss_mib > 0.0);
        assert!(sample(u32::MAX).is_none());
    }
}
