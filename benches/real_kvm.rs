//! Scenarios of the benchmark issue on the lab's real libvirtd and QEMU/KVM
//! (`eval "$(hack/lab.sh env)"; cargo bench --bench real_kvm`; `BENCH_ONLY=kvm|virsh|migration`
//! for one scenario):
//!
//! 2. real KVM: 20 small guests to Running on the lab's libvirtd over SSH through the operator's
//!    path (standalone mode's reconcile loop, the node already registered and Ready) vs the same
//!    defines and starts issued directly on a connection of the same transport, as many at once
//!    as the operator allows per node; alternating repetitions, medians;
//! 3. older approach: the same operations (define, start, info, list, destroy, undefine of the
//!    same guests) through the operator's hypervisor layer vs one `ssh host virsh …` per
//!    operation; per operation, medians;
//! 7. live migration: operator-added time on top of libvirt's own live migration time for a lab
//!    guest between the lab's namespace hosts host1 and host2: standalone mode's Migration (from
//!    the manifest appearing to the VM Running on the target, rebound) vs `virDomainMigrate3` with
//!    the same options on raw connections, alternating directions. It uses host1/host2: run it
//!    under `flock /tmp/kvm-lab.lock` when other lab tests may run.
//!
//! Each scenario prints one line ending in its ratio or figure and the target. The machine is
//! shared and noisy: only figures measured side by side in one run are compared.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_operator::api::KvmNodeSpec;
use kvm_operator::api::virtual_machine::PowerState;
use kvm_operator::controller::Config;
use kvm_operator::controller::standalone::{Options, Standalone};
use kvm_operator::hypervisor::cache::{MAX_CALLS_PER_NODE, NodePool};
use kvm_operator::hypervisor::domain_xml::DomainXml;
use kvm_operator::hypervisor::migration::MigrateOptions;
use kvm_operator::hypervisor::{Connection, DomainState, HvError, NodeAccess, connect_node};

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: eval \"$(hack/lab.sh env)\" first"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn domain_type() -> &'static str {
    if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    }
}

/// The lab's main host (loopback sshd, the machine's own libvirtd), or namespace host `i`.
fn access(host: Option<u32>, dir: &Path) -> NodeAccess {
    let (name, addr, port, fp) = match host {
        None => (
            "lab".to_string(),
            env("KVM_LAB_SSH_ADDR"),
            env("KVM_LAB_SSH_PORT").parse::<u16>().unwrap(),
            env("KVM_LAB_SSH_FINGERPRINT"),
        ),
        Some(i) => (
            format!("host{i}"),
            env(&format!("KVM_LAB_HOST{i}_ADDR")),
            22,
            env(&format!("KVM_LAB_HOST{i}_FINGERPRINT")),
        ),
    };
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": addr, "port": port, "user": env("KVM_LAB_SSH_USER"),
        "sshKeySecretRef": {"name": "lab-key"}, "hostKeyFingerprint": fp,
    }))
    .unwrap();
    NodeAccess {
        name,
        spec,
        private_key: Some(std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap()),
        state_dir: dir.to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(10),
    }
}

/// A v1 Secret with the lab's key and a KvmNode per access, as a user would declare them.
fn node_manifests(nodes: &[&NodeAccess]) -> String {
    let key = std::fs::read_to_string(env("KVM_LAB_SSH_KEY")).unwrap();
    let indented: String = key.lines().map(|l| format!("    {l}\n")).collect();
    let mut text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: lab-key}}\ntype: kubernetes.io/ssh-auth\nstringData:\n  ssh-privatekey: |\n{indented}"
    );
    for a in nodes {
        text.push_str(&format!(
            "---\napiVersion: kvm-operator.io/v1alpha1\nkind: KvmNode\nmetadata: {{name: {}}}\nspec:\n  address: {}\n  port: {}\n  user: {}\n  sshKeySecretRef: {{name: lab-key}}\n  hostKeyFingerprint: {}\n  overcommit: {{cpu: 16}}\n",
            a.name,
            a.spec.address,
            a.spec.port,
            a.spec.user,
            a.spec.host_key_fingerprint.clone().unwrap()
        ));
    }
    text
}

