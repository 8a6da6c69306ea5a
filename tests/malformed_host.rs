//! Malformed answers from a host (truncated or garbage domain and pool XML, garbage host-fact
//! output, libvirt errors with codes the operator does not know) go through the controllers'
//! cores as typed errors and end up in status, never in a panic. The host is libvirt's
//! `test:///default` driver behind a `Hypervisor` that corrupts its answers.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kvm_operator::api::condition;
use kvm_operator::api::{KvmNode, StoragePool, VirtualMachine};
use kvm_operator::controller::{self, Config, World};
use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::domain_xml::DomainXml;
use kvm_operator::hypervisor::host_facts::{self, HostFacts};
use kvm_operator::hypervisor::storage::PoolXml;
use kvm_operator::hypervisor::{Connection, HvError, Hypervisor, NodeAccess};
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Every libvirt answer is truncated domain XML (the real parser's error).
    TruncatedDomainXml,
    /// Every libvirt answer is garbage pool XML.
    GarbagePoolXml,
    /// libvirt fails with an error code no version defines, and a message full of noise.
    UnknownLibvirtError,
    /// Host facts are garbage; libvirt answers normally.
    GarbageFacts,
}

const NOISE: &str = "unexpected \u{1b}[31manswer\u{0} <x>&";

struct Corrupt {
    inner: Arc<NodePool>,
    fault: Fault,
}

impl Corrupt {
    fn error(&self, node: &str) -> Option<HvError> {
        match self.fault {
            Fault::TruncatedDomainXml => {
                Some(DomainXml::parse("<domain type='kvm'><name>vm</na").unwrap_err())
            }
            Fault::GarbagePoolXml => Some(PoolXml::parse("\u{feff}<<pool>>></").unwrap_err()),
            Fault::UnknownLibvirtError => Some(HvError::Libvirt {
                op: "lookup",
                target: node.to_string(),
                cause: NOISE.into(),
                code: 31337,
            }),
            Fault::GarbageFacts => None,
        }
    }
}

impl Hypervisor for Corrupt {
    fn call<T, F>(
        &self,
        node: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        let err = self.error(node);
        let fut = self.inner.call(node, op, f);
        async move {
            match err {
                Some(e) => Err(e),
                None => fut.await,
            }
        }
    }

    fn call_pair<T, F>(
        &self,
        a: &str,
        b: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Connection) -> Result<T, HvError> + Send + 'static,
    {
        let err = self.error(a);
        let fut = self.inner.call_pair(a, b, op, f);
        async move {
            match err {
                Some(e) => Err(e),
                None => fut.await,
            }
        }
    }

    fn host_facts(
        &self,
        node: &str,
        _interval: Duration,
    ) -> impl std::future::Future<Output = Result<(HostFacts, Option<u32>), HvError>> + Send {
        let r = match self.error(node) {
            Some(e) => Err(e),
            None => Ok((
                host_facts::parse("==> cpu\n\u{0}garbage\n==> meminfo\nMemTotal: -12 kB\n==> load"),
                Some(u32::MAX),
            )),
        };
        async move { r }
    }

