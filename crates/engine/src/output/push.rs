//! Pushing the image to its destinations: every layer as soon as it exists (pipelined, while
//! later steps run), then config and manifest once the build has succeeded.

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::try_join_all;
use kiln_fs::blobstore::BlobStore;
use kiln_oci::{Digest, Reference};
use kiln_registry::{BytesSource, Client, FileSource, PushBlobOptions, Repository};

use crate::base::ImageLayer;
use crate::cancel::Cancel;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};

use super::assemble::Image;
use super::ensure_local;

/// How [`push`] goes about each destination.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushPolicy<'a> {
    /// Send the manifest first, and the blobs only if it is refused: for an image made wholly
    /// of cache hits, whose blobs an identical earlier build most likely pushed.
    pub manifest_first: bool,
    /// Skip, with a warning, a destination whose immutable tag already exists
    /// ([`OutputOptions::ignore_immutable_tags`](crate::OutputOptions::ignore_immutable_tags)).
    pub ignore_immutable_tags: bool,
    /// Stops the push: uploads are dropped and no manifest is sent once it is cancelled
    /// (checked right before each manifest PUT).
    pub cancel: Option<&'a Cancel>,
}

/// Pushes the image to every destination: layers and config concurrently (skipping blobs the
/// repository has, mounting base layers from their repository on the same registry, and not
/// asking again about the blobs in `placed`), then the manifest under the destination's tag.
pub async fn push(
    client: &Client,
    blobs: &BlobStore,
    image: &Image,
    destinations: &[Reference],
    placed: &PlacedBlobs,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
    policy: PushPolicy<'_>,
) -> Result<Digest, BuildError> {
    let never = Cancel::new();
    let cancel = policy.cancel.unwrap_or(&never);
    let immutable =
        |err: &kiln_registry::Error| policy.ignore_immutable_tags && err.is_immutable_tag();
    'destinations: for destination in destinations {
        let repo = Repository::new(destination.registry(), destination.repository())?;
        let reference = destination.tag().unwrap_or("latest").to_owned();
        // Checked right before each PUT: once a manifest is sent the tag may move, so a
        // cancellation must be seen before, never after, that point.
        let put_manifest = || async {
            cancel.check()?;
            client
                .put_manifest(
                    &repo,
                    &reference,
                    &image.manifest.media_type,
                    Bytes::from(image.manifest.bytes.clone()),
                )
                .await
                .map_err(BuildError::from)
        };
        // The registry checks that every blob the manifest names is in the repository and
        // refuses the manifest otherwise, so trying it first is safe: when it is refused the
        // blobs are put in place below and it is sent again.
        let accepted = if policy.manifest_first {
            match put_manifest().await {
                Ok(pushed) => Some(pushed),
                Err(BuildError::Registry(err)) if immutable(&err) => {
                    skip_immutable(destination, &err, emit);
                    continue 'destinations;
                }
                Err(BuildError::Registry(err))
                    if err.status().is_some() && !err.is_immutable_tag() =>
                {
                    None
                }
                Err(err) => return Err(err),
            }
        } else {
            None
        };
        let pushed = match accepted {
            Some(pushed) => pushed,
            None => {
                let uploads = image
                    .layers
                    .iter()
                    .filter(|layer| !placed.contains(destination, &layer.descriptor.digest))
                    .map(|layer| push_layer(client, blobs, &repo, destination, layer, emit));
                let config_options = PushBlobOptions {
                    digest: Some(image.config.digest.clone()),
                    mount_from: None,
                };
                let config_source = BytesSource(Bytes::from(image.config.bytes.clone()));
                let config_upload = async {
                    client
                        .push_blob(&repo, &config_source, &config_options)
                        .await
                        .map_err(BuildError::from)
                };
                let blobs_placed = futures::future::try_join(try_join_all(uploads), config_upload);
                cancel.guard(blobs_placed).await??;
                match put_manifest().await {
                    Ok(pushed) => pushed,
                    Err(BuildError::Registry(err)) if immutable(&err) => {
                        skip_immutable(destination, &err, emit);
                        continue 'destinations;
                    }
                    Err(err) => return Err(err),
                }
            }
        };
        emit(BuildEvent::Pushed {
            destination: destination.to_string(),
            digest: pushed,
        });
    }
    Ok(image.manifest.digest.clone())
}

