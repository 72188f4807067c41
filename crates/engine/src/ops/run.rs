//! The run operation: its key (the program, mounts, network, and the environment, user,
//! working directory and shell it runs with, plus the content behind mounts that read a tree),
//! and its execution: a sandbox [`Step`] (shell, user, env, workdir, mounts) run with its output
//! streamed as events. Secrets are materialised in a private file for the step only; neither
//! their values nor their files reach the rootfs, a layer or an event.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use kiln_cache::{RunInput, SourceContent, StepInput};
use kiln_oci::image::ContainerConfig;
use kiln_plan::{Mount, MountType, NetworkMode, Run, RunProgram, Source};
use kiln_sandbox::{
    CancelToken, Command, MountKind, MountSpec, Network, OutputStream as SandboxStream, RunOutcome,
    Sandbox, Step,
};

use kiln_fs::resolve::Root;

use super::cache_mount::{CacheMountStore, CacheRequest, ClaimedCaches, Seed};
use super::ssh_agent::AgentForward;
use super::unmounted::Placed;
use crate::events::{BuildEvent, OutputStream};
use crate::options::{SecretSource, SecretSpec, SshSpec};

/// What a RUN needs from the rest of the build besides the instruction.
pub(crate) struct RunContext<'a> {
    /// Stage and step numbers, for events.
    pub(crate) stage: usize,
    /// Step number within the stage.
    pub(crate) step: usize,
    /// The build context directory (default source of bind mounts).
    pub(crate) context_root: &'a Path,
    /// The tree a `--mount=from=` names (a finished stage, or an image pulled on first use).
    pub(crate) mount_source: &'a dyn Fn(&Source) -> Result<MountSource, crate::BuildError>,
    /// Where per-step files (secrets, heredoc scripts, rw bind copies) are made; removed after.
    pub(crate) scratch: &'a Path,
    /// Where cache mounts persist.
    pub(crate) cache_mounts: CacheMountStore<'a>,
    /// The `--secret` flags.
    pub(crate) secrets: &'a [SecretSpec],
    /// The `--ssh` flags.
    pub(crate) ssh: &'a [SshSpec],
    /// Paths no step may read (the registry credentials, in-place): each is covered by an
    /// empty read-only directory or file in the step's own mount namespace, where the sandbox
    /// can make one.
    pub(crate) hidden: &'a [PathBuf],
    /// Event sink.
    pub(crate) emit: &'a (dyn Fn(BuildEvent) + Send + Sync),
    /// Kills the step's processes when the build is cancelled.
    pub(crate) cancel: &'a CancelToken,
}

/// A stage's or image's file system that a bind or cache mount reads from.
pub(crate) struct MountSource {
    /// Its root directory.
    pub(crate) root: PathBuf,
    /// Names its content (the image's manifest digest, a digest of the stage's layers), so
    /// that a cache seeded from it is kept apart from caches seeded from other content.
    pub(crate) identity: String,
}

/// The environment a run sees: the image's, then the operation's build variables and unkeyed
/// variables that no image variable of the same name shadows. With `keyed_only` the unkeyed
/// ones (proxy settings) are left out, as the key leaves them out.
pub(crate) fn environment(
    run: &Run,
    config: &ContainerConfig,
    keyed_only: bool,
) -> Vec<(String, String)> {
    let declared: Vec<(String, Option<String>)> = run
        .build_env
        .iter()
        .map(|(name, value)| (name.clone(), Some(value.clone())))
        .collect();
    let mut env = kiln_cache::run_environment(
        &super::config::env_pairs(config),
        &declared,
        &BTreeMap::new(),
    );
    if !keyed_only {
        for (name, value) in &run.unkeyed_env {
            if !env.iter().any(|(k, _)| k == name) {
                env.push((name.clone(), value.clone()));
            }
        }
    }
    env
}

