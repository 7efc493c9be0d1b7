//! The write verbs: create, update, patch (incl. server-side apply), pod binding and delete.
//!
//! Every write goes through [`Store::mutate`](super::store::Store::mutate) so checks against
//! the current object (existence, resourceVersion preconditions, finalization) and the write
//! itself are one atomic step.

use std::sync::Arc;

use http::Response;
use serde_json::{Value, json};

use super::ServerState;
use super::admission::{self, meta_str, metadata_mut, now_rfc3339};
use super::conversion;
use super::deletion::{self, DeleteOptions};
use super::error::{ApiError, Cause};
use super::fields::{self, Manager};
use super::http::{Body, json_response};
use super::patch::{self, PatchType};
use super::reads;
use super::registry::{self, ResourceInfo};
use super::routes::{Query, Target};
use super::store::{Change, Committed, ObjectKey};

/// One API call's context.
pub struct Call<'a> {
    /// Shared server state.
    pub state: &'a Arc<ServerState>,
    /// What the path addresses.
    pub target: &'a Target,
    /// Query parameters.
    pub query: &'a Query,
    /// `fieldManager`, defaulted from the user agent.
    pub manager: String,
    /// `dryRun=All`.
    pub dry_run: bool,
}

impl Call<'_> {
    pub(super) fn info(&self) -> &ResourceInfo {
        &self.target.info
    }

    pub(super) fn name(&self) -> Result<&str, ApiError> {
        self.target
            .name
            .as_deref()
            .ok_or_else(|| ApiError::method_not_allowed("a resource name is required"))
    }

    fn field_manager<'m>(&'m self, time: &'m str, api_version: &'m str) -> Manager<'m> {
        Manager {
            name: &self.manager,
            api_version,
            subresource: self
                .target
                .subresource
                .as_deref()
                .filter(|s| *s == "status")
                .unwrap_or(""),
            time,
        }
    }

    fn status_only(&self) -> bool {
        self.target.subresource.as_deref() == Some("status")
    }
}

fn check_type_meta(call: &Call<'_>, object: &mut Value) -> Result<(), ApiError> {
    admission::check_shape(object)?;
    let api_version = call.target.api_version();
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    if let Some(given) = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .filter(|v| *v != api_version)
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({given}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(given) = map
        .get("kind")
        .and_then(Value::as_str)
        .filter(|k| *k != call.info().kind)
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({given}) does not match the expected kind ({})",
            call.info().kind
        )));
    }
    map.insert("apiVersion".into(), json!(api_version));
    map.insert("kind".into(), json!(call.info().kind));
    if call.query.get("fieldValidation") == Some("Strict") {
        admission::check_strict_fields(call.info(), object)?;
    }
    Ok(())
}

/// Sets `metadata.namespace` from the path, rejecting a contradicting body.
fn scope_namespace(call: &Call<'_>, object: &mut Value) -> Result<(), ApiError> {
    let info = call.info();
    let meta = metadata_mut(object)?;
    if !info.namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    let namespace = call
        .target
        .namespace
        .as_deref()
        .ok_or_else(|| ApiError::method_not_allowed("a namespace is required"))?;
    match meta.get("namespace").and_then(Value::as_str) {
        Some(given) if !given.is_empty() && given != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            meta.insert("namespace".into(), json!(namespace));
            Ok(())
        }
    }
}

fn ensure_namespace_exists(call: &Call<'_>) -> Result<(), ApiError> {
    let Some(namespace) = call
        .target
        .namespace
        .as_deref()
        .filter(|_| call.info().namespaced)
    else {
        return Ok(());
    };
    let key = (String::new(), "namespaces".to_owned());
    if call
        .state
        .store
        .get(&key, &ObjectKey::new("", namespace))
        .is_some()
    {
        return Ok(());
    }
    let mut err = ApiError::new(
        404,
        "NotFound",
        format!("namespaces \"{namespace}\" not found"),
    );
    err.details.name = Some(namespace.to_owned());
    err.details.kind = Some("namespaces".to_owned());
    Err(err)
}

