//! `spate run` in a cluster: Pipeline resources are the configuration.
//!
//! While this replica holds the leader Lease, it watches Pipelines and keeps one running
//! engine per Pipeline in step with its spec: started when created, restarted when its
//! generation changes, stopped when deleted or paused (annotation `spate.dev/paused: "true"`).
//! A Pipeline that fails validation gets a `Ready=False` condition with every problem, and
//! nothing runs. One whose engine cannot start (a Secret not there yet, a sink's broker down
//! for a moment) gets `Ready=False`, reason `StartFailed`, and is started again with backoff
//! (1 s doubling to 5 min) until it runs or its spec changes. So does one whose source stops
//! for good once running (the queue does not exist, the broker refuses the credentials),
//! with reason `SourceFailed`. Status (counts, the source's lag, conditions, last error) is
//! written through the status subresource at most once per `status_interval` per Pipeline,
//! and only when it changed.

use std::collections::HashMap;
use std::time::Duration;

use spate_sources::backoff::Backoff;
use spate_sources::webhook::WebhookServer;
use tokio::time::Instant;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::leader::{self, LeaseConfig};
use super::{Engine, EngineOptions, RunningPipeline};
use crate::pipeline::{Pipeline, PipelineStatus, load::check_resource_with};
use crate::render::pipeline_namespace;

/// The annotation that pauses a Pipeline.
pub const PAUSED_ANNOTATION: &str = "spate.dev/paused";
const START_RETRY_MIN: Duration = Duration::from_secs(1);
const START_RETRY_MAX: Duration = Duration::from_secs(300);

pub struct ControllerOptions {
    /// Only Pipelines in this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    pub engine: EngineOptions,
    pub lease: LeaseConfig,
    pub status_interval: Duration,
    /// The pod security level each namespace's Pipelines must meet.
    pub pod_security: crate::pod_security::Policy,
}

/// One Pipeline as the controller runs it.
struct Managed {
    /// The source kind, shown by `kubectl get pipelines`.
    source: String,
    /// A Pipeline deleted and created again under its name (during a watch gap) is another.
    uid: Option<String>,
    generation: Option<i64>,
    paused: bool,
    /// The Pipeline as last seen: what is started, and started again.
    pipeline: Box<Pipeline>,
    engine: Option<Engine>,
    live: Option<RunningPipeline>,
    problems: Vec<String>,
    /// Set while the engine should run and does not: when to start it, and why it is not
    /// running.
    retry: Option<StartRetry>,
    /// Delays between starts of this spec. Kept across a start that worked, so a source
    /// that stops at once every time (a queue that does not exist) is not restarted in a
    /// tight loop; reset once an engine ran for [`START_RETRY_MAX`].
    backoff: Backoff,
    started: Option<Instant>,
    written: Option<PipelineStatus>,
}

struct StartRetry {
    at: Instant,
    /// The condition's reason meanwhile: `StartFailed` or `SourceFailed`.
    reason: &'static str,
}

/// Runs until `shutdown`: waits for leadership, manages Pipelines while leading, and stops
/// every engine when leadership is lost.
pub async fn run(client: kube::Client, options: ControllerOptions, shutdown: CancellationToken) {
    let standby = |standby: bool| {
        if let Some(webhooks) = &options.engine.webhooks {
            webhooks.set_standby(standby);
        }
    };
    loop {
        standby(true);
        let Some(leading) =
            leader::acquire(client.clone(), options.lease.clone(), shutdown.clone()).await
        else {
            return;
        };
        standby(false);
        manage(&client, &options, leading.clone(), &shutdown).await;
        leading.cancel();
        if shutdown.is_cancelled() {
            return;
        }
        tracing::warn!("no longer leader; pipelines stopped until the lease is won again");
    }
}

