//! The public registry client: one method per distribution API operation.
//!
//! This module holds the client, its result types, pings and tag listing; the operations are
//! grouped by what they move: `manifests` (small documents read whole), `blobs` (verified
//! download streams) and `upload` (the upload session protocol).

mod blobs;
mod manifests;
mod upload;

use std::sync::Arc;

use bytes::Bytes;
use kiln_oci::{Digest, MediaType};
use reqwest::header::{HeaderMap, LINK};
use reqwest::StatusCode;
use url::Url;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Operation};
use crate::options::{Access, RegistryOptions};
use crate::repository::Repository;
use crate::transport::{read_limited, status_error, Ctx, Endpoint, Inner};

/// Distribution's own limit on manifest size; anything bigger is refused before reading it.
const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;
/// A bound on tag-list pages, so a registry that links a page to itself cannot loop forever.
const MAX_TAG_PAGES: usize = 10_000;
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// A registry client. Cloning is cheap and clones share connections, the token cache and the
/// limit on concurrent transfers.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// A manifest or index as fetched.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The exact bytes the registry served; the digest is over these.
    pub bytes: Bytes,
    /// The media type, from `Content-Type` or the document's `mediaType` field.
    pub media_type: MediaType,
    /// The digest of `bytes` (verified against the requested digest when pulled by digest).
    pub digest: Digest,
}

/// What a `HEAD` on a manifest tells without downloading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestInfo {
    /// `Docker-Content-Digest`, if the registry sent it.
    pub digest: Option<Digest>,
    /// `Content-Length`, if sent.
    pub size: Option<u64>,
    /// `Content-Type`, if sent.
    pub media_type: Option<MediaType>,
}

/// Options of one blob upload.
#[derive(Clone, Debug, Default)]
pub struct PushBlobOptions {
    /// The blob's digest if known in advance: enables the existence check, cross-repository
    /// mount and a single-request upload, and the upload is refused if the content differs.
    /// Without it the digest is computed while uploading in chunks.
    pub digest: Option<Digest>,
    /// A repository on the same registry that may already hold the blob; it is mounted
    /// instead of uploaded when the registry allows it.
    pub mount_from: Option<Repository>,
}

/// How a blob came to be in the repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// It was already there; nothing was sent.
    AlreadyPresent,
    /// It was mounted from another repository.
    Mounted,
    /// Its content was uploaded.
    Uploaded,
}

/// The result of [`Client::push_blob`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedBlob {
    /// The blob's digest.
    pub digest: Digest,
    /// Its size in bytes, when known (always known after an upload).
    pub size: Option<u64>,
    /// What happened.
    pub outcome: PushOutcome,
}

impl Client {
    /// Makes a client. Certificate and key files named in the options are read now, so a
    /// wrong path fails here rather than at the first request.
    pub fn new(options: RegistryOptions) -> Result<Self, Error> {
        Client::with_clock(options, Arc::new(SystemClock))
    }

    /// Like [`Client::new`], with the clock that decides when cached tokens expire.
    pub fn with_clock(options: RegistryOptions, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        Ok(Client {
            inner: Arc::new(Inner::new(options, clock)?),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }

    /// Checks that `registry` speaks the distribution API (`GET /v2/`), settling the scheme
    /// (HTTPS, or plain HTTP where allowed) and learning its authentication challenge.
    pub async fn ping(&self, registry: &str) -> Result<(), Error> {
        let ep = self.inner.endpoint(registry, Access::Pull)?;
        self.inner.base_url(&ep).await.map(|_| ())
    }

    /// Pings where pulls from `registry` go first (its first mirror, or the host it is mapped
    /// to), so that a build can settle the scheme and challenge while it is still reading its
    /// Dockerfile: the ping is shared by every later request to that endpoint.
    pub async fn ping_pull_source(&self, registry: &str) -> Result<(), Error> {
        let source = self
            .inner
            .options
            .pull_sources(registry)
            .into_iter()
            .next()
            .map(|source| source.registry)
            .unwrap_or_else(|| registry.to_owned());
        self.ping(&source).await
    }

    /// Lists a repository's tags, following `Link` pagination.
    pub async fn list_tags(&self, repo: &Repository) -> Result<Vec<String>, Error> {
        let ep = self.inner.endpoint(repo.registry(), Access::Pull)?;
        let target = repo.to_string();
        let ctx = Ctx {
            target: &target,
            operation: Operation::ListTags,
        };
        let base = self.inner.base_url(&ep).await?;
        let mut url = join(&base, &format!("v2/{}/tags/list", repo.name()), ctx)?;
        if let Some(n) = self.inner.options.tags_page_size {
            url.query_pairs_mut().append_pair("n", &n.to_string());
        }
        let scopes = [pull_scope(repo.name())];
        let mut tags = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            let page_url = url.clone();
            let resp = self
                .inner
                .send(&ep, ctx, &scopes, |http| Some(http.get(page_url.clone())))
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(status_error(resp, ctx).await);
            }
            let next = next_link(resp.headers());
            #[derive(serde::Deserialize)]
            struct TagPage {
                #[serde(default)]
                tags: Option<Vec<String>>,
            }
            let body = read_limited(resp, MANIFEST_LIMIT, ctx).await?;
            let page: TagPage = serde_json::from_slice(&body).map_err(|e| {
                Error::invalid(&target, ctx.operation, format!("tag list is not JSON: {e}"))
            })?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(link) => url = join(&page_url, &link, ctx)?,
                None => return Ok(tags),
            }
        }
        Err(Error::invalid(
            &target,
            ctx.operation,
            format!("more than {MAX_TAG_PAGES} pages of tags"),
        ))
    }

    /// Endpoints and repository names to pull `repo` from: mirrors, then the registry.
    fn pull_sources(&self, repo: &Repository) -> Result<Vec<(Arc<Endpoint>, String)>, Error> {
        self.inner
            .options
            .pull_sources(repo.registry())
            .into_iter()
            .map(|source| {
                let ep = self.inner.endpoint(&source.registry, Access::Pull)?;
                Ok((ep, source.repository(repo.name())))
            })
            .collect()
    }

    async fn url(&self, ep: &Endpoint, path: &str) -> Result<Url, Error> {
        let base = self.inner.base_url(ep).await?;
        join(
            &base,
            path,
            Ctx {
                target: &ep.registry,
                operation: Operation::Ping,
            },
        )
    }
}

fn pull_scope(name: &str) -> String {
    format!("repository:{name}:pull")
}

fn push_scope(name: &str) -> String {
    format!("repository:{name}:push,pull")
}

/// Distribution checks a manifest `DELETE` against the `delete` action of its own (push
/// alone does not allow it), so a token must be asked for with that action.
fn delete_scope(name: &str) -> String {
    format!("repository:{name}:delete")
}

fn join(base: &Url, path: &str, ctx: Ctx<'_>) -> Result<Url, Error> {
    base.join(path)
        .map_err(|e| Error::invalid(ctx.target, ctx.operation, format!("bad URL {path:?}: {e}")))
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v.trim()).ok())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The target of a `Link: <...>; rel="next"` header.
fn next_link(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|link| {
            let (target, params) = link.trim().split_once(';')?;
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
            is_next.then(|| target.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_next_links() {
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            "</v2/app/tags/list?last=b&n=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&headers).as_deref(),
            Some("/v2/app/tags/list?last=b&n=2")
        );
        headers.insert(LINK, "<http://x/other>; rel=\"prev\"".parse().unwrap());
        assert_eq!(next_link(&headers), None);
    }
}
