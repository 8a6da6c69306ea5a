//! The operator's configuration: sane defaults, overridden by an optional YAML file
//! (`kvm-operator run --config FILE`, or `KVM_OPERATOR_CONFIG`; the Helm chart renders one from
//! its `config:` values into a ConfigMap). Every field of the file is optional; an unknown field
//! or a value out of range is refused at start-up with the field's path and the fix, rather than
//! silently running on a default the user did not mean.
//!
//! ```yaml
//! resync: {nodeSeconds: 30, vmSeconds: 0, poolSeconds: 120}   # vmSeconds 0: no periodic VM reconcile
//! shutdownGraceSeconds: 20
//! connectTimeoutSeconds: 15
//! placement:
//!   weights: {cpu: 300, memory: 300, load: 200, spread: 100, affinity: 100, failurePenalty: 150}
//! migrations: {maxPerNode: 2, maxTotal: 8}
//! hostFailure: {graceSeconds: 40}
//! rebalance: {enabled: false, mode: Propose, threshold: 150, intervalSeconds: 600}
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::placement::Weights;

/// The periodic VM reconcile of a `standalone --once` run, which follows no libvirt events (it
/// ends once things converge), when the configuration sets none (`resync.vmSeconds`).
pub const STANDALONE_VM_RESYNC: Duration = Duration::from_secs(300);

/// What the controllers are configured with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of Secrets a KvmNode references without a namespace (the operator's own).
    pub namespace: String,
    /// Private directory for node keys and tunnels.
    pub state_dir: PathBuf,
    /// How often a node is re-read (facts, domain list); also the batched VM resync.
    pub node_resync: Duration,
    /// How often a VM is reconciled without any event (a safety net); `None`: never (the
    /// default). A VM is looked at when it changes, on its node's domain events, when a node
    /// pass finds its domain's state or make-up changed (every `node_resync`, one bulk call per
    /// node), and when a node's event subscription is made again (events may have been missed):
    /// the idle cost grows with nodes, not VMs. A long-running standalone run follows events the
    /// same way; a `standalone --once` run follows none and uses [`STANDALONE_VM_RESYNC`] when
    /// this is `None`.
    pub vm_resync: Option<Duration>,
    /// How often a pool is refreshed.
    pub pool_resync: Duration,
    /// Graceful shutdown time before a guest is forced off (the call timeout is raised to
    /// outlast it).
    pub shutdown_grace: Duration,
    /// Timeout of the SSH handshake and libvirt connect.
    pub connect_timeout: Duration,
    /// Placement score weights.
    pub weights: Weights,
    /// Migrations running at once touching one node (as source or target).
    pub max_migrations_per_node: usize,
    /// Migrations running at once in the cluster.
    pub max_migrations: usize,
    /// Rebalancing of running VMs between nodes (off by default).
    pub rebalance: Rebalance,
    /// Leader election timing (one active replica).
    pub leader: crate::controller::leader::Timing,
    /// Keep a copy of every managed domain's definition off its host (ConfigMap / file).
    pub definition_backup: bool,
    /// How long a Ready node may go without answering before it is marked Ready=False (its VMs
    /// say Unknown at once either way; nothing is placed on it meanwhile).
    pub node_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: "kvm-operator".into(),
            state_dir: PathBuf::from("/run/kvm-operator"),
            node_resync: Duration::from_secs(30),
            vm_resync: None,
            pool_resync: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(15),
            weights: Weights::default(),
            max_migrations_per_node: 2,
            max_migrations: 8,
            rebalance: Rebalance::default(),
            leader: crate::controller::leader::Timing::default(),
            definition_backup: true,
            node_grace: Duration::from_secs(40),
        }
    }
}

/// Rebalancing: when the best and the worst node's load scores drift further apart than
/// `threshold`, move one VM from the worst toward the best, at most once per `interval`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rebalance {
    /// Off unless asked for.
    pub enabled: bool,
    /// Propose (an Event on the busiest node) or migrate (create a Migration).
    pub mode: RebalanceMode,
    /// Score points (on the scale of [`Weights`]) between the best and worst node that start a
    /// move.
    pub threshold: f64,
    /// Shortest time between two moves (the rate limit), and how often the spread is checked.
    pub interval: Duration,
}

