//! The controllers' Kubernetes API calls, pinned with kube's tower-test mock: no kube-apiserver
//! can run here, so each test states the exact requests a reconcile makes (finalizer patches,
//! Secret reads, server-side-apply status patches with the controller's field manager, Events)
//! and answers them as an apiserver would. The hypervisor side is real: libvirt's `test:///`
//! driver.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use kvm_operator::api::{KvmNode, StoragePool, VirtualMachine};
use kvm_operator::controller::{self, Config, Context};
use kvm_operator::hypervisor::NodeAccess;
use kvm_operator::hypervisor::cache::NodePool;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Checks a request's query string and JSON body.
type Check = Box<dyn FnOnce(&str, &Value) + Send>;

/// One expected request: method, path, a check of the query and JSON body, and the answer.
struct Expect {
    method: Method,
    path: String,
    check: Check,
    status: StatusCode,
    reply: Option<Value>,
    /// Answer with this object carrying the status the request applied.
    object: Option<Value>,
}

fn expect(
    method: Method,
    path: impl Into<String>,
    check: impl FnOnce(&str, &Value) + Send + 'static,
) -> Expect {
    Expect {
        method,
        path: path.into(),
        check: Box::new(check),
        status: StatusCode::OK,
        reply: None,
        object: None,
    }
}

fn not_found(method: Method, path: impl Into<String>) -> Expect {
    Expect {
        status: StatusCode::NOT_FOUND,
        reply: Some(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"}),
        ),
        ..expect(method, path, |_, _| {})
    }
}

/// Answers `expects` in order (echoing the request body unless a reply is set), then checks
/// that nothing else is asked.
async fn serve(mut handle: Handle, expects: Vec<Expect>) {
    for e in expects {
        let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {} {}", e.method, e.path))
            .unwrap_or_else(|| panic!("client gone; expected {} {}", e.method, e.path));
        assert_eq!(req.method(), e.method, "{}", req.uri());
        assert_eq!(req.uri().path(), e.path);
        let query = req.uri().query().unwrap_or_default().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (e.check)(&query, &body);
        let reply = match (e.reply, e.object) {
            (Some(r), _) => r,
            (None, Some(mut obj)) => {
                obj["status"] = body["status"].clone();
                obj
            }
            (None, None) => body,
        };
        send.send_response(
            Response::builder()
                .status(e.status)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }
    let more = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    if let Ok(Some((req, _))) = more {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn test_node(extra: Value) -> KvmNode {
    let mut spec = json!({"address": "localhost", "libvirtUri": "test:///default"});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": "n1", "uid": "node-uid", "generation": 1,
                     "finalizers": ["kvm-operator.io/cleanup"]},
        "spec": spec,
    }))
}

/// A context whose client is the mock, with these objects in its caches.
fn context(
    svc: tower_test::mock::Mock<Request<Body>, Response<Body>>,
    nodes: Vec<KvmNode>,
    pools: Vec<StoragePool>,
    vms: Vec<VirtualMachine>,
    dir: &std::path::Path,
) -> Arc<Context> {
    let config = Config {
        state_dir: dir.to_path_buf(),
        ..Config::default()
    };
    context_with(svc, nodes, pools, vms, config)
}

/// [`context`] with a given configuration.
fn context_with(
    svc: tower_test::mock::Mock<Request<Body>, Response<Body>>,
    nodes: Vec<KvmNode>,
    pools: Vec<StoragePool>,
    vms: Vec<VirtualMachine>,
    config: Config,
) -> Arc<Context> {
    let dir = config.state_dir.clone();
    let client = kube::Client::new(svc, "default");
    let hv = Arc::new(NodePool::new(Duration::from_secs(10)));
    for n in &nodes {
        hv.upsert(NodeAccess {
            name: n.metadata.name.clone().unwrap(),
            spec: n.spec.clone(),
            private_key: None,
            state_dir: dir.clone(),
            tls: None,
            timeout: Duration::from_secs(5),
        });
    }
    fn fill<K: kube::Resource<DynamicType = ()> + Clone + 'static>(
        objs: Vec<K>,
    ) -> kube::runtime::reflector::Store<K> {
        let (reader, mut writer) = store();
        for o in objs {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        reader
    }
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    Arc::new(Context::new(
        client,
        hv,
        (fill(nodes), fill(pools), fill(vms), fill(vec![])),
        config,
        tx,
    ))
}

