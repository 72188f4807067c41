//! kaniko's command line, parsed into [`kiln_build::BuildOptions`].
//!
//! Flag names and meanings are kaniko's (its README's "Additional Flags" and `executor --help`),
//! so a pipeline can swap `/kaniko/executor` for `executor`. Boolean flags take `--flag`,
//! `--flag=true` or `--flag=false` (also Go's `1`, `t`, `TRUE`, `0`, `f`, `FALSE`...); flags
//! with a value take `--flag value` or `--flag=value`; the last of a repeated single-value flag
//! wins, repeatable flags accumulate. An unknown flag or stray argument is a [`UsageError`]
//! (exit code 2) that names it. Where Kiln departs from kaniko is said on the flag and in
//! `FLAGS.md`.
//!
//! Parsing reads nothing from the process: the environment comes in as a map, so tests never
//! touch global state, and files (the docker config) are read later by
//! [`Invocation::load_credentials`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_build::{
    BuildOptions, ContextSpec, GitOptions, OutputOptions, SecretSource, SecretSpec,
    SnapshotOptions, SshSpec,
};
use kiln_fs::snapshot::{KanikoSnapshotMode, SnapshotMode};
use kiln_oci::{Compression, ImageFormat, Platform};
use kiln_registry::{Keychain, RegistryOptions};
use kiln_sandbox::Mode;

use crate::render::{Level, LogFormat, OutputSettings, Progress};

/// The environment the command line is interpreted in (`--build-arg K`, `KANIKO_*`,
/// `SOURCE_DATE_EPOCH`, `DOCKER_CONFIG`, `HOME`).
pub type Env = BTreeMap<String, String>;

/// This process's environment (variables that are not valid UTF-8 are left out; no flag
/// refers to them).
pub fn process_env() -> Env {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// A command line that cannot be run: unknown flag, bad value, missing value, conflicting
/// flags. The executor prints `error: MESSAGE` and exits with [`UsageError::EXIT_CODE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UsageError {
    /// What is wrong, naming the flag.
    pub message: String,
}

impl UsageError {
    /// The exit code of a usage error, as kaniko's and most CLIs'.
    pub const EXIT_CODE: i32 = 2;

