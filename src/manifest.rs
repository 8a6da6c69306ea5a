//! Reading the YAML users `kubectl apply` into our types, with errors that name the file, the
//! document, the object and the field.
//!
//! Used by `kvm-operator standalone` and by tests of `examples/`. Each document must be one of
//! the four kinds, or a `v1` Secret (a node's SSH key, cloud-init user data); anything else (or a
//! typo in a field name) is refused, never ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use kube::Resource;
use serde::de::DeserializeOwned;

use crate::api::{FieldErrors, KvmNode, Migration, StoragePool, VirtualMachine};

/// One object of one of our kinds.
// Objects are read once per manifest file; boxing the larger variants would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Object {
    KvmNode(KvmNode),
    StoragePool(StoragePool),
    VirtualMachine(VirtualMachine),
    Migration(Migration),
    /// A core/v1 Secret (`data` base64, or `stringData`), as `kubectl apply` takes it.
    Secret(k8s_openapi::api::core::v1::Secret),
}

/// An object and where it came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// `file.yaml#2` (document index, from 1).
    pub origin: String,
    pub object: Object,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: cannot read: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not valid YAML: {message}")]
    Yaml { origin: String, message: String },
    #[error("{origin}: {message}")]
    Shape { origin: String, message: String },
    #[error("{origin}: {kind} {name:?}: field {path}: {message}")]
    Field {
        origin: String,
        kind: &'static str,
        name: String,
        path: String,
        message: String,
    },
    #[error("{origin}: {kind} {name:?} is invalid: {errors}")]
    Invalid {
        origin: String,
        kind: &'static str,
        name: String,
        errors: FieldErrors,
    },
}

impl Object {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::KvmNode(_) => "KvmNode",
            Object::StoragePool(_) => "StoragePool",
            Object::VirtualMachine(_) => "VirtualMachine",
            Object::Migration(_) => "Migration",
            Object::Secret(_) => "Secret",
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        let meta = match self {
            Object::KvmNode(o) => o.meta(),
            Object::StoragePool(o) => o.meta(),
            Object::VirtualMachine(o) => o.meta(),
            Object::Migration(o) => o.meta(),
            Object::Secret(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or("")
    }

    /// `metadata.namespace`, when the document sets one.
    pub fn namespace(&self) -> Option<&str> {
        let meta = match self {
            Object::KvmNode(o) => o.meta(),
            Object::StoragePool(o) => o.meta(),
            Object::VirtualMachine(o) => o.meta(),
            Object::Migration(o) => o.meta(),
            Object::Secret(o) => &o.metadata,
        };
        meta.namespace.as_deref()
    }

    /// Validates metadata and spec.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        let name = self.name();
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(crate::api::validation::is_dns_label);
        if !name_ok {
            errs.push(
                "metadata.name",
                format!(
                    "{name:?} is not a valid object name (lower-case letters, digits, '-', '.')"
                ),
            );
        }
        if let Some(ns) = self.namespace()
            && !crate::api::validation::is_dns_label(ns)
        {
            errs.push(
                "metadata.namespace",
                format!(
                    "{ns:?} is not a valid namespace name (lower-case letters, digits, '-', at most 63)"
                ),
            );
        }
        let spec = match self {
            Object::KvmNode(o) => o.spec.validate(),
            Object::StoragePool(o) => o.spec.validate(),
            Object::VirtualMachine(o) => o.spec.validate(),
            Object::Migration(o) => o.spec.validate(),
            Object::Secret(_) => Ok(()),
        };
        if let Err(e) = spec {
            errs.0.extend(e.0);
        }
        errs.into_result()
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind(), self.name())
    }
}

