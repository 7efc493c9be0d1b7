//! The `spate` command line: one module per verb, each owning its flags, help and examples.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

mod apply;
mod completions;
mod crd;
mod describe;
mod dev;
mod get;
mod logs;
mod pause;
mod render;
mod retry;
mod run;
mod table;
mod trigger;
mod validate;
pub mod watch;

/// Spate turns events into Kubernetes Jobs that burst onto a virtual-kubelet node.
///
/// Events (objects landing in a bucket, messages on RabbitMQ or NATS, cron ticks, webhook
/// calls) are rendered into `batch/v1` Jobs through a Pipeline: a YAML resource with one
/// source, a fan-out policy, a Job template and a placement.
#[derive(Debug, Parser)]
#[command(
    name = "spate",
    version,
    propagate_version = true,
    after_help = "Start with:\n  spate dev                 (a simulated cluster and a burst you can see)\n  spate validate -f examples/thumbnails/pipeline.yaml\n  spate render -f examples/thumbnails/pipeline.yaml --event '{\"id\":\"1\",\"bucket\":\"b\",\"key\":\"a.jpg\",\"size\":1,\"etag\":\"e\",\"url\":\"s3://b/a.jpg\"}'\n\nDocs: docs/pipeline.md (every field), README.md (architecture)."
)]
pub struct Cli {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the Kubernetes API is, as kubectl reads it.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace for pipelines and Jobs (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAME")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Dev(dev::DevArgs),
    Validate(validate::ValidateArgs),
    Render(render::RenderArgs),
    Run(run::RunArgs),
    Apply(apply::ApplyArgs),
    Get(get::GetArgs),
    Describe(describe::DescribeArgs),
    Trigger(trigger::TriggerArgs),
    Logs(logs::LogsArgs),
    Retry(retry::RetryArgs),
    Pause(pause::PauseArgs),
    Resume(pause::ResumeArgs),
    Crd(crd::CrdArgs),
    Completions(completions::CompletionsArgs),
    Watch(watch::WatchArgs),
}

impl ClusterArgs {
    /// A client for the cluster these flags name, resolved as kubectl does.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
            None => kube::Config::infer().await?,
        };
        Ok(kube::Client::try_from(config)?)
    }
}

/// Output formats shared by every verb that prints resources.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Yaml,
    Json,
    /// A table with more columns (`spate get`).
    Wide,
}

impl OutputFormat {
    /// Prints resources as a YAML stream (`---` separated) or one JSON value per resource.
    pub fn print<T: Serialize>(self, resources: &[T]) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        for (index, resource) in resources.iter().enumerate() {
            match self {
                OutputFormat::Yaml => {
                    if index > 0 {
                        writeln!(out, "---")?;
                    }
                    write!(out, "{}", serde_saphyr::to_string(resource)?)?;
                }
                OutputFormat::Json => {
                    writeln!(out, "{}", serde_json::to_string_pretty(resource)?)?;
                }
                OutputFormat::Wide => {
                    anyhow::bail!("-o wide is for tables (spate get); use -o yaml or -o json")
                }
            }
        }
        Ok(())
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Render(args) => render::run(args, &cli.cluster),
        Command::Run(args) => run::run(args, &cli.cluster),
        Command::Apply(args) => apply::run(args, &cli.cluster),
        Command::Get(args) => get::run(args, &cli.cluster),
        Command::Describe(args) => describe::run(args, &cli.cluster),
        Command::Trigger(args) => trigger::run(args, &cli.cluster),
        Command::Logs(args) => logs::run(args, &cli.cluster),
        Command::Retry(args) => retry::run(args, &cli.cluster),
        Command::Pause(args) => pause::pause(args, &cli.cluster),
        Command::Resume(args) => pause::resume(args, &cli.cluster),
        Command::Crd(args) => crd::run(args),
        Command::Completions(args) => completions::run(args),
        Command::Watch(args) => watch::run(args, &cli.cluster),
    }
}
