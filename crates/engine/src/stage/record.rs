//! The first round of a stage: resolving its base and, with the layer cache, asking for the
//! stage record and pinning the stage's remote inputs at the same time, so that an unchanged
//! stage costs one round of requests.

use kiln_cache::{Parent, StageLocator, StageRecord};
use kiln_oci::image::ImageConfig;
use kiln_plan::{Base, BaseFacts, Step};

use super::prepare::{ensure_path, Materializer, Start};
use super::trees::NoStages;
use crate::cache::EngineCache;
use crate::error::BuildError;
use crate::events::Phase;
use crate::ops::config::env_pairs;
use crate::shared::Shared;

/// Resolves `stage`'s base. With the layer cache, an image base's layers are fetched only if a
/// step has to run (see [`Materializer`]), and the stage record is asked for together with the
/// base manifest; without it, the base is pulled and unpacked right away.
pub(super) fn start(
    shared: &Shared,
    stage: &kiln_plan::Stage,
    materializer: &mut Materializer<'_>,
) -> Result<Start, BuildError> {
    let index = stage.id;
    let at = stage.origin.location();
    match &stage.base {
        Base::Scratch => {
            let mut image = ImageConfig::new(&shared.platform);
            ensure_path(&mut image);
            Ok(Start {
                image,
                layers: Vec::new(),
                base_image: None,
                cache_parent: Some(Parent::Scratch),
                recorded_base: None,
                record: None,
            })
        }
        Base::Stage(parent) => {
            let output = shared.finished(*parent).ok_or_else(|| {
                BuildError::step(&at, format!("stage {parent} has not been built"))
            })?;
            materializer.pending_stage = Some(*parent);
            materializer.rescan = true;
            Ok(Start {
                image: output.config.clone(),
                layers: output.layers.clone(),
                base_image: output.base_image.clone(),
                cache_parent: output.cache_key.clone().map(Parent::Key),
                recorded_base: None,
                record: None,
            })
        }
        Base::Image(image) => match &shared.cache {
            Some(cache) => start_cached(shared, cache, stage, image, materializer),
            None => {
                let mut index_of_rootfs = materializer.base_index.take().unwrap_or_default();
                let pulled = materializer.bring_base(image, &mut index_of_rootfs)?;
                materializer.base_index = Some(index_of_rootfs);
                shared.push_ahead(index, &pulled.layers);
                let mut config = pulled.config;
                ensure_path(&mut config);
                Ok(Start {
                    image: config,
                    layers: pulled.layers,
                    base_image: Some((pulled.reference.to_string(), pulled.manifest_digest)),
                    cache_parent: None,
                    recorded_base: None,
                    record: None,
                })
            }
        },
    }
}

/// An image base with the layer cache: its manifest, the stage record and the pins of the
/// remote inputs the steps name as written (before the base's ENV is known) in one round.
fn start_cached(
    shared: &Shared,
    cache: &EngineCache,
    stage: &kiln_plan::Stage,
    image: &str,
    materializer: &mut Materializer<'_>,
) -> Result<Start, BuildError> {
    let index = stage.id;
    let locator = cache.stage_locator(shared.plan.identity(), index, image);
    let written_steps = stage.steps.lower(&BaseFacts::default(), &NoStages).ok();
    let prefetch = async {
        if let Some(steps) = &written_steps {
            (shared.remote)
                .prefetch(steps, &shared.client, &shared.platform)
                .await
        }
    };
    let (pulled, record) = shared
        .timed(Some(index), None, Phase::Pull, || {
            shared.runtime.block_on(async {
                let (manifest, record, ()) = futures::join!(
                    crate::base::resolve_manifest(&shared.client, image, &shared.platform),
                    cache.lookup_record(&locator),
                    prefetch,
                );
                let manifest = manifest?;
                let known = record.as_ref().and_then(|r: &StageRecord| {
                    r.base_config(manifest.digest(), manifest.config_digest())
                });
                let pulled = manifest.with_config(&shared.client, known).await?;
                Ok::<_, BuildError>((pulled, record))
            })
        })
        .map_err(|e| BuildError::step(stage.origin.location(), format!("FROM {image}: {e}")))?;
    materializer.pending_base = Some(image.to_owned());
    let mut config = pulled.config;
    ensure_path(&mut config);
    let _ = env_pairs;
    Ok(Start {
        image: config,
        base_image: Some((pulled.reference.to_string(), pulled.manifest_digest.clone())),
        cache_parent: Some(crate::cache::image_parent(&pulled.manifest_digest)),
        recorded_base: Some(kiln_cache::RecordedBase {
            manifest_digest: pulled.manifest_digest,
            config: pulled.config_bytes,
        }),
        record: Some((locator, record)),
        layers: pulled.layers,
    })
}

/// Pins the remote inputs of `steps`, and, for a stage on scratch or another stage (one on an
/// image asked with its base manifest), fetches its record at the same time. Returns where the
/// record is kept and the record found there.
pub(super) fn lookup(
    shared: &Shared,
    cache: &EngineCache,
    stage: &kiln_plan::Stage,
    steps: &[Step],
    record: Option<(StageLocator, Option<StageRecord>)>,
    parent: Option<&Parent>,
) -> (Option<StageLocator>, Option<StageRecord>) {
    let pin = shared.remote.pin(steps, &shared.client, &shared.platform);
    let parent_text = match parent {
        Some(Parent::Scratch) => Some("scratch".to_owned()),
        Some(Parent::Key(key)) => Some(key.to_string()),
        _ => None,
    };
    match (record, parent_text) {
        (Some((locator, record)), _) => {
            shared.runtime.block_on(pin);
            (Some(locator), record)
        }
        (None, Some(parent)) => {
            let locator = cache.stage_locator(shared.plan.identity(), stage.id, &parent);
            let (record, ()) = shared
                .runtime
                .block_on(async { futures::join!(cache.lookup_record(&locator), pin) });
            (Some(locator), record)
        }
        (None, None) => {
            shared.runtime.block_on(pin);
            (None, None)
        }
    }
}
