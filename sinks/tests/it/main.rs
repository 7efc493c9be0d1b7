//! The sinks' integration tests against the real services, one binary. `amqp_reconnect.rs`
//! stays a binary of its own: `rabbitmqctl close_all_connections` would cut the other tests'.

mod amqp;
mod kafka;
#[path = "../../../sources/tests/support/kafka.rs"]
mod kafka_broker;
mod kubernetes_event;
mod nats;
mod object_store;
mod redis_streams;
mod webhook;
