//! The buildpacks front end: a build from source lowered into Kiln's plan (kiln-plan), so the
//! engine runs it with the machinery it runs Dockerfiles with (sandbox, layer cache, push).
//!
//! - **Build stage**, on the build image: the lifecycle and the buildpacks are copied in, the
//!   app into `/workspace` (owned by the CNB user), the platform env into `/platform/env`, the
//!   previous image's layer metadata (`analyzed.toml` and each launch layer's `<layer>.toml`)
//!   and the cache image's layers into `/layers`; then, as the CNB user,
//!   `kiln-lifecycle detect` and `kiln-lifecycle build` run (the phases of the Platform API's
//!   detector and builder).
//! - **Export stage**, on the run image, written once the build stage has run (from the
//!   export description it left): one layer per launch layer (copied from the build stage, or
//!   from the previous image when a buildpack kept a layer without rewriting it), the app (its
//!   slices first), the launch SBOMs, `config/metadata.toml`, the launcher, the
//!   `/cnb/process/<type>` links, and the config (CNB env, user, working directory, labels,
//!   entrypoint). Once its layers are known, the lifecycle metadata label names their digests.
//! - **Cache stage**, on nothing: the cache layers, written as an image of their own to the
//!   cache repository, where the next build restores them from.
//!
//! Every new layer of the export and cache stages is dated 1980-01-01, as the lifecycle dates
//! them, so the same files always give the same layer (a kept dependency layer keeps its
//! digest).

use std::sync::{Arc, Mutex};

use kiln_plan::{
    Base, BaseFacts, CommandLine, ConfigEdit, Copy, CopySource, FrontEnd, Lower, LowerError, Mkdir,
    Operation, Plan, Provenance, Run, RunProgram, Source, Stage, StageFiles, StageLayers, Step,
    Steps,
};

use crate::buildpack::escape_id;
use crate::export::{ExportDescription, LayerSource, PlatformLayerDigests};
use crate::metadata::{
    Analyzed, ImageRef, LifecycleMetadata, RunImageForRebase, LIFECYCLE_METADATA_LABEL,
};

/// 1980-01-01T00:00:01Z: the time the lifecycle gives every file of an exported layer.
pub const LAYER_EPOCH: i64 = 315_532_801;

/// The layers directory of build and app images.
pub const LAYERS_DIR: &str = "/layers";

/// Where the lifecycle binary and the launcher are in an image.
pub const LIFECYCLE_DIR: &str = "/cnb/lifecycle";
/// The lifecycle binary's name in [`PlatformInputs::lifecycle_dir`] and in images.
pub const LIFECYCLE_BINARY: &str = "kiln-lifecycle";
/// The launcher's name in [`PlatformInputs::lifecycle_dir`] and in images.
pub const LAUNCHER_BINARY: &str = "launcher";

/// The user buildpacks run as in a build image that does not say (no `CNB_USER_ID`): an
/// unprivileged id that needs no passwd entry.
pub const DEFAULT_CNB_ID: u32 = 1000;

/// A buildpack in a directory of the machine running the build (Kiln's own, or one given with
/// `--buildpack DIR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBuildpack {
    /// The directory holding `buildpack.toml`.
    pub dir: String,
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: String,
}

/// The previous image of the app (the destination, or `--previous-image`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousImage {
    /// The image by digest.
    pub reference: String,
    /// Its `io.buildpacks.lifecycle.metadata` label.
    pub metadata: LifecycleMetadata,
}

/// Everything the front end needs that the engine finds out first (images, directories,
/// what earlier builds left).
#[derive(Debug, Clone)]
pub struct PlatformInputs {
    /// The image buildpacks run in (a builder image, or a plain image with the tools).
    pub build_image: String,
    /// The image the app runs on.
    pub run_image: String,
    /// A directory holding [`LIFECYCLE_BINARY`] and [`LAUNCHER_BINARY`] (static executables).
    pub lifecycle_dir: String,
    /// Buildpacks to copy into `/cnb/buildpacks` (none: the build image has its own).
    pub buildpacks: Vec<LocalBuildpack>,
    /// Buildpack package images whose `/cnb/buildpacks` is copied into the build image's.
    pub image_buildpacks: Vec<String>,
    /// The `order.toml` to use; `None`: the build image's own `/cnb/order.toml`.
    pub order_toml: Option<String>,
    /// Platform environment (`/platform/env`), in order.
    pub env: Vec<(String, String)>,
    /// The process the image runs by default (`--default-process`).
    pub default_process: Option<String>,
    /// Patterns (`.dockerignore` syntax) of app files left out (a project descriptor's
    /// `exclude`, or its `include` turned into exceptions).
    pub exclude: Vec<String>,
    /// The `io.buildpacks.project.metadata` label, when the project describes itself.
    pub project_metadata: Option<String>,
    /// The previous image, when there is one with buildpacks metadata.
    pub previous: Option<PreviousImage>,
    /// The cache image to restore from (an earlier build's), unless the cache is cleared.
    pub restore_cache_from: Option<String>,
    /// Where to write this build's cache image.
    pub write_cache_to: Option<String>,
    /// What the layer cache's stage records are found by.
    pub identity: String,
}

