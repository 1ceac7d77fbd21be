//! Kubernetes quantities compared by value: the API server stores `1024Mi` as `1Gi`, `1000m`
//! as `1` and `0.5` as `500m`, so a desired child written the way a user wrote it never
//! equals the stored one as text. Values are exact (integers, never floats), rounded up to
//! milli-units as the API server rounds them (`0.1m` is stored as `1m`).

/// Whether two quantities (as JSON values: a string, or a number in an int-or-string field)
/// denote the same amount. Anything that does not parse is compared as written.
pub fn same_quantity_json(desired: &serde_json::Value, actual: &serde_json::Value) -> bool {
    if desired == actual {
        return true;
    }
    match (as_text(desired), as_text(actual)) {
        (Some(desired), Some(actual)) => same_quantity(&desired, &actual),
        _ => false,
    }
}

fn as_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether two quantity strings denote the same amount.
pub fn same_quantity(desired: &str, actual: &str) -> bool {
    desired == actual
        || matches!((milli_units(desired), milli_units(actual)), (Some(d), Some(a)) if d == a)
}

/// The amount in thousandths, rounded away from zero as the API server rounds; `None` when
/// the text is not a quantity or the value does not fit.
pub fn milli_units(text: &str) -> Option<i128> {
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let mantissa: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let (power_of_ten, power_of_two) = suffix_powers(suffix)?;
    let fraction_digits = i32::try_from(fraction.len()).ok()?;
    // value × 1000 = mantissa × 10^(power_of_ten − fraction_digits + 3) × 2^power_of_two
    let scaled = mantissa.checked_mul(2_i128.checked_pow(power_of_two)?)?;
    let exponent = power_of_ten.checked_sub(fraction_digits)?.checked_add(3)?;
    let magnitude = if exponent >= 0 {
        scaled.checked_mul(10_i128.checked_pow(u32::try_from(exponent).ok()?)?)?
    } else {
        let divisor = 10_i128.checked_pow(u32::try_from(-exponent).ok()?)?;
        // Rounded up, as the API server rounds anything finer than a milli-unit.
        scaled.checked_add(divisor - 1)? / divisor
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// The power of ten and of two a suffix stands for: decimal SI (`n` … `E`), binary SI
/// (`Ki` … `Ei`) or a decimal exponent (`e3`, `E-2`).
fn suffix_powers(suffix: &str) -> Option<(i32, u32)> {
    Some(match suffix {
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "" => (0, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (exponent.parse().ok()?, 0)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_canonical_forms_equal_what_the_api_server_stores() {
        for (written, stored) in [
            ("1024Mi", "1Gi"),
            ("1000m", "1"),
            ("0.5", "500m"),
            ("1e3", "1k"),
            ("1E3", "1k"),
            ("1.5Gi", "1536Mi"),
            ("0.1m", "1m"),
            ("+2", "2"),
            ("2048Ki", "2Mi"),
            (".5", "500m"),
            ("5.", "5"),
            ("1e-3", "1m"),
            ("1000000n", "1m"),
        ] {
            assert!(same_quantity(written, stored), "{written} = {stored}");
        }
    }

    #[test]
    fn different_amounts_and_non_quantities_differ() {
        for (a, b) in [
            ("1Gi", "1G"),
            ("1", "1001m"),
            ("1Gi", "2Gi"),
            ("-1", "1"),
            ("lots", "1"),
            ("1Gi", ""),
            ("1.2.3", "1.2"),
            ("1e", "1"),
            ("1Ki", "1k"),
        ] {
            assert!(!same_quantity(a, b), "{a} ≠ {b}");
        }
        // Identical text is equal even when it is not a quantity.
        assert!(same_quantity("lots", "lots"));
    }

    #[test]
    fn values_are_exact_and_overflow_is_no_match() {
        assert_eq!(milli_units("1Ei"), Some(1_152_921_504_606_846_976_000));
        assert_eq!(milli_units("1.5"), Some(1500));
        assert_eq!(milli_units("-0.1m"), Some(-1));
        assert_eq!(milli_units("1e40"), None);
        assert!(!same_quantity("1e40", "1e40 "));
    }

    #[test]
    fn json_numbers_of_int_or_string_fields_compare_by_value() {
        let number = serde_json::json!(2);
        let text = serde_json::json!("2000m");
        assert!(same_quantity_json(&number, &text));
        assert!(!same_quantity_json(&serde_json::json!(true), &text));
    }
}
