//! Progress as typed events. Library users subscribe with an [`EventSink`]; the executor renders
//! them as live progress on a terminal, timestamped lines in CI logs, or JSON.

use std::sync::Arc;
use std::time::Duration;

use kiln_oci::Digest;

/// Which output stream of a RUN step a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A part of a build whose time is accounted separately in the timing report
/// (`--benchmark-file`), so a slow build shows where its time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Materialising the build context (copy, clone, download).
    Context,
    /// Parsing and planning the Dockerfile.
    Plan,
    /// Fetching a base image's manifest, config and layers, and unpacking the layers into the
    /// stage rootfs while they arrive (the two overlap, so they are one phase).
    Pull,
    /// Copying an earlier stage's tree into a stage built FROM it.
    Unpack,
    /// Running a step's own work: the RUN command, or the COPY/ADD file copying.
    Execute,
    /// Finding what a step changed.
    Snapshot,
    /// Writing and compressing a step's layer.
    Layer,
    /// Writing `--oci-layout-path` / `--tar-path`.
    Output,
    /// Pushing blobs and manifests to the destinations.
    Push,
}

impl Phase {
    /// The phase's name in the timing report.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Context => "context",
            Phase::Plan => "plan",
            Phase::Pull => "pull",
            Phase::Unpack => "unpack",
            Phase::Execute => "execute",
            Phase::Snapshot => "snapshot",
            Phase::Layer => "layer",
            Phase::Output => "output",
            Phase::Push => "push",
        }
    }
}

/// Something that happened during a build. Stages and steps are numbered from 0 in Dockerfile
/// order; `line` is the Dockerfile line an instruction starts on.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BuildEvent {
    /// Something the user should know that is not a problem (which front end runs, which
    /// buildpack group passed detection).
    Note {
        /// The text.
        message: String,
    },
    /// The Dockerfile was parsed; these stages will be built.
    BuildStarted {
        /// Names (or indexes as text) of the stages the target needs, in Dockerfile order.
        stages: Vec<String>,
    },
    /// A stage began: its base is being resolved.
    StageStarted {
        /// Stage index.
        stage: usize,
        /// The stage's base as written after expansion (`scratch`, an image, or a stage name).
        base: String,
    },
    /// Bytes of a base image layer arrived.
    PullProgress {
        /// The image being pulled.
        image: String,
        /// The layer.
        digest: Digest,
        /// Bytes received so far.
        done: u64,
        /// Layer size from the manifest.
        total: u64,
    },
    /// An instruction began.
    StepStarted {
        /// Stage index.
        stage: usize,
        /// Step index within the stage.
        step: usize,
        /// Dockerfile line.
        line: usize,
        /// The instruction as written (for display; secrets never appear in instructions).
        instruction: String,
    },
    /// One line of a RUN step's output.
    RunOutput {
        /// Stage index.
        stage: usize,
        /// Step index.
        step: usize,
        /// Which stream.
        stream: OutputStream,
        /// The line, without its newline.
        line: String,
    },
    /// A step produced a layer.
    LayerCreated {
        /// Stage index.
        stage: usize,
        /// Step index.
        step: usize,
        /// Digest of the compressed blob.
        digest: Digest,
        /// Digest of the uncompressed tar.
        diff_id: Digest,
        /// Compressed size in bytes.
        size: u64,
    },
    /// An instruction finished.
    StepFinished {
        /// Stage index.
        stage: usize,
        /// Step index.
        step: usize,
        /// Wall time of the step.
        duration: Duration,
        /// Whether the result came from the layer cache.
        cached: bool,
    },
    /// Bytes of a blob went to a destination.
    PushProgress {
        /// The destination reference.
        destination: String,
        /// The blob.
        digest: Digest,
        /// Bytes sent so far.
        done: u64,
        /// Blob size.
        total: u64,
    },
    /// The manifest was pushed to a destination.
    Pushed {
        /// The destination reference.
        destination: String,
        /// The manifest digest.
        digest: Digest,
    },
    /// A phase of the build (or of one step) ended.
    PhaseFinished {
        /// Stage index, for phases that belong to a stage.
        stage: Option<usize>,
        /// Step index within the stage, for phases that belong to a step.
        step: Option<usize>,
        /// Which phase.
        phase: Phase,
        /// How long it took.
        duration: Duration,
    },
    /// Something the user should know that does not fail the build.
    Warning {
        /// The message.
        message: String,
    },
    /// The image is complete (and pushed, when there were destinations).
    BuildFinished {
        /// The manifest digest.
        digest: Digest,
        /// Wall time of the whole build.
        duration: Duration,
    },
}

/// Receives events as they happen, from any thread; must not block for long.
pub type EventSink = Arc<dyn Fn(BuildEvent) + Send + Sync>;
