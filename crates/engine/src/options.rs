//! [`BuildOptions`]: one build's whole configuration, the library form of kaniko's flags.
//!
//! Field docs name the executor flag that sets them. Defaults are kaniko's, except where Kiln
//! is stricter or faster by design (noted per field).

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_fs::snapshot::SnapshotMode;
use kiln_oci::{Compression, ImageFormat, Platform};
use kiln_registry::RegistryOptions;
use kiln_sandbox::Mode;

/// Where the build context comes from (`--context`, `--context-sub-path`, `--git`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextSpec {
    /// The `--context` value as given: a path, `dir://`, `tar://`, `git://`, `https://`.
    pub source: String,
    /// `--context-sub-path`: a subdirectory of the fetched context to use as its root.
    pub sub_path: Option<PathBuf>,
    /// `--git` options for git contexts.
    pub git: GitOptions,
}

/// kaniko's `--git branch=...,single-branch=...,recurse-submodules=...,insecure-skip-tls=...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitOptions {
    /// Branch to check out, when the URL names none.
    pub branch: Option<String>,
    /// Fetch only that branch's history.
    pub single_branch: bool,
    /// Check out submodules recursively.
    pub recurse_submodules: bool,
    /// Accept any certificate from an HTTPS git server.
    pub insecure_skip_tls: bool,
}

/// Where a `RUN --mount=type=secret` secret's value is read from (`--secret id=ID,src=PATH` or
/// `--secret id=ID,env=VAR`). The value is read at use and never stored in options or events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file on the build host.
    File(PathBuf),
    /// An environment variable of the executor process.
    Env(String),
}

/// One `--secret` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    /// The id a `RUN --mount=type=secret,id=ID` refers to.
    pub id: String,
    /// Where the value comes from.
    pub source: SecretSource,
}

/// One `--ssh ID=SOCKET` flag: the ssh-agent a `RUN --mount=type=ssh,id=ID` step may use. The
/// step reaches it through a socket of its own that forwards to this one, so the agent's keys
/// are used but never copied, and nothing of it reaches a layer or a cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSpec {
    /// The id a `RUN --mount=type=ssh,id=ID` refers to (`default` when the mount names none).
    pub id: String,
    /// The agent's socket on the build host (`$SSH_AUTH_SOCK` for `--ssh default`).
    pub socket: PathBuf,
}

/// How filesystem changes are detected and what is never looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// `--snapshot-mode` (kaniko's `full|redo|time`, mapped as documented on [`SnapshotMode`]).
    pub mode: SnapshotMode,
    /// `--single-snapshot`: take one snapshot at the end of each stage instead of one per step.
    pub single_snapshot: bool,
    /// `--force-build-metadata`: every step makes a layer, an empty one when it changed no
    /// file (ENV, LABEL, a RUN that wrote nothing), as kaniko's flag does; tools that count on
    /// one layer per instruction use it.
    pub force_build_metadata: bool,
    /// `--ignore-path`: paths never snapshotted or overwritten (in addition to the built-in list).
    pub ignore_paths: Vec<PathBuf>,
    /// `--ignore-var-run` (default true): leave `/var/run` out of snapshots in in-place mode,
    /// where it is the Pod's; in chroot mode the stage's `/var/run` is the image's and kept.
    pub ignore_var_run: bool,
    /// `--base-overlay` (default true): in chroot mode, run as root, a stage that starts from
    /// an image mounts its rootfs as an overlay of the image's layers, each unpacked once into
    /// the kiln dir's `layers/` and shared by every later stage and build, instead of unpacking
    /// the image into the stage's own tree. A layer that cannot stand alone (its entries
    /// assume the layers below), a kernel or kiln dir without overlayfs, or `false` here: the
    /// stage's tree is unpacked as before.
    pub base_overlay: bool,
    /// `--upper-tmpfs` (default [`UpperTmpfs::Auto`]): where a mounted stage's overlay upper
    /// dir (the stage's own writes) lives. Only stages whose rootfs is an overlay have one
    /// (chroot mode, as root, with [`SnapshotOptions::base_overlay`]), and never under
    /// `--single-snapshot`, whose steps leave no layers to move the stage to disk with.
    pub upper_tmpfs: UpperTmpfs,
    /// `--upper-tmpfs-size`: the most the build's upper-dir tmpfs may hold, in bytes; `None`
    /// is [`UPPER_TMPFS_DEFAULT_CAP`]. Under [`UpperTmpfs::Auto`] a quarter of the memory
    /// available bounds it too. A stage whose steps outgrow it continues on disk.
    pub upper_tmpfs_size: Option<u64>,
}

