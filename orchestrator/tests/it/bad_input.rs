//! Bad input: malformed pipelines and hostile events.
//!
//! Pipelines: each broken file is refused with a diagnostic that names the field (and the line
//! where there is one), and never crashes the loader. The nastiest files (a YAML bomb, 10 MB,
//! deep nesting, binary) go through a real `spate validate -f` process, so a stack overflow or
//! an abort would show as a signal instead of taking the test harness down with it.
//!
//! Events: every hostile event either renders safely (its text stays the value of the strings
//! it was placed in: no new key, no new list item, nothing in a `command`) or is refused with a
//! reason, which is what the engine sends to the dead-letter sink.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use spate::pipeline::{Diagnostic, LoadedPipeline, load_str};
use spate::render::render_job;
use spate_sources::Event;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

// ---------------------------------------------------------------------------------------------
// (a) pipelines
// ---------------------------------------------------------------------------------------------

/// A valid pipeline; every case breaks one thing in it. Lines are numbered for the cases.
const VALID: &str = r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: demo
spec:
  source:
    webhook: {path: /hooks/x, auth: {none: {}}}
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: work
              image: busybox:1.36
              args: ["{{ event.id }}"]
"#;

/// One broken pipeline: what must be reported about it.
struct Broken {
    name: &'static str,
    text: String,
    /// The field path the diagnostic must name (empty: the whole document or the syntax).
    path: &'static str,
    /// The line it must point at; `None` where a file has no line to point at.
    line: Option<usize>,
    /// A fragment of the message a person reads.
    message: &'static str,
}

/// `VALID` with the first `from` replaced by `to`.
fn edit(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "the base pipeline has no `{from}`");
    VALID.replacen(from, to, 1)
}

fn broken(
    name: &'static str,
    text: String,
    path: &'static str,
    line: Option<usize>,
    message: &'static str,
) -> Broken {
    Broken {
        name,
        text,
        path,
        line,
        message,
    }
}

const SOURCE: &str = "    webhook: {path: /hooks/x, auth: {none: {}}}\n";
const ARGS: &str = "              args: [\"{{ event.id }}\"]\n";

fn with_source(source: &str) -> String {
    edit(SOURCE, &format!("    {source}\n"))
}

fn with_container_line(line: &str) -> String {
    edit(ARGS, &format!("{ARGS}              {line}\n"))
}

fn with_command(command: &str) -> String {
    edit(ARGS, &format!("              command: {command}\n"))
}

fn with_spec_line(line: &str) -> String {
    edit("  jobTemplate:\n", &format!("  {line}\n  jobTemplate:\n"))
}

fn with_name(name: &str) -> String {
    edit("  name: demo\n", &format!("  name: {name}\n"))
}

