//! The control plane on libvirt's `test:///` driver: no lab, no cluster
//! (`cargo bench --bench control_plane`; `BENCH_QUICK=1` runs small numbers as a smoke test,
//! `BENCH_ONLY=overhead|idle|memory` one scenario). Scenarios of the benchmark issue:
//!
//! 1. control-plane overhead: N VirtualMachines to Running across test nodes through standalone
//!    mode's reconcile loop (the controllers' cores, as `kvm-operator standalone --once` runs
//!    them) vs the raw libvirt define + start of the same domain XML on connections to the same
//!    nodes; alternating repetitions, medians;
//! 4. idle cost: calls per minute with nothing changing, counted two ways (the operator's calls
//!    on a connection, and the libvirt API calls that would be RPCs to a remote daemon, read from
//!    libvirt's own debug log), for the standalone loop and for the cluster's schedule;
//! 5. memory: peak RSS of the real binary bringing 2,000 VMs on 100 test nodes to Running.
//!
//! Placement (scenario 6) is `benches/placement.rs`.
//!
//! Every node is its own `test:///<dir>/node-k.xml`: libvirt's test driver gives each connection
//! opened on a file its own in-memory hypervisor (while `test:///default` is one instance shared
//! by the whole process), so ten node files are ten independent hosts.
//!
//! Each scenario prints one line ending in its ratio or figure and the target. Absolute times
//! depend on the (shared, noisy) machine; ratios are measured side by side in one run.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_operator::api::virtual_machine::PowerState;
use kvm_operator::controller::standalone::{Options, Standalone};
use kvm_operator::controller::{Config, backup, kvm_node, virtual_machine};
use kvm_operator::hypervisor::Connection;
use kvm_operator::hypervisor::cache::{NodePool, calls_made};
use kvm_operator::hypervisor::domain_xml::DomainXml;

/// Set in the child process that counts libvirt API calls (see [`idle`]).
const CHILD_ENV: &str = "KVM_BENCH_IDLE_CHILD";
/// How often the cluster's event follower checks each node's connection (`Context::follow`).
const EVENT_CHECK: Duration = Duration::from_secs(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

fn vm_name(i: usize) -> String {
    format!("vm-{i:05}")
}

/// A test-driver host: 128 CPUs, 256 GiB, and the given domains (defined and running).
fn node_xml(domains: &[&str]) -> String {
    let mut s = String::from(
        "<node>\n  <cpu><mhz>2000</mhz><model>bench</model><active>128</active><nodes>1</nodes>\
         <sockets>4</sockets><cores>8</cores><threads>4</threads></cpu>\n  <memory>268435456</memory>\n",
    );
    for d in domains {
        s.push_str(d);
        s.push('\n');
    }
    s.push_str("</node>\n");
    s
}

fn uri(file: &Path) -> String {
    format!("test://{}", file.display())
}

/// A setup on disk: node files, manifests (`m/`), state (`state/`).
struct Setup {
    dir: tempfile::TempDir,
    node_files: Vec<PathBuf>,
}

impl Setup {
    fn new(nodes: usize, vms: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nd = dir.path().join("nodes");
        let m = dir.path().join("m");
        std::fs::create_dir_all(&nd).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        let node_files: Vec<PathBuf> = (0..nodes)
            .map(|i| {
                let f = nd.join(format!("{}.xml", node_name(i)));
                std::fs::write(&f, node_xml(&[])).unwrap();
                f
            })
            .collect();
        let docs: Vec<String> = node_files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                format!(
                    "apiVersion: kvm-operator.io/v1alpha1\nkind: KvmNode\nmetadata: {{name: {}}}\n\
                     spec: {{address: localhost, libvirtUri: \"{}\"}}\n",
                    node_name(i),
                    uri(f)
                )
            })
            .collect();
        std::fs::write(m.join("nodes.yaml"), docs.join("---\n")).unwrap();
        let docs: Vec<String> = (0..vms)
            .map(|i| {
                format!(
                    "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\n\
                     metadata: {{name: {}, namespace: default}}\nspec: {{vcpus: 1, memory: 64Mi}}\n",
                    vm_name(i)
                )
            })
            .collect();
        // several files, as a user would keep them (one file may hold them all)
        for (k, chunk) in docs.chunks(500).enumerate() {
            std::fs::write(m.join(format!("vms-{k:02}.yaml")), chunk.join("---\n")).unwrap();
        }
        Self { dir, node_files }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn manifests(&self) -> PathBuf {
        self.path().join("m")
    }
}

