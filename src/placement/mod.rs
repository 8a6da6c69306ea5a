//! Placement (pure): filter the nodes a VM may run on, score the rest, pick the best with a
//! deterministic tie-break, and explain the choice (recorded in status and an Event).
//!
//! Filters: node named or selected by labels, Ready, not in maintenance, every pool the VM uses
//! running there, CPUs and memory fit after overcommit. Score (0–1000, higher is better): free
//! CPUs and memory left after placing the VM (allocatable minus allocated) and host load.

use std::collections::{BTreeMap, BTreeSet};

/// What the VM needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub cpus: u32,
    pub memory: u64,
    /// StoragePool objects its disks and seed use.
    pub pools: BTreeSet<String>,
    pub node_name: Option<String>,
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// A node as placement sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub maintenance: bool,
    /// CPUs and bytes after overcommit and reservations (None: not reported yet).
    pub allocatable: Option<(u32, u64)>,
    /// CPUs and bytes of the VMs already bound to it.
    pub allocated: (u32, u64),
    /// 1-minute load divided by CPUs (None: not reported).
    pub load_per_cpu: Option<f64>,
    /// StoragePool objects running on this node.
    pub pools: BTreeSet<String>,
}

/// The choice, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Placed {
        node: String,
        score: i64,
        runner_up: Option<(String, i64)>,
        message: String,
        /// Nodes left out, and why.
        filtered: Vec<(String, String)>,
    },
    Unschedulable {
        message: String,
        filtered: Vec<(String, String)>,
    },
}

fn gib(b: u64) -> String {
    format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64)
}

/// Why `c` cannot take `r`, or None when it can.
fn filter(r: &Request, c: &Candidate) -> Option<String> {
    if let Some(n) = &r.node_name
        && *n != c.name
    {
        return Some(format!("spec.placement.nodeName is {n}"));
    }
    if let Some(sel) = &r.node_selector {
        let missing: Vec<String> = sel
            .iter()
            .filter(|(k, v)| c.labels.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !missing.is_empty() {
            return Some(format!(
                "labels do not match nodeSelector ({})",
                missing.join(", ")
            ));
        }
    }
    if !c.ready {
        return Some("node is not Ready".into());
    }
    if c.maintenance {
        return Some("node is in maintenance".into());
    }
    let missing: Vec<&str> = r
        .pools
        .iter()
        .filter(|p| !c.pools.contains(*p))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "StoragePool {} is not running here",
            missing.join(", ")
        ));
    }
    let Some((cpus, mem)) = c.allocatable else {
        return Some("capacity not reported yet".into());
    };
    let free_cpus = cpus.saturating_sub(c.allocated.0);
    let free_mem = mem.saturating_sub(c.allocated.1);
    if r.cpus > free_cpus {
        return Some(format!(
            "needs {} vCPUs, {free_cpus} of {cpus} free after overcommit",
            r.cpus
        ));
    }
    if r.memory > free_mem {
        return Some(format!(
            "needs {} memory, {} of {} free after overcommit",
            gib(r.memory),
            gib(free_mem),
            gib(mem)
        ));
    }
    None
}

/// 0–1000: 400 for the share of CPUs left free, 400 for memory, 200 for a quiet host.
pub fn score(r: &Request, c: &Candidate) -> i64 {
    let Some((cpus, mem)) = c.allocatable else {
        return 0;
    };
    let share = |total: u64, used: u64| {
        if total == 0 {
            0.0
        } else {
            (total.saturating_sub(used) as f64 / total as f64).clamp(0.0, 1.0)
        }
    };
    let cpu = share(
        u64::from(cpus),
        u64::from(c.allocated.0) + u64::from(r.cpus),
    );
    let memory = share(mem, c.allocated.1.saturating_add(r.memory));
    let quiet = 1.0 - c.load_per_cpu.unwrap_or(0.0).clamp(0.0, 1.0);
    (400.0 * cpu + 400.0 * memory + 200.0 * quiet).round() as i64
}

