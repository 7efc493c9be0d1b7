//! A NATS message as a Spate event.
//!
//! JetStream messages are identified by `stream:sequence`, the stream's own name for the
//! message, so every redelivery finds the same Job. Core NATS messages are never redelivered;
//! they take the publisher's `Nats-Msg-Id` header when there is one (so a publisher retrying
//! a send does not start two Jobs) and a random id otherwise, so two identical messages are
//! two Jobs, as two publishes mean on a core subject.

use async_nats::HeaderMap;
use serde_json::{Map, Value};

use crate::payload::insert_body;
use crate::{Event, EventError};

const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Where a JetStream message sits in its stream.
pub struct StreamPosition<'a> {
    pub stream: &'a str,
    pub sequence: u64,
}

/// The event for one message; `position` for JetStream messages.
pub fn to_event(
    subject: &str,
    headers: Option<&HeaderMap>,
    body: &[u8],
    position: Option<StreamPosition<'_>>,
) -> Result<Event, EventError> {
    let mut fields = Map::new();
    fields.insert("subject".to_string(), Value::from(subject));
    fields.insert(
        "headers".to_string(),
        Value::Object(headers.map(headers_to_json).unwrap_or_default()),
    );
    insert_body(&mut fields, body);
    let id = match position {
        Some(position) => {
            fields.insert("stream".to_string(), Value::from(position.stream));
            fields.insert("sequence".to_string(), Value::from(position.sequence));
            format!("{}:{}", position.stream, position.sequence)
        }
        None => headers
            .and_then(|headers| headers.get(MSG_ID_HEADER))
            .map(|value| value.as_str().to_string())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    Event::new(id, fields)
}

/// A header with one value is a string; a repeated header is a list of its values.
fn headers_to_json(headers: &HeaderMap) -> Map<String, Value> {
    headers
        .iter()
        .map(|(name, values)| {
            let mut values: Vec<Value> = values.iter().map(|v| Value::from(v.as_str())).collect();
            let value = if values.len() == 1 {
                values.remove(0)
            } else {
                Value::Array(values)
            };
            (name.to_string(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jetstream_messages_are_named_by_stream_and_sequence() {
        let mut headers = HeaderMap::new();
        headers.insert("tenant", "acme");
        headers.append("tag", "a");
        headers.append("tag", "b");
        let position = StreamPosition {
            stream: "UPLOADS",
            sequence: 42,
        };
        let event = to_event(
            "uploads.jpg",
            Some(&headers),
            br#"{"key":"a.jpg"}"#,
            Some(position),
        )
        .unwrap();
        assert_eq!(event.id(), "UPLOADS:42");
        assert_eq!(
            event.to_json(),
            json!({"id": "UPLOADS:42", "subject": "uploads.jpg", "stream": "UPLOADS", "sequence": 42,
                   "headers": {"tenant": "acme", "tag": ["a", "b"]}, "data": {"key": "a.jpg"}})
        );
    }

    #[test]
    fn core_messages_use_the_publishers_message_id_or_a_fresh_one() {
        let mut headers = HeaderMap::new();
        headers.insert(MSG_ID_HEADER, "order-7");
        assert_eq!(
            to_event("a", Some(&headers), b"x", None).unwrap().id(),
            "order-7"
        );
        let first = to_event("a", None, b"x", None).unwrap();
        let second = to_event("a", None, b"x", None).unwrap();
        assert_ne!(first.id(), second.id());
        assert_eq!(first.fields()["data"], json!("x"));
    }
}
