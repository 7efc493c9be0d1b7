//! `pods/log`: proxied to the node agent that runs the pod, as the real API server proxies
//! to the kubelet. The node says where it listens in `status.daemonEndpoints` and
//! `status.addresses`; the agent serves `GET /containerLogs/{namespace}/{pod}/{container}`
//! with the same query parameters (`follow`, `tailLines`, `timestamps`, `previous`,
//! `limitBytes`, `sinceSeconds`), and its body is streamed back as `text/plain`.

use std::sync::Arc;

use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::ServerState;
use super::error::ApiError;
use super::http::{Body, BodyError};
use super::routes::{Query, Target};
use super::store::ObjectKey;

/// Query parameters the node agent understands.
const PASSED_THROUGH: &[&str] = &[
    "follow",
    "tailLines",
    "timestamps",
    "previous",
    "limitBytes",
    "sinceSeconds",
    "sinceTime",
];

fn container_name(pod: &Value, pod_name: &str, query: &Query) -> Result<String, ApiError> {
    let names: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    match query.get("container").filter(|c| !c.is_empty()) {
        Some(wanted) if names.contains(&wanted) => Ok(wanted.to_owned()),
        Some(wanted) => Err(ApiError::bad_request(format!(
            "container {wanted} is not valid for pod {pod_name}"
        ))),
        None if names.len() == 1 => Ok(names[0].to_owned()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {pod_name}, choose one of: [{}]",
            names.join(" ")
        ))),
    }
}

fn kubelet_address(node: &Value) -> Option<(String, u16)> {
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)?;
    let host = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|addresses| {
            addresses
                .iter()
                .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
                .and_then(|a| a.get("address").and_then(Value::as_str))
        })
        .unwrap_or("127.0.0.1");
    Some((host.to_owned(), u16::try_from(port).ok()?))
}

fn logs_path(namespace: &str, pod: &str, container: &str, query: &Query) -> String {
    let mut params = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in query
        .pairs()
        .filter(|(k, _)| PASSED_THROUGH.contains(&k.as_str()))
    {
        params.append_pair(key, value);
    }
    let params = params.finish();
    let path = format!("/containerLogs/{namespace}/{pod}/{container}");
    if params.is_empty() {
        path
    } else {
        format!("{path}?{params}")
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        404 => "NotFound",
        _ => "InternalError",
    }
}

/// Streams a container's log from its node.
pub async fn respond(
    state: &Arc<ServerState>,
    target: &Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let pod_name = target.name.as_deref().unwrap_or_default();
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let pod = state
        .store
        .get(&target.resource_key(), &target.object_key(pod_name))
        .ok_or_else(|| ApiError::not_found(&target.info, pod_name))?;
    let container = container_name(&pod, pod_name, query)?;
    let node_name = pod.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| {
        ApiError::bad_request(format!("container \"{container}\" in pod \"{pod_name}\" is waiting to start: ContainerCreating"))
    })?;
    let node = state
        .store
        .get(
            &(String::new(), "nodes".to_owned()),
            &ObjectKey::new("", node_name),
        )
        .ok_or_else(|| {
            ApiError::internal(format!(
                "node \"{node_name}\" of pod \"{pod_name}\" does not exist"
            ))
        })?;
    let (host, port) = kubelet_address(&node).ok_or_else(|| {
        ApiError::internal(format!(
            "node \"{node_name}\" does not report a kubelet endpoint"
        ))
    })?;
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::internal(format!(
            "Get \"http://{host}:{port}/containerLogs/{namespace}/{pod_name}/{container}\": {e}"
        ))
    };
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "log stream from node ended with an error");
        }
    });
    let request = Request::get(logs_path(namespace, pod_name, &container, query))
        .header(header::HOST, format!("{host}:{port}"))
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| unreachable(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(&e))?;
    let code = response.status().as_u16();
    if !response.status().is_success() {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = String::from_utf8_lossy(&body).trim().to_owned();
        return Err(ApiError::new(code, reason_for(code), message));
    }
    let body = response
        .into_body()
        .map_err(|e| -> BodyError { Box::new(e) })
        .boxed();
    let mut proxied = Response::new(body);
    proxied
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(proxied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn container_defaults_only_when_unambiguous() {
        let one = json!({"spec": {"containers": [{"name": "main"}]}});
        assert_eq!(
            container_name(&one, "p", &Query::default()).unwrap(),
            "main"
        );
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let err = container_name(&two, "p", &Query::default()).unwrap_err();
        assert_eq!(
            err.message,
            "a container name must be specified for pod p, choose one of: [a b]"
        );
        assert_eq!(
            container_name(&two, "p", &Query::parse(Some("container=c")))
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn node_address_and_query_pass_through() {
        let node = json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}], "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        assert_eq!(
            kubelet_address(&node),
            Some(("127.0.0.1".to_owned(), 10250))
        );
        let path = logs_path("ns", "p", "c", &Query::parse(Some("follow=true&pretty=1")));
        assert_eq!(path, "/containerLogs/ns/p/c?follow=true");
    }
}
