//! The object store: etcd's role, in memory.
//!
//! Objects are `serde_json::Value`s kept per resource, ordered by `(namespace, name)` so lists
//! page deterministically. One global, monotonically increasing resourceVersion orders every
//! change, as etcd's revision does. Each resource keeps a bounded history of changes for watch
//! resumption, and a broadcast channel fans changes out to live watches: every event is
//! serialized once, here, and writers never wait for watchers (a watcher that falls behind
//! loses its watch and must resume, as with a real API server).
//!
//! The lock is a plain mutex held only for in-memory work, never across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::broadcast;

/// `(group, plural)` of a resource.
pub type ResourceKey = (String, String);

/// Where an object lives within its resource. Cluster-scoped objects have an empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object changed.
    Modified,
    /// The object is gone.
    Deleted,
}

impl EventType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct WatchEvent {
    /// What happened.
    pub event_type: EventType,
    /// The resourceVersion the change was committed at.
    pub resource_version: u64,
    /// The object after the change (its last state for deletions).
    pub object: Arc<Value>,
    /// The object before the change, used to tell selector-filtered watches that an object
    /// stopped matching.
    pub previous: Option<Arc<Value>>,
    /// The event as one line of the watch stream, serialized once for all watchers.
    pub line: Bytes,
}

/// Serializes `{"type":...,"object":...}` followed by a newline.
pub fn event_line(event_type: &str, object: &Value) -> Bytes {
    let body = serde_json::to_string(object).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!("{{\"type\":\"{event_type}\",\"object\":{body}}}\n"))
}

/// What a mutation decided to do with an object.
#[derive(Debug)]
pub enum Change {
    /// Store this object (create or replace).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Leave it as it is.
    Unchanged,
}

/// The outcome of a committed mutation.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The object as stored (or as last seen, for deletions and no-ops).
    pub object: Arc<Value>,
    /// The event produced, `None` for a no-op.
    pub event: Option<EventType>,
}

/// One page of a list.
#[derive(Debug)]
pub struct ListPage {
    /// Matching objects in key order.
    pub items: Vec<Arc<Value>>,
    /// The resourceVersion the list was read at.
    pub resource_version: u64,
    /// Key of the last item when more remain.
    pub continue_after: Option<ObjectKey>,
    /// How many matching objects follow this page.
    pub remaining: usize,
}

/// How a watch starts.
#[derive(Debug)]
pub enum WatchStart {
    /// Replay of current objects followed by live events.
    Current(Vec<Arc<Value>>, u64),
    /// Replay of retained history after the requested resourceVersion.
    History(Vec<Arc<WatchEvent>>),
}

/// A requested resourceVersion is older than the retained history.
#[derive(Debug, thiserror::Error)]
#[error("too old resource version: {requested} ({oldest})")]
pub struct TooOld {
    /// The requested resourceVersion.
    pub requested: u64,
    /// The oldest resourceVersion a watch may start from.
    pub oldest: u64,
}

struct Table {
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<Arc<WatchEvent>>,
    /// Events at or below this resourceVersion have been evicted from `history`.
    floor: u64,
    sender: broadcast::Sender<Arc<WatchEvent>>,
}

impl Table {
    fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Self {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 0,
            sender,
        }
    }
}

struct State {
    resource_version: u64,
    tables: HashMap<ResourceKey, Table>,
}

/// The in-memory object store.
pub struct Store {
    state: Mutex<State>,
    history_limit: usize,
    fanout_capacity: usize,
}

fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