fn provenance(text: impl Into<String>) -> Provenance {
    Provenance {
        front_end: FrontEnd::Buildpacks,
        file: String::new(),
        line: 0,
        text: text.into(),
    }
}

fn step(operation: Operation, text: impl Into<String>) -> Step {
    Step::new(operation, provenance(text))
}

fn copy(from: Option<Source>, sources: Vec<CopySource>, dest: &str) -> Copy {
    let mut copy = Copy::new(sources, dest);
    copy.from = from;
    copy
}

fn path(p: &str) -> CopySource {
    CopySource::Path(p.to_owned())
}

/// The CNB user and group of an image (`CNB_USER_ID`, `CNB_GROUP_ID`), [`DEFAULT_CNB_ID`] when
/// it does not say, and whether it said.
fn cnb_ids(base: &BaseFacts) -> (u32, u32, bool) {
    let id = |name: &str| {
        base.env
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<u32>().ok())
    };
    match (id("CNB_USER_ID"), id("CNB_GROUP_ID")) {
        (Some(uid), gid) => (uid, gid.unwrap_or(uid), true),
        (None, _) => (DEFAULT_CNB_ID, DEFAULT_CNB_ID, false),
    }
}

/// The plan of a buildpacks build.
pub fn plan(inputs: PlatformInputs) -> Result<Plan, kiln_plan::PlanError> {
    let inputs = Arc::new(inputs);
    let mut stages = vec![
        Stage {
            id: 0,
            name: Some("build".into()),
            base: Base::Image(inputs.build_image.clone()),
            origin: provenance(format!("build image {}", inputs.build_image)),
            dependencies: Vec::new(),
            steps: Steps::Lowered(Arc::new(BuildStage(inputs.clone()))),
            layer_epoch: None,
        },
        Stage {
            id: 1,
            name: Some("export".into()),
            base: Base::Image(inputs.run_image.clone()),
            origin: provenance(format!("run image {}", inputs.run_image)),
            dependencies: vec![0],
            steps: Steps::Lowered(Arc::new(ExportStage {
                inputs: inputs.clone(),
                lowered: Mutex::new(None),
            })),
            layer_epoch: Some(LAYER_EPOCH),
        },
    ];
    if inputs.write_cache_to.is_some() {
        stages.push(Stage {
            id: 2,
            name: Some("cache".into()),
            base: Base::Scratch,
            origin: provenance("cache image"),
            dependencies: vec![0],
            steps: Steps::Lowered(Arc::new(CacheStage)),
            layer_epoch: Some(LAYER_EPOCH),
        });
    }
    let plan = Plan::new(FrontEnd::Buildpacks, inputs.identity.clone(), stages, 1)?;
    Ok(match &inputs.write_cache_to {
        Some(destination) => plan.with_extra_image(kiln_plan::ExtraImage {
            stage: 2,
            destination: destination.clone(),
        }),
        None => plan,
    })
}

/// The build stage's steps (they depend on the build image's CNB user).
struct BuildStage(Arc<PlatformInputs>);

