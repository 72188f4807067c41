//! clap's view of the command line. Everything is optional here so that defaults, environment
//! fallbacks and kaniko's quirks are applied in one place (the `invocation` module).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::render::{Level, LogFormat, Progress};

#[derive(Parser, Debug)]
#[command(
    name = "executor",
    version,
    about = "Kiln: build container images from a Dockerfile without a daemon (kaniko-compatible).",
    disable_help_subcommand = true,
    args_conflicts_with_subcommands = true,
    args_override_self = true,
    color = clap::ColorChoice::Never
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Option<Sub>,
    #[command(flatten)]
    pub(super) build: BuildFlags,
    #[command(flatten)]
    pub(super) registry: RegistryFlags,
    #[command(flatten)]
    pub(super) log: LogFlags,
}

#[derive(Subcommand, Debug)]
pub(super) enum Sub {
    /// Download base images into the cache directory (kaniko's warmer).
    Warm(Box<WarmFlags>),
    /// Put an image built with buildpacks on a new run image, without building (`pack rebase`).
    Rebase(Box<RebaseFlags>),
    /// Look after the layer cache: `executor cache prune`.
    Cache(CacheArgs),
    /// Print the version.
    Version,
}

#[derive(Args, Debug)]
#[command(subcommand_required = true, arg_required_else_help = true)]
pub(super) struct CacheArgs {
    #[command(subcommand)]
    pub(super) command: CacheSub,
}

#[derive(Subcommand, Debug)]
pub(super) enum CacheSub {
    /// Delete expired step entries and stage records from a cache repository or oci: layout,
    /// expired base images from a cache directory, and unused layer trees from a Kiln dir.
    Prune(Box<PruneFlags>),
}

