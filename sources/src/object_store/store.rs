//! Opening a bucket from configuration (`s3://`, `gs://`, `az://`, `file://`), shared by the
//! objectStore source and the objectStore sink.
//!
//! HTTP requests go through `object_store`'s own client, whose retries are bounded (10
//! attempts within 3 minutes by default), use exponential backoff with jitter and are logged.
//! TLS is rustls with the `ring` provider, the only one compiled into the workspace; it is
//! installed here if the process has not installed one yet, because reqwest is built without a
//! provider of its own and would otherwise refuse to build its client.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer;

use super::ObjectStoreCredentials;
use crate::SourceError;
use crate::secret::SecretResolver;

/// Where a bucket is and how to reach it, as the source and sink configurations give it.
#[derive(Clone, Copy, Debug)]
pub struct BucketConfig<'a> {
    pub url: &'a str,
    pub endpoint: Option<&'a str>,
    pub region: Option<&'a str>,
    pub credentials: Option<&'a ObjectStoreCredentials>,
}

/// An opened bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// Presigns GET URLs; `None` for a local folder, which has no URLs to hand out.
    signer: Option<Arc<dyn Signer>>,
    name: String,
    url_base: String,
    /// The path part of `s3://bucket/some/path`, which every key starts with.
    base_prefix: String,
}

impl Bucket {
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The bucket's name as events carry it: the bucket or container, or the folder's path for
    /// `file://`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of `key` in the store's own form, e.g. `s3://bucket/key`.
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{key}", self.url_base)
    }

    /// `s3://bucket` or `file:///path`, to which keys are appended.
    pub fn url_base(&self) -> &str {
        &self.url_base
    }

    /// The key prefix for `prefix`, below the path the bucket URL itself names.
    pub fn key_prefix(&self, prefix: Option<&str>) -> String {
        let prefix = prefix.unwrap_or("").trim_start_matches('/');
        match (self.base_prefix.is_empty(), prefix.is_empty()) {
            (true, _) => prefix.to_string(),
            (false, true) => format!("{}/", self.base_prefix),
            (false, false) => format!("{}/{prefix}", self.base_prefix),
        }
    }

    /// A GET URL for `key` valid for `expiry`, or `None` where the store has no URLs
    /// (`file://`). Signing is local: it needs the credentials, not a request.
    pub async fn presign(&self, key: &str, expiry: Duration) -> Result<Option<String>, String> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let path = Path::parse(key).map_err(|e| format!("cannot presign `{key}`: {e}"))?;
        signer
            .signed_url(http::Method::GET, &path, expiry)
            .await
            .map(|url| Some(url.to_string()))
            .map_err(|e| format!("cannot presign `{key}`: {e}"))
    }
}

