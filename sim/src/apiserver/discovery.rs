//! Discovery: `/version`, `/api`, `/apis` and the per-group-version resource lists.
//!
//! Only the legacy (non-aggregated) discovery documents are served, with a plain
//! `application/json` content type: clients that ask for aggregated discovery
//! (kubectl ≥ 1.26) list plain JSON as an acceptable fallback and switch to the legacy
//! walk when the response is not an `APIGroupDiscoveryList`. OpenAPI v2 is not served; the
//! small v3 index in [`super::openapi`] is served alongside discovery.

use bytes::Bytes;
use http::Response;
use serde_json::{Value, json};

use super::ServerState;
use super::error::ApiError;
use super::http::{Body, bytes_response, json_response};
use super::openapi;
use super::routes::Route;

/// The Kubernetes version the simulator reports.
const MINOR: &str = "32";

fn version() -> Value {
    json!({
        "major": "1",
        "minor": MINOR,
        "gitVersion": format!("v1.{MINOR}.0-spate-sim"),
        "gitCommit": "spate-sim",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Answers a discovery route.
pub fn respond(state: &ServerState, route: &Route) -> Result<Response<Body>, ApiError> {
    let body = match route {
        Route::Version => version(),
        Route::Health => return Ok(bytes_response(200, "text/plain", Bytes::from_static(b"ok"))),
        Route::CoreVersions => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": state.address.to_string()}],
        }),
        Route::Groups => {
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": state.registry.groups()})
        }
        Route::Group(name) => state.registry.group(name).ok_or_else(ApiError::no_route)?,
        Route::GroupVersion(group, version) => {
            if !state.registry.serves(group, version) {
                return Err(ApiError::no_route());
            }
            state.registry.resource_list(group, version)
        }
        Route::OpenApiIndex => openapi::index(&state.registry),
        Route::OpenApiDocument(path) => {
            openapi::group_version_document(&state.registry, path).ok_or_else(ApiError::no_route)?
        }
        Route::Faults | Route::Requests | Route::Resource(_) => return Err(ApiError::no_route()),
    };
    Ok(json_response(200, &body))
}
