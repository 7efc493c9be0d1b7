//! Container logs: one file per container, and the kubelet-style HTTP endpoint the API
//! server proxies `kubectl logs` to.
//!
//! Lines are stored as the CRI does (`<RFC 3339 time> <stream> F <line>`), so the server can
//! honour `timestamps`, `sinceSeconds` and `tailLines`; a watch channel per container tells
//! followers (`follow=true`) that bytes were appended or that the container stopped, so
//! following costs nothing while a container is quiet. A restarted container appends to the
//! same file, so `previous=true` is not distinguished.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::stream;
use jiff::Timestamp;
use parking_lot::RwLock;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

/// `(namespace, pod, container)`.
pub(crate) type ContainerKey = (String, String, String);

/// Where one container's log lives and how followers learn about new lines.
#[derive(Debug)]
pub(crate) struct ContainerLog {
    path: PathBuf,
    /// Bytes written so far, and whether the container has stopped writing.
    progress: watch::Sender<(u64, bool)>,
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
}

impl ContainerLog {
    /// Appends one line from `stream` (`stdout` or `stderr`).
    pub(crate) async fn append(&self, stream: &str, line: &[u8]) -> std::io::Result<()> {
        let mut record = format!("{} {stream} F ", Timestamp::now()).into_bytes();
        record.extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
        record.push(b'\n');
        let mut file = self.file.lock().await;
        if file.is_none() {
            *file = Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?,
            );
        }
        if let Some(file) = file.as_mut() {
            file.write_all(&record).await?;
            file.flush().await?;
        }
        let written = record.len() as u64;
        self.progress.send_modify(|(bytes, _)| *bytes += written);
        Ok(())
    }

    /// The container stopped: followers end once they have read everything.
    pub(crate) fn close(&self) {
        self.progress.send_modify(|(_, done)| *done = true);
    }

    /// A restarted container writes again.
    pub(crate) fn reopen(&self) {
        self.progress.send_modify(|(_, done)| *done = false);
    }
}

/// All container logs of one node.
#[derive(Debug)]
pub(crate) struct LogStore {
    root: PathBuf,
    containers: RwLock<HashMap<ContainerKey, Arc<ContainerLog>>>,
}

impl LogStore {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self {
            root,
            containers: RwLock::new(HashMap::new()),
        }
    }

    /// The log of a container, created (with its directory) on first use.
    pub(crate) async fn open(
        &self,
        key: &ContainerKey,
        pod_uid: &str,
    ) -> std::io::Result<Arc<ContainerLog>> {
        if let Some(log) = self.containers.read().get(key) {
            return Ok(log.clone());
        }
        let dir = self.pod_dir(&key.0, &key.1, pod_uid);
        tokio::fs::create_dir_all(&dir).await?;
        let log = Arc::new(ContainerLog {
            path: dir.join(format!("{}.log", key.2)),
            progress: watch::channel((0, false)).0,
            file: tokio::sync::Mutex::new(None),
        });
        Ok(self
            .containers
            .write()
            .entry(key.clone())
            .or_insert(log)
            .clone())
    }

    /// The directory holding a pod's logs.
    pub(crate) fn pod_dir(&self, namespace: &str, pod: &str, uid: &str) -> PathBuf {
        self.root.join(format!("{namespace}_{pod}_{uid}"))
    }

    /// Forgets a deleted pod's logs and removes its files.
    pub(crate) async fn remove_pod(&self, namespace: &str, pod: &str, uid: &str) {
        self.containers
            .write()
            .retain(|(ns, name, _), _| !(ns == namespace && name == pod));
        let dir = self.pod_dir(namespace, pod, uid);
        if let Err(error) = tokio::fs::remove_dir_all(&dir).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(dir = %dir.display(), %error, "could not remove pod log directory");
        }
    }

    fn get(&self, key: &ContainerKey) -> Option<Arc<ContainerLog>> {
        self.containers.read().get(key).cloned()
    }
}

/// Query parameters of `GET /containerLogs/...`, named as the kubelet names them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LogOptions {
    #[serde(default)]
    follow: bool,
    tail_lines: Option<usize>,
    #[serde(default)]
    timestamps: bool,
    limit_bytes: Option<usize>,
    since_seconds: Option<i64>,
    since_time: Option<Timestamp>,
}

