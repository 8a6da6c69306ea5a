//! What a node is right now: host facts, its domains and their figures, each read once.

use std::time::Duration;

use crate::hypervisor::host_facts::HostFacts;
use crate::hypervisor::stats::DomainStats;
use crate::hypervisor::{BulkListing, DomainSummary, HvError, Hypervisor};

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
    /// `stats` were read in full now; false: only the states are new (see
    /// [`crate::hypervisor::Connection::domains_with_stats`]), not for metrics.
    pub fresh: bool,
}

/// Reads `node` through the hypervisor layer; CPU use is sampled over `sample`. Figures read in
/// full within `figures_fresh` stand, and only the domains' states are read anew.
pub async fn observe(
    hv: &impl Hypervisor,
    node: &str,
    sample: Duration,
    figures_fresh: Duration,
) -> Observed {
    // side by side: a host that stops answering costs one timeout, not the sum of two. The
    // domains, their states and figures come from one bulk stats call; stamps are read only for
    // domains the connection has not seen before
    let (facts, listed) = tokio::join!(
        hv.host_facts(node, sample),
        hv.call(node, "list domains", move |c| {
            match c.domains_with_stats(figures_fresh) {
                Ok(x) => Ok(x),
                // a daemon without bulk stats: the plain listing (and no figures)
                Err(_) => c.list_domains().map(|domains| BulkListing {
                    domains,
                    stats: Vec::new(),
                    fresh: true,
                }),
            }
        })
    );
    let (domains, stats, fresh) = match listed {
        Ok(l) => (Ok(l.domains), l.stats, l.fresh),
        Err(e) => (Err(e), Vec::new(), true),
    };
    Observed {
        facts,
        domains,
        stats,
        fresh,
    }
}