fn status_patch(
    path: &str,
    manager: &'static str,
    object: &impl serde::Serialize,
    check: impl FnOnce(&Value) + Send + 'static,
) -> Expect {
    Expect {
        object: Some(serde_json::to_value(object).unwrap()),
        ..expect(Method::PATCH, path, move |q, body| {
            assert!(q.contains(&format!("fieldManager={manager}")), "{q}");
            assert!(
                q.contains("force=true"),
                "server-side apply with force: {q}"
            );
            assert_eq!(body["apiVersion"], "kvm-operator.io/v1alpha1");
            check(&body["status"]);
        })
    }
}

fn event(ns: &str, reason: &'static str, kind: &'static str) -> Expect {
    expect(
        Method::POST,
        format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
        move |_, body| {
            assert_eq!(body["reason"], reason, "{body}");
            assert_eq!(body["type"], kind, "{body}");
            assert_eq!(body["reportingController"], "kvm-operator");
        },
    )
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no {t} in {status}"))
}

#[tokio::test]
async fn a_new_node_first_gets_the_finalizer_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut node = test_node(json!({}));
    node.metadata.finalizers = None;
    let ctx = context(svc, vec![], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![Expect {
            reply: Some(serde_json::to_value(test_node(json!({}))).unwrap()),
            ..expect(
                Method::PATCH,
                "/apis/kvm-operator.io/v1alpha1/kvmnodes/n1",
                |_, body| {
                    // JSON patch: test that there are no finalizers, then add ours
                    assert_eq!(body[0]["op"], "test");
                    assert_eq!(body[1]["op"], "add");
                    assert_eq!(body[1]["path"], "/metadata/finalizers");
                    assert_eq!(body[1]["value"], json!(["kvm-operator.io/cleanup"]));
                },
            )
        }],
    ));
    controller::kvm_node::reconcile(Arc::new(node), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_node_reports_status_by_server_side_apply_and_an_event_when_it_becomes_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let node = test_node(json!({}));
    let ctx = context(svc, vec![node.clone()], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/kvmnodes/n1/status",
                "kvm-operator-kvmnode",
                &node,
                |s| {
                    assert_eq!(s["observedGeneration"], 1);
                    assert_eq!(condition(s, "Ready")["status"], "True");
                    assert_eq!(condition(s, "Reachable")["status"], "True");
                    // kstatus reads Current: neither Reconciling nor Stalled
                    assert_eq!(condition(s, "Reconciling")["status"], "False");
                    assert_eq!(condition(s, "Stalled")["status"], "False");
                    assert!(s["capacity"]["cpus"].as_u64().unwrap() > 0);
                    // the test driver's own domain is not ours
                    assert_eq!(s["unmanagedDomains"][0]["name"], "test");
                },
            ),
            event("default", "Ready", "Normal"),
        ],
    ));
    let action = controller::kvm_node::reconcile(Arc::new(node), ctx)
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(30))
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_missing_key_secret_is_reported_on_the_node_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let node = test_node(json!({"sshKeySecretRef": {"name": "n1-key"}}));
    let ctx = context(svc, vec![], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            not_found(
                Method::GET,
                "/api/v1/namespaces/kvm-operator/secrets/n1-key",
            ),
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/kvmnodes/n1/status",
                "kvm-operator-kvmnode",
                &node,
                |s| {
                    let r = condition(s, "Ready");
                    assert_eq!(r["status"], "False");
                    assert_eq!(r["reason"], "SecretNotFound");
                    // a Secret may still arrive (GitOps order): kstatus reads Failed only once
                    // the operator gives up, so this is Stalled (Argo CD: Degraded) with the
                    // same reason, and the message says what to do
                    assert_eq!(condition(s, "Stalled")["status"], "True");
                    assert_eq!(condition(s, "Stalled")["reason"], "SecretNotFound");
                    assert_eq!(condition(s, "Reconciling")["status"], "False");
                    assert!(
                        r["message"]
                            .as_str()
                            .unwrap()
                            .contains("kvm-operator/n1-key")
                    );
                },
            ),
            event("default", "SecretNotFound", "Warning"),
        ],
    ));
    controller::kvm_node::reconcile(Arc::new(node), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn deleting_a_node_with_vms_is_refused_and_says_why_then_allowed_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = test_node(json!({}));
    node.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "prod", "uid": "vm-uid"},
        "spec": {"vcpus": 1, "memory": "64Mi"}, "status": {"node": "n1"},
    }));
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![node.clone()], vec![], vec![vm], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/kvmnodes/n1/status",
                "kvm-operator-kvmnode",
                &node,
                |s| {
                    let d = condition(s, "Deleting");
                    assert_eq!(d["reason"], "DeletionBlocked");
                    assert!(d["message"].as_str().unwrap().contains("prod/web"));
                },
            ),
            event("default", "DeletionBlocked", "Warning"),
        ],
    ));
    let err = controller::kvm_node::reconcile(Arc::new(node.clone()), ctx)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "DeletionBlocked");
    server.await.unwrap();

    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![node.clone()], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![Expect {
            reply: Some(serde_json::to_value(&node).unwrap()),
            ..expect(
                Method::PATCH,
                "/apis/kvm-operator.io/v1alpha1/kvmnodes/n1",
                |_, body| {
                    assert_eq!(body[0]["op"], "test");
                    assert_eq!(body[0]["value"], "kvm-operator.io/cleanup");
                    assert_eq!(body[1]["op"], "remove");
                    assert_eq!(body[1]["path"], "/metadata/finalizers/0");
                },
            )
        }],
    ));
    controller::kvm_node::reconcile(Arc::new(node), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_pool_is_ensured_on_its_node_and_reported_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = test_node(json!({}));
    let pool: StoragePool = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "StoragePool",
        "metadata": {"name": "images", "namespace": "prod", "uid": "pool-uid", "generation": 2,
                     "finalizers": ["kvm-operator.io/cleanup"]},
        "spec": {"nodeName": "n1", "type": "dir", "targetPath": "/kvm-operator-test-images"},
    }));
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![node], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/namespaces/prod/storagepools/images/status",
                "kvm-operator-storagepool",
                &pool,
                |s| {
                    assert_eq!(s["observedGeneration"], 2);
                    assert_eq!(s["readyNodes"], "1/1");
                    assert_eq!(s["nodes"][0]["node"], "n1");
                    assert_eq!(s["nodes"][0]["state"], "Running");
                    assert_eq!(condition(s, "Ready")["status"], "True");
                },
            ),
            event("prod", "PoolRunning", "Normal"),
        ],
    ));
    controller::storage_pool::reconcile(Arc::new(pool), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn an_invalid_vm_gets_ready_false_naming_the_field_and_waits_for_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "prod", "uid": "vm-uid", "generation": 4,
                     "finalizers": ["kvm-operator.io/cleanup"]},
        "spec": {"vcpus": 0, "memory": "1Gi"},
    }));
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/namespaces/prod/virtualmachines/web/status",
                "kvm-operator-virtualmachine",
                &vm,
                |s| {
                    assert_eq!(s["observedGeneration"], 4);
                    let r = condition(s, "Ready");
                    assert_eq!(r["reason"], "InvalidSpec");
                    assert!(r["message"].as_str().unwrap().contains("spec.vcpus"));
                    // kstatus: Failed (Stalled=True) at generation 4, not InProgress
                    let st = condition(s, "Stalled");
                    assert_eq!(st["status"], "True");
                    assert_eq!(st["reason"], "InvalidSpec");
                    assert_eq!(st["observedGeneration"], 4);
                    assert_eq!(condition(s, "Reconciling")["status"], "False");
                },
            ),
            event("prod", "InvalidSpec", "Warning"),
        ],
    ));
    let action = controller::virtual_machine::reconcile(Arc::new(vm), ctx)
        .await
        .unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    server.await.unwrap();
}

