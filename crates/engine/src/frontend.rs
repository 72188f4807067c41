//! The Dockerfile front end: read the Dockerfile (through the context's root when it is
//! inside the context), parse it, and lower it into a [`kiln_plan::Plan`] for the target and
//! platforms asked for; and whether there is a Dockerfile at all (the buildpacks front end,
//! in `buildpacks`, runs when there is none).

use std::path::{Path, PathBuf};

use kiln_context::BuildContext;
use kiln_dockerfile::{Dockerfile, PlanOptions};
use kiln_oci::Platform;
use kiln_plan::{BaseFacts, Operation, Plan};
use kiln_sandbox::Mode;

use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};
use crate::options::BuildOptions;

/// The plan of the build `options` describe, from the Dockerfile in `context` (at
/// `dockerfile`, as [`locate_dockerfile`] found it).
pub(crate) fn dockerfile_plan(
    options: &BuildOptions,
    context: &BuildContext,
    dockerfile: &Path,
    platform: &Platform,
) -> Result<Plan, BuildError> {
    let name = options.dockerfile.display().to_string();
    let text = read_dockerfile(context, dockerfile)?;
    let parsed = Dockerfile::parse(&text).map_err(|e| dockerfile_error(&name, e))?;
    let to_df_platform = |p: &Platform| {
        kiln_dockerfile::Platform::parse(&p.to_string()).map_err(BuildError::Options)
    };
    parsed
        .lower(
            &text,
            &name,
            &PlanOptions {
                build_args: options.build_args.clone(),
                target: options.target.clone(),
                target_platform: to_df_platform(platform)?,
                build_platform: to_df_platform(&Platform::host())?,
            },
        )
        .map_err(|e| dockerfile_error(&name, e))
}

/// Whether any stage of `plan` runs a program, as far as can be told before its base is
/// known.
fn runs_programs(plan: &Plan) -> bool {
    plan.stages().iter().any(|stage| {
        stage
            .steps
            .lower(&BaseFacts::default(), &crate::stage::trees::NoStages)
            .is_ok_and(|steps| {
                steps
                    .iter()
                    .any(|step| matches!(step.operation, Operation::Run(_)))
            })
    })
}

/// In-place, RUN shares `/` with Kiln and so with the registry credentials it read (the
/// mounted docker-registry Secret): the paths that hold them, for RUN to hide from every step.
/// Kiln holds the credentials in memory from before the first step. Hiding needs a mount
/// namespace, so CAP_SYS_ADMIN; without it the user is told once, as the build starts, that
/// RUN steps can read them (as under kaniko).
pub(crate) fn hidden_credentials(
    options: &BuildOptions,
    mode: Mode,
    plan: &Plan,
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
    if runs_programs(plan) && !kiln_sandbox::has_sys_admin() {
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

/// Whether there is an entry at the Dockerfile's path (as [`locate_dockerfile`] found it),
/// looked up inside the context when it is there. Any entry counts, a symlink that leads out
/// of the context or a directory included: the user meant a Dockerfile build, and reading it
/// then fails with an error naming the Dockerfile instead of silently switching to buildpacks.
pub(crate) fn dockerfile_exists(context: &BuildContext, path: &Path) -> bool {
    match context_relative(context, path) {
        Some(rel) => context.tree().symlink_metadata(&rel).is_ok(),
        None => path.symlink_metadata().is_ok(),
    }
}

/// `path` relative to the context's root, when it is inside the context.
fn context_relative(context: &BuildContext, path: &Path) -> Option<PathBuf> {
    if path.is_absolute() {
        let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
        parent.and_then(|parent| {
            let full = parent.join(path.file_name()?);
            full.strip_prefix(context.root())
                .ok()
                .map(Path::to_path_buf)
        })
    } else {
        Some(path.to_path_buf())
    }
}

/// The Dockerfile's text. One inside the context (the usual case, also when named by an
/// absolute path into it, as `-f "$(pwd)/Dockerfile" -c "$(pwd)"` does) is read through the
/// context's root, so a context whose Dockerfile is a symlink cannot make the build parse (and
/// print in its errors) a file of the host; one the user named elsewhere is read where it is.
fn read_dockerfile(
    context: &kiln_context::BuildContext,
    path: &Path,
) -> Result<String, BuildError> {
    let inside = context_relative(context, path);
    let read = |file: std::io::Result<std::fs::File>| {
        let mut text = String::new();
        file.and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut text))
            .map(|_| text)
    };
    match inside {
        Some(rel) => context
            .tree()
            .open_file(&rel)
            .map_err(|e| BuildError::Context(Box::new(e)))
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
pub(crate) fn locate_dockerfile(dockerfile: &Path, context: &str) -> PathBuf {
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
        Some(rest) if file != "Dockerfile" => BuildError::Plan(format!("{file}{rest}")),
        _ => BuildError::Plan(text),
    }
}
