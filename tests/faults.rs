//! Faults on the lab's namespace hosts: an unreachable address, libvirtd stopped and restarted,
//! sshd stopped and restarted. Bounded in time; every fault is undone before the test ends.
//! Runs through README's test command (the lab's KVM_LAB_* variables).

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_operator::api::KvmNodeSpec;
use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::{HvError, NodeAccess};

fn env(k: &str) -> String {
    std::env::var(k)
        .unwrap_or_else(|_| panic!("{k} is not set: run the tests through hack/test.sh"))
}

fn access(name: &str, addr: &str, fingerprint: &str, dir: &std::path::Path) -> NodeAccess {
    let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
        "address": addr, "user": "root", "sshKeySecretRef": {"name": "lab"},
        "hostKeyFingerprint": fingerprint,
    }))
    .unwrap();
    NodeAccess {
        name: name.into(),
        spec,
        private_key: Some(std::fs::read(env("KVM_LAB_SSH_KEY")).unwrap()),
        state_dir: dir.to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(2),
    }
}

fn lab(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/lab.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn list(pool: &NodePool, node: &'static str) -> Result<usize, HvError> {
    pool.call(node, "list domains", |c| c.list_domains().map(|d| d.len()))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_fails_within_the_timeout_and_stalls_no_other_host() {
    let dir = tempfile::tempdir().unwrap();
    let pool = NodePool::new(Duration::from_secs(4));
    pool.upsert(access(
        "host1",
        &env("KVM_LAB_HOST1_ADDR"),
        &env("KVM_LAB_HOST1_FINGERPRINT"),
        dir.path(),
    ));
    // an address in the lab's own subnet where no host answers
    pool.upsert(access(
        "ghost",
        "10.77.0.99",
        &format!("SHA256:{}", "A".repeat(43)),
        dir.path(),
    ));
    let t0 = Instant::now();
    let ghost = async {
        let r = list(&pool, "ghost").await;
        (r, t0.elapsed())
    };
    let healthy = async {
        let r = list(&pool, "host1").await;
        (r, t0.elapsed())
    };
    let ((g, g_t), (h, h_t)) = tokio::join!(ghost, healthy);
    assert!(h.is_ok(), "{h:?}");
    assert!(
        h_t < Duration::from_secs(2),
        "host1 took {h_t:?} while ghost hung"
    );
    let err = g.err().unwrap_or_else(|| panic!("ghost answered"));
    assert!(
        matches!(err, HvError::Unreachable { .. } | HvError::Timeout { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("10.77.0.99") || err.to_string().contains("ghost"),
        "{err}"
    );
    assert!(
        g_t < Duration::from_secs(5),
        "ghost failed after {g_t:?}, beyond its timeout"
    );
    // the failure is remembered: the next call fails fast instead of waiting again
    let t1 = Instant::now();
    let again = list(&pool, "ghost")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        t1.elapsed() < Duration::from_millis(200),
        "{:?}",
        t1.elapsed()
    );
    assert!(again.contains("not retrying"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_and_sshd_restarts_on_a_host_are_survived() {
    let dir = tempfile::tempdir().unwrap();
    let pool = NodePool::new(Duration::from_secs(5));
    pool.upsert(access(
        "host2",
        &env("KVM_LAB_HOST2_ADDR"),
        &env("KVM_LAB_HOST2_FINGERPRINT"),
        dir.path(),
    ));
    list(&pool, "host2").await.unwrap();
    assert!(pool.is_connected("host2"));

    // libvirtd stops under an open connection: a clear error, the connection is dropped
    lab(&["fault", "libvirtd", "stop", "2"]);
    let outcome = std::panic::AssertUnwindSafe(async {
        let err = list(&pool, "host2")
            .await
            .err()
            .unwrap_or_else(|| panic!("listed with libvirtd stopped"));
        assert!(err.to_string().contains("host2"), "{err}");
        assert!(err.is_transient(), "{err}");
        assert!(!pool.is_connected("host2"));
        lab(&["fault", "libvirtd", "start", "2"]);
        // reconnects by itself once the backoff allows
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        while Instant::now() < deadline {
            match list(&pool, "host2").await {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            last.is_none(),
            "no reconnect after libvirtd came back: {last:?}"
        );
        assert!(pool.is_connected("host2"));

        // sshd stops: the established libvirt session keeps working; new connections are refused
        lab(&["fault", "sshd", "stop", "2"]);
        list(&pool, "host2")
            .await
            .unwrap_or_else(|e| panic!("the open connection must survive sshd stopping: {e}"));
        let fresh = NodePool::new(Duration::from_secs(5));
        fresh.upsert(access(
            "host2",
            &env("KVM_LAB_HOST2_ADDR"),
            &env("KVM_LAB_HOST2_FINGERPRINT"),
            dir.path(),
        ));
        let err = list(&fresh, "host2")
            .await
            .err()
            .unwrap_or_else(|| panic!("connected with sshd stopped"));
        assert!(matches!(err, HvError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("10.77.0.2:22"), "{err}");
        lab(&["fault", "sshd", "start", "2"]);
        fresh.reset_backoff("host2");
        list(&fresh, "host2")
            .await
            .unwrap_or_else(|e| panic!("after sshd came back: {e}"));
    });
    let result = futures::FutureExt::catch_unwind(outcome).await;
    // whatever happened, leave the host running for the tests after this one
    lab(&["fault", "libvirtd", "start", "2"]);
    lab(&["fault", "sshd", "start", "2"]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