/// The default cap of the upper-dir tmpfs: 4 GiB. A RUN that writes more than that (a large
/// toolchain) is bound by disk bandwidth rather than by the cost of creating inodes, which is
/// what the tmpfs saves, and would hold that much memory for the rest of the build.
pub const UPPER_TMPFS_DEFAULT_CAP: u64 = 4 << 30;

/// Whether a stage's overlay upper dir goes on tmpfs (`--upper-tmpfs=auto|true|false`).
///
/// Creating a file on the disks builds run on costs half a millisecond of kernel time, against
/// microseconds on tmpfs, so a RUN that writes tens of thousands of small files spends seconds
/// on metadata alone with its upper dir on disk. On tmpfs the files live in memory until the
/// stage's layers are written; a stage that fills the tmpfs moves to disk (its earlier steps'
/// layers applied to a new upper dir there) and the step runs again, so a step that fits on
/// disk never fails for want of tmpfs space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpperTmpfs {
    /// On tmpfs when the memory available (`MemAvailable`, and the memory cgroup's room when
    /// it has a limit) allows a useful one: a quarter of it, at most the cap, at least 64 MiB.
    #[default]
    Auto,
    /// On tmpfs, of the cap's size, whatever the memory available says; when the tmpfs cannot
    /// be mounted the build warns and keeps its upper dirs on disk (the flag asks for speed,
    /// not for a different image).
    Always,
    /// On disk, beside the stage's rootfs in the work dir.
    Never,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            mode: SnapshotMode::Exact,
            single_snapshot: false,
            force_build_metadata: false,
            ignore_paths: Vec::new(),
            ignore_var_run: true,
            base_overlay: true,
            upper_tmpfs: UpperTmpfs::Auto,
            upper_tmpfs_size: None,
        }
    }
}

/// Where the finished image goes besides the registry destinations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputOptions {
    /// `--destination` (repeatable): image references to push to.
    pub destinations: Vec<String>,
    /// `--no-push`: build (and write local outputs) but push nothing.
    pub no_push: bool,
    /// `--tar-path`: write a docker-archive (`docker load`/`podman load`) here.
    pub tar_path: Option<PathBuf>,
    /// `--oci-layout-path`: write an OCI image layout here.
    pub oci_layout_path: Option<PathBuf>,
    /// `--digest-file`: write the image digest here after a successful push.
    pub digest_file: Option<PathBuf>,
    /// `--image-name-with-digest-file`: write `REPO@DIGEST` per destination.
    pub image_name_with_digest_file: Option<PathBuf>,
    /// `--image-name-tag-with-digest-file`: write `REPO:TAG@DIGEST` per destination.
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    /// `--image-format`: OCI media types (default) or Docker v2 schema 2.
    pub image_format: ImageFormat,
    /// `--compression`: gzip (default) or zstd for new layers; base layers are never recompressed.
    pub compression: Compression,
    /// `--compression-level`: compressor level; `None` is the compressor's default.
    pub compression_level: Option<i32>,
    /// `--label KEY=VALUE` (repeatable): labels added to the image config.
    pub labels: BTreeMap<String, String>,
    /// `--reproducible`: strip timestamps so the same inputs give the same digest.
    pub reproducible: bool,
    /// `SOURCE_DATE_EPOCH`: clamp layer and config times to this Unix time.
    pub source_date_epoch: Option<i64>,
    /// `--push-ignore-immutable-tag-errors`: a destination whose registry refuses to move an
    /// existing immutable tag ([`kiln_registry::Error::is_immutable_tag`]) is skipped with a
    /// warning, its tag left where it was, instead of failing the build.
    pub ignore_immutable_tags: bool,
}

