//! Manifests and indexes: fetch (by tag or verified by digest, through mirrors), `HEAD`,
//! upload and delete. Kept apart from blobs because manifests are small documents read whole and
//! checked against `Docker-Content-Digest`, while blobs are streams.

use std::sync::Arc;

use bytes::Bytes;
use kiln_oci::{Digest, MediaType, Reference};
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;

use super::MANIFEST_LIMIT;
use super::{
    delete_scope, header_digest, header_u64, pull_scope, push_scope, Client, Manifest, ManifestInfo,
};
use crate::error::{Error, Operation};
use crate::options::Access;
use crate::repository::{ManifestRef, Repository};
use crate::transport::{read_limited, status_error, Ctx, Endpoint};

impl Client {
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
        let mut resends = 0;
        loop {
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
            let stored = header_digest(resp.headers())
                .filter(|announced| announced.algorithm() == local.algorithm());
            let Some(stored) = stored.filter(|stored| stored != &local) else {
                return Ok(local);
            };
            // The registry stored other bytes than were sent: they changed on the way. The tag
            // now names that manifest, so it is sent again, and if that never mends it, the
            // stored one is deleted rather than left behind under the tag.
            if resends < self.inner.options.retries {
                let delay = self.inner.backoff(resends);
                let reason = format!(
                    "the registry stored the manifest with digest {stored}, not {local}: its bytes changed on the way"
                );
                self.inner.retry_note(ctx, reason, resends, delay);
                tokio::time::sleep(delay).await;
                resends += 1;
                continue;
            }
            let cleanup = match self.delete_manifest(repo, &stored).await {
                Ok(_) => format!("the manifest {stored} it stored was deleted"),
                Err(e) => format!("the manifest {stored} it stored could not be deleted ({e})"),
            };
            return Err(Error::invalid(
                &target,
                ctx.operation,
                format!(
                    "the registry stored the manifest with digest {stored}, not {local}: its bytes changed on the way, after {resends} retries; {cleanup}"
                ),
            ));
        }
    }

    /// Deletes the manifest `digest` from `repo` (and with it every tag that points to it, as
    /// the distribution API defines): `Ok(true)` when the registry accepted, `Ok(false)` when
    /// it had no such manifest. The API deletes by digest only; a tag is resolved first (see
    /// [`Client::head_manifest`]). A registry that does not allow deletes answers 405
    /// (distribution's default configuration) or 401/403, returned as [`Error::Status`].
    pub async fn delete_manifest(&self, repo: &Repository, digest: &Digest) -> Result<bool, Error> {
        let ep = self.inner.endpoint(repo.registry(), Access::Push)?;
        let target = repo.to_string();
        let ctx = Ctx {
            target: &target,
            operation: Operation::DeleteManifest,
        };
        let url = self
            .url(&ep, &format!("v2/{}/manifests/{digest}", repo.name()))
            .await?;
        let scopes = [delete_scope(repo.name())];
        let resp = self
            .inner
            .send(&ep, ctx, &scopes, |http| Some(http.delete(url.clone())))
            .await?;
        match resp.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(resp, ctx).await),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
