//! What a node is right now: host facts, its domains and their figures, each read once.

use std::time::Duration;

use crate::hypervisor::host_facts::HostFacts;
use crate::hypervisor::stats::DomainStats;
use crate::hypervisor::{DomainSummary, HvError, Hypervisor};

/// A node as read in one pass. Each part fails on its own: a host whose SSH works but whose
/// libvirt is down reports facts and a libvirt error.
#[derive(Debug)]
pub struct Observed {
    /// Host facts and CPU use (percent, when sampled).
    pub facts: Result<(HostFacts, Option<u32>), HvError>,
    /// Every domain, with our stamp when present.
    pub domains: Result<Vec<DomainSummary>, HvError>,
    /// Per-domain figures from one bulk call (empty when it failed).
    pub stats: Vec<DomainStats>,
}

/// Reads `node` through the hypervisor layer; CPU use is sampled over `sample`.
pub async fn observe(hv: &impl Hypervisor, node: &str, sample: Duration) -> Observed {
    // side by side: a host that stops answering costs one timeout, not the sum of two. The
    // domains, their states and figures come from one bulk stats call; stamps are read only for
    // domains the connection has not seen before
    let (facts, listed) = tokio::join!(
        hv.host_facts(node, sample),
        hv.call(node, "list domains", |c| match c.domains_with_stats() {
            Ok(x) => Ok(x),
            // a daemon without bulk stats: the plain listing (and no figures)
            Err(_) => c.list_domains().map(|d| (d, Vec::new())),
        })
    );
    let (domains, stats) = match listed {
        Ok((d, s)) => (Ok(d), s),
        Err(e) => (Err(e), Vec::new()),
    };
    Observed {
        facts,
        domains,
        stats,
    }
}
