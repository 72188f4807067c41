//! Arbitrary bytes as a `.dockerignore` file followed (after a NUL byte) by context paths, one
//! per line. Parsing and matching must not panic, and matching must stay consistent:
//!
//! - a pattern without `**` matches a path exactly when Go's `filepath.Match` (kiln-context's
//!   `go_match`) matches the path or one of its parent directories;
//! - escaping a literal character (`a` → `\a`) changes no decision, which compares the literal
//!   fast paths (`name`, `dir/**`, `**/name`) with the general regex translation (except for
//!   moby's `**suffix` quirk, kept on purpose);
//! - without exception patterns, everything under an excluded directory is excluded.

#![no_main]

use std::path::Path;

use kiln_context::pattern::{clean, go_match};
use kiln_context::DockerIgnore;
use libfuzzer_sys::fuzz_target;

/// The same pattern with its first literal alphanumeric character escaped (before any
/// character class, where an escape would mean something else), if it has one.
fn escape_one_literal(text: &str) -> Option<String> {
    let mut previous = None;
    for (at, c) in text.char_indices() {
        if c == '[' {
            return None;
        }
        if c.is_ascii_alphanumeric() && previous != Some('\\') {
            return Some(format!("{}\\{}", &text[..at], &text[at..]));
        }
        previous = Some(if previous == Some('\\') { ' ' } else { c });
    }
    None
}

/// Whether `text` read back as a line of an ignore file gives the same pattern: cleaning can
/// leave whitespace (`a /.` is `a `) or a leading `!` or `#` (`./!a`) that a line would read
/// differently.
fn reads_back(text: &str) -> bool {
    !text.is_empty() && text.trim() == text && !text.starts_with(['#', '!', '\u{feff}'])
}

/// Moby's matcher takes a pattern that starts with `**` and has only literals after it as a
/// plain suffix (`**.log` matches `a/b.log`), which its regex form would not match; Kiln keeps
/// that quirk, so such a pattern is not compared with its escaped form.
fn moby_suffix_quirk(text: &str) -> bool {
    text.strip_prefix("**")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
}

/// `path` and each of its parent directories.
fn self_and_ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .map(|(at, _)| &path[..at])
        .chain(std::iter::once(path))
}

fuzz_target!(|data: &[u8]| {
    let (file, paths) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(file);
    let name = Path::new(".dockerignore");
    let Ok(ignore) = DockerIgnore::parse(&text, name) else {
        return;
    };
    let patterns = ignore.patterns();
    if patterns.len() > 16 {
        return;
    }

    let paths = String::from_utf8_lossy(paths);
    let mut candidates: Vec<String> = paths.lines().take(16).map(clean).collect();
    candidates.extend(patterns.iter().map(|p| p.text().to_owned()));
    candidates.retain(|p| p != "." && !p.starts_with('/') && !p.starts_with(".."));

    // Each pattern on its own against Go's matcher.
    for pattern in patterns {
        let text = pattern.text();
        if text.contains("**") || !reads_back(text) {
            continue;
        }
        let Ok(alone) = DockerIgnore::parse(text, name) else {
            panic!("pattern {text:?} does not parse on its own");
        };
        for path in &candidates {
            let expected = self_and_ancestors(path)
                .any(|part| go_match(text, part).expect("validated when parsed"));
            assert_eq!(
                alone.is_excluded(path),
                expected,
                "pattern {text:?} and Go's matcher disagree on {path:?}"
            );
        }
    }

    // The whole file with one literal of each pattern escaped decides every path the same.
    let escaped: Option<Vec<String>> = patterns
        .iter()
        .map(|p| {
            if !reads_back(p.text()) {
                return None;
            }
            let escaped = (!moby_suffix_quirk(p.text()))
                .then(|| escape_one_literal(p.text()))
                .flatten();
            let body = escaped.unwrap_or_else(|| p.text().to_owned());
            Some(if p.is_exception() {
                format!("!{body}")
            } else {
                body
            })
        })
        .collect();
    if let Some(lines) = escaped {
        let escaped = DockerIgnore::parse(&lines.join("\n"), name)
            .unwrap_or_else(|e| panic!("escaped patterns {lines:?} do not parse: {e}"));
        for path in &candidates {
            assert_eq!(
                ignore.is_excluded(path),
                escaped.is_excluded(path),
                "{path:?} is decided differently by {lines:?}"
            );
        }
    }

    let has_exceptions = patterns.iter().any(|p| p.is_exception());
    for path in &candidates {
        let excluded = ignore.is_excluded(path);
        let _ = ignore.has_exception_under(path);
        if !has_exceptions && excluded {
            for child in ["x", "x/y", ".hidden"] {
                let child = format!("{path}/{child}");
                assert!(
                    ignore.is_excluded(&child),
                    "{path:?} is excluded but {child:?} is not"
                );
            }
        }
    }
});
