//! How a message body becomes the event's `data`, the same way for AMQP and NATS.
//!
//! Templates want structure when there is some: a JSON body is parsed, any other UTF-8 body is
//! a string, and a binary body is base64 with `dataEncoding: "base64"` beside it so a worker
//! knows to decode it. Nothing a publisher sends can make this fail.

use serde_json::{Map, Value};

/// Adds `data` (and `dataEncoding` for binary bodies) to `fields`.
pub fn insert_body(fields: &mut Map<String, Value>, body: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        fields.insert("data".to_string(), value);
        return;
    }
    match std::str::from_utf8(body) {
        Ok(text) => {
            fields.insert("data".to_string(), Value::String(text.to_string()));
        }
        Err(_) => {
            fields.insert(
                "data".to_string(),
                Value::String(data_encoding::BASE64.encode(body)),
            );
            fields.insert(
                "dataEncoding".to_string(),
                Value::String("base64".to_string()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(bytes: &[u8]) -> Value {
        let mut fields = Map::new();
        insert_body(&mut fields, bytes);
        Value::Object(fields)
    }

    #[test]
    fn json_is_parsed_text_is_kept_binary_is_base64() {
        assert_eq!(
            body(br#"{"key":"a.jpg"}"#),
            json!({"data": {"key": "a.jpg"}})
        );
        assert_eq!(body(b"42"), json!({"data": 42}));
        assert_eq!(body(b"resize a.jpg"), json!({"data": "resize a.jpg"}));
        assert_eq!(body(b""), json!({"data": ""}));
        assert_eq!(
            body(&[0xff, 0x00, 0xfe]),
            json!({"data": "/wD+", "dataEncoding": "base64"})
        );
    }
}
