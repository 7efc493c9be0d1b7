//! The simulator driven by real `kubectl` and the `kube` crate, one binary.

mod kubectl_api;
mod kubectl_workloads;
mod relist;
