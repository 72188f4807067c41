//! Instruction flags (`--from`, `--mount`, `--chmod`, ...): which instruction takes which
//! flag and of what kind, and the validated values given to one instruction. Apart from the
//! builder because the stage graph reads flags (`COPY --from`, `RUN --mount from=`) without
//! building instructions.

use crate::error::ErrorKind;
use crate::values::suggest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    String,
    List,
}

use FlagKind::{Bool, List, String as Str};

const FLAGS: &[(&str, &[(&str, FlagKind)])] = &[
    ("from", &[("platform", Str)]),
    (
        "run",
        &[("mount", List), ("network", Str), ("security", Str)],
    ),
    (
        "copy",
        &[
            ("from", Str),
            ("chown", Str),
            ("chmod", Str),
            ("link", Bool),
            ("parents", Bool),
            ("exclude", List),
        ],
    ),
    (
        "add",
        &[
            ("chown", Str),
            ("chmod", Str),
            ("checksum", Str),
            ("keep-git-dir", Bool),
            ("link", Bool),
            ("exclude", List),
        ],
    ),
    (
        "healthcheck",
        &[
            ("interval", Str),
            ("timeout", Str),
            ("start-period", Str),
            ("start-interval", Str),
            ("retries", Str),
        ],
    ),
];

/// Flags given to one instruction, validated against its flag set.
#[derive(Debug, Default)]
pub(crate) struct Flags {
    values: Vec<(&'static str, Vec<String>)>,
}

impl Flags {
    /// Parses `--name[=value]` words for `keyword` (lower case).
    pub(crate) fn parse(keyword: &str, raw: &[String]) -> Result<Self, ErrorKind> {
        let spec: &[(&str, FlagKind)] = FLAGS
            .iter()
            .find(|(k, _)| *k == keyword)
            .map_or(&[], |(_, s)| s);
        let upper = keyword.to_uppercase();
        let mut flags = Flags::default();
        for word in raw {
            let Some(body) = word.strip_prefix("--") else {
                return Err(ErrorKind::Invalid(format!(
                    "arg should start with -- : {word}"
                )));
            };
            if body.is_empty() {
                return Ok(flags);
            }
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some(&(name, kind)) = spec.iter().find(|(n, _)| *n == name) else {
                let owners: Vec<String> = FLAGS
                    .iter()
                    .filter(|(_, s)| s.iter().any(|(n, _)| *n == name))
                    .map(|(k, _)| k.to_uppercase())
                    .collect();
                if owners.is_empty() {
                    return Err(ErrorKind::UnknownFlag {
                        instruction: upper,
                        flag: name.to_string(),
                        suggestion: suggest(name, spec.iter().map(|(n, _)| *n)).map(str::to_string),
                    });
                }
                return Err(ErrorKind::FlagNotAllowed {
                    instruction: upper,
                    flag: name.to_string(),
                    owners: owners.join(", "),
                });
            };
            let existing = flags.values.iter().position(|(n, _)| *n == name);
            if existing.is_some() && kind != List {
                return Err(ErrorKind::InvalidFlag {
                    flag: name.to_string(),
                    reason: "duplicate flag specified".to_string(),
                });
            }
            let value = match kind {
                Bool => match value {
                    None => "true".to_string(),
                    Some("") => {
                        return Err(ErrorKind::InvalidFlag {
                            flag: name.to_string(),
                            reason: "missing a value".to_string(),
                        })
                    }
                    Some(v) => match v.to_lowercase().as_str() {
                        b @ ("true" | "false") => b.to_string(),
                        _ => {
                            return Err(ErrorKind::InvalidFlag {
                                flag: name.to_string(),
                                reason: format!("expecting boolean value, not: {v}"),
                            })
                        }
                    },
                },
                Str | List => match value {
                    Some(v) => v.to_string(),
                    None => {
                        return Err(ErrorKind::InvalidFlag {
                            flag: name.to_string(),
                            reason: "missing a value".to_string(),
                        })
                    }
                },
            };
            match existing {
                Some(i) => flags.values[i].1.push(value),
                None => flags.values.push((name, vec![value])),
            }
        }
        Ok(flags)
    }

    /// Every value given to flag `name`, in order.
    pub(crate) fn values_of(&self, name: &str) -> &[String] {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    pub(super) fn string(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }

    pub(super) fn list(&self, name: &str) -> Vec<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub(super) fn bool(&self, name: &str) -> bool {
        self.string(name) == Some("true")
    }

    pub(super) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}
