//! Keeping credentials embedded in context URLs out of every message.
//!
//! A context such as `https://user:token@host/repo.git` carries a secret in its userinfo. Git
//! and HTTP errors echo URLs back, so every string this crate shows a user passes through
//! [`Redactor`] first.

/// Replaces the userinfo of every `scheme://userinfo@host` in `text` with `***`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        out.push_str(&rest[..authority_start]);
        let after = &rest[authority_start..];
        let authority_len = after
            .find(|c: char| c == '/' || c == '#' || c == '?' || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..authority_len];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority_len..];
    }
    out.push_str(rest);
    out
}

/// Redacts URL userinfo and, additionally, the literal secrets of one context URL wherever
/// they appear (git sometimes prints a username or token on its own).
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Redactor {
    /// Builds a redactor for the credentials embedded in `url`, if any.
    pub fn for_url(url: &str) -> Self {
        let mut secrets = Vec::new();
        if let Some(scheme_end) = url.find("://") {
            let after = &url[scheme_end + 3..];
            let authority_len = after.find(['/', '#', '?']).unwrap_or(after.len());
            let authority = &after[..authority_len];
            if let Some(at) = authority.rfind('@') {
                let userinfo = &authority[..at];
                for part in std::iter::once(userinfo).chain(userinfo.split(':')) {
                    // Very short parts (an empty password, a one-letter user) would redact
                    // ordinary text everywhere; the URL form is still redacted.
                    if part.len() >= 3 {
                        secrets.push(part.to_owned());
                    }
                }
            }
        }
        // Longest first so a whole userinfo is replaced before its pieces.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    /// Returns `text` with URL credentials and this URL's secrets replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = redact_urls(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden() {
        assert_eq!(
            redact_urls("fatal: https://bob:s3cret@host:8443/r.git#main failed"),
            "fatal: https://***@host:8443/r.git#main failed"
        );
        assert_eq!(redact_urls("git://host/r.git"), "git://host/r.git");
        assert_eq!(
            redact_urls("a http://t0ken@h/x and https://u:p@h2"),
            "a http://***@h/x and https://***@h2"
        );
    }

    #[test]
    fn literal_secrets_are_hidden() {
        let r = Redactor::for_url("https://alice:hunter22@example.invalid/repo.git");
        assert_eq!(
            r.redact("Authentication failed for 'alice' using hunter22"),
            "Authentication failed for '***' using ***"
        );
        assert!(!format!("{r:?}").contains("hunter22"));
    }
}
