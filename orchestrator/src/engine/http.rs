//! `/metrics`, `/healthz` and `/readyz`.
//!
//! `/healthz` only says the process is serving. `/readyz` answers 200 once every pipeline's
//! Job watch has listed what already exists, because only then does the parallelism budget
//! count the cluster's real pods.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::METRICS;

#[derive(Clone)]
struct Readiness(Vec<watch::Receiver<bool>>);

/// Serves until `shutdown`; returns the bound address through `bound`.
pub async fn serve(
    listen: SocketAddr,
    synced: Vec<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(Readiness(synced));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    Ok(address)
}

async fn metrics() -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        METRICS.encode(),
    )
}

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    if readiness.0.iter().all(|synced| *synced.borrow()) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "listing existing Jobs")
    }
}