/// Generates a flag struct. Fields introduced with `@bool` are kaniko-style boolean flags:
/// `--name`, `--name=true`, `--name=false` (never `--name false`, which would be ambiguous).
macro_rules! flag_struct {
    (
        $(#[$smeta:meta])* struct $name:ident {
            $( @bool $(#[$bmeta:meta])* $bfield:ident = $blong:literal; )*
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$smeta])*
        pub(super) struct $name {
            $(
                $(#[$bmeta])*
                #[arg(
                    long = $blong,
                    value_name = "BOOL",
                    num_args = 0..=1,
                    require_equals = true,
                    default_missing_value = "true",
                    value_parser = parse_bool
                )]
                pub(super) $bfield: Option<bool>,
            )*
            $( $(#[$fmeta])* pub(super) $field: $ty, )*
        }
    };
}

flag_struct! {
    #[derive(Args, Debug)]
    struct BuildFlags {
        @bool /// Do not push the image (also `KANIKO_NO_PUSH`).
            no_push = "no-push";
        @bool /// Strip timestamps so the same inputs give the same image digest.
            reproducible = "reproducible";
        @bool /// Take one snapshot per stage instead of one per step.
            single_snapshot = "single-snapshot";
        @bool /// Leave /var/run out of snapshots (default true).
            ignore_var_run = "ignore-var-run";
        @bool /// Chroot mode: mount each stage's base as an overlay of layers unpacked once in
              /// the Kiln dir (default true); false unpacks it into every stage.
            base_overlay = "base-overlay";
        @bool /// Remove the work directory (in-place mode: the built changes) at the end.
            cleanup = "cleanup";
        @bool /// Build in place even when not running in a container.
            force = "force";
        @bool /// Accepted; Kiln always builds only the stages the target needs.
            skip_unused_stages = "skip-unused-stages";
        @bool /// Accepted; Kiln's RUN detects changes with its own snapshotter, always.
            use_new_run = "use-new-run";
        @bool /// Use the layer cache.
            cache = "cache";
        @bool /// Cache RUN layers (default true).
            cache_run_layers = "cache-run-layers";
        @bool /// Cache COPY/ADD layers (default false).
            cache_copy_layers = "cache-copy-layers";
        @bool /// Never write to the layer cache.
            no_push_cache = "no-push-cache";
        @bool /// kaniko only; `=false` is accepted with a warning (Kiln streams cache layers).
            #[arg(hide = true)] compressed_caching = "compressed-caching";
        @bool /// kaniko only; accepted and ignored (Kiln does no up-front push check).
            #[arg(hide = true)] skip_push_permission_check = "skip-push-permission-check";
        @bool /// Skip (with a warning) a destination whose immutable tag exists already (ECR,
        /// Artifact Registry) instead of failing the build.
            push_ignore_immutable_tag_errors = "push-ignore-immutable-tag-errors";
        @bool /// Give every step a layer of its own, an empty one when it changed no file.
            force_build_metadata = "force-build-metadata";
        @bool /// kaniko only; accepted with a warning (Kiln never deletes the context).
            #[arg(hide = true)] preserve_context = "preserve-context";
        @bool /// In-place mode: leave the built filesystem in / even when every step was cached.
            materialize = "materialize";
        @bool /// Deprecated kaniko spelling of --ignore-var-run.
            #[arg(hide = true)] whitelist_var_run = "whitelist-var-run";

        /// Chroot mode as root with --base-overlay only (not with --single-snapshot): put each
        /// stage's overlay upper dir (its own writes) on tmpfs: auto (default: when a quarter
        /// of the memory available is at least 64 MiB), true or false. A stage that fills the
        /// tmpfs continues on disk and the step that filled it runs again.
        #[arg(
            long = "upper-tmpfs",
            value_name = "auto|true|false",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "true"
        )]
        upper_tmpfs: Option<String>,
        /// The most the upper-dir tmpfs may hold (all stages together): bytes, or with a
        /// suffix K, M, G, T (powers of 1024; KiB/MiB/GiB and KB/MB/GB the same), at least
        /// 1M; default 4G, under auto also at most a quarter of the memory available.
        #[arg(long = "upper-tmpfs-size", value_name = "SIZE")]
        upper_tmpfs_size: Option<String>,
        /// Path to the Dockerfile (default Dockerfile); relative paths are tried against the
        /// working directory first, then the context, as kaniko does.
        #[arg(short = 'f', long = "dockerfile", value_name = "PATH")]
        dockerfile: Option<String>,
        /// Build context: a directory, dir://, tar://, git://, https:// (default /workspace/).
        #[arg(short = 'c', long = "context", value_name = "CONTEXT")]
        context: Option<String>,
        /// Subdirectory of the context to use as its root.
        #[arg(long = "context-sub-path", value_name = "PATH")]
        context_sub_path: Option<String>,
        /// Git context options: branch=NAME,single-branch=BOOL,recurse-submodules=BOOL,insecure-skip-tls=BOOL.
        #[arg(long = "git", value_name = "OPTIONS")]
        git: Vec<String>,
        /// Image reference to push to; repeat for several.
        #[arg(short = 'd', long = "destination", value_name = "IMAGE")]
        destination: Vec<String>,
        /// ARG value: K=V, or K to take the value from the environment; repeatable.
        #[arg(long = "build-arg", value_name = "K[=V]", allow_hyphen_values = true)]
        build_arg: Vec<String>,
        /// The stage to build (default: the last).
        #[arg(long = "target", value_name = "STAGE")]
        target: Option<String>,
        /// Build for this platform: OS/ARCH[/VARIANT].
        #[arg(long = "custom-platform", value_name = "PLATFORM")]
        custom_platform: Option<String>,
        /// Secret for RUN --mount=type=secret: id=ID,src=PATH or id=ID,env=VAR; repeatable.
        #[arg(long = "secret", value_name = "SPEC")]
        secret: Vec<String>,
        /// ssh-agent for RUN --mount=type=ssh: ID=SOCKET, or `default` for $SSH_AUTH_SOCK;
        /// repeatable.
        #[arg(long = "ssh", value_name = "ID[=SOCKET]")]
        ssh: Vec<String>,
        /// full, redo or time (kaniko's names; default: Kiln's exact mode, see FLAGS.md).
        #[arg(long = "snapshot-mode", value_name = "MODE")]
        snapshot_mode: Option<String>,
        /// Path never snapshotted or overwritten; repeatable.
        #[arg(long = "ignore-path", value_name = "PATH")]
        ignore_path: Vec<PathBuf>,
        /// Kiln's own directory (default /kiln; also KANIKO_DIR / KILN_DIR).
        #[arg(long = "kaniko-dir", visible_alias = "kiln-dir", value_name = "DIR")]
        kaniko_dir: Option<PathBuf>,
        /// How RUN is isolated (default auto: in-place inside a container, chroot outside).
        #[arg(long = "mode", value_enum, value_name = "MODE")]
        mode: Option<ModeArg>,
        /// Compression of new layers.
        #[arg(long = "compression", value_enum, value_name = "ALGORITHM")]
        compression: Option<CompressionArg>,
        /// Compression level (gzip 0-9, zstd 1-22; -1 is the compressor's default).
        #[arg(long = "compression-level", value_name = "N", allow_negative_numbers = true)]
        compression_level: Option<i32>,
        /// Manifest and config media types (Kiln addition).
        #[arg(long = "image-format", value_enum, value_name = "FORMAT")]
        image_format: Option<ImageFormatArg>,
        /// Write a docker-archive tarball of the image here.
        #[arg(long = "tar-path", value_name = "PATH")]
        tar_path: Option<PathBuf>,
        /// Write an OCI image layout of the image here.
        #[arg(long = "oci-layout-path", value_name = "DIR")]
        oci_layout_path: Option<PathBuf>,
        /// Write the image digest here after a successful push.
        #[arg(long = "digest-file", value_name = "PATH")]
        digest_file: Option<PathBuf>,
        /// Write REPO@DIGEST per destination here.
        #[arg(long = "image-name-with-digest-file", value_name = "PATH")]
        image_name_with_digest_file: Option<PathBuf>,
        /// Write REPO:TAG@DIGEST per destination here.
        #[arg(long = "image-name-tag-with-digest-file", value_name = "PATH")]
        image_name_tag_with_digest_file: Option<PathBuf>,
        /// Label KEY=VALUE added to the image; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        label: Vec<String>,
        /// Write per-phase timings as JSON here (also BENCHMARK_FILE).
        #[arg(long = "benchmark-file", value_name = "PATH")]
        benchmark_file: Option<PathBuf>,
        /// Cache repository: REGISTRY/REPO or oci:/path (default <destination>/cache).
        #[arg(long = "cache-repo", value_name = "REPO")]
        cache_repo: Option<String>,
        /// Base-image cache directory (default /cache).
        #[arg(long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Cache entry lifetime as a Go duration, e.g. 6h, 90m (default 336h).
        #[arg(long = "cache-ttl", value_name = "DURATION")]
        cache_ttl: Option<String>,
        /// Pull and unpack a base image up to N more times when unpacking it fails.
        #[arg(long = "image-fs-extract-retry", value_name = "N")]
        image_fs_extract_retry: Option<u32>,
        /// Credential providers besides the docker config: `default`, `gitlab` (on unless
        /// the flag is given); an empty value turns gitlab off.
        #[arg(long = "credential-helpers", value_name = "LIST")]
        credential_helpers: Vec<String>,
        /// kaniko's GCS bucket context; rejected.
        #[arg(short = 'b', long = "bucket", value_name = "BUCKET", hide = true)]
        bucket: Option<String>,
        /// Deprecated kaniko spelling of --snapshot-mode.
        #[arg(long = "snapshotMode", value_name = "MODE", hide = true)]
        snapshot_mode_deprecated: Option<String>,
        /// Deprecated kaniko spelling of --custom-platform.
        #[arg(long = "customPlatform", value_name = "PLATFORM", hide = true)]
        custom_platform_deprecated: Option<String>,
        /// Deprecated kaniko spelling of --tar-path.
        #[arg(long = "tarPath", value_name = "PATH", hide = true)]
        tar_path_deprecated: Option<PathBuf>,
        #[command(flatten)]
        buildpacks: BuildpackFlags,
    }
}

