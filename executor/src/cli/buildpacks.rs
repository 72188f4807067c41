//! The buildpacks flags (`pack build`'s names) and `executor rebase`.

use kiln_engine::{BuildpacksOptions, FrontEndChoice};
use kiln_oci::Platform;

use super::flags::{BuildpackFlags, RebaseFlags};
use super::invocation::{output_settings, registry_options};
use super::{Env, RebaseInvocation, UsageError};

/// The buildpacks options the flags give, and whether any was given (which selects the
/// buildpacks front end).
pub(super) fn buildpacks_options(
    flags: &BuildpackFlags,
    env: &Env,
) -> Result<(BuildpacksOptions, bool), UsageError> {
    let mut options = BuildpacksOptions {
        builder: non_empty(&flags.builder, "--builder")?,
        buildpacks: flags.buildpack.clone(),
        run_image: non_empty(&flags.run_image, "--run-image")?,
        build_image: non_empty(&flags.build_image, "--build-image")?,
        env: Vec::new(),
        env_files: flags.env_file.clone(),
        default_process: non_empty(&flags.default_process, "--default-process")?,
        descriptor: flags.descriptor.clone(),
        previous_image: non_empty(&flags.previous_image, "--previous-image")?,
        clear_cache: flags.clear_cache.unwrap_or(false),
        sbom_output_dir: flags.sbom_output_dir.clone(),
        ..BuildpacksOptions::default()
    };
    for value in &flags.env {
        match value.split_once('=') {
            Some(("", _)) => {
                return Err(UsageError::new(format!(
                    "--env {value:?}: missing the name before '='"
                )))
            }
            Some((name, val)) => options.env.push((name.to_owned(), val.to_owned())),
            // `pack build --env NAME` takes the value from the environment.
            None => match env.get(value) {
                Some(val) => options.env.push((value.clone(), val.clone())),
                None => {
                    return Err(UsageError::new(format!(
                        "--env {value}: {value} is not set in the environment"
                    )))
                }
            },
        }
    }
    let any = options != BuildpacksOptions::default();
    Ok((options, any))
}

fn non_empty(value: &Option<String>, flag: &str) -> Result<Option<String>, UsageError> {
    match value.as_deref() {
        Some("") => Err(UsageError::new(format!("{flag}: empty value"))),
        other => Ok(other.map(str::to_owned)),
    }
}

/// The front end the command line selects: the Dockerfile when `-f` names one, buildpacks
/// when a buildpack flag is given, else whichever the context calls for.
pub(super) fn front_end(
    dockerfile_named: bool,
    buildpack_flags: bool,
) -> Result<FrontEndChoice, UsageError> {
    match (dockerfile_named, buildpack_flags) {
        (true, true) => Err(UsageError::new(
            "--dockerfile and buildpack flags (--builder, --buildpack, ...) select different front ends: give one",
        )),
        (true, false) => Ok(FrontEndChoice::Dockerfile),
        (false, true) => Ok(FrontEndChoice::Buildpacks),
        (false, false) => Ok(FrontEndChoice::Auto),
    }
}

/// `executor rebase`.
pub(super) fn build_rebase(flags: RebaseFlags, env: &Env) -> Result<RebaseInvocation, UsageError> {
    let required = |value: Option<String>, flag: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| UsageError::new(format!("rebase: {flag} is required")))
    };
    let kiln_dir = super::invocation::kiln_dir(flags.kaniko_dir.as_deref(), env);
    let options = kiln_engine::RebaseOptions {
        image: required(flags.image, "--image")?,
        run_image: required(flags.run_image, "--run-image")?,
        destination: flags.destination.filter(|d| !d.is_empty()),
        force: flags.force.unwrap_or(false),
        registry: registry_options(&flags.registry, env)?,
        platform: flags
            .custom_platform
            .as_deref()
            .map(|p| {
                Platform::parse(p).map_err(|e| UsageError::new(format!("--custom-platform: {e}")))
            })
            .transpose()?,
        kiln_dir,
    };
    Ok(RebaseInvocation {
        options,
        digest_file: flags.digest_file,
        output: output_settings(&flags.log),
    })
}
