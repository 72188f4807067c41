//! What every stage of one build shares: the options, the registry client and blob store, the
//! context, the plan, the finished stages, the layer cache and the pins of remote inputs.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_context::BuildContext;
use kiln_fs::blobstore::BlobStore;
use kiln_fs::layer::LayerOptions;
use kiln_oci::Platform;
use kiln_plan::Plan;
use kiln_registry::Client;
use kiln_sandbox::Mode;

use crate::cache::EngineCache;
use crate::cancel::Cancel;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink, Phase};
use crate::options::BuildOptions;
use crate::output::PushAhead;
use crate::remote::RemotePins;
use crate::stage::overlay::BaseOverlay;
use crate::stage::trees::ImageTree;
use crate::stage::StageOutput;

/// Everything stages share during one build.
pub(crate) struct Shared {
    /// The build's options.
    pub(crate) options: BuildOptions,
    /// Registry client.
    pub(crate) client: Client,
    /// Content-addressed blobs of this build (and earlier ones in the same Kiln dir).
    pub(crate) blobs: BlobStore,
    /// The build context.
    pub(crate) context: BuildContext,
    /// The plan.
    pub(crate) plan: Plan,
    /// The platform being built.
    pub(crate) platform: Platform,
    /// This build's work directory.
    pub(crate) work_dir: PathBuf,
    /// How RUN is isolated.
    pub(crate) mode: Mode,
    /// Event sink.
    pub(crate) events: EventSink,
    /// Runtime handle for registry calls from blocking code.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Finished stages.
    pub(crate) stages: Mutex<HashMap<usize, Arc<StageOutput>>>,
    /// Images read by copies and mounts, unpacked once each.
    pub(crate) images: Mutex<HashMap<String, ImageTree>>,
    /// Uploads layers of the final image while the build goes on, when it is pushed.
    pub(crate) push_ahead: Option<PushAhead>,
    /// The stages whose layers end up in the final image.
    pub(crate) image_stages: HashSet<usize>,
    /// The layer cache, when `--cache` is on.
    pub(crate) cache: Option<EngineCache>,
    /// Remote inputs pinned for the cache keys (only filled when the cache is on).
    pub(crate) remote: RemotePins,
    /// Paths RUN steps must not read (in-place: where the push credentials are).
    pub(crate) hidden: Vec<PathBuf>,
    /// Stage bases mounted from layer trees instead of unpacked (`--base-overlay`).
    pub(crate) overlay: Option<BaseOverlay>,
    /// Stops the build from outside ([`crate::Builder::cancel_with`]).
    pub(crate) cancel: Cancel,
}

impl Shared {
    /// Waits on `runtime` for `work` from a blocking thread, giving up when the build is
    /// cancelled.
    pub(crate) fn block_on<F: std::future::Future>(
        &self,
        work: F,
    ) -> Result<F::Output, BuildError> {
        self.cancel.block_on(&self.runtime, work)
    }

    pub(crate) fn emit(&self, event: BuildEvent) {
        (self.events)(event)
    }

    /// Runs `work`, reporting its duration as `phase` of `stage` (and `step`) for the timing
    /// report.
    pub(crate) fn timed<T>(
        &self,
        stage: Option<usize>,
        step: Option<usize>,
        phase: Phase,
        work: impl FnOnce() -> T,
    ) -> T {
        let started = Instant::now();
        let result = work();
        self.emit(BuildEvent::PhaseFinished {
            stage,
            step,
            phase,
            duration: started.elapsed(),
        });
        result
    }

    /// Starts pushing `layers` ahead when stage `index` is part of the final image.
    pub(crate) fn push_ahead(&self, index: usize, layers: &[crate::base::ImageLayer]) {
        if let Some(pusher) = self.push_ahead.as_ref() {
            if self.image_stages.contains(&index) {
                layers.iter().for_each(|layer| pusher.start(layer));
            }
        }
    }

    /// Stage `index`, once it has finished.
    pub(crate) fn finished(&self, index: usize) -> Option<Arc<StageOutput>> {
        self.stages.lock().expect("stage map").get(&index).cloned()
    }

    /// Whether the layers stage `index` makes can leave the build: pushed in the image (the
    /// target and the stages it is built on), in an extra image (a buildpacks cache image), or
    /// stored in the layer cache. The others are only read inside the build.
    pub(crate) fn layers_leave_the_build(&self, index: usize) -> bool {
        self.options.cache.enabled
            || self.image_stages.contains(&index)
            || (self.plan.extra_images().iter()).any(|extra| extra.stage == index)
    }

    /// How new layers are written: the compression and level asked for, and the timestamp
    /// clamp of `--reproducible`.
    pub(crate) fn layer_options(&self) -> LayerOptions {
        let output = &self.options.output;
        let compression = match output.compression {
            kiln_oci::Compression::None => kiln_fs::compress::Compression::None,
            kiln_oci::Compression::Gzip => kiln_fs::compress::Compression::Gzip {
                level: output.compression_level.map_or(6, |l| l.clamp(0, 9) as u32),
            },
            kiln_oci::Compression::Zstd => kiln_fs::compress::Compression::Zstd {
                level: output.compression_level.map_or(3, |l| l.clamp(1, 22)),
            },
        };
        LayerOptions {
            compression,
            source_date_epoch: self.source_date_epoch(),
            ..LayerOptions::default()
        }
    }

    /// `SOURCE_DATE_EPOCH`, or 0 under `--reproducible`, which clamps every new entry's time.
    pub(crate) fn source_date_epoch(&self) -> Option<i64> {
        self.options
            .output
            .source_date_epoch
            .or(self.options.output.reproducible.then_some(0))
    }
}