impl Lower for BuildStage {
    fn lower(&self, base: &BaseFacts, _: &dyn StageFiles) -> Result<Vec<Step>, LowerError> {
        let inputs = &self.0;
        let (uid, gid, cnb_image) = cnb_ids(base);
        let owner = format!("{uid}:{gid}");
        let local = |dir: &str| Some(Source::Local(dir.to_owned()));
        let mut steps = vec![step(
            Operation::Config(ConfigEdit::User("0:0".into())),
            "copy as root",
        )];
        steps.push(step(
            Operation::Copy(copy(
                local(&inputs.lifecycle_dir),
                vec![path(LIFECYCLE_BINARY)],
                &format!("{LIFECYCLE_DIR}/"),
            )),
            "copy the lifecycle",
        ));
        for bp in &inputs.buildpacks {
            let dest = format!("/cnb/buildpacks/{}/{}/", escape_id(&bp.id), bp.version);
            steps.push(step(
                Operation::Copy(copy(local(&bp.dir), vec![path(".")], &dest)),
                format!("copy buildpack {}@{}", bp.id, bp.version),
            ));
        }
        for image in &inputs.image_buildpacks {
            steps.push(step(
                Operation::Copy(copy(
                    Some(Source::Image(image.clone())),
                    vec![path("/cnb/buildpacks/")],
                    "/cnb/buildpacks/",
                )),
                format!("copy the buildpacks of {image}"),
            ));
        }
        if let Some(order) = &inputs.order_toml {
            let order_file = CopySource::Inline {
                name: "order.toml".into(),
                content: order.clone(),
            };
            steps.push(step(
                Operation::Copy(copy(None, vec![order_file], "/cnb/")),
                "write the order",
            ));
        }
        steps.push(step(
            Operation::Config(ConfigEdit::User(owner.clone())),
            format!("CNB user {owner}"),
        ));
        for dir in ["/layers", "/platform/env", "/workspace"] {
            steps.push(step(
                Operation::Mkdir(Mkdir {
                    path: dir.into(),
                    set_working_dir: false,
                }),
                format!("mkdir {dir}"),
            ));
        }
        if !cnb_image {
            // An image not made for buildpacks has no home for the CNB user, where tools
            // (npm, pip, go) keep their caches.
            steps.push(step(
                Operation::Mkdir(Mkdir {
                    path: "/home/cnb".into(),
                    set_working_dir: false,
                }),
                "mkdir /home/cnb",
            ));
            steps.push(step(
                Operation::Config(ConfigEdit::Env(vec![("HOME".into(), "/home/cnb".into())])),
                "HOME for the CNB user",
            ));
        }
        // What an earlier build left goes in before the app: it changes less often than the
        // app's source, so a rebuild after an edit takes these steps from the cache.
        steps.extend(restore_steps(inputs, &owner)?);
        let mut app = copy(None, vec![path(".")], "/workspace/");
        app.chown = Some(owner.clone());
        app.exclude = inputs.exclude.clone();
        steps.push(step(Operation::Copy(app), "copy the app"));
        if !inputs.env.is_empty() {
            let files = inputs
                .env
                .iter()
                .map(|(name, value)| CopySource::Inline {
                    name: name.clone(),
                    content: value.clone(),
                })
                .collect();
            let mut env = copy(None, files, "/platform/env/");
            env.chown = Some(owner.clone());
            steps.push(step(Operation::Copy(env), "write the platform env"));
        }
        let lifecycle = format!("{LIFECYCLE_DIR}/{LIFECYCLE_BINARY}");
        steps.push(step(
            run(vec![lifecycle.clone(), "detect".into()]),
            "detect (kiln-lifecycle detect)",
        ));
        let mut build = vec![lifecycle, "build".into()];
        if let Some(process) = &inputs.default_process {
            build.extend(["-process-type".into(), process.clone()]);
        }
        steps.push(step(run(build), "build (kiln-lifecycle build)"));
        Ok(steps)
    }
}

fn run(argv: Vec<String>) -> Operation {
    Operation::Run(Run {
        program: RunProgram::Exec(argv),
        mounts: Vec::new(),
        network: Default::default(),
        security: Default::default(),
        build_env: Vec::new(),
        unkeyed_env: Vec::new(),
    })
}

