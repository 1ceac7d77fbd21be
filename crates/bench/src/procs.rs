//! Resource use of the processes under test, read from `/proc`.

use std::collections::BTreeMap;

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

/// CPU time of the whole machine so far, every core summed (`/proc/stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineCpu {
    /// Seconds some process or the kernel ran.
    pub busy_s: f64,
    /// Seconds in all (busy, idle and waiting for I/O).
    pub total_s: f64,
}

impl MachineCpu {
    /// Reads the machine's CPU time so far, `None` without `/proc/stat`.
    pub fn read() -> Option<Self> {
        machine_cpu_from_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The share of the machine's CPU time between `earlier` and `self` that was busy.
    pub fn busy_since(&self, earlier: &Self) -> Option<f64> {
        let total = self.total_s - earlier.total_s;
        (total > 0.0).then(|| (self.busy_s - earlier.busy_s) / total)
    }
}

/// The first (`cpu`, all cores) line of `/proc/stat`: user, nice, system, idle, iowait, irq,
/// softirq, steal; guest time is counted inside user time already, so it is left out.
fn machine_cpu_from_stat(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: f64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some(MachineCpu {
        busy_s: (total - idle) / 100.0,
        total_s: total / 100.0,
    })
}

/// The CPU time every process of a run and the whole machine had used at one moment: the
/// difference of two readings ([`CpuReading::used_since`]) is what a phase cost each.
#[derive(Debug, Clone, Default)]
pub struct CpuReading {
    /// CPU seconds per process, by the name the run gives it.
    pub processes: BTreeMap<String, f64>,
    /// The machine's CPU time.
    pub machine: Option<MachineCpu>,
}

/// The CPU time used between two [`CpuReading`]s.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuUse {
    /// CPU seconds per process present in both readings.
    pub processes: BTreeMap<String, f64>,
    /// The share of all cores busy (any process, the kernel included).
    pub machine_busy: Option<f64>,
}

impl CpuReading {
    /// What each process and the machine used from `earlier` until this reading.
    pub fn used_since(&self, earlier: &Self) -> CpuUse {
        CpuUse {
            processes: self
                .processes
                .iter()
                .filter_map(|(name, cpu)| Some((name.clone(), cpu - earlier.processes.get(name)?)))
                .collect(),
            machine_busy: self
                .machine
                .zip(earlier.machine)
                .and_then(|(now, then)| now.busy_since(&then)),
        }
    }
}

impl CpuUse {
    /// The CPU seconds of the processes whose names `belongs` accepts, by name.
    pub fn of(&self, belongs: impl Fn(&str) -> bool) -> BTreeMap<String, f64> {
        self.processes
            .iter()
            .filter(|(name, _)| belongs(name))
            .map(|(name, cpu)| (name.clone(), (cpu * 10.0).round() / 10.0))
            .collect()
    }
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
    fn machine_cpu_leaves_out_idle_and_iowait_and_guest_time() {
        let stat = "cpu  100 20 30 500 50 5 5 0 40 0\ncpu0 50 10 15 250 25 2 3 0 20 0\n";
        let cpu = machine_cpu_from_stat(stat).unwrap();
        assert_eq!(cpu.busy_s, 1.6);
        assert_eq!(cpu.total_s, 7.1);
        let later = MachineCpu {
            busy_s: cpu.busy_s + 1.5,
            total_s: cpu.total_s + 2.0,
        };
        assert_eq!(later.busy_since(&cpu), Some(0.75));
        assert_eq!(cpu.busy_since(&cpu), None);
        assert!(MachineCpu::read().is_some_and(|m| m.total_s > 0.0));
    }

    #[test]
    fn samples_this_process() {
        let own = sample(std::process::id()).unwrap();
        assert!(own.rss_mib > 0.0);
        assert!(sample(u32::MAX).is_none());
    }
}
