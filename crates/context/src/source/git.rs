//! A git repository context: `git://host/repo.git#ref#commit` or an `http(s)://` URL ending in
//! `.git`, cloned with gitoxide (no `git` program needed).
//!
//! The fragment after the URL selects what is checked out, as in kaniko: an optional ref
//! (`main`, `refs/heads/main`, `v1.0`, `refs/tags/v1.0`, or any other ref such as
//! `refs/pull/1/head`, which is fetched explicitly), then an optional commit that is checked
//! out after the ref. The repository's `.git` directory stays in the context, as in kaniko.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::gix_remote::{update_submodules, Fetch, Remote};
use super::{blocking, new_workspace, redactor, ContextSource, Materialized, SourceOptions};
use crate::error::{ContextError, Result};
use crate::redact::Redactor;

/// kaniko's `--git` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitOptions {
    /// `branch=NAME`: the branch (or tag) to clone; overrides a ref given in the URL fragment.
    pub branch: Option<String>,
    /// `single-branch=BOOL`: fetch only the history of the selected branch.
    pub single_branch: bool,
    /// `recurse-submodules=BOOL`: initialise and update submodules recursively.
    pub recurse_submodules: bool,
    /// `insecure-skip-tls=BOOL`: don't verify the server's certificate for HTTPS git.
    pub insecure_skip_tls: bool,
    /// Transport for `git://` contexts. kaniko never speaks the git protocol: it fetches a
    /// `git://host/repo` context from `https://host/repo` (or `http://` when its
    /// `GIT_PULL_METHOD` is `http`). `Some("https")`/`Some("http")` reproduces that; `None`
    /// uses the git protocol itself.
    pub pull_method: Option<String>,
}

impl GitOptions {
    /// Applies a `--git` value such as `branch=main,single-branch=true`; may be called once
    /// per repeated flag. Booleans accept Go's spellings (`1`, `t`, `true`, `0`, `f`, ...).
    pub fn apply(&mut self, value: &str) -> Result<()> {
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let invalid = |reason: &str| ContextError::InvalidGitOption {
                option: item.to_owned(),
                reason: reason.to_owned(),
            };
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| invalid("expected key=value"))?;
            let flag = || parse_go_bool(val).ok_or_else(|| invalid("expected a boolean"));
            match key.trim() {
                "branch" => {
                    self.branch = (!val.is_empty()).then(|| val.to_owned());
                }
                "single-branch" => self.single_branch = flag()?,
                "recurse-submodules" => self.recurse_submodules = flag()?,
                "insecure-skip-tls" => self.insecure_skip_tls = flag()?,
                _ => {
                    return Err(invalid(
                        "unknown key (known: branch, single-branch, recurse-submodules, insecure-skip-tls)",
                    ))
                }
            }
        }
        Ok(())
    }
}

fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// What the URL fragment (or `branch=`) asks to check out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Checkout {
    /// The remote's default branch.
    Default,
    /// A branch or tag, cloned as with `git clone --branch`.
    Branch(String),
    /// Any other ref, fetched after the clone.
    Ref(String),
}

/// A git repository cloned into the work directory.
#[derive(Debug, Clone)]
pub struct GitSource {
    spec: String,
    url: String,
    checkout: Checkout,
    commit: Option<String>,
    options: GitOptions,
    ca_certificates: Vec<PathBuf>,
    redactor: Redactor,
}

