//! Carrying out a pool plan, node by node; each step is idempotent.

use std::collections::BTreeMap;

use crate::hypervisor::storage::PoolInfo;
use crate::hypervisor::{HvError, Hypervisor};

use super::plan::Step;

/// Result per node: the pool's figures after the step (None after a removal), or the error.
pub type Executed = BTreeMap<String, Result<Option<PoolInfo>, HvError>>;

pub async fn execute(hv: &impl Hypervisor, steps: &[Step]) -> Executed {
    let runs = steps.iter().cloned().map(|step| async move {
        match step {
            Step::Ensure {
                node,
                def,
                autostart,
            } => {
                let r = hv
                    .call(&node, "ensure pool", move |c| {
                        c.ensure_pool(&def, autostart)
                    })
                    .await
                    .map(Some);
                (node, r)
            }
            Step::Replace {
                node,
                def,
                autostart,
            } => {
                let r = hv
                    .call(&node, "replace pool", move |c| {
                        c.remove_pool(&def.name)?;
                        c.ensure_pool(&def, autostart)
                    })
                    .await
                    .map(Some);
                (node, r)
            }
            Step::Remove { node, pool } => {
                let r = hv
                    .call(&node, "remove pool", move |c| c.remove_pool(&pool))
                    .await
                    .map(|()| None);
                (node, r)
            }
        }
    });
    futures::future::join_all(runs).await.into_iter().collect()
}
