//! Server-side printing: `meta.k8s.io/v1` `Table` responses for `kubectl get`.
//!
//! kubectl asks for tables (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`) and
//! prints the server's columns, so these mirror the columns of the real printers for the
//! built-in kinds Spate users look at, and a CRD's `additionalPrinterColumns` for custom
//! resources.

use serde_json::{Value, json};

use super::registry::ResourceInfo;

/// Whether an `Accept` header asks for a table.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .any(|media| media.contains("as=Table") && media.contains("g=meta.k8s.io"))
}

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The full object.
    Object,
}

impl IncludeObject {
    /// Parses the `includeObject` query parameter.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// How one table is rendered.
#[derive(Debug, Clone)]
pub struct TableView {
    /// The resource.
    pub info: ResourceInfo,
    /// Row objects.
    pub include: IncludeObject,
}

fn column(name: &str, kind: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": kind, "format": format, "description": "", "priority": priority})
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn or_none(text: &str) -> Value {
    json!(if text.is_empty() { "<none>" } else { text })
}

fn count_at(object: &Value, pointer: &str) -> usize {
    match object.pointer(pointer) {
        Some(Value::Object(map)) => map.len(),
        Some(Value::Array(list)) => list.len(),
        _ => 0,
    }
}

/// `kubectl`'s short human durations: `42s`, `5m3s`, `3h10m`, `2d4h`, `400d`.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 && s % 60 != 0 => format!("{m}m{}s", s % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

fn seconds_since(timestamp: &str) -> Option<i64> {
    let then: jiff::Timestamp = timestamp.parse().ok()?;
    Some(jiff::Timestamp::now().duration_since(then).as_secs())
}

fn age(object: &Value) -> String {
    seconds_since(str_at(object, "/metadata/creationTimestamp"))
        .map_or_else(|| "<unknown>".into(), human_duration)
}

/// Reads a simple JSONPath (`.spec.size`, `.status.conditions[0].type`) as a cell.
fn json_path_cell(object: &Value, path: &str) -> Value {
    let mut current = object;
    for segment in path
        .trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
    {
        let (field, index) = match segment.split_once('[') {
            Some((field, rest)) => (field, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some(next) = current.get(field) else {
            return Value::Null;
        };
        current = match index {
            Some(i) => match next.get(i) {
                Some(item) => item,
                None => return Value::Null,
            },
            None => next,
        };
    }
    current.clone()
}

fn pod_status(pod: &Value) -> String {
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array);
    for status in statuses.into_iter().flatten() {
        for state in ["waiting", "terminated"] {
            let reason = str_at(status, &format!("/state/{state}/reason"));
            if !reason.is_empty() {
                return reason.to_owned();
            }
        }
    }
    let reason = str_at(pod, "/status/reason");
    if !reason.is_empty() {
        return reason.to_owned();
    }
    let phase = str_at(pod, "/status/phase");
    if phase.is_empty() {
        "Pending".into()
    } else {
        phase.to_owned()
    }
}

fn pod_ready(pod: &Value) -> String {
    let total = count_at(pod, "/spec/containers");
    let ready = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |s| {
            s.iter()
                .filter(|c| c.get("ready") == Some(&json!(true)))
                .count()
        });
    format!("{ready}/{total}")
}

fn restarts(pod: &Value) -> i64 {
    pod.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |s| {
            s.iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum()
        })
}

fn condition_true(object: &Value, kind: &str) -> bool {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type") == Some(&json!(kind)) && c.get("status") == Some(&json!("True"))
            })
        })
}

fn job_status(job: &Value) -> &'static str {
    for (condition, shown) in [
        ("Failed", "Failed"),
        ("Complete", "Complete"),
        ("Suspended", "Suspended"),
        ("FailureTarget", "FailureTarget"),
        ("SuccessCriteriaMet", "SuccessCriteriaMet"),
    ] {
        if condition_true(job, condition) {
            return shown;
        }
    }
    if job.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else {
        "Running"
    }
}

