//! Arbitrary bytes as an image manifest, index, config or registry response (the first byte
//! picks which). A document that parses must serialise canonically to bytes that parse back to
//! the same value and serialise to the same bytes again, or its digest would change between
//! the pull and the push of an unchanged image. Platforms found in it must normalise
//! idempotently and survive their string form.

#![no_main]

use kiln_oci::{canonical, AnyManifest, ImageConfig, Index, Manifest, Platform};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Canonical bytes of `value` re-parse to `value` and are a fixed point.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
    let bytes = canonical::to_vec(value).expect("a parsed document serialises");
    let again: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "canonical JSON does not parse back: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&again, value, "canonical JSON parses to another value");
    assert_eq!(
        canonical::to_vec(&again).unwrap(),
        bytes,
        "canonical JSON is not a fixed point"
    );
}

fn check_platform(platform: &Platform) {
    let once = platform.normalized();
    assert_eq!(
        once.normalized(),
        once,
        "normalisation is not idempotent for {platform:?}"
    );
    // The string form only carries what `parse` accepts: os/arch[/variant][:version], parts
    // of `[A-Za-z0-9._-]`; other values (from JSON) have no string form to round-trip.
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let printable = part(&once.os)
        && part(&once.architecture)
        && once.variant.as_deref().is_none_or(part)
        && once
            .os_version
            .as_deref()
            .is_none_or(|v| !v.is_empty() && v.trim() == v);
    if printable && once.os_features.is_empty() {
        if let Ok(parsed) = Platform::parse(&once.to_string()) {
            assert_eq!(parsed, once, "{once} does not parse back to itself");
        }
    }
    let _ = platform.compatibility(&once);
    assert!(
        platform.matches(platform),
        "{platform:?} does not match itself"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, doc)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let Ok(manifest) = Manifest::from_json(doc) {
                round_trip(&manifest);
                let blob = manifest.to_blob().expect("a parsed manifest has a blob");
                assert_eq!(Manifest::from_json(&blob.bytes).unwrap(), manifest);
                let _ = manifest.format();
                for descriptor in manifest.layers.iter().chain([&manifest.config]) {
                    let _ = descriptor.embedded_data();
                    if let Some(platform) = &descriptor.platform {
                        check_platform(platform);
                    }
                }
            }
        }
        1 => {
            if let Ok(index) = Index::from_json(doc) {
                round_trip(&index);
                let blob = index.to_blob().expect("a parsed index has a blob");
                assert_eq!(Index::from_json(&blob.bytes).unwrap(), index);
                for descriptor in &index.manifests {
                    if let Some(platform) = &descriptor.platform {
                        check_platform(platform);
                        // The entry for a platform is found when asked for that platform.
                        assert!(index.select(platform).is_some());
                    }
                }
                let _ = index.select(&Platform::new("linux", "amd64"));
            }
        }
        2 => {
            if let Ok(config) = ImageConfig::from_json(doc) {
                round_trip(&config);
                check_platform(&config.platform());
            }
        }
        _ => {
            // The content type, if any, is the document's first line.
            let text = String::from_utf8_lossy(doc);
            let (content_type, body) = match text.split_once('\n') {
                Some((ct, body)) if !ct.is_empty() => (Some(ct), body.as_bytes()),
                _ => (None, doc),
            };
            match AnyManifest::parse(content_type, body) {
                Ok(AnyManifest::Manifest(m)) => round_trip(&m),
                Ok(AnyManifest::Index(i)) => round_trip(&i),
                Err(_) => {}
            }
        }
    }
});
