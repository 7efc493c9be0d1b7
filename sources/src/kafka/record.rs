//! A Kafka record as a Spate event.
//!
//! The event:
//!
//! - `id`: `<topic>:<partition>:<offset>`, e.g. `uploads:3:1042`. A record's place never
//!   changes, so every redelivery names the same Job.
//! - `topic`, `partition`, `offset`: where the record is.
//! - `key`: the record's key as text (base64, with `keyEncoding: base64`, when not UTF-8);
//!   absent for a record without a key.
//! - `headers`: each header as text (base64 when not UTF-8, its name then listed in
//!   `base64Headers`; `null` for a header without a value).
//! - `timestamp`: RFC 3339, when the record has one.
//! - `data`: the value, parsed when it is JSON (a string otherwise, base64 with
//!   `dataEncoding: base64` when binary); `null` for a tombstone.

use rdkafka::message::{Headers, Message};
use serde_json::{Map, Value};

use crate::payload::insert_body;
use crate::{Event, EventError};

/// A record, copied out of the client's buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Milliseconds since the epoch.
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn from_message(message: &impl Message) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key.to_string(), header.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: message.timestamp().to_millis(),
        }
    }
}

/// The event for one record.
pub fn to_event(record: &Record) -> Result<Event, EventError> {
    let mut fields = Map::new();
    fields.insert("topic".to_string(), Value::from(record.topic.as_str()));
    fields.insert("partition".to_string(), Value::from(record.partition));
    fields.insert("offset".to_string(), Value::from(record.offset));
    if let Some(key) = &record.key {
        let (text, binary) = text_or_base64(key);
        fields.insert("key".to_string(), Value::String(text));
        if binary {
            fields.insert("keyEncoding".to_string(), Value::from("base64"));
        }
    }
    let mut headers = Map::new();
    let mut binary_headers = Vec::new();
    for (name, value) in &record.headers {
        let value = match value {
            None => Value::Null,
            Some(bytes) => {
                let (text, binary) = text_or_base64(bytes);
                if binary {
                    binary_headers.push(Value::from(name.as_str()));
                }
                Value::String(text)
            }
        };
        headers.insert(name.clone(), value);
    }
    fields.insert("headers".to_string(), Value::Object(headers));
    if !binary_headers.is_empty() {
        fields.insert("base64Headers".to_string(), Value::Array(binary_headers));
    }
    if let Some(timestamp) = record.timestamp.and_then(rfc3339) {
        fields.insert("timestamp".to_string(), Value::String(timestamp));
    }
    match &record.value {
        Some(value) => insert_body(&mut fields, value),
        None => {
            fields.insert("data".to_string(), Value::Null);
        }
    }
    Event::new(
        format!("{}:{}:{}", record.topic, record.partition, record.offset),
        fields,
    )
}

fn text_or_base64(bytes: &[u8]) -> (String, bool) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), false),
        Err(_) => (data_encoding::BASE64.encode(bytes), true),
    }
}

/// Milliseconds since the epoch as RFC 3339 in UTC; `None` when out of range.
fn rfc3339(millis: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Record {
        Record {
            topic: "uploads".into(),
            partition: 3,
            offset: 1042,
            key: Some(b"a.jpg".to_vec()),
            value: Some(br#"{"bucket":"b","key":"a.jpg"}"#.to_vec()),
            headers: vec![("tenant".into(), Some(b"acme".to_vec()))],
            timestamp: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn a_record_becomes_an_event_named_by_its_place() {
        let event = to_event(&record()).unwrap();
        assert_eq!(event.id(), "uploads:3:1042");
        assert_eq!(
            event.to_json(),
            json!({"id": "uploads:3:1042", "topic": "uploads", "partition": 3, "offset": 1042,
                   "key": "a.jpg", "headers": {"tenant": "acme"},
                   "timestamp": "2023-11-14T22:13:20.123Z",
                   "data": {"bucket": "b", "key": "a.jpg"}})
        );
    }

    #[test]
    fn binary_keys_headers_and_values_are_base64_and_tombstones_null() {
        let mut record = record();
        record.key = Some(vec![0xff]);
        record.value = None;
        record.headers = vec![("bin".into(), Some(vec![0xfe])), ("empty".into(), None)];
        record.timestamp = None;
        let event = to_event(&record).unwrap();
        let fields = event.fields();
        assert_eq!(fields["key"], "/w==");
        assert_eq!(fields["keyEncoding"], "base64");
        assert_eq!(fields["headers"], json!({"bin": "/g==", "empty": null}));
        assert_eq!(fields["base64Headers"], json!(["bin"]));
        assert_eq!(fields["data"], Value::Null);
        assert!(!fields.contains_key("timestamp"));
        record.value = Some(vec![0x00, 0xff]);
        record.key = None;
        let event = to_event(&record).unwrap();
        assert_eq!(event.fields()["dataEncoding"], "base64");
        assert!(!event.fields().contains_key("key"));
    }
}
