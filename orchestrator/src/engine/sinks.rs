//! A pipeline's connected sinks: every results sink, and the dead-letter sink (a Kubernetes
//! Event on the Pipeline when none is configured, so nothing is ever dropped silently).

use spate_sinks::kubernetes_event::KubernetesEventSink;
use spate_sinks::{Record, Sink, SinkConfig, SinkContext};

use crate::pipeline::Sinks;

pub struct PipelineSinks {
    results: Vec<(String, Box<dyn Sink>)>,
    dead_letter: (String, Box<dyn Sink>),
}

impl PipelineSinks {
    pub async fn connect(config: &Sinks, cx: &SinkContext) -> Result<Self, String> {
        let mut results = Vec::new();
        for sink in &config.results {
            let built = sink
                .build(cx)
                .await
                .map_err(|e| format!("results sink {}: {e}", sink.kind()))?;
            results.push((sink.kind().to_string(), built));
        }
        let dead_letter_config = config
            .dead_letter
            .clone()
            .unwrap_or(SinkConfig::KubernetesEvent(KubernetesEventSink {}));
        let dead_letter = dead_letter_config
            .build(cx)
            .await
            .map_err(|e| format!("dead-letter sink {}: {e}", dead_letter_config.kind()))?;
        Ok(Self::new(
            results,
            (dead_letter_config.kind().to_string(), dead_letter),
        ))
    }

    /// Sinks already built, each with the kind its errors are reported under.
    pub(crate) fn new(
        results: Vec<(String, Box<dyn Sink>)>,
        dead_letter: (String, Box<dyn Sink>),
    ) -> Self {
        PipelineSinks {
            results,
            dead_letter,
        }
    }

    /// Delivers records to the results sinks after the first `delivered`, counting each
    /// that takes them, so a retry after a failure sends nothing twice to those before it.
    pub async fn report(&self, records: &[Record], delivered: &mut usize) -> Result<(), String> {
        for (kind, sink) in self.results.iter().skip(*delivered) {
            sink.deliver(records)
                .await
                .map_err(|e| format!("results sink {kind}: {e}"))?;
            *delivered += 1;
        }
        Ok(())
    }

    pub async fn dead_letter(&self, records: &[Record]) -> Result<(), String> {
        let (kind, sink) = &self.dead_letter;
        sink.deliver(records)
            .await
            .map_err(|e| format!("dead-letter sink {kind}: {e}"))
    }
}
