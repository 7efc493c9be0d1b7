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
    #[command(flatten)]
    pub logging: LoggingArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How Spate logs. Levels come from `RUST_LOG` (e.g. `RUST_LOG=spate=debug`).
#[derive(Debug, Clone, Args)]
pub struct LoggingArgs {
    /// Log lines as text or as one JSON object per line (for log collectors).
    #[arg(long, global = true, env = "SPATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Without `RUST_LOG`: Spate's own progress, everyone's warnings, and not the Kubernetes
/// client's connection errors, which Spate reports itself with the server's address.
const DEFAULT_LOG_FILTER: &str =
    "warn,spate=info,spate_sources=info,spate_sinks=info,kube_client=off";

impl Cli {
    /// Installs the log subscriber: stderr, except for `spate dev`, whose screen is the
    /// terminal UI, so its controller logs to DIR/spate.log.
    pub fn init_logging(&self) -> anyhow::Result<()> {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
        let writer = match &self.command {
            Command::Dev(args) => {
                std::fs::create_dir_all(&args.dir)
                    .with_context(|| format!("cannot create {}", args.dir.display()))?;
                let path = args.dir.join("spate.log");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
            }
            _ => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
        };
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer);
        match self.logging.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().with_current_span(true).init(),
        }
        Ok(())
    }
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
