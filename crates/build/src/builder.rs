//! [`Builder`]: the library's front door. Options in, events out, an image at the end.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_context::{open_context, ContextOptions};
use kiln_dockerfile::{Base, Dockerfile, PlanOptions};
use kiln_fs::blobstore::BlobStore;
use kiln_oci::image::ImageConfig;
use kiln_oci::{Digest, Platform};
use kiln_registry::Client;
use kiln_sandbox::Mode;

use crate::cache::EngineCache;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink, Phase};
use crate::options::BuildOptions;
use crate::output::{self, PushAhead};
use crate::stage::{build_stage, Shared};
use crate::timing::TimingReport;
use kiln_cache::CacheStore;

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The image manifest digest (what `--digest-file` contains).
    pub digest: Digest,
    /// The image config as written.
    pub config: ImageConfig,
    /// The destinations pushed to.
    pub pushed: Vec<String>,
}

/// Runs one build. Everything the `executor` binary can do goes through here.
///
/// ```no_run
/// # async fn example() -> Result<(), kiln_build::BuildError> {
/// use std::sync::Arc;
/// use kiln_build::{BuildEvent, BuildOptions, Builder};
///
/// let mut options = BuildOptions::new("/src/app");
/// options.output.destinations.push("registry.example:5000/team/app:1.0".into());
/// let report = Builder::new(options)
///     .events(Arc::new(|event: BuildEvent| eprintln!("{event:?}")))
///     .build()
///     .await?;
/// println!("pushed {}", report.digest);
/// # Ok(()) }
/// ```
pub struct Builder {
    options: BuildOptions,
    events: EventSink,
}

impl Builder {
    /// A builder for `options` that reports no events.
    pub fn new(options: BuildOptions) -> Builder {
        Builder {
            options,
            events: Arc::new(|_| {}),
        }
    }

    /// Delivers progress events to `sink`.
    pub fn events(mut self, sink: EventSink) -> Builder {
        self.events = sink;
        self
    }

    /// Builds the image and writes it to every output. Must run inside a multi-threaded tokio
    /// runtime (stages run on blocking threads). On failure nothing is pushed and no digest file
    /// is written.
    pub async fn build(self) -> Result<BuildReport, BuildError> {
        let started = Instant::now();
        let Some(path) = self.options.benchmark_file.clone() else {
            return self.run(started).await;
        };
        let report = Arc::new(Mutex::new(TimingReport::default()));
        let inner = self.events.clone();
        let recorder = report.clone();
        let events: EventSink = Arc::new(move |event: BuildEvent| {
            recorder.lock().expect("timing report").record(&event);
            inner(event)
        });
        let result = self.events(events).run(started).await;
        // A failed build's timings are written too: they show how far it got and where the
        // time went before it stopped.
        let written =
            report
                .lock()
                .expect("timing report")
                .write(&path, started.elapsed(), result.is_ok());
        let report = result?;
        written?;
        Ok(report)
    }

    async fn run(self, started: Instant) -> Result<BuildReport, BuildError> {
        let options = self.options;
        let events = self.events;
        let timed_since = |phase: Phase, since: Instant| {
            events(BuildEvent::PhaseFinished {
                stage: None,
                step: None,
                phase,
                duration: since.elapsed(),
            })
        };
        let mode = options.mode.unwrap_or_else(Mode::detect);
        if mode == Mode::InPlace {
            crate::inplace::check_allowed(options.force)?;
        }
        if options.output.destinations.is_empty()
            && !options.output.no_push
            && options.output.tar_path.is_none()
            && options.output.oci_layout_path.is_none()
        {
            return Err(BuildError::Options(
                "no --destination given: name one, or use --no-push (with --tar-path or --oci-layout-path to keep the image)".into(),
            ));
        }
        let destinations = output::parse_destinations(&options.output.destinations)?;
        let client = Client::new(options.registry.clone())?;
        // Every registry the build will talk to is pinged as soon as it is known, while the
        // context and the Dockerfile are read: the first real request then finds the scheme
        // and challenge settled. A failed ping is reported by the request that needed it.
        let mut warm = HashSet::new();
        let pushes = !options.output.no_push;
        for destination in destinations.iter().filter(|_| pushes) {
            warm_up(&client, &mut warm, destination.registry());
        }

        let work_root = options.kiln_dir.join("work");
        std::fs::create_dir_all(&work_root).map_err(|source| BuildError::Io {
            path: work_root.clone(),
            source,
        })?;
        let work_dir = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&work_root)
            .map_err(|source| BuildError::Io {
                path: work_root.clone(),
                source,
            })?;
        let blobs = BlobStore::open(options.kiln_dir.join("blobs"))
            .map_err(|e| BuildError::Image(format!("blob store: {e}")))?;

