//! The chart's Argo CD health check (charts/kvm-operator/argocd/health.lua) run by a real Lua
//! 5.4 interpreter (Debian's `lua5.4`, installed by the test command) against sample objects of
//! the four kinds, as Argo CD runs it: the object as the global `obj`, the script's return value
//! as the health.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

/// A JSON value as a Lua table constructor (what Argo CD hands the script).
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `(status, message)` of the health script for `obj`.
fn health(obj: Value) -> (String, String) {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("charts/kvm-operator/argocd/health.lua"),
    )
    .unwrap();
    let program = format!(
        "obj = {}\nlocal function check()\n{script}\nend\nlocal hs = check()\nio.write(hs.status, \"\\t\", hs.message or \"\")\n",
        lua(&obj)
    );
    let out = std::process::Command::new("lua5.4")
        .args(["-e", &program])
        .output()
        .unwrap_or_else(|e| panic!("lua5.4 (hack/lab.sh install installs it): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (s, m) = text.split_once('\t').unwrap();
    (s.to_string(), m.to_string())
}

fn ready(status: &str, reason: &str, message: &str) -> Value {
    json!({"type": "Ready", "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn object(kind: &str, generation: i64, status: Value) -> Value {
    json!({"apiVersion": "kvm-operator.io/v1alpha1", "kind": kind,
           "metadata": {"name": "x", "generation": generation}, "status": status})
}

#[test]
fn every_kind_gets_the_health_its_status_says() {
    let cases = [
        // not yet seen by the operator, or an older generation
        (
            json!({"apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "x", "generation": 1}}),
            "Progressing",
            "Waiting for the operator",
        ),
        (
            object(
                "VirtualMachine",
                3,
                json!({"observedGeneration": 2, "conditions": [ready("True", "Ready", "fine")]}),
            ),
            "Progressing",
            "generation 3",
        ),
        // VirtualMachine
        (
            object(
                "VirtualMachine",
                2,
                json!({"observedGeneration": 2, "powerState": "Running", "conditions": [ready("True", "Ready", "Running on KvmNode hv1")]}),
            ),
            "Healthy",
            "Running on KvmNode hv1",
        ),
        (
            object(
                "VirtualMachine",
                2,
                json!({"observedGeneration": 2, "powerState": "Stopped", "conditions": [ready("True", "Ready", "Stopped as asked")]}),
            ),
            "Suspended",
            "Stopped as asked",
        ),
        (
            object(
                "VirtualMachine",
                2,
                json!({"observedGeneration": 2, "conditions": [ready("False", "Reconciling", "Pending; spec.runStrategy is Running")]}),
            ),
            "Progressing",
            "Reconciling",
        ),
        (
            object(
                "VirtualMachine",
                2,
                json!({"observedGeneration": 2, "conditions": [ready("False", "Unschedulable", "no node fits: hv1: needs 8 vCPUs")]}),
            ),
            "Degraded",
            "Unschedulable: no node fits",
        ),
        (
            object(
                "VirtualMachine",
                2,
                json!({"observedGeneration": 2, "conditions": [ready("False", "InvalidSpec", "spec.memory: must be at least 1Mi")]}),
            ),
            "Degraded",
            "spec.memory",
        ),
        // KvmNode
        (
            object(
                "KvmNode",
                1,
                json!({"observedGeneration": 1, "conditions": [ready("True", "Ready", "libvirt answers")]}),
            ),
            "Healthy",
            "libvirt answers",
        ),
        (
            object(
                "KvmNode",
                1,
                json!({"observedGeneration": 1, "conditions": [ready("True", "Ready", "ok"), {"type": "Schedulable", "status": "False", "reason": "Maintenance", "message": "spec.maintenance is true", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            ),
            "Suspended",
            "Maintenance",
        ),
        (
            object(
                "KvmNode",
                1,
                json!({"observedGeneration": 1, "conditions": [ready("False", "HostKeyMismatch", "expected SHA256:a, got SHA256:b")]}),
            ),
            "Degraded",
            "HostKeyMismatch",
        ),
        // StoragePool
        (
            object(
                "StoragePool",
                1,
                json!({"observedGeneration": 1, "conditions": [ready("True", "Ready", "running on 2 of 2 node(s)")]}),
            ),
            "Healthy",
            "2 of 2",
        ),
        (
            object(
                "StoragePool",
                1,
                json!({"observedGeneration": 1, "conditions": [ready("False", "Pending", "running on 0 of 1")]}),
            ),
            "Progressing",
            "Pending",
        ),
        // Migration
        (
            object(
                "Migration",
                1,
                json!({"observedGeneration": 1, "phase": "Running", "progress": {"percent": "42%"}}),
            ),
            "Progressing",
            "Running 42%",
        ),
        (
            object(
                "Migration",
                1,
                json!({"observedGeneration": 1, "phase": "Succeeded", "targetNode": "hv2"}),
            ),
            "Healthy",
            "Moved to hv2",
        ),
        (
            object(
                "Migration",
                1,
                json!({"observedGeneration": 1, "phase": "Failed", "message": "stays on hv1: timeout"}),
            ),
            "Degraded",
            "stays on hv1",
        ),
    ];
    for (obj, want, says) in cases {
        let (got, message) = health(obj.clone());
        assert_eq!(got, want, "{obj}: {message}");
        assert!(
            message.contains(says),
            "{obj}: {message:?} should say {says:?}"
        );
    }
}

#[test]
fn statuses_the_operator_writes_are_read_right() {
    // a status as the VM controller computes it (serialised from our own types)
    let st = kvm_operator::api::VirtualMachineStatus {
        observed_generation: Some(4),
        power_state: Some(kvm_operator::api::virtual_machine::PowerState::Running),
        conditions: vec![kvm_operator::api::condition::condition(
            "Ready",
            true,
            "Ready",
            "Running on KvmNode hv1".to_string(),
            Some(4),
            kvm_operator::controller::now(),
        )],
        ..Default::default()
    };
    let obj = object("VirtualMachine", 4, serde_json::to_value(st).unwrap());
    assert_eq!(health(obj).0, "Healthy");
}

/// Argo CD's health and Flux's kstatus (the Reconciling and Stalled conditions the operator
/// writes) tell the same story: Degraded exactly when Stalled, Progressing when Reconciling.
#[test]
fn argo_cd_health_and_kstatus_agree_on_every_reason() {
    use kvm_operator::api::condition::{PROGRESSING_REASONS, find, summarize};
    use kvm_operator::api::migration::MigrationStatus;
    use kvm_operator::api::virtual_machine::VirtualMachineStatus;
    let now = kvm_operator::controller::now();
    let mut reasons: Vec<&str> = PROGRESSING_REASONS.to_vec();
    reasons.extend([
        "InvalidSpec",
        "HostUnreachable",
        "Unschedulable",
        "SecretNotFound",
        "DomainOwnedElsewhere",
        "PoolNotFound",
        "NotProvisioned",
    ]);
    let kstatus = |conds: &[kvm_operator::api::condition::Condition]| {
        let t = |ty: &str| find(conds, ty).map(|c| c.status.clone()).unwrap();
        (t("Reconciling"), t("Stalled"))
    };
    for (ok, reason) in reasons
        .iter()
        .map(|r| ("False", *r))
        .chain([("True", "Ready")])
    {
        let mut st: VirtualMachineStatus = serde_json::from_value(json!({
            "observedGeneration": 2, "powerState": "Running",
            "conditions": [ready(ok, reason, "m")]}))
        .unwrap();
        summarize(&mut st, now.clone());
        let (argo, _) = health(object(
            "VirtualMachine",
            2,
            serde_json::to_value(&st).unwrap(),
        ));
        let want = match kstatus(&st.conditions) {
            (r, s) if r == "True" && s == "False" => "Progressing",
            (r, s) if r == "False" && s == "True" => "Degraded",
            (r, s) if r == "False" && s == "False" => "Healthy",
            other => panic!("{reason}: both set {other:?}"),
        };
        assert_eq!(argo, want, "Ready={ok} reason {reason}");
    }
    for phase in [
        "Pending",
        "Scheduling",
        "Running",
        "Succeeded",
        "Failed",
        "Cancelled",
    ] {
        let mut st: MigrationStatus = serde_json::from_value(json!({
            "observedGeneration": 1, "phase": phase, "message": "m"}))
        .unwrap();
        summarize(&mut st, now.clone());
        let (argo, _) = health(object("Migration", 1, serde_json::to_value(&st).unwrap()));
        let want = match kstatus(&st.conditions) {
            (r, _) if r == "True" => "Progressing",
            (_, s) if s == "True" => "Degraded",
            _ => "Healthy",
        };
        assert_eq!(argo, want, "Migration {phase}");
    }
}
