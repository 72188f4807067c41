//! Rebase as a pure function: swap the run image under an app image built by a CNB platform,
//! keeping the app's own layers (what `pack rebase` does), by reading and rewriting labels.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::metadata::{LifecycleMetadata, StackMetadata, LIFECYCLE_METADATA_LABEL};

/// The image being rebased.
#[derive(Debug, Clone)]
pub struct AppImage<'a> {
    /// Its config's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its layers' diff IDs, bottom first.
    pub diff_ids: &'a [String],
}

/// The run image to rebase onto.
#[derive(Debug, Clone)]
pub struct NewRunImage<'a> {
    /// How the image is named (`registry/run:tag`), recorded in the metadata.
    pub name: &'a str,
    /// Its digest reference (`registry/run@sha256:...`).
    pub reference: &'a str,
    /// Its layers' diff IDs, bottom first.
    pub diff_ids: &'a [String],
    /// Its config's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its os and architecture.
    pub os_arch: (&'a str, &'a str),
}

/// What to build: the new layer list and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebased {
    /// The app image's layers to keep (indices into its diff IDs): those above the old run
    /// image's top layer, in order. They go on top of the new run image's layers.
    pub app_layers: std::ops::Range<usize>,
    /// The diff IDs of the rebased image, bottom first.
    pub diff_ids: Vec<String>,
    /// The rebased image's labels.
    pub labels: BTreeMap<String, String>,
}

/// Options of a rebase.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebaseOptions {
    /// Rebase even when the new run image is not one the metadata names, or its stack or
    /// target differs.
    pub force: bool,
}

