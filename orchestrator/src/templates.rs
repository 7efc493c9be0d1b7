//! Ready Job templates, referenced from a pipeline by name (`templateRef`).
//!
//! Each file in `job-templates/` holds a description, documented parameters (with defaults
//! where one makes sense) and a JobTemplateSpec whose strings may use `{{ params.<name> }}`
//! and `{{ event.<field> }}`. They are compiled into the binary so `spate` needs no files
//! beside it.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use serde::Deserialize;

/// The templates shipped with Spate: (name, YAML).
pub const BUILTIN: [(&str, &str); 3] = [
    (
        "image-resize",
        include_str!("../../job-templates/image-resize.yaml"),
    ),
    (
        "generic-container",
        include_str!("../../job-templates/generic-container.yaml"),
    ),
    (
        "script-runner",
        include_str!("../../job-templates/script-runner.yaml"),
    ),
];

/// A parsed template file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplateFile {
    pub description: String,
    #[serde(default)]
    pub params: BTreeMap<String, Param>,
    pub template: JobTemplateSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Param {
    pub description: String,
    /// Without a default, the pipeline must give a value.
    #[serde(default)]
    pub default: Option<String>,
}

/// A `templateRef` that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateRefError {
    #[error("no job template named `{name}`; available: {available}")]
    Unknown { name: String, available: String },
    #[error("template `{template}` has no parameter `{param}`; it takes: {takes}")]
    UnknownParam {
        template: String,
        param: String,
        takes: String,
    },
    #[error("template `{template}` needs parameter `{param}`: {description}")]
    MissingParam {
        template: String,
        param: String,
        description: String,
    },
    #[error("built-in template `{template}` is broken: {reason}")]
    Broken { template: String, reason: String },
}

/// Looks a built-in template up and parses it.
pub fn builtin(name: &str) -> Result<JobTemplateFile, TemplateRefError> {
    let Some((_, text)) = BUILTIN.iter().find(|(candidate, _)| *candidate == name) else {
        return Err(TemplateRefError::Unknown {
            name: name.to_string(),
            available: BUILTIN.map(|(name, _)| name).join(", "),
        });
    };
    serde_saphyr::from_str(text).map_err(|error| TemplateRefError::Broken {
        template: name.to_string(),
        reason: error.to_string(),
    })
}

/// The template a `templateRef` names, and the values of its parameters (defaults applied).
pub fn resolve(
    name: &str,
    given: &BTreeMap<String, String>,
) -> Result<(JobTemplateSpec, BTreeMap<String, String>), TemplateRefError> {
    let file = builtin(name)?;
    if let Some(param) = given.keys().find(|key| !file.params.contains_key(*key)) {
        return Err(TemplateRefError::UnknownParam {
            template: name.to_string(),
            param: param.clone(),
            takes: file.params.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let mut values = BTreeMap::new();
    for (param, spec) in &file.params {
        let value = given.get(param).or(spec.default.as_ref()).ok_or_else(|| {
            TemplateRefError::MissingParam {
                template: name.to_string(),
                param: param.clone(),
                description: spec.description.clone(),
            }
        })?;
        values.insert(param.clone(), value.clone());
    }
    Ok((file.template, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_template_parses_and_documents_its_params() {
        for (name, _) in BUILTIN {
            let file = builtin(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!file.description.is_empty(), "{name}");
            assert!(
                file.params.values().all(|p| !p.description.is_empty()),
                "{name}"
            );
        }
    }

    #[test]
    fn params_are_checked_and_defaulted() {
        let given = BTreeMap::from([("output".to_string(), "/tmp/out".to_string())]);
        let (_, values) = resolve("image-resize", &given).unwrap();
        assert_eq!(values["width"], "256");
        assert_eq!(values["output"], "/tmp/out");
        assert!(matches!(
            resolve("image-resize", &BTreeMap::new()),
            Err(TemplateRefError::MissingParam { param, .. }) if param == "output"
        ));
        let typo = BTreeMap::from([("widht".to_string(), "1".to_string())]);
        assert!(matches!(
            resolve("image-resize", &typo),
            Err(TemplateRefError::UnknownParam { .. })
        ));
        assert!(matches!(
            resolve("nope", &given),
            Err(TemplateRefError::Unknown { .. })
        ));
    }
}