/// What a run observes: the operation, the environment, user, working directory and shell it
/// runs with, and the content behind each mount that reads a tree (the context, a stage, an
/// image); `None` when one of those cannot be pinned.
pub(crate) fn key_input(
    run: &Run,
    config: &ContainerConfig,
    inputs: &super::KeyInputs<'_>,
) -> Option<StepInput> {
    let mut bind_contents = BTreeMap::new();
    for mount in run
        .mounts
        .iter()
        .filter(|m| kiln_cache::key::reads_source(m))
    {
        let content = match &mount.from {
            None => super::copy::context_content(
                inputs,
                &[mount.source.clone().unwrap_or_else(|| ".".into())],
            )?,
            Some(Source::Stage(i)) => SourceContent::Stage((inputs.stage_key)(*i)?),
            Some(Source::Image(image)) => SourceContent::Image(inputs.remote.image(image)?),
            // Mounts cannot read a local directory (the step fails and says so).
            Some(Source::Local(_)) => return None,
        };
        bind_contents.insert(mount.target.clone(), content);
    }
    Some(StepInput::Run(RunInput {
        run: run.clone(),
        env: environment(run, config, true),
        user: config.user.clone().unwrap_or_default(),
        workdir: config.working_dir.clone().unwrap_or_else(|| "/".into()),
        shell: super::config::shell(config),
        bind_contents,
    }))
}

/// Runs `run` in `sandbox` with the stage's `config` (USER, WORKDIR, SHELL, ENV). Returns the
/// sandbox outcome, or a message for the error that stopped it from running.
pub(crate) fn run(
    sandbox: &dyn Sandbox,
    ctx: &RunContext<'_>,
    run: &Run,
    config: &ContainerConfig,
) -> Result<RunOutcome, String> {
    std::fs::create_dir_all(ctx.scratch).map_err(|e| format!("{}: {e}", ctx.scratch.display()))?;
    let mut step = Step::new(Command::exec(["/bin/true"]));
    step.env = environment(run, config, false);
    step.user = config.user.clone().filter(|u| !u.is_empty());
    step.workdir = PathBuf::from(
        config
            .working_dir
            .as_deref()
            .filter(|w| !w.is_empty())
            .unwrap_or("/"),
    );
    let command = match &run.program {
        RunProgram::Exec(argv) => Command::exec(argv.clone()),
        RunProgram::Shell(script) => {
            let mut argv = super::config::shell(config);
            argv.push(script.clone());
            Command::exec(argv)
        }
        RunProgram::Script { name, content } => {
            let host = ctx.scratch.join(format!("heredoc-{}", sanitize(name)));
            std::fs::write(&host, content).map_err(|e| format!("{}: {e}", host.display()))?;
            std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", host.display()))?;
            if sandbox.mounts_available() {
                let target = PathBuf::from("/run/kiln-heredoc").join(sanitize(name));
                step.mounts.push(MountSpec {
                    target: target.clone(),
                    kind: MountKind::Bind {
                        source: host,
                        readonly: true,
                    },
                });
                Command::exec([target.to_string_lossy().into_owned()])
            } else {
                // In place without a mount of its own, the script runs from the scratch
                // directory, which is in the Kiln dir and never snapshotted.
                Command::exec([host.to_string_lossy().into_owned()])
            }
        }
    };
    run_step(sandbox, ctx, run, step, command)
}