/// The YAML reader's options for a text of `len` bytes. The reader's default budgets (1,024
/// documents, 250,000 nodes, 1,000,000 events) would refuse a large but ordinary file (a
/// manifest of 2,000 VMs, standalone mode's state file beyond ~2,000 VMs); here they grow with
/// the input instead: a node takes at least one byte of text, a document separator four, an
/// event at most two per node. The work stays linear in the file's size, and the reader's own
/// limits on aliases, anchors and depth (what makes small inputs expensive) are kept.
pub fn yaml_options(len: usize) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = budget.max_documents.max(len / 4 + 1);
    budget.max_nodes = budget.max_nodes.max(len.saturating_add(1));
    budget.max_events = budget
        .max_events
        .max(len.saturating_mul(4).saturating_add(16));
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// A YAML reader's error as a message; a breached budget says what to do.
pub fn yaml_message(e: &serde_saphyr::Error) -> String {
    match e {
        serde_saphyr::Error::Budget { breach, .. } => format!(
            "the YAML reader's limits were exceeded ({breach:?}); the limits grow with the file's size, so this is an alias or nesting storm rather than a large file: check the file's anchors (&) and aliases (*)"
        ),
        e => e.to_string(),
    }
}

const TOP_LEVEL: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// Parses every document of `text`; `origin` names the source in errors. Empty documents are
/// skipped. Objects are not validated beyond their types; call [`Object::validate`].
pub fn parse_str(text: &str, origin: &str) -> Result<Vec<Loaded>, ManifestError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options(text.len())).map_err(|e| {
            ManifestError::Yaml {
                origin: origin.to_string(),
                message: yaml_message(&e),
            }
        })?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let origin = format!("{origin}#{}", i + 1);
        out.push(Loaded {
            object: parse_value(doc, &origin)?,
            origin,
        });
    }
    Ok(out)
}