#[tokio::test]
async fn a_vm_is_scheduled_on_the_test_driver_node_and_the_choice_explained() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = test_node(json!({}));
    node.status = Some(from_json(json!({
        "allocatable": {"cpus": 16, "memory": "32Gi"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    })));
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "prod", "uid": "vm-uid", "generation": 1,
                     "finalizers": ["kvm-operator.io/cleanup"]},
        "spec": {"vcpus": 2, "memory": "1Gi",
                 "cloudInit": {"userDataSecretRef": {"name": "web-cloud-init"}, "pool": "images"}},
    }));
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![node], vec![], vec![vm.clone()], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect {
                reply: Some(json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "web-cloud-init", "namespace": "prod"},
                    "data": {"userdata": "I2Nsb3VkLWNvbmZpZwo="}})),
                ..expect(
                    Method::GET,
                    "/api/v1/namespaces/prod/secrets/web-cloud-init",
                    |_, _| {},
                )
            },
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/namespaces/prod/virtualmachines/web/status",
                "kvm-operator-virtualmachine",
                &vm,
                |s| {
                    // no pool "images" runs anywhere: unschedulable, and why
                    let r = condition(s, "Scheduled");
                    assert_eq!(r["status"], "False");
                    assert_eq!(r["reason"], "Unschedulable");
                    assert!(
                        r["message"]
                            .as_str()
                            .unwrap()
                            .contains("StoragePool images"),
                        "{r}"
                    );
                    assert_eq!(s["placement"]["filtered"][0]["node"], "n1");
                },
            ),
            event("prod", "Unschedulable", "Warning"),
        ],
    ));
    controller::virtual_machine::reconcile(Arc::new(vm), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn deleting_a_vm_that_was_never_placed_only_removes_the_finalizer() {
    let dir = tempfile::tempdir().unwrap();
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "prod", "uid": "vm-uid",
                     "finalizers": ["kvm-operator.io/cleanup"],
                     "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"vcpus": 1, "memory": "64Mi"},
    }));
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![], vec![], vec![], dir.path());
    let reply = serde_json::to_value(&vm).unwrap();
    let server = tokio::spawn(serve(
        handle,
        vec![Expect {
            reply: Some(reply),
            ..expect(
                Method::PATCH,
                "/apis/kvm-operator.io/v1alpha1/namespaces/prod/virtualmachines/web",
                |_, body| assert_eq!(body[1]["op"], "remove"),
            )
        }],
    ));
    controller::virtual_machine::reconcile(Arc::new(vm), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

fn loaded_node(name: &str) -> KvmNode {
    from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "KvmNode",
        "metadata": {"name": name, "uid": format!("uid-{name}")},
        "spec": {"address": "localhost", "libvirtUri": "test:///default"},
        "status": {
            "capacity": {"cpus": 16, "memory": "64Gi"},
            "allocatable": {"cpus": 16, "memory": "64Gi"},
            "load": {"load1": "0", "load5": "0", "load15": "0", "cpuUsagePercent": 0, "memoryFree": "60Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }
    }))
}

