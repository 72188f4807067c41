//! The buildpacks front end's side in the engine: what must be found out before kiln-cnb can
//! lower a build from source into a plan (the project descriptor, the builder's metadata, the
//! buildpacks named by URI, the previous image and the cache image), and the front-end choice
//! itself.

mod defaults;
mod uris;

pub use uris::BUILTIN_DIR_ENV;

use std::path::{Path, PathBuf};

use kiln_cnb::builder::BuilderMetadata;
use kiln_cnb::metadata::{LifecycleMetadata, BUILDER_METADATA_LABEL, LIFECYCLE_METADATA_LABEL};
use kiln_cnb::order::{GroupEntry, Order, OrderGroup};
use kiln_cnb::platform::{PlatformInputs, PreviousImage, LAUNCHER_BINARY, LIFECYCLE_BINARY};
use kiln_cnb::project::{parse_project_toml, ProjectDescriptor};
use kiln_context::BuildContext;
use kiln_oci::image::ImageConfig;
use kiln_oci::{Platform, Reference};
use kiln_plan::Plan;
use kiln_registry::Client;

use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};
use crate::options::{BuildOptions, FrontEndChoice};

/// The label a builder image lists its order in (JSON), as `pack` writes it.
const BUILDER_ORDER_LABEL: &str = "io.buildpacks.buildpack.order";

/// The environment variable naming the directory of Kiln's static lifecycle binaries.
pub const LIFECYCLE_DIR_ENV: &str = "KILN_LIFECYCLE_DIR";

/// Which front end a build uses: buildpacks when asked for, or when the context has no
/// Dockerfile and none was named.
pub(crate) fn uses_buildpacks(options: &BuildOptions, dockerfile_found: bool) -> bool {
    match options.front_end {
        FrontEndChoice::Dockerfile => false,
        FrontEndChoice::Buildpacks => true,
        FrontEndChoice::Auto => !dockerfile_found,
    }
}

/// What a buildpacks plan is made from, found out before it is made.
pub(crate) struct Gathered<'a> {
    pub(crate) options: &'a BuildOptions,
    pub(crate) context: &'a BuildContext,
    pub(crate) client: &'a Client,
    pub(crate) platform: &'a Platform,
    pub(crate) work_dir: &'a Path,
    pub(crate) events: &'a EventSink,
}

/// The plan of a buildpacks build of the context.
pub(crate) async fn plan(facts: Gathered<'_>) -> Result<Plan, BuildError> {
    let options = facts.options;
    let bp = &options.buildpacks;
    let descriptor = read_descriptor(facts.context, bp.descriptor.as_deref())?;
    let builder_name = bp
        .builder
        .clone()
        .or_else(|| descriptor.as_ref().and_then(|d| d.builder.clone()));
    if builder_name.is_some() && bp.build_image.is_some() {
        return Err(BuildError::Options(
            "--build-image and --builder both name the image buildpacks run in: give one".into(),
        ));
    }
    let builder = match &builder_name {
        Some(name) => Some(BuilderImage::fetch(facts.client, name, facts.platform).await?),
        None => None,
    };
    let group = uris::resolve_group(&facts, descriptor.as_ref(), builder.as_ref()).await?;
    let builtin_order = builder.is_none() && group.is_none();
    let (buildpacks, image_buildpacks, order) = match group {
        Some(group) => group.into_parts(descriptor.as_ref())?,
        None => default_order(&facts, descriptor.as_ref(), builder.as_ref())?,
    };
    let (build_image, run_image) = images(&facts, builder.as_ref(), builtin_order)?;
    let lifecycle_dir = lifecycle_dir(bp.lifecycle_dir.as_deref())?;
    let previous = previous_image(&facts).await;
    let (restore_cache_from, write_cache_to) = cache_image(&facts).await;
    let mut env = descriptor
        .as_ref()
        .map(|d| d.env.clone())
        .unwrap_or_default();
    for (name, value) in env_files(&bp.env_files)?.iter().chain(&bp.env) {
        env.retain(|(n, _)| n != name);
        env.push((name.clone(), value.clone()));
    }
    (facts.events)(BuildEvent::Note {
        message: format!(
            "front end: buildpacks (build image {build_image}, run image {run_image}{})",
            match &order {
                Some(order) => format!(", order: {}", describe_order(order)),
                None => ", the builder's order".into(),
            }
        ),
    });
    let identity = format!(
        "buildpacks\n{}\n{build_image}\n{run_image}\n{}",
        options.context.source,
        options
            .output
            .destinations
            .first()
            .map_or("", String::as_str)
    );
    let inputs = PlatformInputs {
        build_image,
        run_image,
        lifecycle_dir: lifecycle_dir.display().to_string(),
        buildpacks,
        image_buildpacks,
        order_toml: order.map(|o| toml::to_string(&o).unwrap_or_default()),
        env,
        default_process: bp.default_process.clone(),
        exclude: descriptor.as_ref().map(app_exclusions).unwrap_or_default(),
        project_metadata: descriptor.as_ref().map(project_label),
        previous,
        restore_cache_from,
        write_cache_to,
        identity,
    };
    kiln_cnb::platform::plan(inputs).map_err(|e| BuildError::Plan(format!("buildpacks: {e}")))
}

