//! The resource registry: which resources the server serves and how they behave.
//!
//! Built-in resources are fixed at start; custom resources appear when a
//! `CustomResourceDefinition` is stored and disappear when it is deleted, exactly as the
//! apiextensions server makes them appear in discovery.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::{Value, json};

/// Verbs of a resource that supports everything.
const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// One `additionalPrinterColumns` entry of a CRD version.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type (`string`, `integer`, `date`, ...).
    pub column_type: String,
    /// Simple JSONPath such as `.spec.size`.
    pub json_path: String,
    /// 0: always shown; higher: only with `kubectl get -o wide`.
    pub priority: u8,
}

/// How a resource is served.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceInfo {
    /// API group, empty for the core group.
    pub group: String,
    /// Served versions, the storage (preferred) version first.
    pub versions: Vec<String>,
    /// Plural resource name used in paths.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Object kind.
    pub kind: String,
    /// `true` when objects live in namespaces.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: Vec<String>,
    /// Categories such as `all`.
    pub categories: Vec<String>,
    /// Whether a `status` subresource splits spec and status writes.
    pub status_subresource: bool,
    /// Subresources other than `status` (e.g. `log`, `binding`).
    pub extra_subresources: Vec<String>,
    /// `true` for built-in types: strategic merge patch and strict field validation apply.
    pub builtin: bool,
    /// Whether `metadata.generation` tracks spec changes.
    pub tracks_generation: bool,
    /// Printer columns for table output (custom resources).
    pub printer_columns: Vec<PrinterColumn>,
    /// The group whose storage holds these objects (`events.k8s.io` Events live with core
    /// Events); the resource's own group otherwise.
    pub storage_group: String,
}

impl ResourceInfo {
    /// `plural.group`, or `plural` for the core group, as error messages spell it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The storage version.
    pub fn storage_version(&self) -> &str {
        self.versions.first().map(String::as_str).unwrap_or("v1")
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// Discovery entries (`APIResource`) for this resource and its subresources.
    fn discovery_entries(&self) -> Vec<Value> {
        let mut entries = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ALL_VERBS,
            "shortNames": self.short_names,
            "categories": self.categories,
        })];
        if self.status_subresource {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        for sub in &self.extra_subresources {
            let (kind, verbs) = match sub.as_str() {
                "log" => ("Pod", json!(["get"])),
                "binding" => ("Binding", json!(["create"])),
                _ => (self.kind.as_str(), json!(["get"])),
            };
            entries.push(json!({
                "name": format!("{}/{sub}", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind,
                "verbs": verbs,
            }));
        }
        entries
    }
}

/// Options for one built-in resource; keeps the table below readable.
struct Builtin {
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    extra: &'static [&'static str],
    generation: bool,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
        status: true,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        short: &["no"],
        status: true,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
        status: true,
        extra: &["log", "binding"],
        generation: false,
    },
    Builtin {
        group: "",
        plural: "events",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        short: &[],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "",
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
        short: &["sa"],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "coordination.k8s.io",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        short: &[],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "events.k8s.io",
        plural: "events",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "batch",
        plural: "jobs",
        kind: "Job",
        namespaced: true,
        short: &[],
        status: true,
        extra: &[],
        generation: true,
    },
    // Kinds a Helm chart installs (the Spate chart among them): stored and served like the
    // others, with no controller acting on them (a Deployment never gets pods, as on a
    // cluster whose controller manager is down).
    Builtin {
        group: "",
        plural: "services",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
        status: true,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "apps",
        plural: "deployments",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
        status: true,
        extra: &[],
        generation: true,
    },
    Builtin {
        group: "policy",
        plural: "poddisruptionbudgets",
        kind: "PodDisruptionBudget",
        namespaced: true,
        short: &["pdb"],
        status: true,
        extra: &[],
        generation: true,
    },
    Builtin {
        group: "networking.k8s.io",
        plural: "networkpolicies",
        kind: "NetworkPolicy",
        namespaced: true,
        short: &["netpol"],
        status: false,
        extra: &[],
        generation: true,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        plural: "roles",
        kind: "Role",
        namespaced: true,
        short: &[],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        plural: "rolebindings",
        kind: "RoleBinding",
        namespaced: true,
        short: &[],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        plural: "clusterroles",
        kind: "ClusterRole",
        namespaced: false,
        short: &[],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        plural: "clusterrolebindings",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short: &[],
        status: false,
        extra: &[],
        generation: false,
    },
    Builtin {
        group: "apiextensions.k8s.io",
        plural: "customresourcedefinitions",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short: &["crd", "crds"],
        status: true,
        extra: &[],
        generation: true,
    },
];

