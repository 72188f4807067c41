//! Arbitrary text as an image reference and as a platform string. A reference that parses
//! must come back unchanged from each of its printed forms (canonical and familiar), printing
//! must be idempotent, and moving it to its own registry must change nothing. A platform that
//! parses is already normalised and survives its string form.

#![no_main]

use kiln_oci::{Platform, Reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(reference) = Reference::parse(input) {
        let canonical = reference.to_string();
        let reparsed = Reference::parse(&canonical)
            .unwrap_or_else(|e| panic!("{canonical} (from {input:?}) does not parse: {e}"));
        assert_eq!(
            reparsed, reference,
            "canonical form {canonical} changes the reference"
        );
        assert_eq!(
            reparsed.to_string(),
            canonical,
            "canonical form is not idempotent"
        );

        let familiar = reference.familiar();
        let from_familiar = Reference::parse(&familiar).unwrap_or_else(|e| {
            panic!("familiar form {familiar} (from {input:?}) does not parse: {e}")
        });
        assert_eq!(
            from_familiar, reference,
            "familiar form {familiar} names another image"
        );

        let moved = reference
            .with_registry(reference.registry())
            .expect("a reference's own registry is valid");
        assert_eq!(
            moved, reference,
            "moving to its own registry changed the reference"
        );

        assert!(canonical.starts_with(&reference.name()));
        if let Some(tag) = reference.tag() {
            assert_eq!(reference.with_tag(tag).unwrap().tag(), Some(tag));
        }
        if let Some(digest) = reference.digest() {
            assert_eq!(reference.manifest_reference(), digest.to_string());
        }
    }

    if let Ok(platform) = Platform::parse(input) {
        assert_eq!(
            platform.normalized(),
            platform,
            "parse did not normalise {input:?}"
        );
        let printed = platform.to_string();
        let again = Platform::parse(&printed)
            .unwrap_or_else(|e| panic!("{printed} (from {input:?}) does not parse: {e}"));
        assert_eq!(again, platform, "{printed} parses to another platform");
    }
});
