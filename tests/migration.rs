//! Live and cold migration of real KVM guests between the lab's two namespace hosts, over SSH
//! connections pinned to each host's key. Runs through README's test command.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_operator::api::KvmNodeSpec;
use kvm_operator::hypervisor::domain_xml::DomainXml;
use kvm_operator::hypervisor::migration::MigrateOptions;
use kvm_operator::hypervisor::{self, Connection, DomainState, HvError, NodeAccess};

fn env(k: &str) -> String {
    std::env::var(k)
        .unwrap_or_else(|_| panic!("{k} is not set: run the tests through hack/test.sh"))
}

fn connect(i: u32, dir: &std::path::Path) -> Connection {
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": env(&format!("KVM_LAB_HOST{i}_ADDR")), "user": "root",
        "sshKeySecretRef": {"name": "lab"},
        "hostKeyFingerprint": env(&format!("KVM_LAB_HOST{i}_FINGERPRINT")),
    }))
    .unwrap();
    hypervisor::connect_node(&NodeAccess {
        name: format!("host{i}"),
        spec,
        private_key: Some(std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap()),
        state_dir: dir.to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(10),
    })
    .unwrap_or_else(|e| panic!("host{i}: {e}"))
}

fn domain_type() -> &'static str {
    if std::path::Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    }
}