    fn new(message: impl Into<String>) -> UsageError {
        UsageError {
            message: message.into(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Build (and push) an image.
    Build(Box<Invocation>),
    /// `executor warm`: fill the base-image cache directory.
    Warm(Box<WarmInvocation>),
    /// `executor version` or `--version`.
    Version,
    /// `--help`: the text to print on standard output.
    Help(String),
}

/// A build: everything the engine needs plus what only the executor uses.
#[derive(Debug)]
pub struct Invocation {
    /// The engine's options. The registry keychain is anonymous until
    /// [`Invocation::load_credentials`] runs.
    pub options: BuildOptions,
    /// Logging and progress.
    pub output: OutputSettings,
    /// Layer-cache flags (issue 6), kept apart until the engine has cache options.
    pub cache: CacheFlags,
    /// Notes about accepted-but-ignored or deprecated flags, to be shown as warnings.
    pub warnings: Vec<String>,
}

/// kaniko's cache flags, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFlags {
    /// `--cache`: use the layer cache.
    pub enabled: bool,
    /// `--cache-repo`: `REGISTRY/REPO` or `oci:/path`; `None` means `<destination repo>/cache`.
    pub repo: Option<String>,
    /// `--cache-dir`: base-image cache directory (default `/cache`).
    pub dir: PathBuf,
    /// `--cache-ttl` (default 336h, two weeks).
    pub ttl: Duration,
    /// `--cache-run-layers` (default true).
    pub run_layers: bool,
    /// `--cache-copy-layers` (default false).
    pub copy_layers: bool,
    /// `--no-push-cache`: read the cache but never write to it.
    pub no_push_cache: bool,
}

impl Default for CacheFlags {
    fn default() -> Self {
        CacheFlags {
            enabled: false,
            repo: None,
            dir: PathBuf::from("/cache"),
            ttl: Duration::from_secs(336 * 3600),
            run_layers: true,
            copy_layers: false,
            no_push_cache: false,
        }
    }
}

impl CacheFlags {
    /// The engine's cache options for these flags. The cache directory is used when it exists
    /// (kaniko's `/cache` default is only there when a volume is mounted).
    pub fn engine_options(&self) -> kiln_build::CacheOptions {
        kiln_build::CacheOptions {
            enabled: self.enabled,
            repo: self.repo.clone(),
            dir: self.dir.is_dir().then(|| self.dir.clone()),
            ttl: self.ttl,
            run_layers: self.run_layers,
            no_push: self.no_push_cache,
            ..kiln_build::CacheOptions::default()
        }
    }
}

/// `executor warm` (kaniko's `warmer`): which base images to store in the cache directory.
#[derive(Debug)]
pub struct WarmInvocation {
    /// `-i/--image` (repeatable): images to cache.
    pub images: Vec<String>,
    /// `-d/--dockerfile`: also cache every base image this Dockerfile names.
    pub dockerfile: Option<PathBuf>,
    /// `-c/--cache-dir` (default `/cache`).
    pub cache_dir: PathBuf,
    /// `-f/--force`: download again even when the image is already cached.
    pub force: bool,
    /// `--build-arg`, for expanding `FROM` lines of `--dockerfile`.
    pub build_args: BTreeMap<String, String>,
    /// `--custom-platform`.
    pub platform: Option<Platform>,
    /// Registry transport (keychain anonymous until loaded).
    pub registry: RegistryOptions,
    /// Logging.
    pub output: OutputSettings,
    /// Warnings to show.
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// clap's view of the command line. Everything is optional here so that defaults, environment
// fallbacks and kaniko's quirks are applied in one place (`build_invocation`).

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
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    build: BuildFlags,
    #[command(flatten)]
    registry: RegistryFlags,
    #[command(flatten)]
    log: LogFlags,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Download base images into the cache directory (kaniko's warmer).
    Warm(Box<WarmFlags>),
    /// Print the version.
    Version,
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
        struct $name {
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
                $bfield: Option<bool>,
            )*
            $( $(#[$fmeta])* $field: $ty, )*
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
        @bool /// kaniko only; accepted and ignored (Kiln always streams cache layers).
            #[arg(hide = true)] compressed_caching = "compressed-caching";
        @bool /// kaniko only; accepted and ignored (Kiln does no up-front push check).
            #[arg(hide = true)] skip_push_permission_check = "skip-push-permission-check";
        @bool /// Skip (with a warning) a destination whose immutable tag exists already (ECR,
        /// Artifact Registry) instead of failing the build.
            push_ignore_immutable_tag_errors = "push-ignore-immutable-tag-errors";
        @bool /// kaniko only; accepted with a warning, not implemented.
            #[arg(hide = true)] force_build_metadata = "force-build-metadata";
        @bool /// kaniko only; accepted with a warning (Kiln never deletes the context).
            #[arg(hide = true)] preserve_context = "preserve-context";
        @bool /// In-place mode: leave the built filesystem in / even when every step was cached.
            materialize = "materialize";
        @bool /// Deprecated kaniko spelling of --ignore-var-run.
            #[arg(hide = true)] whitelist_var_run = "whitelist-var-run";

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
        /// kaniko only; accepted with a warning (extraction is not retried).
        #[arg(long = "image-fs-extract-retry", value_name = "N", hide = true)]
        image_fs_extract_retry: Option<u32>,
        /// kaniko only; accepted with a warning (Kiln uses the docker config's helpers).
        #[arg(long = "credential-helpers", value_name = "LIST", hide = true)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Auto,
    Chroot,
    InPlace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CompressionArg {
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ImageFormatArg {
    Oci,
    Docker,
}

/// Go's `strconv.ParseBool`, which kaniko's flags use.
fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (use true or false)")),
    }
}

// ---------------------------------------------------------------------------------------------

/// Parses a command line (`args[0]` is the program name) in the environment `env`.
pub fn parse<I, S>(args: I, env: &Env) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => return clap_outcome(error),
    };
    match cli.command {
        Some(Sub::Version) => Ok(Command::Version),
        Some(Sub::Warm(flags)) => Ok(Command::Warm(Box::new(build_warm(*flags, env)?))),
        None => Ok(Command::Build(Box::new(build_invocation(
            cli.build,
            cli.registry,
            cli.log,
            env,
        )?))),
    }
}

/// Help and version requests are outcomes, not errors; everything else becomes a
/// [`UsageError`] naming the offending flag or argument.
fn clap_outcome(error: clap::Error) -> Result<Command, UsageError> {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            Ok(Command::Help(error.render().to_string()))
        }
        ErrorKind::DisplayVersion => Ok(Command::Version),
        ErrorKind::UnknownArgument => {
            let argument = context_string(&error, ContextKind::InvalidArg).unwrap_or_default();
            let mut message = if argument.starts_with('-') {
                format!("unknown flag: {argument}")
            } else {
                format!("unexpected argument: {argument}")
            };
            if let Some(suggestion) = context_string(&error, ContextKind::SuggestedArg) {
                message.push_str(&format!(" (did you mean {suggestion}?)"));
            }
            if argument == "true" || argument == "false" {
                message.push_str(" (boolean flags take --flag=true or --flag=false)");
            }
            Err(UsageError::new(message))
        }
        // A stray positional argument is taken as a subcommand name; with flags before it,
        // clap reports a conflict instead. Either way it is an argument we do not take.
        _ if error.get(ContextKind::InvalidSubcommand).is_some() => {
            let argument =
                context_string(&error, ContextKind::InvalidSubcommand).unwrap_or_default();
            let mut message = format!("unexpected argument: {argument}");
            if argument == "true" || argument == "false" {
                message.push_str(" (boolean flags take --flag=true or --flag=false)");
            } else if argument == "warm" || argument == "version" {
                message.push_str(" (subcommands come before any flag)");
            }
            Err(UsageError::new(message))
        }
        _ => Err(UsageError::new(first_line(&error.render().to_string()))),
    }
}

fn context_string(error: &clap::Error, kind: ContextKind) -> Option<String> {
    match error.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(list) => list.first().cloned(),
        other => Some(other.to_string()),
    }
}

