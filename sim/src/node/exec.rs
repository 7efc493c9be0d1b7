//! Exec mode: a container's `command` + `args` run as a local process.
//!
//! The process gets the container's environment as the kubelet resolves it (literal values
//! with `$(VAR)` expansion, `fieldRef` on the pod's metadata, `configMapKeyRef` /
//! `secretKeyRef` and `envFrom` read through the API), the working directory `workingDir` (or
//! the pod's sandbox directory), and no shell unless the command itself is one: arguments are
//! passed as they are, never joined into a command line. stdout and stderr go line by line to
//! the container's log.
//!
//! Volumes cannot be bind-mounted without privileges, so they are handled like this:
//! configMap, secret and emptyDir volumes are materialised under the pod's sandbox directory,
//! hostPath volumes are used in place; each mount then appears at
//! `$SPATE_SIM_VOLUME_ROOT/<mountPath>` (a symlink in a per-pod directory tree that mirrors
//! the container's file system), and, when `mountPath` lies under the system temp directory
//! and does not exist yet, at `mountPath` itself. `readOnly` is not enforced. A container
//! without `command` or `args` has no local entry point and is simulated instead.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::sync::CancellationToken;

use super::logs::ContainerLog;
use crate::controllers::retry::retry;

/// Name of the variable pointing at the directory tree that mirrors mount paths.
pub(crate) const VOLUME_ROOT_VAR: &str = "SPATE_SIM_VOLUME_ROOT";
const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// Why a container could not be configured (the kubelet's `CreateContainerConfigError`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A referenced ConfigMap or Secret, or one of its keys, is missing.
    #[error("{kind} {name:?} {detail}")]
    Missing {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// What is missing.
        detail: String,
    },
    /// The API could not be asked.
    #[error("reading {kind} {name:?}: {source}")]
    Api {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The sandbox could not be prepared on disk.
    #[error("preparing volume {volume:?}: {source}")]
    Volume {
        /// The volume's name.
        volume: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `fieldRef` names a field the kubelet does not expose.
    #[error("unsupported fieldRef {0:?}")]
    FieldPath(String),
}

/// A pod's directory tree in exec mode.
#[derive(Debug)]
pub(crate) struct Sandbox {
    pub(crate) dir: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
    /// Symlinks created at real mount paths, removed when the pod goes.
    links: Vec<PathBuf>,
}

impl Sandbox {
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Removes what the sandbox placed outside its directory.
    pub(crate) async fn tear_down(&self) {
        for link in &self.links {
            if let Err(error) = tokio::fs::remove_file(link).await {
                tracing::debug!(link = %link.display(), %error, "could not remove volume link");
            }
        }
    }
}

async fn get<K>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    kind: &'static str,
) -> Result<Option<K>, ConfigError>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    retry(|| api.get_opt(name))
        .await
        .map_err(|source| ConfigError::Api {
            kind,
            name: name.to_owned(),
            source,
        })
}

