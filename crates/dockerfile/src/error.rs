//! Errors, each tied to the Dockerfile lines it is about.

use std::fmt;

use crate::expand::ExpandError;

/// A range of 1-based line numbers, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Lines {
    /// First line.
    pub start: usize,
    /// Last line (equal to `start` for a one-line instruction).
    pub end: usize,
}

impl Lines {
    /// A single line.
    pub fn single(line: usize) -> Self {
        Lines {
            start: line,
            end: line,
        }
    }
}

impl fmt::Display for Lines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// What went wrong, without the location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file holds no instruction (empty, or only comments).
    #[error("file with no instructions")]
    NoInstructions,
    /// Malformed syntax: directives, JSON arrays, ENV/LABEL pairs and the like.
    #[error("{0}")]
    Syntax(String),
    /// A heredoc whose terminating line never came.
    #[error("unterminated heredoc {0:?}")]
    UnterminatedHeredoc(String),
    /// An instruction keyword that does not exist.
    #[error("unknown instruction: {name}{}", did_you_mean(suggestion))]
    UnknownInstruction {
        /// The keyword as written.
        name: String,
        /// The closest real instruction, when one is close.
        suggestion: Option<String>,
    },
    /// A flag no instruction has.
    #[error(
        "unknown flag: --{flag} for {instruction}{}",
        did_you_mean_flag(suggestion)
    )]
    UnknownFlag {
        /// The instruction it was given to.
        instruction: String,
        /// The flag name as written (without `--`).
        flag: String,
        /// The closest flag of this instruction, when one is close.
        suggestion: Option<String>,
    },
    /// A flag that exists, but on other instructions.
    #[error("--{flag} is not a flag of {instruction} (it belongs to {owners})")]
    FlagNotAllowed {
        /// The instruction it was given to.
        instruction: String,
        /// The flag name (without `--`).
        flag: String,
        /// The instructions that do take it.
        owners: String,
    },
    /// A flag given a value it cannot take (a bad `--chmod`, duration, boolean, mount, ...).
    #[error("invalid --{flag}: {reason}")]
    InvalidFlag {
        /// The flag name (without `--`).
        flag: String,
        /// Why the value is wrong.
        reason: String,
    },
    /// An instruction whose arguments are wrong (count, form, values).
    #[error("{0}")]
    Invalid(String),
    /// Word expansion failed (`${X:?}` on an unset variable, bad substitution, ...).
    #[error(transparent)]
    Expansion(#[from] ExpandError),
    /// `--target` names no stage.
    #[error("target stage {0:?} could not be found")]
    TargetNotFound(String),
    /// Stages that depend on each other.
    #[error("circular dependency detected on stage: {0}")]
    CircularDependency(String),
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean {s}?)"))
        .unwrap_or_default()
}

fn did_you_mean_flag(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean --{s}?)"))
        .unwrap_or_default()
}

/// A Dockerfile error: what, and on which lines. Displays as `Dockerfile:LINE: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    file: String,
    lines: Option<Lines>,
    // Boxed so that `Result<_, Error>` stays small on the happy path.
    kind: Box<ErrorKind>,
}

impl Error {
    pub(crate) fn at(lines: Lines, kind: ErrorKind) -> Self {
        Error {
            file: "Dockerfile".to_string(),
            lines: Some(lines),
            kind: Box::new(kind),
        }
    }

    pub(crate) fn general(kind: ErrorKind) -> Self {
        Error {
            file: "Dockerfile".to_string(),
            lines: None,
            kind: Box::new(kind),
        }
    }

    /// Uses `name` instead of `Dockerfile` when displayed (for `-f other.Dockerfile`).
    pub fn with_file_name(mut self, name: impl Into<String>) -> Self {
        self.file = name.into();
        self
    }

    /// The lines the error is about, when it is about particular lines.
    pub fn lines(&self) -> Option<Lines> {
        self.lines
    }

    /// The first line the error is about.
    pub fn line(&self) -> Option<usize> {
        self.lines.map(|l| l.start)
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lines {
            Some(lines) => write!(f, "{}:{}: {}", self.file, lines.start, self.kind),
            None => write!(f, "{}: {}", self.file, self.kind),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &*self.kind {
            ErrorKind::Expansion(e) => Some(e),
            _ => None,
        }
    }
}
