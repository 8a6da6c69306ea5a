//! A corpus of hostile values in every user-supplied string field of the four kinds: each is
//! either refused by `validate()` with an error naming the field (and then by the controllers'
//! cores with Ready=False / InvalidSpec naming it, and by standalone manifest loading), or
//! carried safely: on libvirt's `test:///default` driver, the definitions libvirt stores hold
//! exactly the value, in its element or attribute, and volume paths stay inside the pool.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kvm_operator::api::condition;
use kvm_operator::api::{KvmNode, Migration, StoragePool, VirtualMachine};
use kvm_operator::controller::{self, Config, World};
use kvm_operator::hypervisor::cache::NodePool;
use kvm_operator::hypervisor::domain_xml::DomainXml;
use kvm_operator::hypervisor::ssh::{LibvirtDaemon, RemoteCommand};
use kvm_operator::hypervisor::{Connection, NodeAccess};
use kvm_operator::manifest;
use serde_json::{Value, json};

/// Values that break XML, shells, paths, parsers and eyes.
fn corpus() -> Vec<String> {
    let mut v: Vec<String> = [
        "<",
        "a<b>c",
        "&amp;",
        "a&b",
        "'\"",
        "]]>",
        "<![CDATA[x]]>",
        "</name><name>evil",
        "\"/><evil a=\"",
        "; rm -rf /",
        "a|b",
        "$(reboot)",
        "`id`",
        "a\nb",
        "a\r\nb",
        "\\",
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        ".",
        "a/../b",
        "a\0b",
        "\u{1}\u{7f}",
        "\u{1b}[31m",
        "18446744073709551616",
        "-1",
        "99999999999999999999999999999999999999",
        "",
        " ",
        "\u{202e}gnp.exe",
        "a\u{200b}b",
        "\u{feff}",
        "😀",
        "日本語",
        "é",
        "-oProxyCommand=x",
        "--help",
        "%00",
        "%2e%2e%2f",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(300));
    v.push("x".repeat(70_000));
    v
}

/// Where a field is: a path of object keys and array indices; `*` replaces the map there by
/// `{value: "v"}` (a label key), `=` by `{"k": value}` (a label value).
struct Field {
    kind: &'static str,
    /// The error's field must start with this.
    error: &'static str,
    base: fn() -> Value,
    path: &'static [&'static str],
}

fn vm_base() -> Value {
    json!({
        "vcpus": 1, "memory": "64Mi",
        "disks": [
            {"name": "root", "new": {"pool": "p", "size": "1Gi"}},
            {"name": "tpl", "clone": {"pool": "p", "template": "t.qcow2"}},
            {"name": "ovl", "overlay": {"pool": "p", "base": "b.qcow2"}},
            {"name": "ex", "existing": {"pool": "p", "volume": "v.img"}},
            {"name": "cd", "cdrom": {"pool": "p", "volume": "c.iso"}}
        ],
        "nics": [
            {"name": "net0", "bridge": "br0", "mac": "52:54:00:00:00:02"},
            {"name": "net1", "network": "default"}
        ],
        "bootOrder": ["root"],
        "cloudInit": {"userDataSecretRef": {"name": "s", "key": "userdata"},
                      "networkData": "version: 2", "pool": "p"},
        "placement": {"nodeName": "n",
                      "affinity": [{"matchLabels": {"a": "b"}}],
                      "antiAffinity": [{"matchLabels": {"a": "b"}}],
                      "spreadByLabel": "app"}
    })
}

fn vm_adopt() -> Value {
    json!({"adopt": {"nodeName": "n", "domain": "d"}})
}

fn vm_inline() -> Value {
    json!({"vcpus": 1, "memory": "64Mi", "cloudInit": {"userData": "#cloud-config\n", "pool": "p"},
           "placement": {"nodeSelector": {"a": "b"}}})
}

fn pool_base() -> Value {
    json!({"nodeName": "n", "type": "dir", "poolName": "p", "targetPath": "/var/lib/p"})
}

fn pool_netfs() -> Value {
    json!({"nodeSelector": {"a": "b"}, "type": "netfs", "targetPath": "/mnt/p",
           "source": {"host": "nfs", "dir": "/exports/p"}})
}

