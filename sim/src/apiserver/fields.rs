//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Ownership is tracked per manager as a set of leaf field paths, stored in the real
//! `FieldsV1` shape so kubectl and kube read it back. Maps are merged field by field; lists
//! are owned as a whole (the simulator does not implement associative lists), which is
//! coarser than a real server but never silently drops another manager's field.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::error::{ApiError, Cause};

type FieldPath = Vec<String>;

/// Metadata fields owned by the server, never by a manager.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// One manager's ownership record.
#[derive(Debug, Clone, PartialEq)]
struct ManagedEntry {
    manager: String,
    operation: String,
    subresource: String,
    api_version: String,
    time: String,
    fields: BTreeSet<FieldPath>,
}

impl ManagedEntry {
    fn to_json(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": encode_fields(&self.fields),
        });
        if !self.subresource.is_empty() {
            entry["subresource"] = json!(self.subresource);
        }
        entry
    }

    fn is_apply_by(&self, manager: &str) -> bool {
        self.manager == manager && self.operation == "Apply"
    }
}

fn leaf_paths(value: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                if prefix.is_empty() && (key == "apiVersion" || key == "kind") {
                    continue;
                }
                if prefix.len() == 1
                    && prefix[0] == "metadata"
                    && SYSTEM_METADATA.contains(&key.as_str())
                {
                    continue;
                }
                prefix.push(key.clone());
                leaf_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.clone());
        }
        _ => {}
    }
}

fn paths_of(value: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    leaf_paths(value, &mut Vec::new(), &mut out);
    out
}

fn encode_fields(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for segment in path {
            let entry = node
                .entry(format!("f:{segment}"))
                .or_insert_with(|| json!({}));
            let Some(next) = entry.as_object_mut() else {
                break;
            };
            node = next;
        }
    }
    Value::Object(root)
}

fn decode_fields(value: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Some(map) = value.as_object() else { return };
    let children: Vec<(&String, &Value)> =
        map.iter().filter(|(k, _)| k.starts_with("f:")).collect();
    if (children.is_empty() || map.contains_key(".")) && !prefix.is_empty() {
        out.insert(prefix.clone());
    }
    for (key, child) in children {
        prefix.push(key[2..].to_owned());
        decode_fields(child, prefix, out);
        prefix.pop();
    }
}

fn read_entries(object: Option<&Value>) -> Vec<ManagedEntry> {
    let Some(entries) = object
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let text = |e: &Value, k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    entries
        .iter()
        .map(|e| {
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                decode_fields(f, &mut Vec::new(), &mut fields);
            }
            ManagedEntry {
                manager: text(e, "manager"),
                operation: text(e, "operation"),
                subresource: text(e, "subresource"),
                api_version: text(e, "apiVersion"),
                time: text(e, "time"),
                fields,
            }
        })
        .collect()
}

fn write_entries(object: &mut Value, entries: Vec<ManagedEntry>) {
    let entries: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(ManagedEntry::to_json)
        .collect();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

fn overlaps(a: &FieldPath, b: &FieldPath) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn value_at<'a>(object: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, segment| v.get(segment))
}

fn remove_path(object: &mut Value, path: &FieldPath) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let parent = parents
        .iter()
        .try_fold(&mut *object, |v, segment| v.get_mut(segment));
    if let Some(map) = parent.and_then(Value::as_object_mut) {
        map.remove(last);
    }
}

/// Merges maps recursively; lists and scalars in `applied` replace what is there.
fn deep_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (key, value) in applied {
                match target.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        deep_merge(existing, value)
                    }
                    _ => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

fn dotted(path: &FieldPath) -> String {
    format!(".{}", path.join("."))
}

/// Who is applying, for ownership records.
#[derive(Debug, Clone)]
pub struct Manager<'a> {
    /// `fieldManager`.
    pub name: &'a str,
    /// `apiVersion` of the request.
    pub api_version: &'a str,
    /// `status` for status writes, empty otherwise.
    pub subresource: &'a str,
    /// RFC 3339 time of the write.
    pub time: &'a str,
}

