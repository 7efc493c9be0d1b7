//! The HTTPS front: TLS handshakes, authentication, fault injection, accounting, and the
//! dispatch of each request to its handler.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::ServerState;
use super::accounting::RequestKey;
use super::error::ApiError;
use super::faults::Faults;
use super::routes::{self, Query, Route, Target};
use super::table::{self, IncludeObject, TableView};
use super::{discovery, logs, objects, protobuf, reads, watch};

/// Errors a streamed response body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body.
pub type Body = BoxBody<Bytes, BodyError>;

/// Largest request body accepted, as etcd's default request limit.
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// A client that connects but never completes a handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections until shutdown.
pub async fn serve(state: Arc<ServerState>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(state.clone(), acceptor.clone(), stream));
            }
            Err(error) => tracing::warn!(%error, "accept failed"),
        }
    }
}

async fn serve_connection(state: Arc<ServerState>, acceptor: TlsAcceptor, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    let cert_user = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| state.tls.client_user(cert));
    let service_state = state.clone();
    let service = service_fn(move |request| {
        let state = service_state.clone();
        let cert_user = cert_user.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(state, cert_user, request).await) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        _ = state.shutdown.cancelled() => {}
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
    }
}

/// A JSON response.
pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes_response(code, "application/json", Bytes::from(bytes))
}

/// A JSON response serialized from any `Serialize` value.
pub fn serialized_response(code: u16, body: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(body) {
        Ok(bytes) => bytes_response(code, "application/json", Bytes::from(bytes)),
        Err(error) => error_response(&ApiError::internal(format!(
            "failed to encode the response: {error}"
        ))),
    }
}

/// A response with a fixed body.
pub fn bytes_response(code: u16, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The `Status` response for an error.
pub fn error_response(error: &ApiError) -> Response<Body> {
    let mut response = json_response(error.code, &error.to_status());
    if let Some(seconds) = error.details.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn bearer_user(state: &ServerState, request: &Request<Incoming>) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    state.tokens.read().get(token).cloned()
}

async fn handle(
    state: Arc<ServerState>,
    cert_user: Option<String>,
    request: Request<Incoming>,
) -> Response<Body> {
    let Some(user) = bearer_user(&state, &request).or(cert_user) else {
        return error_response(&ApiError::unauthorized());
    };
    let route = match routes::parse(request.uri().path(), &state.registry) {
        Ok(route) => route,
        Err(error) => return error_response(&error),
    };
    let query = Query::parse(request.uri().query());
    let result = match route {
        Route::Resource(target) => {
            return handle_resource(state, user, target, query, request).await;
        }
        Route::Faults => handle_faults(&state, request).await,
        Route::Requests => handle_requests(&state, request.method()),
        other => discovery::respond(&state, &other),
    };
    result.unwrap_or_else(|error| error_response(&error))
}

async fn handle_resource(
    state: Arc<ServerState>,
    user: String,
    target: Target,
    query: Query,
    request: Request<Incoming>,
) -> Response<Body> {
    let verb = target.verb(request.method(), &query);
    let delay = state.faults.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match state.faults.injected_error() {
        Some(error) => error_response(&error),
        None => dispatch(&state, &target, &query, verb, request)
            .await
            .unwrap_or_else(|error| error_response(&error)),
    };
    state.accounting.record(RequestKey {
        user,
        verb: verb.to_owned(),
        group: target.info.group.clone(),
        resource: target.info.plural.clone(),
        subresource: target.subresource.clone().unwrap_or_default(),
        namespace: target.namespace.clone().unwrap_or_default(),
        code: response.status().as_u16(),
    });
    response
}

/// Reads the request body, bounded.
pub async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let collected = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("failed to read the request body: {e}"),
            )
        })?;
    Ok(collected.to_bytes())
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Decodes an object body by its content type: JSON, YAML, or Kubernetes protobuf.
async fn read_object(request: Request<Incoming>) -> Result<Value, ApiError> {
    let content_type = content_type(&request);
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let body = read_body(request).await?;
    match essence.as_str() {
        "application/json" | "" => parse_json(&body),
        "application/yaml" => serde_saphyr::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        "application/vnd.kubernetes.protobuf" => protobuf::decode(&body),
        _ => Err(ApiError::unsupported_media_type(&content_type)),
    }
}

fn content_type(request: &Request<Incoming>) -> String {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned()
}

fn manager_name(query: &Query, request: &Request<Incoming>) -> String {
    if let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return manager.to_owned();
    }
    request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

async fn dispatch(
    state: &Arc<ServerState>,
    target: &Target,
    query: &Query,
    verb: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let sub = target.subresource.as_deref();
    let call = objects::Call {
        state,
        target,
        query,
        manager: manager_name(query, &request),
        dry_run: query.dry_run()?,
    };
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let table = table::wanted(accept).then(|| TableView {
        info: (*target.info).clone(),
        include: IncludeObject::parse(query.get("includeObject")),
    });
    match (verb, sub) {
        ("watch", None) => watch::respond(state.clone(), target, query, table),
        ("list", None) => reads::list(&call, table.as_ref()),
        ("get", Some("log")) => logs::respond(state, target, query).await,
        ("get", None | Some("status")) => reads::get(&call, table.as_ref()),
        ("create", Some("binding")) => objects::bind(&call, read_object(request).await?),
        ("create", None) if target.name.is_none() => {
            objects::create(&call, read_object(request).await?)
        }
        ("update", None | Some("status")) => objects::update(&call, read_object(request).await?),
        ("patch", None | Some("status")) => {
            let content_type = content_type(&request);
            objects::patch(&call, &content_type, &read_body(request).await?)
        }
        ("delete", None) => {
            let body = read_body(request).await?;
            let options = if body.is_empty() {
                None
            } else {
                Some(parse_json(&body)?)
            };
            objects::delete(&call, options.as_ref())
        }
        ("deletecollection", None) => objects::delete_collection(&call),
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({verb} {})",
            target.info.qualified()
        ))),
    }
}

async fn handle_faults(
    state: &ServerState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match *request.method() {
        Method::GET => Ok(json_response(
            200,
            &serde_json::to_value(state.faults.get()).unwrap_or_default(),
        )),
        Method::PUT => {
            let faults: Faults = serde_json::from_slice(&read_body(request).await?)
                .map_err(|e| ApiError::bad_request(format!("invalid faults: {e}")))?;
            faults.validate().map_err(ApiError::bad_request)?;
            state.faults.set(faults);
            Ok(json_response(
                200,
                &serde_json::to_value(state.faults.get()).unwrap_or_default(),
            ))
        }
        _ => Err(ApiError::method_not_allowed(
            "use GET or PUT on /sim/faults",
        )),
    }
}

fn handle_requests(state: &ServerState, method: &Method) -> Result<Response<Body>, ApiError> {
    match *method {
        Method::GET => Ok(json_response(
            200,
            &serde_json::to_value(state.accounting.snapshot()).unwrap_or_default(),
        )),
        Method::DELETE => {
            state.accounting.reset();
            Ok(json_response(200, &serde_json::json!([])))
        }
        _ => Err(ApiError::method_not_allowed(
            "use GET or DELETE on /sim/requests",
        )),
    }
}
