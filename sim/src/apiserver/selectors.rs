//! Label and field selectors, parsed from list and watch query parameters.

use std::collections::BTreeSet;

use serde_json::Value;

use super::error::ApiError;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas that are not inside a `( ... )` value set.
fn split_top_level(input: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&input[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn value_set(raw: &str, selector: &str) -> Result<BTreeSet<String>, ApiError> {
    let inner = raw
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: found '{raw}', expected: '(' in {selector:?}"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

fn label_key(key: &str, selector: &str) -> Result<String, ApiError> {
    let key = key.trim();
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label key {key:?} in {selector:?}"
        )))
    }
}

impl LabelSelector {
    /// Parses the Kubernetes selector syntax (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`).
    pub fn parse(selector: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in split_top_level(selector) {
            requirements.push(Self::requirement(part, selector)?);
        }
        Ok(Self(requirements))
    }

    fn requirement(part: &str, selector: &str) -> Result<LabelRequirement, ApiError> {
        if let Some(key) = part.strip_prefix('!') {
            return Ok(LabelRequirement::DoesNotExist(label_key(key, selector)?));
        }
        if let Some((key, value)) = part.split_once("!=") {
            return Ok(LabelRequirement::NotEquals(
                label_key(key, selector)?,
                value.trim().to_owned(),
            ));
        }
        if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            return Ok(LabelRequirement::Equals(
                label_key(key, selector)?,
                value.trim().to_owned(),
            ));
        }
        if let Some((key, rest)) = part.split_once(" notin ") {
            return Ok(LabelRequirement::NotIn(
                label_key(key, selector)?,
                value_set(rest, selector)?,
            ));
        }
        if let Some((key, rest)) = part.split_once(" in ") {
            return Ok(LabelRequirement::In(
                label_key(key, selector)?,
                value_set(rest, selector)?,
            ));
        }
        Ok(LabelRequirement::Exists(label_key(part, selector)?))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, set) => label(k).is_some_and(|l| set.contains(l)),
            LabelRequirement::NotIn(k, set) => label(k).is_none_or(|l| !set.contains(l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: equality and inequality on dotted field paths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `a=b,c==d,e!=f`.
    pub fn parse(selector: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{selector}'; can't understand '{part}'"
                )));
            };
            terms.push((field.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    /// Whether every term holds; a missing field reads as the empty string, as for
    /// `spec.nodeName=` selecting unscheduled pods.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field_value(object, field);
            (actual == *value) == *equal
        })
    }
}

fn field_value(object: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Label and field selectors together, plus the namespace a request is scoped to.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Namespace scope, `None` for cluster-wide.
    pub namespace: Option<String>,
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Selection {
    /// `true` when nothing is filtered out.
    pub fn is_everything(&self) -> bool {
        self.namespace.is_none() && self.labels.0.is_empty() && self.fields.0.is_empty()
    }

    /// Whether the object is within scope and matches both selectors.
    pub fn matches(&self, object: &Value) -> bool {
        let in_namespace = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: Option<&str>) -> Value {
        let mut p = json!({"metadata": {"name": "p", "namespace": "a", "labels": labels}, "status": {"phase": "Running"}});
        if let Some(node) = node {
            p["spec"] = json!({"nodeName": node});
        }
        p
    }

    #[test]
    fn label_selector_supports_every_operator() {
        let p = pod(json!({"app": "web", "tier": "front"}), None);
        for (selector, expected) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web,api)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing!=x", true),
            ("app in (api),tier", false),
            ("app=web,tier=front", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(selector).unwrap().matches(&p),
                expected,
                "{selector}"
            );
        }
    }

    #[test]
    fn malformed_label_selector_is_a_bad_request() {
        let err = LabelSelector::parse("app in web").unwrap_err();
        assert_eq!(err.code, 400);
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selector_treats_missing_fields_as_empty() {
        let unscheduled = pod(json!({}), None);
        let bound = pod(json!({}), Some("n1"));
        let sel = FieldSelector::parse("spec.nodeName=").unwrap();
        assert!(sel.matches(&unscheduled) && !sel.matches(&bound));
        let sel = FieldSelector::parse("spec.nodeName!=,status.phase==Running").unwrap();
        assert!(sel.matches(&bound) && !sel.matches(&unscheduled));
        assert!(
            FieldSelector::parse("metadata.name=p,metadata.namespace=a")
                .unwrap()
                .matches(&bound)
        );
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