/// What the build phase starts from: the previous image's layer metadata (so buildpacks can
/// keep launch layers without rewriting them) and the cache image's layers.
fn restore_steps(inputs: &PlatformInputs, owner: &str) -> Result<Vec<Step>, LowerError> {
    let mut steps = Vec::new();
    if let Some(previous) = &inputs.previous {
        let analyzed = Analyzed {
            image: Some(ImageRef {
                reference: previous.reference.clone(),
            }),
            metadata: previous.metadata.clone(),
            run_image: None,
        };
        let mut files = vec![CopySource::Inline {
            name: "analyzed.toml".into(),
            content: to_toml(&analyzed)?,
        }];
        for (bp, name, content) in layer_tomls(&previous.metadata) {
            files.push(CopySource::Inline {
                name: format!("{}/{name}.toml", escape_id(&bp)),
                content,
            });
        }
        let mut restore = copy(None, files, "/layers/");
        restore.chown = Some(owner.to_owned());
        restore.parents = false;
        steps.push(step(
            Operation::Copy(restore),
            "restore the previous image's layer metadata",
        ));
        if previous
            .metadata
            .sbom
            .as_ref()
            .is_some_and(|s| !s.sha.is_empty())
        {
            let mut sboms = copy(
                Some(Source::Image(previous.reference.clone())),
                vec![path(&format!("{LAYERS_DIR}/sbom/launch/"))],
                &format!("{LAYERS_DIR}/sbom/launch/"),
            );
            sboms.chown = Some(owner.to_owned());
            steps.push(step(
                Operation::Copy(sboms),
                "restore the previous image's launch SBOMs",
            ));
        }
    }
    if let Some(cache) = &inputs.restore_cache_from {
        let mut restore = copy(
            Some(Source::Image(cache.clone())),
            vec![path("/layers/")],
            "/layers/",
        );
        // The cache was written by the CNB user of an earlier build image.
        restore.chown = Some(owner.to_owned());
        steps.push(step(
            Operation::Copy(restore),
            format!("restore the cache from {cache}"),
        ));
    }
    Ok(steps)
}

/// `value` as a TOML document. Label metadata is JSON, which may hold nulls (a layer without
/// metadata, or another platform's label); TOML has none, so they are left out, as absent keys
/// read back as the same defaults.
fn to_toml(value: &impl serde::Serialize) -> Result<String, LowerError> {
    fn strip(value: serde_json::Value) -> Option<serde_json::Value> {
        use serde_json::Value;
        match value {
            Value::Null => None,
            Value::Array(items) => {
                Some(Value::Array(items.into_iter().filter_map(strip).collect()))
            }
            Value::Object(map) => Some(Value::Object(
                map.into_iter()
                    .filter_map(|(k, v)| Some((k, strip(v)?)))
                    .collect(),
            )),
            other => Some(other),
        }
    }
    let json = serde_json::to_value(value)
        .map_err(|e| LowerError(format!("buildpacks: analyzed.toml: {e}")))?;
    let json = strip(json).unwrap_or(serde_json::Value::Object(Default::default()));
    toml::to_string(&json).map_err(|e| LowerError(format!("buildpacks: analyzed.toml: {e}")))
}

/// The `<layer>.toml` of every launch layer of an earlier image: (buildpack id, layer name,
/// content), as the restore phase leaves them for buildpacks to read.
pub fn layer_tomls(metadata: &LifecycleMetadata) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for bp in &metadata.buildpacks {
        for (name, layer) in &bp.layers {
            let mut doc = toml::Table::new();
            let mut types = toml::Table::new();
            types.insert("launch".into(), layer.launch.into());
            types.insert("build".into(), layer.build.into());
            types.insert("cache".into(), layer.cache.into());
            doc.insert("types".into(), toml::Value::Table(types));
            if let Ok(toml::Value::Table(data)) = toml::Value::try_from(&layer.data) {
                doc.insert("metadata".into(), toml::Value::Table(data));
            }
            out.push((
                bp.key.clone(),
                name.clone(),
                toml::to_string(&doc).unwrap_or_default(),
            ));
        }
    }
    out
}

/// What each step of the export stage wrote, for the lifecycle metadata label.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Layer { buildpack: String, name: String },
    App,
    Sbom,
    Config,
    Launcher,
    ProcessTypes,
    Other,
}

/// The export stage's steps, from the build stage's export description.
struct ExportStage {
    inputs: Arc<PlatformInputs>,
    /// The description and each step's role, kept for [`Lower::finish`].
    lowered: Mutex<Option<(ExportDescription, Vec<Role>)>>,
}

/// The export description the build stage left.
fn description(stages: &dyn StageFiles) -> Result<ExportDescription, LowerError> {
    let where_ = format!("/layers/{}", crate::export::EXPORT_DESCRIPTION_PATH);
    let bytes = stages
        .read(0, &where_)
        .map_err(|e| LowerError(format!("buildpacks: reading {where_}: {e}")))?
        .ok_or_else(|| {
            LowerError(format!(
                "buildpacks: the build left no {where_} (did the build phase run?)"
            ))
        })?;
    let text = String::from_utf8_lossy(&bytes);
    ExportDescription::from_json(std::path::Path::new(&where_), &text)
        .map_err(|e| LowerError(format!("buildpacks: {e}")))
}

