//! Watches: newline-delimited JSON events streamed over a chunked response.
//!
//! A watch starts either from the current state (synthetic `ADDED` events) or from a
//! resourceVersion (replay of the retained history; too old → an `ERROR` event carrying a
//! `410 Expired` Status, which makes clients relist). Selector-filtered watches turn objects
//! that stop matching into `DELETED` events, like a real API server. Bookmarks, timeouts,
//! streaming lists (`sendInitialEvents`) and injected watch drops are handled here.
//! A watcher that cannot keep up loses its watch instead of slowing writers down.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::ServerState;
use super::conversion;
use super::error::ApiError;
use super::http::{Body, BodyError};
use super::reads::selection;
use super::registry::ResourceInfo;
use super::routes::{Query, Target};
use super::selectors::Selection;
use super::store::{EventType, WatchEvent, WatchStart, event_line};
use super::table::TableView;

/// Lines buffered per watch connection before the watch waits on the client.
const CONNECTION_BUFFER: usize = 256;

/// How one watch renders and filters events.
struct WatchView {
    selection: Selection,
    /// Filtering needed at all (otherwise the shared pre-serialized line is sent as is).
    filtered: bool,
    info: ResourceInfo,
    api_version: String,
    /// Stored objects have another version or shape: lines must be re-rendered.
    relabel: bool,
    /// Events carry one-row tables instead of objects (`kubectl get --watch`).
    table: Option<TableView>,
}

impl WatchView {
    /// Whether the store's pre-serialized lines can be sent as they are.
    fn shares_lines(&self) -> bool {
        !self.relabel && self.table.is_none()
    }

    fn line(&self, event_type: &str, object: &Value) -> Bytes {
        if let Some(table) = &self.table {
            let object = conversion::present(&self.info, &self.api_version, object);
            let rv = object
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null);
            return event_line(
                event_type,
                &table.render(&[object], json!({"resourceVersion": rv})),
            );
        }
        if self.relabel {
            event_line(
                event_type,
                &conversion::present(&self.info, &self.api_version, object),
            )
        } else {
            event_line(event_type, object)
        }
    }

    /// The line a stored change becomes for this watch, if any.
    fn render(&self, event: &WatchEvent) -> Option<Bytes> {
        if !self.filtered && self.shares_lines() {
            return Some(event.line.clone());
        }
        let now = self.selection.matches(&event.object);
        let before = event.previous.as_deref().map(|p| self.selection.matches(p));
        let event_type = match (event.event_type, now, before) {
            (EventType::Added, true, _) => EventType::Added,
            (EventType::Deleted, true, _) => EventType::Deleted,
            (EventType::Modified, true, Some(true)) => EventType::Modified,
            (EventType::Modified, true, _) => EventType::Added,
            (EventType::Modified, false, Some(true)) => EventType::Deleted,
            _ => return None,
        };
        if event_type == event.event_type && self.shares_lines() {
            return Some(event.line.clone());
        }
        Some(self.line(event_type.as_str(), &event.object))
    }

    fn bookmark(&self, resource_version: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": resource_version.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line(
            "BOOKMARK",
            &json!({"kind": self.info.kind, "apiVersion": self.api_version, "metadata": metadata}),
        )
    }
}

/// Options of one watch request.
struct WatchRequest {
    from: Option<u64>,
    bookmarks: bool,
    send_initial_events: bool,
    lifetime: Option<Duration>,
}

fn parse_request(state: &ServerState, query: &Query) -> Result<WatchRequest, ApiError> {
    let from = match query
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && *rv != "0")
    {
        None => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let send_initial_events = query.flag("sendInitialEvents");
    if send_initial_events && query.get("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::new(
            422,
            "Invalid",
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    let timeout = query
        .number("timeoutSeconds")?
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.unsigned_abs()));
    let lifetime = match (timeout, state.faults.watch_lifetime()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(WatchRequest {
        // A streaming list starts from the current state whatever the resourceVersion.
        from: if send_initial_events { None } else { from },
        bookmarks: query.flag("allowWatchBookmarks"),
        send_initial_events,
        lifetime,
    })
}

