//! A pool as each of its nodes has it.

use std::collections::BTreeMap;

use crate::hypervisor::storage::{PoolInfo, PoolXml};
use crate::hypervisor::{HvError, Hypervisor};

/// The pool on one node: its definition (None when no pool has the name) and its figures.
#[derive(Clone, Debug, PartialEq)]
pub struct OnNode {
    pub definition: Option<PoolXml>,
    pub info: Option<PoolInfo>,
}

/// Per node: what is there, or why it could not be read.
pub type Observed = BTreeMap<String, Result<OnNode, HvError>>;

/// Reads libvirt pool `pool` on each of `nodes`, concurrently.
pub async fn observe(hv: &impl Hypervisor, pool: &str, nodes: &[String]) -> Observed {
    let reads = nodes.iter().map(|node| {
        let pool = pool.to_string();
        async move {
            let r = hv
                .call(node, "read pool", move |c| {
                    let definition = c.pool_definition(&pool)?;
                    let info = match definition {
                        Some(_) => Some(c.pool_info(&pool)?),
                        None => None,
                    };
                    Ok(OnNode { definition, info })
                })
                .await;
            (node.clone(), r)
        }
    });
    futures::future::join_all(reads).await.into_iter().collect()
}
