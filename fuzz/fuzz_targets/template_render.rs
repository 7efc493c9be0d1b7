//! Job rendering as the engine does it for every event (`spate::render::render_job`): the
//! input's first line is placed as a template string in an env var and a pod label of two
//! fixed, valid pipelines (one `perEvent`, one `indexed`), the rest is the event as JSON, read
//! as `spate render --event` reads it. Event text and template text must render or fail with
//! an error, never panic or hang.

#![no_main]

use std::sync::LazyLock;

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use k8s_openapi::api::core::v1::EnvVar;
use libfuzzer_sys::fuzz_target;
use spate::pipeline::{LoadedPipeline, load_str};
use spate::render::render_job;
use spate_sources::Event;

const PIPELINES: &str = r#"
apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata: {name: fuzz-per-event, namespace: fuzz}
spec:
  source: {objectStore: {url: "file:///tmp/spate-fuzz/in"}}
  fanout: {mode: perEvent}
  jobTemplate:
    metadata:
      labels: {event: "{{ event.id }}"}
    spec:
      template:
        spec:
          containers:
            - name: work
              image: example.com/work:1
              args: ["--event", "{{ event.id }}", "--batch", "{{ batch.id }}"]
---
apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata: {name: fuzz-indexed}
spec:
  source: {objectStore: {url: "file:///tmp/spate-fuzz/in"}}
  fanout: {mode: indexed, batchSize: 10, maxParallelism: 3}
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: work
              image: example.com/work:1
              args: ["--pipeline", "{{ pipeline.name }}", "--size", "{{ batch.size }}"]
"#;

static PIPELINES_LOADED: LazyLock<Vec<LoadedPipeline>> = LazyLock::new(|| {
    load_str(PIPELINES, "template_render.yaml")
        .unwrap_or_else(|diagnostics| panic!("the fixed pipelines are invalid: {diagnostics:?}"))
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((template_line, event_json)) = text.split_once('\n') else {
        return;
    };
    let Some(event) = serde_json::from_str(event_json)
        .ok()
        .and_then(|value| Event::from_json(value).ok())
    else {
        return;
    };
    let events = [event];
    for loaded in PIPELINES_LOADED.iter() {
        let template = with_fuzzed_strings(&loaded.template, template_line);
        let _ = render_job(&loaded.pipeline, &template, &loaded.values, &events);
    }
});

/// The pipeline's template with `text` as the value of an env var (passed on as rendered) and
/// of a pod label (sanitised after rendering).
fn with_fuzzed_strings(template: &JobTemplateSpec, text: &str) -> JobTemplateSpec {
    let mut template = template.clone();
    let Some(pod) = template.spec.as_mut().map(|spec| &mut spec.template) else {
        return template;
    };
    pod.metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert("fuzz".to_string(), text.to_string());
    if let Some(container) = pod
        .spec
        .as_mut()
        .and_then(|spec| spec.containers.first_mut())
    {
        container.env.get_or_insert_with(Vec::new).push(EnvVar {
            name: "FUZZ".to_string(),
            value: Some(text.to_string()),
            value_from: None,
        });
    }
    template
}
