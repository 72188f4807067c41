//! Blob downloads and existence checks. A download is a stream verified against its digest
//! as it goes; uploads, which need sessions, chunking and restarts, are in `upload`.

use std::sync::Arc;

use futures::StreamExt as _;
use kiln_oci::Digest;
use reqwest::header::CONTENT_LENGTH;
use reqwest::StatusCode;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use super::{header_u64, pull_scope, Client};
use crate::blob::{blob_stream, BlobStream};
use crate::error::{Error, Operation};
use crate::options::Access;
use crate::repository::Repository;
use crate::transport::{status_error, Ctx, Endpoint};

impl Client {
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

    pub(super) async fn blob_exists_on(
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
}
