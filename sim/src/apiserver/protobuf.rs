//! Decoding of the Kubernetes protobuf wire format for the built-in types kubectl sends that
//! way.
//!
//! kubectl's typed clients (`kubectl create configmap|secret|namespace|serviceaccount|job`)
//! encode request bodies as `application/vnd.kubernetes.protobuf` and, unlike for CBOR, never
//! fall back to JSON. The envelope is the magic `k8s\0` followed by a `runtime.Unknown`
//! (type meta, raw object bytes); the object bytes are decoded here against a schema of the
//! fields those commands use. Non-pointer scalars at their zero value are dropped, as Go's
//! `omitempty` JSON encoding would; a non-zero field the schema does not know is refused
//! (`415`) rather than silently lost.

use serde_json::{Map, Value, json};

use super::error::ApiError;

/// The four bytes every Kubernetes protobuf body starts with.
const MAGIC: &[u8] = b"k8s\0";

/// How one field is decoded.
#[derive(Clone, Copy)]
enum Kind {
    /// A string.
    Str,
    /// A pointer integer or boolean: kept even when zero.
    OptInt,
    OptBool,
    /// A plain boolean: dropped when false.
    Bool,
    /// A nested message.
    Msg(&'static str),
    /// `map<string, string>`.
    MapStr,
    /// `map<string, bytes>`, base64 in JSON.
    MapBytes,
    /// `map<string, Quantity>`.
    MapQuantity,
    /// `metav1.Time`, dropped: the server owns timestamps on create.
    Time,
}

struct Field {
    number: u64,
    name: &'static str,
    kind: Kind,
    repeated: bool,
}

const fn one(number: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        number,
        name,
        kind,
        repeated: false,
    }
}

const fn many(number: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        number,
        name,
        kind,
        repeated: true,
    }
}

fn schema(message: &str) -> &'static [Field] {
    use Kind::*;
    match message {
        "ObjectMeta" => {
            const FIELDS: &[Field] = &[
                one(1, "name", Str),
                one(2, "generateName", Str),
                one(3, "namespace", Str),
                one(5, "uid", Str),
                one(6, "resourceVersion", Str),
                one(8, "creationTimestamp", Time),
                one(11, "labels", MapStr),
                one(12, "annotations", MapStr),
                many(13, "ownerReferences", Msg("OwnerReference")),
                many(14, "finalizers", Str),
            ];
            FIELDS
        }
        "OwnerReference" => {
            const FIELDS: &[Field] = &[
                one(1, "kind", Str),
                one(3, "name", Str),
                one(4, "uid", Str),
                one(5, "apiVersion", Str),
                one(6, "controller", OptBool),
                one(7, "blockOwnerDeletion", OptBool),
            ];
            FIELDS
        }
        "ConfigMap" => {
            const FIELDS: &[Field] = &[
                one(1, "metadata", Msg("ObjectMeta")),
                one(2, "data", MapStr),
                one(3, "binaryData", MapBytes),
                one(4, "immutable", OptBool),
            ];
            FIELDS
        }
        "Secret" => {
            const FIELDS: &[Field] = &[
                one(1, "metadata", Msg("ObjectMeta")),
                one(2, "data", MapBytes),
                one(3, "type", Str),
                one(4, "stringData", MapStr),
                one(5, "immutable", OptBool),
            ];
            FIELDS
        }
        "Namespace" => {
            const FIELDS: &[Field] = &[
                one(1, "metadata", Msg("ObjectMeta")),
                one(2, "spec", Msg("NamespaceSpec")),
            ];
            FIELDS
        }
        "NamespaceSpec" => {
            const FIELDS: &[Field] = &[many(1, "finalizers", Str)];
            FIELDS
        }
        "ServiceAccount" => {
            const FIELDS: &[Field] = &[
                one(1, "metadata", Msg("ObjectMeta")),
                many(3, "imagePullSecrets", Msg("LocalObjectReference")),
                one(4, "automountServiceAccountToken", OptBool),
            ];
            FIELDS
        }
        "LocalObjectReference" => {
            const FIELDS: &[Field] = &[one(1, "name", Str)];
            FIELDS
        }
        "Job" => {
            const FIELDS: &[Field] = &[
                one(1, "metadata", Msg("ObjectMeta")),
                one(2, "spec", Msg("JobSpec")),
            ];
            FIELDS
        }
        "JobSpec" => {
            const FIELDS: &[Field] = &[
                one(1, "parallelism", OptInt),
                one(2, "completions", OptInt),
                one(3, "activeDeadlineSeconds", OptInt),
                one(4, "selector", Msg("LabelSelector")),
                one(5, "manualSelector", OptBool),
                one(6, "template", Msg("PodTemplateSpec")),
                one(7, "backoffLimit", OptInt),
                one(8, "ttlSecondsAfterFinished", OptInt),
                one(9, "completionMode", Str),
                one(10, "suspend", OptBool),
            ];
            FIELDS
        }
        "LabelSelector" => {
            const FIELDS: &[Field] = &[one(1, "matchLabels", MapStr)];
            FIELDS
        }
        "PodTemplateSpec" => {
            const FIELDS: &[Field] = &[
                one(1, "metadata", Msg("ObjectMeta")),
                one(2, "spec", Msg("PodSpec")),
            ];
            FIELDS
        }
        "PodSpec" => {
            const FIELDS: &[Field] = &[
                many(2, "containers", Msg("Container")),
                one(3, "restartPolicy", Str),
                one(4, "terminationGracePeriodSeconds", OptInt),
                one(5, "activeDeadlineSeconds", OptInt),
                one(6, "dnsPolicy", Str),
                one(7, "nodeSelector", MapStr),
                one(8, "serviceAccountName", Str),
                one(10, "nodeName", Str),
                one(19, "schedulerName", Str),
                many(20, "initContainers", Msg("Container")),
                many(22, "tolerations", Msg("Toleration")),
            ];
            FIELDS
        }
        "Container" => {
            const FIELDS: &[Field] = &[
                one(1, "name", Str),
                one(2, "image", Str),
                many(3, "command", Str),
                many(4, "args", Str),
                one(5, "workingDir", Str),
                many(7, "env", Msg("EnvVar")),
                one(8, "resources", Msg("ResourceRequirements")),
                one(13, "terminationMessagePath", Str),
                one(14, "imagePullPolicy", Str),
                one(16, "stdin", Bool),
                one(17, "stdinOnce", Bool),
                one(18, "tty", Bool),
                one(20, "terminationMessagePolicy", Str),
            ];
            FIELDS
        }
        "EnvVar" => {
            const FIELDS: &[Field] = &[one(1, "name", Str), one(2, "value", Str)];
            FIELDS
        }
        "ResourceRequirements" => {
            const FIELDS: &[Field] = &[
                one(1, "limits", MapQuantity),
                one(2, "requests", MapQuantity),
            ];
            FIELDS
        }
        "Toleration" => {
            const FIELDS: &[Field] = &[
                one(1, "key", Str),
                one(2, "operator", Str),
                one(3, "value", Str),
                one(4, "effect", Str),
                one(5, "tolerationSeconds", OptInt),
            ];
            FIELDS
        }
        _ => &[],
    }
}

