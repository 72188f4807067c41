//! The values operations carry that every front end spells the same way: file modes, mount
//! kinds and their options, network and security modes, where files come from.

use std::fmt;

/// A `--chmod` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chmod {
    /// An octal mode such as `755` or `0644` (at most `7777`).
    Octal(u32),
    /// A symbolic mode such as `u=rwx,go=rx` or `+x`, validated, applied by the engine.
    Symbolic(String),
}

impl Chmod {
    /// Parses and validates a `--chmod` value.
    pub fn parse(value: &str) -> Result<Self, String> {
        if !value.is_empty() && value.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            let mode = u32::from_str_radix(value, 8).map_err(|_| {
                format!("invalid chmod parameter {value}: mode must be in range 0 - 7777")
            })?;
            if mode > 0o7777 {
                return Err(format!(
                    "invalid chmod parameter {value}: mode must be in range 0 - 7777"
                ));
            }
            return Ok(Chmod::Octal(mode));
        }
        if is_symbolic_mode(value) {
            return Ok(Chmod::Symbolic(value.to_string()));
        }
        Err(format!(
            "invalid chmod parameter {value:?}: expected an octal mode (0-7777) or a symbolic mode like u+x"
        ))
    }
}

/// `[ugoa]*([-+=]([rwxXst]*|[ugo]))+` clauses separated by commas, as chmod(1) takes them.
fn is_symbolic_mode(value: &str) -> bool {
    !value.is_empty()
        && value.split(',').all(|clause| {
            let rest = clause.trim_start_matches(['u', 'g', 'o', 'a']);
            let mut chars = rest.chars().peekable();
            let mut actions = 0;
            while let Some(op) = chars.next() {
                if !matches!(op, '+' | '-' | '=') {
                    return false;
                }
                actions += 1;
                if matches!(chars.peek(), Some('u' | 'g' | 'o')) {
                    chars.next();
                    continue;
                }
                while matches!(chars.peek(), Some('r' | 'w' | 'x' | 'X' | 's' | 't')) {
                    chars.next();
                }
            }
            actions > 0
        })
}

/// The network a RUN step sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The default network of the build.
    #[default]
    Default,
    /// No network at all.
    None,
    /// The host's network.
    Host,
}

/// How confined a RUN step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityMode {
    /// The normal, confined sandbox.
    #[default]
    Sandbox,
    /// All capabilities, like `docker run --privileged`.
    Insecure,
}

/// The kind of a mount a RUN step gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// A directory of the context, another stage or an image (read-only by default).
    Bind,
    /// A persistent cache directory.
    Cache,
    /// An empty tmpfs.
    Tmpfs,
    /// A build secret as a file.
    Secret,
    /// The SSH agent socket.
    Ssh,
}

impl MountType {
    /// The kind's name as `--mount type=` spells it.
    pub fn name(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

impl fmt::Display for MountType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheSharing {
    /// Writers share the directory.
    #[default]
    Shared,
    /// Each concurrent writer gets its own copy.
    Private,
    /// Writers wait for each other.
    Locked,
}

/// Where a bind or cache mount, or a copy, takes its files from when it is not the build
/// context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A stage of this plan, by id.
    Stage(usize),
    /// An image reference, pulled by the engine.
    Image(String),
    /// A directory of the machine running the build that the front end itself names: its own
    /// files (the lifecycle, launcher and buildpacks a buildpacks build brings), never a path a
    /// user's input chose. Read through a root like every other tree; copies only.
    Local(String),
}

/// A mount of a RUN step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount kind.
    pub kind: MountType,
    /// Where it appears in the step (defaulted for secret and ssh); relative targets are under
    /// the working directory.
    pub target: String,
    /// Path inside the source (bind, cache), or secret source.
    pub source: Option<String>,
    /// The stage or image files come from (bind, cache); the build context when absent.
    pub from: Option<Source>,
    /// Read-only (bind, secret, ssh default) or writable (cache, tmpfs default).
    pub read_only: bool,
    /// Cache id (defaults to the target), secret id, or ssh id (defaults to `default`).
    pub id: Option<String>,
    /// Cache sharing mode.
    pub sharing: CacheSharing,
    /// File mode (cache, secret, ssh).
    pub mode: Option<u32>,
    /// Owner uid (cache, secret, ssh).
    pub uid: Option<u32>,
    /// Owner gid (cache, secret, ssh).
    pub gid: Option<u32>,
    /// Size limit in bytes (tmpfs).
    pub size: Option<u64>,
    /// Fail when the secret or ssh socket is not provided.
    pub required: bool,
    /// Expose the secret as this environment variable instead of (or besides) a file.
    pub env: Option<String>,
}