async fn manage(
    client: &kube::Client,
    options: &ControllerOptions,
    leading: CancellationToken,
    shutdown: &CancellationToken,
) {
    let pipelines: Api<Pipeline> = match &options.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let stream = watcher(pipelines, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut managed: HashMap<(String, String), Managed> = HashMap::new();
    // Until the first list of Pipelines has been started, a webhook path not registered yet
    // probably belongs to one of them.
    let mut first_list = options
        .engine
        .webhooks
        .as_ref()
        .map(WebhookServer::starting);
    let mut status_tick = tokio::time::interval(options.status_interval);
    let mut retry_tick = tokio::time::interval(START_RETRY_MIN);
    loop {
        tokio::select! {
            _ = leading.cancelled() => break,
            _ = status_tick.tick() => write_statuses(client, &mut managed).await,
            _ = retry_tick.tick() => {
                for entry in managed.values_mut() {
                    if entry.retry.as_ref().is_some_and(|retry| retry.at <= Instant::now()) {
                        start(client, options, entry).await;
                    } else {
                        stop_if_source_failed(entry).await;
                    }
                }
            }
            event = stream.next() => match event {
                Some(Ok(watcher::Event::Apply(pipeline) | watcher::Event::InitApply(pipeline))) => {
                    reconcile(client, options, &mut managed, pipeline, &leading).await;
                }
                Some(Ok(watcher::Event::InitDone)) => drop(first_list.take()),
                Some(Ok(watcher::Event::Delete(pipeline))) => {
                    if let Some(entry) = managed.remove(&key(&pipeline))
                        && let Some(engine) = entry.engine
                    {
                        engine.shutdown_unless(&leading).await;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => tracing::warn!(%error, "Pipeline watch error; the watcher retries"),
                None => break,
            },
        }
    }
    // All at once: one after another, each draining, would keep the last ones running long
    // after the Lease could pass to another replica. A shutdown drains them, together, within
    // one drain timeout; a lost Lease stops them at once, creates in flight included.
    let engines = managed.into_values().filter_map(|entry| entry.engine);
    if shutdown.is_cancelled() {
        futures::future::join_all(engines.map(Engine::shutdown)).await;
    } else {
        futures::future::join_all(engines.map(Engine::abort)).await;
    }
}

fn key(pipeline: &Pipeline) -> (String, String) {
    (
        pipeline.metadata.namespace.clone().unwrap_or_default(),
        pipeline.metadata.name.clone().unwrap_or_default(),
    )
}

fn is_paused(pipeline: &Pipeline) -> bool {
    pipeline
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(PAUSED_ANNOTATION))
        .is_some_and(|value| value == "true")
}

/// Brings the running engine in line with the Pipeline: idempotent, so a resync changes
/// nothing. An engine replaced drains until `leading` is cancelled at the latest.
async fn reconcile(
    client: &kube::Client,
    options: &ControllerOptions,
    managed: &mut HashMap<(String, String), Managed>,
    pipeline: Pipeline,
    leading: &CancellationToken,
) {
    let key = key(&pipeline);
    let generation = pipeline.metadata.generation;
    let paused = is_paused(&pipeline);
    if let Some(entry) = managed.get(&key)
        && entry.uid == pipeline.metadata.uid
        && entry.generation == generation
        && entry.paused == paused
    {
        return;
    }
    // Between the old engine's shutdown and the new one's start its webhook path is free.
    let _restarting = options
        .engine
        .webhooks
        .as_ref()
        .map(WebhookServer::starting);
    let previous = managed.remove(&key);
    let written = previous.as_ref().and_then(|entry| entry.written.clone());
    if let Some(engine) = previous.and_then(|entry| entry.engine) {
        engine.shutdown_unless(leading).await;
    }
    let mut entry = Managed {
        source: pipeline.spec.source.kind().to_string(),
        uid: pipeline.metadata.uid.clone(),
        generation,
        paused,
        pipeline: Box::new(pipeline),
        engine: None,
        live: None,
        problems: Vec::new(),
        retry: None,
        backoff: Backoff::new(START_RETRY_MIN, START_RETRY_MAX),
        started: None,
        written,
    };
    if !paused {
        entry.retry = Some(StartRetry {
            at: Instant::now(),
            reason: "StartFailed",
        });
        start(client, options, &mut entry).await;
    }
    managed.insert(key, entry);
}

/// Starts the entry's engine, or records why it cannot start: invalid for good (until the
/// spec changes), or failed for now and tried again later.
async fn start(client: &kube::Client, options: &ControllerOptions, entry: &mut Managed) {
    let Some(retry) = entry.retry.as_mut() else {
        return;
    };
    let loaded = match check_resource_with(&entry.pipeline, &options.pod_security) {
        Ok(loaded) => loaded,
        Err(problems) => {
            entry.problems = problems;
            entry.retry = None;
            return;
        }
    };
    let id = format!(
        "{}/{}",
        pipeline_namespace(&entry.pipeline),
        entry.pipeline.metadata.name.as_deref().unwrap_or_default()
    );
    match Engine::start(client.clone(), vec![loaded], options.engine.clone()).await {
        Ok(engine) => {
            entry.live = engine.pipelines.first().cloned();
            entry.engine = Some(engine);
            entry.problems.clear();
            entry.retry = None;
            entry.started = Some(Instant::now());
            tracing::info!(pipeline = %id, "started");
        }
        Err(error) => {
            let delay = entry.backoff.next_delay();
            retry.at = Instant::now() + delay;
            retry.reason = "StartFailed";
            tracing::warn!(pipeline = %id, error = %format!("{error:#}"), retry_in_s = delay.as_secs(), "cannot start; trying again");
            entry.problems = vec![format!(
                "{error:#} (trying again in {}s)",
                delay.as_secs().max(1)
            )];
        }
    }
}

/// A source that stopped for good leaves its pipeline taking nothing: stop the engine, say
/// why in the status, and start it again with backoff (the queue may be created, the
/// credentials fixed, without any change to the Pipeline).
async fn stop_if_source_failed(entry: &mut Managed) {
    if entry.engine.is_none() {
        return;
    }
    let Some(failure) = entry
        .live
        .as_ref()
        .and_then(|live| live.source_failure.get())
        .cloned()
    else {
        return;
    };
    if let Some(engine) = entry.engine.take() {
        engine.shutdown().await;
    }
    if entry
        .started
        .is_some_and(|started| started.elapsed() >= START_RETRY_MAX)
    {
        entry.backoff.reset();
    }
    let delay = entry.backoff.next_delay();
    let name = entry.pipeline.metadata.name.as_deref().unwrap_or_default();
    tracing::warn!(pipeline = %name, error = %failure, retry_in_s = delay.as_secs(), "source stopped; starting the pipeline again later");
    entry.problems = vec![format!(
        "the source stopped: {failure} (trying again in {}s)",
        delay.as_secs().max(1)
    )];
    entry.retry = Some(StartRetry {
        at: Instant::now() + delay,
        reason: "SourceFailed",
    });
}

async fn write_statuses(client: &kube::Client, managed: &mut HashMap<(String, String), Managed>) {
    for ((namespace, name), entry) in managed.iter_mut() {
        let status = status_of(entry);
        if entry.written.as_ref() == Some(&status) {
            continue;
        }
        let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), namespace);
        let mut patch = json!({"status": status});
        // A merge patch keeps the fields it does not name: without an explicit null, a lag
        // that is no longer known (source disconnected, pipeline paused) would stay at its
        // last reading, and an error fixed by a new spec would still be reported.
        for (field, known) in [
            ("sourceLag", status.source_lag.is_some()),
            ("lastError", status.last_error.is_some()),
        ] {
            if !known {
                patch["status"][field] = serde_json::Value::Null;
            }
        }
        match pipelines
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => entry.written = Some(status),
            Err(error) => tracing::warn!(pipeline = %name, %error, "cannot write status"),
        }
    }
}