        let context_started = Instant::now();
        let mut context_options = ContextOptions::new(work_dir.path().join("context"));
        context_options.sub_path = options
            .context
            .sub_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        context_options
            .source
            .git
            .branch
            .clone_from(&options.context.git.branch);
        context_options.source.git.single_branch = options.context.git.single_branch;
        context_options.source.git.recurse_submodules = options.context.git.recurse_submodules;
        context_options.source.git.insecure_skip_tls = options.context.git.insecure_skip_tls;
        let dockerfile_path = locate_dockerfile(&options.dockerfile, &options.context.source);
        context_options.dockerfile = Some(dockerfile_path.clone());
        let context = open_context(&options.context.source, &context_options)
            .await
            .map_err(|e| BuildError::Context(e.to_string()))?;
        timed_since(Phase::Context, context_started);
        let plan_started = Instant::now();
        let dockerfile_name = options.dockerfile.display().to_string();
        let text = read_dockerfile(&context, &dockerfile_path)?;
        let dockerfile =
            Dockerfile::parse(&text).map_err(|e| dockerfile_error(&dockerfile_name, e))?;
        let platform = options.platform.clone().unwrap_or_else(Platform::host);
        let to_df_platform = |p: &Platform| {
            kiln_dockerfile::Platform::parse(&p.to_string()).map_err(BuildError::Options)
        };
        let plan = dockerfile
            .plan(&PlanOptions {
                build_args: options.build_args.clone(),
                target: options.target.clone(),
                target_platform: to_df_platform(&platform)?,
                build_platform: to_df_platform(&Platform::host())?,
            })
            .map_err(|e| dockerfile_error(&dockerfile_name, e))?;
        timed_since(Phase::Plan, plan_started);
        for stage in plan.stages() {
            if let Base::Image(image) = &stage.base {
                if let Ok(reference) = kiln_oci::Reference::parse(image) {
                    warm_up(&client, &mut warm, reference.registry());
                }
            }
        }
        for arg in plan.unused_build_args() {
            events(BuildEvent::Warning {
                message: format!("build arg {arg} was given but no stage uses it"),
            });
        }
        events(BuildEvent::BuildStarted {
            stages: plan
                .stages()
                .iter()
                .map(|s| s.name.clone().unwrap_or_else(|| s.index.to_string()))
                .collect(),
        });
        let hidden = hidden_credentials(&options, mode, &plan, &events);
        let levels = plan.levels().to_vec();
        let target = plan.target();
        let mut image_stages = HashSet::from([target]);
        let mut chain = target;
        while let Some(Base::Stage(parent)) = plan.stage(chain).map(|s| &s.base) {
            image_stages.insert(*parent);
            chain = *parent;
        }
        let cache = engine_cache(&options, &client, &destinations, &platform, &events)?;
        if let Some(repo) = cache.as_ref().and_then(|c| c.store.repository()) {
            warm_up(&client, &mut warm, repo.registry());
        }
        let push_ahead = if options.output.no_push || destinations.is_empty() {
            None
        } else {
            Some(PushAhead::new(
                client.clone(),
                blobs.clone(),
                &destinations,
                events.clone(),
                tokio::runtime::Handle::current(),
            )?)
        };
        let shared = Arc::new(Shared {
            client,
            blobs,
            context,
            dockerfile_name,
            dockerfile_lines: text.lines().map(str::to_owned).collect(),
            plan,
            platform,
            work_dir: work_dir.path().to_path_buf(),
            mode,
            events: events.clone(),
            runtime: tokio::runtime::Handle::current(),
            stages: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            remote: crate::remote::RemotePins::new(work_dir.path().join("pinned")),
            push_ahead,
            image_stages,
            cache,
            options,
            hidden,
        });