/// Kinds whose protobuf form can be decoded.
fn top_level(kind: &str) -> bool {
    matches!(
        kind,
        "ConfigMap" | "Secret" | "Namespace" | "ServiceAccount" | "Job"
    )
}

fn unsupported(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        415,
        "UnsupportedMediaType",
        format!("the simulator cannot decode this protobuf body ({what}); send application/json"),
    )
}

/// A protobuf reader over one message.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// One field as read off the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| unsupported("truncated varint"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(unsupported("varint too long"))
    }

    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, ApiError> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            2 => {
                let len =
                    usize::try_from(self.varint()?).map_err(|_| unsupported("length overflow"))?;
                let end = self
                    .at
                    .checked_add(len)
                    .filter(|end| *end <= self.bytes.len())
                    .ok_or_else(|| unsupported("truncated field"))?;
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Wire::Bytes(slice)
            }
            1 => self.skip(8)?,
            5 => self.skip(4)?,
            other => return Err(unsupported(format!("wire type {other}"))),
        };
        Ok(Some((key >> 3, wire)))
    }

    fn skip(&mut self, n: usize) -> Result<Wire<'a>, ApiError> {
        if self.at + n > self.bytes.len() {
            return Err(unsupported("truncated fixed field"));
        }
        self.at += n;
        Ok(Wire::Fixed)
    }
}

/// Whether bytes hold nothing but zero values (an empty message, or one of empty fields).
/// Nesting deeper than any Kubernetes object is treated as data, bounding recursion on
/// hostile input.
const MAX_ZERO_DEPTH: usize = 16;

fn is_zero_message(bytes: &[u8], depth: usize) -> bool {
    if depth > MAX_ZERO_DEPTH {
        return false;
    }
    let mut reader = Reader::new(bytes);
    loop {
        match reader.next() {
            Ok(None) => return true,
            Ok(Some((_, Wire::Varint(0)))) => {}
            Ok(Some((_, Wire::Bytes(inner))))
                if inner.is_empty() || is_zero_message(inner, depth + 1) => {}
            _ => return false,
        }
    }
}

fn text(bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| unsupported("invalid UTF-8"))
}

fn map_entry(bytes: &[u8], kind: Kind) -> Result<(String, Value), ApiError> {
    let mut reader = Reader::new(bytes);
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            (1, Wire::Bytes(b)) => key = text(b)?,
            (2, Wire::Bytes(b)) => {
                value = match kind {
                    Kind::MapBytes => json!(data_encoding::BASE64.encode(b)),
                    Kind::MapQuantity => {
                        let quantity = decode_message(b, "Quantity")?;
                        quantity.get("string").cloned().unwrap_or_else(|| json!(""))
                    }
                    _ => json!(text(b)?),
                }
            }
            _ => return Err(unsupported("malformed map entry")),
        }
    }
    Ok((key, value))
}

