//! `spate render` prints the exact Job Spate would create: it parses back into a
//! `k8s_openapi` Job and carries the placement, the deterministic name, the owner labels and,
//! in indexed mode, the completion mode, completions, parallelism and the batch's items.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};
use spate::naming;
use spate::pipeline::{FanOutMode, PlacementMode, load_file};
use spate::render::{self, TemplateValues};
use spate_sources::Event;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .join("pipeline.yaml")
}

/// Runs `spate render` and parses its YAML stream back into typed resources.
fn render_cli(file: &Path, args: &[&str]) -> (Job, Option<ConfigMap>) {
    let output = Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("render")
        .arg("-f")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let documents: Vec<&str> = stdout.split("\n---\n").collect();
    let job: Job = serde_saphyr::from_str(documents[0]).unwrap();
    let raw: Value = serde_saphyr::from_str(documents[0]).unwrap();
    assert_eq!(raw["apiVersion"], "batch/v1");
    assert_eq!(raw["kind"], "Job");
    let input = documents
        .get(1)
        .map(|doc| serde_saphyr::from_str::<ConfigMap>(doc).unwrap());
    (job, input)
}

fn labels_of(
    job: &Job,
) -> (
    &std::collections::BTreeMap<String, String>,
    &std::collections::BTreeMap<String, String>,
) {
    let job_labels = job.metadata.labels.as_ref().unwrap();
    let pod_labels = job
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    (job_labels, pod_labels)
}

#[test]
fn every_example_renders_to_a_valid_job_with_its_placement_and_owner_labels() {
    let examples = [
        "thumbnails",
        "amqp-work-queue",
        "nats-jetstream",
        "nightly-batch",
        "webhook",
    ];
    for name in examples {
        let file = example(name);
        let loaded = load_file(&file).unwrap().remove(0);
        let pipeline = &loaded.pipeline;
        let mut sample = pipeline.spec.source.sample_event();
        sample["data"] = json!({"scene": "intro", "frame": 7, "url": "https://example.test"});
        let (job, input) = match pipeline.spec.fanout.mode {
            FanOutMode::PerEvent => render_cli(&file, &["--event", &sample.to_string()]),
            FanOutMode::Indexed => {
                let batch: Vec<Value> = (0..3)
                    .map(|i| {
                        let mut item = sample.clone();
                        item["id"] = json!(format!("item-{i}"));
                        item
                    })
                    .collect();
                render_cli(&file, &["--events", &Value::from(batch).to_string()])
            }
        };
        let pipeline_name = pipeline.metadata.name.as_deref().unwrap();
        let namespace = job.metadata.namespace.as_deref().unwrap();
        let ids: Vec<String> = match pipeline.spec.fanout.mode {
            FanOutMode::PerEvent => vec![sample["id"].as_str().unwrap().to_string()],
            FanOutMode::Indexed => (0..3).map(|i| format!("item-{i}")).collect(),
        };
        let name_expected = naming::job_name(namespace, pipeline_name, &ids);
        assert_eq!(
            job.metadata.name.as_deref(),
            Some(name_expected.as_str()),
            "{name}"
        );

        let (job_labels, pod_labels) = labels_of(&job);
        for labels in [job_labels, pod_labels] {
            assert_eq!(labels["spate.dev/pipeline"], pipeline_name, "{name}");
            assert_eq!(
                labels["spate.dev/batch"],
                naming::batch_id(namespace, pipeline_name, &ids)
            );
            assert!(
                labels.values().all(|v| naming::is_label_value(v)),
                "{name}: {labels:?}"
            );
        }
        let annotations = job.metadata.annotations.as_ref().unwrap();
        let listed: Vec<String> =
            serde_json::from_str(&annotations["spate.dev/event-ids"]).unwrap();
        assert_eq!(listed, ids, "{name}");
        assert_eq!(annotations["spate.dev/source"], pipeline.spec.source.kind());

        // The TTL waits in an annotation until the Job's outcome is reported.
        assert_eq!(
            annotations["spate.dev/ttl-seconds-after-finished"],
            pipeline.spec.ttl_seconds_after_finished.to_string()
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.ttl_seconds_after_finished, None, "{name}");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let tolerates_virtual = pod.tolerations.iter().flatten().any(|t| {
            t.key.as_deref() == Some("virtual-kubelet.io/provider")
                && t.operator.as_deref() == Some("Exists")
        });
        match pipeline.spec.placement.mode {
            PlacementMode::Virtual => {
                assert!(tolerates_virtual, "{name}");
                assert_eq!(
                    pod.node_selector.as_ref().unwrap()["type"],
                    "virtual-kubelet"
                );
            }
            PlacementMode::Burst => {
                assert!(tolerates_virtual, "{name}");
                let preferred = pod
                    .affinity
                    .as_ref()
                    .and_then(|a| a.node_affinity.as_ref())
                    .and_then(|n| {
                        n.preferred_during_scheduling_ignored_during_execution
                            .as_ref()
                    })
                    .unwrap();
                let expression = &preferred[0].preference.match_expressions.as_ref().unwrap()[0];
                assert_eq!(
                    (expression.key.as_str(), expression.operator.as_str()),
                    ("type", "NotIn")
                );
            }
            PlacementMode::Regular => assert!(!tolerates_virtual),
        }

        let env: Vec<&str> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        match pipeline.spec.fanout.mode {
            FanOutMode::PerEvent => {
                assert!(input.is_none(), "{name}");
                assert!(
                    env.contains(&"SPATE_EVENT") && env.contains(&"SPATE_EVENT_ID"),
                    "{name}: {env:?}"
                );
                assert_eq!((spec.completions, spec.parallelism), (Some(1), Some(1)));
            }
            FanOutMode::Indexed => {
                assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"), "{name}");
                assert_eq!(spec.completions, Some(3));
                assert_eq!(spec.parallelism, Some(3));
                assert!(env.contains(&"SPATE_ITEMS_FILE"), "{name}: {env:?}");
                let input = input.expect("indexed Jobs carry their items in a ConfigMap");
                assert_eq!(input.metadata.name, job.metadata.name);
                let items: Vec<Value> =
                    serde_json::from_str(&input.data.as_ref().unwrap()["items.json"]).unwrap();
                assert_eq!(items.len(), 3);
                assert_eq!(items[2]["id"], "item-2", "item i is at index i");
                let volume = &pod.volumes.as_ref().unwrap()[0];
                assert_eq!(
                    volume.config_map.as_ref().unwrap().name,
                    *job.metadata.name.as_ref().unwrap()
                );
            }
        }
    }
}

