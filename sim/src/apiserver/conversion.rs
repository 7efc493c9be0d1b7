//! Conversion between the stored form of an object and the version a client asked for.
//!
//! Most resources are stored as served and only need their `apiVersion` relabelled (custom
//! resources served at several versions, like CRDs with `strategy: None`). Events are the
//! exception that matters: `events.k8s.io/v1` and core `v1` Events are one resource in two
//! shapes, stored once (in the core shape) so that `kubectl get events` and
//! `kubectl describe` show what clients such as kube's event recorder wrote through
//! `events.k8s.io/v1`, and the other way round.

use std::borrow::Cow;

use serde_json::{Map, Value, json};

use super::registry::ResourceInfo;

/// `events.k8s.io/v1` field ↔ core `v1` field.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn is_new_event(info: &ResourceInfo) -> bool {
    info.group == "events.k8s.io" && info.kind == "Event"
}

fn rename(map: &mut Map<String, Value>, to_core: bool) {
    for (new, core) in EVENT_RENAMES {
        let (from, to) = if to_core { (new, core) } else { (core, new) };
        if let Some(value) = map.remove(*from) {
            map.insert((*to).to_owned(), value);
        }
    }
}

/// Converts an object written through `info` into its stored form.
pub fn to_storage(info: &ResourceInfo, mut object: Value) -> Value {
    if !is_new_event(info) {
        return object;
    }
    if let Some(map) = object.as_object_mut() {
        rename(map, true);
        // Old readers find the reporter in `source`, as the real conversion fills it.
        if !map.contains_key("source") {
            let component = map
                .get("reportingComponent")
                .cloned()
                .unwrap_or(Value::Null);
            let host = map.get("reportingInstance").cloned().unwrap_or(Value::Null);
            map.insert(
                "source".into(),
                json!({"component": component, "host": host}),
            );
        }
        map.insert("apiVersion".into(), json!("v1"));
    }
    object
}

/// The stored object as served at `api_version` through `info`; borrowed when nothing changes.
pub fn present<'a>(info: &ResourceInfo, api_version: &str, object: &'a Value) -> Cow<'a, Value> {
    let same_version = object.get("apiVersion").and_then(Value::as_str) == Some(api_version);
    if same_version && !is_new_event(info) {
        return Cow::Borrowed(object);
    }
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        if is_new_event(info) {
            rename(map, false);
            let source = map.get("deprecatedSource").cloned().unwrap_or(Value::Null);
            if !map.contains_key("reportingController")
                && let Some(component) = source.get("component")
            {
                map.insert("reportingController".into(), component.clone());
            }
        }
        map.insert("apiVersion".into(), json!(api_version));
    }
    Cow::Owned(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::registry::Registry;

    #[test]
    fn events_round_trip_between_the_two_apis() {
        let registry = Registry::with_builtins();
        let new_events = registry.lookup("events.k8s.io", "v1", "events").unwrap();
        let written = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "pulled", "reason": "Pulled",
            "reportingController": "spate", "reportingInstance": "spate-0", "type": "Normal"});
        let stored = to_storage(&new_events, written.clone());
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(stored["involvedObject"]["name"], "p");
        assert_eq!(stored["message"], "pulled");
        assert_eq!(stored["source"]["component"], "spate");
        let core = registry.lookup("", "v1", "events").unwrap();
        assert!(matches!(present(&core, "v1", &stored), Cow::Borrowed(_)));
        let back = present(&new_events, "events.k8s.io/v1", &stored).into_owned();
        for field in [
            "regarding",
            "note",
            "reason",
            "reportingController",
            "reportingInstance",
            "type",
        ] {
            assert_eq!(back[field], written[field], "{field}");
        }
        assert_eq!(back["deprecatedSource"]["component"], "spate");
    }
}