impl Store {
    /// A store that keeps `history_limit` changes per resource for watch resumption.
    pub fn new(history_limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                resource_version: 1,
                tables: HashMap::new(),
            }),
            history_limit: history_limit.max(1),
            fanout_capacity: history_limit.clamp(1024, 16_384),
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().resource_version
    }

    /// One object.
    pub fn get(&self, resource: &ResourceKey, key: &ObjectKey) -> Option<Arc<Value>> {
        self.state
            .lock()
            .tables
            .get(resource)?
            .objects
            .get(key)
            .cloned()
    }

    /// Every object of a resource within `namespace` (all namespaces for `None`).
    pub fn scan(&self, resource: &ResourceKey, namespace: Option<&str>) -> Vec<Arc<Value>> {
        self.list(resource, namespace, None, 0, |_| true).items
    }

    /// Resources that have ever held an object.
    pub fn resources(&self) -> Vec<ResourceKey> {
        self.state.lock().tables.keys().cloned().collect()
    }

    /// The oldest resourceVersion a watch of `resource` can resume from.
    pub fn oldest_resumable(&self, resource: &ResourceKey) -> u64 {
        self.state
            .lock()
            .tables
            .get(resource)
            .map_or(0, |t| t.floor)
    }

    /// A page of objects matching `filter`, after `after` in key order; `limit` 0 means all.
    pub fn list(
        &self,
        resource: &ResourceKey,
        namespace: Option<&str>,
        after: Option<&ObjectKey>,
        limit: usize,
        filter: impl Fn(&Value) -> bool,
    ) -> ListPage {
        let state = self.state.lock();
        let resource_version = state.resource_version;
        let Some(table) = state.tables.get(resource) else {
            return ListPage {
                items: Vec::new(),
                resource_version,
                continue_after: None,
                remaining: 0,
            };
        };
        let lower = match (after, namespace) {
            (Some(key), _) => Bound::Excluded(key.clone()),
            (None, Some(ns)) => Bound::Included(ObjectKey::new(ns, "")),
            (None, None) => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut continue_after = None;
        let mut remaining = 0;
        for (key, object) in table.objects.range((lower, Bound::Unbounded)) {
            if namespace.is_some_and(|ns| key.namespace != ns) {
                break;
            }
            if !filter(object) {
                continue;
            }
            if limit > 0 && items.len() == limit {
                remaining += 1;
                continue;
            }
            items.push(object.clone());
            continue_after = Some(key.clone());
        }
        if remaining == 0 {
            continue_after = None;
        }
        ListPage {
            items,
            resource_version,
            continue_after,
            remaining,
        }
    }

    /// Atomically reads an object, lets `decide` choose a change, and commits it.
    ///
    /// `decide` runs under the store lock, so the read-modify-write cannot interleave with
    /// another writer: this is where optimistic concurrency checks belong. A `Put` gets the
    /// next resourceVersion written into `metadata.resourceVersion`.
    pub fn mutate<E>(
        &self,
        resource: &ResourceKey,
        key: &ObjectKey,
        decide: impl FnOnce(Option<&Arc<Value>>) -> Result<Change, E>,
    ) -> Result<Option<Committed>, E> {
        let mut state = self.state.lock();
        let current = state
            .tables
            .get(resource)
            .and_then(|t| t.objects.get(key))
            .cloned();
        let change = decide(current.as_ref())?;
        let (event_type, object) = match (change, current) {
            (Change::Unchanged, current) => {
                return Ok(current.map(|object| Committed {
                    object,
                    event: None,
                }));
            }
            (Change::Delete, None) => return Ok(None),
            (Change::Delete, Some(current)) => (EventType::Deleted, (*current).clone()),
            (Change::Put(object), None) => (EventType::Added, object),
            (Change::Put(object), Some(_)) => (EventType::Modified, object),
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        let mut object = object;
        set_resource_version(&mut object, rv);
        let object = Arc::new(object);
        let capacity = self.fanout_capacity;
        let table = state
            .tables
            .entry(resource.clone())
            .or_insert_with(|| Table::new(capacity));
        let previous = if event_type == EventType::Deleted {
            table.objects.remove(key)
        } else {
            table.objects.insert(key.clone(), object.clone())
        };
        let event = Arc::new(WatchEvent {
            event_type,
            resource_version: rv,
            line: event_line(event_type.as_str(), &object),
            object: object.clone(),
            previous,
        });
        if table.history.len() == self.history_limit
            && let Some(evicted) = table.history.pop_front()
        {
            table.floor = evicted.resource_version;
        }
        table.history.push_back(event.clone());
        // No receivers is normal (nobody watching); the event is still in history.
        let _ = table.sender.send(event);
        Ok(Some(Committed {
            object,
            event: Some(event_type),
        }))
    }

    /// Starts a watch: what to replay, and the live feed that continues exactly after it.
    pub fn watch(
        &self,
        resource: &ResourceKey,
        from: Option<u64>,
    ) -> Result<(WatchStart, broadcast::Receiver<Arc<WatchEvent>>), TooOld> {
        let mut state = self.state.lock();
        let current = state.resource_version;
        let capacity = self.fanout_capacity;
        let table = state
            .tables
            .entry(resource.clone())
            .or_insert_with(|| Table::new(capacity));
        let receiver = table.sender.subscribe();
        let start = match from {
            None => WatchStart::Current(table.objects.values().cloned().collect(), current),
            Some(requested) if requested < table.floor => {
                return Err(TooOld {
                    requested,
                    oldest: table.floor,
                });
            }
            Some(requested) => {
                let first = table
                    .history
                    .partition_point(|e| e.resource_version <= requested);
                WatchStart::History(table.history.range(first..).cloned().collect())
            }
        };
        Ok((start, receiver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(name: &str) -> Value {
        json!({"kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}})
    }

    fn put(store: &Store, res: &ResourceKey, name: &str) -> u64 {
        let key = ObjectKey::new("default", name);
        let committed = store
            .mutate::<()>(res, &key, |_| Ok(Change::Put(cm(name))))
            .unwrap()
            .unwrap();
        committed.object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn every_change_gets_a_higher_resource_version() {
        let store = Store::new(10);
        let res: ResourceKey = (String::new(), "configmaps".into());
        let a = put(&store, &res, "a");
        let b = put(&store, &res, "a");
        assert!(b > a);
        assert_eq!(store.resource_version(), b);
        let unchanged = store
            .mutate::<()>(&res, &ObjectKey::new("default", "a"), |_| {
                Ok(Change::Unchanged)
            })
            .unwrap()
            .unwrap();
        assert!(unchanged.event.is_none());
        assert_eq!(store.resource_version(), b);
    }

    #[test]
    fn list_pages_in_key_order_and_scopes_namespaces() {
        let store = Store::new(10);
        let res: ResourceKey = (String::new(), "configmaps".into());
        for name in ["c", "a", "b"] {
            put(&store, &res, name);
        }
        let page = store.list(&res, Some("default"), None, 2, |_| true);
        let names: Vec<_> = page
            .items
            .iter()
            .map(|o| o["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("a"), json!("b")]);
        assert_eq!(page.remaining, 1);
        let after = page.continue_after.unwrap();
        let rest = store.list(&res, Some("default"), Some(&after), 2, |_| true);
        assert_eq!(rest.items.len(), 1);
        assert!(rest.continue_after.is_none());
        assert!(
            store
                .list(&res, Some("other"), None, 0, |_| true)
                .items
                .is_empty()
        );
    }

    #[test]
    fn watch_replays_history_after_the_requested_version_and_expires_evicted_ones() {
        let store = Store::new(3);
        let res: ResourceKey = (String::new(), "configmaps".into());
        let versions: Vec<u64> = (0..5)
            .map(|i| put(&store, &res, &format!("cm{i}")))
            .collect();
        let (start, _rx) = store.watch(&res, Some(versions[2])).unwrap();
        let WatchStart::History(events) = start else {
            panic!("expected history")
        };
        let replayed: Vec<u64> = events.iter().map(|e| e.resource_version).collect();
        assert_eq!(replayed, versions[3..].to_vec());
        let err = store.watch(&res, Some(versions[0])).unwrap_err();
        assert_eq!(err.oldest, versions[1]);
    }

    #[tokio::test]
    async fn live_events_follow_the_replay_without_gaps() {
        let store = Store::new(100);
        let res: ResourceKey = (String::new(), "configmaps".into());
        let first = put(&store, &res, "a");
        let (start, mut rx) = store.watch(&res, Some(first)).unwrap();
        assert!(matches!(start, WatchStart::History(ref e) if e.is_empty()));
        let second = put(&store, &res, "b");
        let event = rx.recv().await.unwrap();
        assert_eq!(event.resource_version, second);
        assert!(event.line.ends_with(b"\n"));
    }
}