    fn stamped(
        &self,
        node: &str,
        uid: &str,
    ) -> impl std::future::Future<Output = Result<Vec<String>, HvError>> + Send {
        let err = self.error(node);
        let fut = self.inner.stamped(node, uid);
        async move {
            match err {
                Some(e) => Err(e),
                None => fut.await,
            }
        }
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
}

fn all_text<T: serde::Serialize>(status: &T, notes: &[controller::Note]) -> String {
    let mut s = serde_json::to_string(status).unwrap();
    for n in notes {
        s.push_str(&format!("\n{} {}", n.reason, n.message));
    }
    s
}

/// The status or an Event carries the error's reason or its message (as JSON escapes it).
fn says(text: &str, e: &HvError) -> bool {
    let msg = serde_json::to_string(&e.to_string()).unwrap();
    text.contains(e.reason()) || text.contains(msg.trim_matches('"'))
}

async fn run(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        node_grace: Duration::ZERO,
        ..Config::default()
    };
    let inner = Arc::new(NodePool::new(Duration::from_secs(10)));
    let name = format!("corrupt-{fault:?}").to_lowercase();
    let node: KvmNode = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
        "spec": {"address": "localhost", "libvirtUri": "test:///default"},
    }));
    inner.upsert(NodeAccess {
        name: name.clone(),
        spec: node.spec.clone(),
        private_key: None,
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(5),
    });
    let hv = Corrupt { inner, fault };
    let mut world = World::default();
    world.nodes.push(Arc::new(node.clone()));

    // the node: not Ready, saying why
    let (out, _) = controller::kvm_node::reconcile_core(&node, &world, &hv, &config).await;
    let text = all_text(&out.status, &out.notes);
    let ready = condition::find(&out.status.conditions, condition::READY)
        .unwrap_or_else(|| panic!("{fault:?}: no Ready: {text}"));
    if let Some(e) = hv.error(&name) {
        assert_eq!(ready.status, "False", "{fault:?}: {text}");
        assert!(
            says(&text, &e),
            "{fault:?}: the node's status does not say {e}: {text}"
        );
    } else {
        // garbage facts: no capacity is invented from them
        let cap = out.status.capacity.as_ref();
        assert!(
            ready.status == "False" || cap.is_none_or(|c| c.cpus == 0 || c.memory.bytes() == 0),
            "{fault:?}: {text}"
        );
    }
    let mut node = node;
    node.status = Some(out.status);
    world.nodes = vec![Arc::new(node)];

    // a pool on it: reported per node, with the cause
    let pool: StoragePool = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": "p", "namespace": "default", "uid": format!("pool-{name}"), "generation": 1},
        "spec": {"nodeName": name, "type": "dir", "targetPath": format!("/corrupt-{name}")},
    }));
    let out = controller::storage_pool::reconcile_core(&pool, &world, &hv, &config).await;
    let text = all_text(&out.status, &out.notes);
    if let Some(e) = hv.error(&name) {
        let ready = condition::find(&out.status.conditions, condition::READY).unwrap();
        assert_eq!(ready.status, "False", "{fault:?}: {text}");
        assert!(
            says(&text, &e),
            "{fault:?}: the pool's status does not say {e}: {text}"
        );
    }

    // a VM bound to it: Ready=False with the cause
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm", "namespace": "default", "uid": format!("vm-{name}"), "generation": 1},
        "spec": {"vcpus": 1, "memory": "64Mi"},
        "status": {"node": name, "domainName": format!("default_vm-{name}")},
    }));
    world.vms.push(Arc::new(vm.clone()));
    let out = controller::virtual_machine::reconcile_core(&vm, &world, &hv, &config, None).await;
    let text = all_text(&out.status, &out.notes);
    let ready = condition::find(&out.status.conditions, condition::READY)
        .unwrap_or_else(|| panic!("{fault:?}: no Ready: {text}"));
    if let Some(e) = hv.error(&name) {
        assert_ne!(ready.status, "True", "{fault:?}: {text}");
        assert!(
            says(&text, &e),
            "{fault:?}: the VM's status does not say {e}: {text}"
        );
        assert!(out.requeue.is_some(), "{fault:?}: looked at again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_domain_xml_is_reported_not_crashed_on() {
    run(Fault::TruncatedDomainXml).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_pool_xml_is_reported_not_crashed_on() {
    run(Fault::GarbagePoolXml).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_libvirt_error_codes_are_reported_not_crashed_on() {
    run(Fault::UnknownLibvirtError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_host_facts_are_reported_not_crashed_on() {
    run(Fault::GarbageFacts).await;
}

/// The parsers' own errors are typed and name what was being read.
#[test]
fn malformed_xml_gives_typed_errors() {
    for text in [
        "",
        "<domain",
        "<domain><name>x</name>",
        "<pool type='dir'><name>",
        "\0",
    ] {
        match DomainXml::parse(text) {
            Err(HvError::Xml { what, .. }) => assert!(!what.is_empty()),
            Ok(_) => {}
            Err(e) => panic!("{text:?}: {e:?}"),
        }
        match PoolXml::parse(text) {
            Err(HvError::Xml { what, .. }) => assert!(!what.is_empty()),
            Ok(_) => {}
            Err(e) => panic!("{text:?}: {e:?}"),
        }
    }
}

/// Records every call's operation; fails the calls named in `fail` (once each) with a
/// connection error, as a host that drops the connection mid-call would.
struct Recording {
    inner: NodePool,
    ops: std::sync::Mutex<Vec<&'static str>>,
    fail: std::sync::Mutex<Vec<&'static str>>,
}

impl Hypervisor for Recording {
    fn call<T, F>(
        &self,
        node: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    {
        self.ops.lock().unwrap().push(op);
        let failing = {
            let mut fail = self.fail.lock().unwrap();
            let hit = fail.iter().position(|o| *o == op);
            hit.map(|i| fail.remove(i))
        };
        let target = node.to_string();
        let fut = self.inner.call(node, op, f);
        async move {
            match failing {
                Some(_) => Err(HvError::Unreachable {
                    target,
                    cause: "connection reset by peer".into(),
                }),
                None => fut.await,
            }
        }
    }

    fn call_pair<T, F>(
        &self,
        a: &str,
        b: &str,
        op: &'static str,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, HvError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Connection) -> Result<T, HvError> + Send + 'static,
    {
        self.inner.call_pair(a, b, op, f)
    }

    fn host_facts(
        &self,
        node: &str,
        interval: Duration,
    ) -> impl std::future::Future<Output = Result<(HostFacts, Option<u32>), HvError>> + Send {
        self.inner.host_facts(node, interval)
    }

    fn stamped(
        &self,
        node: &str,
        uid: &str,
    ) -> impl std::future::Future<Output = Result<Vec<String>, HvError>> + Send {
        self.inner.stamped(node, uid)
    }
}

/// A new VM is defined, started and read back in one call after the first look (two calls in
/// all, as many as a direct define + start); a connection lost in that call is reported as
/// the define step's failure and the next reconcile finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_vm_is_defined_started_and_read_in_one_call_after_the_first_look() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.xml");
    std::fs::write(
        &file,
        "<node><cpu><active>8</active><nodes>1</nodes><sockets>1</sockets><cores>8</cores>\
         <threads>1</threads></cpu><memory>16777216</memory></node>",
    )
    .unwrap();
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let node: KvmNode = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": "one-call", "uid": "uid-one-call", "generation": 1},
        "spec": {"address": "localhost", "libvirtUri": format!("test://{}", file.display())},
    }));
    let inner = NodePool::new(Duration::from_secs(10));
    inner.upsert(NodeAccess {
        name: "one-call".into(),
        spec: node.spec.clone(),
        private_key: None,
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(5),
    });
    let hv = Recording {
        inner,
        ops: Default::default(),
        fail: std::sync::Mutex::new(vec!["define and start domain"]),
    };
    let mut world = World::default();
    let (out, _) = controller::kvm_node::reconcile_core(&node, &world, &hv, &config).await;
    let mut node = node;
    node.status = Some(out.status);
    world.nodes.push(Arc::new(node));
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm", "namespace": "default", "uid": "vm-one-call", "generation": 1},
        "spec": {"vcpus": 1, "memory": "64Mi"},
        "status": {"node": "one-call", "domainName": "default_vm"},
    }));
    world.vms.push(Arc::new(vm.clone()));

    // the connection drops during the combined call: the define step is named, retried soon
    hv.ops.lock().unwrap().clear();
    let out = controller::virtual_machine::reconcile_core(&vm, &world, &hv, &config, None).await;
    let text = all_text(&out.status, &out.notes);
    assert_eq!(
        *hv.ops.lock().unwrap(),
        ["observe VM", "define and start domain", "observe VM"],
        "{text}"
    );
    let ready = condition::find(&out.status.conditions, condition::READY).unwrap();
    assert_eq!(ready.status, "False", "{text}");
    assert!(
        ready
            .message
            .contains("define domain on KvmNode one-call failed")
            && ready.message.contains("connection reset by peer"),
        "{text}"
    );
    assert_eq!(
        out.requeue,
        Some(Duration::from_secs(15)),
        "transient: {text}"
    );

    // the next reconcile: one look, one call that defines, starts and reads back
    hv.ops.lock().unwrap().clear();
    let out = controller::virtual_machine::reconcile_core(&vm, &world, &hv, &config, None).await;
    let text = all_text(&out.status, &out.notes);
    assert_eq!(
        *hv.ops.lock().unwrap(),
        ["observe VM", "define and start domain"],
        "{text}"
    );
    let ready = condition::find(&out.status.conditions, condition::READY).unwrap();
    assert_eq!(ready.status, "True", "{text}");
    assert_eq!(
        out.status.power_state,
        Some(kvm_operator::api::virtual_machine::PowerState::Running),
        "{text}"
    );
    let reasons: Vec<&str> = out.notes.iter().map(|n| n.reason).collect();
    assert_eq!(reasons, ["Defined", "Started"], "{text}");
    assert!(
        out.status
            .definition
            .as_ref()
            .is_some_and(|d| d.sha256.len() == 64),
        "the definition as read back: {text}"
    );

    // stopped behind the operator's back: started and read back in one call
    hv.inner
        .call("one-call", "test", |c| c.destroy("default_vm"))
        .await
        .unwrap();
    hv.ops.lock().unwrap().clear();
    let out = controller::virtual_machine::reconcile_core(&vm, &world, &hv, &config, None).await;
    let text = all_text(&out.status, &out.notes);
    assert_eq!(
        *hv.ops.lock().unwrap(),
        ["observe VM", "start domain"],
        "{text}"
    );
    assert_eq!(
        out.status.power_state,
        Some(kvm_operator::api::virtual_machine::PowerState::Running),
        "{text}"
    );
}