/// Server-side apply of `applied` onto `current` (`None` creates).
///
/// Fields the manager applied before and no longer applies are removed unless another
/// manager owns them; fields owned by another manager with a different value conflict
/// unless `force` transfers them.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    manager: &Manager<'_>,
    force: bool,
) -> Result<Value, ApiError> {
    let mut entries = read_entries(current);
    let applied_paths = paths_of(applied);
    let empty = json!({});
    let base = current.unwrap_or(&empty);
    let mut conflicts = Vec::new();
    for entry in entries.iter().filter(|e| !e.is_apply_by(manager.name)) {
        for owned in &entry.fields {
            for path in applied_paths.iter().filter(|p| overlaps(p, owned)) {
                let deeper = if path.len() >= owned.len() {
                    path
                } else {
                    owned
                };
                if value_at(base, deeper) != value_at(applied, deeper) {
                    conflicts.push((
                        entry.manager.clone(),
                        entry.api_version.clone(),
                        deeper.clone(),
                    ));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(conflicts));
    }
    for entry in entries.iter_mut().filter(|e| !e.is_apply_by(manager.name)) {
        entry
            .fields
            .retain(|owned| !applied_paths.iter().any(|p| overlaps(p, owned)));
    }
    let previously: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| e.is_apply_by(manager.name))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut result = base.clone();
    for dropped in previously.difference(&applied_paths) {
        let owned_by_other = entries
            .iter()
            .filter(|e| !e.is_apply_by(manager.name))
            .any(|e| e.fields.iter().any(|o| overlaps(o, dropped)));
        if !owned_by_other {
            remove_path(&mut result, dropped);
        }
    }
    deep_merge(&mut result, applied);
    entries.retain(|e| !e.is_apply_by(manager.name));
    entries.push(ManagedEntry {
        manager: manager.name.to_owned(),
        operation: "Apply".into(),
        subresource: manager.subresource.to_owned(),
        api_version: manager.api_version.to_owned(),
        time: manager.time.to_owned(),
        fields: applied_paths,
    });
    write_entries(&mut result, entries);
    Ok(result)
}

fn conflict_error(conflicts: Vec<(String, String, FieldPath)>) -> ApiError {
    let causes: Vec<Cause> = conflicts
        .iter()
        .map(|(manager, version, path)| Cause {
            reason: "FieldManagerConflict",
            field: dotted(path),
            message: format!("conflict with \"{manager}\" using {version}"),
        })
        .collect();
    let lines: Vec<String> = causes
        .iter()
        .map(|c| format!("- {}: {}", c.message, c.field))
        .collect();
    let plural = if causes.len() == 1 { "" } else { "s" };
    let mut err = ApiError::new(
        409,
        "Conflict",
        format!(
            "Apply failed with {} conflict{plural}: {}",
            causes.len(),
            lines.join("\n")
        ),
    );
    err.details.causes = causes;
    err
}

/// Records an ordinary write (create, update, non-apply patch): the manager takes ownership
/// of every field whose value it changed, without conflicts, as on a real server.
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &Manager<'_>) {
    let mut entries = read_entries(old);
    let empty = json!({});
    let old = old.unwrap_or(&empty);
    let changed: BTreeSet<FieldPath> = paths_of(new)
        .into_iter()
        .filter(|p| value_at(old, p) != value_at(new, p))
        .collect();
    let removed: Vec<FieldPath> = paths_of(old)
        .into_iter()
        .filter(|p| value_at(new, p).is_none())
        .collect();
    for entry in &mut entries {
        entry.fields.retain(|owned| {
            !changed.iter().any(|p| overlaps(p, owned))
                && !removed.iter().any(|p| overlaps(p, owned))
        });
    }
    if !changed.is_empty() {
        let position = entries.iter().position(|e| {
            e.manager == manager.name
                && e.operation == "Update"
                && e.subresource == manager.subresource
        });
        let entry = match position {
            Some(i) => &mut entries[i],
            None => {
                entries.push(ManagedEntry {
                    manager: manager.name.to_owned(),
                    operation: "Update".into(),
                    subresource: manager.subresource.to_owned(),
                    api_version: manager.api_version.to_owned(),
                    time: String::new(),
                    fields: BTreeSet::new(),
                });
                let last = entries.len() - 1;
                &mut entries[last]
            }
        };
        entry.time = manager.time.to_owned();
        entry.fields.extend(changed);
    }
    write_entries(new, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(name: &str) -> Manager<'_> {
        Manager {
            name,
            api_version: "v1",
            subresource: "",
            time: "2026-01-01T00:00:00Z",
        }
    }

    #[test]
    fn apply_creates_then_removes_fields_no_longer_applied() {
        let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}});
        let created = apply(None, &first, &manager("alice"), false).unwrap();
        assert_eq!(created["data"], json!({"a": "1", "b": "2"}));
        assert_eq!(
            created["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:data": {"f:a": {}, "f:b": {}}})
        );
        let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
        let updated = apply(Some(&created), &second, &manager("alice"), false).unwrap();
        assert_eq!(updated["data"], json!({"a": "1"}));
    }

    #[test]
    fn apply_conflicts_with_other_managers_unless_forced() {
        let mut object = json!({"metadata": {"name": "c"}, "data": {"a": "1"}});
        record_update(None, &mut object, &manager("kubectl-edit"));
        let applied = json!({"metadata": {"name": "c"}, "data": {"a": "2"}});
        let err = apply(Some(&object), &applied, &manager("spate"), false).unwrap_err();
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("conflict with \"kubectl-edit\""),
            "{}",
            err.message
        );
        assert_eq!(err.details.causes[0].field, ".data.a");
        let same_value = json!({"metadata": {"name": "c"}, "data": {"a": "1"}});
        assert!(apply(Some(&object), &same_value, &manager("spate"), false).is_ok());
        let forced = apply(Some(&object), &applied, &manager("spate"), true).unwrap();
        assert_eq!(forced["data"]["a"], "2");
        let owners: Vec<&str> = forced["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(owners, vec!["spate"]);
    }

    #[test]
    fn fields_round_trip_through_fields_v1() {
        let fields =
            paths_of(&json!({"metadata": {"labels": {"a": "b"}}, "spec": {"x": [1], "y": {}}}));
        let mut decoded = BTreeSet::new();
        decode_fields(&encode_fields(&fields), &mut Vec::new(), &mut decoded);
        assert_eq!(decoded, fields);
    }
}
