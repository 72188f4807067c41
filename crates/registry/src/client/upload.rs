//! Blob uploads: existence check, cross-repository mount, monolithic `PUT` or chunked
//! `PATCH`es with range recovery, and restarts. The upload session protocol is the largest
//! part of the client, so it lives on its own.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use kiln_oci::{Digest, Hasher};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Response, StatusCode};
use tokio::io::AsyncReadExt as _;
use url::Url;

use super::{
    header_digest, join, pull_scope, push_scope, Client, PushBlobOptions, PushOutcome, PushedBlob,
};
use crate::blob::{BlobSource, BoxAsyncRead};
use crate::error::{Error, Operation};
use crate::options::{Access, UploadMode};
use crate::repository::Repository;
use crate::transport::{status_error, Ctx, Endpoint};

impl Client {
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
        // A token can expire while a body goes out; the body is gone by the time the 401
        // arrives, so the upload starts over once with a fresh token.
        let mut restarted_for_auth = false;
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
                    let expired = is_unauthorized(&err) && !restarted_for_auth;
                    let worth_restarting =
                        err.is_retryable() || changed_on_the_way(&err) || expired;
                    if !worth_restarting || restarts >= self.inner.options.retries {
                        return Err(err);
                    }
                    restarted_for_auth |= expired;
                    let delay = self.inner.backoff(restarts);
                    let reason = format!("the upload failed ({err}); starting it over");
                    self.inner.retry_note(ctx, reason, restarts, delay);
                    tokio::time::sleep(delay).await;
                    restarts += 1;
                    last_error = Some(err);
                }
            }
        }
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

/// Whether the registry refused an upload because what arrived does not hash to the digest
/// it was announced with: the bytes changed on the way, and sending them again can mend it.
fn changed_on_the_way(err: &Error) -> bool {
    matches!(err, Error::Status { status, body: Some(body), .. }
        if *status == StatusCode::BAD_REQUEST && body.code == "DIGEST_INVALID")
}

fn is_unauthorized(err: &Error) -> bool {
    matches!(err, Error::Status { status, .. } if *status == StatusCode::UNAUTHORIZED)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
