//! What the engine's end-to-end tests share: an engine on the simulator, watchers that see
//! every Job and pod of a pipeline, and the checks of the burst story (one Job per event,
//! the budget held, back to zero).

// Each test binary uses a part of this module.
#![allow(dead_code)]

pub mod cluster;
#[path = "../../../sources/tests/support/ports.rs"]
mod ports;

pub use ports::free_port;

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use parking_lot::Mutex;
use spate::engine::tenancy::Tenancy;
use spate::engine::{Engine, EngineOptions};
use spate::pipeline::load_str;
use spate_sources::checkpoint::FileCheckpoints;
use tokio::task::JoinHandle;

/// Pods of the pipeline pending or running at once, as a watcher sees them.
#[derive(Default, Debug)]
pub struct PodCensus {
    active: HashSet<String>,
    pub peak: usize,
    on_node: BTreeMap<String, HashSet<String>>,
    /// The most pods each node held at once.
    pub node_peak: BTreeMap<String, usize>,
}

impl PodCensus {
    pub fn on_virtual_only(&self) -> bool {
        self.node_peak.keys().all(|node| node.contains("virtual"))
    }
}

/// Job name → (its event ids, complete).
type SeenJobs = BTreeMap<String, (Vec<String>, bool)>;

/// Watches a pipeline's pods and Jobs, in the client's default namespace, for the whole test.
pub struct Observer {
    census: Arc<Mutex<PodCensus>>,
    jobs: Arc<Mutex<SeenJobs>>,
    /// `key` of each event, from the `SPATE_EVENT` each Job hands its pod.
    keys: Arc<Mutex<HashSet<String>>>,
    watches: Vec<JoinHandle<()>>,
    client: kube::Client,
    selector: String,
}

impl Observer {
    pub fn start(client: &kube::Client, pipeline: &str) -> Observer {
        let selector = format!("spate.dev/pipeline={pipeline}");
        let census = Arc::new(Mutex::new(PodCensus::default()));
        let jobs = Arc::new(Mutex::new(BTreeMap::new()));
        let pods: Api<Pod> = Api::default_namespaced(client.clone());
        let watch_census = census.clone();
        let pod_watch = tokio::spawn(
            watcher(pods, watcher::Config::default().labels(&selector))
                .applied_objects()
                .for_each(move |pod| {
                    let census = watch_census.clone();
                    async move {
                        let Ok(pod) = pod else { return };
                        record_pod(&mut census.lock(), &pod);
                    }
                }),
        );
        let job_api: Api<Job> = Api::default_namespaced(client.clone());
        let watch_jobs = jobs.clone();
        let keys = Arc::new(Mutex::new(HashSet::new()));
        let watch_keys = keys.clone();
        let job_watch = tokio::spawn(
            watcher(job_api, watcher::Config::default().labels(&selector))
                .applied_objects()
                .for_each(move |job| {
                    let seen = watch_jobs.clone();
                    let keys = watch_keys.clone();
                    async move {
                        let Ok(job) = job else { return };
                        if let Some(key) = event_key(&job) {
                            keys.lock().insert(key);
                        }
                        let complete =
                            spate::engine::tracker::finished(&job).is_some_and(|(ok, _)| ok);
                        let ids = event_ids(&job);
                        let mut seen = seen.lock();
                        let entry = seen
                            .entry(job.metadata.name.unwrap_or_default())
                            .or_insert((ids, false));
                        entry.1 |= complete;
                    }
                }),
        );
        Observer {
            census,
            jobs,
            keys,
            watches: vec![pod_watch, job_watch],
            client: client.clone(),
            selector,
        }
    }