/// The layer cache (`--cache*` flags).
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// `--cache`: look up and store step layers.
    pub enabled: bool,
    /// `--cache-repo`: `REGISTRY/REPO` or `oci:/path`; `None` is `<first destination>/cache`.
    pub repo: Option<String>,
    /// `--cache-dir`: base images stored by digest (filled by `executor warm`); a base found
    /// there is not pulled from its registry.
    pub dir: Option<PathBuf>,
    /// `--cache-ttl`: entries older than this are misses.
    pub ttl: std::time::Duration,
    /// `--cache-run-layers`: cache RUN steps (COPY/ADD/WORKDIR are always cached: their keys
    /// cover their sources' content).
    pub run_layers: bool,
    /// `--no-push-cache`: read the cache, never write it.
    pub no_push: bool,
    /// How long a stage's cache lookups may take (the registry's retries included) before the
    /// cache is given up for the rest of the build: a registry that accepts connections and
    /// never answers must not hold a build for the client's read timeouts.
    pub lookup_deadline: std::time::Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            enabled: false,
            repo: None,
            dir: None,
            ttl: kiln_cache::DEFAULT_TTL,
            run_layers: true,
            no_push: false,
            lookup_deadline: std::time::Duration::from_secs(30),
        }
    }
}

/// Which front end turns the context into a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FrontEndChoice {
    /// The Dockerfile when the context has one (or [`BuildOptions::dockerfile`] names one
    /// elsewhere), else buildpacks.
    #[default]
    Auto,
    /// The Dockerfile; a missing one is an error (an explicit `-f`).
    Dockerfile,
    /// Cloud Native Buildpacks (any buildpack flag).
    Buildpacks,
}

/// A buildpacks build (`pack build`'s flags, with its names and meanings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildpacksOptions {
    /// `--builder`: a CNB builder image (its buildpacks, order and run image).
    pub builder: Option<String>,
    /// `--buildpack` (repeatable): run these as one group, in order: a directory, a `.tgz`, a
    /// package image `docker://REF`, or `ID[@VERSION]` of the builder or Kiln's own.
    pub buildpacks: Vec<String>,
    /// `--run-image`: the image the app runs on (default: the builder's, else the build
    /// image).
    pub run_image: Option<String>,
    /// `--build-image`: the image buildpacks run in when there is no builder.
    pub build_image: Option<String>,
    /// `--env K=V` (in order, later wins): the platform environment, over the env files'.
    pub env: Vec<(String, String)>,
    /// `--env-file` (repeatable): files of `K=V` lines for the platform environment, read when
    /// the build starts.
    pub env_files: Vec<PathBuf>,
    /// `--default-process`: the process type the image runs by default.
    pub default_process: Option<String>,
    /// `--descriptor`: the project descriptor (default: the context's `project.toml`).
    pub descriptor: Option<PathBuf>,
    /// `--previous-image`: the image whose layers are reused (default: the first
    /// destination).
    pub previous_image: Option<String>,
    /// `--clear-cache`: restore no cache layers (this build's are still kept).
    pub clear_cache: bool,
    /// `--sbom-output-dir`: copy the build's SBOM files here.
    pub sbom_output_dir: Option<PathBuf>,
    /// The directory of Kiln's static `kiln-lifecycle` and `launcher` (default:
    /// `$KILN_LIFECYCLE_DIR`, else `lifecycle/` beside the executor).
    pub lifecycle_dir: Option<PathBuf>,
    /// The directory of Kiln's own buildpacks and their `order.toml` (default:
    /// `$KILN_BUILDPACKS_DIR`, else `buildpacks/` beside the executor).
    pub builtin_dir: Option<PathBuf>,
}

