//! [`Builder`]: the library's front door. Options in, events out, an image at the end.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_context::{open_context, BuildContext, ContextOptions};
use kiln_fs::blobstore::BlobStore;
use kiln_oci::image::ImageConfig;
use kiln_oci::{Digest, Platform, Reference};
use kiln_plan::{Base, Plan};
use kiln_registry::Client;
use kiln_sandbox::Mode;

use crate::cache::EngineCache;
use crate::cancel::Cancel;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink, Phase};
use crate::options::BuildOptions;
use crate::output::{self, PushAhead};
use crate::shared::Shared;
use crate::stage::build_stage;
use crate::stage::overlay::{BaseOverlay, StageMounts};
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
/// # async fn example() -> Result<(), kiln_engine::BuildError> {
/// use std::sync::Arc;
/// use kiln_engine::{BuildEvent, BuildOptions, Builder};
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
    plan: Option<Plan>,
    cancel: Cancel,
}

impl Builder {
    /// A builder for `options` that reports no events.
    pub fn new(options: BuildOptions) -> Builder {
        Builder {
            options,
            events: Arc::new(|_| {}),
            plan: None,
            cancel: Cancel::new(),
        }
    }

    /// Lets `cancel` stop the build (from a signal handler, another task, a timeout of the
    /// caller's). Once [`Cancel::cancel`] is called the build kills the processes of the step
    /// running, stops waiting for pulls, uploads and context fetches, stops unpacking at the
    /// next read, pushes no manifest (it checks right before each one) and writes no digest
    /// file; it unmounts what it mounted, removes its work dir and then returns
    /// [`BuildError::Cancelled`]. A build whose manifests were all pushed when the cancellation
    /// came finishes normally and returns its report.
    pub fn cancel_with(mut self, cancel: Cancel) -> Builder {
        self.cancel = cancel;
        self
    }

    /// Delivers progress events to `sink`.
    pub fn events(mut self, sink: EventSink) -> Builder {
        self.events = sink;
        self
    }

    /// Builds `plan` (made by a front end of the caller's, or written directly) instead of the
    /// one the Dockerfile front end would make from the context. The context is still opened:
    /// it is what copies from the context read.
    pub fn plan(mut self, plan: Plan) -> Builder {
        self.plan = Some(plan);
        self
    }

