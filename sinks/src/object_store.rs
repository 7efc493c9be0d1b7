//! Writes a JSON-lines manifest of results per batch to a bucket.
//!
//! Each `deliver` call writes one object: one [`Record`] per line, under `prefix`, named from
//! the batch's earliest time and a hash of its content. `deliver` returns once the store has
//! the whole object (a single PUT: readers never see half a manifest), and a retried delivery
//! of the same batch overwrites the same key instead of adding a duplicate. Bucket URLs,
//! endpoints and credentials work as in the objectStore source.

use chrono::{DateTime, Utc};
use data_encoding::HEXLOWER;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spate_sources::SourceError;
use spate_sources::check::Problems;
use spate_sources::check::{BUCKET_SCHEMES, HTTP_SCHEMES};
use spate_sources::object_store::ObjectStoreCredentials;
use spate_sources::object_store::store::{self, Bucket, BucketConfig};

use crate::{Record, Sink, SinkContext, SinkError};

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectStoreSink {
    /// As in `objectStore.url`.
    pub url: String,
    /// Key prefix of the manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<ObjectStoreCredentials>,
}

impl ObjectStoreSink {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url(&format!("{path}.url"), &self.url, &BUCKET_SCHEMES);
        if let Some(endpoint) = &self.endpoint {
            problems.url(&format!("{path}.endpoint"), endpoint, &HTTP_SCHEMES);
        }
    }
}

/// Connects the sink: opens the bucket (creating a local folder if needed).
pub fn build(
    config: &ObjectStoreSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let config = config.clone();
    let secrets = cx.secrets.clone();
    Box::pin(async move {
        if let Some(folder) = config.url.strip_prefix("file://") {
            tokio::fs::create_dir_all(folder)
                .await
                .map_err(|e| SinkError::Config(format!("cannot create {folder}: {e}")))?;
        }
        let bucket = store::open(
            BucketConfig {
                url: &config.url,
                endpoint: config.endpoint.as_deref(),
                region: config.region.as_deref(),
                credentials: config.credentials.as_ref(),
            },
            secrets.as_ref(),
        )
        .await
        .map_err(|error| match error {
            SourceError::Secret(secret) => SinkError::Secret(secret),
            other => SinkError::Config(other.to_string()),
        })?;
        let prefix = bucket.key_prefix(config.prefix.as_deref());
        Ok(Box::new(ManifestSink { bucket, prefix }) as Box<dyn Sink>)
    })
}

/// Writes each delivered batch as one manifest object.
struct ManifestSink {
    bucket: Bucket,
    prefix: String,
}

impl Sink for ManifestSink {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let body = manifest(records)?;
            let key = manifest_key(&self.prefix, records, &body);
            let path = Path::parse(&key).map_err(|e| {
                SinkError::Config(format!(
                    "manifest key `{key}` is not a valid object path: {e}"
                ))
            })?;
            self.bucket
                .store()
                .put(&path, PutPayload::from(body))
                .await
                .map_err(|e| SinkError::Delivery {
                    kind: "objectStore",
                    reason: format!("cannot write {}: {e}", self.bucket.object_url(&key)),
                })?;
            tracing::debug!(manifest = %self.bucket.object_url(&key), records = records.len(), "manifest written");
            Ok(())
        })
    }
}

/// One JSON object per line, in the order given.
fn manifest(records: &[Record]) -> Result<Vec<u8>, SinkError> {
    let mut body = Vec::new();
    for record in records {
        serde_json::to_writer(&mut body, record).map_err(|e| SinkError::Delivery {
            kind: "objectStore",
            reason: format!("cannot encode a record: {e}"),
        })?;
        body.push(b'\n');
    }
    Ok(body)
}

/// `<prefix>/<yyyy>/<mm>/<dd>/<hhmmss>-<hash>.jsonl`, from the earliest record time and a hash
/// of the manifest's content: the same batch delivered again overwrites its manifest, and a
/// listing of the prefix is in time order.
fn manifest_key(prefix: &str, records: &[Record], body: &[u8]) -> String {
    let earliest = records
        .iter()
        .filter_map(|record| DateTime::parse_from_rfc3339(&record.at).ok())
        .map(|at| at.with_timezone(&Utc))
        .min();
    let when = match earliest {
        Some(at) => at.format("%Y/%m/%d/%H%M%S").to_string(),
        None => "undated/000000".to_string(),
    };
    let hash = Sha256::digest(body);
    let name = format!("{when}-{}.jsonl", HEXLOWER.encode(&hash[..12]));
    match prefix.trim_end_matches('/') {
        "" => name,
        prefix => format!("{prefix}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Outcome;
    use serde_json::json;

    fn record(id: &str, at: &str) -> Record {
        Record {
            pipeline: "default/thumbs".into(),
            outcome: Outcome::Succeeded,
            event: json!({"id": id}),
            job: Some(format!("thumbs-{id}")),
            reason: None,
            at: at.into(),
        }
    }

    #[test]
    fn a_manifest_is_named_by_its_earliest_time_and_its_content() {
        let records = [
            record("b", "2026-03-04T05:06:08Z"),
            record("a", "2026-03-04T07:06:07+02:00"),
        ];
        let body = manifest(&records).unwrap();
        let key = manifest_key("results/", &records, &body);
        assert!(key.starts_with("results/2026/03/04/050607-"), "{key}");
        assert!(key.ends_with(".jsonl"));
        assert_eq!(
            key,
            manifest_key("results", &records, &body),
            "deterministic"
        );
        let other = manifest(&records[..1]).unwrap();
        assert_ne!(key, manifest_key("results", &records[..1], &other));
        assert!(manifest_key("", &records, &body).starts_with("2026/"));
    }

    #[test]
    fn each_record_is_one_line() {
        let records = [record("a", "x"), record("b", "y")];
        let body = String::from_utf8(manifest(&records).unwrap()).unwrap();
        let lines: Vec<Record> = body
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines, records);
        assert!(manifest_key("r", &records, body.as_bytes()).starts_with("r/undated/"));
    }
}
