//! A pool's status from the plan and what executing it gave (pure).

use crate::api::ByteQuantity;
use crate::api::condition::{self, Time, set_condition};
use crate::api::storage_pool::{PoolNodeStatus, PoolState, StoragePool, StoragePoolStatus};
use crate::controller::Note;

use super::execute::Executed;
use super::plan::{Hold, Plan};

/// The pool's status and the Events for nodes whose state changed.
pub fn status(
    pool: &StoragePool,
    plan: &Plan,
    executed: &Executed,
    now: Time,
) -> (StoragePoolStatus, Vec<Note>) {
    let gen_ = pool.metadata.generation;
    let prior = pool.status.clone().unwrap_or_default();
    let name = crate::controller::describe(pool);
    let mut nodes = Vec::new();
    let mut notes = Vec::new();
    for node in &plan.targets {
        let mut ns = PoolNodeStatus {
            node: node.clone(),
            state: PoolState::Unknown,
            capacity: None,
            allocation: None,
            available: None,
            message: None,
        };
        match (plan.holds.get(node), executed.get(node)) {
            (Some(Hold::NoSuchNode), _) => {
                ns.state = PoolState::Pending;
                ns.message = Some(format!(
                    "there is no KvmNode {node:?}; create it or fix spec.nodeName"
                ));
            }
            (Some(Hold::Unreachable(why)), _) => {
                ns.state = PoolState::Unknown;
                ns.message = Some(format!("cannot read the node: {why}"));
            }
            (Some(Hold::Conflict), _) => {
                ns.state = PoolState::Conflict;
                ns.message = Some("a pool with this name and another definition already exists on the node; it was left alone. Rename ours with spec.poolName, or set spec.overwriteExisting: true to redefine it (its volumes stay)".into());
            }
            (None, Some(Ok(Some(info)))) => {
                ns.state = if info.running {
                    PoolState::Running
                } else {
                    PoolState::Inactive
                };
                ns.capacity = Some(ByteQuantity::from_bytes(info.capacity));
                ns.allocation = Some(ByteQuantity::from_bytes(info.allocation));
                ns.available = Some(ByteQuantity::from_bytes(info.available));
            }
            (None, Some(Err(e))) => {
                ns.state = PoolState::Failed;
                ns.message = Some(format!("{e}"));
            }
            (None, _) => {
                ns.state = PoolState::Pending;
            }
        }
        let before = prior
            .nodes
            .iter()
            .find(|p| p.node == *node)
            .map(|p| p.state);
        if before != Some(ns.state) {
            match ns.state {
                PoolState::Running => notes.push(Note::normal(
                    "PoolRunning",
                    "EnsurePool",
                    format!("{name} runs on KvmNode {node}"),
                )),
                PoolState::Failed | PoolState::Conflict => notes.push(Note::warning(
                    if ns.state == PoolState::Failed {
                        "PoolFailed"
                    } else {
                        "PoolConflict"
                    },
                    "EnsurePool",
                    format!(
                        "{name} on KvmNode {node}: {}",
                        ns.message.clone().unwrap_or_default()
                    ),
                )),
                _ => {}
            }
        }
        nodes.push(ns);
    }
    let running = nodes
        .iter()
        .filter(|n| n.state == PoolState::Running)
        .count();
    let total = nodes.len();
    let mut st = StoragePoolStatus {
        observed_generation: gen_,
        ready_nodes: Some(format!("{running}/{total}")),
        nodes,
        conditions: prior.conditions,
    };
    let (ready, reason, msg) = if total == 0 {
        (
            false,
            "NoMatchingNode",
            "no KvmNode matches spec.nodeSelector; label nodes or change the selector".to_string(),
        )
    } else if running == total {
        (
            true,
            "Running",
            format!("running on {running} of {total} node(s)"),
        )
    } else {
        let bad: Vec<String> = st
            .nodes
            .iter()
            .filter(|n| n.state != PoolState::Running)
            .map(|n| format!("{}: {:?}", n.node, n.state))
            .collect();
        let reason = if st.nodes.iter().any(|n| n.state == PoolState::Conflict) {
            "Conflict"
        } else if st.nodes.iter().any(|n| n.state == PoolState::Failed) {
            "Failed"
        } else {
            "Pending"
        };
        (
            false,
            reason,
            format!(
                "running on {running} of {total} node(s); not on {}",
                bad.join(", ")
            ),
        )
    };
    set_condition(
        &mut st.conditions,
        condition::condition(condition::READY, ready, reason, msg, gen_, now),
    );
    (st, notes)
}