/// The data of a ConfigMap or Secret as file contents.
async fn data_of(
    client: &kube::Client,
    namespace: &str,
    kind: &'static str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
    Ok(if kind == "configmap" {
        get::<ConfigMap>(client, namespace, name, kind)
            .await?
            .map(|cm| {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                data
            })
    } else {
        get::<Secret>(client, namespace, name, kind)
            .await?
            .map(|secret| {
                let mut data: BTreeMap<String, Vec<u8>> = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                data.extend(
                    secret
                        .string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                data
            })
    })
}

/// A relative path that stays inside its base directory.
fn contained(path: &str) -> bool {
    let path = Path::new(path);
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

async fn write_items(
    dir: &Path,
    volume: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Volume {
        volume: volume.to_owned(),
        source,
    };
    let files: Vec<(&str, &[u8])> = match items {
        Some(items) => items
            .iter()
            .filter_map(|item| Some((item.path.as_str(), data.get(&item.key)?.as_slice())))
            .collect(),
        None => data
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect(),
    };
    for (path, content) in files.into_iter().filter(|(path, _)| contained(path)) {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        tokio::fs::write(&target, content).await.map_err(io)?;
    }
    Ok(())
}

/// Materialises the pod's volumes under `dir`.
pub(crate) async fn prepare(
    client: &kube::Client,
    pod: &Pod,
    dir: PathBuf,
) -> Result<Sandbox, ConfigError> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut volumes = BTreeMap::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let io = |source| ConfigError::Volume {
            volume: volume.name.clone(),
            source,
        };
        let target = dir.join("volumes").join(&volume.name);
        let source = if let Some(host) = &volume.host_path {
            PathBuf::from(&host.path)
        } else if volume.empty_dir.is_some() {
            tokio::fs::create_dir_all(&target).await.map_err(io)?;
            target
        } else if let Some(cm) = &volume.config_map {
            tokio::fs::create_dir_all(&target).await.map_err(io)?;
            match data_of(client, &namespace, "configmap", &cm.name).await? {
                Some(data) => {
                    write_items(&target, &volume.name, &data, cm.items.as_deref()).await?
                }
                None if cm.optional == Some(true) => {}
                None => {
                    return Err(ConfigError::Missing {
                        kind: "configmap",
                        name: cm.name.clone(),
                        detail: "not found".into(),
                    });
                }
            }
            target
        } else if let Some(secret) = &volume.secret {
            tokio::fs::create_dir_all(&target).await.map_err(io)?;
            let name = secret.secret_name.clone().unwrap_or_default();
            match data_of(client, &namespace, "secret", &name).await? {
                Some(data) => {
                    write_items(&target, &volume.name, &data, secret.items.as_deref()).await?
                }
                None if secret.optional == Some(true) => {}
                None => {
                    return Err(ConfigError::Missing {
                        kind: "secret",
                        name,
                        detail: "not found".into(),
                    });
                }
            }
            target
        } else {
            tracing::warn!(volume = %volume.name, "volume type not supported in exec mode; left empty");
            tokio::fs::create_dir_all(&target).await.map_err(io)?;
            target
        };
        volumes.insert(volume.name.clone(), source);
    }
    let sandbox = Sandbox {
        dir,
        volumes,
        links: Vec::new(),
    };
    tokio::fs::create_dir_all(sandbox.rootfs())
        .await
        .map_err(|source| ConfigError::Volume {
            volume: "rootfs".into(),
            source,
        })?;
    Ok(sandbox)
}

/// Makes a container's mounts visible (see the module docs for where).
pub(crate) async fn mount(sandbox: &mut Sandbox, container: &Container) -> Result<(), ConfigError> {
    let temp = std::env::temp_dir();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = sandbox.volumes.get(&mount.name) else {
            continue;
        };
        let mut source = volume.clone();
        if let Some(sub) = mount.sub_path.as_deref().filter(|s| contained(s)) {
            source = source.join(sub);
        }
        let io = |source| ConfigError::Volume {
            volume: mount.name.clone(),
            source,
        };
        let relative = mount.mount_path.trim_start_matches('/');
        if !contained(relative) {
            continue;
        }
        let mirrored = sandbox.rootfs().join(relative);
        if let Some(parent) = mirrored.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        if tokio::fs::symlink_metadata(&mirrored).await.is_err() {
            tokio::fs::symlink(&source, &mirrored).await.map_err(io)?;
        }
        let real = PathBuf::from(&mount.mount_path);
        if real.starts_with(&temp) && tokio::fs::symlink_metadata(&real).await.is_err() {
            if let Some(parent) = real.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(io)?;
            }
            tokio::fs::symlink(&source, &real).await.map_err(io)?;
            sandbox.links.push(real);
        }
    }
    Ok(())
}

