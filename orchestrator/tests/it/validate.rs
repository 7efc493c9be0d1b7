//! `spate validate`: every example is accepted, and each broken pipeline is refused with the
//! field path and the line a person has to fix.

use std::path::{Path, PathBuf};
use std::process::Command;

use spate::pipeline::load_str;

fn spate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spate"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|entry| entry.unwrap().path().join("pipeline.yaml"))
        .filter(|path| path.exists())
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_pipeline_is_valid() {
    let files = example_files();
    assert!(files.len() >= 5, "one example per source kind: {files:?}");
    let output = spate()
        .arg("validate")
        .arg("-f")
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches("is valid").count(), files.len(), "{stdout}");
}

/// A valid pipeline whose `source` and the rest of its spec are given, indented for `spec:`.
fn pipeline(source: &str, rest: &str) -> String {
    let indent = |text: &str, by: usize| {
        text.lines()
            .map(|line| format!("{}{line}\n", " ".repeat(by)))
            .collect::<String>()
    };
    format!(
        "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: demo\nspec:\n  source:\n{}{}",
        indent(source, 4),
        indent(rest, 2)
    )
}

const AMQP: &str = "amqp:\n  url: amqp://127.0.0.1:5672/%2f\n  queue: jobs";
const TEMPLATE: &str = "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers:\n          - name: work\n            image: busybox:1.36\n            args: [\"{{ event.subject }}\"]";

fn with_template(extra: &str) -> String {
    format!("{extra}\n{TEMPLATE}")
}