/// The build and run images: the builder and its run image, the flags, and for Kiln's own
/// buildpacks the defaults of the language the context is taken for (see [`defaults`]); with
/// other buildpacks and no builder, the run image defaults to the build image.
fn images(
    facts: &Gathered<'_>,
    builder: Option<&BuilderImage>,
    builtin_order: bool,
) -> Result<(String, String), BuildError> {
    let bp = &facts.options.buildpacks;
    if let Some(builder) = builder {
        let run = match &bp.run_image {
            Some(image) => image.clone(),
            None => builder.run_image()?,
        };
        return Ok((builder.name.clone(), run));
    }
    let language = builtin_order
        .then(|| defaults::detect_context(facts.context))
        .flatten();
    if let Some(language) = &language {
        let (build, run) = language.images();
        let chosen = |flag: &Option<String>, default: String| match flag {
            Some(image) => image.clone(),
            None => default,
        };
        let (build, run) = (chosen(&bp.build_image, build), chosen(&bp.run_image, run));
        (facts.events)(BuildEvent::Note {
            message: format!(
                "buildpacks: the app looks like a {} app: build image {build}, run image {run}",
                language.name()
            ),
        });
        return Ok((build, run));
    }
    let Some(build) = bp.build_image.clone() else {
        let why = if builtin_order {
            format!(
                "Kiln's own buildpacks found none of {} in the context to choose images by, so a buildpacks build needs the image buildpacks run in: give --build-image IMAGE (or --builder IMAGE, a CNB builder)",
                defaults::MARKERS
            )
        } else {
            "a buildpacks build needs the image buildpacks run in: give --builder IMAGE (a CNB builder) or --build-image IMAGE".into()
        };
        return Err(BuildError::Options(why));
    };
    let run = bp.run_image.clone().unwrap_or_else(|| build.clone());
    Ok((build, run))
}

/// The variables of `--env-file`s: `NAME=VALUE` lines (`NAME` alone takes the executor's
/// own value), blank lines and `#` comments skipped.
fn env_files(files: &[PathBuf]) -> Result<Vec<(String, String)>, BuildError> {
    let mut env = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(BuildError::io(file))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some(("", _)) => {
                    return Err(BuildError::Options(format!(
                        "--env-file {}:{}: missing the name before '='",
                        file.display(),
                        number + 1
                    )))
                }
                Some((name, value)) => env.push((name.to_owned(), value.to_owned())),
                None => {
                    if let Ok(value) = std::env::var(line) {
                        env.push((line.to_owned(), value));
                    }
                }
            }
        }
    }
    Ok(env)
}

