//! Schema adjustments that make the generated CRDs mean to the API server what they say.
//!
//! schemars describes Rust types with JSON Schema formats such as `uint32`, which the API
//! server does not know: `kubectl apply` then warns `unrecognized format "uint32"` and the
//! server ignores the format. [`known_formats_only`] keeps the formats the API server
//! validates and replaces the integer ones it does not know by the bounds they stand for.

use serde_json::{Map, Value};

/// String formats the API server validates (k8s.io/apiextensions-apiserver
/// `pkg/apiserver/validation/formats.go`; `k8s-short-name` and `k8s-long-name` only from
/// 1.34, which older servers warn about). It compares them with dashes removed, so
/// `date-time` is `datetime`.
pub const KNOWN_STRING_FORMATS: [&str; 26] = [
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "k8s-short-name",
    "k8s-long-name",
];

/// Integer formats the API server knows.
pub const KNOWN_INTEGER_FORMATS: [&str; 2] = ["int32", "int64"];
/// Number formats the API server knows.
pub const KNOWN_NUMBER_FORMATS: [&str; 2] = ["float", "double"];

/// Whether the API server knows `format` for a schema of type `type_` (`None`: no type,
/// e.g. int-or-string).
pub fn is_known_format(type_: Option<&str>, format: &str) -> bool {
    match type_ {
        Some("integer") => KNOWN_INTEGER_FORMATS.contains(&format),
        Some("number") => KNOWN_NUMBER_FORMATS.contains(&format),
        None | Some("string") => {
            let normalized = format.replace('-', "");
            KNOWN_STRING_FORMATS
                .iter()
                .any(|known| known.replace('-', "") == normalized)
        }
        Some(_) => false,
    }
}

/// A schemars transform (`#[schemars(transform = ...)]`) that removes every format the API
/// server does not know from a schema and all its subschemas. An integer format it drops
/// leaves its range behind (`uint32` → `minimum: 0`, `maximum: 4294967295`), tightening
/// nothing a narrower bound already says.
pub fn known_formats_only(schema: &mut schemars::Schema) {
    if let Some(object) = schema.as_object_mut() {
        strip_unknown_formats(object);
    }
}

fn strip_unknown_formats(object: &mut Map<String, Value>) {
    let type_ = schema_type(object);
    let unknown = object
        .get("format")
        .and_then(Value::as_str)
        .filter(|format| !is_known_format(type_.as_deref(), format))
        .map(str::to_owned);
    if let Some(format) = unknown {
        object.remove("format");
        if let Some((min, max)) = integer_range(&format) {
            tighten(object, "minimum", min, |new, old| new > old);
            tighten(object, "maximum", max, |new, old| new < old);
        }
    }
    for value in object.values_mut() {
        match value {
            Value::Object(child) => strip_unknown_formats(child),
            Value::Array(items) => {
                for item in items.iter_mut().filter_map(Value::as_object_mut) {
                    strip_unknown_formats(item);
                }
            }
            _ => {}
        }
    }
}

/// The schema's type; an `Option` field is `["integer", "null"]` until kube turns it into
/// `nullable: true`.
fn schema_type(object: &Map<String, Value>) -> Option<String> {
    match object.get("type")? {
        Value::String(type_) => Some(type_.clone()),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .map(str::to_owned),
        _ => None,
    }
}

/// The range an integer format stands for (only those that fit an `int64` field).
fn integer_range(format: &str) -> Option<(i64, i64)> {
    Some(match format {
        "int8" => (i8::MIN.into(), i8::MAX.into()),
        "int16" => (i16::MIN.into(), i16::MAX.into()),
        "uint8" => (0, u8::MAX.into()),
        "uint16" => (0, u16::MAX.into()),
        "uint32" => (0, u32::MAX.into()),
        "uint64" | "uint" => (0, i64::MAX),
        _ => return None,
    })
}

/// Sets `key` to `bound` unless the schema already has a bound at least as tight.
fn tighten(
    object: &mut Map<String, Value>,
    key: &str,
    bound: i64,
    tighter: impl Fn(f64, f64) -> bool,
) {
    let existing = object.get(key).and_then(Value::as_f64);
    // i64 → f64 only to compare with a JSON bound; the value written stays an integer.
    #[allow(clippy::cast_precision_loss)]
    let keep_existing = existing.is_some_and(|old| !tighter(bound as f64, old));
    if !keep_existing {
        object.insert(key.to_owned(), Value::from(bound));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_integer_formats_become_bounds_and_known_ones_stay() {
        let mut schema = schemars::json_schema!({
            "type": "object",
            "properties": {
                "shard": { "type": "integer", "format": "uint32", "minimum": 0.0 },
                "index": { "type": "integer", "format": "uint32", "maximum": 9999 },
                "count": { "type": "integer", "format": "int64" },
                "optional": { "type": ["integer", "null"], "format": "int64" },
                "optionalShard": { "type": ["integer", "null"], "format": "uint32" },
                "when": { "type": "string", "format": "date-time" },
                "items": { "type": "array", "items": { "type": "integer", "format": "uint16" } },
                "odd": { "type": "string", "format": "semver" },
            }
        });
        known_formats_only(&mut schema);
        let p = |name: &str| schema.pointer(&format!("/properties/{name}")).unwrap();
        assert_eq!(
            p("shard"),
            &serde_json::json!({ "type": "integer", "minimum": 0.0, "maximum": 4_294_967_295_u32 })
        );
        assert_eq!(
            p("index"),
            &serde_json::json!({ "type": "integer", "minimum": 0, "maximum": 9999 })
        );
        assert_eq!(p("count")["format"], "int64");
        assert_eq!(p("optional")["format"], "int64");
        assert!(p("optionalShard").get("format").is_none());
        assert_eq!(p("when")["format"], "date-time");
        assert_eq!(
            p("items")["items"],
            serde_json::json!({ "type": "integer", "minimum": 0, "maximum": 65535 })
        );
        assert!(p("odd").get("format").is_none());
    }
}