    /// Builds the image and writes it to every output. Must run inside a multi-threaded tokio
    /// runtime (stages run on blocking threads). On failure nothing is pushed and no digest file
    /// is written. The build's work dir is deleted by a background thread after this returns
    /// (see `--cleanup`, [`BuildOptions::cleanup`], to have it gone before).
    pub async fn build(self) -> Result<BuildReport, BuildError> {
        let started = Instant::now();
        let Some(path) = self.options.benchmark_file.clone() else {
            return self.run_cancellable(started).await;
        };
        let report = Arc::new(Mutex::new(TimingReport::default()));
        let inner = self.events.clone();
        let recorder = report.clone();
        let events: EventSink = Arc::new(move |event: BuildEvent| {
            recorder.lock().expect("timing report").record(&event);
            inner(event)
        });
        let result = self.events(events).run_cancellable(started).await;
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

    /// [`Builder::run`], with any failure after a cancellation reported as the cancellation:
    /// what broke then (a killed step, an aborted read) is its consequence, not a fault.
    async fn run_cancellable(self, started: Instant) -> Result<BuildReport, BuildError> {
        let cancel = self.cancel.clone();
        match self.run(started).await {
            Err(_) if cancel.is_cancelled() => Err(BuildError::Cancelled),
            result => result,
        }
    }

    async fn run(self, started: Instant) -> Result<BuildReport, BuildError> {
        let Builder {
            mut options,
            events,
            plan,
            cancel,
        } = self;
        // Every retry is a line of the progress output; an embedder's own hook still runs.
        let retry_events = events.clone();
        let embedders_hook = options.registry.on_retry.take();
        options.registry.on_retry = Some(
            kiln_registry::RetryHook::new(move |retry| {
                retry_events(BuildEvent::Note {
                    message: format!("retrying: {retry}"),
                })
            })
            .then(embedders_hook),
        );
        let mode = options.mode.unwrap_or_else(Mode::detect);
        let setup = Setup::new(&options, mode, &cancel)?;
        let context_started = Instant::now();
        let dockerfile =
            crate::frontend::locate_dockerfile(&options.dockerfile, &options.context.source);
        let context = cancel.guard(open(&options, &setup, &dockerfile)).await??;
        phase_finished(&events, Phase::Context, context_started);
        let plan_started = Instant::now();
        let platform = options.platform.clone().unwrap_or_else(Platform::host);
        let plan = match plan {
            Some(plan) => plan,
            None => {
                let found = crate::frontend::dockerfile_exists(&context, &dockerfile);
                if crate::buildpacks::uses_buildpacks(&options, found) {
                    // Buildpacks layers and images are dated as the lifecycle dates them, so
                    // an unchanged rebuild gives the same image.
                    if !options.output.reproducible {
                        (options.output.source_date_epoch)
                            .get_or_insert(kiln_cnb::platform::LAYER_EPOCH);
                    }
                    let planned = crate::buildpacks::plan(crate::buildpacks::Gathered {
                        options: &options,
                        context: &context,
                        client: &setup.client,
                        platform: &platform,
                        work_dir: setup.work_dir.path(),
                        events: &events,
                    });
                    cancel.guard(planned).await??
                } else {
                    events(BuildEvent::Note {
                        message: format!(
                            "front end: Dockerfile ({})",
                            options.dockerfile.display()
                        ),
                    });
                    crate::frontend::dockerfile_plan(&options, &context, &dockerfile, &platform)?
                }
            }
        };
        phase_finished(&events, Phase::Plan, plan_started);
        cancel.check()?;
        let shared = Arc::new(setup.shared(options, context, plan, platform, mode, &events)?);
        run_stages(&shared).await?;
        let report = finish(&shared, &setup.destinations, started).await?;
        drop(shared);
        drop(setup);
        Ok(report)
    }
}

fn phase_finished(events: &EventSink, phase: Phase, since: Instant) {
    events(BuildEvent::PhaseFinished {
        stage: None,
        step: None,
        phase,
        duration: since.elapsed(),
    })
}

/// What a build sets up before it knows its plan: the destinations, the registry client (with
/// every registry known so far being pinged), the work directory and the blob store.
struct Setup {
    destinations: Vec<Reference>,
    client: Client,
    warm: Mutex<HashSet<String>>,
    /// Stage rootfs mounted inside `work_dir`: unmounted before it is removed (in the
    /// background, see [`crate::trash`]).
    mounts: Arc<StageMounts>,
    work_dir: tempfile::TempDir,
    blobs: BlobStore,
    /// `--cleanup`: the work dir is gone before the build returns, not deleted in the
    /// background.
    cleanup: bool,
    /// A cancelled build's process exits right after the build returns, before a background
    /// removal could finish: its work dir is deleted before the build returns.
    cancel: Cancel,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.mounts.unmount_all();
        if self.cleanup || self.cancel.is_cancelled() {
            // The `TempDir` deletes it when it drops, right after this.
            return;
        }
        // Renamed away and deleted in the background: the `TempDir` then finds nothing to
        // delete when it drops.
        let work_dir = self.work_dir.path().to_path_buf();
        if let Some(work_root) = work_dir.parent() {
            crate::trash::discard(work_root, work_dir.clone());
        }
    }
}

impl Setup {
    fn new(options: &BuildOptions, mode: Mode, cancel: &Cancel) -> Result<Setup, BuildError> {
        if mode == Mode::InPlace {
            crate::inplace::check_allowed(options.force)?;
        }
        let output = &options.output;
        if output.destinations.is_empty()
            && !output.no_push
            && output.tar_path.is_none()
            && output.oci_layout_path.is_none()
        {
            return Err(BuildError::Options(
                "no --destination given: name one, or use --no-push (with --tar-path or --oci-layout-path to keep the image)".into(),
            ));
        }
        let destinations = output::parse_destinations(&output.destinations)?;
        let client = Client::new(options.registry.clone())?;
        let setup_dirs = || -> Result<(tempfile::TempDir, BlobStore), BuildError> {
            let work_root = options.kiln_dir.join("work");
            std::fs::create_dir_all(&work_root).map_err(BuildError::io(&work_root))?;
            crate::trash::sweep(&work_root);
            let work_dir = tempfile::Builder::new()
                .prefix(&crate::trash::work_dir_prefix())
                .tempdir_in(&work_root)
                .map_err(BuildError::io(&work_root))?;
            let blobs = BlobStore::open(options.kiln_dir.join("blobs"))
                .map_err(|e| BuildError::image("blob store", e))?;
            Ok((work_dir, blobs))
        };
        let (work_dir, blobs) = setup_dirs()?;
        let setup = Setup {
            destinations,
            client,
            warm: Mutex::new(HashSet::new()),
            mounts: Arc::default(),
            work_dir,
            blobs,
            cleanup: options.cleanup,
            cancel: cancel.clone(),
        };
        // Every registry the build will talk to is pinged as soon as it is known, while the
        // context and the Dockerfile are read: the first real request then finds the scheme
        // and challenge settled. A failed ping is reported by the request that needed it.
        if !options.output.no_push {
            for destination in &setup.destinations {
                setup.warm_up(destination.registry());
            }
        }
        Ok(setup)
    }

