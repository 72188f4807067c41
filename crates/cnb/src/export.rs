//! The export description: the single file the lifecycle's build step writes for the engine,
//! listing everything the export stage puts into the image, in order.
//!
//! It lives at [`EXPORT_DESCRIPTION_PATH`] inside the layers directory (by default
//! `/layers/kiln-export.json`). All paths in it are absolute paths inside the build image.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::files::{parse_json, write_file};
use crate::layer::{Label, Slice};
use crate::metadata::{LayerSha, LifecycleMetadata};
use crate::order::GroupBuildpack;

/// The export description's path relative to the layers directory.
pub const EXPORT_DESCRIPTION_PATH: &str = "kiln-export.json";

/// The version of the export description's format; bumped on incompatible changes.
pub const EXPORT_DESCRIPTION_VERSION: u32 = 1;

/// Everything the export stage needs from a finished build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportDescription {
    /// [`EXPORT_DESCRIPTION_VERSION`].
    pub version: u32,
    /// The Platform API whose image layout and labels this describes.
    pub platform_api: String,
    /// The layers directory (`/layers`).
    pub layers_dir: String,
    /// The buildpacks of the group, in build order.
    pub buildpacks: Vec<GroupBuildpack>,
    /// Every launch layer, in image order (group order, then layer name).
    pub launch_layers: Vec<ExportLayer>,
    /// The app directory and the slices cut from it.
    pub app: AppExport,
    /// `<layers>/config/metadata.toml` (the launcher's metadata), to export as the config layer.
    pub launch_metadata_path: String,
    /// The processes, sorted by type, each with the API of the buildpack that defined it.
    pub processes: Vec<ExportProcess>,
    /// The process the image runs by default (its `ENTRYPOINT` is `/cnb/process/<type>`);
    /// `None`: the entrypoint is the launcher itself.
    pub default_process: Option<String>,
    /// Labels buildpacks asked for, in group order.
    pub labels: Vec<Label>,
    /// The `io.buildpacks.build.metadata` label's value (complete).
    pub build_metadata_label: String,
    /// The `io.buildpacks.lifecycle.metadata` document with what is known at build time:
    /// buildpacks and their launch layers (with the previous digest for reused layers, empty
    /// otherwise). The engine fills the digests of the layers it writes, the run image and the
    /// app, config, launcher, process-types and sbom layers, then sets the label.
    pub lifecycle_metadata: LifecycleMetadata,
    /// SBOM files copied to their places under `<layers>/sbom/`.
    pub sbom: Vec<SbomFile>,
    /// The launch SBOM directory (`<layers>/sbom/launch`) when there are launch SBOMs; it is
    /// exported as a layer of its own at the same path.
    pub launch_sbom_dir: Option<String>,
    /// The cache layers to keep for the next build.
    pub cache_layers: Vec<CacheLayer>,
}

/// A launch layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportLayer {
    /// The buildpack that made it.
    pub buildpack_id: String,
    /// The layer's name (its directory name).
    pub name: String,
    /// The layer directory (`/layers/<escaped id>/<name>`), exported at the same path.
    pub path: String,
    /// Whether it is also a build or cache layer.
    pub build: bool,
    /// Whether it is also a cache layer.
    pub cache: bool,
    /// Its `<layer>.toml` `[metadata]`, as JSON.
    pub metadata: serde_json::Value,
    /// Whether its `<layer>.toml` was there before the buildpack ran (restored).
    pub restored: bool,
    /// Where its content comes from.
    pub source: LayerSource,
}

/// Where a launch layer's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerSource {
    /// The layer directory: write it as a new layer.
    Directory,
    /// The buildpack kept the layer's metadata and left no directory: reuse the previous
    /// image's layer with this diff ID, unchanged.
    Reuse {
        /// The previous layer's diff ID.
        digest: String,
    },
}

/// The app directory's part of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppExport {
    /// The app directory (`/workspace`), exported at the same path.
    pub path: String,
    /// Slices: globs relative to the app dir, each exported as a layer of its own before the
    /// rest of the app.
    pub slices: Vec<Slice>,
}