fn pool_logical() -> Value {
    json!({"nodeName": "n", "type": "logical", "source": {"name": "vg0", "devices": ["/dev/sdb"]}})
}

fn pool_iscsi() -> Value {
    json!({"nodeName": "n", "type": "iscsi", "source": {"host": "h", "target": "iqn.2024-01.org.example:t",
           "initiator": "iqn.2024-01.org.example:i", "auth": {"type": "chap", "username": "u", "secretUsage": "s"}}})
}

fn node_base() -> Value {
    json!({"address": "10.0.0.1", "user": "root",
           "sshKeySecretRef": {"name": "k", "namespace": "ops", "key": "ssh-privatekey"},
           "hostKeyFingerprint": format!("SHA256:{}", "A".repeat(43))})
}

fn node_tls() -> Value {
    json!({"address": "10.0.0.1", "libvirtUri": "qemu+tls://h/system",
           "tlsSecretRef": {"name": "t", "namespace": "ops"}})
}

fn migration_base() -> Value {
    json!({"vmName": "vm", "targetNode": "n"})
}

/// Every user-supplied string field of the four specs.
fn fields() -> Vec<Field> {
    let f = |kind, error, base, path| Field {
        kind,
        error,
        base,
        path,
    };
    vec![
        f("vm", "spec.disks[1].name", vm_base, &["disks", "1", "name"]),
        f(
            "vm",
            "spec.disks[0].new.pool",
            vm_base,
            &["disks", "0", "new", "pool"],
        ),
        f(
            "vm",
            "spec.disks[1].clone.pool",
            vm_base,
            &["disks", "1", "clone", "pool"],
        ),
        f(
            "vm",
            "spec.disks[1].clone.template",
            vm_base,
            &["disks", "1", "clone", "template"],
        ),
        f(
            "vm",
            "spec.disks[2].overlay.pool",
            vm_base,
            &["disks", "2", "overlay", "pool"],
        ),
        f(
            "vm",
            "spec.disks[2].overlay.base",
            vm_base,
            &["disks", "2", "overlay", "base"],
        ),
        f(
            "vm",
            "spec.disks[3].existing.pool",
            vm_base,
            &["disks", "3", "existing", "pool"],
        ),
        f(
            "vm",
            "spec.disks[3].existing.volume",
            vm_base,
            &["disks", "3", "existing", "volume"],
        ),
        f(
            "vm",
            "spec.disks[4].cdrom.pool",
            vm_base,
            &["disks", "4", "cdrom", "pool"],
        ),
        f(
            "vm",
            "spec.disks[4].cdrom.volume",
            vm_base,
            &["disks", "4", "cdrom", "volume"],
        ),
        f("vm", "spec.nics[0].name", vm_base, &["nics", "0", "name"]),
        f(
            "vm",
            "spec.nics[0].bridge",
            vm_base,
            &["nics", "0", "bridge"],
        ),
        f("vm", "spec.nics[0].mac", vm_base, &["nics", "0", "mac"]),
        f(
            "vm",
            "spec.nics[1].network",
            vm_base,
            &["nics", "1", "network"],
        ),
        f("vm", "spec.bootOrder[0]", vm_base, &["bootOrder", "0"]),
        f(
            "vm",
            "spec.cloudInit.userDataSecretRef.name",
            vm_base,
            &["cloudInit", "userDataSecretRef", "name"],
        ),
        f(
            "vm",
            "spec.cloudInit.userDataSecretRef.key",
            vm_base,
            &["cloudInit", "userDataSecretRef", "key"],
        ),
        f(
            "vm",
            "spec.cloudInit.networkData",
            vm_base,
            &["cloudInit", "networkData"],
        ),
        f("vm", "spec.cloudInit.pool", vm_base, &["cloudInit", "pool"]),
        f(
            "vm",
            "spec.cloudInit.userData",
            vm_inline,
            &["cloudInit", "userData"],
        ),
        f(
            "vm",
            "spec.placement.nodeName",
            vm_base,
            &["placement", "nodeName"],
        ),
        f(
            "vm",
            "spec.placement.nodeSelector",
            vm_inline,
            &["placement", "nodeSelector", "*"],
        ),
        f(
            "vm",
            "spec.placement.nodeSelector",
            vm_inline,
            &["placement", "nodeSelector", "="],
        ),
        f(
            "vm",
            "spec.placement.affinity[0].matchLabels",
            vm_base,
            &["placement", "affinity", "0", "matchLabels", "*"],
        ),
        f(
            "vm",
            "spec.placement.antiAffinity[0].matchLabels",
            vm_base,
            &["placement", "antiAffinity", "0", "matchLabels", "="],
        ),
        f(
            "vm",
            "spec.placement.spreadByLabel",
            vm_base,
            &["placement", "spreadByLabel"],
        ),
        f(
            "vm",
            "spec.adopt.nodeName",
            vm_adopt,
            &["adopt", "nodeName"],
        ),
        f("vm", "spec.adopt.domain", vm_adopt, &["adopt", "domain"]),
        f("pool", "spec.nodeName", pool_base, &["nodeName"]),
        f(
            "pool",
            "spec.nodeSelector",
            pool_netfs,
            &["nodeSelector", "*"],
        ),
        f(
            "pool",
            "spec.nodeSelector",
            pool_netfs,
            &["nodeSelector", "="],
        ),
        f("pool", "spec.poolName", pool_base, &["poolName"]),
        f("pool", "spec.targetPath", pool_base, &["targetPath"]),
        f("pool", "spec.source.host", pool_netfs, &["source", "host"]),
        f("pool", "spec.source.dir", pool_netfs, &["source", "dir"]),
        f(
            "pool",
            "spec.source.name",
            pool_logical,
            &["source", "name"],
        ),
        f(
            "pool",
            "spec.source.devices[0]",
            pool_logical,
            &["source", "devices", "0"],
        ),
        f(
            "pool",
            "spec.source.target",
            pool_iscsi,
            &["source", "target"],
        ),
        f(
            "pool",
            "spec.source.initiator",
            pool_iscsi,
            &["source", "initiator"],
        ),
        f(
            "pool",
            "spec.source.auth.username",
            pool_iscsi,
            &["source", "auth", "username"],
        ),
        f(
            "pool",
            "spec.source.auth.secretUsage",
            pool_iscsi,
            &["source", "auth", "secretUsage"],
        ),
        f("node", "spec.address", node_base, &["address"]),
        f("node", "spec.user", node_base, &["user"]),
        f(
            "node",
            "spec.sshKeySecretRef.name",
            node_base,
            &["sshKeySecretRef", "name"],
        ),
        f(
            "node",
            "spec.sshKeySecretRef.namespace",
            node_base,
            &["sshKeySecretRef", "namespace"],
        ),
        f(
            "node",
            "spec.sshKeySecretRef.key",
            node_base,
            &["sshKeySecretRef", "key"],
        ),
        f(
            "node",
            "spec.hostKeyFingerprint",
            node_base,
            &["hostKeyFingerprint"],
        ),
        f("node", "spec.libvirtUri", node_base, &["libvirtUri"]),
        f(
            "node",
            "spec.tlsSecretRef.name",
            node_tls,
            &["tlsSecretRef", "name"],
        ),
        f(
            "node",
            "spec.tlsSecretRef.namespace",
            node_tls,
            &["tlsSecretRef", "namespace"],
        ),
        f("migration", "spec.vmName", migration_base, &["vmName"]),
        f(
            "migration",
            "spec.targetNode",
            migration_base,
            &["targetNode"],
        ),
    ]
}