/// A domain of the VM's name that another object owns, or nobody does, is left alone and not
/// described as the VM's own: Pending, no definition recorded, nothing copied as its backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_of_the_same_name_owned_by_another_object_is_not_described_as_the_vms() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.xml");
    std::fs::write(
        &file,
        "<node><cpu><active>8</active><nodes>1</nodes><sockets>1</sockets><cores>8</cores>\
         <threads>1</threads></cpu><memory>16777216</memory></node>",
    )
    .unwrap();
    let uri = format!("test://{}", file.display());
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let node: KvmNode = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": "shared", "uid": "uid-shared", "generation": 1},
        "spec": {"address": "localhost", "libvirtUri": uri},
    }));
    let hv = NodePool::new(Duration::from_secs(10));
    hv.upsert(NodeAccess {
        name: "shared".into(),
        spec: node.spec.clone(),
        private_key: None,
        state_dir: dir.path().to_path_buf(),
        tls: None,
        timeout: Duration::from_secs(5),
    });
    for (domain, owner) in [
        (
            "default_taken",
            Some(kvm_operator::hypervisor::domain_xml::Owner::new(
                "11111111-2222-4333-8444-555555555555",
                "default",
                "taken",
            )),
        ),
        ("default_unmanaged", None),
    ] {
        let mut xml = DomainXml::minimal(domain, "test", 64 * 1024, 1);
        xml.metadata = Some(kvm_operator::hypervisor::domain_xml::Metadata { owner });
        hv.call("shared", "test", move |c| {
            c.define(&xml)?;
            c.start(&xml.name)
        })
        .await
        .unwrap();
    }
    let mut world = World::default();
    world.nodes.push(Arc::new(node));
    for (name, reason) in [
        ("taken", "DomainOwnedElsewhere"),
        ("unmanaged", "DomainExists"),
    ] {
        let vm: VirtualMachine = from_json(json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": "default", "uid": format!("vm-{name}"), "generation": 1},
            "spec": {"vcpus": 1, "memory": "64Mi"},
            "status": {"node": "shared", "domainName": format!("default_{name}")},
        }));
        let out =
            controller::virtual_machine::reconcile_core(&vm, &world, &hv, &config, None).await;
        let text = all_text(&out.status, &out.notes);
        let ready = condition::find(&out.status.conditions, condition::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason),
            "{text}"
        );
        assert_eq!(
            out.status.power_state,
            Some(kvm_operator::api::virtual_machine::PowerState::Pending),
            "the running guest is not this VM's: {text}"
        );
        assert!(out.status.definition.is_none(), "{text}");
        assert!(out.status.observed.is_none(), "{text}");
        assert!(out.status.domain_uuid.is_none(), "{text}");
        // and it is left running
        let name = format!("default_{name}");
        let state = hv.call("shared", "test", move |c| c.state(&name)).await;
        assert_eq!(
            state.unwrap(),
            kvm_operator::hypervisor::DomainState::Running
        );
    }
}
