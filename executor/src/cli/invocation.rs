//! Turning clap's flags into an [`Invocation`]: defaults, environment fallbacks, kaniko's
//! deprecated spellings (with warnings), validation, and the values flags carry (build args,
//! secrets, registry options, durations).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_engine::{
    BuildOptions, ContextSpec, GitOptions, OutputOptions, SecretSource, SecretSpec,
    SnapshotOptions, SshSpec, UpperTmpfs,
};
use kiln_fs::snapshot::{KanikoSnapshotMode, SnapshotMode};
use kiln_oci::{Compression, ImageFormat, Platform};
use kiln_registry::RegistryOptions;
use kiln_sandbox::Mode;

use crate::render::{Level, OutputSettings};

use super::flags::*;
use super::*;

pub(super) fn build_invocation(
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
    let (buildpacks, buildpack_flags) =
        super::buildpacks::buildpacks_options(&flags.buildpacks, env)?;
    options.buildpacks = buildpacks;
    options.front_end = super::buildpacks::front_end(flags.dockerfile.is_some(), buildpack_flags)?;
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

    options.snapshot = snapshot_options(&flags, &mut warnings)?;
    options.extract_retries = flags.image_fs_extract_retry.unwrap_or(0);

    options.output = output_options(&flags, env, &mut warnings)?;
    options.kiln_dir = kiln_dir(flags.kaniko_dir.as_deref(), env);
    options.cleanup = flags.cleanup.unwrap_or(false);
    options.materialize = flags.materialize.unwrap_or(false);
    options.force = flags.force.unwrap_or(false);
    options.benchmark_file = flags.benchmark_file.clone().or_else(|| {
        // kaniko's BENCHMARK_FILE; "false" is its spelling for "off".
        env.get("BENCHMARK_FILE")
            .filter(|v| !v.is_empty() && v.as_str() != "false")
            .map(PathBuf::from)
    });

    let cache = cache_flags(&flags)?;

    kaniko_only_warnings(&flags, &mut warnings);
    let invocation = Invocation {
        options,
        output: output_settings(&log),
        cache,
        credential_providers: super::CredentialProviders::from_flag(&flags.credential_helpers)?,
        warnings,
    };
    validate(&invocation)?;
    Ok(invocation)
}

/// `--snapshot-mode`, `--single-snapshot`, `--ignore-path`, `--ignore-var-run` (and their
/// deprecated spellings).
fn snapshot_options(
    flags: &BuildFlags,
    warnings: &mut Vec<String>,
) -> Result<SnapshotOptions, UsageError> {
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
    snapshot.force_build_metadata = flags.force_build_metadata.unwrap_or(false);
    snapshot.ignore_paths = flags.ignore_path.clone();
    snapshot.base_overlay = flags.base_overlay.unwrap_or(true);
    snapshot.upper_tmpfs = match flags.upper_tmpfs.as_deref() {
        None | Some("auto") => UpperTmpfs::Auto,
        Some(value) => match super::flags::parse_bool(value) {
            Ok(true) => UpperTmpfs::Always,
            Ok(false) => UpperTmpfs::Never,
            Err(_) => {
                return Err(UsageError::new(format!(
                    "--upper-tmpfs={value}: use auto, true or false"
                )))
            }
        },
    };
    snapshot.upper_tmpfs_size = flags
        .upper_tmpfs_size
        .as_deref()
        .map(|text| {
            parse_size(text)
                .map_err(|e| UsageError::new(format!("--upper-tmpfs-size {text:?}: {e}")))
        })
        .transpose()?;
    snapshot.ignore_var_run = match (flags.ignore_var_run, flags.whitelist_var_run) {
        (Some(v), _) => v,
        (None, Some(v)) => {
            warnings.push("--whitelist-var-run is deprecated; use --ignore-var-run".into());
            v
        }
        (None, None) => true,
    };
    Ok(snapshot)
}

/// Where the image goes and how it is written: destinations, `--no-push`, local outputs,
/// format, compression, labels, reproducibility.
fn output_options(
    flags: &BuildFlags,
    env: &Env,
    warnings: &mut Vec<String>,
) -> Result<OutputOptions, UsageError> {
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
    Ok(OutputOptions {
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
    })
}

/// The layer cache flags.
fn cache_flags(flags: &BuildFlags) -> Result<CacheFlags, UsageError> {
    Ok(CacheFlags {
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
    })
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
    if flags.compressed_caching == Some(false) {
        warnings.push(
            "--compressed-caching=false has no effect: Kiln compresses cache layers as it streams \
             them, so they never take the memory kaniko's flag saves"
                .into(),
        );
    }
    if flags.preserve_context == Some(true) {
        warnings.push(
            "--preserve-context has no effect: Kiln never deletes or changes the build context"
                .into(),
        );
    }
}

