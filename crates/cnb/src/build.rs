//! The build phase: run each buildpack of the group's `bin/build` in order with the spec's
//! environment, collect the layers, processes, labels and SBOMs they leave, and write the
//! launcher's `config/metadata.toml` and the [`ExportDescription`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::api::Api;
use crate::buildpack::{escape_id, Buildpack, BuildpackKind, BuildpackStore};
use crate::detect::{base_build_env, describe_status, run_captured, with_overrides};
use crate::env::{files_in, Phase};
use crate::error::{io, Error, Result};
use crate::export::{
    AppExport, CacheLayer, ExportDescription, ExportLayer, ExportProcess, LayerSource, SbomFile,
    SbomKind, EXPORT_DESCRIPTION_VERSION,
};
use crate::files::{read_toml_if_exists, write_toml};
use crate::layer::{
    layer_types, parse_launch_toml, parse_layer_toml, BuildToml, Label, Slice, StoreToml,
};
use crate::metadata::{
    launch_metadata_path, Analyzed, BuildMetadata, BuildpackLayers, LayerRecord, LifecycleMetadata,
    Process, StoreRecord, Target,
};
use crate::order::{Group, GroupBuildpack, Plan};

/// Where a buildpack's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Straight to the lifecycle's own stdout and stderr, as it comes.
    Inherit,
    /// Collected (stdout and stderr interleaved) and returned; a failing build's error holds it.
    Capture,
}

/// What the build phase needs.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// The app directory (`bin/build`'s working directory).
    pub app_dir: PathBuf,
    /// The layers directory (`/layers`).
    pub layers_dir: PathBuf,
    /// The platform directory.
    pub platform_dir: PathBuf,
    /// The build config directory whose `env/` applies to every buildpack, if any.
    pub build_config_dir: Option<PathBuf>,
    /// Where the buildpacks are.
    pub store: BuildpackStore,
    /// The lifecycle's own environment (only some variables reach buildpacks).
    pub base_env: Vec<(String, String)>,
    /// The target given to buildpacks as `CNB_TARGET_*`.
    pub target: Option<Target>,
    /// Where the per-buildpack plan files are written.
    pub temp_dir: PathBuf,
    /// What the analyze phase found about the previous image (for reusing launch layers).
    pub analyzed: Option<Analyzed>,
    /// The default process the platform's user asked for (over the buildpacks' choice).
    pub default_process: Option<String>,
    /// Where buildpack output goes.
    pub output: OutputMode,
}

/// What the build phase produced.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The launcher's metadata (also written to `<layers>/config/metadata.toml`).
    pub metadata: BuildMetadata,
    /// The export description (also written to `<layers>/kiln-export.json`).
    pub export: ExportDescription,
    /// Each buildpack's output, when captured (`id@version`, output).
    pub logs: Vec<(String, String)>,
    /// Warnings for the user (redefined default processes, ignored working dirs, ...).
    pub warnings: Vec<String>,
}

/// The SBOM file extensions and their media types.
const SBOM_FORMATS: &[(&str, &str)] = &[
    ("cdx.json", "application/vnd.cyclonedx+json"),
    ("spdx.json", "application/spdx+json"),
    ("syft.json", "application/vnd.syft+json"),
];

/// Files in a buildpack's layers directory that are not layer metadata.
const RESERVED_TOMLS: &[&str] = &["launch", "build", "store"];