/// Runs `step` with `command`, after giving it the network and mounts `run` asks for.
fn run_step(
    sandbox: &dyn Sandbox,
    ctx: &RunContext<'_>,
    run: &Run,
    mut step: Step,
    command: Command,
) -> Result<RunOutcome, String> {
    step.command = command;
    if run.network == NetworkMode::None {
        if sandbox.isolates_network() {
            step.network = Network::None;
        } else {
            // kaniko ignores --network, so a Dockerfile that builds there must build here:
            // the step runs, and the user learns it was not cut off.
            (ctx.emit)(BuildEvent::Warning {
                message: "RUN --network=none needs CAP_SYS_ADMIN in in-place mode, which this \
                          container lacks: the step uses the container's network"
                    .into(),
            });
        }
    }
    if sandbox.mounts_available() {
        hide(ctx, &mut step)?;
    }
    let caches = claim_caches(ctx, &run.mounts)?;
    // Forwarding sockets of the step's ssh mounts; they close when the step is over.
    let mut agents: Vec<AgentForward> = Vec::new();
    for (index, mount) in run.mounts.iter().enumerate() {
        prepare_mount(ctx, mount, caches.dir(index), &mut agents, &mut step)?;
    }

    // Without a mount namespace of its own (in place, without CAP_SYS_ADMIN) the step's mounts
    // become files in `/` for the step only.
    let mut placed = if sandbox.mounts_available() || step.mounts.is_empty() {
        None
    } else {
        let mounts = std::mem::take(&mut step.mounts);
        // Kiln's own sources are moved, not copied; some were named through a resolved path.
        let own: Vec<PathBuf> = [ctx.scratch, ctx.cache_mounts.dirs]
            .into_iter()
            .flat_map(|dir| [Some(dir.to_path_buf()), std::fs::canonicalize(dir).ok()])
            .flatten()
            .collect();
        let movable = |source: &Path| own.iter().any(|dir| source.starts_with(dir));
        Some(Placed::place(
            sandbox.rootfs(),
            ctx.scratch,
            &mounts,
            &movable,
        )?)
    };
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
    let outcome = sandbox.run(&step, &mut sink, ctx.cancel);
    // Undone whatever the step's fate, and before anything can snapshot `/`.
    let undone = placed.as_mut().map(Placed::undo).transpose()?;
    let mut outcome = outcome.map_err(|e| e.to_string())?;
    outcome.restored_dirs.extend(undone.into_iter().flatten());
    Ok(outcome)
}

/// Covers each of `ctx.hidden` with an empty read-only directory (or an empty file, for a
/// file) for the step, so that what Kiln itself reads there (the push credentials) is out of
/// the step's reach.
fn hide(ctx: &RunContext<'_>, step: &mut Step) -> Result<(), String> {
    for path in ctx.hidden {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        let cover = if meta.is_dir() {
            ctx.scratch.join("hidden-dir")
        } else {
            ctx.scratch.join("hidden-file")
        };
        if std::fs::symlink_metadata(&cover).is_err() {
            let made = if meta.is_dir() {
                std::fs::create_dir(&cover)
            } else {
                std::fs::write(&cover, b"")
            };
            made.map_err(|e| format!("{}: {e}", cover.display()))?;
        }
        step.mounts.push(MountSpec {
            target: path.clone(),
            kind: MountKind::Bind {
                source: cover,
                readonly: true,
            },
        });
    }
    Ok(())
}

/// Claims the directories of the step's cache mounts, seeding new ones that have `from=`; the
/// claims (and their locks) last as long as the value returned.
fn claim_caches(ctx: &RunContext<'_>, mounts: &[Mount]) -> Result<ClaimedCaches, String> {
    let mut requests = Vec::new();
    for (index, mount) in mounts.iter().enumerate() {
        if mount.kind != MountType::Cache {
            continue;
        }
        let seed = match &mount.from {
            None => None,
            Some(from) => {
                let tree = (ctx.mount_source)(from).map_err(|e| e.to_string())?;
                let rel = super::copy::tree::clean_relative(Path::new(
                    mount.source.as_deref().unwrap_or("/"),
                ));
                Some(Seed {
                    path: contained(&tree.root, &rel, "--mount=type=cache")?,
                    identity: format!("{}\n{}", tree.identity, rel.display()),
                })
            }
        };
        requests.push(CacheRequest { index, mount, seed });
    }
    ctx.cache_mounts.claim(requests)
}

/// The host path of `rel` inside `root`, symlinks followed as if `root` were `/`, so that a
/// link in a context, stage or image can never bind a file of the host.
fn contained(root: &Path, rel: &Path, what: &str) -> Result<PathBuf, String> {
    Root::open(root)
        .and_then(|root| root.host_path(rel, true))
        .map_err(|e| {
            if e.is_not_found() {
                format!("{what}: source /{} does not exist", rel.display())
            } else {
                format!("{what}: {e}")
            }
        })
}

