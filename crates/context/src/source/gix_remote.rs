//! Talking to git remotes and checking out commits with gitoxide (`gix`), the plumbing under
//! git contexts ([`super::GitSource`]) and ADD's git sources ([`super::GitRepository`]). No
//! `git` program runs, so both work in Kiln's `FROM scratch` image.
//!
//! Repositories are created and opened isolated from the machine's git setup: no system or
//! global configuration, no `GIT_*` variables, no credential helpers, no prompts. What is
//! fetched depends only on the URL and the options given; credentials come from the URL.
//!
//! Checkouts write only below their directory: gix refuses tree entries named `.git` or `..`,
//! creates symlinks as symlinks, and never creates a file or directory through a symlink it
//! finds on the way (a leading path component must be a real directory). Submodule
//! directories are checked the same way before anything is cloned into them.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use gix::bstr::{BString, ByteSlice};
use gix::protocol::handshake::Ref;
use gix::protocol::transport::client::blocking_io::http;
use gix::ObjectId;
use rustls::pki_types::CertificateDer;

use crate::error::{ContextError, Result};
use crate::redact::Redactor;

/// How deep submodules of submodules are followed; a repository that names itself as its own
/// submodule would otherwise recurse until the disk is full.
const MAX_SUBMODULE_DEPTH: usize = 16;

/// One git remote: its URL and what the transport trusts, with the name errors give it.
#[derive(Clone)]
pub(crate) struct Remote {
    url: gix::Url,
    source_name: String,
    redactor: Redactor,
    extra_roots: Vec<CertificateDer<'static>>,
    skip_verify: bool,
}

/// A ref the remote advertised: its full name and the object it names, peeled through
/// annotated tags.
#[derive(Debug, Clone)]
pub(crate) struct RemoteRef {
    /// `HEAD`, `refs/heads/main`, `refs/tags/v1`, ...
    pub name: String,
    /// The commit (or other object) the ref names, after peeling annotated tags.
    pub id: ObjectId,
    /// For a symbolic ref (the remote's `HEAD`), the ref it points to.
    pub target: Option<String>,
}

/// What a clone fetches, beyond the defaults of `git clone` (every branch and tag, `HEAD` on
/// the remote's default branch).
#[derive(Debug, Default)]
pub(crate) struct Fetch {
    /// `git clone --branch NAME`: a branch (HEAD on it) or a tag (HEAD detached at it).
    pub branch: Option<String>,
    /// Fetch this one full ref name or commit id only, with a detached HEAD.
    pub revision: Option<String>,
    /// Replaces the remote's fetch refspec (`--single-branch`).
    pub refspec: Option<String>,
    /// A further ref to fetch without storing it (kaniko's `#refs/pull/1/head`).
    pub extra_ref: Option<String>,
    /// Fetch only the tip commit (`--depth=1`).
    pub shallow: bool,
}

/// A repository whose objects were fetched and whose worktree is not written yet.
pub(crate) struct Fetched {
    checkout: gix::clone::PrepareCheckout,
    ref_map: gix::remote::fetch::RefMap,
}

impl Remote {
    /// A remote at `url` (`git://`, `http(s)://`, `ssh://` or `user@host:path`) that errors call
    /// `source_name`, trusting the certificates in `ca_files` besides the system's for HTTPS,
    /// or any certificate with `skip_verify`.
    pub fn new(
        url: &str,
        source_name: &str,
        redactor: Redactor,
        ca_files: &[PathBuf],
        skip_verify: bool,
    ) -> Result<Self> {
        let invalid = |reason: String| ContextError::InvalidSpec {
            spec: source_name.to_owned(),
            reason,
        };
        let parsed = gix::url::parse(url.as_bytes().as_bstr())
            .map_err(|e| invalid(redactor.redact(&format!("not a git URL: {e}"))))?;
        check_scheme(&parsed).map_err(invalid)?;
        Ok(Remote {
            url: parsed,
            source_name: source_name.to_owned(),
            redactor,
            extra_roots: crate::tls::read_ca_files(ca_files)?,
            skip_verify,
        })
    }