fn parse_value(doc: serde_json::Value, origin: &str) -> Result<Object, ManifestError> {
    let shape = |message: String| ManifestError::Shape {
        origin: origin.to_string(),
        message,
    };
    let map = doc.as_object().ok_or_else(|| {
        shape("a document must be a mapping with apiVersion, kind, metadata and spec".into())
    })?;
    let api_version = map.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    let kind = map.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    if api_version == "v1" && kind == "Secret" {
        return secret(doc, origin, &name);
    }
    let want = format!("{}/{}", crate::api::GROUP, crate::api::VERSION);
    if api_version != want {
        return Err(shape(format!(
            "apiVersion {api_version:?} (kind {kind:?}) is not ours: use apiVersion: {want} (or v1 for a Secret)"
        )));
    }
    if let Some(k) = map.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(shape(format!(
            "{kind} {name:?}: unknown top-level field {k:?} (allowed: {})",
            TOP_LEVEL.join(", ")
        )));
    }
    fn typed<T: DeserializeOwned>(
        doc: serde_json::Value,
        origin: &str,
        kind: &'static str,
        name: &str,
    ) -> Result<T, ManifestError> {
        serde_path_to_error::deserialize(doc).map_err(|e| ManifestError::Field {
            origin: origin.to_string(),
            kind,
            name: name.to_string(),
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }
    match kind {
        "KvmNode" => typed(doc, origin, "KvmNode", &name).map(Object::KvmNode),
        "StoragePool" => typed(doc, origin, "StoragePool", &name).map(Object::StoragePool),
        "VirtualMachine" => typed(doc, origin, "VirtualMachine", &name).map(Object::VirtualMachine),
        "Migration" => typed(doc, origin, "Migration", &name).map(Object::Migration),
        other => Err(shape(format!(
            "kind {other:?} is not one of KvmNode, StoragePool, VirtualMachine, Migration"
        ))),
    }
}

/// A v1 Secret; `stringData` is folded into `data` as the API server does.
fn secret(mut doc: serde_json::Value, origin: &str, name: &str) -> Result<Object, ManifestError> {
    let string_data = doc
        .as_object_mut()
        .and_then(|m| m.remove("stringData"))
        .unwrap_or_default();
    let mut s: k8s_openapi::api::core::v1::Secret =
        serde_path_to_error::deserialize(doc).map_err(|e| ManifestError::Field {
            origin: origin.to_string(),
            kind: "Secret",
            name: name.to_string(),
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    if let Some(m) = string_data.as_object() {
        let data = s.data.get_or_insert_with(Default::default);
        for (k, v) in m {
            let text = v.as_str().ok_or_else(|| ManifestError::Field {
                origin: origin.to_string(),
                kind: "Secret",
                name: name.to_string(),
                path: format!("stringData.{k}"),
                message: "must be a string".into(),
            })?;
            data.insert(k.clone(), k8s_openapi::ByteString(text.as_bytes().to_vec()));
        }
    }
    Ok(Object::Secret(s))
}

/// Parses and validates; the first invalid object is an error naming its fields.
pub fn parse_and_validate(text: &str, origin: &str) -> Result<Vec<Loaded>, ManifestError> {
    let loaded = parse_str(text, origin)?;
    for l in &loaded {
        l.object
            .validate()
            .map_err(|errors| ManifestError::Invalid {
                origin: l.origin.clone(),
                kind: l.object.kind(),
                name: l.object.name().to_string(),
                errors,
            })?;
    }
    Ok(loaded)
}

/// Reads files and directories (recursively, `*.yaml` and `*.yml`, in name order, skipping
/// names that start with a dot) and parses and
/// validates every document.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Loaded>, ManifestError> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut out = Vec::new();
    for f in files {
        let origin = f.display().to_string();
        let text = std::fs::read_to_string(&f).map_err(|source| ManifestError::Io {
            origin: origin.clone(),
            source,
        })?;
        out.extend(parse_and_validate(&text, &origin)?);
    }
    Ok(out)
}

/// A name starting with a dot.
pub fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn collect(p: &Path, files: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let io = |source| ManifestError::Io {
        origin: p.display().to_string(),
        source,
    };
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        // hidden entries are not manifests (standalone mode keeps its state in .kvm-operator/)
        entries.retain(|e| !is_hidden(e));
        for e in entries {
            if e.is_dir() {
                collect(&e, files)?;
            } else if e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(e);
            }
        }
        Ok(())
    } else {
        std::fs::metadata(p).map_err(io)?;
        files.push(p.to_path_buf());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: web, namespace: default}\nspec:\n  vcpus: 2\n  memory: 1Gi\n";

    #[test]
    fn one_file_may_hold_thousands_of_documents() {
        // the YAML reader's default budget stops at 1,024 documents; ours grows with the file
        let doc = "apiVersion: kvm-operator.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: vm-NAME}\nspec: {vcpus: 1, memory: 64Mi}\n";
        let text: Vec<String> = (0..2500)
            .map(|i| doc.replace("NAME", &i.to_string()))
            .collect();
        let loaded = parse_str(&text.join("---\n"), "vms.yaml").unwrap();
        assert_eq!(loaded.len(), 2500);
        assert_eq!(loaded[2499].origin, "vms.yaml#2500");
    }

    #[test]
    fn an_alias_storm_is_refused_naming_the_file() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse_str(&text, "storm.yaml").unwrap_err().to_string();
        assert!(e.starts_with("storm.yaml: not valid YAML: "), "{e}");
    }

    #[test]
    fn parses_multiple_documents_and_skips_empty_ones() {
        let text = format!("{VM}---\n---\n{VM}");
        let l = parse_str(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].origin, "t.yaml#1");
        assert_eq!(l[1].origin, "t.yaml#2");
        assert_eq!(l[0].object.to_string(), "VirtualMachine/web");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let text = VM.replace(
            "memory: 1Gi",
            "memory: 1Gi\n  disks: [{name: a, new: {pool: p, size: 1Gi, sise: 2}}]",
        );
        let err = parse_str(&text, "t.yaml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("spec.disks[0].new"), "{err}");
        assert!(err.contains("sise"), "{err}");
        assert!(err.contains("VirtualMachine \"web\""), "{err}");
    }

    #[test]
    fn foreign_kinds_and_top_level_typos_are_refused() {
        let err = |t: &str| {
            parse_str(t, "t")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").contains("not ours"));
        assert!(
            err(&VM.replace("kind: VirtualMachine", "kind: VirtualMachin"))
                .contains("is not one of")
        );
        assert!(err(&format!("{VM}stauts: {{}}\n")).contains("unknown top-level field \"stauts\""));
        assert!(err("- a\n- b\n").contains("must be a mapping"));
        assert!(err("a: [").contains("not valid YAML"));
    }

    #[test]
    fn validation_names_object_and_field() {
        let text = VM
            .replace("metadata: {name: web,", "metadata: {name: Web_1,")
            .replace("vcpus: 2", "vcpus: 0");
        let err = parse_and_validate(&text, "t.yaml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("metadata.name"), "{err}");
        assert!(err.contains("spec.vcpus: 0 is out of range"), "{err}");
    }
}