/// Fills system metadata and runs create admission. Pure: no store access.
fn prepare_create(
    call: &Call<'_>,
    mut object: Value,
    record_manager: bool,
) -> Result<(String, Value), ApiError> {
    check_type_meta(call, &mut object)?;
    scope_namespace(call, &mut object)?;
    let info = call.info();
    let meta = metadata_mut(&mut object)?;
    if meta
        .get("resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|rv| !rv.is_empty())
    {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let name = match (
        meta.get("name").and_then(Value::as_str),
        meta.get("generateName").and_then(Value::as_str),
    ) {
        (Some(name), _) if !name.is_empty() => name.to_owned(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{}", admission::name_suffix()),
        _ => {
            return Err(ApiError::invalid(
                info,
                "",
                vec![Cause::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ));
        }
    };
    admission::validate_name(&name, info.kind == "Namespace")
        .map_err(|cause| ApiError::invalid(info, &name, vec![cause]))?;
    let uid = uuid::Uuid::new_v4().to_string();
    let now = now_rfc3339();
    meta.insert("name".into(), json!(name));
    meta.insert("uid".into(), json!(uid));
    meta.insert("creationTimestamp".into(), json!(now));
    for system in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "resourceVersion",
        "selfLink",
    ] {
        meta.remove(system);
    }
    if info.tracks_generation {
        meta.insert("generation".into(), json!(1));
    } else {
        meta.remove("generation");
    }
    if !info.builtin
        && info.status_subresource
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    admission::admit_create(info, &mut object, &uid)?;
    if record_manager {
        let api_version = call.target.api_version();
        fields::record_update(None, &mut object, &call.field_manager(&now, &api_version));
    }
    Ok((name, object))
}

/// Side effects of a stored object on the server itself (new resources, default accounts).
fn after_write(state: &ServerState, info: &ResourceInfo, committed: &Committed) {
    match (info.group.as_str(), info.kind.as_str()) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if let Some(served) = registry::info_from_crd(&committed.object) {
                state.registry.insert(served);
            }
        }
        ("", "Namespace") if committed.event == Some(super::store::EventType::Added) => {
            if let Some(namespace) = meta_str(&committed.object, "name") {
                create_default_service_account(state, namespace);
            }
        }
        _ => {}
    }
}

fn create_default_service_account(state: &ServerState, namespace: &str) {
    let account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": "default",
            "namespace": namespace,
            "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": now_rfc3339(),
        },
    });
    let key = (String::new(), "serviceaccounts".to_owned());
    let _ = state
        .store
        .mutate::<()>(&key, &ObjectKey::new(namespace, "default"), |current| {
            Ok(if current.is_some() {
                Change::Unchanged
            } else {
                Change::Put(account)
            })
        });
}

/// Creates a built-in namespace at start-up.
pub fn seed_namespace(state: &Arc<ServerState>, name: &str) {
    let Some(info) = state.registry.lookup("", "v1", "namespaces") else {
        return;
    };
    let target = Target {
        info,
        version: "v1".into(),
        namespace: None,
        name: None,
        subresource: None,
        watch_path: false,
    };
    let query = Query::default();
    let call = Call {
        state,
        target: &target,
        query: &query,
        manager: "spate-sim".into(),
        dry_run: false,
    };
    if let Err(error) = create(&call, json!({"metadata": {"name": name}})) {
        tracing::warn!(%error, namespace = name, "failed to seed namespace");
    }
}

/// POST: create an object.
pub fn create(call: &Call<'_>, body: Value) -> Result<Response<Body>, ApiError> {
    ensure_namespace_exists(call)?;
    let (name, object) = prepare_create(call, body, true)?;
    if call.dry_run {
        return Ok(json_response(201, &object));
    }
    let object = conversion::to_storage(call.info(), object);
    let info = call.info();
    let committed = call
        .state
        .store
        .mutate(
            &call.target.resource_key(),
            &call.target.object_key(&name),
            |current| {
                if current.is_some() {
                    Err(ApiError::already_exists(info, &name))
                } else {
                    Ok(Change::Put(object))
                }
            },
        )?
        .ok_or_else(|| ApiError::internal("create produced no object"))?;
    after_write(call.state, info, &committed);
    let api_version = call.target.api_version();
    let object = conversion::present(info, &api_version, &committed.object);
    Ok(json_response(201, &object))
}

