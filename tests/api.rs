//! The CRDs as a real apiserver would see them, and the YAML users write.
//!
//! No apiserver is available here: these tests check what one would check (structural schemas,
//! CEL rules that compile and evaluate, value constraints) with kube's own CEL validator and a
//! small checker of the OpenAPI value rules our schemas use.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kvm_operator::api;
use kvm_operator::cli::{crd_file_name, crd_yaml};
use kvm_operator::manifest::{self, Object};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap_or_else(|e| panic!("{e}")).path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn generated_crds_match_the_files_in_crds_and_the_chart() {
    for crd in api::crds() {
        let want = crd_yaml(&crd).unwrap_or_else(|e| panic!("{e}"));
        for dir in ["crds", "charts/kvm-operator/crds"] {
            let path = root().join(dir).join(crd_file_name(&crd));
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale: run `cargo run -- crd --dir crds && cargo run -- crd --dir charts/kvm-operator/crds`",
                path.display()
            );
        }
    }
    let files = std::fs::read_dir(root().join("crds"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(files, 4, "crds/ must hold exactly the four generated CRDs");
}

#[test]
fn crd_files_round_trip_through_k8s_openapi() {
    for crd in api::crds() {
        let text = std::fs::read_to_string(root().join("crds").join(crd_file_name(&crd)))
            .unwrap_or_else(|e| panic!("{e}"));
        let parsed: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, crd);
        let v = &parsed.spec.versions[0];
        assert!(v.served && v.storage);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4)
        );
        assert_eq!(parsed.spec.group, "kvm-operator.io");
        assert_eq!(v.name, "v1alpha1");
        assert_eq!(
            parsed.spec.names.categories.as_deref(),
            Some(&["kvm".to_string()][..])
        );
        let shorts = parsed.spec.names.short_names.clone().unwrap_or_default();
        assert!(!shorts.is_empty());
        for s in &shorts {
            assert!(
                !["vm", "vmi", "vmim", "vms"].contains(&s.as_str()),
                "{s} collides with KubeVirt"
            );
        }
        let scope = if parsed.spec.names.kind == "KvmNode" {
            "Cluster"
        } else {
            "Namespaced"
        };
        assert_eq!(parsed.spec.scope, scope);
    }
}

