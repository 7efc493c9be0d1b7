//! Request paths and query parameters, parsed into what the handlers act on.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;

use super::error::ApiError;
use super::registry::{Registry, ResourceInfo};
use super::store::{ObjectKey, ResourceKey};

/// What a path addresses.
#[derive(Debug)]
pub enum Route {
    /// `/version`.
    Version,
    /// `/healthz`, `/livez`, `/readyz`.
    Health,
    /// `/api`.
    CoreVersions,
    /// `/apis`.
    Groups,
    /// `/apis/<group>`.
    Group(String),
    /// `/api/v1` or `/apis/<group>/<version>`.
    GroupVersion(String, String),
    /// `/openapi/v3`.
    OpenApiIndex,
    /// `/openapi/v3/<group-version path>`.
    OpenApiDocument(String),
    /// `/sim/faults`.
    Faults,
    /// `/sim/requests`.
    Requests,
    /// A resource, collection, object or subresource.
    Resource(Target),
}

/// A resource request's target.
#[derive(Debug, Clone)]
pub struct Target {
    /// The resource.
    pub info: Arc<ResourceInfo>,
    /// Requested version.
    pub version: String,
    /// Namespace from the path.
    pub namespace: Option<String>,
    /// Object name from the path.
    pub name: Option<String>,
    /// Subresource from the path.
    pub subresource: Option<String>,
    /// Legacy `/watch/` path prefix.
    pub watch_path: bool,
}

impl Target {
    /// Store key of the resource.
    pub fn resource_key(&self) -> ResourceKey {
        (self.info.storage_group.clone(), self.info.plural.clone())
    }

    /// Store key of the named object.
    pub fn object_key(&self, name: &str) -> ObjectKey {
        let namespace = if self.info.namespaced {
            self.namespace.as_deref().unwrap_or("")
        } else {
            ""
        };
        ObjectKey::new(namespace, name)
    }

    /// `apiVersion` objects are served with.
    pub fn api_version(&self) -> String {
        self.info.api_version(&self.version)
    }

    /// The Kubernetes verb for an HTTP method on this target.
    pub fn verb(&self, method: &Method, query: &Query) -> &'static str {
        let collection = self.name.is_none();
        match *method {
            Method::GET if self.watch_path || (collection && query.flag("watch")) => "watch",
            Method::GET if collection => "list",
            Method::GET => "get",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if collection => "deletecollection",
            Method::DELETE => "delete",
            _ => "unknown",
        }
    }
}

/// Decoded query parameters.
#[derive(Debug, Default, Clone)]
pub struct Query(HashMap<String, String>);

impl Query {
    /// Parses a raw query string.
    pub fn parse(raw: Option<&str>) -> Self {
        let pairs = url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()).into_owned();
        Self(pairs.collect())
    }

    /// A parameter's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A boolean parameter (`1`, `true`).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "True"))
    }

    /// An integer parameter; a malformed value is a bad request.
    pub fn number(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid value for {key}: {v:?}"))),
        }
    }

    /// `dryRun=All`.
    pub fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "Invalid dry run value: {other}"
            ))),
        }
    }

    /// The raw pairs, for passing through to the node.
    pub fn pairs(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }
}

fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses a request path.
pub fn parse(path: &str, registry: &Registry) -> Result<Route, ApiError> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["version"] => Ok(Route::Version),
        ["healthz" | "livez" | "readyz"] => Ok(Route::Health),
        ["api"] => Ok(Route::CoreVersions),
        ["api", "v1"] => Ok(Route::GroupVersion(String::new(), "v1".into())),
        ["api", "v1", rest @ ..] => resource("", "v1", rest, registry),
        ["apis"] => Ok(Route::Groups),
        ["apis", group] => Ok(Route::Group((*group).to_owned())),
        ["apis", group, version] => Ok(Route::GroupVersion(
            (*group).to_owned(),
            (*version).to_owned(),
        )),
        ["apis", group, version, rest @ ..] => resource(group, version, rest, registry),
        ["openapi", "v3"] => Ok(Route::OpenApiIndex),
        ["openapi", "v3", rest @ ..] => Ok(Route::OpenApiDocument(rest.join("/"))),
        ["sim", "faults"] => Ok(Route::Faults),
        ["sim", "requests"] => Ok(Route::Requests),
        _ => Err(ApiError::no_route()),
    }
}

fn resource(
    group: &str,
    version: &str,
    rest: &[&str],
    registry: &Registry,
) -> Result<Route, ApiError> {
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let namespace_subresource = matches!(rest, ["namespaces", _, "status" | "finalize"]);
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() && !namespace_subresource => {
            (Some((*ns).to_owned()), rest)
        }
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let info = registry
        .lookup(group, version, plural)
        .ok_or_else(ApiError::no_route)?;
    if namespace.is_some() && !info.namespaced {
        return Err(ApiError::no_route());
    }
    if let Some(sub) = subresource {
        let known = (sub == "status" && info.status_subresource)
            || info.extra_subresources.iter().any(|s| s == sub);
        if !known {
            return Err(ApiError::no_route());
        }
    }
    Ok(Route::Resource(Target {
        info,
        version: version.to_owned(),
        namespace,
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
        watch_path,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Target {
        match parse(path, &Registry::with_builtins()).unwrap() {
            Route::Resource(t) => t,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths_resolve_to_resources() {
        let t = target("/api/v1/namespaces/default/pods/p/log");
        assert_eq!(
            (
                t.info.plural.as_str(),
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            ("pods", Some("default"), Some("p"), Some("log"))
        );
        let t = target("/api/v1/namespaces/default/status");
        assert_eq!(
            (
                t.info.plural.as_str(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            ("namespaces", Some("default"), Some("status"))
        );
        let t = target("/apis/batch/v1/watch/namespaces/x/jobs");
        assert!(t.watch_path && t.name.is_none());
        let t = target("/api/v1/pods");
        assert!(t.namespace.is_none());
        let registry = Registry::with_builtins();
        assert!(parse("/api/v1/namespaces/x/nodes", &registry).is_err());
        assert!(parse("/api/v1/namespaces/x/configmaps/c/status", &registry).is_err());
        assert!(parse("/apis/nope/v1/things", &registry).is_err());
    }
}
