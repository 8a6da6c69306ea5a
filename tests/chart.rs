//! The Helm chart rendered and linted by the real Helm v4 library (PyPI `helm-python-sdk`,
//! through tests/helm/render.py), and the rendered objects checked.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Rendered {
    report: Value,
    objects: BTreeMap<String, Value>,
}

fn render(values: Value) -> Rendered {
    let out = std::process::Command::new("python3")
        .arg(root().join("tests/helm/render.py"))
        .arg(root().join("charts/kvm-operator"))
        .arg(values.to_string())
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "render.py failed (is helm-python-sdk installed? hack/lab.sh install): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let mut objects = BTreeMap::new();
    if let Some(files) = report.get("rendered").and_then(|r| r.as_object()) {
        for (name, text) in files {
            if !name.ends_with(".yaml") {
                continue;
            }
            let docs: Vec<Value> = serde_saphyr::from_multiple(text.as_str().unwrap_or(""))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for d in docs.into_iter().filter(|d| !d.is_null()) {
                let key = format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["metadata"]["name"].as_str().unwrap_or("?")
                );
                objects.insert(key, d);
            }
        }
    }
    Rendered { report, objects }
}

/// The strings of a JSON list (e.g. an RBAC rule's verbs).
fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect()
}

fn get<'a>(r: &'a Rendered, key: &str) -> &'a Value {
    r.objects.get(key).unwrap_or_else(|| {
        panic!(
            "{key} not rendered; have {:?}",
            r.objects.keys().collect::<Vec<_>>()
        )
    })
}

#[test]
fn chart_lints_clean_and_ships_the_generated_crds() {
    let r = render(json!({}));
    let lint = &r.report["lint"];
    let problems: Vec<&Value> = lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_u64().unwrap_or(0) >= 2)
        .collect();
    assert!(problems.is_empty(), "helm lint --strict: {problems:?}");
    assert!(
        lint["errors"].as_array().is_none_or(|e| e.is_empty()),
        "{lint}"
    );
    let crds: Vec<&str> = r.report["crds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(
        crds,
        [
            "crds/kvmnodes.kvm-operator.io.yaml",
            "crds/migrations.kvm-operator.io.yaml",
            "crds/storagepools.kvm-operator.io.yaml",
            "crds/virtualmachines.kvm-operator.io.yaml"
        ]
    );
}

#[test]
fn deployment_runs_the_operator_non_root_with_probes() {
    let r =
        render(json!({"image": {"repository": "registry.example/kvm-operator", "tag": "1.2.3"}}));
    let d = get(&r, "Deployment/kvm-kvm-operator");
    assert_eq!(d["metadata"]["namespace"], "kvm-system");
    assert_eq!(
        d["spec"]["strategy"]["type"], "Recreate",
        "never two active operators in a rollout"
    );
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "kvm-kvm-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/kvm-operator:1.2.3");
    assert_eq!(c["args"][0], "run");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(
        c["securityContext"]
            .get("privileged")
            .is_none_or(|p| p == false)
    );
    // the probes' port is the one the binary is told to listen on
    let port = c["ports"][0]["containerPort"].as_u64().unwrap_or(0);
    assert!(
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a.as_str() == Some(&format!("0.0.0.0:{port}")))
    );
    // default tag is the chart's appVersion
    let r = render(json!({}));
    let chart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("charts/kvm-operator/Chart.yaml")).unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let image = get(&r, "Deployment/kvm-kvm-operator")["spec"]["template"]["spec"]["containers"][0]
        ["image"]
        .clone();
    assert!(
        image
            .as_str()
            .unwrap_or("")
            .ends_with(&format!(":{}", chart["appVersion"].as_str().unwrap_or("?")))
    );
    let svc = get(&r, "Service/kvm-kvm-operator-metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(port));
}