fn running_vm(name: &str, node: &str, cpus: u32) -> VirtualMachine {
    from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "team", "uid": format!("uid-{name}")},
        "spec": {"vcpus": cpus, "memory": format!("{}Gi", cpus * 4)},
        "status": {"node": node, "powerState": "Running"},
    }))
}

#[tokio::test]
async fn rebalancing_creates_one_labelled_migration_and_says_why_on_the_busy_node() {
    use kvm_operator::controller::config::{Rebalance, RebalanceMode};
    use kvm_operator::controller::rebalance::{REBALANCE_LABEL, round};
    let dir = tempfile::tempdir().unwrap();
    let config = |mode| Config {
        state_dir: dir.path().to_path_buf(),
        rebalance: Rebalance {
            enabled: true,
            mode,
            ..Rebalance::default()
        },
        ..Config::default()
    };
    let vms = vec![
        running_vm("web-1", "a", 2),
        running_vm("web-2", "a", 6),
        running_vm("db", "a", 6),
    ];
    // Migrate: one POST of a Migration, then a Normal Event on the busy KvmNode
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context_with(
        svc,
        vec![loaded_node("a"), loaded_node("b")],
        vec![],
        vms.clone(),
        config(RebalanceMode::Migrate),
    );
    let server = tokio::spawn(serve(
        handle,
        vec![
            Expect {
                reply: Some(json!({
                    "apiVersion": "kvm-operator.io/v1alpha1", "kind": "Migration",
                    "metadata": {"name": "rebalance-db-x7k2p", "namespace": "team"},
                    "spec": {"vmName": "db", "targetNode": "b"},
                })),
                ..expect(
                    Method::POST,
                    "/apis/kvm-operator.io/v1alpha1/namespaces/team/migrations",
                    |_, body| {
                        assert_eq!(body["metadata"]["generateName"], "rebalance-db-", "{body}");
                        assert!(body["metadata"].get("name").is_none_or(Value::is_null));
                        assert_eq!(body["metadata"]["labels"][REBALANCE_LABEL], "true");
                        assert_eq!(body["metadata"]["labels"]["kvm-operator.io/from-node"], "a");
                        assert_eq!(body["spec"]["vmName"], "db");
                        assert_eq!(body["spec"]["targetNode"], "b");
                        // no disks: nothing to copy
                        assert_eq!(body["spec"]["copyStorage"], false);
                    },
                )
            },
            Expect {
                ..expect(
                    Method::POST,
                    "/apis/events.k8s.io/v1/namespaces/default/events",
                    |_, body| {
                        assert_eq!(body["reason"], "RebalanceStarted");
                        assert_eq!(body["type"], "Normal");
                        assert_eq!(body["regarding"]["kind"], "KvmNode");
                        assert_eq!(body["regarding"]["name"], "a");
                        let note = body["note"].as_str().unwrap_or("");
                        assert!(
                            note.contains("team/db") && note.contains("rebalance-db-x7k2p"),
                            "{note}"
                        );
                    },
                )
            },
        ],
    ));
    let m = round(&ctx, None).await.unwrap().unwrap();
    assert_eq!(
        (m.vm.as_str(), m.from.as_str(), m.to.as_str()),
        ("team/db", "a", "b")
    );
    server.await.unwrap();

    // Propose: only the Event, nothing created; and not again within the interval
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context_with(
        svc,
        vec![loaded_node("a"), loaded_node("b")],
        vec![],
        vms,
        config(RebalanceMode::Propose),
    );
    let server = tokio::spawn(serve(
        handle,
        vec![expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/default/events",
            |_, body| {
                assert_eq!(body["reason"], "RebalanceProposed");
                assert!(
                    body["note"]
                        .as_str()
                        .unwrap_or("")
                        .contains("apply a Migration")
                );
            },
        )],
    ));
    assert!(round(&ctx, None).await.unwrap().is_ok());
    assert!(
        round(&ctx, Some(Duration::from_secs(5)))
            .await
            .unwrap()
            .is_err()
    );
    server.await.unwrap();
}