/// The parts of an object that are neither metadata nor status: what `generation` tracks.
fn spec_of(object: &Value) -> Value {
    let mut spec = object.clone();
    if let Some(map) = spec.as_object_mut() {
        for key in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(key);
        }
    }
    spec
}

fn has_finalizers(object: &Value) -> bool {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// How an update treats ownership and missing resourceVersions.
#[derive(Clone, Copy)]
struct UpdateMode {
    /// PUT of a custom resource must carry a resourceVersion.
    require_resource_version: bool,
    /// Record the manager as an `Update` owner (server-side apply records itself).
    record_manager: bool,
}

/// Turns a proposed new object into the change to commit, given the current object.
fn prepare_update(
    call: &Call<'_>,
    current: &Value,
    mut new: Value,
    mode: UpdateMode,
) -> Result<Change, ApiError> {
    // Patches can produce anything; the result must still be a well-formed object.
    admission::check_shape(&new)?;
    let info = call.info();
    let name = meta_str(current, "name").unwrap_or_default().to_owned();
    let current_rv = meta_str(current, "resourceVersion").unwrap_or_default();
    match meta_str(&new, "resourceVersion").filter(|rv| !rv.is_empty()) {
        Some(rv) if rv != current_rv => return Err(ApiError::stale(info, &name)),
        None if mode.require_resource_version && !info.builtin => {
            return Err(ApiError::invalid(
                info,
                &name,
                vec![Cause::invalid(
                    "metadata.resourceVersion",
                    "0x0",
                    "must be specified for an update",
                )],
            ));
        }
        _ => {}
    }
    if call.status_only() {
        let mut merged = current.clone();
        match new.get("status") {
            Some(status) => merged["status"] = status.clone(),
            None => {
                if let Some(map) = merged.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        new = merged;
    } else if info.status_subresource {
        match current.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    }
    let current_meta = current
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let meta = metadata_mut(&mut new)?;
    for system in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "managedFields",
    ] {
        match current_meta.get(system) {
            Some(value) => meta.insert(system.into(), value.clone()),
            None => meta.remove(system),
        };
    }
    meta.insert("resourceVersion".into(), json!(current_rv));
    if info.tracks_generation && spec_of(current) != spec_of(&new) {
        let generation = current
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    admission::admit_update(info, current, &mut new)?;
    if current.pointer("/metadata/deletionTimestamp").is_some() && !has_finalizers(&new) {
        return Ok(Change::Delete);
    }
    if new == *current {
        return Ok(Change::Unchanged);
    }
    if mode.record_manager {
        let now = now_rfc3339();
        let api_version = call.target.api_version();
        fields::record_update(
            Some(current),
            &mut new,
            &call.field_manager(&now, &api_version),
        );
    }
    Ok(Change::Put(new))
}

/// Commits `decide` unless this is a dry run, in which case the would-be object is returned.
fn commit(
    call: &Call<'_>,
    name: &str,
    decide: impl FnOnce(Option<&Arc<Value>>) -> Result<Change, ApiError>,
) -> Result<(u16, Value), ApiError> {
    let info = call.info();
    let key = call.target.object_key(name);
    let mut dry_result = None;
    let mut created = false;
    let committed = call
        .state
        .store
        .mutate(&call.target.resource_key(), &key, |current| {
            created = current.is_none();
            let change = decide(current)?;
            if !call.dry_run {
                return Ok(change);
            }
            dry_result = Some(match change {
                Change::Put(object) => object,
                Change::Delete | Change::Unchanged => {
                    current.map(|c| (**c).clone()).unwrap_or_default()
                }
            });
            Ok(Change::Unchanged)
        })?;
    let api_version = call.target.api_version();
    if let Some(object) = dry_result {
        let object = conversion::present(info, &api_version, &object).into_owned();
        return Ok((if created { 201 } else { 200 }, object));
    }
    let committed = committed.ok_or_else(|| ApiError::not_found(info, name))?;
    after_write(call.state, info, &committed);
    let code = if committed.event == Some(super::store::EventType::Added) {
        201
    } else {
        200
    };
    Ok((
        code,
        conversion::present(info, &api_version, &committed.object).into_owned(),
    ))
}

/// PUT: replace an object (or its status).
pub fn update(call: &Call<'_>, mut body: Value) -> Result<Response<Body>, ApiError> {
    let name = call.name()?.to_owned();
    check_type_meta(call, &mut body)?;
    scope_namespace(call, &mut body)?;
    if let Some(given) = meta_str(&body, "name").filter(|n| *n != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let info = call.info();
    let body = conversion::to_storage(info, body);
    let mode = UpdateMode {
        require_resource_version: true,
        record_manager: true,
    };
    let (code, object) = commit(call, &name, |current| {
        let current = current.ok_or_else(|| ApiError::not_found(info, &name))?;
        prepare_update(call, current, body, mode)
    })?;
    Ok(json_response(code, &object))
}

fn parse_patch_body(patch_type: PatchType, body: &[u8]) -> Result<Value, ApiError> {
    let parsed = match patch_type {
        PatchType::Apply => serde_saphyr::from_slice::<Value>(body).map_err(|e| e.to_string()),
        _ => serde_json::from_slice::<Value>(body).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// PATCH: merge, JSON, strategic merge or server-side apply.
pub fn patch(call: &Call<'_>, content_type: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let name = call.name()?.to_owned();
    let info = call.info();
    let patch_type = PatchType::from_content_type(content_type)?;
    if patch_type == PatchType::Strategic && !info.builtin {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    let patch = parse_patch_body(patch_type, body)?;
    if patch_type == PatchType::Apply {
        return apply(call, &name, patch);
    }
    let mode = UpdateMode {
        require_resource_version: false,
        record_manager: true,
    };
    let (code, object) = commit(call, &name, |current| {
        let current = current.ok_or_else(|| ApiError::not_found(info, &name))?;
        let api_version = call.target.api_version();
        let mut patched = conversion::present(info, &api_version, current).into_owned();
        match patch_type {
            PatchType::Merge => patch::merge_patch(&mut patched, &patch),
            PatchType::Json => patch::json_patch(&mut patched, &patch)?,
            PatchType::Strategic | PatchType::Apply => patch::strategic_merge(&mut patched, &patch),
        }
        prepare_update(call, current, conversion::to_storage(info, patched), mode)
    })?;
    Ok(json_response(code, &object))
}

fn apply(call: &Call<'_>, name: &str, mut applied: Value) -> Result<Response<Body>, ApiError> {
    if call.query.get("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "PATCH request with apply content type must specify a fieldManager",
        ));
    }
    check_type_meta(call, &mut applied)?;
    scope_namespace(call, &mut applied)?;
    if meta_str(&applied, "name").is_some_and(|n| n != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            meta_str(&applied, "name").unwrap_or_default()
        )));
    }
    metadata_mut(&mut applied)?.insert("name".into(), json!(name));
    ensure_namespace_exists(call)?;
    let force = call.query.flag("force");
    let now = now_rfc3339();
    let api_version = call.target.api_version();
    let manager = call.field_manager(&now, &api_version);
    let mode = UpdateMode {
        require_resource_version: false,
        record_manager: false,
    };
    let (code, object) = commit(call, name, |current| match current {
        None => {
            let (_, created) = prepare_create(call, applied.clone(), false)?;
            let created = conversion::to_storage(call.info(), created);
            let owned = fields::apply(None, &applied, &manager, force)?;
            let mut created = created;
            if let Some(managed) = owned.pointer("/metadata/managedFields") {
                created["metadata"]["managedFields"] = managed.clone();
            }
            Ok(Change::Put(created))
        }
        Some(current) => {
            let presented = conversion::present(call.info(), &api_version, current);
            let merged = fields::apply(Some(&presented), &applied, &manager, force)?;
            let merged = conversion::to_storage(call.info(), merged);
            let managed = merged.pointer("/metadata/managedFields").cloned();
            let change = prepare_update(call, current, merged, mode)?;
            Ok(match change {
                Change::Put(mut object) => {
                    if let Some(managed) = managed {
                        object["metadata"]["managedFields"] = managed;
                    }
                    Change::Put(object)
                }
                other => other,
            })
        }
    })?;
    Ok(json_response(code, &object))
}

/// POST `pods/{name}/binding`: assigns a pod to a node, once.
pub fn bind(call: &Call<'_>, binding: Value) -> Result<Response<Body>, ApiError> {
    let name = call.name()?.to_owned();
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(call.info(), &name, vec![Cause::required("target.name", "")])
        })?
        .to_owned();
    if binding
        .pointer("/target/kind")
        .and_then(Value::as_str)
        .is_some_and(|k| !k.is_empty() && k != "Node")
    {
        return Err(ApiError::invalid(
            call.info(),
            &name,
            vec![Cause::not_supported("target.kind", "", &["Node"])],
        ));
    }
    let info = call.info();
    commit(call, &name, |current| {
        let current = current.ok_or_else(|| ApiError::not_found(info, &name))?;
        if let Some(assigned) = current
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{assigned}\""
                ),
            ));
        }
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is being deleted, cannot be assigned to a host"
                ),
            ));
        }
        let mut pod = (**current).clone();
        pod["spec"]["nodeName"] = json!(node);
        let condition = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now_rfc3339()});
        let status = pod
            .as_object_mut()
            .map(|p| p.entry("status").or_insert_with(|| json!({})));
        if let Some(status) = status.and_then(Value::as_object_mut) {
            let conditions = status.entry("conditions").or_insert_with(|| json!([]));
            if let Some(list) = conditions.as_array_mut() {
                list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
                list.push(condition);
            }
        }
        Ok(Change::Put(pod))
    })?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// Deletes one object per `options`, returning the object as last stored.
