//! YAML documents as JSON values that remember where each node was written.
//!
//! Pipeline errors must name the field *and* the line a person has to fix. serde stops at the
//! first error and forgets positions, so documents are first read into a plain
//! [`serde_json::Value`] together with a [`Locations`] index from field path to line and
//! column. Schema checks, serde and semantic checks then report paths, and the index turns
//! each path into a position.
//!
//! Scalars are resolved with the YAML 1.2 core schema, as Kubernetes does: unquoted `true`,
//! `42`, `1.5` and `null` are typed; anything quoted stays a string.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use serde_saphyr::granit_parser::{Event, Marker, Parser, ScalarStyle, Span};

/// A 1-based line and column in a YAML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    fn from_marker(marker: &Marker) -> Self {
        Location {
            line: marker.line(),
            column: marker.col() + 1,
        }
    }
}

/// Where each field of one document was written, by path (`spec.fanout.batchSize`,
/// `spec.jobTemplate.spec.template.spec.containers[0].image`).
#[derive(Debug, Clone, Default)]
pub struct Locations {
    /// Position of a node's value.
    values: HashMap<String, Location>,
    /// Position of a mapping key, which is where an unknown field should be pointed at.
    keys: HashMap<String, Location>,
    document: Option<Location>,
}

impl Locations {
    /// The best position for an error at `path`: its key if it has one, else its value, else
    /// the nearest enclosing node that was written (a missing field points at its parent).
    pub fn find(&self, path: &str) -> Option<Location> {
        let mut current = path;
        loop {
            if let Some(location) = self.keys.get(current).or_else(|| self.values.get(current)) {
                return Some(*location);
            }
            match parent_path(current) {
                Some(parent) => current = parent,
                None => return self.values.get("").copied().or(self.document),
            }
        }
    }
}

/// `a.b[2].c` → `a.b[2]` → `a.b` → `a` → `` (the document root).
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Appends a mapping key to a path; keys that are not identifiers are quoted so that a path
/// such as `metadata.labels["app.kubernetes.io/name"]` stays unambiguous.
pub fn join_key(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{}]", Value::String(key.to_string())),
    }
}

pub fn join_index(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct LocatedDocument {
    pub value: Value,
    pub locations: Locations,
}

/// A file that is not well-formed YAML.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub message: String,
    pub location: Location,
}

/// Reads every document of a YAML stream. Empty documents (a stray `---`) are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<LocatedDocument>, SyntaxError> {
    let mut builder = Builder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|error| SyntaxError {
            message: error.info(),
            location: Location::from_marker(error.marker()),
        })?;
        builder.feed(event, span)?;
    }
    Ok(builder.documents)
}

/// An open collection while events stream in.
enum Frame {
    Mapping {
        map: Map<String, Value>,
        path: String,
        anchor: usize,
        /// `Builder::nodes` once this collection was opened: its size, aliases expanded, is
        /// what was counted since.
        first_node: usize,
        /// The key read and waiting for its value.
        pending_key: Option<String>,
    },
    Sequence {
        items: Vec<Value>,
        path: String,
        anchor: usize,
        first_node: usize,
    },
}

/// The most nodes aliases may add to one document. Each alias is a copy of its anchor, so
/// nine anchors of nine aliases each (a "billion laughs" file of a few hundred bytes) would
/// otherwise expand to hundreds of millions of values and exhaust memory.
pub const MAX_ALIAS_EXPANSION: usize = 100_000;

#[derive(Default)]
struct Builder {
    documents: Vec<LocatedDocument>,
    stack: Vec<Frame>,
    locations: Locations,
    /// Anchored values with their size in nodes.
    anchors: HashMap<usize, (Value, usize)>,
    root: Option<Value>,
    /// Nodes read in the current document, aliases expanded.
    nodes: usize,
    /// Nodes added by aliases in the current document.
    expanded: usize,
}

