//! The controllers' cores against the lab: real libvirtd with QEMU/KVM in namespace hosts,
//! reached over real sshd with pinned host keys. No kube-apiserver runs here: these tests drive
//! each controller's core (observe → plan → execute → status) and feed the status it computes
//! back into the object, as the API server would after the status patch. The API calls of the
//! Kubernetes glue are pinned separately in tests/controller_api.rs.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kvm_operator::api::condition::{self, is_true};
use kvm_operator::api::storage_pool::PoolState;
use kvm_operator::api::virtual_machine::PowerState;
use kvm_operator::api::{KvmNode, StoragePool, VirtualMachine};
use kvm_operator::controller::{self, Config, Note, World};
use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::domain_xml::DomainXml;
use kvm_operator::hypervisor::{
    Connection, DeviceScope, DomainState, HvError, Hypervisor, NodeAccess,
};

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| {
        panic!("{k} is not set: run the tests through README's test command (hack/test.sh), which starts the lab")
    })
}

fn uid() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "00000000-0000-4000-8000-{:06}{:06}",
        std::process::id() % 1_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
}

/// A lab with the two namespace hosts registered as KvmNodes `host1` and `host2`.
struct Lab {
    hv: Arc<NodePool>,
    world: World,
    config: Config,
    _dir: tempfile::TempDir,
}

fn node_object(i: u32, labels: serde_json::Value) -> KvmNode {
    from_json(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": format!("host{i}"), "uid": uid(), "generation": 1, "labels": labels},
        "spec": {
            "address": var(&format!("KVM_LAB_HOST{i}_ADDR")), "port": 22, "user": var("KVM_LAB_SSH_USER"),
            "sshKeySecretRef": {"name": "lab-key"},
            "hostKeyFingerprint": var(&format!("KVM_LAB_HOST{i}_FINGERPRINT")),
        }
    }))
}

impl Lab {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            shutdown_grace: Duration::from_secs(1),
            ..Config::default()
        };
        let hv = Arc::new(NodePool::new(Duration::from_secs(60)));
        let key = std::fs::read(var("KVM_LAB_SSH_KEY")).unwrap();
        let mut world = World::default();
        for i in [1, 2] {
            let node = node_object(i, serde_json::json!({"lab.kvm-operator.io/pool": "yes"}));
            hv.upsert(NodeAccess {
                name: format!("host{i}"),
                spec: node.spec.clone(),
                private_key: Some(key.clone()),
                state_dir: config.state_dir.clone(),
                tls: None,
                timeout: Duration::from_secs(15),
            });
            world.nodes.push(Arc::new(node));
        }
        let mut lab = Lab {
            hv,
            world,
            config,
            _dir: dir,
        };
        lab.refresh_nodes().await;
        lab
    }

    async fn refresh_nodes(&mut self) {
        let mut nodes = Vec::new();
        for n in &self.world.nodes {
            let (out, _) = controller::kvm_node::reconcile_core(
                n,
                &self.world,
                self.hv.as_ref(),
                &self.config,
            )
            .await;
            let mut n = (**n).clone();
            n.status = Some(out.status);
            nodes.push(Arc::new(n));
        }
        self.world.nodes = nodes;
    }

    fn node(&self, name: &str) -> &KvmNode {
        self.world.node(name).unwrap()
    }

    /// A dir pool on every lab host (by selector), under the host's own /var/lib/libvirt.
    async fn dir_pool(&mut self, ns: &str, name: &str) -> StoragePool {
        let pool: StoragePool = from_json(serde_json::json!({
            "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
            "metadata": {"name": name, "namespace": ns, "uid": uid(), "generation": 1},
            "spec": {"nodeSelector": {"lab.kvm-operator.io/pool": "yes"}, "type": "dir",
                     "targetPath": format!("/var/lib/libvirt/{name}"), "deletionPolicy": "Delete"}
        }));
        self.reconcile_pool(pool).await
    }

    /// Reconciles `pool` (with its current status) and records the new status.
    async fn reconcile_pool(&mut self, mut pool: StoragePool) -> StoragePool {
        let out = controller::storage_pool::reconcile_core(
            &pool,
            &self.world,
            self.hv.as_ref(),
            &self.config,
        )
        .await;
        pool.status = Some(out.status);
        self.world.pools.retain(|p| {
            !(p.metadata.name == pool.metadata.name
                && p.metadata.namespace == pool.metadata.namespace)
        });
        self.world.pools.push(Arc::new(pool.clone()));
        pool
    }

    /// Runs `f` on `node` through a pool of its own, as a person's `virsh` would: outside the
    /// operator's connections, so nothing it does reaches the operator's stamp index.
    async fn by_hand<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    ) -> T {
        let pool = NodePool::new(Duration::from_secs(60));
        pool.upsert(NodeAccess {
            name: node.to_string(),
            spec: self.node(node).spec.clone(),
            private_key: Some(std::fs::read(var("KVM_LAB_SSH_KEY")).unwrap()),
            state_dir: self.config.state_dir.clone(),
            tls: None,
            timeout: Duration::from_secs(15),
        });
        pool.call(node, "by hand", f)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn call<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce(&Connection) -> Result<T, HvError> + Send + 'static,
    ) -> T {
        self.hv
            .call(node, "test", f)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn put_vm(&mut self, vm: &VirtualMachine) {
        self.world.vms.retain(|v| v.metadata.uid != vm.metadata.uid);
        self.world.vms.push(Arc::new(vm.clone()));
    }

    /// Reconciles `vm` with `hv` until it settles (status unchanged and nothing left to do), as
    /// the controller would on each status change. Returns every Event published.
    async fn settle_with(
        &mut self,
        vm: &mut VirtualMachine,
        hv: &impl Hypervisor,
        rounds: usize,
    ) -> Vec<Note> {
        let mut notes = Vec::new();
        for _ in 0..rounds {
            self.put_vm(vm);
            let out = controller::virtual_machine::reconcile_core(
                vm,
                &self.world,
                hv,
                &self.config,
                None,
            )
            .await;
            notes.extend(out.notes.clone());
            let same = vm.status.as_ref() == Some(&out.status);
            let done = out.requeue.is_none_or(|r| r >= Duration::from_secs(15));
            vm.status = Some(out.status);
            if same && done {
                break;
            }
        }
        self.put_vm(vm);
        notes
    }

    async fn settle(&mut self, vm: &mut VirtualMachine) -> Vec<Note> {
        let hv = self.hv.clone();
        self.settle_with(vm, hv.as_ref(), 8).await
    }

    async fn delete(&mut self, vm: &VirtualMachine) -> Vec<Note> {
        let notes = controller::virtual_machine::cleanup_core(vm, &self.world, self.hv.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.world.vms.retain(|v| v.metadata.uid != vm.metadata.uid);
        notes
    }

    async fn volumes(&self, node: &str, pool: &str) -> Vec<String> {
        let p = pool.to_string();
        let mut v = self.call(node, move |c| c.list_volumes(&p)).await;
        v.sort();
        v
    }

    async fn remove_pool(&mut self, pool: &StoragePool) {
        let notes =
            controller::storage_pool::cleanup_core(pool, &self.world, self.hv.as_ref()).await;
        notes.unwrap_or_else(|e| panic!("{e}"));
    }
}

fn vm_object(ns: &str, name: &str, spec: serde_json::Value) -> VirtualMachine {
    from_json(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns, "uid": uid(), "generation": 1},
        "spec": spec,
    }))
}

fn bump(vm: &mut VirtualMachine, edit: impl FnOnce(&mut kvm_operator::api::VirtualMachineSpec)) {
    edit(&mut vm.spec);
    vm.metadata.generation = Some(vm.metadata.generation.unwrap_or(1) + 1);
}

fn st(vm: &VirtualMachine) -> &kvm_operator::api::VirtualMachineStatus {
    vm.status.as_ref().unwrap()
}