/// Fields whose values are free text carried as data, never as a name, path or XML: anything
/// goes there (the cloud-init documents end up as files in the seed ISO).
const FREE_TEXT: [&str; 2] = ["spec.cloudInit.userData", "spec.cloudInit.networkData"];

fn set(v: &mut Value, path: &[&str], s: &str) {
    let (last, head) = path.split_last().unwrap();
    let mut cur = v;
    for p in head {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    match *last {
        "*" => *cur = json!({ s: "v" }),
        "=" => *cur = json!({ "k": s }),
        p => match p.parse::<usize>() {
            Ok(i) => cur[i] = json!(s),
            Err(_) => cur[p] = json!(s),
        },
    }
}

fn validate(kind: &str, spec: &Value) -> Result<(), kvm_operator::api::FieldErrors> {
    fn typed<T: serde::de::DeserializeOwned>(spec: &Value) -> T {
        serde_json::from_value(spec.clone()).unwrap_or_else(|e| panic!("{spec}: {e}"))
    }
    match kind {
        "vm" => typed::<kvm_operator::api::VirtualMachineSpec>(spec).validate(),
        "pool" => typed::<kvm_operator::api::StoragePoolSpec>(spec).validate(),
        "node" => typed::<kvm_operator::api::KvmNodeSpec>(spec).validate(),
        "migration" => typed::<kvm_operator::api::MigrationSpec>(spec).validate(),
        _ => unreachable!(),
    }
}

/// Every field × every corpus value: refused naming the field, or accepted only when it
/// cannot break what it reaches (no NUL or control character outside free text: libvirt's
/// bindings cannot even carry a NUL, and neither can XML).
#[test]
fn every_string_field_refuses_hostile_values_naming_the_field() {
    let mut accepted: Vec<(String, String)> = Vec::new();
    for f in fields() {
        let base = (f.base)();
        validate(f.kind, &base).unwrap_or_else(|e| panic!("base of {} is invalid: {e}", f.error));
        for s in corpus() {
            let mut spec = base.clone();
            set(&mut spec, f.path, &s);
            match validate(f.kind, &spec) {
                Err(e) => assert!(
                    e.iter().any(|x| x.field.starts_with(f.error)),
                    "{}={s:?} refused without naming the field: {e}",
                    f.error
                ),
                Ok(()) => {
                    if !FREE_TEXT.contains(&f.error) {
                        assert!(
                            !s.chars().any(char::is_control),
                            "{}={s:?} was accepted with a control character",
                            f.error
                        );
                        assert!(s.len() <= 255, "{}: {} bytes accepted", f.error, s.len());
                    }
                    accepted.push((f.error.to_string(), s));
                }
            }
        }
    }
    // names of other objects, Secrets, Secret keys, bridges, networks, MACs, hosts, users and
    // label keys take nothing from the corpus (except what is a valid name anyway)
    let strict = [
        "spec.disks[1].name",
        "spec.nics[0].name",
        "spec.nics[0].mac",
        "spec.placement.nodeName",
        "spec.adopt.nodeName",
        "spec.cloudInit.userDataSecretRef.name",
        "spec.cloudInit.userDataSecretRef.key",
        "spec.cloudInit.pool",
        "spec.disks[0].new.pool",
        "spec.nodeName",
        "spec.address",
        "spec.user",
        "spec.sshKeySecretRef.name",
        "spec.sshKeySecretRef.namespace",
        "spec.tlsSecretRef.name",
        "spec.hostKeyFingerprint",
        "spec.libvirtUri",
        "spec.vmName",
        "spec.targetNode",
        "spec.placement.spreadByLabel",
    ];
    for (field, s) in &accepted {
        if strict.contains(&field.as_str()) {
            let benign = s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                && !s.starts_with('.')
                && (field.ends_with(".key") || !s.starts_with('-'));
            assert!(benign, "{field} accepted {s:?}");
        }
    }
    // values the IQN, CHAP and volume-group fields pass on to host programs never look like
    // options
    for (field, s) in &accepted {
        if field.starts_with("spec.source.") && field != "spec.source.dir" {
            assert!(!s.starts_with('-'), "{field} accepted {s:?}");
        }
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
}

fn meta(kind: &str, name: &str) -> Value {
    let ns = (kind != "KvmNode").then_some("default");
    json!({"apiVersion": "kvm-operator.io/v1alpha1", "kind": kind,
           "metadata": {"name": name, "namespace": ns, "uid": uid(), "generation": 3}})
}

fn object<T: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> T {
    let mut v = meta(kind, name);
    if kind == "KvmNode" {
        v["metadata"].as_object_mut().unwrap().remove("namespace");
    }
    v["spec"] = spec;
    from_json(v)
}

fn uid() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "00000000-0000-4000-9000-{:06}{:06}",
        std::process::id() % 1_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A refused value gives Ready=False, reason InvalidSpec, a message naming the field, and an
/// Event saying the same, from each controller's core (before any host is touched: the node
/// named does not exist).
#[tokio::test]
async fn refused_values_give_ready_false_invalid_spec_naming_the_field() {
    let hv_arc = Arc::new(NodePool::new(Duration::from_secs(5)));
    let hv = hv_arc.as_ref();
    let world = World::default();
    let config = Config::default();
    let mut checked = 0;
    for f in fields() {
        for s in ["a\0b", "</name><name>evil", "../../etc/passwd", "$(reboot)"] {
            let mut spec = (f.base)();
            set(&mut spec, f.path, s);
            if validate(f.kind, &spec).is_ok() {
                continue;
            }
            checked += 1;
            let (reason, message, notes) = match f.kind {
                "vm" => {
                    let vm: VirtualMachine = object("VirtualMachine", "vm", spec);
                    let out =
                        controller::virtual_machine::reconcile_core(&vm, &world, hv, &config, None)
                            .await;
                    let c = condition::find(&out.status.conditions, condition::READY)
                        .unwrap()
                        .clone();
                    assert_eq!(c.status, "False");
                    assert_eq!(out.status.observed_generation, Some(3));
                    (c.reason, c.message, out.notes)
                }
                "pool" => {
                    let p: StoragePool = object("StoragePool", "p", spec);
                    let out =
                        controller::storage_pool::reconcile_core(&p, &world, hv, &config).await;
                    let c = condition::find(&out.status.conditions, condition::READY)
                        .unwrap()
                        .clone();
                    assert_eq!(c.status, "False");
                    (c.reason, c.message, out.notes)
                }
                "node" => {
                    let n: KvmNode = object("KvmNode", "n", spec);
                    let (out, _) =
                        controller::kvm_node::reconcile_core(&n, &world, hv, &config).await;
                    let c = condition::find(&out.status.conditions, condition::READY)
                        .unwrap()
                        .clone();
                    assert_eq!(c.status, "False");
                    (c.reason, c.message, out.notes)
                }
                _ => {
                    let m: Migration = object("Migration", "m", spec);
                    let out = controller::migration::reconcile_core(
                        &m,
                        &world,
                        &hv_arc,
                        &Default::default(),
                        &config,
                    )
                    .await;
                    let c = out
                        .status
                        .conditions
                        .iter()
                        .find(|c| c.reason == "InvalidSpec")
                        .unwrap_or_else(|| panic!("{:?}", out.status))
                        .clone();
                    (c.reason, c.message, out.notes)
                }
            };
            assert_eq!(reason, "InvalidSpec", "{}={s:?}: {message}", f.error);
            assert!(message.contains(f.error), "{}={s:?}: {message}", f.error);
            assert!(
                notes
                    .iter()
                    .any(|n| n.reason == "InvalidSpec" && n.message.contains(f.error)),
                "{}: {notes:?}",
                f.error
            );
        }
    }
    assert!(checked > 100, "{checked}");
}

/// Standalone mode loads YAML: the same values in a manifest are refused naming the file, the
/// object and the field; a hostile namespace (which standalone mode turns into a directory of
/// definition backups) is refused too.
#[test]
fn standalone_manifests_with_hostile_values_are_refused_naming_the_field() {
    let kinds = [
        ("vm", "VirtualMachine"),
        ("pool", "StoragePool"),
        ("node", "KvmNode"),
        ("migration", "Migration"),
    ];
    for f in fields() {
        for s in ["a\0b", "]]>", "../../etc/passwd", "`id`\n", "\u{202e}x"] {
            let mut spec = (f.base)();
            set(&mut spec, f.path, s);
            if validate(f.kind, &spec).is_ok() {
                continue;
            }
            let kind = kinds.iter().find(|k| k.0 == f.kind).unwrap().1;
            let mut doc = meta(kind, "x");
            doc["metadata"].as_object_mut().unwrap().remove("uid");
            doc["spec"] = spec;
            // JSON is YAML: the escapes carry NUL and line breaks
            let text = serde_json::to_string(&doc).unwrap();
            let err = manifest::parse_and_validate(&text, "hostile.yaml")
                .err()
                .unwrap_or_else(|| panic!("{}={s:?} loaded", f.error))
                .to_string();
            assert!(
                err.contains("hostile.yaml") && err.contains(f.error),
                "{}={s:?}: {err}",
                f.error
            );
        }
    }
    for ns in ["/tmp/escape", "../..", "a/b", "A", ""] {
        let text = format!(
            "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm, namespace: {}}}\nspec: {{vcpus: 1, memory: 64Mi}}\n",
            serde_json::to_string(ns).unwrap()
        );
        let err = manifest::parse_and_validate(&text, "ns.yaml")
            .err()
            .unwrap_or_else(|| panic!("namespace {ns:?} loaded"))
            .to_string();
        assert!(err.contains("metadata.namespace"), "{ns:?}: {err}");
    }
}

/// The commands the operator runs over SSH are fixed strings: they take no argument, so no
/// spec value can reach a shell line.
#[test]
fn ssh_commands_are_constants() {
    let all = [
        RemoteCommand::HostFacts,
        RemoteCommand::LibvirtSocket,
        RemoteCommand::RestartDaemon(LibvirtDaemon::Libvirtd),
        RemoteCommand::RestartDaemon(LibvirtDaemon::Virtqemud),
    ];
    for c in all {
        let line: &'static str = c.line();
        assert_eq!(line, c.line());
        for s in corpus() {
            if s.len() > 3 && s.chars().any(|c| !c.is_ascii_alphanumeric()) {
                assert!(!line.contains(&s), "{line:?} contains {s:?}");
            }
        }
    }
}

/// The test-driver node, its pool and a world holding both, as the controllers see them.
struct Rig {
    hv: Arc<NodePool>,
    world: World,
    config: Config,
    node: String,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new(tag: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            shutdown_grace: Duration::from_secs(1),
            definition_backup: false,
            ..Config::default()
        };
        let hv = Arc::new(NodePool::new(Duration::from_secs(30)));
        let node = format!("hostile-{tag}");
        let n: KvmNode = object(
            "KvmNode",
            &node,
            json!({"address": "localhost", "libvirtUri": "test:///default"}),
        );
        hv.upsert(NodeAccess {
            name: node.clone(),
            spec: n.spec.clone(),
            private_key: None,
            state_dir: dir.path().to_path_buf(),
            tls: None,
            timeout: Duration::from_secs(5),
        });
        let mut world = World::default();
        world.nodes.push(Arc::new(n.clone()));
        let (out, _) = controller::kvm_node::reconcile_core(&n, &world, hv.as_ref(), &config).await;
        let mut n = n;
        n.status = Some(out.status);
        world.nodes = vec![Arc::new(n)];
        Rig {
            hv,
            world,
            config,
            node,
            _dir: dir,
        }
    }

    async fn pool(&mut self, name: &str, spec: Value) -> StoragePool {
        let mut p: StoragePool = object("StoragePool", name, spec);
        for _ in 0..4 {
            let out = controller::storage_pool::reconcile_core(
                &p,
                &self.world,
                self.hv.as_ref(),
                &self.config,
            )
            .await;
            p.status = Some(out.status);
        }
        self.world.pools.push(Arc::new(p.clone()));
        p
    }

    async fn settle(&mut self, vm: &mut VirtualMachine) {
        for _ in 0..12 {
            self.world.vms.retain(|v| v.metadata.uid != vm.metadata.uid);
            self.world.vms.push(Arc::new(vm.clone()));
            let out = controller::virtual_machine::reconcile_core(
                vm,
                &self.world,
                self.hv.as_ref(),
                &self.config,
                None,
            )
            .await;
            let same = vm.status.as_ref() == Some(&out.status);
            vm.status = Some(out.status);
            if same && out.requeue.is_none_or(|r| r >= Duration::from_secs(15)) {
                break;
            }
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, kvm_operator::hypervisor::HvError> + Send + 'static,
    ) -> T {
        self.hv
            .call(&self.node, "test", f)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn ready(vm: &VirtualMachine) -> String {
    let st = vm.status.as_ref().unwrap();
    condition::find(&st.conditions, condition::READY)
        .map(|c| format!("{} {} {}", c.status, c.reason, c.message))
        .unwrap_or_default()
}

/// Values validation accepts in names and paths (XML and shell metacharacters, unicode, RTL,
/// zero-width, emoji, a leading '-') go through the real planner and libvirt's own parser: the
/// pool's definition and the VM's domain hold exactly them, each volume path stays inside the
/// pool's directory, and no extra element or attribute appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_hostile_names_and_paths_are_carried_exactly_on_libvirt() {
    let mut rig = Rig::new("carry").await;
    let tag = std::process::id();
    let pool_name = format!("p{tag} <&'\"]]> ; $(id) `x` | \u{202e}😀");
    let target = format!("/hostile{tag}/<a href=\"x\">&amp;'; $(reboot) `id` |/日本 \u{200b}");
    let spec =
        json!({"nodeName": rig.node, "type": "dir", "poolName": pool_name, "targetPath": target});
    validate("pool", &spec).unwrap();
    let p = rig.pool("p", spec).await;
    let st = p.status.as_ref().unwrap();
    assert!(
        st.nodes.iter().any(|n| n.node == rig.node
            && n.state == kvm_operator::api::storage_pool::PoolState::Running),
        "{st:?}"
    );
    let (pn, tg) = (pool_name.clone(), target.clone());
    let def = rig
        .call(move |c| c.pool_definition(&pn))
        .await
        .expect("pool defined");
    assert_eq!(def.name, pool_name);
    assert_eq!(
        def.target.as_ref().map(|t| t.path.as_str()),
        Some(tg.as_str())
    );

    // volumes with hostile names the VM uses as they are
    let names = [
        format!("-ex{tag} <b>&'\"]]>.img"),
        format!("cd{tag} ; rm -rf ~ `id` $(x)\u{202e}.iso"),
        format!("tpl{tag} <source file=\"etc-shadow\"><b>.qcow2"),
        format!("base{tag} \u{200b}😀 &lt;.qcow2"),
    ];
    for n in &names {
        let (pn, n) = (pool_name.clone(), n.clone());
        rig.call(move |c| {
            c.create_volume(
                &pn,
                &n,
                1 << 20,
                kvm_operator::api::virtual_machine::VolumeFormat::Raw,
            )
            .map(|_| ())
        })
        .await;
    }
    let vm_spec = json!({
        "vcpus": 1, "memory": "64Mi",
        "disks": [
            {"name": "ex", "existing": {"pool": "p", "volume": names[0]}},
            {"name": "cd", "cdrom": {"pool": "p", "volume": names[1]}},
            {"name": "tpl", "clone": {"pool": "p", "template": names[2]}},
            {"name": "ovl", "overlay": {"pool": "p", "base": names[3]}},
            {"name": "root", "new": {"pool": "p", "size": "2Mi"}}
        ],
        "nics": [{"name": "net0", "bridge": "-br.0_"}, {"name": "net1", "network": ".."}],
        "cloudInit": {"userData": "#cloud-config\nruncmd: [\"$(reboot)\", \"</domain>\"]\n"},
        "placement": {"nodeName": rig.node},
    });
    validate("vm", &vm_spec).unwrap();
    let mut vm: VirtualMachine = object("VirtualMachine", &format!("carry{tag}"), vm_spec);
    rig.settle(&mut vm).await;
    let st = vm.status.clone().unwrap();
    let domain = st
        .domain_name
        .clone()
        .unwrap_or_else(|| panic!("not defined: {}", ready(&vm)));
    let d = domain.clone();
    let (xml_text, xml) = rig
        .call(move |c| Ok((c.persistent_xml_text(&d)?, c.persistent_xml(&d)?)))
        .await;
    // what libvirt stored (its own parser read ours) holds the values exactly, nothing more
    let sources: Vec<String> = xml
        .devices
        .disk
        .iter()
        .filter_map(|d| d.source.as_ref().and_then(|s| s.file.clone()))
        .collect();
    assert_eq!(xml.devices.disk.len(), 6, "{xml_text}");
    for s in &sources {
        let rest = s
            .strip_prefix(&format!("{target}/"))
            .unwrap_or_else(|| panic!("{s:?} is outside {target:?}"));
        assert!(!rest.contains('/') && rest != ".." && rest != ".", "{s:?}");
    }
    for n in &names[..2] {
        assert!(
            sources.iter().any(|s| s == &format!("{target}/{n}")),
            "{n:?} not in {sources:?}"
        );
    }
    assert!(
        !xml_text.contains("<source file=\"etc-shadow\">"),
        "{xml_text}"
    );
    assert_eq!(xml_text.matches("<source").count(), 8, "{xml_text}");
    let ifaces: Vec<String> = xml
        .devices
        .interface
        .iter()
        .filter_map(|i| {
            i.source
                .as_ref()
                .and_then(|s| s.bridge.clone().or(s.network.clone()))
        })
        .collect();
    assert_eq!(ifaces, ["-br.0_", ".."], "{xml_text}");
    let owner = xml.owner().unwrap();
    assert_eq!(owner.name, vm.metadata.name.clone().unwrap());
}

/// An existing domain with a hostile name is adopted under exactly that name: status, the
/// stamp written into it and libvirt's list agree, and no second domain appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_domain_with_a_hostile_name_keeps_exactly_that_name() {
    let mut rig = Rig::new("adopt").await;
    let name = format!(
        "adopt{} <x>&amp;'\"]]> ; $(reboot) `id` | \u{202e}evil\u{200b} 😀 -o",
        std::process::id()
    );
    let n = name.clone();
    rig.call(move |c| {
        c.define(&DomainXml::minimal(&n, "test", 65536, 1))
            .map(|_| ())
    })
    .await;
    let before = rig.call(|c| c.list_domains()).await.len();
    let spec = json!({"adopt": {"nodeName": rig.node, "domain": name}, "runStrategy": "Stopped"});
    validate("vm", &spec).unwrap();
    let mut vm: VirtualMachine = object("VirtualMachine", "adopted", spec);
    rig.settle(&mut vm).await;
    let st = vm.status.clone().unwrap();
    assert_eq!(
        st.domain_name.as_deref(),
        Some(name.as_str()),
        "{}",
        ready(&vm)
    );
    let n = name.clone();
    let xml = rig.call(move |c| c.persistent_xml(&n)).await;
    assert_eq!(xml.name, name);
    assert_eq!(xml.owner().map(|o| o.uid.clone()), vm.metadata.uid.clone());
    let after = rig.call(|c| c.list_domains()).await;
    assert_eq!(after.len(), before);
    assert_eq!(after.iter().filter(|d| d.name == name).count(), 1);
}

/// Hostile values inside an otherwise valid libvirt URI: a NUL (libvirt's bindings panic on
/// one), query options that would turn off host key checks or pick the remote command, and a
/// user that looks like an ssh option are refused by validation, naming spec.libvirtUri.
#[test]
fn hostile_parts_of_a_libvirt_uri_are_refused() {
    for uri in [
        "test:///default\0x",
        "test:///default\u{1b}[2J",
        "qemu+ssh://h/system?no_verify=1",
        "qemu+libssh://h/system?known_hosts_verify=ignore",
        "qemu+ssh://h/system?command=/bin/sh&netcat=x",
        "qemu+ssh://h/system#x",
        "qemu+ssh://-oProxyCommand=x@h/system",
        "qemu+ssh://$(reboot)@h/system",
        "qemu+ssh://h/system\n",
    ] {
        let mut spec = node_base();
        spec["libvirtUri"] = json!(uri);
        let e = validate("node", &spec).expect_err(uri);
        assert!(
            e.iter().any(|x| x.field == "spec.libvirtUri"),
            "{uri:?}: {e}"
        );
    }
}