/// Expands `$(NAME)` from `env` as the kubelet does: `$$` escapes, unknown names stay as written.
pub(crate) fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The value of a downward-API `fieldRef`.
pub(crate) fn field_value(pod: &Pod, path: &str) -> Result<String, ConfigError> {
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|p| p.strip_suffix("']"))
            .map(str::to_owned)
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        _ => {
            if let Some(key) = keyed("metadata.labels['") {
                pod.labels().get(&key).cloned().unwrap_or_default()
            } else if let Some(key) = keyed("metadata.annotations['") {
                pod.annotations().get(&key).cloned().unwrap_or_default()
            } else {
                return Err(ConfigError::FieldPath(path.to_owned()));
            }
        }
    })
}

/// The container's environment, in definition order (later entries win).
pub(crate) async fn environment(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
) -> Result<Vec<(String, String)>, ConfigError> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut env: Vec<(String, String)> = Vec::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = match (&source.config_map_ref, &source.secret_ref) {
            (Some(cm), _) => ("configmap", cm.name.clone(), cm.optional == Some(true)),
            (None, Some(secret)) => ("secret", secret.name.clone(), secret.optional == Some(true)),
            (None, None) => continue,
        };
        match data_of(client, &namespace, kind, &name).await? {
            Some(data) => env.extend(data.into_iter().map(|(k, v)| {
                (
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })),
            None if optional => {}
            None => {
                return Err(ConfigError::Missing {
                    kind,
                    name,
                    detail: "not found".into(),
                });
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            expand(value, &env)
        } else if let Some(from) = &var.value_from {
            let keyed = match (&from.config_map_key_ref, &from.secret_key_ref) {
                (Some(r), _) => Some((
                    "configmap",
                    r.name.clone(),
                    r.key.clone(),
                    r.optional == Some(true),
                )),
                (None, Some(r)) => Some((
                    "secret",
                    r.name.clone(),
                    r.key.clone(),
                    r.optional == Some(true),
                )),
                (None, None) => None,
            };
            if let Some(field) = &from.field_ref {
                field_value(pod, &field.field_path)?
            } else if let Some((kind, name, key, optional)) = keyed {
                let data = data_of(client, &namespace, kind, &name).await?;
                match data.as_ref().and_then(|d| d.get(&key)) {
                    Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    None if optional => continue,
                    None => {
                        let detail = format!("has no key {key:?}");
                        return Err(ConfigError::Missing { kind, name, detail });
                    }
                }
            } else {
                // resourceFieldRef: the simulator enforces no limits, so there is no value.
                continue;
            }
        } else {
            String::new()
        };
        env.push((var.name.clone(), value));
    }
    if let Some(index) = pod.annotations().get(COMPLETION_INDEX)
        && !env.iter().any(|(k, _)| k == "JOB_COMPLETION_INDEX")
    {
        env.push(("JOB_COMPLETION_INDEX".to_owned(), index.clone()));
    }
    Ok(env)
}

/// The argv of a container, `None` when it has no local entry point.
pub(crate) fn argv(container: &Container, env: &[(String, String)]) -> Option<Vec<String>> {
    let argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|part| expand(part, env))
        .collect();
    (!argv.is_empty()).then_some(argv)
}

async fn pump(reader: impl AsyncRead + Unpin, stream: &'static str, log: Arc<ContainerLog>) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) => return,
            Ok(_) => {
                if let Err(error) = log.append(stream, &line).await {
                    tracing::warn!(%error, "could not write container log");
                }
            }
            Err(error) => {
                tracing::debug!(%error, "container output closed");
                return;
            }
        }
    }
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) argv: Vec<String>,
    /// `PATH` for the process; the simulator's own when `None`.
    pub(crate) path: Option<std::ffi::OsString>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) working_dir: Option<String>,
    pub(crate) hostname: String,
}