/// A process of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportProcess {
    /// The process type (`/cnb/process/<type>` links to the launcher).
    #[serde(rename = "type")]
    pub kind: String,
    /// The command and its fixed arguments.
    pub command: Vec<String>,
    /// The overridable (API 0.9+) or leading arguments.
    pub args: Vec<String>,
    /// Whether it runs without a shell.
    pub direct: bool,
    /// Its working directory.
    pub working_dir: Option<String>,
    /// The buildpack that defined it.
    pub buildpack_id: String,
    /// That buildpack's Buildpack API (decides how the launcher treats user arguments).
    pub buildpack_api: String,
}

/// Which SBOM a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SbomKind {
    /// Describes what the image runs with.
    Launch,
    /// Describes what the build used.
    Build,
    /// Describes a cache layer.
    Cache,
}

/// An SBOM file a buildpack wrote, copied to its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SbomFile {
    /// The buildpack.
    pub buildpack_id: String,
    /// The layer it describes; `None` for the buildpack's launch or build SBOM.
    pub layer: Option<String>,
    /// Which SBOM it is.
    pub kind: SbomKind,
    /// Its extension: `cdx.json`, `spdx.json` or `syft.json`.
    pub format: String,
    /// Where the buildpack wrote it.
    pub source: String,
    /// Where it was copied (`<layers>/sbom/<kind>/<escaped id>[/<layer>]/sbom.<format>`).
    pub path: String,
}

/// A cache layer to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The buildpack.
    pub buildpack_id: String,
    /// The layer's name.
    pub name: String,
    /// The layer directory.
    pub path: String,
    /// Its `<layer>.toml` path (restored with the layer).
    pub metadata_path: String,
    /// Whether it is also a launch layer.
    pub launch: bool,
    /// Whether it is also a build layer.
    pub build: bool,
}

impl ExportDescription {
    /// Reads the description the lifecycle wrote; `what` names it in errors.
    pub fn from_json(what: &Path, json: &str) -> Result<ExportDescription> {
        parse_json(what, json)
    }

    /// The description as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes the description into `layers_dir`.
    pub fn write(&self, layers_dir: &Path) -> Result<()> {
        write_file(
            &layers_dir.join(EXPORT_DESCRIPTION_PATH),
            self.to_json().as_bytes(),
        )
    }

    /// Reads the description from `layers_dir`.
    pub fn read(layers_dir: &Path) -> Result<ExportDescription> {
        let path = layers_dir.join(EXPORT_DESCRIPTION_PATH);
        let text = std::fs::read_to_string(&path).map_err(crate::error::io(&path))?;
        ExportDescription::from_json(&path, &text)
    }

    /// The lifecycle metadata label's value once the engine knows the digests: `layer_digest`
    /// gives the diff ID of each written launch layer (buildpack id, layer name); the others
    /// are given directly.
    pub fn lifecycle_metadata_label(
        &self,
        layer_digest: impl Fn(&str, &str) -> Option<String>,
        digests: &PlatformLayerDigests,
    ) -> String {
        let mut md = self.lifecycle_metadata.clone();
        for bp in &mut md.buildpacks {
            for (name, layer) in &mut bp.layers {
                if layer.sha.is_empty() {
                    if let Some(d) = layer_digest(&bp.key, name) {
                        layer.sha = d;
                    }
                }
            }
        }
        md.app = digests
            .app
            .iter()
            .map(|d| LayerSha { sha: d.clone() })
            .collect();
        md.sbom = digests.sbom.as_ref().map(|d| LayerSha { sha: d.clone() });
        md.config = LayerSha {
            sha: digests.config.clone(),
        };
        md.launcher = LayerSha {
            sha: digests.launcher.clone(),
        };
        md.process_types = LayerSha {
            sha: digests.process_types.clone(),
        };
        md.run_image = digests.run_image.clone();
        md.to_label()
    }
}

/// Diff IDs of the layers the platform (not a buildpack) adds, for the lifecycle label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlatformLayerDigests {
    /// The app layers (slices first, then the rest), in image order.
    pub app: Vec<String>,
    /// The launch SBOM layer.
    pub sbom: Option<String>,
    /// The config layer (metadata.toml).
    pub config: String,
    /// The launcher layer.
    pub launcher: String,
    /// The process-types layer.
    pub process_types: String,
    /// The run image: its top layer's diff ID, its digest reference, name and mirrors.
    pub run_image: crate::metadata::RunImageForRebase,
}
