use std::process::ExitCode;

use clap::Parser;
use spate::cli::{self, Cli};

fn main() -> ExitCode {
    // kube and other TLS users share rustls; exactly one crypto provider must be installed
    // before the first handshake or rustls panics when several are compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Err(error) = cli.init_logging() {
        eprintln!("error: {error:#}");
        return ExitCode::FAILURE;
    }
    match cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
