//! `WWW-Authenticate` challenges (RFC 7235) as registries send them.

use std::collections::BTreeMap;

/// How a registry asks to be authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic with the registry's own user database.
    Basic {
        /// The protection space, informational only.
        realm: Option<String>,
    },
    /// The token flow: get a bearer token from `realm` for `service` and a scope.
    Bearer {
        /// The token server's URL.
        realm: String,
        /// The `service` parameter to pass to the token server.
        service: Option<String>,
        /// The scope the registry asked for, if it named one.
        scope: Option<String>,
        /// The `error` parameter, e.g. `insufficient_scope`.
        error: Option<String>,
    },
}

impl Challenge {
    /// Picks the challenge Kiln can answer from the `WWW-Authenticate` header values of a
    /// response: Bearer is preferred over Basic; other schemes are ignored.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Challenge> {
        let mut basic = None;
        for value in values {
            for (scheme, params) in parse_header(value) {
                if scheme.eq_ignore_ascii_case("bearer") {
                    if let Some(realm) = params.get("realm").filter(|r| !r.is_empty()) {
                        return Some(Challenge::Bearer {
                            realm: realm.clone(),
                            service: params.get("service").cloned(),
                            scope: params.get("scope").cloned(),
                            error: params.get("error").cloned(),
                        });
                    }
                } else if scheme.eq_ignore_ascii_case("basic") && basic.is_none() {
                    basic = Some(Challenge::Basic {
                        realm: params.get("realm").cloned(),
                    });
                }
            }
        }
        basic
    }
}

/// Splits one header value into `(scheme, params)` pairs. A header may hold several
/// challenges; a new one starts at a bare token that is not followed by `=`.
fn parse_header(value: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut out: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let bytes = value.as_bytes();
    let mut pos = 0;
    let skip = |pos: &mut usize, pred: &dyn Fn(u8) -> bool| {
        while *pos < bytes.len() && pred(bytes[*pos]) {
            *pos += 1;
        }
    };
    let is_token = |b: u8| !(b.is_ascii_whitespace() || b == b',' || b == b'=' || b == b'"');
    while pos < bytes.len() {
        skip(&mut pos, &|b| b.is_ascii_whitespace() || b == b',');
        let start = pos;
        skip(&mut pos, &is_token);
        if start == pos {
            // A stray character; step over it so parsing always advances.
            pos += 1;
            continue;
        }
        let word = &value[start..pos];
        skip(&mut pos, &|b| b == b' ' || b == b'\t');
        if pos < bytes.len() && bytes[pos] == b'=' {
            pos += 1;
            skip(&mut pos, &|b| b == b' ' || b == b'\t');
            let param_value = if pos < bytes.len() && bytes[pos] == b'"' {
                pos += 1;
                let mut text = String::new();
                while pos < bytes.len() && bytes[pos] != b'"' {
                    if bytes[pos] == b'\\' && pos + 1 < bytes.len() {
                        pos += 1;
                    }
                    let ch_len = utf8_len(bytes[pos]);
                    text.push_str(&value[pos..(pos + ch_len).min(bytes.len())]);
                    pos += ch_len;
                }
                pos += 1;
                text
            } else {
                let v_start = pos;
                skip(&mut pos, &|b| b != b',' && !b.is_ascii_whitespace());
                value[v_start..pos].to_owned()
            };
            if let Some((_, params)) = out.last_mut() {
                params.insert(word.to_ascii_lowercase(), param_value);
            }
        } else {
            out.push((word.to_owned(), BTreeMap::new()));
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_with_all_parameters() {
        let c = Challenge::from_headers([
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        ]);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
                error: Some("insufficient_scope".into()),
            })
        );
    }

    #[test]
    fn parses_basic_and_prefers_bearer() {
        assert_eq!(
            Challenge::from_headers([r#"Basic realm="Registry Realm""#]),
            Some(Challenge::Basic {
                realm: Some("Registry Realm".into())
            })
        );
        let both = Challenge::from_headers([
            r#"Basic realm="x", Bearer realm="http://127.0.0.1:1/t", service=svc"#,
        ]);
        assert!(
            matches!(both, Some(Challenge::Bearer { ref service, .. }) if service.as_deref() == Some("svc"))
        );
    }

    #[test]
    fn ignores_unknown_and_malformed() {
        assert_eq!(Challenge::from_headers(["Negotiate abc"]), None);
        assert_eq!(Challenge::from_headers(["Bearer service=\"x\""]), None);
        assert_eq!(Challenge::from_headers(["=,\"\""]), None);
        assert_eq!(
            Challenge::from_headers([r#"Bearer realm="a\"b""#]),
            Some(Challenge::Bearer {
                realm: "a\"b".into(),
                service: None,
                scope: None,
                error: None
            })
        );
    }
}
