//! The platform's metadata files and labels: `<layers>/config/metadata.toml` (what the launcher
//! reads), the `io.buildpacks.build.metadata` and `io.buildpacks.lifecycle.metadata` labels,
//! and `analyzed.toml` (what a previous image left for this build).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::files::{read_toml, write_toml};
use crate::layer::{Label, Slice};
use crate::order::GroupBuildpack;

/// The label holding the layers and run image an image was built with (what rebase reads).
pub const LIFECYCLE_METADATA_LABEL: &str = "io.buildpacks.lifecycle.metadata";
/// The label holding the buildpacks and processes of an image.
pub const BUILD_METADATA_LABEL: &str = "io.buildpacks.build.metadata";
/// The label holding the project's source metadata.
pub const PROJECT_METADATA_LABEL: &str = "io.buildpacks.project.metadata";
/// The label a builder image describes its buildpacks, lifecycle and run image with.
pub const BUILDER_METADATA_LABEL: &str = "io.buildpacks.builder.metadata";

/// Where the launcher's metadata lives, relative to the layers directory.
pub const LAUNCH_METADATA_PATH: &str = "config/metadata.toml";

/// The path of `config/metadata.toml` in `layers_dir`.
pub fn launch_metadata_path(layers_dir: &Path) -> PathBuf {
    layers_dir.join(LAUNCH_METADATA_PATH)
}

/// A process as metadata.toml and the build metadata label record it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// The process type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The command and its fixed arguments (see [`crate::layer::ProcessDef::command`]).
    pub command: Vec<String>,
    /// Overridable (API 0.9+) or leading (older) arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Whether it runs without a shell.
    #[serde(default)]
    pub direct: bool,
    /// The buildpack that defined it.
    #[serde(rename = "buildpack-id", default)]
    pub buildpack_id: String,
    /// Its working directory, if not the app directory.
    #[serde(
        rename = "working-dir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
}

/// `<layers>/config/metadata.toml`, as the builder writes it and the launcher reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildMetadata {
    /// The buildpacks of the group (with their APIs: the launcher needs them).
    #[serde(default)]
    pub buildpacks: Vec<GroupBuildpack>,
    /// Labels buildpacks asked for.
    #[serde(default)]
    pub labels: Vec<Label>,
    /// The processes, sorted by type.
    #[serde(default)]
    pub processes: Vec<Process>,
    /// Slices of the app directory.
    #[serde(default)]
    pub slices: Vec<Slice>,
    /// The default process type a buildpack chose.
    #[serde(
        rename = "buildpack-default-process-type",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub buildpack_default_process_type: Option<String>,
}

impl BuildMetadata {
    /// Reads metadata.toml from `layers_dir`.
    pub fn read(layers_dir: &Path) -> Result<BuildMetadata> {
        read_toml(&launch_metadata_path(layers_dir))
    }

    /// Writes metadata.toml into `layers_dir`.
    pub fn write(&self, layers_dir: &Path) -> Result<()> {
        write_toml(&launch_metadata_path(layers_dir), self)
    }

    /// A process by type.
    pub fn process(&self, kind: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.kind == kind)
    }

    /// The Buildpack API of the buildpack with id `id`, if the group has it.
    pub fn buildpack_api(&self, id: &str) -> Option<crate::api::Api> {
        self.buildpacks
            .iter()
            .find(|b| b.id == id)
            .and_then(|b| b.api.as_deref())
            .and_then(|a| a.parse().ok())
    }

    /// The `io.buildpacks.build.metadata` label value (JSON, the spec's field names).
    pub fn label_json(&self) -> String {
        let label = BuildMetadataLabel {
            bom: Vec::new(),
            buildpacks: self.buildpacks.clone(),
            launcher: LauncherInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                source: LauncherSource {
                    git: LauncherGit {
                        repository: env!("CARGO_PKG_REPOSITORY").to_owned(),
                        commit: String::new(),
                    },
                },
            },
            processes: self
                .processes
                .iter()
                .map(|p| LabelProcess {
                    kind: p.kind.clone(),
                    command: p.command.clone(),
                    args: p.args.clone(),
                    direct: p.direct,
                    buildpack_id: p.buildpack_id.clone(),
                    working_dir: p.working_dir.clone(),
                })
                .collect(),
            buildpack_default_process_type: self.buildpack_default_process_type.clone(),
        };
        serde_json::to_string(&label).unwrap_or_default()
    }
}

/// The `io.buildpacks.build.metadata` label document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildMetadataLabel {
    /// The deprecated bill of materials (always empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bom: Vec<serde_json::Value>,
    /// The buildpacks of the group.
    #[serde(default)]
    pub buildpacks: Vec<GroupBuildpack>,
    /// The launcher.
    pub launcher: LauncherInfo,
    /// The processes.
    #[serde(default)]
    pub processes: Vec<LabelProcess>,
    /// The buildpack-chosen default process.
    #[serde(
        rename = "buildpack-default-process-type",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub buildpack_default_process_type: Option<String>,
}

