//! Reading the image and reaching object stores.
//!
//! An event's `presignedUrl` is fetched with a plain HTTP GET (it carries its own
//! authorisation, so the pod needs no credentials). Otherwise `url` is opened with
//! `object_store`: `file://`, `s3://` (credentials, region and endpoint from the usual `AWS_*`
//! variables, `AWS_ENDPOINT_URL` for S3-compatible servers), and `gs://` / `az://` with their
//! own variables. A presigned URL's query string is its credential: messages print URLs
//! through [`display_url`], which drops it.

use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::failure::{Failure, chain};
use crate::input::{Env, ObjectEvent};

/// The largest object read, so a huge or endless object fails cleanly instead of exhausting
/// the pod's memory.
pub const MAX_OBJECT_BYTES: u64 = 256 * 1024 * 1024;

/// Attempts at a presigned GET that failed to connect or got a 5xx or 429 answer.
const HTTP_ATTEMPTS: u32 = 3;

/// `url` safe to print: without its query string, fragment or user info.
pub fn display_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.has_host() || parsed.scheme() == "file" => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            // `Url` re-encodes the path; the original spelling is easier to recognise.
            let path_end = url.find(['?', '#']).unwrap_or(url.len());
            let original = &url[..path_end];
            if !original.contains('@') {
                return original.to_string();
            }
            parsed.to_string()
        }
        _ => {
            let end = url.find(['?', '#']).unwrap_or(url.len());
            let shown = &url[..end];
            // An unparsable URL may still hold `user:password@`.
            match (shown.find("://"), shown.rfind('@')) {
                (Some(scheme_end), Some(at)) if at > scheme_end => {
                    format!("{}{}", &shown[..scheme_end + 3], &shown[at + 1..])
                }
                _ => shown.to_string(),
            }
        }
    }
}

/// The bytes of the event's object.
pub async fn read_object(event: &ObjectEvent, env: Env<'_>) -> Result<Vec<u8>, Failure> {
    if let Some(presigned) = &event.presigned_url {
        return http_get(presigned, &display_url(presigned)).await;
    }
    let Some(url) = &event.url else {
        return Err(Failure::input("the event has no URL to read"));
    };
    let shown = display_url(url);
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("http" | "https") => http_get(url, &shown).await,
        _ => store_get(url, &event.key, env, &shown).await,
    }
}

/// Installs `ring` as the process's rustls provider unless one is installed already: reqwest
/// (ours and object_store's) is built without a provider of its own and would panic without
/// one. `main` does it at start; this keeps every caller safe, tests included.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what this wants.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the store a URL names, and the path it names in it.
///
/// `object_store` keeps the URL's path percent-encoded; it is decoded here so that a folder or
/// prefix with a space (`%20`) names the real one.
pub fn open_store(url: &Url, env: Env<'_>) -> Result<(Box<dyn ObjectStore>, Path), String> {
    install_crypto_provider();
    let (store, path) =
        object_store::parse_url_opts(url, store_options(env)).map_err(|e| chain(&e))?;
    let path = Path::from_url_path(path.as_ref()).map_err(|e| chain(&e))?;
    Ok((store, path))
}

