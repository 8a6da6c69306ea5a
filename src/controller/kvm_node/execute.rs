//! Carrying out a node plan: the resync hints go to the VM controller.

use tokio::sync::mpsc::UnboundedSender;

use crate::hypervisor::ffi::DomainEvent;

use super::plan::Plan;

/// A hint for the VM controller: "look at `namespace/name` again" (not a libvirt event).
pub fn resync_hint(node: &str, namespace: &str, name: &str) -> DomainEvent {
    DomainEvent {
        node: node.to_string(),
        domain: format!("{namespace}/{name}"),
        uuid: String::new(),
        kind: crate::hypervisor::ffi::LifecycleKind::Other,
        detail: RESYNC_HINT,
    }
}

/// `detail` of a [`resync_hint`].
pub const RESYNC_HINT: i32 = -2;

/// Sends the plan's resync hints; returns how many were sent.
pub fn execute(node: &str, plan: &Plan, tx: &UnboundedSender<DomainEvent>) -> usize {
    plan.resync
        .iter()
        .filter(|(ns, name)| tx.send(resync_hint(node, ns, name)).is_ok())
        .count()
}