/// Each case: a name, the file, the field path the error must name, and (in the file) a
/// `# <-` marker on the line it must point at.
fn broken_pipelines() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "unknown spec field, with a suggestion",
            pipeline(AMQP, &with_template("fanuot: {}  # <-")),
            "spec.fanuot",
        ),
        (
            "misspelt fanout field",
            pipeline(AMQP, &with_template("fanout:\n  batchSise: 10  # <-")),
            "spec.fanout.batchSise",
        ),
        (
            "batch size of zero",
            pipeline(AMQP, &with_template("fanout:\n  batchSize: 0  # <-")),
            "spec.fanout.batchSize",
        ),
        (
            "batch size that is not a number",
            pipeline(AMQP, &with_template("fanout:\n  batchSize: ten  # <-")),
            "spec.fanout.batchSize",
        ),
        (
            "unknown fan-out mode",
            pipeline(AMQP, &with_template("fanout:\n  mode: perevent  # <-")),
            "spec.fanout.mode",
        ),
        (
            "a duration without a unit",
            pipeline(AMQP, &with_template("fanout:\n  maxWait: soon  # <-")),
            "spec.fanout.maxWait",
        ),
        (
            "no parallelism",
            pipeline(AMQP, &with_template("fanout:\n  maxParallelism: 0  # <-")),
            "spec.fanout.maxParallelism",
        ),
        (
            "negative rate",
            pipeline(
                AMQP,
                &with_template("fanout:\n  maxJobsPerSecond: -1.5  # <-"),
            ),
            "spec.fanout.maxJobsPerSecond",
        ),
        (
            "two source kinds",
            format!(
                "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: demo\nspec:\n  source:  # <-\n    amqp: {{url: 'amqp://h', queue: q}}\n    nats: {{url: 'nats://h', subject: s}}\n{}",
                TEMPLATE
                    .lines()
                    .map(|l| format!("  {l}\n"))
                    .collect::<String>()
            ),
            "spec.source",
        ),
        (
            "no source kind",
            format!(
                "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: demo\nspec:\n  source: {{}}  # <-\n{}",
                TEMPLATE
                    .lines()
                    .map(|l| format!("  {l}\n"))
                    .collect::<String>()
            ),
            "spec.source",
        ),
        (
            "cron minute out of range",
            pipeline("cron:\n  schedule: '61 * * * *'  # <-", TEMPLATE),
            "spec.source.cron.schedule",
        ),
        (
            "cron with four fields",
            pipeline("cron:\n  schedule: '* * * *'  # <-", TEMPLATE),
            "spec.source.cron.schedule",
        ),
        (
            "unknown time zone",
            pipeline(
                "cron:\n  schedule: '0 2 * * *'\n  timezone: Mars/Olympus  # <-",
                TEMPLATE,
            ),
            "spec.source.cron.timezone",
        ),
        (
            "AMQP URL with the wrong scheme",
            pipeline(
                "amqp:\n  url: http://127.0.0.1:5672  # <-\n  queue: jobs",
                TEMPLATE,
            ),
            "spec.source.amqp.url",
        ),
        (
            "AMQP without a URL",
            pipeline("amqp:  # <-\n  queue: jobs", TEMPLATE),
            "spec.source.amqp.url",
        ),
        (
            "AMQP prefetch of zero",
            pipeline(
                "amqp:\n  url: amqp://h\n  queue: jobs\n  prefetch: 0  # <-",
                TEMPLATE,
            ),
            "spec.source.amqp.prefetch",
        ),
        (
            "NATS subject with an empty token",
            pipeline("nats:\n  url: nats://h\n  subject: a..b  # <-", TEMPLATE),
            "spec.source.nats.subject",
        ),
        (
            "JetStream durable name with a dot",
            pipeline(
                "nats:\n  url: nats://h\n  subject: a.b\n  jetstream:\n    stream: S\n    durable: a.b  # <-",
                TEMPLATE,
            ),
            "spec.source.nats.jetstream.durable",
        ),
        (
            "webhook path that is not absolute",
            pipeline(
                "webhook:\n  path: hooks/x  # <-\n  auth: {none: {}}",
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers: [{name: a, image: b}]",
            ),
            "spec.source.webhook.path",
        ),
        (
            "webhook without authentication",
            pipeline(
                "webhook:  # <-\n  path: /hooks/x",
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers: [{name: a, image: b}]",
            ),
            "spec.source.webhook.auth",
        ),
        (
            "bucket URL with an unsupported scheme",
            pipeline("objectStore:\n  url: ftp://files  # <-", TEMPLATE),
            "spec.source.objectStore.url",
        ),
        (
            "notifications mode without a transport",
            pipeline(
                "objectStore:\n  url: s3://uploads\n  mode: notifications  # <-",
                TEMPLATE,
            ),
            "spec.source.objectStore.mode",
        ),
        (
            "both jobTemplate and templateRef",
            pipeline(
                AMQP,
                &format!(
                    "{TEMPLATE}\ntemplateRef:  # <-\n  name: generic-container\n  params: {{image: x}}"
                ),
            ),
            "spec.templateRef",
        ),
        (
            "neither jobTemplate nor templateRef",
            pipeline(AMQP, "fanout: {}"),
            "spec.jobTemplate",
        ),
        (
            "unknown templateRef",
            pipeline(AMQP, "templateRef:  # <-\n  name: resize-images"),
            "spec.templateRef",
        ),
        (
            "templateRef missing a required parameter",
            pipeline(AMQP, "templateRef:  # <-\n  name: generic-container"),
            "spec.templateRef",
        ),
        (
            "unknown field deep inside the pod template",
            pipeline(
                AMQP,
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers:\n          - name: work\n            image: busybox\n            imagePullPolicyy: Always  # <-",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].imagePullPolicyy",
        ),
        (
            "container without an image",
            pipeline(
                AMQP,
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers:\n          - name: work  # <-",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].image",
        ),
        (
            "a restart policy Jobs refuse",
            pipeline(
                AMQP,
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        restartPolicy: Always  # <-\n        containers: [{name: a, image: b}]",
            ),
            "spec.jobTemplate.spec.template.spec.restartPolicy",
        ),
        (
            "placeholder naming a field the event lacks",
            pipeline(
                "objectStore:\n  url: s3://uploads",
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers:\n          - name: a\n            image: b\n            args: [\"{{ event.filename }}\"]  # <-",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
        ),
        (
            "event text written into inline code",
            pipeline(
                "objectStore:\n  url: s3://uploads",
                "jobTemplate:\n  spec:\n    template:\n      spec:\n        containers:\n          - name: a\n            image: b\n            command: [sh, -c, \"convert {{ event.key }}\"]  # <-",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].command[2]",
        ),
        (
            "event placeholder in indexed mode",
            pipeline(
                "objectStore:\n  url: s3://uploads",
                "fanout:\n  mode: indexed\njobTemplate:\n  spec:\n    template:\n      spec:\n        containers:\n          - name: a\n            image: b\n            args: [\"{{ event.key }}\"]  # <-",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
        ),
        (
            "a name Kubernetes refuses",
            pipeline(AMQP, TEMPLATE).replace("name: demo", "name: My_Pipeline  # <-"),
            "metadata.name",
        ),
        (
            "wrong apiVersion",
            pipeline(AMQP, TEMPLATE).replace(
                "apiVersion: spate.dev/v1alpha1",
                "apiVersion: spate.dev/v1  # <-",
            ),
            "apiVersion",
        ),
        (
            "wrong kind",
            pipeline(AMQP, TEMPLATE).replace("kind: Pipeline", "kind: Pipe  # <-"),
            "kind",
        ),
        (
            "initial backoff longer than the maximum",
            pipeline(
                AMQP,
                &with_template("retry:\n  initialBackoff: 5m  # <-\n  maxBackoff: 1m"),
            ),
            "spec.retry.initialBackoff",
        ),
        (
            "dead-letter sink with a wrong URL",
            pipeline(
                AMQP,
                &with_template(
                    "sinks:\n  deadLetter:\n    nats:\n      url: amqp://h  # <-\n      subject: dead",
                ),
            ),
            "spec.sinks.deadLetter.nats.url",
        ),
        (
            "a label that is not a string",
            pipeline(AMQP, TEMPLATE).replace(
                "  name: demo\n",
                "  name: demo\n  labels:\n    tier: 1  # <-\n",
            ),
            "metadata.labels.tier",
        ),
        (
            "a negative TTL",
            pipeline(AMQP, &with_template("ttlSecondsAfterFinished: -5  # <-")),
            "spec.ttlSecondsAfterFinished",
        ),
        (
            "a privileged container under the restricted pod security level",
            pipeline(AMQP, TEMPLATE).replace(
                "              image: busybox:1.36\n",
                "              image: busybox:1.36\n              securityContext:\n                privileged: true  # <-\n",
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].securityContext.privileged",
        ),
        (
            "the node's files mounted",
            pipeline(AMQP, TEMPLATE).replace(
                "        spec:\n          containers:\n",
                "        spec:\n          volumes:\n            - name: node\n              hostPath: {path: /}  # <-\n          containers:\n",
            ),
            "spec.jobTemplate.spec.template.spec.volumes[0].hostPath",
        ),
        (
            "the node's network",
            pipeline(AMQP, TEMPLATE).replace(
                "        spec:\n          containers:\n",
                "        spec:\n          hostNetwork: true  # <-\n          containers:\n",
            ),
            "spec.jobTemplate.spec.template.spec.hostNetwork",
        ),
        (
            "root",
            pipeline(AMQP, TEMPLATE).replace(
                "        spec:\n          containers:\n",
                "        spec:\n          securityContext: {runAsUser: 0}  # <-\n          containers:\n",
            ),
            "spec.jobTemplate.spec.template.spec.securityContext.runAsUser",
        ),
    ]
}

fn marked_line(text: &str) -> usize {
    text.lines()
        .position(|line| line.contains("# <-"))
        .map(|index| index + 1)
        .unwrap_or_else(|| panic!("no `# <-` marker in:\n{text}"))
}

#[test]
fn broken_pipelines_are_refused_at_their_field_and_line() {
    let cases = broken_pipelines();
    assert!(cases.len() >= 25);
    for (name, text, path) in cases {
        let diagnostics = match load_str(&text, "broken.yaml") {
            Ok(_) => panic!("{name}: accepted\n{text}"),
            Err(diagnostics) => diagnostics,
        };
        let found = diagnostics
            .iter()
            .find(|d| d.path == path)
            .unwrap_or_else(|| panic!("{name}: no error at {path}; got {diagnostics:#?}\n{text}"));
        let shown = found.to_string();
        let expected_line = if text.contains("# <-") {
            marked_line(&text)
        } else {
            found.location.map(|l| l.line).unwrap_or(0)
        };
        assert!(
            shown.starts_with(&format!("broken.yaml:{expected_line}:")),
            "{name}: expected line {expected_line}: {shown}\n{text}"
        );
        assert!(shown.contains(path), "{name}: {shown}");
    }
}

#[test]
fn several_mistakes_are_all_reported() {
    let text = pipeline(
        AMQP,
        &with_template("fanout:\n  batchSize: ten\n  mode: perevent\n  burst: -1\n  maxWait: soon"),
    );
    let diagnostics = load_str(&text, "many.yaml").unwrap_err();
    let paths: Vec<&str> = diagnostics.iter().map(|d| d.path.as_str()).collect();
    for expected in [
        "spec.fanout.batchSize",
        "spec.fanout.mode",
        "spec.fanout.burst",
    ] {
        assert!(paths.contains(&expected), "{paths:?}");
    }
    assert!(diagnostics[0].message.contains("expected an integer"));
    assert!(
        diagnostics
            .iter()
            .any(|d| d.message.contains("did you mean `perEvent`")),
        "{diagnostics:#?}"
    );
}

#[test]
fn syntax_errors_and_duplicate_keys_point_at_their_line() {
    let duplicate = "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nkind: Pipeline\n";
    let error = load_str(duplicate, "dup.yaml").unwrap_err();
    assert!(
        error[0].to_string().starts_with("dup.yaml:3:"),
        "{}",
        error[0]
    );
    assert!(error[0].message.contains("duplicate key `kind`"));
    let unclosed = "spec:\n  source: [amqp\n";
    let error = load_str(unclosed, "bad.yaml").unwrap_err();
    assert!(error[0].message.starts_with("invalid YAML"), "{}", error[0]);
    assert!(error[0].location.is_some());
}

#[test]
fn the_validate_command_exits_1_and_prints_each_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        pipeline(
            AMQP,
            &with_template("fanout:\n  batchSize: 0\n  maxParallelism: 0"),
        ),
    )
    .unwrap();
    let output = spate()
        .arg("validate")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(
        stderr.contains(":11:5: spec.fanout.batchSize: must be between 1 and 100000"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":12:5: spec.fanout.maxParallelism"),
        "{stderr}"
    );
    let missing = spate()
        .args(["validate", "-f", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the file"));
}

#[test]
fn the_pod_security_level_is_the_operators_to_relax() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("root.yaml");
    let text = pipeline(AMQP, TEMPLATE).replace(
        "        spec:\n          containers:\n",
        "        spec:\n          securityContext: {runAsUser: 0}\n          containers:\n",
    );
    std::fs::write(&file, &text).unwrap();
    let validate = |extra: &[&str]| {
        spate()
            .arg("validate")
            .arg("-f")
            .arg(&file)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = validate(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("securityContext.runAsUser: must not be 0 (root) under the `restricted` pod security level"),
        "{stderr}"
    );
    for level in ["baseline", "privileged"] {
        let relaxed = validate(&["--pod-security", level]);
        assert!(
            relaxed.status.success(),
            "{level}: {}",
            String::from_utf8_lossy(&relaxed.stderr)
        );
    }
    // By namespace: only the pipelines of the namespace named.
    let in_namespace = text.replace("  name: demo\n", "  name: demo\n  namespace: build-farm\n");
    std::fs::write(&file, &in_namespace).unwrap();
    assert!(
        validate(&["--pod-security-namespace", "build-farm=baseline"])
            .status
            .success()
    );
    assert_eq!(
        validate(&["--pod-security-namespace", "other=baseline"])
            .status
            .code(),
        Some(1)
    );
    let typo = validate(&["--pod-security-namespace", "build-farm=lenient"]);
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("privileged, baseline or restricted"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );
}
