//! `spate validate`: check pipeline files and report every mistake with its field and line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::run::PodSecurityArgs;
use crate::pipeline::load::load_file_with;

/// Check pipeline files: syntax, schema, semantics, and a trial render of the Job template.
///
/// Every problem is reported as FILE:LINE:COLUMN: FIELD: MESSAGE. Pods are checked against the
/// pod security level `spate run` would enforce with the same flags. Exits 0 when all files
/// are valid, 1 otherwise.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate validate -f pipeline.yaml\n  spate validate -f examples/*/pipeline.yaml\n  spate validate -f build.yaml --pod-security baseline"
)]
pub struct ValidateArgs {
    /// Pipeline files (YAML; several documents per file are allowed).
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub pod_security: PodSecurityArgs,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let policy = args.pod_security.policy()?;
    let mut failed = false;
    for file in &args.files {
        match load_file_with(file, &policy) {
            Ok(pipelines) => {
                for loaded in pipelines {
                    let name = loaded.pipeline.metadata.name.unwrap_or_default();
                    println!("{}: pipeline {name} is valid", file.display());
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
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
