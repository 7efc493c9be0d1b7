//! The four PATCH content types: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
//! strategic merge patch for built-in types, and server-side apply (in [`super::fields`]).
//!
//! Strategic merge follows the Kubernetes patch strategies of the built-in types Spate and
//! kubectl touch: lists of containers, env, volumes, conditions, owner references... merge by
//! their merge key, `finalizers` merge as a set, other lists are replaced. The directives
//! kubectl's client-side apply sends (`$patch`, `$retainKeys`, `$setElementOrder/...`,
//! `$deleteFromPrimitiveList/...`) are honoured or, for ordering hints, accepted and dropped.

use serde_json::{Map, Value};

use super::error::ApiError;

/// The PATCH flavours, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml`.
    Apply,
}

impl PatchType {
    /// Maps a `Content-Type` (parameters ignored) to a patch type.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// Applies an RFC 7386 merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Applies an RFC 6902 JSON patch given as raw JSON.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let operations: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(target, &operations).map_err(|e| {
        ApiError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: {e}"),
        )
    })
}

/// The merge key of a list field, by field name, for the built-in types.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "volumeMounts"
        | "volumeDevices"
        | "imagePullSecrets"
        | "resourceClaims" => Some("name"),
        "ports" => Some("containerPort"),
        "conditions" | "addresses" => Some("type"),
        "ownerReferences" => Some("uid"),
        "hostAliases" => Some("ip"),
        "topologySpreadConstraints" => Some("topologyKey"),
        _ => None,
    }
}

/// Lists of scalars that merge as sets rather than being replaced.
fn merges_as_set(field: &str) -> bool {
    field == "finalizers"
}

fn is_directive(key: &str) -> bool {
    key.starts_with('$')
}

/// Removes patch directives from a value that is being inserted as-is.
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !is_directive(k))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn patch_directive(value: &Value) -> Option<&str> {
    value.get("$patch").and_then(Value::as_str)
}

/// Applies a strategic merge patch to a built-in object.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if patch_directive(patch) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_map) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            delete_from_primitive_list(target_map, field, value);
            continue;
        }
        if is_directive(key) {
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) if patch_directive(value) == Some("delete") => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                let entry = target_map.entry(key.clone()).or_insert(Value::Null);
                strategic_merge(entry, value);
            }
            Value::Array(items) => {
                let entry = target_map.entry(key.clone()).or_insert(Value::Null);
                merge_list(key, entry, items);
            }
            scalar => {
                target_map.insert(key.clone(), scalar.clone());
            }
        }
    }
    if let Some(retain) = patch_map.get("$retainKeys").and_then(Value::as_array) {
        let retain: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        target_map.retain(|k, _| retain.contains(&k.as_str()));
    }
}

fn delete_from_primitive_list(target: &mut Map<String, Value>, field: &str, values: &Value) {
    let Some(values) = values.as_array() else {
        return;
    };
    if let Some(list) = target.get_mut(field).and_then(Value::as_array_mut) {
        list.retain(|v| !values.contains(v));
    }
}

fn merge_list(field: &str, target: &mut Value, items: &[Value]) {
    if items.iter().any(|i| patch_directive(i) == Some("replace")) {
        let kept: Vec<Value> = items
            .iter()
            .filter(|i| patch_directive(i) != Some("replace"))
            .map(strip_directives)
            .collect();
        *target = Value::Array(kept);
        return;
    }
    let mut list = target.as_array().cloned().unwrap_or_default();
    match merge_key(field) {
        Some(key) if items.iter().all(Value::is_object) => {
            for item in items {
                let Some(id) = item.get(key) else {
                    list.push(strip_directives(item));
                    continue;
                };
                let position = list.iter().position(|e| e.get(key) == Some(id));
                match (position, patch_directive(item)) {
                    (Some(i), Some("delete")) => {
                        list.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => strategic_merge(&mut list[i], item),
                    (None, _) => list.push(strip_directives(item)),
                }
            }
            *target = Value::Array(list);
        }
        _ if merges_as_set(field) => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
            *target = Value::Array(list);
        }
        _ => *target = Value::Array(items.iter().map(strip_directives).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types_select_patch_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchType::Merge
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml").unwrap(),
            PatchType::Apply
        );
        assert_eq!(
            PatchType::from_content_type("text/plain").unwrap_err().code,
            415
        );
    }

    #[test]
    fn merge_patch_removes_nulls() {
        let mut doc = json!({"data": {"a": "1", "b": "2"}});
        merge_patch(&mut doc, &json!({"data": {"a": null, "c": "3"}}));
        assert_eq!(doc, json!({"data": {"b": "2", "c": "3"}}));
    }

    #[test]
    fn json_patch_applies_operations_and_reports_failed_tests() {
        let mut doc = json!({"spec": {"n": 1}});
        json_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/spec/n", "value": 2}]),
        )
        .unwrap();
        assert_eq!(doc["spec"]["n"], 2);
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/spec/n", "value": 1}]),
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            json_patch(&mut doc, &json!({"op": "x"})).unwrap_err().code,
            400
        );
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_env_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}});
        strategic_merge(
            &mut pod,
            &json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
                {"name": "b", "$patch": "delete"},
                {"name": "c", "image": "c:1"}
            ]}}),
        );
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "c", "image": "c:1"}
            ]}})
        );
    }

    #[test]
    fn strategic_merge_honours_kubectl_apply_directives() {
        let mut cm = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}},
                            "spec": {"args": ["1", "2"], "strategy": {"type": "A", "extra": 1}}});
        strategic_merge(
            &mut cm,
            &json!({
                "$setElementOrder/finalizers": ["a", "b"],
                "metadata": {"finalizers": ["b"], "labels": {"y": null}},
                "spec": {"args": ["3"], "strategy": {"$retainKeys": ["type"], "type": "B"}}
            }),
        );
        assert_eq!(
            cm,
            json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1"}},
                              "spec": {"args": ["3"], "strategy": {"type": "B"}}})
        );
        strategic_merge(
            &mut cm,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(cm["metadata"]["finalizers"], json!(["b"]));
        strategic_merge(
            &mut cm,
            &json!({"spec": {"$patch": "replace", "only": true}}),
        );
        assert_eq!(cm["spec"], json!({"only": true}));
    }
}