#[test]
fn a_redelivered_event_renders_the_same_job() {
    let file = example("amqp-work-queue");
    let event = json!({"id": "msg-42", "subject": "frames", "routingKey": "frames", "exchange": "", "headers": {}, "data": {"scene": "s", "frame": 1}});
    let first = render_cli(&file, &["--event", &event.to_string()]);
    let again = render_cli(&file, &["--event", &event.to_string()]);
    assert_eq!(first, again);
    let other = json!({"id": "msg-43", "subject": "frames", "routingKey": "frames", "exchange": "", "headers": {}, "data": {"scene": "s", "frame": 1}});
    assert_ne!(
        first.0.metadata.name,
        render_cli(&file, &["--event", &other.to_string()])
            .0
            .metadata
            .name
    );
}

#[test]
fn indexed_parallelism_is_capped_by_the_budget() {
    let mut loaded = load_file(&example("nats-jetstream")).unwrap().remove(0);
    loaded.pipeline.spec.fanout.max_parallelism = 4;
    let events: Vec<Event> = (0..10)
        .map(|i| Event::from_json(json!({"id": format!("e{i}"), "subject": "media.uploaded.x", "headers": {}, "data": {}})).unwrap())
        .collect();
    let rendered =
        render::render_job(&loaded.pipeline, &loaded.template, &loaded.values, &events).unwrap();
    let spec = rendered.job.spec.unwrap();
    assert_eq!((spec.completions, spec.parallelism), (Some(10), Some(4)));
}

