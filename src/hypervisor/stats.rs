//! Per-domain stats of a whole node from one libvirt call (what the older web consoles showed as
//! VM "top"): CPU time, memory balloon, block and network I/O.

use super::ffi::{RawDomainStats, StatValue};

/// The stats groups the operator asks for.
pub const GROUPS: u32 = virt::sys::VIR_DOMAIN_STATS_STATE
    | virt::sys::VIR_DOMAIN_STATS_CPU_TOTAL
    | virt::sys::VIR_DOMAIN_STATS_BALLOON
    | virt::sys::VIR_DOMAIN_STATS_VCPU
    | virt::sys::VIR_DOMAIN_STATS_INTERFACE
    | virt::sys::VIR_DOMAIN_STATS_BLOCK;

/// One domain's figures. Counters are cumulative since the domain started.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DomainStats {
    pub domain: String,
    pub uuid: String,
    /// libvirt state code (`state.state`).
    pub state: Option<u64>,
    pub cpu_time_ns: Option<u64>,
    pub vcpus: Option<u64>,
    /// Memory the guest has now (balloon), KiB.
    pub balloon_current_kib: Option<u64>,
    /// Memory the guest may have, KiB.
    pub balloon_maximum_kib: Option<u64>,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// What the domain is made of as these figures show it (see [`shape`]).
    pub shape: u64,
}

/// A fingerprint of what a domain is made of, as bulk stats show it: vCPUs (current and
/// maximum), the memory ceiling, and each disk's and NIC's name and source. Counters and the
/// balloon's current size (which the guest moves) are left out, so two readings differ only when
/// the domain itself was changed: a CPU or memory change, a device added or removed, a disk given
/// another source, even when no lifecycle event said so (live changes emit none).
pub fn shape(raw: &RawDomainStats) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for k in ["vcpu.current", "vcpu.maximum", "balloon.maximum"] {
        raw.params.get(k).and_then(StatValue::as_u64).hash(&mut h);
    }
    for (prefix, fields) in [("block", &["name", "path"][..]), ("net", &["name"][..])] {
        let count = raw
            .params
            .get(&format!("{prefix}.count"))
            .and_then(StatValue::as_u64)
            .unwrap_or(0)
            .min(4096);
        count.hash(&mut h);
        for i in 0..count {
            for f in fields {
                match raw.params.get(&format!("{prefix}.{i}.{f}")) {
                    Some(StatValue::Text(t)) => t.hash(&mut h),
                    other => other.and_then(StatValue::as_u64).hash(&mut h),
                }
            }
        }
    }
    h.finish()
}

fn sum(raw: &RawDomainStats, prefix: &str, count_key: &str, suffix: &str) -> u64 {
    let n = raw
        .params
        .get(count_key)
        .and_then(StatValue::as_u64)
        .unwrap_or(0)
        .min(4096);
    (0..n)
        .filter_map(|i| {
            raw.params
                .get(&format!("{prefix}.{i}.{suffix}"))
                .and_then(StatValue::as_u64)
        })
        .fold(0u64, u64::saturating_add)
}

impl From<&RawDomainStats> for DomainStats {
    fn from(raw: &RawDomainStats) -> Self {
        let get = |k: &str| raw.params.get(k).and_then(StatValue::as_u64);
        DomainStats {
            domain: raw.domain.clone(),
            uuid: raw.uuid.clone(),
            state: get("state.state"),
            cpu_time_ns: get("cpu.time"),
            vcpus: get("vcpu.current"),
            balloon_current_kib: get("balloon.current"),
            balloon_maximum_kib: get("balloon.maximum"),
            block_read_bytes: sum(raw, "block", "block.count", "rd.bytes"),
            block_write_bytes: sum(raw, "block", "block.count", "wr.bytes"),
            net_rx_bytes: sum(raw, "net", "net.count", "rx.bytes"),
            net_tx_bytes: sum(raw, "net", "net.count", "tx.bytes"),
            shape: shape(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn sums_devices_and_tolerates_missing_or_hostile_counts() {
        let mut params = BTreeMap::new();
        for (k, v) in [
            ("state.state", 1u64),
            ("cpu.time", 5_000_000),
            ("balloon.current", 65536),
            ("block.count", 2),
            ("block.0.rd.bytes", 100),
            ("block.1.rd.bytes", 50),
            ("block.1.wr.bytes", 7),
            ("net.count", u64::MAX),
            ("net.0.rx.bytes", 9),
        ] {
            params.insert(k.to_string(), StatValue::UInt(v));
        }
        params.insert("vcpu.current".into(), StatValue::Text("x".into()));
        let s = DomainStats::from(&RawDomainStats {
            domain: "d".into(),
            uuid: "u".into(),
            params,
        });
        assert_eq!(s.cpu_time_ns, Some(5_000_000));
        assert_eq!((s.block_read_bytes, s.block_write_bytes), (150, 7));
        assert_eq!(s.net_rx_bytes, 9);
        assert_eq!(s.vcpus, None);
        assert_eq!(s.balloon_maximum_kib, None);
    }
}
