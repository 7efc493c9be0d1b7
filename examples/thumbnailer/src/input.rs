//! The event this pod handles, as Spate hands it over, and the object it names.
//!
//! - `perEvent` mode: `SPATE_EVENT` (the event as JSON) or, for events too big for an
//!   environment variable, `SPATE_EVENT_FILE` (a path to it).
//! - `indexed` mode: `SPATE_ITEMS_FILE` (a JSON list of events) and `JOB_COMPLETION_INDEX`
//!   (this pod's position in the list, set by Kubernetes for Indexed Jobs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::failure::Failure;

pub const EVENT_VAR: &str = "SPATE_EVENT";
pub const EVENT_FILE_VAR: &str = "SPATE_EVENT_FILE";
pub const ITEMS_FILE_VAR: &str = "SPATE_ITEMS_FILE";
pub const INDEX_VAR: &str = "JOB_COMPLETION_INDEX";
/// The Spate simulator's convention (see `sim/src/node/exec.rs`): its exec mode runs pods as
/// local processes and cannot bind-mount volumes, so a volume mounted at `/var/run/spate`
/// appears at `$SPATE_SIM_VOLUME_ROOT/var/run/spate` instead. A path that does not exist is
/// looked up there before giving up; on a real node the variable is not set.
pub const SIM_VOLUME_ROOT_VAR: &str = "SPATE_SIM_VOLUME_ROOT";

/// The environment variables the worker reads, captured once (made by hand in tests).
#[derive(Debug, Default, Clone)]
pub struct Environment(BTreeMap<String, String>);

/// How functions take the environment.
pub type Env<'a> = &'a Environment;

impl Environment {
    /// The process's variables; a value that is not UTF-8 is read lossily.
    pub fn from_process() -> Self {
        Self(
            std::env::vars_os()
                .map(|(name, value)| {
                    (
                        name.to_string_lossy().into_owned(),
                        value.to_string_lossy().into_owned(),
                    )
                })
                .collect(),
        )
    }

    /// An environment holding only `vars`.
    #[cfg(test)]
    pub fn of(vars: &[(&str, &str)]) -> Self {
        Self(
            vars.iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        )
    }

    /// The value of `name`, `None` when unset or blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|value| !value.trim().is_empty())
    }

    /// Every variable, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }
}

/// One object-store event: where the image is and the key its thumbnail is written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEvent {
    /// The object's key, e.g. `photos/a.jpg`: the thumbnail's path below the output.
    pub key: String,
    /// The object in its store's URL form: `s3://bucket/key`, `file:///folder/key`.
    pub url: Option<String>,
    /// A GET URL that needs no credentials; preferred over `url` when present.
    pub presigned_url: Option<String>,
}

/// The event from the environment, and where it came from (for messages).
pub fn load_event(env: Env<'_>) -> Result<(ObjectEvent, String), Failure> {
    let (value, origin) = load_json(env)?;
    let event = ObjectEvent::from_json(&value, &origin)?;
    Ok((event, origin))
}

