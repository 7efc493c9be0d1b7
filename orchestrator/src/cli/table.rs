//! What the verbs that talk to a cluster share: a connection whose errors name the server,
//! reading a Pipeline (from the cluster or a file), kubectl-style tables and ages, and
//! printing objects as `-o yaml|json` does.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::Resource;
use kube::api::{Api, ListParams};
use serde::Serialize;
use serde_json::Value;

use super::{ClusterArgs, OutputFormat};
use crate::pipeline::{LoadedPipeline, Pipeline, load::check_resource, load_file};

/// A client, the namespace the flags and kubeconfig select, and the server, for errors.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
    pub server: String,
}

impl Cluster {
    /// Resolves the flags as kubectl does (`--kubeconfig`, `$KUBECONFIG`, `~/.kube/config`,
    /// in-cluster), with `-n` over the context's namespace.
    pub async fn connect(args: &ClusterArgs) -> anyhow::Result<Cluster> {
        let options = kube::config::KubeConfigOptions {
            context: args.context.clone(),
            ..Default::default()
        };
        let config = match &args.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
            }
            None if args.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
            None => kube::Config::infer()
                .await
                .context("no cluster configured: pass --kubeconfig or set $KUBECONFIG")?,
        };
        let server = config.cluster_url.to_string();
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config)?;
        Ok(Cluster {
            client,
            namespace,
            server: server.trim_end_matches('/').to_string(),
        })
    }

    /// An API error as is; anything else (refused, TLS, timeout) as "cannot reach" the server.
    pub fn error(&self, error: kube::Error) -> anyhow::Error {
        match error {
            kube::Error::Api(status) => anyhow!("{}", status.message),
            other => anyhow!(
                "cannot reach the Kubernetes API at {}: {other}",
                self.server
            ),
        }
    }

    /// The Pipeline `name` in `namespace`; the error says what is missing: the Pipeline (with
    /// its namespace) or the CRD.
    pub async fn pipeline(&self, namespace: &str, name: &str) -> anyhow::Result<Pipeline> {
        let pipelines: Api<Pipeline> = Api::namespaced(self.client.clone(), namespace);
        match pipelines.get(name).await {
            Ok(pipeline) => Ok(pipeline),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                self.check_crd(namespace).await?;
                bail!("pipeline \"{name}\" not found in namespace \"{namespace}\"")
            }
            Err(error) => Err(self.error(error)),
        }
    }

    /// Fails with how to install the CRD when the cluster does not serve Pipelines.
    pub async fn check_crd(&self, namespace: &str) -> anyhow::Result<()> {
        let pipelines: Api<Pipeline> = Api::namespaced(self.client.clone(), namespace);
        match pipelines
            .list_metadata(&ListParams::default().limit(1))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Err(self.crd_missing()),
            Err(error) => Err(self.error(error)),
        }
    }

    pub fn crd_missing(&self) -> anyhow::Error {
        anyhow!(
            "the cluster at {} does not know the Pipeline resource (pipelines.spate.dev): \
             install its CRD first with `spate crd | kubectl apply -f -`",
            self.server
        )
    }

    /// Maps a 404 on a Pipeline collection to the missing-CRD error.
    pub fn pipeline_list_error(&self, error: kube::Error) -> anyhow::Error {
        match error {
            kube::Error::Api(status) if status.code == 404 => self.crd_missing(),
            other => self.error(other),
        }
    }
}

/// A current-thread runtime: a CLI verb waits on the network, it does not compute.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The pipeline a verb works on: from a pipeline file (`-f`, as `spate run -f` runs it), or
/// from the cluster. Either way it passes the same checks as `spate validate`.
pub async fn resolve_pipeline(
    cluster: &Cluster,
    name: Option<&str>,
    file: Option<&Path>,
) -> anyhow::Result<LoadedPipeline> {
    if let Some(file) = file {
        let loaded = load_pipeline_file(file, name, &cluster.namespace)?;
        // Nothing else reads the cluster first: say now if it cannot be reached.
        cluster
            .client
            .apiserver_version()
            .await
            .map_err(|e| cluster.error(e))?;
        return Ok(loaded);
    }
    let Some(name) = name else {
        bail!("name the pipeline, or give its file with -f FILE");
    };
    let pipeline = cluster.pipeline(&cluster.namespace, name).await?;
    check_resource(&pipeline).map_err(|problems| {
        anyhow!(
            "pipeline {name} in namespace {} is invalid (the controller does not run it \
             either):\n  {}",
            cluster.namespace,
            problems.join("\n  ")
        )
    })
}

