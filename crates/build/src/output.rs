//! The finished image: its config and manifest, and where it goes — registry destinations,
//! an OCI layout, a docker-archive, and the digest files kaniko writes. Local files are written
//! under a temporary name and renamed, and digest files only after every push succeeded, so a
//! failed build leaves nothing half-written behind.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::try_join_all;
use kiln_fs::blobstore::BlobStore;
use kiln_oci::archive::{ArchiveLayer, DockerArchiveWriter};
use kiln_oci::image::{rfc3339_utc, History, ImageConfig, JsonBlob, ManifestBuilder};
use kiln_oci::layout::OciLayout;
use kiln_oci::{Digest, Reference};
use kiln_registry::{BytesSource, Client, FileSource, PushBlobOptions, Repository};

use crate::base::ImageLayer;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};
use crate::options::OutputOptions;

/// The image documents, ready to be written anywhere.
#[derive(Debug, Clone)]
pub struct Image {
    /// The config document.
    pub config: JsonBlob,
    /// The manifest document.
    pub manifest: JsonBlob,
    /// Layers, bottom first (all in the blob store).
    pub layers: Vec<ImageLayer>,
}

/// Builds the config (with `--label`s and the creation time, unless reproducible) and the
/// manifest of a finished stage.
pub fn assemble(
    config: &ImageConfig,
    layers: &[ImageLayer],
    output: &OutputOptions,
    source_date_epoch: Option<i64>,
) -> Result<Image, BuildError> {
    let mut config = config.clone();
    if !output.labels.is_empty() {
        let labels = config.config.labels.get_or_insert_with(Default::default);
        for (k, v) in &output.labels {
            labels.insert(k.clone(), v.clone());
        }
    }
    match source_date_epoch {
        Some(epoch) => {
            let created = Some(rfc3339_utc(epoch));
            for entry in &mut config.history {
                entry.created.clone_from(&created);
            }
            config.created = created;
        }
        None => {
            date_untimed_history(&mut config.history);
            // The image is as old as its newest step, so an unchanged rebuild from the cache
            // has the same config, and the same digest, as the build that filled the cache.
            config.created = config
                .history
                .last()
                .and_then(|h| h.created.clone())
                .or_else(|| Some(now_rfc3339()));
        }
    }
    let image_error = |e: kiln_oci::image::ImageError| BuildError::Image(e.to_string());
    let config_blob = config.to_blob(output.image_format).map_err(image_error)?;
    let manifest = ManifestBuilder::new(output.image_format)
        .config(&config_blob)
        .layers(layers.iter().map(|l| l.descriptor.clone()))
        .build()
        .map_err(image_error)?;
    let manifest_blob = manifest.to_blob().map_err(image_error)?;
    Ok(Image {
        config: config_blob,
        manifest: manifest_blob,
        layers: layers.to_vec(),
    })
}

/// The current time in whole seconds, as history entries and configs record it.
pub fn now_rfc3339() -> String {
    rfc3339_utc(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    )
}

/// Gives history entries without a time (metadata-only steps) one, by BuildKit's rule: the first
/// run of untimed entries takes the time of the first timed entry after it (or, when none
/// follows, of the last one before it); every later run takes the time of the entry before it.
/// Entries stay untimed only when no entry has a time.
fn date_untimed_history(history: &mut [History]) {
    let mut fill: Option<String> = None;
    let mut seen_gap = false;
    for entry in history.iter() {
        match &entry.created {
            Some(time) => {
                fill = Some(time.clone());
                if seen_gap {
                    break;
                }
            }
            None => seen_gap = true,
        }
    }
    seen_gap = false;
    for entry in history.iter_mut() {
        match &entry.created {
            Some(time) if seen_gap => fill = Some(time.clone()),
            Some(_) => {}
            None => {
                seen_gap = true;
                entry.created.clone_from(&fill);
            }
        }
    }
}

/// Parses every `--destination` before anything is built, so a typo fails fast.
pub fn parse_destinations(destinations: &[String]) -> Result<Vec<Reference>, BuildError> {
    destinations
        .iter()
        .map(|d| {
            Reference::parse(d)
                .map_err(|e| BuildError::Options(format!("invalid --destination {d:?}: {e}")))
        })
        .collect()
}