/// One build's whole configuration.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `--context`.
    pub context: ContextSpec,
    /// `-f/--dockerfile`: path of the Dockerfile, relative to the context unless absolute.
    pub dockerfile: PathBuf,
    /// `--build-arg` values after resolution (`K` alone takes the executor's environment).
    pub build_args: BTreeMap<String, String>,
    /// `--target`: the stage to build; the last stage when `None`. Only stages it needs are
    /// built (kaniko's `--skip-unused-stages`, always on).
    pub target: Option<String>,
    /// `--custom-platform`: the platform to build for and to select base images by.
    pub platform: Option<Platform>,
    /// `--secret` flags.
    pub secrets: Vec<SecretSpec>,
    /// `--ssh` flags.
    pub ssh: Vec<SshSpec>,
    /// Registry transport and credentials (`--insecure*`, `--skip-tls-verify*`,
    /// `--registry-*`, `--push-retry`, `--image-download-retry`).
    pub registry: RegistryOptions,
    /// `--mode`: how RUN is isolated; `None` detects (in-place inside a container).
    pub mode: Option<Mode>,
    /// Snapshot behaviour.
    pub snapshot: SnapshotOptions,
    /// Outputs.
    pub output: OutputOptions,
    /// `--kaniko-dir`/`--kiln-dir`: Kiln's own directory (work dirs, blob store); never
    /// snapshotted. Default `/kiln`.
    pub kiln_dir: PathBuf,
    /// `--cleanup`: remove the work directory before the build returns (without it, a
    /// background thread deletes it after the result is reported, and the next build with the
    /// same Kiln dir finishes what an exiting process left), and in in-place mode the built
    /// filesystem changes.
    pub cleanup: bool,
    /// `--force`: build even when not running in a container in in-place mode.
    pub force: bool,
    /// `--materialize`: in in-place mode, leave the target stage's filesystem in `/` even when
    /// every step was a cache hit (which otherwise unpacks nothing). Other modes build in a
    /// private work directory, so there it changes nothing.
    pub materialize: bool,
    /// `--benchmark-file`: write per-phase timings as JSON here.
    pub benchmark_file: Option<PathBuf>,
    /// `--image-fs-extract-retry`: how many more times a base image is pulled and unpacked
    /// after unpacking it failed (a damaged stored blob is dropped first, so it is fetched
    /// again), with a warning each time.
    pub extract_retries: u32,
    /// The layer cache.
    pub cache: CacheOptions,
    /// Which front end makes the plan.
    pub front_end: FrontEndChoice,
    /// The buildpacks front end's settings.
    pub buildpacks: BuildpacksOptions,
}

impl BuildOptions {
    /// Options for building the context directory or URL `context` with its `Dockerfile`,
    /// everything else at its default.
    pub fn new(context: impl Into<String>) -> BuildOptions {
        BuildOptions {
            context: ContextSpec {
                source: context.into(),
                sub_path: None,
                git: GitOptions::default(),
            },
            dockerfile: PathBuf::from("Dockerfile"),
            build_args: BTreeMap::new(),
            target: None,
            platform: None,
            secrets: Vec::new(),
            ssh: Vec::new(),
            registry: RegistryOptions::default(),
            mode: None,
            snapshot: SnapshotOptions::default(),
            output: OutputOptions {
                compression: Compression::Gzip,
                ..OutputOptions::default()
            },
            kiln_dir: PathBuf::from("/kiln"),
            cleanup: false,
            force: false,
            materialize: false,
            benchmark_file: None,
            extract_retries: 0,
            cache: CacheOptions::default(),
            front_end: FrontEndChoice::Auto,
            buildpacks: BuildpacksOptions::default(),
        }
    }
}