/// Says that `destination` kept its tag: the registry would not move it, and the build was
/// told to accept that.
fn skip_immutable(
    destination: &Reference,
    err: &kiln_registry::Error,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
) {
    emit(BuildEvent::Warning {
        message: format!(
            "{destination} not pushed: the tag is immutable and exists already, so it still \
             names the image it named before (--push-ignore-immutable-tag-errors): {err}"
        ),
    });
}

/// Blobs already in a destination repository, put there by [`PushAhead`] during the build:
/// the final [`push`] does not ask the registry about them again.
#[derive(Debug, Default)]
pub struct PlacedBlobs(HashSet<(String, Digest)>);

impl PlacedBlobs {
    /// Whether `digest` is known to be in `destination`'s repository.
    pub fn contains(&self, destination: &Reference, digest: &Digest) -> bool {
        self.0
            .contains(&(repository_of(destination), digest.clone()))
    }

    fn insert(&mut self, destination: &Reference, digest: Digest) {
        self.0.insert((repository_of(destination), digest));
    }
}

fn repository_of(destination: &Reference) -> String {
    format!("{}/{}", destination.registry(), destination.repository())
}

/// Uploads one layer blob to `repo` unless it is there already, mounting it from the
/// repository it came from when that is on the same registry.
async fn push_layer(
    client: &Client,
    blobs: &BlobStore,
    repo: &Repository,
    destination: &Reference,
    layer: &ImageLayer,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
) -> Result<(), BuildError> {
    let mount_from = layer
        .origin
        .clone()
        .filter(|origin| origin.registry() == repo.registry() && origin.name() != repo.name());
    let options = PushBlobOptions {
        digest: Some(layer.descriptor.digest.clone()),
        mount_from,
    };
    // A layer taken from the cache or from a base image that was never pulled may exist only
    // in a registry: the destination may have it already or mount it. Only when neither works
    // is it downloaded here and uploaded.
    let pushed_without_local_copy = !blobs.contains(&layer.descriptor.digest)
        && client
            .push_blob(repo, &NotLocal(layer.descriptor.size), &options)
            .await
            .is_ok();
    if !pushed_without_local_copy {
        ensure_local(client, blobs, std::slice::from_ref(layer)).await?;
        let path = blobs.blob_path(&layer.descriptor.digest);
        let source = FileSource::new(path.clone())
            .await
            .map_err(|source| BuildError::Io { path, source })?;
        client.push_blob(repo, &source, &options).await?;
    }
    emit(BuildEvent::PushProgress {
        destination: destination.to_string(),
        digest: layer.descriptor.digest.clone(),
        done: layer.descriptor.size,
        total: layer.descriptor.size,
    });
    Ok(())
}

/// Stands for a blob that is not in the blob store: opening it fails, so a push with it
/// succeeds only when the repository has the blob or can mount it.
struct NotLocal(u64);

impl kiln_registry::BlobSource for NotLocal {
    fn open(
        &self,
    ) -> futures::future::BoxFuture<'_, std::io::Result<Option<kiln_registry::BoxAsyncRead>>> {
        Box::pin(async {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "blob not in the local blob store",
            ))
        })
    }

    fn size(&self) -> Option<u64> {
        Some(self.0)
    }
}

/// Pipelined push: layers of the final image start uploading to every destination as soon as
/// they exist, while later steps run, so the push at the end only finds them there (one HEAD
/// each) and writes config and manifest. Nothing is tagged until the build has succeeded; when a
/// build fails, uploads still running are cancelled (see the README for what that leaves).
pub struct PushAhead {
    client: Client,
    blobs: BlobStore,
    destinations: Vec<(Reference, Repository)>,
    events: EventSink,
    runtime: tokio::runtime::Handle,
    tasks: Mutex<PushAheadTasks>,
}

