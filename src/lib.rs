//! kvm-operator: a Kubernetes operator for KVM virtual machines on external hypervisor hosts.
//!
//! Module map:
//! - [`api`] — the four custom resources, data only.
//! - [`controller`] — the controllers: observe, plan (pure), execute, status.
//! - [`hypervisor`] — the only code that talks to libvirt and SSH.
//! - [`placement`] — choosing the node for a new VM (pure), with an explanation.
//! - [`manifest`] — reading the YAML users apply, into our types.
//! - [`http`] — health endpoints.
//! - [`cli`] — the commands behind the binary's subcommands.
//! - [`telemetry`] — logging.

pub mod api;
pub mod cli;
pub mod controller;
pub mod http;
pub mod hypervisor;
pub mod manifest;
pub mod metrics;
pub mod placement;
pub mod telemetry;