fn standalone(manifests: &Path, state: &Path, config: Config) -> Standalone {
    Standalone::new(
        Options {
            files: vec![manifests.to_path_buf()],
            default_uri: "test:///default".into(),
            state_dir: state.to_path_buf(),
            once: true,
            timeout: Duration::from_secs(3600),
            // as `kvm-operator standalone` sets it
            resync: config.node_resync,
        },
        config,
        Box::new(std::io::sink()),
    )
    .unwrap()
}

/// Every VM Running; returns (node index, persistent domain XML) per VM, from the definitions
/// standalone mode keeps beside its state.
fn running_definitions(
    s: &Standalone,
    state: &Path,
    vms: usize,
    read_xml: bool,
) -> Vec<(usize, String)> {
    let world = s.world();
    assert_eq!(world.vms.len(), vms);
    world
        .vms
        .iter()
        .map(|vm| {
            let st = vm.status.clone().unwrap_or_default();
            let name = vm.metadata.name.clone().unwrap();
            assert_eq!(st.power_state, Some(PowerState::Running), "{name}: {st:?}");
            let node = st.node.unwrap();
            let k: usize = node.trim_start_matches("node-").parse().unwrap();
            let xml = if read_xml {
                std::fs::read_to_string(state.join(format!("definitions/default/{name}.xml")))
                    .unwrap()
            } else {
                String::new()
            };
            (k, xml)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Control-plane overhead

/// Seconds spent inside reconciles, by controller, from the operator's own metrics (standalone
/// mode times each object's reconcile, definition backup included).
fn reconcile_seconds(s: &Standalone) -> BTreeMap<String, f64> {
    let text = (s.metrics())();
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.split_once("reconcile_duration_seconds_sum{").map(|x| x.1) else {
            continue;
        };
        let ctl = rest
            .split("controller=\"")
            .nth(1)
            .and_then(|x| x.split('"').next())
            .unwrap_or("?");
        let v: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        *out.entry(ctl.to_string()).or_insert(0.0) += v;
    }
    out
}

/// One reconcile run: wall time, calls, seconds inside VM and node reconciles.
struct Run {
    took: Duration,
    calls: u64,
    vm_secs: f64,
    node_secs: f64,
}

fn overhead(rt: &tokio::runtime::Runtime, quick: bool) {
    let (nodes, vms, reps) = if quick { (5, 50, 1) } else { (10, 500, 5) };
    let setup = Setup::new(nodes, vms);
    let mut rep_no = 0;
    let mut reconcile = |backup: bool| {
        rep_no += 1;
        let state = setup.path().join(format!("state-{rep_no}"));
        let config = Config {
            definition_backup: backup,
            ..Config::default()
        };
        let c0 = calls_made();
        let t = Instant::now();
        let mut s = standalone(&setup.manifests(), &state, config);
        rt.block_on(s.run()).unwrap();
        let took = t.elapsed();
        let calls = calls_made() - c0;
        let defs = running_definitions(&s, &state, vms, backup);
        let secs = reconcile_seconds(&s);
        // its connections close with it: the next run starts from empty nodes again
        drop(s);
        std::fs::remove_dir_all(&state).unwrap();
        let run = Run {
            took,
            calls,
            vm_secs: secs.get("virtualmachine").copied().unwrap_or(0.0),
            node_secs: secs.get("kvmnode").copied().unwrap_or(0.0),
        };
        (run, defs)
    };
    // the raw side, optionally also keeping each definition as the operator's standalone
    // backups do, at the least it takes: written beside its place, one filesystem sync, renamed
    let mut copies_no = 0;
    let mut raw = |defs: &[(usize, String)], copies: bool| {
        copies_no += 1;
        let copy_dir = setup.path().join(format!("raw-copies-{copies_no}"));
        let named: Vec<(String, &str)> = defs
            .iter()
            .map(|(_, x)| (DomainXml::parse(x).unwrap().name, x.as_str()))
            .collect();
        let conns: Vec<Connection> = setup
            .node_files
            .iter()
            .enumerate()
            .map(|(i, f)| Connection::open(&uri(f), &node_name(i)).unwrap())
            .collect();
        for c in &conns {
            assert!(
                c.raw().list_all_domains(0).unwrap().is_empty(),
                "a fresh node"
            );
        }
        let t = Instant::now();
        for (k, xml) in defs {
            let d = conns[*k].raw().define_domain_xml(xml).unwrap();
            d.create().unwrap();
        }
        if copies {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(&copy_dir).unwrap();
            for (name, xml) in &named {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(copy_dir.join(format!(".{name}.xml.tmp")))
                    .unwrap();
                f.write_all(xml.as_bytes()).unwrap();
            }
            let d = std::fs::File::open(&copy_dir).unwrap();
            rustix::fs::syncfs(&d).unwrap();
            for (name, _) in &named {
                std::fs::rename(
                    copy_dir.join(format!(".{name}.xml.tmp")),
                    copy_dir.join(format!("{name}.xml")),
                )
                .unwrap();
            }
            d.sync_all().unwrap();
        }
        let took = t.elapsed();
        if copies {
            std::fs::remove_dir_all(&copy_dir).unwrap();
        }
        let active: u32 = conns
            .iter()
            .map(|c| c.raw().num_of_domains().unwrap())
            .sum();
        assert_eq!(active as usize, defs.len());
        took
    };
    // warm-up, and the domain XML the operator writes for each VM (its definition backups)
    let (_, defs) = reconcile(true);
    raw(&defs, true);
    let (mut ours, mut lean, mut direct, mut direct_copies) = (vec![], vec![], vec![], vec![]);
    for rep in 0..reps {
        // the four sides take turns going first
        for side in 0..4 {
            match (rep + side) % 4 {
                0 => ours.push(reconcile(true).0),
                1 => lean.push(reconcile(false).0),
                2 => direct.push(raw(&defs, false)),
                _ => direct_copies.push(raw(&defs, true)),
            }
        }
    }
    let mid = |v: &mut Vec<Run>| {
        v.sort_by_key(|r| r.took);
        let r = &v[v.len() / 2];
        (r.took, r.calls, r.vm_secs, r.node_secs)
    };
    // what one call on a connection costs by itself (semaphore, spawn_blocking, timeout): a
    // call that does nothing, on a node of the same kind
    let hop = {
        let pool = NodePool::new(Duration::from_secs(60));
        let dir = setup.path().join("hop");
        std::fs::create_dir_all(&dir).unwrap();
        let spec = serde_json::from_value(serde_json::json!({
            "address": "localhost", "libvirtUri": uri(&setup.node_files[0]),
        }))
        .unwrap();
        pool.upsert(kvm_operator::hypervisor::NodeAccess {
            name: "hop".into(),
            spec,
            private_key: None,
            state_dir: dir,
            tls: None,
            timeout: Duration::from_secs(10),
        });
        let n = 2000;
        rt.block_on(async {
            pool.call("hop", "connect", |_| Ok(())).await.unwrap();
            let t = Instant::now();
            for _ in 0..n {
                pool.call("hop", "nothing", |_| Ok(())).await.unwrap();
            }
            t.elapsed() / n
        })
    };
    let (o, calls, o_vm, o_node) = mid(&mut ours);
    let (l, _, l_vm, l_node) = mid(&mut lean);
    let d = median(direct);
    let ratio = |x: Duration| x.as_secs_f64() / d.as_secs_f64();
    for (what, t, vm_s, node_s) in [
        ("with definition backups (the default)", o, o_vm, o_node),
        ("definitionBackup off", l, l_vm, l_node),
    ] {
        println!(
            "  (reconcile {what}: {:.3} s = {:.2}x raw; summed over reconciles, which run side by side: VMs {vm_s:.3} s, nodes {node_s:.3} s)",
            t.as_secs_f64(),
            ratio(t),
        );
    }
    println!(
        "  (reconcile: {calls} calls on a connection for {vms} VMs ({:.1} per VM); a call that does nothing costs {:.1} us; raw: {} libvirt calls, define + start each)",
        calls as f64 / vms as f64,
        hop.as_secs_f64() * 1e6,
        2 * vms
    );
    let dc = median(direct_copies);
    println!(
        "control-plane overhead: {vms} VMs / {nodes} nodes, definitionBackup off: reconcile {:.3} s vs raw define+start {:.3} s = {:.2}x (target <= 1.3x)",
        l.as_secs_f64(),
        d.as_secs_f64(),
        ratio(l)
    );
    println!(
        "control-plane overhead: {vms} VMs / {nodes} nodes, with definition backups (the default): reconcile {:.3} s vs raw define+start and the same {vms} copies written durably {:.3} s = {:.2}x (target <= 1.3x)",
        o.as_secs_f64(),
        dc.as_secs_f64(),
        o.as_secs_f64() / dc.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Idle cost

/// libvirt API calls that a remote connection answers locally (no RPC to the daemon).
const LOCAL_CALLS: &[&str] = &[
    "virDomainGetName",
    "virDomainGetUUID",
    "virDomainGetUUIDString",
    "virDomainGetID",
    "virDomainFree",
    "virDomainRef",
    "virConnectIsAlive",
    "virConnectRef",
    "virDomainStatsRecordListFree",
];

/// libvirt API calls in libvirt's debug log (one `debug : virXxx:` line per public API entry),
/// by function: the RPCs and the total.
fn api_calls(log: &Path) -> (u64, BTreeMap<String, u64>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once(": debug : ") else {
            continue;
        };
        let f = rest.split(':').next().unwrap_or("");
        if f.starts_with("vir") && !LOCAL_CALLS.contains(&f) {
            *by.entry(f.to_string()).or_insert(0) += 1;
        }
    }
    (by.values().sum(), by)
}

fn truncate(log: &Path) {
    // libvirt appends (O_APPEND): after truncation its next line lands at the start
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .unwrap()
        .set_len(0)
        .unwrap();
}

/// What one configuration costs when idle (written by the child as JSON).
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct IdleCounts {
    /// One round of the standalone loop: calls, RPCs, the RPCs by function, seconds it took.
    round_calls: u64,
    round_rpcs: u64,
    round_top: BTreeMap<String, u64>,
    round_secs: f64,
    /// Seconds between two rounds of the standalone loop when nothing is pending.
    resync_secs: f64,
    /// Every node reconciled once (cluster cores), its calls and RPCs, and its requeue.
    node_calls: u64,
    node_rpcs: u64,
    node_top: BTreeMap<String, u64>,
    node_requeue_secs: f64,
    /// VM reconciles the node pass asked for (none when nothing changed).
    node_hints: usize,
    /// Every VM reconciled once (cluster cores + the definition backup check).
    vm_calls: u64,
    vm_rpcs: u64,
    vm_top: BTreeMap<String, u64>,
    /// None: a steady VM is not reconciled periodically (the cluster's default).
    vm_requeue_secs: Option<f64>,
    /// A long-running standalone run's periodic VM reconcile: the configuration's (none by
    /// default), since it follows domain events as the cluster does.
    standalone_vm_secs: Option<f64>,
    /// Events a steady VM reconcile published (none expected).
    vm_notes: Vec<String>,
}

impl IdleCounts {
    /// The node rounds, every VM once per standalone VM period (if any), and each node's event
    /// follower checking its connection (a call that makes no RPC).
    fn standalone_per_min(&self, nodes: usize) -> (f64, f64) {
        let k = 60.0 / self.resync_secs;
        let v = self.standalone_vm_secs.map_or(0.0, |s| 60.0 / s);
        let checks = nodes as f64 * 60.0 / EVENT_CHECK.as_secs_f64();
        (
            self.round_calls as f64 * k + self.vm_calls as f64 * v + checks,
            self.round_rpcs as f64 * k + self.vm_rpcs as f64 * v,
        )
    }

    fn cluster_per_min(&self, nodes: usize) -> (f64, f64) {
        let n = 60.0 / self.node_requeue_secs;
        let v = self.vm_requeue_secs.map_or(0.0, |s| 60.0 / s);
        let checks = nodes as f64 * 60.0 / EVENT_CHECK.as_secs_f64();
        (
            self.node_calls as f64 * n + self.vm_calls as f64 * v + checks,
            self.node_rpcs as f64 * n + self.vm_rpcs as f64 * v,
        )
    }
}

fn top(by: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = by.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(4)
        .map(|(f, n)| format!("{f} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The child (libvirt logs every API call it makes into `dir/libvirt.log`): brings the VMs to
/// Running in standalone mode, then counts one steady round of its loop, and one reconcile of
/// every node and every VM through the cluster's cores.
fn idle_child(dir: &Path) {
    let log = dir.join("libvirt.log");
    let rt = runtime();
    let state = dir.join("state");
    let mut s = standalone(&dir.join("m"), &state, Config::default());
    // to Running (libvirt logs this too; the log is cut before each measurement)
    rt.block_on(s.run()).unwrap();
    let vms = s.world().vms.len();
    let defs = running_definitions(&s, &state, vms, true);

    // one round of the standalone loop with nothing to do
    truncate(&log);
    let c0 = calls_made();
    let t = Instant::now();
    rt.block_on(s.run()).unwrap();
    let round_secs = t.elapsed().as_secs_f64();
    let round_calls = calls_made() - c0;
    let (round_rpcs, round_top) = api_calls(&log);

    // the cluster: the same cores, each object at the requeue interval it returns; no watch
    // event and no domain event arrives when nothing changes
    let world = s.world().clone();
    let config = s.config().clone();
    // its pool opens new connections, i.e. new test-driver instances: they find the converged
    // domains, running, in the node files
    for k in 0..world.nodes.len() {
        let mine: Vec<&str> = defs
            .iter()
            .filter(|(n, _)| *n == k)
            .map(|(_, x)| x.as_str())
            .collect();
        let file = dir.join("nodes").join(format!("{}.xml", node_name(k)));
        std::fs::write(file, node_xml(&mine)).unwrap();
    }
    let pool = NodePool::new(Duration::from_secs(60));
    rt.block_on(async {
        for n in &world.nodes {
            let access = kvm_node::load_access(n, s.secrets(), &config)
                .await
                .unwrap();
            pool.upsert(access);
            pool.call(&n.metadata.name.clone().unwrap(), "connect", |_| Ok(()))
                .await
                .unwrap();
        }
    });
    // a first pass on the new connections reads every domain's stamp once (each connection's
    // stamp index starts empty); the steady state is the passes after it
    for n in &world.nodes {
        rt.block_on(kvm_node::reconcile_core(n, &world, &pool, &config));
    }
    truncate(&log);
    let c0 = calls_made();
    let mut node_requeue = vec![];
    let mut node_hints = 0;
    for n in &world.nodes {
        let (out, side) = rt.block_on(kvm_node::reconcile_core(n, &world, &pool, &config));
        node_requeue.push(out.requeue.unwrap());
        node_hints += side.hints.len();
    }
    let node_calls = calls_made() - c0;
    let (node_rpcs, node_top) = api_calls(&log);

    truncate(&log);
    let c0 = calls_made();
    let mut vm_requeue = vec![];
    let mut vm_notes = vec![];
    let sink = backup::Files::new(dir.join("backup"));
    for vm in &world.vms {
        rt.block_on(async {
            let r = virtual_machine::reconcile_read(vm, &world, &pool, &config, None).await;
            let mut out = r.outcome;
            if config.definition_backup
                && let Some(n) =
                    backup::keep(vm, &mut out.status, &pool, &sink, r.definition.as_deref()).await
            {
                out.notes.push(n);
            }
            vm_requeue.push(out.requeue);
            vm_notes.extend(
                out.notes
                    .iter()
                    .map(|n| format!("{}: {}", n.reason, n.message)),
            );
        });
    }
    let vm_calls = calls_made() - c0;
    assert!(
        rt.block_on(sink.commit()).is_empty(),
        "the copies were kept"
    );
    let (vm_rpcs, vm_top) = api_calls(&log);

    // every object of a kind asks for the same interval here; the shortest is used if not
    let shortest = |v: &[Duration]| v.iter().min().copied().unwrap().as_secs_f64();
    let counts = IdleCounts {
        round_calls,
        round_rpcs,
        round_top,
        round_secs,
        resync_secs: config.node_resync.as_secs_f64(),
        node_calls,
        node_rpcs,
        node_top,
        node_requeue_secs: shortest(&node_requeue),
        node_hints,
        vm_calls,
        vm_rpcs,
        vm_top,
        vm_requeue_secs: vm_requeue.iter().flatten().min().map(Duration::as_secs_f64),
        standalone_vm_secs: config.vm_resync.map(|d| d.as_secs_f64()),
        vm_notes,
    };
    println!("IDLE {}", serde_json::to_string(&counts).unwrap());
}

fn idle_config(nodes: usize, vms: usize) -> IdleCounts {
    let setup = Setup::new(nodes, vms);
    let log = setup.path().join("libvirt.log");
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, setup.path())
        .env(
            "LIBVIRT_LOG_FILTERS",
            "1:libvirt.domain 1:libvirt.host 1:libvirt.storage 1:libvirt.network 1:libvirt",
        )
        .env("LIBVIRT_LOG_OUTPUTS", format!("1:file:{}", log.display()))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "idle child failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("IDLE "))
        .unwrap_or_else(|| panic!("no result from the idle child: {stdout}"));
    serde_json::from_str(json).unwrap()
}

fn idle(quick: bool) {
    let configs: [(usize, usize); 3] = if quick {
        [(2, 100), (4, 200), (4, 50)]
    } else {
        [(10, 1000), (20, 2000), (20, 500)]
    };
    let mut results = vec![];
    for (nodes, vms) in configs {
        let c = idle_config(nodes, vms);
        let (sa_calls, sa_rpcs) = c.standalone_per_min(nodes);
        let (cl_calls, cl_rpcs) = c.cluster_per_min(nodes);
        println!(
            "  idle, {nodes} nodes / {vms} VMs: long-running standalone loop (a node round every {:.0} s, that round measured at {:.2} s including its wait; VMs {}, event checks every {} s) {sa_calls:.0} calls/min, {sa_rpcs:.0} libvirt RPCs/min; per node round [{}]",
            c.resync_secs,
            c.round_secs,
            c.standalone_vm_secs.map_or_else(
                || "on events and node-pass hints only".to_string(),
                |s| format!("every {s:.0} s")
            ),
            EVENT_CHECK.as_secs(),
            top(&c.round_top)
        );
        println!(
            "  idle, {nodes} nodes / {vms} VMs: cluster schedule (nodes every {:.0} s, VMs {}, event checks every {} s) {cl_calls:.0} calls/min, {cl_rpcs:.0} libvirt RPCs/min; per node pass [{}]; per VM pass [{}]",
            c.node_requeue_secs,
            c.vm_requeue_secs.map_or_else(
                || "on events and node-pass hints only".to_string(),
                |s| format!("every {s:.0} s")
            ),
            EVENT_CHECK.as_secs(),
            top(&c.node_top),
            top(&c.vm_top)
        );
        if c.node_hints > 0 || !c.vm_notes.is_empty() {
            println!(
                "  note: not idle: {} node hints, VM events {:?}",
                c.node_hints,
                c.vm_notes.iter().take(3).collect::<Vec<_>>()
            );
        }
        results.push((nodes, vms, [sa_calls, sa_rpcs, cl_calls, cl_rpcs]));
    }
    let [(n1, v1, a), (n2, v2, b), (n3, v3, c)] = [results[0], results[1], results[2]];
    for (i, what) in [
        (2, "cluster schedule, calls"),
        (3, "cluster schedule, libvirt RPCs"),
        (0, "standalone loop, calls"),
        (1, "standalone loop, libvirt RPCs"),
    ] {
        println!(
            "idle cost ({what}/min): {n1}n/{v1} VMs {:.0}, {n2}n/{v2} VMs {:.0}, {n3}n/{v3} VMs {:.0}; x{} nodes and VMs: {:.2}x; x{} VMs on {n2} nodes: {:.2}x (target 1.0x: grows with nodes, not VMs)",
            a[i],
            b[i],
            c[i],
            n2 / n1,
            b[i] / a[i],
            v2 / v3,
            b[i] / c[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Memory

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `kvm-operator standalone --once` on `nodes` test nodes and `vms` VMs; returns the peak
/// RSS in KiB (the kernel's maxrss through GNU time when present, else the last VmHWM seen), the
/// highest VmHWM polled while it ran, how long it took, and the setup (with the definitions).
fn peak_rss(nodes: usize, vms: usize) -> (u64, u64, Duration, Setup) {
    let setup = Setup::new(nodes, vms);
    let state = setup.path().join("state");
    let bin = env!("CARGO_BIN_EXE_kvm-operator");
    let gnu_time = Path::new("/usr/bin/time");
    let maxrss = setup.path().join("maxrss");
    let mut cmd = if gnu_time.exists() {
        let mut c = Command::new(gnu_time);
        c.args(["-f", "%M", "-o"]).arg(&maxrss).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let err = std::fs::File::create(setup.path().join("stderr")).unwrap();
    cmd.args(["standalone", "--once", "--timeout", "3000", "--state-dir"])
        .arg(&state)
        .arg("-f")
        .arg(setup.manifests())
        .stdout(Stdio::null())
        .stderr(err);
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut hwm = 0;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        let pid = if gnu_time.exists() {
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        } else {
            Some(child.id())
        };
        if let Some(k) = pid.and_then(vm_hwm_kib) {
            hwm = hwm.max(k);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t.elapsed();
    assert!(
        status.success(),
        "kvm-operator standalone failed: {}",
        std::fs::read_to_string(setup.path().join("stderr")).unwrap_or_default()
    );
    // every VM Running, as the state file says (the file itself is read back in full)
    let text = std::fs::read_to_string(state.join("status.yaml")).unwrap();
    let parsed: serde_json::Value = serde_saphyr::from_str_with_options(
        &text,
        kvm_operator::manifest::yaml_options(text.len()),
    )
    .unwrap();
    let running = parsed["objects"]
        .as_object()
        .unwrap()
        .values()
        .filter(|o| o["status"]["powerState"] == "Running")
        .count();
    assert_eq!(running, vms);
    let peak = std::fs::read_to_string(&maxrss)
        .ok()
        .and_then(|s| s.trim().lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(hwm);
    (peak, hwm, took, setup)
}

/// Set in the child that holds the same domains with raw libvirt calls (see [`memory`]).
const RAW_RSS_ENV: &str = "KVM_BENCH_RAW_RSS";

/// The child: defines and starts the operator's domain definitions found under `dir` on
/// `KVM_BENCH_NODES` fresh test nodes, then prints its own peak RSS (KiB).
fn raw_rss_child(dir: &Path) {
    let nodes: usize = std::env::var("KVM_BENCH_NODES").unwrap().parse().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("state/definitions/default"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let conns: Vec<Connection> = (0..nodes)
        .map(|k| {
            let f = dir.join("nodes").join(format!("{}.xml", node_name(k)));
            Connection::open(&uri(&f), &node_name(k)).unwrap()
        })
        .collect();
    for (i, f) in files.iter().enumerate() {
        let xml = std::fs::read_to_string(f).unwrap();
        let d = conns[i % nodes].raw().define_domain_xml(&xml).unwrap();
        d.create().unwrap();
    }
    println!("RAWRSS {}", vm_hwm_kib(std::process::id()).unwrap());
}

fn memory(quick: bool) {
    let (nodes, vms) = if quick { (10, 200) } else { (100, 2000) };
    let mib = |k: u64| k as f64 / 1024.0;
    let (base, _, _, _) = peak_rss(nodes, 0);
    let (peak, hwm, took, setup) = peak_rss(nodes, vms);
    // the hypervisors' share: the same domains held by a bare process with raw libvirt calls
    let out = Command::new(std::env::current_exe().unwrap())
        .env(RAW_RSS_ENV, setup.path())
        .env("KVM_BENCH_NODES", nodes.to_string())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "raw memory child failed");
    let raw: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RAWRSS ").and_then(|x| x.parse().ok()))
        .unwrap();
    println!(
        "  (peak RSS with {nodes} nodes and no VM: {:.1} MiB; the same {vms} domains defined and started on {nodes} test connections by a bare process: {:.1} MiB; VmHWM polled every 10 ms: {:.1} MiB; the run took {:.1} s. The test driver's hypervisors live inside the operator's process here, not on remote hosts)",
        mib(base),
        mib(raw),
        mib(hwm),
        took.as_secs_f64()
    );
    println!(
        "memory: {nodes} nodes / {vms} VMs, kvm-operator standalone --once: peak RSS {:.1} MiB (target <= 64 MiB)",
        mib(peak)
    );
}

fn main() {
    // the allocator as the operator's own `main` sets it (the children, too)
    kvm_operator::hypervisor::ffi::limit_malloc_arenas();
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        idle_child(Path::new(&dir));
        return;
    }
    if let Ok(dir) = std::env::var(RAW_RSS_ENV) {
        raw_rss_child(Path::new(&dir));
        return;
    }
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let on = |s: &str| only.is_empty() || only == s;
    let rt = runtime();
    if quick {
        println!("BENCH_QUICK=1: small numbers, a smoke run (not the issue's sizes)");
    }
    if on("overhead") {
        overhead(&rt, quick);
    }
    if on("idle") {
        idle(quick);
    }
    if on("memory") {
        memory(quick);
    }
}
