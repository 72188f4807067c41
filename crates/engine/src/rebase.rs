//! [`rebase`]: put an app image built by a CNB platform on a new run image without building
//! anything, as `pack rebase` does. Only documents move: the new config and manifest are
//! written, and the layers stay where they are (mounted across repositories of one registry,
//! copied otherwise).

use kiln_cnb::rebase::{AppImage, NewRunImage, RebaseOptions as CnbRebaseOptions};
use kiln_fs::blobstore::BlobStore;
use kiln_oci::image::{History, ImageConfig, ManifestBuilder};
use kiln_oci::{Digest, ImageFormat, Platform, Reference};
use kiln_registry::{Client, RegistryOptions};

use crate::base::{ImageLayer, PulledImage};
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};
use crate::output::{self, Image, PlacedBlobs, PushPolicy};

/// What [`rebase`] does.
#[derive(Debug, Clone)]
pub struct RebaseOptions {
    /// The app image to rebase (`--image`).
    pub image: String,
    /// The run image to put under it (`--run-image`).
    pub run_image: String,
    /// Where to push the result (`--destination`); the app image's own name when `None`.
    pub destination: Option<String>,
    /// Rebase even when the run image is not the one (or a mirror of the one) the app names,
    /// or its stack or platform differs (`--force`).
    pub force: bool,
    /// Registry transport and credentials.
    pub registry: RegistryOptions,
    /// The platform of the images, when the app or run image is an index.
    pub platform: Option<Platform>,
    /// Kiln's directory (blob store for layers that must be copied between registries).
    pub kiln_dir: std::path::PathBuf,
}

/// What [`rebase`] made.
#[derive(Debug, Clone)]
pub struct RebaseReport {
    /// The rebased image's manifest digest.
    pub digest: Digest,
    /// The destination it was pushed to.
    pub destination: String,
    /// The app layers kept, bottom first (their digests are unchanged).
    pub app_layers: Vec<Digest>,
}

/// Rebases `options.image` onto `options.run_image` and pushes the result.
pub async fn rebase(options: RebaseOptions, events: EventSink) -> Result<RebaseReport, BuildError> {
    let client = Client::new(options.registry.clone())?;
    let platform = options.platform.clone().unwrap_or_else(Platform::host);
    let app = fetch(&client, &options.image, &platform).await?;
    let run = fetch(&client, &options.run_image, &platform).await?;
    let app_labels = app.config.config.labels.clone().unwrap_or_default();
    let run_labels = run.config.config.labels.clone().unwrap_or_default();
    let text = |d: &Digest| d.to_string();
    let app_diff_ids: Vec<String> = app.config.rootfs.diff_ids.iter().map(text).collect();
    let run_diff_ids: Vec<String> = run.config.rootfs.diff_ids.iter().map(text).collect();
    let run_reference = run
        .reference
        .with_digest(run.manifest_digest.clone())
        .to_string();
    let rebased = kiln_cnb::rebase::rebase(
        &AppImage {
            labels: &app_labels,
            diff_ids: &app_diff_ids,
        },
        (&app.config.os, &app.config.architecture),
        &NewRunImage {
            name: &options.run_image,
            reference: &run_reference,
            diff_ids: &run_diff_ids,
            labels: &run_labels,
            os_arch: (&run.config.os, &run.config.architecture),
        },
        CnbRebaseOptions {
            force: options.force,
        },
    )
    .map_err(|e| BuildError::Options(format!("rebase {}: {e}", options.image)))?;
    let kept = &app.layers[rebased.app_layers.clone()];
    let layers: Vec<ImageLayer> = run.layers.iter().chain(kept).cloned().collect();
    let mut config = app.config.clone();
    config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
    config.config.labels = Some(rebased.labels.clone());
    config.history = rebased_history(&app.config, &run.config, rebased.app_layers.start);
    let format = if app.manifest_media_type.contains("docker") {
        ImageFormat::Docker
    } else {
        ImageFormat::Oci
    };
    let image_error = |e: kiln_oci::image::ImageError| BuildError::image("rebased image", e);
    let config_blob = config.to_blob(format).map_err(image_error)?;
    let manifest = ManifestBuilder::new(format)
        .config(&config_blob)
        .layers(layers.iter().map(|l| l.descriptor.clone()))
        .build()
        .map_err(image_error)?
        .to_blob()
        .map_err(image_error)?;
    let image = Image {
        config: config_blob,
        manifest,
        layers,
    };
    let destination = options.destination.clone().unwrap_or(options.image.clone());
    let targets = output::parse_destinations(std::slice::from_ref(&destination))?;
    let blobs = BlobStore::open(options.kiln_dir.join("blobs"))
        .map_err(|e| BuildError::image("blob store", e))?;
    let digest = output::push(
        &client,
        &blobs,
        &image,
        &targets,
        &PlacedBlobs::default(),
        &*events,
        PushPolicy {
            manifest_first: true,
            ignore_immutable_tags: false,
            cancel: None,
        },
    )
    .await?;
    events(BuildEvent::Note {
        message: format!("rebased {} onto {}", options.image, options.run_image),
    });
    Ok(RebaseReport {
        digest,
        destination,
        app_layers: kept.iter().map(|l| l.descriptor.digest.clone()).collect(),
    })
}

/// The history of the rebased image: the new run image's, then the app's entries above the
/// old run image (those after the entry of its top layer, which is layer `first_app - 1`).
fn rebased_history(app: &ImageConfig, run: &ImageConfig, first_app: usize) -> Vec<History> {
    if app.history.is_empty() {
        return Vec::new();
    }
    let mut layers_seen = 0;
    let mut split = app.history.len();
    for (at, entry) in app.history.iter().enumerate() {
        if layers_seen == first_app {
            split = at;
            break;
        }
        if !entry.empty_layer {
            layers_seen += 1;
        }
    }
    if layers_seen < first_app {
        return Vec::new();
    }
    run.history
        .iter()
        .chain(&app.history[split..])
        .cloned()
        .collect()
}

/// An image's manifest and config, with its layers' descriptors (nothing pulled).
struct Fetched {
    reference: Reference,
    manifest_digest: Digest,
    manifest_media_type: String,
    config: ImageConfig,
    layers: Vec<ImageLayer>,
}

async fn fetch(client: &Client, image: &str, platform: &Platform) -> Result<Fetched, BuildError> {
    let manifest = crate::base::resolve_manifest(client, image, platform).await?;
    let media_type = manifest.media_type();
    let PulledImage {
        reference,
        manifest_digest,
        config,
        layers,
        ..
    } = manifest.with_config(client, None).await?;
    Ok(Fetched {
        reference,
        manifest_digest,
        manifest_media_type: media_type,
        config,
        layers,
    })
}