/// `program` as found on `path`, or as given when it has a slash or is not found (the spawn
/// then fails the way a missing executable does in a container).
fn resolve_program(program: &str, path: &std::ffi::OsStr) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Runs the process to completion (or until `cancel`), returning its exit code.
pub(crate) async fn run(
    launch: Launch,
    sandbox: &Sandbox,
    log: Arc<ContainerLog>,
    cancel: CancellationToken,
) -> i32 {
    let Some((program, args)) = launch.argv.split_first() else {
        return 128;
    };
    let path = launch
        .env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value.into())
        .or_else(|| launch.path.clone())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    // Resolved against the container's PATH, not the simulator's: `Command` would search the
    // parent's PATH for a bare program name.
    let program = resolve_program(program, &path);
    let mut command = tokio::process::Command::new(&program);
    command
        .args(args)
        .env_clear()
        .env("PATH", &path)
        .env("HOME", &sandbox.dir)
        .env("HOSTNAME", &launch.hostname)
        .env(VOLUME_ROOT_VAR, sandbox.rootfs())
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(
            launch
                .working_dir
                .as_deref()
                .map_or_else(|| sandbox.dir.clone(), PathBuf::from),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let message = format!("failed to start {program:?}: {error}");
            if let Err(error) = log.append("stderr", message.as_bytes()).await {
                tracing::warn!(%error, "could not write container log");
            }
            return 128;
        }
    };
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(pump(out, "stdout", log.clone())));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(pump(err, "stderr", log.clone())));
    let status = tokio::select! {
        status = child.wait() => status,
        () = cancel.cancelled() => {
            if let Err(error) = child.start_kill() {
                tracing::debug!(%error, "process already gone");
            }
            child.wait().await
        }
    };
    for pump in [stdout, stderr].into_iter().flatten() {
        if let Err(error) = pump.await {
            tracing::debug!(%error, "log pump ended abnormally");
        }
    }
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(128)
        }
        Err(error) => {
            tracing::warn!(%error, "waiting for container process failed");
            128
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expansion_follows_kubelet_rules() {
        let env = vec![
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "two".to_owned()),
        ];
        assert_eq!(expand("x-$(A)-$(B)", &env), "x-1-two");
        assert_eq!(expand("$$(A) $(MISSING) $", &env), "$(A) $(MISSING) $");
    }

    #[test]
    fn downward_api_reads_names_labels_and_annotations() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {
            "name": "p", "namespace": "ns", "labels": {"app": "resize"},
            "annotations": {COMPLETION_INDEX: "4"}}}))
        .expect("a valid pod");
        assert_eq!(
            field_value(&pod, "metadata.name").ok().as_deref(),
            Some("p")
        );
        assert_eq!(
            field_value(&pod, "metadata.labels['app']").ok().as_deref(),
            Some("resize")
        );
        let index = field_value(
            &pod,
            "metadata.annotations['batch.kubernetes.io/job-completion-index']",
        );
        assert_eq!(index.ok().as_deref(), Some("4"));
        assert!(field_value(&pod, "spec.bogus").is_err());
    }

    #[test]
    fn argv_keeps_arguments_separate() {
        let container: Container = serde_json::from_value(json!({
            "name": "c", "command": ["/bin/echo"], "args": ["hello $(WHO)", "; rm -rf /"]}))
        .expect("a valid container");
        let env = vec![("WHO".to_owned(), "pod".to_owned())];
        assert_eq!(
            argv(&container, &env),
            Some(vec![
                "/bin/echo".into(),
                "hello pod".into(),
                "; rm -rf /".into()
            ])
        );
        let bare: Container =
            serde_json::from_value(json!({"name": "c"})).expect("a valid container");
        assert_eq!(argv(&bare, &env), None);
    }

    #[test]
    fn only_relative_inner_paths_are_contained() {
        assert!(contained("a/b.txt"));
        assert!(!contained("../escape"));
        assert!(!contained("/etc/passwd"));
        assert!(!contained(""));
    }
}
