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

/// The error of a render that must fail (a `fail` in a template), as Helm printed it.
fn render_error(values: Value) -> String {
    let out = std::process::Command::new("python3")
        .arg(root().join("tests/helm/render.py"))
        .arg(root().join("charts/kvm-operator"))
        .arg(values.to_string())
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        !out.status.success(),
        "{values} rendered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("HelmRenderError"), "{values}: {err}");
    err
}

/// Whether every label a selector's `matchLabels` asks for is among `labels`.
fn selects(match_labels: &Value, labels: &Value) -> bool {
    let wanted = match_labels.as_object().into_iter().flatten();
    let mut any = false;
    for (k, v) in wanted {
        any = true;
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    any
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
fn extra_env_reaches_the_operator_after_the_charts_own_and_cannot_replace_them() {
    let r = render(json!({"extraEnv": [
        {"name": "MALLOC_ARENA_MAX", "value": "4"},
        {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
    ]}));
    let env =
        get(&r, "Deployment/kvm-kvm-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
    let names: Vec<&str> = env.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "KVM_OPERATOR_LOG",
            "KVM_OPERATOR_LOG_JSON",
            "POD_NAMESPACE",
            "POD_NAME",
            "KVM_OPERATOR_STATE_DIR",
            "KVM_OPERATOR_CONFIG",
            "MALLOC_ARENA_MAX",
            "HTTPS_PROXY",
        ]
    );
    assert_eq!(env[6]["value"], "4");
    assert_eq!(env[7]["valueFrom"]["secretKeyRef"]["key"], "url");
    assert!(lint_problems(&r).is_empty(), "{:?}", lint_problems(&r));
    // none by default: the container's environment is the chart's own
    let r = render(json!({}));
    let env =
        &get(&r, "Deployment/kvm-kvm-operator")["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env.as_array().map(Vec::len), Some(6));
    // a name the chart sets is refused, naming the entry and the value that sets it
    let err = render_error(json!({"extraEnv": [
        {"name": "RUST_LOG", "value": "debug"},
        {"name": "KVM_OPERATOR_LOG", "value": "debug"},
    ]}));
    assert!(
        err.contains("extraEnv[1] sets KVM_OPERATOR_LOG") && err.contains("logLevel"),
        "{err}"
    );
    let err = render_error(json!({"extraEnv": [{"name": "KVM_OPERATOR_CONFIG", "value": "/x"}]}));
    assert!(
        err.contains("extraEnv[0] sets KVM_OPERATOR_CONFIG"),
        "{err}"
    );
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
        if resources.contains(&"configmaps") {
            // the definition backups: written by server-side apply, never listed or deleted
            assert_eq!(verbs, ["get", "create", "patch"], "{rule}");
            assert_eq!(resources, ["configmaps"]);
        }
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
    // without definition backups, no ConfigMap access at all
    let off = render(json!({"definitionBackup": {"enabled": false}}));
    let rules = get(&off, "ClusterRole/kvm-kvm-operator")["rules"].clone();
    assert!(!rules.to_string().contains("configmaps"), "{rules}");
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
        (json!({"logLevel": ""}), "/logLevel"),
        (json!({"logJson": "yes"}), "/logJson"),
        (json!({"resources": {"limit": {}}}), "limit"),
        (
            json!({"resources": {"requests": {"cpu": true}}}),
            "/resources/requests/cpu",
        ),
        (
            json!({"leaderElection": {"leaseSeconds": 1}}),
            "/leaderElection/leaseSeconds",
        ),
        (
            json!({"leaderElection": {"retrySeconds": 61}}),
            "/leaderElection/retrySeconds",
        ),
        (json!({"leaderElection": {"lease": 15}}), "lease"),
        (
            json!({"metrics": {"serviceMonitor": {"interval": "30"}}}),
            "/metrics/serviceMonitor/interval",
        ),
        (
            json!({"metrics": {"serviceMonitor": {"scrapeTimeout": "ten"}}}),
            "/metrics/serviceMonitor/scrapeTimeout",
        ),
        (
            json!({"metrics": {"serviceMonitor": {"labels": {"release": 1}}}}),
            "/metrics/serviceMonitor/labels/release",
        ),
        (
            json!({"metrics": {"serviceMonitor": {"enable": true}}}),
            "enable",
        ),
        (
            json!({"podDisruptionBudget": {"maxUnavailable": 0}}),
            "/podDisruptionBudget/maxUnavailable",
        ),
        (
            json!({"podDisruptionBudget": {"minAvailable": "100%"}}),
            "/podDisruptionBudget/minAvailable",
        ),
        (
            json!({"podDisruptionBudget": {"enabled": "true"}}),
            "/podDisruptionBudget/enabled",
        ),
        (
            json!({"networkPolicy": {"egress": {"hypervisors": {"cidrs": ["hv1.example.org"]}}}}),
            "/networkPolicy/egress/hypervisors/cidrs/0",
        ),
        (
            json!({"networkPolicy": {"egress": {"hypervisors": {"ports": [70000]}}}}),
            "/networkPolicy/egress/hypervisors/ports/0",
        ),
        (
            json!({"networkPolicy": {"egress": {"apiServer": {"cidrs": ["10.0.0.1"]}}}}),
            "/networkPolicy/egress/apiServer/cidrs/0",
        ),
        (
            json!({"networkPolicy": {"egress": {"dns": {"enabled": 1}}}}),
            "/networkPolicy/egress/dns/enabled",
        ),
        (
            json!({"networkPolicy": {"ingress": {"from": [{"namespaceSelektor": {}}]}}}),
            "namespaceSelektor",
        ),
        (json!({"networkPolicy": {"egres": {}}}), "egres"),
        (
            json!({"grafanaDashboard": {"namespace": "Monitoring"}}),
            "/grafanaDashboard/namespace",
        ),
        (
            json!({"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}),
            "/grafanaDashboard/labels/grafana_dashboard",
        ),
        (json!({"extraEnv": [{"value": "4"}]}), "/extraEnv/0"),
        (
            json!({"extraEnv": [{"name": "MALLOC_ARENA_MAX", "value": 4}]}),
            "/extraEnv/0/value",
        ),
        (
            json!({"extraEnv": [{"name": "A B", "value": "x"}]}),
            "/extraEnv/0/name",
        ),
        (json!({"extraEnv": [{"name": "X", "valu": "1"}]}), "valu"),
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
    assert!(c.definition_backup, "on by default");
    let off = render(json!({"definitionBackup": {"enabled": false}}));
    let file_off = get(&off, "ConfigMap/kvm-kvm-operator-config")["data"]["config.yaml"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let c_off = Config::default()
        .with_yaml("config.yaml", &file_off)
        .unwrap_or_else(|e| panic!("{e}\n{file_off}"));
    assert!(!c_off.definition_backup, "{file_off}");
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

/// A NetworkPolicy rule's (port, protocol) pairs.
type Ports = Vec<(u64, String)>;

/// Everything optional switched on, with peers and addresses as an installation would set them.
fn everything_enabled() -> Value {
    json!({
        "replicas": 2,
        "extraEnv": [{"name": "MALLOC_ARENA_MAX", "value": "2"}],
        "metrics": {"serviceMonitor": {"enabled": true, "interval": "1m", "scrapeTimeout": "15s",
                                       "labels": {"release": "prometheus"}}},
        "podDisruptionBudget": {"enabled": true},
        "networkPolicy": {
            "enabled": true,
            "ingress": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
            "egress": {
                "apiServer": {"cidrs": ["10.0.0.10/32"], "ports": [6443]},
                "dns": {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]},
                "hypervisors": {"cidrs": ["192.0.2.0/24", "2001:db8::/64"], "ports": [22, 2222, 16514]},
                "extra": [{"to": [{"ipBlock": {"cidr": "198.51.100.8/32"}}], "ports": [{"port": 3128, "protocol": "TCP"}]}],
            },
        },
        "grafanaDashboard": {"enabled": true, "namespace": "monitoring", "annotations": {"grafana_folder": "KVM"}},
        "leaderElection": {"leaseSeconds": 30, "renewSeconds": 10, "retrySeconds": 4},
        "nodeCredentialSecrets": ["hv1-ssh"],
        "cloudInitSecretNamespaces": ["team-a"],
    })
}

fn lint_problems(r: &Rendered) -> Vec<Value> {
    let lint = &r.report["lint"];
    let mut problems: Vec<Value> = lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_u64().unwrap_or(0) >= 2)
        .cloned()
        .collect();
    problems.extend(lint["errors"].as_array().into_iter().flatten().cloned());
    problems
}

#[test]
fn chart_lints_clean_with_every_option_enabled() {
    let r = render(everything_enabled());
    assert_eq!(r.report["schema_error"], Value::Null);
    assert!(
        lint_problems(&r).is_empty(),
        "helm lint --strict: {:?}",
        lint_problems(&r)
    );
    for key in [
        "ServiceMonitor/kvm-kvm-operator",
        "PodDisruptionBudget/kvm-kvm-operator",
        "NetworkPolicy/kvm-kvm-operator",
        "ConfigMap/kvm-kvm-operator-dashboard",
    ] {
        get(&r, key);
    }
}

#[test]
fn optional_objects_render_only_when_enabled() {
    let r = render(json!({}));
    for kind in ["ServiceMonitor/", "PodDisruptionBudget/", "NetworkPolicy/"] {
        assert!(
            !r.objects.keys().any(|k| k.starts_with(kind)),
            "{kind} rendered by default: {:?}",
            r.objects.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        !r.objects
            .contains_key("ConfigMap/kvm-kvm-operator-dashboard")
    );
    // the values' own `enabled: false` (not only a missing key) keeps them out
    let mut off = everything_enabled();
    off["metrics"]["serviceMonitor"]["enabled"] = json!(false);
    off["podDisruptionBudget"]["enabled"] = json!(false);
    off["networkPolicy"]["enabled"] = json!(false);
    off["grafanaDashboard"]["enabled"] = json!(false);
    let r = render(off);
    assert!(
        !r.objects.keys().any(|k| k.starts_with("ServiceMonitor/")
            || k.starts_with("PodDisruptionBudget/")
            || k.starts_with("NetworkPolicy/")
            || k.ends_with("-dashboard")),
        "{:?}",
        r.objects.keys().collect::<Vec<_>>()
    );
}

#[test]
fn service_monitor_scrapes_the_metrics_service_on_its_http_port() {
    let r = render(everything_enabled());
    let sm = get(&r, "ServiceMonitor/kvm-kvm-operator");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["namespace"], "kvm-system");
    assert_eq!(
        sm["metadata"]["labels"]["release"], "prometheus",
        "extra labels for the Prometheus's serviceMonitorSelector"
    );
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        json!(["kvm-system"])
    );
    // it selects the metrics Service, and no other Service of the release
    let selector = &sm["spec"]["selector"]["matchLabels"];
    let svc = get(&r, "Service/kvm-kvm-operator-metrics");
    assert!(
        selects(selector, &svc["metadata"]["labels"]),
        "{selector} vs {svc}"
    );
    let services: Vec<&String> = r
        .objects
        .iter()
        .filter(|(k, o)| k.starts_with("Service/") && selects(selector, &o["metadata"]["labels"]))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(services, ["Service/kvm-kvm-operator-metrics"]);
    // the endpoint's port is the Service's port name, which leads to the container's http port
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(sm["spec"]["endpoints"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(
        (ep["interval"].as_str(), ep["scrapeTimeout"].as_str()),
        (Some("1m"), Some("15s"))
    );
    let port = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == ep["port"])
        .unwrap_or_else(|| panic!("no Service port named {}: {svc}", ep["port"]));
    let c = &get(&r, "Deployment/kvm-kvm-operator")["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == port["targetPort"] && p["containerPort"] == port["port"]),
        "{port} vs {}",
        c["ports"]
    );
    // defaults
    let r = render(json!({"metrics": {"serviceMonitor": {"enabled": true}}}));
    let ep = &get(&r, "ServiceMonitor/kvm-kvm-operator")["spec"]["endpoints"][0];
    assert_eq!(
        (ep["interval"].as_str(), ep["scrapeTimeout"].as_str()),
        (Some("30s"), Some("10s"))
    );
    // no Service to scrape: refused, naming both keys
    let err = render_error(
        json!({"metrics": {"serviceMonitor": {"enabled": true}, "service": {"enabled": false}}}),
    );
    assert!(
        err.contains("metrics.serviceMonitor.enabled") && err.contains("metrics.service.enabled"),
        "{err}"
    );
}

#[test]
fn pod_disruption_budget_selects_the_operator_pods_and_never_blocks_a_drain() {
    let r = render(json!({"podDisruptionBudget": {"enabled": true}}));
    let pdb = get(&r, "PodDisruptionBudget/kvm-kvm-operator");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["metadata"]["namespace"], "kvm-system");
    let d = get(&r, "Deployment/kvm-kvm-operator");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        d["spec"]["selector"]["matchLabels"]
    );
    assert!(selects(
        &pdb["spec"]["selector"]["matchLabels"],
        &d["spec"]["template"]["metadata"]["labels"]
    ));
    // default: one pod at a time may go, so a drain with replicas 1 goes through
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"].get("minAvailable").is_none());
    // minAvailable replaces maxUnavailable, when a standby is left
    for (replicas, min) in [(2, json!(1)), (3, json!(2)), (2, json!("50%"))] {
        let r = render(
            json!({"replicas": replicas, "podDisruptionBudget": {"enabled": true, "minAvailable": min}}),
        );
        let spec = &get(&r, "PodDisruptionBudget/kvm-kvm-operator")["spec"];
        assert_eq!(spec["minAvailable"], min);
        assert!(spec.get("maxUnavailable").is_none(), "{spec}");
    }
    // a budget that forbids every eviction is refused, saying why
    for (replicas, min) in [
        (1, json!(1)),
        (2, json!(2)),
        (2, json!("60%")),
        (1, json!("1%")),
    ] {
        let err = render_error(
            json!({"replicas": replicas, "podDisruptionBudget": {"enabled": true, "minAvailable": min}}),
        );
        assert!(
            err.contains("podDisruptionBudget.minAvailable") && err.contains("drain"),
            "{replicas} {min}: {err}"
        );
    }
}

#[test]
fn network_policy_admits_only_the_http_port_and_the_configured_egress() {
    let r = render(everything_enabled());
    let np = get(&r, "NetworkPolicy/kvm-kvm-operator");
    assert_eq!(np["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(np["metadata"]["namespace"], "kvm-system");
    let d = get(&r, "Deployment/kvm-kvm-operator");
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    assert!(
        selects(&np["spec"]["podSelector"]["matchLabels"], pod_labels),
        "{np}"
    );
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    // ingress: the http port only, from the configured peers
    let ingress = np["spec"]["ingress"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let http = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "http")
        .unwrap_or_else(|| panic!("{c}"));
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": http["name"], "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[0]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    );
    // egress: each rule's (port, protocol) pairs and destinations
    let egress = np["spec"]["egress"].as_array().cloned().unwrap_or_default();
    let ports = |rule: &Value| -> Ports {
        rule["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["port"].as_u64().unwrap_or(0),
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                )
            })
            .collect()
    };
    let cidrs = |rule: &Value| -> Vec<String> {
        rule["to"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["ipBlock"]["cidr"].as_str().map(str::to_string))
            .collect()
    };
    let tcp = |ps: &[u64]| -> Ports { ps.iter().map(|p| (*p, "TCP".to_string())).collect() };
    let rules: Vec<(Ports, Vec<String>)> = egress.iter().map(|r| (ports(r), cidrs(r))).collect();
    assert_eq!(
        rules,
        [
            (
                vec![(53, "UDP".to_string()), (53, "TCP".to_string())],
                vec![]
            ),
            (tcp(&[6443]), vec!["10.0.0.10/32".to_string()]),
            (
                tcp(&[22, 2222, 16514]),
                vec!["192.0.2.0/24".to_string(), "2001:db8::/64".to_string()]
            ),
            (tcp(&[3128]), vec!["198.51.100.8/32".to_string()]),
        ]
    );
    assert_eq!(
        egress[0]["to"][0]["podSelector"]["matchLabels"]["k8s-app"],
        "kube-dns"
    );
    // defaults: DNS, the API server on 443 and 6443, SSH and libvirt TLS; no `to` when no
    // addresses are given (any address, on those ports only); ingress from anywhere to http only
    let r = render(json!({"networkPolicy": {"enabled": true}}));
    let np = get(&r, "NetworkPolicy/kvm-kvm-operator");
    assert!(np["spec"]["ingress"][0].get("from").is_none());
    let egress = np["spec"]["egress"].as_array().cloned().unwrap_or_default();
    let rules: Vec<Ports> = egress.iter().map(ports).collect();
    assert_eq!(
        rules,
        [
            vec![(53, "UDP".to_string()), (53, "TCP".to_string())],
            tcp(&[443, 6443]),
            tcp(&[22, 16514]),
        ]
    );
    assert!(egress.iter().all(|r| r.get("to").is_none()), "{egress:?}");
    assert!(
        r.report["rendered"]["kvm-operator/templates/NOTES.txt"]
            .as_str()
            .is_some_and(|n| n.contains("networkPolicy.egress.hypervisors.cidrs")),
        "NOTES warn that the hosts' addresses are not restricted"
    );
    // DNS can be left out (e.g. nodes named by IP address only)
    let r =
        render(json!({"networkPolicy": {"enabled": true, "egress": {"dns": {"enabled": false}}}}));
    let egress = get(&r, "NetworkPolicy/kvm-kvm-operator")["spec"]["egress"].clone();
    assert!(
        egress
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| ports(r).iter().all(|p| p.0 != 53))
    );
}

/// The names the operator exposes, read from src/metrics.rs as text: the registry's prefix, and
/// each `register("name", …)` / `gauge!("name", …)` with the suffixes prometheus-client adds to
/// its kind (`_total` for a counter; `_bucket`, `_sum`, `_count` for a histogram).
fn exported_metric_names() -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap_or_default();
    let literal = |s: &str| -> Option<(String, usize)> {
        // a string literal at the start of `s` (after whitespace), and where it ends
        let start = s.len() - s.trim_start().len();
        let rest = s.get(start..)?.strip_prefix('"')?;
        let end = rest.find('"')?;
        Some((rest[..end].to_string(), start + end + 2))
    };
    // past whitespace and one comma: the next argument of a call
    fn next_arg(s: &str) -> &str {
        let s = s.trim_start();
        s.strip_prefix(',').unwrap_or(s).trim_start()
    }
    let prefix = text
        .split("Registry::with_prefix(")
        .nth(1)
        .and_then(literal)
        .map(|(p, _)| p)
        .unwrap_or_else(|| panic!("no Registry::with_prefix in src/metrics.rs"));
    let mut names = std::collections::BTreeSet::new();
    for (marker, gauge) in [("register(", false), ("gauge!(", true)] {
        for after in text.split(marker).skip(1) {
            // `register($name, …)` inside the macro is not a registration
            let Some((name, end)) = literal(after) else {
                continue;
            };
            let kind = if gauge {
                "gauge"
            } else {
                // register("name", "help", var.clone()): the kind is in `let var … ;`
                let args = next_arg(&after[end..]);
                let var: String = literal(args)
                    .map(|(_, e)| {
                        next_arg(&args[e..])
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect()
                    })
                    .unwrap_or_default();
                let decl = text
                    .split(&format!("let {var}"))
                    .skip(1)
                    .find(|d| !var.is_empty() && d.starts_with([' ', ':', '=']))
                    .and_then(|d| d.split(';').next())
                    .unwrap_or("");
                if decl.contains("Histogram") {
                    "histogram"
                } else if decl.contains("Counter") {
                    "counter"
                } else if decl.contains("Gauge") {
                    "gauge"
                } else {
                    panic!("src/metrics.rs: cannot tell the kind of {name} (variable `{var}`)")
                }
            };
            let full = format!("{prefix}_{name}");
            match kind {
                "counter" => {
                    names.insert(format!("{full}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{full}{s}"));
                    }
                }
                _ => {
                    names.insert(full);
                }
            }
        }
    }
    names
}

