//! An MQTT message as a Spate event: its stable id and its fields.
//!
//! The id names the Job, so it must be the same every time the broker redelivers the message.
//! MQTT carries no message id across sessions (packet ids are reused as soon as a message is
//! acknowledged), so the id comes from the message itself: a JSON object payload with a
//! non-empty string `id` field uses it as is; any other payload gets a SHA-256 of the topic and
//! the payload. Two byte-identical messages on the same topic are then one Job (the second
//! finds the first's Job and is acknowledged without running); publishers that need both to
//! run put distinct `id`s in their payloads.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::payload::insert_body;
use crate::{Event, EventError};

/// The event for one delivered message.
pub fn to_event(topic: &str, payload: &[u8], retain: bool) -> Result<Event, EventError> {
    let mut fields = Map::new();
    fields.insert("topic".to_string(), Value::from(topic));
    fields.insert("subject".to_string(), Value::from(topic));
    fields.insert("retain".to_string(), Value::from(retain));
    insert_body(&mut fields, payload);
    let id = match fields.get("data").and_then(|data| data.get("id")) {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => content_id(topic, payload),
    };
    Event::new(id, fields)
}

/// SHA-256 over length-prefixed parts, so `("a/b", "c")` and `("a/", "bc")` differ.
fn content_id(topic: &str, payload: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [topic.as_bytes(), payload] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    data_encoding::HEXLOWER.encode(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_json_id_is_the_id() {
        let event = to_event("uploads/a", br#"{"id":"order-7","n":1}"#, false).unwrap();
        assert_eq!(event.id(), "order-7");
        assert_eq!(
            event.to_json(),
            json!({"id": "order-7", "topic": "uploads/a", "subject": "uploads/a",
                   "retain": false, "data": {"id": "order-7", "n": 1}})
        );
    }

    #[test]
    fn without_an_id_the_id_is_stable_and_content_derived() {
        let first = to_event("uploads/a", b"a.jpg", false).unwrap();
        let again = to_event("uploads/a", b"a.jpg", true).unwrap();
        let other_payload = to_event("uploads/a", b"b.jpg", false).unwrap();
        let other_topic = to_event("uploads/b", b"a.jpg", false).unwrap();
        assert_eq!(first.id(), again.id());
        assert_ne!(first.id(), other_payload.id());
        assert_ne!(first.id(), other_topic.id());
        assert_eq!(first.id().len(), 64);
        // An `id` that is not a non-empty string does not count.
        for payload in [&br#"{"id":7}"#[..], br#"{"id":""}"#, br#"["id"]"#] {
            assert_eq!(
                to_event("t", payload, false).unwrap().id(),
                content_id("t", payload)
            );
        }
    }

    #[test]
    fn binary_payloads_are_base64() {
        let event = to_event("t", &[0xff, 0xfe], false).unwrap();
        assert_eq!(event.fields()["data"], "//4=");
        assert_eq!(event.fields()["dataEncoding"], "base64");
    }
}