/// clap's message without its `error: ` prefix and usage footer.
fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or("invalid command line");
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

fn env_flag(env: &Env, name: &str) -> Result<Option<bool>, UsageError> {
    match env.get(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => parse_bool(v)
            .map(Some)
            .map_err(|e| UsageError::new(format!("environment variable {name}: {e}"))),
    }
}

fn build_invocation(
    flags: BuildFlags,
    registry_flags: RegistryFlags,
    log: LogFlags,
    env: &Env,
) -> Result<Invocation, UsageError> {
    let mut warnings = Vec::new();

    if let Some(bucket) = &flags.bucket {
        return Err(UsageError::new(format!(
            "--bucket {bucket}: GCS bucket contexts are not supported; pass the tarball with \
             --context=https://... or --context=tar://PATH"
        )));
    }

    let mut options = BuildOptions::new(
        flags
            .context
            .clone()
            .unwrap_or_else(|| "/workspace/".to_owned()),
    );
    options.context = ContextSpec {
        source: options.context.source,
        sub_path: flags.context_sub_path.as_ref().map(PathBuf::from),
        git: parse_git(&flags.git)?,
    };
    if let Some(dockerfile) = &flags.dockerfile {
        if dockerfile.is_empty() {
            return Err(UsageError::new("--dockerfile: empty path"));
        }
        options.dockerfile = PathBuf::from(dockerfile);
    }
    options.build_args = parse_build_args(&flags.build_arg, env, &mut warnings)?;
    options.target = flags.target.clone().filter(|t| !t.is_empty());

    let platform = match (&flags.custom_platform, &flags.custom_platform_deprecated) {
        (Some(p), _) => Some(p),
        (None, Some(p)) => {
            warnings.push("--customPlatform is deprecated; use --custom-platform".into());
            Some(p)
        }
        (None, None) => None,
    };
    options.platform = platform
        .map(|p| Platform::parse(p).map_err(|e| UsageError::new(format!("--custom-platform: {e}"))))
        .transpose()?;

    options.secrets = flags
        .secret
        .iter()
        .map(|s| parse_secret(s))
        .collect::<Result<_, _>>()?;
    options.ssh = flags
        .ssh
        .iter()
        .map(|s| parse_ssh(s, env))
        .collect::<Result<_, _>>()?;
    options.registry = registry_options(&registry_flags, env)?;
    options.mode = match flags.mode {
        None | Some(ModeArg::Auto) => None,
        Some(ModeArg::Chroot) => Some(Mode::Chroot),
        Some(ModeArg::InPlace) => Some(Mode::InPlace),
    };

    // Snapshots.
    let snapshot_mode = match (&flags.snapshot_mode, &flags.snapshot_mode_deprecated) {
        (Some(m), _) => Some(m),
        (None, Some(m)) => {
            warnings.push("--snapshotMode is deprecated; use --snapshot-mode".into());
            Some(m)
        }
        (None, None) => None,
    };
    let mut snapshot = SnapshotOptions::default();
    if let Some(mode) = snapshot_mode {
        let kaniko: KanikoSnapshotMode = mode
            .parse()
            .map_err(|e| UsageError::new(format!("--snapshot-mode: {e}")))?;
        snapshot.mode = SnapshotMode::from(kaniko);
    }
    snapshot.single_snapshot = flags.single_snapshot.unwrap_or(false);
    snapshot.ignore_paths = flags.ignore_path.clone();
    snapshot.ignore_var_run = match (flags.ignore_var_run, flags.whitelist_var_run) {
        (Some(v), _) => v,
        (None, Some(v)) => {
            warnings.push("--whitelist-var-run is deprecated; use --ignore-var-run".into());
            v
        }
        (None, None) => true,
    };
    options.snapshot = snapshot;

    // Outputs.
    let no_push = match flags.no_push {
        Some(v) => v,
        None => env_flag(env, "KANIKO_NO_PUSH")?.unwrap_or(false),
    };
    let tar_path = match (&flags.tar_path, &flags.tar_path_deprecated) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => {
            warnings.push("--tarPath is deprecated; use --tar-path".into());
            Some(p.clone())
        }
        (None, None) => None,
    };
    let compression = match flags.compression {
        None | Some(CompressionArg::Gzip) => Compression::Gzip,
        Some(CompressionArg::Zstd) => Compression::Zstd,
    };
    let compression_level = match flags.compression_level {
        None | Some(-1) => None,
        Some(level) => {
            let range = match compression {
                Compression::Zstd => 1..=22,
                _ => 0..=9,
            };
            if !range.contains(&level) {
                return Err(UsageError::new(format!(
                    "--compression-level {level}: out of range for {} ({}..={}, or -1 for the default)",
                    match compression {
                        Compression::Zstd => "zstd",
                        _ => "gzip",
                    },
                    range.start(),
                    range.end()
                )));
            }
            Some(level)
        }
    };
    let source_date_epoch = match env.get("SOURCE_DATE_EPOCH").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(v.parse::<i64>().map_err(|_| {
            UsageError::new(format!(
                "environment variable SOURCE_DATE_EPOCH={v:?}: expected whole seconds since 1970"
            ))
        })?),
    };
    options.output = OutputOptions {
        destinations: flags.destination.clone(),
        no_push,
        tar_path,
        oci_layout_path: flags.oci_layout_path.clone(),
        digest_file: flags.digest_file.clone(),
        image_name_with_digest_file: flags.image_name_with_digest_file.clone(),
        image_name_tag_with_digest_file: flags.image_name_tag_with_digest_file.clone(),
        image_format: match flags.image_format {
            None | Some(ImageFormatArg::Oci) => ImageFormat::Oci,
            Some(ImageFormatArg::Docker) => ImageFormat::Docker,
        },
        compression,
        compression_level,
        labels: parse_labels(&flags.label)?,
        reproducible: flags.reproducible.unwrap_or(false),
        source_date_epoch,
        ignore_immutable_tags: flags.push_ignore_immutable_tag_errors.unwrap_or(false),
    };

    options.kiln_dir = flags
        .kaniko_dir
        .clone()
        .or_else(|| {
            env.get("KILN_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            env.get("KANIKO_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/kiln"));
    options.cleanup = flags.cleanup.unwrap_or(false);
    options.materialize = flags.materialize.unwrap_or(false);
    options.force = flags.force.unwrap_or(false);
    options.benchmark_file = flags.benchmark_file.clone().or_else(|| {
        // kaniko's BENCHMARK_FILE; "false" is its spelling for "off".
        env.get("BENCHMARK_FILE")
            .filter(|v| !v.is_empty() && v.as_str() != "false")
            .map(PathBuf::from)
    });

    let cache = CacheFlags {
        enabled: flags.cache.unwrap_or(false),
        repo: flags.cache_repo.clone().filter(|r| !r.is_empty()),
        dir: flags
            .cache_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/cache")),
        ttl: match &flags.cache_ttl {
            None => CacheFlags::default().ttl,
            Some(text) => parse_go_duration(text)
                .map_err(|e| UsageError::new(format!("--cache-ttl {text:?}: {e}")))?,
        },
        run_layers: flags.cache_run_layers.unwrap_or(true),
        copy_layers: flags.cache_copy_layers.unwrap_or(false),
        no_push_cache: flags.no_push_cache.unwrap_or(false),
    };

    kaniko_only_warnings(&flags, &mut warnings);
    let invocation = Invocation {
        options,
        output: output_settings(&log),
        cache,
        warnings,
    };
    validate(&invocation)?;
    Ok(invocation)
}

/// kaniko's consistency rules, checked before anything runs.
fn validate(invocation: &Invocation) -> Result<(), UsageError> {
    let output = &invocation.options.output;
    if !output.no_push && output.destinations.is_empty() {
        return Err(UsageError::new(
            "you must provide --destination, or use --no-push",
        ));
    }
    if output.destinations.is_empty() && output.image_name_with_digest_file.is_some() {
        return Err(UsageError::new(
            "--image-name-with-digest-file needs at least one --destination",
        ));
    }
    if output.destinations.is_empty() && output.image_name_tag_with_digest_file.is_some() {
        return Err(UsageError::new(
            "--image-name-tag-with-digest-file needs at least one --destination",
        ));
    }
    if let Some(empty) = output.destinations.iter().find(|d| d.trim().is_empty()) {
        return Err(UsageError::new(format!(
            "--destination {empty:?}: empty image reference"
        )));
    }
    let cache = &invocation.cache;
    if cache.enabled && cache.repo.is_none() && output.destinations.is_empty() {
        return Err(UsageError::new(
            "--cache without --destination needs --cache-repo (it cannot be inferred)",
        ));
    }
    Ok(())
}

fn kaniko_only_warnings(flags: &BuildFlags, warnings: &mut Vec<String>) {
    if flags.skip_unused_stages == Some(false) {
        warnings.push(
            "--skip-unused-stages=false is ignored: Kiln always builds only the stages the target needs"
                .into(),
        );
    }
    if flags.use_new_run == Some(false) {
        warnings.push("--use-new-run=false is ignored: Kiln has one RUN implementation".into());
    }
    if flags.force_build_metadata == Some(true) {
        warnings.push("--force-build-metadata is not implemented and has no effect".into());
    }
    if flags.preserve_context == Some(true) {
        warnings.push(
            "--preserve-context has no effect: Kiln never deletes or changes the build context"
                .into(),
        );
    }
    if flags.image_fs_extract_retry.is_some_and(|n| n > 0) {
        warnings.push(
            "--image-fs-extract-retry is ignored: layer downloads are retried (--image-download-retry), extraction is not"
                .into(),
        );
    }
    if !flags.credential_helpers.is_empty() {
        warnings.push(
            "--credential-helpers is ignored: Kiln uses the credHelpers and credsStore of the docker config"
                .into(),
        );
    }
}

fn output_settings(log: &LogFlags) -> OutputSettings {
    OutputSettings {
        verbosity: log.verbosity.unwrap_or(Level::Info),
        log_format: log.log_format,
        log_timestamp: log.log_timestamp.unwrap_or(false),
        progress: log.progress.unwrap_or_default(),
    }
}

fn registry_options(flags: &RegistryFlags, env: &Env) -> Result<RegistryOptions, UsageError> {
    let mut options = RegistryOptions {
        insecure: flags.insecure.unwrap_or(false),
        insecure_pull: flags.insecure_pull.unwrap_or(false),
        insecure_registries: flags.insecure_registry.clone(),
        skip_tls_verify: flags.skip_tls_verify.unwrap_or(false),
        skip_tls_verify_pull: flags.skip_tls_verify_pull.unwrap_or(false),
        skip_tls_verify_registries: flags.skip_tls_verify_registry.clone(),
        skip_default_registry_fallback: flags.skip_default_registry_fallback.unwrap_or(false),
        ..RegistryOptions::default()
    };
    for value in &flags.registry_certificate {
        options
            .add_registry_certificate(value)
            .map_err(|e| UsageError::new(format!("--registry-certificate: {e}")))?;
    }
    for value in &flags.registry_client_cert {
        options
            .add_registry_client_certificate(value)
            .map_err(|e| UsageError::new(format!("--registry-client-cert: {e}")))?;
    }
    options.registry_mirrors = flags.registry_mirror.clone();
    if let Some(mirrors) = env.get("KANIKO_REGISTRY_MIRROR") {
        options.registry_mirrors.extend(
            mirrors
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned),
        );
    }
    let env_map = env.get("KANIKO_REGISTRY_MAP").filter(|m| !m.is_empty());
    for (source, value) in flags
        .registry_map
        .iter()
        .map(|v| ("--registry-map", v))
        .chain(env_map.map(|v| ("KANIKO_REGISTRY_MAP", v)))
    {
        for (original, mirror) in split_registry_map(value)
            .map_err(|e| UsageError::new(format!("{source} {value:?}: {e}")))?
        {
            options
                .add_registry_map(&format!("{original}={mirror}"))
                .map_err(|e| UsageError::new(format!("{source}: {e}")))?;
        }
    }
    // RegistryOptions has one retry count for every request; the larger request wins, and
    // Kiln's default of retrying transient failures is never lowered by kaniko's default 0.
    let asked = flags
        .push_retry
        .into_iter()
        .chain(flags.image_download_retry)
        .max();
    if let Some(retries) = asked {
        options.retries = options.retries.max(retries);
    }
    Ok(options)
}

/// kaniko's `--registry-map` value: `ORIGINAL=MIRROR` pairs separated by `;`. A segment without
/// `=` adds a further mirror for the previous original (`a=m1;m2`).
fn split_registry_map(value: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for segment in value.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        match segment.split_once('=') {
            Some((original, mirror))
                if !original.trim().is_empty() && !mirror.trim().is_empty() =>
            {
                pairs.push((original.trim().to_owned(), mirror.trim().to_owned()));
            }
            Some(_) => return Err(format!("{segment:?}: expected ORIGINAL=MIRROR")),
            None => match pairs.last() {
                Some((original, _)) => {
                    let original = original.clone();
                    pairs.push((original, segment.to_owned()));
                }
                None => return Err(format!("{segment:?}: expected ORIGINAL=MIRROR")),
            },
        }
    }
    if pairs.is_empty() {
        return Err("expected ORIGINAL=MIRROR[;ORIGINAL=MIRROR...]".into());
    }
    Ok(pairs)
}

