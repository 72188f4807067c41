//! A git repository named as an `ADD` source, in BuildKit's syntax: the repository URL
//! (`https://…​.git`, `git://…`, `ssh://…`, `git@host:path`), then optionally `#REF` and
//! `:SUBDIR` (`https://host/app.git#v1.2:docs`, `…#:docs`). `REF` is a branch, a tag, a full
//! ref (`refs/pull/7/head`) or a full commit id; without it the remote's `HEAD` is used.
//!
//! It is fetched in two calls so that a layer cache can key the step before anything is
//! downloaded: [`GitRepository::resolve`] asks the remote which commit the ref names (as
//! `git ls-remote` does), [`GitRepository::checkout`] fetches exactly that commit (shallow where
//! the server allows) with its submodules. Both go through gitoxide, as git contexts do: no
//! `git` program is needed.

use std::path::Path;

use super::gix_remote::{fetch_commit, update_submodules, Fetch, Remote};
use super::redactor;
use crate::error::{ContextError, Result};
use crate::redact::Redactor;

/// A git repository, the ref to take from it and the directory of it to use.
#[derive(Debug, Clone)]
pub struct GitRepository {
    url: String,
    reference: Option<String>,
    subdir: Option<String>,
    redactor: Redactor,
}

/// The commit a [`GitRepository`]'s ref named when it was resolved, and how to fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitCommit {
    /// The full commit id (hex).
    pub id: String,
    /// What to ask the remote for: the ref that named the commit, or the id itself.
    fetch: String,
}

impl GitRepository {
    /// Parses an ADD source naming a git repository (see the module documentation).
    pub fn parse(source: &str) -> Result<Self> {
        let redactor = redactor(source);
        let invalid = |reason: &str| ContextError::InvalidSpec {
            spec: redactor.redact(source),
            reason: reason.to_owned(),
        };
        let (url, fragment) = match source.split_once('#') {
            Some((url, fragment)) => (url, Some(fragment)),
            None => (source, None),
        };
        if url.is_empty() {
            return Err(invalid("missing repository URL"));
        }
        if url.contains('?') {
            return Err(invalid(
                "the query form (?ref=...&subdir=...) is not supported; write URL#REF:SUBDIR",
            ));
        }
        let (reference, subdir) = match fragment {
            None => (None, None),
            Some(fragment) => match fragment.split_once(':') {
                Some((reference, subdir)) => (Some(reference), Some(subdir)),
                None => (Some(fragment), None),
            },
        };
        if reference.is_some_and(|r| r.starts_with('-') || r.contains(['#', ' '])) {
            return Err(invalid("the ref after # is not a git ref"));
        }
        let subdir = subdir
            .map(|s| s.trim_matches('/'))
            .filter(|s| !s.is_empty() && *s != ".");
        if subdir.is_some_and(|s| s.split('/').any(|part| part == "..")) {
            return Err(invalid(
                "the directory after : must stay inside the repository",
            ));
        }
        Ok(GitRepository {
            url: url.to_owned(),
            reference: reference.filter(|r| !r.is_empty()).map(str::to_owned),
            subdir: subdir.map(str::to_owned),
            redactor,
        })
    }

    /// `git repository URL#REF:SUBDIR`, credentials redacted, for messages.
    pub fn describe(&self) -> String {
        let mut text = format!("git repository {}", self.redactor.redact(&self.url));
        if let Some(reference) = &self.reference {
            text.push('#');
            text.push_str(reference);
        }
        if let Some(subdir) = &self.subdir {
            text.push(':');
            text.push_str(subdir);
        }
        text
    }

    /// The directory of the repository to use, relative to a checkout's root (`.` for all).
    pub fn subdir(&self) -> &Path {
        Path::new(self.subdir.as_deref().unwrap_or("."))
    }

