//! Source checkpoints kept in ConfigMaps, so a controller restarted on another node resumes
//! where it stopped (the file store only survives on the same disk).
//!
//! One ConfigMap per checkpoint key, named `spate-checkpoint-<hash of the key>` in the
//! controller's namespace, the bytes in `binaryData`. A ConfigMap holds at most 1 MiB, which
//! bounds a checkpoint at that size (for the object-store source: roughly 60,000 objects).

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use sha2::{Digest, Sha256};
use spate_sources::checkpoint::CheckpointStore;

const DATA_KEY: &str = "checkpoint";

pub struct ConfigMapCheckpoints {
    config_maps: Api<ConfigMap>,
}

impl ConfigMapCheckpoints {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        ConfigMapCheckpoints {
            config_maps: Api::namespaced(client, namespace),
        }
    }

    fn name(key: &str) -> String {
        let digest = data_encoding::BASE32_NOPAD
            .encode(&Sha256::digest(key.as_bytes()))
            .to_ascii_lowercase();
        format!("spate-checkpoint-{}", &digest[..20])
    }
}

impl CheckpointStore for ConfigMapCheckpoints {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            let found = self
                .config_maps
                .get_opt(&Self::name(key))
                .await
                .map_err(|e| format!("cannot read checkpoint {key}: {e}"))?;
            Ok(found
                .and_then(|map| map.binary_data)
                .and_then(|mut data| data.remove(DATA_KEY))
                .map(|bytes| bytes.0))
        })
    }

    fn save<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(Self::name(key)),
                    annotations: Some(
                        [("spate.dev/checkpoint-key".to_string(), key.to_string())].into(),
                    ),
                    labels: Some(
                        [(
                            "app.kubernetes.io/managed-by".to_string(),
                            "spate".to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                binary_data: Some([(DATA_KEY.to_string(), ByteString(value))].into()),
                ..ConfigMap::default()
            };
            // Server-side apply: one write whether or not the ConfigMap exists yet.
            let params = PatchParams::apply("spate").force();
            self.config_maps
                .patch(&Self::name(key), &params, &Patch::Apply(&map))
                .await
                .map(|_| ())
                .map_err(|e| format!("cannot save checkpoint {key}: {e}"))
        })
    }
}