/// Where the domain is defined, and whether it runs there.
fn whereabouts(name: &str, hosts: &[&Connection]) -> Vec<(String, DomainState)> {
    hosts
        .iter()
        .filter_map(|c| match c.state(name) {
            Ok(s) => Some((c.node().to_string(), s)),
            Err(HvError::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        })
        .collect()
}

fn cleanup(name: &str, hosts: &[&Connection]) {
    for c in hosts {
        let _ = c.destroy(name);
        let _ = c.undefine(name);
    }
}

#[test]
fn live_then_cold_migration_keeps_the_guest_on_exactly_one_host() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = Arc::new(connect(1, dir.path()));
    let h2 = connect(2, dir.path());
    let name = format!("kvmop-mig-{}", std::process::id());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h1.define(&DomainXml::minimal(&name, domain_type(), 128 * 1024, 1))
            .unwrap();
        h1.start(&name).unwrap();
        assert_eq!(
            whereabouts(&name, &[&h1, &h2]),
            [("host1".to_string(), DomainState::Running)]
        );

        // watch the job from another thread on the same connection while migrating
        let watcher = {
            let h1 = h1.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(30) {
                    match h1.job_progress(&name) {
                        Ok(p) if p.active => seen.push(p),
                        Ok(_) if !seen.is_empty() => break,
                        Err(HvError::NotFound { .. }) => break,
                        _ => {}
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                seen
            })
        };
        let opts = MigrateOptions {
            live: true,
            auto_converge: true,
            max_downtime_ms: Some(500),
            ..Default::default()
        };
        let t0 = Instant::now();
        h1.migrate(&name, &h2, &opts)
            .unwrap_or_else(|e| panic!("{e}"));
        let took = t0.elapsed();
        let progress = watcher.join().unwrap();
        eprintln!(
            "live migration host1 -> host2 took {took:?}; {} progress samples",
            progress.len()
        );
        assert_eq!(
            whereabouts(&name, &[&h1, &h2]),
            [("host2".to_string(), DomainState::Running)]
        );
        assert!(
            progress.iter().any(|p| p.data_total > 0),
            "progress was reported: {progress:?}"
        );
        let done = h2.completed_job(&name).unwrap();
        assert!(done.downtime_ms.is_some(), "{done:?}");

        // cold: stop it on host2 and move the definition back to host1
        h2.destroy(&name).unwrap();
        let live_on_stopped = h2.migrate(
            &name,
            &h1,
            &MigrateOptions {
                live: true,
                ..Default::default()
            },
        );
        assert!(
            live_on_stopped
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("not running")
        );
        h2.migrate(&name, &h1, &MigrateOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            whereabouts(&name, &[&h1, &h2]),
            [("host1".to_string(), DomainState::Shutoff)]
        );
        h1.start(&name).unwrap();
        assert_eq!(
            whereabouts(&name, &[&h1, &h2]),
            [("host1".to_string(), DomainState::Running)]
        );
    }));
    cleanup(&name, &[&h1, &h2]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// Starts a 1 GiB guest on `src` and a live migration to `dst` throttled to 1 MiB/s (long enough
/// to act on mid-way), and waits until the job exists.
fn start_throttled_migration(
    src: &Arc<Connection>,
    dst: &Arc<Connection>,
    name: &str,
    post_copy: bool,
) -> std::thread::JoinHandle<Result<(), HvError>> {
    src.define(&DomainXml::minimal(name, domain_type(), 1024 * 1024, 1))
        .unwrap();
    src.start(name).unwrap();
    let (s, d, n) = (src.clone(), dst.clone(), name.to_string());
    let mig = std::thread::spawn(move || {
        let opts = MigrateOptions {
            live: true,
            post_copy,
            bandwidth_mib: Some(1),
            ..Default::default()
        };
        s.migrate(&n, &d, &opts)
    });
    assert!(
        src.wait_for_job(name, Duration::from_secs(10)).unwrap(),
        "the migration job never started"
    );
    mig
}

#[test]
fn an_aborted_migration_leaves_the_guest_running_on_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = Arc::new(connect(1, dir.path()));
    let h2 = Arc::new(connect(2, dir.path()));
    let name = format!("kvmop-abort-{}", std::process::id());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mig = start_throttled_migration(&h1, &h2, &name, false);
        h1.abort_job(&name).unwrap_or_else(|e| panic!("{e}"));
        let outcome = mig.join().unwrap();
        assert!(outcome.is_err(), "an aborted migration must report failure");
        assert_eq!(
            whereabouts(&name, &[&h1, &h2]),
            [("host1".to_string(), DomainState::Running)]
        );
        assert!(!h1.job_progress(&name).unwrap().active);
    }));
    cleanup(&name, &[&h1, &h2]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn post_copy_switch_completes_a_throttled_live_migration() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = Arc::new(connect(1, dir.path()));
    let h2 = Arc::new(connect(2, dir.path()));
    let name = format!("kvmop-pc-{}", std::process::id());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mig = start_throttled_migration(&h1, &h2, &name, true);
        // libvirt's job exists before QEMU's migration (and its post-copy capability) is set up:
        // switch only once data moves. Pre-copy at 1 MiB/s would take long; post-copy is quick.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h1.job_progress(&name).unwrap().data_processed == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let t0 = Instant::now();
        h1.start_post_copy(&name).unwrap_or_else(|e| panic!("{e}"));
        mig.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("post-copy migration failed: {e}"));
        eprintln!("post-copy finished {:?} after the switch", t0.elapsed());
        assert_eq!(
            whereabouts(&name, &[&h1, &h2]),
            [("host2".to_string(), DomainState::Running)]
        );
    }));
    cleanup(&name, &[&h1, &h2]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn qemu_tcp_transport_reaches_a_host_without_ssh() {
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": env("KVM_LAB_HOST1_ADDR"),
        "libvirtUri": format!("qemu+tcp://{}/system", env("KVM_LAB_HOST1_ADDR")),
    }))
    .unwrap();
    spec.validate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let c = hypervisor::connect_node(&NodeAccess {
        name: "host1-tcp".into(),
        spec,
        private_key: None,
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(10),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.hostname().unwrap(), "host1");
    // no key material is written for transports that do not use SSH
    assert!(!dir.path().join("host1-tcp").exists());
}

fn tls_access(name: &str, ca: Vec<u8>, dir: &std::path::Path) -> NodeAccess {
    let pki = std::path::PathBuf::from(env("KVM_LAB_PKI"));
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": env("KVM_LAB_HOST1_ADDR"),
        "libvirtUri": format!("qemu+tls://{}/system", env("KVM_LAB_HOST1_ADDR")),
        "tlsSecretRef": {"name": "lab-tls"},
    }))
    .unwrap();
    spec.validate().unwrap_or_else(|e| panic!("{e}"));
    NodeAccess {
        name: name.into(),
        spec,
        private_key: None,
        state_dir: dir.to_path_buf(),
        tls: Some(hypervisor::TlsMaterial {
            ca_cert: ca,
            client_cert: std::fs::read(pki.join("client.crt")).unwrap(),
            client_key: std::fs::read(pki.join("client.key")).unwrap(),
        }),
        timeout: Duration::from_secs(10),
    }
}

