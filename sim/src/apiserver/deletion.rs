//! Deletion: options, finalizers, graceful pod termination, propagation policies, and the
//! cascades the API server itself performs (namespace contents, custom resources of a
//! deleted CRD, orphaning dependents).
//!
//! Background cascading is the garbage collector's job (a controller, as in a real
//! cluster); Foreground deletion only marks the owner with the `foregroundDeletion`
//! finalizer for that controller to finish.

use serde_json::{Value, json};

use super::ServerState;
use super::admission::{meta_str, now_rfc3339, rfc3339_in};
use super::error::ApiError;
use super::registry::ResourceInfo;
use super::routes::Query;
use super::store::{Change, ObjectKey, ResourceKey};

/// `propagationPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Delete now; dependents are collected afterwards.
    Background,
    /// Delete dependents first.
    Foreground,
    /// Leave dependents, removing their owner references.
    Orphan,
}

/// `DeleteOptions`, from the body or the query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeleteOptions {
    /// `propagationPolicy`, `None` for the resource's default.
    pub propagation: Option<Propagation>,
    /// `gracePeriodSeconds`.
    pub grace_period_seconds: Option<i64>,
    /// `preconditions.uid`.
    pub precondition_uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub precondition_resource_version: Option<String>,
    /// `dryRun: ["All"]` in the body (kubectl sends it there rather than in the query).
    pub dry_run: bool,
}

fn parse_propagation(value: &str) -> Result<Propagation, ApiError> {
    match value {
        "Background" => Ok(Propagation::Background),
        "Foreground" => Ok(Propagation::Foreground),
        "Orphan" => Ok(Propagation::Orphan),
        other => Err(ApiError::bad_request(format!(
            "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
        ))),
    }
}

impl DeleteOptions {
    /// Reads options from a `DeleteOptions` body, falling back to query parameters.
    pub fn parse(query: &Query, body: Option<&Value>) -> Result<Self, ApiError> {
        let body = body.cloned().unwrap_or_else(|| json!({}));
        let text = |key: &str| {
            body.get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| query.get(key).map(str::to_owned))
        };
        let mut propagation = text("propagationPolicy")
            .filter(|p| !p.is_empty())
            .map(|p| parse_propagation(&p))
            .transpose()?;
        let orphan = body
            .get("orphanDependents")
            .and_then(Value::as_bool)
            .or_else(|| query.get("orphanDependents").map(|v| v == "true"));
        if propagation.is_none() {
            propagation = orphan.map(|o| {
                if o {
                    Propagation::Orphan
                } else {
                    Propagation::Background
                }
            });
        }
        let grace_period_seconds = match body.get("gracePeriodSeconds").and_then(Value::as_i64) {
            Some(seconds) => Some(seconds),
            None => query.number("gracePeriodSeconds")?,
        };
        Ok(Self {
            propagation,
            grace_period_seconds,
            precondition_uid: body
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(str::to_owned),
            dry_run: body
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|modes| modes.iter().any(|m| m == "All")),
            precondition_resource_version: body
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// The effective policy: `batch/v1` Jobs still orphan by default, as on a real server.
    pub fn propagation_for(&self, info: &ResourceInfo) -> Propagation {
        self.propagation.unwrap_or(if info.group == "batch" {
            Propagation::Orphan
        } else {
            Propagation::Background
        })
    }
}

fn check_preconditions(
    info: &ResourceInfo,
    current: &Value,
    options: &DeleteOptions,
) -> Result<(), ApiError> {
    let name = meta_str(current, "name").unwrap_or_default();
    if let Some(uid) = &options.precondition_uid {
        let actual = meta_str(current, "uid").unwrap_or_default();
        if uid != actual {
            return Err(ApiError::conflict(
                info,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                ),
            ));
        }
    }
    if let Some(rv) = &options.precondition_resource_version {
        let actual = meta_str(current, "resourceVersion").unwrap_or_default();
        if rv != actual {
            return Err(ApiError::conflict(
                info,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"
                ),
            ));
        }
    }
    Ok(())
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A pod on a node that has not finished gets time to stop: its node deletes it for good.
fn needs_graceful_termination(info: &ResourceInfo, pod: &Value) -> bool {
    let bound = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    info.group.is_empty()
        && info.kind == "Pod"
        && bound
        && phase != "Succeeded"
        && phase != "Failed"
}

/// Decides what a DELETE does to `current`.
pub fn decide(
    info: &ResourceInfo,
    current: &Value,
    options: &DeleteOptions,
) -> Result<Change, ApiError> {
    check_preconditions(info, current, options)?;
    let terminating = current.pointer("/metadata/deletionTimestamp").is_some();
    let mut object = current.clone();
    if needs_graceful_termination(info, current) && options.grace_period_seconds != Some(0) {
        if terminating {
            return Ok(Change::Unchanged);
        }
        let grace = options
            .grace_period_seconds
            .or_else(|| {
                current
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(1);
        object["metadata"]["deletionTimestamp"] = json!(rfc3339_in(grace));
        object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        return Ok(Change::Put(object));
    }
    let mut pending = finalizers(current);
    if options.propagation_for(info) == Propagation::Foreground
        && !terminating
        && !pending.iter().any(|f| f == "foregroundDeletion")
    {
        pending.push("foregroundDeletion".to_owned());
        object["metadata"]["finalizers"] = json!(pending);
    }
    if pending.is_empty() {
        return Ok(Change::Delete);
    }
    if terminating && object == *current {
        return Ok(Change::Unchanged);
    }
    if !terminating {
        object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    }
    object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    Ok(Change::Put(object))
}

/// Removes owner references to `owner_uid` from every object: what the orphan finalizer
/// achieves on a real cluster.
pub fn orphan_dependents(state: &ServerState, owner_uid: &str) {
    for resource in state.store.resources() {
        for object in state.store.scan(&resource, None) {
            let refers = object
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r.get("uid").and_then(Value::as_str) == Some(owner_uid))
                });
            if refers {
                strip_owner(state, &resource, &object, owner_uid);
            }
        }
    }
}