fn cond<'a>(vm: &'a VirtualMachine, t: &str) -> &'a condition::Condition {
    condition::find(&st(vm).conditions, t)
        .unwrap_or_else(|| panic!("no {t} condition: {:?}", st(vm)))
}

fn reasons(notes: &[Note]) -> Vec<&'static str> {
    notes.iter().map(|n| n.reason).collect()
}

fn aliases(x: &DomainXml) -> Vec<String> {
    let mut v: Vec<String> = x
        .devices
        .disk
        .iter()
        .filter_map(|d| d.alias.as_ref().map(|a| a.name.clone()))
        .chain(
            x.devices
                .interface
                .iter()
                .filter_map(|i| i.alias.as_ref().map(|a| a.name.clone())),
        )
        .collect();
    v.sort();
    v
}

fn host_dir(node: &str, sub: &str) -> PathBuf {
    PathBuf::from(var("KVM_LAB"))
        .join("hosts")
        .join(node)
        .join("lib")
        .join(sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_report_capacity_readiness_and_unmanaged_domains() {
    let mut lab = Lab::new().await;
    let stray = format!("stray-{}", std::process::id());
    let s = stray.clone();
    let kind = if std::path::Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    };
    lab.call("host2", move |c| {
        c.define(&DomainXml::minimal(&s, kind, 32 * 1024, 1))
    })
    .await;
    lab.refresh_nodes().await;
    let s = stray.clone();
    lab.call("host2", move |c| c.undefine(&s)).await;
    for name in ["host1", "host2"] {
        let n = lab.node(name).status.clone().unwrap();
        let cap = n.capacity.clone().expect("capacity");
        assert!(cap.cpus >= 1 && cap.memory.bytes() > 64 << 20, "{cap:?}");
        let alloc = n.allocatable.clone().expect("allocatable");
        // default overcommit: CPUs × 4, memory × 1
        assert_eq!(alloc.cpus, cap.cpus * 4);
        assert_eq!(alloc.memory.bytes(), cap.memory.bytes());
        assert!(
            is_true(&n.conditions, condition::READY),
            "{:?}",
            n.conditions
        );
        assert!(is_true(&n.conditions, condition::REACHABLE));
        assert!(n.libvirt_version.is_some() && n.qemu_version.is_some());
        assert!(n.load.is_some() && n.last_heartbeat.is_some());
    }
    let h2 = lab.node("host2").status.clone().unwrap();
    assert!(
        h2.unmanaged_domains
            .iter()
            .any(|d| d.name == stray && d.state == "shut off"),
        "{:?}",
        h2.unmanaged_domains
    );
    // a wrong pinned key: not ready, with the reason
    let mut bad = node_object(1, serde_json::json!({}));
    bad.metadata.name = Some("host1-badkey".into());
    bad.spec.host_key_fingerprint = Some(var("KVM_LAB_HOST2_FINGERPRINT"));
    lab.hv.upsert(NodeAccess {
        name: "host1-badkey".into(),
        spec: bad.spec.clone(),
        private_key: Some(std::fs::read(var("KVM_LAB_SSH_KEY")).unwrap()),
        state_dir: lab.config.state_dir.clone(),
        tls: None,
        timeout: Duration::from_secs(10),
    });
    let (out, _) =
        controller::kvm_node::reconcile_core(&bad, &lab.world, lab.hv.as_ref(), &lab.config).await;
    let ready = condition::find(&out.status.conditions, condition::READY).unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "HostKeyMismatch", "{}", ready.message);
    assert!(
        out.notes
            .iter()
            .any(|n| n.warning && n.reason == "HostKeyMismatch")
    );
    let sched = condition::find(&out.status.conditions, "Schedulable").unwrap();
    assert_eq!(sched.status, "False");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pools_run_on_selected_nodes_conflicts_are_left_alone_and_release_follows_policy() {
    let mut lab = Lab::new().await;
    let name = format!("kvmop-pool-{}", std::process::id());
    let pool = lab.dir_pool("default", &name).await;
    let s = pool.status.clone().unwrap();
    assert_eq!(s.ready_nodes.as_deref(), Some("2/2"), "{s:?}");
    for n in &s.nodes {
        assert_eq!(n.state, PoolState::Running, "{n:?}");
        assert!(n.capacity.as_ref().is_some_and(|c| c.bytes() > 0));
    }
    assert!(host_dir("host1", &name).is_dir() && host_dir("host2", &name).is_dir());
    // another object claiming the same libvirt pool name with another path: reported, untouched
    let mut other: StoragePool = from_json(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": "other", "namespace": "default", "uid": uid(), "generation": 1},
        "spec": {"nodeName": "host1", "type": "dir", "poolName": name,
                 "targetPath": format!("/var/lib/libvirt/{name}-other")}
    }));
    let out =
        controller::storage_pool::reconcile_core(&other, &lab.world, lab.hv.as_ref(), &lab.config)
            .await;
    assert_eq!(
        out.status.nodes[0].state,
        PoolState::Conflict,
        "{:?}",
        out.status
    );
    assert!(out.notes.iter().any(|n| n.reason == "PoolConflict"));
    let n = name.clone();
    let path = lab
        .call("host1", move |c| c.pool_definition(&n))
        .await
        .and_then(|d| d.target.map(|t| t.path));
    assert_eq!(path, Some(format!("/var/lib/libvirt/{name}")), "left alone");
    // an invalid spec waits for a change, naming the field
    other.spec.target_path = Some("relative/path".into());
    let out =
        controller::storage_pool::reconcile_core(&other, &lab.world, lab.hv.as_ref(), &lab.config)
            .await;
    let r = condition::find(&out.status.conditions, condition::READY).unwrap();
    assert_eq!(r.reason, "InvalidSpec");
    assert!(r.message.contains("spec.targetPath"), "{}", r.message);
    assert_eq!(out.requeue, None);
    // host2 leaves the selector: with deletionPolicy Delete the pool is undefined there (data kept)
    let mut nodes = lab.world.nodes.clone();
    let mut h2 = (*nodes[1]).clone();
    h2.metadata.labels = None;
    nodes[1] = Arc::new(h2);
    lab.world.nodes = nodes;
    let pool = lab.reconcile_pool(pool).await;
    assert_eq!(
        pool.status.as_ref().unwrap().ready_nodes.as_deref(),
        Some("1/1")
    );
    let n = name.clone();
    assert_eq!(
        lab.call("host2", move |c| c.pool_definition(&n)).await,
        None
    );
    assert!(host_dir("host2", &name).is_dir(), "the data stays");
    // deletion is refused while a VM uses the pool
    let vm = vm_object(
        "default",
        "user",
        serde_json::json!({"vcpus": 1, "memory": "64Mi",
        "disks": [{"name": "root", "new": {"pool": name, "size": "16Mi"}}]}),
    );
    lab.put_vm(&vm);
    let err = controller::storage_pool::cleanup_core(&pool, &lab.world, lab.hv.as_ref())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "DeletionBlocked");
    assert!(err.to_string().contains("default/user"), "{err}");
    lab.world.vms.clear();
    lab.remove_pool(&pool).await;
    let n = name.clone();
    assert_eq!(
        lab.call("host1", move |c| c.pool_definition(&n)).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vm_lifecycle_clone_stop_start_hotplug_drift_and_delete() {
    let mut lab = Lab::new().await;
    let pname = format!("kvmop-vm-{}", std::process::id());
    let pool = lab.dir_pool("default", &pname).await;
    // a template volume on both hosts (placement may pick either)
    for h in ["host1", "host2"] {
        let p = pname.clone();
        lab.call(h, move |c| {
            c.create_volume(
                &p,
                "template.qcow2",
                32 << 20,
                kvm_operator::api::virtual_machine::VolumeFormat::Qcow2,
            )
        })
        .await;
    }
    let vm_name = format!("web-{}", std::process::id());
    let mut vm = vm_object(
        "default",
        &vm_name,
        serde_json::json!({
            "vcpus": 1, "memory": "64Mi",
            "disks": [
                {"name": "root", "clone": {"pool": "pool", "template": "template.qcow2"}},
                {"name": "data", "new": {"pool": "pool", "size": "16Mi"}},
            ],
            "nics": [{"name": "net0", "bridge": "vmbr0"}],
            "cloudInit": {"userData": "#cloud-config\nhostname: web\n"},
            "volumeDeletionPolicy": "Delete",
        }),
    );
    // the spec names the StoragePool object: register ours under the name "pool"
    let mut p2 = pool.clone();
    p2.metadata.name = Some("pool".into());
    p2.spec.pool_name = Some(pname.clone());
    lab.world.pools.push(Arc::new(p2));

    let notes = lab.settle(&mut vm).await;
    let node = st(&vm).node.clone().expect("placed");
    let domain = st(&vm).domain_name.clone().unwrap();
    assert_eq!(domain, format!("default_{vm_name}"));
    assert_eq!(
        st(&vm).power_state,
        Some(PowerState::Running),
        "{:?}",
        st(&vm)
    );
    assert!(
        is_true(&st(&vm).conditions, condition::READY),
        "{:?}",
        st(&vm).conditions
    );
    assert!(is_true(&st(&vm).conditions, condition::SCHEDULED));
    // its NIC is on a bridge and the guest has no OS: no agent, no lease, and libvirt 9.0's
    // neighbour-table source fails ("wrong nlmsg len"); none of it fails the reconcile, and no
    // address is made up
    assert!(st(&vm).ips.is_empty(), "{:?}", st(&vm).ips);
    let placement = st(&vm).placement.clone().unwrap();
    assert!(
        placement.message.contains("scored"),
        "{}",
        placement.message
    );
    for r in [
        "Scheduled",
        "VolumeCloned",
        "VolumeCreated",
        "SeedWritten",
        "Defined",
        "Started",
    ] {
        assert!(
            reasons(&notes).contains(&r),
            "{r} missing from {:?}",
            reasons(&notes)
        );
    }
    assert!(st(&vm).macs.contains_key("net0"), "{:?}", st(&vm).macs);
    assert_eq!(
        lab.volumes(&node, &pname).await,
        [
            format!("default-{vm_name}-cidata.iso"),
            format!("default-{vm_name}-data.qcow2"),
            format!("default-{vm_name}-root.qcow2"),
            "template.qcow2".to_string()
        ]
    );
    let d = domain.clone();
    let x = lab.call(&node, move |c| c.domain_xml(&d)).await;
    assert_eq!(x.owner().map(|o| o.uid.clone()), vm.metadata.uid.clone());
    assert_eq!(aliases(&x), ["ua-cidata", "ua-data", "ua-net0", "ua-root"]);

    // stop, then start again
    bump(&mut vm, |s| {
        s.run_strategy = kvm_operator::api::virtual_machine::RunStrategy::Stopped
    });
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"Stopped"));
    let d = domain.clone();
    assert_eq!(
        lab.call(&node, move |c| c.state(&d)).await,
        DomainState::Shutoff
    );
    assert_eq!(st(&vm).power_state, Some(PowerState::Stopped));
    assert!(is_true(&st(&vm).conditions, condition::READY));
    bump(&mut vm, |s| {
        s.run_strategy = kvm_operator::api::virtual_machine::RunStrategy::Running
    });
    lab.settle(&mut vm).await;
    let d = domain.clone();
    assert_eq!(
        lab.call(&node, move |c| c.state(&d)).await,
        DomainState::Running
    );

    // hot-plug a disk and a NIC into the running guest
    bump(&mut vm, |s| {
        s.disks.push(from_json(
            serde_json::json!({"name": "extra", "new": {"pool": "pool", "size": "8Mi"}}),
        ));
        s.nics.push(from_json(
            serde_json::json!({"name": "net1", "bridge": "vmbr0"}),
        ));
    });
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"DeviceHotplugged"), "{notes:?}");
    let d = domain.clone();
    let (live, persistent) = lab
        .call(&node, move |c| {
            Ok((c.domain_xml(&d)?, c.persistent_xml(&d)?))
        })
        .await;
    let want = [
        "ua-cidata",
        "ua-data",
        "ua-extra",
        "ua-net0",
        "ua-net1",
        "ua-root",
    ];
    assert_eq!(aliases(&live), want);
    assert_eq!(aliases(&persistent), want);
    assert_eq!(cond(&vm, "RestartRequired").status, "False");
    assert!(is_true(&st(&vm).conditions, condition::READY));

    // memory changes apply at the next restart, and say so
    bump(&mut vm, |s| s.memory = Some("96Mi".parse().unwrap()));
    lab.settle(&mut vm).await;
    let d = domain.clone();
    let (live, persistent) = lab
        .call(&node, move |c| {
            Ok((c.domain_xml(&d)?, c.persistent_xml(&d)?))
        })
        .await;
    assert_eq!(persistent.memory.as_kib(), Some(96 * 1024));
    assert_eq!(live.memory.as_kib(), Some(64 * 1024));
    let rr = cond(&vm, "RestartRequired");
    assert_eq!(rr.status, "True");
    assert!(rr.message.contains("memory"), "{}", rr.message);

    // a hand edit on the host (disk removed live and from the definition) is corrected
    let d = domain.clone();
    lab.call(&node, move |c| {
        let x = c.domain_xml(&d)?;
        let dev = kvm_operator::hypervisor::domain_spec::device_named(&x, "data").unwrap();
        c.detach(&d, &dev, DeviceScope::LiveAndConfig)
    })
    .await;
    let notes = lab.settle(&mut vm).await;
    assert!(
        reasons(&notes).contains(&"DriftCorrected"),
        "{:?}",
        reasons(&notes)
    );
    let d = domain.clone();
    let (live, persistent) = lab
        .call(&node, move |c| {
            Ok((c.domain_xml(&d)?, c.persistent_xml(&d)?))
        })
        .await;
    assert!(
        aliases(&live).contains(&"ua-data".to_string()),
        "{:?}",
        aliases(&live)
    );
    assert!(aliases(&persistent).contains(&"ua-data".to_string()));

    // stopped outside the operator: started again (runStrategy Running)
    let d = domain.clone();
    lab.call(&node, move |c| c.destroy(&d)).await;
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"Started"));
    let d = domain.clone();
    assert_eq!(
        lab.call(&node, move |c| c.state(&d)).await,
        DomainState::Running
    );

    // delete with volumeDeletionPolicy Delete: domain and our volumes go, the template stays
    let notes = lab.delete(&vm).await;
    assert!(reasons(&notes).contains(&"Deleted"));
    let d = domain.clone();
    assert!(matches!(
        lab.hv.call(&node, "t", move |c| c.state(&d)).await,
        Err(HvError::NotFound { .. })
    ));
    assert_eq!(lab.volumes(&node, &pname).await, ["template.qcow2"]);
    // a second cleanup is a no-op
    assert!(lab.delete(&vm).await.is_empty());
    for h in ["host1", "host2"] {
        let p = pname.clone();
        lab.call(h, move |c| c.delete_volume(&p, "template.qcow2"))
            .await;
    }
    lab.world
        .pools
        .retain(|p| p.metadata.name.as_deref() != Some("pool"));
    lab.remove_pool(&pool).await;
}

