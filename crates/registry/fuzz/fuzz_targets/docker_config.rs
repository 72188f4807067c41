//! Arbitrary bytes as a Docker `config.json` followed (after a NUL byte) by registry names to
//! look up, one per line. Parsing and lookups must not panic; an `auths` key always finds its
//! own entry (an exact key wins over the normalised fallback); a registry and its normalised
//! host find the same credential and helper when no key names either exactly; no secret shows
//! in `Debug`.

#![no_main]

use std::path::Path;

use kiln_registry::{normalize_registry, Credential, DockerConfig, Secret};
use libfuzzer_sys::fuzz_target;

/// The same credential with every secret replaced, for checking that `Debug` ignores them.
fn without_secrets(credential: &Credential) -> Credential {
    let blank = || Secret::new(String::new());
    match credential {
        Credential::Basic { username, .. } => Credential::Basic {
            username: username.clone(),
            password: blank(),
        },
        Credential::IdentityToken { username, .. } => Credential::IdentityToken {
            username: username.clone(),
            token: blank(),
        },
        Credential::RegistryToken(_) => Credential::RegistryToken(blank()),
    }
}

fuzz_target!(|data: &[u8]| {
    let (json, names) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(json) else {
        return;
    };
    let path = Path::new("/kaniko/.docker/config.json");
    let Ok(config) = DockerConfig::parse(text, path) else {
        return;
    };
    let names = String::from_utf8_lossy(names);
    let names: Vec<&str> = names.lines().take(16).collect();
    // The config reader skips unknown fields without building them, so it accepts numbers
    // (`1e999`) a `Value` cannot hold; such a file has no `Value` to compare against.
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        for name in names {
            let _ = (config.auth_for(name), config.helper_for(name));
        }
        return;
    };
    let empty = serde_json::Map::new();
    let auths = value
        .get("auths")
        .and_then(|a| a.as_object())
        .unwrap_or(&empty);
    let helpers = value
        .get("credHelpers")
        .and_then(|a| a.as_object())
        .unwrap_or(&empty);

    // The config with every secret field removed must print the same: Debug shows no secret.
    let mut stripped = value.clone();
    if let Some(entries) = stripped.get_mut("auths").and_then(|a| a.as_object_mut()) {
        for entry in entries.values_mut().filter_map(|e| e.as_object_mut()) {
            for field in ["auth", "password", "identitytoken", "registrytoken"] {
                entry.remove(field);
            }
        }
    }
    let stripped =
        DockerConfig::parse(&stripped.to_string(), path).expect("a config without secrets parses");
    assert_eq!(
        format!("{config:?}"),
        format!("{stripped:?}"),
        "a secret is in Debug"
    );

    for (key, entry) in auths {
        // The same entry alone in a config gives the credential the exact key must find.
        let alone = serde_json::json!({ "auths": { key.as_str(): entry } }).to_string();
        let alone = DockerConfig::parse(&alone, path).expect("an entry that parsed parses alone");
        let found = config.auth_for(key);
        assert_eq!(
            found,
            alone.auth_for(key),
            "auths key {key:?} finds another entry"
        );
        if let Some(credential) = found {
            assert_eq!(
                format!("{credential:?}"),
                format!("{:?}", without_secrets(credential)),
                "a secret is in the credential's Debug"
            );
        }
    }

    for name in names {
        let normalised = normalize_registry(name);
        assert_eq!(
            normalize_registry(&normalised),
            normalised,
            "normalisation is not idempotent"
        );
        let _ = config.auth_for(name);
        let _ = config.helper_for(name);
        let named_exactly = |n: &str| auths.contains_key(n) || helpers.contains_key(n);
        if !named_exactly(name) && !named_exactly(&normalised) {
            assert_eq!(
                config.auth_for(name),
                config.auth_for(&normalised),
                "{name:?} and {normalised:?} find different credentials"
            );
            assert_eq!(
                config.helper_for(name),
                config.helper_for(&normalised),
                "{name:?} and {normalised:?} find different helpers"
            );
        }
    }
});