    /// Pings `registry` in the background, once per build.
    fn warm_up(&self, registry: &str) {
        if self
            .warm
            .lock()
            .expect("warm set")
            .insert(registry.to_owned())
        {
            let client = self.client.clone();
            let registry = registry.to_owned();
            tokio::spawn(async move {
                let _ = client.ping_pull_source(&registry).await;
            });
        }
    }

    /// The state the stages share, once the plan is known.
    fn shared(
        &self,
        options: BuildOptions,
        context: BuildContext,
        plan: Plan,
        platform: Platform,
        mode: Mode,
        events: &EventSink,
    ) -> Result<Shared, BuildError> {
        for stage in plan.stages() {
            if let Base::Image(image) = &stage.base {
                if let Ok(reference) = Reference::parse(image) {
                    self.warm_up(reference.registry());
                }
            }
        }
        for note in plan.notes() {
            events(BuildEvent::Warning {
                message: note.clone(),
            });
        }
        events(BuildEvent::BuildStarted {
            stages: plan
                .stages()
                .iter()
                .map(|s| s.name.clone().unwrap_or_else(|| s.id.to_string()))
                .collect(),
        });
        if options.snapshot.single_snapshot && options.cache.enabled {
            events(BuildEvent::Warning {
                message: "--single-snapshot makes one layer per stage, which the layer cache \
                          cannot key step by step: stages are built without it (kaniko's cache \
                          misses every step in this mode)"
                    .into(),
            });
        }
        let hidden = crate::frontend::hidden_credentials(&options, mode, &plan, events);
        let image_stages: HashSet<usize> = plan.image_stages().into_iter().collect();
        let cache = engine_cache(
            &options,
            &self.client,
            &self.destinations,
            &platform,
            events,
        )?;
        if let Some(repo) = cache.as_ref().and_then(|c| c.store.repository()) {
            self.warm_up(repo.registry());
        }
        let push_ahead = if options.output.no_push || self.destinations.is_empty() {
            None
        } else {
            Some(PushAhead::new(
                self.client.clone(),
                self.blobs.clone(),
                &self.destinations,
                events.clone(),
                tokio::runtime::Handle::current(),
            )?)
        };
        let work_dir = self.work_dir.path().to_path_buf();
        Ok(Shared {
            client: self.client.clone(),
            blobs: self.blobs.clone(),
            context,
            plan,
            platform,
            remote: crate::remote::RemotePins::new(work_dir.join("pinned")),
            work_dir,
            mode,
            events: events.clone(),
            runtime: tokio::runtime::Handle::current(),
            stages: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            push_ahead,
            image_stages,
            cache,
            overlay: BaseOverlay::for_build(
                &options,
                mode,
                &self.mounts,
                self.work_dir.path(),
                &**events,
            ),
            options,
            hidden,
            cancel: self.cancel.clone(),
        })
    }
}

/// Opens the build context, with the ignore rules of `dockerfile`.
async fn open(
    options: &BuildOptions,
    setup: &Setup,
    dockerfile: &Path,
) -> Result<BuildContext, BuildError> {
    let mut context_options = ContextOptions::new(setup.work_dir.path().join("context"));
    context_options.sub_path = options
        .context
        .sub_path
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    let git = &mut context_options.source.git;
    git.branch.clone_from(&options.context.git.branch);
    git.single_branch = options.context.git.single_branch;
    git.recurse_submodules = options.context.git.recurse_submodules;
    git.insecure_skip_tls = options.context.git.insecure_skip_tls;
    context_options.dockerfile = Some(dockerfile.to_path_buf());
    open_context(&options.context.source, &context_options)
        .await
        .map_err(|e| BuildError::Context(Box::new(e)))
}

