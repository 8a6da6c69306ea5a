//! Spec validation that names the object, the field and the fix.
//!
//! The CRD schemas carry the same rules for the apiserver (ranges, patterns, enums, CEL); these
//! functions are what the controllers and standalone mode run, because a spec can reach the
//! operator without passing an apiserver (standalone files, older CRDs still installed).

use std::fmt;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.disks[1].new.size`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All invalid fields of one object, in spec order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }

    /// `Ok(())` when no error was recorded.
    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Pattern for Kubernetes object names and the names we derive from them (RFC 1123 label).
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// RFC 1123 label: lower-case alphanumerics and '-', 1..=63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A name libvirt will hold (domain, pool, volume): printable, no '/', no control characters,
/// not '.' or '..', at most 255 bytes. XML escaping is the domain_xml module's job; this keeps
/// names usable as file names inside a pool.
pub fn check_libvirt_name(errs: &mut FieldErrors, field: &str, name: &str) {
    if name.is_empty() {
        errs.push(field, "must not be empty");
    } else if name.len() > 255 {
        errs.push(field, "must be at most 255 bytes");
    } else if name == "." || name == ".." || name.contains('/') {
        errs.push(
            field,
            format!(
                "{name:?} must not contain '/' or be '.' or '..' (it names a file in the pool)"
            ),
        );
    } else if name.chars().any(char::is_control) {
        errs.push(field, "must not contain control characters");
    }
}

/// An absolute, normalised path with no `..` component and no control characters.
pub fn check_abs_path(errs: &mut FieldErrors, field: &str, path: &str) {
    if !path.starts_with('/') {
        errs.push(
            field,
            format!("{path:?} must be an absolute path (start with '/')"),
        );
    } else if path.split('/').any(|c| c == ".." || c == ".") {
        errs.push(
            field,
            format!("{path:?} must not contain '.' or '..' components"),
        );
    } else if path.chars().any(char::is_control) {
        errs.push(field, "must not contain control characters");
    } else if path.len() > 4096 {
        errs.push(field, "must be at most 4096 bytes");
    }
}

/// A host name or IP address: letters, digits, '-', '.', ':' (IPv6), 1..=253 bytes.
pub fn check_host(errs: &mut FieldErrors, field: &str, host: &str) {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['-', '.'])
        && !host.contains("..")
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
    if !ok {
        errs.push(
            field,
            format!("{host:?} is not a host name or IP address (letters, digits, '-', '.', ':')"),
        );
    }
}

/// A Kubernetes object name (RFC 1123 subdomain): lower-case alphanumerics, '-' and '.',
/// 1..=253 bytes, each dot-separated part a DNS label.
pub fn is_object_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A reference to another object by name (`what` names its kind in the message).
pub fn check_object_name(errs: &mut FieldErrors, field: &str, what: &str, name: &str) {
    if !is_object_name(name) {
        errs.push(
            field,
            format!(
                "{name:?} is not the name of a {what} (lower-case letters, digits, '-', '.', at most 253)"
            ),
        );
    }
}

/// A key of a Secret's data: letters, digits, '-', '_', '.', 1..=253 bytes, not '.' and not
/// starting with '..' (as Kubernetes allows them).
pub fn check_secret_key(errs: &mut FieldErrors, field: &str, key: &str) {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && key != "."
        && !key.starts_with("..");
    if !ok {
        errs.push(
            field,
            format!("{key:?} is not a Secret key (letters, digits, '-', '_', '.', at most 253)"),
        );
    }
}

/// A word the operator hands to libvirt, which may pass it on as an argument to a host
/// program (an iSCSI IQN, a CHAP user, a secret's usage name, a volume group): not empty, at
/// most `max` bytes, no control characters or spaces, and not starting with '-' (which a
/// program would read as an option).
pub fn check_word(errs: &mut FieldErrors, field: &str, value: &str, max: usize) {
    if value.is_empty() {
        errs.push(field, "must not be empty");
    } else if value.len() > max {
        errs.push(field, format!("must be at most {max} bytes"));
    } else if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        errs.push(field, "must not contain control characters or white space");
    } else if value.starts_with('-') {
        errs.push(
            field,
            format!(
                "{value:?} must not start with '-' (a host program would read it as an option)"
            ),
        );
    }
}

/// Label maps used as selectors: keys and values as Kubernetes allows them.
pub fn check_labels(
    errs: &mut FieldErrors,
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
) {
    for (k, v) in labels {
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.')
                })
        });
        if !name_ok || !prefix_ok {
            errs.push(format!("{field}[{k:?}]"), "is not a valid label key");
        }
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && (v.is_empty()
                || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && v.ends_with(|c: char| c.is_ascii_alphanumeric())));
        if !value_ok {
            errs.push(
                format!("{field}[{k:?}]"),
                format!("{v:?} is not a valid label value"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_names_refuse_traversal_and_control_characters() {
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            "a\nb",
            &"x".repeat(256),
        ] {
            let mut e = FieldErrors::default();
            check_libvirt_name(&mut e, "spec.x", bad);
            assert!(!e.is_empty(), "{bad:?}");
            assert!(e.to_string().starts_with("spec.x: "));
        }
        for good in ["disk0.qcow2", "my disk <&\"'>", "débian-12"] {
            let mut e = FieldErrors::default();
            check_libvirt_name(&mut e, "spec.x", good);
            assert!(e.is_empty(), "{good:?}: {e}");
        }
    }

    #[test]
    fn paths_must_be_absolute_and_normalised() {
        for bad in ["var/lib", "/var/../etc", "/var/./x", "/a\0b"] {
            let mut e = FieldErrors::default();
            check_abs_path(&mut e, "p", bad);
            assert!(!e.is_empty(), "{bad:?}");
        }
        let mut e = FieldErrors::default();
        check_abs_path(&mut e, "p", "/var/lib/libvirt/images");
        assert!(e.is_empty());
    }

    #[test]
    fn hosts_and_labels() {
        let mut e = FieldErrors::default();
        check_host(&mut e, "h", "10.0.0.1");
        check_host(&mut e, "h", "hv-1.example.org");
        check_host(&mut e, "h", "fe80::1");
        assert!(e.is_empty());
        for bad in ["", "-oProxyCommand=x", "a b", "a;b", "$(x)"] {
            let mut e = FieldErrors::default();
            check_host(&mut e, "h", bad);
            assert!(!e.is_empty(), "{bad:?}");
        }
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("kvm-operator.io/group".to_string(), "rack-1".to_string());
        let mut e = FieldErrors::default();
        check_labels(&mut e, "l", &labels);
        assert!(e.is_empty(), "{e}");
        labels.insert("bad key".to_string(), "-x".to_string());
        check_labels(&mut e, "l", &labels);
        assert_eq!(e.0.len(), 2);
        assert!(is_dns_label("vm-1") && !is_dns_label("Vm") && !is_dns_label("-a"));
    }
}
