//! What the API server does to an object before storing it: name validation, system
//! metadata, defaulting and validation of the built-in types Spate relies on (Jobs, Pods,
//! Namespaces, CRDs), and strict field validation.

use rand::Rng;
use serde_json::{Map, Value, json};

use super::error::{ApiError, Cause};
use super::registry::ResourceInfo;

/// The alphabet Kubernetes uses for `generateName` suffixes (no vowels, no look-alikes).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Now, as RFC 3339 with second precision (`metav1.Time`).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

/// `now + seconds`, as RFC 3339.
pub fn rfc3339_in(seconds: i64) -> String {
    let now = jiff::Timestamp::now();
    let later = now
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .unwrap_or(now);
    later.round(jiff::Unit::Second).unwrap_or(later).to_string()
}

/// A random `generateName` suffix.
pub fn name_suffix() -> String {
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(SUFFIX_ALPHABET[rng.random_range(0..SUFFIX_ALPHABET.len())]))
        .collect()
}

fn dns_label_ok(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Validates a name as a DNS-1123 subdomain (or label, for namespaces).
pub fn validate_name(name: &str, label_only: bool) -> Result<(), Cause> {
    if label_only {
        if dns_label_ok(name) {
            return Ok(());
        }
        return Err(Cause::invalid(
            "metadata.name",
            name,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        ));
    }
    if name.len() <= 253 && name.split('.').all(dns_label_ok) {
        return Ok(());
    }
    Err(Cause::invalid(
        "metadata.name",
        name,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    ))
}

/// Mutable access to `object.metadata`, created if missing.
pub fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

/// A string field of `metadata`.
pub fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// Rejects bodies whose well-known fields have the wrong JSON type, as the real server's
/// decoder does, so later processing can rely on `metadata`, `spec` and `status` being maps.
pub fn check_shape(object: &Value) -> Result<(), ApiError> {
    let map = object
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    for field in ["metadata", "spec", "status"] {
        if map
            .get(field)
            .is_some_and(|v| !v.is_object() && !v.is_null())
        {
            return Err(ApiError::bad_request(format!(
                "json: cannot unmarshal {field} into an object"
            )));
        }
    }
    let meta = map.get("metadata");
    for field in ["labels", "annotations"] {
        let strings = meta.and_then(|m| m.get(field)).is_none_or(|v| {
            v.is_null()
                || v.as_object()
                    .is_some_and(|m| m.values().all(Value::is_string))
        });
        if !strings {
            return Err(ApiError::bad_request(format!(
                "json: cannot unmarshal metadata.{field} into map[string]string"
            )));
        }
    }
    let finalizers = meta.and_then(|m| m.get("finalizers")).is_none_or(|v| {
        v.is_null() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
    });
    if finalizers {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "json: cannot unmarshal metadata.finalizers into []string",
        ))
    }
}

/// Top-level fields each built-in kind accepts, for `fieldValidation=Strict`.
fn known_top_level(kind: &str) -> &'static [&'static str] {
    match kind {
        "ConfigMap" => &["data", "binaryData", "immutable"],
        "Secret" => &["data", "stringData", "type", "immutable"],
        "ServiceAccount" => &[
            "secrets",
            "imagePullSecrets",
            "automountServiceAccountToken",
        ],
        "Role" | "ClusterRole" => &["rules", "aggregationRule"],
        "RoleBinding" | "ClusterRoleBinding" => &["subjects", "roleRef"],
        "Event" => &[
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
            "regarding",
            "note",
            "reportingController",
            "deprecatedSource",
            "deprecatedFirstTimestamp",
            "deprecatedLastTimestamp",
            "deprecatedCount",
        ],
        _ => &["spec", "status"],
    }
}

/// `fieldValidation=Strict`: unknown top-level fields of built-in kinds are rejected.
pub fn check_strict_fields(info: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
    if !info.builtin {
        return Ok(());
    }
    let Some(map) = object.as_object() else {
        return Ok(());
    };
    let allowed = known_top_level(&info.kind);
    let unknown: Vec<String> = map
        .keys()
        .filter(|k| {
            !["apiVersion", "kind", "metadata"].contains(&k.as_str())
                && !allowed.contains(&k.as_str())
        })
        .map(|k| format!("unknown field \"{k}\""))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            unknown.join(", ")
        )))
    }
}

/// The most bytes an object's annotations may take, keys and values together
/// (apimachinery's `TotalAnnotationSizeLimitB`). Client-side `kubectl apply` copies the whole
/// object into an annotation, so it is the first limit a large object (a CRD) meets.
pub const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;

