//! Node registration and heartbeats, as a kubelet (or virtual-kubelet) does them.
//!
//! The Node carries virtual-kubelet's conventions when it is virtual (the
//! `virtual-kubelet.io/provider` taint, `type=virtual-kubelet`, large capacity) and looks like
//! a small worker otherwise. Liveness is reported twice, at two rates, as upstream does: a
//! `coordination.k8s.io/v1` Lease in `kube-node-lease` renewed every few seconds, and the
//! Node's `Ready` condition heartbeat at a slower rate.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;

use super::{NodeCapacity, NodeConfig};
use crate::controllers::retry::{has_code, retry};

/// The taint only pods opted into the virtual node tolerate.
pub const VIRTUAL_KUBELET_TAINT: &str = "virtual-kubelet.io/provider";
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the Lease is renewed.
const LEASE_RENEW: Duration = Duration::from_secs(5);
/// How often the Node's conditions are re-posted.
const STATUS_HEARTBEAT: Duration = Duration::from_secs(30);
/// The address the node agent serves logs on and reports as the node's InternalIP.
pub(crate) const HOST_IP: &str = "127.0.0.1";

/// What the node offers when its config does not say.
pub(crate) fn capacity(config: &NodeConfig) -> NodeCapacity {
    config.capacity.clone().unwrap_or_else(|| {
        if config.virtual_kubelet {
            NodeCapacity {
                cpu: "10k".into(),
                memory: "100Ti".into(),
                pods: "10000".into(),
            }
        } else {
            NodeCapacity {
                cpu: "4".into(),
                memory: "16Gi".into(),
                pods: "20".into(),
            }
        }
    })
}

/// The Node's metadata and spec.
pub(crate) fn node(config: &NodeConfig) -> Node {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/role".to_owned(), "agent".to_owned()),
        ("kubernetes.io/hostname".to_owned(), config.name.clone()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
    ]);
    let mut taints = Vec::new();
    if config.virtual_kubelet {
        labels.insert("type".to_owned(), "virtual-kubelet".to_owned());
        taints.push(Taint {
            key: VIRTUAL_KUBELET_TAINT.to_owned(),
            value: Some("spate".to_owned()),
            effect: "NoSchedule".to_owned(),
            time_added: None,
        });
    }
    Node {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: (!taints.is_empty()).then_some(taints),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
    since: Timestamp,
) -> NodeCondition {
    NodeCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    }
}