/// Computes the rebase of `app` (with its os/arch `app_os_arch`) onto `new`.
pub fn rebase(
    app: &AppImage<'_>,
    app_os_arch: (&str, &str),
    new: &NewRunImage<'_>,
    options: RebaseOptions,
) -> Result<Rebased> {
    let label = app.labels.get(LIFECYCLE_METADATA_LABEL).ok_or_else(|| {
        Error::Rebase(format!(
            "the image has no {LIFECYCLE_METADATA_LABEL} label: it was not built by a CNB platform"
        ))
    })?;
    let mut md = LifecycleMetadata::from_label(label)?;
    if md.run_image.top_layer.is_empty() {
        return Err(Error::Rebase(format!(
            "{LIFECYCLE_METADATA_LABEL}: runImage.topLayer is empty"
        )));
    }
    if app
        .labels
        .get("io.buildpacks.rebasable")
        .map(String::as_str)
        == Some("false")
        && !options.force
    {
        return Err(Error::Rebase(
            "the image is marked io.buildpacks.rebasable=false; force to override".into(),
        ));
    }
    let top = app
        .diff_ids
        .iter()
        .position(|d| *d == md.run_image.top_layer)
        .ok_or_else(|| {
            Error::Rebase(format!(
                "the run image's top layer {} is not a layer of the image",
                md.run_image.top_layer
            ))
        })?;
    let new_top = new
        .diff_ids
        .last()
        .ok_or_else(|| Error::Rebase("the new run image has no layers".into()))?;
    if !options.force {
        let stack =
            |labels: &BTreeMap<String, String>| labels.get("io.buildpacks.stack.id").cloned();
        if let (Some(a), Some(b)) = (stack(app.labels), stack(new.labels)) {
            if a != b {
                return Err(Error::Rebase(format!(
                    "incompatible stack: the new run image is {b}, the image was built for {a}; force to override"
                )));
            }
        }
        if app_os_arch != new.os_arch {
            return Err(Error::Rebase(format!(
                "the new run image is {}/{}, the image is {}/{}; force to override",
                new.os_arch.0, new.os_arch.1, app_os_arch.0, app_os_arch.1
            )));
        }
        let known = |image: &str, mirrors: &[String]| {
            !image.is_empty() && (image == new.name || mirrors.iter().any(|m| m == new.name))
        };
        let named = known(&md.run_image.image, &md.run_image.mirrors)
            || md
                .stack
                .as_ref()
                .is_some_and(|s| known(&s.run_image.image, &s.run_image.mirrors));
        let any_named = !md.run_image.image.is_empty()
            || md
                .stack
                .as_ref()
                .is_some_and(|s| !s.run_image.image.is_empty());
        if any_named && !named {
            return Err(Error::Rebase(format!(
                "the new run image {} is not the run image (or a mirror of it) the image names ({}); force to override",
                new.name,
                if md.run_image.image.is_empty() {
                    md.stack.as_ref().map(|s| s.run_image.image.clone()).unwrap_or_default()
                } else {
                    md.run_image.image.clone()
                }
            )));
        }
    }
    let named_before = !md.run_image.image.is_empty();
    md.run_image.top_layer = new_top.clone();
    md.run_image.reference = new.reference.to_owned();
    if options.force || !named_before {
        md.run_image.image = new.name.to_owned();
        md.run_image.mirrors.clear();
        md.stack = Some(StackMetadata {
            run_image: crate::metadata::RunImageRef {
                image: new.name.to_owned(),
                mirrors: Vec::new(),
            },
        });
    }
    let mut labels = app.labels.clone();
    labels.insert(LIFECYCLE_METADATA_LABEL.to_owned(), md.to_label());
    // The run image's identity labels follow the run image.
    let synced =
        |k: &str| k.starts_with("io.buildpacks.stack.") || k.starts_with("io.buildpacks.base.");
    labels.retain(|k, _| !synced(k));
    for (k, v) in new.labels {
        if synced(k) {
            labels.insert(k.clone(), v.clone());
        }
    }
    let app_layers = top + 1..app.diff_ids.len();
    let mut diff_ids = new.diff_ids.to_vec();
    diff_ids.extend(app.diff_ids[app_layers.clone()].iter().cloned());
    Ok(Rebased {
        app_layers,
        diff_ids,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_labels(md: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LIFECYCLE_METADATA_LABEL.to_owned(), md.to_owned()),
            ("io.buildpacks.stack.id".to_owned(), "s".to_owned()),
            ("io.buildpacks.base.distro".to_owned(), "old".to_owned()),
            ("app.label".to_owned(), "kept".to_owned()),
        ])
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn swaps_run_layers_and_updates_labels() {
        let labels = app_labels(
            r#"{"runImage":{"topLayer":"sha256:r2","reference":"reg/run@sha256:a","image":"reg/run:1"},"buildpacks":[]}"#,
        );
        let app_ids = ids(&["sha256:r1", "sha256:r2", "sha256:l1", "sha256:app"]);
        let new_ids = ids(&["sha256:n1", "sha256:n2", "sha256:n3"]);
        let new_labels = BTreeMap::from([
            ("io.buildpacks.stack.id".to_owned(), "s".to_owned()),
            ("io.buildpacks.base.distro".to_owned(), "new".to_owned()),
        ]);
        let out = rebase(
            &AppImage {
                labels: &labels,
                diff_ids: &app_ids,
            },
            ("linux", "amd64"),
            &NewRunImage {
                name: "reg/run:1",
                reference: "reg/run@sha256:b",
                diff_ids: &new_ids,
                labels: &new_labels,
                os_arch: ("linux", "amd64"),
            },
            RebaseOptions::default(),
        )
        .unwrap();
        assert_eq!(out.app_layers, 2..4);
        assert_eq!(
            out.diff_ids,
            ids(&[
                "sha256:n1",
                "sha256:n2",
                "sha256:n3",
                "sha256:l1",
                "sha256:app"
            ])
        );
        let md = LifecycleMetadata::from_label(&out.labels[LIFECYCLE_METADATA_LABEL]).unwrap();
        assert_eq!(md.run_image.top_layer, "sha256:n3");
        assert_eq!(md.run_image.reference, "reg/run@sha256:b");
        assert_eq!(out.labels["io.buildpacks.base.distro"], "new");
        assert_eq!(out.labels["app.label"], "kept");
    }

    #[test]
    fn refuses_what_pack_refuses() {
        let labels = app_labels(
            r#"{"runImage":{"topLayer":"sha256:r2","reference":"x","image":"reg/run:1"}}"#,
        );
        let app_ids = ids(&["sha256:r1", "sha256:r2", "sha256:app"]);
        let new_ids = ids(&["sha256:n1"]);
        let other_stack = BTreeMap::from([("io.buildpacks.stack.id".to_owned(), "t".to_owned())]);
        let new = |name, labels| NewRunImage {
            name,
            reference: "r@sha256:b",
            diff_ids: &new_ids,
            labels,
            os_arch: ("linux", "amd64"),
        };
        let empty = BTreeMap::new();
        let app = AppImage {
            labels: &labels,
            diff_ids: &app_ids,
        };
        let err = rebase(
            &app,
            ("linux", "amd64"),
            &new("reg/run:1", &other_stack),
            RebaseOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("incompatible stack"), "{err}");
        let err = rebase(
            &app,
            ("linux", "amd64"),
            &new("other/run:2", &empty),
            RebaseOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not the run image"), "{err}");
        let forced = rebase(
            &app,
            ("linux", "amd64"),
            &new("other/run:2", &empty),
            RebaseOptions { force: true },
        )
        .unwrap();
        let md = LifecycleMetadata::from_label(&forced.labels[LIFECYCLE_METADATA_LABEL]).unwrap();
        assert_eq!(md.run_image.image, "other/run:2");
        let bad_ids = ids(&["sha256:zz"]);
        let err = rebase(
            &AppImage {
                labels: &labels,
                diff_ids: &bad_ids,
            },
            ("linux", "amd64"),
            &new("reg/run:1", &empty),
            RebaseOptions::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not a layer of the image"),
            "{err}"
        );
        let err = rebase(
            &AppImage {
                labels: &empty,
                diff_ids: &app_ids,
            },
            ("linux", "amd64"),
            &new("reg/run:1", &empty),
            RebaseOptions::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("no io.buildpacks.lifecycle.metadata"),
            "{err}"
        );
    }
}
