//! The project's decisions on top of the database (hack/advisories/policy.toml): crates never
//! allowed, advisories accepted with a reason, informational kinds only warned about.

use toml::{Table, Value};

#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `[[deny]] crate = "...", reason = "..."`: fails whenever the crate is in a lock file.
    pub deny: Vec<Entry>,
    /// `[[ignore]] id = "RUSTSEC-...", reason = "..."`: reported, does not fail.
    pub ignore: Vec<Entry>,
    /// `warn = ["unmaintained"]`: informational kinds that warn instead of failing.
    pub warn: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Entry {
    /// The crate name (deny) or the advisory id (ignore).
    pub key: String,
    pub reason: String,
}

impl Policy {
    pub fn parse(text: &str) -> Result<Policy, String> {
        let doc: Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
        for key in doc.keys() {
            if !["deny", "ignore", "warn"].contains(&key.as_str()) {
                return Err(format!("unknown key `{key}` (known: deny, ignore, warn)"));
            }
        }
        let warn = match doc.get("warn") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or("`warn` has an item that is not a string")
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`warn` is not an array of strings".into()),
        };
        Ok(Policy {
            deny: entries(&doc, "deny", "crate")?,
            ignore: entries(&doc, "ignore", "id")?,
            warn,
        })
    }
}

fn entries(doc: &Table, section: &str, key: &str) -> Result<Vec<Entry>, String> {
    let Some(value) = doc.get(section) else {
        return Ok(Vec::new());
    };
    let items = value.as_array().ok_or(format!(
        "`{section}` is not an array of tables ([[{section}]])"
    ))?;
    items
        .iter()
        .map(|item| {
            let field = |k: &str| {
                item.get(k)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
            };
            let name = field(key).ok_or(format!("a [[{section}]] entry has no `{key}`"))?;
            let reason =
                field("reason").ok_or(format!("[[{section}]] {name}: give the `reason`"))?;
            Ok(Entry {
                key: name.to_owned(),
                reason: reason.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_sections() {
        let p = Policy::parse(
            "warn = [\"unmaintained\"]\n[[deny]]\ncrate = \"serde_yml\"\nreason = \"unsound\"\n\
             [[ignore]]\nid = \"RUSTSEC-2026-0001\"\nreason = \"not reachable\"\n",
        )
        .unwrap();
        assert_eq!(p.warn, ["unmaintained"]);
        assert_eq!(
            (p.deny[0].key.as_str(), p.deny[0].reason.as_str()),
            ("serde_yml", "unsound")
        );
        assert_eq!(p.ignore[0].key, "RUSTSEC-2026-0001");
        assert!(Policy::parse("").unwrap().deny.is_empty());
    }

    #[test]
    fn an_entry_needs_a_reason() {
        assert!(Policy::parse("[[ignore]]\nid = \"RUSTSEC-2026-0001\"\n").is_err());
        assert!(Policy::parse("[[deny]]\nreason = \"x\"\n").is_err());
        assert!(Policy::parse("ignored = []\n").is_err());
    }
}
