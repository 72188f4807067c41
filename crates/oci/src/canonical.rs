//! Canonical JSON: object keys sorted by their UTF-8 bytes, no insignificant whitespace.
//!
//! Manifests and configs are content-addressed, so the same document must always serialise to
//! the same bytes. Struct field order, map implementation (a `HashMap` iterates in random
//! order) and serde_json's `preserve_order` feature must not change a digest; writing through
//! this module makes the bytes a function of the document's value alone.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::Value;

use crate::digest::Digest;

/// Serialises `value` as canonical JSON.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let value = serde_json::to_value(value)?;
    let mut out = Vec::with_capacity(1024);
    write_value(&mut out, &value).map_err(serde_json::Error::io)?;
    Ok(out)
}

/// Serialises `value` as canonical JSON and returns the bytes with their SHA-256 digest.
pub fn to_vec_with_digest<T: Serialize + ?Sized>(
    value: &T,
) -> Result<(Vec<u8>, Digest), serde_json::Error> {
    let bytes = to_vec(value)?;
    let digest = Digest::sha256_of(&bytes);
    Ok((bytes, digest))
}

fn write_value<W: Write>(out: &mut W, value: &Value) -> io::Result<()> {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.write_all(b"{")?;
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                serde_json::to_writer(&mut *out, key).map_err(io::Error::from)?;
                out.write_all(b":")?;
                write_value(out, value)?;
            }
            out.write_all(b"}")
        }
        Value::Array(items) => {
            out.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                write_value(out, item)?;
            }
            out.write_all(b"]")
        }
        scalar => serde_json::to_writer(out, scalar).map_err(io::Error::from),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn keys_are_sorted_at_every_level_without_whitespace() {
        let mut inner = HashMap::new();
        for key in ["zeta", "alpha", "Mid", "_x", "ä"] {
            inner.insert(key.to_owned(), vec![1, 2]);
        }
        let doc = serde_json::json!({"b": inner, "a": [{"y": null, "x": "s\"q"}], "c": 1.5});
        let bytes = to_vec(&doc).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"a":[{"x":"s\"q","y":null}],"b":{"Mid":[1,2],"_x":[1,2],"alpha":[1,2],"zeta":[1,2],"ä":[1,2]},"c":1.5}"#
        );
    }

    #[test]
    fn hashmap_insertion_order_does_not_change_digest() {
        let keys: Vec<String> = (0..200).map(|i| format!("key{i}")).collect();
        let forward: HashMap<_, _> = keys.iter().map(|k| (k.clone(), k.len())).collect();
        let backward: HashMap<_, _> = keys.iter().rev().map(|k| (k.clone(), k.len())).collect();
        assert_eq!(
            to_vec_with_digest(&forward).unwrap().1,
            to_vec_with_digest(&backward).unwrap().1
        );
    }
}
