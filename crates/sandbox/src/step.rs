//! What a RUN step asks for, and the parts of its preparation both modes share.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::error::SandboxError;
use crate::process::{ExecSpec, Setup, SetupOp};
use crate::rootpath::{create_dirs_owned, Stubs};
use crate::user::{resolve_user, ResolvedUser};

/// PATH given to a step whose environment has none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The shell of shell-form RUN when the Dockerfile sets no SHELL.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// The command of a RUN step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: `shell... script` (the SHELL instruction's argv, then the command line).
    Shell {
        /// The shell and its options, e.g. `["/bin/sh", "-c"]`.
        shell: Vec<String>,
        /// The command line, passed as the shell's last argument.
        script: String,
    },
    /// Exec form: the argv itself; `argv[0]` is searched on the step's PATH if it has no `/`.
    Exec(Vec<String>),
}

impl Command {
    /// Shell form through the default shell, `/bin/sh -c`.
    pub fn shell(script: impl Into<String>) -> Self {
        Command::Shell {
            shell: DEFAULT_SHELL.iter().map(|s| s.to_string()).collect(),
            script: script.into(),
        }
    }

    /// Exec form.
    pub fn exec<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command::Exec(argv.into_iter().map(Into::into).collect())
    }

    fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell { shell, script } => {
                let mut argv = shell.clone();
                argv.push(script.clone());
                argv
            }
            Command::Exec(argv) => argv.clone(),
        }
    }
}

/// An extra mount for the step (`RUN --mount=type=bind|cache|tmpfs|secret`). The engine
/// decides the sources (a cache directory, a secret file); the sandbox mounts them for the
/// step's duration only, and removes any target it had to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Where it appears, as an absolute path inside the rootfs. Nested targets (one inside
    /// another mount's target) and targets under /proc, /dev or /sys are not supported.
    pub target: PathBuf,
    /// What is mounted.
    pub kind: MountKind,
}

/// The kinds of [`MountSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A host file or directory bound at the target (bind, cache and secret mounts).
    Bind {
        /// Host path of the source.
        source: PathBuf,
        /// Mounted read-only.
        readonly: bool,
    },
    /// A fresh tmpfs (mode 1777).
    Tmpfs {
        /// Size limit in bytes; the kernel's default (half of RAM) when `None`.
        size: Option<u64>,
    },
}

/// The network a step sees (`RUN --network`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// The network of the process running the build (kaniko's and Kiln's default).
    #[default]
    Host,
    /// A network namespace of the step's own holding only a loopback interface, which is up
    /// (`RUN --network=none`): nothing outside the step can be reached or reach it.
    None,
}

/// One RUN step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What to run.
    pub command: Command,
    /// The environment, in order: the image's ENV and the ARGs in scope, computed by the
    /// caller. `PATH` ([`DEFAULT_PATH`]) and `HOME` (from passwd) are added when missing.
    pub env: Vec<(String, String)>,
    /// The USER spec (`name`, `uid`, `name:group`, `uid:gid`); `None` is root.
    pub user: Option<String>,
    /// The WORKDIR, absolute inside the rootfs; created (owned by the user) if missing.
    pub workdir: PathBuf,
    /// Extra mounts for this step only.
    pub mounts: Vec<MountSpec>,
    /// The network it sees; see [`Sandbox::isolates_network`](crate::Sandbox::isolates_network).
    pub network: Network,
}

impl Step {
    /// A step running `command` as root in `/` with an empty environment (so PATH and HOME
    /// defaults apply).
    pub fn new(command: Command) -> Self {
        Step {
            command,
            env: Vec::new(),
            user: None,
            workdir: PathBuf::from("/"),
            mounts: Vec::new(),
            network: Network::Host,
        }
    }

    /// Sets the USER spec.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the WORKDIR.
    pub fn workdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workdir = dir.into();
        self
    }

    /// Adds an extra mount.
    pub fn mount(mut self, mount: MountSpec) -> Self {
        self.mounts.push(mount);
        self
    }

    /// Sets the network.
    pub fn network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }
}

fn cstring(s: impl Into<Vec<u8>>, what: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::InvalidStep(format!("{what} contains a NUL byte")))
}

pub(crate) fn path_cstring(p: &Path) -> Result<CString, SandboxError> {
    use std::os::unix::ffi::OsStrExt;
    cstring(p.as_os_str().as_bytes(), &format!("path {}", p.display()))
}