        // In-place mode has one `/`: its stages run one after another.
        let levels: Vec<Vec<usize>> = if mode == Mode::InPlace {
            levels
                .into_iter()
                .flatten()
                .map(|stage| vec![stage])
                .collect()
        } else {
            levels
        };
        for level in levels {
            let tasks: Vec<_> = level
                .into_iter()
                .map(|index| {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || (index, build_stage(&shared, index)))
                })
                .collect();
            let mut first_error = None;
            for task in tasks {
                let (index, result) = task
                    .await
                    .map_err(|e| BuildError::Image(format!("a build stage panicked: {e}")))?;
                match result {
                    Ok(stage) => {
                        shared
                            .stages
                            .lock()
                            .expect("stage map")
                            .insert(index, Arc::new(stage));
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }

        let final_stage = shared
            .stages
            .lock()
            .expect("stage map")
            .get(&target)
            .cloned()
            .ok_or_else(|| BuildError::Options("the target stage was not built".into()))?;
        let image = output::assemble(
            &final_stage.config,
            &final_stage.layers,
            &shared.options.output,
            shared.source_date_epoch(),
        )?;
        let out = &shared.options.output;
        if out.oci_layout_path.is_some() || out.tar_path.is_some() {
            // Layers taken from the cache or mounted from a base repository may exist only in
            // a registry; local outputs need every blob here.
            output::ensure_local(&shared.client, &shared.blobs, &image.layers).await?;
        }
        let output_started = Instant::now();
        if let Some(path) = &out.oci_layout_path {
            output::write_oci_layout(
                path,
                &shared.blobs,
                &image,
                &output::layout_tag(&destinations),
            )?;
        }
        if let Some(path) = &out.tar_path {
            output::write_docker_archive(path, &shared.blobs, &image, &destinations)?;
        }
        if out.oci_layout_path.is_some() || out.tar_path.is_some() {
            timed_since(Phase::Output, output_started);
        }
        let mut pushed = Vec::new();
        if !out.no_push && !destinations.is_empty() {
            let push_started = Instant::now();
            let placed = match &shared.push_ahead {
                Some(pusher) => pusher.finish().await?,
                None => output::PlacedBlobs::default(),
            };
            let manifest_first = {
                let stages = shared.stages.lock().expect("stage map");
                (shared.image_stages.iter()).all(|i| stages.get(i).is_some_and(|s| s.fully_cached))
            };
            output::push(
                &shared.client,
                &shared.blobs,
                &image,
                &destinations,
                &placed,
                &*events,
                output::PushPolicy {
                    manifest_first,
                    ignore_immutable_tags: out.ignore_immutable_tags,
                },
            )
            .await?;
            timed_since(Phase::Push, push_started);
            pushed = out.destinations.clone();
            output::write_digest_files(out, &destinations, &image.manifest.digest)?;
        }
        if mode == Mode::InPlace && shared.options.cleanup {
            let ignore = crate::inplace::ignore_options(&shared.options, shared.context.root());
            crate::inplace::wipe(Path::new("/"), &crate::inplace::ignore_set(&ignore)?)?;
        }
        let config = ImageConfig::from_json(&image.config.bytes)
            .map_err(|e| BuildError::Image(e.to_string()))?;
        if let Some(cache) = &shared.cache {
            cache.finish_writes().await;
        }
        events(BuildEvent::BuildFinished {
            digest: image.manifest.digest.clone(),
            duration: started.elapsed(),
        });
        drop(shared);
        drop(work_dir);
        Ok(BuildReport {
            digest: image.manifest.digest,
            config,
            pushed,
        })
    }
}

/// Pings `registry` in the background, once per build.
fn warm_up(client: &Client, warmed: &mut HashSet<String>, registry: &str) {
    if warmed.insert(registry.to_owned()) {
        let client = client.clone();
        let registry = registry.to_owned();
        tokio::spawn(async move {
            let _ = client.ping_pull_source(&registry).await;
        });
    }
}

/// The layer cache for this build, when `--cache` is on and there is somewhere to keep it.
fn engine_cache(
    options: &BuildOptions,
    client: &Client,
    destinations: &[kiln_oci::Reference],
    platform: &Platform,
    events: &EventSink,
) -> Result<Option<EngineCache>, BuildError> {
    let settings = &options.cache;
    if !settings.enabled {
        return Ok(None);
    }
    let store = match (&settings.repo, destinations.first()) {
        (Some(repo), _) => CacheStore::open(repo, client, settings.ttl)
            .map_err(|e| BuildError::Options(format!("--cache-repo {repo}: {e}")))?,
        (None, Some(destination)) => {
            let repo = CacheStore::default_repository(destination)
                .map_err(|e| BuildError::Options(format!("cache repository: {e}")))?;
            CacheStore::registry(client.clone(), repo, settings.ttl)
        }
        (None, None) => {
            events(BuildEvent::Warning {
                message:
                    "--cache needs --cache-repo or a --destination; building without the cache"
                        .into(),
            });
            return Ok(None);
        }
    };
    Ok(Some(EngineCache::new(
        store,
        !settings.no_push,
        settings.run_layers,
        platform.clone(),
        events.clone(),
        settings.lookup_deadline,
    )))
}

/// In-place, RUN shares `/` with Kiln and so with the registry credentials it read (the
/// mounted docker-registry Secret): the paths that hold them, for RUN to hide from every step.
/// Kiln holds the credentials in memory from before the first step. Hiding needs a mount
/// namespace, so CAP_SYS_ADMIN; without it the user is told once, as the build starts, that
/// RUN steps can read them (as under kaniko).
fn hidden_credentials(
    options: &BuildOptions,
    mode: Mode,
    plan: &kiln_dockerfile::Plan,
    events: &EventSink,
) -> Vec<PathBuf> {
    let Some(config) = options.registry.keychain.config().and_then(|c| c.path()) else {
        return Vec::new();
    };
    if mode != Mode::InPlace {
        return Vec::new();
    }
    // A config found in a directory (a mounted Secret) hides the directory; one named directly
    // (`DOCKER_CONFIG=/path/config.json`) hides the file.
    let hidden = match config.parent() {
        Some(dir) if config.file_name().is_some_and(|n| n == "config.json") => dir.to_path_buf(),
        _ => config.to_path_buf(),
    };
    let runs = plan.stages().iter().any(|stage| {
        stage.steps(&[]).is_ok_and(|steps| {
            steps
                .steps
                .iter()
                .any(|step| matches!(step.instruction, kiln_dockerfile::Instruction::Run(_)))
        })
    });
    if runs && !kiln_sandbox::has_sys_admin() {
        events(BuildEvent::Warning {
            message: format!(
                "RUN steps can read the registry credentials in {}: hiding them needs \
                 CAP_SYS_ADMIN, which this container lacks (kaniko never hides them)",
                config.display()
            ),
        });
    }
    vec![hidden]
}

/// The Dockerfile's text. One inside the context (the usual case, also when named by an
/// absolute path into it, as `-f "$(pwd)/Dockerfile" -c "$(pwd)"` does) is read through the
/// context's root, so a context whose Dockerfile is a symlink cannot make the build parse (and
/// print in its errors) a file of the host; one the user named elsewhere is read where it is.
fn read_dockerfile(
    context: &kiln_context::BuildContext,
    path: &Path,
) -> Result<String, BuildError> {
    let inside = if path.is_absolute() {
        let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
        parent.and_then(|parent| {
            let full = parent.join(path.file_name()?);
            full.strip_prefix(context.root())
                .ok()
                .map(Path::to_path_buf)
        })
    } else {
        Some(path.to_path_buf())
    };
    let read = |file: std::io::Result<std::fs::File>| {
        let mut text = String::new();
        file.and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut text))
            .map(|_| text)
    };
    match inside {
        Some(rel) => context
            .tree()
            .open_file(&rel)
            .map_err(|e| BuildError::Context(e.to_string()))
            .and_then(|file| {
                read(Ok(file)).map_err(|source| BuildError::Io {
                    path: context.root().join(&rel),
                    source,
                })
            }),
        None => read(std::fs::File::open(path)).map_err(|source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// kaniko resolves a relative `--dockerfile` against the working directory when it exists
/// there, else against the context.
fn locate_dockerfile(dockerfile: &Path, context: &str) -> PathBuf {
    if dockerfile.is_absolute() {
        return dockerfile.to_path_buf();
    }
    let local_context = context.strip_prefix("dir://").unwrap_or(context);
    let in_context = Path::new(local_context).join(dockerfile);
    if !context.contains("://") || context.starts_with("dir://") {
        if in_context.is_file() {
            return dockerfile.to_path_buf();
        }
        if dockerfile.is_file() {
            if let Ok(absolute) = std::fs::canonicalize(dockerfile) {
                return absolute;
            }
        }
    }
    dockerfile.to_path_buf()
}

/// Dockerfile errors print as `Dockerfile:LINE: ...`; other file names replace the prefix.
fn dockerfile_error(name: &str, error: kiln_dockerfile::Error) -> BuildError {
    let text = error.to_string();
    let file = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    match text.strip_prefix("Dockerfile") {
        Some(rest) if file != "Dockerfile" => BuildError::Dockerfile(format!("{file}{rest}")),
        _ => BuildError::Dockerfile(text),
    }
}