impl Lower for ExportStage {
    fn lower(&self, base: &BaseFacts, stages: &dyn StageFiles) -> Result<Vec<Step>, LowerError> {
        let inputs = &self.inputs;
        let desc = description(stages)?;
        let (uid, gid, _) = cnb_ids(base);
        let build = || Some(Source::Stage(0));
        let mut steps = Vec::new();
        let mut roles = Vec::new();
        let mut add = |op: Operation, text: String, role: Role| {
            // Each layer is made on its own, as the lifecycle's exporter makes them, not on a
            // copy of the run image: the engine then never unpacks the run image for the
            // export (`--link` semantics; the run image has none of these paths).
            let op = match op {
                Operation::Copy(mut copy) => {
                    copy.link = true;
                    Operation::Copy(copy)
                }
                other => other,
            };
            steps.push(step(op, text));
            roles.push(role);
        };
        for layer in &desc.launch_layers {
            let from = match &layer.source {
                LayerSource::Directory => build(),
                LayerSource::Reuse { .. } => match &inputs.previous {
                    Some(previous) => Some(Source::Image(previous.reference.clone())),
                    None => {
                        return Err(LowerError(format!(
                            "buildpacks: {} kept layer {} from a previous image, but there is none",
                            layer.buildpack_id, layer.name
                        )))
                    }
                },
            };
            let mut layer_copy = copy(from, vec![path(&layer.path)], &layer.path);
            if let LayerSource::Reuse { digest } = &layer.source {
                layer_copy.reuse_layer = Some(digest.clone());
            }
            add(
                Operation::Copy(layer_copy),
                format!("layer {}:{}", layer.buildpack_id, layer.name),
                Role::Layer {
                    buildpack: layer.buildpack_id.clone(),
                    name: layer.name.clone(),
                },
            );
        }
        let app = &desc.app.path;
        let mut slice_globs = Vec::new();
        for slice in &desc.app.slices {
            let mut sliced = copy(
                build(),
                slice
                    .paths
                    .iter()
                    .map(|glob| path(&format!("{app}/./{glob}")))
                    .collect(),
                &format!("{app}/"),
            );
            sliced.parents = true;
            slice_globs.extend(slice.paths.iter().cloned());
            add(Operation::Copy(sliced), "app slice".into(), Role::App);
        }
        let mut rest = copy(build(), vec![path(app)], app);
        rest.exclude = slice_globs;
        add(Operation::Copy(rest), "app".into(), Role::App);
        if let Some(sbom) = &desc.launch_sbom_dir {
            add(
                Operation::Copy(copy(build(), vec![path(sbom)], sbom)),
                "launch SBOMs".into(),
                Role::Sbom,
            );
        }
        let config_path = &desc.launch_metadata_path;
        add(
            Operation::Copy(copy(build(), vec![path(config_path)], config_path)),
            "launcher metadata".into(),
            Role::Config,
        );
        let launcher = format!("{LIFECYCLE_DIR}/{LAUNCHER_BINARY}");
        add(
            Operation::Copy(copy(
                Some(Source::Local(inputs.lifecycle_dir.clone())),
                vec![path(LAUNCHER_BINARY)],
                &format!("{LIFECYCLE_DIR}/"),
            )),
            "launcher".into(),
            Role::Launcher,
        );
        if !desc.processes.is_empty() {
            let links = desc
                .processes
                .iter()
                .map(|p| CopySource::Symlink {
                    name: p.kind.clone(),
                    target: launcher.clone(),
                })
                .collect();
            add(
                Operation::Copy(copy(None, links, "/cnb/process/")),
                "process types".into(),
                Role::ProcessTypes,
            );
        }
        for edit in config_edits(inputs, &desc, uid, gid, &launcher) {
            add(Operation::Config(edit), "config".into(), Role::Other);
        }
        *self.lowered.lock().expect("export stage") = Some((desc, roles));
        Ok(steps)
    }

    fn notes(&self) -> Vec<String> {
        let lowered = self.lowered.lock().expect("export stage");
        let Some((desc, _)) = lowered.as_ref() else {
            return Vec::new();
        };
        let group: Vec<String> = desc.buildpacks.iter().map(|bp| bp.key()).collect();
        let mut notes = vec![format!("buildpack group: {}", group.join(", "))];
        if let Some(process) = &desc.default_process {
            notes.push(format!("default process: {process}"));
        }
        notes
    }