fn strip_owner(state: &ServerState, resource: &ResourceKey, object: &Value, owner_uid: &str) {
    let key = ObjectKey::new(
        meta_str(object, "namespace").unwrap_or(""),
        meta_str(object, "name").unwrap_or(""),
    );
    let _ = state.store.mutate::<()>(resource, &key, |current| {
        let Some(current) = current else {
            return Ok(Change::Unchanged);
        };
        let mut updated = (**current).clone();
        if let Some(refs) = updated
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            if refs.is_empty()
                && let Some(meta) = updated.get_mut("metadata").and_then(Value::as_object_mut)
            {
                meta.remove("ownerReferences");
            }
        }
        Ok(Change::Put(updated))
    });
}

/// Deletes every object of `resource` in `namespace` (all namespaces for `None`).
pub fn purge(state: &ServerState, resource: &ResourceKey, namespace: Option<&str>) {
    for object in state.store.scan(resource, namespace) {
        let key = ObjectKey::new(
            meta_str(&object, "namespace").unwrap_or(""),
            meta_str(&object, "name").unwrap_or(""),
        );
        let _ = state
            .store
            .mutate::<()>(resource, &key, |_| Ok(Change::Delete));
    }
}

/// What the server itself must do once an object is really gone.
pub fn after_delete(
    state: &ServerState,
    info: &ResourceInfo,
    deleted: &Value,
    options: &DeleteOptions,
) {
    if options.propagation_for(info) == Propagation::Orphan
        && let Some(uid) = meta_str(deleted, "uid")
    {
        orphan_dependents(state, uid);
    }
    match (info.group.as_str(), info.kind.as_str()) {
        ("", "Namespace") => {
            let Some(namespace) = meta_str(deleted, "name") else {
                return;
            };
            for namespaced in state.registry.all().iter().filter(|i| i.namespaced) {
                purge(
                    state,
                    &(namespaced.group.clone(), namespaced.plural.clone()),
                    Some(namespace),
                );
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            let group = deleted
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let plural = deleted
                .pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or_default();
            state.registry.remove(group, plural);
            purge(state, &(group.to_owned(), plural.to_owned()), None);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::registry::Registry;

    fn info(group: &str, plural: &str) -> ResourceInfo {
        (*Registry::with_builtins()
            .lookup(group, "v1", plural)
            .unwrap())
        .clone()
    }

    #[test]
    fn running_bound_pods_terminate_gracefully_unless_grace_is_zero() {
        let pods = info("", "pods");
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n", "terminationGracePeriodSeconds": 10}, "status": {"phase": "Running"}});
        let Change::Put(marked) = decide(&pods, &pod, &DeleteOptions::default()).unwrap() else {
            panic!("expected a graceful mark")
        };
        assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 10);
        assert!(matches!(
            decide(&pods, &marked, &DeleteOptions::default()).unwrap(),
            Change::Unchanged
        ));
        let now = DeleteOptions {
            grace_period_seconds: Some(0),
            ..DeleteOptions::default()
        };
        assert!(matches!(
            decide(&pods, &marked, &now).unwrap(),
            Change::Delete
        ));
        let unbound =
            json!({"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}});
        assert!(matches!(
            decide(&pods, &unbound, &DeleteOptions::default()).unwrap(),
            Change::Delete
        ));
    }

    #[test]
    fn finalizers_and_foreground_deletion_only_mark_the_object() {
        let cms = info("", "configmaps");
        let cm = json!({"metadata": {"name": "c", "finalizers": ["x"]}});
        let Change::Put(marked) = decide(&cms, &cm, &DeleteOptions::default()).unwrap() else {
            panic!()
        };
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        let plain = json!({"metadata": {"name": "c", "uid": "u"}});
        let foreground = DeleteOptions {
            propagation: Some(Propagation::Foreground),
            ..DeleteOptions::default()
        };
        let Change::Put(marked) = decide(&cms, &plain, &foreground).unwrap() else {
            panic!()
        };
        assert_eq!(
            marked["metadata"]["finalizers"],
            json!(["foregroundDeletion"])
        );
        let wrong_uid = DeleteOptions {
            precondition_uid: Some("other".into()),
            ..DeleteOptions::default()
        };
        assert_eq!(decide(&cms, &plain, &wrong_uid).unwrap_err().code, 409);
    }

    #[test]
    fn jobs_orphan_by_default() {
        let options = DeleteOptions::parse(&Query::default(), None).unwrap();
        assert_eq!(
            options.propagation_for(&info("batch", "jobs")),
            Propagation::Orphan
        );
        assert_eq!(
            options.propagation_for(&info("", "pods")),
            Propagation::Background
        );
        let body = json!({"kind": "DeleteOptions", "propagationPolicy": "Foreground", "gracePeriodSeconds": 0});
        let parsed = DeleteOptions::parse(&Query::default(), Some(&body)).unwrap();
        assert_eq!(
            (parsed.propagation, parsed.grace_period_seconds),
            (Some(Propagation::Foreground), Some(0))
        );
    }
}
