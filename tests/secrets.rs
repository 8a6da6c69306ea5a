//! Secrets never reach a log line, a status or an Event: reconciles of a node whose SSH key
//! comes from a Secret (its connection failing) and of a VM whose cloud-init user data comes
//! from a Secret, with every log line captured at TRACE level.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kvm_operator::api::{KvmNode, StoragePool, VirtualMachine};
use kvm_operator::controller::{self, Config, World};
use kvm_operator::hypervisor::NodeAccess;
use kvm_operator::hypervisor::cache::NodePool;
use serde_json::json;

const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQSECRETKEYMATERIAL0123456789\n-----END OPENSSH PRIVATE KEY-----\n";
const KEY_MARK: &str = "SECRETKEYMATERIAL";
const USER_DATA: &str =
    "#cloud-config\nchpasswd:\n  list: |\n    root:Hunter2-TopSecret-Pa55w0rd\n";
const PASSWORD: &str = "Hunter2-TopSecret-Pa55w0rd";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at TRACE, from every crate and thread.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let c = Captured::default();
        let w = c.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || w.clone())
            .with_ansi(false)
            .init();
        c
    })
}

fn secret(ns: &str, name: &str, key: &str, value: &str) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": {key: ByteString(value.as_bytes().to_vec())},
    }))
    .unwrap()
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_clean(what: &str, text: &str, dir: &std::path::Path) {
    for s in [KEY_MARK, "BEGIN OPENSSH PRIVATE KEY", PASSWORD] {
        assert!(!text.contains(s), "{what} contains {s:?}:\n{text}");
    }
    // nor the files the key was written to
    let d = dir.display().to_string();
    assert!(
        !text.contains(&format!("{d}/")),
        "{what} names the key's directory:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_user_data_never_reach_logs_status_or_events() {
    let logs = logs();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        connect_timeout: Duration::from_secs(2),
        namespace: "ops".into(),
        ..Config::default()
    };
    let secrets = vec![
        secret("ops", "hv-key", "ssh-privatekey", KEY),
        secret("default", "ud", "userdata", USER_DATA),
    ];
    let hv = Arc::new(NodePool::new(Duration::from_secs(10)));
    let mut world = World::default();
    let mut texts = Vec::new();

    // a node reached over SSH with the key (nothing listens there: the connection fails), one
    // through libvirt's own libssh client (the key goes to a file named in the URI), and the
    // test driver for the VM
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (name, uri) in [
        ("ssh-node", None),
        ("libssh-node", Some("qemu+libssh://root@127.0.0.1/system")),
        ("test-node", Some("test:///default")),
    ] {
        let node: KvmNode = from_json(json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
            "spec": {"address": "127.0.0.1", "port": port, "libvirtUri": uri,
                     "sshKeySecretRef": {"name": "hv-key"},
                     "insecureSkipHostKeyVerification": true},
        }));
        let access = controller::kvm_node::load_access(&node, secrets.as_slice(), &config)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(access.private_key.is_some());
        texts.push(format!("{access:?}"));
        hv.upsert(access);
        world.nodes.push(Arc::new(node));
    }
    let mut nodes = Vec::new();
    for n in world.nodes.clone() {
        let (out, _) = controller::kvm_node::reconcile_core(&n, &world, hv.as_ref(), &config).await;
        texts.push(serde_json::to_string(&out.status).unwrap());
        texts.extend(out.notes.iter().map(|n| n.message.clone()));
        let mut n = (*n).clone();
        n.status = Some(out.status);
        nodes.push(Arc::new(n));
    }
    world.nodes = nodes;
    for n in ["ssh-node", "libssh-node"] {
        let st = serde_json::to_string(&world.node(n).unwrap().status).unwrap();
        assert!(st.contains("\"Ready\""), "{n}: {st}");
    }

    // a VM with user data from a Secret, on a pool of the test node
    let mut pool: StoragePool = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": "sp", "namespace": "default", "uid": "uid-sp", "generation": 1},
        "spec": {"nodeName": "test-node", "type": "dir", "targetPath": "/secrets-test"},
    }));
    for _ in 0..3 {
        let out =
            controller::storage_pool::reconcile_core(&pool, &world, hv.as_ref(), &config).await;
        pool.status = Some(out.status);
    }
    world.pools.push(Arc::new(pool));
    let mut vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "s", "namespace": "default", "uid": "uid-vm-secrets", "generation": 1},
        "spec": {"vcpus": 1, "memory": "64Mi",
                 "disks": [{"name": "root", "new": {"pool": "sp", "size": "1Mi"}}],
                 "cloudInit": {"userDataSecretRef": {"name": "ud"}},
                 "placement": {"nodeName": "test-node"}},
    }));
    let ud = controller::virtual_machine::user_data(&vm, secrets.as_slice())
        .await
        .unwrap()
        .unwrap();
    assert!(ud.contains(PASSWORD));
    for _ in 0..8 {
        world.vms = vec![Arc::new(vm.clone())];
        let out = controller::virtual_machine::reconcile_core(
            &vm,
            &world,
            hv.as_ref(),
            &config,
            Some(&ud),
        )
        .await;
        texts.push(serde_json::to_string(&out.status).unwrap());
        texts.extend(out.notes.iter().map(|n| n.message.clone()));
        vm.status = Some(out.status);
    }
    let st = vm.status.clone().unwrap();
    assert_eq!(
        st.power_state,
        Some(kvm_operator::api::virtual_machine::PowerState::Running),
        "{st:?}"
    );

    for (i, t) in texts.iter().enumerate() {
        assert_clean(&format!("status/event #{i}"), t, dir.path());
    }
    let captured = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(!captured.is_empty(), "nothing was logged");
    assert_clean("the logs", &captured, dir.path());
}

/// A `test:///FILE` URI makes libvirt's test driver read FILE: when it is not a node
/// description (a token, a key), the error in status must not quote its content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_uri_naming_a_secret_file_does_not_put_its_content_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("eyJhbGciOi.{KEY_MARK}.signature\n")).unwrap();
    let config = Config {
        state_dir: dir.path().join("state"),
        ..Config::default()
    };
    let node: KvmNode = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": "leaky", "uid": "uid-leaky", "generation": 1},
        "spec": {"address": "localhost", "libvirtUri": format!("test://{}", file.display())},
    }));
    let hv = NodePool::new(Duration::from_secs(5));
    hv.upsert(NodeAccess {
        name: "leaky".into(),
        spec: node.spec.clone(),
        private_key: None,
        state_dir: config.state_dir.clone(),
        tls: None,
        timeout: Duration::from_secs(5),
    });
    let world = World::default();
    let (out, _) = controller::kvm_node::reconcile_core(&node, &world, &hv, &config).await;
    let text = serde_json::to_string(&out.status).unwrap()
        + &out
            .notes
            .iter()
            .map(|n| n.message.clone())
            .collect::<String>();
    assert!(!text.contains(KEY_MARK), "{text}");
}