fn delete_one(call: &Call<'_>, name: &str, options: &DeleteOptions) -> Result<Value, ApiError> {
    let info = call.info();
    let mut deleted = false;
    let (_, object) = commit(call, name, |current| {
        let current = current.ok_or_else(|| ApiError::not_found(info, name))?;
        let change = deletion::decide(info, current, options)?;
        deleted = matches!(change, Change::Delete);
        Ok(change)
    })?;
    if deleted && !call.dry_run {
        deletion::after_delete(call.state, info, &object, options);
    }
    Ok(object)
}

/// DELETE of one object.
pub fn delete(call: &Call<'_>, body: Option<&Value>) -> Result<Response<Body>, ApiError> {
    let options = DeleteOptions::parse(call.query, body)?;
    let call = Call {
        dry_run: call.dry_run || options.dry_run,
        manager: call.manager.clone(),
        ..*call
    };
    let object = delete_one(&call, call.name()?, &options)?;
    Ok(json_response(200, &object))
}

/// DELETE of a collection, filtered by selectors.
pub fn delete_collection(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let options = DeleteOptions::parse(call.query, None)?;
    let selection = reads::selection(call.target, call.query)?;
    let matching = call.state.store.list(
        &call.target.resource_key(),
        selection.namespace.as_deref(),
        None,
        0,
        |o| selection.matches(o),
    );
    let mut items = Vec::with_capacity(matching.items.len());
    for object in matching.items {
        let Some(name) = meta_str(&object, "name") else {
            continue;
        };
        let target = Target {
            namespace: meta_str(&object, "namespace").map(str::to_owned),
            name: Some(name.to_owned()),
            ..call.target.clone()
        };
        let scoped = Call {
            state: call.state,
            target: &target,
            query: call.query,
            manager: call.manager.clone(),
            dry_run: call.dry_run,
        };
        match delete_one(&scoped, name, &options) {
            Ok(object) => items.push(object),
            Err(error) if error.code == 404 => {}
            Err(error) => return Err(error),
        }
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", call.info().kind),
            "apiVersion": call.target.api_version(),
            "metadata": {"resourceVersion": call.state.store.resource_version().to_string()},
            "items": items,
        }),
    ))
}
