//! The Pipeline CRD as it is installed: the generated one with the Job template's schema cut
//! short.
//!
//! The generated schema spells out the whole `batch/v1` JobTemplateSpec, pod spec and all:
//! 730 KB of YAML. `kubectl apply -f` (client-side) copies what it applies into the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation, and a real API server
//! refuses annotations over 256 KiB, so the command a user types first would fail. Below
//! [`JOB_TEMPLATE_DEPTH`] levels the template's objects are kept as
//! `x-kubernetes-preserve-unknown-fields` (with their descriptions), which leaves
//! `kubectl explain` down to a container's fields. Nothing is lost in validation: Spate
//! checks every pipeline against the full schema before it is used
//! ([`super::load`]), which is also what reports an unknown field deep in a pod template.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use super::Pipeline;

/// Object levels of `spec.jobTemplate` kept whole: the JobTemplateSpec, the JobSpec, the pod
/// template, the pod spec and a container's fields (`…template.spec.containers.image`).
pub const JOB_TEMPLATE_DEPTH: usize = 5;

/// The CustomResourceDefinition `spate crd` prints, the chart ships and `spate dev` installs.
pub fn definition() -> CustomResourceDefinition {
    let mut crd = Pipeline::crd();
    for version in &mut crd.spec.versions {
        let job_template = version
            .schema
            .as_mut()
            .and_then(|schema| schema.open_api_v3_schema.as_mut())
            .and_then(|root| property(root, "spec"))
            .and_then(|spec| property(spec, "jobTemplate"));
        if let Some(job_template) = job_template {
            cut_below(job_template, JOB_TEMPLATE_DEPTH);
        }
    }
    crd
}

fn property<'a>(schema: &'a mut JSONSchemaProps, name: &str) -> Option<&'a mut JSONSchemaProps> {
    schema.properties.as_mut()?.get_mut(name)
}

/// Keeps `depth` levels of object fields under `schema`; an object below them keeps only its
/// description and takes any fields. Array items are on their array's level.
fn cut_below(schema: &mut JSONSchemaProps, depth: usize) {
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        cut_below(items, depth);
        return;
    }
    let is_object = schema.properties.is_some()
        || matches!(
            schema.additional_properties,
            Some(JSONSchemaPropsOrBool::Schema(_))
        );
    if !is_object {
        return;
    }
    if depth == 0 {
        *schema = JSONSchemaProps {
            type_: Some("object".to_string()),
            description: schema.description.take(),
            nullable: schema.nullable,
            x_kubernetes_preserve_unknown_fields: Some(true),
            ..JSONSchemaProps::default()
        };
        return;
    }
    for field in schema.properties.iter_mut().flat_map(BTreeMap::values_mut) {
        cut_below(field, depth - 1);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = schema.additional_properties.as_mut() {
        cut_below(values, depth - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(crd: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
        let pointer = path
            .split('.')
            .map(|field| format!("/properties/{field}"))
            .collect::<String>()
            .replace("/properties/[]", "/items");
        crd.pointer(&format!("/spec/versions/0/schema/openAPIV3Schema{pointer}"))
            .unwrap_or_else(|| panic!("{path} is not in the CRD"))
    }

    #[test]
    fn the_crd_fits_in_the_annotation_kubectl_apply_writes() {
        let json = serde_json::to_string(&definition()).unwrap();
        // What client-side apply copies into one annotation; the API server's limit on all of
        // an object's annotations is 256 KiB. The margin is for fields still to come.
        assert!(json.len() < 192 * 1024, "{} bytes", json.len());
    }

    #[test]
    fn a_containers_fields_are_kept_and_what_is_below_them_takes_any_field() {
        let crd = serde_json::to_value(definition()).unwrap();
        let container = "spec.jobTemplate.spec.template.spec.containers.[]";
        let image = at(&crd, &format!("{container}.image"));
        assert_eq!(image["type"], "string");
        assert!(image["description"].as_str().unwrap().contains("image"));
        let resources = at(&crd, &format!("{container}.resources"));
        assert_eq!(resources["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(resources["type"], "object");
        assert!(resources.get("properties").is_none());
        assert!(!resources["description"].as_str().unwrap().is_empty());
        // The rest of the spec is whole.
        let fanout = at(&crd, "spec.fanout.maxJobsPerSecond");
        assert!(fanout.get("type").is_some());
    }

    #[test]
    fn only_the_job_template_is_cut() {
        let full = serde_json::to_value(Pipeline::crd()).unwrap();
        let cut = serde_json::to_value(definition()).unwrap();
        let without_template = |mut crd: serde_json::Value| {
            let spec = crd
                .pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties")
                .unwrap();
            spec.as_object_mut().unwrap().remove("jobTemplate");
            crd
        };
        assert_eq!(without_template(full), without_template(cut));
    }
}