fn parse_build_args(
    values: &[String],
    env: &Env,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, UsageError> {
    let mut args = BTreeMap::new();
    for value in values {
        match value.split_once('=') {
            Some(("", _)) => {
                return Err(UsageError::new(format!(
                    "--build-arg {value:?}: missing the name before '='"
                )))
            }
            Some((key, val)) => {
                args.insert(key.to_owned(), val.to_owned());
            }
            None if value.is_empty() => {
                return Err(UsageError::new("--build-arg: empty argument"));
            }
            None => match env.get(value) {
                Some(val) => {
                    args.insert(value.clone(), val.clone());
                }
                // Docker leaves an unset variable out, so the Dockerfile's default applies;
                // kaniko would pass an empty string.
                None => warnings.push(format!(
                    "--build-arg {value}: {value} is not set in the environment; the Dockerfile's default applies"
                )),
            },
        }
    }
    Ok(args)
}

fn parse_labels(values: &[String]) -> Result<BTreeMap<String, String>, UsageError> {
    let mut labels = BTreeMap::new();
    for value in values {
        let (key, val) = value.split_once('=').unwrap_or((value.as_str(), ""));
        if key.is_empty() {
            return Err(UsageError::new(format!(
                "--label {value:?}: expected KEY=VALUE"
            )));
        }
        labels.insert(key.to_owned(), val.to_owned());
    }
    Ok(labels)
}

/// `id=ID,src=PATH` (also `source=`), or `id=ID,env=VAR`; `type=file|env` is accepted as
/// BuildKit writes it.
fn parse_secret(value: &str) -> Result<SecretSpec, UsageError> {
    let bad = |why: &str| UsageError::new(format!("--secret {value:?}: {why}"));
    let (mut id, mut src, mut env_var, mut kind) = (None, None, None, None);
    for field in value.split(',').filter(|f| !f.is_empty()) {
        let (key, val) = field
            .split_once('=')
            .ok_or_else(|| bad(&format!("{field:?} is not KEY=VALUE")))?;
        match key.trim() {
            "id" => id = Some(val.to_owned()),
            "src" | "source" => src = Some(val.to_owned()),
            "env" => env_var = Some(val.to_owned()),
            "type" => kind = Some(val.to_owned()),
            other => {
                return Err(bad(&format!(
                    "unknown key {other:?} (expected id, src, env, type)"
                )))
            }
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad("missing id=ID"))?;
    let source = match (src, env_var, kind.as_deref()) {
        (Some(_), Some(_), _) => return Err(bad("give either src= or env=, not both")),
        (Some(path), None, None | Some("file")) if !path.is_empty() => {
            SecretSource::File(PathBuf::from(path))
        }
        (None, Some(var), None | Some("env")) if !var.is_empty() => SecretSource::Env(var),
        (None, None, _) => return Err(bad("missing src=PATH or env=VAR")),
        (_, _, Some(other)) if other != "file" && other != "env" => {
            return Err(bad(&format!(
                "unknown type {other:?} (expected file or env)"
            )))
        }
        _ => {
            return Err(bad(
                "type= does not match the source given, or the source is empty",
            ))
        }
    };
    Ok(SecretSpec { id, source })
}

/// BuildKit's `--ssh ID[=SOCKET]`: an agent's socket under an id; `ID` alone means the agent
/// of `SSH_AUTH_SOCK`. BuildKit also takes key files (`ID=KEY[,KEY]`), which it loads into an
/// agent of its own; Kiln forwards an agent only, and says so.
fn parse_ssh(value: &str, env: &Env) -> Result<SshSpec, UsageError> {
    let bad = |why: String| UsageError::new(format!("--ssh {value:?}: {why}"));
    let (id, socket) = match value.split_once('=') {
        Some((id, paths)) => {
            if paths.contains(',') || paths.is_empty() {
                return Err(bad(
                    "give one agent socket; key files are not read: ssh-add them to an \
                     ssh-agent and give its socket"
                        .into(),
                ));
            }
            (id, PathBuf::from(paths))
        }
        None => {
            let socket = env
                .get("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    bad(format!(
                        "SSH_AUTH_SOCK is not set; start an ssh-agent or give --ssh {value}=SOCKET"
                    ))
                })?;
            (value, PathBuf::from(socket))
        }
    };
    if id.is_empty() || id.contains(',') {
        return Err(bad("the id is empty or holds a comma".into()));
    }
    Ok(SshSpec {
        id: id.to_owned(),
        socket,
    })
}

