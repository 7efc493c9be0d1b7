//! Spate's own integration tests, one binary (each file once linked the whole tree
//! on its own). `chaos.rs` stays a binary of its own: it stops and restarts shared brokers.

mod bad_input;
mod chart;
mod checkpoints;
mod cli_verbs;
#[path = "../common/mod.rs"]
mod common;
mod controller;
mod crd;
mod dev;
mod engine_amqp;
mod engine_crash;
mod engine_kafka;
mod engine_mqtt;
mod engine_redis;
mod engine_sources;
mod engine_webhook_crash;
mod examples;
#[path = "../../../sources/tests/support/kafka.rs"]
mod kafka_broker;
mod kubectl_pipeline;
mod least_privilege;
mod naming_props;
mod real_cluster;
mod render;
mod secrets_in_logs;
mod tenancy;
mod validate;
mod watch;
