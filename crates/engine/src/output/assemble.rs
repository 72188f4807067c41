//! The image documents of a finished build: its config (with `--label`s, history times by
//! BuildKit's rule, the creation time unless reproducible) and its manifest.

use kiln_oci::image::{rfc3339_utc, History, ImageConfig, JsonBlob, ManifestBuilder};

use crate::base::ImageLayer;
use crate::error::BuildError;
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
    let image_error = |e: kiln_oci::image::ImageError| BuildError::image("image", e);
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