impl GitSource {
    /// Parses a git context value (`git://...` or `http(s)://....git`, with an optional
    /// `#ref` and `#commit`).
    pub fn parse(spec: &str, options: &SourceOptions) -> Result<Self> {
        let redactor = redactor(spec);
        let invalid = |reason: &str| ContextError::InvalidSpec {
            spec: redactor.redact(spec),
            reason: reason.to_owned(),
        };
        let mut parts = spec.split('#');
        let location = parts.next().unwrap_or_default();
        let reference = parts.next().filter(|r| !r.is_empty());
        let commit = parts.next().filter(|c| !c.is_empty());
        if parts.next().is_some() {
            return Err(invalid("expected at most URL#ref#commit"));
        }
        if let Some(commit) = commit {
            if !commit.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid("the commit after the ref must be a hexadecimal id"));
            }
        }
        let (scheme, rest) = location
            .split_once("://")
            .ok_or_else(|| invalid("not a URL"))?;
        if rest.is_empty() {
            return Err(invalid("missing repository address"));
        }
        let url = match (scheme, options.git.pull_method.as_deref()) {
            ("git", Some(method @ ("http" | "https"))) => format!("{method}://{rest}"),
            ("git", Some(other)) => {
                return Err(invalid(&format!("unknown git pull method {other:?}")))
            }
            _ => location.to_owned(),
        };
        let selected = options.git.branch.as_deref().or(reference);
        let checkout = match selected {
            None => Checkout::Default,
            Some(name) => {
                if let Some(branch) = name.strip_prefix("refs/heads/") {
                    Checkout::Branch(branch.to_owned())
                } else if let Some(tag) = name.strip_prefix("refs/tags/") {
                    Checkout::Branch(tag.to_owned())
                } else if name.starts_with("refs/") {
                    Checkout::Ref(name.to_owned())
                } else {
                    Checkout::Branch(name.to_owned())
                }
            }
        };
        Ok(GitSource {
            spec: spec.to_owned(),
            url,
            checkout,
            commit: commit.map(str::to_owned),
            options: options.git.clone(),
            ca_certificates: options.ca_certificates.clone(),
            redactor,
        })
    }

    /// Clones the repository into `workspace/src` as `git clone` and `git checkout` would
    /// for kaniko, and returns that directory.
    fn clone_into(&self, workspace: &Path) -> Result<PathBuf> {
        let remote = Remote::new(
            &self.url,
            &self.describe(),
            self.redactor.clone(),
            &self.ca_certificates,
            self.options.insecure_skip_tls,
        )?;
        let mut fetch = Fetch::default();
        match &self.checkout {
            Checkout::Default => {}
            Checkout::Branch(branch) => fetch.branch = Some(branch.clone()),
            Checkout::Ref(reference) => fetch.extra_ref = Some(reference.clone()),
        }
        if self.options.single_branch {
            fetch.refspec = self.single_branch_refspec(&remote)?;
        }
        let dest = workspace.join("src");
        let fetched = remote.fetch(&dest, &fetch)?;
        let mut detach = None;
        if let Checkout::Ref(reference) = &self.checkout {
            let id = fetched.ref_id(reference).ok_or_else(|| {
                remote.failed("clone", format!("the remote has no ref {reference:?}"))
            })?;
            detach = Some(id);
        }
        if let Some(commit) = &self.commit {
            let id = fetched.find_commit(&remote, commit)?.ok_or_else(|| {
                remote.failed(
                    "checkout",
                    format!("commit {commit} is not in what the remote sent for this ref"),
                )
            })?;
            detach = Some(id);
        }
        let repo = fetched.check_out(&remote, detach)?;
        if self.options.recurse_submodules {
            update_submodules(&remote, &repo, false)?;
        }
        Ok(dest)
    }

    /// The one refspec `--single-branch` fetches, as `git clone --single-branch` picks it: the
    /// branch or tag asked for, else the branch the remote's HEAD is on. `None` (fetch every
    /// branch) when the remote's HEAD is detached.
    fn single_branch_refspec(&self, remote: &Remote) -> Result<Option<String>> {
        let full_name = match &self.checkout {
            Checkout::Branch(name) => {
                let candidates = [format!("refs/heads/{name}"), format!("refs/tags/{name}")];
                let refs = remote.list_refs(&candidates)?;
                candidates
                    .into_iter()
                    .find(|c| refs.iter().any(|r| r.name == *c))
                    .ok_or_else(|| {
                        remote.failed("clone", format!("the remote has no branch or tag {name:?}"))
                    })?
            }
            Checkout::Default | Checkout::Ref(_) => {
                let refs = remote.list_refs(&["HEAD".to_owned()])?;
                match refs
                    .into_iter()
                    .find_map(|r| (r.name == "HEAD").then_some(r.target))
                {
                    Some(Some(target)) if target.starts_with("refs/heads/") => target,
                    _ => return Ok(None),
                }
            }
        };
        Ok(Some(match full_name.strip_prefix("refs/heads/") {
            Some(branch) => format!("+{full_name}:refs/remotes/origin/{branch}"),
            None => format!("+{full_name}:{full_name}"),
        }))
    }
}

impl ContextSource for GitSource {
    fn describe(&self) -> String {
        format!("git context {}", self.redactor.redact(&self.spec))
    }

    fn materialize<'a>(&'a self, work_dir: &'a Path) -> BoxFuture<'a, Result<Materialized>> {
        Box::pin(async move {
            let name = self.describe();
            let workspace = new_workspace(work_dir, "context-git-", &name)?;
            let this = self.clone();
            let path = workspace.path().to_path_buf();
            let root = blocking(&name, move || this.clone_into(&path)).await?;
            Ok(Materialized::owned(root, workspace))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str, git: &str) -> GitSource {
        let mut options = SourceOptions::default();
        options.git.apply(git).unwrap();
        GitSource::parse(spec, &options).unwrap()
    }

    #[test]
    fn fragments_select_checkout() {
        let s = parse("git://h/r.git", "");
        assert_eq!((s.checkout, s.commit), (Checkout::Default, None));
        let s = parse("git://h/r.git#refs/heads/dev#0123abc", "");
        assert_eq!(s.checkout, Checkout::Branch("dev".into()));
        assert_eq!(s.commit.as_deref(), Some("0123abc"));
        let s = parse("git://h/r.git#refs/pull/7/head", "");
        assert_eq!(s.checkout, Checkout::Ref("refs/pull/7/head".into()));
        let s = parse("git://h/r.git#v1", "branch=other");
        assert_eq!(s.checkout, Checkout::Branch("other".into()));
        assert_eq!(s.url, "git://h/r.git");
        let s = parse("git://h/r.git##abcdef", "");
        assert_eq!(
            (s.checkout, s.commit.as_deref()),
            (Checkout::Default, Some("abcdef"))
        );
    }

    #[test]
    fn options_parse_like_kaniko() {
        let mut options = GitOptions::default();
        options
            .apply("branch=main,single-branch=true,recurse-submodules=T")
            .unwrap();
        assert_eq!(options.branch.as_deref(), Some("main"));
        assert!(options.single_branch && options.recurse_submodules);
        assert!(options.apply("single-branch=maybe").is_err());
        assert!(options.apply("depth=1").is_err());
        assert!(options.apply("nonsense").is_err());
    }

    #[test]
    fn pull_method_rewrites_git_scheme() {
        let mut options = SourceOptions::default();
        options.git.pull_method = Some("https".into());
        let s = GitSource::parse("git://example.invalid/r.git#main", &options).unwrap();
        assert_eq!(s.url, "https://example.invalid/r.git");
    }

    #[test]
    fn bad_commit_is_rejected() {
        assert!(GitSource::parse("git://h/r.git#main#not-hex", &SourceOptions::default()).is_err());
        assert!(GitSource::parse("git://h/r.git#a#b#c", &SourceOptions::default()).is_err());
    }
}
