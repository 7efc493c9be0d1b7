//! Secret values from Kubernetes Secrets in the pipeline's namespace, or the process's
//! environment where the pipeline's [`Authority`] allows it.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use spate_sources::secret::{EnvSecrets, SecretError, SecretResolver, SecretValue};

use super::tenancy::Authority;

pub struct KubeSecrets {
    pub client: kube::Client,
    pub namespace: String,
    pub authority: Authority,
}

impl SecretResolver for KubeSecrets {
    fn resolve<'a>(&'a self, value: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async move {
            let reference = match value {
                SecretValue::SecretKeyRef(reference) => reference,
                SecretValue::Env(name) => {
                    self.authority.may_read_env(name)?;
                    return EnvSecrets.resolve(value).await;
                }
            };
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            let secret =
                secrets
                    .get(&reference.name)
                    .await
                    .map_err(|error| SecretError::Unreadable {
                        name: reference.name.clone(),
                        reason: error.to_string(),
                    })?;
            let missing = || SecretError::MissingKey {
                name: reference.name.clone(),
                key: reference.key.clone(),
            };
            let bytes = secret
                .data
                .as_ref()
                .and_then(|data| data.get(&reference.key))
                .map(|bytes| bytes.0.clone())
                .or_else(|| {
                    secret
                        .string_data
                        .as_ref()
                        .and_then(|data| data.get(&reference.key))
                        .map(|text| text.clone().into_bytes())
                })
                .ok_or_else(missing)?;
            String::from_utf8(bytes).map_err(|_| SecretError::Unreadable {
                name: reference.name.clone(),
                reason: format!("key {} is not UTF-8 text", reference.key),
            })
        })
    }

    fn ambient(&self, what: &str) -> Result<(), SecretError> {
        self.authority.may_act_as_process(what)
    }
}