    /// The error for a failed `action` ("ls-remote", "clone", ...), its causes joined and
    /// every credential of the URL redacted.
    pub fn failed(&self, action: &str, error: impl std::fmt::Display) -> ContextError {
        ContextError::Git {
            source_name: self.source_name.clone(),
            action: action.to_owned(),
            message: self.redactor.redact(&format!("{error:#}")),
        }
    }

    /// Lists the remote's refs whose names start with one of `prefixes` (`HEAD`,
    /// `refs/heads/main`, ...), as `git ls-remote` does, without fetching any object. A server
    /// that only speaks protocol v0/v1 sends all its refs; they are filtered here.
    pub fn list_refs(&self, prefixes: &[String]) -> Result<Vec<RemoteRef>> {
        use gix::protocol::transport::client::blocking_io::connect;
        use gix::protocol::transport::client::TransportWithoutIO;
        let fail = |e: &dyn std::fmt::Display| self.failed("ls-remote", e);
        let mut transport = connect::connect(
            self.url.clone(),
            connect::Options {
                version: gix::protocol::transport::Protocol::V2,
                ..Default::default()
            },
        )
        .map_err(|e| fail(&e))?;
        transport
            .configure(&self.http_options())
            .map_err(|e| fail(&e))?;
        let mut handshake = gix::protocol::handshake(
            &mut transport,
            gix::protocol::transport::Service::UploadPack,
            refuse_further_credentials,
            Vec::new(),
            &mut gix::progress::Discard,
        )
        .map_err(|e| fail(&e))?;
        let refs = match handshake.refs.take() {
            Some(refs) => refs,
            None => {
                let mut wanted = gix::protocol::ls_refs::RefPrefixes::new();
                wanted.extend(prefixes.iter().map(|p| BString::from(p.as_str())));
                gix::protocol::LsRefsCommand::new(
                    Some(wanted),
                    &handshake.capabilities,
                    ("agent", Some(gix::env::agent().into())),
                )
                .invoke_blocking(&mut transport, &mut gix::progress::Discard, false)
                .map_err(|e| fail(&e))?
            }
        };
        // Only a courtesy to stateful servers: the answer is complete either way.
        let _ = gix::protocol::indicate_end_of_interaction(&mut transport, false);
        Ok(refs
            .into_iter()
            .filter_map(|r| {
                let (name, id, target) = match r {
                    Ref::Peeled {
                        full_ref_name,
                        object,
                        ..
                    }
                    | Ref::Direct {
                        full_ref_name,
                        object,
                    } => (full_ref_name, object, None),
                    Ref::Symbolic {
                        full_ref_name,
                        target,
                        object,
                        ..
                    } => (full_ref_name, object, Some(target.to_string())),
                    Ref::Unborn { .. } => return None,
                };
                let name = name.to_string();
                prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_str()))
                    .then_some(RemoteRef { name, id, target })
            })
            .collect())
    }

    /// Clones into `dir` (new, or an empty directory) as `fetch` says, without writing the
    /// worktree yet. On failure nothing is left in `dir`.
    pub fn fetch(&self, dir: &Path, fetch: &Fetch) -> Result<Fetched> {
        let fail = |e: &dyn std::fmt::Display| self.failed("clone", e);
        let mut prepare = gix::clone::PrepareFetch::new(
            self.url.clone(),
            dir,
            gix::create::Kind::WithWorktree,
            gix::create::Options::default(),
            gix::open::Options::isolated(),
        )
        .map_err(|e| fail(&e))?
        .with_remote_name("origin")
        .map_err(|e| fail(&e))?;
        let transport = self.clone();
        prepare = prepare.configure_connection(move |connection| {
            connection.set_credentials(refuse_further_credentials);
            connection.set_transport_options(Box::new(transport.http_options()));
            Ok(())
        });
        if let Some(branch) = fetch.branch.as_deref() {
            prepare = prepare.with_ref_name(Some(branch)).map_err(|e| fail(&e))?;
        }
        if let Some(revision) = fetch.revision.as_deref() {
            prepare = prepare
                .with_revision(Some(revision))
                .map_err(|e| fail(&e))?;
        }
        if let Some(refspec) = fetch.refspec.clone() {
            prepare = prepare.configure_remote(move |remote| {
                let mut remote = remote;
                remote.replace_refspecs(Some(refspec.as_str()), gix::remote::Direction::Fetch)?;
                Ok(remote)
            });
        }
        if let Some(extra) = fetch.extra_ref.as_deref() {
            let spec = gix::refspec::parse(
                extra.as_bytes().as_bstr(),
                gix::refspec::parse::Operation::Fetch,
            )
            .map_err(|e| fail(&e))?
            .to_owned();
            prepare = prepare.with_fetch_options(gix::remote::ref_map::Options {
                extra_refspecs: vec![spec],
                ..Default::default()
            });
        }
        if fetch.shallow {
            prepare = prepare.with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(
                std::num::NonZeroU32::MIN,
            ));
        }
        let interrupt = AtomicBool::new(false);
        let (checkout, outcome) = prepare
            .fetch_then_checkout(gix::progress::Discard, &interrupt)
            .map_err(|e| fail(&e))?;
        Ok(Fetched {
            checkout,
            ref_map: outcome.ref_map,
        })
    }

    /// Options for gix's HTTP transport: the TLS configuration of this remote, built when the
    /// transport makes its client (plain-HTTP remotes included: the client is one for both).
    fn http_options(&self) -> http::Options {
        let extra_roots = self.extra_roots.clone();
        let skip_verify = self.skip_verify;
        let reqwest_options = http::reqwest::Options {
            configure_client: Some(Box::new(move |builder| {
                let config = crate::tls::client_config(extra_roots.clone(), skip_verify)
                    .map_err(gix::Error::from_error)?;
                Ok(builder.tls_backend_preconfigured(config))
            })),
            configure_request: None,
        };
        http::Options {
            user_agent: Some(gix::env::agent().to_owned()),
            backend: Some(Arc::new(Mutex::new(reqwest_options))),
            ..Default::default()
        }
    }

    /// The remote for a submodule at `url`, trusting what this one trusts.
    fn submodule(&self, url: &gix::Url, source_name: String) -> Result<Remote> {
        let text = url.to_bstring().to_string();
        let invalid = |reason: String| ContextError::InvalidSpec {
            spec: source_name.clone(),
            reason,
        };
        check_scheme(url).map_err(invalid)?;
        Ok(Remote {
            url: url.clone(),
            source_name,
            redactor: Redactor::for_url(&text),
            extra_roots: self.extra_roots.clone(),
            skip_verify: self.skip_verify,
        })
    }
}

