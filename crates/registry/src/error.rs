//! Errors of registry operations. Each names the registry and repository it concerns (the
//! "target", e.g. `127.0.0.1:5000/app`), the operation, and the HTTP status with the
//! registry's own error code and message when there was one. No variant carries a credential.

use std::fmt;
use std::path::PathBuf;

use kiln_oci::Digest;
use reqwest::StatusCode;

/// The registry operation that failed, as it reads in an error message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `GET /v2/`, finding out the scheme and the authentication challenge.
    Ping,
    /// Getting a token from the token server.
    Token,
    /// Fetching a manifest or index.
    PullManifest,
    /// Fetching a blob.
    PullBlob,
    /// A `HEAD` on a blob or manifest.
    Exists,
    /// Uploading a blob.
    Push,
    /// Mounting a blob from another repository.
    Mount,
    /// Uploading a manifest.
    PushManifest,
    /// Listing tags.
    ListTags,
    /// Deleting a manifest (`DELETE /v2/<name>/manifests/<digest>`).
    DeleteManifest,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Ping => "ping",
            Operation::Token => "token request",
            Operation::PullManifest => "manifest pull",
            Operation::PullBlob => "blob pull",
            Operation::Exists => "existence check",
            Operation::Push => "push",
            Operation::Mount => "mount",
            Operation::PushManifest => "manifest push",
            Operation::ListTags => "tag list",
            Operation::DeleteManifest => "manifest delete",
        })
    }
}

/// An error code and message from a registry's JSON error body
/// (`{"errors":[{"code":"UNAUTHORIZED","message":"..."}]}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryErrorBody {
    /// The distribution error code, e.g. `MANIFEST_UNKNOWN`.
    pub code: String,
    /// The human-readable message.
    pub message: String,
}

/// Everything that can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry (or its token server) answered with an error status.
    #[error("{target}: {operation} refused: {status}{}", body_suffix(.body))]
    Status {
        /// `registry/repository` (or the registry alone).
        target: String,
        /// What was being done.
        operation: Operation,
        /// The HTTP status.
        status: StatusCode,
        /// The registry's error code and message, when it sent one.
        body: Option<RegistryErrorBody>,
    },
    /// The request did not get an answer: connection refused, TLS failure, timeout, reset.
    #[error("{target}: {operation} failed: {message}")]
    Transport {
        /// `registry/repository` (or the registry alone).
        target: String,
        /// What was being done.
        operation: Operation,
        /// The cause, with its whole source chain.
        message: String,
        /// Whether the failure happened before any byte was sent (connect, TLS handshake).
        connect: bool,
    },
    /// The registry's TLS certificate was refused, or the registry demands a client
    /// certificate and none is configured for it. The reason names the certificate (its
    /// names, subject, issuer, SHA-256 fingerprint and validity) and says what would make it
    /// acceptable: which flag or certs.d file would trust it, when it expired, which names it
    /// has, where a client certificate goes. Not retried, and never a reason to fall back to
    /// plain HTTP: the server speaks TLS.
    #[error("{target}: {operation} failed: {reason}")]
    Certificate {
        /// `registry/repository` (or the registry alone).
        target: String,
        /// What was being done.
        operation: Operation,
        /// What is wrong with the certificate and what to do about it.
        reason: String,
    },
    /// Content did not hash to the digest it was asked for or announced with.
    #[error("{target}: {operation}: content does not match digest {expected}: got {actual}")]
    DigestMismatch {
        /// `registry/repository`.
        target: String,
        /// What was being done.
        operation: Operation,
        /// The digest that was asked for.
        expected: String,
        /// The digest of what arrived (or what the registry reported).
        actual: String,
    },
    /// The registry's answer broke the protocol (missing `Location`, bad JSON, ...).
    #[error("{target}: {operation}: invalid response: {message}")]
    InvalidResponse {
        /// `registry/repository` (or the registry alone).
        target: String,
        /// What was being done.
        operation: Operation,
        /// What was wrong.
        message: String,
    },
    /// Reading the local content to upload, or writing pulled content, failed.
    #[error("{target}: {operation}: {message}: {source}")]
    Io {
        /// `registry/repository`.
        target: String,
        /// What was being done.
        operation: Operation,
        /// What Kiln was doing with the local side.
        message: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A Docker `config.json` could not be read or parsed.
    #[error("docker config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong (never the file's content).
        message: String,
    },
    /// A `docker-credential-*` helper failed.
    #[error("{helper} for {registry}: {message}")]
    CredentialHelper {
        /// The helper program name.
        helper: String,
        /// The registry credentials were asked for.
        registry: String,
        /// What went wrong.
        message: String,
    },
    /// A certificate or key given in the options could not be used.
    #[error("{registry}: TLS setup: {path}: {message}")]
    Tls {
        /// The registry the file was configured for (`*` for all).
        registry: String,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// An argument given to the client is malformed (bad repository name, tag, option).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn body_suffix(body: &Option<RegistryErrorBody>) -> String {
    match body {
        Some(b) if !b.message.is_empty() => format!(" ({}: {})", b.code, b.message),
        Some(b) => format!(" ({})", b.code),
        None => String::new(),
    }
}

