//! What to do with a pool on each node (pure).

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;

use crate::api::kvm_node::KvmNode;
use crate::api::storage_pool::{DeletionPolicy, StoragePool, StoragePoolSpec};
use crate::hypervisor::storage::PoolXml;

use super::observe::Observed;

/// One step on one node.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Define (when missing), build, start, set autostart, refresh.
    Ensure {
        node: String,
        def: PoolXml,
        autostart: bool,
    },
    /// The node has a different pool of that name and the spec says overwrite: stop and
    /// undefine it (volumes stay), then ensure ours.
    Replace {
        node: String,
        def: PoolXml,
        autostart: bool,
    },
    /// The node no longer matches (or the object is deleted) and the policy is Delete: stop and
    /// undefine the pool; its data stays.
    Remove { node: String, pool: String },
}

/// Why nothing is done on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The spec names a node that has no KvmNode object.
    NoSuchNode,
    /// The node could not be read.
    Unreachable(String),
    /// A pool of that name with another definition exists; overwriteExisting is false.
    Conflict,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Nodes the pool belongs on, sorted.
    pub targets: Vec<String>,
    pub steps: Vec<Step>,
    pub holds: BTreeMap<String, Hold>,
}

/// libvirt's name for the pool: spec.poolName, else the object's name.
pub fn libvirt_name(pool: &StoragePool) -> String {
    pool.spec
        .pool_name
        .clone()
        .unwrap_or_else(|| pool.name_any())
}