/// The uploads [`PushAhead`] has started.
type PushAheadTasks = Vec<Upload>;

/// One blob on its way to one destination.
struct Upload {
    destination: Reference,
    repo: Repository,
    digest: Digest,
    /// `Some(true)` once the blob is in `repo`, `Some(false)` if the upload failed.
    done: tokio::sync::watch::Receiver<Option<bool>>,
    task: tokio::task::JoinHandle<Result<(), BuildError>>,
}

impl PushAhead {
    /// A pipelined pusher to `destinations`, spawning uploads on `runtime`.
    pub fn new(
        client: Client,
        blobs: BlobStore,
        destinations: &[Reference],
        events: EventSink,
        runtime: tokio::runtime::Handle,
    ) -> Result<PushAhead, BuildError> {
        let destinations = destinations
            .iter()
            .map(|d| Ok((d.clone(), Repository::new(d.registry(), d.repository())?)))
            .collect::<Result<Vec<_>, BuildError>>()?;
        Ok(PushAhead {
            client,
            blobs,
            destinations,
            events,
            runtime,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Starts uploading `layer` to every destination, unless it is already on its way there.
    pub fn start(&self, layer: &ImageLayer) {
        let mut tasks = self.tasks.lock().expect("push-ahead tasks");
        for (destination, repo) in &self.destinations {
            let digest = &layer.descriptor.digest;
            if (tasks.iter()).any(|u| u.destination == *destination && u.digest == *digest) {
                continue;
            }
            let (client, blobs, events) =
                (self.client.clone(), self.blobs.clone(), self.events.clone());
            let (task_destination, task_repo, layer) =
                (destination.clone(), repo.clone(), layer.clone());
            let (finished, done) = tokio::sync::watch::channel(None);
            let task = self.runtime.spawn(async move {
                let pushed = push_layer(
                    &client,
                    &blobs,
                    &task_repo,
                    &task_destination,
                    &layer,
                    &*events,
                )
                .await;
                let _ = finished.send(Some(pushed.is_ok()));
                pushed
            });
            tasks.push(Upload {
                destination: destination.clone(),
                repo: repo.clone(),
                digest: digest.clone(),
                done,
                task,
            });
        }
    }

    /// An upload of `digest` started to a destination on `registry`: the repository it goes
    /// to, and a signal that turns `Some(true)` once the blob is there (`Some(false)` if the
    /// upload failed). The layer cache mounts the blob from there instead of uploading it
    /// a second time.
    pub fn upload_on(
        &self,
        registry: &str,
        digest: &Digest,
    ) -> Option<(Repository, tokio::sync::watch::Receiver<Option<bool>>)> {
        let tasks = self.tasks.lock().expect("push-ahead tasks");
        tasks
            .iter()
            .find(|u| u.digest == *digest && u.repo.registry() == registry)
            .map(|u| (u.repo.clone(), u.done.clone()))
    }

    /// Waits for every upload started so far; the first failure is the result, and otherwise
    /// the blobs now in place.
    pub async fn finish(&self) -> Result<PlacedBlobs, BuildError> {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("push-ahead tasks"));
        let mut first_error = None;
        let mut placed = PlacedBlobs::default();
        for Upload {
            destination,
            digest,
            task,
            ..
        } in tasks
        {
            let outcome = task
                .await
                .map_err(|e| BuildError::image("a layer upload", format!("panicked: {e}")))
                .and_then(|result| result);
            match outcome {
                Ok(()) => placed.insert(&destination, digest),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(placed), Err)
    }
}

impl Drop for PushAhead {
    fn drop(&mut self) {
        // A build that ends without `finish` failed: its uploads are of no use to anyone.
        for upload in self.tasks.get_mut().expect("push-ahead tasks").drain(..) {
            upload.task.abort();
        }
    }
}
