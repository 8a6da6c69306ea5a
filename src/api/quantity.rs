//! Byte quantities (`512Mi`, `20Gi`, `1.5T`) as Kubernetes writes them.
//!
//! Spec fields carry sizes the way `kubectl` users write them; the operator needs exact byte
//! counts. [`ByteQuantity`] keeps both: it parses on deserialization (so a bad value fails with a
//! message that names the value), keeps the user's spelling when it serializes (so GitOps tools
//! see no drift), and exposes [`ByteQuantity::bytes`].

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the CRD schema enforces: an unsigned decimal with an optional binary (Ki…Ei) or
/// decimal (k…E) suffix. No sign, no exponent: negative sizes are rejected by the apiserver.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A non-negative amount of bytes written as a Kubernetes quantity string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByteQuantity {
    text: String,
    bytes: u64,
}

/// Why a quantity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantity is empty; write a size such as 512Mi or 20Gi")]
    Empty,
    #[error(
        "quantity {0:?} is not a size: use digits with an optional suffix Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or k, M, G, T, P, E (powers of 1000), e.g. 512Mi"
    )]
    Syntax(String),
    #[error("quantity {0:?} is too large (more than 2^64 bytes)")]
    Overflow(String),
    #[error("quantity {0:?} is not a whole number of bytes")]
    Fraction(String),
}

impl ByteQuantity {
    /// Parses `text` (e.g. `"512Mi"`, `"1.5Gi"`, `"1000"`).
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(QuantityError::Empty);
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        let mult: u128 = match suffix {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "Ei" => 1 << 60,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "P" => 1_000_000_000_000_000,
            "E" => 1_000_000_000_000_000_000,
            _ => return Err(QuantityError::Syntax(text.to_string())),
        };
        let (int_part, frac_part) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        if int_part.is_empty()
            || (num.contains('.') && frac_part.is_empty())
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
            || frac_part.len() > 18
        {
            return Err(QuantityError::Syntax(text.to_string()));
        }
        let overflow = || QuantityError::Overflow(text.to_string());
        let int: u128 = int_part.parse().map_err(|_| overflow())?;
        let mut total = int.checked_mul(mult).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            let scale = 10u128.pow(frac_part.len() as u32);
            let frac: u128 = frac_part.parse().map_err(|_| overflow())?;
            let scaled = frac.checked_mul(mult).ok_or_else(overflow)?;
            if scaled % scale != 0 {
                return Err(QuantityError::Fraction(text.to_string()));
            }
            total = total.checked_add(scaled / scale).ok_or_else(overflow)?;
        }
        let bytes = u64::try_from(total).map_err(|_| overflow())?;
        Ok(Self {
            text: t.to_string(),
            bytes,
        })
    }

    /// An exact amount, written with the largest binary suffix that divides it (`65536Ki` → `64Mi`).
    pub fn from_bytes(bytes: u64) -> Self {
        const UNITS: [(&str, u64); 6] = [
            ("Ei", 1 << 60),
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        let text = UNITS
            .iter()
            .find(|(_, m)| bytes != 0 && bytes % m == 0)
            .map(|(s, m)| format!("{}{s}", bytes / m))
            .unwrap_or_else(|| bytes.to_string());
        Self { text, bytes }
    }

    /// The exact number of bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The text as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ByteQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ByteQuantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for ByteQuantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteQuantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ByteQuantity {
    fn schema_name() -> Cow<'static, str> {
        "ByteQuantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": QUANTITY_PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(
            ByteQuantity::parse("512Mi").map(|q| q.bytes()),
            Ok(512 << 20)
        );
        assert_eq!(ByteQuantity::parse("1.5Gi").map(|q| q.bytes()), Ok(3 << 29));
        assert_eq!(
            ByteQuantity::parse("2G").map(|q| q.bytes()),
            Ok(2_000_000_000)
        );
        assert_eq!(ByteQuantity::parse("1000").map(|q| q.bytes()), Ok(1000));
        assert_eq!(ByteQuantity::parse("0").map(|q| q.bytes()), Ok(0));
    }

    #[test]
    fn refuses_signs_garbage_overflow_and_fractions_of_bytes() {
        for bad in [
            "-1Gi", "+1Gi", "1e3", "Gi", "1.Gi", ".5Gi", "1 Gi", "1gi", "12Mb", "",
        ] {
            assert!(
                ByteQuantity::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!(matches!(
            ByteQuantity::parse("16Ei"),
            Err(QuantityError::Overflow(_))
        ));
        assert!(matches!(
            ByteQuantity::parse("0.3"),
            Err(QuantityError::Fraction(_))
        ));
    }

    #[test]
    fn keeps_spelling_and_formats_exact_amounts() {
        let q: ByteQuantity = serde_json::from_str("\"1024Mi\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            serde_json::to_string(&q).ok().as_deref(),
            Some("\"1024Mi\"")
        );
        assert_eq!(ByteQuantity::from_bytes(64 << 20).as_str(), "64Mi");
        assert_eq!(ByteQuantity::from_bytes(3072).as_str(), "3Ki");
        assert_eq!(ByteQuantity::from_bytes(1536).as_str(), "1536");
        assert_eq!(ByteQuantity::from_bytes(1000).as_str(), "1000");
        assert_eq!(ByteQuantity::from_bytes(0).as_str(), "0");
    }

    #[test]
    fn schema_pattern_and_parser_agree_on_syntax() {
        // The apiserver checks the pattern, the operator runs the parser: they must agree.
        let re = regex::Regex::new(QUANTITY_PATTERN).unwrap_or_else(|e| panic!("{e}"));
        let corpus = [
            "1", "1.5Gi", "1.Gi", "Gi", "-1", "10Mi", "3k", "2.25Ki", "1KiB", "1 Gi", "0.5", "1e3",
            "7Ei", "12m", "",
        ];
        for s in corpus {
            let syntax_ok = !matches!(
                ByteQuantity::parse(s),
                Err(QuantityError::Syntax(_) | QuantityError::Empty)
            );
            assert_eq!(
                syntax_ok,
                re.is_match(s),
                "parser and pattern disagree on {s:?}"
            );
        }
    }
}