#[test]
fn rbac_is_least_privilege() {
    let r = render(json!({}));
    let cr = get(&r, "ClusterRole/kvm-kvm-operator");
    for rule in cr["rules"].as_array().into_iter().flatten() {
        let verbs: Vec<&str> = strs(&rule["verbs"]);
        let resources: Vec<&str> = strs(&rule["resources"]);
        for bad in [
            "*",
            "delete",
            "deletecollection",
            "escalate",
            "bind",
            "impersonate",
        ] {
            assert!(!verbs.contains(&bad), "ClusterRole grants {bad}: {rule}");
        }
        assert!(
            !resources.contains(&"*") && !resources.contains(&"secrets"),
            "{rule}"
        );
        if resources.contains(&"customresourcedefinitions") {
            assert_eq!(verbs, ["get"]);
            assert_eq!(rule["resourceNames"].as_array().map(|a| a.len()), Some(4));
        }
        if verbs.contains(&"create") && rule["apiGroups"][0] == "kvm-operator.io" {
            assert_eq!(
                resources,
                ["migrations"],
                "the operator creates only Migrations"
            );
        }
    }
    let role = get(&r, "Role/kvm-kvm-operator");
    assert_eq!(role["metadata"]["namespace"], "kvm-system");
    let secrets = role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["resources"][0] == "secrets")
        .unwrap_or_else(|| panic!());
    assert_eq!(
        secrets["verbs"],
        json!(["get"]),
        "secrets are fetched by name, never listed or watched"
    );
    assert!(secrets.get("resourceNames").is_none());
    // restricted to named Secrets when told
    let r = render(json!({"nodeCredentialSecrets": ["hv1-ssh", "hv2-ssh"]}));
    let role = get(&r, "Role/kvm-kvm-operator");
    let secrets = role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["resources"][0] == "secrets")
        .unwrap_or_else(|| panic!());
    assert_eq!(secrets["resourceNames"], json!(["hv1-ssh", "hv2-ssh"]));
    let binding = get(&r, "ClusterRoleBinding/kvm-kvm-operator");
    assert_eq!(binding["subjects"][0]["namespace"], "kvm-system");
}

#[test]
fn every_rbac_rule_is_commented_in_the_templates() {
    for f in ["clusterrole.yaml", "role.yaml"] {
        let text = std::fs::read_to_string(root().join("charts/kvm-operator/templates").join(f))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut rules = 0;
        for (i, l) in lines.iter().enumerate() {
            if l.trim_start().starts_with("- apiGroups:") {
                rules += 1;
                assert!(
                    i > 0 && lines[i - 1].trim_start().starts_with('#'),
                    "{f}: rule at line {} has no comment",
                    i + 1
                );
            }
        }
        assert!(rules > 0, "{f}: no rules");
    }
}