/// Resolves the user, environment, program and working directory of `step` against the rootfs
/// at `rootfs` (host path), creating the WORKDIR if it is missing.
pub(crate) fn prepare_exec(rootfs: &Path, step: &Step) -> Result<ExecSpec, SandboxError> {
    let spec = step.user.as_deref().unwrap_or("");
    let user = resolve_user(rootfs, spec)?;

    let mut env = step.env.clone();
    for (key, _) in &env {
        if key.is_empty() || key.contains('=') {
            return Err(SandboxError::InvalidStep(format!(
                "environment variable name {key:?} is empty or contains '='"
            )));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), user.home.clone()));
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();

    let argv = step.command.argv();
    let program = match argv.first() {
        Some(p) if !p.is_empty() => p.clone(),
        _ => return Err(SandboxError::InvalidStep("the command is empty".into())),
    };
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.clone()]
    } else {
        path_var
            .split(':')
            .map(|dir| {
                if dir.is_empty() {
                    program.clone()
                } else {
                    format!("{}/{program}", dir.trim_end_matches('/'))
                }
            })
            .collect()
    };

    if !step.workdir.is_absolute() {
        return Err(SandboxError::InvalidStep(format!(
            "WORKDIR {} is not absolute",
            step.workdir.display()
        )));
    }
    let identity = identity(&user, spec)?;
    create_dirs_owned(rootfs, &step.workdir, user.uid, user.gid)?;

    Ok(ExecSpec {
        program: program.clone(),
        candidates: candidates
            .into_iter()
            .map(|c| cstring(c, "the program path"))
            .collect::<Result<_, _>>()?,
        argv: argv
            .into_iter()
            .map(|a| cstring(a, "an argument"))
            .collect::<Result<_, _>>()?,
        env: env
            .into_iter()
            .map(|(k, v)| cstring(format!("{k}={v}"), &format!("variable {k}")))
            .collect::<Result<_, _>>()?,
        user: identity,
        workdir: path_cstring(&step.workdir)?,
        capabilities: None,
    })
}

/// The ids to switch to; `None` when not running as root and already that user.
///
/// The group list set with `setgroups` starts with the primary group, whatever `/etc/group`
/// says: Docker, containerd, BuildKit and buildah all do so since CVE-2023-25173 (a file whose
/// group permissions are narrower than its other permissions must not be readable through the
/// "other" bits by a member of its group), and `id` prints `groups=` accordingly.
#[allow(clippy::type_complexity)]
fn identity(
    user: &ResolvedUser,
    spec: &str,
) -> Result<Option<(u32, u32, Vec<libc::gid_t>)>, SandboxError> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 {
        let mut groups = vec![user.gid];
        groups.extend(
            (user.supplementary_gids.iter())
                .copied()
                .filter(|gid| *gid != user.gid),
        );
        return Ok(Some((user.uid, user.gid, groups)));
    }
    if user.uid == euid && user.gid == egid {
        return Ok(None);
    }
    Err(SandboxError::InvalidStep(format!(
        "running as USER {spec:?} (uid {} gid {}) needs root",
        user.uid, user.gid
    )))
}

/// Creates the targets of `mounts` (as stubs) and returns the operations mounting them on the
/// host paths of those targets (under the rootfs, before pivot_root in chroot mode).
pub(crate) fn extra_mounts(
    stubs: &mut Stubs,
    mounts: &[MountSpec],
) -> Result<Vec<Setup>, SandboxError> {
    let mut ops = Vec::new();
    for m in mounts {
        if !m.target.is_absolute() {
            return Err(SandboxError::InvalidStep(format!(
                "mount target {} is not absolute",
                m.target.display()
            )));
        }
        let first = m.target.components().nth(1);
        if let Some(std::path::Component::Normal(top)) = first {
            if top == "proc" || top == "dev" || top == "sys" {
                return Err(SandboxError::InvalidStep(format!(
                    "mount target {} is under /{}, which the sandbox mounts itself",
                    m.target.display(),
                    top.to_string_lossy()
                )));
            }
        }
        match &m.kind {
            MountKind::Bind { source, readonly } => {
                let meta = std::fs::metadata(source).map_err(|e| SandboxError::io(source, e))?;
                let target = if meta.is_dir() {
                    stubs.dir(&m.target)?
                } else {
                    stubs.file(&m.target)?
                };
                let t = path_cstring(&target)?;
                ops.push(Setup {
                    op: SetupOp::Mount {
                        source: Some(path_cstring(source)?),
                        target: t.clone(),
                        fstype: None,
                        flags: libc::MS_BIND | libc::MS_REC,
                        data: None,
                    },
                    description: format!(
                        "bind mount {} on {}",
                        source.display(),
                        m.target.display()
                    ),
                });
                if *readonly {
                    ops.push(Setup {
                        op: SetupOp::Mount {
                            source: None,
                            target: t,
                            fstype: None,
                            flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            data: None,
                        },
                        description: format!("remount {} read-only", m.target.display()),
                    });
                }
            }
            MountKind::Tmpfs { size } => {
                let target = stubs.dir(&m.target)?;
                let data = match size {
                    Some(bytes) => format!("mode=1777,size={bytes}"),
                    None => "mode=1777".to_string(),
                };
                ops.push(Setup {
                    op: SetupOp::Mount {
                        source: Some(c"tmpfs".into()),
                        target: path_cstring(&target)?,
                        fstype: Some(c"tmpfs".into()),
                        flags: libc::MS_NOSUID | libc::MS_NODEV,
                        data: Some(cstring(data, "tmpfs options")?),
                    },
                    description: format!("mount tmpfs on {}", m.target.display()),
                });
            }
        }
    }
    Ok(ops)
}