fn kind() -> &'static str {
    if std::path::Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    }
}

/// libvirt's domain id: it changes whenever the guest is restarted.
async fn domain_id(lab: &Lab, node: &str, name: &str) -> u32 {
    let n = name.to_string();
    lab.call(node, move |c| {
        c.raw()
            .lookup_domain_by_name(&n)
            .and_then(|d| d.id().ok_or_else(virt::error::Error::last_error))
            .map_err(|e| HvError::Local {
                cause: e.to_string(),
            })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adoption_takes_over_a_running_domain_without_a_restart() {
    let mut lab = Lab::new().await;
    let legacy = format!("legacy-{}", std::process::id());
    let l = legacy.clone();
    lab.call("host1", move |c| {
        c.define(&DomainXml::minimal(&l, kind(), 32 * 1024, 1))?;
        c.start(&l)
    })
    .await;
    let id_before = domain_id(&lab, "host1", &legacy).await;
    let mut vm = vm_object(
        "default",
        &format!("adopted-{}", std::process::id()),
        serde_json::json!({
            "adopt": {"nodeName": "host1", "domain": legacy},
        }),
    );
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"Adopted"), "{notes:?}");
    assert!(!reasons(&notes).contains(&"Started"), "{notes:?}");
    assert_eq!(
        domain_id(&lab, "host1", &legacy).await,
        id_before,
        "the guest was not restarted"
    );
    assert_eq!(st(&vm).node.as_deref(), Some("host1"));
    assert_eq!(st(&vm).domain_name.as_deref(), Some(legacy.as_str()));
    assert_eq!(st(&vm).power_state, Some(PowerState::Running));
    assert!(
        is_true(&st(&vm).conditions, condition::READY),
        "{:?}",
        st(&vm).conditions
    );
    assert_eq!(cond(&vm, condition::SCHEDULED).reason, "Adopted");
    // the spec it came with is reported
    let seen = st(&vm).observed.clone().expect("observed definition");
    assert_eq!(seen.vcpus, 1);
    assert_eq!(seen.memory.map(|m| m.bytes()), Some(32 << 20));
    let l = legacy.clone();
    let (live, persistent) = lab
        .call("host1", move |c| {
            Ok((c.domain_xml(&l)?, c.persistent_xml(&l)?))
        })
        .await;
    assert_eq!(live.owner().map(|o| o.uid.clone()), vm.metadata.uid.clone());
    assert_eq!(
        persistent.owner().map(|o| o.uid.clone()),
        vm.metadata.uid.clone()
    );
    // the node now counts it as managed
    lab.refresh_nodes().await;
    let h1 = lab.node("host1").status.clone().unwrap();
    assert!(!h1.unmanaged_domains.iter().any(|d| d.name == legacy));
    assert!(
        h1.allocated.unwrap().cpus >= 1,
        "adopted VMs count with the domain's figures"
    );
    // a second object cannot take it
    let mut rival = vm_object(
        "other",
        "rival",
        serde_json::json!({
            "adopt": {"nodeName": "host1", "domain": legacy},
        }),
    );
    lab.settle(&mut rival).await;
    assert_eq!(
        cond(&rival, condition::READY).reason,
        "DomainOwnedElsewhere"
    );
    lab.world
        .vms
        .retain(|v| v.metadata.uid != rival.metadata.uid);
    // the rival's deletion leaves the domain alone (it is not its own)
    let notes = lab.delete(&rival).await;
    assert_eq!(reasons(&notes), ["DomainNotOurs"]);
    assert_eq!(domain_id(&lab, "host1", &legacy).await, id_before);
    // from now on it is managed like any other: stopped by the spec ...
    bump(&mut vm, |s| {
        s.run_strategy = kvm_operator::api::virtual_machine::RunStrategy::Stopped
    });
    lab.settle(&mut vm).await;
    let l = legacy.clone();
    assert_eq!(
        lab.call("host1", move |c| c.state(&l)).await,
        DomainState::Shutoff
    );
    // ... and removed on deletion
    lab.delete(&vm).await;
    let l = legacy.clone();
    assert!(matches!(
        lab.hv.call("host1", "t", move |c| c.state(&l)).await,
        Err(HvError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_we_do_not_own_is_never_touched() {
    let mut lab = Lab::new().await;
    let name = format!("clash-{}", std::process::id());
    let domain = format!("default_{name}");
    let d = domain.clone();
    lab.call("host1", move |c| {
        c.define(&DomainXml::minimal(&d, kind(), 32 * 1024, 1))?;
        c.start(&d)
    })
    .await;
    let id = domain_id(&lab, "host1", &domain).await;
    let mut vm = vm_object(
        "default",
        &name,
        serde_json::json!({
            "vcpus": 1, "memory": "32Mi", "placement": {"nodeName": "host1"}, "runStrategy": "Stopped",
        }),
    );
    lab.settle(&mut vm).await;
    let ready = cond(&vm, condition::READY);
    assert_eq!(ready.reason, "DomainExists");
    assert!(ready.message.contains("spec.adopt"), "{}", ready.message);
    lab.delete(&vm).await;
    assert_eq!(
        domain_id(&lab, "host1", &domain).await,
        id,
        "still running, untouched"
    );
    let d = domain.clone();
    let x = lab.call("host1", move |c| c.persistent_xml(&d)).await;
    assert_eq!(x.owner(), None);
    let d = domain.clone();
    lab.call("host1", move |c| {
        c.destroy(&d)?;
        c.undefine(&d)
    })
    .await;
}

/// The real hypervisor layer, except that the operator "dies" after `budget` calls: every later
/// call fails, as if the process had been killed at that point.
struct CrashAfter {
    inner: Arc<NodePool>,
    budget: AtomicUsize,
}

impl CrashAfter {
    fn go(&self) -> bool {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    }
}

fn killed() -> HvError {
    HvError::Local {
        cause: "the operator was killed".into(),
    }
}

impl Hypervisor for CrashAfter {
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
        let go = self.go();
        let fut = self.inner.call(node, op, f);
        async move { if go { fut.await } else { Err(killed()) } }
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
        let go = self.go();
        let fut = self.inner.call_pair(a, b, op, f);
        async move { if go { fut.await } else { Err(killed()) } }
    }

    fn host_facts(
        &self,
        node: &str,
        interval: Duration,
    ) -> impl std::future::Future<
        Output = Result<(kvm_operator::hypervisor::host_facts::HostFacts, Option<u32>), HvError>,
    > + Send {
        let go = self.go();
        let fut = self.inner.host_facts(node, interval);
        async move { if go { fut.await } else { Err(killed()) } }
    }

    fn stamped(
        &self,
        node: &str,
        uid: &str,
    ) -> impl std::future::Future<Output = Result<Vec<String>, HvError>> + Send {
        let go = self.go();
        let fut = self.inner.stamped(node, uid);
        async move { if go { fut.await } else { Err(killed()) } }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_provisioning_then_restarted_no_duplicate_no_leak() {
    let mut lab = Lab::new().await;
    let pname = format!("kvmop-crash-{}", std::process::id());
    let mut pool = lab.dir_pool("default", &pname).await;
    pool.metadata.name = Some("crashpool".into());
    pool.spec.pool_name = Some(pname.clone());
    lab.world.pools.push(Arc::new(pool.clone()));
    // one libvirt call more per budget: observe, create volume, write seed, observe, define, start
    for budget in 0..7 {
        let name = format!("crash{budget}-{}", std::process::id());
        let mut vm = vm_object(
            "default",
            &name,
            serde_json::json!({
                "vcpus": 1, "memory": "32Mi",
                "disks": [{"name": "root", "new": {"pool": "crashpool", "size": "8Mi"}}],
                "cloudInit": {"userData": "#cloud-config\n"},
                "volumeDeletionPolicy": "Delete",
            }),
        );
        // placement is written first: the status the restarted operator reads has the node
        let hv = lab.hv.clone();
        lab.settle_with(&mut vm, hv.as_ref(), 1).await;
        let node = st(&vm).node.clone().expect("placed");
        let before = vm.clone();
        let crashing = CrashAfter {
            inner: lab.hv.clone(),
            budget: AtomicUsize::new(budget),
        };
        lab.settle_with(&mut vm, &crashing, 1).await;
        // the crashed run's status write never happened: restart from the status before it
        let mut vm = before;
        lab.settle(&mut vm).await;
        assert!(
            is_true(&st(&vm).conditions, condition::READY),
            "budget {budget}: {:?}",
            st(&vm).conditions
        );
        let uid = vm.metadata.uid.clone().unwrap();
        let mut stamped = Vec::new();
        for h in ["host1", "host2"] {
            for d in lab.call(h, |c| c.list_domains()).await {
                if d.owner.is_some_and(|o| o.uid == uid) {
                    stamped.push((h, d.name));
                }
            }
        }
        assert_eq!(
            stamped,
            [(node.as_str(), format!("default_{name}"))],
            "budget {budget}"
        );
        let prefix = format!("default-{name}-");
        let mine: Vec<String> = lab
            .volumes(&node, &pname)
            .await
            .into_iter()
            .filter(|v| v.starts_with(&prefix))
            .collect();
        assert_eq!(
            mine,
            [format!("{prefix}cidata.iso"), format!("{prefix}root.qcow2")],
            "budget {budget}"
        );
        // a status lost altogether (a stale cache): the VM is found where it is, not placed again
        let mut lost = vm.clone();
        lost.status = None;
        lab.settle(&mut lost).await;
        assert_eq!(cond(&lost, condition::SCHEDULED).reason, "Recovered");
        assert_eq!(st(&lost).node.as_deref(), Some(node.as_str()));
        lab.delete(&vm).await;
        assert!(
            lab.volumes(&node, &pname)
                .await
                .iter()
                .all(|v| !v.starts_with(&prefix)),
            "budget {budget}: volumes left"
        );
    }
    lab.world
        .pools
        .retain(|p| p.metadata.name.as_deref() != Some("crashpool"));
    let mut owner = pool;
    owner.metadata.name = Some(pname.clone());
    owner.spec.pool_name = None;
    lab.remove_pool(&owner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rerun_on_failure_restarts_a_crashed_guest_and_counts_it() {
    let mut lab = Lab::new().await;
    let name = format!("rerun-{}", std::process::id());
    let mut vm = vm_object(
        "default",
        &name,
        serde_json::json!({
            "vcpus": 1, "memory": "32Mi", "placement": {"nodeName": "host1"}, "runStrategy": "RerunOnFailure",
        }),
    );
    lab.settle(&mut vm).await;
    assert_eq!(st(&vm).power_state, Some(PowerState::Running));
    let domain = st(&vm).domain_name.clone().unwrap();
    // kill QEMU: libvirt sees the guest crash
    let pidfile = PathBuf::from(var("KVM_LAB")).join(format!("hosts/host1/run/qemu/{domain}.pid"));
    let pid =
        std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
    let pid: i32 = pid.trim().parse().unwrap();
    assert_eq!(sigkill(pid), 0);
    let d = domain.clone();
    for _ in 0..50 {
        let d = d.clone();
        if lab.call("host1", move |c| c.state(&d)).await != DomainState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"Restarted"), "{notes:?}");
    assert_eq!(st(&vm).restart_count, Some(1));
    assert!(st(&vm).last_restart_time.is_some());
    let d = domain.clone();
    assert_eq!(
        lab.call("host1", move |c| c.state(&d)).await,
        DomainState::Running
    );
    lab.delete(&vm).await;
}

/// SIGKILL through the `kill` program (the test crate has no unsafe code).
fn sigkill(pid: i32) -> i32 {
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok { 0 } else { 1 }
}

async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<kvm_operator::hypervisor::ffi::DomainEvent>,
) -> kvm_operator::hypervisor::ffi::DomainEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an event within 20 s")
        .expect("the follower runs")
}

/// The next event about `domain` or a resync marker; other tests' guests on the same host send
/// events too, and are skipped.
async fn next_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<kvm_operator::hypervisor::ffi::DomainEvent>,
    domain: &str,
) -> kvm_operator::hypervisor::ffi::DomainEvent {
    loop {
        let e = next(rx).await;
        if e.domain == domain || kvm_operator::hypervisor::events::is_resync(&e) {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn domain_events_keep_flowing_across_a_reconnect() {
    use kvm_operator::hypervisor::events;
    use kvm_operator::hypervisor::ffi::LifecycleKind;
    let lab = Lab::new().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(events::follow(
        lab.hv.clone(),
        "host1".to_string(),
        tx,
        Duration::from_millis(200),
    ));
    let name = format!("events-{}", std::process::id());
    let first = next_of(&mut rx, &name).await;
    assert!(events::is_resync(&first), "{first:?}");
    let n = name.clone();
    lab.call("host1", move |c| {
        c.define(&DomainXml::minimal(&n, kind(), 32 * 1024, 1))
    })
    .await;
    let e = next_of(&mut rx, &name).await;
    assert_eq!(
        (e.domain.as_str(), e.kind),
        (name.as_str(), LifecycleKind::Defined)
    );
    // a changed spec replaces the node's connection: the follower subscribes again on the new one
    let mut spec = lab.node("host1").spec.clone();
    spec.maintenance = true;
    lab.hv.upsert(NodeAccess {
        name: "host1".into(),
        spec,
        private_key: Some(std::fs::read(var("KVM_LAB_SSH_KEY")).unwrap()),
        state_dir: lab.config.state_dir.clone(),
        tls: None,
        timeout: Duration::from_secs(15),
    });
    let n = name.clone();
    // the next call opens the new connection; the follower notices and re-subscribes
    lab.call("host1", |c| Ok(c.id())).await;
    let marker = next_of(&mut rx, &name).await;
    assert!(events::is_resync(&marker), "{marker:?}");
    lab.call("host1", move |c| c.undefine(&n)).await;
    let e = next_of(&mut rx, &name).await;
    assert_eq!(
        (e.domain.as_str(), e.kind),
        (name.as_str(), LifecycleKind::Undefined)
    );
    follower.abort();
}

fn migration_object(ns: &str, name: &str, spec: serde_json::Value) -> kvm_operator::api::Migration {
    from_json(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "Migration",
        "metadata": {"name": name, "namespace": ns, "uid": uid(), "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec,
    }))
}

impl Lab {
    fn put_migration(&mut self, m: &kvm_operator::api::Migration) {
        self.world
            .migrations
            .retain(|x| x.metadata.uid != m.metadata.uid);
        self.world.migrations.push(Arc::new(m.clone()));
    }

    /// One reconcile of `m`, with `jobs` standing for the operator process.
    async fn step_migration(
        &mut self,
        m: &mut kvm_operator::api::Migration,
        jobs: &controller::migration::execute::Jobs,
    ) -> Vec<Note> {
        self.put_migration(m);
        let out =
            controller::migration::reconcile_core(m, &self.world, &self.hv, jobs, &self.config)
                .await;
        m.status = Some(out.status);
        self.put_migration(m);
        out.notes
    }

    /// Reconciles `m` until it ends (or `max` rounds); returns every Event.
    async fn finish_migration(
        &mut self,
        m: &mut kvm_operator::api::Migration,
        jobs: &controller::migration::execute::Jobs,
        max: usize,
    ) -> Vec<Note> {
        let mut notes = Vec::new();
        for _ in 0..max {
            notes.extend(self.step_migration(m, jobs).await);
            if phase(m).is_some_and(|p| p.is_terminal()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        notes
    }

    /// A running VM of `memory` pinned to `node`, settled there; with its domain's name.
    async fn running_on(
        &mut self,
        name: &str,
        memory: &str,
        node: &str,
    ) -> (VirtualMachine, String) {
        let mut vm = vm_object(
            "default",
            name,
            serde_json::json!({
                "vcpus": 1, "memory": memory, "placement": {"nodeName": node},
            }),
        );
        self.settle(&mut vm).await;
        let domain = st(&vm).domain_name.clone().unwrap();
        (vm, domain)
    }

    async fn whereabouts(&self, domain: &str) -> Vec<(&'static str, DomainState)> {
        let mut out = Vec::new();
        for h in ["host1", "host2"] {
            let d = domain.to_string();
            if let Ok(s) = self.hv.call(h, "t", move |c| c.state(&d)).await {
                out.push((h, s));
            }
        }
        out
    }
}

fn phase(m: &kvm_operator::api::Migration) -> Option<kvm_operator::api::MigrationPhase> {
    m.status.as_ref().and_then(|s| s.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_moves_a_running_vm_live_and_the_vm_follows_it() {
    use kvm_operator::api::MigrationPhase;
    let mut lab = Lab::new().await;
    let name = format!("mover-{}", std::process::id());
    let (mut vm, domain) = lab.running_on(&name, "32Mi", "host1").await;
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host1", DomainState::Running)]
    );
    let jobs = controller::migration::execute::Jobs::default();
    let mut m = migration_object(
        "default",
        "move-it",
        serde_json::json!({"vmName": name, "targetNode": "host2"}),
    );
    // queued, scheduled and the target chosen in one reconcile; the target is written
    // (Running) before anything touches it, so the job starts in the next one
    lab.step_migration(&mut m, &jobs).await;
    assert_eq!(phase(&m), Some(MigrationPhase::Running), "{:?}", m.status);
    assert_eq!(
        m.status.as_ref().unwrap().target_node.as_deref(),
        Some("host2")
    );
    let uid = m.metadata.uid.clone().unwrap();
    assert_eq!(
        jobs.state(&uid),
        controller::migration::plan::Task::Absent,
        "no job before the target is recorded"
    );
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host1", DomainState::Running)]
    );
    // from then on the VM controller stands aside
    lab.settle_with(&mut vm, lab.hv.clone().as_ref(), 1).await;
    assert_eq!(st(&vm).power_state, Some(PowerState::Migrating));
    let mut notes = lab.step_migration(&mut m, &jobs).await;
    assert!(reasons(&notes).contains(&"MigrationStarted"), "{notes:?}");
    // the job's end is signalled (the operator looks at once instead of at its requeue)
    tokio::time::timeout(Duration::from_secs(120), jobs.ended())
        .await
        .expect("the job signals its end");
    assert!(jobs.has_ended(&uid));
    assert_eq!(jobs.ended_uids(), vec![uid.clone()]);
    notes.extend(lab.finish_migration(&mut m, &jobs, 100).await);
    assert!(!jobs.has_ended(&uid), "the outcome is taken once");
    let ms = m.status.clone().unwrap();
    assert_eq!(
        ms.phase,
        Some(MigrationPhase::Succeeded),
        "{ms:?} {notes:?}"
    );
    assert_eq!(
        ms.effective_mode,
        Some(kvm_operator::api::migration::MigrationMode::Live)
    );
    assert_eq!(
        (ms.source_node.as_deref(), ms.target_node.as_deref()),
        (Some("host1"), Some("host2"))
    );
    assert!(ms.end_time.is_some());
    assert!(reasons(&notes).contains(&"Migrated"), "{notes:?}");
    // exactly one host has it, running and persistent there
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host2", DomainState::Running)]
    );
    let d = domain.clone();
    let persistent = lab.call("host2", move |c| c.persistent_xml(&d)).await;
    assert_eq!(
        persistent.owner().map(|o| o.uid.clone()),
        vm.metadata.uid.clone()
    );
    // the VM follows in one reconcile: bound to host2 and observed running there
    let notes = lab.settle_with(&mut vm, lab.hv.clone().as_ref(), 1).await;
    assert!(reasons(&notes).contains(&"Migrated"), "{notes:?}");
    assert_eq!(
        (st(&vm).node.as_deref(), st(&vm).power_state),
        (Some("host2"), Some(PowerState::Running))
    );
    // Ready, and nothing started on host1
    lab.settle(&mut vm).await;
    assert_eq!(st(&vm).node.as_deref(), Some("host2"));
    assert!(
        is_true(&st(&vm).conditions, condition::READY),
        "{:?}",
        st(&vm).conditions
    );
    assert_eq!(cond(&vm, condition::MIGRATING).status, "False");
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host2", DomainState::Running)]
    );
    // a terminal Migration stays as it is
    let again = lab.step_migration(&mut m, &jobs).await;
    assert!(again.is_empty());
    assert_eq!(phase(&m), Some(MigrationPhase::Succeeded));
    lab.delete(&vm).await;
    assert!(lab.whereabouts(&domain).await.is_empty());
}

/// The link to the source cut right after libvirt's Finish: the target's copy took the whole
/// stream and was resumed, the source never got its Confirm and waits paused, and the process
/// that ran the job has lost its outcome (the look that took it had to wait). The next look
/// completes the move: the running target is the guest, the source's paused copy is removed,
/// and no job starts onto the running copy (which libvirt would refuse, and a failed Migration
/// would hand the VM back to the paused source, to be resumed: the guest twice). Deleting the
/// Migration meanwhile never releases the VM to the source either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_over_whose_confirm_was_lost_completes_on_the_running_target() {
    use kvm_operator::api::MigrationPhase;
    let mut lab = Lab::new().await;
    let name = format!("confirm-{}", std::process::id());
    let (mut vm, domain) = lab.running_on(&name, "32Mi", "host1").await;
    let jobs = controller::migration::execute::Jobs::default();
    let mut m = migration_object(
        "default",
        "confirm-lost",
        serde_json::json!({"vmName": name, "targetNode": "host2"}),
    );
    lab.step_migration(&mut m, &jobs).await;
    assert_eq!(phase(&m), Some(MigrationPhase::Running), "{:?}", m.status);
    // what the lost Confirm leaves: the same domain (UUID, stamp) running on the target, paused
    // on the source
    let d = domain.clone();
    let xml = lab.call("host1", move |c| c.persistent_xml(&d)).await;
    lab.call("host2", move |c| c.define(&xml).map(|_| ())).await;
    let d = domain.clone();
    lab.call("host2", move |c| c.start(&d)).await;
    let d = domain.clone();
    lab.call("host1", move |c| c.suspend(&d)).await;
    assert_eq!(
        lab.whereabouts(&domain).await,
        [
            ("host1", DomainState::Paused),
            ("host2", DomainState::Running)
        ]
    );
    // deleting the Migration now would release the VM to its paused source: it waits
    let err = controller::migration::cleanup_core(&m, &lab.world, &lab.hv, &jobs)
        .await
        .expect_err("no release while the target's copy runs");
    assert!(err.to_string().contains("Running"), "{err}");
    assert_eq!(
        lab.whereabouts(&domain).await,
        [
            ("host1", DomainState::Paused),
            ("host2", DomainState::Running)
        ]
    );
    // the next look (no job in this process) completes the move
    let notes = lab.finish_migration(&mut m, &jobs, 20).await;
    assert_eq!(
        phase(&m),
        Some(MigrationPhase::Succeeded),
        "{:?} {notes:?}",
        m.status
    );
    assert!(!reasons(&notes).contains(&"MigrationStarted"), "{notes:?}");
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host2", DomainState::Running)]
    );
    // the VM follows, and nothing runs on host1
    lab.settle(&mut vm).await;
    assert_eq!(
        (st(&vm).node.as_deref(), st(&vm).power_state),
        (Some("host2"), Some(PowerState::Running))
    );
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host2", DomainState::Running)]
    );
    lab.delete(&vm).await;
    assert!(lab.whereabouts(&domain).await.is_empty());
}

/// A domain moved to another node outside the operator (a person's `virsh migrate`, or a
/// Migration deleted after its switch-over, which leaves the VM bound to its source): the VM's
/// reconcile finds it by its stamp and follows it, instead of defining and starting the guest a
/// second time on the node it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_moved_behind_the_operator_is_followed_not_made_again() {
    let mut lab = Lab::new().await;
    let name = format!("moved-{}", std::process::id());
    let mut vm = vm_object(
        "default",
        &name,
        serde_json::json!({"vcpus": 1, "memory": "32Mi"}),
    );
    lab.settle(&mut vm).await;
    let domain = st(&vm).domain_name.clone().unwrap();
    let from = st(&vm).node.clone().unwrap();
    let to = if from == "host1" { "host2" } else { "host1" };
    let uuid = st(&vm).domain_uuid.clone();
    // moved by hand: defined and started on the other node, gone from its own
    let d = domain.clone();
    let xml = lab.call(&from, move |c| c.persistent_xml(&d)).await;
    lab.call(to, move |c| c.define(&xml).map(|_| ())).await;
    let d = domain.clone();
    lab.call(&from, move |c| {
        c.destroy(&d)?;
        c.undefine(&d)
    })
    .await;
    let d = domain.clone();
    lab.call(to, move |c| c.start(&d)).await;
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"Recovered"), "{notes:?}");
    assert_eq!(
        (st(&vm).node.as_deref(), st(&vm).power_state),
        (Some(to), Some(PowerState::Running))
    );
    assert_eq!(st(&vm).domain_uuid, uuid, "the same domain, not a new one");
    assert_eq!(lab.whereabouts(&domain).await, [(to, DomainState::Running)]);
    lab.delete(&vm).await;
    assert!(lab.whereabouts(&domain).await.is_empty());
}

