//! Placement cost, side by side in one run (`cargo bench --bench placement`, no lab needed):
//!
//! - ours: the controller's path, `candidates()` from the cached objects (one pass over VMs,
//!   pools and nodes) then `placement::place` (one pass, best and runner-up kept, no sort);
//! - naive: what a straightforward implementation does: for every node, scan every VM to sum
//!   its allocation, then score all nodes and sort them.
//!
//! Scenarios: one VM among 10,000 nodes (p99 over repeated runs, target < 1 ms) and 1,000 VMs
//! placed one after the other across 100 nodes, each seeing the ones before it (total, target
//! < 100 ms). Figures are from one run on a shared, noisy machine: compare the ratios.
//! `BENCH_ONLY=one|many` runs one scenario and `BENCH_OURS_ONLY=1` skips the naive side (for
//! profiling).

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_operator::api::{KvmNode, VirtualMachine};
use kvm_operator::controller::World;
use kvm_operator::controller::virtual_machine::{candidates, request};
use kvm_operator::placement::{self, Decision, Weights};

fn node(i: usize) -> KvmNode {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": format!("node-{i:05}"), "labels": {"zone": format!("z{}", i % 4)}},
        "spec": {"address": "10.0.0.1"},
        "status": {
            "capacity": {"cpus": 64, "memory": "256Gi"},
            "allocatable": {"cpus": 256, "memory": "256Gi"},
            "load": {"load1": format!("{:.2}", (i % 17) as f64), "load5": "1", "load15": "1",
                     "cpuUsagePercent": (i % 90) as u32, "memoryFree": "100Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }
    }))
    .unwrap()
}

fn vm(i: usize, node: Option<String>) -> VirtualMachine {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": format!("vm-{i:05}"), "namespace": "bench", "uid": format!("uid-{i}"),
                     "labels": {"app": format!("app{}", i % 10)}},
        "spec": {"vcpus": 1 + (i % 4) as u32, "memory": "2Gi",
                 "placement": {"spreadByLabel": "app"}},
        "status": {"node": node},
    }))
    .unwrap()
}

/// The naive placement: per node, scan all VMs for its allocation; score; sort everything.
fn naive(world: &World, v: &VirtualMachine) -> Option<String> {
    let r = request(v);
    let w = Weights::default();
    let mut scored: Vec<(i64, String)> = world
        .nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let st = n.status.as_ref();
            let mut c = placement::Candidate {
                name: name.clone(),
                ready: true,
                load_per_cpu: st
                    .and_then(|s| s.load.as_ref())
                    .and_then(|l| l.load1.parse::<f64>().ok())
                    .map(|l| l / 64.0),
                cpu_usage_percent: st
                    .and_then(|s| s.load.as_ref())
                    .map(|l| l.cpu_usage_percent),
                allocatable: n
                    .status
                    .as_ref()
                    .and_then(|s| s.allocatable.as_ref())
                    .map(|a| (a.cpus, a.memory.bytes())),
                ..Default::default()
            };
            for other in &world.vms {
                if other.status.as_ref().and_then(|s| s.node.as_deref()) == Some(name.as_str()) {
                    c.allocated.0 += other.spec.vcpus.unwrap_or(0);
                    c.allocated.1 += other.spec.memory.as_ref().map_or(0, |m| m.bytes());
                    c.vm_labels
                        .push(other.metadata.labels.clone().unwrap_or_default());
                }
            }
            placement::filter(&r, &c)
                .is_none()
                .then(|| (placement::score(&r, &c, &w).round() as i64, name))
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored.first().map(|(_, n)| n.clone())
}

fn ours(world: &World, v: &VirtualMachine) -> Option<String> {
    match placement::place(&request(v), &candidates(world, v), &world.weights) {
        Decision::Placed { node, .. } => Some(node),
        Decision::Unschedulable { .. } => None,
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn one_among(nodes: usize, vms: usize, runs: usize) {
    let world = World {
        nodes: (0..nodes).map(|i| Arc::new(node(i))).collect(),
        vms: (0..vms)
            .map(|i| Arc::new(vm(i, Some(format!("node-{:05}", i % nodes)))))
            .collect(),
        ..World::default()
    };
    let newcomer = vm(999_999, None);
    assert_eq!(
        ours(&world, &newcomer),
        naive(&world, &newcomer),
        "same choice"
    );
    let mut t_ours = Vec::new();
    let mut t_naive = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(ours(&world, &newcomer));
        t_ours.push(t.elapsed());
        if std::env::var_os("BENCH_OURS_ONLY").is_none() {
            let t = Instant::now();
            std::hint::black_box(naive(&world, &newcomer));
            t_naive.push(t.elapsed());
        } else {
            t_naive.push(Duration::ZERO);
        }
    }
    let (a, b) = (p99(t_ours), p99(t_naive));
    println!(
        "one VM among {nodes} nodes ({vms} VMs placed), candidates rebuilt from the cache + decision: ours p99 {:.3} ms, naive p99 {:.3} ms, {:.1}x faster (target: faster than naive)",
        a.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        b.as_secs_f64() / a.as_secs_f64().max(1e-9)
    );
    // placement alone, on candidates already built
    let c = candidates(&world, &newcomer);
    let r = request(&newcomer);
    let mut t_place = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(placement::place(&r, &c, &world.weights));
        t_place.push(t.elapsed());
    }
    println!(
        "one VM among {nodes} nodes, the decision (placement::place): median {:.3} ms, p99 {:.3} ms (target: p99 < 1 ms)",
        median(t_place.clone()).as_secs_f64() * 1e3,
        p99(t_place).as_secs_f64() * 1e3
    );
}

fn many(vms: usize, nodes: usize) {
    let base: Vec<Arc<KvmNode>> = (0..nodes).map(|i| Arc::new(node(i))).collect();
    let pending: Vec<VirtualMachine> = (0..vms).map(|i| vm(i, None)).collect();
    let run = |f: fn(&World, &VirtualMachine) -> Option<String>| {
        let mut world = World {
            nodes: base.clone(),
            ..World::default()
        };
        let t = Instant::now();
        for v in &pending {
            let chosen = f(&world, v).expect("fits");
            // bound: the next placement sees it
            let mut b = v.clone();
            if let Some(s) = b.status.as_mut() {
                s.node = Some(chosen);
            }
            world.vms.push(Arc::new(b));
        }
        (t.elapsed(), world)
    };
    let (a, wa) = run(ours);
    if std::env::var_os("BENCH_OURS_ONLY").is_some() {
        println!(
            "{vms} VMs across {nodes} nodes: ours {:.1} ms",
            a.as_secs_f64() * 1e3
        );
        return;
    }
    let (b, wb) = run(naive);
    let spread = |w: &World| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for v in &w.vms {
            *counts
                .entry(v.status.as_ref().unwrap().node.clone().unwrap())
                .or_default() += 1;
        }
        let (lo, hi) = (
            counts.values().min().copied().unwrap_or(0),
            counts.values().max().copied().unwrap_or(0),
        );
        (lo, hi)
    };
    println!(
        "{vms} VMs across {nodes} nodes: ours {:.1} ms, naive {:.1} ms, {:.1}x faster (target: ours < 100 ms); VMs per node ours {:?}, naive {:?}",
        a.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        b.as_secs_f64() / a.as_secs_f64().max(1e-9),
        spread(&wa),
        spread(&wb)
    );
}

fn main() {
    // BENCH_ONLY=one|many runs one scenario (for profiling)
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "one" {
        one_among(10_000, 20_000, 200);
    }
    if only.is_empty() || only == "many" {
        many(1_000, 100);
    }
}
