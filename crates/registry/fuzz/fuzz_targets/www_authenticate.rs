//! Arbitrary text as the `WWW-Authenticate` header values of a registry response (one value
//! per line). Choosing a challenge must never panic, a Bearer challenge always has a realm to
//! ask, and a chosen challenge written back as a header (parameters quoted and escaped, as a
//! registry would send them) must be read back as the same challenge.

#![no_main]

use kiln_registry::Challenge;
use libfuzzer_sys::fuzz_target;

/// An RFC 7230 quoted-string holding `value`.
fn quoted(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn render(challenge: &Challenge) -> String {
    match challenge {
        Challenge::Basic { realm } => match realm {
            Some(realm) => format!("Basic realm={}", quoted(realm)),
            None => "Basic".to_owned(),
        },
        Challenge::Bearer {
            realm,
            service,
            scope,
            error,
        } => {
            let mut out = format!("Bearer realm={}", quoted(realm));
            for (name, value) in [("service", service), ("scope", scope), ("error", error)] {
                if let Some(value) = value {
                    out.push_str(&format!(",{name}={}", quoted(value)));
                }
            }
            out
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.lines().collect();
    let chosen = Challenge::from_headers(values.iter().copied());
    let Some(challenge) = chosen else {
        return;
    };
    if let Challenge::Bearer { realm, .. } = &challenge {
        assert!(
            !realm.is_empty(),
            "a Bearer challenge without a realm was chosen"
        );
    }
    let header = render(&challenge);
    let again = Challenge::from_headers([header.as_str()]);
    assert_eq!(
        again.as_ref(),
        Some(&challenge),
        "{header:?} (from {values:?}) reads back differently"
    );
});