impl Error {
    /// The same error again, for another caller that waited on the request that failed; `None`
    /// for the kinds that carry an I/O error or come from local files.
    pub(crate) fn duplicate(&self) -> Option<Error> {
        Some(match self {
            Error::Status {
                target,
                operation,
                status,
                body,
            } => Error::Status {
                target: target.clone(),
                operation: *operation,
                status: *status,
                body: body.clone(),
            },
            Error::Transport {
                target,
                operation,
                message,
                connect,
            } => Error::Transport {
                target: target.clone(),
                operation: *operation,
                message: message.clone(),
                connect: *connect,
            },
            Error::Certificate {
                target,
                operation,
                reason,
            } => Error::Certificate {
                target: target.clone(),
                operation: *operation,
                reason: reason.clone(),
            },
            Error::InvalidResponse {
                target,
                operation,
                message,
            } => Error::InvalidResponse {
                target: target.clone(),
                operation: *operation,
                message: message.clone(),
            },
            Error::InvalidArgument(message) => Error::InvalidArgument(message.clone()),
            _ => return None,
        })
    }

    /// The HTTP status, when the registry answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this is a registry refusing to move a tag that already exists in a repository
    /// with immutable tags, recognised by the messages of the registries known to send one
    /// (the list kaniko's `--push-ignore-immutable-tag-errors` matches): Amazon ECR and Google
    /// Artifact Registry.
    pub fn is_immutable_tag(&self) -> bool {
        const MESSAGES: [&str; 2] = [
            // Amazon ECR (image tag mutability set to IMMUTABLE).
            "cannot be overwritten because the repository is immutable",
            // Google Artifact Registry (tag immutability enabled).
            "The repository has enabled tag immutability",
        ];
        match self {
            Error::Status {
                operation: Operation::PushManifest,
                body: Some(body),
                ..
            } => MESSAGES.iter().any(|m| body.message.contains(m)),
            _ => false,
        }
    }

    /// Whether retrying the same request later may succeed: connection failures, 429 and
    /// 5xx (except 501, which a retry will not change).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => retryable_status(*status),
            _ => false,
        }
    }

    /// The error of a request that got no answer; a refused certificate becomes
    /// [`Error::Certificate`] with the verifier's explanation.
    pub(crate) fn transport(target: &str, operation: Operation, err: &reqwest::Error) -> Self {
        if let Some(rejection) = crate::certificate::find_rejection(err) {
            return Error::Certificate {
                target: target.to_owned(),
                operation,
                reason: rejection.message().to_owned(),
            };
        }
        // reqwest calls both its connect timeout and the request deadline "operation timed
        // out"; the deadline is the one that covers the whole request, body included.
        let message = if err.is_timeout() && !err.is_connect() {
            match err.url() {
                Some(url) => format!("{url}: the request deadline ran out before it finished"),
                None => "the request deadline ran out before it finished".to_owned(),
            }
        } else {
            error_chain(err)
        };
        Error::Transport {
            target: target.to_owned(),
            operation,
            message,
            connect: err.is_connect(),
        }
    }

    pub(crate) fn digest_mismatch(
        target: &str,
        operation: Operation,
        expected: &Digest,
        actual: impl ToString,
    ) -> Self {
        Error::DigestMismatch {
            target: target.to_owned(),
            operation,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }

    pub(crate) fn invalid(target: &str, operation: Operation, message: impl Into<String>) -> Self {
        Error::InvalidResponse {
            target: target.to_owned(),
            operation,
            message: message.into(),
        }
    }
}

/// Statuses worth another try. 499 is what distribution answers when a request's body did not
/// arrive whole (its "client disconnected"), which proxies pass on: the connection broke on the
/// way, and sending the request again mends it like any broken connection.
pub(crate) fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status.as_u16() == 499
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

/// An error and its causes joined with `: `, because reqwest's own message stops at
/// "error sending request" and the useful part (refused, certificate unknown) is deeper.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Parses distribution's error body, keeping only the first error.
pub(crate) fn parse_error_body(body: &[u8]) -> Option<RegistryErrorBody> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        #[serde(default)]
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    let first = envelope.errors.into_iter().next()?;
    let one_line =
        |s: String| -> String { s.lines().next().unwrap_or("").chars().take(300).collect() };
    Some(RegistryErrorBody {
        code: one_line(first.code),
        message: one_line(first.message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_error_reads_as_documented() {
        let err = Error::Status {
            target: "127.0.0.1:5000/app".into(),
            operation: Operation::Push,
            status: StatusCode::UNAUTHORIZED,
            body: parse_error_body(
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#,
            ),
        };
        assert_eq!(
            err.to_string(),
            "127.0.0.1:5000/app: push refused: 401 Unauthorized (UNAUTHORIZED: authentication required)"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn classifies_retryable_statuses() {
        assert!(retryable_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable_status(StatusCode::NOT_IMPLEMENTED));
        assert!(!retryable_status(StatusCode::NOT_FOUND));
        assert!(parse_error_body(b"not json").is_none());
    }
}
