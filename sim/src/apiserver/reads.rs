//! The read verbs: get and list (with selectors, pagination and table output).
//!
//! Lists are served from the store without copying objects: items are borrowed (or
//! converted when another version is asked for) and serialized once into the response.

use std::borrow::Cow;

use http::Response;
use serde_json::{Value, json};

use super::admission::meta_str;
use super::conversion;
use super::error::ApiError;
use super::http::{Body, json_response, serialized_response};
use super::objects::Call;
use super::routes::{Query, Target};
use super::selectors::{FieldSelector, LabelSelector, Selection};
use super::store::ObjectKey;
use super::table::TableView;

/// The selection (namespace + selectors) of a list, watch or deletecollection.
pub fn selection(target: &Target, query: &Query) -> Result<Selection, ApiError> {
    Ok(Selection {
        namespace: target.namespace.clone(),
        labels: LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))?,
    })
}

/// GET of one object (or its status).
pub fn get(call: &Call<'_>, table: Option<&TableView>) -> Result<Response<Body>, ApiError> {
    let name = call.name()?;
    let object = call
        .state
        .store
        .get(&call.target.resource_key(), &call.target.object_key(name))
        .ok_or_else(|| ApiError::not_found(call.info(), name))?;
    let object = conversion::present(call.info(), &call.target.api_version(), &object).into_owned();
    let body = match table {
        Some(table) => {
            let rv = meta_str(&object, "resourceVersion")
                .unwrap_or_default()
                .to_owned();
            table.render(&[object], json!({"resourceVersion": rv}))
        }
        None => object,
    };
    Ok(json_response(200, &body))
}

/// The pagination state carried in a `continue` token.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    namespace: String,
    name: String,
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(token.as_bytes())
        .map_err(|_| ApiError::bad_request("continue key is not valid"))?;
    serde_json::from_slice(&bytes).map_err(|_| ApiError::bad_request("continue key is not valid"))
}

fn encode_continue(rv: u64, after: &ObjectKey) -> String {
    let token = ContinueToken {
        rv,
        namespace: after.namespace.clone(),
        name: after.name.clone(),
    };
    data_encoding::BASE64URL_NOPAD.encode(&serde_json::to_vec(&token).unwrap_or_default())
}

/// LIST with selectors and `limit`/`continue` pagination.
pub fn list(call: &Call<'_>, table: Option<&TableView>) -> Result<Response<Body>, ApiError> {
    let selection = selection(call.target, call.query)?;
    let resource = call.target.resource_key();
    let limit = usize::try_from(call.query.number("limit")?.unwrap_or(0).max(0)).unwrap_or(0);
    let token = call
        .query
        .get("continue")
        .filter(|t| !t.is_empty())
        .map(decode_continue)
        .transpose()?;
    if let Some(token) = &token
        && token.rv < call.state.store.oldest_resumable(&resource)
    {
        return Err(ApiError::expired(
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
        ));
    }
    let after = token
        .as_ref()
        .map(|t| ObjectKey::new(&t.namespace, &t.name));
    let page = call.state.store.list(
        &resource,
        selection.namespace.as_deref(),
        after.as_ref(),
        limit,
        |o| selection.matches(o),
    );
    let list_rv = token.as_ref().map_or(page.resource_version, |t| t.rv);
    let api_version = call.target.api_version();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(last) = &page.continue_after {
        metadata["continue"] = json!(encode_continue(list_rv, last));
        metadata["remainingItemCount"] = json!(page.remaining);
    }
    let items: Vec<Cow<'_, Value>> = page
        .items
        .iter()
        .map(|o| conversion::present(call.info(), &api_version, o))
        .collect();
    if let Some(table) = table {
        return Ok(json_response(200, &table.render(&items, metadata)));
    }
    let list = ObjectList {
        kind: format!("{}List", call.info().kind),
        api_version: &api_version,
        metadata,
        items,
    };
    Ok(serialized_response(200, &list))
}

/// A list response, serialized straight from the stored objects without copying them.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectList<'a> {
    kind: String,
    api_version: &'a str,
    metadata: Value,
    items: Vec<Cow<'a, Value>>,
}