pub(crate) fn sanitize(name: &str) -> String {
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

/// Where a mount appears in the step: a relative target is inside the working directory, as
/// in BuildKit.
fn absolute_target(target: &str, workdir: &Path) -> PathBuf {
    Path::new("/").join(workdir).join(target)
}

/// Adds `mount` to the step; a cache mount binds `cache_dir`, claimed with the step's others,
/// and an ssh mount adds its forwarding socket to `agents`, which must outlive the step.
fn prepare_mount(
    ctx: &RunContext<'_>,
    mount: &Mount,
    cache_dir: Option<&Path>,
    agents: &mut Vec<AgentForward>,
    step: &mut Step,
) -> Result<(), String> {
    let target = absolute_target(&mount.target, &step.workdir);
    match mount.kind {
        MountType::Bind => {
            let base = match &mount.from {
                None => ctx.context_root.to_path_buf(),
                Some(from) => (ctx.mount_source)(from).map_err(|e| e.to_string())?.root,
            };
            let rel = super::copy::tree::clean_relative(Path::new(
                mount.source.as_deref().unwrap_or("/"),
            ));
            let mut source = contained(&base, &rel, "--mount=type=bind")?;
            if !mount.read_only {
                // Writes to a read-write bind mount are discarded after the step (BuildKit), so the
                // step gets a private copy instead of the real context or stage files.
                let copy = ctx.scratch.join(format!("bind-{}", step.mounts.len()));
                copy_tree(&source, &copy)?;
                source = copy;
            }
            step.mounts.push(MountSpec {
                target,
                kind: MountKind::Bind {
                    source,
                    readonly: mount.read_only,
                },
            });
        }
        MountType::Cache => {
            let source = cache_dir
                .ok_or_else(|| format!("cache mount {}: no directory was claimed", mount.target))?;
            step.mounts.push(MountSpec {
                target,
                kind: MountKind::Bind {
                    source: source.to_path_buf(),
                    readonly: mount.read_only,
                },
            });
        }
        MountType::Tmpfs => step.mounts.push(MountSpec {
            target,
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
                    target
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
        MountType::Ssh => agents.extend(mount_ssh_agent(ctx, mount, agents.len(), step)?),
    }
    Ok(())
}

/// Gives the step the `--ssh` agent `mount` names (the `number`th ssh mount of the step made
/// so far) through a forwarding socket at its target, `/run/buildkit/ssh_agent.N` by default,
/// as BuildKit does; the first one is also `SSH_AUTH_SOCK`. An agent that was not given is an
/// error when the mount is `required`, and otherwise the step runs without it.
fn mount_ssh_agent(
    ctx: &RunContext<'_>,
    mount: &Mount,
    number: usize,
    step: &mut Step,
) -> Result<Option<AgentForward>, String> {
    let id = mount.id.as_deref().unwrap_or("default");
    let Some(spec) = ctx.ssh.iter().find(|s| s.id == id) else {
        if mount.required {
            return Err(format!(
                "ssh agent {id:?} is required but was not given with --ssh {id}=SOCKET"
            ));
        }
        return Ok(None);
    };
    let socket = ctx.scratch.join(format!("ssh-agent-{number}"));
    let forward = AgentForward::start(
        &spec.socket,
        &socket,
        mount.mode.unwrap_or(0o600),
        mount.uid.unwrap_or(0),
        mount.gid.unwrap_or(0),
    )
    .map_err(|e| format!("--ssh {id}: {e}"))?;
    let target = if mount.target.is_empty() {
        PathBuf::from(format!("/run/buildkit/ssh_agent.{number}"))
    } else {
        absolute_target(&mount.target, &step.workdir)
    };
    if number == 0 {
        step.env.retain(|(key, _)| key != "SSH_AUTH_SOCK");
        step.env.push((
            "SSH_AUTH_SOCK".into(),
            target.to_string_lossy().into_owned(),
        ));
    }
    step.mounts.push(MountSpec {
        target,
        kind: MountKind::Bind {
            source: socket,
            readonly: false,
        },
    });
    Ok(Some(forward))
}

/// A private copy of `from` at `to` (a read-write bind mount's source, a cache's seed).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    kiln_fs::clone::clone_tree(from, to).map_err(|e| e.to_string())
}
