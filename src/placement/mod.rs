//! Placement (pure): filter the nodes a VM may run on, score the rest, pick the best with a
//! deterministic tie-break, and explain the choice (recorded in status and an Event).
//!
//! Filters, each with the reason a node is left out: the node named or selected by labels,
//! Ready, not in maintenance, every pool the VM uses running there, CPUs and memory fit after
//! overcommit and reservations (VMs placed but not yet in the node's status count too), and
//! required affinity / anti-affinity to other VMs by label.
//!
//! Score, 0 to about 1000, higher is better ([`Weights`], configurable):
//! - `cpu` × the share of the node's allocatable vCPUs still free after placing the VM,
//! - `memory` × the same for memory,
//! - `load` × how quiet the host is: 1 − max(1-minute load per CPU, CPU use), clamped to 0..1,
//! - `spread` × 1 / (1 + VMs on the node sharing the VM's `spreadByLabel` value),
//! - ± `affinity` × weight/100 for each preferred affinity (+) or anti-affinity (−) term the
//!   node satisfies,
//! - − `failure_penalty` × min(recent provisioning failures on the node, 3) / 3.
//!
//! Equal scores go to the node whose name sorts first, so the same input always gives the same
//! node.

pub mod rebalance;

use std::collections::{BTreeMap, BTreeSet};

/// Labels, as on Kubernetes objects.
pub type Labels = BTreeMap<String, String>;

/// A VM affinity term in placement terms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Term {
    pub match_labels: Labels,
    pub required: bool,
    /// 1-100, for preferred terms.
    pub weight: u32,
}

impl Term {
    fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What the VM needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub cpus: u32,
    pub memory: u64,
    /// StoragePool objects its disks and seed use.
    pub pools: BTreeSet<String>,
    pub node_name: Option<String>,
    pub node_selector: Option<Labels>,
    pub affinity: Vec<Term>,
    pub anti_affinity: Vec<Term>,
    /// `(label, value)` to spread by, when the VM carries the label.
    pub spread: Option<(String, String)>,
}

/// A node as placement sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub labels: Labels,
    pub ready: bool,
    pub maintenance: bool,
    /// CPUs and bytes after overcommit and reservations (None: not reported yet).
    pub allocatable: Option<(u32, u64)>,
    /// CPUs and bytes of the VMs already bound to it (in-flight placements included).
    pub allocated: (u32, u64),
    /// 1-minute load divided by CPUs (None: not reported).
    pub load_per_cpu: Option<f64>,
    /// Host CPU use, percent (None: not reported).
    pub cpu_usage_percent: Option<u32>,
    /// StoragePool objects running on this node.
    pub pools: BTreeSet<String>,
    /// Labels of the VMs bound to this node (used when `peers` is not given).
    pub vm_labels: Vec<Labels>,
    /// The same, already counted against the request (the controller's fast path).
    pub peers: Option<Peers>,
    /// Provisioning failures on this node in the recent past.
    pub recent_failures: u32,
}

/// How many VMs on a node match the request's spread label and each affinity term: what the
/// filter and the score need of the node's VMs, counted once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    /// VMs sharing the request's spread value.
    pub spread_same: u32,
    /// Per affinity term (at most 16), VMs matching it.
    pub affinity: [u32; 16],
    /// Per anti-affinity term (at most 16), VMs matching it.
    pub anti_affinity: [u32; 16],
}

impl Peers {
    /// Counts `vms` (their labels) against `r`.
    pub fn count<'a>(r: &Request, vms: impl IntoIterator<Item = &'a Labels>) -> Self {
        let mut p = Peers::default();
        for l in vms {
            p.add(r, l);
        }
        p
    }

    /// Counts one more VM (its labels) against `r`.
    pub fn add(&mut self, r: &Request, l: &Labels) {
        if let Some((k, v)) = &r.spread
            && l.get(k) == Some(v)
        {
            self.spread_same += 1;
        }
        for (i, t) in r.affinity.iter().take(16).enumerate() {
            self.affinity[i] += u32::from(t.matches(l));
        }
        for (i, t) in r.anti_affinity.iter().take(16).enumerate() {
            self.anti_affinity[i] += u32::from(t.matches(l));
        }
    }
}

fn peers(r: &Request, c: &Candidate) -> Peers {
    c.peers.unwrap_or_else(|| Peers::count(r, &c.vm_labels))
}

