//! Durations on the command line: `500ms`, `15s`, `5m`, `1h`, or a bare number of seconds.

use std::time::Duration;

/// Parses a flag value such as `500ms`, `15s`, `5m`, `1h` or `2.5` (seconds), for clap's
/// `value_parser`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((value, "s"), |i| value.split_at(i));
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {value:?}"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {value:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// [`parse_duration`] for settings where zero means nothing sensible (a Lease duration, a
/// retry period, a backoff): `0s` is rejected with a clear message.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = parse_duration(value)?;
    if duration.is_zero() {
        return Err(format!("{value:?} is zero: use a duration greater than 0"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("4"), Ok(Duration::from_secs(4)));
        assert_eq!(parse_duration(" 2.5 "), Ok(Duration::from_millis(2500)));
    }

    #[test]
    fn positive_durations_reject_zero() {
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
        for zero in ["0", "0s", "0ms", "0.0m"] {
            let err = parse_positive_duration(zero).expect_err(zero);
            assert!(err.contains("greater than 0"), "{err}");
        }
        assert!(parse_positive_duration("-1s").is_err());
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "5d", "abc", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