#[test]
fn a_large_event_travels_as_a_mounted_file() {
    let loaded = load_file(&example("amqp-work-queue")).unwrap().remove(0);
    let big = "x".repeat(render::MAX_ENV_EVENT_BYTES + 1);
    let event = Event::from_json(
        json!({"id": "big", "subject": "frames", "data": {"scene": big, "frame": 1}}),
    )
    .unwrap();
    let rendered =
        render::render_job(&loaded.pipeline, &loaded.template, &loaded.values, &[event]).unwrap();
    let input = rendered.input.expect("a ConfigMap for the large event");
    assert!(input.data.unwrap()["event.json"].len() > render::MAX_ENV_EVENT_BYTES);
    let pod = rendered.job.spec.unwrap().template.spec.unwrap();
    let env: Vec<String> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    assert!(
        env.contains(&"SPATE_EVENT_FILE".to_string()) && !env.contains(&"SPATE_EVENT".to_string())
    );
    let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, render::INPUT_MOUNT_PATH);
}

#[test]
fn event_text_stays_one_argument_and_never_becomes_structure() {
    let loaded = load_file(&example("amqp-work-queue")).unwrap().remove(0);
    let hostile = "a\" ]\n- --privileged\nkey: {{ pipeline.name }} $(rm -rf /); `id`";
    let event =
        Event::from_json(json!({"id": "h", "data": {"scene": hostile, "frame": 1}})).unwrap();
    let rendered =
        render::render_job(&loaded.pipeline, &loaded.template, &loaded.values, &[event]).unwrap();
    let container = &rendered.job.spec.unwrap().template.spec.unwrap().containers[0];
    let args = container.args.as_ref().unwrap();
    assert_eq!(args.len(), 4, "{args:?}");
    assert_eq!(args[1], hostile);
}

#[test]
fn every_builtin_template_renders_through_template_ref() {
    for (template, params) in [
        ("image-resize", json!({"output": "/tmp/out"})),
        ("generic-container", json!({"image": "busybox:1.36"})),
        (
            "script-runner",
            json!({"script": "cat \"$SPATE_EVENT_FILE\""}),
        ),
    ] {
        for mode in ["perEvent", "indexed"] {
            let yaml = format!(
                "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: t\nspec:\n  source:\n    objectStore:\n      url: s3://in\n  fanout:\n    mode: {mode}\n  templateRef:\n    name: {template}\n    params: {params}\n"
            );
            let loaded = spate::pipeline::load_str(&yaml, "t.yaml")
                .unwrap_or_else(|e| panic!("{template}/{mode}: {e:#?}"))
                .remove(0);
            let event = Event::from_json(loaded.pipeline.spec.source.sample_event()).unwrap();
            let rendered =
                render::render_job(&loaded.pipeline, &loaded.template, &loaded.values, &[event])
                    .unwrap();
            let container = &rendered.job.spec.unwrap().template.spec.unwrap().containers[0];
            let image = container.image.as_deref().unwrap();
            assert!(!image.contains("{{"), "{template}: {image}");
            if template == "generic-container" {
                assert_eq!(image, "busybox:1.36");
            }
        }
    }
    let defaults = TemplateValues::default();
    assert!(defaults.params.is_empty());
}

#[test]
fn the_namespace_flag_places_a_pipeline_that_names_none() {
    let file = example("thumbnails");
    let event = json!({"id": "u-1", "bucket": "inbox", "key": "a.jpg", "size": 1, "etag": "e", "url": "file:///a.jpg"});
    let (job, _) = render_cli(&file, &["-n", "media", "--event", &event.to_string()]);
    assert_eq!(job.metadata.namespace.as_deref(), Some("media"));
    assert_eq!(
        job.metadata.name.unwrap(),
        naming::job_name("media", "thumbnails", &["u-1"])
    );
    let (explicit, _) = render_cli(
        &example("amqp-work-queue"),
        &[
            "-n",
            "media",
            "--event",
            &json!({"id": "m", "data": {"scene": "s", "frame": 1}}).to_string(),
        ],
    );
    assert_eq!(
        explicit.metadata.namespace.as_deref(),
        Some("default"),
        "the file's namespace wins"
    );
}