impl Builder {
    fn feed(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let start = Location::from_marker(&span.start);
        match event {
            Event::DocumentStart(..) => {
                self.locations = Locations {
                    document: Some(start),
                    ..Locations::default()
                };
                self.anchors.clear();
                self.root = None;
                self.nodes = 0;
                self.expanded = 0;
            }
            Event::DocumentEnd => {
                if let Some(value) = self.root.take().filter(|value| !value.is_null()) {
                    self.documents.push(LocatedDocument {
                        value,
                        locations: std::mem::take(&mut self.locations),
                    });
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let tag_suffix = tag.as_ref().map(|tag| tag.suffix().to_string());
                let value = resolve_scalar(&text, style, tag_suffix.as_deref());
                if self.take_key_if_expected(&text, start) {
                    return Ok(());
                }
                self.nodes += 1;
                self.complete(value, anchor, 1, start)?;
            }
            Event::Alias(id) => {
                let size = self
                    .anchors
                    .get(&id)
                    .map(|(_, size)| *size)
                    .ok_or_else(|| SyntaxError {
                        message: "alias refers to an unknown anchor".to_string(),
                        location: start,
                    })?;
                self.expanded = self.expanded.saturating_add(size);
                if self.expanded > MAX_ALIAS_EXPANSION {
                    return Err(SyntaxError {
                        message: format!(
                            "aliases expand to more than {MAX_ALIAS_EXPANSION} values (a YAML \
                             bomb?); write the values out instead of nesting aliases"
                        ),
                        location: start,
                    });
                }
                let value = self.anchors.get(&id).map(|(value, _)| value.clone());
                let value = value.unwrap_or_default();
                if let Some(key) = value.as_str().map(str::to_string)
                    && self.take_key_if_expected(&key, start)
                {
                    return Ok(());
                }
                self.nodes = self.nodes.saturating_add(size);
                self.complete(value, 0, size, start)?;
            }
            Event::MappingStart(_, anchor, _) => {
                let path = self.child_path(start)?;
                self.locations.values.insert(path.clone(), start);
                self.nodes += 1;
                self.stack.push(Frame::Mapping {
                    map: Map::new(),
                    path,
                    anchor,
                    first_node: self.nodes,
                    pending_key: None,
                });
            }
            Event::SequenceStart(_, anchor, _) => {
                let path = self.child_path(start)?;
                self.locations.values.insert(path.clone(), start);
                self.nodes += 1;
                self.stack.push(Frame::Sequence {
                    items: Vec::new(),
                    path,
                    anchor,
                    first_node: self.nodes,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let (value, anchor, first_node) = match self.stack.pop() {
                    Some(Frame::Mapping {
                        map,
                        anchor,
                        first_node,
                        ..
                    }) => (Value::Object(map), anchor, first_node),
                    Some(Frame::Sequence {
                        items,
                        anchor,
                        first_node,
                        ..
                    }) => (Value::Array(items), anchor, first_node),
                    None => return Ok(()),
                };
                let size = self.nodes - first_node + 1;
                self.attach(value, anchor, size, start)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// In a mapping waiting for a key, a scalar is that key.
    fn take_key_if_expected(&mut self, text: &str, start: Location) -> bool {
        if let Some(Frame::Mapping {
            pending_key, path, ..
        }) = self.stack.last_mut()
            && pending_key.is_none()
        {
            self.locations.keys.insert(join_key(path, text), start);
            *pending_key = Some(text.to_string());
            return true;
        }
        false
    }

    /// The path the next value will have, checking that mappings only have scalar keys.
    fn child_path(&self, start: Location) -> Result<String, SyntaxError> {
        Ok(match self.stack.last() {
            None => String::new(),
            Some(Frame::Sequence { items, path, .. }) => join_index(path, items.len()),
            Some(Frame::Mapping {
                pending_key: Some(key),
                path,
                ..
            }) => join_key(path, key),
            Some(Frame::Mapping {
                pending_key: None, ..
            }) => {
                return Err(SyntaxError {
                    message: "mapping keys must be plain strings, not collections".to_string(),
                    location: start,
                });
            }
        })
    }

    fn complete(
        &mut self,
        value: Value,
        anchor: usize,
        size: usize,
        start: Location,
    ) -> Result<(), SyntaxError> {
        let path = self.child_path(start)?;
        self.locations.values.insert(path, start);
        self.attach(value, anchor, size, start)
    }

    fn attach(
        &mut self,
        value: Value,
        anchor: usize,
        size: usize,
        start: Location,
    ) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.insert(anchor, (value.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Sequence { items, .. }) => items.push(value),
            Some(Frame::Mapping {
                map, pending_key, ..
            }) => {
                let Some(key) = pending_key.take() else {
                    return Err(SyntaxError {
                        message: "mapping key without a value".to_string(),
                        location: start,
                    });
                };
                if map.contains_key(&key) {
                    return Err(SyntaxError {
                        message: format!("duplicate key `{key}`"),
                        location: start,
                    });
                }
                map.insert(key, value);
            }
        }
        Ok(())
    }
}

/// YAML 1.2 core-schema resolution of a scalar.
fn resolve_scalar(text: &str, style: ScalarStyle, tag_suffix: Option<&str>) -> Value {
    match tag_suffix {
        Some("str") => return Value::String(text.to_string()),
        Some("int") | Some("float") | Some("bool") | Some("null") | None => {}
        Some(_) => return Value::String(text.to_string()),
    }
    if style != ScalarStyle::Plain && tag_suffix.is_none() {
        return Value::String(text.to_string());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(number) = parse_integer(text) {
        return Value::Number(number);
    }
    if looks_like_float(text)
        && let Ok(float) = text.parse::<f64>()
        && let Some(number) = Number::from_f64(float)
    {
        return Value::Number(number);
    }
    Value::String(text.to_string())
}

fn parse_integer(text: &str) -> Option<Number> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(octal) = digits.strip_prefix("0o") {
        (8, octal)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(digits, radix).ok()?;
    let value = if negative { -magnitude } else { magnitude };
    if let Ok(small) = i64::try_from(value) {
        Some(Number::from(small))
    } else {
        u64::try_from(value).ok().map(Number::from)
    }
}

/// Only the core schema's float forms: `1.5`, `-2e3`, `.5`; not `1_000` or `0b1`.
fn looks_like_float(text: &str) -> bool {
    let body = text.trim_start_matches(['-', '+']);
    !body.is_empty()
        && body.chars().any(|c| c.is_ascii_digit())
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resolves_scalars_as_kubernetes_does() {
        let docs = parse_documents(
            "a: 1\nb: '1'\nc: true\nd: \"true\"\ne: 1.5\nf: null\ng: 0x10\nh: 1.2.3\ni: ~\n",
        )
        .unwrap();
        assert_eq!(
            docs[0].value,
            json!({"a": 1, "b": "1", "c": true, "d": "true", "e": 1.5, "f": null, "g": 16, "h": "1.2.3", "i": null})
        );
    }

    #[test]
    fn remembers_where_keys_and_values_were_written() {
        let text = "spec:\n  fanout:\n    batchSize: 0\n  list:\n    - name: a\n    - name: b\n";
        let docs = parse_documents(text).unwrap();
        let at = |path: &str| docs[0].locations.find(path).unwrap();
        assert_eq!(at("spec.fanout.batchSize"), Location { line: 3, column: 5 });
        assert_eq!(at("spec.list[1].name"), Location { line: 6, column: 7 });
        // A field that is absent points at its parent.
        assert_eq!(at("spec.fanout.maxWait"), Location { line: 2, column: 3 });
    }

    #[test]
    fn keys_that_are_not_identifiers_are_quoted_in_paths() {
        let docs = parse_documents("labels:\n  app.kubernetes.io/name: x\n").unwrap();
        let path = join_key("labels", "app.kubernetes.io/name");
        assert_eq!(path, "labels[\"app.kubernetes.io/name\"]");
        assert_eq!(docs[0].locations.find(&path).unwrap().line, 2);
    }

    #[test]
    fn reads_every_document_and_skips_empty_ones() {
        let docs = parse_documents("a: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].locations.find("b").unwrap().line, 4);
    }

    #[test]
    fn resolves_anchors_and_aliases() {
        let docs = parse_documents("base: &b {x: 1}\ncopy: *b\n").unwrap();
        assert_eq!(docs[0].value["copy"], json!({"x": 1}));
    }

    #[test]
    fn syntax_errors_carry_their_position() {
        let error = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(error.location.line >= 1, "{error:?}");
        let duplicate = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(duplicate.location.line, 2);
        assert!(duplicate.message.contains("duplicate key `a`"));
    }
}
