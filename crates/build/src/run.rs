//! RUN: turns a [`RunCommand`] into a sandbox [`Step`] (shell, user, env, workdir, mounts),
//! runs it, and streams its output as events. Secrets are materialised in a private file for
//! the step only; neither their values nor their files reach the rootfs, a layer or an event.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_dockerfile::{Mount, MountType, NetworkMode, RunCommand, RunProgram, Source};
use kiln_oci::image::ContainerConfig;
use kiln_sandbox::{
    CancelToken, Command, MountKind, MountSpec, OutputStream as SandboxStream, RunOutcome, Sandbox,
    Step,
};

use crate::events::{BuildEvent, OutputStream};
use crate::options::{SecretSource, SecretSpec};

/// What a RUN needs from the rest of the build besides the instruction.
pub struct RunContext<'a> {
    /// Stage and step numbers, for events.
    pub stage: usize,
    /// Step number within the stage.
    pub step: usize,
    /// The build context directory (default source of bind mounts).
    pub context_root: &'a Path,
    /// Rootfs directories of finished stages (sources of `--mount=from=STAGE`).
    pub stage_root: &'a dyn Fn(usize) -> Option<PathBuf>,
    /// Where per-step files (secrets, heredoc scripts, rw bind copies) are made; removed after.
    pub scratch: &'a Path,
    /// Persistent directory holding cache mounts.
    pub cache_mounts: &'a Path,
    /// The `--secret` flags.
    pub secrets: &'a [SecretSpec],
    /// Event sink.
    pub emit: &'a (dyn Fn(BuildEvent) + Send + Sync),
}