fn job_duration(job: &Value) -> String {
    let Some(started) = seconds_since(str_at(job, "/status/startTime")) else {
        return String::new();
    };
    match seconds_since(str_at(job, "/status/completionTime")) {
        Some(completed) => human_duration(started - completed),
        None => human_duration(started),
    }
}

fn node_status(node: &Value) -> &'static str {
    let ready = condition_true(node, "Ready");
    match (
        ready,
        node.pointer("/spec/unschedulable") == Some(&json!(true)),
    ) {
        (true, false) => "Ready",
        (true, true) => "Ready,SchedulingDisabled",
        (false, _) => "NotReady",
    }
}

/// Column definitions and cells (after the name) for a resource.
fn columns_and_cells(info: &ResourceInfo, object: Option<&Value>) -> (Vec<Value>, Vec<Value>) {
    let empty = json!({});
    let o = object.unwrap_or(&empty);
    let (columns, cells): (Vec<Value>, Vec<Value>) = match (info.group.as_str(), info.kind.as_str())
    {
        ("", "Pod") => (
            vec![
                column("Ready", "string", 0),
                column("Status", "string", 0),
                column("Restarts", "string", 0),
                column("Age", "string", 0),
                column("IP", "string", 1),
                column("Node", "string", 1),
            ],
            vec![
                json!(pod_ready(o)),
                json!(pod_status(o)),
                json!(restarts(o).to_string()),
                json!(age(o)),
                or_none(str_at(o, "/status/podIP")),
                or_none(str_at(o, "/spec/nodeName")),
            ],
        ),
        ("batch", "Job") => {
            let completions = o
                .pointer("/spec/completions")
                .and_then(Value::as_i64)
                .map_or_else(|| "1".into(), |c| c.to_string());
            let succeeded = o
                .pointer("/status/succeeded")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            (
                vec![
                    column("Status", "string", 0),
                    column("Completions", "string", 0),
                    column("Duration", "string", 0),
                    column("Age", "string", 0),
                ],
                vec![
                    json!(job_status(o)),
                    json!(format!("{succeeded}/{completions}")),
                    json!(job_duration(o)),
                    json!(age(o)),
                ],
            )
        }
        ("", "Node") => (
            vec![
                column("Status", "string", 0),
                column("Roles", "string", 0),
                column("Age", "string", 0),
                column("Version", "string", 0),
            ],
            vec![
                json!(node_status(o)),
                json!("<none>"),
                json!(age(o)),
                json!(str_at(o, "/status/nodeInfo/kubeletVersion")),
            ],
        ),
        ("", "Namespace") => (
            vec![column("Status", "string", 0), column("Age", "string", 0)],
            vec![json!(str_at(o, "/status/phase")), json!(age(o))],
        ),
        ("", "ConfigMap") => (
            vec![column("Data", "string", 0), column("Age", "string", 0)],
            vec![
                json!(count_at(o, "/data") + count_at(o, "/binaryData")),
                json!(age(o)),
            ],
        ),
        ("", "Secret") => (
            vec![
                column("Type", "string", 0),
                column("Data", "string", 0),
                column("Age", "string", 0),
            ],
            vec![
                json!(str_at(o, "/type")),
                json!(count_at(o, "/data")),
                json!(age(o)),
            ],
        ),
        ("coordination.k8s.io", "Lease") => (
            vec![column("Holder", "string", 0), column("Age", "string", 0)],
            vec![json!(str_at(o, "/spec/holderIdentity")), json!(age(o))],
        ),
        (_, _) if !info.printer_columns.is_empty() => {
            let mut columns = Vec::new();
            let mut cells = Vec::new();
            for printer in &info.printer_columns {
                columns.push(column(
                    &printer.name,
                    &printer.column_type,
                    printer.priority,
                ));
                let cell = json_path_cell(o, &printer.json_path);
                cells.push(match (printer.column_type.as_str(), cell.as_str()) {
                    ("date", Some(ts)) => {
                        json!(seconds_since(ts).map_or_else(|| ts.to_owned(), human_duration))
                    }
                    _ => cell,
                });
            }
            if !info.printer_columns.iter().any(|c| c.name == "Age") {
                columns.push(column("Age", "date", 0));
                cells.push(json!(age(o)));
            }
            (columns, cells)
        }
        _ => (vec![column("Age", "string", 0)], vec![json!(age(o))]),
    };
    let mut all_columns = vec![column("Name", "string", 0)];
    all_columns.extend(columns);
    (all_columns, cells)
}

