//! S3 event notifications (AWS, MinIO, Ceph RGW, Garage; bare, as text, or in an SNS
//! envelope) read into created objects, then each object made into its event, as the
//! objectStore source's notifications mode does for every message its transport delivers.
//! Whatever a bucket or a publisher sends must be read or rejected, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use object_store::path::Path;
use serde_json::{Map, Value};
use spate_sources::object_store::created_objects;
use spate_sources::payload::insert_body;

fuzz_target!(|data: &[u8]| {
    // AMQP and NATS hand the body over as parsed JSON when it is JSON.
    let mut fields = Map::new();
    insert_body(&mut fields, data);
    if let Some(body) = fields.get("data") {
        read(body);
    }
    // SQS hands it over as the text it is.
    if let Ok(text) = std::str::from_utf8(data) {
        read(&Value::String(text.to_string()));
    }
});

fn read(body: &Value) {
    let Ok(objects) = created_objects(body) else {
        return;
    };
    for object in objects {
        // The source parses the key as a path before presigning, then makes the event.
        let _ = Path::parse(&object.key);
        let _ = object.event(format!("s3://{}/{}", object.bucket, object.key), None);
    }
}
