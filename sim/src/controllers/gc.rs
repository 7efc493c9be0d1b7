//! The garbage collector: deletes objects whose owners are gone and carries out foreground
//! and orphan deletion, as the upstream garbage collector does for the kinds the simulator
//! serves (pods, Jobs, ConfigMaps, Secrets, Events).
//!
//! It keeps an ownership graph (uid → owners, owner uid → dependents) from one watch per
//! kind. A change marks objects dirty; a worker then decides for each:
//! - a dependent none of whose owners exists is deleted in the background, after a live GET
//!   confirms each owner is really gone (watches lag, and owners may be of kinds it does not
//!   watch, such as custom resources);
//! - an owner being deleted with the `foregroundDeletion` finalizer has its dependents deleted
//!   first, and loses the finalizer once no dependent blocking its deletion remains;
//! - an owner being deleted with the `orphan` finalizer has itself removed from its
//!   dependents' `ownerReferences`, then loses the finalizer.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::core::GroupVersionKind;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::retry::{has_code, retry};

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
/// Objects handled at once by the worker.
const IN_FLIGHT: usize = 16;
/// Delay before an object whose handling failed is looked at again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Number of kinds watched; the worker starts once each has listed.
const KINDS: usize = 5;
/// How often owners of kinds the collector does not watch (custom resources, such as a
/// Pipeline owning its Jobs) are checked for deletion. Upstream watches every deletable
/// resource; one GET per such owner is the simulator's cheaper equivalent.
const UNWATCHED_OWNERS_EVERY: Duration = Duration::from_secs(2);

/// One object in the ownership graph.
#[derive(Debug, Clone)]
struct Entry {
    resource: Arc<ApiResource>,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    finalizers: Vec<String>,
}

/// Ownership graph built from the watches.
#[derive(Default)]
struct Graph {
    objects: HashMap<String, Entry>,
    dependents: HashMap<String, HashSet<String>>,
    dirty: HashSet<String>,
    relisting: HashMap<String, HashSet<String>>,
    synced: HashSet<String>,
}

impl Graph {
    fn insert(&mut self, uid: String, entry: Entry) {
        if let Some(old) = self.objects.get(&uid) {
            for owner in &old.owners {
                if let Some(set) = self.dependents.get_mut(&owner.uid) {
                    set.remove(&uid);
                }
            }
        }
        for owner in &entry.owners {
            self.dependents
                .entry(owner.uid.clone())
                .or_default()
                .insert(uid.clone());
        }
        if entry.deleting || !entry.owners.is_empty() {
            self.dirty.insert(uid.clone());
        }
        self.objects.insert(uid, entry);
    }

    fn remove(&mut self, uid: &str) {
        let Some(entry) = self.objects.remove(uid) else {
            return;
        };
        // Owners waiting in foreground deletion may now be free to go, and dependents
        // may now be orphans.
        for owner in entry.owners {
            if let Some(set) = self.dependents.get_mut(&owner.uid) {
                set.remove(uid);
                if set.is_empty() {
                    self.dependents.remove(&owner.uid);
                }
            }
            self.dirty.insert(owner.uid);
        }
        if let Some(dependents) = self.dependents.get(uid) {
            self.dirty.extend(dependents.iter().cloned());
        }
    }

    fn apply<K: Resource>(&mut self, kind: &Arc<ApiResource>, event: Event<K>) -> bool {
        let entry = |object: &K| {
            let meta = object.meta();
            Some((
                meta.uid.clone()?,
                Entry {
                    resource: kind.clone(),
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone()?,
                    owners: meta.owner_references.clone().unwrap_or_default(),
                    deleting: meta.deletion_timestamp.is_some(),
                    finalizers: meta.finalizers.clone().unwrap_or_default(),
                },
            ))
        };
        match event {
            Event::Init => {
                self.relisting.insert(kind.kind.clone(), HashSet::new());
            }
            Event::InitApply(object) => {
                if let Some((uid, entry)) = entry(&object) {
                    self.relisting
                        .entry(kind.kind.clone())
                        .or_default()
                        .insert(uid.clone());
                    self.insert(uid, entry);
                }
            }
            Event::InitDone => {
                let seen = self.relisting.remove(&kind.kind).unwrap_or_default();
                let vanished: Vec<String> = self
                    .objects
                    .iter()
                    .filter(|(uid, e)| e.resource.kind == kind.kind && !seen.contains(*uid))
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in vanished {
                    self.remove(&uid);
                }
                self.synced.insert(kind.kind.clone());
            }
            Event::Apply(object) => {
                if let Some((uid, entry)) = entry(&object) {
                    self.insert(uid, entry);
                }
            }
            Event::Delete(object) => {
                if let Some(uid) = object.meta().uid.as_deref() {
                    self.remove(uid);
                }
            }
        }
        !self.dirty.is_empty()
    }
}