/// The event JSON, from whichever variable is set, and a description of its origin.
fn load_json(env: Env<'_>) -> Result<(Value, String), Failure> {
    if let Some(text) = env.get(EVENT_VAR) {
        let value = serde_json::from_str(text)
            .map_err(|e| Failure::input(format!("{EVENT_VAR} is not valid JSON: {e}")))?;
        return Ok((value, EVENT_VAR.to_string()));
    }
    if let Some(path) = env.get(EVENT_FILE_VAR) {
        let path = mounted_path(env, EVENT_FILE_VAR, path)?;
        let value = read_json(EVENT_FILE_VAR, &path)?;
        return Ok((value, format!("{EVENT_FILE_VAR} {}", path.display())));
    }
    if let Some(path) = env.get(ITEMS_FILE_VAR) {
        let index = env.get(INDEX_VAR).ok_or_else(|| {
            Failure::input(format!(
                "{ITEMS_FILE_VAR} is set but {INDEX_VAR} is not: an indexed Job's pod handles \
                 the item at its completion index"
            ))
        })?;
        let index: usize = index.trim().parse().map_err(|_| {
            Failure::input(format!(
                "{INDEX_VAR}={index:?} is not a non-negative whole number"
            ))
        })?;
        let path = mounted_path(env, ITEMS_FILE_VAR, path)?;
        let items = match read_json(ITEMS_FILE_VAR, &path)? {
            Value::Array(items) => items,
            other => {
                return Err(Failure::input(format!(
                    "{ITEMS_FILE_VAR} {} holds {}, not a list of events",
                    path.display(),
                    kind_of(&other)
                )));
            }
        };
        let count = items.len();
        let item = items.into_iter().nth(index).ok_or_else(|| {
            Failure::input(format!(
                "{INDEX_VAR}={index} is out of range: {ITEMS_FILE_VAR} {} holds {count} item{}",
                path.display(),
                if count == 1 { "" } else { "s" }
            ))
        })?;
        return Ok((
            item,
            format!("{ITEMS_FILE_VAR} {} item {index}", path.display()),
        ));
    }
    Err(Failure::input(format!(
        "no event: set {EVENT_VAR} (the event as JSON), {EVENT_FILE_VAR} (a file holding it), \
         or {ITEMS_FILE_VAR} with {INDEX_VAR} (a list of events and the item to handle)"
    )))
}

/// `path` as given, or, where it does not exist and the simulator's volume root is set, the
/// same path below that root (see [`SIM_VOLUME_ROOT_VAR`]).
pub fn mounted_path(env: Env<'_>, var_name: &str, path: &str) -> Result<PathBuf, Failure> {
    let given = PathBuf::from(path);
    if given.exists() {
        return Ok(given);
    }
    if let Some(root) = env.get(SIM_VOLUME_ROOT_VAR) {
        let relative = given.strip_prefix("/").unwrap_or(&given);
        let under_root = Path::new(&root).join(relative);
        if under_root.exists() {
            return Ok(under_root);
        }
        return Err(Failure::input(format!(
            "{var_name} {path} does not exist, nor does {} ({SIM_VOLUME_ROOT_VAR} is set)",
            under_root.display()
        )));
    }
    Err(Failure::input(format!("{var_name} {path} does not exist")))
}

fn read_json(var_name: &str, path: &Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("{var_name}: cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        Failure::input(format!(
            "{var_name} {} is not valid JSON: {e}",
            path.display()
        ))
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl ObjectEvent {
    /// Reads the fields of an object-store event; `origin` names where it came from.
    pub fn from_json(value: &Value, origin: &str) -> Result<Self, Failure> {
        let Value::Object(fields) = value else {
            return Err(Failure::input(format!(
                "{origin}: the event is {}, not an object",
                kind_of(value)
            )));
        };
        let url = string_field(fields, "url", origin)?;
        let presigned_url = string_field(fields, "presignedUrl", origin)?;
        let key = match string_field(fields, "key", origin)? {
            Some(key) => key,
            // Not an object-store source's event, but a URL is enough: name the file after it.
            None => url
                .as_deref()
                .or(presigned_url.as_deref())
                .and_then(file_name_of_url)
                .ok_or_else(|| {
                    Failure::input(format!(
                        "{origin}: the event has no `key` and no URL to take a file name from"
                    ))
                })?,
        };
        if url.is_none() && presigned_url.is_none() {
            return Err(Failure::input(format!(
                "{origin}: the event has neither `url` nor `presignedUrl`; is it an object-store \
                 event?"
            )));
        }
        Ok(Self {
            key,
            url,
            presigned_url,
        })
    }
}

/// A string field, `None` when absent or null, an error for any other type.
fn string_field(
    fields: &Map<String, Value>,
    name: &str,
    origin: &str,
) -> Result<Option<String>, Failure> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(Failure::input(format!(
            "{origin}: the event's `{name}` is empty"
        ))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Failure::input(format!(
            "{origin}: the event's `{name}` is {}, not a string",
            kind_of(other)
        ))),
    }
}