fn broken_pipelines() -> Vec<Broken> {
    let dns = "is not a valid name";
    vec![
        // YAML syntax.
        broken(
            "a tab in the indentation",
            edit("  name: demo", "\tname: demo"),
            "",
            Some(4),
            "invalid YAML",
        ),
        broken(
            "an unclosed double quote",
            edit("image: busybox:1.36", "image: \"busybox:1.36"),
            "",
            None,
            "invalid YAML",
        ),
        broken(
            "an unclosed single quote",
            edit("name: work", "name: 'work"),
            "",
            None,
            "invalid YAML",
        ),
        broken(
            "an unclosed flow sequence",
            edit("args: [\"{{ event.id }}\"]", "args: [\"{{ event.id }}\""),
            "",
            None,
            "invalid YAML",
        ),
        broken(
            "an unclosed flow mapping",
            edit("auth: {none: {}}}", "auth: {none: {}}"),
            "",
            None,
            "invalid YAML",
        ),
        broken(
            "a duplicate top-level key",
            edit("kind: Pipeline\n", "kind: Pipeline\nkind: Pipeline\n"),
            "",
            Some(3),
            "duplicate key `kind`",
        ),
        broken(
            "a duplicate key in metadata",
            edit("  name: demo\n", "  name: demo\n  name: other\n"),
            "",
            Some(5),
            "duplicate key `name`",
        ),
        broken(
            "a duplicate key deep in a container",
            with_container_line("image: alpine"),
            "",
            Some(16),
            "duplicate key `image`",
        ),
        broken(
            "a duplicate key in a flow mapping",
            edit("{none: {}}", "{none: {}, none: {}}"),
            "",
            Some(7),
            "duplicate key `none`",
        ),
        broken(
            "a key indented too far",
            edit("kind: Pipeline\n", "kind: Pipeline\n   oops: 1\n"),
            "",
            None,
            "invalid YAML",
        ),
        broken(
            "an alias to an unknown anchor",
            edit("image: busybox:1.36", "image: *nothing"),
            "",
            Some(14),
            "invalid YAML",
        ),
        broken(
            "a collection as a mapping key",
            edit("kind: Pipeline\n", "kind: Pipeline\n? [a, b]\n: c\n"),
            "",
            Some(3),
            "mapping keys must be plain strings",
        ),
        broken(
            "a NUL byte",
            edit("name: demo", "name: de\0mo"),
            "",
            Some(4),
            "invalid YAML",
        ),
        broken(
            "an escape sequence YAML does not have",
            edit("name: demo", "name: \"de\\qmo\""),
            "",
            Some(4),
            "invalid YAML",
        ),
        broken(
            "an empty file",
            String::new(),
            "",
            None,
            "holds no pipeline",
        ),
        broken(
            "only comments and separators",
            "# nothing here\n---\n---\n".to_string(),
            "",
            None,
            "holds no pipeline",
        ),
        broken(
            "a list instead of a mapping",
            "- apiVersion: spate.dev/v1alpha1\n".to_string(),
            "",
            Some(1),
            "must be a mapping",
        ),
        broken(
            "a bare scalar",
            "pipeline\n".to_string(),
            "",
            Some(1),
            "must be a mapping",
        ),
        // The resource header.
        broken(
            "a wrong apiVersion",
            edit("spate.dev/v1alpha1", "batch/v1"),
            "apiVersion",
            Some(1),
            "must be `spate.dev/v1alpha1`",
        ),
        broken(
            "no kind",
            edit("kind: Pipeline\n", ""),
            "kind",
            None,
            "missing required field `kind`",
        ),
        broken(
            "another kind",
            edit("kind: Pipeline", "kind: Job"),
            "kind",
            Some(2),
            "must be `Pipeline`",
        ),
        broken(
            "an unknown top-level field",
            edit("kind: Pipeline\n", "kind: Pipeline\nspecs: {}\n"),
            "specs",
            Some(3),
            "unknown field `specs`",
        ),
        broken(
            "no metadata",
            edit("metadata:\n  name: demo\n", ""),
            "metadata",
            None,
            "missing required field `metadata`",
        ),
        broken(
            "no name",
            edit("  name: demo\n", "  namespace: default\n"),
            "metadata.name",
            Some(3),
            "missing required field `name`",
        ),
        broken(
            "a name with ../",
            with_name("../../etc"),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with a shell command",
            with_name("\"a;rm -rf /\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with a command substitution",
            with_name("\"$(reboot)\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with backticks",
            with_name("\"`id`\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with a pipe",
            with_name("\"a|b\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with unicode letters",
            with_name("thümbnails"),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with an emoji",
            with_name("demo-🚀"),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with a zero-width space",
            with_name("\"demo\\u200b\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with a right-to-left override",
            with_name("\"demo\\u202egpj\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name with a newline",
            with_name("\"de\\nmo\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "an upper-case name",
            with_name("Demo"),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name of 64 characters",
            with_name(&"a".repeat(64)),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "an empty name",
            with_name("\"\""),
            "metadata.name",
            Some(4),
            dns,
        ),
        broken(
            "a name that is a number",
            with_name("42"),
            "metadata.name",
            Some(4),
            "must be a string",
        ),
        broken(
            "a namespace with ../",
            edit(
                "  name: demo\n",
                "  name: demo\n  namespace: ../kube-system\n",
            ),
            "metadata.namespace",
            Some(5),
            "not a valid namespace name",
        ),
        broken(
            "a label value that is not a string",
            edit("  name: demo\n", "  name: demo\n  labels: {tier: 1}\n"),
            "metadata.labels.tier",
            Some(5),
            "values must be strings",
        ),
        broken(
            "an unknown metadata field",
            edit("  name: demo\n", "  name: demo\n  nmae: demo\n"),
            "metadata.nmae",
            Some(5),
            "unknown field `nmae`",
        ),
        // Wrong types.
        broken(
            "spec as a list",
            format!("{}spec: []\n", &VALID[..VALID.find("spec:").unwrap()]),
            "spec",
            Some(5),
            "expected",
        ),
        broken(
            "spec as a string",
            format!(
                "{}spec: everything\n",
                &VALID[..VALID.find("spec:").unwrap()]
            ),
            "spec",
            Some(5),
            "expected",
        ),
        broken(
            "source as a string",
            edit(
                "  source:\n    webhook: {path: /hooks/x, auth: {none: {}}}",
                "  source: webhook",
            ),
            "spec.source",
            Some(6),
            "expected",
        ),
        broken(
            "a path that is a number",
            with_source("webhook: {path: 42, auth: {none: {}}}"),
            "spec.source.webhook.path",
            Some(7),
            "expected a string",
        ),
        broken(
            "a body limit that is text",
            with_source("webhook: {path: /h, auth: {none: {}}, maxBodyBytes: big}"),
            "spec.source.webhook.maxBodyBytes",
            Some(7),
            "expected an integer",
        ),
        broken(
            "a negative body limit",
            with_source("webhook: {path: /h, auth: {none: {}}, maxBodyBytes: -1}"),
            "spec.source.webhook.maxBodyBytes",
            Some(7),
            "",
        ),
        broken(
            "a fractional batch size",
            with_spec_line("fanout: {batchSize: 1.5}"),
            "spec.fanout.batchSize",
            Some(8),
            "expected an integer",
        ),
        broken(
            "a boolean parallelism",
            with_spec_line("fanout: {maxParallelism: true}"),
            "spec.fanout.maxParallelism",
            Some(8),
            "expected an integer",
        ),
        broken(
            "a mode given as a list",
            with_spec_line("fanout: {mode: [perEvent]}"),
            "spec.fanout.mode",
            Some(8),
            "expected",
        ),
        broken(
            "a quoted number",
            with_spec_line("retry: {maxAttempts: \"3\"}"),
            "spec.retry.maxAttempts",
            Some(8),
            "expected an integer",
        ),
        broken(
            "an integer that overflows",
            with_spec_line("fanout: {batchSize: 99999999999999999999999}"),
            "spec.fanout.batchSize",
            Some(8),
            "",
        ),
        broken(
            "a TTL of 1e99",
            with_spec_line("ttlSecondsAfterFinished: 1e99"),
            "spec.ttlSecondsAfterFinished",
            Some(8),
            "",
        ),
        broken(
            "a rate that is not a number",
            with_spec_line("fanout: {maxJobsPerSecond: .nan}"),
            "spec.fanout.maxJobsPerSecond",
            Some(8),
            "",
        ),
        broken(
            "an infinite rate",
            with_spec_line("fanout: {maxJobsPerSecond: .inf}"),
            "spec.fanout.maxJobsPerSecond",
            Some(8),
            "",
        ),
        broken(
            "containers as a mapping",
            edit(
                "          containers:\n            - name: work\n              image: busybox:1.36\n              args: [\"{{ event.id }}\"]\n",
                "          containers: {name: work}\n",
            ),
            "spec.jobTemplate.spec.template.spec.containers",
            Some(12),
            "expected",
        ),
        broken(
            "args as a string",
            edit("args: [\"{{ event.id }}\"]", "args: \"{{ event.id }}\""),
            "spec.jobTemplate.spec.template.spec.containers[0].args",
            Some(15),
            "expected",
        ),
        // Unknown fields at every depth.
        broken(
            "an unknown field in spec",
            with_spec_line("sourc: {}"),
            "spec.sourc",
            Some(8),
            "unknown field",
        ),
        broken(
            "an unknown field in the source",
            with_source("webhook: {path: /h, pth: /x, auth: {none: {}}}"),
            "spec.source.webhook.pth",
            Some(7),
            "unknown field",
        ),
        broken(
            "an unknown field in the auth",
            with_source("webhook: {path: /h, auth: {bearer: {token: {env: T}, tokn: x}}}"),
            "spec.source.webhook.auth.bearer.tokn",
            Some(7),
            "unknown field",
        ),
        broken(
            "an unknown auth kind",
            with_source("webhook: {path: /h, auth: {basic: {}}}"),
            "spec.source.webhook.auth",
            Some(7),
            "",
        ),
        broken(
            "an unknown field in a container",
            with_container_line("imagePullPolicyy: Always"),
            "spec.jobTemplate.spec.template.spec.containers[0].imagePullPolicyy",
            Some(16),
            "unknown field",
        ),
        broken(
            "an unknown field in a container's resources",
            with_container_line("resources: {limitz: {cpu: 1}}"),
            "spec.jobTemplate.spec.template.spec.containers[0].resources.limitz",
            Some(16),
            "unknown field",
        ),
        broken(
            "an unknown field in fanout",
            with_spec_line("fanout: {extra: 1}"),
            "spec.fanout.extra",
            Some(8),
            "unknown field",
        ),
        broken(
            "an unknown sink kind",
            with_spec_line("sinks: {deadLetter: {pulsar: {}}}"),
            "spec.sinks.deadLetter",
            Some(8),
            "",
        ),
        broken(
            "an unknown key with ../",
            with_spec_line("\"../../etc/passwd\": 1"),
            "spec[\"../../etc/passwd\"]",
            Some(8),
            "unknown field",
        ),
        broken(
            "an unknown key with shell metacharacters",
            with_spec_line("\"$(rm -rf /); `id` | x\": 1"),
            "spec[\"$(rm -rf /); `id` | x\"]",
            Some(8),
            "unknown field",
        ),
        broken(
            "an unknown key with a newline",
            with_spec_line("\"a\\nb\": 1"),
            "spec[\"a\\nb\"]",
            Some(8),
            "unknown field",
        ),
        broken(
            "an unknown key in unicode",
            with_spec_line("ソース: {}"),
            "spec[\"ソース\"]",
            Some(8),
            "unknown field",
        ),
        // Rules beyond types.
        broken(
            "a duration with an unknown unit",
            with_spec_line("fanout: {maxWait: 5 parsecs}"),
            "spec.fanout.maxWait",
            Some(8),
            "",
        ),
        broken(
            "a first backoff longer than the longest",
            with_spec_line("retry: {initialBackoff: 1h, maxBackoff: 1s}"),
            "spec.retry.initialBackoff",
            Some(8),
            "longer than maxBackoff",
        ),
        broken(
            "a cron schedule out of range",
            with_source("cron: {schedule: \"61 * * * *\"}"),
            "spec.source.cron.schedule",
            Some(7),
            "",
        ),
        broken(
            "an unknown time zone",
            with_source("cron: {schedule: \"* * * * *\", timezone: Mars/Olympus}"),
            "spec.source.cron.timezone",
            Some(7),
            "",
        ),
        broken(
            "an AMQP URL of another scheme",
            with_source("amqp: {url: \"http://h/\", queue: q}"),
            "spec.source.amqp.url",
            Some(7),
            "",
        ),
        broken(
            "a relative webhook path",
            with_source("webhook: {path: hooks/x, auth: {none: {}}}"),
            "spec.source.webhook.path",
            Some(7),
            "absolute path",
        ),
        broken(
            "a webhook path with ../",
            with_source("webhook: {path: /hooks/../admin, auth: {none: {}}}"),
            "spec.source.webhook.path",
            Some(7),
            "without `..`",
        ),
        broken(
            "a template reference with ../",
            edit(
                "  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers:\n            - name: work\n              image: busybox:1.36\n              args: [\"{{ event.id }}\"]\n",
                "  templateRef: {name: ../../../etc/passwd}\n",
            ),
            "spec.templateRef",
            Some(8),
            "",
        ),
        broken(
            "a template reference without its required parameter",
            edit(
                "  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers:\n            - name: work\n              image: busybox:1.36\n              args: [\"{{ event.id }}\"]\n",
                "  templateRef: {name: generic-container}\n",
            ),
            "spec.templateRef",
            Some(8),
            "image",
        ),
        broken(
            "both a template and a reference",
            with_spec_line("templateRef: {name: generic-container, params: {image: x}}"),
            "spec.templateRef",
            Some(8),
            "not both",
        ),
        broken(
            "no container",
            edit(
                "          containers:\n            - name: work\n              image: busybox:1.36\n              args: [\"{{ event.id }}\"]\n",
                "          containers: []\n",
            ),
            "spec.jobTemplate.spec.template.spec.containers",
            Some(12),
            "at least one container",
        ),
        broken(
            "a container without an image",
            edit("              image: busybox:1.36\n", ""),
            "spec.jobTemplate.spec.template.spec.containers[0].image",
            Some(13),
            "missing required field `image`",
        ),
        broken(
            "a restart policy a Job cannot have",
            edit(
                "          containers:\n",
                "          restartPolicy: Always\n          containers:\n",
            ),
            "spec.jobTemplate.spec.template.spec.restartPolicy",
            Some(12),
            "`Never` or `OnFailure`",
        ),
        // Templates.
        broken(
            "a placeholder naming a field the event lacks",
            edit("{{ event.id }}", "{{ event.nothing }}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "no field of `event` named `nothing`",
        ),
        broken(
            "a placeholder reaching into a string field",
            edit("{{ event.id }}", "{{ event.subject.x }}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "no field of `event.subject` named `x`",
        ),
        broken(
            "a parameter a jobTemplate does not have",
            edit("{{ event.id }}", "{{ params.width }}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "no template parameter named `width`",
        ),
        broken(
            "a pipeline field that does not exist",
            edit("{{ event.id }}", "{{ pipeline.nam }}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "`pipeline.nam`",
        ),
        broken(
            "an unclosed placeholder",
            edit("{{ event.id }}", "{{ event.id "),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "syntax",
        ),
        broken(
            "a broken template block",
            edit("{{ event.id }}", "{% for %}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "syntax",
        ),
        broken(
            "an unknown filter",
            edit("{{ event.id }}", "{{ event.id | nosuchfilter }}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "filter",
        ),
        broken(
            "a field a cron event does not have",
            edit(SOURCE, "    cron: {schedule: \"* * * * *\"}\n").replacen(
                "{{ event.id }}",
                "{{ event.key }}",
                1,
            ),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(15),
            "no field of `event` named `key`",
        ),
        broken(
            "an event placeholder in indexed mode",
            with_spec_line("fanout: {mode: indexed}"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[0]",
            Some(16),
            "not available in indexed mode",
        ),
        // The event read by inline code.
        broken(
            "a placeholder in sh -c",
            with_command("[\"/bin/sh\", \"-c\", \"convert {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[2]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in bash -c given in args",
            with_command("[bash]\n              args: [\"-c\", \"echo {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].args[1]",
            Some(16),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in busybox sh -c",
            with_command("[busybox, sh, \"-c\", \"echo {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[3]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in sh -ec (combined flags)",
            with_command("[sh, \"-ec\", \"echo {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[2]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in sh -xc",
            with_command("[/bin/bash, \"-euxc\", \"echo {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[2]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in a shell started through env",
            with_command("[/usr/bin/env, sh, \"-c\", \"echo {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[3]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in a shell started through nice",
            with_command("[nice, \"-n\", \"5\", bash, \"-c\", \"echo {{ event.id }}\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[5]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "the event read by subscript in python -c",
            with_command("[python3, \"-c\", \"print('{{ event['id'] }}')\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[2]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "the whole event in perl -e",
            with_command("[perl, \"-e\", \"print '{{ event | tojson }}'\"]"),
            "spec.jobTemplate.spec.template.spec.containers[0].command[2]",
            Some(15),
            "must not be written into inline code",
        ),
        broken(
            "a placeholder in an init container's script",
            edit(
                "          containers:\n",
                "          initContainers:\n            - {name: init, image: busybox, command: [sh, \"-c\", \"ls {{ event.id }}\"]}\n          containers:\n",
            ),
            "spec.jobTemplate.spec.template.spec.initContainers[0].command[2]",
            Some(13),
            "must not be written into inline code",
        ),
    ]
}

fn line_of(diagnostic: &Diagnostic) -> Option<usize> {
    diagnostic.location.map(|location| location.line)
}

/// Runs the loader on a thread with the usual 2 MiB stack: a recursion the input controls
/// would overflow it (and abort the test binary) rather than hide in the test's larger stack.
fn load_on_small_stack(text: String) -> Result<Vec<LoadedPipeline>, Vec<Diagnostic>> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || load_str(&text, "case.yaml"))
        .unwrap()
        .join()
        .unwrap_or_else(|_| panic!("the loader panicked"))
}

#[test]
fn the_base_pipeline_is_valid() {
    let loaded = load_str(VALID, "valid.yaml").unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(loaded.len(), 1);
}

#[test]
fn each_broken_pipeline_is_refused_naming_its_field_and_line() {
    let cases = broken_pipelines();
    assert!(cases.len() >= 80, "{} pipeline cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let diagnostics = match load_on_small_stack(case.text.clone()) {
            Ok(_) => {
                failures.push(format!("{}: accepted\n{}", case.name, case.text));
                continue;
            }
            Err(diagnostics) => diagnostics,
        };
        let found = diagnostics.iter().find(|d| {
            (case.path.is_empty() || d.path == case.path)
                && (case.line.is_none() || line_of(d) == case.line)
                && d.message.contains(case.message)
        });
        let Some(found) = found else {
            failures.push(format!(
                "{}: expected `{}` at line {:?} with \"{}\", got:\n  {}",
                case.name,
                case.path,
                case.line,
                case.message,
                diagnostics
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
            continue;
        };
        // A diagnostic a person can act on: the file, a message, and a line when there is one.
        let shown = found.to_string();
        if !shown.starts_with("case.yaml") || found.message.trim().is_empty() {
            failures.push(format!("{}: unclear diagnostic `{shown}`", case.name));
        }
        if case.line.is_some() && found.location.is_none() {
            failures.push(format!("{}: no line in `{shown}`", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// A file from the corpus (made on first use: the big ones are generated, not stored).
fn corpus_file(name: &str, make: impl FnOnce() -> Vec<u8>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spate-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, make()).unwrap();
    path
}

fn validate(file: &Path) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["validate", "-f"])
        .arg(file)
        .output()
        .unwrap();
    (output, started.elapsed())
}

fn nested(open: &str, close: &str, depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

fn valid_with(line: &str) -> Vec<u8> {
    edit("  jobTemplate:\n", &format!("  {line}\n  jobTemplate:\n")).into_bytes()
}

/// Files that could crash a loader: each is refused by a real `spate validate` process that
/// exits 1 (not by a signal), in bounded time, naming the file and what is wrong.
#[test]
fn nasty_files_are_refused_by_spate_validate_without_crashing() {
    let bomb = || {
        let mut text = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        let mut previous = 'a';
        for name in 'b'..='j' {
            let refs = vec![format!("*{previous}"); 9].join(", ");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
            previous = name;
        }
        text.into_bytes()
    };
    let big_string = || valid_with(&format!("x: \"{}\"", "a".repeat(10 * 1024 * 1024)));
    let big_list = || {
        let items = vec!["1"; 5 * 1024 * 1024 / 2].join(",");
        valid_with(&format!("x: [{items}]"))
    };
    let deep_block = || {
        // 10,000 nested block sequences: `- - - - … x`.
        valid_with(&format!("x:\n{}x", "- ".repeat(10_000)))
    };
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "a billion-laughs YAML bomb",
            corpus_file("bomb.yaml", bomb),
            "aliases expand to more than",
        ),
        (
            "10,000 nested flow lists",
            corpus_file("deep-lists.yaml", || {
                nested("[", "]", 10_000, "").into_bytes()
            }),
            "invalid YAML",
        ),
        (
            "10,000 nested flow mappings",
            corpus_file("deep-maps.yaml", || {
                nested("{a: ", "}", 10_000, "1").into_bytes()
            }),
            "invalid YAML",
        ),
        (
            "10,000 nested lists inside a valid pipeline",
            corpus_file("deep-in-spec.yaml", || {
                valid_with(&format!("x: {}", nested("[", "]", 10_000, "")))
            }),
            "invalid YAML",
        ),
        (
            "10,000 nested block sequences",
            corpus_file("deep-block.yaml", deep_block),
            "invalid YAML",
        ),
        (
            "a 10 MB string in an unknown field",
            corpus_file("big-string.yaml", big_string),
            "spec.x: unknown field `x`",
        ),
        (
            "a 5 MB list in an unknown field",
            corpus_file("big-list.yaml", big_list),
            "spec.x: unknown field `x`",
        ),
        (
            "binary bytes",
            corpus_file("binary.yaml", || (0..=255u8).cycle().take(4096).collect()),
            "did not contain valid UTF-8",
        ),
        (
            "invalid UTF-8 in a valid pipeline",
            corpus_file("latin1.yaml", || {
                let mut bytes = VALID.as_bytes().to_vec();
                bytes.extend_from_slice(b"  # caf\xe9\n");
                bytes
            }),
            "did not contain valid UTF-8",
        ),
        (
            "a stored corpus file: tabs, quotes and a duplicate key",
            corpus().join("tabs-and-duplicates.yaml"),
            "invalid YAML",
        ),
        (
            "a stored corpus file: a name with shell metacharacters",
            corpus().join("shell-name.yaml"),
            "metadata.name",
        ),
        (
            "a stored corpus file: placeholders in a script",
            corpus().join("shell-placeholder.yaml"),
            "must not be written into inline code",
        ),
    ];
    let mut failures = Vec::new();
    for (name, file, expected) in &cases {
        let (output, took) = validate(file);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let head: String = stderr.chars().take(600).collect();
        if output.status.code() != Some(1) {
            failures.push(format!(
                "{name}: exit {:?} (a signal if None), stderr: {head}",
                output.status
            ));
        } else if !stderr.contains(&*file.display().to_string()) || !stderr.contains(expected) {
            failures.push(format!("{name}: expected \"{expected}\", got: {head}"));
        } else if stderr.contains("panicked") {
            failures.push(format!("{name}: panicked: {head}"));
        } else if took > Duration::from_secs(120) {
            // A guard against blow-ups (a bomb expanding, a loop), not a speed test: the
            // machine is shared, and a loaded debug build takes tens of seconds on 5 MB.
            failures.push(format!("{name}: took {took:?}"));
        } else if stderr.len() > 64 * 1024 {
            failures.push(format!(
                "{name}: {} bytes of diagnostics: the input is echoed back",
                stderr.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The same deep files through the library on a 2 MiB stack: no recursion the input controls.
#[test]
fn deep_nesting_does_not_overflow_a_2_mib_stack() {
    for (name, text) in [
        ("lists", nested("[", "]", 10_000, "")),
        ("maps", nested("{a: ", "}", 10_000, "1")),
        (
            "lists in spec",
            String::from_utf8(valid_with(&format!("x: {}", nested("[", "]", 10_000, "")))).unwrap(),
        ),
        (
            "100 levels in a container",
            edit(
                "args: [\"{{ event.id }}\"]",
                &format!(
                    "args: [\"{{{{ event.id }}}}\"]\n              x: {}",
                    nested("[", "]", 100, "")
                ),
            ),
        ),
    ] {
        let diagnostics = load_on_small_stack(text).expect_err(name);
        assert!(!diagnostics.is_empty(), "{name}");
        assert!(
            diagnostics.iter().all(|d| d.location.is_some()),
            "{name}: {diagnostics:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (b) events
// ---------------------------------------------------------------------------------------------

/// Event text reaches the Job through an argument, an env var and a label; a second container
/// runs a shell script that reads the env var.
const EVENT_PIPELINE: &str = r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: hostile
spec:
  source:
    webhook: {path: /hooks/x, auth: {none: {}}}
  jobTemplate:
    metadata:
      labels: {name: "{{ event.data.name }}"}
    spec:
      template:
        spec:
          containers:
            - name: work
              image: busybox:1.36
              command: ["/bin/convert"]
              args: ["--name", "{{ event.data.name }}", "--id={{ event.id }}"]
              env:
                - {name: NAME, value: "{{ event.data.name }}"}
            - name: script
              image: busybox:1.36
              command: ["/bin/sh", "-c", "echo \"$NAME\""]
              env:
                - {name: NAME, value: "{{ event.data.name }}"}
"#;

const SCRIPT: &str = "echo \"$NAME\"";

/// Where an event comes from in a case.
enum Input {
    /// A message body, turned into `data` as AMQP and NATS do.
    Body(Vec<u8>),
    /// `data.name`, the field the template reads.
    Name(Value),
    /// The whole event as JSON, as `spate render --event` and `spate trigger` read it.
    Whole(Value),
    /// An event with this id and `data.name: plain`.
    Id(&'static str),
}

/// What must happen.
enum Expect {
    /// Renders; `data.name` renders to this argument (None: whatever it renders to, as one
    /// argument).
    Safe(Option<String>),
    /// Refused with a reason containing this text.
    Refused(&'static str),
}

struct HostileEvent {
    name: &'static str,
    input: Input,
    expect: Expect,
}

fn hostile(name: &'static str, input: Input, expect: Expect) -> HostileEvent {
    HostileEvent {
        name,
        input,
        expect,
    }
}

fn text(value: &str) -> Input {
    Input::Name(Value::String(value.to_string()))
}

fn same() -> Expect {
    Expect::Safe(None)
}

fn body_with_name(name: &str) -> Vec<u8> {
    json!({"name": name}).to_string().into_bytes()
}

fn hostile_events() -> Vec<HostileEvent> {
    let ten_mb = "x".repeat(10 * 1024 * 1024);
    vec![
        // Bodies as brokers deliver them.
        hostile(
            "invalid JSON body",
            Input::Body(br#"{"name": "#.to_vec()),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
        hostile(
            "binary body",
            Input::Body(vec![0, 159, 146, 150, 255, 254]),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
        hostile(
            "a JSON body with invalid UTF-8 in a string",
            Input::Body(b"{\"name\": \"caf\xe9\"}".to_vec()),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
        hostile(
            "a 10 MB body",
            Input::Body(body_with_name(&ten_mb)),
            Expect::Refused("more than a ConfigMap holds"),
        ),
        hostile(
            "a 1 MB body",
            Input::Body(body_with_name(&"y".repeat(1024 * 1024))),
            Expect::Refused("more than a ConfigMap holds"),
        ),
        hostile(
            "a 100 KB body travels as a file",
            Input::Body(body_with_name(&"z".repeat(100 * 1024))),
            Expect::Safe(Some("z".repeat(100 * 1024))),
        ),
        hostile(
            "a body nested 10,000 deep",
            Input::Body(
                format!(
                    "{{\"name\": \"deep\", \"x\": {}}}",
                    nested("[", "]", 10_000, "")
                )
                .into_bytes(),
            ),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
        hostile(
            "a body nested 100 deep",
            Input::Body(
                format!(
                    "{{\"name\": \"deep\", \"x\": {}}}",
                    nested("{\"a\": ", "}", 100, "1")
                )
                .into_bytes(),
            ),
            Expect::Safe(Some("deep".to_string())),
        ),
        hostile(
            "an empty body",
            Input::Body(Vec::new()),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
        hostile(
            "a body that is YAML, not JSON",
            Input::Body(b"name: x\nprivileged: true\n".to_vec()),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
        // Values that try to become something else.
        hostile(
            "a path with ../",
            text("../../etc/passwd"),
            Expect::Safe(Some("../../etc/passwd".into())),
        ),
        hostile(
            "a shell command",
            text(";rm -rf /"),
            Expect::Safe(Some(";rm -rf /".into())),
        ),
        hostile(
            "a command substitution",
            text("$(reboot)"),
            Expect::Safe(Some("$(reboot)".into())),
        ),
        hostile("backticks", text("`id`"), Expect::Safe(Some("`id`".into()))),
        hostile(
            "an argument-splitting value",
            text("a.jpg --output /etc/shadow"),
            Expect::Safe(Some("a.jpg --output /etc/shadow".into())),
        ),
        hostile(
            "newlines",
            text("line one\nline two\r\n"),
            Expect::Safe(Some("line one\nline two\r\n".into())),
        ),
        hostile(
            "a YAML field injection",
            text("x\n  privileged: true"),
            Expect::Safe(Some("x\n  privileged: true".into())),
        ),
        hostile(
            "a YAML document injection",
            text("x\n---\nkind: Secret\nmetadata: {name: stolen}"),
            Expect::Safe(Some(
                "x\n---\nkind: Secret\nmetadata: {name: stolen}".into(),
            )),
        ),
        hostile(
            "a YAML list injection",
            text("x\n- --privileged"),
            Expect::Safe(Some("x\n- --privileged".into())),
        ),
        hostile(
            "a YAML flow injection",
            text("x\", privileged: true, y: \""),
            Expect::Safe(Some("x\", privileged: true, y: \"".into())),
        ),
        hostile(
            "a JSON injection",
            text("\", \"securityContext\": {\"privileged\": true}, \"x\": \""),
            Expect::Safe(Some(
                "\", \"securityContext\": {\"privileged\": true}, \"x\": \"".into(),
            )),
        ),
        hostile(
            "a template injection",
            text("{{ pipeline.name }}{% for x in range(9) %}{% endfor %}"),
            Expect::Safe(Some(
                "{{ pipeline.name }}{% for x in range(9) %}{% endfor %}".into(),
            )),
        ),
        hostile(
            "YAML anchors and tags",
            text("&a !!binary *a"),
            Expect::Safe(Some("&a !!binary *a".into())),
        ),
        hostile(
            "unicode",
            text("thümbnail-日本語-🚀"),
            Expect::Safe(Some("thümbnail-日本語-🚀".into())),
        ),
        hostile(
            "a right-to-left override and zero-width characters",
            text("a\u{202e}gpj.exe\u{200b}"),
            Expect::Safe(Some("a\u{202e}gpj.exe\u{200b}".into())),
        ),
        hostile(
            "a NUL character",
            text("a\0b"),
            Expect::Safe(Some("a\0b".into())),
        ),
        hostile(
            "a 10,000-character value",
            text(&"v".repeat(10_000)),
            Expect::Safe(Some("v".repeat(10_000))),
        ),
        hostile(
            "a label-breaking value",
            text("-_.a/b=c,d!"),
            Expect::Safe(Some("-_.a/b=c,d!".into())),
        ),
        // Values of other types.
        hostile(
            "a number",
            Input::Name(json!(42)),
            Expect::Safe(Some("42".into())),
        ),
        hostile("a boolean", Input::Name(json!(true)), same()),
        hostile("null", Input::Name(Value::Null), same()),
        hostile(
            "a list stays one argument",
            Input::Name(json!(["--privileged", "a"])),
            same(),
        ),
        hostile(
            "an object stays one argument",
            Input::Name(json!({"privileged": true})),
            same(),
        ),
        // Ids.
        hostile("an id with ../", Input::Id("../../etc/passwd"), same()),
        hostile("an id with a shell command", Input::Id(";rm -rf /"), same()),
        hostile("an id with newlines", Input::Id("a\nb\r\nc"), same()),
        hostile("a unicode id", Input::Id("événement-🚀"), same()),
        hostile(
            "an id that looks like a template",
            Input::Id("{{ event.data }}"),
            same(),
        ),
        hostile(
            "an id with a YAML injection",
            Input::Id("x\n  privileged: true"),
            same(),
        ),
        // Events that are not events.
        hostile(
            "an event that is a list",
            Input::Whole(json!([{"id": "a"}])),
            Expect::Refused("must be a JSON object"),
        ),
        hostile(
            "an event without an id",
            Input::Whole(json!({"data": {"name": "x"}})),
            Expect::Refused("needs an `id`"),
        ),
        hostile(
            "an event whose id is a number",
            Input::Whole(json!({"id": 7, "data": {"name": "x"}})),
            Expect::Refused("must be a non-empty string"),
        ),
        hostile(
            "an event with an empty id",
            Input::Whole(json!({"id": "", "data": {"name": "x"}})),
            Expect::Refused("must be a non-empty string"),
        ),
        hostile(
            "an event without data",
            Input::Whole(json!({"id": "a"})),
            Expect::Refused("no field of `event` named `data`"),
        ),
        hostile(
            "data that is a string",
            Input::Whole(json!({"id": "a", "data": "name"})),
            Expect::Refused("no field of `event.data` named `name`"),
        ),
    ]
}

/// The event a case describes, or the reason it is refused before rendering.
fn event_of(input: &Input) -> Result<Event, String> {
    let with_data = |id: &str, data: Value| {
        let mut fields = Map::new();
        fields.insert("data".to_string(), data);
        Event::new(id, fields).map_err(|e| e.to_string())
    };
    match input {
        Input::Body(body) => {
            let mut fields = Map::new();
            spate_sources::payload::insert_body(&mut fields, body);
            Event::new("body-1", fields).map_err(|e| e.to_string())
        }
        Input::Name(value) => with_data("name-1", json!({ "name": value })),
        Input::Id(id) => with_data(id, json!({"name": "plain"})),
        Input::Whole(value) => Event::from_json(value.clone()).map_err(|e| e.to_string()),
    }
}

/// Every path to a node of `value` (`a.b[0]`), leaves included: the Job's shape.
fn shape(value: &Value, path: String, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                shape(item, format!("{path}.{key}"), out);
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                shape(item, format!("{path}[{index}]"), out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

fn keys(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                out.push(key.clone());
                keys(item, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| keys(item, out)),
        _ => {}
    }
}

/// The Job's shape, less where the event travels (env, or a mounted file when it is large).
fn job_shape(job: &Value) -> BTreeSet<String> {
    let mut job = job.clone();
    let pod = &mut job["spec"]["template"]["spec"];
    if let Some(pod) = pod.as_object_mut() {
        pod.remove("volumes");
    }
    for container in pod["containers"].as_array_mut().into_iter().flatten() {
        if let Some(container) = container.as_object_mut() {
            container.remove("volumeMounts");
        }
        if let Some(env) = container["env"].as_array_mut() {
            env.retain(|var| {
                !var["name"]
                    .as_str()
                    .is_some_and(|name| name.starts_with("SPATE_EVENT"))
            });
        }
    }
    let mut out = BTreeSet::new();
    shape(&job, String::new(), &mut out);
    out
}

fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && (value.is_empty()
            || (value.starts_with(|c: char| c.is_ascii_alphanumeric())
                && value.ends_with(|c: char| c.is_ascii_alphanumeric())))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|var| var["name"] == name)?["value"]
        .as_str()
}

/// Checks a rendered Job against the benign one; returns what is wrong.
fn check_safe(
    job: &Value,
    baseline: &Value,
    event: &Event,
    expected: &Option<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if job_shape(job) != job_shape(baseline) {
        let (a, b) = (job_shape(job), job_shape(baseline));
        problems.push(format!(
            "the Job's shape changed: added {:?}, removed {:?}",
            a.difference(&b).take(5).collect::<Vec<_>>(),
            b.difference(&a).take(5).collect::<Vec<_>>()
        ));
    }
    let containers = job["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let base_containers = &baseline["spec"]["template"]["spec"]["containers"];
    for (index, container) in containers.iter().enumerate() {
        if container["command"] != base_containers[index]["command"] {
            problems.push(format!(
                "container {index}'s command changed: {}",
                container["command"]
            ));
        }
        if container["securityContext"] != base_containers[index]["securityContext"] {
            problems.push(format!(
                "container {index}'s securityContext changed: {}",
                container["securityContext"]
            ));
        }
    }
    let work = &containers[0];
    let args = work["args"].as_array().cloned().unwrap_or_default();
    if args.len() != 3 || args[0] != "--name" {
        problems.push(format!("the arguments changed: {args:?}"));
    }
    if args.get(2).and_then(Value::as_str) != Some(&format!("--id={}", event.id())) {
        problems.push(format!("the id argument is {:?}", args.get(2)));
    }
    let rendered_name = args.get(1).and_then(Value::as_str).unwrap_or_default();
    if let Some(expected) = expected
        && rendered_name != expected
    {
        problems.push(format!(
            "the value was altered: {:?} became {:?}",
            truncate(expected),
            truncate(rendered_name)
        ));
    }
    for container in &containers {
        if env_value(container, "NAME") != Some(rendered_name) {
            problems.push(format!(
                "{}'s NAME is not the rendered value",
                container["name"]
            ));
        }
        if env_value(container, "SPATE_EVENT_ID") != Some(event.id()) {
            problems.push(format!(
                "{}'s SPATE_EVENT_ID is not the id",
                container["name"]
            ));
        }
    }
    if containers[1]["command"] != json!(["/bin/sh", "-c", SCRIPT]) {
        problems.push(format!("the script changed: {}", containers[1]["command"]));
    }
    // The value is never a key, anywhere in the Job.
    let mut all_keys = Vec::new();
    keys(job, &mut all_keys);
    if !rendered_name.is_empty()
        && let Some(key) = all_keys
            .iter()
            .find(|key| key.as_str() == rendered_name || key.contains("privileged"))
    {
        problems.push(format!("a key came from the event: {key:?}"));
    }
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    if !(name.len() <= 52
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        problems.push(format!("the Job name is not a DNS label: {name:?}"));
    }
    for labels in [
        &job["metadata"]["labels"],
        &job["spec"]["template"]["metadata"]["labels"],
    ] {
        for (key, value) in labels.as_object().into_iter().flatten() {
            if !value.as_str().is_some_and(is_label_value) {
                problems.push(format!("label {key} is not a label value: {value}"));
            }
        }
    }
    let ids = job["metadata"]["annotations"]["spate.dev/event-ids"]
        .as_str()
        .and_then(|text| serde_json::from_str::<Value>(text).ok());
    if ids != Some(json!([event.id()])) {
        problems.push(format!("the event-ids annotation is {ids:?}"));
    }
    problems
}

fn truncate(text: &str) -> String {
    text.chars().take(60).collect()
}

#[test]
fn hostile_events_render_as_data_or_are_refused_with_a_reason() {
    let loaded = load_str(EVENT_PIPELINE, "hostile.yaml")
        .unwrap_or_else(|e| panic!("{e:#?}"))
        .remove(0);
    let render = |event: &Event| {
        render_job(
            &loaded.pipeline,
            &loaded.template,
            &loaded.values,
            std::slice::from_ref(event),
        )
    };
    let benign = event_of(&text("plain")).unwrap();
    let baseline = serde_json::to_value(render(&benign).unwrap().job).unwrap();
    assert_eq!(
        baseline["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["--name", "plain", "--id=name-1"])
    );

    let cases = hostile_events();
    assert!(cases.len() >= 40, "{} event cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let outcome = event_of(&case.input).and_then(|event| {
            render(&event)
                .map(|rendered| (event, rendered))
                .map_err(|error| error.to_string())
        });
        match (outcome, &case.expect) {
            (Ok((event, rendered)), Expect::Safe(expected)) => {
                let job = serde_json::to_value(&rendered.job).unwrap();
                let problems = check_safe(&job, &baseline, &event, expected);
                if !problems.is_empty() {
                    failures.push(format!("{}:\n  {}", case.name, problems.join("\n  ")));
                }
                // A large event travels as a file; the file holds the event as JSON data.
                if let Some(input) = &rendered.input {
                    let file = input.data.as_ref().and_then(|d| d.get("event.json"));
                    let parsed = file.and_then(|text| serde_json::from_str::<Value>(text).ok());
                    if parsed != Some(event.to_json()) {
                        failures.push(format!("{}: the event file is not the event", case.name));
                    }
                } else {
                    let container = &job["spec"]["template"]["spec"]["containers"][0];
                    let parsed = env_value(container, "SPATE_EVENT")
                        .and_then(|text| serde_json::from_str::<Value>(text).ok());
                    if parsed != Some(event.to_json()) {
                        failures.push(format!("{}: SPATE_EVENT is not the event", case.name));
                    }
                }
            }
            (Ok(_), Expect::Refused(reason)) => failures.push(format!(
                "{}: rendered, but should be refused with \"{reason}\"",
                case.name
            )),
            (Err(reason), Expect::Refused(expected)) => {
                if !reason.contains(expected) {
                    failures.push(format!(
                        "{}: refused with \"{}\", expected \"{expected}\"",
                        case.name,
                        truncate(&reason)
                    ));
                }
                if reason.len() > 2048 {
                    failures.push(format!(
                        "{}: a {}-byte reason echoes the event",
                        case.name,
                        reason.len()
                    ));
                }
            }
            (Err(reason), Expect::Safe(_)) => failures.push(format!(
                "{}: refused with \"{}\", should render",
                case.name,
                truncate(&reason)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// `spate render` with an event that is not JSON, too large, or nested too deep: a clear
/// error and a non-zero exit, never a panic.
#[test]
fn spate_render_refuses_malformed_events_clearly() {
    let pipeline = corpus_file("hostile.yaml", || EVENT_PIPELINE.as_bytes().to_vec());
    let big = corpus_file("big-event.json", || {
        json!({"id": "big", "data": {"name": "x".repeat(10 * 1024 * 1024)}})
            .to_string()
            .into_bytes()
    });
    let deep = corpus_file("deep-event.json", || {
        format!(
            "{{\"id\": \"d\", \"data\": {{\"name\": {}}}}}",
            nested("[", "]", 10_000, "")
        )
        .into_bytes()
    });
    let binary = corpus_file("binary-event.json", || vec![0xff, 0xfe, 0, 1, 2]);
    let cases: Vec<(&str, String, &str)> = vec![
        ("unclosed JSON", "{\"id\": ".to_string(), "not valid JSON"),
        ("not JSON at all", "id: a".to_string(), "not valid JSON"),
        ("a list", "[1, 2]".to_string(), "must be a JSON object"),
        (
            "a 10 MB event",
            format!("@{}", big.display()),
            "more than a ConfigMap holds",
        ),
        (
            "an event nested 10,000 deep",
            format!("@{}", deep.display()),
            "not valid JSON",
        ),
        (
            "a binary event file",
            format!("@{}", binary.display()),
            "cannot read",
        ),
    ];
    let mut failures = Vec::new();
    for (name, event, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_spate"))
            .args(["render", "-f"])
            .arg(&pipeline)
            .args(["--event", &event])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let head: String = stderr.chars().take(400).collect();
        let refused = output.status.code().is_some_and(|code| code != 0);
        if !refused || !stderr.contains(expected) || stderr.contains("panicked") {
            failures.push(format!(
                "{name}: exit {:?}, expected \"{expected}\", got: {head}",
                output.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
