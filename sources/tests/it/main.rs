//! The sources' integration tests against the real brokers, one binary. `amqp_restart.rs` stays
//! a binary of its own: `rabbitmqctl stop_app` would cut every other test's connection.

mod amqp;
mod broker_restarts;
mod cron;
mod kafka;
#[path = "../support/kafka.rs"]
mod kafka_broker;
mod mqtt;
mod nats;
mod nats_restart;
mod object_store;
mod object_store_notifications;
mod object_store_outage;
mod object_store_sqs;
#[path = "../support/ports.rs"]
mod ports;
mod redis_streams;
mod webhook;
mod webhook_abuse;
