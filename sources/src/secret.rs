//! Secret values in configuration: from a Kubernetes Secret or from the process environment.
//!
//! Connectors never read credentials from the pipeline text itself; they ask a
//! [`SecretResolver`] at start-up, so a pipeline file can be shared without its secrets.

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A secret value: a key of a Secret in the pipeline's namespace, or an environment variable
/// of the Spate process (for `spate run -f` outside a cluster).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SecretValue {
    /// A key of a Secret.
    SecretKeyRef(SecretKeyRef),
    /// The name of an environment variable.
    Env(String),
}

/// A key of a Secret in the pipeline's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    #[error("secret {name} has no key {key}")]
    MissingKey { name: String, key: String },
    #[error("cannot read secret {name}: {reason}")]
    Unreadable { name: String, reason: String },
    /// The pipeline names something of the Spate process's own (an environment variable, its
    /// cloud identity, its filesystem) that the operator has not granted to its namespace.
    #[error(
        "{what} belongs to the Spate process, and namespace {namespace} has not been granted it; \
         use a Secret of the namespace (`secretKeyRef`), or ask the operator to grant it \
         (`spate run --grant-env NAME={namespace}` for one environment variable, \
         `--trust-namespace {namespace}` for everything; docs/operations.md, \"Tenancy\")"
    )]
    NotGranted { what: String, namespace: String },
}

/// Looks secret values up.
pub trait SecretResolver: Send + Sync {
    fn resolve<'a>(&'a self, value: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>>;

    /// Whether the pipeline may act as the Spate process itself where it names no
    /// credentials: a bucket reached through the process's credential chain (its environment,
    /// its cloud workload identity) or a folder of its filesystem. `what` names that use in a
    /// refusal. Everything is allowed unless a resolver says otherwise: outside a cluster
    /// whoever started the process wrote its pipelines.
    fn ambient(&self, _what: &str) -> Result<(), SecretError> {
        Ok(())
    }
}

/// Resolves `env` values only; for use without a cluster.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnvSecrets;

impl SecretResolver for EnvSecrets {
    fn resolve<'a>(&'a self, value: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async move {
            match value {
                SecretValue::Env(name) => {
                    std::env::var(name).map_err(|_| SecretError::MissingEnv(name.clone()))
                }
                SecretValue::SecretKeyRef(reference) => Err(SecretError::Unreadable {
                    name: reference.name.clone(),
                    reason: "Kubernetes Secrets need a cluster; use `env` when running from files"
                        .to_string(),
                }),
            }
        })
    }
}