fn streaming_response(receiver: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = ReceiverStream::new(receiver).map(|line| Ok::<_, BodyError>(Frame::data(line)));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn expired_line(message: &str) -> Bytes {
    event_line("ERROR", &ApiError::expired(message).to_status())
}

/// Answers a watch request with a streaming body.
pub fn respond(
    state: Arc<ServerState>,
    target: &Target,
    query: &Query,
    table: Option<TableView>,
) -> Result<Response<Body>, ApiError> {
    let request = parse_request(&state, query)?;
    let selection = selection(target, query)?;
    let view = WatchView {
        filtered: !selection.is_everything(),
        selection,
        info: (*target.info).clone(),
        api_version: target.api_version(),
        relabel: target.version != target.info.storage_version()
            || target.info.group != target.info.storage_group,
        table,
    };
    let (sender, receiver) = mpsc::channel(CONNECTION_BUFFER);
    let resource = target.resource_key();
    if request.from.is_some() && state.faults.take_watch_expiry() {
        let _ = sender.try_send(expired_line("injected fault: too old resource version"));
        return Ok(streaming_response(receiver));
    }
    match state.store.watch(&resource, request.from) {
        Err(too_old) => {
            let _ = sender.try_send(expired_line(&format!(
                "too old resource version: {} ({})",
                too_old.requested, too_old.oldest
            )));
        }
        Ok((start, live)) => {
            tokio::spawn(run(state, view, request, start, live, sender));
        }
    }
    Ok(streaming_response(receiver))
}

/// Feeds one watch until the client leaves, the watch times out or the server stops.
async fn run(
    state: Arc<ServerState>,
    view: WatchView,
    request: WatchRequest,
    start: WatchStart,
    mut live: broadcast::Receiver<Arc<WatchEvent>>,
    sender: mpsc::Sender<Bytes>,
) {
    let deadline = request.lifetime.map(|d| tokio::time::Instant::now() + d);
    let mut progress = match start {
        WatchStart::Current(objects, rv) => {
            for object in objects.iter().filter(|o| view.selection.matches(o)) {
                if sender.send(view.line("ADDED", object)).await.is_err() {
                    return;
                }
            }
            rv
        }
        WatchStart::History(events) => {
            let mut last = request.from.unwrap_or(0);
            for event in &events {
                last = event.resource_version;
                if let Some(line) = view.render(event)
                    && sender.send(line).await.is_err()
                {
                    return;
                }
            }
            last
        }
    };
    if request.send_initial_events && sender.send(view.bookmark(progress, true)).await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval(state.bookmark_interval);
    ticker.tick().await;
    loop {
        let sleep_until_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let line = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = sleep_until_deadline => return,
            _ = sender.closed() => return,
            _ = ticker.tick(), if request.bookmarks => {
                if progress == 0 {
                    continue;
                }
                view.bookmark(progress, false)
            }
            received = live.recv() => match received {
                Ok(event) => {
                    if event.resource_version <= progress {
                        continue;
                    }
                    progress = event.resource_version;
                    match view.render(&event) {
                        Some(line) => line,
                        None => continue,
                    }
                }
                // Too slow to keep up, or the resource is gone: end the watch; clients resume.
                Err(_) => return,
            },
        };
        if sender.send(line).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::selectors::LabelSelector;

    fn view() -> WatchView {
        WatchView {
            selection: Selection {
                namespace: None,
                labels: LabelSelector::parse("app=web").unwrap(),
                fields: Default::default(),
            },
            filtered: true,
            info: (*crate::apiserver::registry::Registry::with_builtins()
                .lookup("", "v1", "configmaps")
                .unwrap())
            .clone(),
            api_version: "v1".into(),
            relabel: false,
            table: None,
        }
    }

    fn event(event_type: EventType, now: &str, before: Option<&str>) -> WatchEvent {
        let cm = |app: &str| Arc::new(json!({"metadata": {"name": "c", "labels": {"app": app}}}));
        let object = cm(now);
        WatchEvent {
            event_type,
            resource_version: 5,
            line: event_line(event_type.as_str(), &object),
            object,
            previous: before.map(cm),
        }
    }

    fn rendered_type(line: Option<Bytes>) -> Option<String> {
        let line = line?;
        let value: Value = serde_json::from_slice(&line).unwrap();
        value["type"].as_str().map(str::to_owned)
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let view = view();
        let cases = [
            (
                event(EventType::Modified, "web", Some("web")),
                Some("MODIFIED"),
            ),
            (event(EventType::Modified, "web", Some("db")), Some("ADDED")),
            (
                event(EventType::Modified, "db", Some("web")),
                Some("DELETED"),
            ),
            (event(EventType::Modified, "db", Some("db")), None),
            (event(EventType::Added, "db", None), None),
            (
                event(EventType::Deleted, "web", Some("web")),
                Some("DELETED"),
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(rendered_type(view.render(&event)).as_deref(), expected);
        }
    }

    #[test]
    fn bookmarks_carry_progress_and_the_initial_events_marker() {
        let line = view().bookmark(42, true);
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["type"], "BOOKMARK");
        assert_eq!(value["object"]["metadata"]["resourceVersion"], "42");
        assert_eq!(
            value["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
    }
}