    /// Waits until every id in `expected` has a complete Job, then checks each has exactly one.
    /// Fails when neither the events with a Job nor the complete Jobs grew for [`STALL`].
    pub async fn expect_one_complete_job_per_event(&self, expected: &HashSet<String>) {
        let mut best = (0, 0);
        let mut moved = tokio::time::Instant::now();
        loop {
            let (covered, complete, jobs) = {
                let seen = self.jobs.lock();
                let covered: HashSet<String> = seen
                    .values()
                    .flat_map(|(ids, _)| ids.iter().cloned())
                    .collect();
                let complete = seen.values().filter(|(_, complete)| *complete).count();
                (covered, complete, seen.len())
            };
            if &covered == expected && complete == jobs {
                break;
            }
            if (covered.len(), complete) > best {
                best = (covered.len(), complete);
                moved = tokio::time::Instant::now();
            }
            assert!(
                moved.elapsed() < STALL,
                "no progress for {STALL:?}: {} of {} events have a Job, {complete} of {jobs} Jobs complete",
                covered.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut owners = BTreeMap::<String, usize>::new();
        for (ids, _) in self.jobs.lock().values() {
            for id in ids {
                *owners.entry(id.clone()).or_default() += 1;
            }
        }
        assert!(
            owners.values().all(|count| *count == 1),
            "an event ran twice"
        );
    }

    /// Waits until no Job and no pod of the pipeline is left (the TTL did its work). Fails when
    /// nothing left for [`STALL`].
    pub async fn expect_back_to_zero(&self) {
        let list = ListParams::default().labels(&self.selector);
        let jobs: Api<Job> = Api::default_namespaced(self.client.clone());
        let pods: Api<Pod> = Api::default_namespaced(self.client.clone());
        let mut fewest = usize::MAX;
        let mut moved = tokio::time::Instant::now();
        loop {
            let jobs_left = jobs
                .list(&list)
                .await
                .map(|l| l.items.len())
                .unwrap_or(usize::MAX);
            let pods_left = pods
                .list(&list)
                .await
                .map(|l| l.items.len())
                .unwrap_or(usize::MAX);
            if jobs_left == 0 && pods_left == 0 {
                return;
            }
            let left = jobs_left.saturating_add(pods_left);
            if left < fewest {
                fewest = left;
                moved = tokio::time::Instant::now();
            }
            assert!(
                moved.elapsed() < STALL,
                "nothing removed for {STALL:?}: {jobs_left} Jobs and {pods_left} pods left after the TTL"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every event id the pipeline's Jobs carry so far.
    pub fn event_ids(&self) -> HashSet<String> {
        self.jobs
            .lock()
            .values()
            .flat_map(|(ids, _)| ids.iter().cloned())
            .collect()
    }

    /// The object keys of the events the Jobs carry, read from the Jobs themselves.
    pub fn event_keys(&self) -> HashSet<String> {
        self.keys.lock().clone()
    }

    pub fn finish(self) -> PodCensus {
        for watch in self.watches {
            watch.abort();
        }
        std::mem::take(&mut *self.census.lock())
    }
}

fn record_pod(census: &mut PodCensus, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let active = phase == "Pending" || phase == "Running";
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        let on_node = census.on_node.entry(node.clone()).or_default();
        if active {
            on_node.insert(name.clone());
        } else {
            on_node.remove(&name);
        }
        let held = on_node.len();
        let peak = census.node_peak.entry(node).or_default();
        *peak = (*peak).max(held);
    }
    if active {
        census.active.insert(name);
    } else {
        census.active.remove(&name);
    }
    census.peak = census.peak.max(census.active.len());
}

/// The `key` field of a per-event Job's event.
fn event_key(job: &Job) -> Option<String> {
    let pod = job.spec.as_ref()?.template.spec.as_ref()?;
    let event = pod
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|v| v.name == "SPATE_EVENT")?;
    let event: serde_json::Value = serde_json::from_str(event.value.as_deref()?).ok()?;
    Some(event["key"].as_str()?.to_string())
}

pub fn event_ids(job: &Job) -> Vec<String> {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("spate.dev/event-ids"))
        .and_then(|ids| serde_json::from_str(ids).ok())
        .unwrap_or_default()
}

/// Starts the engine in this process for one pipeline given as YAML.
pub async fn start_engine(client: &kube::Client, yaml: &str, state: &std::path::Path) -> Engine {
    let loaded = load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e:#?}"));
    Engine::start(
        client.clone(),
        loaded,
        EngineOptions {
            state_dir: state.to_path_buf(),
            checkpoints: Arc::new(FileCheckpoints::new(state)),
            namespace_budget: None,
            webhooks: None,
            drain_timeout: Duration::from_secs(10),
            tenancy: Arc::new(Tenancy::SingleTenant),
        },
    )
    .await
    .unwrap()
}

/// A Job template whose pods run `seconds` on the simulator.
pub fn job_template(seconds: f64) -> String {
    format!(
        r#"  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            sim.spate.dev/run-seconds: "{seconds}"
        spec:
          containers:
            - name: work
              image: busybox:1.36
"#
    )
}

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub async fn connect_amqp() -> Connection {
    Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (scripts/services starts it)")
}

/// Declares `queue` (durable) and publishes one persistent message per id, with that id as
/// its `message-id`, waiting for each to be routed.
pub async fn publish(connection: &Connection, queue: &str, ids: impl IntoIterator<Item = String>) {
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(ShortString::from(queue), durable, FieldTable::default())
        .await
        .unwrap();
    for id in ids {
        let body = serde_json::json!({"id": id}).to_string();
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_message_id(ShortString::from(id))
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// `prefix-0`, `prefix-1`, … `prefix-(count-1)`, offset by `from`.
pub fn ids(prefix: &str, from: usize, count: usize) -> impl Iterator<Item = String> + '_ {
    (from..from + count).map(move |i| format!("{prefix}-{i}"))
}

/// Messages ready in `queue`: with no consumer, every unacknowledged message is ready again.
pub async fn messages_left(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(ShortString::from(queue), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

pub async fn delete_queues(connection: &Connection, queues: &[&str]) {
    let channel = connection.create_channel().await.unwrap();
    for queue in queues {
        let _ = channel
            .queue_delete(ShortString::from(*queue), QueueDeleteOptions::default())
            .await;
    }
}

/// Event id → how many of `jobs` carry it.
pub fn jobs_per_event<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> BTreeMap<String, usize> {
    let mut owners = BTreeMap::new();
    for job in jobs.into_iter().filter(|job| !never_runs(job)) {
        for id in event_ids(job) {
            *owners.entry(id).or_insert(0) += 1;
        }
    }
    owners
}

/// A Job a crash left incomplete: still suspended and labelled `spate.dev/incomplete`, it runs
/// nothing, its events run in the Job their redelivery made, and the engine deletes it after
/// its grace period (two minutes), usually after the test has looked.
fn never_runs(job: &Job) -> bool {
    let labelled = job
        .metadata
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key("spate.dev/incomplete"));
    let suspended = job
        .spec
        .as_ref()
        .and_then(|spec| spec.suspend)
        .unwrap_or(false);
    labelled && suspended
}

/// A child process that is killed when the test ends, also when it panics: a `spate`
/// left running would keep loading the machine for every later test.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `redis-cli` with one command per line on stdin; its output lines.
pub fn redis_cli(commands: &[String]) -> Vec<String> {
    let mut child = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("redis-cli installed (with redis-server)");
    let mut stdin = child.stdin.take().unwrap();
    for command in commands {
        writeln!(stdin, "{command}").unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "redis-cli failed");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A `spate run` a test started: killed when dropped. A test reads what it did from the
/// cluster and the broker, never from its log; but the log is kept, and its end printed when
/// the test fails, because a stall (a consumer group that never rebalances, a watch that
/// never comes back) shows nowhere else.
pub struct SpateRun {
    process: KillOnDrop,
    log: tempfile::NamedTempFile,
}

/// Lines of a failed test's `spate run` log printed.
const LOG_TAIL: usize = 60;

impl std::ops::Deref for SpateRun {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.process
    }
}

impl std::ops::DerefMut for SpateRun {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.process
    }
}

impl Drop for SpateRun {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if !std::thread::panicking() {
            return;
        }
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
        eprintln!(
            "--- the last {} of {} lines of `spate run` (pid {}):\n{}\n---",
            tail.len(),
            lines.len(),
            self.process.id(),
            tail.join("\n")
        );
    }
}

/// Starts `spate run -f PIPELINE` against the cluster of `kubeconfig`.
pub fn spawn_spate_run(
    pipeline: &std::path::Path,
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
) -> SpateRun {
    spawn_spate_run_with_metrics(pipeline, kubeconfig, state, "127.0.0.1:0")
}

/// [`spawn_spate_run`] serving `/metrics` on `metrics`.
pub fn spawn_spate_run_with_metrics(
    pipeline: &std::path::Path,
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
    metrics: &str,
) -> SpateRun {
    spawn_spate_run_with_args(pipeline, kubeconfig, state, &["--metrics-listen", metrics])
}

/// [`spawn_spate_run`] with more `spate run` flags; give `--metrics-listen` among them.
pub fn spawn_spate_run_with_args(
    pipeline: &std::path::Path,
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
    args: &[&str],
) -> SpateRun {
    let file = [std::ffi::OsStr::new("-f"), pipeline.as_os_str()];
    spawn_spate(
        kubeconfig,
        state,
        args.iter().map(std::ffi::OsStr::new).chain(file),
    )
}

/// `spate run` in controller mode (no `-f`) with `args`; give `--metrics-listen` among them.
pub fn spawn_spate_controller(
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
    args: &[&str],
) -> SpateRun {
    spawn_spate(kubeconfig, state, args.iter().map(std::ffi::OsStr::new))
}

fn spawn_spate<'a>(
    kubeconfig: &std::path::Path,
    state: &std::path::Path,
    args: impl IntoIterator<Item = &'a std::ffi::OsStr>,
) -> SpateRun {
    let log = tempfile::NamedTempFile::new().unwrap();
    let process = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("run")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    SpateRun { process, log }
}

/// [`jobs_per_event`] of the Jobs matching `selector`. The test goes through the same API
/// server as Spate, injected faults included, so it retries them as any client would instead
/// of failing on a 429 or 500.
pub async fn list_jobs_per_event(jobs: &Api<Job>, selector: &str) -> BTreeMap<String, usize> {
    let mut attempts = 0;
    loop {
        match jobs.list(&ListParams::default().labels(selector)).await {
            Ok(list) => return jobs_per_event(&list.items),
            Err(error) => {
                attempts += 1;
                assert!(attempts < 50, "listing Jobs keeps failing: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a test waits for one more event to get its Job before it calls the engine
/// stalled. A slow machine (CI shares its cores) makes progress late but makes it; a stall
/// makes none, so a test fails on no progress, never on a total deadline a quiet machine meets.
pub const STALL: Duration = Duration::from_secs(60);

/// Polls the Jobs matching `selector` every `every` until at least `wanted` events have one and
/// `settled` says the rest is done too (e.g. the queue is empty), returning them. Fails when
/// the number of events with a Job has not grown for [`STALL`], naming where it stopped and
/// why `settled` still says no.
pub async fn await_jobs<F, Fut>(
    jobs: &Api<Job>,
    selector: &str,
    wanted: usize,
    every: Duration,
    mut settled: F,
) -> BTreeMap<String, usize>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut best = 0;
    let mut moved = tokio::time::Instant::now();
    loop {
        let owners = list_jobs_per_event(jobs, selector).await;
        let waiting_for = if owners.len() >= wanted {
            match settled().await {
                Ok(()) => return owners,
                Err(reason) => reason,
            }
        } else {
            format!("{} of {wanted} events have a Job", owners.len())
        };
        if owners.len() > best {
            best = owners.len();
            moved = tokio::time::Instant::now();
        }
        assert!(
            moved.elapsed() < STALL,
            "no progress for {STALL:?}: {waiting_for}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Creates the Pipeline CRD (unless it is there) and waits until it is served (discovery lags the
/// creation).
pub async fn install_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use spate::pipeline::Pipeline;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds
        .create(
            &kube::api::PostParams::default(),
            &spate::pipeline::crd::definition(),
        )
        .await
    {
        Ok(_) => {}
        // Installed by another test on the shared real control plane.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!("cannot install the Pipeline CRD: {error}"),
    }
    let pipelines: Api<Pipeline> = Api::default_namespaced(client.clone());
    for _ in 0..200 {
        if pipelines.list(&ListParams::default()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the Pipeline CRD is not served");
}

/// Posts one webhook call until it is answered `202`, as a caller honouring the webhook's
/// contract does: a refused or cut connection, `503` and `504` are retried with the same
/// `Idempotency-Key`. Panics on any other answer, which a caller cannot retry.
pub async fn post_until_accepted(http: &reqwest::Client, url: &str, key: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let answer = http
            .post(url)
            .header("Idempotency-Key", key)
            .header("content-type", "application/json")
            .body(r#"{"report": "daily"}"#)
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        match answer.map(|response| response.status().as_u16()) {
            Ok(202) => return,
            Ok(503 | 504) | Err(_) => {}
            Ok(status) => panic!("{key}: answered {status}, which a caller cannot retry"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes `count` JSON records from `queue`, failing after 60 s without them.
pub async fn take_records(
    channel: &lapin::Channel,
    queue: &str,
    count: usize,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut records = Vec::new();
    while records.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} records on {queue}: {records:?}",
            records.len()
        );
        match channel
            .basic_get(
                ShortString::from(queue),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            Some(message) => records
                .push(serde_json::from_slice::<serde_json::Value>(&message.delivery.data).unwrap()),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    records
}

/// A controller replica's options for tests: Pipelines and its Lease in `namespace`, a short
/// Lease (3 s, renewed every 500 ms) and status written every 300 ms.
pub fn controller_options(
    identity: &str,
    namespace: &str,
    state: &std::path::Path,
) -> spate::engine::controller::ControllerOptions {
    spate::engine::controller::ControllerOptions {
        namespace: Some(namespace.to_string()),
        engine: EngineOptions {
            state_dir: state.to_path_buf(),
            checkpoints: Arc::new(FileCheckpoints::new(state)),
            namespace_budget: None,
            webhooks: None,
            drain_timeout: Duration::from_secs(5),
            tenancy: Arc::new(Tenancy::SingleTenant),
        },
        lease: spate::engine::leader::LeaseConfig {
            namespace: namespace.to_string(),
            name: "spate-controller".to_string(),
            identity: identity.to_string(),
            duration: Duration::from_secs(3),
            renew: Duration::from_millis(500),
        },
        status_interval: Duration::from_millis(300),
        pod_security: spate::pod_security::Policy::default(),
    }
}

/// Polls `check` every 100 ms until it passes; fails with its last answer after `seconds`.
pub async fn eventually<F, Fut>(what: &str, seconds: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(tokio::time::Instant::now() < deadline, "{what}: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 30 s) until the status of the Pipeline `name` passes `check`; fails with the
/// last status seen.
pub async fn await_status(
    pipelines: &Api<spate::pipeline::Pipeline>,
    name: &str,
    what: &str,
    check: impl Fn(&spate::pipeline::PipelineStatus) -> bool,
) {
    eventually(what, 30, || async {
        let status = pipelines
            .get_status(name)
            .await
            .map_err(|error| error.to_string())?
            .status
            .unwrap_or_default();
        check(&status).then_some(()).ok_or(format!("{status:?}"))
    })
    .await;
}

/// The reason of the Pipeline's `Ready` condition, when it has one.
pub fn ready_reason(status: &spate::pipeline::PipelineStatus) -> Option<&str> {
    status
        .conditions
        .first()
        .map(|condition| condition.reason.as_str())
}