impl Fetched {
    /// The commit a fetched ref names (peeled through annotated tags), if the remote had it.
    pub fn ref_id(&self, name: &str) -> Option<ObjectId> {
        self.ref_map.mappings.iter().find_map(|mapping| {
            (mapping.remote.as_name()? == name)
                .then(|| mapping.remote.peeled_id().map(ToOwned::to_owned))
                .flatten()
        })
    }

    /// The commit `revision` names in the fetched objects: a full id, or an abbreviated one
    /// that matches exactly one object. `None` when nothing fetched has it.
    pub fn find_commit(&self, remote: &Remote, revision: &str) -> Result<Option<ObjectId>> {
        let repo = self.checkout.repo();
        let id = if let Ok(id) = ObjectId::from_hex(revision.as_bytes()) {
            repo.has_object(id).then_some(id)
        } else {
            let prefix = gix::hash::Prefix::from_hex(revision)
                .map_err(|e| remote.failed("checkout", format!("commit {revision:?}: {e}")))?;
            match repo.objects.lookup_prefix(prefix, None) {
                Ok(Some(Ok(id))) => Some(id),
                Ok(Some(Err(()))) => {
                    return Err(remote.failed(
                        "checkout",
                        format!("commit {revision:?} is ambiguous: give more digits"),
                    ))
                }
                Ok(None) => None,
                Err(e) => return Err(remote.failed("checkout", e)),
            }
        };
        let Some(id) = id else { return Ok(None) };
        let commit = repo
            .find_object(id)
            .and_then(|object| object.peel_to_commit())
            .map_err(|e| remote.failed("checkout", format!("{revision}: {e:#}")))?;
        Ok(Some(commit.id))
    }