#[test]
fn values_schema_refuses_bad_values_naming_the_key() {
    for (values, key) in [
        (json!({"replicas": -1}), "/replicas"),
        (
            json!({"image": {"repository": "x", "pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (
            json!({"nodeCredentialSecrets": ["Bad_Name"]}),
            "/nodeCredentialSecrets/0",
        ),
        (json!({"metrics": {"port": 80}}), "/metrics/port"),
        (json!({"replica": 2}), "replica"),
    ] {
        let r = render(values.clone());
        let err = r.report["schema_error"]
            .as_str()
            .unwrap_or_else(|| panic!("{values} accepted"));
        assert!(err.contains(key), "{values}: {err}");
    }
}

#[test]
fn cloud_init_secrets_are_readable_only_in_the_namespaces_listed() {
    let r = render(json!({}));
    assert!(
        !r.objects.keys().any(|k| k.ends_with("-cloud-init")),
        "no access by default"
    );
    let r = render(json!({"cloudInitSecretNamespaces": ["team-a"]}));
    let role = get(&r, "Role/kvm-kvm-operator-cloud-init");
    assert_eq!(role["metadata"]["namespace"], "team-a");
    assert_eq!(role["rules"][0]["resources"], json!(["secrets"]));
    assert_eq!(role["rules"][0]["verbs"], json!(["get"]));
    let rb = get(&r, "RoleBinding/kvm-kvm-operator-cloud-init");
    assert_eq!(rb["metadata"]["namespace"], "team-a");
    assert_eq!(rb["subjects"][0]["namespace"], "kvm-system");
    // the state directory the chart mounts is the one the operator uses
    let c = &get(&r, "Deployment/kvm-kvm-operator")["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<&Value> = c["env"].as_array().into_iter().flatten().collect();
    let dir = env
        .iter()
        .find(|e| e["name"] == "KVM_OPERATOR_STATE_DIR")
        .map(|e| e["value"].clone());
    assert_eq!(dir, Some(c["volumeMounts"][0]["mountPath"].clone()));
    assert!(env.iter().any(|e| e["name"] == "POD_NAME"));
}

#[test]
fn the_config_values_reach_the_operator_as_a_file_it_accepts() {
    use kvm_operator::controller::Config;
    use kvm_operator::controller::config::RebalanceMode;
    let config = json!({
        "placement": {"weights": {"cpu": 500, "failurePenalty": 0}},
        "migrations": {"maxPerNode": 1, "maxTotal": 4},
        "rebalance": {"enabled": true, "mode": "Migrate", "threshold": 90, "intervalSeconds": 300},
        "resync": {"nodeSeconds": 60},
    });
    let r = render(json!({ "config": config }));
    let cm = get(&r, "ConfigMap/kvm-kvm-operator-config");
    let file = cm["data"]["config.yaml"].as_str().unwrap_or("");
    // the operator parses what the chart renders, with the values given
    let c = Config::default()
        .with_yaml("config.yaml", file)
        .unwrap_or_else(|e| panic!("{e}\n{file}"));
    assert_eq!(c.weights.cpu, 500.0);
    assert_eq!(c.weights.failure_penalty, 0.0);
    assert_eq!((c.max_migrations_per_node, c.max_migrations), (1, 4));
    assert!(c.rebalance.enabled);
    assert_eq!(c.rebalance.mode, RebalanceMode::Migrate);
    assert_eq!(c.node_resync, std::time::Duration::from_secs(60));
    // mounted where the env var points, and a change rolls the pod
    let d = get(&r, "Deployment/kvm-kvm-operator");
    let pod = &d["spec"]["template"];
    let c0 = &pod["spec"]["containers"][0];
    let path = c0["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "KVM_OPERATOR_CONFIG")
        .and_then(|e| e["value"].as_str())
        .unwrap_or("")
        .to_string();
    let mount = c0["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "config")
        .unwrap_or_else(|| panic!("no config mount"));
    assert_eq!(
        path,
        format!("{}/config.yaml", mount["mountPath"].as_str().unwrap_or("?"))
    );
    assert_eq!(mount["readOnly"], true);
    let vol = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "config")
        .unwrap_or_else(|| panic!("no config volume"));
    assert_eq!(vol["configMap"]["name"], "kvm-kvm-operator-config");
    let sum = |r: &Rendered| {
        get(r, "Deployment/kvm-kvm-operator")["spec"]["template"]["metadata"]["annotations"]
            ["kvm-operator.io/config-sha256"]
            .clone()
    };
    let defaults = render(json!({}));
    assert_ne!(sum(&r), sum(&defaults));
    assert!(sum(&defaults).as_str().is_some_and(|s| s.len() == 64));
    // the default file is valid and keeps every default
    let file = get(&defaults, "ConfigMap/kvm-kvm-operator-config")["data"]["config.yaml"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let c = Config::default()
        .with_yaml("config.yaml", &file)
        .unwrap_or_else(|e| panic!("{e}\n{file}"));
    assert_eq!(c.weights, Config::default().weights);
    // the schema refuses what the operator would refuse, naming the key
    for (values, key) in [
        (
            json!({"config": {"placement": {"weights": {"cpu": -1}}}}),
            "/config/placement/weights/cpu",
        ),
        (
            json!({"config": {"migrations": {"maxTotal": 0}}}),
            "/config/migrations/maxTotal",
        ),
        (
            json!({"config": {"rebalance": {"mode": "Always"}}}),
            "/config/rebalance/mode",
        ),
        (json!({"config": {"rebalanse": {}}}), "rebalanse"),
    ] {
        let r = render(values.clone());
        let err = r.report["schema_error"]
            .as_str()
            .unwrap_or_else(|| panic!("{values} accepted"));
        assert!(err.contains(key), "{values}: {err}");
    }
}
