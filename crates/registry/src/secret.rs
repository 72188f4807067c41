//! A string that must never be printed: passwords, identity tokens, bearer tokens.

use std::fmt;

/// Holds a credential. `Debug` and `Display` print `***`, so a secret cannot leak through an
/// error message, a log line or a `{:?}` of a struct that contains it; the value is reachable
/// only through [`Secret::expose`], which makes every use easy to audit.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The clear text, for building an `Authorization` header or a token request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string (Docker writes empty fields for absent values).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}
