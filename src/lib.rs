//! kvm-operator: a Kubernetes operator for KVM virtual machines on external hypervisor hosts.
//!
//! Module map (see DESIGN.md in the shared design notes and README.md):
//! - [`api`]: the four custom resources, data only.
//! - [`hypervisor`]: the only code that talks to libvirt and SSH.
//! - [`manifest`]: reading the YAML users apply, into our types.

pub mod api;
pub mod hypervisor;
pub mod manifest;