    fn finish(&self, layers: &StageLayers) -> Result<Vec<ConfigEdit>, LowerError> {
        let lowered = self.lowered.lock().expect("export stage");
        let Some((desc, roles)) = lowered.as_ref() else {
            return Ok(Vec::new());
        };
        let of = |wanted: &Role| -> Vec<String> {
            roles
                .iter()
                .zip(&layers.steps)
                .filter(|(role, _)| *role == wanted)
                .filter_map(|(_, digest)| digest.clone())
                .collect()
        };
        let first = |role: Role| of(&role).into_iter().next().unwrap_or_default();
        let digests = PlatformLayerDigests {
            app: of(&Role::App),
            sbom: of(&Role::Sbom).into_iter().next(),
            config: first(Role::Config),
            launcher: first(Role::Launcher),
            process_types: first(Role::ProcessTypes),
            run_image: RunImageForRebase {
                top_layer: layers.base.last().cloned().unwrap_or_default(),
                reference: layers.base_image.clone().unwrap_or_default(),
                image: self.inputs.run_image.clone(),
                mirrors: Vec::new(),
            },
        };
        let label = desc.lifecycle_metadata_label(
            |bp, name| {
                first(Role::Layer {
                    buildpack: bp.to_owned(),
                    name: name.to_owned(),
                })
                .into()
            },
            &digests,
        );
        Ok(vec![ConfigEdit::Labels(vec![(
            LIFECYCLE_METADATA_LABEL.to_owned(),
            label,
        )])])
    }
}

/// The export stage's config: the CNB environment, user, working directory, labels and
/// entrypoint.
fn config_edits(
    inputs: &PlatformInputs,
    desc: &ExportDescription,
    uid: u32,
    gid: u32,
    launcher: &str,
) -> Vec<ConfigEdit> {
    let mut labels = vec![(
        crate::metadata::BUILD_METADATA_LABEL.to_owned(),
        desc.build_metadata_label.clone(),
    )];
    if let Some(project) = &inputs.project_metadata {
        labels.push((
            crate::metadata::PROJECT_METADATA_LABEL.to_owned(),
            project.clone(),
        ));
    }
    labels.extend(desc.labels.iter().map(|l| (l.key.clone(), l.value.clone())));
    let entrypoint = match &desc.default_process {
        Some(process) => format!("/cnb/process/{process}"),
        None => launcher.to_owned(),
    };
    vec![
        ConfigEdit::Env(vec![
            ("CNB_LAYERS_DIR".into(), desc.layers_dir.clone()),
            ("CNB_APP_DIR".into(), desc.app.path.clone()),
            ("CNB_PLATFORM_API".into(), desc.platform_api.clone()),
        ]),
        ConfigEdit::User(format!("{uid}:{gid}")),
        ConfigEdit::WorkingDir(desc.app.path.clone()),
        ConfigEdit::Labels(labels),
        ConfigEdit::Entrypoint(CommandLine::Exec(vec![entrypoint])),
        ConfigEdit::Cmd(CommandLine::Exec(Vec::new())),
    ]
}

/// The cache stage's steps: every cache layer with its `<layer>.toml`, at the paths the next
/// build restores them to.
struct CacheStage;

impl Lower for CacheStage {
    fn lower(&self, _: &BaseFacts, stages: &dyn StageFiles) -> Result<Vec<Step>, LowerError> {
        let desc = description(stages)?;
        let mut steps = vec![step(
            Operation::Mkdir(Mkdir {
                path: desc.layers_dir.clone(),
                set_working_dir: false,
            }),
            "cache layers",
        )];
        for layer in &desc.cache_layers {
            let dir = format!("{}/{}/", desc.layers_dir, escape_id(&layer.buildpack_id));
            let text = format!("cache layer {}:{}", layer.buildpack_id, layer.name);
            // Each layer made on its own (`--link`), as the export's are: nothing is read from
            // the stage's own tree, and the files are staged where the engine stages linked
            // copies (a tmpfs when it has one).
            let mut content = copy(Some(Source::Stage(0)), vec![path(&layer.path)], &layer.path);
            content.link = true;
            steps.push(step(Operation::Copy(content), text.clone()));
            let mut metadata = copy(
                Some(Source::Stage(0)),
                vec![path(&layer.metadata_path)],
                &dir,
            );
            metadata.link = true;
            steps.push(step(Operation::Copy(metadata), format!("{text} metadata")));
        }
        Ok(steps)
    }
}