    /// Writes the worktree and index of HEAD, after detaching HEAD at `commit` when given.
    /// Returns the repository for submodule updates.
    pub fn check_out(
        mut self,
        remote: &Remote,
        commit: Option<ObjectId>,
    ) -> Result<gix::Repository> {
        let fail = |e: &dyn std::fmt::Display| remote.failed("checkout", e);
        if let Some(commit) = commit {
            detach_head(self.checkout.repo(), commit).map_err(|e| fail(&e))?;
        }
        let interrupt = AtomicBool::new(false);
        let (repo, outcome) = self
            .checkout
            .main_worktree(gix::progress::Discard, &interrupt)
            .map_err(|e| fail(&e))?;
        if let Some(collision) = outcome.collisions.first() {
            return Err(fail(&format!(
                "{}: more than one entry of the tree would be written there",
                collision.path
            )));
        }
        if let Some(error) = outcome.errors.first() {
            return Err(fail(&format!("{}: {}", error.path, error.error)));
        }
        Ok(repo)
    }
}

/// Points HEAD at `commit`, detached, as `git checkout --detach` does.
fn detach_head(repo: &gix::Repository, commit: ObjectId) -> gix::Result<()> {
    use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
    repo.edit_reference(RefEdit {
        change: Change::Update {
            log: LogChange {
                mode: RefLog::AndReference,
                force_create_reflog: false,
                message: format!("checkout: moving to {commit}").into(),
            },
            expected: PreviousValue::Any,
            new: gix::refs::Target::Object(commit),
        },
        name: "HEAD".try_into().map_err(gix::Error::from_error)?,
        deref: false,
    })?;
    Ok(())
}

/// Checks out every submodule of `repo`'s worktree at the commit its tree records, and their
/// submodules in turn, as `git submodule update --init --recursive`. Each submodule keeps its
/// repository in its own directory (`path/.git`). `shallow` fetches only that commit where the
/// server hands out commits by id.
pub(crate) fn update_submodules(
    remote: &Remote,
    repo: &gix::Repository,
    shallow: bool,
) -> Result<()> {
    update_submodules_at(remote, repo, shallow, 0)
}

fn update_submodules_at(
    remote: &Remote,
    repo: &gix::Repository,
    shallow: bool,
    depth: usize,
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| remote.failed("submodule update", e);
    let Some(submodules) = repo.submodules().map_err(|e| fail(&e))? else {
        return Ok(());
    };
    let root = repo
        .workdir()
        .ok_or_else(|| fail(&"the repository has no worktree"))?
        .to_owned();
    for submodule in submodules {
        let path = submodule.path().map_err(|e| fail(&e))?.to_string();
        // Only gitlinks of the checked-out tree are submodules; `.gitmodules` may name more.
        let Some(commit) = submodule.index_id().map_err(|e| fail(&e))? else {
            continue;
        };
        if matches!(
            submodule.update().map_err(|e| fail(&e))?,
            Some(gix::submodule::config::Update::None)
        ) {
            continue;
        }
        if depth >= MAX_SUBMODULE_DEPTH {
            return Err(fail(&format!(
                "submodule {path}: submodules nest more than {MAX_SUBMODULE_DEPTH} deep"
            )));
        }
        let url = submodule.resolved_url().map_err(|e| fail(&e))?;
        let shown = remote.redactor.redact(&url.to_bstring().to_string());
        let child = remote.submodule(
            &url,
            format!("{}: submodule {path} ({shown})", remote.source_name),
        )?;
        let dir = contained_dir(&root, Path::new(&path))
            .map_err(|reason| child.failed("submodule update", reason))?;
        let checkout = fetch_commit(&child, &dir, commit, shallow)?;
        register_submodule(repo, submodule.name(), &url).map_err(|e| fail(&e))?;
        update_submodules_at(&child, &checkout, shallow, depth + 1)?;
    }
    Ok(())
}