/// Runs the build phase for `group` with the resolved `plan`.
pub fn build(config: &BuildConfig, group: &Group, plan: &Plan) -> Result<BuildOutcome> {
    let layers = &config.layers_dir;
    let sbom_root = layers.join("sbom");
    restore_launch_sboms(layers)?;
    if sbom_root.exists() {
        std::fs::remove_dir_all(&sbom_root).map_err(io(&sbom_root))?;
    }
    let mut env = base_build_env(&config.base_env, config.target.as_ref());
    let mut remaining = plan.clone();
    let mut logs = Vec::new();
    let mut warnings = Vec::new();
    let mut processes: BTreeMap<String, (Process, Api)> = BTreeMap::new();
    let mut default_type: Option<String> = None;
    let mut labels: Vec<Label> = Vec::new();
    let mut slices: Vec<Slice> = Vec::new();
    let mut launch_layers = Vec::new();
    let mut cache_layers = Vec::new();
    let mut sbom = Vec::new();
    let mut lifecycle = LifecycleMetadata::default();
    let mut group_out = Vec::new();
    for member in &group.group {
        let bp = config.store.lookup(&member.id, Some(&member.version))?;
        if let BuildpackKind::Composite(_) = bp.kind {
            return Err(Error::NotComponent(bp.key()));
        }
        group_out.push(GroupBuildpack {
            id: bp.id.clone(),
            version: bp.version.clone(),
            api: Some(bp.api.to_string()),
            homepage: bp.homepage.clone(),
        });
        let bp_layers = layers.join(escape_id(&bp.id));
        std::fs::create_dir_all(&bp_layers).map_err(io(&bp_layers))?;
        let restored: Vec<String> = layer_tomls(&bp_layers)?;
        let bp_plan = remaining.for_buildpack(&bp.id);
        let plan_dir = config
            .temp_dir
            .join(format!("kiln-build-{}", std::process::id()))
            .join(escape_id(&bp.id));
        let plan_path = plan_dir.join("plan.toml");
        write_toml(&plan_path, &bp_plan)?;

        let mut child_env = with_overrides(
            &env,
            &bp,
            &config.platform_dir,
            config.build_config_dir.as_deref(),
        )?;
        child_env.set("CNB_BUILDPACK_DIR", bp.dir.to_string_lossy());
        if bp.api.at_least(0, 8) {
            child_env.set("CNB_PLATFORM_DIR", config.platform_dir.to_string_lossy());
            child_env.set("CNB_BP_PLAN_PATH", plan_path.to_string_lossy());
            child_env.set("CNB_LAYERS_DIR", bp_layers.to_string_lossy());
        }
        let program = bp.dir.join("bin").join("build");
        if config.output == OutputMode::Inherit {
            // Inherit: the lifecycle's stdout is the log; mark where this buildpack starts.
            println!("======== Building: {} ========", bp.key());
        }
        let mut cmd = Command::new(&program);
        cmd.arg(&bp_layers)
            .arg(&config.platform_dir)
            .arg(&plan_path)
            .current_dir(&config.app_dir)
            .env_clear()
            .envs(child_env.vars());
        let spawn_err = |source| Error::Spawn {
            id: bp.key(),
            phase: "build",
            program: program.clone(),
            source,
        };
        let (status, output) = match config.output {
            OutputMode::Inherit => {
                cmd.stdin(Stdio::null());
                (cmd.status().map_err(spawn_err)?, String::new())
            }
            OutputMode::Capture => run_captured(cmd).map_err(spawn_err)?,
        };
        let _ = std::fs::remove_dir_all(&plan_dir);
        if config.output == OutputMode::Capture {
            logs.push((bp.key(), output.clone()));
        }
        if !status.success() {
            return Err(Error::BuildFailed {
                id: bp.key(),
                status: describe_status(status),
                output,
            });
        }

        // Layers, in name order.
        let mut records = BTreeMap::new();
        for name in layer_tomls(&bp_layers)? {
            let toml_path = bp_layers.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&toml_path).map_err(io(&toml_path))?;
            let meta = parse_layer_toml(&toml_path, &text)?;
            let types = layer_types(&meta);
            let dir = bp_layers.join(&name);
            let has_dir = dir.is_dir();
            let data = toml_to_json(&meta.metadata.clone().map(toml::Value::Table));
            if types.build && has_dir {
                env.add_root_dir(&dir, Phase::Build);
                env.apply_env_dir(&dir.join("env"))?;
                env.apply_env_dir(&dir.join("env.build"))?;
            }
            if types.launch {
                let source = if has_dir {
                    LayerSource::Directory
                } else {
                    let previous = config
                        .analyzed
                        .as_ref()
                        .and_then(|a| a.metadata.buildpack(&bp.id))
                        .and_then(|b| b.layers.get(&name))
                        .map(|l| l.sha.clone())
                        .filter(|s| !s.is_empty());
                    match previous {
                        Some(digest) => LayerSource::Reuse { digest },
                        None => {
                            return Err(Error::Buildpack {
                                id: bp.key(),
                                phase: "build",
                                message: format!(
                                    "layer {name}: {} sets launch = true but there is no {} directory and the previous image has no such layer to reuse",
                                    toml_path.display(),
                                    dir.display()
                                ),
                            })
                        }
                    }
                };
                let sha = match &source {
                    LayerSource::Reuse { digest } => digest.clone(),
                    LayerSource::Directory => String::new(),
                };
                records.insert(
                    name.clone(),
                    LayerRecord {
                        sha,
                        data: data.clone(),
                        build: types.build,
                        launch: true,
                        cache: types.cache,
                    },
                );
                launch_layers.push(ExportLayer {
                    buildpack_id: bp.id.clone(),
                    name: name.clone(),
                    path: dir.to_string_lossy().into_owned(),
                    build: types.build,
                    cache: types.cache,
                    metadata: data.clone(),
                    restored: restored.contains(&name),
                    source,
                });
            }
            if types.cache && has_dir {
                cache_layers.push(CacheLayer {
                    buildpack_id: bp.id.clone(),
                    name: name.clone(),
                    path: dir.to_string_lossy().into_owned(),
                    metadata_path: toml_path.to_string_lossy().into_owned(),
                    launch: types.launch,
                    build: types.build,
                });
            }
            sbom.extend(collect_sboms(
                &bp,
                &bp_layers,
                layers,
                Some((&name, types)),
            )?);
        }
        sbom.extend(collect_sboms(&bp, &bp_layers, layers, None)?);

        // build.toml: entries left for later buildpacks.
        let build_path = bp_layers.join("build.toml");
        let build_toml: BuildToml = read_toml_if_exists(&build_path)?.unwrap_or_default();
        for (i, unmet) in build_toml.unmet.iter().enumerate() {
            if !bp_plan.entries.iter().any(|e| e.name == unmet.name) {
                return Err(Error::Malformed {
                    path: build_path.clone(),
                    key: format!("unmet[{i}].name"),
                    message: format!("`{}` is not an entry of the buildpack's plan", unmet.name),
                });
            }
        }
        let met: Vec<String> = bp_plan
            .entries
            .iter()
            .map(|e| e.name.clone())
            .filter(|n| !build_toml.unmet.iter().any(|u| &u.name == n))
            .collect();
        remaining = remaining.without_met(&met);

        // launch.toml: processes, labels, slices.
        let launch_path = bp_layers.join("launch.toml");
        if let Some(text) = read_optional(&launch_path)? {
            let launch = parse_launch_toml(&launch_path, &text, bp.api)?;
            labels.extend(launch.labels);
            slices.extend(launch.slices);
            for p in launch.processes {
                if p.default {
                    default_type = Some(p.kind.clone());
                } else if default_type.as_deref() == Some(p.kind.as_str()) {
                    default_type = None;
                    warnings.push(format!(
                        "buildpack {} redefines the default process type {} without marking it default",
                        bp.key(),
                        p.kind
                    ));
                }
                let working_dir = if bp.api.at_least(0, 8) {
                    p.working_dir
                } else {
                    if p.working_dir.is_some() {
                        warnings.push(format!(
                            "buildpack {}: process {}: working-dir needs Buildpack API 0.8; ignored",
                            bp.key(),
                            p.kind
                        ));
                    }
                    None
                };
                processes.insert(
                    p.kind.clone(),
                    (
                        Process {
                            kind: p.kind,
                            command: p.command,
                            args: p.args,
                            direct: p.direct,
                            buildpack_id: bp.id.clone(),
                            working_dir,
                        },
                        bp.api,
                    ),
                );
            }
        }

        // store.toml
        let store_path = bp_layers.join("store.toml");
        let store: Option<StoreToml> = read_toml_if_exists(&store_path)?;
        lifecycle.buildpacks.push(BuildpackLayers {
            key: bp.id.clone(),
            version: bp.version.clone(),
            layers: records,
            store: store.map(|s| StoreRecord {
                metadata: toml_to_json(&Some(toml::Value::Table(s.metadata))),
            }),
        });
    }

    let default_process = match &config.default_process {
        Some(kind) if !processes.contains_key(kind) => {
            return Err(Error::Platform(format!(
                "the default process type {kind} is not defined by any buildpack (defined: {})",
                if processes.is_empty() {
                    "none".to_owned()
                } else {
                    processes.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            )))
        }
        Some(kind) => Some(kind.clone()),
        None => default_type.clone(),
    };

    let metadata = BuildMetadata {
        buildpacks: group_out.clone(),
        labels: labels.clone(),
        processes: processes.values().map(|(p, _)| p.clone()).collect(),
        slices: slices.clone(),
        buildpack_default_process_type: default_type,
    };
    metadata.write(layers)?;
    let launch_sbom_dir = layers.join("sbom").join("launch");
    let export = ExportDescription {
        version: EXPORT_DESCRIPTION_VERSION,
        platform_api: Api::PLATFORM.to_string(),
        layers_dir: layers.to_string_lossy().into_owned(),
        buildpacks: group_out,
        launch_layers,
        app: AppExport {
            path: config.app_dir.to_string_lossy().into_owned(),
            slices,
        },
        launch_metadata_path: launch_metadata_path(layers).to_string_lossy().into_owned(),
        processes: processes
            .values()
            .map(|(p, api)| ExportProcess {
                kind: p.kind.clone(),
                command: p.command.clone(),
                args: p.args.clone(),
                direct: p.direct,
                working_dir: p.working_dir.clone(),
                buildpack_id: p.buildpack_id.clone(),
                buildpack_api: api.to_string(),
            })
            .collect(),
        default_process,
        labels,
        build_metadata_label: metadata.label_json(),
        lifecycle_metadata: lifecycle,
        launch_sbom_dir: sbom
            .iter()
            .any(|f: &SbomFile| f.kind == SbomKind::Launch)
            .then(|| launch_sbom_dir.to_string_lossy().into_owned()),
        sbom,
        cache_layers,
    };
    export.write(layers)?;
    Ok(BuildOutcome {
        metadata,
        export,
        logs,
        warnings,
    })
}

