//! Where a reconcile reads a namespace's subscriptions. A consistent LIST per reconcile
//! cost the API server ~15 ms each, ~14 times per group (Job events, result wake-ups):
//! most of its time in a burst. The subscription watch's store is used instead whenever
//! it holds exactly what the namespace's last LIST returned (same objects, same
//! versions): it has then caught up with that read, so it is never older than it. A
//! store that differs (it trails the LIST, or a change arrived since) sends the reconcile
//! to LIST again, and a group's first look LISTs whatever the store says, so a
//! subscription made just before a group is never missed by a store that trails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures::FutureExt;
use kube::api::ListParams;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};

use crate::crd::WebhookSubscription;
use crate::sync::{lock, read, write};

/// An object as a read saw it: (uid, resourceVersion).
type Seen = (String, String);

#[derive(Default)]
pub struct SubscriptionSource {
    /// The current leadership term's watch of subscriptions.
    store: RwLock<Option<Store<WebhookSubscription>>>,
    /// What the last LIST of each namespace returned, sorted.
    listed: Mutex<HashMap<String, Vec<Seen>>>,
}

impl SubscriptionSource {
    /// A new term's watch: what earlier LISTs saw is compared with it from now on.
    pub fn watch_with(&self, store: Store<WebhookSubscription>) {
        *write(&self.store) = Some(store);
        lock(&self.listed).clear();
    }

    /// The namespace's subscriptions; `consistent` asks the API server whatever the store
    /// holds.
    pub async fn in_namespace(
        &self,
        client: &Client,
        namespace: &str,
        consistent: bool,
    ) -> Result<Vec<Arc<WebhookSubscription>>, kube::Error> {
        if !consistent && let Some(cached) = self.caught_up(namespace) {
            return Ok(cached);
        }
        let api: Api<WebhookSubscription> = Api::namespaced(client.clone(), namespace);
        let listed: Vec<Arc<WebhookSubscription>> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(Arc::new)
            .collect();
        let mut listed_map = lock(&self.listed);
        // Namespaces are tenants; a clear past this many only costs LISTs.
        if listed_map.len() > 10_000 {
            listed_map.clear();
        }
        listed_map.insert(namespace.to_owned(), seen(&listed));
        Ok(listed)
    }

    /// The store's subscriptions of `namespace` when they are exactly what its last LIST
    /// saw.
    fn caught_up(&self, namespace: &str) -> Option<Vec<Arc<WebhookSubscription>>> {
        let store = read(&self.store).clone()?;
        store.wait_until_ready().now_or_never()?.ok()?;
        let held = store.state_filter(|sub| sub.metadata.namespace.as_deref() == Some(namespace));
        let listed = lock(&self.listed);
        (listed.get(namespace)? == &seen(&held)).then_some(held)
    }
}

fn seen(subscriptions: &[Arc<WebhookSubscription>]) -> Vec<Seen> {
    let mut seen: Vec<Seen> = subscriptions
        .iter()
        .map(|sub| {
            (
                sub.uid().unwrap_or_default(),
                sub.resource_version().unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher;

    fn subscription(namespace: &str, name: &str, version: &str) -> WebhookSubscription {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kinsight.io/v1alpha1",
            "kind": "WebhookSubscription",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("uid-{name}"),
                "resourceVersion": version,
            },
            "spec": {
                "url": "https://hooks.example.com/in",
                "secretRef": { "name": "signing", "key": "secret" }
            }
        }))
        .expect("subscription")
    }

    fn source_with(
        objects: &[WebhookSubscription],
    ) -> (
        SubscriptionSource,
        kube::runtime::reflector::store::Writer<WebhookSubscription>,
    ) {
        let (store, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(object.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let source = SubscriptionSource::default();
        source.watch_with(store);
        (source, writer)
    }

    fn listed(source: &SubscriptionSource, namespace: &str, objects: &[WebhookSubscription]) {
        let objects: Vec<_> = objects.iter().cloned().map(Arc::new).collect();
        lock(&source.listed).insert(namespace.to_owned(), seen(&objects));
    }

    fn names(held: Option<Vec<Arc<WebhookSubscription>>>) -> Option<Vec<String>> {
        held.map(|subs| {
            let mut names: Vec<String> = subs.iter().map(|s| s.name_any()).collect();
            names.sort();
            names
        })
    }

    #[test]
    fn the_store_is_read_only_when_it_holds_what_the_last_list_saw() {
        let a1 = subscription("tenant-a", "a", "1");
        let b1 = subscription("tenant-a", "b", "2");
        let other = subscription("tenant-b", "c", "3");
        let (source, mut writer) = source_with(&[a1.clone(), b1.clone(), other.clone()]);
        assert!(
            source.caught_up("tenant-a").is_none(),
            "nothing listed yet: the API server is asked"
        );
        listed(&source, "tenant-a", &[a1.clone(), b1.clone()]);
        assert_eq!(
            names(source.caught_up("tenant-a")),
            Some(vec!["a".to_owned(), "b".to_owned()]),
            "the store holds what the LIST saw, and only the namespace's"
        );
        // The store trails a LIST that saw a new version of `a` (its URL corrected).
        let a2 = subscription("tenant-a", "a", "4");
        listed(&source, "tenant-a", &[a2.clone(), b1.clone()]);
        assert!(
            source.caught_up("tenant-a").is_none(),
            "an older copy is never used"
        );
        writer.apply_watcher_event(&watcher::Event::Apply(a2.clone()));
        assert!(source.caught_up("tenant-a").is_some(), "caught up");
        // A subscription made since the LIST: the store differs, so the next look LISTs.
        let d5 = subscription("tenant-a", "d", "5");
        writer.apply_watcher_event(&watcher::Event::Apply(d5.clone()));
        assert!(source.caught_up("tenant-a").is_none());
        // One deleted: likewise until a LIST agrees.
        listed(&source, "tenant-a", &[a2.clone(), b1.clone(), d5.clone()]);
        assert!(source.caught_up("tenant-a").is_some());
        writer.apply_watcher_event(&watcher::Event::Delete(b1.clone()));
        assert!(source.caught_up("tenant-a").is_none());
        // A new term's watch forgets what the last one's LISTs saw.
        let (store, _writer) = kube::runtime::reflector::store();
        source.watch_with(store);
        assert!(lock(&source.listed).is_empty());
        assert!(
            source.caught_up("tenant-a").is_none(),
            "a store not ready is not read"
        );
    }
}
