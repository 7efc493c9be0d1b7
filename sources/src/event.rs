//! The event: what a source saw, as the Job template sees it.

use serde_json::{Map, Value};

/// One thing that happened at a source, to become (part of) a Job.
///
/// Templates see an event as a JSON object: `id` and every field of the payload, reachable as
/// `event.<field>`. An object-store event carries at least `bucket`, `key`, `size`, `etag` and
/// `url`; an AMQP or NATS event its `subject` (routing key or subject), `headers` and `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    id: String,
    fields: Map<String, Value>,
}

/// An event that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("an event must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("an event needs an `id` field: a non-empty string that identifies it at its source")]
    MissingId,
    #[error("event `id` must be a non-empty string, got {0}")]
    InvalidId(String),
}

impl Event {
    /// An event with a stable `id` (the same on every redelivery) and its other fields.
    pub fn new(id: impl Into<String>, mut fields: Map<String, Value>) -> Result<Self, EventError> {
        let id = id.into();
        if id.is_empty() {
            return Err(EventError::MissingId);
        }
        fields.insert("id".to_string(), Value::String(id.clone()));
        Ok(Event { id, fields })
    }

    /// Reads an event given as JSON, as `spate render --event` and `spate trigger` take it.
    pub fn from_json(value: Value) -> Result<Self, EventError> {
        let Value::Object(fields) = value else {
            return Err(EventError::NotAnObject(json_kind(&value)));
        };
        match fields.get("id") {
            None => Err(EventError::MissingId),
            Some(Value::String(id)) if !id.is_empty() => Event::new(id.clone(), fields),
            Some(other) => Err(EventError::InvalidId(other.to_string())),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The event as templates and pods see it, `id` included.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    pub fn to_json(&self) -> Value {
        Value::Object(self.fields.clone())
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_event_is_an_object_with_a_string_id() {
        let event = Event::from_json(json!({"id": "a-1", "key": "x.jpg"})).unwrap();
        assert_eq!(event.id(), "a-1");
        assert_eq!(event.fields()["key"], "x.jpg");
        assert_eq!(
            Event::from_json(json!({"key": 1})),
            Err(EventError::MissingId)
        );
        assert_eq!(
            Event::from_json(json!([1])),
            Err(EventError::NotAnObject("a list"))
        );
        assert!(matches!(
            Event::from_json(json!({"id": 7})),
            Err(EventError::InvalidId(_))
        ));
        assert!(matches!(
            Event::from_json(json!({"id": ""})),
            Err(EventError::InvalidId(_))
        ));
    }
}