/// Runs `run` in `sandbox` with the stage's `config` (USER, WORKDIR, SHELL) and environment
/// `env`. Returns the sandbox outcome, or a message for the error that stopped it from running.
pub fn run(
    sandbox: &dyn Sandbox,
    ctx: &RunContext<'_>,
    run: &RunCommand,
    config: &ContainerConfig,
    env: Vec<(String, String)>,
) -> Result<RunOutcome, String> {
    std::fs::create_dir_all(ctx.scratch).map_err(|e| format!("{}: {e}", ctx.scratch.display()))?;
    let mut step = Step::new(Command::exec(["/bin/true"]));
    step.env = env;
    step.user = config.user.clone().filter(|u| !u.is_empty());
    step.workdir = PathBuf::from(
        config
            .working_dir
            .as_deref()
            .filter(|w| !w.is_empty())
            .unwrap_or("/"),
    );
    step.command = match &run.program {
        RunProgram::Exec(argv) => Command::exec(argv.clone()),
        RunProgram::Shell(script) => {
            let mut argv = crate::metadata::shell(config);
            argv.push(script.clone());
            Command::exec(argv)
        }
        RunProgram::Script { name, content } => {
            let host = ctx.scratch.join(format!("heredoc-{}", sanitize(name)));
            std::fs::write(&host, content).map_err(|e| format!("{}: {e}", host.display()))?;
            std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", host.display()))?;
            let target = PathBuf::from("/run/kiln-heredoc").join(sanitize(name));
            step.mounts.push(MountSpec {
                target: target.clone(),
                kind: MountKind::Bind {
                    source: host,
                    readonly: true,
                },
            });
            Command::exec([target.to_string_lossy().into_owned()])
        }
    };
    if run.network == NetworkMode::None {
        (ctx.emit)(BuildEvent::Warning {
            message: "RUN --network=none is not isolated yet: the step uses the host network"
                .into(),
        });
    }
    for mount in &run.mounts {
        prepare_mount(ctx, mount, &mut step)?;
    }

    let mut sink = |stream: SandboxStream, line: &[u8]| {
        (ctx.emit)(BuildEvent::RunOutput {
            stage: ctx.stage,
            step: ctx.step,
            stream: match stream {
                SandboxStream::Stdout => OutputStream::Stdout,
                SandboxStream::Stderr => OutputStream::Stderr,
            },
            line: String::from_utf8_lossy(line).into_owned(),
        })
    };
    sandbox
        .run(&step, &mut sink, &CancelToken::new())
        .map_err(|e| e.to_string())
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn absolute_target(target: &str) -> PathBuf {
    if target.starts_with('/') {
        PathBuf::from(target)
    } else {
        Path::new("/").join(target)
    }
}

fn prepare_mount(ctx: &RunContext<'_>, mount: &Mount, step: &mut Step) -> Result<(), String> {
    match mount.kind {
        MountType::Bind => {
            let base = match &mount.from {
                None => ctx.context_root.to_path_buf(),
                Some(Source::Stage(index)) => (ctx.stage_root)(*index).ok_or_else(|| {
                    format!("--mount from stage {index}: the stage has not been built")
                })?,
                Some(Source::Image(image)) => {
                    return Err(format!(
                    "--mount=type=bind,from={image}: binding from an image is not supported yet"
                ))
                }
            };
            let rel =
                crate::copy::clean_relative(Path::new(mount.source.as_deref().unwrap_or("/")));
            let mut source = base.join(rel);
            if !source.exists() {
                return Err(format!(
                    "--mount=type=bind: source {} does not exist",
                    source.display()
                ));
            }
            if !mount.read_only {
                // Writes to a read-write bind mount are discarded after the step (BuildKit), so the
                // step gets a private copy instead of the real context or stage files.
                let copy = ctx.scratch.join(format!("bind-{}", step.mounts.len()));
                copy_tree(&source, &copy)?;
                source = copy;
            }
            step.mounts.push(MountSpec {
                target: absolute_target(&mount.target),
                kind: MountKind::Bind {
                    source,
                    readonly: mount.read_only,
                },
            });
        }
        MountType::Cache => {
            let id = mount.id.clone().unwrap_or_else(|| mount.target.clone());
            let dir = ctx.cache_mounts.join(sanitize(&id));
            if !dir.exists() {
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                std::fs::set_permissions(
                    &dir,
                    std::fs::Permissions::from_mode(mount.mode.unwrap_or(0o755)),
                )
                .map_err(|e| format!("{}: {e}", dir.display()))?;
                std::os::unix::fs::chown(
                    &dir,
                    Some(mount.uid.unwrap_or(0)),
                    Some(mount.gid.unwrap_or(0)),
                )
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            step.mounts.push(MountSpec {
                target: absolute_target(&mount.target),
                kind: MountKind::Bind {
                    source: dir,
                    readonly: mount.read_only,
                },
            });
        }
        MountType::Tmpfs => step.mounts.push(MountSpec {
            target: absolute_target(&mount.target),
            kind: MountKind::Tmpfs { size: mount.size },
        }),
        MountType::Secret => {
            let id = mount
                .id
                .clone()
                .or_else(|| {
                    Path::new(&mount.target)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                })
                .unwrap_or_default();
            let Some(spec) = ctx.secrets.iter().find(|s| s.id == id) else {
                if mount.required {
                    return Err(format!(
                        "secret {id:?} is required but was not given with --secret id={id},..."
                    ));
                }
                return Ok(());
            };
            let value = match &spec.source {
                SecretSource::File(path) => std::fs::read(path)
                    .map_err(|e| format!("secret {id:?}: cannot read {}: {e}", path.display()))?,
                SecretSource::Env(var) => std::env::var_os(var)
                    .map(|v| v.into_encoded_bytes())
                    .ok_or_else(|| {
                        format!("secret {id:?}: environment variable {var} is not set")
                    })?,
            };
            if let Some(var) = &mount.env {
                step.env
                    .push((var.clone(), String::from_utf8_lossy(&value).into_owned()));
            }
            if mount.env.is_none() || !mount.target.is_empty() {
                let host = ctx.scratch.join(format!("secret-{}", sanitize(&id)));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o400)
                    .open(&host)
                    .map_err(|e| format!("secret {id:?}: {e}"))?;
                file.write_all(&value)
                    .map_err(|e| format!("secret {id:?}: {e}"))?;
                std::fs::set_permissions(
                    &host,
                    std::fs::Permissions::from_mode(mount.mode.unwrap_or(0o400)),
                )
                .map_err(|e| format!("secret {id:?}: {e}"))?;
                std::os::unix::fs::chown(
                    &host,
                    Some(mount.uid.unwrap_or(0)),
                    Some(mount.gid.unwrap_or(0)),
                )
                .map_err(|e| format!("secret {id:?}: {e}"))?;
                let target = if mount.target.is_empty() {
                    PathBuf::from("/run/secrets").join(&id)
                } else {
                    absolute_target(&mount.target)
                };
                step.mounts.push(MountSpec {
                    target,
                    kind: MountKind::Bind {
                        source: host,
                        readonly: true,
                    },
                });
            }
        }
        MountType::Ssh => return Err("RUN --mount=type=ssh is not supported".into()),
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let status = std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "copying {} for a read-write bind mount failed",
            from.display()
        ))
    }
}