/// Nodes the spec selects, by name or by labels.
pub fn target_nodes(spec: &StoragePoolSpec, nodes: &[&KvmNode]) -> Vec<String> {
    let mut out: Vec<String> = match (&spec.node_name, &spec.node_selector) {
        (Some(n), _) => vec![n.clone()],
        (None, Some(sel)) => nodes
            .iter()
            .filter(|n| {
                let labels = n.labels();
                sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|n| n.name_any())
            .collect(),
        (None, None) => vec![],
    };
    out.sort();
    out.dedup();
    out
}

/// The plan for `pool`: `known` are the KvmNode objects, `observed` the targets as read.
pub fn plan(pool: &StoragePool, known: &[&KvmNode], observed: &Observed) -> Plan {
    let name = libvirt_name(pool);
    let def = PoolXml::from_spec(&name, &pool.spec);
    let targets = target_nodes(&pool.spec, known);
    let known_names: BTreeSet<String> = known.iter().map(|n| n.name_any()).collect();
    let mut p = Plan {
        targets: targets.clone(),
        ..Default::default()
    };
    for node in &targets {
        if !known_names.contains(node) {
            p.holds.insert(node.clone(), Hold::NoSuchNode);
            continue;
        }
        match observed.get(node) {
            None => {
                p.holds
                    .insert(node.clone(), Hold::Unreachable("not read yet".into()));
            }
            Some(Err(e)) => {
                p.holds
                    .insert(node.clone(), Hold::Unreachable(e.to_string()));
            }
            Some(Ok(on)) => match &on.definition {
                Some(have) if !def.same_definition(have) => {
                    if pool.spec.overwrite_existing {
                        p.steps.push(Step::Replace {
                            node: node.clone(),
                            def: def.clone(),
                            autostart: pool.spec.autostart,
                        });
                    } else {
                        p.holds.insert(node.clone(), Hold::Conflict);
                    }
                }
                // missing, or ours: ensure is idempotent and refreshes
                _ => p.steps.push(Step::Ensure {
                    node: node.clone(),
                    def: def.clone(),
                    autostart: pool.spec.autostart,
                }),
            },
        }
    }
    // nodes it was on before that no longer match
    if pool.spec.deletion_policy == DeletionPolicy::Delete {
        let former = pool
            .status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .map(|n| n.node.clone())
            .filter(|n| !targets.contains(n));
        for node in former {
            p.steps.push(Step::Remove {
                node,
                pool: name.clone(),
            });
        }
    }
    p
}

/// The steps of deleting the object: by policy, remove the pool from every node it was on.
pub fn cleanup_plan(pool: &StoragePool, known: &[&KvmNode]) -> Vec<Step> {
    if pool.spec.deletion_policy != DeletionPolicy::Delete {
        return vec![];
    }
    let name = libvirt_name(pool);
    let known_names: BTreeSet<String> = known.iter().map(|n| n.name_any()).collect();
    let mut nodes: BTreeSet<String> = target_nodes(&pool.spec, known).into_iter().collect();
    nodes.extend(
        pool.status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .map(|n| n.node.clone()),
    );
    nodes
        .into_iter()
        .filter(|n| known_names.contains(n))
        .map(|node| Step::Remove {
            node,
            pool: name.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::HvError;
    use crate::hypervisor::storage::PoolInfo;

    use super::super::observe::OnNode;

    fn pool(spec: serde_json::Value, status: serde_json::Value) -> StoragePool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": "images", "namespace": "ns"}, "spec": spec, "status": status,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn node(name: &str, labels: serde_json::Value) -> KvmNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
            "metadata": {"name": name, "labels": labels}, "spec": {"address": "h"},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn on(def: Option<PoolXml>) -> Result<OnNode, HvError> {
        Ok(OnNode {
            info: def.as_ref().map(|_| PoolInfo {
                running: true,
                autostart: true,
                capacity: 1,
                allocation: 0,
                available: 1,
            }),
            definition: def,
        })
    }

    #[test]
    fn selectors_conflicts_overwrite_and_release() {
        let nodes = [
            node("a", serde_json::json!({"tier": "ssd"})),
            node("b", serde_json::json!({"tier": "ssd"})),
            node("c", serde_json::json!({"tier": "hdd"})),
        ];
        let known: Vec<&KvmNode> = nodes.iter().collect();
        let spec = serde_json::json!({"nodeSelector": {"tier": "ssd"}, "type": "dir", "targetPath": "/srv/images", "deletionPolicy": "Delete"});
        let p = pool(
            spec.clone(),
            serde_json::json!({"nodes": [{"node": "c", "state": "Running"}]}),
        );
        assert_eq!(target_nodes(&p.spec, &known), ["a", "b"]);
        let mut theirs = PoolXml::from_spec("images", &p.spec);
        if let Some(t) = theirs.target.as_mut() {
            t.path = "/elsewhere".into();
        }
        let observed: Observed = [
            ("a".to_string(), on(None)),
            ("b".to_string(), on(Some(theirs.clone()))),
        ]
        .into();
        let pl = plan(&p, &known, &observed);
        assert!(matches!(&pl.steps[0], Step::Ensure { node, .. } if node == "a"));
        assert_eq!(pl.holds.get("b"), Some(&Hold::Conflict));
        // c no longer matches: removed by policy Delete
        assert!(pl.steps.contains(&Step::Remove {
            node: "c".into(),
            pool: "images".into()
        }));
        // overwriteExisting replaces; Retain never removes
        let mut spec2 = spec.clone();
        spec2["overwriteExisting"] = true.into();
        spec2["deletionPolicy"] = "Retain".into();
        let p2 = pool(
            spec2,
            serde_json::json!({"nodes": [{"node": "c", "state": "Running"}]}),
        );
        let pl = plan(&p2, &known, &observed);
        assert!(matches!(&pl.steps[1], Step::Replace { node, .. } if node == "b"));
        assert!(!pl.steps.iter().any(|s| matches!(s, Step::Remove { .. })));
        assert!(cleanup_plan(&p2, &known).is_empty());
        // a named node that does not exist, and an unreadable one
        let p3 = pool(
            serde_json::json!({"nodeName": "zz", "type": "dir", "targetPath": "/x"}),
            serde_json::json!({}),
        );
        assert_eq!(
            plan(&p3, &known, &Observed::new()).holds.get("zz"),
            Some(&Hold::NoSuchNode)
        );
        let p4 = pool(
            serde_json::json!({"nodeName": "a", "type": "dir", "targetPath": "/x"}),
            serde_json::json!({}),
        );
        let bad: Observed = [(
            "a".to_string(),
            Err(HvError::Timeout {
                op: "x",
                target: "a".into(),
                secs: 1,
            }),
        )]
        .into();
        assert!(matches!(
            plan(&p4, &known, &bad).holds.get("a"),
            Some(Hold::Unreachable(_))
        ));
        // deletion with Delete: every node it was on or targets
        let steps = cleanup_plan(&p, &known);
        assert_eq!(steps.len(), 3);
    }
}
