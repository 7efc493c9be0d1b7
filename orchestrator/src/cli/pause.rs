//! `spate pause` and `spate resume`: stop and restart a Pipeline's intake in the cluster.

use std::process::ExitCode;

use clap::Args;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::ClusterArgs;
use crate::engine::controller::PAUSED_ANNOTATION;
use crate::pipeline::Pipeline;

/// Pause a Pipeline: the controller stops taking its events (the broker keeps them) and lets
/// its running Jobs finish.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  spate pause thumbnails\n  spate pause thumbnails -n media")]
pub struct PauseArgs {
    /// The Pipeline's name.
    pub name: String,
}

/// Resume a paused Pipeline.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  spate resume thumbnails")]
pub struct ResumeArgs {
    /// The Pipeline's name.
    pub name: String,
}

pub fn pause(args: PauseArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    set_paused(&args.name, json!("true"), cluster)?;
    println!("pipeline {} paused", args.name);
    Ok(ExitCode::SUCCESS)
}

pub fn resume(args: ResumeArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    set_paused(&args.name, Value::Null, cluster)?;
    println!("pipeline {} resumed", args.name);
    Ok(ExitCode::SUCCESS)
}

fn set_paused(name: &str, value: Value, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = cluster.client().await?;
        let namespace = cluster
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let pipelines: Api<Pipeline> = Api::namespaced(client, &namespace);
        let patch = json!({"metadata": {"annotations": {PAUSED_ANNOTATION: value}}});
        pipelines
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|error| match error {
                kube::Error::Api(status) if status.code == 404 => {
                    anyhow::anyhow!("no pipeline {name} in namespace {namespace}")
                }
                other => other.into(),
            })?;
        Ok(())
    })
}
