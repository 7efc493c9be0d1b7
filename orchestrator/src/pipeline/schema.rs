//! Checks a document against the Pipeline CRD's OpenAPI schema, reporting every violation.
//!
//! The schema is the one `spate crd` prints and the API server enforces, generated from the
//! Rust types; checking against it (rather than stopping at serde's first error) lets a file
//! with five mistakes show all five. It also catches unknown fields inside `jobTemplate`,
//! which `k8s-openapi`'s deserializers silently drop but a strict API server refuses.

use serde_json::Value;

use super::located::{join_index, join_key};

/// A schema violation at a field path.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

/// Checks `value` (found at `path`) against `schema`, appending what is wrong to `out`.
pub fn check(value: &Value, schema: &Value, path: &str, out: &mut Vec<Violation>) {
    let mut push = |message: String| {
        out.push(Violation {
            path: path.to_string(),
            message,
        })
    };
    if value.is_null() {
        if !schema_flag(schema, "nullable") {
            push(format!(
                "must not be null: expected {}",
                describe_type(schema)
            ));
        }
        return;
    }
    if schema_flag(schema, "x-kubernetes-int-or-string") {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            push(format!(
                "expected an integer or a string, got {}",
                describe_value(value)
            ));
        }
        return;
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => check_object(value, schema, path, out),
        Some("array") => check_array(value, schema, path, out),
        Some("string") => {
            if !value.is_string() {
                push(format!("expected a string, got {}", describe_value(value)));
            } else {
                check_enum(value, schema, &mut push);
            }
        }
        Some("integer") => {
            if !(value.is_i64() || value.is_u64()) {
                push(format!(
                    "expected an integer, got {}",
                    describe_value(value)
                ));
            } else {
                check_minimum(value, schema, &mut push);
            }
        }
        Some("number") => {
            if !value.is_number() {
                push(format!("expected a number, got {}", describe_value(value)));
            } else {
                check_minimum(value, schema, &mut push);
            }
        }
        Some("boolean") if !value.is_boolean() => {
            push(format!(
                "expected true or false, got {}",
                describe_value(value)
            ));
        }
        _ => {}
    }
}

fn check_object(value: &Value, schema: &Value, path: &str, out: &mut Vec<Violation>) {
    let Some(object) = value.as_object() else {
        out.push(Violation {
            path: path.to_string(),
            message: format!("expected a mapping, got {}", describe_value(value)),
        });
        return;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let preserve_unknown = schema_flag(schema, "x-kubernetes-preserve-unknown-fields");
    for (key, child) in object {
        let child_path = join_key(path, key);
        if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
            check(child, child_schema, &child_path, out);
        } else if let Some(additional_schema) = additional.filter(|a| a.is_object()) {
            check(child, additional_schema, &child_path, out);
        } else if !preserve_unknown
            && (properties.is_some() || additional == Some(&Value::Bool(false)))
        {
            let known: Vec<&str> = properties
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            out.push(Violation {
                path: child_path,
                message: unknown_field_message(key, &known),
            });
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if !object.contains_key(field) {
                out.push(Violation {
                    path: join_key(path, field),
                    message: format!("missing required field `{field}`"),
                });
            }
        }
    }
    check_one_of(object, schema, path, out);
}

/// Structural schemas express "exactly one of these keys" as `oneOf` branches that each
/// require one property: that is how the one-of-kinds fields (`source`, sinks) are derived.
fn check_one_of(
    object: &serde_json::Map<String, Value>,
    schema: &Value,
    path: &str,
    out: &mut Vec<Violation>,
) {
    let Some(branches) = schema.get("oneOf").and_then(Value::as_array) else {
        return;
    };
    let alternatives: Vec<&str> = branches
        .iter()
        .filter_map(|branch| branch.get("required")?.as_array()?.first()?.as_str())
        .collect();
    let present: Vec<&str> = alternatives
        .iter()
        .copied()
        .filter(|key| object.contains_key(*key))
        .collect();
    let message = match present.as_slice() {
        [_] => return,
        [] => format!("set exactly one of: {}", alternatives.join(", ")),
        several => format!(
            "set exactly one of: {} (found {})",
            alternatives.join(", "),
            several.join(" and ")
        ),
    };
    out.push(Violation {
        path: path.to_string(),
        message,
    });
}