/// The names of the layer metadata files (`<layer>.toml`) in a buildpack's layers directory.
fn layer_tomls(bp_layers: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for path in files_in(bp_layers)? {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(".toml") {
            if !RESERVED_TOMLS.contains(&stem) && !stem.is_empty() {
                out.push(stem.to_owned());
            }
        }
    }
    Ok(out)
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// A TOML value as JSON (for the labels); `null` for none.
fn toml_to_json(value: &Option<toml::Value>) -> serde_json::Value {
    match value {
        None => serde_json::Value::Null,
        Some(v) => serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
    }
}

/// The SBOMs of the previous image's launch layers, which the platform restores to
/// `<layers>/sbom/launch/<buildpack>/<layer>/sbom.<ext>`, put back beside each layer whose
/// metadata was restored (`<layers>/<buildpack>/<layer>.sbom.<ext>`) as the restore phase
/// leaves them: a buildpack that keeps such a layer keeps its SBOM, one that rewrites the layer
/// writes a new one.
fn restore_launch_sboms(layers: &Path) -> Result<()> {
    let launch = layers.join("sbom").join("launch");
    if !launch.is_dir() {
        return Ok(());
    }
    for bp_dir in crate::env::subdirs(&launch)? {
        let Some(bp) = bp_dir.file_name() else {
            continue;
        };
        for layer_dir in crate::env::subdirs(&bp_dir)? {
            let Some(layer) = layer_dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let bp_layers = layers.join(bp);
            if !bp_layers.join(format!("{layer}.toml")).is_file() {
                continue;
            }
            for (ext, _) in SBOM_FORMATS {
                let from = layer_dir.join(format!("sbom.{ext}"));
                let to = bp_layers.join(format!("{layer}.sbom.{ext}"));
                if from.is_file() && !to.exists() {
                    std::fs::copy(&from, &to).map_err(io(&to))?;
                }
            }
        }
    }
    Ok(())
}

/// Finds and copies a buildpack's SBOM files: the layer's (`<layer>.sbom.<ext>`) when `layer`
/// is given, else the buildpack's own `launch.sbom.<ext>` and `build.sbom.<ext>`.
fn collect_sboms(
    bp: &Buildpack,
    bp_layers: &Path,
    layers_dir: &Path,
    layer: Option<(&str, crate::layer::LayerTypes)>,
) -> Result<Vec<SbomFile>> {
    let mut out = Vec::new();
    for (ext, media_type) in SBOM_FORMATS {
        let mut places: Vec<(PathBuf, SbomKind, Option<String>)> = Vec::new();
        match layer {
            Some((name, types)) => {
                let src = bp_layers.join(format!("{name}.sbom.{ext}"));
                if src.is_file() {
                    if types.launch {
                        places.push((src.clone(), SbomKind::Launch, Some(name.to_owned())));
                    }
                    if types.cache {
                        places.push((src.clone(), SbomKind::Cache, Some(name.to_owned())));
                    }
                    if types.build && !types.launch && !types.cache {
                        places.push((src.clone(), SbomKind::Build, Some(name.to_owned())));
                    }
                }
            }
            None => {
                for (file, kind) in [("launch", SbomKind::Launch), ("build", SbomKind::Build)] {
                    let src = bp_layers.join(format!("{file}.sbom.{ext}"));
                    if src.is_file() {
                        places.push((src, kind, None));
                    }
                }
            }
        }
        for (src, kind, layer_name) in places {
            if !bp.sbom_formats.iter().any(|f| f == media_type) {
                return Err(Error::Buildpack {
                    id: bp.key(),
                    phase: "build",
                    message: format!(
                        "{} is an SBOM of type {media_type}, which buildpack.toml does not declare in sbom-formats",
                        src.display()
                    ),
                });
            }
            let kind_dir = match kind {
                SbomKind::Launch => "launch",
                SbomKind::Build => "build",
                SbomKind::Cache => "cache",
            };
            let mut dest = layers_dir
                .join("sbom")
                .join(kind_dir)
                .join(escape_id(&bp.id));
            if let Some(n) = &layer_name {
                dest = dest.join(n);
            }
            std::fs::create_dir_all(&dest).map_err(io(&dest))?;
            let dest = dest.join(format!("sbom.{ext}"));
            std::fs::copy(&src, &dest).map_err(io(&dest))?;
            out.push(SbomFile {
                buildpack_id: bp.id.clone(),
                layer: layer_name,
                kind,
                format: (*ext).to_owned(),
                source: src.to_string_lossy().into_owned(),
                path: dest.to_string_lossy().into_owned(),
            });
        }
    }
    Ok(out)
}
