//! The public registry client: one method per distribution API operation.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use kiln_oci::{Digest, Hasher, MediaType, Reference};
use reqwest::header::{
    HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LINK, LOCATION,
};
use reqwest::{Response, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use url::Url;

use crate::blob::{blob_stream, BlobSource, BlobStream, BoxAsyncRead};
use crate::error::{Error, Operation};
use crate::options::{Access, RegistryOptions, UploadMode};
use crate::repository::{ManifestRef, Repository};
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
        Ok(Client {
            inner: Arc::new(Inner::new(options)?),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }

    /// Fetches the manifest a [`Reference`] names: by digest when it has one (verified), by tag
    /// otherwise.
    pub async fn get_manifest_ref(&self, reference: &Reference) -> Result<Manifest, Error> {
        self.get_manifest(
            &Repository::from(reference),
            &reference.manifest_reference(),
        )
        .await
    }

    /// `HEAD` of the manifest a [`Reference`] names.
    pub async fn head_manifest_ref(
        &self,
        reference: &Reference,
    ) -> Result<Option<ManifestInfo>, Error> {
        self.head_manifest(
            &Repository::from(reference),
            &reference.manifest_reference(),
        )
        .await
    }

    /// Uploads a manifest under the reference's tag (or, without a tag, by its digest). If the
    /// reference also pins a digest, the manifest must have that digest.
    pub async fn put_manifest_ref(
        &self,
        reference: &Reference,
        media_type: &MediaType,
        bytes: Bytes,
    ) -> Result<Digest, Error> {
        let repo = Repository::from(reference);
        let target = match (reference.tag(), reference.digest()) {
            (Some(tag), _) => tag.to_owned(),
            (None, Some(digest)) => digest.to_string(),
            (None, None) => kiln_oci::reference::DEFAULT_TAG.to_owned(),
        };
        if let Some(pinned) = reference.digest() {
            let mut hasher = pinned.hasher();
            hasher.update(&bytes);
            let actual = hasher.finish();
            if &actual != pinned {
                return Err(Error::digest_mismatch(
                    &repo.to_string(),
                    Operation::PushManifest,
                    pinned,
                    actual,
                ));
            }
        }
        self.put_manifest(&repo, &target, media_type, bytes).await
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

    /// Fetches a manifest or index by tag or digest, trying mirrors first when configured.
    /// A manifest fetched by digest is verified against it.
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<Manifest, Error> {
        let mref = ManifestRef::parse(reference)?;
        let sources = self.pull_sources(repo)?;
        let mut last = None;
        for (i, (ep, name)) in sources.iter().enumerate() {
            match self.get_manifest_from(ep, name, &mref).await {
                Ok(manifest) => return Ok(manifest),
                Err(err) => {
                    if i + 1 < sources.len() {
                        tracing::warn!(error = %err, "mirror failed, trying the next source");
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.expect("there is always at least one source"))
    }

    async fn get_manifest_from(
        &self,
        ep: &Arc<Endpoint>,
        name: &str,
        mref: &ManifestRef,
    ) -> Result<Manifest, Error> {
        let target = ep.target(name);
        let ctx = Ctx {
            target: &target,
            operation: Operation::PullManifest,
        };
        let url = self.url(ep, &format!("v2/{name}/manifests/{mref}")).await?;
        let scopes = [pull_scope(name)];
        let accept = MediaType::MANIFEST_ACCEPT;
        let resp = self
            .inner
            .send(ep, ctx, &scopes, |http| {
                Some(http.get(url.clone()).header(ACCEPT, accept))
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(resp, ctx).await);
        }
        let headers = resp.headers().clone();
        let bytes = read_limited(resp, MANIFEST_LIMIT, ctx).await?;
        let digest = match mref {
            ManifestRef::Digest(expected) => {
                let mut hasher = expected.hasher();
                hasher.update(&bytes);
                let actual = hasher.finish();
                if &actual != expected {
                    return Err(Error::digest_mismatch(
                        &target,
                        ctx.operation,
                        expected,
                        actual,
                    ));
                }
                actual
            }
            ManifestRef::Tag(_) => {
                let actual = Digest::sha256_of(&bytes);
                if let Some(announced) = header_digest(&headers) {
                    if announced.algorithm() == actual.algorithm() && announced != actual {
                        return Err(Error::digest_mismatch(
                            &target,
                            ctx.operation,
                            &announced,
                            actual,
                        ));
                    }
                }
                actual
            }
        };
        let media_type = content_type(&headers)
            .filter(|t| t != "application/json" && t != "text/plain")
            .map(|t| MediaType::parse(&t))
            .or_else(|| media_type_of_document(&bytes))
            .ok_or_else(|| {
                Error::invalid(&target, ctx.operation, "the manifest has no media type")
            })?;
        if media_type.is_schema1() {
            return Err(Error::invalid(
                &target,
                ctx.operation,
                "the registry only offers a Docker schema 1 manifest, which Kiln cannot use",
            ));
        }
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// `HEAD` of a manifest: `None` if the tag or digest does not exist.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<Option<ManifestInfo>, Error> {
        let mref = ManifestRef::parse(reference)?;
        let ep = self.inner.endpoint(repo.registry(), Access::Pull)?;
        let target = repo.to_string();
        let ctx = Ctx {
            target: &target,
            operation: Operation::Exists,
        };
        let url = self
            .url(&ep, &format!("v2/{}/manifests/{mref}", repo.name()))
            .await?;
        let scopes = [pull_scope(repo.name())];
        let accept = MediaType::MANIFEST_ACCEPT;
        let resp = self
            .inner
            .send(&ep, ctx, &scopes, |http| {
                Some(http.head(url.clone()).header(ACCEPT, accept))
            })
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(Some(ManifestInfo {
                digest: header_digest(resp.headers()),
                size: header_u64(resp.headers(), CONTENT_LENGTH.as_str()),
                media_type: content_type(resp.headers()).map(|t| MediaType::parse(&t)),
            })),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(resp, ctx).await),
        }
    }

    /// Uploads a manifest under a tag (or its digest) and returns its digest, checked against
    /// the `Docker-Content-Digest` the registry answers with.
    pub async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &MediaType,
        bytes: Bytes,
    ) -> Result<Digest, Error> {
        let mref = ManifestRef::parse(reference)?;
        let target = repo.to_string();
        let ctx = Ctx {
            target: &target,
            operation: Operation::PushManifest,
        };
        let local = match &mref {
            ManifestRef::Digest(d) => {
                let mut hasher = d.hasher();
                hasher.update(&bytes);
                let actual = hasher.finish();
                if &actual != d {
                    return Err(Error::digest_mismatch(&target, ctx.operation, d, actual));
                }
                actual
            }
            ManifestRef::Tag(_) => Digest::sha256_of(&bytes),
        };
        let ep = self.inner.endpoint(repo.registry(), Access::Push)?;
        let url = self
            .url(&ep, &format!("v2/{}/manifests/{mref}", repo.name()))
            .await?;
        let scopes = [push_scope(repo.name())];
        let resp = self
            .inner
            .send(&ep, ctx, &scopes, |http| {
                Some(
                    http.put(url.clone())
                        .header(CONTENT_TYPE, media_type.as_str())
                        .body(bytes.clone()),
                )
            })
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(resp, ctx).await);
        }
        if let Some(announced) = header_digest(resp.headers()) {
            if announced.algorithm() == local.algorithm() && announced != local {
                return Err(Error::digest_mismatch(
                    &target,
                    ctx.operation,
                    &local,
                    announced,
                ));
            }
        }
        Ok(local)
    }

    /// Starts downloading a blob. The returned stream checks the digest as it goes and ends
    /// with an error if the content does not match. Counts against the transfer limit until
    /// the stream is dropped.
    pub async fn get_blob(&self, repo: &Repository, digest: &Digest) -> Result<BlobStream, Error> {
        let permit = self.inner.transfer_permit().await;
        let sources = self.pull_sources(repo)?;
        let mut last = None;
        for (i, (ep, name)) in sources.iter().enumerate() {
            let target = ep.target(name);
            let ctx = Ctx {
                target: &target,
                operation: Operation::PullBlob,
            };
            let attempt = async {
                let url = self.url(ep, &format!("v2/{name}/blobs/{digest}")).await?;
                let scopes = vec![pull_scope(name)];
                let resp = self
                    .inner
                    .send(ep, ctx, &scopes, |http| Some(http.get(url.clone())))
                    .await?;
                if resp.status() != StatusCode::OK {
                    return Err(status_error(resp, ctx).await);
                }
                Ok((url, scopes, resp))
            };
            match attempt.await {
                Ok((url, scopes, resp)) => {
                    return Ok(blob_stream(
                        self.inner.clone(),
                        ep.clone(),
                        url,
                        scopes,
                        target.clone(),
                        digest.clone(),
                        resp,
                        permit,
                    ))
                }
                Err(err) => {
                    if i + 1 < sources.len() {
                        tracing::warn!(error = %err, "mirror failed, trying the next source");
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.expect("there is always at least one source"))
    }

    /// Downloads a blob into `writer`, verifying its digest, and returns its size. On error
    /// the writer holds a partial, unverified prefix that must be discarded.
    pub async fn pull_blob_to<W: AsyncWrite + Unpin>(
        &self,
        repo: &Repository,
        digest: &Digest,
        writer: &mut W,
    ) -> Result<u64, Error> {
        let mut stream = self.get_blob(repo, digest).await?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            writer.write_all(&chunk).await.map_err(|e| Error::Io {
                target: repo.to_string(),
                operation: Operation::PullBlob,
                message: format!("writing {digest}"),
                source: e,
            })?;
            written += chunk.len() as u64;
        }
        writer.flush().await.map_err(|e| Error::Io {
            target: repo.to_string(),
            operation: Operation::PullBlob,
            message: format!("writing {digest}"),
            source: e,
        })?;
        Ok(written)
    }

    /// `HEAD` of a blob: its size if the repository has it, `None` if not.
    pub async fn blob_exists(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, Error> {
        let ep = self.inner.endpoint(repo.registry(), Access::Pull)?;
        self.blob_exists_on(&ep, repo.name(), digest, &pull_scope(repo.name()))
            .await
    }

    async fn blob_exists_on(
        &self,
        ep: &Arc<Endpoint>,
        name: &str,
        digest: &Digest,
        scope: &str,
    ) -> Result<Option<u64>, Error> {
        let target = ep.target(name);
        let ctx = Ctx {
            target: &target,
            operation: Operation::Exists,
        };
        let url = self.url(ep, &format!("v2/{name}/blobs/{digest}")).await?;
        let scopes = [scope.to_owned()];
        let resp = self
            .inner
            .send(ep, ctx, &scopes, |http| Some(http.head(url.clone())))
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(Some(
                header_u64(resp.headers(), CONTENT_LENGTH.as_str()).unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(resp, ctx).await),
        }
    }

    /// Asks the registry to link a blob from `from` (same registry) into `repo` without
    /// uploading it. Returns `false` if the registry declined (then nothing was changed).
    pub async fn mount_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        from: &Repository,
    ) -> Result<bool, Error> {
        if from.registry() != repo.registry() {
            return Err(Error::InvalidArgument(format!(
                "cannot mount {digest} from {from} into {repo}: different registries"
            )));
        }
        let ep = self.inner.endpoint(repo.registry(), Access::Push)?;
        let target = repo.to_string();
        match self
            .start_upload(&ep, repo.name(), &target, Some((digest, from.name())))
            .await?
        {
            Started::Mounted => Ok(true),
            Started::Session(location) => {
                self.cancel_upload(&ep, repo.name(), &target, &location)
                    .await;
                Ok(false)
            }
        }
    }

    /// Uploads a blob unless the repository already has it: checks existence, tries a
    /// cross-repository mount, then uploads in one `PUT` (digest and size known) or in chunks.
    /// A chunk that fails is re-sent; an upload that fails otherwise is restarted from the
    /// beginning if the source can be reopened. A mount or upload counts against the transfer
    /// limit; the existence check does not, so a push of blobs that are all there already
    /// (a fully cached rebuild) asks about every one of them at once.
    pub async fn push_blob(
        &self,
        repo: &Repository,
        source: &dyn BlobSource,
        options: &PushBlobOptions,
    ) -> Result<PushedBlob, Error> {
        let ep = self.inner.endpoint(repo.registry(), Access::Push)?;
        let name = repo.name();
        let target = repo.to_string();
        let ctx = Ctx {
            target: &target,
            operation: Operation::Push,
        };
        if let Some(digest) = &options.digest {
            if let Some(size) = self
                .blob_exists_on(&ep, name, digest, &push_scope(name))
                .await?
            {
                return Ok(PushedBlob {
                    digest: digest.clone(),
                    size: Some(size),
                    outcome: PushOutcome::AlreadyPresent,
                });
            }
        }
        let _permit = self.inner.transfer_permit().await;
        let mount = match (&options.digest, &options.mount_from) {
            (Some(digest), Some(from)) if from.registry() == repo.registry() => {
                Some((digest, from.name()))
            }
            _ => None,
        };
        let mut restarts = 0;
        let mut last_error: Option<Error> = None;
        loop {
            let mount_now = if restarts == 0 { mount } else { None };
            let location = match self.start_upload(&ep, name, &target, mount_now).await? {
                Started::Mounted => {
                    return Ok(PushedBlob {
                        digest: options.digest.clone().expect("mounts need a digest"),
                        size: source.size(),
                        outcome: PushOutcome::Mounted,
                    })
                }
                Started::Session(location) => location,
            };
            let reader = match source.open().await {
                Ok(Some(reader)) => reader,
                Ok(None) => {
                    self.cancel_upload(&ep, name, &target, &location).await;
                    return Err(last_error.unwrap_or_else(|| {
                        Error::invalid(
                            &target,
                            ctx.operation,
                            "the blob source was already consumed",
                        )
                    }));
                }
                Err(e) => {
                    self.cancel_upload(&ep, name, &target, &location).await;
                    return Err(Error::Io {
                        target: target.clone(),
                        operation: ctx.operation,
                        message: "opening the content to upload".to_owned(),
                        source: e,
                    });
                }
            };
            let monolithic = self.inner.options.upload_mode == UploadMode::Auto
                && options.digest.is_some()
                && source.size().is_some();
            let result = if monolithic {
                let digest = options.digest.as_ref().expect("checked above");
                let size = source.size().expect("checked above");
                self.upload_monolithic(&ep, ctx, name, location.clone(), reader, digest, size)
                    .await
            } else {
                self.upload_chunked(
                    &ep,
                    ctx,
                    name,
                    location.clone(),
                    reader,
                    options.digest.as_ref(),
                )
                .await
            };
            match result {
                Ok((digest, size)) => {
                    return Ok(PushedBlob {
                        digest,
                        size: Some(size),
                        outcome: PushOutcome::Uploaded,
                    })
                }
                Err(err) => {
                    self.cancel_upload(&ep, name, &target, &location).await;
                    if !err.is_retryable() || restarts >= self.inner.options.retries {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "upload failed, restarting it");
                    tokio::time::sleep(self.inner.backoff(restarts)).await;
                    restarts += 1;
                    last_error = Some(err);
                }
            }
        }
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

    /// `POST /v2/NAME/blobs/uploads/`, with a mount request when `mount` is given.
    async fn start_upload(
        &self,
        ep: &Arc<Endpoint>,
        name: &str,
        target: &str,
        mount: Option<(&Digest, &str)>,
    ) -> Result<Started, Error> {
        let operation = if mount.is_some() {
            Operation::Mount
        } else {
            Operation::Push
        };
        let ctx = Ctx { target, operation };
        let mut url = self.url(ep, &format!("v2/{name}/blobs/uploads/")).await?;
        let mut scopes = vec![push_scope(name)];
        if let Some((digest, from)) = mount {
            url.query_pairs_mut()
                .append_pair("mount", &digest.to_string())
                .append_pair("from", from);
            scopes.push(pull_scope(from));
        }
        let resp = self
            .inner
            .send(ep, ctx, &scopes, |http| {
                Some(http.post(url.clone()).header(CONTENT_LENGTH, 0))
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(Started::Mounted),
            StatusCode::ACCEPTED => Ok(Started::Session(location_of(&resp, &url, ctx)?)),
            _ => Err(status_error(resp, ctx).await),
        }
    }

    /// Abandons an upload session; failures are only logged, as the registry expires
    /// abandoned sessions on its own.
    async fn cancel_upload(&self, ep: &Arc<Endpoint>, name: &str, target: &str, location: &Url) {
        let ctx = Ctx {
            target,
            operation: Operation::Push,
        };
        let scopes = [push_scope(name)];
        match self
            .inner
            .send(ep, ctx, &scopes, |http| Some(http.delete(location.clone())))
            .await
        {
            Ok(resp) if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND => {}
            Ok(resp) => tracing::debug!(status = %resp.status(), "cancelling upload"),
            Err(err) => tracing::debug!(error = %err, "cancelling upload"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_monolithic(
        &self,
        ep: &Arc<Endpoint>,
        ctx: Ctx<'_>,
        name: &str,
        location: Url,
        reader: BoxAsyncRead,
        digest: &Digest,
        size: u64,
    ) -> Result<(Digest, u64), Error> {
        let mut url = location;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let local_failure: Arc<Mutex<Option<Error>>> = Arc::default();
        let body = verified_body(
            reader,
            digest.clone(),
            size,
            ctx.target.to_owned(),
            local_failure.clone(),
        );
        let mut body = Some(body);
        let scopes = [push_scope(name)];
        let sent = self
            .inner
            .send(ep, ctx, &scopes, |http| {
                body.take().map(|b| {
                    http.put(url.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, size)
                        .body(b)
                })
            })
            .await;
        if let Some(local) = local_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(local);
        }
        let resp = sent?;
        self.finish_upload(resp, ctx, digest).await?;
        Ok((digest.clone(), size))
    }

    async fn upload_chunked(
        &self,
        ep: &Arc<Endpoint>,
        ctx: Ctx<'_>,
        name: &str,
        mut location: Url,
        mut reader: BoxAsyncRead,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), Error> {
        let chunk_size = self.inner.options.chunk_size.max(1);
        let mut hasher = expected.map_or_else(Hasher::sha256, Digest::hasher);
        let mut offset = 0u64;
        loop {
            let mut chunk = vec![0u8; chunk_size];
            let mut filled = 0;
            while filled < chunk_size {
                let n = reader
                    .read(&mut chunk[filled..])
                    .await
                    .map_err(|e| Error::Io {
                        target: ctx.target.to_owned(),
                        operation: ctx.operation,
                        message: format!("reading the content at byte {}", offset + filled as u64),
                        source: e,
                    })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            chunk.truncate(filled);
            let chunk = Bytes::from(chunk);
            hasher.update(&chunk);
            location = self
                .patch_chunk(ep, ctx, name, location, offset, chunk)
                .await?;
            offset += filled as u64;
            if filled < chunk_size {
                break;
            }
        }
        let digest = hasher.finish();
        if let Some(expected) = expected {
            if &digest != expected {
                return Err(Error::digest_mismatch(
                    ctx.target,
                    ctx.operation,
                    expected,
                    digest,
                ));
            }
        }
        let mut url = location;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let scopes = [push_scope(name)];
        let resp = self
            .inner
            .send(ep, ctx, &scopes, |http| {
                Some(http.put(url.clone()).header(CONTENT_LENGTH, 0))
            })
            .await?;
        self.finish_upload(resp, ctx, &digest).await?;
        Ok((digest, offset))
    }

    /// Sends one chunk. If the registry reports a range conflict (an earlier try of this
    /// chunk partly arrived), asks where the upload stands and sends only the rest.
    async fn patch_chunk(
        &self,
        ep: &Arc<Endpoint>,
        ctx: Ctx<'_>,
        name: &str,
        mut location: Url,
        offset: u64,
        chunk: Bytes,
    ) -> Result<Url, Error> {
        let scopes = [push_scope(name)];
        let end = offset + chunk.len() as u64;
        let mut sent_from = 0usize;
        for _ in 0..=self.inner.options.retries + 1 {
            let part = chunk.slice(sent_from..);
            let range = format!("{}-{}", offset + sent_from as u64, end - 1);
            let url = location.clone();
            let resp = self
                .inner
                .send(ep, ctx, &scopes, |http| {
                    Some(
                        http.patch(url.clone())
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_RANGE, range.clone())
                            .header(CONTENT_LENGTH, part.len())
                            .body(part.clone()),
                    )
                })
                .await?;
            match resp.status() {
                StatusCode::ACCEPTED => return location_of(&resp, &url, ctx),
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    let (committed, status_location) =
                        self.upload_status(ep, ctx, name, &location).await?;
                    if committed < offset || committed > end {
                        return Err(Error::invalid(
                            ctx.target,
                            ctx.operation,
                            format!(
                                "upload holds {committed} bytes while sending bytes {offset}..{end}"
                            ),
                        ));
                    }
                    location = status_location;
                    if committed == end {
                        return Ok(location);
                    }
                    sent_from = (committed - offset) as usize;
                }
                _ => return Err(status_error(resp, ctx).await),
            }
        }
        Err(Error::invalid(
            ctx.target,
            ctx.operation,
            format!("the registry kept refusing the range of bytes {offset}..{end}"),
        ))
    }

    /// `GET` on an upload session: how many bytes it holds, and its next location.
    async fn upload_status(
        &self,
        ep: &Arc<Endpoint>,
        ctx: Ctx<'_>,
        name: &str,
        location: &Url,
    ) -> Result<(u64, Url), Error> {
        let scopes = [push_scope(name)];
        let resp = self
            .inner
            .send(ep, ctx, &scopes, |http| Some(http.get(location.clone())))
            .await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(status_error(resp, ctx).await);
        }
        let committed = resp
            .headers()
            .get(reqwest::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start_matches("bytes=").split_once('-'))
            .and_then(|(_, last)| last.parse::<i64>().ok())
            .map_or(0, |last| (last + 1).max(0) as u64);
        let next = location_of(&resp, location, ctx).unwrap_or_else(|_| location.clone());
        Ok((committed, next))
    }

    async fn finish_upload(
        &self,
        resp: Response,
        ctx: Ctx<'_>,
        digest: &Digest,
    ) -> Result<(), Error> {
        if !resp.status().is_success() {
            return Err(status_error(resp, ctx).await);
        }
        if let Some(announced) = header_digest(resp.headers()) {
            if announced.algorithm() == digest.algorithm() && &announced != digest {
                return Err(Error::digest_mismatch(
                    ctx.target,
                    ctx.operation,
                    digest,
                    announced,
                ));
            }
        }
        Ok(())
    }
}

enum Started {
    Mounted,
    Session(Url),
}

/// A request body that streams `reader`, and fails the request (recording why in `failure`)
/// if the content is not `size` bytes with digest `digest`, so the registry never commits it.
fn verified_body(
    reader: BoxAsyncRead,
    digest: Digest,
    size: u64,
    target: String,
    failure: Arc<Mutex<Option<Error>>>,
) -> reqwest::Body {
    struct State {
        reader: tokio_util::io::ReaderStream<BoxAsyncRead>,
        hasher: Option<Hasher>,
        digest: Digest,
        size: u64,
        target: String,
        failure: Arc<Mutex<Option<Error>>>,
    }
    let state = State {
        reader: tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024),
        hasher: Some(digest.hasher()),
        digest,
        size,
        target,
        failure,
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let fail = |state: &State, err: Error| {
            let message = err.to_string();
            *state.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
            std::io::Error::other(message)
        };
        match state.reader.next().await {
            Some(Ok(chunk)) => {
                let hasher = state.hasher.as_mut()?;
                hasher.update(&chunk);
                // Check with the last chunk still in hand: once the announced length is sent
                // the request may complete without polling the body again.
                if hasher.len() == state.size {
                    let actual = hasher.clone().finish();
                    if actual != state.digest {
                        let err = Error::digest_mismatch(
                            &state.target,
                            Operation::Push,
                            &state.digest,
                            actual,
                        );
                        let io = fail(&state, err);
                        state.hasher = None;
                        return Some((Err(io), state));
                    }
                }
                if hasher.len() > state.size {
                    let err = Error::invalid(
                        &state.target,
                        Operation::Push,
                        format!(
                            "the content is longer than the announced {} bytes",
                            state.size
                        ),
                    );
                    let io = fail(&state, err);
                    state.hasher = None;
                    return Some((Err(io), state));
                }
                Some((Ok(chunk), state))
            }
            Some(Err(e)) => {
                let err = Error::Io {
                    target: state.target.clone(),
                    operation: Operation::Push,
                    message: "reading the content to upload".to_owned(),
                    source: e,
                };
                let io = fail(&state, err);
                state.hasher = None;
                Some((Err(io), state))
            }
            None => {
                let hasher = state.hasher.take()?;
                let len = hasher.len();
                let actual = hasher.finish();
                let err = if len != state.size {
                    Error::invalid(
                        &state.target,
                        Operation::Push,
                        format!(
                            "the content has {len} bytes, not the announced {}",
                            state.size
                        ),
                    )
                } else if actual != state.digest {
                    Error::digest_mismatch(&state.target, Operation::Push, &state.digest, actual)
                } else {
                    return None;
                };
                let io = fail(&state, err);
                Some((Err(io), state))
            }
        }
    });
    reqwest::Body::wrap_stream(stream)
}

fn pull_scope(name: &str) -> String {
    format!("repository:{name}:pull")
}

fn push_scope(name: &str) -> String {
    format!("repository:{name}:push,pull")
}

fn join(base: &Url, path: &str, ctx: Ctx<'_>) -> Result<Url, Error> {
    base.join(path)
        .map_err(|e| Error::invalid(ctx.target, ctx.operation, format!("bad URL {path:?}: {e}")))
}

fn location_of(resp: &Response, request_url: &Url, ctx: Ctx<'_>) -> Result<Url, Error> {
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::invalid(ctx.target, ctx.operation, "no Location header"))?;
    let mut url = join(request_url, location, ctx)?;
    // A registry behind a TLS-terminating proxy sees plain HTTP and writes `http://` into
    // absolute Locations on its own host. Following that would downgrade the session (and
    // fail on the TLS port), so keep the scheme and port the request used.
    if request_url.scheme() == "https" && url.scheme() == "http" && url.host() == request_url.host()
    {
        let port = url.port().or(request_url.port());
        if url.set_scheme("https").is_ok() {
            let _ = url.set_port(port);
        }
    }
    Ok(url)
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

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The `mediaType` a manifest declares, or its kind guessed from its shape, for registries
/// that serve manifests as `application/json`.
fn media_type_of_document(bytes: &[u8]) -> Option<MediaType> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        layers: Option<serde_json::Value>,
    }
    let shape: Shape = serde_json::from_slice(bytes).ok()?;
    shape
        .media_type
        .filter(|t| !t.is_empty())
        .map(|t| MediaType::parse(&t))
        .or_else(|| {
            if shape.manifests.is_some() {
                Some(MediaType::OciIndex)
            } else if shape.layers.is_some() {
                Some(MediaType::OciManifest)
            } else {
                None
            }
        })
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

    #[test]
    fn https_sessions_are_not_downgraded_by_absolute_locations() {
        let ctx = Ctx {
            target: "r",
            operation: Operation::Push,
        };
        let answer = |location: &str| {
            let resp = http::Response::builder()
                .status(202)
                .header(LOCATION, location)
                .body(Vec::<u8>::new())
                .unwrap();
            Response::from(resp)
        };
        let request = Url::parse("https://reg.example:5443/v2/a/blobs/uploads/").unwrap();
        let same_host = location_of(
            &answer("http://reg.example:5443/v2/a/blobs/uploads/u?x=1"),
            &request,
            ctx,
        )
        .unwrap();
        assert_eq!(
            same_host.as_str(),
            "https://reg.example:5443/v2/a/blobs/uploads/u?x=1"
        );
        let no_port = location_of(&answer("http://reg.example/v2/a/u"), &request, ctx).unwrap();
        assert_eq!(no_port.as_str(), "https://reg.example:5443/v2/a/u");
        let relative = location_of(&answer("/v2/a/u"), &request, ctx).unwrap();
        assert_eq!(relative.as_str(), "https://reg.example:5443/v2/a/u");
        let elsewhere = location_of(&answer("http://storage.example/x"), &request, ctx).unwrap();
        assert_eq!(elsewhere.as_str(), "http://storage.example/x");
    }

    #[test]
    fn media_type_from_document_shape() {
        assert_eq!(
            media_type_of_document(br#"{"schemaVersion":2,"manifests":[]}"#),
            Some(MediaType::OciIndex)
        );
        assert_eq!(
            media_type_of_document(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            Some(MediaType::DockerManifest)
        );
        assert_eq!(media_type_of_document(b"[]"), None);
    }
}