/// kaniko's `--git branch=NAME,single-branch=BOOL,recurse-submodules=BOOL,insecure-skip-tls=BOOL`.
fn parse_git(values: &[String]) -> Result<GitOptions, UsageError> {
    let mut git = GitOptions::default();
    for value in values {
        for field in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (key, val) = field.split_once('=').ok_or_else(|| {
                UsageError::new(format!("--git {value:?}: {field:?} is not KEY=VALUE"))
            })?;
            let flag =
                |v: &str| parse_bool(v).map_err(|e| UsageError::new(format!("--git {key}: {e}")));
            match key {
                "branch" => git.branch = Some(val.to_owned()).filter(|b| !b.is_empty()),
                "single-branch" => git.single_branch = flag(val)?,
                "recurse-submodules" => git.recurse_submodules = flag(val)?,
                "insecure-skip-tls" => git.insecure_skip_tls = flag(val)?,
                other => {
                    return Err(UsageError::new(format!(
                        "--git: unknown option {other:?} (expected branch, single-branch, recurse-submodules, insecure-skip-tls)"
                    )))
                }
            }
        }
    }
    Ok(git)
}

/// A Go `time.Duration` string as kaniko's `--cache-ttl` takes it: `336h`, `1h30m`, `1.5h`,
/// `90s`, `500ms`, `0`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let body = trimmed.strip_prefix('+').unwrap_or(trimmed);
    if body.starts_with('-') {
        return Err("must not be negative".into());
    }
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." {
            return Err("expected a number before each unit, e.g. 6h or 1h30m".into());
        }
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{number:?} is not a number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (ns, us, ms, s, m, h)".into()),
            other => return Err(format!("unknown unit {other:?} (ns, us, ms, s, m, h)")),
        };
        total += value * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| "out of range".into())
}