/// How [`push`] goes about each destination.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushPolicy {
    /// Send the manifest first, and the blobs only if it is refused: for an image made wholly
    /// of cache hits, whose blobs an identical earlier build most likely pushed.
    pub manifest_first: bool,
    /// Skip, with a warning, a destination whose immutable tag already exists
    /// ([`OutputOptions::ignore_immutable_tags`](crate::OutputOptions::ignore_immutable_tags)).
    pub ignore_immutable_tags: bool,
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
    policy: PushPolicy,
) -> Result<Digest, BuildError> {
    let immutable =
        |err: &kiln_registry::Error| policy.ignore_immutable_tags && err.is_immutable_tag();
    'destinations: for destination in destinations {
        let repo = Repository::new(destination.registry(), destination.repository())?;
        let reference = destination.tag().unwrap_or("latest").to_owned();
        let put_manifest = || {
            client.put_manifest(
                &repo,
                &reference,
                &image.manifest.media_type,
                Bytes::from(image.manifest.bytes.clone()),
            )
        };
        // The registry checks that every blob the manifest names is in the repository and
        // refuses the manifest otherwise, so trying it first is safe: when it is refused the
        // blobs are put in place below and it is sent again.
        let accepted = if policy.manifest_first {
            match put_manifest().await {
                Ok(pushed) => Some(pushed),
                Err(err) if immutable(&err) => {
                    skip_immutable(destination, &err, emit);
                    continue 'destinations;
                }
                Err(err) if err.status().is_none() || err.is_immutable_tag() => {
                    return Err(err.into())
                }
                Err(_) => None,
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
                futures::future::try_join(try_join_all(uploads), config_upload).await?;
                match put_manifest().await {
                    Ok(pushed) => pushed,
                    Err(err) if immutable(&err) => {
                        skip_immutable(destination, &err, emit);
                        continue 'destinations;
                    }
                    Err(err) => return Err(err.into()),
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

/// Downloads into the blob store every layer of `layers` that is not there yet, from the
/// repository it came from (a base image's or the cache's).
pub async fn ensure_local(
    client: &Client,
    blobs: &BlobStore,
    layers: &[ImageLayer],
) -> Result<(), BuildError> {
    for layer in layers {
        if blobs.contains(&layer.descriptor.digest) {
            continue;
        }
        let origin = layer.origin.as_ref().ok_or_else(|| {
            BuildError::Image(format!(
                "layer {} is neither in the blob store nor in a known repository",
                layer.descriptor.digest
            ))
        })?;
        let file = blobs
            .create()
            .map_err(|e| BuildError::Image(format!("blob store: {e}")))?;
        crate::base::fetch_blob(
            client,
            file,
            origin,
            &layer.descriptor,
            &origin.to_string(),
            &|_| {},
            None,
        )
        .await?;
    }
    Ok(())
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
                .map_err(|e| BuildError::Image(format!("a layer upload panicked: {e}")))
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

/// Writes an OCI image layout at `path` (created if missing, tagged `tag`).
pub fn write_oci_layout(
    path: &Path,
    blobs: &BlobStore,
    image: &Image,
    tag: &str,
) -> Result<(), BuildError> {
    let layout_error =
        |e: kiln_oci::layout::LayoutError| BuildError::Image(format!("{}: {e}", path.display()));
    let layout = if path.join("oci-layout").is_file() {
        OciLayout::open(path).map_err(layout_error)?
    } else {
        OciLayout::create(path).map_err(layout_error)?
    };
    for layer in &image.layers {
        if layout.has_blob(&layer.descriptor.digest) {
            continue;
        }
        let blob_path = blobs.blob_path(&layer.descriptor.digest);
        let file = std::fs::File::open(&blob_path).map_err(|source| BuildError::Io {
            path: blob_path,
            source,
        })?;
        layout
            .write_blob(file, Some(&layer.descriptor.digest))
            .map_err(layout_error)?;
    }
    layout
        .write_json_blob(&image.config)
        .map_err(layout_error)?;
    let descriptor = layout
        .write_json_blob(&image.manifest)
        .map_err(layout_error)?;
    layout.tag(tag, descriptor).map_err(layout_error)
}

/// Writes a docker-archive (`docker load` / `podman load`) at `path`, named by `tags`.
pub fn write_docker_archive(
    path: &Path,
    blobs: &BlobStore,
    image: &Image,
    tags: &[Reference],
) -> Result<(), BuildError> {
    let temp = temp_sibling(path);
    let result = (|| {
        let file = std::fs::File::create(&temp).map_err(|source| BuildError::Io {
            path: temp.clone(),
            source,
        })?;
        let mut writer = DockerArchiveWriter::new(std::io::BufWriter::new(file));
        let layers: Vec<ArchiveLayer> = image
            .layers
            .iter()
            .map(|l| {
                ArchiveLayer::from_descriptor(&l.descriptor).ok_or_else(|| {
                    BuildError::Image(format!("layer {} has no archive form", l.descriptor.digest))
                })
            })
            .collect::<Result<_, _>>()?;
        writer
            .add_image(&image.config, tags, &layers, |layer| {
                std::fs::File::open(blobs.blob_path(&layer.digest))
            })
            .map_err(|e| BuildError::Image(format!("{}: {e}", path.display())))?;
        let mut out = writer
            .finish()
            .map_err(|e| BuildError::Image(format!("{}: {e}", path.display())))?;
        out.flush().map_err(|source| BuildError::Io {
            path: temp.clone(),
            source,
        })?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&temp, path).map_err(|source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Writes `content` to `path` atomically (temporary sibling, then rename).
pub fn write_file_atomically(path: &Path, content: &str) -> Result<(), BuildError> {
    let temp = temp_sibling(path);
    std::fs::write(&temp, content).map_err(|source| BuildError::Io {
        path: temp.clone(),
        source,
    })?;
    std::fs::rename(&temp, path).map_err(|source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".kiln-tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// The digest files kaniko writes after a successful push.
pub fn write_digest_files(
    output: &OutputOptions,
    destinations: &[Reference],
    digest: &Digest,
) -> Result<(), BuildError> {
    if let Some(path) = &output.digest_file {
        write_file_atomically(path, &digest.to_string())?;
    }
    if let Some(path) = &output.image_name_with_digest_file {
        let lines: Vec<String> = destinations
            .iter()
            .map(|d| format!("{}@{digest}", d.name()))
            .collect();
        write_file_atomically(path, &format!("{}\n", lines.join("\n")))?;
    }
    if let Some(path) = &output.image_name_tag_with_digest_file {
        let lines: Vec<String> = destinations
            .iter()
            .map(|d| format!("{}:{}@{digest}", d.name(), d.tag().unwrap_or("latest")))
            .collect();
        write_file_atomically(path, &format!("{}\n", lines.join("\n")))?;
    }
    Ok(())
}

/// The tag an OCI layout entry gets: the first destination's tag, else `latest`.
pub fn layout_tag(destinations: &[Reference]) -> String {
    destinations
        .first()
        .and_then(|d| d.tag())
        .unwrap_or("latest")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dated(times: &[Option<&str>]) -> Vec<Option<String>> {
        let mut history: Vec<History> = times
            .iter()
            .map(|t| History {
                created: t.map(str::to_owned),
                ..History::default()
            })
            .collect();
        date_untimed_history(&mut history);
        history.into_iter().map(|h| h.created).collect()
    }

    #[test]
    fn untimed_steps_take_the_next_layer_time_first_then_the_previous_one() {
        let base = Some("base");
        // FROM base; LABEL; COPY (t1); RUN (t2); CMD
        assert_eq!(
            dated(&[base, None, Some("t1"), Some("t2"), None]),
            [base, Some("t1"), Some("t1"), Some("t2"), Some("t2")].map(|t| t.map(str::to_owned))
        );
        // FROM base; COPY (t1); ENV; RUN (t2); EXPOSE; USER: the first gap looks forward.
        assert_eq!(
            dated(&[base, Some("t1"), None, Some("t2"), None, None]),
            [
                base,
                Some("t1"),
                Some("t2"),
                Some("t2"),
                Some("t2"),
                Some("t2")
            ]
            .map(|t| t.map(str::to_owned))
        );
        // Metadata only: the base's newest time.
        assert_eq!(
            dated(&[base, None]),
            [base, base].map(|t| t.map(str::to_owned))
        );
        // Nothing timed at all stays untimed (assemble then uses the build time).
        assert_eq!(dated(&[None, None]), [None, None]);
    }
}