/// The Node's status: capacity, conditions, addresses and the log server's port.
pub(crate) fn node_status(
    config: &NodeConfig,
    log_port: u16,
    now: Timestamp,
    since: Timestamp,
) -> NodeStatus {
    let capacity = capacity(config);
    let resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity(capacity.cpu)),
        ("memory".to_owned(), Quantity(capacity.memory)),
        ("pods".to_owned(), Quantity(capacity.pods)),
    ]);
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
                now,
                since,
            ),
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                now,
                since,
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
                now,
                since,
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                now,
                since,
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_owned(),
                address: HOST_IP.to_owned(),
            },
            NodeAddress {
                type_: "Hostname".to_owned(),
                address: config.name.clone(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(log_port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".to_owned(),
            boot_id: config.name.clone(),
            container_runtime_version: "spate-sim://0.1.0".to_owned(),
            kernel_version: "spate-sim".to_owned(),
            kube_proxy_version: String::new(),
            kubelet_version: "v1.33.0-spate-sim".to_owned(),
            machine_id: config.name.clone(),
            operating_system: "linux".to_owned(),
            os_image: if config.virtual_kubelet {
                "virtual-kubelet"
            } else {
                "spate-sim"
            }
            .to_owned(),
            system_uuid: config.name.clone(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

/// Creates the Node (or takes over an existing one) and posts its status; returns its uid.
pub(crate) async fn register(
    client: &kube::Client,
    config: &NodeConfig,
    log_port: u16,
) -> Result<String, kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let desired = node(config);
    let post = PostParams::default();
    let registered = match retry(|| api.create(&post, &desired)).await {
        Ok(node) => node,
        Err(error) if has_code(&error, 409) => {
            let patch = serde_json::json!({
                "metadata": {"labels": desired.metadata.labels},
                "spec": {"taints": desired.spec.as_ref().and_then(|s| s.taints.clone())},
            });
            let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
            retry(|| api.patch(&config.name, &params, &patch)).await?
        }
        Err(error) => return Err(error),
    };
    let now = Timestamp::now();
    post_status(&api, config, log_port, now, now).await?;
    Ok(registered.metadata.uid.unwrap_or_default())
}

async fn post_status(
    api: &Api<Node>,
    config: &NodeConfig,
    log_port: u16,
    now: Timestamp,
    since: Timestamp,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "status": node_status(config, log_port, now, since) });
    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
    retry(|| api.patch_status(&config.name, &params, &patch))
        .await
        .map(drop)
}

fn lease(name: &str, node_uid: &str, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(LEASE_NAMESPACE.to_owned()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Node".to_owned(),
                name: name.to_owned(),
                uid: node_uid.to_owned(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_owned()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

async fn renew_lease(api: &Api<Lease>, name: &str, node_uid: &str) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let patch = serde_json::json!({"spec": {"renewTime": MicroTime(now), "holderIdentity": name}});
    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
    match retry(|| api.patch(name, &params, &patch)).await {
        Err(error) if has_code(&error, 404) => {
            let post = PostParams::default();
            let lease = lease(name, node_uid, now);
            retry(|| api.create(&post, &lease)).await.map(drop)
        }
        other => other.map(drop),
    }
}

/// Renews the Lease and re-posts the Node's status until `shutdown` is cancelled.
pub(crate) async fn heartbeat(
    client: kube::Client,
    config: NodeConfig,
    node_uid: String,
    log_port: u16,
    shutdown: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let since = Timestamp::now();
    let mut lease_tick = tokio::time::interval(LEASE_RENEW);
    let mut status_tick = tokio::time::interval(STATUS_HEARTBEAT);
    status_tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = lease_tick.tick() => {
                if let Err(error) = renew_lease(&leases, &config.name, &node_uid).await {
                    tracing::warn!(node = %config.name, %error, "could not renew node lease");
                }
            }
            _ = status_tick.tick() => {
                if let Err(error) = post_status(&nodes, &config, log_port, Timestamp::now(), since).await {
                    tracing::warn!(node = %config.name, %error, "could not post node status");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtual_node_is_tainted_labelled_and_large() {
        let config = NodeConfig {
            name: "vk".into(),
            ..NodeConfig::default()
        };
        let node = node(&config);
        let labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("type").map(String::as_str),
            Some("virtual-kubelet")
        );
        assert_eq!(
            labels.get("kubernetes.io/hostname").map(String::as_str),
            Some("vk")
        );
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        assert_eq!(taints[0].key, VIRTUAL_KUBELET_TAINT);
        assert_eq!(taints[0].effect, "NoSchedule");
        let status = node_status(&config, 10250, Timestamp::now(), Timestamp::now());
        assert_eq!(
            status.allocatable.unwrap_or_default().get("pods"),
            Some(&Quantity("10000".into()))
        );
        assert_eq!(
            status
                .daemon_endpoints
                .and_then(|d| d.kubelet_endpoint)
                .map(|e| e.port),
            Some(10250)
        );
    }

    #[test]
    fn a_regular_node_is_untainted_and_small() {
        let config = NodeConfig {
            name: "worker".into(),
            virtual_kubelet: false,
            ..NodeConfig::default()
        };
        let node = node(&config);
        assert!(node.spec.and_then(|s| s.taints).is_none());
        assert!(
            !node
                .metadata
                .labels
                .unwrap_or_default()
                .contains_key("type")
        );
        assert_eq!(capacity(&config).pods, "20");
    }
}