fn build_warm(flags: WarmFlags, env: &Env) -> Result<WarmInvocation, UsageError> {
    let mut warnings = Vec::new();
    if flags.image.is_empty() && flags.dockerfile.is_none() {
        return Err(UsageError::new(
            "warm: give at least one --image or a --dockerfile",
        ));
    }
    Ok(WarmInvocation {
        images: flags.image,
        dockerfile: flags.dockerfile,
        cache_dir: flags.cache_dir.unwrap_or_else(|| PathBuf::from("/cache")),
        force: flags.force.unwrap_or(false),
        build_args: parse_build_args(&flags.build_arg, env, &mut warnings)?,
        platform: flags
            .custom_platform
            .as_deref()
            .map(|p| {
                Platform::parse(p).map_err(|e| UsageError::new(format!("--custom-platform: {e}")))
            })
            .transpose()?,
        registry: registry_options(&flags.registry, env)?,
        output: output_settings(&flags.log),
        warnings,
    })
}

/// Where the docker `config.json` is looked for, first match wins: `$DOCKER_CONFIG`, the
/// `--kaniko-dir`'s `.docker`, `/kiln/.docker`, `/kaniko/.docker`, `$HOME/.docker`.
pub fn credential_search_dirs(kiln_dir: &Path, env: &Env) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut push = |dir: PathBuf| {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    };
    if let Some(dir) = env.get("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        push(PathBuf::from(dir));
    }
    push(kiln_dir.join(".docker"));
    push(PathBuf::from("/kiln/.docker"));
    push(PathBuf::from("/kaniko/.docker"));
    if let Some(home) = env.get("HOME").filter(|d| !d.is_empty()) {
        push(Path::new(home).join(".docker"));
    }
    dirs
}