/// `id@version, ...` of each group of `order`, groups separated by ` | `.
fn describe_order(order: &Order) -> String {
    order
        .order
        .iter()
        .map(|group| {
            group
                .group
                .iter()
                .map(|e| match &e.version {
                    Some(v) => format!("{}@{v}", e.id),
                    None => e.id.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The project descriptor: the one named (`--descriptor`; relative to the context, or an
/// absolute path outside it), else the context's `project.toml` if it has one.
fn read_descriptor(
    context: &BuildContext,
    named: Option<&Path>,
) -> Result<Option<ProjectDescriptor>, BuildError> {
    let (path, text) = match named {
        Some(path) if path.is_absolute() && !path.starts_with(context.root()) => {
            let text = std::fs::read_to_string(path).map_err(BuildError::io(path))?;
            (path.to_path_buf(), text)
        }
        Some(path) => {
            let rel = path.strip_prefix(context.root()).unwrap_or(path);
            match read_context_file(context, rel)? {
                Some(text) => (context.root().join(rel), text),
                None => {
                    return Err(BuildError::Options(format!(
                        "--descriptor {}: no such file in the context",
                        path.display()
                    )))
                }
            }
        }
        None => match read_context_file(context, Path::new("project.toml"))? {
            Some(text) => (PathBuf::from("project.toml"), text),
            None => return Ok(None),
        },
    };
    parse_project_toml(&path, &text)
        .map(Some)
        .map_err(|e| BuildError::Plan(e.to_string()))
}

/// A file of the context, read through its root; `None` when it does not exist.
fn read_context_file(context: &BuildContext, rel: &Path) -> Result<Option<String>, BuildError> {
    let file = match context.tree().open_file(rel) {
        Ok(file) => file,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(BuildError::Context(Box::new(e))),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &file, &mut text).map_err(|source| BuildError::Io {
        path: context.root().join(rel),
        source,
    })?;
    Ok(Some(text))
}

/// A descriptor's `exclude`, or its `include` as "everything but these".
fn app_exclusions(descriptor: &ProjectDescriptor) -> Vec<String> {
    if !descriptor.include.is_empty() {
        std::iter::once("**".to_owned())
            .chain(descriptor.include.iter().map(|p| format!("!{p}")))
            .collect()
    } else {
        descriptor.exclude.clone()
    }
}

/// The `io.buildpacks.project.metadata` label of a project that describes itself.
fn project_label(descriptor: &ProjectDescriptor) -> String {
    let mut metadata = serde_json::Map::new();
    for (key, value) in [
        ("id", &descriptor.id),
        ("name", &descriptor.name),
        ("version", &descriptor.version),
    ] {
        if let Some(value) = value {
            metadata.insert(key.into(), value.clone().into());
        }
    }
    serde_json::json!({
        "source": {
            "type": "project",
            "version": { "declared": descriptor.version.clone().unwrap_or_default() },
            "metadata": metadata,
        }
    })
    .to_string()
}

/// A CNB builder image, as its labels describe it.
pub(crate) struct BuilderImage {
    pub(crate) name: String,
    pub(crate) metadata: BuilderMetadata,
    pub(crate) order: Option<Order>,
}

impl BuilderImage {
    async fn fetch(
        client: &Client,
        name: &str,
        platform: &Platform,
    ) -> Result<BuilderImage, BuildError> {
        let config = image_config(client, name, platform).await?;
        let labels = config.config.labels.unwrap_or_default();
        let not_builder = |why: String| {
            BuildError::Options(format!("--builder {name}: not a CNB builder image: {why}"))
        };
        let metadata = labels
            .get(BUILDER_METADATA_LABEL)
            .ok_or_else(|| not_builder(format!("it has no {BUILDER_METADATA_LABEL} label")))
            .and_then(|json| {
                BuilderMetadata::from_label(json).map_err(|e| not_builder(e.to_string()))
            })?;
        let order = match labels.get(BUILDER_ORDER_LABEL) {
            Some(json) => {
                let groups: Vec<OrderGroup> = serde_json::from_str(json)
                    .map_err(|e| not_builder(format!("label {BUILDER_ORDER_LABEL}: {e}")))?;
                Some(Order { order: groups })
            }
            None => None,
        };
        Ok(BuilderImage {
            name: name.to_owned(),
            metadata,
            order,
        })
    }

    fn run_image(&self) -> Result<String, BuildError> {
        self.metadata
            .run_image()
            .map(|r| r.image.clone())
            .ok_or_else(|| {
                BuildError::Options(format!(
                    "--builder {}: its metadata names no run image; give --run-image",
                    self.name
                ))
            })
    }

    fn has(&self, entry: &GroupEntry) -> bool {
        self.metadata
            .buildpacks
            .iter()
            .any(|b| b.id == entry.id && entry.version.as_ref().is_none_or(|v| *v == b.version))
    }
}

/// The config of `image` (for `platform`).
pub(crate) async fn image_config(
    client: &Client,
    image: &str,
    platform: &Platform,
) -> Result<ImageConfig, BuildError> {
    let manifest = crate::base::resolve_manifest(client, image, platform).await?;
    Ok(manifest.with_config(client, None).await?.config)
}

/// The order when no group was named: the builder's own (with the descriptor's pre- and
/// post-buildpacks around each group), or Kiln's builtin buildpacks.
#[allow(clippy::type_complexity)]
fn default_order(
    facts: &Gathered<'_>,
    descriptor: Option<&ProjectDescriptor>,
    builder: Option<&BuilderImage>,
) -> Result<
    (
        Vec<kiln_cnb::platform::LocalBuildpack>,
        Vec<String>,
        Option<Order>,
    ),
    BuildError,
> {
    let (pre, post) = match descriptor {
        Some(d) => (
            uris::plain_entries(&d.pre_buildpacks, "pre")?,
            uris::plain_entries(&d.post_buildpacks, "post")?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let wrap = |order: Order| Order {
        order: order
            .order
            .into_iter()
            .map(|g| OrderGroup {
                group: pre
                    .iter()
                    .cloned()
                    .chain(g.group)
                    .chain(post.iter().cloned())
                    .collect(),
            })
            .collect(),
    };
    if let Some(builder) = builder {
        if pre.is_empty() && post.is_empty() {
            return Ok((Vec::new(), Vec::new(), None));
        }
        for entry in pre.iter().chain(&post) {
            if !builder.has(entry) {
                return Err(BuildError::Options(format!(
                    "project.toml: buildpack {} is not in builder {}",
                    entry.id, builder.name
                )));
            }
        }
        let order = builder.order.clone().ok_or_else(|| {
            BuildError::Options(format!(
                "project.toml names pre/post buildpacks, but builder {} does not list its order in a {BUILDER_ORDER_LABEL} label",
                builder.name
            ))
        })?;
        return Ok((Vec::new(), Vec::new(), Some(wrap(order))));
    }
    let (buildpacks, order) = uris::builtin(facts.options)?;
    if !pre.is_empty() || !post.is_empty() {
        return Err(BuildError::Options(
            "project.toml names pre/post buildpacks: they need a --builder holding them".into(),
        ));
    }
    Ok((buildpacks, Vec::new(), Some(order)))
}

/// The directory of the static `kiln-lifecycle` and `launcher` Kiln copies into images: the
/// one named, else `$KILN_LIFECYCLE_DIR`, else `lifecycle/` beside the executor (where Kiln's
/// image has them).
fn lifecycle_dir(named: Option<&Path>) -> Result<PathBuf, BuildError> {
    let dir = match named {
        Some(dir) => dir.to_path_buf(),
        None => match std::env::var_os(LIFECYCLE_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|p| p.join("lifecycle")))
                .unwrap_or_else(|| PathBuf::from("/kaniko/lifecycle")),
        },
    };
    for binary in [LIFECYCLE_BINARY, LAUNCHER_BINARY] {
        if !dir.join(binary).is_file() {
            return Err(BuildError::Options(format!(
                "buildpacks need Kiln's static lifecycle binaries, but {} has no {binary} (set {LIFECYCLE_DIR_ENV}, or build them with scripts/build-lifecycle)",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// The previous image of the app (`--previous-image`, else the first destination), when it
/// exists and was built by a CNB platform. Not finding it is the first build; failing to read
/// it only costs the reuse, so it is a warning.
async fn previous_image(facts: &Gathered<'_>) -> Option<PreviousImage> {
    let options = facts.options;
    let name = options
        .buildpacks
        .previous_image
        .clone()
        .or_else(|| options.output.destinations.first().cloned())?;
    let found = async {
        let manifest = crate::base::resolve_manifest(facts.client, &name, facts.platform).await?;
        let digest = manifest.digest().clone();
        let config = manifest.with_config(facts.client, None).await?.config;
        Ok::<_, BuildError>((digest, config))
    }
    .await;
    let (digest, config) = match found {
        Ok(found) => found,
        Err(BuildError::Registry(e)) if e.status().is_some_and(|s| s.as_u16() == 404) => {
            return None
        }
        Err(e) => {
            (facts.events)(BuildEvent::Warning {
                message: format!("previous image {name}: {e}; no layer of it is reused"),
            });
            return None;
        }
    };
    let label = config.config.labels.unwrap_or_default();
    let metadata = LifecycleMetadata::from_label(label.get(LIFECYCLE_METADATA_LABEL)?);
    let metadata = match metadata {
        Ok(metadata) => metadata,
        Err(e) => {
            (facts.events)(BuildEvent::Warning {
                message: format!("previous image {name}: {e}; no layer of it is reused"),
            });
            return None;
        }
    };
    let reference = Reference::parse(&name).ok()?.with_digest(digest);
    Some(PreviousImage {
        reference: reference.to_string(),
        metadata,
    })
}

/// The cache image (with `--cache`): where this build writes its cache layers, and whether an
/// earlier build left one to restore (not with `--clear-cache`). It lives in the cache
/// repository under a tag of the app's own, so apps sharing a repository keep apart.
async fn cache_image(facts: &Gathered<'_>) -> (Option<String>, Option<String>) {
    let options = facts.options;
    if !options.cache.enabled {
        return (None, None);
    }
    // The app is its repository: every tag of it shares one cache.
    let app = match options
        .output
        .destinations
        .first()
        .map(|d| Reference::parse(d))
    {
        Some(Ok(reference)) => format!("{}/{}", reference.registry(), reference.repository()),
        _ => options.context.source.clone(),
    };
    let repository = match (&options.cache.repo, options.output.destinations.first()) {
        (Some(repo), _) if repo.starts_with("oci:") => {
            (facts.events)(BuildEvent::Warning {
                message: format!(
                    "--cache-repo {repo}: buildpacks cache layers are kept in registry repositories only; this build restores and keeps none (its steps are still cached)"
                ),
            });
            return (None, None);
        }
        (Some(repo), _) => repo.clone(),
        (None, Some(destination)) => match Reference::parse(destination) {
            Ok(r) => format!("{}/{}/cache", r.registry(), r.repository()),
            Err(_) => return (None, None),
        },
        (None, None) => return (None, None),
    };
    let tag = format!(
        "buildpacks-{}",
        &kiln_oci::Digest::sha256_of(app.as_bytes()).hex()[..16]
    );
    let image = format!("{repository}:{tag}");
    let write = (!options.cache.no_push).then(|| image.clone());
    if options.buildpacks.clear_cache {
        return (None, write);
    }
    let exists = crate::base::resolve_manifest(facts.client, &image, facts.platform)
        .await
        .is_ok();
    (exists.then_some(image), write)
}

/// `--sbom-output-dir`: the SBOM files the build phase left under `/layers/sbom` of the build
/// stage, copied out as they are (`launch/`, `build/`, per buildpack).
pub(crate) fn write_sbom(shared: &crate::shared::Shared) -> Result<(), BuildError> {
    let Some(out) = &shared.options.buildpacks.sbom_output_dir else {
        return Ok(());
    };
    if *shared.plan.front_end() != kiln_plan::FrontEnd::Buildpacks {
        return Ok(());
    }
    let rootfs = shared.stage_rootfs(0)?;
    let root = kiln_fs::resolve::Root::open(&rootfs)
        .map_err(|e| BuildError::image("the build stage", e))?;
    let sbom = match root.subroot("layers/sbom") {
        Ok(sbom) => sbom,
        Err(e) if e.is_not_found() => {
            shared.emit(BuildEvent::Warning {
                message: "--sbom-output-dir: the buildpacks wrote no SBOM".into(),
            });
            return Ok(());
        }
        Err(e) => return Err(BuildError::image("the build stage's /layers/sbom", e)),
    };
    if let Err(e) = std::fs::remove_dir_all(out) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(BuildError::Io {
                path: out.clone(),
                source: e,
            });
        }
    }
    kiln_fs::clone::clone_tree(sbom.path(), out)
        .map_err(|e| BuildError::image("--sbom-output-dir", e))
}