/// `--kaniko-dir`, else `$KILN_DIR`, else `$KANIKO_DIR`, else `/kiln`.
pub(super) fn kiln_dir(flag: Option<&Path>, env: &Env) -> PathBuf {
    let from_env = |name: &str| env.get(name).filter(|d| !d.is_empty()).map(PathBuf::from);
    flag.map(Path::to_path_buf)
        .or_else(|| from_env("KILN_DIR"))
        .or_else(|| from_env("KANIKO_DIR"))
        .unwrap_or_else(|| PathBuf::from("/kiln"))
}

pub(super) fn output_settings(log: &LogFlags) -> OutputSettings {
    OutputSettings {
        verbosity: log.verbosity.unwrap_or(Level::Info),
        log_format: log.log_format,
        log_timestamp: log.log_timestamp.unwrap_or(false),
        progress: log.progress.unwrap_or_default(),
    }
}

pub(super) fn registry_options(
    flags: &RegistryFlags,
    env: &Env,
) -> Result<RegistryOptions, UsageError> {
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
    for value in &flags.registry_certs_dir {
        options
            .add_registry_certs_dir(value)
            .map_err(|e| UsageError::new(format!("--registry-certs-dir: {e}")))?;
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
    if let Some(text) = &flags.registry_stall_timeout {
        options.stall_timeout = bound("--registry-stall-timeout", text)?;
    }
    if let Some(text) = &flags.registry_request_deadline {
        options.request_deadline = bound("--registry-request-deadline", text)?;
    }
    Ok(options)
}

/// A time bound given as a Go duration, where `0` means none.
fn bound(flag: &str, text: &str) -> Result<Option<Duration>, UsageError> {
    let duration =
        parse_go_duration(text).map_err(|e| UsageError::new(format!("{flag} {text:?}: {e}")))?;
    Ok((!duration.is_zero()).then_some(duration))
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

/// A size in bytes: a number, optionally followed by `k`/`K`, `M`, `G` or `T` (powers of
/// 1024, as tmpfs's own `size=` option reads them), also spelled `KiB`, `KB`, `Mi`, ... Sizes
/// under 1 MiB are refused: a tmpfs that small holds nothing worth its mount.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &text[digits.len()..];
    let number: u64 = digits
        .parse()
        .map_err(|_| "not a size (use a number of bytes, or e.g. 512M, 2G)".to_owned())?;
    let shift = match suffix {
        "" | "B" | "b" => 0,
        "k" | "K" | "KB" | "KiB" | "Ki" | "kB" => 10,
        "m" | "M" | "MB" | "MiB" | "Mi" => 20,
        "g" | "G" | "GB" | "GiB" | "Gi" => 30,
        "t" | "T" | "TB" | "TiB" | "Ti" => 40,
        other => return Err(format!("unknown unit {other:?} (use K, M, G or T)")),
    };
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or_else(|| "too large".to_owned())?;
    if bytes < 1 << 20 {
        return Err("at least 1M".to_owned());
    }
    Ok(bytes)
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

pub(super) fn build_warm(flags: WarmFlags, env: &Env) -> Result<WarmInvocation, UsageError> {
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

/// `executor cache prune`: at least one cache to prune, `--older-than` defaulting to the TTL.
pub(super) fn build_prune(flags: PruneFlags, env: &Env) -> Result<PruneInvocation, UsageError> {
    let cache_repo = flags.cache_repo.filter(|r| !r.is_empty());
    if cache_repo.is_none() && flags.cache_dir.is_none() && flags.kiln_dir.is_none() {
        return Err(UsageError::new(
            "cache prune: name the cache to prune with --cache-repo REGISTRY/REPO (or oci:/path), --cache-dir DIR and/or --kiln-dir DIR",
        ));
    }
    let duration = |flag: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|text| {
                parse_go_duration(text)
                    .map_err(|e| UsageError::new(format!("{flag} {text:?}: {e}")))
            })
            .transpose()
    };
    let ttl = duration("--cache-ttl", &flags.cache_ttl)?.unwrap_or(CacheFlags::default().ttl);
    Ok(PruneInvocation {
        cache_repo,
        cache_dir: flags.cache_dir,
        older_than: duration("--older-than", &flags.older_than)?.unwrap_or(ttl),
        ttl,
        dry_run: flags.dry_run.unwrap_or(false),
        registry: registry_options(&flags.registry, env)?,
        kiln_dir: kiln_dir(flags.kiln_dir.as_deref(), env),
        layer_trees: flags.kiln_dir,
        output: output_settings(&flags.log),
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
