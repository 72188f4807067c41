//! Typed instructions: one variant per Dockerfile instruction, with validated fields. How a
//! syntax node becomes one is in `builder`; the flags each instruction takes are in `flags`.

mod builder;
mod flags;

use crate::values::{Chmod, Mount, NetworkMode, Port, SecurityMode, Source};

pub(crate) use self::builder::Builder;
pub(crate) use self::flags::Flags;
pub use kiln_plan::{CommandLine, HealthCheck, RunProgram};

/// A `key=value` pair of ENV or LABEL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The name.
    pub key: String,
    /// The value.
    pub value: String,
}

/// One name of an ARG instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The argument's name.
    pub name: String,
    /// The default written after `=`, expanded.
    pub default: Option<String>,
}

/// A source of COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// A path (or, for ADD, a URL) as written, expanded.
    Path(String),
    /// A file made from a heredoc: `COPY <<EOF /dst`. The content has `<<-` tab stripping and,
    /// unless the delimiter was quoted, variable expansion applied.
    Heredoc {
        /// The delimiter, used as the file name.
        name: String,
        /// The file content.
        content: String,
    },
}

/// COPY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFiles {
    /// What to copy.
    pub sources: Vec<FileSource>,
    /// Where to.
    pub dest: String,
    /// `--from`: a stage or an image; the build context when absent.
    pub from: Option<Source>,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
}

/// ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFiles {
    /// What to add (paths, URLs, git repositories, heredocs).
    pub sources: Vec<FileSource>,
    /// Where to.
    pub dest: String,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// `--checksum` digest the remote source must match.
    pub checksum: Option<String>,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
}

/// RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCommand {
    /// What to execute.
    pub program: RunProgram,
    /// `--mount`s.
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: NetworkMode,
    /// `--security`.
    pub security: SecurityMode,
}

/// A Dockerfile instruction with validated (and, in a plan, expanded) fields. FROM is not one:
/// it starts a [`crate::Stage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// ADD.
    Add(AddFiles),
    /// ARG (one or more names).
    Arg(Vec<ArgDecl>),
    /// CMD.
    Cmd(CommandLine),
    /// COPY.
    Copy(CopyFiles),
    /// ENTRYPOINT (`Exec(vec![])` for `ENTRYPOINT []`).
    Entrypoint(CommandLine),
    /// ENV (one or more pairs).
    Env(Vec<KeyValue>),
    /// EXPOSE.
    Expose(Vec<Port>),
    /// HEALTHCHECK.
    Healthcheck(HealthCheck),
    /// LABEL (one or more pairs).
    Label(Vec<KeyValue>),
    /// MAINTAINER (deprecated; sets the author).
    Maintainer(String),
    /// ONBUILD: the trigger text, stored in the image config and run by builds FROM the image.
    Onbuild(String),
    /// RUN.
    Run(RunCommand),
    /// SHELL.
    Shell(Vec<String>),
    /// STOPSIGNAL.
    StopSignal(String),
    /// USER.
    User(String),
    /// VOLUME.
    Volume(Vec<String>),
    /// WORKDIR.
    Workdir(String),
}

impl Instruction {
    /// The instruction keyword in upper case (`RUN`, `COPY`, ...).
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Add(_) => "ADD",
            Instruction::Arg(_) => "ARG",
            Instruction::Cmd(_) => "CMD",
            Instruction::Copy(_) => "COPY",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Env(_) => "ENV",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Label(_) => "LABEL",
            Instruction::Maintainer(_) => "MAINTAINER",
            Instruction::Onbuild(_) => "ONBUILD",
            Instruction::Run(_) => "RUN",
            Instruction::Shell(_) => "SHELL",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::User(_) => "USER",
            Instruction::Volume(_) => "VOLUME",
            Instruction::Workdir(_) => "WORKDIR",
        }
    }
}

/// Every instruction keyword, lower case.
pub(crate) const KEYWORDS: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];
