//! The trees later steps read from: a finished stage's filesystem (for `FROM stage`, copies
//! and mounts from it, a buildpacks export reading what the build stage made) and an image's
//! (copies and mounts from an image), each made once, when first needed: mounted from layer
//! trees where the build mounts its bases, else unpacked.

use std::path::PathBuf;

use kiln_fs::resolve::Root;
use kiln_fs::snapshot::Index;
use kiln_plan::{Source, StageFiles};

use crate::base;
use crate::error::BuildError;
use crate::events::Phase;
use crate::ops::run::MountSource;
use crate::shared::Shared;

/// An image unpacked for a copy or mount from it.
#[derive(Debug, Clone)]
pub(crate) struct ImageTree {
    /// Where its file system is unpacked.
    pub(crate) root: PathBuf,
    /// The platform manifest it was pulled by.
    pub(crate) manifest_digest: kiln_oci::Digest,
}

impl Shared {
    /// The tree of finished stage `index`: mounted from the stage's layers (else unpacked from
    /// them) the first time it is needed, if the stage itself never materialized it.
    pub(crate) fn stage_rootfs(&self, index: usize) -> Result<PathBuf, BuildError> {
        let stage = self
            .finished(index)
            .ok_or_else(|| BuildError::image(format!("stage {index}"), "it has not been built"))?;
        let mut ready = stage.ready.lock().expect("stage rootfs");
        if !*ready {
            self.timed(Some(index), None, Phase::Unpack, || {
                std::fs::create_dir_all(&stage.rootfs).map_err(BuildError::io(&stage.rootfs))?;
                self.block_on(crate::output::ensure_local(
                    &self.client,
                    &self.blobs,
                    &stage.layers,
                ))??;
                if self.mount_image_layers(
                    &format!("stage {index}"),
                    &stage.rootfs,
                    &stage.layers,
                )? {
                    return Ok(());
                }
                base::unpack_into(&stage.rootfs, &stage.layers, &self.blobs, &mut Index::new())
            })?;
            *ready = true;
        }
        Ok(stage.rootfs.clone())
    }

    /// The tree of `image` (as written in a copy or mount), pulled and mounted (else unpacked)
    /// the first time it is needed. With the layer cache on it is the manifest the step's key was computed
    /// from, even if the tag has moved since.
    pub(crate) fn image_tree(&self, image: &str) -> Result<ImageTree, BuildError> {
        // Held while pulling, so that two stages needing the same image pull it once.
        let mut images = self.images.lock().expect("image map");
        if let Some(tree) = images.get(image) {
            return Ok(tree.clone());
        }
        let cache_dir = self.options.cache.dir.as_deref();
        let pulled = self.block_on(async {
            let manifest = match self.remote.image_manifest(image) {
                Some(pinned) => pinned,
                None => base::resolve_manifest(&self.client, image, &self.platform).await?,
            };
            let (client, blobs, events) = (&self.client, &self.blobs, &*self.events);
            base::pull_resolved(client, blobs, manifest, image, events, cache_dir).await
        })??;
        let root = self.work_dir.join(format!("image-{}", images.len()));
        std::fs::create_dir_all(&root).map_err(BuildError::io(&root))?;
        if !self.mount_image_layers(image, &root, &pulled.layers)? {
            base::unpack_into(&root, &pulled.layers, &self.blobs, &mut Index::new())?;
        }
        let tree = ImageTree {
            root,
            manifest_digest: pulled.manifest_digest,
        };
        images.insert(image.to_owned(), tree.clone());
        Ok(tree)
    }

    /// The tree a mount `from=` reads, and what names its content.
    pub(crate) fn mount_source(&self, from: &Source) -> Result<MountSource, BuildError> {
        match from {
            Source::Stage(index) => {
                let root = self.stage_rootfs(*index)?;
                let stage = self.finished(*index).ok_or_else(|| {
                    BuildError::image(format!("stage {index}"), "it has not been built")
                })?;
                let diff_ids: Vec<String> =
                    stage.layers.iter().map(|l| l.diff_id.to_string()).collect();
                let identity = kiln_oci::Digest::sha256_of(diff_ids.join("\n").as_bytes());
                Ok(MountSource {
                    root,
                    identity: identity.to_string(),
                })
            }
            Source::Image(image) => {
                let tree = self.image_tree(image)?;
                Ok(MountSource {
                    root: tree.root,
                    identity: tree.manifest_digest.to_string(),
                })
            }
            Source::Local(dir) => Err(BuildError::Options(format!(
                "a mount cannot read the local directory {dir}; only copies can"
            ))),
        }
    }
}

/// The files of finished stages, for a front end that writes a stage's steps from what an
/// earlier stage made; read inside each stage's root.
pub(crate) struct FinishedStages<'a>(pub(crate) &'a Shared);

impl FinishedStages<'_> {
    fn root(&self, stage: usize) -> Result<Root, String> {
        let path = self.0.stage_rootfs(stage).map_err(|e| e.to_string())?;
        Root::open(path).map_err(|e| e.to_string())
    }
}

impl StageFiles for FinishedStages<'_> {
    fn read(&self, stage: usize, path: &str) -> Result<Option<Vec<u8>>, String> {
        let root = self.root(stage)?;
        let mut file = match root.open_file(path) {
            Ok(file) => file,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes)
            .map_err(|e| format!("stage {stage}: {path}: {e}"))?;
        Ok(Some(bytes))
    }

    fn list(&self, stage: usize, path: &str) -> Result<Option<Vec<String>>, String> {
        match self.root(stage)?.read_dir(path) {
            Ok(names) => Ok(Some(
                names
                    .into_iter()
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect(),
            )),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Stage files before anything has run: the engine lowers a stage with placeholders once, to
/// see which remote inputs its steps name, and nothing can be read then.
pub(crate) struct NoStages;

impl StageFiles for NoStages {
    fn read(&self, stage: usize, _: &str) -> Result<Option<Vec<u8>>, String> {
        Err(format!("stage {stage} has not run yet"))
    }

    fn list(&self, stage: usize, _: &str) -> Result<Option<Vec<String>>, String> {
        Err(format!("stage {stage} has not run yet"))
    }
}
