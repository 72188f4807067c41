//! The files a buildpack's `bin/build` writes: `<layer>.toml`, `launch.toml`, `build.toml`
//! and `store.toml`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::api::Api;
use crate::error::{Error, Result};
use crate::files::parse_toml;

pub use libcnb_data::layer_content_metadata::{LayerContentMetadata, LayerTypes};

/// Parses a `<layer>.toml` (`[types]` launch/build/cache and `[metadata]`), with
/// `libcnb-data`'s type, which matches the spec's form for Buildpack API 0.6 and later.
pub fn parse_layer_toml(path: &Path, text: &str) -> Result<LayerContentMetadata> {
    parse_toml(path, text)
}

/// The types of a layer, `false` for all when the file sets none.
pub fn layer_types(meta: &LayerContentMetadata) -> LayerTypes {
    meta.types.unwrap_or_default()
}

/// A process type a buildpack defines, in the form every Buildpack API reduces to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessDef {
    /// The process type (`web`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The command and the arguments always given to it (API 0.9+); for older APIs, one
    /// element: the command (a shell command line when not `direct`).
    pub command: Vec<String>,
    /// API 0.9+: default arguments the user's arguments replace; older: arguments the user's
    /// arguments are appended to.
    #[serde(default)]
    pub args: Vec<String>,
    /// Whether the command runs without a shell (always for API 0.9+).
    pub direct: bool,
    /// Whether the buildpack asks for this to be the default process.
    #[serde(default)]
    pub default: bool,
    /// The working directory, relative to the app directory unless absolute (API 0.8+).
    #[serde(
        default,
        rename = "working-dir",
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
}

/// An image label a buildpack asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// The label's key.
    pub key: String,
    /// Its value.
    pub value: String,
}

/// A slice: app files (globs relative to the app dir) exported as a layer of their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// The globs.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// `launch.toml`, normalised across Buildpack APIs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchToml {
    /// Labels for the image.
    pub labels: Vec<Label>,
    /// Processes.
    pub processes: Vec<ProcessDef>,
    /// Slices of the app directory.
    pub slices: Vec<Slice>,
}

// Own serde types for launch.toml: libcnb-data's `Launch` only has the Buildpack API 0.9+ form
// (a `command` array, no `direct`), and Kiln must also read the 0.7/0.8 form (a `command`
// string and `direct`).
#[derive(Deserialize)]
#[serde(bound(deserialize = "P: Deserialize<'de>"))]
struct LaunchFile<P> {
    #[serde(default)]
    labels: Vec<Label>,
    #[serde(default)]
    processes: Vec<P>,
    #[serde(default)]
    slices: Vec<Slice>,
    #[serde(default)]
    #[allow(dead_code)]
    bom: Vec<toml::Value>,
}

#[derive(Deserialize)]
struct ProcessBefore09 {
    #[serde(rename = "type")]
    kind: String,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    default: bool,
    #[serde(default, rename = "working-dir")]
    working_dir: Option<String>,
}

#[derive(Deserialize)]
struct Process09 {
    #[serde(rename = "type")]
    kind: String,
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    direct: Option<toml::Value>,
    #[serde(default)]
    default: bool,
    #[serde(default, rename = "working-dir")]
    working_dir: Option<String>,
}

/// Whether `kind` is a valid process type (letters, digits, `.`, `_`, `-`).
pub fn valid_process_type(kind: &str) -> bool {
    !kind.is_empty()
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a `launch.toml` written by a buildpack of Buildpack API `api`.
pub fn parse_launch_toml(path: &Path, text: &str, api: Api) -> Result<LaunchToml> {
    let malformed = |key: String, message: String| Error::Malformed {
        path: path.to_owned(),
        key,
        message,
    };
    let (labels, slices, processes) = if api.at_least(0, 9) {
        let file: LaunchFile<Process09> = parse_toml(path, text)?;
        let mut processes = Vec::new();
        for (i, p) in file.processes.into_iter().enumerate() {
            if p.direct.is_some() {
                return Err(malformed(
                    format!("processes[{i}].direct"),
                    format!("not allowed for Buildpack API {api} (0.9 and later run every process directly; start the command with /bin/sh -c to use a shell)"),
                ));
            }
            if p.command.is_empty() {
                return Err(malformed(
                    format!("processes[{i}].command"),
                    "must name the program to run".into(),
                ));
            }
            processes.push(ProcessDef {
                kind: p.kind,
                command: p.command,
                args: p.args,
                direct: true,
                default: p.default,
                working_dir: p.working_dir,
            });
        }
        (file.labels, file.slices, processes)
    } else {
        let file: LaunchFile<ProcessBefore09> = parse_toml(path, text)?;
        let processes = file
            .processes
            .into_iter()
            .map(|p| ProcessDef {
                kind: p.kind,
                command: vec![p.command],
                args: p.args,
                direct: p.direct,
                default: p.default,
                working_dir: p.working_dir,
            })
            .collect();
        (file.labels, file.slices, processes)
    };
    let mut seen_default = None;
    for (i, p) in processes.iter().enumerate() {
        if !valid_process_type(&p.kind) {
            return Err(malformed(
                format!("processes[{i}].type"),
                format!(
                    "`{}` is not a process type (use letters, digits, `.`, `_` and `-`)",
                    p.kind
                ),
            ));
        }
        if p.default {
            if let Some(other) = seen_default.replace(&p.kind) {
                return Err(malformed(
                    format!("processes[{i}].default"),
                    format!(
                        "`{}` and `{other}` are both marked default; a buildpack may mark only one",
                        p.kind
                    ),
                ));
            }
        }
    }
    for (i, l) in labels.iter().enumerate() {
        if l.key.is_empty() {
            return Err(malformed(
                format!("labels[{i}].key"),
                "must not be empty".into(),
            ));
        }
    }
    Ok(LaunchToml {
        labels,
        processes,
        slices,
    })
}

/// `build.toml`: plan entries the buildpack did not meet (left for later buildpacks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildToml {
    /// The unmet entries.
    #[serde(default)]
    pub unmet: Vec<Unmet>,
    /// Deprecated bill of materials, accepted and not used.
    #[serde(default, skip_serializing)]
    pub bom: Vec<toml::Value>,
}