/// Shared state of the collector.
struct Collector {
    client: kube::Client,
    graph: Mutex<Graph>,
    wake: Notify,
}

fn api_for(
    client: &kube::Client,
    resource: &ApiResource,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    match namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

/// What the graph says about one dirty object, copied out so no lock is held across awaits.
enum Task {
    Foreground {
        uid: String,
        entry: Entry,
        dependents: Vec<(String, Entry)>,
    },
    Orphan {
        uid: String,
        entry: Entry,
        dependents: Vec<(String, Entry)>,
    },
    CheckOwners {
        uid: String,
        entry: Entry,
    },
}

impl Collector {
    fn task(&self, uid: &str) -> Option<Task> {
        let graph = self.graph.lock();
        let entry = graph.objects.get(uid)?.clone();
        let dependents = || -> Vec<(String, Entry)> {
            graph
                .dependents
                .get(uid)
                .into_iter()
                .flatten()
                .filter_map(|d| Some((d.clone(), graph.objects.get(d)?.clone())))
                .collect()
        };
        if entry.deleting && entry.finalizers.iter().any(|f| f == FOREGROUND) {
            return Some(Task::Foreground {
                uid: uid.to_owned(),
                dependents: dependents(),
                entry,
            });
        }
        if entry.deleting && entry.finalizers.iter().any(|f| f == ORPHAN) {
            return Some(Task::Orphan {
                uid: uid.to_owned(),
                dependents: dependents(),
                entry,
            });
        }
        if entry.owners.is_empty() {
            return None;
        }
        // Any owner known to exist keeps the object.
        let all_missing = entry
            .owners
            .iter()
            .all(|o| !graph.objects.contains_key(&o.uid));
        all_missing.then(|| Task::CheckOwners {
            uid: uid.to_owned(),
            entry,
        })
    }

    /// Live check that `owner` no longer exists (or was replaced by a namesake).
    async fn owner_gone(
        &self,
        owner: &OwnerReference,
        namespace: Option<&str>,
    ) -> Result<bool, kube::Error> {
        let (group, version) = owner
            .api_version
            .split_once('/')
            .unwrap_or(("", owner.api_version.as_str()));
        let gvk = GroupVersionKind::gvk(group, version, &owner.kind);
        let (resource, capabilities) = match kube::discovery::pinned_kind(&self.client, &gvk).await
        {
            Ok(found) => found,
            // The kind is not served at all: its objects cannot exist.
            Err(error) if has_code(&error, 404) => return Ok(true),
            Err(error) => return Err(error),
        };
        let namespace = match capabilities.scope {
            kube::discovery::Scope::Namespaced => namespace,
            kube::discovery::Scope::Cluster => None,
        };
        let api = api_for(&self.client, &resource, namespace);
        match retry(|| api.get_opt(&owner.name)).await? {
            Some(found) => Ok(found.uid().as_deref() != Some(owner.uid.as_str())),
            None => Ok(true),
        }
    }

    /// Deletes in the background, only the object with `uid` when given.
    async fn delete(&self, entry: &Entry, uid: Option<String>) -> Result<(), kube::Error> {
        let api = api_for(&self.client, &entry.resource, entry.namespace.as_deref());
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match retry(|| api.delete(&entry.name, &params)).await {
            // Gone already, or replaced by a namesake (failed uid precondition).
            Err(error) if !has_code(&error, 404) && !has_code(&error, 409) => Err(error),
            _ => Ok(()),
        }
    }

    async fn remove_finalizer(&self, entry: &Entry, finalizer: &str) -> Result<(), kube::Error> {
        let remaining: Vec<&String> = entry
            .finalizers
            .iter()
            .filter(|f| *f != finalizer)
            .collect();
        let patch = serde_json::json!({"metadata": {"finalizers": remaining}});
        let api = api_for(&self.client, &entry.resource, entry.namespace.as_deref());
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        match retry(|| api.patch(&entry.name, &params, &patch)).await {
            Err(error) if !has_code(&error, 404) => Err(error),
            _ => Ok(()),
        }
    }

    /// Handles one dirty object; `Err` means try again later.
    async fn handle(&self, uid: String) -> Result<(), kube::Error> {
        let Some(task) = self.task(&uid) else {
            return Ok(());
        };
        match task {
            Task::Foreground {
                uid,
                entry,
                dependents,
            } => {
                for (_, dependent) in dependents.iter().filter(|(_, d)| !d.deleting) {
                    self.delete(dependent, None).await?;
                }
                // Dependents just asked to go still exist (terminating); their removal marks
                // this owner dirty again.
                let blocking = dependents.iter().any(|(_, d)| {
                    d.owners
                        .iter()
                        .any(|o| o.uid == uid && o.block_owner_deletion == Some(true))
                });
                if !blocking {
                    self.remove_finalizer(&entry, FOREGROUND).await?;
                }
            }
            Task::Orphan {
                uid,
                entry,
                dependents,
            } => {
                for (_, dependent) in &dependents {
                    let owners: Vec<&OwnerReference> =
                        dependent.owners.iter().filter(|o| o.uid != uid).collect();
                    let patch = serde_json::json!({"metadata": {"ownerReferences": owners}});
                    let api = api_for(
                        &self.client,
                        &dependent.resource,
                        dependent.namespace.as_deref(),
                    );
                    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
                    match retry(|| api.patch(&dependent.name, &params, &patch)).await {
                        Err(error) if !has_code(&error, 404) => return Err(error),
                        _ => {}
                    }
                }
                self.remove_finalizer(&entry, ORPHAN).await?;
            }
            Task::CheckOwners { uid, entry } => {
                // The graph may lag (an orphaning that removed the owner references has not
                // been seen yet): decide on the dependent as it is now.
                let api = api_for(&self.client, &entry.resource, entry.namespace.as_deref());
                let Some(live) = retry(|| api.get_opt(&entry.name)).await? else {
                    return Ok(());
                };
                if live.uid().as_deref() != Some(uid.as_str()) || live.owner_references().is_empty()
                {
                    return Ok(());
                }
                for owner in live.owner_references() {
                    let known = self.graph.lock().objects.contains_key(&owner.uid);
                    if known || !self.owner_gone(owner, entry.namespace.as_deref()).await? {
                        return Ok(());
                    }
                }
                tracing::debug!(kind = %entry.resource.kind, name = %entry.name, "deleting orphaned dependent");
                self.delete(&entry, Some(uid)).await?;
            }
        }
        Ok(())
    }

    /// Marks the dependents of deleted owners of unwatched kinds dirty, since no watch event
    /// will announce those deletions.
    async fn check_unwatched_owners(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(UNWATCHED_OWNERS_EVERY) => {}
            }
            let owners: Vec<(OwnerReference, Option<String>)> = {
                let graph = self.graph.lock();
                let mut seen = HashSet::new();
                graph
                    .dependents
                    .iter()
                    .filter(|(owner, _)| !graph.objects.contains_key(*owner))
                    .filter_map(|(owner_uid, dependents)| {
                        let dependent = graph.objects.get(dependents.iter().next()?)?;
                        let reference = dependent.owners.iter().find(|o| &o.uid == owner_uid)?;
                        seen.insert(owner_uid.clone())
                            .then(|| (reference.clone(), dependent.namespace.clone()))
                    })
                    .collect()
            };
            for (owner, namespace) in owners {
                match self.owner_gone(&owner, namespace.as_deref()).await {
                    Ok(true) => {
                        let mut graph = self.graph.lock();
                        let dependents = graph
                            .dependents
                            .get(&owner.uid)
                            .cloned()
                            .unwrap_or_default();
                        graph.dirty.extend(dependents);
                        drop(graph);
                        self.wake.notify_one();
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(owner = %owner.name, %error, "cannot check an owner")
                    }
                }
            }
        }
    }

    async fn work(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
            }
            let batch: Vec<String> = {
                let mut graph = self.graph.lock();
                if graph.synced.len() < KINDS {
                    continue;
                }
                graph.dirty.drain().collect()
            };
            let failed: Vec<String> = stream::iter(batch)
                .map(|uid| {
                    let collector = self.clone();
                    async move {
                        match collector.handle(uid.clone()).await {
                            Ok(()) => None,
                            Err(error) => {
                                tracing::warn!(%uid, %error, "garbage collection failed, will retry");
                                Some(uid)
                            }
                        }
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .filter_map(|failed| async move { failed })
                .collect()
                .await;
            if !failed.is_empty() {
                let collector = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_AFTER).await;
                    collector.graph.lock().dirty.extend(failed);
                    collector.wake.notify_one();
                });
            }
        }
    }
}