/// Records the submodule as initialised in the superproject's `.git/config`
/// (`submodule.NAME.url` and `.active`), as `git submodule init` does, so that git run later
/// on a kept `.git` sees it checked out.
fn register_submodule(
    repo: &gix::Repository,
    name: &gix::bstr::BStr,
    url: &gix::Url,
) -> gix::Result<()> {
    let path = repo.git_dir().join("config");
    let mut config =
        gix::config::File::from_path_no_includes(path.clone(), gix::config::Source::Local)?;
    config.set_raw_value_by("submodule", Some(name), "url", url.to_bstring().as_bstr())?;
    config.set_raw_value_by("submodule", Some(name), "active", "true")?;
    let mut bytes = Vec::new();
    config
        .write_to(&mut bytes)
        .map_err(gix::Error::from_error)?;
    std::fs::write(&path, bytes).map_err(gix::Error::from_error)?;
    Ok(())
}

/// Fetches `commit` into `dir` and checks it out: by id first (one commit with `shallow`),
/// then, for servers that only hand out the commits of their refs (`git daemon`, older
/// servers), every branch and tag.
pub(crate) fn fetch_commit(
    remote: &Remote,
    dir: &Path,
    commit: ObjectId,
    shallow: bool,
) -> Result<gix::Repository> {
    let by_id = Fetch {
        revision: Some(commit.to_string()),
        shallow,
        ..Fetch::default()
    };
    let fetched = match remote.fetch(dir, &by_id) {
        Ok(fetched) => fetched,
        Err(_) => remote.fetch(dir, &Fetch::default())?,
    };
    if fetched.find_commit(remote, &commit.to_string())? != Some(commit) {
        return Err(remote.failed(
            "checkout",
            format!("the remote has no commit {commit} (in none of its branches and tags)"),
        ));
    }
    fetched.check_out(remote, Some(commit))
}

/// Makes sure `relative` is a real directory inside `root`: every component on the way must be
/// a directory, not a symlink, so that nothing is written through a link a checkout created.
/// The last component is created when missing. Returns the full path.
fn contained_dir(root: &Path, relative: &Path) -> std::result::Result<PathBuf, String> {
    let mut dir = root.to_path_buf();
    let mut components = relative.components().peekable();
    while let Some(component) = components.next() {
        let Component::Normal(name) = component else {
            return Err(format!(
                "{}: not a path inside the repository",
                relative.display()
            ));
        };
        dir.push(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{}: not a directory (a symlink or file is in the way)",
                    relative.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && components.peek().is_none() => {
                std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", relative.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", relative.display())),
        }
    }
    Ok(dir)
}

/// Only the network schemes git contexts and ADD name. A local path or `file://` URL, even in a
/// submodule's `.gitmodules`, would copy a repository of the build host into the image.
fn check_scheme(url: &gix::Url) -> std::result::Result<(), String> {
    use gix::url::Scheme;
    match url.scheme {
        Scheme::Git | Scheme::Http | Scheme::Https | Scheme::Ssh => Ok(()),
        ref other => Err(format!(
            "{other} repositories cannot be fetched: only git://, http(s):// and ssh ones"
        )),
    }
}

/// The credentials of a remote are the ones in its URL, which the transport sends by itself.
/// When the server asks for (other) credentials, the answer is no: no helper programs, no
/// prompt on a terminal that a build does not have.
fn refuse_further_credentials(
    action: gix::credentials::helper::Action,
) -> gix::Result<Option<gix::credentials::protocol::Outcome>> {
    match action {
        gix::credentials::helper::Action::Get(_) => Err(gix::Error::from_error(
            std::io::Error::other(
                "the server asks for credentials (any in the URL were refused); give them in the URL: https://USER:TOKEN@host/...",
            ),
        )),
        _ => Ok(None),
    }
}