/// A pipeline from a file, checked as `spate validate` checks it, and placed in `namespace`
/// when it names none, as `spate run -f` places it.
pub fn load_pipeline_file(
    file: &Path,
    name: Option<&str>,
    namespace: &str,
) -> anyhow::Result<LoadedPipeline> {
    let pipelines = load_file(file).map_err(|diagnostics| {
        let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
        anyhow!("{}", lines.join("\n"))
    })?;
    let mut loaded = match (name, pipelines.as_slice()) {
        (None, [only]) => only.clone(),
        (None, _) => bail!(
            "{} holds several pipelines; name the one to use before -f",
            file.display()
        ),
        (Some(name), all) => all
            .iter()
            .find(|p| p.pipeline.metadata.name.as_deref() == Some(name))
            .cloned()
            .with_context(|| format!("no pipeline named {name} in {}", file.display()))?,
    };
    if loaded.pipeline.metadata.namespace.is_none() {
        loaded.pipeline.metadata.namespace = Some(namespace.to_string());
    }
    Ok(loaded)
}

/// The owner reference the engine puts on the Jobs of a Pipeline resource; none for a
/// pipeline from a file, which has no uid.
pub fn owner_reference(pipeline: &Pipeline) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Pipeline::api_version(&()).to_string(),
        kind: Pipeline::kind(&()).to_string(),
        name: pipeline.metadata.name.clone()?,
        uid: pipeline.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Columns aligned as `kubectl get` aligns them: upper-case headers, three spaces between.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(column))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[column] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) -> anyhow::Result<()> {
        std::io::stdout()
            .lock()
            .write_all(self.render().as_bytes())?;
        Ok(())
    }
}

/// How long ago `time` was, as kubectl's AGE column says it (`45s`, `3m2s`, `5h`, `12d`).
pub fn age(time: Option<&Time>, now: Timestamp) -> String {
    match time {
        Some(Time(then)) => human_duration(now.as_second() - then.as_second()),
        None => "<unknown>".to_string(),
    }
}

/// kubectl's `duration.HumanDuration`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    let seconds = seconds.max(0);
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        return match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        return match days % 365 {
            0 => format!("{years}y"),
            d => format!("{years}y{d}d"),
        };
    }
    format!("{years}y")
}

/// Text cut to `max` characters, with `…` when something was left out.
pub fn cut(text: &str, max: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Prints objects as `kubectl get -o yaml|json` does: one object as itself, several as a
/// `List`; `managedFields` left out (they are the server's bookkeeping).
pub fn print_objects<T: Serialize>(
    format: OutputFormat,
    objects: &[T],
    (api_version, kind): (&str, &str),
    single: bool,
) -> anyhow::Result<()> {
    let mut items = Vec::with_capacity(objects.len());
    for object in objects {
        let mut value = serde_json::to_value(object)?;
        tag(&mut value, api_version, kind);
        if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("managedFields");
        }
        items.push(value);
    }
    let document = match (single, items.len()) {
        (true, 1) => items.remove(0),
        _ => serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": items,
            "metadata": {"resourceVersion": ""},
        }),
    };
    format.print(&[document])
}

/// Puts `apiVersion` and `kind` first, where kubectl shows them.
pub fn tag(value: &mut Value, api_version: &str, kind: &str) {
    if let Value::Object(map) = value {
        let mut tagged = serde_json::Map::new();
        tagged.insert("apiVersion".to_string(), api_version.into());
        tagged.insert("kind".to_string(), kind.into());
        for (key, item) in std::mem::take(map) {
            if key != "apiVersion" && key != "kind" {
                tagged.insert(key, item);
            }
        }
        *map = tagged;
    }
}

/// `key=value,…` for labels and annotations, `<none>` when empty.
pub fn pairs(map: Option<&BTreeMap<String, String>>, max_value: usize) -> Vec<String> {
    match map {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(key, value)| format!("{key}={}", cut(value, max_value)))
            .collect(),
        _ => vec!["<none>".to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(182), "3m2s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(4 * 3600 + 120), "4h2m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(40 * 86400), "40d");
        assert_eq!(human_duration(-1), "0s");
    }

    #[test]
    fn columns_are_aligned_with_three_spaces() {
        let mut table = Table::new(&["NAME", "AGE"]);
        table.push(vec!["thumbnails".into(), "5s".into()]);
        assert_eq!(table.render(), "NAME         AGE\nthumbnails   5s\n");
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("a\nb", 4), "a b");
    }
}