#[test]
fn qemu_tls_transport_with_client_certificates() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = std::fs::read(std::path::PathBuf::from(env("KVM_LAB_PKI")).join("ca.crt")).unwrap();
    let access = tls_access("host1-tls", ca, dir.path());
    assert!(
        !format!("{access:?}").contains("PRIVATE KEY"),
        "keys must not appear in Debug output"
    );
    let c = hypervisor::connect_node(&access).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.hostname().unwrap(), "host1");
    for f in ["cacert.pem", "clientcert.pem", "clientkey.pem"] {
        let mode = std::fs::metadata(dir.path().join("host1-tls").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f}: {mode:o}");
    }
    // a CA that did not sign the host's certificate: refused
    let other = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=impostor",
        ])
        .arg("-keyout")
        .arg(other.path().join("k"))
        .arg("-out")
        .arg(other.path().join("c"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok);
    let wrong = tls_access(
        "host1-tls-wrong-ca",
        std::fs::read(other.path().join("c")).unwrap(),
        dir.path(),
    );
    let err = hypervisor::connect_node(&wrong)
        .err()
        .unwrap_or_else(|| panic!("connected trusting the wrong CA"));
    assert!(err.to_string().contains("host1-tls-wrong-ca"), "{err}");
}

/// What a controller does, written against the trait only.
async fn provision_and_move<H: hypervisor::Hypervisor>(
    hv: &H,
    name: &str,
    from: &str,
    to: &str,
) -> Vec<String> {
    let xml = DomainXml::minimal(name, domain_type(), 64 * 1024, 1);
    hv.call(from, "define", move |c| c.define(&xml))
        .await
        .unwrap();
    let n = name.to_string();
    hv.call(from, "start", move |c| c.start(&n)).await.unwrap();
    let n = name.to_string();
    hv.call_pair(from, to, "migrate", move |a, b| {
        a.migrate(
            &n,
            b,
            &MigrateOptions {
                live: true,
                ..Default::default()
            },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let n = name.to_string();
    let mut on = Vec::new();
    for node in [from, to] {
        let n = n.clone();
        if hv.call(node, "state", move |c| c.state(&n)).await.is_ok() {
            on.push(node.to_string());
        }
    }
    on
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_reach_every_backend_through_the_hypervisor_trait() {
    use kvm_operator::hypervisor::cache::NodePool;
    let dir = tempfile::tempdir().unwrap();
    let pool = NodePool::new(Duration::from_secs(30));
    let ssh_node = |i: u32| {
        let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
            "address": env(&format!("KVM_LAB_HOST{i}_ADDR")), "sshKeySecretRef": {"name": "lab"},
            "hostKeyFingerprint": env(&format!("KVM_LAB_HOST{i}_FINGERPRINT")),
        }))
        .unwrap();
        NodeAccess {
            name: format!("host{i}"),
            spec,
            private_key: Some(std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap()),
            state_dir: dir.path().to_path_buf(),
            tls: None,
            timeout: Duration::from_secs(10),
        }
    };
    pool.upsert(ssh_node(1));
    pool.upsert(ssh_node(2));
    let test_spec: KvmNodeSpec = serde_json::from_value(
        serde_json::json!({"address": "localhost", "libvirtUri": "test:///default"}),
    )
    .unwrap();
    pool.upsert(NodeAccess {
        name: "embedded".into(),
        spec: test_spec,
        private_key: None,
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(5),
    });

    // host facts: over SSH for the lab hosts, from libvirt for the test driver
    let (facts, usage) = pool
        .host_facts("host1", Duration::from_millis(200))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        facts.load.is_some() && usage.is_some() && facts.cpus.is_some(),
        "{facts:?}"
    );
    let (facts, usage) = pool
        .host_facts("embedded", Duration::from_millis(200))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        facts.cpus.is_some_and(|c| c > 0) && facts.memory_total.is_some() && usage.is_none(),
        "{facts:?}"
    );
    let names = pool
        .call("embedded", "list", |c| c.list_domains())
        .await
        .unwrap();
    assert!(names.iter().any(|d| d.name == "test"));

    let name = format!("kvmop-trait-{}", std::process::id());
    let on = provision_and_move(&pool, &name, "host1", "host2").await;
    for node in ["host1", "host2"] {
        let n = name.clone();
        let _ = pool
            .call(node, "cleanup", move |c| {
                c.destroy(&n).and_then(|_| c.undefine(&n))
            })
            .await;
    }
    assert_eq!(on, ["host2"], "after the move only host2 has the domain");
}