/// A volume a VM created outlives the VM's deletion, even with `volumeDeletionPolicy: Delete`,
/// while another VM attaches it (one defined before the in-use rule refused such a disk): a
/// Warning says why it was kept. Once no VM uses it, the cleanup deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_created_volume_another_vm_attaches_outlives_its_creator() {
    let mut lab = Lab::new().await;
    let pid = std::process::id();
    let pname = format!("kvmop-keep-{pid}");
    let pool = lab.dir_pool("default", &pname).await;
    let owner_name = format!("owner-{pid}");
    let mut owner = vm_object(
        "default",
        &owner_name,
        serde_json::json!({
            "vcpus": 1, "memory": "32Mi", "placement": {"nodeName": "host1"},
            "disks": [{"name": "data", "new": {"pool": pname, "size": "16Mi"}}],
            "volumeDeletionPolicy": "Delete",
        }),
    );
    lab.settle(&mut owner).await;
    assert_eq!(st(&owner).power_state, Some(PowerState::Running));
    let volume = format!("default-{owner_name}-data.qcow2");
    assert_eq!(
        lab.volumes("host1", &pname).await,
        std::slice::from_ref(&volume)
    );
    let mut user = vm_object(
        "default",
        &format!("user-{pid}"),
        serde_json::json!({
            "vcpus": 1, "memory": "32Mi", "placement": {"nodeName": "host1"},
            "disks": [{"name": "data", "existing": {"pool": pname, "volume": volume}}],
        }),
    );
    user.status = Some(kvm_operator::api::VirtualMachineStatus {
        node: Some("host1".into()),
        domain_uuid: Some("defined-before-the-rule".into()),
        ..Default::default()
    });
    lab.world.vms.push(Arc::new(user.clone()));
    let notes = lab.delete(&owner).await;
    let kept = notes
        .iter()
        .find(|n| n.reason == "VolumeKept")
        .unwrap_or_else(|| panic!("{notes:?}"));
    assert!(kept.warning, "{kept:?}");
    for part in [
        volume.as_str(),
        &format!("VirtualMachine default/user-{pid}"),
        "spec.disks[0].existing",
    ] {
        assert!(kept.message.contains(part), "{part}: {kept:?}");
    }
    assert!(!reasons(&notes).contains(&"VolumeDeleted"), "{notes:?}");
    assert_eq!(
        lab.volumes("host1", &pname).await,
        std::slice::from_ref(&volume)
    );
    // with no VM using it, the same cleanup deletes it
    lab.world
        .vms
        .retain(|v| v.metadata.uid != user.metadata.uid);
    let notes = lab.delete(&owner).await;
    assert!(reasons(&notes).contains(&"VolumeDeleted"), "{notes:?}");
    assert!(lab.volumes("host1", &pname).await.is_empty());
    lab.remove_pool(&pool).await;
}

