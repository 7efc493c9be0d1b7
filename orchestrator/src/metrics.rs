//! Prometheus metrics, served at `/metrics` with the `spate_` prefix.
//!
//! One registry for the process. Series are labelled by pipeline (`namespace/name`) and, where
//! it matters, by outcome; never by free text such as error messages, which would make the
//! series count unbounded.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabel {
    pub pipeline: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub pipeline: String,
    /// `succeeded`, `failed` or `dead_lettered`.
    pub outcome: String,
}

type Histograms = Family<PipelineLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 10 minutes in steps of 25%, so quantiles read from the buckets are
    // within an eighth of the truth.
    Histogram::new(exponential_buckets(0.0005, 1.25, 64))
}

/// Every metric Spate exports.
pub struct Metrics {
    pub events_received: Family<PipelineLabel, Counter>,
    pub jobs_created: Family<PipelineLabel, Counter>,
    pub job_create_seconds: Histograms,
    pub event_to_job_seconds: Histograms,
    pub pods_in_budget: Family<PipelineLabel, Gauge>,
    pub event_index_events: Family<PipelineLabel, Gauge>,
    pub items_finished: Family<OutcomeLabels, Counter>,
    pub dead_letters: Family<PipelineLabel, Counter>,
    pub api_retries: Counter,
    registry: Registry,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("spate");
        let events_received = Family::<PipelineLabel, Counter>::default();
        let jobs_created = Family::<PipelineLabel, Counter>::default();
        let job_create_seconds: Histograms = Family::new_with_constructor(latency_histogram);
        let event_to_job_seconds: Histograms = Family::new_with_constructor(latency_histogram);
        let pods_in_budget = Family::<PipelineLabel, Gauge>::default();
        let event_index_events = Family::<PipelineLabel, Gauge>::default();
        let items_finished = Family::<OutcomeLabels, Counter>::default();
        let dead_letters = Family::<PipelineLabel, Counter>::default();
        let api_retries = Counter::default();
        registry.register(
            "events_received",
            "Events taken from sources",
            events_received.clone(),
        );
        registry.register(
            "jobs_created",
            "Jobs created (409 AlreadyExists included)",
            jobs_created.clone(),
        );
        registry.register(
            "job_create_seconds",
            "Time to create one Job through the API, retries included",
            job_create_seconds.clone(),
        );
        registry.register(
            "event_to_job_seconds",
            "Time from an event's arrival to its Job existing",
            event_to_job_seconds.clone(),
        );
        registry.register(
            "pods_in_budget",
            "Pods pending or running counted against the pipeline's maxParallelism",
            pods_in_budget.clone(),
        );
        registry.register(
            "event_index_events",
            "Events of the pipeline's live Jobs, held to acknowledge their redeliveries",
            event_index_events.clone(),
        );
        registry.register(
            "items_finished",
            "Items whose Job finished, by outcome",
            items_finished.clone(),
        );
        registry.register(
            "dead_letters",
            "Events sent to the dead-letter sink",
            dead_letters.clone(),
        );
        registry.register(
            "api_retries",
            "Kubernetes API calls retried after a transient error",
            api_retries.clone(),
        );
        Metrics {
            events_received,
            jobs_created,
            job_create_seconds,
            event_to_job_seconds,
            pods_in_budget,
            event_index_events,
            items_finished,
            dead_letters,
            api_retries,
            registry,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

pub fn pipeline(name: &str) -> PipelineLabel {
    PipelineLabel {
        pipeline: name.to_string(),
    }
}