fn schema_of(crd: &CustomResourceDefinition) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap_or_else(|| panic!("no schema")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The structural-schema rules of apiextensions (what the apiserver enforces on a CRD).
fn check_structural(s: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(o) = s.as_object() else {
        errs.push(format!("{path}: schema is not an object"));
        return;
    };
    if o.contains_key("$ref") {
        errs.push(format!("{path}: $ref is not allowed"));
    }
    for k in ["oneOf", "anyOf", "allOf", "not"] {
        if let Some(branches) = o.get(k) {
            let list = branches
                .as_array()
                .cloned()
                .unwrap_or_else(|| vec![branches.clone()]);
            for b in list {
                for forbidden in [
                    "type",
                    "description",
                    "default",
                    "nullable",
                    "additionalProperties",
                ] {
                    if b.get(forbidden).is_some() && o.get("x-kubernetes-int-or-string").is_none() {
                        errs.push(format!("{path}.{k}: {forbidden} inside a junctor"));
                    }
                }
            }
        }
    }
    let free = o.get("x-kubernetes-int-or-string").is_some()
        || o.get("x-kubernetes-preserve-unknown-fields").is_some();
    match o.get("type").and_then(|t| t.as_str()) {
        None if !free => errs.push(format!("{path}: no type")),
        Some("object") => {
            if o.contains_key("properties") && o.contains_key("additionalProperties") {
                errs.push(format!("{path}: both properties and additionalProperties"));
            }
            if let Some(props) = o.get("properties").and_then(|p| p.as_object()) {
                for (k, v) in props {
                    check_structural(v, &format!("{path}.{k}"), errs);
                }
            }
            if let Some(ap) = o.get("additionalProperties").filter(|a| a.is_object()) {
                check_structural(ap, &format!("{path}[*]"), errs);
            }
        }
        Some("array") => match o.get("items") {
            Some(items) => check_structural(items, &format!("{path}[]"), errs),
            None => errs.push(format!("{path}: array without items")),
        },
        _ => {}
    }
}

#[test]
fn schemas_are_structural_and_every_field_is_documented() {
    for crd in api::crds() {
        let schema = schema_of(&crd);
        let mut errs = Vec::new();
        check_structural(&schema, &crd.spec.names.kind, &mut errs);
        assert!(errs.is_empty(), "{errs:#?}");
        // every spec field has a description (it becomes `kubectl explain`)
        fn undocumented(s: &Value, path: &str, out: &mut Vec<String>) {
            if let Some(props) = s.get("properties").and_then(|p| p.as_object()) {
                for (k, v) in props {
                    let p = format!("{path}.{k}");
                    if v.get("description").is_none() {
                        out.push(p.clone());
                    }
                    undocumented(v, &p, out);
                    if let Some(items) = v.get("items") {
                        undocumented(items, &format!("{p}[]"), out);
                    }
                }
            }
        }
        let mut missing = Vec::new();
        if let Some(spec) = schema.get("properties").and_then(|p| p.get("spec")) {
            undocumented(spec, "spec", &mut missing);
        }
        assert!(
            missing.is_empty(),
            "{}: fields without a doc comment: {missing:?}",
            crd.spec.names.kind
        );
    }
}

#[test]
fn cel_rules_compile() {
    for crd in api::crds() {
        let compiled = kube::core::cel::compile_schema(&schema_of(&crd));
        let errs: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        assert!(errs.is_empty(), "{}: {errs:#?}", crd.spec.names.kind);
    }
}

/// Value rules of OpenAPI v3 our schemas use: type, enum, required, pattern, min/max, lengths,
/// unknown fields (the apiserver's strict field validation). Returns the failing paths.
fn check_value(s: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if s.get("nullable").and_then(|n| n.as_bool()) != Some(true) {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if let Some(e) = s.get("enum").and_then(|e| e.as_array())
        && !e.contains(v)
    {
        errs.push(format!("{path}: {v} is not one of {e:?}"));
    }
    match s.get("type").and_then(|t| t.as_str()) {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                errs.push(format!("{path}: must be an object"));
                return;
            };
            for r in s
                .get("required")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(r) = r.as_str()
                    && !obj.contains_key(r)
                {
                    errs.push(format!("{path}.{r}: required"));
                }
            }
            let props = s.get("properties").and_then(|p| p.as_object());
            for (k, child) in obj {
                match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                    (Some(ps), _) => check_value(ps, child, &format!("{path}.{k}"), errs),
                    (None, Some(ap)) if ap.is_object() => {
                        check_value(ap, child, &format!("{path}.{k}"), errs)
                    }
                    (None, _)
                        if s.get("x-kubernetes-preserve-unknown-fields").is_none()
                            && props.is_some() =>
                    {
                        errs.push(format!("{path}.{k}: unknown field"))
                    }
                    _ => {}
                }
            }
        }
        Some("array") => match v.as_array() {
            Some(items) => {
                if let Some(max) = s.get("maxItems").and_then(|m| m.as_u64())
                    && items.len() as u64 > max
                {
                    errs.push(format!("{path}: more than {max} items"));
                }
                for (i, it) in items.iter().enumerate() {
                    if let Some(is) = s.get("items") {
                        check_value(is, it, &format!("{path}[{i}]"), errs);
                    }
                }
            }
            None => errs.push(format!("{path}: must be a list")),
        },
        Some("string") => match v.as_str() {
            Some(text) => {
                if let Some(p) = s.get("pattern").and_then(|p| p.as_str()) {
                    let re = regex::Regex::new(p)
                        .unwrap_or_else(|e| panic!("{path}: bad pattern {p}: {e}"));
                    if !re.is_match(text) {
                        errs.push(format!("{path}: {text:?} does not match {p}"));
                    }
                }
                let n = text.chars().count() as u64;
                if s.get("maxLength")
                    .and_then(|m| m.as_u64())
                    .is_some_and(|m| n > m)
                {
                    errs.push(format!("{path}: too long"));
                }
                if s.get("minLength")
                    .and_then(|m| m.as_u64())
                    .is_some_and(|m| n < m)
                {
                    errs.push(format!("{path}: too short"));
                }
            }
            None => errs.push(format!("{path}: must be a string")),
        },
        Some("integer") | Some("number") => match v.as_f64() {
            Some(x) => {
                if s.get("minimum")
                    .and_then(|m| m.as_f64())
                    .is_some_and(|m| x < m)
                {
                    errs.push(format!("{path}: {x} is below the minimum"));
                }
                if s.get("maximum")
                    .and_then(|m| m.as_f64())
                    .is_some_and(|m| x > m)
                {
                    errs.push(format!("{path}: {x} is above the maximum"));
                }
                if s.get("type").and_then(|t| t.as_str()) == Some("integer") && x.fract() != 0.0 {
                    errs.push(format!("{path}: must be an integer"));
                }
            }
            None => errs.push(format!("{path}: must be a number")),
        },
        Some("boolean") if !v.is_boolean() => errs.push(format!("{path}: must be true or false")),
        _ => {}
    }
}