/// A domain renamed on its own node while shut off/// A domain renamed on its own node while shut off (`virsh domrename`, here by hand on a
/// connection of its own, so the operator's stamp index still has the old name): the VM's
/// reconcile finds it there by its stamp and follows it, instead of defining a second domain on
/// the same volumes under the old name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_renamed_behind_the_operator_is_followed_not_made_again() {
    let mut lab = Lab::new().await;
    let name = format!("renamed-{}", std::process::id());
    let (mut vm, domain) = lab.running_on(&name, "32Mi", "host1").await;
    let uuid = st(&vm).domain_uuid.clone();
    let renamed = format!("{domain}-by-hand");
    // the operator has just listed host1: its stamp index is fresh and names the old domain
    let uid = vm.metadata.uid.clone().unwrap();
    let stamped = lab.hv.stamped("host1", &uid).await.unwrap();
    assert_eq!(stamped, std::slice::from_ref(&domain));
    // renamed while shut off: the same definition (UUID, stamp, disks) under a new name
    let (d, n) = (domain.clone(), renamed.clone());
    lab.by_hand("host1", move |c| {
        c.destroy(&d)?;
        let mut x = c.persistent_xml(&d)?;
        c.undefine(&d)?;
        x.name = n;
        c.define(&x).map(|_| ())
    })
    .await;
    let notes = lab.settle(&mut vm).await;
    assert!(reasons(&notes).contains(&"Recovered"), "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.message.contains("renamed outside this operator")),
        "{notes:?}"
    );
    assert_eq!(st(&vm).domain_name.as_deref(), Some(renamed.as_str()));
    assert_eq!(st(&vm).domain_uuid, uuid, "the same domain, not a new one");
    assert_eq!(st(&vm).power_state, Some(PowerState::Running));
    assert!(
        lab.whereabouts(&domain).await.is_empty(),
        "no second domain under the old name"
    );
    assert_eq!(
        lab.whereabouts(&renamed).await,
        [("host1", DomainState::Running)]
    );
    lab.delete(&vm).await;
    assert!(lab.whereabouts(&renamed).await.is_empty());
}