fn lease_json(holder: &str, renewed_secs_ago: i64, rv: &str) -> Value {
    let renewed = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
            renewed_secs_ago,
        ))
        .unwrap();
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "kvm-operator-leader", "namespace": "kvm-operator", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 4,
                 "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": renewed.to_string()},
    })
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kvm-operator/leases";

fn conflict(method: Method, path: impl Into<String>) -> Expect {
    Expect {
        status: StatusCode::CONFLICT,
        reply: Some(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        ),
        ..expect(method, path, |_, _| {})
    }
}

#[tokio::test]
async fn leader_election_acquires_renews_and_loses_the_lease() {
    use kvm_operator::controller::leader::{Timing, keep, try_acquire};
    let timing = Timing {
        lease: Duration::from_millis(300),
        renew: Duration::from_millis(20),
        retry: Duration::from_millis(20),
    };
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(kube::Client::new(svc, "default"), "kvm-operator");
    let server = tokio::spawn(serve(
        handle,
        vec![
            // 1. no Lease: create it, held by us
            not_found(Method::GET, format!("{LEASE}/kvm-operator-leader")),
            expect(Method::POST, LEASE, |_, body| {
                assert_eq!(body["metadata"]["name"], "kvm-operator-leader");
                assert_eq!(body["spec"]["holderIdentity"], "pod-a");
                assert_eq!(
                    body["spec"]["leaseDurationSeconds"], 1,
                    "never 0: at least a second"
                );
            }),
            // 2. held by another replica and fresh: nothing written
            Expect {
                reply: Some(lease_json("pod-b", 1, "7")),
                ..expect(
                    Method::GET,
                    format!("{LEASE}/kvm-operator-leader"),
                    |_, _| {},
                )
            },
            // 3. expired: taken over with the resourceVersion read, one more transition
            Expect {
                reply: Some(lease_json("pod-b", 60, "8")),
                ..expect(
                    Method::GET,
                    format!("{LEASE}/kvm-operator-leader"),
                    |_, _| {},
                )
            },
            expect(
                Method::PUT,
                format!("{LEASE}/kvm-operator-leader"),
                |_, body| {
                    assert_eq!(body["metadata"]["resourceVersion"], "8");
                    assert_eq!(body["spec"]["holderIdentity"], "pod-a");
                    assert_eq!(body["spec"]["leaseTransitions"], 5);
                },
            ),
            // 4. a race for an expired Lease lost: the API server answers 409
            Expect {
                reply: Some(lease_json("pod-b", 60, "9")),
                ..expect(
                    Method::GET,
                    format!("{LEASE}/kvm-operator-leader"),
                    |_, _| {},
                )
            },
            conflict(Method::PUT, format!("{LEASE}/kvm-operator-leader")),
            // 5. leading: keep() renews (same holder, acquire time kept) ...
            Expect {
                reply: Some(lease_json("pod-a", 0, "10")),
                ..expect(
                    Method::GET,
                    format!("{LEASE}/kvm-operator-leader"),
                    |_, _| {},
                )
            },
            expect(
                Method::PUT,
                format!("{LEASE}/kvm-operator-leader"),
                |_, body| {
                    assert_eq!(body["spec"]["holderIdentity"], "pod-a");
                    assert_eq!(body["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z");
                    assert_eq!(body["spec"]["leaseTransitions"], 4);
                },
            ),
            // ... until another replica holds it: leadership lost, keep() returns
            Expect {
                reply: Some(lease_json("pod-c", 0, "12")),
                ..expect(
                    Method::GET,
                    format!("{LEASE}/kvm-operator-leader"),
                    |_, _| {},
                )
            },
        ],
    ));
    assert!(
        try_acquire(&api, "pod-a", &timing).await.unwrap(),
        "created"
    );
    assert!(
        !try_acquire(&api, "pod-a", &timing).await.unwrap(),
        "standby"
    );
    assert!(
        try_acquire(&api, "pod-a", &timing).await.unwrap(),
        "taken over"
    );
    assert!(
        !try_acquire(&api, "pod-a", &timing).await.unwrap(),
        "race lost"
    );
    let why = keep(&api, "pod-a", &timing).await;
    assert!(why.contains("another replica"), "{why}");
    server.await.unwrap();

    // a leader that cannot renew stops before its lease runs out (one renew period of margin,
    // wide enough that a busy test machine does not eat it)
    let timing = Timing {
        renew: Duration::from_millis(100),
        ..timing
    };
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(kube::Client::new(svc, "default"), "kvm-operator");
    let failing = (0..40)
        .map(|_| Expect {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            reply: Some(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "InternalError", "code": 500, "message": "etcd unavailable"}),
            ),
            ..expect(
                Method::GET,
                format!("{LEASE}/kvm-operator-leader"),
                |_, _| {},
            )
        })
        .collect::<Vec<_>>();
    let server = tokio::spawn(async move {
        // answer until the client stops asking
        let _ = tokio::time::timeout(Duration::from_secs(5), serve(handle, failing)).await;
    });
    let started = std::time::Instant::now();
    let why = keep(&api, "pod-a", &timing).await;
    assert!(why.contains("could not be renewed in time"), "{why}");
    assert!(
        started.elapsed() < timing.lease,
        "stopped within the lease ({:?})",
        started.elapsed()
    );
    server.abort();

    // an API server that takes the request and never answers: the same, not a hang
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(kube::Client::new(svc, "default"), "kvm-operator");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            held.push((req, send));
        }
    });
    let started = std::time::Instant::now();
    let why = keep(&api, "pod-a", &timing).await;
    assert!(why.contains("did not answer"), "{why}");
    assert!(
        started.elapsed() < timing.lease,
        "stopped within the lease ({:?})",
        started.elapsed()
    );
    silent.abort();
}