/// The last path segment of a URL, percent-decoded: `s3://b/x/a%20b.jpg` → `a b.jpg`.
fn file_name_of_url(url: &str) -> Option<String> {
    let without_query = url.split(['?', '#']).next().unwrap_or(url);
    let (_, path) = without_query.split_once("://")?;
    let name = path.rsplit('/').next().filter(|name| !name.is_empty())?;
    Some(
        percent_encoding::percent_decode_str(name)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event_json() -> Value {
        json!({
            "id": "b/photos/a.jpg@1",
            "bucket": "/tmp/in",
            "key": "photos/a.jpg",
            "size": 123,
            "etag": "\"1\"",
            "url": "file:///tmp/in/photos/a.jpg",
            "lastModified": "2026-01-01T00:00:00Z"
        })
    }

    #[test]
    fn an_object_store_event_gives_its_key_and_urls() {
        let mut value = event_json();
        let event = ObjectEvent::from_json(&value, "SPATE_EVENT").unwrap();
        assert_eq!(event.key, "photos/a.jpg");
        assert_eq!(event.url.as_deref(), Some("file:///tmp/in/photos/a.jpg"));
        assert_eq!(event.presigned_url, None);

        value["presignedUrl"] = json!("https://b.example/photos/a.jpg?X-Amz-Signature=0");
        let event = ObjectEvent::from_json(&value, "SPATE_EVENT").unwrap();
        assert_eq!(
            event.presigned_url.as_deref(),
            Some("https://b.example/photos/a.jpg?X-Amz-Signature=0")
        );
    }

    #[test]
    fn an_event_without_a_key_is_named_after_its_url() {
        let value = json!({"id": "1", "url": "s3://b/in/a%20b.png"});
        let event = ObjectEvent::from_json(&value, "SPATE_EVENT").unwrap();
        assert_eq!(event.key, "a b.png");
        let value = json!({"id": "1", "presignedUrl": "https://h/x/c.jpg?sig=1"});
        let event = ObjectEvent::from_json(&value, "SPATE_EVENT").unwrap();
        assert_eq!(event.key, "c.jpg");
    }

    #[test]
    fn unusable_events_say_what_is_wrong_and_where() {
        let cases = [
            (
                json!([1]),
                "SPATE_EVENT: the event is a list, not an object",
            ),
            (
                json!({"id": "1", "key": "a.jpg"}),
                "SPATE_EVENT: the event has neither `url` nor `presignedUrl`",
            ),
            (
                json!({"id": "1", "key": 3, "url": "s3://b/a.jpg"}),
                "SPATE_EVENT: the event's `key` is a number, not a string",
            ),
            (
                json!({"id": "1", "url": "s3://b/"}),
                "SPATE_EVENT: the event has no `key`",
            ),
            (
                json!({"id": "1", "key": "", "url": "s3://b/a.jpg"}),
                "SPATE_EVENT: the event's `key` is empty",
            ),
        ];
        for (value, expected) in cases {
            let failure = ObjectEvent::from_json(&value, "SPATE_EVENT").unwrap_err();
            assert_eq!(failure.kind, crate::failure::Kind::Input);
            assert!(
                failure.message.starts_with(expected),
                "{value}: {}",
                failure.message
            );
        }
    }

    #[test]
    fn the_event_comes_from_spate_event_first() {
        let text = event_json().to_string();
        let env = Environment::of(&[
            (EVENT_VAR, &text),
            (EVENT_FILE_VAR, "/nonexistent/event.json"),
        ]);
        let (event, origin) = load_event(&env).unwrap();
        assert_eq!(event.key, "photos/a.jpg");
        assert_eq!(origin, "SPATE_EVENT");
    }

    #[test]
    fn bad_json_names_the_variable() {
        let env = Environment::of(&[(EVENT_VAR, "{\"key\": ")]);
        let failure = load_event(&env).unwrap_err();
        assert!(
            failure.message.starts_with("SPATE_EVENT is not valid JSON"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn no_event_lists_the_variables_to_set() {
        let env = Environment::of(&[(EVENT_VAR, "  ")]);
        let failure = load_event(&env).unwrap_err();
        for name in [EVENT_VAR, EVENT_FILE_VAR, ITEMS_FILE_VAR, INDEX_VAR] {
            assert!(failure.message.contains(name), "{}", failure.message);
        }
    }

    #[test]
    fn an_event_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("event.json");
        std::fs::write(&path, event_json().to_string()).unwrap();
        let env = Environment::of(&[(EVENT_FILE_VAR, path.to_str().unwrap())]);
        let (event, origin) = load_event(&env).unwrap();
        assert_eq!(event.key, "photos/a.jpg");
        assert_eq!(origin, format!("SPATE_EVENT_FILE {}", path.display()));
    }

    #[test]
    fn indexed_mode_takes_the_item_at_the_completion_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.json");
        let items: Vec<Value> = ["a.jpg", "b.png", "c.jpg"]
            .iter()
            .map(|key| json!({"id": key, "key": key, "url": format!("s3://b/{key}")}))
            .collect();
        std::fs::write(&path, Value::from(items).to_string()).unwrap();
        let file = path.to_str().unwrap();

        let env = Environment::of(&[(ITEMS_FILE_VAR, file), (INDEX_VAR, "1")]);
        let (event, origin) = load_event(&env).unwrap();
        assert_eq!(event.key, "b.png");
        assert_eq!(origin, format!("SPATE_ITEMS_FILE {file} item 1"));

        let env = Environment::of(&[(ITEMS_FILE_VAR, file), (INDEX_VAR, "3")]);
        let failure = load_event(&env).unwrap_err();
        assert_eq!(
            failure.message,
            format!(
                "JOB_COMPLETION_INDEX=3 is out of range: SPATE_ITEMS_FILE {file} holds 3 items"
            )
        );

        let env = Environment::of(&[(ITEMS_FILE_VAR, file), (INDEX_VAR, "-1")]);
        let failure = load_event(&env).unwrap_err();
        assert!(
            failure
                .message
                .starts_with("JOB_COMPLETION_INDEX=\"-1\" is not")
        );

        let env = Environment::of(&[(ITEMS_FILE_VAR, file)]);
        let failure = load_event(&env).unwrap_err();
        assert!(failure.message.contains("JOB_COMPLETION_INDEX is not"));
    }

    #[test]
    fn an_items_file_must_hold_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.json");
        std::fs::write(&path, event_json().to_string()).unwrap();
        let env = Environment::of(&[(ITEMS_FILE_VAR, path.to_str().unwrap()), (INDEX_VAR, "0")]);
        let failure = load_event(&env).unwrap_err();
        assert!(
            failure
                .message
                .ends_with("holds an object, not a list of events"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_missing_mount_is_found_under_the_simulator_volume_root() {
        let root = tempfile::tempdir().unwrap();
        let mounted = root.path().join("var/run/spate");
        std::fs::create_dir_all(&mounted).unwrap();
        std::fs::write(mounted.join("items.json"), "[]").unwrap();
        // The path as given is a pod's mount path, which this machine does not have.
        let given = "/var/run/spate/items.json";
        if Path::new(given).exists() {
            return; // a machine that really has the mount: nothing to fall back from
        }

        let env = Environment::of(&[(SIM_VOLUME_ROOT_VAR, root.path().to_str().unwrap())]);
        assert_eq!(
            mounted_path(&env, ITEMS_FILE_VAR, given).unwrap(),
            mounted.join("items.json")
        );

        // A path that exists is used as it is, whatever the root.
        let here = root.path().join("var/run/spate/items.json");
        assert_eq!(
            mounted_path(&env, ITEMS_FILE_VAR, here.to_str().unwrap()).unwrap(),
            here
        );

        let failure = mounted_path(&env, ITEMS_FILE_VAR, "/var/run/spate/event.json").unwrap_err();
        assert!(
            failure.message.contains("nor does")
                && failure.message.contains("SPATE_SIM_VOLUME_ROOT"),
            "{}",
            failure.message
        );

        let no_root = Environment::of(&[]);
        let failure = mounted_path(&no_root, ITEMS_FILE_VAR, given).unwrap_err();
        assert_eq!(
            failure.message,
            "SPATE_ITEMS_FILE /var/run/spate/items.json does not exist"
        );
    }
}
