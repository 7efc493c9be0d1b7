//! `spate crd`: print the Pipeline CustomResourceDefinition.

use std::process::ExitCode;

use clap::Args;

use super::OutputFormat;
use crate::pipeline::crd;

/// Print the Pipeline CRD, generated from Spate's own types.
///
/// Small enough for a plain `kubectl apply -f`: the Job template's schema stops below a
/// container's fields, and Spate checks the rest itself. The copy in chart/crds/ is checked
/// against this output by the test suite.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate crd | kubectl apply -f -\n  spate crd > chart/crds/pipelines.spate.dev.yaml"
)]
pub struct CrdArgs {
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn run(args: CrdArgs) -> anyhow::Result<ExitCode> {
    args.output.print(&[crd::definition()])?;
    Ok(ExitCode::SUCCESS)
}
