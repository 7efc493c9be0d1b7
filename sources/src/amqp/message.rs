//! An AMQP message as a Spate event: its stable id and its fields.
//!
//! The id names the Job, so it must be the same every time the broker redelivers the message.
//! A publisher-set `message_id` is used as is. Without one, the id is a SHA-256 of the queue,
//! exchange, routing key and body: stable across redeliveries, at the price that two
//! byte-identical messages published to the same place are one Job (the second finds the
//! first's Job and is acknowledged without running). Publishers that need both to run set
//! distinct `message_id`s.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

use crate::payload::insert_body;
use crate::{Event, EventError};

/// Where a message was delivered from.
pub struct Origin<'a> {
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// The event for one delivered message.
pub fn to_event(
    origin: &Origin<'_>,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Event, EventError> {
    let id = match properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().to_string(),
        _ => content_id(origin, body),
    };
    let mut fields = Map::new();
    fields.insert("subject".to_string(), Value::from(origin.queue));
    fields.insert("routingKey".to_string(), Value::from(origin.routing_key));
    fields.insert("exchange".to_string(), Value::from(origin.exchange));
    let headers = properties
        .headers()
        .as_ref()
        .map(table_to_json)
        .unwrap_or_default();
    fields.insert("headers".to_string(), Value::Object(headers));
    insert_body(&mut fields, body);
    Event::new(id, fields)
}

/// SHA-256 over length-prefixed parts, so `("ab", "c")` and `("a", "bc")` differ.
fn content_id(origin: &Origin<'_>, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [
        origin.queue.as_bytes(),
        origin.exchange.as_bytes(),
        origin.routing_key.as_bytes(),
        body,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    data_encoding::HEXLOWER.encode(&hasher.finalize())
}

fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_string(), value_to_json(value)))
        .collect()
}

fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(n) => float(f64::from(*n)),
        AMQPValue::Double(n) => float(*n),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        // Header strings are text in practice; a stray invalid byte must not lose the header.
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(bytes) => Value::from(data_encoding::BASE64.encode(bytes.as_slice())),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(value_to_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(table_to_json(table)),
        AMQPValue::Void => Value::Null,
    }
}

/// JSON has no NaN or infinity: those become `null`.
fn float(n: f64) -> Value {
    Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};
    use serde_json::json;

    const ORIGIN: Origin<'static> = Origin {
        queue: "uploads",
        exchange: "media",
        routing_key: "uploads.jpg",
    };

    #[test]
    fn message_id_is_the_id_when_the_publisher_sets_one() {
        let properties = BasicProperties::default().with_message_id("order-7".into());
        let event = to_event(&ORIGIN, &properties, br#"{"n":1}"#).unwrap();
        assert_eq!(event.id(), "order-7");
        assert_eq!(
            event.to_json(),
            json!({"id": "order-7", "subject": "uploads", "routingKey": "uploads.jpg",
                   "exchange": "media", "headers": {}, "data": {"n": 1}})
        );
    }

    #[test]
    fn without_message_id_the_id_is_stable_and_content_derived() {
        let none = BasicProperties::default();
        let first = to_event(&ORIGIN, &none, b"a.jpg").unwrap();
        let again = to_event(&ORIGIN, &none, b"a.jpg").unwrap();
        let other = to_event(&ORIGIN, &none, b"b.jpg").unwrap();
        assert_eq!(first.id(), again.id());
        assert_ne!(first.id(), other.id());
        assert_eq!(first.id().len(), 64);
        let empty_id = BasicProperties::default().with_message_id("".into());
        assert_eq!(
            to_event(&ORIGIN, &empty_id, b"a.jpg").unwrap().id(),
            first.id()
        );
    }

    #[test]
    fn headers_become_json() {
        let mut nested = FieldTable::default();
        nested.insert("deep".into(), AMQPValue::Boolean(true));
        let mut headers = FieldTable::default();
        headers.insert(
            "tenant".into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        headers.insert("attempt".into(), AMQPValue::LongInt(3));
        headers.insert("ratio".into(), AMQPValue::Double(f64::NAN));
        headers.insert(
            "tags".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::ShortShortUInt(1)])),
        );
        headers.insert("nested".into(), AMQPValue::FieldTable(nested));
        let properties = BasicProperties::default().with_headers(headers);
        let event = to_event(&ORIGIN, &properties, &[0xff]).unwrap();
        assert_eq!(
            event.fields()["headers"],
            json!({"tenant": "acme", "attempt": 3, "ratio": null, "tags": [1], "nested": {"deep": true}})
        );
        assert_eq!(event.fields()["dataEncoding"], "base64");
    }
}