impl TableView {
    fn row(&self, object: &Value) -> Value {
        let (_, cells) = columns_and_cells(&self.info, Some(object));
        let mut all = vec![json!(str_at(object, "/metadata/name"))];
        all.extend(cells);
        let mut row = json!({"cells": all});
        match self.include {
            IncludeObject::None => {}
            IncludeObject::Object => row["object"] = object.clone(),
            IncludeObject::Metadata => {
                row["object"] = json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
                });
            }
        }
        row
    }

    /// A table of `objects` with the given list metadata.
    pub fn render<V: std::borrow::Borrow<Value>>(&self, objects: &[V], metadata: Value) -> Value {
        let (columns, _) = columns_and_cells(&self.info, None);
        json!({
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "columnDefinitions": columns,
            "rows": objects.iter().map(|o| self.row(o.borrow())).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::registry::{PrinterColumn, Registry};

    #[test]
    fn accept_headers_select_tables() {
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }

    #[test]
    fn durations_read_like_kubectl() {
        for (seconds, shown) in [
            (5, "5s"),
            (119, "119s"),
            (185, "3m5s"),
            (600, "10m"),
            (7500, "125m"),
            (12_000, "3h20m"),
            (36_000, "10h"),
            (180_000, "2d2h"),
            (864_000, "10d"),
        ] {
            assert_eq!(human_duration(seconds), shown);
        }
    }

    #[test]
    fn pods_show_readiness_and_status_and_crs_their_printer_columns() {
        let registry = Registry::with_builtins();
        let pods = TableView {
            info: (*registry.lookup("", "v1", "pods").unwrap()).clone(),
            include: IncludeObject::None,
        };
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Running", "containerStatuses": [{"ready": true, "restartCount": 2, "state": {"running": {}}}]}});
        let table = pods.render(&[pod], json!({}));
        assert_eq!(table["columnDefinitions"][2]["name"], "Status");
        assert_eq!(
            table["rows"][0]["cells"].as_array().unwrap()[..4],
            [json!("p"), json!("1/1"), json!("Running"), json!("2")]
        );
        let mut widgets = (*registry.lookup("", "v1", "configmaps").unwrap()).clone();
        widgets.group = "example.com".into();
        widgets.kind = "Widget".into();
        widgets.printer_columns = vec![
            PrinterColumn {
                name: "Size".into(),
                column_type: "integer".into(),
                json_path: ".spec.size".into(),
                priority: 0,
            },
            PrinterColumn {
                name: "Colour".into(),
                column_type: "string".into(),
                json_path: ".spec.colour".into(),
                priority: 1,
            },
        ];
        let view = TableView {
            info: widgets,
            include: IncludeObject::Metadata,
        };
        let table = view.render(
            &[json!({"metadata": {"name": "w"}, "spec": {"size": 3}})],
            json!({}),
        );
        assert_eq!(table["rows"][0]["cells"][1], 3);
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        // A wide column keeps its priority, so kubectl shows it only with `-o wide`.
        assert_eq!(table["columnDefinitions"][1]["priority"], 0);
        assert_eq!(table["columnDefinitions"][2]["name"], "Colour");
        assert_eq!(table["columnDefinitions"][2]["priority"], 1);
    }
}