impl Default for Rebalance {
    fn default() -> Self {
        Self {
            enabled: false,
            mode: RebalanceMode::Propose,
            threshold: 150.0,
            interval: Duration::from_secs(600),
        }
    }
}

/// What rebalancing does with a move it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum RebalanceMode {
    /// Publish the move as an Event on the busiest KvmNode; change nothing.
    Propose,
    /// Create a Migration for the move (labelled `kvm-operator.io/rebalance`).
    Migrate,
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {cause}")]
    Read { path: String, cause: String },
    #[error(
        "the configuration file {path} is not valid: {cause}; see the `config:` values of the Helm chart for the fields"
    )]
    Parse { path: String, cause: String },
    #[error("the configuration file {path}: `{field}` {problem}")]
    Invalid {
        path: String,
        field: &'static str,
        problem: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    resync: Option<ResyncFile>,
    shutdown_grace_seconds: Option<u64>,
    connect_timeout_seconds: Option<u64>,
    placement: Option<PlacementFile>,
    migrations: Option<MigrationsFile>,
    rebalance: Option<RebalanceFile>,
    leader_election: Option<LeaderFile>,
    definition_backup: Option<BackupFile>,
    host_failure: Option<HostFailureFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HostFailureFile {
    grace_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackupFile {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LeaderFile {
    lease_seconds: Option<u64>,
    renew_seconds: Option<u64>,
    retry_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ResyncFile {
    node_seconds: Option<u64>,
    vm_seconds: Option<u64>,
    pool_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PlacementFile {
    weights: Option<WeightsFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WeightsFile {
    cpu: Option<f64>,
    memory: Option<f64>,
    load: Option<f64>,
    spread: Option<f64>,
    affinity: Option<f64>,
    failure_penalty: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MigrationsFile {
    max_per_node: Option<u64>,
    max_total: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RebalanceFile {
    enabled: Option<bool>,
    mode: Option<RebalanceMode>,
    threshold: Option<f64>,
    interval_seconds: Option<u64>,
}

impl Config {
    /// The defaults overridden by the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        Self::default().with_yaml(&path.display().to_string(), &text)
    }

    /// `self` overridden by the YAML `text` (named `path` in errors).
    pub fn with_yaml(mut self, path: &str, text: &str) -> Result<Self, ConfigError> {
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.into(),
                cause: e.to_string(),
            })?
        };
        let invalid = |field: &'static str, problem: String| ConfigError::Invalid {
            path: path.into(),
            field,
            problem,
        };
        // seconds within [min, max]
        let secs = |field: &'static str,
                    v: Option<u64>,
                    min: u64,
                    max: u64,
                    into: &mut Duration| {
            match v {
                None => Ok(()),
                Some(s) if (min..=max).contains(&s) => {
                    *into = Duration::from_secs(s);
                    Ok(())
                }
                Some(s) => Err(invalid(
                    field,
                    format!("is {s}; use a whole number of seconds from {min} to {max}"),
                )),
            }
        };
        let r = file.resync.unwrap_or_default();
        secs(
            "resync.nodeSeconds",
            r.node_seconds,
            5,
            3600,
            &mut self.node_resync,
        )?;
        match r.vm_seconds {
            None => {}
            // no periodic VM reconcile
            Some(0) => self.vm_resync = None,
            Some(v) if (10..=86_400).contains(&v) => {
                self.vm_resync = Some(Duration::from_secs(v));
            }
            Some(v) => {
                return Err(invalid(
                    "resync.vmSeconds",
                    format!(
                        "is {v}; use 0 (no periodic VM reconcile) or a whole number of seconds from 10 to 86400"
                    ),
                ));
            }
        }
        secs(
            "resync.poolSeconds",
            r.pool_seconds,
            10,
            86_400,
            &mut self.pool_resync,
        )?;
        secs(
            "shutdownGraceSeconds",
            file.shutdown_grace_seconds,
            0,
            3600,
            &mut self.shutdown_grace,
        )?;
        secs(
            "hostFailure.graceSeconds",
            file.host_failure.unwrap_or_default().grace_seconds,
            0,
            3600,
            &mut self.node_grace,
        )?;
        secs(
            "connectTimeoutSeconds",
            file.connect_timeout_seconds,
            1,
            300,
            &mut self.connect_timeout,
        )?;
        let w = file.placement.and_then(|p| p.weights).unwrap_or_default();
        for (field, v, into) in [
            ("placement.weights.cpu", w.cpu, &mut self.weights.cpu),
            (
                "placement.weights.memory",
                w.memory,
                &mut self.weights.memory,
            ),
            ("placement.weights.load", w.load, &mut self.weights.load),
            (
                "placement.weights.spread",
                w.spread,
                &mut self.weights.spread,
            ),
            (
                "placement.weights.affinity",
                w.affinity,
                &mut self.weights.affinity,
            ),
            (
                "placement.weights.failurePenalty",
                w.failure_penalty,
                &mut self.weights.failure_penalty,
            ),
        ] {
            match v {
                None => {}
                Some(x) if x.is_finite() && (0.0..=1_000_000.0).contains(&x) => *into = x,
                Some(x) => {
                    return Err(invalid(
                        field,
                        format!("is {x}; use a number from 0 to 1000000 (0 turns the term off)"),
                    ));
                }
            }
        }
        let m = file.migrations.unwrap_or_default();
        for (field, v, into) in [
            (
                "migrations.maxPerNode",
                m.max_per_node,
                &mut self.max_migrations_per_node,
            ),
            ("migrations.maxTotal", m.max_total, &mut self.max_migrations),
        ] {
            match v {
                None => {}
                Some(n @ 1..=1000) => *into = n as usize,
                Some(n) => {
                    return Err(invalid(
                        field,
                        format!("is {n}; use a number from 1 to 1000"),
                    ));
                }
            }
        }
        let rb = file.rebalance.unwrap_or_default();
        if let Some(e) = rb.enabled {
            self.rebalance.enabled = e;
        }
        if let Some(m) = rb.mode {
            self.rebalance.mode = m;
        }
        match rb.threshold {
            None => {}
            Some(t) if t.is_finite() && t > 0.0 => self.rebalance.threshold = t,
            Some(t) => {
                return Err(invalid(
                    "rebalance.threshold",
                    format!(
                        "is {t}; use a positive number of score points (the default 150 is a sixth of a fully free node's score)"
                    ),
                ));
            }
        }
        secs(
            "rebalance.intervalSeconds",
            rb.interval_seconds,
            60,
            7 * 86_400,
            &mut self.rebalance.interval,
        )?;
        let le = file.leader_election.unwrap_or_default();
        secs(
            "leaderElection.leaseSeconds",
            le.lease_seconds,
            5,
            300,
            &mut self.leader.lease,
        )?;
        secs(
            "leaderElection.renewSeconds",
            le.renew_seconds,
            1,
            200,
            &mut self.leader.renew,
        )?;
        secs(
            "leaderElection.retrySeconds",
            le.retry_seconds,
            1,
            60,
            &mut self.leader.retry,
        )?;
        if let Some(e) = file.definition_backup.and_then(|b| b.enabled) {
            self.definition_backup = e;
        }
        // a leader must renew well before its lease runs out, or it loses it between renewals
        if self.leader.renew * 3 > self.leader.lease * 2 {
            return Err(invalid(
                "leaderElection.renewSeconds",
                format!(
                    "is {}s with leaseSeconds {}s; renew at most every two thirds of the lease (e.g. lease 15, renew 5)",
                    self.leader.renew.as_secs(),
                    self.leader.lease.as_secs()
                ),
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_keeps_every_default() {
        let c = Config::default().with_yaml("c.yaml", "").unwrap();
        assert_eq!(c.weights, Weights::default());
        assert_eq!(c.max_migrations, 8);
        assert_eq!(c.rebalance, Rebalance::default());
        assert!(!c.rebalance.enabled);
    }

    #[test]
    fn every_field_overrides_its_default() {
        let c = Config::default()
            .with_yaml(
                "c.yaml",
                "resync: {nodeSeconds: 45, vmSeconds: 600, poolSeconds: 60}\n\
                 shutdownGraceSeconds: 5\nconnectTimeoutSeconds: 7\n\
                 placement:\n  weights: {cpu: 1, memory: 2, load: 3, spread: 4, affinity: 5, failurePenalty: 6}\n\
                 migrations: {maxPerNode: 1, maxTotal: 3}\n\
                 rebalance: {enabled: true, mode: Migrate, threshold: 80, intervalSeconds: 120}\n\
                 leaderElection: {leaseSeconds: 30, renewSeconds: 10, retrySeconds: 4}\n\
                 definitionBackup: {enabled: false}\nhostFailure: {graceSeconds: 90}\n",
            )
            .unwrap();
        assert!(!c.definition_backup);
        assert_eq!(c.node_grace, Duration::from_secs(90));
        assert_eq!(
            c.leader,
            crate::controller::leader::Timing {
                lease: Duration::from_secs(30),
                renew: Duration::from_secs(10),
                retry: Duration::from_secs(4)
            }
        );
        assert_eq!(c.node_resync, Duration::from_secs(45));
        assert_eq!(c.vm_resync, Some(Duration::from_secs(600)));
        assert_eq!(c.pool_resync, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(7));
        assert_eq!(
            c.weights,
            Weights {
                cpu: 1.0,
                memory: 2.0,
                load: 3.0,
                spread: 4.0,
                affinity: 5.0,
                failure_penalty: 6.0
            }
        );
        assert_eq!((c.max_migrations_per_node, c.max_migrations), (1, 3));
        assert_eq!(
            c.rebalance,
            Rebalance {
                enabled: true,
                mode: RebalanceMode::Migrate,
                threshold: 80.0,
                interval: Duration::from_secs(120)
            }
        );
    }

    #[test]
    fn bad_values_name_the_field_and_the_fix() {
        for (yaml, field, hint) in [
            (
                "placement: {weights: {cpu: -1}}",
                "placement.weights.cpu",
                "from 0",
            ),
            (
                "placement: {weights: {load: .nan}}",
                "placement.weights.load",
                "from 0",
            ),
            ("migrations: {maxTotal: 0}", "migrations.maxTotal", "from 1"),
            ("resync: {nodeSeconds: 1}", "resync.nodeSeconds", "from 5"),
            (
                "rebalance: {threshold: 0}",
                "rebalance.threshold",
                "positive",
            ),
            (
                "rebalance: {intervalSeconds: 5}",
                "rebalance.intervalSeconds",
                "from 60",
            ),
            (
                "leaderElection: {leaseSeconds: 6, renewSeconds: 5}",
                "leaderElection.renewSeconds",
                "two thirds",
            ),
            (
                "leaderElection: {leaseSeconds: 1}",
                "leaderElection.leaseSeconds",
                "from 5",
            ),
            (
                "resync: {vmSeconds: 5}",
                "resync.vmSeconds",
                "use 0 (no periodic",
            ),
        ] {
            let e = Config::default().with_yaml("c.yaml", yaml).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{yaml}: {text}");
            assert!(
                text.contains(field) && text.contains(hint) && text.contains("c.yaml"),
                "{text}"
            );
        }
    }

    /// No periodic VM reconcile unless asked for; 0 turns a configured one off again.
    #[test]
    fn the_periodic_vm_reconcile_is_off_unless_configured() {
        assert_eq!(Config::default().vm_resync, None);
        let on = Config::default()
            .with_yaml("c.yaml", "resync: {vmSeconds: 900}")
            .unwrap();
        assert_eq!(on.vm_resync, Some(Duration::from_secs(900)));
        let off = on.with_yaml("c.yaml", "resync: {vmSeconds: 0}").unwrap();
        assert_eq!(off.vm_resync, None);
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_not_ignored() {
        for yaml in [
            "placement: {wieghts: {cpu: 1}}",
            "migrations: {maxPerNode: many}",
            "rebalance: {mode: Sometimes}",
            "- a list",
        ] {
            let e = Config::default().with_yaml("c.yaml", yaml).unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{yaml}: {e}");
            assert!(e.to_string().contains("c.yaml"), "{e}");
        }
    }

    #[test]
    fn a_missing_file_says_which() {
        let e = Config::from_file(Path::new("/nonexistent/kvm-operator.yaml")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/kvm-operator.yaml"),
            "{e}"
        );
    }
}