/// Refuses annotations over [`TOTAL_ANNOTATION_SIZE_LIMIT`], on every kind, as the real
/// server's object-meta validation does on create and update.
fn check_annotation_size(info: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
    let total: usize = object
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|annotations| {
            annotations
                .iter()
                .map(|(key, value)| key.len() + value.as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    if total > TOTAL_ANNOTATION_SIZE_LIMIT {
        let name = meta_str(object, "name").unwrap_or_default().to_owned();
        let cause = Cause::too_long("metadata.annotations", TOTAL_ANNOTATION_SIZE_LIMIT);
        return Err(ApiError::invalid(info, &name, vec![cause]));
    }
    Ok(())
}

/// Applies the per-kind defaults and validation run on create.
pub fn admit_create(info: &ResourceInfo, object: &mut Value, uid: &str) -> Result<(), ApiError> {
    check_annotation_size(info, object)?;
    match (info.group.as_str(), info.kind.as_str()) {
        ("batch", "Job") => default_job(info, object, uid),
        ("", "Pod") => {
            if let Some(spec) = object.get_mut("spec") {
                default_pod_spec(spec);
            }
            let qos = object.get("spec").map_or("BestEffort", qos_class);
            object["status"] = json!({"phase": "Pending", "qosClass": qos});
            Ok(())
        }
        ("", "Namespace") => {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
            let name = meta_str(object, "name").unwrap_or_default().to_owned();
            let labels = metadata_mut(object)?
                .entry("labels")
                .or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            Ok(())
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            crd_status(object);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Validation repeated on every update.
pub fn admit_update(info: &ResourceInfo, old: &Value, new: &mut Value) -> Result<(), ApiError> {
    check_annotation_size(info, new)?;
    match (info.group.as_str(), info.kind.as_str()) {
        ("batch", "Job") => {
            let name = meta_str(new, "name").unwrap_or_default().to_owned();
            if let Some(spec) = new.pointer_mut("/spec/template/spec") {
                default_pod_spec(spec);
            }
            let causes = job_immutable_changes(old, new);
            if !causes.is_empty() {
                return Err(ApiError::invalid(info, &name, causes));
            }
            validate_job_template(info, new, &name)
        }
        ("", "ConfigMap" | "Secret") => {
            let name = meta_str(new, "name").unwrap_or_default().to_owned();
            let causes = immutable_data_changes(old, new);
            if causes.is_empty() {
                Ok(())
            } else {
                Err(ApiError::invalid(info, &name, causes))
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            crd_status(new);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Job fields fixed after creation; the pod template may change only while suspended.
fn job_immutable_changes(old: &Value, new: &Value) -> Vec<Cause> {
    let suspended = old.pointer("/spec/suspend") == Some(&json!(true));
    let mut causes = Vec::new();
    for (field, always) in [
        ("selector", true),
        ("completionMode", true),
        ("template", false),
    ] {
        let pointer = format!("/spec/{field}");
        if (always || !suspended) && old.pointer(&pointer) != new.pointer(&pointer) {
            let value = new
                .pointer(&pointer)
                .map(Value::to_string)
                .unwrap_or_default();
            causes.push(Cause::invalid(
                &format!("spec.{field}"),
                &value,
                "field is immutable",
            ));
        }
    }
    causes
}

/// ConfigMaps and Secrets marked `immutable: true` keep their data and the mark.
fn immutable_data_changes(old: &Value, new: &Value) -> Vec<Cause> {
    if old.get("immutable") != Some(&json!(true)) {
        return Vec::new();
    }
    let mut causes = Vec::new();
    for field in ["data", "binaryData", "type"] {
        if old.get(field) != new.get(field) {
            causes.push(Cause {
                reason: "FieldValueForbidden",
                field: field.to_owned(),
                message: "Forbidden: field is immutable when `immutable` is set".to_owned(),
            });
        }
    }
    if new.get("immutable") != Some(&json!(true)) {
        causes.push(Cause {
            reason: "FieldValueForbidden",
            field: "immutable".to_owned(),
            message: "Forbidden: field is immutable when `immutable` is set".to_owned(),
        });
    }
    causes
}

fn crd_status(crd: &mut Value) {
    let names = crd
        .pointer("/spec/names")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let now = now_rfc3339();
    crd["status"] = json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    });
}

/// The pod's QoS class as the real API server computes it at creation: `BestEffort` without
/// any cpu or memory request or limit, `Guaranteed` when every container limits both and
/// requests what it limits (an absent request defaults to the limit), else `Burstable`.
/// Quantities compare as written, so `1` and `1000m` count as different.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|field| spec.get(*field).and_then(Value::as_array))
        .flatten()
        .collect();
    let quantity = |container: &Value, kind: &str, resource: &str| {
        container
            .pointer(&format!("/resources/{kind}/{resource}"))
            .and_then(Value::as_str)
            .filter(|q| !q.trim_start_matches(['0', '.']).is_empty())
            .map(str::to_owned)
    };
    let resources = ["cpu", "memory"];
    let any = containers.iter().any(|c| {
        resources
            .iter()
            .any(|r| quantity(c, "requests", r).is_some() || quantity(c, "limits", r).is_some())
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        resources.iter().all(|r| match quantity(c, "limits", r) {
            Some(limit) => quantity(c, "requests", r).is_none_or(|request| request == limit),
            None => false,
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Pod spec defaults the real API server fills in.
fn default_pod_spec(spec: &mut Value) {
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    let defaults = [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("serviceAccountName", json!("default")),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
    ];
    for (field, value) in defaults {
        spec.entry(field).or_insert(value);
    }
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for container in containers.iter_mut().filter_map(Value::as_object_mut) {
            container
                .entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            container
                .entry("terminationMessagePolicy")
                .or_insert(json!("File"));
            let pull = if container
                .get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| i.ends_with(":latest") || !i.contains(':'))
            {
                "Always"
            } else {
                "IfNotPresent"
            };
            container.entry("imagePullPolicy").or_insert(json!(pull));
            container.entry("resources").or_insert(json!({}));
        }
    }
}

fn default_job(info: &ResourceInfo, job: &mut Value, uid: &str) -> Result<(), ApiError> {
    let name = meta_str(job, "name").unwrap_or_default().to_owned();
    if !job.get("spec").is_some_and(Value::is_object) {
        return Err(ApiError::invalid(
            info,
            &name,
            vec![Cause::required("spec.template", "")],
        ));
    }
    // The template's restartPolicy is validated as given: the Always default would be invalid.
    let restart_policy_given = job.pointer("/spec/template/spec/restartPolicy").is_some();
    if !restart_policy_given {
        return Err(ApiError::invalid(
            info,
            &name,
            vec![Cause::required(
                "spec.template.spec.restartPolicy",
                "valid values: \"OnFailure\", \"Never\"",
            )],
        ));
    }
    let spec = &mut job["spec"];
    let manual = spec
        .get("manualSelector")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let parallelism_given = spec.get("parallelism").is_some();
    if spec.get("completions").is_none() && !parallelism_given {
        spec["completions"] = json!(1);
    }
    if !parallelism_given {
        spec["parallelism"] = json!(1);
    }
    for (field, value) in [
        ("backoffLimit", json!(6)),
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
        ("podReplacementPolicy", json!("TerminatingOrFailed")),
    ] {
        if spec.get(field).is_none() {
            spec[field] = value;
        }
    }
    if !manual {
        spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        let template_meta = spec.pointer_mut("/template").and_then(Value::as_object_mut);
        if let Some(template) = template_meta {
            let meta = template.entry("metadata").or_insert_with(|| json!({}));
            if !meta.is_object() {
                *meta = json!({});
            }
            let labels = meta
                .as_object_mut()
                .map(|m| m.entry("labels").or_insert_with(|| json!({})));
            if let Some(labels) = labels.and_then(Value::as_object_mut) {
                for key in ["batch.kubernetes.io/controller-uid", "controller-uid"] {
                    labels.insert(key.into(), json!(uid));
                }
                for key in ["batch.kubernetes.io/job-name", "job-name"] {
                    labels.insert(key.into(), json!(name));
                }
            }
        }
    } else if spec.get("selector").is_none() {
        return Err(ApiError::invalid(
            info,
            &name,
            vec![Cause::required("spec.selector", "")],
        ));
    }
    if let Some(pod_spec) = spec.pointer_mut("/template/spec") {
        default_pod_spec(pod_spec);
    }
    job["status"] = json!({});
    validate_job_template(info, job, &name)
}

fn validate_job_template(info: &ResourceInfo, job: &Value, name: &str) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    match job
        .pointer("/spec/template/spec/restartPolicy")
        .and_then(Value::as_str)
    {
        Some("Never" | "OnFailure") => {}
        other => causes.push(Cause::not_supported(
            "spec.template.spec.restartPolicy",
            other.unwrap_or(""),
            &["OnFailure", "Never"],
        )),
    }
    let containers = job
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        causes.push(Cause::required("spec.template.spec.containers", ""));
    }
    for field in ["parallelism", "completions", "backoffLimit"] {
        if job
            .pointer(&format!("/spec/{field}"))
            .and_then(Value::as_i64)
            .is_some_and(|n| n < 0)
        {
            causes.push(Cause::invalid(
                &format!("spec.{field}"),
                "",
                "must be greater than or equal to 0",
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(info, name, causes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::registry::Registry;

    fn jobs() -> ResourceInfo {
        (*Registry::with_builtins()
            .lookup("batch", "v1", "jobs")
            .unwrap())
        .clone()
    }

    #[test]
    fn annotations_may_total_256_kib_keys_included() {
        let configmaps = (*Registry::with_builtins()
            .lookup("", "v1", "configmaps")
            .unwrap())
        .clone();
        let with_value = |len: usize| json!({"metadata": {"name": "big", "annotations": {"a": "x".repeat(len)}}});
        let mut fits = with_value(TOTAL_ANNOTATION_SIZE_LIMIT - 1);
        assert!(admit_create(&configmaps, &mut fits, "u").is_ok());
        let mut over = with_value(TOTAL_ANNOTATION_SIZE_LIMIT);
        let error = admit_create(&configmaps, &mut over, "u").unwrap_err();
        assert_eq!(error.code, 422);
        assert_eq!(
            error.message,
            "ConfigMap \"big\" is invalid: metadata.annotations: Too long: must have at most 262144 bytes"
        );
        assert!(admit_update(&configmaps, &fits, &mut over).is_err());
    }

    #[test]
    fn qos_class_follows_requests_and_limits() {
        let pod = |resources: Value| json!({"containers": [{"name": "c", "resources": resources}]});
        assert_eq!(qos_class(&pod(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&pod(json!({"requests": {"cpu": "100m"}}))),
            "Burstable"
        );
        assert_eq!(
            qos_class(&pod(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(json!({
                "requests": {"cpu": "500m", "memory": "1Gi"},
                "limits": {"cpu": "1", "memory": "1Gi"}
            }))),
            "Burstable"
        );
    }

    fn job(restart_policy: Option<&str>) -> Value {
        let mut job = json!({"metadata": {"name": "j"}, "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}}});
        if let Some(policy) = restart_policy {
            job["spec"]["template"]["spec"]["restartPolicy"] = json!(policy);
        }
        job
    }

    #[test]
    fn job_defaults_follow_the_real_api_server() {
        let mut j = job(Some("Never"));
        admit_create(&jobs(), &mut j, "u-1").unwrap();
        assert_eq!(j["spec"]["completions"], 1);
        assert_eq!(j["spec"]["parallelism"], 1);
        assert_eq!(j["spec"]["backoffLimit"], 6);
        assert_eq!(
            j["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
            "u-1"
        );
        assert_eq!(j["spec"]["template"]["metadata"]["labels"]["job-name"], "j");
        assert_eq!(
            j["spec"]["template"]["spec"]["schedulerName"],
            "default-scheduler"
        );
        let mut parallel = job(Some("OnFailure"));
        parallel["spec"]["parallelism"] = json!(3);
        admit_create(&jobs(), &mut parallel, "u-2").unwrap();
        assert!(parallel["spec"].get("completions").is_none());
    }

    #[test]
    fn job_restart_policy_must_be_never_or_on_failure() {
        let err = admit_create(&jobs(), &mut job(Some("Always")), "u").unwrap_err();
        assert_eq!(err.code, 422);
        assert!(err.message.starts_with("Job.batch \"j\" is invalid: spec.template.spec.restartPolicy: Unsupported value: \"Always\""), "{}", err.message);
        assert_eq!(
            admit_create(&jobs(), &mut job(None), "u").unwrap_err().code,
            422
        );
    }

    #[test]
    fn immutable_fields_cannot_change() {
        let mut created = job(Some("Never"));
        admit_create(&jobs(), &mut created, "u").unwrap();
        let mut changed = created.clone();
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("busybox:2");
        let err = admit_update(&jobs(), &created, &mut changed).unwrap_err();
        assert!(
            err.message.contains("spec.template: Invalid value"),
            "{}",
            err.message
        );
        let mut suspended = created.clone();
        suspended["spec"]["suspend"] = json!(true);
        let mut resumed = changed.clone();
        resumed["spec"]["suspend"] = json!(true);
        assert!(admit_update(&jobs(), &suspended, &mut resumed).is_ok());

        let cms = (*Registry::with_builtins()
            .lookup("", "v1", "configmaps")
            .unwrap())
        .clone();
        let frozen = json!({"metadata": {"name": "c"}, "data": {"a": "1"}, "immutable": true});
        let mut edited = json!({"metadata": {"name": "c"}, "data": {"a": "2"}, "immutable": true});
        assert_eq!(
            admit_update(&cms, &frozen, &mut edited).unwrap_err().code,
            422
        );
        let mut relabelled = frozen.clone();
        relabelled["metadata"]["labels"] = json!({"x": "y"});
        assert!(admit_update(&cms, &frozen, &mut relabelled).is_ok());
    }

    #[test]
    fn names_are_dns_subdomains() {
        assert!(validate_name("a.b-c", false).is_ok());
        assert!(validate_name("a.b", true).is_err());
        assert!(validate_name("Upper", false).is_err());
        assert!(validate_name("-x", false).is_err());
        assert!(validate_name(&"a".repeat(254), false).is_err());
    }
}
