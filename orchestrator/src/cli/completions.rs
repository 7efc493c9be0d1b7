//! `spate completions`: shell completion scripts.

use std::process::ExitCode;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// Print a completion script for your shell.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate completions bash > /etc/bash_completion.d/spate\n  spate completions zsh > \"${fpath[1]}/_spate\""
)]
pub struct CompletionsArgs {
    pub shell: Shell,
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "spate",
        &mut std::io::stdout(),
    );
    Ok(ExitCode::SUCCESS)
}
