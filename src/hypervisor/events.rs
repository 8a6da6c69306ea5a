//! Domain lifecycle events of one node, kept flowing across reconnects.
//!
//! A libvirt event subscription lives on one connection; when the connection cache replaces a
//! broken connection, the subscription is dead. [`follow`] checks every `check_every` which
//! connection the cache holds and subscribes again on a new one. Events that happened while no
//! subscription existed are lost, so each new subscription first sends a [`resync`] marker: the
//! receiver re-reads that node's domains.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::Hypervisor;
use super::ffi::{DomainEvent, EventSubscription, LifecycleKind};

/// The marker sent after (re)subscribing: `domain` is empty and `kind` is `Other`.
pub fn resync(node: &str) -> DomainEvent {
    DomainEvent {
        node: node.to_string(),
        domain: String::new(),
        uuid: String::new(),
        kind: LifecycleKind::Other,
        detail: -1,
    }
}

/// True for the marker [`resync`] builds.
pub fn is_resync(e: &DomainEvent) -> bool {
    e.domain.is_empty() && e.kind == LifecycleKind::Other && e.detail == -1
}

/// Forwards `node`'s domain events to `tx` until `tx` closes (or the task is aborted).
pub async fn follow<H: Hypervisor>(
    hv: Arc<H>,
    node: String,
    tx: UnboundedSender<DomainEvent>,
    check_every: Duration,
) {
    let mut current: Option<(u64, EventSubscription)> = None;
    while !tx.is_closed() {
        let id = hv.call_events(&node, "event check", |c| Ok(c.id())).await;
        let subscribed = current.as_ref().map(|(i, _)| *i);
        match id {
            Ok(id) if subscribed == Some(id) => {}
            Ok(_) => {
                release(current.take()).await;
                let tx2 = tx.clone();
                match hv
                    .call_events(&node, "subscribe to domain events", move |c| {
                        Ok((c.id(), c.subscribe_events(tx2)?))
                    })
                    .await
                {
                    Ok(sub) => {
                        tracing::debug!(node, "following domain events");
                        current = Some(sub);
                        let _ = tx.send(resync(&node));
                    }
                    Err(e) => {
                        tracing::debug!(node, reason = e.reason(), error = %e, "cannot follow domain events yet");
                    }
                }
            }
            Err(_) => release(current.take()).await,
        }
        tokio::time::sleep(check_every).await;
    }
    release(current.take()).await;
}

/// Deregistering is a libvirt call (an RPC on remote connections): never on the async runtime.
async fn release(sub: Option<(u64, EventSubscription)>) {
    if let Some(s) = sub {
        let _ = tokio::task::spawn_blocking(move || drop(s)).await;
    }
}