/// Opens the bucket `config` names, resolving its credentials through `secrets`.
pub async fn open(
    config: BucketConfig<'_>,
    secrets: &dyn SecretResolver,
) -> Result<Bucket, SourceError> {
    // Err only means a provider is already installed, which is what this line wants.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (scheme, rest) = config
        .url
        .split_once("://")
        .ok_or_else(|| SourceError::Config(format!("`{}` is not a bucket URL", config.url)))?;
    // The process's own authority: its environment (AWS_*, AZURE_*, GOOGLE_*), its workload
    // identity, its folders. Used where the configuration names no keys, and read beside
    // given keys only when the pipeline may use it, so another tenant's AWS_SESSION_TOKEN
    // or endpoint never joins a pipeline's own keys.
    let ambient_allowed = |what: &str| secrets.ambient(what).map_err(SourceError::from);
    let process_environment = ambient_allowed("the process's cloud environment").is_ok();
    let keys = match config.credentials {
        Some(credentials) => Some((
            secrets.resolve(&credentials.access_key_id).await?,
            secrets.resolve(&credentials.secret_access_key).await?,
        )),
        None => None,
    };
    let refuse = |what: &str| {
        SourceError::Config(format!(
            "`{what}` is not used with {scheme}:// buckets ({})",
            config.url
        ))
    };
    let built = |error: object_store::Error| {
        SourceError::Config(format!("cannot open {}: {error}", config.url))
    };

    if scheme == "file" {
        if config.endpoint.is_some() {
            return Err(refuse("endpoint"));
        }
        if keys.is_some() {
            return Err(refuse("credentials"));
        }
        ambient_allowed(&format!("the local folder {}", config.url))?;
        let folder = rest.trim_end_matches('/');
        let folder = if folder.is_empty() { "/" } else { folder };
        let store = LocalFileSystem::new_with_prefix(folder).map_err(built)?;
        return Ok(Bucket {
            store: Arc::new(store),
            signer: None,
            name: folder.to_string(),
            url_base: format!("file://{}", folder.trim_end_matches('/')),
            base_prefix: String::new(),
        });
    }

    let (bucket, base_prefix) = match rest.split_once('/') {
        Some((bucket, path)) => (bucket, path.trim_matches('/')),
        None => (rest, ""),
    };
    if bucket.is_empty() {
        return Err(SourceError::Config(format!(
            "`{}` names no bucket",
            config.url
        )));
    }
    let plain_http = |endpoint: &str| endpoint.starts_with("http://");
    let (store, signer): (Arc<dyn ObjectStore>, Arc<dyn Signer>) = match scheme {
        "s3" => {
            if keys.is_none() {
                ambient_allowed(&format!("the credential chain used for {}", config.url))?;
            }
            let builder = if process_environment {
                AmazonS3Builder::from_env()
            } else {
                AmazonS3Builder::new()
            };
            let mut builder = builder.with_bucket_name(bucket);
            if let Some(region) = config.region {
                builder = builder.with_region(region);
            }
            if let Some(endpoint) = config.endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(plain_http(endpoint));
            }
            if let Some((id, secret)) = keys {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
            }
            let s3 = Arc::new(builder.build().map_err(built)?);
            (s3.clone(), s3)
        }
        "gs" => {
            if config.endpoint.is_some() {
                return Err(refuse("endpoint"));
            }
            if keys.is_some() {
                return Err(SourceError::Config(format!(
                    "{}: gs:// buckets use a service account (GOOGLE_APPLICATION_CREDENTIALS or \
                     workload identity), not access keys",
                    config.url
                )));
            }
            ambient_allowed(&format!("the service account used for {}", config.url))?;
            let gcs = Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(built)?,
            );
            (gcs.clone(), gcs)
        }
        "az" => {
            // Azure names accounts, not regions; the access key pair is the account and its key.
            if keys.is_none() {
                ambient_allowed(&format!("the credential chain used for {}", config.url))?;
            }
            let builder = if process_environment {
                MicrosoftAzureBuilder::from_env()
            } else {
                MicrosoftAzureBuilder::new()
            };
            let mut builder = builder.with_container_name(bucket);
            if let Some(endpoint) = config.endpoint {
                builder = builder
                    .with_endpoint(endpoint.to_string())
                    .with_allow_http(plain_http(endpoint));
            }
            if let Some((account, key)) = keys {
                builder = builder.with_account(account).with_access_key(key);
            }
            let azure = Arc::new(builder.build().map_err(built)?);
            (azure.clone(), azure)
        }
        other => {
            return Err(SourceError::Config(format!(
                "`{other}://` is not an object store; use s3://, gs://, az:// or file://"
            )));
        }
    };
    Ok(Bucket {
        store,
        signer: Some(signer),
        name: bucket.to_string(),
        url_base: format!("{scheme}://{bucket}"),
        base_prefix: base_prefix.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{EnvSecrets, SecretValue};

    fn config(url: &str) -> BucketConfig<'_> {
        BucketConfig {
            url,
            endpoint: None,
            region: Some("us-east-1"),
            credentials: None,
        }
    }

    #[tokio::test]
    async fn the_path_of_a_bucket_url_is_a_key_prefix() {
        let bucket = open(config("s3://photos/incoming/"), &EnvSecrets)
            .await
            .unwrap();
        assert_eq!(bucket.name(), "photos");
        assert_eq!(bucket.key_prefix(None), "incoming/");
        assert_eq!(bucket.key_prefix(Some("2026-")), "incoming/2026-");
        assert_eq!(bucket.object_url("a b.jpg"), "s3://photos/a b.jpg");
        let plain = open(config("s3://photos"), &EnvSecrets).await.unwrap();
        assert_eq!(plain.key_prefix(None), "");
        assert_eq!(plain.key_prefix(Some("/in/")), "in/");
    }

    #[tokio::test]
    async fn a_local_folder_is_named_by_its_path_and_has_nothing_to_presign() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/", dir.path().display());
        let bucket = open(config(&url), &EnvSecrets).await.unwrap();
        assert_eq!(bucket.name(), dir.path().to_str().unwrap());
        assert_eq!(
            bucket.object_url("x.jpg"),
            format!("file://{}/x.jpg", dir.path().display())
        );
        assert_eq!(
            bucket.presign("x.jpg", Duration::from_secs(60)).await,
            Ok(None)
        );
    }

    #[tokio::test]
    async fn settings_that_do_not_apply_are_refused() {
        let keys = ObjectStoreCredentials {
            access_key_id: SecretValue::Env("SPATE_TEST_UNSET_ID".into()),
            secret_access_key: SecretValue::Env("SPATE_TEST_UNSET_SECRET".into()),
        };
        let missing = open(
            BucketConfig {
                credentials: Some(&keys),
                ..config("s3://b")
            },
            &EnvSecrets,
        )
        .await;
        assert!(matches!(missing, Err(SourceError::Secret(_))));
        let endpoint = open(
            BucketConfig {
                endpoint: Some("http://127.0.0.1:1"),
                ..config("gs://b")
            },
            &EnvSecrets,
        )
        .await;
        assert!(matches!(endpoint, Err(SourceError::Config(m)) if m.contains("endpoint")));
        let scheme = open(config("ftp://b"), &EnvSecrets).await;
        assert!(matches!(scheme, Err(SourceError::Config(m)) if m.contains("not an object store")));
    }
}