flag_struct! {
    /// Cloud Native Buildpacks (`pack build`'s names); any of them selects the buildpacks
    /// front end.
    #[derive(Args, Debug)]
    struct BuildpackFlags {
        @bool /// Buildpacks: restore no cache layers (this build's are still kept).
            clear_cache = "clear-cache";

        /// Buildpacks: a CNB builder image (its buildpacks, order and run image).
        #[arg(long = "builder", value_name = "IMAGE")]
        builder: Option<String>,
        /// Buildpacks: run this buildpack (a directory, .tgz, docker://IMAGE or ID[@VERSION]);
        /// repeat for a group, in order.
        #[arg(long = "buildpack", value_name = "URI")]
        buildpack: Vec<String>,
        /// Buildpacks: the image the app runs on (default: the builder's).
        #[arg(long = "run-image", value_name = "IMAGE")]
        run_image: Option<String>,
        /// Buildpacks: the image buildpacks run in when there is no builder.
        #[arg(long = "build-image", value_name = "IMAGE")]
        build_image: Option<String>,
        /// Buildpacks: build-time environment K=V (or K, from the environment); repeatable.
        #[arg(long = "env", value_name = "K[=V]", allow_hyphen_values = true)]
        env: Vec<String>,
        /// Buildpacks: a file of K=V lines for the build-time environment; repeatable.
        #[arg(long = "env-file", value_name = "PATH")]
        env_file: Vec<PathBuf>,
        /// Buildpacks: the process type the image runs by default.
        #[arg(long = "default-process", value_name = "TYPE")]
        default_process: Option<String>,
        /// Buildpacks: the project descriptor (default: project.toml of the context).
        #[arg(long = "descriptor", value_name = "PATH")]
        descriptor: Option<PathBuf>,
        /// Buildpacks: the image whose layers are reused (default: the destination).
        #[arg(long = "previous-image", value_name = "IMAGE")]
        previous_image: Option<String>,
        /// Buildpacks: copy the build's SBOM files into this directory.
        #[arg(long = "sbom-output-dir", value_name = "DIR")]
        sbom_output_dir: Option<PathBuf>,
    }
}

