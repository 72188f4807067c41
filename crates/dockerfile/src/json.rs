//! The JSON (exec) form of RUN, CMD, ENTRYPOINT, SHELL, COPY, ADD and VOLUME.
//!
//! BuildKit decodes the first JSON value after the instruction with Go's `encoding/json`
//! decoder: anything after that value is ignored, a syntax error makes the parser fall back to
//! the shell form, and a well-formed array holding anything but strings is an error. This module
//! reproduces those three outcomes without a JSON library.

/// Outcome of reading an exec-form argument list.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum JsonArray {
    /// Not JSON (or not an array): the caller falls back to the shell form.
    NotJson,
    /// A well-formed array with an element that is not a string.
    NotStringArray,
    /// A well-formed array of strings.
    Strings(Vec<String>),
}

/// Same nesting bound as Go's decoder, so pathological input cannot exhaust anything.
const MAX_DEPTH: usize = 10_000;

/// Reads `rest` (left-trimmed by the caller) as a JSON array of strings.
pub(crate) fn parse_string_array(rest: &str) -> JsonArray {
    let b = rest.as_bytes();
    if b.first() != Some(&b'[') {
        return JsonArray::NotJson;
    }
    let mut i = ws(b, 1);
    let mut out = Vec::new();
    let mut all_strings = true;
    if b.get(i) == Some(&b']') {
        return JsonArray::Strings(out);
    }
    loop {
        i = ws(b, i);
        if b.get(i) == Some(&b'"') {
            match string(b, i) {
                Some((s, next)) => {
                    out.push(s);
                    i = next;
                }
                None => return JsonArray::NotJson,
            }
        } else {
            match skip_value(b, i) {
                Some(next) => {
                    all_strings = false;
                    i = next;
                }
                None => return JsonArray::NotJson,
            }
        }
        i = ws(b, i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => break,
            _ => return JsonArray::NotJson,
        }
    }
    if all_strings {
        JsonArray::Strings(out)
    } else {
        JsonArray::NotStringArray
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Skips one JSON value starting at `i`, returning the index after it. Iterative so that
/// deeply nested input costs heap, not stack.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    let mut stack: Vec<u8> = Vec::new();
    loop {
        // A value is expected at `i`.
        i = ws(b, i);
        match *b.get(i)? {
            b'[' => {
                i = ws(b, i + 1);
                if b.get(i) == Some(&b']') {
                    i += 1;
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return None;
                    }
                    stack.push(b'[');
                    continue;
                }
            }
            b'{' => {
                i = ws(b, i + 1);
                if b.get(i) == Some(&b'}') {
                    i += 1;
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return None;
                    }
                    i = object_key(b, i)?;
                    stack.push(b'{');
                    continue;
                }
            }
            b'"' => i = string(b, i)?.1,
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            b'-' | b'0'..=b'9' => i = number(b, i)?,
            _ => return None,
        }
        // A value ended: close containers until one expects another element.
        loop {
            let Some(&top) = stack.last() else {
                return Some(i);
            };
            i = ws(b, i);
            match (top, *b.get(i)?) {
                (_, b',') => {
                    i += 1;
                    if top == b'{' {
                        i = object_key(b, ws(b, i))?;
                    }
                    break;
                }
                (b'[', b']') | (b'{', b'}') => {
                    stack.pop();
                    i += 1;
                }
                _ => return None,
            }
        }
    }
}

/// Reads `"key"` and the following `:`.
fn object_key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let (_, i) = string(b, i)?;
    let i = ws(b, i);
    (b.get(i) == Some(&b':')).then_some(i + 1)
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b.get(i..i + word.len())
        .filter(|s| *s == word)
        .map(|_| i + word.len())
}

fn number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => {
            while matches!(b.get(i), Some(b'0'..=b'9')) {
                i += 1;
            }
        }
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !matches!(b.get(i), Some(b'0'..=b'9')) {
            return None;
        }
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !matches!(b.get(i), Some(b'0'..=b'9')) {
            return None;
        }
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
    }
    Some(i)
}

fn hex4(b: &[u8], i: usize) -> Option<u32> {
    let digits = b.get(i..i + 4)?;
    let s = std::str::from_utf8(digits).ok()?;
    if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Decodes the string starting at the `"` at `i`; returns it and the index after the closing
/// quote. Lone surrogates become U+FFFD, as in Go.
fn string(b: &[u8], i: usize) -> Option<(String, usize)> {
    let mut out: Vec<u8> = Vec::new();
    let mut i = i + 1;
    loop {
        let c = *b.get(i)?;
        match c {
            b'"' => {
                // Escapes only ever add whole characters, so the bytes stay valid UTF-8.
                return String::from_utf8(out).ok().map(|s| (s, i + 1));
            }
            b'\\' => {
                let e = *b.get(i + 1)?;
                i += 2;
                let ch = match e {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    b'u' => {
                        let first = hex4(b, i)?;
                        i += 4;
                        if (0xD800..0xE000).contains(&first) {
                            let pair = if b.get(i..i + 2) == Some(b"\\u") {
                                hex4(b, i + 2).filter(|lo| {
                                    (0xD800..0xDC00).contains(&first)
                                        && (0xDC00..0xE000).contains(lo)
                                })
                            } else {
                                None
                            };
                            match pair {
                                Some(lo) => {
                                    i += 6;
                                    char::from_u32(
                                        0x10000 + ((first - 0xD800) << 10) + (lo - 0xDC00),
                                    )
                                    .unwrap_or('\u{FFFD}')
                                }
                                None => '\u{FFFD}',
                            }
                        } else {
                            char::from_u32(first).unwrap_or('\u{FFFD}')
                        }
                    }
                    _ => return None,
                };
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
            c if c < 0x20 => return None,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> JsonArray {
        JsonArray::Strings(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn arrays() {
        assert_eq!(parse_string_array("[]"), strings(&[]));
        assert_eq!(
            parse_string_array("[ \"a\" , \"b\" ]"),
            strings(&["a", "b"])
        );
        assert_eq!(parse_string_array("[\"a\"] trailing"), strings(&["a"]));
        assert_eq!(
            parse_string_array(r#"["\" \\ \/ \b \f \n \r \t \u0000 \ud83d\ude00 \ud800"]"#),
            strings(&["\" \\ / \u{8} \u{c} \n \r \t \u{0} 😀 \u{FFFD}"])
        );
        assert_eq!(
            parse_string_array("[1, {\"a\": [null]}]"),
            JsonArray::NotStringArray
        );
        assert_eq!(
            parse_string_array("[\"a\", [\"b\"]]"),
            JsonArray::NotStringArray
        );
        assert_eq!(parse_string_array("['a']"), JsonArray::NotJson);
        assert_eq!(parse_string_array("[\"a\""), JsonArray::NotJson);
        assert_eq!(parse_string_array("[\"a\",]"), JsonArray::NotJson);
        assert_eq!(parse_string_array("[01]"), JsonArray::NotJson);
        assert_eq!(parse_string_array("[\"a\tb\"]"), JsonArray::NotJson);
        assert_eq!(parse_string_array("x"), JsonArray::NotJson);
    }
}
