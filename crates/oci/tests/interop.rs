//! The `oci-spec` conversions on real images: the busybox layout and the same image after
//! umoci rewrote its config with every field a runtime reads. Each document goes to
//! `oci_spec::image` and back without losing a field, and what Kiln hands over equals what
//! `oci-spec` itself parses from the same bytes.

use std::path::Path;
use std::process::Command;

use kiln_oci::image::AnyManifest;
use kiln_oci::layout::OciLayout;
use kiln_oci::{Descriptor, ImageConfig, Index, Manifest, Platform};
use kiln_testkit::{bases, require_tools, run};
use serde_json::Value;

fn value<T: serde::Serialize>(document: &T) -> Value {
    serde_json::to_value(document).unwrap()
}

/// Drops what a side leaves out when it has no value (`null` and empty objects and arrays),
/// so the comparison is about the values both hold.
fn without_empty(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, without_empty(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_empty).collect()),
        other => other,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

fn round_trip_index(index: &Index, bytes: &[u8]) {
    let spec = oci_spec::image::ImageIndex::try_from(index).unwrap();
    let parsed: oci_spec::image::ImageIndex = serde_json::from_slice(bytes).unwrap();
    assert_eq!(without_empty(value(&spec)), without_empty(value(&parsed)));
    let back = Index::try_from(&spec).unwrap();
    assert_eq!(without_empty(value(&back)), without_empty(value(index)));
}

fn round_trip_manifest(manifest: &Manifest, bytes: &[u8]) {
    let spec = oci_spec::image::ImageManifest::try_from(manifest).unwrap();
    let parsed: oci_spec::image::ImageManifest = serde_json::from_slice(bytes).unwrap();
    assert_eq!(without_empty(value(&spec)), without_empty(value(&parsed)));
    let back = Manifest::try_from(&spec).unwrap();
    assert_eq!(without_empty(value(&back)), without_empty(value(manifest)));
    for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let spec = oci_spec::image::Descriptor::try_from(descriptor).unwrap();
        assert_eq!(spec.digest().to_string(), descriptor.digest.to_string());
        assert_eq!(spec.size(), descriptor.size);
        let back = Descriptor::try_from(&spec).unwrap();
        assert_eq!(&back, descriptor);
    }
}

fn round_trip_config(config: &ImageConfig, bytes: &[u8]) -> oci_spec::image::ImageConfiguration {
    let spec = oci_spec::image::ImageConfiguration::try_from(config).unwrap();
    let parsed: oci_spec::image::ImageConfiguration = serde_json::from_slice(bytes).unwrap();
    assert_eq!(without_empty(value(&spec)), without_empty(value(&parsed)));
    let back = ImageConfig::try_from(&spec).unwrap();
    assert_eq!(without_empty(value(&back)), without_empty(value(config)));
    spec
}

/// Converts every document of the image tagged `tag` in `layout`; returns the config as
/// `oci-spec` sees it.
fn round_trip_image(layout: &Path, tag: &str) -> oci_spec::image::ImageConfiguration {
    let oci = OciLayout::open(layout).unwrap();
    let index_bytes = std::fs::read(layout.join("index.json")).unwrap();
    round_trip_index(&oci.index().unwrap(), &index_bytes);
    let descriptor = oci.resolve(Some(tag)).unwrap();
    let manifest_bytes = oci.read_blob_bytes(&descriptor.digest, 1 << 20).unwrap();
    let AnyManifest::Manifest(manifest) = oci.read_any_manifest(&descriptor).unwrap() else {
        panic!("{tag} is an index");
    };
    round_trip_manifest(&manifest, &manifest_bytes);
    let (_, same) = oci.read_manifest(Some(tag), &Platform::host()).unwrap();
    assert_eq!(same, manifest);
    let config_bytes = oci
        .read_blob_bytes(&manifest.config.digest, 1 << 20)
        .unwrap();
    round_trip_config(&oci.read_config(&manifest).unwrap(), &config_bytes)
}

#[test]
fn documents_of_real_images_round_trip_through_oci_spec() {
    require_tools(&["umoci", "cp"]);
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    run(Command::new("cp")
        .arg("-a")
        .arg(bases::busybox_layout())
        .arg(&layout));
    round_trip_image(&layout, "latest");

    run(Command::new("umoci")
        .args(["config", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .args(["--tag", "configured"])
        .args([
            "--config.env",
            "GREETING=hello",
            "--config.user",
            "1000:1000",
        ])
        .args(["--config.workingdir", "/srv", "--config.volume", "/data"])
        .args(["--config.exposedports", "8080/tcp"])
        .args(["--config.entrypoint", "/bin/sh", "--config.cmd", "-c"])
        .args(["--config.label", "org.example.team=build"])
        .args(["--config.stopsignal", "SIGQUIT"])
        .args([
            "--author",
            "kiln tests",
            "--history.created_by",
            "umoci config",
        ]));
    let spec = round_trip_image(&layout, "configured");
    let config = spec.config().as_ref().expect("a runtime config");
    assert!(config
        .env()
        .as_ref()
        .unwrap()
        .contains(&"GREETING=hello".to_string()));
    assert_eq!(config.user().as_deref(), Some("1000:1000"));
    assert_eq!(config.working_dir().as_deref(), Some("/srv"));
    assert_eq!(config.stop_signal().as_deref(), Some("SIGQUIT"));
    assert_eq!(
        config.labels().as_ref().unwrap()["org.example.team"],
        "build"
    );
    assert!(config.volumes().as_ref().unwrap().contains(&"/data".into()));
    assert_eq!(spec.author().as_deref(), Some("kiln tests"));
}