/// Runs the plan's stages level by level, the stages of a level at the same time (one after
/// another in place, where there is one `/`).
async fn run_stages(shared: &Arc<Shared>) -> Result<(), BuildError> {
    let levels: Vec<Vec<usize>> = if shared.mode == Mode::InPlace {
        shared
            .plan
            .levels()
            .concat()
            .into_iter()
            .map(|s| vec![s])
            .collect()
    } else {
        shared.plan.levels().to_vec()
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
                .map_err(|e| BuildError::image("a build stage", format!("panicked: {e}")))?;
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
    Ok(())
}

/// Assembles the image of the target stage and writes it to every output.
async fn finish(
    shared: &Shared,
    destinations: &[Reference],
    started: Instant,
) -> Result<BuildReport, BuildError> {
    let events = &shared.events;
    let final_stage = shared
        .finished(shared.plan.target())
        .ok_or_else(|| BuildError::Options("the target stage was not built".into()))?;
    let image = output::assemble(
        &final_stage.config,
        &final_stage.layers,
        &shared.options.output,
        shared.source_date_epoch(),
    )?;
    write_local_outputs(shared, destinations, &image).await?;
    crate::buildpacks::write_sbom(shared)?;
    push_extra_images(shared).await;
    let out = &shared.options.output;
    let mut pushed = Vec::new();
    if !out.no_push && !destinations.is_empty() {
        let push_started = Instant::now();
        let placed = match &shared.push_ahead {
            Some(pusher) => shared.cancel.guard(pusher.finish()).await??,
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
            destinations,
            &placed,
            &**events,
            output::PushPolicy {
                manifest_first,
                ignore_immutable_tags: out.ignore_immutable_tags,
                cancel: Some(&shared.cancel),
            },
        )
        .await?;
        phase_finished(events, Phase::Push, push_started);
        pushed = out.destinations.clone();
        output::write_digest_files(out, destinations, &image.manifest.digest)?;
    }
    if shared.mode == Mode::InPlace && shared.options.cleanup {
        let ignore = crate::inplace::ignore_options(&shared.options, shared.context.root());
        crate::inplace::wipe(Path::new("/"), &crate::inplace::ignore_set(&ignore)?)?;
    }
    let config = ImageConfig::from_json(&image.config.bytes)
        .map_err(|e| BuildError::image("image config", e))?;
    if let Some(cache) = &shared.cache {
        cache.finish_writes().await;
    }
    events(BuildEvent::BuildFinished {
        digest: image.manifest.digest.clone(),
        duration: started.elapsed(),
    });
    Ok(BuildReport {
        digest: image.manifest.digest,
        config,
        pushed,
    })
}

/// Pushes the images the plan writes besides its result (a buildpacks build's cache image).
/// They help the next build and are not its result: a failure is a warning.
async fn push_extra_images(shared: &Shared) {
    if shared.options.output.no_push {
        return;
    }
    for extra in shared.plan.extra_images() {
        let pushed = async {
            let stage = shared.finished(extra.stage).ok_or_else(|| {
                BuildError::Options(format!("stage {} was not built", extra.stage))
            })?;
            let destination = output::parse_destinations(std::slice::from_ref(&extra.destination))?;
            let image = output::assemble(
                &stage.config,
                &stage.layers,
                &crate::options::OutputOptions::default(),
                shared.source_date_epoch(),
            )?;
            output::push(
                &shared.client,
                &shared.blobs,
                &image,
                &destination,
                &output::PlacedBlobs::default(),
                &*shared.events,
                output::PushPolicy {
                    manifest_first: stage.fully_cached,
                    ignore_immutable_tags: false,
                    cancel: Some(&shared.cancel),
                },
            )
            .await
        }
        .await;
        if let Err(e) = pushed {
            shared.emit(BuildEvent::Warning {
                message: format!("could not write {}: {e}", extra.destination),
            });
        }
    }
}

/// `--oci-layout-path` and `--tar-path`.
async fn write_local_outputs(
    shared: &Shared,
    destinations: &[Reference],
    image: &output::Image,
) -> Result<(), BuildError> {
    let out = &shared.options.output;
    if out.oci_layout_path.is_none() && out.tar_path.is_none() {
        return Ok(());
    }
    // Layers taken from the cache or mounted from a base repository may exist only in a
    // registry; local outputs need every blob here.
    output::ensure_local(&shared.client, &shared.blobs, &image.layers).await?;
    let started = Instant::now();
    if let Some(path) = &out.oci_layout_path {
        output::write_oci_layout(
            path,
            &shared.blobs,
            image,
            &output::layout_tag(destinations),
        )?;
    }
    if let Some(path) = &out.tar_path {
        output::write_docker_archive(path, &shared.blobs, image, destinations)?;
    }
    phase_finished(&shared.events, Phase::Output, started);
    Ok(())
}

/// The layer cache for this build, when `--cache` is on and there is somewhere to keep it.
fn engine_cache(
    options: &BuildOptions,
    client: &Client,
    destinations: &[Reference],
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
    let mut cache = EngineCache::new(
        store,
        !settings.no_push,
        settings.run_layers,
        platform.clone(),
        events.clone(),
        settings.lookup_deadline,
    );
    cache.every_step_layered = options.snapshot.force_build_metadata;
    Ok(Some(cache))
}