impl Invocation {
    /// Loads registry credentials from the first docker `config.json` found (see
    /// [`credential_search_dirs`]). No config file means anonymous access; an unreadable one is
    /// an error naming it. (System CA certificates, `SSL_CERT_FILE` and `SSL_CERT_DIR` are read
    /// by kiln-registry itself.)
    pub fn load_credentials(&mut self, env: &Env) -> Result<(), kiln_registry::Error> {
        let dirs = credential_search_dirs(&self.options.kiln_dir, env);
        self.options.registry.keychain = Keychain::from_search_dirs(&dirs)?;
        Ok(())
    }

    /// kaniko's Dockerfile lookup: a relative `--dockerfile` that exists relative to the
    /// working directory `cwd` is used from there (made absolute); otherwise it stays relative
    /// to the context, where the engine looks for it.
    pub fn resolve_dockerfile(&mut self, cwd: &Path) {
        let dockerfile = &self.options.dockerfile;
        if dockerfile.is_relative() && dockerfile != Path::new("Dockerfile") {
            let candidate = cwd.join(dockerfile);
            if candidate.is_file() {
                self.options.dockerfile = candidate;
            }
        }
    }
}

impl WarmInvocation {
    /// Loads registry credentials as [`Invocation::load_credentials`] does.
    pub fn load_credentials(&mut self, env: &Env) -> Result<(), kiln_registry::Error> {
        let dirs = credential_search_dirs(Path::new("/kiln"), env);
        self.registry.keychain = Keychain::from_search_dirs(&dirs)?;
        Ok(())
    }
}
