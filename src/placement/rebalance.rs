//! Rebalancing (pure): when the quietest and the busiest node drift apart, find the one move that
//! narrows the gap most.
//!
//! A node's load score is placement's score for an empty request without the failure penalty
//! (free vCPU and memory shares after overcommit, and how quiet the host is), so "busy" means
//! exactly what placement avoids. The spread is the best node's score minus the worst's, among
//! nodes that are Ready, not in maintenance and have reported capacity.
//!
//! When the spread exceeds the threshold, each VM on the busiest node is placed again by
//! [`place`] among the other nodes (so every filter holds: fit, pools, selectors, affinity); the
//! move kept is the one after which the spread is smallest, and only if it is smaller than
//! before. Since each move strictly lowers the spread of the allocations it sees, repeated
//! rounds cannot move a VM back and forth on the same figures; live load the move does not
//! change (a host busy for other reasons) is seen again at the next round, which the caller
//! rate-limits.

use super::{Candidate, Decision, Request, Weights, place, score};

/// How loaded `c` is, on placement's scale (higher is quieter).
pub fn node_score(c: &Candidate, w: &Weights) -> f64 {
    let w = Weights {
        failure_penalty: 0.0,
        ..*w
    };
    score(&Request::default(), c, &w)
}

fn eligible(c: &Candidate) -> bool {
    c.ready && !c.maintenance && c.allocatable.is_some()
}

/// The busiest and the quietest eligible node and the spread between them, when the spread
/// exceeds `threshold`.
#[derive(Clone, Debug, PartialEq)]
pub struct Imbalance {
    pub busiest: String,
    pub busiest_score: f64,
    pub quietest: String,
    pub quietest_score: f64,
    pub spread: f64,
}

/// The imbalance among `nodes`, or `Err(spread)` when it is within `threshold` (or fewer than
/// two nodes are eligible, spread 0).
pub fn imbalance(nodes: &[Candidate], w: &Weights, threshold: f64) -> Result<Imbalance, f64> {
    let mut lo: Option<(f64, &str)> = None;
    let mut hi: Option<(f64, &str)> = None;
    for c in nodes.iter().filter(|c| eligible(c)) {
        let s = node_score(c, w);
        // ties: the name that sorts first, both ways, so the answer never depends on order
        if lo.is_none_or(|(ls, ln)| s < ls || (s == ls && c.name.as_str() < ln)) {
            lo = Some((s, &c.name));
        }
        if hi.is_none_or(|(hs, hn)| s > hs || (s == hs && c.name.as_str() < hn)) {
            hi = Some((s, &c.name));
        }
    }
    let (Some((ls, ln)), Some((hs, hn))) = (lo, hi) else {
        return Err(0.0);
    };
    let spread = hs - ls;
    if ln == hn || spread <= threshold {
        return Err(spread.max(0.0));
    }
    Ok(Imbalance {
        busiest: ln.to_string(),
        busiest_score: ls,
        quietest: hn.to_string(),
        quietest_score: hs,
        spread,
    })
}

/// A VM on the busiest node that could move.
#[derive(Clone, Debug)]
pub struct Resident {
    /// `namespace/name`.
    pub key: String,
    pub request: Request,
    /// The nodes as this VM sees them (its own allocation left out, its pools and peers).
    pub view: Vec<Candidate>,
}

/// The move found.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    /// `namespace/name`.
    pub vm: String,
    pub from: String,
    pub to: String,
    pub spread_before: f64,
    pub spread_after: f64,
}

impl Move {
    /// One line for an Event or a log.
    pub fn explain(&self, im: &Imbalance) -> String {
        format!(
            "{} scores {:.0} and {} {:.0} (spread {:.0}); moving VM {} from {} to {} brings the spread to {:.0}",
            im.busiest,
            im.busiest_score,
            im.quietest,
            im.quietest_score,
            self.spread_before,
            self.vm,
            self.from,
            self.to,
            self.spread_after
        )
    }
}