fn check_array(value: &Value, schema: &Value, path: &str, out: &mut Vec<Violation>) {
    let Some(items) = value.as_array() else {
        out.push(Violation {
            path: path.to_string(),
            message: format!("expected a list, got {}", describe_value(value)),
        });
        return;
    };
    if let Some(item_schema) = schema.get("items") {
        for (index, item) in items.iter().enumerate() {
            check(item, item_schema, &join_index(path, index), out);
        }
    }
}

fn check_enum(value: &Value, schema: &Value, push: &mut impl FnMut(String)) {
    let Some(allowed) = schema.get("enum").and_then(Value::as_array) else {
        return;
    };
    if !allowed.contains(value) {
        let names: Vec<String> = allowed
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        let got = value.as_str().unwrap_or_default();
        let hint = closest(got, names.iter().map(String::as_str))
            .map(|name| format!(" (did you mean `{name}`?)"))
            .unwrap_or_default();
        push(format!(
            "must be one of: {}; got `{got}`{hint}",
            names.join(", ")
        ));
    }
}

fn check_minimum(value: &Value, schema: &Value, push: &mut impl FnMut(String)) {
    if let (Some(minimum), Some(number)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) && number < minimum
    {
        push(format!("must be at least {minimum}, got {value}"));
    }
}

fn schema_flag(schema: &Value, flag: &str) -> bool {
    schema.get(flag).and_then(Value::as_bool).unwrap_or(false)
}

fn describe_type(schema: &Value) -> String {
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => "a mapping".to_string(),
        Some("array") => "a list".to_string(),
        Some(other) => format!("a {other}"),
        None => "a value".to_string(),
    }
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", Value::String(s.clone())),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

fn unknown_field_message(key: &str, known: &[&str]) -> String {
    match closest(key, known.iter().copied()) {
        Some(suggestion) => format!("unknown field `{key}` (did you mean `{suggestion}`?)"),
        None if known.is_empty() => format!("unknown field `{key}`"),
        None => format!(
            "unknown field `{key}`; expected one of: {}",
            known.join(", ")
        ),
    }
}

/// The candidate a typo most likely meant, if any is close enough.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let lowered = word.to_ascii_lowercase();
    candidates
        .map(|candidate| {
            (
                edit_distance(&lowered, &candidate.to_ascii_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, candidate)| *distance <= (candidate.len() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn violations(value: Value, schema: Value) -> Vec<Violation> {
        let mut out = Vec::new();
        check(&value, &schema, "spec", &mut out);
        out
    }

    #[test]
    fn reports_every_violation_not_only_the_first() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "integer", "minimum": 1.0},
            "b": {"type": "string", "enum": ["perEvent", "indexed"]},
        }});
        let found = violations(json!({"b": "perevent", "c": 1}), schema);
        let paths: Vec<&str> = found.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths, ["spec.b", "spec.c", "spec.a"], "{found:?}");
        assert!(found[0].message.contains("did you mean `perEvent`"));
        assert!(found[2].message.contains("missing required field `a`"));
    }

    #[test]
    fn one_of_requires_exactly_one_key() {
        let schema = json!({"type": "object", "oneOf": [{"required": ["amqp"]}, {"required": ["nats"]}],
            "properties": {"amqp": {"type": "object"}, "nats": {"type": "object"}}});
        assert!(violations(json!({"amqp": {}}), schema.clone()).is_empty());
        let both = violations(json!({"amqp": {}, "nats": {}}), schema.clone());
        assert!(both[0].message.contains("found amqp and nats"), "{both:?}");
        let none = violations(json!({}), schema);
        assert!(none[0].message.contains("set exactly one of: amqp, nats"));
    }

    #[test]
    fn suggests_the_field_a_typo_meant() {
        assert_eq!(
            closest("batchSise", ["batchSize", "maxWait"].into_iter()),
            Some("batchSize")
        );
        assert_eq!(closest("zzz", ["batchSize"].into_iter()), None);
    }
}