/// The launcher as the build metadata label describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherInfo {
    /// Its version.
    pub version: String,
    /// Where it comes from.
    pub source: LauncherSource,
}

/// The launcher's source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherSource {
    /// Its repository.
    pub git: LauncherGit,
}

/// The launcher's repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherGit {
    /// URL.
    pub repository: String,
    /// Commit, when known.
    pub commit: String,
}

/// A process in the build metadata label (`buildpackID` rather than metadata.toml's
/// `buildpack-id`, as the spec's label has it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelProcess {
    /// The process type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The command.
    pub command: Vec<String>,
    /// The arguments.
    pub args: Vec<String>,
    /// Whether it runs without a shell.
    pub direct: bool,
    /// The buildpack that defined it.
    #[serde(rename = "buildpackID")]
    pub buildpack_id: String,
    /// Its working directory.
    #[serde(
        rename = "working-dir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
}

/// The `io.buildpacks.lifecycle.metadata` label document (and `analyzed.toml`'s
/// `[metadata]`): the digest of every layer the platform added, by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LifecycleMetadata {
    /// The app layers (the app directory and its slices), in image order.
    #[serde(default)]
    pub app: Vec<LayerSha>,
    /// The SBOM layer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<LayerSha>,
    /// Each buildpack's launch layers with their metadata.
    #[serde(default)]
    pub buildpacks: Vec<BuildpackLayers>,
    /// The layer holding `config/metadata.toml`.
    #[serde(default)]
    pub config: LayerSha,
    /// The launcher's layer.
    #[serde(default)]
    pub launcher: LayerSha,
    /// The `/cnb/process/<type>` symlinks' layer.
    #[serde(rename = "process-types", alias = "processTypes", default)]
    pub process_types: LayerSha,
    /// The run image the app layers sit on.
    #[serde(rename = "runImage", alias = "run-image", default)]
    pub run_image: RunImageForRebase,
    /// The run image (and mirrors) the builder named, for older platforms' rebase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<StackMetadata>,
}

/// A layer's diff ID (`sha256:...`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSha {
    /// The diff ID; empty until the engine has written the layer.
    #[serde(default)]
    pub sha: String,
}

/// One buildpack's layers in the lifecycle metadata label.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildpackLayers {
    /// The buildpack's id.
    pub key: String,
    /// Its version.
    #[serde(default)]
    pub version: String,
    /// Its layers by name.
    #[serde(default)]
    pub layers: BTreeMap<String, LayerRecord>,
    /// What it kept in store.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreRecord>,
}

/// A launch layer's record: its diff ID, types and metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer's diff ID.
    #[serde(default)]
    pub sha: String,
    /// The `[metadata]` of its `<layer>.toml`.
    #[serde(default)]
    pub data: serde_json::Value,
    /// Whether it is a build layer.
    #[serde(default)]
    pub build: bool,
    /// Whether it is a launch layer.
    #[serde(default)]
    pub launch: bool,
    /// Whether it is a cache layer.
    #[serde(default)]
    pub cache: bool,
}

/// A buildpack's store.toml as the label keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreRecord {
    /// The metadata.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// The run image part of the lifecycle metadata label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunImageForRebase {
    /// The diff ID of the run image's top layer.
    #[serde(rename = "topLayer", alias = "top-layer", default)]
    pub top_layer: String,
    /// The run image by digest.
    #[serde(default)]
    pub reference: String,
    /// The run image's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// Its mirrors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

/// The stack part of the lifecycle metadata label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackMetadata {
    /// The run image and its mirrors.
    #[serde(rename = "runImage", alias = "run-image", default)]
    pub run_image: RunImageRef,
}

/// A run image name with mirrors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunImageRef {
    /// The image.
    #[serde(default)]
    pub image: String,
    /// Its mirrors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

impl LifecycleMetadata {
    /// Parses the label's JSON value.
    pub fn from_label(json: &str) -> Result<LifecycleMetadata> {
        crate::files::parse_json(Path::new(LIFECYCLE_METADATA_LABEL), json)
    }

    /// The label's JSON value.
    pub fn to_label(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A buildpack's record, if it has one.
    pub fn buildpack(&self, id: &str) -> Option<&BuildpackLayers> {
        self.buildpacks.iter().find(|b| b.key == id)
    }
}

/// `analyzed.toml`: what the analyze phase found (the previous image and its metadata, the run
/// image and its target), read by the build phase to know which launch layers can be reused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Analyzed {
    /// The previous image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// The previous image's lifecycle metadata.
    #[serde(default)]
    pub metadata: LifecycleMetadata,
    /// The run image.
    #[serde(rename = "run-image", default, skip_serializing_if = "Option::is_none")]
    pub run_image: Option<AnalyzedRunImage>,
}