fn decode_value(field: &Field, wire: Wire<'_>) -> Result<Option<Value>, ApiError> {
    let value = match (field.kind, wire) {
        (Kind::Str, Wire::Bytes(b)) => {
            let s = text(b)?;
            if s.is_empty() && !field.repeated {
                return Ok(None);
            }
            json!(s)
        }
        (Kind::OptInt, Wire::Varint(v)) => json!(v as i64),
        (Kind::OptBool, Wire::Varint(v)) => json!(v != 0),
        (Kind::Bool, Wire::Varint(0)) => return Ok(None),
        (Kind::Bool, Wire::Varint(_)) => json!(true),
        (Kind::Msg(name), Wire::Bytes(b)) => decode_message(b, name)?,
        (Kind::Time, _) => return Ok(None),
        _ => {
            return Err(unsupported(format!(
                "unexpected encoding of field {}",
                field.name
            )));
        }
    };
    Ok(Some(value))
}

fn decode_message(bytes: &[u8], message: &str) -> Result<Value, ApiError> {
    if message == "Quantity" {
        let mut reader = Reader::new(bytes);
        let mut out = Map::new();
        while let Some((number, wire)) = reader.next()? {
            if let (1, Wire::Bytes(b)) = (number, wire) {
                out.insert("string".into(), json!(text(b)?));
            }
        }
        return Ok(Value::Object(out));
    }
    let fields = schema(message);
    let mut out = Map::new();
    let mut reader = Reader::new(bytes);
    while let Some((number, wire)) = reader.next()? {
        let Some(field) = fields.iter().find(|f| f.number == number) else {
            let zero = match &wire {
                Wire::Varint(v) => *v == 0,
                Wire::Bytes(b) => b.is_empty() || is_zero_message(b, 0),
                Wire::Fixed => false,
            };
            if zero {
                continue;
            }
            return Err(unsupported(format!("field {number} of {message}")));
        };
        match field.kind {
            Kind::MapStr | Kind::MapBytes | Kind::MapQuantity => {
                let Wire::Bytes(entry) = wire else {
                    return Err(unsupported("malformed map"));
                };
                let (key, value) = map_entry(entry, field.kind)?;
                let map = out.entry(field.name).or_insert_with(|| json!({}));
                if let Some(map) = map.as_object_mut() {
                    map.insert(key, value);
                }
            }
            _ => {
                let Some(value) = decode_value(field, wire)? else {
                    continue;
                };
                if field.repeated {
                    if let Some(list) = out
                        .entry(field.name)
                        .or_insert_with(|| json!([]))
                        .as_array_mut()
                    {
                        list.push(value);
                    }
                } else {
                    out.insert(field.name.to_owned(), value);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a `application/vnd.kubernetes.protobuf` request body into its JSON form.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| unsupported("missing k8s protobuf magic"))?;
    let mut reader = Reader::new(envelope);
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while let Some((number, wire)) = reader.next()? {
        match (number, wire) {
            (1, Wire::Bytes(type_meta)) => {
                let mut meta = Reader::new(type_meta);
                while let Some((n, w)) = meta.next()? {
                    match (n, w) {
                        (1, Wire::Bytes(b)) => api_version = text(b)?,
                        (2, Wire::Bytes(b)) => kind = text(b)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(bytes)) => raw = bytes,
            _ => {}
        }
    }
    if !top_level(&kind) {
        return Err(unsupported(format!("kind {kind:?}")));
    }
    let mut object = decode_message(raw, &kind)?;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![
            u8::try_from(number << 3 | 2).unwrap(),
            u8::try_from(payload.len()).unwrap(),
        ];
        out.extend_from_slice(payload);
        out
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [field(1, api_version.as_bytes()), field(2, kind.as_bytes())].concat();
        [MAGIC.to_vec(), field(1, &type_meta), field(2, raw)].concat()
    }

    #[test]
    fn decodes_a_configmap_as_kubectl_create_sends_it() {
        let meta = [
            field(1, b"settings"),
            field(3, b""),
            field(8, &[]),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let data = [field(1, b"mode"), field(2, b"fast")].concat();
        let raw = [field(1, &meta), field(2, &data)].concat();
        let object = decode(&envelope("v1", "ConfigMap", &raw)).unwrap();
        assert_eq!(
            object,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "settings", "labels": {"app": "web"}},
                "data": {"mode": "fast"},
            })
        );
    }

    #[test]
    fn unknown_non_zero_fields_and_kinds_are_refused() {
        let raw = [field(1, &field(1, b"x")), field(9, b"surprise")].concat();
        assert_eq!(
            decode(&envelope("v1", "ConfigMap", &raw)).unwrap_err().code,
            415
        );
        assert_eq!(decode(&envelope("v1", "Pod", &[])).unwrap_err().code, 415);
        assert_eq!(decode(b"{}").unwrap_err().code, 415);
        let zero_status = [field(1, &field(1, b"x")), field(3, &field(1, b""))].concat();
        assert!(decode(&envelope("v1", "Namespace", &zero_status)).is_ok());
    }
}
