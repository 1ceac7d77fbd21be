//! Fault hook for the load and failure benchmarks (`shardop-bench slowdep|crash`).
//!
//! Compiled in only with the cargo feature `fault-injection` (off by default, never in a
//! release image); without it both functions are empty and inlined away. With it, two
//! environment variables, read once, inject the faults:
//!
//! * `SHARDOP_FAULT_SLOW=<name prefix>=<duration>` (e.g. `slow-=30s`): every reconcile of an
//!   object whose name starts with the prefix sleeps that long before its first write, like a
//!   reconcile waiting on a slow external dependency.
//! * `SHARDOP_FAULT_CRASH_AFTER_WRITES=<n>`: the process aborts (as `kill -9` would end it)
//!   right after its n-th successful write of a reconcile, i.e. in the middle of reconciles.

/// Delays the reconcile of `name` if `SHARDOP_FAULT_SLOW` names it.
#[cfg(feature = "fault-injection")]
pub async fn before_writes(name: &str) {
    if let Some((prefix, delay)) = settings().slow.as_ref()
        && name.starts_with(prefix.as_str())
    {
        tracing::warn!(delay = ?delay, "fault injection: slow dependency");
        tokio::time::sleep(*delay).await;
    }
}

/// Counts a successful write; aborts the process after `SHARDOP_FAULT_CRASH_AFTER_WRITES`.
#[cfg(feature = "fault-injection")]
pub fn after_write() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    if let Some(limit) = settings().crash_after_writes {
        let writes = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
        if writes >= limit {
            tracing::error!(writes, "fault injection: aborting mid-reconcile");
            std::process::abort();
        }
    }
}

#[cfg(feature = "fault-injection")]
struct Settings {
    slow: Option<(String, std::time::Duration)>,
    crash_after_writes: Option<u64>,
}

#[cfg(feature = "fault-injection")]
fn settings() -> &'static Settings {
    static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
    SETTINGS.get_or_init(|| Settings {
        slow: std::env::var("SHARDOP_FAULT_SLOW")
            .ok()
            .and_then(|v| parse_slow(&v)),
        crash_after_writes: std::env::var("SHARDOP_FAULT_CRASH_AFTER_WRITES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0),
    })
}

/// `<prefix>=<number><ms|s>`.
#[cfg(feature = "fault-injection")]
fn parse_slow(value: &str) -> Option<(String, std::time::Duration)> {
    let (prefix, delay) = value.rsplit_once('=')?;
    let delay = delay.trim();
    let duration = if let Some(ms) = delay.strip_suffix("ms") {
        std::time::Duration::from_millis(ms.parse().ok()?)
    } else {
        std::time::Duration::from_secs_f64(delay.strip_suffix('s').unwrap_or(delay).parse().ok()?)
    };
    Some((prefix.to_owned(), duration))
}

/// Without the feature: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn before_writes(_name: &str) {}

/// Without the feature: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn after_write() {}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn parses_slow_settings() {
        assert_eq!(
            parse_slow("slow-=1500ms"),
            Some(("slow-".to_owned(), std::time::Duration::from_millis(1500)))
        );
        assert_eq!(
            parse_slow("a=2s"),
            Some(("a".to_owned(), std::time::Duration::from_secs(2)))
        );
        assert_eq!(parse_slow("nothing"), None);
    }
}