flag_struct! {
    #[derive(Args, Debug)]
    struct RebaseFlags {
        @bool /// Rebase even onto a run image the app does not name, or of another stack.
            force = "force";

        /// The app image to rebase.
        #[arg(long = "image", value_name = "IMAGE")]
        image: Option<String>,
        /// The run image to put under it.
        #[arg(long = "run-image", value_name = "IMAGE")]
        run_image: Option<String>,
        /// Where to push the result (default: the app image's name).
        #[arg(short = 'd', long = "destination", value_name = "IMAGE")]
        destination: Option<String>,
        /// Platform of the images, when they are indexes.
        #[arg(long = "custom-platform", value_name = "PLATFORM")]
        custom_platform: Option<String>,
        /// Kiln's own directory (default /kiln).
        #[arg(long = "kaniko-dir", visible_alias = "kiln-dir", value_name = "DIR")]
        kaniko_dir: Option<PathBuf>,
        /// Write the rebased image's digest here.
        #[arg(long = "digest-file", value_name = "PATH")]
        digest_file: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryFlags,
        #[command(flatten)]
        log: LogFlags,
    }
}

flag_struct! {
    #[derive(Args, Debug)]
    struct RegistryFlags {
        @bool /// Push to registries over plain HTTP.
            insecure = "insecure";
        @bool /// Pull from registries over plain HTTP.
            insecure_pull = "insecure-pull";
        @bool /// Do not verify TLS certificates when pushing.
            skip_tls_verify = "skip-tls-verify";
        @bool /// Do not verify TLS certificates when pulling.
            skip_tls_verify_pull = "skip-tls-verify-pull";
        @bool /// With mirrors configured, never fall back to the original registry.
            skip_default_registry_fallback = "skip-default-registry-fallback";

        /// Registry reached over plain HTTP for pushes and pulls; repeatable.
        #[arg(long = "insecure-registry", value_name = "REGISTRY")]
        insecure_registry: Vec<String>,
        /// Registry whose certificate is not verified; repeatable.
        #[arg(long = "skip-tls-verify-registry", value_name = "REGISTRY")]
        skip_tls_verify_registry: Vec<String>,
        /// Extra CA certificate for a registry: REGISTRY=PATH; repeatable.
        #[arg(long = "registry-certificate", value_name = "REGISTRY=PATH")]
        registry_certificate: Vec<String>,
        /// Client certificate for mutual TLS: REGISTRY=CERT,KEY; repeatable.
        #[arg(long = "registry-client-cert", value_name = "REGISTRY=CERT,KEY")]
        registry_client_cert: Vec<String>,
        /// Certificate directory: a certs.d directory holding HOST[:PORT]/ directories, or
        /// REGISTRY=DIR with one registry's *.crt, *.cert and *.key; repeatable.
        #[arg(long = "registry-certs-dir", value_name = "DIR|REGISTRY=DIR")]
        registry_certs_dir: Vec<String>,
        /// Pull-through mirror for Docker Hub; repeatable (also KANIKO_REGISTRY_MIRROR).
        #[arg(long = "registry-mirror", value_name = "MIRROR")]
        registry_mirror: Vec<String>,
        /// Mirror for any registry: ORIGINAL=MIRROR[;ORIGINAL=MIRROR...]; repeatable (also
        /// KANIKO_REGISTRY_MAP).
        #[arg(long = "registry-map", value_name = "MAP")]
        registry_map: Vec<String>,
        /// Retries for pushes (Kiln retries transient failures 3 times by default).
        #[arg(long = "push-retry", value_name = "N")]
        push_retry: Option<u32>,
        /// Retries for pulls (Kiln retries transient failures 3 times by default).
        #[arg(long = "image-download-retry", value_name = "N")]
        image_download_retry: Option<u32>,
        /// Longest time a registry request may go without a byte moving in either direction
        /// before the try fails and is retried (Go duration, default 60s; 0 waits forever).
        #[arg(long = "registry-stall-timeout", value_name = "DURATION")]
        registry_stall_timeout: Option<String>,
        /// Longest time one try of one registry request may take, body included (Go duration,
        /// default 1h; 0 for none).
        #[arg(long = "registry-request-deadline", value_name = "DURATION")]
        registry_request_deadline: Option<String>,
    }
}