#[tokio::test]
async fn a_standby_reports_ready_takes_a_released_lease_at_once_and_releases_its_own() {
    use kvm_operator::controller::leader::{Timing, acquire, release};
    let timing = Timing {
        lease: Duration::from_secs(15),
        renew: Duration::from_secs(5),
        retry: Duration::from_millis(10),
    };
    let mut released = lease_json("pod-b", 1, "21");
    released["spec"]["holderIdentity"] = Value::Null;
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(kube::Client::new(svc, "default"), "kvm-operator");
    let get = |reply: Value| Expect {
        reply: Some(reply),
        ..expect(
            Method::GET,
            format!("{LEASE}/kvm-operator-leader"),
            |_, _| {},
        )
    };
    let server = tokio::spawn(serve(
        handle,
        vec![
            // another replica leads (renewed a second ago, lasts 15 s): wait as a standby
            get(lease_json("pod-b", 1, "20")),
            // it shut down cleanly and released the Lease: taken at once, not after 15 s
            get(released),
            expect(
                Method::PUT,
                format!("{LEASE}/kvm-operator-leader"),
                |_, body| {
                    assert_eq!(body["metadata"]["resourceVersion"], "21");
                    assert_eq!(body["spec"]["holderIdentity"], "pod-a");
                    assert_eq!(body["spec"]["leaseTransitions"], 5);
                },
            ),
            // our own clean shutdown hands it over the same way
            get(lease_json("pod-a", 0, "22")),
            expect(
                Method::PUT,
                format!("{LEASE}/kvm-operator-leader"),
                |_, body| {
                    assert_eq!(body["metadata"]["resourceVersion"], "22");
                    assert!(body["spec"]["holderIdentity"].is_null(), "{body}");
                },
            ),
            // a Lease someone else took meanwhile is not ours to release: read, not written
            get(lease_json("pod-c", 0, "23")),
        ],
    ));
    let mut standby_ready = 0;
    let started = std::time::Instant::now();
    acquire(&api, "pod-a", &timing, || standby_ready += 1)
        .await
        .unwrap();
    assert_eq!(
        standby_ready, 1,
        "ready while a standby (leadership settled)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not after expiry"
    );
    release(&api, "pod-a").await.unwrap();
    release(&api, "pod-a").await.unwrap();
    server.await.unwrap();
}