/// A domain removed by hand from its node is defined again only once every node has been read
/// and none has a domain stamped for the VM: while one cannot be read (here a KvmNode the
/// operator has no access to) the VM waits and says which node it waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vm_whose_domain_is_gone_waits_while_a_node_cannot_be_read() {
    let mut lab = Lab::new().await;
    let name = format!("gone-{}", std::process::id());
    let (mut vm, domain) = lab.running_on(&name, "32Mi", "host1").await;
    let uuid = st(&vm).domain_uuid.clone();
    let d = domain.clone();
    lab.call("host1", move |c| {
        c.destroy(&d)?;
        c.undefine(&d)
    })
    .await;
    let ghost: KvmNode = from_json(serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": "ghost", "uid": uid(), "generation": 1},
        "spec": {"address": "192.0.2.1", "sshKeySecretRef": {"name": "lab-key"}},
    }));
    lab.world.nodes.push(Arc::new(ghost));
    let hv = lab.hv.clone();
    lab.settle_with(&mut vm, hv.as_ref(), 1).await;
    let ready = cond(&vm, condition::READY);
    assert_eq!(ready.reason, "DomainWhereaboutsUnknown", "{ready:?}");
    assert!(ready.message.contains("ghost"), "{ready:?}");
    assert!(lab.whereabouts(&domain).await.is_empty(), "nothing defined");
    // every node answers and none has it: made again (a new domain)
    lab.world
        .nodes
        .retain(|n| n.metadata.name.as_deref() != Some("ghost"));
    lab.settle(&mut vm).await;
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host1", DomainState::Running)]
    );
    assert_ne!(st(&vm).domain_uuid, uuid);
    lab.delete(&vm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maintenance_evacuates_every_vm_and_the_node_reports_empty() {
    use kvm_operator::api::MigrationPhase;
    let mut lab = Lab::new().await;
    let mut vms = Vec::new();
    for i in 0..2 {
        let mut vm = vm_object(
            "evac",
            &format!("evac{i}-{}", std::process::id()),
            serde_json::json!({
                "vcpus": 1, "memory": "32Mi", "placement": {"nodeName": "host1"},
            }),
        );
        lab.settle(&mut vm).await;
        vms.push(vm);
    }
    let mut nodes = lab.world.nodes.clone();
    let mut h1 = (*nodes[0]).clone();
    h1.spec.maintenance = true;
    nodes[0] = Arc::new(h1.clone());
    lab.world.nodes = nodes;
    let (out, side) =
        controller::kvm_node::reconcile_core(&h1, &lab.world, lab.hv.as_ref(), &lab.config).await;
    assert_eq!(side.evacuate.len(), 2, "{:?}", side.evacuate);
    let ev = condition::find(&out.status.conditions, "Evacuated").unwrap();
    assert_eq!(
        (ev.status.as_str(), ev.reason.as_str()),
        ("False", "Evacuating")
    );
    assert_eq!(
        condition::find(&out.status.conditions, "Schedulable")
            .unwrap()
            .reason,
        "Maintenance"
    );
    // the operator creates one Migration per VM (here: the test, as the API server would)
    let jobs = controller::migration::execute::Jobs::default();
    let mut migs: Vec<_> = side
        .evacuate
        .iter()
        .map(|(ns, vm)| {
            migration_object(
                ns,
                &controller::kvm_node::plan::evacuation_name("host1", vm),
                serde_json::json!({"vmName": vm}),
            )
        })
        .collect();
    for m in &migs {
        lab.put_migration(m);
    }
    // while they exist and run, no second Migration is asked for
    let (_, side) =
        controller::kvm_node::reconcile_core(&h1, &lab.world, lab.hv.as_ref(), &lab.config).await;
    assert!(side.evacuate.is_empty());
    for m in migs.iter_mut() {
        lab.finish_migration(m, &jobs, 100).await;
        assert_eq!(phase(m), Some(MigrationPhase::Succeeded), "{:?}", m.status);
        assert_eq!(
            m.status.as_ref().unwrap().target_node.as_deref(),
            Some("host2"),
            "the only other node"
        );
    }
    for vm in vms.iter_mut() {
        lab.settle(vm).await;
        assert_eq!(st(vm).node.as_deref(), Some("host2"));
    }
    let (out, side) =
        controller::kvm_node::reconcile_core(&h1, &lab.world, lab.hv.as_ref(), &lab.config).await;
    assert!(side.evacuate.is_empty());
    let ev = condition::find(&out.status.conditions, "Evacuated").unwrap();
    assert_eq!(
        (ev.status.as_str(), ev.reason.as_str()),
        ("True", "Evacuated"),
        "{}",
        ev.message
    );
    for vm in &vms {
        lab.delete(vm).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_running_migration_aborts_it_and_a_restarted_operator_finishes_one() {
    use kvm_operator::api::MigrationPhase;
    let mut lab = Lab::new().await;
    let name = format!("slow-{}", std::process::id());
    // 1 GiB at 1 MiB/s: long enough to abort
    let (mut vm, domain) = lab.running_on(&name, "1Gi", "host1").await;
    let jobs = controller::migration::execute::Jobs::default();
    let mut m = migration_object(
        "default",
        "slow",
        serde_json::json!({
            "vmName": name, "targetNode": "host2", "bandwidthMibPerSecond": 1,
        }),
    );
    // the target chosen, then the job started
    for _ in 0..2 {
        lab.step_migration(&mut m, &jobs).await;
    }
    assert_eq!(phase(&m), Some(MigrationPhase::Running));
    // wait until libvirt reports the job on the source
    let d = domain.clone();
    assert!(
        lab.call("host1", move |c| c
            .wait_for_job(&d, Duration::from_secs(10)))
            .await
    );
    let mut blocked = 0;
    loop {
        match controller::migration::cleanup_core(&m, &lab.world, &lab.hv, &jobs).await {
            Ok(notes) => {
                assert_eq!(reasons(&notes), ["Cancelled"]);
                break;
            }
            Err(e) => {
                assert_eq!(e.reason(), "DeletionBlocked");
                blocked += 1;
                assert!(blocked < 100, "the abort never finished");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host1", DomainState::Running)]
    );
    lab.world.migrations.clear();

    // the operator is restarted mid-migration: the new process has no job of its own; it finds
    // the job libvirt still runs on the source, watches it, and completes the Migration when the
    // domain is on the target only (a source without a job is started again: see the planner's
    // table test)
    let mut m = migration_object(
        "default",
        "retry",
        serde_json::json!({"vmName": name, "targetNode": "host2"}),
    );
    let first = controller::migration::execute::Jobs::default();
    for _ in 0..2 {
        lab.step_migration(&mut m, &first).await;
    }
    assert_eq!(phase(&m), Some(MigrationPhase::Running));
    drop(first); // the process's bookkeeping is gone; libvirt's job goes on
    let restarted = controller::migration::execute::Jobs::default();
    lab.finish_migration(&mut m, &restarted, 200).await;
    assert_eq!(phase(&m), Some(MigrationPhase::Succeeded), "{:?}", m.status);
    // on the target only; the dropped job's own resume may not have come yet (a process that
    // really died never makes it): then the target's copy is paused and the VM's reconcile,
    // rebound there, resumes it as its spec says
    let at = lab.whereabouts(&domain).await;
    assert!(
        matches!(
            at.as_slice(),
            [("host2", DomainState::Running | DomainState::Paused)]
        ),
        "{at:?}"
    );
    lab.settle(&mut vm).await;
    assert_eq!(st(&vm).node.as_deref(), Some("host2"));
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host2", DomainState::Running)]
    );
    lab.delete(&vm).await;
}

/// A paused, persistent copy is what libvirt's Finish leaves on a target that took the whole
/// stream: when a look before starting a job did not see it, the removal of "a leftover of an
/// earlier attempt" spares it (it may be the only complete guest); a removal decided from a look
/// that saw it stopped there while the source ran removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_complete_paused_copy_is_spared_unless_the_look_saw_it() {
    use controller::migration::execute::{Leftover, remove_leftover};
    let mut lab = Lab::new().await;
    let name = format!("spare-{}", std::process::id());
    let (vm, domain) = lab.running_on(&name, "32Mi", "host2").await;
    let uid = vm.metadata.uid.clone().unwrap();
    let d = domain.clone();
    lab.call("host2", move |c| c.suspend(&d)).await;
    let err = remove_leftover(
        lab.hv.as_ref(),
        "host2",
        &domain,
        &uid,
        Leftover::SpareComplete,
    )
    .await
    .expect_err("a complete paused copy is spared");
    assert!(err.to_string().contains("complete"), "{err}");
    assert_eq!(
        lab.whereabouts(&domain).await,
        [("host2", DomainState::Paused)]
    );
    // another VM's stamp is never ours to remove, whichever the mode
    let removed = remove_leftover(
        lab.hv.as_ref(),
        "host2",
        &domain,
        "someone-else",
        Leftover::Any,
    )
    .await
    .unwrap();
    assert!(!removed);
    assert!(
        remove_leftover(lab.hv.as_ref(), "host2", &domain, &uid, Leftover::Any)
            .await
            .unwrap()
    );
    assert!(lab.whereabouts(&domain).await.is_empty());
    lab.delete(&vm).await;
}
