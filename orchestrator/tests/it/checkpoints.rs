//! Checkpoints kept in ConfigMaps survive the store (the process) that wrote them.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use spate::engine::checkpoints::ConfigMapCheckpoints;
use spate_sim::{SimCluster, SimConfig};
use spate_sources::checkpoint::CheckpointStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_saved_in_a_config_map_is_read_back_by_a_new_store() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let store = ConfigMapCheckpoints::new(cluster.client(), "default");
    assert_eq!(store.load("default/uploads").await.unwrap(), None);
    store
        .save("default/uploads", vec![0, 1, 2, 255])
        .await
        .unwrap();
    store.save("default/uploads", vec![9; 1000]).await.unwrap();
    store.save("default/other", b"x".to_vec()).await.unwrap();

    let restarted = ConfigMapCheckpoints::new(cluster.client(), "default");
    assert_eq!(
        restarted.load("default/uploads").await.unwrap(),
        Some(vec![9; 1000])
    );
    assert_eq!(
        restarted.load("default/other").await.unwrap(),
        Some(b"x".to_vec())
    );

    let maps: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let ours = maps
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=spate"))
        .await
        .unwrap();
    assert_eq!(
        ours.items.len(),
        2,
        "one ConfigMap per key, overwritten in place"
    );
    cluster.shutdown().await;
}