fn vm_manifest(name: &str, memory: &str, node: Option<&str>) -> String {
    let pin = node
        .map(|n| format!("\n  placement: {{nodeName: {n}}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\nspec:\n  vcpus: 1\n  memory: {memory}{pin}\n"
    )
}

fn standalone(manifests: &Path, state: &Path) -> Standalone {
    let config = Config::default();
    Standalone::new(
        Options {
            files: vec![manifests.to_path_buf()],
            default_uri: "test:///default".into(),
            state_dir: state.to_path_buf(),
            once: true,
            timeout: Duration::from_secs(600),
            resync: config.node_resync,
        },
        config,
        // `RUST_LOG=…` shows the operator's logs, events and table while a scenario runs
        if std::env::var_os("RUST_LOG").is_some() {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::sink())
        },
    )
    .unwrap()
}

fn cleanup(c: &Connection, names: &[String]) {
    for n in names {
        let _ = c.destroy(n);
        let _ = c.undefine(n);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Real KVM

const GUESTS: usize = 20;

fn real_kvm(rt: &tokio::runtime::Runtime, reps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let lab = access(None, dir.path());
    let direct = connect_node(&lab).unwrap();
    // guests of an earlier run that was stopped before its cleanup carry that run's stamps: the
    // operator rightly leaves them alone (DomainOwnedElsewhere), so they are removed first, and
    // this run's names carry its process id
    let stale: Vec<String> = direct
        .list_domains()
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .filter(|n| n.starts_with("default_kb"))
        .collect();
    cleanup(&direct, &stale);
    let run = std::process::id();
    let mut rep_no = 0;
    // the operator: standalone mode with the node already registered and Ready, then the VMs'
    // manifests appear; timed until every VM runs (the loop returns once nothing moves)
    let mut ours = |defs: &mut Vec<String>| -> Duration {
        rep_no += 1;
        let m = dir.path().join(format!("m-{rep_no}"));
        let state = dir.path().join(format!("state-{rep_no}"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("node.yaml"), node_manifests(&[&lab])).unwrap();
        let mut s = standalone(&m, &state);
        rt.block_on(s.run()).unwrap();
        let names: Vec<String> = (0..GUESTS)
            .map(|i| format!("kb{run}-{rep_no}-{i:02}"))
            .collect();
        let docs: Vec<String> = names.iter().map(|n| vm_manifest(n, "32Mi", None)).collect();
        std::fs::write(m.join("vms.yaml"), docs.join("---\n")).unwrap();
        let t = Instant::now();
        rt.block_on(s.run()).unwrap();
        let took = t.elapsed();
        let mut domains = vec![];
        defs.clear();
        for vm in &s.world().vms {
            let st = vm.status.clone().unwrap();
            assert_eq!(st.power_state, Some(PowerState::Running), "{st:?}");
            domains.push(st.domain_name.clone().unwrap());
            let name = vm.metadata.name.clone().unwrap();
            defs.push(
                std::fs::read_to_string(state.join(format!("definitions/default/{name}.xml")))
                    .unwrap(),
            );
        }
        assert_eq!(domains.len(), GUESTS);
        drop(s);
        cleanup(&direct, &domains);
        took
    };
    // the same definitions, defined and started directly, MAX_CALLS_PER_NODE at a time (the
    // operator's own limit per node) on one connection of the same transport
    let raw = |defs: &[String]| -> Duration {
        let conn = Arc::new(connect_node(&lab).unwrap());
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let defs = Arc::new(defs.to_vec());
        let t = Instant::now();
        let workers: Vec<_> = (0..MAX_CALLS_PER_NODE)
            .map(|_| {
                let (conn, next, defs) = (conn.clone(), next.clone(), defs.clone());
                std::thread::spawn(move || {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(xml) = defs.get(i) else { break };
                        let d = conn.raw().define_domain_xml(xml).unwrap();
                        d.create().unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let took = t.elapsed();
        let names: Vec<String> = defs
            .iter()
            .map(|x| DomainXml::parse(x).unwrap().name)
            .collect();
        for n in &names {
            assert_eq!(conn.state(n).unwrap(), DomainState::Running);
        }
        cleanup(&conn, &names);
        took
    };
    let mut defs = vec![];
    // warm-up (and the definitions the direct side uses)
    ours(&mut defs);
    raw(&defs);
    let (mut o, mut d) = (vec![], vec![]);
    for rep in 0..reps {
        if rep % 2 == 0 {
            o.push(ours(&mut defs));
            d.push(raw(&defs));
        } else {
            d.push(raw(&defs));
            o.push(ours(&mut defs));
        }
    }
    let (o, d) = (median(o), median(d));
    println!(
        "real KVM: {GUESTS} guests to Running on the lab's libvirtd over SSH: operator {:.2} s vs direct define+start {:.2} s = {:.2}x (target <= 1.2x)",
        secs(o),
        secs(d),
        secs(o) / secs(d)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Older approach: ssh + virsh per operation

fn ssh_virsh(args: &[&str], stdin: Option<&str>) {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-q",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", env("KVM_LAB_KNOWN_HOSTS")))
    .arg("-i")
    .arg(env("KVM_LAB_SSH_KEY"))
    .arg("-p")
    .arg(env("KVM_LAB_SSH_PORT"))
    .arg(format!(
        "{}@{}",
        env("KVM_LAB_SSH_USER"),
        env("KVM_LAB_SSH_ADDR")
    ))
    .args(["virsh", "-q", "-c", "qemu:///system"])
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap();
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ssh virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const OPS: [&str; 6] = ["define", "start", "info", "list", "destroy", "undefine"];

fn timed(into: &mut [Vec<Duration>; 6], op: usize, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    into[op].push(t.elapsed());
}

fn older_approach(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let lab = access(None, dir.path());
    let pool = NodePool::new(Duration::from_secs(60));
    pool.upsert(lab.clone());
    rt.block_on(pool.call("lab", "connect", |_| Ok::<_, HvError>(())))
        .unwrap();
    let names: Vec<String> = (0..GUESTS).map(|i| format!("kvmop-virsh-{i:02}")).collect();
    let xmls: Vec<DomainXml> = names
        .iter()
        .map(|n| DomainXml::minimal(n, domain_type(), 32 * 1024, 1))
        .collect();
    let mut ours: [Vec<Duration>; 6] = Default::default();
    let mut virsh: [Vec<Duration>; 6] = Default::default();
    // the operator's hypervisor layer, one operation at a time
    for x in &xmls {
        let (x, n) = (x.clone(), x.name.clone());
        timed(&mut ours, 0, || {
            rt.block_on(pool.call("lab", "define", move |c| c.define(&x)))
                .unwrap();
        });
        let m = n.clone();
        timed(&mut ours, 1, || {
            rt.block_on(pool.call("lab", "start", move |c| c.start(&m)))
                .unwrap();
        });
        let m = n.clone();
        timed(&mut ours, 2, || {
            rt.block_on(pool.call("lab", "info", move |c| c.info(&m)))
                .unwrap();
        });
        timed(&mut ours, 3, || {
            rt.block_on(pool.call("lab", "list", |c| c.list_domains()))
                .unwrap();
        });
    }
    for n in &names {
        let m = n.clone();
        timed(&mut ours, 4, || {
            rt.block_on(pool.call("lab", "destroy", move |c| c.destroy(&m)))
                .unwrap();
        });
        let m = n.clone();
        timed(&mut ours, 5, || {
            rt.block_on(pool.call("lab", "undefine", move |c| c.undefine(&m)))
                .unwrap();
        });
    }
    // one `ssh host virsh …` per operation
    for x in &xmls {
        let text = x.render().unwrap();
        timed(&mut virsh, 0, || {
            ssh_virsh(&["define", "/dev/stdin"], Some(&text))
        });
        timed(&mut virsh, 1, || ssh_virsh(&["start", &x.name], None));
        timed(&mut virsh, 2, || ssh_virsh(&["dominfo", &x.name], None));
        timed(&mut virsh, 3, || ssh_virsh(&["list", "--all"], None));
    }
    for n in &names {
        timed(&mut virsh, 4, || ssh_virsh(&["destroy", n], None));
        timed(&mut virsh, 5, || ssh_virsh(&["undefine", n], None));
    }
    let mut ratios = vec![];
    for (i, op) in OPS.iter().enumerate() {
        let (a, b) = (median(ours[i].clone()), median(virsh[i].clone()));
        let r = secs(b) / secs(a);
        ratios.push((op, r));
        println!(
            "  ({op}, {GUESTS} guests: operator's layer {:.1} ms, ssh+virsh {:.1} ms per operation = {r:.1}x faster)",
            secs(a) * 1e3,
            secs(b) * 1e3
        );
    }
    let total = |v: &[Vec<Duration>; 6]| v.iter().flatten().sum::<Duration>();
    let (to, tv) = (total(&ours), total(&virsh));
    let geo = (ratios.iter().map(|(_, r)| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    let below: Vec<String> = ratios
        .iter()
        .filter(|(_, r)| *r < 20.0)
        .map(|(op, r)| format!("{op} {r:.1}x"))
        .collect();
    println!(
        "older approach: {} operations on {GUESTS} guests: operator's layer {:.2} s vs ssh+virsh per operation {:.2} s; per operation (geometric mean of the medians) {geo:.1}x faster{} (target >= 20x faster per operation)",
        6 * GUESTS,
        secs(to),
        secs(tv),
        if below.is_empty() {
            String::new()
        } else {
            format!("; below 20x: {}", below.join(", "))
        }
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Live migration

fn migration(rt: &tokio::runtime::Runtime, reps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2) = (access(Some(1), dir.path()), access(Some(2), dir.path()));
    let h = [connect_node(&a1).unwrap(), connect_node(&a2).unwrap()];
    let opts = MigrateOptions {
        live: true,
        ..Default::default()
    };
    let id = std::process::id();
    // the operator: standalone mode with host1 and host2 and a VM on host1; each repetition
    // writes a Migration manifest to the other node and times until the loop has nothing left
    // to do (Migration Succeeded, the VM rebound and Running on the target)
    let m = dir.path().join("m");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("nodes.yaml"), node_manifests(&[&a1, &a2])).unwrap();
    let vm = format!("mig-{id}");
    std::fs::write(m.join("vm.yaml"), vm_manifest(&vm, "128Mi", Some("host1"))).unwrap();
    let mut s = standalone(&m, &state);
    rt.block_on(s.run()).unwrap();
    let domain = s.world().vms[0]
        .status
        .clone()
        .unwrap()
        .domain_name
        .unwrap();
    // libvirt's own time: the same guest (the operator's definition under another name, without
    // its UUID and ownership stamp) defined and started directly, migrated there and back. A
    // minimal guest would migrate faster than the operator's (fewer devices to start and carry)
    // and charge that to the operator
    let raw_name = format!("kvmop-bench-mig-{id}");
    cleanup(&h[0], std::slice::from_ref(&raw_name));
    cleanup(&h[1], std::slice::from_ref(&raw_name));
    let mut same = h[0].persistent_xml(&domain).unwrap();
    same.name = raw_name.clone();
    same.uuid = None;
    same.metadata = None;
    h[0].define(&same).unwrap();
    h[0].start(&raw_name).unwrap();
    let mut at = 0;
    let mut raw = || {
        let t = Instant::now();
        h[at].migrate(&raw_name, &h[1 - at], &opts).unwrap();
        let took = t.elapsed();
        at = 1 - at;
        took
    };
    let mut rep_no = 0;
    let mut ours = |s: &mut Standalone| {
        rep_no += 1;
        let target = if rep_no % 2 == 1 { "host2" } else { "host1" };
        std::fs::write(
            m.join(format!("migration-{rep_no}.yaml")),
            format!(
                "apiVersion: kvm-operator.io/v1alpha1\nkind: Migration\nmetadata: {{name: move-{rep_no}}}\nspec: {{vmName: {vm}, targetNode: {target}}}\n"
            ),
        )
        .unwrap();
        let wall0 = std::time::SystemTime::now();
        let t = Instant::now();
        // `--once` returns when no object's standing moved in a round; the VM may still say
        // Migrating there (rebound, not yet observed on the target): the loop goes on until
        // it runs there, as a long-running operator would
        let on_target = |s: &Standalone| {
            s.world().vms[0].status.as_ref().is_some_and(|st| {
                st.node.as_deref() == Some(target) && st.power_state == Some(PowerState::Running)
            })
        };
        rt.block_on(s.run()).unwrap();
        while !on_target(s) && t.elapsed() < Duration::from_secs(120) {
            rt.block_on(s.run()).unwrap();
        }
        let took = t.elapsed();
        let st = s.world().vms[0].status.clone().unwrap();
        assert_eq!(
            (st.node.as_deref(), st.power_state),
            (Some(target), Some(PowerState::Running)),
            "{st:?}"
        );
        // where the time went: until the job started, the job, after it
        let ms = s
            .world()
            .migrations
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some(&format!("move-{rep_no}")))
            .and_then(|x| x.status.clone())
            .unwrap();
        let at = |x: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            x.as_ref().map_or(0.0, |t| {
                t.0.as_millisecond() as f64 / 1e3
                    - wall0
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs_f64()
            })
        };
        let (start, end) = (at(&ms.start_time), at(&ms.end_time));
        println!(
            "  (operator, move {rep_no}: {:.2} s until the job started, {:.2} s job as the operator saw it, {:.2} s after it until the VM ran on {target})",
            start,
            end - start,
            secs(took) - end
        );
        took
    };
    let (mut o, mut d) = (vec![], vec![]);
    // warm-up
    raw();
    ours(&mut s);
    for rep in 0..reps {
        if rep % 2 == 0 {
            o.push(ours(&mut s));
            d.push(raw());
        } else {
            d.push(raw());
            o.push(ours(&mut s));
        }
    }
    drop(s);
    for c in &h {
        cleanup(c, &[raw_name.clone(), domain.clone()]);
    }
    // one move of a guest that has just booted varies by a second on either side (how much
    // memory it dirties while it is copied): the spread is printed with the medians
    let spread = |v: &[Duration]| {
        let s: Vec<String> = v.iter().map(|d| format!("{:.2}", secs(*d))).collect();
        s.join(" ")
    };
    println!(
        "  (moves, s: operator {}; libvirt's own {})",
        spread(&o),
        spread(&d)
    );
    let (o, d) = (median(o), median(d));
    println!(
        "live migration host1 <-> host2: operator {:.2} s vs libvirt's own migration {:.2} s: operator-added {:.2} s (target <= 0.5 s)",
        secs(o),
        secs(d),
        secs(o) - secs(d)
    );
}

fn main() {
    // the allocator as the operator's own `main` sets it
    kvm_operator::hypervisor::ffi::limit_malloc_arenas();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        kvm_operator::telemetry::init(&filter, false);
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let on = |s: &str| only.is_empty() || only == s;
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let rt = runtime();
    if on("kvm") {
        real_kvm(&rt, reps);
    }
    if on("virsh") {
        older_approach(&rt);
    }
    if on("migration") {
        // a single move varies more than the other scenarios' operations: more repetitions
        let reps = std::env::var("BENCH_REPS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(7);
        migration(&rt, reps);
    }
}