/// A buffer the JSON log subscriber writes to.
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn lines(&self) -> Vec<Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }
}

#[tokio::test]
async fn json_log_lines_about_an_object_carry_its_kind_namespace_name_and_node() {
    let logs = LogBuf::default();
    let sink = logs.clone();
    let _guard = tracing::subscriber::set_default(kvm_operator::telemetry::json_subscriber(
        tracing_subscriber::EnvFilter::new("info"),
        move || sink.clone(),
    ));
    // a node becomes Ready (an Event, logged too)
    let dir = tempfile::tempdir().unwrap();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let node = test_node(json!({}));
    let ctx = context(svc, vec![node.clone()], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/kvmnodes/n1/status",
                "kvm-operator-kvmnode",
                &node,
                |_| {},
            ),
            event("default", "Ready", "Normal"),
        ],
    ));
    controller::kvm_node::reconcile(Arc::new(node), ctx)
        .await
        .unwrap();
    server.await.unwrap();
    // a VM with an invalid spec, bound to n1 by its status
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "prod", "uid": "vm-uid", "generation": 2,
                     "finalizers": ["kvm-operator.io/cleanup"]},
        "spec": {"vcpus": 0, "memory": "1Gi"},
        "status": {"node": "n1"},
    }));
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            status_patch(
                "/apis/kvm-operator.io/v1alpha1/namespaces/prod/virtualmachines/web/status",
                "kvm-operator-virtualmachine",
                &vm,
                |_| {},
            ),
            event("prod", "InvalidSpec", "Warning"),
        ],
    ));
    controller::virtual_machine::reconcile(Arc::new(vm), ctx)
        .await
        .unwrap();
    server.await.unwrap();

    let lines = logs.lines();
    let about = |reason: &str| {
        lines
            .iter()
            .find(|l| l["reason"] == reason)
            .unwrap_or_else(|| panic!("no {reason} line in {lines:#?}"))
            .clone()
    };
    let ready = about("Ready");
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["kind"], "KvmNode");
    assert_eq!(ready["name"], "n1");
    assert_eq!(ready["node"], "n1");
    assert!(ready.get("namespace").is_none(), "cluster-scoped: {ready}");
    assert!(
        ready["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let invalid = about("InvalidSpec");
    assert_eq!(invalid["level"], "WARN");
    assert_eq!(invalid["kind"], "VirtualMachine");
    assert_eq!(invalid["namespace"], "prod");
    assert_eq!(invalid["name"], "web");
    assert_eq!(invalid["node"], "n1");
    assert!(
        invalid["message"].as_str().unwrap().contains("spec.vcpus"),
        "{invalid}"
    );
    // every line logged inside a reconcile names its object
    for l in &lines {
        if l.get("reason").is_some() {
            assert!(l.get("kind").is_some() && l.get("name").is_some(), "{l}");
        }
    }
}

#[tokio::test]
async fn a_definition_is_copied_to_a_configmap_owned_by_the_vm_once_per_change() {
    use kvm_operator::controller::backup::{keep, sha256_hex};
    let dir = tempfile::tempdir().unwrap();
    // the test driver's own domain "test" stands for the VM's domain on n1
    let vm: VirtualMachine = from_json(json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "prod", "uid": "vm-uid", "generation": 1},
        "spec": {"vcpus": 1, "memory": "64Mi"},
        "status": {"node": "n1", "domainName": "test", "definition": {"sha256": "changed"}},
    }));
    let cm = "/api/v1/namespaces/prod/configmaps/web-domain-definition";
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![test_node(json!({}))], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            not_found(Method::GET, cm),
            expect(Method::PATCH, cm, |q, body| {
                assert!(q.contains("fieldManager=kvm-operator-backup"), "{q}");
                let xml = body["data"]["domain.xml"].as_str().unwrap();
                assert!(xml.contains("<name>test</name>"), "{xml}");
                let md = &body["metadata"];
                assert_eq!(md["labels"]["kvm-operator.io/definition-of"], "web");
                assert_eq!(md["annotations"]["kvm-operator.io/node"], "n1");
                assert_eq!(
                    md["annotations"]["kvm-operator.io/sha256"],
                    sha256_hex(xml.as_bytes())
                );
                // owned by the VM (garbage-collected with it), never blocking its deletion
                let o = &md["ownerReferences"][0];
                assert_eq!(
                    (o["kind"].as_str(), o["uid"].as_str()),
                    (Some("VirtualMachine"), Some("vm-uid"))
                );
                assert_eq!(o["blockOwnerDeletion"], false);
            }),
        ],
    ));
    let mut status = vm.status.clone().unwrap();
    let note = keep(&vm, &mut status, ctx.hv.as_ref(), &ctx.client, None)
        .await
        .unwrap();
    assert_eq!(note.reason, "DefinitionBackedUp");
    let def = status.definition.clone().unwrap();
    assert_eq!(
        def.backup.as_deref(),
        Some("ConfigMap prod/web-domain-definition")
    );
    assert_eq!(def.backup_sha256.as_deref(), Some(def.sha256.as_str()));
    assert!(def.backup_time.is_some());
    // the same definition again: nothing is written (serve fails on any further request)
    assert!(
        keep(&vm, &mut status, ctx.hv.as_ref(), &ctx.client, None)
            .await
            .is_none()
    );
    server.await.unwrap();

    // a ConfigMap of that name that is not ours is left alone and the Event says why
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![test_node(json!({}))], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![Expect {
            reply: Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "web-domain-definition", "namespace": "prod"},
                "data": {"domain.xml": "mine"}})),
            ..expect(Method::GET, cm, |_, _| {})
        }],
    ));
    let mut status = vm.status.clone().unwrap();
    let note = keep(&vm, &mut status, ctx.hv.as_ref(), &ctx.client, None)
        .await
        .unwrap();
    assert_eq!(note.reason, "BackupFailed");
    assert!(
        note.message.contains("is not the operator's backup"),
        "{}",
        note.message
    );
    assert!(status.definition.unwrap().backup.is_none());
    server.await.unwrap();

    // the definition the reconcile read is kept as it is when it is the one the status names:
    // no second read from the node (this VM's node is unknown to the pool, a read would fail);
    // another text is not taken for it
    let carried = "<domain><name>carried</name></domain>";
    let mut vm = vm.clone();
    let st = vm.status.as_mut().unwrap();
    st.node = Some("unknown-node".into());
    st.definition.as_mut().unwrap().sha256 = sha256_hex(carried.as_bytes());
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(svc, vec![test_node(json!({}))], vec![], vec![], dir.path());
    let server = tokio::spawn(serve(
        handle,
        vec![
            not_found(Method::GET, cm),
            expect(Method::PATCH, cm, move |_, body| {
                assert_eq!(body["data"]["domain.xml"].as_str(), Some(carried));
            }),
        ],
    ));
    let mut status = vm.status.clone().unwrap();
    let other = keep(
        &vm,
        &mut status,
        ctx.hv.as_ref(),
        &ctx.client,
        Some("<domain><name>other</name></domain>"),
    )
    .await
    .unwrap();
    assert_eq!(other.reason, "BackupFailed", "{}", other.message);
    let note = keep(
        &vm,
        &mut status,
        ctx.hv.as_ref(),
        &ctx.client,
        Some(carried),
    )
    .await
    .unwrap();
    assert_eq!(note.reason, "DefinitionBackedUp", "{}", note.message);
    assert_eq!(
        status.definition.unwrap().backup_sha256,
        Some(sha256_hex(carried.as_bytes()))
    );
    server.await.unwrap();
}
