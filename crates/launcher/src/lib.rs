//! Kiln's CNB launcher: the entrypoint of images built with buildpacks.
//!
//! Placed at `/cnb/lifecycle/launcher`, with `/cnb/process/<type>` links to it. It reads
//! `<layers>/config/metadata.toml`, picks the process (from the name it was started as,
//! `CNB_PROCESS_TYPE`, or the default), builds its environment from the launch layers
//! (`bin`, `lib`, `env`, `env.launch`, `env.launch/<type>`), runs the layers' `exec.d`
//! programs, and replaces itself with the process: directly, or through the image's shell with
//! `profile.d` scripts sourced for processes that ask for a shell.
//!
//! Every byte of the binary ships in every app image, so it depends on nothing but `std`,
//! `libc` and kiln-cnb-env: metadata.toml and `exec.d` output are read by [`toml`], not by the
//! `toml`/`serde` stack kiln-cnb writes them with.

// One `unsafe` block: the child side of `exec.d`'s file descriptor 3 (see `run_exec_d`).
#![deny(unsafe_code)]

pub mod metadata;
pub mod toml;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_cnb_env::{escape_id, files_in, subdirs, Env, Phase};

use crate::metadata::{Metadata, MetadataError, Process};

/// Why a process could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The launcher's metadata is missing or malformed.
    #[error("{0}")]
    Metadata(#[from] MetadataError),
    /// A launch layer's directory or env file could not be read.
    #[error("{0}")]
    Layers(#[from] kiln_cnb_env::Error),
    /// The requested process type is not in the image.
    #[error("process type {kind} is not defined in {path} (defined: {defined})", path = path.display())]
    UnknownProcess {
        /// The type asked for.
        kind: String,
        /// The metadata file.
        path: PathBuf,
        /// The types there are.
        defined: String,
    },
    /// Nothing to run: no process type chosen, no default, no command given.
    #[error("no process to run: the image has no default process; give a process type (/cnb/process/<type>) or a command")]
    NothingToRun,
    /// An `exec.d` program failed or printed something that is not `NAME = "value"` TOML.
    #[error("exec.d {path}: {message}", path = path.display())]
    ExecD {
        /// The program.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The process needs a shell the image does not have.
    #[error("process {0} runs through a shell, but the image has neither /bin/bash nor /bin/sh")]
    NoShell(String),
    /// The program is not on `PATH`.
    #[error("{program}: not found on PATH ({path})")]
    NotFound {
        /// The program.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// A directory or program could not be used.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

/// What the launcher was started with.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    /// The layers directory (`CNB_LAYERS_DIR`, default `/layers`).
    pub layers_dir: PathBuf,
    /// The app directory (`CNB_APP_DIR`, default `/workspace`).
    pub app_dir: PathBuf,
    /// The name it was started as (`/cnb/process/web`, `/cnb/lifecycle/launcher`).
    pub argv0: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Where the shell lives (`/bin`), for processes that need one.
    pub shell_dir: PathBuf,
}

impl LaunchRequest {
    /// The request of the running process: `std::env` and the CNB defaults.
    pub fn from_process() -> LaunchRequest {
        let mut argv = std::env::args();
        let argv0 = argv.next().unwrap_or_default();
        let env: Vec<(String, String)> = std::env::vars().collect();
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        LaunchRequest {
            layers_dir: var("CNB_LAYERS_DIR")
                .unwrap_or_else(|| "/layers".into())
                .into(),
            app_dir: var("CNB_APP_DIR")
                .unwrap_or_else(|| "/workspace".into())
                .into(),
            argv0,
            args: argv.collect(),
            env,
            shell_dir: PathBuf::from("/bin"),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// A process ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The program to execute (a path).
    pub program: PathBuf,
    /// Its argument vector, `argv[0]` first.
    pub argv: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub cwd: PathBuf,
}

/// Chooses the process, builds its environment (running `exec.d` programs) and its command
/// line.
pub fn prepare(req: &LaunchRequest) -> Result<Prepared, LaunchError> {
    let md = Metadata::read(&req.layers_dir)?;
    let unknown = |kind: &str| LaunchError::UnknownProcess {
        kind: kind.to_owned(),
        path: req.layers_dir.join(metadata::METADATA_PATH),
        defined: if md.processes.is_empty() {
            "none".into()
        } else {
            md.processes
                .iter()
                .map(|p| p.kind.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    };
    let self_name = Path::new(&req.argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let chosen: Option<&Process> = if self_name != "launcher" && md.process(&self_name).is_some() {
        md.process(&self_name)
    } else if let Some(kind) = req.var("CNB_PROCESS_TYPE") {
        Some(md.process(kind).ok_or_else(|| unknown(kind))?)
    } else if req.args.is_empty() {
        match md.default_process_type.as_deref() {
            Some(kind) => Some(md.process(kind).ok_or_else(|| unknown(kind))?),
            None => return Err(LaunchError::NothingToRun),
        }
    } else {
        None
    };

    // The command line, and whether it runs through a shell.
    let (process_type, command, args, direct, working_dir) = match chosen {
        Some(p) => {
            let args = if req.args.is_empty() {
                p.args.clone()
            } else if md.buildpack_api_at_least(&p.buildpack_id, 0, 9) {
                // Buildpack API 0.9+: the user's arguments replace the default ones.
                req.args.clone()
            } else {
                [p.args.clone(), req.args.clone()].concat()
            };
            (
                Some(p.kind.clone()),
                p.command.clone(),
                args,
                p.direct,
                p.working_dir.clone(),
            )
        }
        None => {
            let (direct, rest) = match req.args.first().map(String::as_str) {
                Some("--") => (true, &req.args[1..]),
                _ => (false, &req.args[..]),
            };
            let Some((first, rest)) = rest.split_first() else {
                return Err(LaunchError::NothingToRun);
            };
            (None, vec![first.clone()], rest.to_vec(), direct, None)
        }
    };

    let mut env = Env::for_launch(req.env.iter().cloned());
    let bp_dirs: Vec<PathBuf> = md
        .buildpacks
        .iter()
        .map(|b| req.layers_dir.join(escape_id(&b.id)))
        .filter(|d| d != &req.app_dir)
        .collect();
    for bp_dir in &bp_dirs {
        let layers = subdirs(bp_dir)?;
        for layer in &layers {
            env.add_root_dir(layer, Phase::Launch);
        }
        for layer in &layers {
            env.apply_env_dir(&layer.join("env"))?;
            env.apply_env_dir(&layer.join("env.launch"))?;
            if let Some(kind) = &process_type {
                env.apply_env_dir(&layer.join("env.launch").join(kind))?;
            }
        }
    }
    for bp_dir in &bp_dirs {
        for layer in subdirs(bp_dir)? {
            for program in layer_files(&layer, "exec.d", process_type.as_deref())? {
                run_exec_d(&program, &req.app_dir, &mut env)?;
            }
        }
    }

    let cwd = match working_dir {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => req.app_dir.join(dir),
        None => req.app_dir.clone(),
    };
    let env_list: Vec<(String, String)> = env
        .vars()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if direct {
        let path_var = env.get("PATH").unwrap_or("").to_owned();
        let program =
            lookup(&command[0], &path_var, &cwd).ok_or_else(|| LaunchError::NotFound {
                program: command[0].clone(),
                path: path_var.clone(),
            })?;
        let argv = [command, args].concat();
        return Ok(Prepared {
            program,
            argv,
            env: env_list,
            cwd,
        });
    }

    // Shell processes: source profile.d scripts (and the app's .profile), then run.
    let shell = ["bash", "sh"]
        .iter()
        .map(|s| req.shell_dir.join(s))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            LaunchError::NoShell(process_type.clone().unwrap_or_else(|| command[0].clone()))
        })?;
    let mut script = String::new();
    for bp_dir in &bp_dirs {
        for layer in subdirs(bp_dir)? {
            for profile in layer_files(&layer, "profile.d", process_type.as_deref())? {
                script.push_str(&format!(". {}\n", quote(&profile.to_string_lossy())));
            }
        }
    }
    let app_profile = req.app_dir.join(".profile");
    if app_profile.is_file() {
        script.push_str(&format!(". {}\n", quote(&app_profile.to_string_lossy())));
    }
    let mut argv = vec![
        shell
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        "-c".to_owned(),
    ];
    if args.is_empty() {
        // The command is a script of its own.
        script.push_str(&format!(
            "exec {} -c \"$1\"\n",
            quote(&shell.to_string_lossy())
        ));
        argv.extend([script, req.argv0.clone(), command[0].clone()]);
    } else {
        // Each word is expanded by the shell (`$PORT`), then the result runs as one command.
        let words: Vec<String> = (1..=args.len() + 1)
            .map(|i| format!("\"$(eval echo \\\"${{{i}}}\\\")\""))
            .collect();
        script.push_str(&format!("exec {}\n", words.join(" ")));
        argv.extend([script, req.argv0.clone(), command[0].clone()]);
        argv.extend(args);
    }
    Ok(Prepared {
        program: shell,
        argv,
        env: env_list,
        cwd,
    })
}

/// The files of `<layer>/<dir>/` and then of `<layer>/<dir>/<process>/`, each sorted.
fn layer_files(
    layer: &Path,
    dir: &str,
    process: Option<&str>,
) -> Result<Vec<PathBuf>, LaunchError> {
    let mut out = files_in(&layer.join(dir))?;
    if let Some(kind) = process {
        out.extend(files_in(&layer.join(dir).join(kind))?);
    }
    Ok(out)
}

/// Runs an `exec.d` program with the environment so far and applies the TOML it writes to
/// file descriptor 3 (`NAME = "value"` lines), each replacing its variable.
fn run_exec_d(program: &Path, app_dir: &Path, env: &mut Env) -> Result<(), LaunchError> {
    let fail = |message: String| LaunchError::ExecD {
        path: program.to_owned(),
        message,
    };
    let (mut reader, writer) = std::io::pipe().map_err(|e| fail(e.to_string()))?;
    let mut cmd = Command::new(program);
    cmd.current_dir(app_dir)
        .env_clear()
        .envs(env.vars())
        .stdin(Stdio::null());
    pass_as_fd_3(&mut cmd, writer);
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    // The command keeps the pipe's write end until dropped; reading would never end.
    drop(cmd);
    let mut out = String::new();
    let read = reader.read_to_string(&mut out);
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        return Err(fail(format!("exited with {status}")));
    }
    read.map_err(|e| fail(format!("reading its output: {e}")))?;
    let table = toml::parse(&out).map_err(|e| fail(format!("its output is not TOML: {e}")))?;
    for (k, v) in table.iter() {
        match v {
            toml::Value::String(s) => env.set(k, s.as_str()),
            other => {
                return Err(fail(format!(
                    "`{k}` must be a string, found {}",
                    other.kind()
                )))
            }
        }
    }
    Ok(())
}

/// Makes `fd` the child's file descriptor 3 when `cmd` spawns; `cmd` owns it until dropped.
///
/// std has no way to give a child a descriptor at a chosen number, and doing it in the
/// launcher's own process would take fd 3 from whoever holds it there; so it happens in the
/// child, between fork and exec.
#[allow(unsafe_code)]
fn pass_as_fd_3(cmd: &mut Command, fd: std::io::PipeWriter) {
    use std::os::fd::{AsRawFd, OwnedFd};
    let fd = OwnedFd::from(fd);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (dup2, fcntl) on a descriptor that `fd` keeps open until `cmd` is dropped: the
    // closure owns `fd`, and `cmd` owns the closure. dup2 gives the copy at 3 no close-on-exec
    // flag; when the pipe already is 3, dup2 would change nothing, so the flag is cleared.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd.as_raw_fd() == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd.as_raw_fd(), 3)
            };
            if rc == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The program `name` as `execvp` would find it on `path`; a name with a `/` is taken as a
/// path (relative to `cwd`).
fn lookup(name: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = cwd.join(name);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .map(|dir| {
            if dir.is_empty() {
                cwd.to_owned()
            } else {
                cwd.join(dir)
            }
        })
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// `s` quoted for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Replaces the current process with the prepared one; returns only on failure.
pub fn exec(p: &Prepared) -> LaunchError {
    let mut cmd = Command::new(&p.program);
    cmd.arg0(p.argv.first().cloned().unwrap_or_default())
        .args(p.argv.iter().skip(1))
        .env_clear()
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&p.cwd);
    LaunchError::Io {
        path: p.program.clone(),
        source: cmd.exec(),
    }
}
