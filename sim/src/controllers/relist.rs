//! Reconcile triggers that survive a relist.
//!
//! A reflector applies a relist to its store only at `InitDone`, and
//! [`kube::runtime::applier`] drops a trigger whose object is not in the store. Objects
//! created while a watch was down (the relist after a `410 Gone` is the first time they are
//! seen) would therefore never be reconciled if they were woken as they are listed. This
//! wakes them once the relist is complete, which is also why the controllers here do not use
//! [`kube::runtime::Controller`]: it wakes them from `InitApply`.

use futures::{Stream, StreamExt, stream};
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};

/// The objects to reconcile from a reflector's event stream: each applied object at once,
/// relisted ones together when the relist is done. `on_delete` sees deleted objects, and
/// `what` names the watch in the warning a failed watch logs.
pub(crate) fn triggers<K>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    what: &'static str,
    mut on_delete: impl FnMut(&K),
) -> impl Stream<Item = ObjectRef<K>>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut relisted: Vec<ObjectRef<K>> = Vec::new();
    events.flat_map(move |event| {
        let woken = match event {
            Ok(Event::Init) => {
                relisted.clear();
                Vec::new()
            }
            Ok(Event::InitApply(object)) => {
                relisted.push(ObjectRef::from_obj(&object));
                Vec::new()
            }
            Ok(Event::InitDone) => std::mem::take(&mut relisted),
            Ok(Event::Apply(object)) => vec![ObjectRef::from_obj(&object)],
            Ok(Event::Delete(object)) => {
                on_delete(&object);
                Vec::new()
            }
            Err(error) => {
                tracing::warn!(%error, "{what} watch failed");
                Vec::new()
            }
        };
        stream::iter(woken)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn object(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn relisted_objects_wake_only_when_the_relist_is_done() {
        let events = vec![
            Ok(Event::Apply(object("a"))),
            Ok(Event::Init),
            Ok(Event::InitApply(object("b"))),
            Ok(Event::InitApply(object("c"))),
            Ok(Event::InitDone),
            Ok(Event::Delete(object("d"))),
        ];
        let mut deleted = Vec::new();
        let woken: Vec<String> = triggers(stream::iter(events), "test", |o: &ConfigMap| {
            deleted.push(o.metadata.name.clone().unwrap_or_default())
        })
        .map(|r| r.name)
        .collect()
        .await;
        assert_eq!(woken, ["a", "b", "c"]);
        assert_eq!(deleted, ["d"]);
    }

    #[tokio::test]
    async fn an_interrupted_relist_wakes_only_what_the_last_one_listed() {
        let events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(object("stale"))),
            Ok(Event::Init),
            Ok(Event::InitApply(object("fresh"))),
            Ok(Event::InitDone),
        ];
        let woken: Vec<String> = triggers(stream::iter(events), "test", |_: &ConfigMap| {})
            .map(|r| r.name)
            .collect()
            .await;
        assert_eq!(woken, ["fresh"]);
    }
}
