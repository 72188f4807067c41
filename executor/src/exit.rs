//! Exit codes and the one-line error report.
//!
//! - `0`: success (also `--help` and `version`);
//! - a failing RUN's own status (`128+N` when it was killed by signal `N`);
//! - `1`: any other build error (registry, context, Dockerfile, I/O, a full disk);
//! - `2`: usage error (unknown flag, bad value);
//! - `143` / `130`: the build was stopped by SIGTERM / SIGINT (128 + the signal) before its
//!   manifests were pushed: nothing tagged, no digest file, its processes, mounts and work dir
//!   gone (see [`crate::interrupt`]). A signal that comes after the push leaves the exit at 0.

use kiln_engine::BuildError;

use crate::cli::UsageError;
use crate::render::redact_credentials;

/// Exit code of a successful run.
pub const SUCCESS: i32 = 0;
/// Exit code of a build that failed for any reason other than a RUN step's status.
pub const BUILD_FAILED: i32 = 1;
/// Exit code of an unusable command line.
pub const USAGE: i32 = UsageError::EXIT_CODE;

/// The exit code for a failed build: the RUN step's status when a RUN failed, 1 otherwise.
/// Always in `1..=255`, so a failure can never look like success to the shell.
pub fn build_failure_code(error: &BuildError) -> i32 {
    let code = error.exit_code();
    if (1..=255).contains(&code) {
        code
    } else {
        BUILD_FAILED
    }
}

/// The line printed on standard error for a failure: `error: MESSAGE`, with the user-info of
/// any URL (a git token, a password) replaced by `***`.
pub fn error_line(message: &dyn std::fmt::Display) -> String {
    format!("error: {}", redact_credentials(&message.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_status_passes_through() {
        let failed = |code| BuildError::RunFailed {
            at: "Dockerfile:3".into(),
            what: "RUN".into(),
            code,
        };
        assert_eq!(build_failure_code(&failed(7)), 7);
        assert_eq!(build_failure_code(&failed(130)), 130);
        // A status the shell cannot represent, or 0, must still be a failure.
        assert_eq!(build_failure_code(&failed(0)), BUILD_FAILED);
        assert_eq!(build_failure_code(&failed(256)), BUILD_FAILED);
        assert_eq!(build_failure_code(&failed(-1)), BUILD_FAILED);
        let other = BuildError::Context("no such directory /nope".into());
        assert_eq!(build_failure_code(&other), BUILD_FAILED);
        assert_eq!(USAGE, 2);
    }

    #[test]
    fn error_lines_hide_url_credentials() {
        let error = BuildError::Context("git://me:s3cret@example.com/r.git: not found".into());
        let line = error_line(&error);
        assert_eq!(
            line,
            "error: build context: git://***@example.com/r.git: not found"
        );
        assert!(!line.contains("s3cret"));
    }
}