/// The store options from the environment: every `AWS_*`, `GOOGLE_*` and `AZURE_*` variable
/// (each builder takes the ones it knows), and plain HTTP allowed when the S3 endpoint is a
/// loopback address (a local S3-compatible server). Elsewhere `AWS_ALLOW_HTTP=true` does it.
pub fn store_options(env: Env<'_>) -> Vec<(String, String)> {
    let mut options: Vec<(String, String)> = env
        .iter()
        .filter(|(name, _)| {
            ["AWS_", "GOOGLE_", "AZURE_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .map(|(name, value)| (name.to_ascii_lowercase(), value.to_string()))
        .collect();
    let loopback_http = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|name| env.get(name))
        .is_some_and(is_loopback_http);
    if loopback_http && !options.iter().any(|(name, _)| name == "aws_allow_http") {
        options.push(("aws_allow_http".to_string(), "true".to_string()));
    }
    if !options
        .iter()
        .any(|(name, _)| name == "aws_region" || name == "aws_default_region")
    {
        // object_store's own default, said explicitly: S3-compatible servers need one.
        options.push(("aws_region".to_string(), "us-east-1".to_string()));
    }
    options
}

fn is_loopback_http(endpoint: &str) -> bool {
    let Ok(url) = Url::parse(endpoint) else {
        return false;
    };
    url.scheme() == "http"
        && match url.host() {
            Some(url::Host::Domain(domain)) => domain == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
}

/// Where an event's object is: the store and the path in it.
///
/// Events carry `url` as `<bucket URL>/<key>` with the key as it is (not percent-encoded), so
/// when the URL ends with the key the bucket URL is opened and the key used as the path;
/// otherwise the URL is read as a standard (percent-encoded) URL.
fn locate(url: &str, key: &str, env: Env<'_>) -> Result<(Box<dyn ObjectStore>, Path), String> {
    if let Some(base) = url
        .strip_suffix(key)
        .and_then(|base| base.strip_suffix('/'))
        .filter(|base| base.contains("://"))
        && let Ok(key_path) = Path::parse(key)
        && let Ok(base_url) = Url::parse(base)
    {
        let (store, prefix) = open_store(&base_url, env)?;
        let path: Path = prefix.parts().chain(key_path.parts()).collect();
        return Ok((store, path));
    }
    let parsed = Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    open_store(&parsed, env)
}

async fn store_get(url: &str, key: &str, env: Env<'_>, shown: &str) -> Result<Vec<u8>, Failure> {
    let (store, path) =
        locate(url, key, env).map_err(|e| Failure::read(format!("cannot read {shown}: {e}")))?;
    let result = store.get(&path).await.map_err(|e| match e {
        object_store::Error::NotFound { .. } => {
            Failure::read(format!("cannot read {shown}: no such object"))
        }
        other => Failure::read(format!("cannot read {shown}: {}", chain(&other))),
    })?;
    check_size(result.meta.size, shown)?;
    let bytes = result
        .bytes()
        .await
        .map_err(|e| Failure::read(format!("cannot read {shown}: {}", chain(&e))))?;
    Ok(bytes.to_vec())
}

fn check_size(size: u64, shown: &str) -> Result<(), Failure> {
    if size > MAX_OBJECT_BYTES {
        return Err(Failure::image(format!(
            "{shown} is {} MiB, more than the {} MiB this worker reads",
            size / (1024 * 1024),
            MAX_OBJECT_BYTES / (1024 * 1024)
        )));
    }
    Ok(())
}

/// GET `url`; `shown` is the URL as messages print it. reqwest's own errors name the whole
/// URL, query string included, so they are printed `without_url()`.
async fn http_get(url: &str, shown: &str) -> Result<Vec<u8>, Failure> {
    let fail = |what: String| Failure::read(format!("cannot read {shown}: {what}"));
    install_crypto_provider();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| fail(chain(&e.without_url())))?;
    let mut attempt = 1;
    let mut response = loop {
        let retry = match client.get(url).send().await {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    break response;
                }
                let failure = fail(format!("HTTP {status}"));
                if !(status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS) {
                    return Err(failure);
                }
                failure
            }
            Err(e) if e.is_connect() || e.is_timeout() => fail(chain(&e.without_url())),
            Err(e) => return Err(fail(chain(&e.without_url()))),
        };
        if attempt >= HTTP_ATTEMPTS {
            return Err(retry);
        }
        tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)).await;
        attempt += 1;
    };
    if let Some(length) = response.content_length() {
        check_size(length, shown)?;
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| fail(chain(&e.without_url())))?
    {
        body.extend_from_slice(&chunk);
        check_size(body.len() as u64, shown)?;
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Environment;

    #[test]
    fn printed_urls_never_carry_a_query_string_or_user_info() {
        let cases = [
            (
                "https://b.s3.amazonaws.com/photos/a.jpg?X-Amz-Signature=abc&X-Amz-Credential=k",
                "https://b.s3.amazonaws.com/photos/a.jpg",
            ),
            ("s3://bucket/in/a b.jpg", "s3://bucket/in/a b.jpg"),
            ("file:///tmp/in/a.jpg", "file:///tmp/in/a.jpg"),
            ("https://user:secret@host/a.jpg?sig=1", "https://host/a.jpg"),
            ("https://host/a.jpg#sig=1", "https://host/a.jpg"),
            ("not a url?token=1", "not a url"),
            ("weird://user:pw@ho st/a?x=1", "weird://ho st/a"),
        ];
        for (url, expected) in cases {
            let shown = display_url(url);
            assert_eq!(shown, expected, "{url}");
        }
    }

    #[test]
    fn plain_http_is_allowed_for_loopback_endpoints_only() {
        let allowed = |endpoint: &str| {
            let env = Environment::of(&[("AWS_ENDPOINT_URL", endpoint)]);
            store_options(&env)
                .iter()
                .any(|(k, v)| k == "aws_allow_http" && v == "true")
        };
        assert!(allowed("http://127.0.0.1:9090"));
        assert!(allowed("http://localhost:9000"));
        assert!(allowed("http://[::1]:9000"));
        assert!(!allowed("http://minio.storage.svc:9000"));
        assert!(!allowed("https://127.0.0.1:9000"));
        assert!(!allowed("not a url"));
    }

    #[test]
    fn a_region_is_always_given() {
        let env = Environment::of(&[]);
        assert!(
            store_options(&env)
                .iter()
                .any(|(k, v)| k == "aws_region" && v == "us-east-1")
        );
    }

    #[test]
    fn an_event_url_is_the_bucket_url_and_the_key_as_it_is() {
        let env = Environment::of(&[]);
        let (_, path) =
            locate("file:///tmp/in box/photos/a b.jpg", "photos/a b.jpg", &env).unwrap();
        assert_eq!(path.as_ref(), "tmp/in box/photos/a b.jpg");
        let (_, path) = locate("s3://bucket/in/100%.jpg", "in/100%.jpg", &env).unwrap();
        assert_eq!(path.as_ref(), "in/100%.jpg");
        // A URL that does not end with the key is read as a standard URL.
        let (_, path) = locate("s3://bucket/in/a%20b.jpg", "other.jpg", &env).unwrap();
        assert_eq!(path.as_ref(), "in/a b.jpg");
    }

    #[test]
    fn an_unknown_scheme_is_refused() {
        let env = Environment::of(&[]);
        assert!(locate("ftp://host/a.jpg", "a.jpg", &env).is_err());
        assert!(locate("photos/a.jpg", "photos/a.jpg", &env).is_err());
    }
}