fn status_of(entry: &Managed) -> PipelineStatus {
    let snapshot = entry
        .live
        .as_ref()
        .map(|live| live.stats.snapshot())
        .unwrap_or_default();
    let running = entry
        .live
        .as_ref()
        .map(|live| i64::from(live.budget.in_use()))
        .unwrap_or(0);
    let (ready, reason, message) = if entry.paused {
        (
            "False",
            "Paused",
            format!("annotation {PAUSED_ANNOTATION} is \"true\""),
        )
    } else if let Some(retry) = entry.retry.as_ref().filter(|_| !entry.problems.is_empty()) {
        ("False", retry.reason, entry.problems.join("; "))
    } else if !entry.problems.is_empty() {
        ("False", "Invalid", entry.problems.join("; "))
    } else {
        ("True", "Running", "taking events".to_string())
    };
    // The transition time must not change on every write, or every write would differ.
    let since = entry
        .written
        .as_ref()
        .and_then(|status| status.conditions.first())
        .filter(|condition| condition.status == ready && condition.reason == reason)
        .map(|condition| condition.last_transition_time.clone())
        .unwrap_or_else(|| Time(jiff::Timestamp::now()));
    PipelineStatus {
        source: Some(entry.source.clone()),
        received: snapshot.received,
        pending: (snapshot.received
            - snapshot.succeeded
            - snapshot.failed
            - snapshot.dead_lettered)
            .max(0),
        running,
        succeeded: snapshot.succeeded,
        failed: snapshot.failed,
        dead_lettered: snapshot.dead_lettered,
        source_lag: entry
            .live
            .as_ref()
            .and_then(|live| live.backlog.get())
            .map(|messages| i64::try_from(messages).unwrap_or(i64::MAX)),
        last_error: snapshot
            .last_error
            .or_else(|| entry.problems.first().cloned()),
        observed_generation: entry.generation,
        conditions: vec![Condition {
            type_: "Ready".to_string(),
            status: ready.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time: since,
            observed_generation: entry.generation,
        }],
    }
}