/// Picks the node for `r` among `candidates`.
pub fn place(r: &Request, candidates: &[Candidate]) -> Decision {
    let mut filtered = Vec::new();
    let mut fits: Vec<(i64, &Candidate)> = Vec::new();
    for c in candidates {
        match filter(r, c) {
            Some(why) => filtered.push((c.name.clone(), why)),
            None => fits.push((score(r, c), c)),
        }
    }
    filtered.sort();
    // best score first; equal scores by name, so the same inputs always give the same node
    fits.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    let Some((best_score, best)) = fits.first() else {
        let message = if candidates.is_empty() {
            "no KvmNode exists; create one".to_string()
        } else {
            format!(
                "no node fits: {}",
                filtered
                    .iter()
                    .map(|(n, why)| format!("{n}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        return Decision::Unschedulable { message, filtered };
    };
    let runner_up = fits.get(1).map(|(s, c)| (c.name.clone(), *s));
    let mut message = format!(
        "{} scored {best_score} of 1000 ({} vCPUs and {} free after placing it",
        best.name,
        best.allocatable
            .map_or(0, |a| a.0.saturating_sub(best.allocated.0 + r.cpus)),
        gib(best.allocatable.map_or(0, |a| a
            .1
            .saturating_sub(best.allocated.1.saturating_add(r.memory)))),
    );
    if let Some(l) = best.load_per_cpu {
        message.push_str(&format!(", load {l:.2} per CPU"));
    }
    message.push(')');
    match &runner_up {
        Some((n, s)) => message.push_str(&format!("; runner-up {n} scored {s}")),
        None => message.push_str("; the only node that fits"),
    }
    if !filtered.is_empty() {
        message.push_str(&format!("; {} node(s) filtered out", filtered.len()));
    }
    Decision::Placed {
        node: best.name.clone(),
        score: *best_score,
        runner_up,
        message,
        filtered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpus: u32, mem_gi: u64, used: (u32, u64), load: f64) -> Candidate {
        Candidate {
            name: name.into(),
            ready: true,
            allocatable: Some((cpus, mem_gi * GI)),
            allocated: (used.0, used.1 * GI),
            load_per_cpu: Some(load),
            pools: ["images".to_string()].into(),
            ..Default::default()
        }
    }

    fn req(cpus: u32, mem_gi: u64) -> Request {
        Request {
            cpus,
            memory: mem_gi * GI,
            pools: ["images".to_string()].into(),
            ..Default::default()
        }
    }

    fn chosen(d: &Decision) -> Option<&str> {
        match d {
            Decision::Placed { node, .. } => Some(node),
            Decision::Unschedulable { .. } => None,
        }
    }

    #[test]
    fn the_least_loaded_node_that_fits_wins_and_the_choice_is_explained() {
        let nodes = [
            node("a", 16, 64, (12, 48), 0.9),
            node("b", 16, 64, (2, 8), 0.1),
            node("c", 16, 64, (8, 32), 0.5),
        ];
        let d = place(&req(2, 4), &nodes);
        assert_eq!(chosen(&d), Some("b"));
        let Decision::Placed {
            runner_up, message, ..
        } = d
        else {
            panic!()
        };
        assert_eq!(runner_up.map(|r| r.0).as_deref(), Some("c"));
        assert!(message.contains("runner-up c"), "{message}");
    }

    #[test]
    fn filters_name_the_reason_for_every_node_left_out() {
        let mut full = node("full", 4, 8, (4, 4), 0.0);
        full.name = "full".into();
        let mut cordoned = node("cordoned", 64, 256, (0, 0), 0.0);
        cordoned.maintenance = true;
        let mut down = node("down", 64, 256, (0, 0), 0.0);
        down.ready = false;
        let mut nopool = node("nopool", 64, 256, (0, 0), 0.0);
        nopool.pools.clear();
        let fresh = Candidate {
            name: "fresh".into(),
            ready: true,
            pools: ["images".to_string()].into(),
            ..Default::default()
        };
        let d = place(&req(2, 4), &[full, cordoned, down, nopool, fresh]);
        let Decision::Unschedulable { filtered, message } = d else {
            panic!("{d:?}")
        };
        let why: BTreeMap<_, _> = filtered.into_iter().collect();
        assert!(why["full"].contains("vCPUs"), "{why:?}");
        assert!(why["cordoned"].contains("maintenance"));
        assert!(why["down"].contains("not Ready"));
        assert!(why["nopool"].contains("StoragePool images"));
        assert!(why["fresh"].contains("not reported"));
        assert!(message.starts_with("no node fits"));
    }

    #[test]
    fn memory_after_overcommit_is_checked_as_well_as_cpus() {
        let d = place(&req(1, 8), &[node("small", 64, 8, (0, 4), 0.0)]);
        let Decision::Unschedulable { message, .. } = d else {
            panic!()
        };
        assert!(message.contains("memory"), "{message}");
    }

    #[test]
    fn equal_scores_break_ties_by_name_whatever_the_order() {
        let a = node("alpha", 8, 16, (0, 0), 0.0);
        let b = node("bravo", 8, 16, (0, 0), 0.0);
        assert_eq!(
            chosen(&place(&req(1, 1), &[b.clone(), a.clone()])),
            Some("alpha")
        );
        assert_eq!(chosen(&place(&req(1, 1), &[a, b])), Some("alpha"));
    }

    #[test]
    fn node_name_and_selector_restrict_the_candidates() {
        let mut a = node("a", 8, 16, (0, 0), 0.0);
        a.labels.insert("zone".into(), "x".into());
        let b = node("b", 64, 256, (0, 0), 0.0);
        let mut r = req(1, 1);
        r.node_selector = Some([("zone".to_string(), "x".to_string())].into());
        assert_eq!(chosen(&place(&r, &[a.clone(), b.clone()])), Some("a"));
        let mut r = req(1, 1);
        r.node_name = Some("a".into());
        assert_eq!(chosen(&place(&r, &[a, b])), Some("a"));
        assert!(matches!(
            place(&req(1, 1), &[]),
            Decision::Unschedulable { message, .. } if message.contains("no KvmNode")
        ));
    }
}