/// Turns stored records into what the client asked for, skipping lines before `since`.
fn render(record: &str, options: &LogOptions, since: Option<Timestamp>) -> Option<String> {
    let (time, rest) = record.split_once(' ')?;
    let (_stream, rest) = rest.split_once(' ')?;
    let (_tag, line) = rest.split_once(' ')?;
    if let Some(since) = since
        && time.parse::<Timestamp>().is_ok_and(|t| t < since)
    {
        return None;
    }
    Some(if options.timestamps {
        format!("{time} {line}\n")
    } else {
        format!("{line}\n")
    })
}

/// State of a following response between chunks.
struct Follow {
    log: Arc<ContainerLog>,
    progress: watch::Receiver<(u64, bool)>,
    offset: u64,
    partial: String,
    options: LogOptions,
    since: Option<Timestamp>,
    remaining: usize,
}

async fn read_from(path: &Path, offset: u64) -> std::io::Result<String> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(error) => return Err(error),
    };
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn truncate(mut text: String, remaining: &mut usize) -> String {
    if text.len() > *remaining {
        let mut cut = *remaining;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    *remaining -= text.len();
    text
}

async fn container_logs(
    State(store): State<Arc<LogStore>>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(options): Query<LogOptions>,
) -> Response {
    let Some(log) = store.get(&(namespace.clone(), pod.clone(), container.clone())) else {
        let message =
            format!("container {container} of pod {namespace}/{pod} has no logs on this node");
        return (StatusCode::NOT_FOUND, message).into_response();
    };
    let progress = log.progress.subscribe();
    let content = match read_from(&log.path, 0).await {
        Ok(content) => content,
        Err(error) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
        }
    };
    // Only whole records count; a record being appended is picked up by the follower.
    let complete = content.rfind('\n').map_or(0, |end| end + 1);
    let since = options.since_time.or_else(|| {
        options
            .since_seconds
            .map(|s| Timestamp::now() - jiff::SignedDuration::from_secs(s))
    });
    let mut lines: Vec<String> = content[..complete]
        .lines()
        .filter_map(|record| render(record, &options, since))
        .collect();
    if let Some(tail) = options.tail_lines {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    let mut remaining = options.limit_bytes.unwrap_or(usize::MAX);
    let head = truncate(lines.concat(), &mut remaining);
    if !options.follow || remaining == 0 {
        return head.into_response();
    }
    let follow = Follow {
        log,
        progress,
        offset: complete as u64,
        partial: String::new(),
        options,
        since,
        remaining,
    };
    let first = stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
    let rest = stream::unfold(Some(follow), |state| async move {
        let mut state = state?;
        loop {
            let (written, done) = *state.progress.borrow_and_update();
            if written > state.offset {
                let chunk = match read_from(&state.log.path, state.offset).await {
                    Ok(chunk) => chunk,
                    Err(error) => return Some((Err(error), None)),
                };
                state.offset += chunk.len() as u64;
                state.partial.push_str(&chunk);
                let complete = state.partial.rfind('\n').map_or(0, |end| end + 1);
                let records: String = state.partial.drain(..complete).collect();
                let text: String = records
                    .lines()
                    .filter_map(|record| render(record, &state.options, state.since))
                    .collect();
                let text = truncate(text, &mut state.remaining);
                let finished = state.remaining == 0;
                if !text.is_empty() {
                    return Some((Ok(Bytes::from(text)), (!finished).then_some(state)));
                }
                if finished {
                    return None;
                }
                continue;
            }
            if done {
                return None;
            }
            if state.progress.changed().await.is_err() {
                return None;
            }
        }
    });
    Body::from_stream(futures::StreamExt::chain(first, rest)).into_response()
}

/// The log server's routes: `GET /containerLogs/{namespace}/{pod}/{container}`.
pub(crate) fn router(store: Arc<LogStore>) -> Router {
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .with_state(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_records_with_or_without_timestamps_and_skips_old_ones() {
        let record = "2026-01-01T00:00:05Z stdout F hello world";
        let plain = LogOptions::default();
        assert_eq!(
            render(record, &plain, None).as_deref(),
            Some("hello world\n")
        );
        let stamped = LogOptions {
            timestamps: true,
            ..LogOptions::default()
        };
        assert_eq!(
            render(record, &stamped, None).as_deref(),
            Some("2026-01-01T00:00:05Z hello world\n")
        );
        let later: Timestamp = "2026-01-01T00:00:06Z".parse().expect("a timestamp");
        assert_eq!(render(record, &plain, Some(later)), None);
    }

    #[test]
    fn truncation_respects_the_byte_limit_and_char_boundaries() {
        let mut remaining = 4;
        assert_eq!(truncate("héllo".to_owned(), &mut remaining), "hél");
        assert_eq!(remaining, 0);
    }
}
