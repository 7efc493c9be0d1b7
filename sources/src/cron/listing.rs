//! `listBucket`: at each tick, the objects under a prefix, each as its own event.
//!
//! A listing is a snapshot: the tick's events are the objects there at that moment, with the
//! same fields an objectStore event has plus the tick's `scheduledTime`.

use chrono::SecondsFormat;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectMeta;
use object_store::path::Path;
use serde_json::Value;

use super::BucketListing;
use crate::object_store::ObjectVersion;
use crate::object_store::store::{Bucket, BucketConfig, open};
use crate::secret::SecretResolver;
use crate::{Event, SourceError};

/// An opened bucket and the prefix each tick lists.
pub(super) struct TickListing {
    bucket: Bucket,
    /// Keys must start with this (the configured prefix below the bucket URL's own path).
    key_prefix: String,
    /// The deepest folder holding every matching key: `object_store` lists folders, so a
    /// prefix ending mid-name is listed from its folder and filtered.
    root: Option<Path>,
}

impl TickListing {
    pub(super) async fn open(
        config: &BucketListing,
        secrets: &dyn SecretResolver,
    ) -> Result<TickListing, SourceError> {
        let bucket = open(
            BucketConfig {
                url: &config.url,
                endpoint: config.endpoint.as_deref(),
                region: config.region.as_deref(),
                credentials: None,
            },
            secrets,
        )
        .await?;
        let key_prefix = bucket.key_prefix(config.prefix.as_deref());
        let root = match key_prefix.rsplit_once('/') {
            Some((folder, _)) if !folder.is_empty() => {
                Some(Path::parse(folder).map_err(|error| {
                    SourceError::Config(format!(
                        "cron listBucket prefix `{key_prefix}` is not a valid key prefix: {error}"
                    ))
                })?)
            }
            _ => None,
        };
        Ok(TickListing {
            bucket,
            key_prefix,
            root,
        })
    }

    pub(super) fn bucket_url(&self) -> &str {
        self.bucket.url_base()
    }

    /// The objects under the prefix, as the store lists them.
    pub(super) fn objects(&self) -> BoxStream<'static, Result<ObjectMeta, object_store::Error>> {
        let key_prefix = self.key_prefix.clone();
        self.bucket
            .store()
            .list(self.root.as_ref())
            .filter(move |item| {
                let keep = match item {
                    Ok(meta) => meta.location.as_ref().starts_with(&key_prefix),
                    Err(_) => true,
                };
                futures::future::ready(keep)
            })
            .boxed()
    }

    /// The event for one object of the tick `tick_id`: the object's fields, `scheduledTime`,
    /// and an id per tick and key, so a tick listed again maps each object to the same Job.
    pub(super) fn event(
        &self,
        meta: &ObjectMeta,
        tick_id: &str,
        tick_fields: &serde_json::Map<String, Value>,
    ) -> Result<Event, SourceError> {
        let etag = match &meta.e_tag {
            Some(etag) if etag.starts_with('"') || etag.starts_with("W/\"") => etag.clone(),
            Some(etag) => format!("\"{etag}\""),
            // A store without ETags: size and time stand in, as the objectStore source does.
            None => format!(
                "\"{}-{}\"",
                meta.size,
                meta.last_modified.timestamp_millis()
            ),
        };
        let version = ObjectVersion {
            bucket: self.bucket.name().to_string(),
            key: meta.location.as_ref().to_string(),
            size: meta.size,
            etag,
            last_modified: meta
                .last_modified
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        };
        let object = version.event(self.bucket.object_url(&version.key), None)?;
        let mut fields = object.fields().clone();
        for (name, value) in tick_fields {
            fields.insert(name.clone(), value.clone());
        }
        Event::new(format!("{tick_id}/{}", version.key), fields)
            .map_err(|error| SourceError::Config(error.to_string()))
    }
}