async fn watch_kind<K>(collector: Arc<Collector>, shutdown: CancellationToken)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = Arc::new(ApiResource::erase::<K>(&()));
    let events = watcher::watcher(
        Api::<K>::all(collector.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .take_until(shutdown.cancelled_owned());
    events
        .for_each(|event| {
            match event {
                Ok(event) => {
                    if collector.graph.lock().apply(&kind, event) {
                        collector.wake.notify_one();
                    }
                }
                Err(error) => {
                    tracing::warn!(kind = %kind.kind, %error, "garbage collector watch failed")
                }
            }
            futures::future::ready(())
        })
        .await;
}

/// Runs the garbage collector until `shutdown` is cancelled.
pub(crate) async fn run(client: kube::Client, shutdown: CancellationToken) {
    let collector = Arc::new(Collector {
        client,
        graph: Mutex::new(Graph::default()),
        wake: Notify::new(),
    });
    tokio::join!(
        watch_kind::<Pod>(collector.clone(), shutdown.clone()),
        watch_kind::<Job>(collector.clone(), shutdown.clone()),
        watch_kind::<ConfigMap>(collector.clone(), shutdown.clone()),
        watch_kind::<Secret>(collector.clone(), shutdown.clone()),
        watch_kind::<CoreEvent>(collector.clone(), shutdown.clone()),
        collector.clone().check_unwatched_owners(shutdown.clone()),
        collector.work(shutdown),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, owner: Option<&str>, deleting: bool, finalizers: &[&str]) -> Pod {
        let owners: Vec<_> = owner
            .map(|o| json!({"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": o, "blockOwnerDeletion": true}))
            .into_iter()
            .collect();
        let mut meta = json!({"name": uid, "namespace": "default", "uid": uid,
            "ownerReferences": owners, "finalizers": finalizers});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({"metadata": meta})).expect("a valid pod")
    }

    fn collector(objects: Vec<Pod>) -> Collector {
        let kind = Arc::new(ApiResource::erase::<Pod>(&()));
        let mut graph = Graph::default();
        for object in objects {
            graph.apply(&kind, Event::Apply(object));
        }
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("a uri"),
        ))
        .expect("a client");
        Collector {
            client,
            graph: Mutex::new(graph),
            wake: Notify::new(),
        }
    }

    #[tokio::test]
    async fn a_dependent_whose_owners_are_unknown_is_checked_and_one_with_a_live_owner_is_not() {
        let collector = collector(vec![
            pod("owner", None, false, &[]),
            pod("kept", Some("owner"), false, &[]),
            pod("orphan", Some("gone"), false, &[]),
        ]);
        assert!(collector.task("kept").is_none());
        assert!(
            matches!(collector.task("orphan"), Some(Task::CheckOwners { uid, .. }) if uid == "orphan")
        );
    }

    #[tokio::test]
    async fn foreground_and_orphan_owners_list_their_dependents() {
        let collector = collector(vec![
            pod("fg", None, true, &[FOREGROUND]),
            pod("child", Some("fg"), false, &[]),
            pod("or", None, true, &[ORPHAN]),
            pod("kid", Some("or"), false, &[]),
        ]);
        assert!(
            matches!(collector.task("fg"), Some(Task::Foreground { dependents, .. }) if dependents.len() == 1)
        );
        assert!(
            matches!(collector.task("or"), Some(Task::Orphan { dependents, .. }) if dependents[0].0 == "kid")
        );
    }

    #[test]
    fn removing_an_owner_marks_its_dependents_dirty() {
        let kind = Arc::new(ApiResource::erase::<Pod>(&()));
        let mut graph = Graph::default();
        graph.apply(&kind, Event::Apply(pod("owner", None, false, &[])));
        graph.apply(&kind, Event::Apply(pod("child", Some("owner"), false, &[])));
        graph.dirty.clear();
        graph.apply(&kind, Event::Delete(pod("owner", None, false, &[])));
        assert!(graph.dirty.contains("child"));
    }
}