/// An image reference in analyzed.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// The reference.
    pub reference: String,
}

/// The run image in analyzed.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyzedRunImage {
    /// The reference.
    #[serde(default)]
    pub reference: String,
    /// Its os/arch/distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

/// The os/arch/distribution of the image an app will run on (`CNB_TARGET_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The target id, if the image names one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// `linux`.
    #[serde(default)]
    pub os: String,
    /// `amd64`, `arm64`, ...
    #[serde(default)]
    pub arch: String,
    /// The architecture variant.
    #[serde(
        rename = "arch-variant",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub arch_variant: String,
    /// The OS distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
}

/// An OS distribution.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribution {
    /// `debian`, `ubuntu`, ...
    pub name: String,
    /// `12`, `22.04`, ...
    pub version: String,
}

impl Target {
    /// The target of the machine the lifecycle runs on: linux, its architecture, and the
    /// distribution `/etc/os-release` names (relative to `root`).
    pub fn of_root(root: &Path) -> Target {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "arm" => "arm",
            other => other,
        };
        let distribution = std::fs::read_to_string(root.join("etc/os-release"))
            .ok()
            .and_then(|text| {
                let field = |key: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                        .map(|v| v.trim().trim_matches('"').to_owned())
                };
                Some(Distribution {
                    name: field("ID")?,
                    version: field("VERSION_ID").unwrap_or_default(),
                })
            });
        Target {
            id: String::new(),
            os: "linux".into(),
            arch: arch.into(),
            arch_variant: String::new(),
            distribution,
        }
    }

    /// The `CNB_TARGET_*` variables buildpacks of API 0.10+ are given.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("CNB_TARGET_OS".to_owned(), self.os.clone()),
            ("CNB_TARGET_ARCH".to_owned(), self.arch.clone()),
        ];
        if !self.arch_variant.is_empty() {
            out.push(("CNB_TARGET_ARCH_VARIANT".into(), self.arch_variant.clone()));
        }
        if let Some(d) = &self.distribution {
            out.push(("CNB_TARGET_DISTRO_NAME".into(), d.name.clone()));
            out.push(("CNB_TARGET_DISTRO_VERSION".into(), d.version.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_toml_round_trip_and_label() {
        let md = BuildMetadata {
            buildpacks: vec![GroupBuildpack {
                id: "a/b".into(),
                version: "1.0.0".into(),
                api: Some("0.10".into()),
                homepage: None,
            }],
            labels: vec![],
            processes: vec![Process {
                kind: "web".into(),
                command: vec!["node".into()],
                args: vec!["server.js".into()],
                direct: true,
                buildpack_id: "a/b".into(),
                working_dir: None,
            }],
            slices: vec![],
            buildpack_default_process_type: Some("web".into()),
        };
        let dir = tempfile::tempdir().unwrap();
        md.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(launch_metadata_path(dir.path())).unwrap();
        assert!(text.contains("buildpack-id = \"a/b\""), "{text}");
        assert!(
            text.contains("buildpack-default-process-type = \"web\""),
            "{text}"
        );
        assert_eq!(BuildMetadata::read(dir.path()).unwrap(), md);
        let label: serde_json::Value = serde_json::from_str(&md.label_json()).unwrap();
        assert_eq!(label["processes"][0]["buildpackID"], "a/b");
        assert_eq!(label["processes"][0]["command"][0], "node");
        assert_eq!(label["buildpack-default-process-type"], "web");
    }

    #[test]
    fn lifecycle_label_uses_spec_names() {
        let json = r#"{"app":[{"sha":"sha256:a"}],"buildpacks":[{"key":"x","version":"1","layers":{"l":{"sha":"sha256:l","data":{"v":1},"launch":true,"build":false,"cache":false}}}],"config":{"sha":"sha256:c"},"launcher":{"sha":"sha256:la"},"process-types":{"sha":"sha256:p"},"runImage":{"topLayer":"sha256:t","reference":"r@sha256:d"}}"#;
        let md = LifecycleMetadata::from_label(json).unwrap();
        assert_eq!(md.run_image.top_layer, "sha256:t");
        assert_eq!(md.buildpack("x").unwrap().layers["l"].sha, "sha256:l");
        let again: serde_json::Value = serde_json::from_str(&md.to_label()).unwrap();
        assert_eq!(again["runImage"]["topLayer"], "sha256:t");
        assert_eq!(again["process-types"]["sha"], "sha256:p");
        let err = LifecycleMetadata::from_label(r#"{"runImage":{"topLayer":3}}"#).unwrap_err();
        assert!(err.to_string().contains("runImage.topLayer"), "{err}");
    }
}