/// An unmet buildpack plan entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmet {
    /// The entry's name.
    pub name: String,
}

/// `store.toml`: metadata a buildpack keeps for its next build.
///
/// Own type rather than `libcnb-data`'s `Store`, which requires the `[metadata]` table that the
/// spec lets a file leave out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreToml {
    /// The metadata.
    #[serde(default)]
    pub metadata: toml::Table,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_toml_new_and_old_forms() {
        let p = Path::new("launch.toml");
        let new = parse_launch_toml(
            p,
            "[[processes]]\ntype = \"web\"\ncommand = [\"node\", \"server.js\"]\nargs = [\"--port\", \"8080\"]\ndefault = true\nworking-dir = \"sub\"\n[[labels]]\nkey = \"k\"\nvalue = \"v\"\n[[slices]]\npaths = [\"static/*\"]\n",
            Api::new(0, 10),
        )
        .unwrap();
        assert_eq!(new.processes[0].command, vec!["node", "server.js"]);
        assert!(new.processes[0].direct);
        assert_eq!(new.processes[0].working_dir.as_deref(), Some("sub"));
        assert_eq!(new.labels[0].key, "k");
        assert_eq!(new.slices[0].paths, vec!["static/*"]);
        let old = parse_launch_toml(
            p,
            "[[processes]]\ntype = \"web\"\ncommand = \"node server.js\"\nargs = [\"a\"]\n",
            Api::new(0, 8),
        )
        .unwrap();
        assert_eq!(old.processes[0].command, vec!["node server.js"]);
        assert!(!old.processes[0].direct);
    }

    #[test]
    fn launch_toml_errors_name_keys() {
        let p = Path::new("/layers/bp/launch.toml");
        let err = parse_launch_toml(
            p,
            "[[processes]]\ntype = \"web\"\ncommand = \"x\"\n",
            Api::new(0, 10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("processes[0].command"), "{err}");
        let err = parse_launch_toml(
            p,
            "[[processes]]\ntype = \"web\"\ncommand = [\"x\"]\ndirect = true\n",
            Api::new(0, 10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("processes[0].direct"), "{err}");
        let err = parse_launch_toml(
            p,
            "[[processes]]\ntype = \"we b\"\ncommand = [\"x\"]\n",
            Api::new(0, 10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("processes[0].type"), "{err}");
        let err = parse_launch_toml(
            p,
            "[[processes]]\ntype = \"a\"\ncommand = [\"x\"]\ndefault = true\n[[processes]]\ntype = \"b\"\ncommand = [\"x\"]\ndefault = true\n",
            Api::new(0, 10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("processes[1].default"), "{err}");
    }

    #[test]
    fn layer_toml_types() {
        let meta = parse_layer_toml(
            Path::new("l.toml"),
            "[types]\nlaunch = true\ncache = true\n[metadata]\nversion = \"1\"\n",
        )
        .unwrap();
        let t = layer_types(&meta);
        assert!(t.launch && t.cache && !t.build);
        let empty = parse_layer_toml(Path::new("l.toml"), "").unwrap();
        assert!(!layer_types(&empty).launch);
        let err = parse_layer_toml(Path::new("l.toml"), "[types]\nlaunch = \"yes\"\n").unwrap_err();
        assert!(err.to_string().contains("types.launch"), "{err}");
    }
}