    /// Asks the remote which commit the ref names now. A full commit id is taken as it is.
    pub fn resolve(&self) -> Result<GitCommit> {
        if let Some(id) = self.reference.as_deref().filter(|r| is_commit_id(r)) {
            return Ok(GitCommit {
                id: id.to_ascii_lowercase(),
                fetch: id.to_ascii_lowercase(),
            });
        }
        let wanted = self.reference.as_deref().unwrap_or("HEAD");
        // A branch before a tag of the same name, as `git checkout NAME` would; an annotated
        // tag names the commit it points to.
        let candidates = if wanted == "HEAD" || wanted.starts_with("refs/") {
            vec![wanted.to_owned()]
        } else {
            vec![
                format!("refs/heads/{wanted}"),
                format!("refs/tags/{wanted}"),
            ]
        };
        let refs = self.remote()?.list_refs(&candidates)?;
        for name in candidates {
            if let Some(found) = refs.iter().find(|r| r.name == name) {
                return Ok(GitCommit {
                    id: found.id.to_string(),
                    fetch: name,
                });
            }
        }
        Err(ContextError::InvalidSpec {
            spec: self.describe(),
            reason: format!("the remote has no ref {wanted:?}"),
        })
    }

    /// Fetches `commit` into `dir` (new, or an empty directory) and checks it out with its
    /// submodules. The checkout keeps its `.git` directory: the caller leaves it out of what
    /// it copies unless asked to keep it.
    pub fn checkout(&self, commit: &GitCommit, dir: &Path) -> Result<()> {
        let remote = self.remote()?;
        let id = gix::ObjectId::from_hex(commit.id.as_bytes())
            .map_err(|e| remote.failed("checkout", format!("commit {:?}: {e}", commit.id)))?;
        let repo = if commit.fetch == commit.id {
            fetch_commit(&remote, dir, id, true)?
        } else {
            // The ref's tip only; should it have moved since it was resolved, the commit the
            // step was keyed by is not what was fetched.
            let tip = Fetch {
                revision: Some(commit.fetch.clone()),
                shallow: true,
                ..Fetch::default()
            };
            // A server that cannot make shallow packs still sends the ref's whole history. The
            // failed attempt may have initialised a repository in `dir`, which a new fetch
            // refuses to initialise over, so it starts from an empty directory again.
            let fetched = remote.fetch(dir, &tip).or_else(|_| {
                empty_dir(dir).map_err(|e| {
                    ContextError::io(&self.describe(), "empty before fetching again", dir, e)
                })?;
                let whole = Fetch {
                    shallow: false,
                    ..tip
                };
                remote.fetch(dir, &whole)
            })?;
            if fetched.find_commit(&remote, &commit.id)? != Some(id) {
                return Err(ContextError::InvalidSpec {
                    spec: self.describe(),
                    reason: format!(
                        "{} no longer names commit {} (it moved while the build ran); build again",
                        commit.fetch, commit.id
                    ),
                });
            }
            fetched.check_out(&remote, Some(id))?
        };
        update_submodules(&remote, &repo, true)
    }

    fn remote(&self) -> Result<Remote> {
        Remote::new(
            &self.url,
            &self.describe(),
            self.redactor.clone(),
            &[],
            false,
        )
    }
}

/// A full SHA-1 or SHA-256 commit id.
fn is_commit_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// Removes everything in `dir` (a temporary directory its caller owns), keeping the directory;
/// through its `Root`, so a symlink the failed fetch left there is never followed.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    kiln_fs::resolve::Root::open(dir)
        .and_then(|root| root.remove_contents())
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_and_directories_come_from_the_fragment() {
        let parts = |source: &str| {
            let repo = GitRepository::parse(source).unwrap();
            (repo.url, repo.reference, repo.subdir)
        };
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            parts("https://host/app.git"),
            ("https://host/app.git".into(), None, None)
        );
        assert_eq!(
            parts("https://host/app.git#v1.2:docs/api/"),
            ("https://host/app.git".into(), s("v1.2"), s("docs/api"))
        );
        assert_eq!(
            parts("git@host:team/app.git#:docs"),
            ("git@host:team/app.git".into(), None, s("docs"))
        );
        assert_eq!(
            parts("git://host/app.git#refs/pull/7/head"),
            ("git://host/app.git".into(), s("refs/pull/7/head"), None)
        );
        for bad in [
            "#main",
            "https://host/a.git#-x",
            "https://host/a.git#main:../up",
            "https://host/a.git?ref=main",
        ] {
            assert!(GitRepository::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_stay_out_of_descriptions() {
        let repo = GitRepository::parse("https://user:s3cret@host/app.git#main:docs").unwrap();
        let text = repo.describe();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.ends_with("#main:docs"), "{text}");
    }
}
