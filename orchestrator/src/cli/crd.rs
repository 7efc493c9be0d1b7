//! `spate crd`: print the Pipeline CustomResourceDefinition.

use std::process::ExitCode;

use clap::Args;
use kube::CustomResourceExt;

use super::OutputFormat;
use crate::pipeline::Pipeline;

/// Print the Pipeline CRD, generated from Spate's own types.
///
/// The copy in chart/crds/ is checked against this output by the test suite.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate crd | kubectl apply -f -\n  spate crd > chart/crds/pipelines.spate.dev.yaml"
)]
pub struct CrdArgs {
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: CrdArgs) -> anyhow::Result<ExitCode> {
    args.output.print(&[Pipeline::crd()])?;
    Ok(ExitCode::SUCCESS)
}