/// What the apiserver would say about one document: value rules, then CEL rules.
fn apiserver_errors(doc: &Value) -> Vec<String> {
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let crd = api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    let schema = schema_of(&crd);
    let mut errs = Vec::new();
    if let (Some(s), Some(v)) = (
        schema.get("properties").and_then(|p| p.get("spec")),
        doc.get("spec"),
    ) {
        check_value(s, v, "spec", &mut errs);
    }
    if errs.is_empty() {
        let defaulted = kube::core::cel::apply_defaults(&schema, doc);
        if let Err(e) = kube::core::cel::Validator::new().validate(&schema, &defaulted, None) {
            errs.extend(e.into_vec().into_iter().map(|e| format!("{e:?}")));
        }
    }
    errs
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn every_example_parses_validates_and_passes_the_schema() {
    let files = yaml_files(&root().join("examples"));
    assert!(
        files.len() >= 8,
        "expected the use-case examples, found {files:?}"
    );
    let mut kinds = std::collections::BTreeSet::new();
    for f in &files {
        let origin = f.display().to_string();
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{e}"));
        let loaded = manifest::parse_and_validate(&text, &origin).unwrap_or_else(|e| panic!("{e}"));
        assert!(!loaded.is_empty(), "{origin} holds no object");
        for l in &loaded {
            kinds.insert(l.object.kind());
        }
        for doc in documents(f) {
            let errs = apiserver_errors(&doc);
            assert!(
                errs.is_empty(),
                "{origin}: the apiserver would refuse it: {errs:#?}"
            );
        }
    }
    assert_eq!(kinds.len(), 4, "examples cover all four kinds: {kinds:?}");
}

#[test]
fn invalid_manifests_are_refused_by_the_operator_and_by_the_schema_naming_the_field() {
    let files = yaml_files(&root().join("tests/invalid"));
    assert!(files.len() >= 10);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{e}"));
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no '# expect: FIELD' line", f.display()))
            .trim()
            .to_string();
        let op = manifest::parse_and_validate(&text, "t")
            .err()
            .map(|e| e.to_string());
        let op = op.unwrap_or_else(|| panic!("{}: the operator accepted it", f.display()));
        assert!(
            op.contains(&field),
            "{}: error does not name {field}: {op}",
            f.display()
        );
        for doc in documents(f) {
            let errs = apiserver_errors(&doc);
            assert!(!errs.is_empty(), "{}: the schema accepts it", f.display());
            let leaf = field
                .rsplit('.')
                .next()
                .unwrap_or(&field)
                .split('[')
                .next()
                .unwrap_or("");
            assert!(
                errs.iter().any(|e| e.contains(leaf)),
                "{}: the schema's errors do not name {leaf}: {errs:?}",
                f.display()
            );
        }
    }
}

#[test]
fn spec_defaults_match_the_schema_defaults() {
    // A minimal VM as the apiserver would store it after defaulting must read back as the same spec.
    let doc: Value = serde_json::json!({
        "apiVersion": "kvm-operator.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"vcpus": 1, "memory": "64Mi", "nics": [{"name": "n", "network": "default"}]}
    });
    let crd = api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "VirtualMachine")
        .unwrap_or_else(|| panic!());
    let defaulted = kube::core::cel::apply_defaults(&schema_of(&crd), &doc);
    let a: api::VirtualMachine = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{e}"));
    let b: api::VirtualMachine =
        serde_json::from_value(defaulted).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.spec, b.spec);
    assert!(matches!(
        manifest::parse_str(&serde_json::to_string(&a).unwrap_or_default(), "x")
            .ok()
            .and_then(|v| v.into_iter().next())
            .map(|l| l.object),
        Some(Object::VirtualMachine(_))
    ));
}