/// Every `kvm_operator_…` token in a PromQL expression.
fn metric_tokens(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("kvm_operator_") {
        let boundary = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
        let token: String = rest[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        if boundary {
            out.push(token.clone());
        }
        rest = &rest[i + token.len()..];
    }
    out
}

/// The string values under `key` anywhere in `v`.
fn strings_under<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == key {
                    if let Some(s) = x.as_str() {
                        out.push(s);
                    }
                }
                strings_under(x, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_under(x, key, out)),
        _ => {}
    }
}

#[test]
fn the_metric_names_are_read_from_the_source_with_their_kinds() {
    let names = exported_metric_names();
    for n in [
        "kvm_operator_reconciles_total",
        "kvm_operator_reconcile_errors_total",
        "kvm_operator_reconcile_duration_seconds_bucket",
        "kvm_operator_node_ready",
        "kvm_operator_migration_downtime_seconds",
    ] {
        assert!(names.contains(n), "{n} not in {names:?}");
    }
    assert!(!names.contains("kvm_operator_reconciles"));
    assert!(!names.contains("kvm_operator_node_ready_total"));
    assert_eq!(
        metric_tokens("sum(rate(kvm_operator_reconciles_total[5m])) / my_kvm_operator_x"),
        ["kvm_operator_reconciles_total"]
    );
}

