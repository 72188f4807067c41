//! kaniko's command line, parsed into [`kiln_engine::BuildOptions`].
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

mod buildpacks;
mod credentials;
mod flags;
mod invocation;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;
use kiln_engine::BuildOptions;
use kiln_oci::Platform;
use kiln_registry::{Keychain, RegistryOptions};

use crate::render::OutputSettings;

pub use self::credentials::CredentialProviders;
use self::flags::{parse_bool, CacheSub, Cli, Sub};
use self::invocation::{build_invocation, build_prune, build_warm};
pub use self::invocation::{credential_search_dirs, parse_go_duration};

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
    /// `executor rebase`: put a buildpacks image on a new run image.
    Rebase(Box<RebaseInvocation>),
    /// `executor cache prune`: remove expired cache entries, stored base images and unused
    /// layer trees.
    CachePrune(Box<PruneInvocation>),
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
    /// `--credential-helpers`: the providers consulted besides the docker config.
    pub credential_providers: CredentialProviders,
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
    pub fn engine_options(&self) -> kiln_engine::CacheOptions {
        kiln_engine::CacheOptions {
            enabled: self.enabled,
            repo: self.repo.clone(),
            dir: self.dir.is_dir().then(|| self.dir.clone()),
            ttl: self.ttl,
            run_layers: self.run_layers,
            no_push: self.no_push_cache,
            ..kiln_engine::CacheOptions::default()
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

/// `executor cache prune`: which caches to prune, and of what.
#[derive(Debug)]
pub struct PruneInvocation {
    /// `--cache-repo`: `REGISTRY/REPO` or `oci:/path`.
    pub cache_repo: Option<String>,
    /// `--cache-dir`: a base-image directory filled by `executor warm`.
    pub cache_dir: Option<PathBuf>,
    /// `--older-than` (default: `--cache-ttl`, itself 336h by default).
    pub older_than: Duration,
    /// `--cache-ttl`, which the registry or layout cache is opened with.
    pub ttl: Duration,
    /// `--dry-run`: report, change nothing.
    pub dry_run: bool,
    /// Registry transport (keychain anonymous until loaded).
    pub registry: RegistryOptions,
    /// Where the docker config is looked for besides `$DOCKER_CONFIG` (`--kiln-dir`,
    /// `$KILN_DIR`, `$KANIKO_DIR`, else `/kiln`).
    pub kiln_dir: PathBuf,
    /// `--kiln-dir`: the Kiln dir whose layer trees are pruned.
    pub layer_trees: Option<PathBuf>,
    /// Logging.
    pub output: OutputSettings,
}

impl PruneInvocation {
    /// Loads registry credentials as [`Invocation::load_credentials`] does.
    pub fn load_credentials(&mut self, env: &Env) -> Result<(), kiln_registry::Error> {
        let dirs = credential_search_dirs(&self.kiln_dir, env);
        let keychain = Keychain::from_search_dirs(&dirs)?;
        self.registry.keychain = CredentialProviders::default().apply(keychain, env);
        Ok(())
    }
}

/// `executor rebase` (`pack rebase`).
#[derive(Debug)]
pub struct RebaseInvocation {
    /// The engine's options (keychain anonymous until loaded).
    pub options: kiln_engine::RebaseOptions,
    /// `--digest-file`: write the rebased image's digest here.
    pub digest_file: Option<PathBuf>,
    /// Logging.
    pub output: OutputSettings,
}

impl RebaseInvocation {
    /// Loads registry credentials as [`Invocation::load_credentials`] does.
    pub fn load_credentials(&mut self, env: &Env) -> Result<(), kiln_registry::Error> {
        let dirs = credential_search_dirs(&self.options.kiln_dir, env);
        let keychain = Keychain::from_search_dirs(&dirs)?;
        self.options.registry.keychain = CredentialProviders::default().apply(keychain, env);
        Ok(())
    }
}

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
        Some(Sub::Rebase(flags)) => Ok(Command::Rebase(Box::new(buildpacks::build_rebase(
            *flags, env,
        )?))),
        Some(Sub::Cache(cache)) => match cache.command {
            CacheSub::Prune(flags) => Ok(Command::CachePrune(Box::new(build_prune(*flags, env)?))),
        },
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
            } else if ["warm", "version", "rebase", "cache"].contains(&argument.as_str()) {
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

impl Invocation {
    /// Loads registry credentials from the first docker `config.json` found (see
    /// [`credential_search_dirs`]). No config file means anonymous access; an unreadable one is
    /// an error naming it. (System CA certificates, `SSL_CERT_FILE` and `SSL_CERT_DIR` are read
    /// by kiln-registry itself.)
    pub fn load_credentials(&mut self, env: &Env) -> Result<(), kiln_registry::Error> {
        let dirs = credential_search_dirs(&self.options.kiln_dir, env);
        let keychain = Keychain::from_search_dirs(&dirs)?;
        self.options.registry.keychain = self.credential_providers.apply(keychain, env);
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
        let keychain = Keychain::from_search_dirs(&dirs)?;
        self.registry.keychain = CredentialProviders::default().apply(keychain, env);
        Ok(())
    }
}
