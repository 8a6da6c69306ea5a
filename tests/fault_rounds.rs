//! The fault-injection suite: the real operator binary (`kvm-operator standalone`, the same
//! controllers as in a cluster) runs against the lab's two namespace hosts while, round after
//! round, the desired state changes and one fault is injected: a host's libvirtd killed and
//! restarted, its sshd killed and restarted, its network link cut and restored, the operator
//! killed (SIGKILL) mid-provision or mid-migration and restarted, or a volume clone starved of
//! space. After each fault clears, every VM must converge within a bound, and at every look no
//! VM may run on two hosts, no domain or volume of ours may be lost or leaked, and the status
//! must say what the hosts have.
//!
//! Randomised with a fixed seed, printed for replay: `FAULT_SEED=<n> FAULT_ROUNDS=<n> cargo test
//! --test fault_rounds -- --nocapture`; `FAULT_PICK=net:migrate[:1]` plays one fault and change
//! every round; `FAULT_KEEP=1` leaves a failed run's domains and files. Runs through README's
//! test command (the lab's KVM_LAB_* variables); every fault is undone before the next round.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_operator::hypervisor::DomainState;
use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::{HvError, NodeAccess};

const HOSTS: [&str; 2] = ["host1", "host2"];
/// How long a VM may take to converge after a fault clears.
const BOUND: Duration = Duration::from_secs(150);
/// How long a host fault may take to show in the statuses (node not Ready, its VMs Unknown).
const REPORT_BOUND: Duration = Duration::from_secs(90);
const TEMPLATE: &str = "fault-template.raw";
const TEMPLATE_BYTES: usize = 3 << 20;

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| {
        panic!("{k} is not set: run the tests through README's test command (hack/test.sh)")
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab(args: &[&str]) {
    let out = Command::new(root().join("hack/lab.sh"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const SRC: u64 = 101;
const DST: u64 = 102;

/// `FAULT_PICK`: `libvirtd|sshd|net|operator|space` `:` `toggle|migrate|provision|clone`, then
/// optionally `:1` or `:2` for the host (with migrate also `:src` or `:dst`, the migration's
/// source or target host).
fn parse_pick(p: &str) -> (Fault, &'static str, Option<u64>) {
    let parts: Vec<&str> = p.split(':').collect();
    let fault = match parts.first().copied() {
        Some("libvirtd") => Fault::Libvirtd,
        Some("sshd") => Fault::Sshd,
        Some("net") => Fault::Net,
        Some("operator") => Fault::OperatorKilled,
        Some("space") => Fault::NoSpace,
        _ => panic!("FAULT_PICK={p:?}: the fault is one of libvirtd, sshd, net, operator, space"),
    };
    let change = match (fault, parts.get(1).copied()) {
        (Fault::NoSpace, Some("clone") | None) => "clone",
        (Fault::NoSpace, _) => panic!("FAULT_PICK={p:?}: a space fault goes with clone"),
        (_, Some("toggle")) => "toggle",
        (_, Some("migrate")) => "migrate",
        (_, Some("provision")) => "provision",
        _ => panic!("FAULT_PICK={p:?}: the change is one of toggle, migrate, provision"),
    };
    let host = match (fault, parts.get(2).copied()) {
        (_, None) => None,
        (Fault::NoSpace, Some("1")) => Some(1),
        (Fault::NoSpace, _) => panic!("FAULT_PICK={p:?}: the small file system is on host 1"),
        (_, Some("1")) => Some(1),
        (_, Some("2")) => Some(2),
        // resolved once the round knows where fr-m1 runs
        (_, Some("src")) if change == "migrate" => Some(SRC),
        (_, Some("dst")) if change == "migrate" => Some(DST),
        _ => panic!("FAULT_PICK={p:?}: the host is 1 or 2 (src or dst with migrate)"),
    };
    (fault, change, host)
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// xorshift64*: small, deterministic, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Libvirtd,
    Sshd,
    Net,
    OperatorKilled,
    NoSpace,
}

/// What the manifests ask for.
#[derive(Clone, Debug)]
struct Vm {
    running: bool,
    /// `(pool, disk)` of the volumes the operator creates for it.
    disks: Vec<(&'static str, String)>,
    yaml: String,
}

struct Desired {
    vms: BTreeMap<String, Vm>,
    migrations: Vec<String>,
}

fn vm_yaml(name: &str, running: bool, disk: &str) -> String {
    format!(
        "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec:\n  vcpus: 1\n  memory: 64Mi\n  runStrategy: {}\n  console: {{vnc: false}}\n{disk}",
        if running { "Running" } else { "Stopped" }
    )
}

impl Desired {
    fn write(&self, dir: &Path) {
        let mut text = String::new();
        for vm in self.vms.values() {
            text.push_str("---\n");
            text.push_str(&vm.yaml);
        }
        std::fs::write(dir.join("vms.yaml.tmp"), text).unwrap();
        // whole files only: the operator never reads a half-written manifest
        std::fs::rename(dir.join("vms.yaml.tmp"), dir.join("vms.yaml")).unwrap();
    }

    fn set_running(&mut self, name: &str, running: bool) {
        let vm = self.vms.get_mut(name).unwrap();
        vm.running = running;
        vm.yaml = vm.yaml.replace(
            if running {
                "runStrategy: Stopped"
            } else {
                "runStrategy: Running"
            },
            if running {
                "runStrategy: Running"
            } else {
                "runStrategy: Stopped"
            },
        );
    }
}

/// One look at everything: the operator's state file and both hosts.
#[derive(Debug, Default)]
struct Look {
    /// object key → (uid, status)
    objects: BTreeMap<String, (String, serde_json::Value)>,
    /// owner uid → [(host, domain uuid, state)]
    domains: BTreeMap<String, Vec<(String, String, DomainState)>>,
    /// (host, pool) → volume names
    volumes: BTreeMap<(String, String), BTreeSet<String>>,
    /// hosts that did not answer
    unreachable: BTreeSet<String>,
    /// domain name → [(host, owner uid if stamped, state)]: what a failure message shows
    named: BTreeMap<String, Vec<(String, Option<String>, DomainState)>>,
}

impl Look {
    fn vm(&self, name: &str) -> Option<&(String, serde_json::Value)> {
        self.objects.get(&format!("VirtualMachine/default/{name}"))
    }

    /// VMs running on two hosts at once (a paused incoming migration is not running).
    fn duplicates(&self) -> Vec<String> {
        self.domains
            .iter()
            .filter(|(_, ds)| {
                ds.iter()
                    .filter(|(_, _, s)| *s == DomainState::Running)
                    .count()
                    > 1
            })
            .map(|(uid, ds)| format!("{uid}: {ds:?}"))
            .collect()
    }
}

async fn look(hv: &Arc<NodePool>, state: &Path) -> Look {
    let mut l = Look::default();
    if let Ok(text) = std::fs::read_to_string(state.join("status.yaml")) {
        let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        for (k, o) in v["objects"].as_object().into_iter().flatten() {
            l.objects.insert(
                k.clone(),
                (
                    o["uid"].as_str().unwrap_or_default().to_string(),
                    o["status"].clone(),
                ),
            );
        }
    }
    for host in HOSTS {
        hv.reset_backoff(host);
        let listed = hv
            .call(host, "fault suite look", |c| {
                let domains = c.list_domains()?;
                let mut vols = BTreeMap::new();
                for pool in ["lab-images", "fault-space"] {
                    match c.list_volumes(pool) {
                        Ok(v) => {
                            vols.insert(pool.to_string(), v.into_iter().collect::<BTreeSet<_>>());
                        }
                        Err(HvError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok((domains, vols))
            })
            .await;
        match listed {
            Ok((domains, vols)) => {
                for d in domains {
                    l.named.entry(d.name.clone()).or_default().push((
                        host.to_string(),
                        d.owner.as_ref().map(|o| o.uid.clone()),
                        d.state,
                    ));
                    if let Some(o) = d.owner {
                        l.domains.entry(o.uid).or_default().push((
                            host.to_string(),
                            d.uuid,
                            d.state,
                        ));
                    }
                }
                for (pool, names) in vols {
                    l.volumes.insert((host.to_string(), pool), names);
                }
            }
            Err(_) => {
                l.unreachable.insert(host.to_string());
            }
        }
    }
    l
}

/// Why `l` is not converged to `want`, or None when it is.
fn not_converged(want: &Desired, l: &Look) -> Option<String> {
    if !l.unreachable.is_empty() {
        return Some(format!("hosts not answering: {:?}", l.unreachable));
    }
    for (name, vm) in &want.vms {
        let Some((uid, st)) = l.vm(name) else {
            return Some(format!("{name}: not in the state file yet"));
        };
        let ds = l.domains.get(uid).cloned().unwrap_or_default();
        let [(host, _, state)] = ds.as_slice() else {
            // what the hosts have under that name, stamped or not, says where it went
            let named = l.named.get(&format!("default_{name}"));
            return Some(format!(
                "{name}: {} domains {ds:?} stamped with the state file's uid {uid}; by name: {named:?}",
                ds.len()
            ));
        };
        let want_state = if vm.running {
            DomainState::Running
        } else {
            DomainState::Shutoff
        };
        if *state != want_state {
            return Some(format!("{name}: {state:?} on {host}, wants {want_state:?}"));
        }
        // the status tells the truth: where it is and what it does
        if st["node"].as_str() != Some(host.as_str()) {
            return Some(format!("{name}: status.node {} but on {host}", st["node"]));
        }
        let power = if vm.running { "Running" } else { "Stopped" };
        if st["powerState"].as_str() != Some(power) {
            return Some(format!("{name}: status.powerState {}", st["powerState"]));
        }
        for (pool, disk) in &vm.disks {
            let vol = format!("default-{name}-{disk}");
            let has = |h: &str| {
                l.volumes
                    .get(&(h.to_string(), pool.to_string()))
                    .is_some_and(|v| v.iter().any(|v| is_volume_of(v, &vol)))
            };
            if !has(host) {
                return Some(format!("{name}: volume {pool}/{vol} missing on {host}"));
            }
        }
    }
    for m in &want.migrations {
        let Some((_, st)) = l.objects.get(&format!("Migration/default/{m}")) else {
            return Some(format!("Migration {m}: not in the state file yet"));
        };
        let phase = st["phase"].as_str().unwrap_or("Pending");
        if !["Succeeded", "Failed", "Cancelled"].contains(&phase) {
            return Some(format!("Migration {m}: {phase}"));
        }
    }
    None
}

/// `volume` is the one named `base` (the operator adds the format's extension).
fn is_volume_of(volume: &str, base: &str) -> bool {
    volume == base
        || volume
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('.') && !rest[1..].contains('.'))
}

/// Volumes of ours that belong to no VM on that host (leaked), and VMs' volumes missing.
fn leaks(want: &Desired, l: &Look) -> Vec<String> {
    let mut out = Vec::new();
    for ((host, pool), names) in &l.volumes {
        for v in names {
            if !v.starts_with("default-fr-") {
                continue;
            }
            let owner = want.vms.iter().find(|(name, vm)| {
                vm.disks
                    .iter()
                    .any(|(p, d)| p == pool && is_volume_of(v, &format!("default-{name}-{d}")))
            });
            let on_its_host = owner.is_some_and(|(name, _)| {
                l.vm(name)
                    .is_some_and(|(_, st)| st["node"].as_str() == Some(host.as_str()))
            });
            if !on_its_host {
                out.push(format!("{host}/{pool}/{v}"));
            }
        }
    }
    out
}

struct Operator {
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Operator {
    fn start(&mut self, dir: &Path, config: &Path) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kvm-operator"))
            .args(["standalone", "-f"])
            .arg(dir)
            .arg("--config")
            .arg(config)
            // FAULT_LOG_LEVEL=info (or debug) for a replay that shows what the operator did
            .env(
                "KVM_OPERATOR_LOG",
                std::env::var("FAULT_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL: no cleanup, no state saved beyond the last round
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// How the operator ended, when it did (a signal means it crashed).
    fn ended(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        Some(match st.signal() {
            Some(sig) => format!(
                "killed by signal {sig}{}",
                if st.core_dumped() {
                    " (core dumped)"
                } else {
                    ""
                }
            ),
            None => format!("exited with {st}"),
        })
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls until `f` holds on a look, or `limit` passes; every look is checked for VMs running
/// twice. Returns the elapsed time, or the last reason.
async fn until(
    hv: &Arc<NodePool>,
    state: &Path,
    limit: Duration,
    duplicates: &mut Vec<String>,
    mut f: impl FnMut(&Look) -> Option<String>,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let l = look(hv, state).await;
        duplicates.extend(l.duplicates());
        let why = f(&l);
        match why {
            None => return Ok(t0.elapsed()),
            Some(w) if t0.elapsed() > limit => return Err(w),
            Some(_) => tokio::time::sleep(Duration::from_millis(700)).await,
        }
    }
}

fn node_ready(l: &Look, host: &str) -> Option<bool> {
    l.objects
        .get(&format!("KvmNode/{host}"))
        .and_then(|(_, st)| {
            st["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["status"] == "True")
        })
}

/// Undoes any fault a round may have left: links up, libvirtd and sshd running, space free.
fn undo_faults() {
    for n in ["1", "2"] {
        let _ = Command::new(root().join("hack/lab.sh"))
            .args(["fault", "net", "up", n])
            .output();
        for what in ["libvirtd", "sshd"] {
            let _ = Command::new(root().join("hack/lab.sh"))
                .args(["fault", what, "start", n])
                .output();
        }
    }
    lab(&["fault", "space", "free", "1"]);
}

/// Removes what this suite makes on the hosts (`fr-` names), before and after it runs.
async fn cleanup(hv: &Arc<NodePool>) {
    for host in HOSTS {
        hv.reset_backoff(host);
        let _ = hv
            .call(host, "fault suite cleanup", |c| {
                for d in c.list_domains()? {
                    if d.name.starts_with("default_fr-") {
                        let _ = c.destroy(&d.name);
                        let _ = c.undefine(&d.name);
                    }
                }
                for pool in ["lab-images", "fault-space"] {
                    for v in c.list_volumes(pool).unwrap_or_default() {
                        if v.starts_with("default-fr-") {
                            let _ = c.delete_volume(pool, &v);
                        }
                    }
                }
                Ok(())
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_survived_with_nothing_run_twice_lost_or_leaked() {
    let work = tempfile::tempdir().unwrap();
    // the suite's own view of the hosts, apart from the operator's
    let key = std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap();
    let hv = Arc::new(NodePool::new(Duration::from_secs(20)));
    for (i, host) in HOSTS.iter().enumerate() {
        let n = i + 1;
        let spec = serde_json::from_value(serde_json::json!({
            "address": env(&format!("KVM_LAB_HOST{n}_ADDR")), "user": "root",
            "sshKeySecretRef": {"name": "lab-key"},
            "hostKeyFingerprint": env(&format!("KVM_LAB_HOST{n}_FINGERPRINT")),
        }))
        .unwrap();
        hv.upsert(NodeAccess {
            name: host.to_string(),
            spec,
            private_key: Some(key.clone()),
            state_dir: work.path().join("suite"),
            tls: None,
            timeout: Duration::from_secs(3),
        });
    }

    // a run killed mid-round (not one that failed: that undoes its fault below) may have left
    // a host cut off or stopped
    undo_faults();
    cleanup(&hv).await;
    // the suite runs as a task so that whatever happens, the hosts are cleaned afterwards
    let r = tokio::spawn(suite(hv.clone(), work.path().to_path_buf())).await;
    undo_faults();
    if let Err(e) = r {
        // FAULT_KEEP=1 leaves a failed run's domains, volumes and work directory to look at
        if std::env::var_os("FAULT_KEEP").is_some() {
            let kept = work.keep();
            println!(
                "FAULT_KEEP: the hosts' fr- domains and {} are kept",
                kept.display()
            );
        } else {
            cleanup(&hv).await;
        }
        std::panic::resume_unwind(e.into_panic());
    }
    cleanup(&hv).await;
}

async fn suite(hv: Arc<NodePool>, work: PathBuf) {
    let seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_123);
    let rounds: u32 = std::env::var("FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    println!("fault suite: seed {seed}, {rounds} rounds (replay: FAULT_SEED={seed})");
    let pick = std::env::var("FAULT_PICK").ok().map(|p| parse_pick(&p));
    let mut rng = Rng(seed.max(1));

    let dir = work.join("manifests");
    let state = dir.join(".kvm-operator");
    let config = work.join("config.yaml");
    std::fs::write(
        &config,
        "resync: {nodeSeconds: 5, vmSeconds: 10, poolSeconds: 10}\n\
         connectTimeoutSeconds: 3\nshutdownGraceSeconds: 3\nhostFailure: {graceSeconds: 5}\n",
    )
    .unwrap();
    lab(&["manifests", dir.to_str().unwrap()]);
    // 50 rounds leave some 30 small VMs on two lab hosts of 4 CPUs: let vCPUs be overcommitted
    // far enough that capacity is never what a round runs into
    let nodes = dir.join("lab-nodes.yaml");
    let text = std::fs::read_to_string(&nodes).unwrap();
    assert!(text.contains("  user: root\n"), "{text}");
    std::fs::write(
        &nodes,
        text.replace("  user: root\n", "  user: root\n  overcommit: {cpu: 16}\n"),
    )
    .unwrap();
    lab(&["fault", "space", "setup", "1"]);
    std::fs::write(
        dir.join("space-pool.yaml"),
        "apiVersion: kvm-operator.io/v1alpha1\nkind: StoragePool\nmetadata: {name: fault-space}\n\
         spec: {nodeName: host1, type: dir, targetPath: /var/lib/libvirt/kvmlab-space/pool}\n",
    )
    .unwrap();
    let disk = |pool: &str, size: &str| {
        format!("  disks: [{{name: root, new: {{pool: {pool}, size: {size}}}}}]\n")
    };
    let mut want = Desired {
        vms: BTreeMap::new(),
        migrations: vec![],
    };
    for (name, running) in [("fr-w1", true), ("fr-w2", false)] {
        want.vms.insert(
            name.into(),
            Vm {
                running,
                disks: vec![("lab-images", "root".into())],
                yaml: vm_yaml(name, running, &disk("lab-images", "32Mi")),
            },
        );
    }
    // diskless: it moves between the hosts by Migrations
    want.vms.insert(
        "fr-m1".into(),
        Vm {
            running: true,
            disks: vec![],
            yaml: vm_yaml("fr-m1", true, ""),
        },
    );
    want.write(&dir);

    let mut op = Operator {
        child: None,
        // FAULT_LOG=<file> keeps the operator's output after the run
        log: std::env::var_os("FAULT_LOG").map_or_else(|| work.join("operator.log"), PathBuf::from),
        starts: 0,
    };
    op.start(&dir, &config);
    let mut duplicates = Vec::new();
    let t = until(&hv, &state, BOUND, &mut duplicates, |l| {
        not_converged(&want, l)
    })
    .await;
    if let Err(why) = t {
        panic!(
            "the initial objects did not converge: {why}\n{}",
            std::fs::read_to_string(&op.log).unwrap_or_default()
        );
    }
    // the template that space-starved clones copy: real data, so a copy needs real space
    let data: Vec<u8> = (0..TEMPLATE_BYTES).map(|_| rng.next() as u8).collect();
    hv.call("host1", "template", move |c| {
        use kvm_operator::api::virtual_machine::VolumeFormat;
        if c.volume_info("fault-space", TEMPLATE).is_err() {
            c.create_volume(
                "fault-space",
                TEMPLATE,
                TEMPLATE_BYTES as u64,
                VolumeFormat::Raw,
            )?;
        }
        c.upload("fault-space", TEMPLATE, &data)
    })
    .await
    .unwrap();

    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut worst = Duration::ZERO;
    let mut losses: Vec<String> = Vec::new();
    // domain UUID of each VM once it converged: a new UUID means the domain was lost and made
    // again
    let mut uuids: BTreeMap<String, String> = BTreeMap::new();
    let mut space_vms = 0u32;
    let mut provisioned = 0u32;
    for round in 1..=rounds {
        let fault = match rng.below(5) {
            0 => Fault::Libvirtd,
            1 => Fault::Sshd,
            2 => Fault::Net,
            3 => Fault::OperatorKilled,
            _ => Fault::NoSpace,
        };
        // the small file system is on host1
        let host_n = if fault == Fault::NoSpace {
            1
        } else {
            1 + rng.below(2)
        };
        // the change that is in flight when the fault hits
        let change = match (fault, rng.below(3)) {
            (Fault::NoSpace, _) => "clone",
            (_, 0) => "toggle",
            (_, 1) => "migrate",
            _ => "provision",
        };
        // FAULT_PICK=<fault>:<change>[:<host>] replays one combination every round (the random
        // sequence is still drawn, so the rest of the round stays as the seed says)
        let (fault, change, host_n) = match pick.as_ref() {
            Some((f, c, h)) => (*f, *c, h.unwrap_or(host_n)),
            None => (fault, change, host_n),
        };
        let mut host = HOSTS[(host_n as usize).clamp(1, 2) - 1];
        if fault == Fault::NoSpace {
            // fill first, so the clone meets a full file system
            lab(&["fault", "space", "fill", "1"]);
        }
        let note = match change {
            "toggle" => {
                let name = if rng.below(2) == 0 { "fr-w1" } else { "fr-w2" };
                let now = want.vms[name].running;
                want.set_running(name, !now);
                format!("{name} running={}", !now)
            }
            "migrate" => {
                let l = look(&hv, &state).await;
                let from = l
                    .vm("fr-m1")
                    .and_then(|(uid, _)| l.domains.get(uid))
                    .and_then(|d| d.first())
                    .map_or_else(|| "host1".to_string(), |d| d.0.clone());
                let to = if from == "host1" { "host2" } else { "host1" };
                let m = format!("fr-m1-r{round}");
                std::fs::write(
                    dir.join(format!("{m}.yaml")),
                    format!(
                        "apiVersion: kvm-operator.io/v1alpha1\nkind: Migration\n\
                         metadata: {{name: {m}}}\nspec: {{vmName: fr-m1, targetNode: {to}, mode: Live}}\n"
                    ),
                )
                .unwrap();
                want.migrations.push(m);
                match host_n {
                    SRC => host = if from == "host1" { "host1" } else { "host2" },
                    DST => host = if to == "host1" { "host1" } else { "host2" },
                    _ => {}
                }
                format!("fr-m1 {from} -> {to}")
            }
            "provision" => {
                provisioned += 1;
                let name = format!("fr-p{provisioned}");
                want.vms.insert(
                    name.clone(),
                    Vm {
                        running: false,
                        disks: vec![("lab-images", "root".into())],
                        yaml: vm_yaml(&name, false, &disk("lab-images", "16Mi")),
                    },
                );
                name
            }
            _ => {
                space_vms += 1;
                let name = format!("fr-fs{space_vms}");
                want.vms.insert(
                    name.clone(),
                    Vm {
                        running: false,
                        disks: vec![("fault-space", "root".into())],
                        yaml: vm_yaml(
                            &name,
                            false,
                            &format!(
                                "  disks: [{{name: root, clone: {{pool: fault-space, template: {TEMPLATE}, format: raw}}}}]\n"
                            ),
                        ),
                    },
                );
                name
            }
        };
        let hs = if host == "host1" { "1" } else { "2" };
        want.write(&dir);
        // let the operation get under way
        tokio::time::sleep(rng.millis(0, 1500)).await;
        let cleared_at;
        match fault {
            Fault::Libvirtd | Fault::Net => {
                let (what, stop, start) = if fault == Fault::Libvirtd {
                    ("libvirtd", "stop", "start")
                } else {
                    ("net", "down", "up")
                };
                lab(&["fault", what, stop, hs]);
                // held until the operator tells the truth, at most REPORT_BOUND: the node is not Ready
                // and its VMs' power state is Unknown (not Pending, not their last state)
                // (90 s: grace 5 s, libvirt's keepalive 20 s, and a standalone round whose pool
                // phase waits out calls on the dead link before the next node pass)
                let reported = until(&hv, &state, REPORT_BOUND, &mut duplicates, |l| {
                    if node_ready(l, host) != Some(false) {
                        return Some(format!("{host} still Ready"));
                    }
                    l.objects
                        .iter()
                        .filter(|(k, (_, st))| {
                            k.starts_with("VirtualMachine/") && st["node"].as_str() == Some(host)
                        })
                        .find(|(_, (_, st))| st["powerState"] != "Unknown")
                        .map(|(k, (_, st))| format!("{k}: powerState {}", st["powerState"]))
                })
                .await;
                lab(&["fault", what, start, hs]);
                cleared_at = Instant::now();
                if let Err(why) = reported {
                    panic!("round {round}: {what} {stop} on {host} never reported: {why}");
                }
            }
            Fault::Sshd => {
                lab(&["fault", "sshd", "stop", hs]);
                tokio::time::sleep(rng.millis(1000, 4000)).await;
                lab(&["fault", "sshd", "start", hs]);
                cleared_at = Instant::now();
            }
            Fault::OperatorKilled => {
                op.kill();
                tokio::time::sleep(rng.millis(300, 2000)).await;
                op.start(&dir, &config);
                cleared_at = Instant::now();
            }
            Fault::NoSpace => {
                // the operator says why the clone cannot be made, and makes nothing half
                let name = format!("fr-fs{space_vms}");
                let said = until(&hv, &state, Duration::from_secs(60), &mut duplicates, |l| {
                    let msg = l
                        .vm(&name)
                        .map(|(_, st)| st["conditions"].to_string())
                        .unwrap_or_default();
                    (!msg.contains("space")).then(|| format!("{name}: {msg}"))
                })
                .await;
                lab(&["fault", "space", "free", "1"]);
                cleared_at = Instant::now();
                if let Err(why) = said {
                    panic!(
                        "round {round}: no space on host1 never reported: {why}\n{}",
                        std::fs::read_to_string(&op.log).unwrap_or_default()
                    );
                }
            }
        }
        *injected.entry(fault).or_default() += 1;
        if !op.alive() {
            panic!(
                "round {round}: the operator exited\n{}",
                std::fs::read_to_string(&op.log).unwrap_or_default()
            );
        }
        let converged = until(&hv, &state, BOUND, &mut duplicates, |l| {
            not_converged(&want, l)
        })
        .await;
        let took = cleared_at.elapsed();
        let l = look(&hv, &state).await;
        // the operator must live through every fault (a crash is a finding of its own)
        if let Some(how) = op.ended() {
            panic!(
                "round {round} ({fault:?} on {host}, {change} {note}): the operator {how}\n{}",
                tail(&op.log, 60)
            );
        }
        if let Err(why) = converged {
            let tail = tail(&op.log, 60);
            panic!(
                "round {round} ({fault:?} on {host}, {change} {note}): not converged within {BOUND:?}: {why}\n{tail}"
            );
        }
        worst = worst.max(took);
        for name in want.vms.keys() {
            let (uid, _) = l.vm(name).unwrap();
            let uuid = l.domains[uid][0].1.clone();
            if let Some(old) = uuids.insert(name.clone(), uuid.clone())
                && old != uuid
            {
                losses.push(format!(
                    "round {round}: {name}'s domain {old} replaced by {uuid}"
                ));
            }
        }
        let leaked = leaks(&want, &l);
        assert!(
            leaked.is_empty(),
            "round {round}: leaked volumes {leaked:?}"
        );
        println!(
            "round {round:>2}: {fault:<14?} {host} while {change} ({note}): converged {:.1}s after it cleared",
            took.as_secs_f64()
        );
    }
    op.kill();
    let total: u32 = injected.values().sum();
    println!(
        "fault suite: seed {seed}: {total} faults injected in {rounds} rounds {injected:?}; convergence max {:.1}s (bound {}s); duplicates {}; losses {}; operator starts {}",
        worst.as_secs_f64(),
        BOUND.as_secs(),
        duplicates.len(),
        losses.len(),
        op.starts
    );
    assert!(
        duplicates.is_empty(),
        "VMs running on two hosts: {duplicates:?}"
    );
    assert!(losses.is_empty(), "domains lost: {losses:?}");
}
