//! One object version as an event: its stable id and its fields.
//!
//! The id is derived from the bucket, the key and the ETag, so the same object version maps to
//! the same id (and so the same Job) whether it was found by a listing or a notification, and
//! however often it is seen; an overwritten object has a new ETag and so a new id.

use std::fmt;

use chrono::SecondsFormat;
use object_store::ObjectMeta;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{Event, SourceError};

/// The identity of one object version: 128 bits of SHA-256 over bucket, key and ETag.
///
/// 128 bits keep the checkpoint small (16 bytes per object) with collisions out of reach for
/// any bucket that exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 16]);

impl ObjectId {
    pub fn new(bucket: &str, key: &str, etag: &str) -> Self {
        let mut hash = Sha256::new();
        for part in [bucket, key, bare_etag(etag)] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        ObjectId(id)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

/// An object version as a listing or a notification describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectVersion {
    pub bucket: String,
    /// The key exactly as stored (never URL-encoded).
    pub key: String,
    pub size: u64,
    /// The ETag in its HTTP form, quoted.
    pub etag: String,
    /// RFC 3339.
    pub last_modified: String,
}

impl ObjectVersion {
    /// The version a listing of `bucket` shows.
    pub fn listed(bucket: &str, meta: &ObjectMeta) -> Self {
        let etag = match &meta.e_tag {
            Some(etag) => quoted_etag(etag),
            // A store without ETags: size and time stand in, so a rewrite is still a new id.
            None => format!(
                "\"{}-{}\"",
                meta.size,
                meta.last_modified.timestamp_millis()
            ),
        };
        ObjectVersion {
            bucket: bucket.to_string(),
            key: meta.location.as_ref().to_string(),
            size: meta.size,
            etag,
            last_modified: meta
                .last_modified
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        }
    }

    pub fn id(&self) -> ObjectId {
        ObjectId::new(&self.bucket, &self.key, &self.etag)
    }

    /// The event: `bucket`, `key`, `size`, `etag`, `url`, `lastModified`, and `presignedUrl`
    /// when one was made.
    pub fn event(&self, url: String, presigned: Option<String>) -> Result<Event, SourceError> {
        let mut fields = Map::new();
        fields.insert("bucket".into(), json!(self.bucket));
        fields.insert("key".into(), json!(self.key));
        fields.insert("size".into(), json!(self.size));
        fields.insert("etag".into(), json!(self.etag));
        fields.insert("url".into(), json!(url));
        fields.insert("lastModified".into(), json!(self.last_modified));
        if let Some(presigned) = presigned {
            fields.insert("presignedUrl".into(), Value::String(presigned));
        }
        Event::new(self.id().to_string(), fields).map_err(|e| SourceError::Broker {
            kind: "objectStore",
            reason: e.to_string(),
        })
    }
}

/// `"abc"` → `abc`, `W/"abc"` → `abc`: listings quote ETags, notifications do not.
fn bare_etag(etag: &str) -> &str {
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.trim_matches('"')
}

/// The ETag in its quoted HTTP form, whichever form the store gave.
pub fn quoted_etag(etag: &str) -> String {
    if etag.starts_with('"') || etag.starts_with("W/\"") {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_bare_etags_name_the_same_object() {
        let listed = ObjectId::new("b", "k", "\"abc\"");
        assert_eq!(listed, ObjectId::new("b", "k", "abc"));
        assert_ne!(listed, ObjectId::new("b", "k", "abd"));
        assert_ne!(listed, ObjectId::new("b", "k2", "abc"));
        assert_ne!(
            listed,
            ObjectId::new("bk", "", "abc"),
            "parts are length-prefixed"
        );
        assert_eq!(listed.to_string().len(), 32);
        assert_eq!(quoted_etag("abc"), "\"abc\"");
        assert_eq!(quoted_etag("\"abc\""), "\"abc\"");
    }

    #[test]
    fn a_listed_object_has_a_quoted_etag_and_an_rfc3339_time() {
        let modified = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .to_utc();
        let mut meta = ObjectMeta {
            location: object_store::path::Path::parse("in/a b.jpg").unwrap(),
            last_modified: modified,
            size: 3,
            e_tag: Some("abc".into()),
            version: None,
        };
        let listed = ObjectVersion::listed("photos", &meta);
        assert_eq!(listed.key, "in/a b.jpg");
        assert_eq!(listed.etag, "\"abc\"");
        assert_eq!(listed.last_modified, "2026-01-02T03:04:05Z");
        meta.e_tag = None;
        let untagged = ObjectVersion::listed("photos", &meta);
        assert_eq!(
            untagged.etag,
            format!("\"3-{}\"", modified.timestamp_millis())
        );
        let event = listed.event("s3://photos/in/a b.jpg".into(), None).unwrap();
        assert_eq!(event.id(), listed.id().to_string());
        assert_eq!(event.fields()["size"], json!(3));
        assert!(event.fields().get("presignedUrl").is_none());
    }
}
