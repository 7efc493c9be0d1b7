//! Spate turns events into Kubernetes Jobs on the virtual node.
//!
//! The flow: sources (`spate-sources`) yield events; a [`pipeline`] says how to render each
//! into a Job ([`render`], with names from [`naming`] and ready templates from [`templates`]);
//! the engine creates the Jobs and the tracker reports results to sinks (`spate-sinks`).

pub mod cli;
pub mod engine;
pub mod metrics;
pub mod naming;
pub mod pipeline;
pub mod pod_security;
pub mod render;
pub mod templates;