#[test]
fn grafana_dashboard_queries_only_metrics_the_operator_exports() {
    let r = render(everything_enabled());
    let cm = get(&r, "ConfigMap/kvm-kvm-operator-dashboard");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "KVM");
    let text = cm["data"]["kvm-operator.json"].as_str().unwrap_or("");
    let file =
        std::fs::read_to_string(root().join("charts/kvm-operator/dashboards/kvm-operator.json"))
            .unwrap_or_default();
    assert_eq!(
        text.trim(),
        file.trim(),
        "the ConfigMap holds the file as is"
    );
    let dash: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON: {e}"));
    // default namespace: the release's
    let r = render(json!({"grafanaDashboard": {"enabled": true}}));
    assert_eq!(
        get(&r, "ConfigMap/kvm-kvm-operator-dashboard")["metadata"]["namespace"],
        "kvm-system"
    );

    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    // a data source variable, and the node and namespace filters
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |n: &str| {
        vars.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no ${n} variable"))
            .clone()
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for n in ["node", "namespace"] {
        assert_eq!(var(n)["type"], "query");
        assert_eq!(var(n)["datasource"]["uid"], "${datasource}");
    }
    // every panel and query reads from $datasource
    let mut uids = Vec::new();
    strings_under(&dash["panels"], "uid", &mut uids);
    assert!(
        !uids.is_empty() && uids.iter().all(|u| *u == "${datasource}"),
        "{uids:?}"
    );
    // panel ids are unique (Grafana keys panels by id)
    let mut ids: Vec<u64> = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        ids.push(
            p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("panel without id: {}", p["title"])),
        );
    }
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate panel ids");

    // every PromQL expression names only metrics the operator exports
    let exported = exported_metric_names();
    let mut exprs = Vec::new();
    strings_under(&dash, "expr", &mut exprs);
    strings_under(&dash["templating"], "definition", &mut exprs);
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let tokens = metric_tokens(e);
        assert!(
            !tokens.is_empty(),
            "an expression without any operator metric: {e}"
        );
        for t in tokens {
            assert!(
                exported.contains(&t),
                "the dashboard queries {t}, which src/metrics.rs does not export (have {exported:?}): {e}"
            );
            used.insert(t);
        }
        for var in ["$node", "$namespace"] {
            if e.contains(var) {
                assert!(
                    e.contains(&format!("=~\"{var}\"")),
                    "{var} is a multi-value regex: {e}"
                );
            }
        }
    }
    // and shows each metric the operator exports (a histogram through its buckets or sum/count)
    let shown = |name: &str| {
        used.contains(name)
            || name
                .strip_suffix("_count")
                .is_some_and(|b| used.contains(&format!("{b}_bucket")))
            || name
                .strip_suffix("_sum")
                .is_some_and(|b| used.contains(&format!("{b}_bucket")))
    };
    let missing: Vec<&String> = exported.iter().filter(|n| !shown(n)).collect();
    assert!(
        missing.is_empty(),
        "no panel of charts/kvm-operator/dashboards/kvm-operator.json shows {missing:?}: add one"
    );
}

