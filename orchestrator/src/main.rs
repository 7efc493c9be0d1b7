use std::process::ExitCode;

use clap::Parser;
use spate::cli::{self, Cli};

fn main() -> ExitCode {
    // kube and other TLS users share rustls; exactly one crypto provider must be installed
    // before the first handshake or rustls panics when several are compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match cli::run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
