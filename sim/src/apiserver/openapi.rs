//! A minimal OpenAPI v3 index: enough for kubectl to learn that the server validates fields
//! itself (`fieldValidation` on every PATCH operation), so `kubectl apply`/`create` validate
//! server-side instead of downloading full schemas.
//!
//! The PATCH operations deliberately do not list the strategic-merge content type: kubectl
//! then computes strategic merge patches from its compiled-in types for built-ins and uses
//! merge patches for custom resources, exactly as it does against servers without schemas.

use serde_json::{Map, Value, json};

use super::registry::{Registry, ResourceInfo};

const PATCH_PARAMETERS: &[(&str, &str)] = &[
    ("dryRun", "string"),
    ("fieldManager", "string"),
    ("fieldValidation", "string"),
    ("force", "boolean"),
    ("pretty", "string"),
];

/// `api/v1` or `apis/<group>/<version>`.
fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A short, stable fingerprint of a group version's resources, used as the `hash` clients
/// cache documents by: it changes when a CRD adds or removes resources.
fn fingerprint(resources: &[&ResourceInfo]) -> String {
    let names: Vec<&str> = resources.iter().map(|r| r.plural.as_str()).collect();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in names.join(",").bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016X}")
}

fn group_versions(registry: &Registry) -> Vec<(String, String, Vec<ResourceInfo>)> {
    let mut out: Vec<(String, String, Vec<ResourceInfo>)> = Vec::new();
    for info in registry.all() {
        for version in &info.versions {
            match out
                .iter_mut()
                .find(|(g, v, _)| *g == info.group && v == version)
            {
                Some((_, _, list)) => list.push((*info).clone()),
                None => out.push((info.group.clone(), version.clone(), vec![(*info).clone()])),
            }
        }
    }
    out
}

/// `GET /openapi/v3`: where each group version's document lives.
pub fn index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (group, version, resources) in group_versions(registry) {
        let path = group_version_path(&group, &version);
        let refs: Vec<&ResourceInfo> = resources.iter().collect();
        let url = format!("/openapi/v3/{path}?hash={}", fingerprint(&refs));
        paths.insert(path, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

fn patch_operation(info: &ResourceInfo, version: &str) -> Value {
    let parameters: Vec<Value> = PATCH_PARAMETERS
        .iter()
        .map(|(name, kind)| json!({"name": name, "in": "query", "schema": {"type": kind, "uniqueItems": true}}))
        .collect();
    let body = json!({"schema": {"type": "object"}});
    json!({
        "operationId": format!("patch{}", info.kind),
        "parameters": parameters,
        "requestBody": {"content": {
            "application/apply-patch+yaml": body,
            "application/json-patch+json": body,
            "application/merge-patch+json": body,
        }, "required": true},
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": {"group": info.group, "version": version, "kind": info.kind},
    })
}

/// `GET /openapi/v3/<group-version path>`: PATCH operations of every resource served there.
pub fn group_version_document(registry: &Registry, path: &str) -> Option<Value> {
    let (group, version, resources) = group_versions(registry)
        .into_iter()
        .find(|(g, v, _)| group_version_path(g, v) == path)?;
    let mut paths = Map::new();
    for info in &resources {
        let prefix = format!("/{}", group_version_path(&group, &version));
        let object_path = if info.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", info.plural)
        } else {
            format!("{prefix}/{}/{{name}}", info.plural)
        };
        paths.insert(
            object_path,
            json!({"patch": patch_operation(info, &version)}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_version_advertises_field_validation_on_patch() {
        let registry = Registry::with_builtins();
        let index = index(&registry);
        let url = index["paths"]["apis/batch/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/batch/v1?hash="));
        let doc = group_version_document(&registry, "apis/batch/v1").unwrap();
        let patch = &doc["paths"]["/apis/batch/v1/namespaces/{namespace}/jobs/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Job");
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(group_version_document(&registry, "apis/nope/v1").is_none());
    }
}