#[test]
fn leader_election_values_reach_the_operator_as_a_file_it_accepts() {
    use kvm_operator::controller::Config;
    use kvm_operator::controller::leader::Timing;
    use std::time::Duration;
    let file = |r: &Rendered| {
        get(r, "ConfigMap/kvm-kvm-operator-config")["data"]["config.yaml"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let parse = |file: &str| {
        Config::default()
            .with_yaml("config.yaml", file)
            .unwrap_or_else(|e| panic!("{e}\n{file}"))
    };
    // the chart's defaults are the operator's
    let defaults = render(json!({}));
    assert_eq!(parse(&file(&defaults)).leader, Timing::default());
    // given values, next to the rest of the configuration
    let r = render(json!({
        "leaderElection": {"leaseSeconds": 30, "renewSeconds": 10, "retrySeconds": 4},
        "config": {"migrations": {"maxTotal": 3}},
    }));
    let c = parse(&file(&r));
    assert_eq!(
        c.leader,
        Timing {
            lease: Duration::from_secs(30),
            renew: Duration::from_secs(10),
            retry: Duration::from_secs(4)
        }
    );
    assert_eq!(c.max_migrations, 3);
    // one value alone keeps the others' defaults
    let c = parse(&file(&render(
        json!({"leaderElection": {"retrySeconds": 7}}),
    )));
    assert_eq!(c.leader.retry, Duration::from_secs(7));
    assert_eq!(c.leader.lease, Timing::default().lease);
    // a changed timing rolls the pod (the file is read once)
    let sum = |r: &Rendered| {
        get(r, "Deployment/kvm-kvm-operator")["spec"]["template"]["metadata"]["annotations"]
            ["kvm-operator.io/config-sha256"]
            .clone()
    };
    assert_ne!(sum(&r), sum(&defaults));
    // renewing too close to the lease's end is refused at install, as the operator would at start
    let err = render_error(json!({"leaderElection": {"leaseSeconds": 6, "renewSeconds": 5}}));
    assert!(
        err.contains("leaderElection.renewSeconds") && err.contains("two thirds"),
        "{err}"
    );
    let e = Config::default()
        .with_yaml(
            "c.yaml",
            "leaderElection: {leaseSeconds: 6, renewSeconds: 5}",
        )
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("leaderElection.renewSeconds"), "{e}");
    // the configuration has a single place for it: `config.leaderElection` is refused
    let r = render(json!({"config": {"leaderElection": {"leaseSeconds": 30}}}));
    assert!(
        r.report["schema_error"]
            .as_str()
            .is_some_and(|e| e.contains("leaderElection")),
        "{}",
        r.report["schema_error"]
    );
}

#[test]
fn chart_readme_and_notes_say_how_to_upgrade_the_crds() {
    let readme =
        std::fs::read_to_string(root().join("charts/kvm-operator/README.md")).unwrap_or_default();
    assert!(
        readme.contains("## Upgrading the CRDs"),
        "charts/kvm-operator/README.md"
    );
    assert!(
        readme
            .contains("kubectl apply --server-side --force-conflicts -f charts/kvm-operator/crds/")
    );
    assert!(readme.contains("kvm-operator crd | kubectl apply --server-side"));
    // the subcommand the README names is the binary's
    let main = std::fs::read_to_string(root().join("src/main.rs")).unwrap_or_default();
    assert!(
        main.contains("Crd {"),
        "src/main.rs has no `crd` subcommand"
    );
    let r = render(json!({}));
    let notes = r.report["rendered"]["kvm-operator/templates/NOTES.txt"]
        .as_str()
        .unwrap_or("");
    assert!(
        notes.contains("kubectl apply --server-side --force-conflicts"),
        "{notes}"
    );
    assert!(notes.contains("kvm-operator crd |"), "{notes}");
    // every values key is in the README's table
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("charts/kvm-operator/values.yaml"))
            .unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for key in values.as_object().into_iter().flatten().map(|(k, _)| k) {
        assert!(
            readme.contains(&format!("`{key}")),
            "README's values table lacks {key}"
        );
    }
}
