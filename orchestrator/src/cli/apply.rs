//! `spate apply`: validate Pipeline files and server-side apply them into the cluster.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;

use super::ClusterArgs;
use super::table::{Cluster, runtime};
use crate::pipeline::Pipeline;
use crate::pipeline::load::load_str_with;
use crate::pipeline::located::parse_documents;
use crate::pod_security::{Level, Policy};

/// The field manager Spate applies as, shown in `metadata.managedFields`.
pub const FIELD_MANAGER: &str = "spate";

/// Create or update Pipelines from files, as `kubectl apply --server-side` does.
///
/// Every file is checked first with the same checks as `spate validate` (errors name
/// FILE:LINE:COLUMN and the field) but the pod security level, which the controller checks
/// against what the operator gave the namespace; if any is invalid, nothing is applied. Each Pipeline then
/// goes to the namespace its file names, else -n, else the context's, through server-side
/// apply with field manager `spate`. Only Pipelines are applied: the CRD comes from
/// `spate crd | kubectl apply -f -`. Exits 0 when all were applied, 1 otherwise.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    spate apply -f examples/thumbnails/pipeline.yaml\n  \
    spate apply -f pipelines/                 (every .yaml, .yml and .json file in it)\n  \
    spate apply -f pipelines/ -R              (and in its sub-folders)\n  \
    cat pipeline.yaml | spate apply -f - -n media\n\n\
Output, one line per Pipeline:\n  \
    pipeline.spate.dev/thumbnails created\n  \
    pipeline.spate.dev/thumbnails unchanged\n  \
    pipeline.spate.dev/thumbnails configured")]
pub struct ApplyArgs {
    /// Pipeline files, folders of them, or `-` for standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true,
        num_args = 1..
    )]
    pub files: Vec<PathBuf>,
    /// With a folder, also read its sub-folders.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Take over fields another manager (e.g. `kubectl apply`) set, instead of failing.
    #[arg(long)]
    pub force_conflicts: bool,
}

/// One document to apply, as written (defaults are the server's business, not ours).
struct ToApply {
    source: String,
    name: String,
    namespace: Option<String>,
    document: Value,
}

pub fn run(args: ApplyArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let mut inputs = Vec::new();
    for path in &args.files {
        collect_inputs(path, args.recursive, &mut inputs)?;
    }
    if inputs.is_empty() {
        bail!("no .yaml, .yml or .json files found in {:?}", args.files);
    }
    let mut valid = Vec::new();
    let mut failed = false;
    let any_pod = Policy {
        default: Level::Privileged,
        ..Policy::default()
    };
    for (source, text) in &inputs {
        match load_str_with(text, source, &any_pod) {
            Ok(loaded) => {
                let documents = parse_documents(text)
                    .map_err(|e| anyhow::anyhow!("{source}: {}", e.message))?;
                for (loaded, document) in loaded.into_iter().zip(documents) {
                    valid.push(ToApply {
                        source: source.clone(),
                        name: loaded.pipeline.metadata.name.clone().unwrap_or_default(),
                        namespace: loaded.pipeline.metadata.namespace.clone(),
                        document: document.value,
                    });
                }
            }
            Err(diagnostics) => {
                failed = true;
                for diagnostic in diagnostics {
                    eprintln!("{diagnostic}");
                }
            }
        }
    }
    if failed {
        eprintln!("error: nothing was applied: fix the files above first");
        return Ok(ExitCode::FAILURE);
    }
    runtime()?.block_on(apply_all(valid, &args, cluster))
}

async fn apply_all(
    documents: Vec<ToApply>,
    args: &ApplyArgs,
    flags: &ClusterArgs,
) -> anyhow::Result<ExitCode> {
    let cluster = Cluster::connect(flags).await?;
    // Refuse a namespace mismatch for any document before applying the first.
    let mut placed = Vec::with_capacity(documents.len());
    for document in documents {
        let namespace = match (&document.namespace, &flags.namespace) {
            (Some(own), Some(flag)) if own != flag => bail!(
                "{}: pipeline {} names namespace \"{own}\", which does not match -n \"{flag}\"; \
                 drop -n or pass -n {own}",
                document.source,
                document.name
            ),
            (Some(own), _) => own.clone(),
            (None, _) => cluster.namespace.clone(),
        };
        placed.push((namespace, document));
    }
    cluster.check_crd(&cluster.namespace).await?;
    let mut code = ExitCode::SUCCESS;
    for (namespace, document) in placed {
        match apply_one(&cluster, &namespace, document, args.force_conflicts).await {
            Ok((name, outcome)) => println!("pipeline.spate.dev/{name} {outcome}"),
            Err(error) => {
                eprintln!("error: {error:#}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

async fn apply_one(
    cluster: &Cluster,
    namespace: &str,
    mut document: ToApply,
    force: bool,
) -> anyhow::Result<(String, &'static str)> {
    let name = document.name.clone();
    if let Some(metadata) = document
        .document
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
    {
        metadata.insert("namespace".to_string(), Value::from(namespace));
        // Server-set fields a file exported with `get -o yaml` may carry.
        for field in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ] {
            metadata.remove(field);
        }
    }
    if let Some(map) = document.document.as_object_mut() {
        map.remove("status");
    }
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client.clone(), namespace);
    let before = match pipelines.get_opt(&name).await {
        Ok(before) => before,
        Err(error) => return Err(cluster.pipeline_list_error(error)),
    };
    let mut params = PatchParams::apply(FIELD_MANAGER);
    params.force = force;
    let after = pipelines
        .patch(&name, &params, &Patch::Apply(&document.document))
        .await
        .map_err(|error| match error {
            kube::Error::Api(status) if status.code == 409 => anyhow::anyhow!(
                "{}: pipeline {name}: {}; another manager (e.g. kubectl) set these fields: \
                 re-run with --force-conflicts to take them over",
                document.source,
                status.message
            ),
            other => cluster.error(other).context(format!(
                "{}: pipeline {name} in namespace {namespace}",
                document.source
            )),
        })?;
    let Some(before) = before else {
        return Ok((name, "created"));
    };
    let same_version = before.metadata.resource_version == after.metadata.resource_version;
    let same_content = before.metadata.generation == after.metadata.generation
        && before.metadata.labels == after.metadata.labels
        && before.metadata.annotations == after.metadata.annotations;
    Ok((
        name,
        if same_version || same_content {
            "unchanged"
        } else {
            "configured"
        },
    ))
}

/// Reads `path` (a file, `-`, or a folder of .yaml/.yml/.json files) into (name, text) pairs.
fn collect_inputs(
    path: &Path,
    recursive: bool,
    inputs: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        inputs.push(("<stdin>".to_string(), text));
        return Ok(());
    }
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read the folder {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() {
                if recursive {
                    collect_inputs(&entry, recursive, inputs)?;
                }
            } else if entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["yaml", "yml", "json"].contains(&e))
            {
                collect_inputs(&entry, recursive, inputs)?;
            }
        }
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    inputs.push((path.display().to_string(), text));
    Ok(())
}