/// The best move off `im.busiest` among `residents`, if one narrows the spread.
pub fn best_move(
    nodes: &[Candidate],
    im: &Imbalance,
    residents: &[Resident],
    w: &Weights,
) -> Option<Move> {
    let mut best: Option<Move> = None;
    let mut order: Vec<&Resident> = residents.iter().collect();
    order.sort_by(|a, b| a.key.cmp(&b.key));
    for r in order {
        let others: Vec<Candidate> = r
            .view
            .iter()
            .filter(|c| c.name != im.busiest)
            .cloned()
            .collect();
        let Decision::Placed { node: to, .. } = place(&r.request, &others, w) else {
            continue;
        };
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for c in nodes.iter().filter(|c| eligible(c)) {
            let mut c = c.clone();
            if c.name == im.busiest {
                c.allocated.0 = c.allocated.0.saturating_sub(r.request.cpus);
                c.allocated.1 = c.allocated.1.saturating_sub(r.request.memory);
            } else if c.name == to {
                c.allocated.0 = c.allocated.0.saturating_add(r.request.cpus);
                c.allocated.1 = c.allocated.1.saturating_add(r.request.memory);
            }
            let s = node_score(&c, w);
            lo = lo.min(s);
            hi = hi.max(s);
        }
        let after = hi - lo;
        if after < im.spread - 1e-9 && best.as_ref().is_none_or(|b| after < b.spread_after) {
            best = Some(Move {
                vm: r.key.clone(),
                from: im.busiest.clone(),
                to,
                spread_before: im.spread,
                spread_after: after,
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpus: u32, used: u32) -> Candidate {
        Candidate {
            name: name.into(),
            ready: true,
            allocatable: Some((cpus, u64::from(cpus) * 4 * GI)),
            allocated: (used, u64::from(used) * 4 * GI),
            load_per_cpu: Some(0.0),
            ..Default::default()
        }
    }

    fn resident(key: &str, cpus: u32, view: &[Candidate]) -> Resident {
        Resident {
            key: key.into(),
            request: Request {
                cpus,
                memory: u64::from(cpus) * 4 * GI,
                ..Default::default()
            },
            view: view.to_vec(),
        }
    }

    #[test]
    fn balanced_nodes_are_left_alone() {
        let w = Weights::default();
        let nodes = [node("a", 16, 8), node("b", 16, 7)];
        let spread = imbalance(&nodes, &w, 150.0).unwrap_err();
        assert!(spread < 150.0, "{spread}");
        // one node, or none eligible: nothing to compare
        assert_eq!(imbalance(&nodes[..1], &w, 1.0), Err(0.0));
        let mut down = nodes.clone();
        down[1].ready = false;
        assert_eq!(imbalance(&down, &w, 1.0), Err(0.0));
    }

    #[test]
    fn the_move_that_narrows_the_spread_most_is_chosen() {
        let w = Weights::default();
        // a: 14 of 16 used, b: 2 of 16 used
        let nodes = [node("a", 16, 14), node("b", 16, 2)];
        let im = imbalance(&nodes, &w, 150.0).unwrap();
        assert_eq!((im.busiest.as_str(), im.quietest.as_str()), ("a", "b"));
        // residents seen without themselves on a
        let view = |cpus: u32| {
            let mut v = nodes.to_vec();
            v[0].allocated.0 -= cpus;
            v[0].allocated.1 -= u64::from(cpus) * 4 * GI;
            v
        };
        let rs = [
            resident("ns/small", 1, &view(1)),
            resident("ns/right", 6, &view(6)),
            resident("ns/huge", 12, &view(12)),
        ];
        let m = best_move(&nodes, &im, &rs, &w).unwrap();
        // 6 vCPUs levels 14/2 to 8/8; 12 would overshoot to 2/14, 1 barely helps
        assert_eq!(m.vm, "ns/right");
        assert_eq!((m.from.as_str(), m.to.as_str()), ("a", "b"));
        assert!(m.spread_after < 1.0, "{m:?}");
        assert!(m.explain(&im).contains("ns/right"));
        // the same input in another order gives the same move
        let mut rev = rs.to_vec();
        rev.reverse();
        assert_eq!(best_move(&nodes, &im, &rev, &w), Some(m));
    }

    #[test]
    fn no_move_when_none_fits_or_none_helps() {
        let w = Weights::default();
        let nodes = [node("a", 16, 16), node("b", 16, 12)];
        let im = imbalance(&nodes, &w, 50.0).unwrap();
        let mut view = nodes.to_vec();
        view[0].allocated = (8, 32 * GI);
        // does not fit on b
        assert_eq!(
            best_move(&nodes, &im, &[resident("ns/big", 8, &view)], &w),
            None
        );
        // b is in maintenance: the filter holds in rebalancing too
        let mut view2 = nodes.to_vec();
        view2[1].maintenance = true;
        view2[0].allocated = (15, 60 * GI);
        assert_eq!(
            best_move(&nodes, &im, &[resident("ns/one", 1, &view2)], &w),
            None
        );
    }

    #[test]
    fn repeated_rounds_converge_and_never_move_a_vm_back() {
        let w = Weights::default();
        // four nodes, all VMs (2 vCPUs each) on the first
        let mut nodes = vec![
            node("a", 32, 0),
            node("b", 32, 0),
            node("c", 32, 0),
            node("d", 32, 0),
        ];
        let mut on: Vec<(String, String)> = (0..12)
            .map(|i| (format!("ns/v{i:02}"), "a".into()))
            .collect();
        nodes[0].allocated = (24, 96 * GI);
        let mut moved = std::collections::BTreeSet::new();
        let mut spreads = vec![];
        for _ in 0..20 {
            let Ok(im) = imbalance(&nodes, &w, 60.0) else {
                break;
            };
            spreads.push(im.spread);
            let rs: Vec<Resident> = on
                .iter()
                .filter(|(_, n)| *n == im.busiest)
                .map(|(k, _)| {
                    let mut view = nodes.clone();
                    let i = view.iter().position(|c| c.name == im.busiest).unwrap();
                    view[i].allocated.0 -= 2;
                    view[i].allocated.1 -= 8 * GI;
                    resident(k, 2, &view)
                })
                .collect();
            let Some(m) = best_move(&nodes, &im, &rs, &w) else {
                break;
            };
            assert!(
                moved.insert((m.vm.clone(), m.to.clone())),
                "moved back: {m:?}"
            );
            for c in nodes.iter_mut() {
                if c.name == m.from {
                    c.allocated.0 -= 2;
                    c.allocated.1 -= 8 * GI;
                } else if c.name == m.to {
                    c.allocated.0 += 2;
                    c.allocated.1 += 8 * GI;
                }
            }
            on.iter_mut().find(|(k, _)| *k == m.vm).unwrap().1 = m.to;
        }
        assert!(spreads.windows(2).all(|p| p[1] < p[0]), "{spreads:?}");
        assert!(imbalance(&nodes, &w, 60.0).is_err(), "converged: {nodes:?}");
        let counts: Vec<usize> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| on.iter().filter(|(_, x)| x == n).count())
            .collect();
        assert!(counts.iter().all(|c| *c >= 2), "{counts:?}");
    }
}