/// The score's weights (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    pub cpu: f64,
    pub memory: f64,
    pub load: f64,
    pub spread: f64,
    pub affinity: f64,
    pub failure_penalty: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            cpu: 300.0,
            memory: 300.0,
            load: 200.0,
            spread: 100.0,
            affinity: 100.0,
            failure_penalty: 150.0,
        }
    }
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

fn labels_text(l: &Labels) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why `c` cannot take `r`, or None when it can.
pub fn filter(r: &Request, c: &Candidate) -> Option<String> {
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
    let p = peers(r, c);
    for (i, t) in r
        .affinity
        .iter()
        .take(16)
        .enumerate()
        .filter(|(_, t)| t.required)
    {
        if p.affinity[i] == 0 {
            return Some(format!(
                "required affinity: no VM with {} here",
                labels_text(&t.match_labels)
            ));
        }
    }
    for (i, t) in r
        .anti_affinity
        .iter()
        .take(16)
        .enumerate()
        .filter(|(_, t)| t.required)
    {
        if p.anti_affinity[i] > 0 {
            return Some(format!(
                "required anti-affinity: a VM with {} runs here",
                labels_text(&t.match_labels)
            ));
        }
    }
    None
}

/// The node's score for `r` (see the module documentation), unrounded: nodes are compared on
/// it, and reported rounded.
pub fn score(r: &Request, c: &Candidate, w: &Weights) -> f64 {
    let Some((cpus, mem)) = c.allocatable else {
        return 0.0;
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
    let busy = c
        .load_per_cpu
        .unwrap_or(0.0)
        .max(f64::from(c.cpu_usage_percent.unwrap_or(0)) / 100.0);
    let quiet = 1.0 - busy.clamp(0.0, 1.0);
    let mut s = w.cpu * cpu + w.memory * memory + w.load * quiet;
    let p = peers(r, c);
    if r.spread.is_some() {
        s += w.spread / (1.0 + f64::from(p.spread_same));
    }
    for (terms, counts, sign) in [
        (&r.affinity, &p.affinity, 1.0),
        (&r.anti_affinity, &p.anti_affinity, -1.0),
    ] {
        for (t, n) in terms.iter().zip(counts.iter()) {
            if !t.required && *n > 0 {
                s += sign * w.affinity * f64::from(t.weight.min(100)) / 100.0;
            }
        }
    }
    s -= w.failure_penalty * f64::from(c.recent_failures.min(3)) / 3.0;
    s
}

/// Picks the node for `r` among `candidates`.
pub fn place(r: &Request, candidates: &[Candidate], w: &Weights) -> Decision {
    let mut filtered = Vec::new();
    // best so far and runner-up, without sorting every node
    let mut best: Option<(f64, &Candidate)> = None;
    let mut second: Option<(f64, &Candidate)> = None;
    let better = |a: (f64, &Candidate), b: (f64, &Candidate)| {
        a.0.total_cmp(&b.0)
            .then_with(|| b.1.name.cmp(&a.1.name))
            .is_gt()
    };
    for c in candidates {
        if let Some(why) = filter(r, c) {
            filtered.push((c.name.clone(), why));
            continue;
        }
        let x = (score(r, c, w), c);
        match best {
            Some(b) if !better(x, b) => {
                if second.is_none_or(|s| better(x, s)) {
                    second = Some(x);
                }
            }
            _ => {
                second = best;
                best = Some(x);
            }
        }
    }
    filtered.sort();
    let Some((best_score, best)) = best else {
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
    let best_score = best_score.round() as i64;
    let runner_up = second.map(|(s, c)| (c.name.clone(), s.round() as i64));
    let mut message = format!(
        "{} scored {best_score} ({} vCPUs and {} free after placing it",
        best.name,
        best.allocatable
            .map_or(0, |a| a.0.saturating_sub(best.allocated.0 + r.cpus)),
        gib(best.allocatable.map_or(0, |a| {
            a.1.saturating_sub(best.allocated.1.saturating_add(r.memory))
        })),
    );
    if let Some(l) = best.load_per_cpu {
        message.push_str(&format!(", load {l:.2} per CPU"));
    }
    if best.recent_failures > 0 {
        message.push_str(&format!(
            ", penalised for {} recent provisioning failure(s)",
            best.recent_failures
        ));
    }
    message.push(')');
    match &runner_up {
        Some((n, s)) => message.push_str(&format!("; runner-up {n} scored {s}")),
        None => message.push_str("; the only node that fits"),
    }
    if !filtered.is_empty() {
        message.push_str(&format!(
            "; filtered out: {}",
            filtered
                .iter()
                .map(|(n, why)| format!("{n} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Decision::Placed {
        node: best.name.clone(),
        score: best_score,
        runner_up,
        message,
        filtered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place_default(r: &Request, c: &[Candidate]) -> Decision {
        place(r, c, &Weights::default())
    }

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
        let d = place_default(&req(2, 4), &nodes);
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
        let d = place_default(&req(2, 4), &[full, cordoned, down, nopool, fresh]);
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
        let d = place_default(&req(1, 8), &[node("small", 64, 8, (0, 4), 0.0)]);
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
            chosen(&place_default(&req(1, 1), &[b.clone(), a.clone()])),
            Some("alpha")
        );
        assert_eq!(chosen(&place_default(&req(1, 1), &[a, b])), Some("alpha"));
    }

    #[test]
    fn node_name_and_selector_restrict_the_candidates() {
        let mut a = node("a", 8, 16, (0, 0), 0.0);
        a.labels.insert("zone".into(), "x".into());
        let b = node("b", 64, 256, (0, 0), 0.0);
        let mut r = req(1, 1);
        r.node_selector = Some([("zone".to_string(), "x".to_string())].into());
        assert_eq!(
            chosen(&place_default(&r, &[a.clone(), b.clone()])),
            Some("a")
        );
        let mut r = req(1, 1);
        r.node_name = Some("a".into());
        assert_eq!(chosen(&place_default(&r, &[a, b])), Some("a"));
        assert!(matches!(
            place_default(&req(1, 1), &[]),
            Decision::Unschedulable { message, .. } if message.contains("no KvmNode")
        ));
    }

    fn labelled(mut c: Candidate, vms: &[&[(&str, &str)]]) -> Candidate {
        c.vm_labels = vms
            .iter()
            .map(|l| {
                l.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect();
        c
    }

    fn term(k: &str, v: &str, required: bool, weight: u32) -> Term {
        Term {
            match_labels: [(k.to_string(), v.to_string())].into(),
            required,
            weight,
        }
    }

    #[test]
    fn affinity_anti_affinity_spread_and_failures_move_the_choice() {
        let a = labelled(node("a", 16, 64, (0, 0), 0.0), &[&[("app", "db")]]);
        let b = labelled(
            node("b", 16, 64, (0, 0), 0.0),
            &[&[("app", "web")], &[("app", "web")]],
        );
        let c = node("c", 16, 64, (0, 0), 0.0);
        let nodes = [a, b, c];
        // required affinity: only next to a db
        let mut r = req(1, 1);
        r.affinity = vec![term("app", "db", true, 50)];
        assert_eq!(chosen(&place_default(&r, &nodes)), Some("a"));
        // required anti-affinity: never next to a web VM
        let mut r = req(1, 1);
        r.anti_affinity = vec![term("app", "web", true, 50)];
        let Decision::Placed { filtered, .. } = place_default(&r, &nodes) else {
            panic!()
        };
        assert!(
            filtered
                .iter()
                .any(|(n, why)| n == "b" && why.contains("anti-affinity"))
        );
        // preferred affinity wins over an otherwise identical node
        let mut r = req(1, 1);
        r.affinity = vec![term("app", "web", false, 100)];
        assert_eq!(chosen(&place_default(&r, &nodes)), Some("b"));
        // spread: the node with fewer VMs of the same app
        let mut r = req(1, 1);
        r.spread = Some(("app".into(), "web".into()));
        let d = place_default(&r, &nodes);
        assert_ne!(chosen(&d), Some("b"), "{d:?}");
        // a node that just failed provisioning is penalised, not excluded
        let mut quiet = node("quiet", 16, 64, (0, 0), 0.0);
        quiet.recent_failures = 3;
        let busy = node("busy", 16, 64, (0, 0), 0.3);
        assert_eq!(
            chosen(&place_default(&req(1, 1), &[quiet.clone(), busy])),
            Some("busy")
        );
        assert_eq!(chosen(&place_default(&req(1, 1), &[quiet])), Some("quiet"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn arb_node(i: usize) -> impl Strategy<Value = Candidate> {
            (
                1u32..64,
                1u64..256,
                0u32..80,
                0u64..300,
                0.0f64..2.0,
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(move |(cpus, mem, used_c, used_m, load, ready, maint)| {
                    Candidate {
                        name: format!("n{i:03}"),
                        ready,
                        maintenance: maint && i % 3 == 0,
                        allocatable: Some((cpus, mem * GI)),
                        allocated: (used_c, used_m * GI),
                        load_per_cpu: Some(load),
                        pools: ["images".to_string()].into(),
                        ..Default::default()
                    }
                })
        }

        fn arb_nodes() -> impl Strategy<Value = Vec<Candidate>> {
            (1usize..24).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
        }

        proptest! {
            #[test]
            fn never_places_where_it_does_not_fit(nodes in arb_nodes(), cpus in 1u32..32, mem in 1u64..64) {
                let r = req(cpus, mem);
                if let Decision::Placed { node, .. } = place_default(&r, &nodes) {
                    let c = nodes.iter().find(|c| c.name == node).unwrap();
                    let (ac, am) = c.allocatable.unwrap();
                    prop_assert!(c.ready && !c.maintenance);
                    prop_assert!(c.allocated.0 + cpus <= ac);
                    prop_assert!(c.allocated.1 + mem * GI <= am);
                } else {
                    // nothing fits: every node says why
                    prop_assert!(nodes.iter().all(|c| filter(&r, c).is_some()));
                }
            }

            #[test]
            fn the_same_input_gives_the_same_answer_in_any_order(nodes in arb_nodes(), cpus in 1u32..8) {
                let r = req(cpus, 1);
                let mut rev = nodes.clone();
                rev.reverse();
                let (a, b) = (place_default(&r, &nodes), place_default(&r, &rev));
                prop_assert_eq!(chosen(&a), chosen(&b));
            }

            #[test]
            fn counted_peers_decide_exactly_as_the_labels_they_count(
                nodes in arb_nodes(),
                apps in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..6), 24),
                want in 0u8..4,
                required in any::<bool>(),
            ) {
                let app = |a: u8| -> Labels { [("app".to_string(), format!("a{a}"))].into() };
                let mut r = req(1, 1);
                r.spread = Some(("app".into(), format!("a{want}")));
                r.affinity = vec![term("app", &format!("a{}", (want + 1) % 4), false, 60)];
                r.anti_affinity = vec![term("app", &format!("a{}", (want + 2) % 4), required, 40)];
                let by_labels: Vec<Candidate> = nodes.iter().zip(&apps).map(|(c, a)| {
                    let mut c = c.clone();
                    c.vm_labels = a.iter().map(|x| app(*x)).collect();
                    c
                }).collect();
                let counted: Vec<Candidate> = by_labels.iter().map(|c| {
                    let mut d = c.clone();
                    d.peers = Some(Peers::count(&r, &c.vm_labels));
                    d.vm_labels.clear();
                    d
                }).collect();
                let w = Weights::default();
                for (a, b) in by_labels.iter().zip(&counted) {
                    prop_assert_eq!(filter(&r, a), filter(&r, b));
                    prop_assert_eq!(score(&r, a, &w).to_bits(), score(&r, b, &w).to_bits());
                }
                prop_assert_eq!(place_default(&r, &by_labels), place_default(&r, &counted));
            }

            #[test]
            fn identical_nodes_are_filled_evenly(n in 2usize..12, vms in 1usize..60) {
                let mut nodes: Vec<Candidate> = (0..n).map(|i| node(&format!("n{i:02}"), 1000, 4000, (0, 0), 0.0)).collect();
                for _ in 0..vms {
                    let mut r = req(1, 1);
                    r.spread = Some(("app".into(), "web".into()));
                    let Decision::Placed { node, .. } = place_default(&r, &nodes) else { panic!() };
                    let c = nodes.iter_mut().find(|c| c.name == node).unwrap();
                    c.allocated.0 += 1;
                    c.allocated.1 += GI;
                    c.vm_labels.push([("app".to_string(), "web".to_string())].into());
                }
                let counts: Vec<usize> = nodes.iter().map(|c| c.vm_labels.len()).collect();
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "{:?}", counts);
            }
        }
    }
}
