//! The operations a stage is made of. Each is one thing the engine knows how to key, apply to
//! the image config and execute; a front end expresses everything it wants through them.

use std::time::Duration;

use crate::values::{Chmod, Mount, NetworkMode, SecurityMode, Source};

/// One thing a stage does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Run a program in the stage's filesystem; its changes become a layer.
    Run(Run),
    /// Copy files into the stage's filesystem (from the context, another stage, an image, a
    /// URL or a git repository); the files written become a layer.
    Copy(Copy),
    /// Create a directory (WORKDIR); a created directory becomes a layer.
    Mkdir(Mkdir),
    /// Change the image config only.
    Config(ConfigEdit),
}

impl Operation {
    /// Whether the operation may write files, and so produce a layer and have a cache entry.
    pub fn writes_files(&self) -> bool {
        !matches!(self, Operation::Config(_))
    }
}

/// What a [`Run`] executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunProgram {
    /// A script for the stage's shell (the config's `Shell`, else `/bin/sh -c`).
    Shell(String),
    /// An argument vector.
    Exec(Vec<String>),
    /// A script written to a file called `name` (mode 0755) outside the snapshotted tree and
    /// executed; `content` starts with its `#!` line.
    Script {
        /// The file name.
        name: String,
        /// The script, shebang line included.
        content: String,
    },
}

/// Runs a program in the stage, as the config's `User`, in its `WorkingDir`, with its `Env`
/// plus the build variables given here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// What to execute.
    pub program: RunProgram,
    /// Mounts the step gets for its duration only.
    pub mounts: Vec<Mount>,
    /// The network it sees.
    pub network: NetworkMode,
    /// How confined it is.
    pub security: SecurityMode,
    /// Variables the step sees besides the image environment (a Dockerfile's ARGs in scope),
    /// in order; an image variable of the same name wins. They are part of the step's key.
    pub build_env: Vec<(String, String)>,
    /// Variables the step sees that are not part of its key (proxy settings).
    pub unkeyed_env: Vec<(String, String)>,
}

/// One source of a [`Copy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// A path (with wildcards) in the copy's tree.
    Path(String),
    /// A file made of `content`, called `name`.
    Inline {
        /// The file name.
        name: String,
        /// Its content.
        content: String,
    },
    /// An HTTP(S) URL, downloaded.
    Url(String),
    /// A git repository (`URL#REF:SUBDIR`), checked out.
    Git(String),
    /// A symbolic link called `name` pointing at `target` (stored as written).
    Symlink {
        /// The link's name.
        name: String,
        /// What it points at.
        target: String,
    },
}

impl CopySource {
    /// Whether the source is fetched from the network rather than read from a tree.
    pub fn is_remote(&self) -> bool {
        matches!(self, CopySource::Url(_) | CopySource::Git(_))
    }
}

/// Copies files into the stage, with Docker's destination rules (a directory source copies its
/// contents; several sources need a directory destination; relative destinations are under the
/// working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The tree [`CopySource::Path`]s are read from: another stage or an image, or the build
    /// context when absent.
    pub from: Option<Source>,
    /// What to copy, in order (a later file of the same name wins).
    pub sources: Vec<CopySource>,
    /// Where to, as written.
    pub dest: String,
    /// Owner of what is copied, `user[:group]` by name or id in the stage's passwd and group
    /// files; root for context and remote sources, the source's own for stage and image
    /// sources, when absent.
    pub chown: Option<String>,
    /// Mode of what is copied.
    pub chmod: Option<Chmod>,
    /// Make the layer on its own, independent of the layers below (BuildKit's `--link`): it
    /// is reused when only what is below changes.
    pub link: bool,
    /// Keep each source's parent directories under the destination.
    pub parents: bool,
    /// Patterns (`.dockerignore` syntax) of paths left out.
    pub exclude: Vec<String>,
    /// Extract local tar archives into the destination instead of copying them (ADD).
    pub unpack: bool,
    /// The digest remote sources must have.
    pub checksum: Option<String>,
    /// Keep the `.git` directory of git sources.
    pub keep_git_dir: bool,
    /// The diff ID of a layer of the `from` image that already holds exactly what this copy
    /// (with `link`) makes: the engine takes that layer as the step's layer instead of copying
    /// its files again. A buildpacks export sets it for a launch layer a buildpack kept from
    /// the previous image; when the image has no such layer, the files are copied.
    pub reuse_layer: Option<String>,
}

impl Copy {
    /// A copy of `sources` from the build context to `dest`, every option at its default.
    pub fn new(sources: Vec<CopySource>, dest: impl Into<String>) -> Copy {
        Copy {
            from: None,
            sources,
            dest: dest.into(),
            chown: None,
            chmod: None,
            link: false,
            parents: false,
            exclude: Vec::new(),
            unpack: false,
            checksum: None,
            keep_git_dir: false,
            reuse_layer: None,
        }
    }
}

/// Creates a directory and its missing parents, owned by the config's `User` (mode 0755), and,
/// with `set_working_dir`, makes it the working directory (WORKDIR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mkdir {
    /// The directory; a relative path is under the current working directory.
    pub path: String,
    /// Whether it becomes the config's `WorkingDir`.
    pub set_working_dir: bool,
}

/// A command of the image config in shell form (wrapped in the config's `Shell`) or exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// One string for the shell.
    Shell(String),
    /// The argument vector (empty: unset).
    Exec(Vec<String>),
}

/// The image's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// Disable any inherited check.
    Disable,
    /// Check with `test`.
    Check {
        /// The test command.
        test: CommandLine,
        /// Time between checks (0 or absent: inherit).
        interval: Option<Duration>,
        /// How long one check may take.
        timeout: Option<Duration>,
        /// Grace period after start.
        start_period: Option<Duration>,
        /// Time between checks during the start period.
        start_interval: Option<Duration>,
        /// Failures before the container is unhealthy.
        retries: Option<u32>,
    },
}

/// One typed edit of the image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigEdit {
    /// Set environment variables (a variable already set keeps its place).
    Env(Vec<(String, String)>),
    /// Set labels.
    Labels(Vec<(String, String)>),
    /// Expose ports (`80/tcp`).
    ExposePorts(Vec<String>),
    /// Declare volumes.
    Volumes(Vec<String>),
    /// Set the user (`name`, `uid`, `user:group`).
    User(String),
    /// Set the working directory without creating it.
    WorkingDir(String),
    /// Set the stop signal.
    StopSignal(String),
    /// Set the shell of shell-form commands.
    Shell(Vec<String>),
    /// Set the default command. An inherited command is otherwise reset by [`Self::Entrypoint`].
    Cmd(CommandLine),
    /// Set the entrypoint (and reset a command inherited from the base).
    Entrypoint(CommandLine),
    /// Set the health check.
    Healthcheck(HealthCheck),
    /// Add a trigger that builds on top of this image run first.
    OnBuild(String),
    /// Set the image author.
    Author(String),
}