fn builtin_info(b: &Builtin) -> ResourceInfo {
    let categories = match b.plural {
        "pods" | "jobs" | "services" | "deployments" => vec!["all".to_owned()],
        _ => Vec::new(),
    };
    ResourceInfo {
        group: b.group.to_owned(),
        versions: vec!["v1".to_owned()],
        plural: b.plural.to_owned(),
        singular: b.kind.to_ascii_lowercase(),
        kind: b.kind.to_owned(),
        namespaced: b.namespaced,
        short_names: b.short.iter().map(|s| (*s).to_owned()).collect(),
        categories,
        status_subresource: b.status,
        extra_subresources: b.extra.iter().map(|s| (*s).to_owned()).collect(),
        builtin: true,
        tracks_generation: b.generation,
        storage_group: if b.group == "events.k8s.io" {
            String::new()
        } else {
            b.group.to_owned()
        },
        printer_columns: Vec::new(),
    }
}

/// Reads a CRD's served shape; `None` when its spec is too incomplete to serve.
pub fn info_from_crd(crd: &Value) -> Option<ResourceInfo> {
    let spec = crd.get("spec")?;
    let names = spec.get("names")?;
    let str_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let plural = str_of(names, "plural")?;
    let kind = str_of(names, "kind")?;
    let group = str_of(spec, "group")?;
    let list_of = |v: &Value, key: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut versions: Vec<(bool, String, &Value)> = spec
        .get("versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
                .filter_map(|v| {
                    let storage = v.get("storage").and_then(Value::as_bool).unwrap_or(false);
                    Some((storage, str_of(v, "name")?, v))
                })
                .collect()
        })
        .unwrap_or_default();
    // Storage version first: it is the one discovery prefers and objects are kept in.
    versions.sort_by_key(|(storage, _, _)| !*storage);
    let (_, _, first) = versions.first()?;
    let status_subresource = first.pointer("/subresources/status").is_some();
    let printer_columns = first
        .get("additionalPrinterColumns")
        .and_then(Value::as_array)
        .map(|cols| {
            cols.iter()
                .filter_map(|c| {
                    Some(PrinterColumn {
                        name: str_of(c, "name")?,
                        column_type: str_of(c, "type").unwrap_or_else(|| "string".into()),
                        json_path: str_of(c, "jsonPath")?,
                        priority: c
                            .get("priority")
                            .and_then(Value::as_u64)
                            .map_or(0, |p| u8::try_from(p).unwrap_or(u8::MAX)),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ResourceInfo {
        singular: str_of(names, "singular").unwrap_or_else(|| kind.to_ascii_lowercase()),
        short_names: list_of(names, "shortNames"),
        categories: list_of(names, "categories"),
        namespaced: spec.get("scope").and_then(Value::as_str) != Some("Cluster"),
        versions: versions.into_iter().map(|(_, name, _)| name).collect(),
        storage_group: group.clone(),
        group,
        plural,
        kind,
        status_subresource,
        extra_subresources: Vec::new(),
        builtin: false,
        tracks_generation: true,
        printer_columns,
    })
}

/// The set of served resources, keyed by `(group, plural)`.
#[derive(Debug, Default)]
pub struct Registry {
    resources: RwLock<HashMap<(String, String), Arc<ResourceInfo>>>,
}

impl Registry {
    /// A registry with the built-in resources.
    pub fn with_builtins() -> Self {
        let registry = Self::default();
        for b in BUILTINS {
            registry.insert(builtin_info(b));
        }
        registry
    }

    /// Adds or replaces a resource.
    pub fn insert(&self, info: ResourceInfo) {
        let key = (info.group.clone(), info.plural.clone());
        self.resources.write().insert(key, Arc::new(info));
    }

    /// Removes a custom resource; built-ins cannot be removed.
    pub fn remove(&self, group: &str, plural: &str) {
        let mut resources = self.resources.write();
        let key = (group.to_owned(), plural.to_owned());
        if resources.get(&key).is_some_and(|info| !info.builtin) {
            resources.remove(&key);
        }
    }

    /// The resource served at `group/version/plural`.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        let resources = self.resources.read();
        let info = resources.get(&(group.to_owned(), plural.to_owned()))?;
        info.versions
            .iter()
            .any(|v| v == version)
            .then(|| info.clone())
    }

    /// Every served resource, in a stable order.
    pub fn all(&self) -> Vec<Arc<ResourceInfo>> {
        let mut all: Vec<_> = self.resources.read().values().cloned().collect();
        all.sort_by(|a, b| (&a.group, &a.plural).cmp(&(&b.group, &b.plural)));
        all
    }

    /// Whether `group/version` is served at all.
    pub fn serves(&self, group: &str, version: &str) -> bool {
        self.resources
            .read()
            .values()
            .any(|i| i.group == group && i.versions.iter().any(|v| v == version))
    }

    /// `APIResourceList` for one group version.
    pub fn resource_list(&self, group: &str, version: &str) -> Value {
        let resources: Vec<Value> = self
            .all()
            .iter()
            .filter(|i| i.group == group && i.versions.iter().any(|v| v == version))
            .flat_map(|i| i.discovery_entries())
            .collect();
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        })
    }

    /// `APIGroup` entries for every non-core group.
    pub fn groups(&self) -> Vec<Value> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for info in self.all().iter().filter(|i| !i.group.is_empty()) {
            match groups.iter_mut().find(|(g, _)| *g == info.group) {
                Some((_, versions)) => {
                    for v in &info.versions {
                        if !versions.contains(v) {
                            versions.push(v.clone());
                        }
                    }
                }
                None => groups.push((info.group.clone(), info.versions.clone())),
            }
        }
        groups
            .iter()
            .map(|(name, versions)| group_json(name, versions))
            .collect()
    }

    /// `APIGroup` for one group, if served.
    pub fn group(&self, name: &str) -> Option<Value> {
        self.groups().into_iter().find(|g| g["name"] == name)
    }
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_becomes_a_served_resource_with_storage_version_first() {
        let crd = json!({"spec": {
        "group": "example.com", "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
        "versions": [
            {"name": "v1alpha1", "served": true, "storage": false},
            {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
             "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                 {"name": "Colour", "type": "string", "jsonPath": ".spec.colour", "priority": 1}]}
        ]}});
        let info = info_from_crd(&crd).expect("complete CRD");
        assert_eq!(info.versions, vec!["v1", "v1alpha1"]);
        assert!(info.status_subresource && info.namespaced);
        assert_eq!(info.printer_columns[0].json_path, ".spec.size");
        assert_eq!(
            (
                info.printer_columns[0].priority,
                info.printer_columns[1].priority
            ),
            (0, 1)
        );
        let registry = Registry::with_builtins();
        registry.insert(info);
        assert!(
            registry
                .lookup("example.com", "v1alpha1", "widgets")
                .is_some()
        );
        let list = registry.resource_list("example.com", "v1");
        assert_eq!(list["resources"][1]["name"], "widgets/status");
        registry.remove("example.com", "widgets");
        assert!(registry.lookup("example.com", "v1", "widgets").is_none());
        registry.remove("", "pods");
        assert!(registry.lookup("", "v1", "pods").is_some());
    }

    #[test]
    fn the_kinds_a_helm_chart_installs_are_served() {
        let registry = Registry::with_builtins();
        for (group, plural, namespaced) in [
            ("", "services", true),
            ("apps", "deployments", true),
            ("policy", "poddisruptionbudgets", true),
            ("networking.k8s.io", "networkpolicies", true),
            ("rbac.authorization.k8s.io", "roles", true),
            ("rbac.authorization.k8s.io", "rolebindings", true),
            ("rbac.authorization.k8s.io", "clusterroles", false),
            ("rbac.authorization.k8s.io", "clusterrolebindings", false),
        ] {
            let info = registry
                .lookup(group, "v1", plural)
                .unwrap_or_else(|| panic!("{plural}.{group} is not served"));
            assert!(info.builtin, "{plural}");
            assert_eq!(info.namespaced, namespaced, "{plural}");
        }
        let groups: Vec<String> = registry
            .groups()
            .iter()
            .map(|g| g["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        for group in [
            "apps",
            "policy",
            "networking.k8s.io",
            "rbac.authorization.k8s.io",
        ] {
            assert!(groups.iter().any(|g| g == group), "{group} in {groups:?}");
        }
        let deployments = registry.resource_list("apps", "v1");
        assert_eq!(deployments["resources"][0]["shortNames"][0], "deploy");
        assert_eq!(deployments["resources"][1]["name"], "deployments/status");
    }
}