flag_struct! {
    #[derive(Args, Debug)]
    struct LogFlags {
        @bool /// Prefix log lines with the wall-clock time.
            log_timestamp = "log-timestamp";

        /// Log level.
        #[arg(short = 'v', long = "verbosity", value_enum, value_name = "LEVEL")]
        verbosity: Option<Level>,
        /// Log format (default: color on a terminal, text otherwise).
        #[arg(long = "log-format", value_enum, value_name = "FORMAT")]
        log_format: Option<LogFormat>,
        /// Progress display (Kiln addition).
        #[arg(long = "progress", value_enum, value_name = "MODE")]
        progress: Option<Progress>,
    }
}

flag_struct! {
    #[derive(Args, Debug)]
    struct WarmFlags {
        @bool /// Download again even when the image is cached.
            #[arg(short = 'f')] force = "force";

        /// Image to cache; repeatable.
        #[arg(short = 'i', long = "image", value_name = "IMAGE")]
        image: Vec<String>,
        /// Also cache the base images this Dockerfile names.
        #[arg(short = 'd', long = "dockerfile", value_name = "PATH")]
        dockerfile: Option<PathBuf>,
        /// Cache directory (default /cache).
        #[arg(short = 'c', long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// ARG value for expanding FROM lines; repeatable.
        #[arg(long = "build-arg", value_name = "K[=V]", allow_hyphen_values = true)]
        build_arg: Vec<String>,
        /// Platform of the images to cache.
        #[arg(long = "custom-platform", value_name = "PLATFORM")]
        custom_platform: Option<String>,
        #[command(flatten)]
        registry: RegistryFlags,
        #[command(flatten)]
        log: LogFlags,
    }
}

flag_struct! {
    #[derive(Args, Debug)]
    struct PruneFlags {
        @bool /// Report what would be removed; change nothing.
            dry_run = "dry-run";

        /// Cache repository to prune: REGISTRY/REPO or oci:/path.
        #[arg(long = "cache-repo", value_name = "REPO")]
        cache_repo: Option<String>,
        /// Base-image cache directory (filled by `executor warm`) to prune.
        #[arg(long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Kiln dir whose layer trees (DIR/layers) to prune: those no build used for
        /// --older-than; a tree a running build mounts is kept.
        #[arg(long = "kiln-dir", visible_alias = "kaniko-dir", value_name = "DIR")]
        kiln_dir: Option<PathBuf>,
        /// Remove what is older than this Go duration, e.g. 72h (default: the cache TTL).
        #[arg(long = "older-than", value_name = "DURATION")]
        older_than: Option<String>,
        /// The builds' cache entry lifetime, the default of --older-than (default 336h).
        #[arg(long = "cache-ttl", value_name = "DURATION")]
        cache_ttl: Option<String>,
        #[command(flatten)]
        registry: RegistryFlags,
        #[command(flatten)]
        log: LogFlags,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum ModeArg {
    Auto,
    Chroot,
    InPlace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum CompressionArg {
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum ImageFormatArg {
    Oci,
    Docker,
}

/// Go's `strconv.ParseBool`, which kaniko's flags use.
pub(super) fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (use true or false)")),
    }
}
