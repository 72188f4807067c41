//! Go's `path.Clean` and `filepath.Match` semantics on slash-separated paths.
//!
//! Dockerfiles and `.dockerignore` files are written for Docker, whose matching is Go's; users
//! rely on its exact rules (`*` never crosses `/` but does match a leading dot, `[^a-z]`
//! classes, `\` escapes, a `-` or `]` first in a class is a syntax error). Reimplementing them
//! here keeps a pattern meaning the same thing in Kiln as in Docker.

/// Why a pattern is malformed (Go's `filepath.ErrBadPattern`, with a reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPattern(pub &'static str);

impl std::fmt::Display for BadPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Lexically cleans a slash-separated path as Go's `path.Clean` does: collapses repeated
/// slashes, removes `.` elements, resolves `..` against preceding elements (dropping it at the
/// root of a rooted path) and strips a trailing slash. The empty path becomes `"."`.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Whether `pattern` contains any of Go's `filepath.Match` meta characters.
pub fn has_meta(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '\\'])
}

/// Reports whether `name` matches the shell pattern `pattern` with Go's `filepath.Match`
/// rules: `*` matches any run of non-`/` characters, `?` one non-`/` character, `[...]` a
/// character class (`^` negates, `a-z` ranges, `\` escapes), and `\c` the character `c`.
///
/// As in Go, a malformed pattern is reported even when the name fails to match early.
pub fn go_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let mut pattern: Vec<char> = pattern.chars().collect();
    let mut name: Vec<char> = name.chars().collect();
    'outer: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(&pattern);
        let (chunk, rest) = (chunk.to_vec(), rest.to_vec());
        pattern = rest;
        if star && chunk.is_empty() {
            // A trailing star matches the rest of the name unless it holds a separator.
            return Ok(!name.contains(&'/'));
        }
        let attempt = match_chunk(&chunk, &name);
        if let Ok(Some(remaining)) = &attempt {
            if remaining.is_empty() || !pattern.is_empty() {
                name = remaining.to_vec();
                continue;
            }
        }
        attempt?;
        if star {
            // Let the star swallow more and more of the name, never past a separator.
            let mut i = 0;
            while i < name.len() && name[i] != '/' {
                match match_chunk(&chunk, &name[i + 1..])? {
                    Some(remaining) => {
                        if pattern.is_empty() && !remaining.is_empty() {
                            i += 1;
                            continue;
                        }
                        name = remaining.to_vec();
                        continue 'outer;
                    }
                    None => i += 1,
                }
            }
        }
        // No match; still report a syntax error further on in the pattern.
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(&pattern);
            match_chunk(chunk, &[])?;
            pattern = rest.to_vec();
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

/// Splits off the next chunk: leading stars (returned as a flag) then everything up to the next
/// unescaped star outside a character class.
fn scan_chunk(pattern: &[char]) -> (bool, &[char], &[char]) {
    let mut start = 0;
    while start < pattern.len() && pattern[start] == '*' {
        start += 1;
    }
    let star = start > 0;
    let pattern = &pattern[start..];
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            '\\' if i + 1 < pattern.len() => i += 1,
            '[' => in_range = true,
            ']' => in_range = false,
            '*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &pattern[..i], &pattern[i..])
}

/// Matches one star-free chunk against the start of `name`; returns what is left of the name,
/// or `None` on mismatch. Keeps scanning after a mismatch so that syntax errors surface.
fn match_chunk<'a>(chunk: &[char], name: &'a [char]) -> Result<Option<&'a [char]>, BadPattern> {
    let mut failed = false;
    let mut chunk = chunk;
    let mut s = name;
    while !chunk.is_empty() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match chunk[0] {
            '[' => {
                let current = if failed {
                    None
                } else {
                    let c = s[0];
                    s = &s[1..];
                    Some(c)
                };
                chunk = &chunk[1..];
                let negated = chunk.first() == Some(&'^');
                if negated {
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut ranges = 0;
                loop {
                    if chunk.first() == Some(&']') && ranges > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = class_char(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk.first() == Some(&'-') {
                        let (h, rest) = class_char(&chunk[1..])?;
                        hi = h;
                        chunk = rest;
                    }
                    if let Some(c) = current {
                        if lo <= c && c <= hi {
                            matched = true;
                        }
                    }
                    ranges += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            '?' => {
                if !failed {
                    if s[0] == '/' {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
            '\\' => {
                chunk = &chunk[1..];
                if chunk.is_empty() {
                    return Err(BadPattern("trailing backslash"));
                }
                if !failed {
                    if chunk[0] != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
            literal => {
                if !failed {
                    if literal != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    Ok(if failed { None } else { Some(s) })
}

/// Reads one (possibly escaped) character of a class.
fn class_char(chunk: &[char]) -> Result<(char, &[char]), BadPattern> {
    match chunk.first() {
        None => Err(BadPattern("unterminated character class")),
        Some('-') | Some(']') => Err(BadPattern("misplaced '-' or ']' in character class")),
        Some('\\') => match chunk.get(1) {
            Some(c) => Ok((*c, &chunk[2..])),
            None => Err(BadPattern("trailing backslash in character class")),
        },
        Some(c) => Ok((*c, &chunk[1..])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_go() {
        for (input, want) in [
            ("", "."),
            (".", "."),
            ("./a", "a"),
            ("a/", "a"),
            ("a//b", "a/b"),
            ("a/./b/", "a/b"),
            ("a/../b", "b"),
            ("../a", "../a"),
            ("a/../..", ".."),
            ("/../a", "/a"),
            ("/", "/"),
            ("//a/b/../c", "/a/c"),
        ] {
            assert_eq!(clean(input), want, "clean({input:?})");
        }
    }

    #[test]
    fn match_follows_go() {
        // Cases from Go's documented behaviour of filepath.Match.
        let cases: &[(&str, &str, Result<bool, ()>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("*x", "xxx", Ok(true)),
            ("*", ".hidden", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[-]", "-", Err(())),
            ("[x-]", "x", Err(())),
            ("[]a]", "]", Err(())),
            ("[", "a", Err(())),
            ("[^", "a", Err(())),
            ("a[", "x", Err(())),
            ("*x[", "xxx", Err(())),
            ("\\", "a", Err(())),
            ("a*", "a/", Ok(false)),
            ("*/b", "a/b", Ok(true)),
            ("?", "/", Ok(false)),
        ];
        for (pattern, name, want) in cases {
            let got = go_match(pattern, name).map_err(|_| ());
            assert_eq!(&got, want, "go_match({pattern:?}, {name:?})");
        }
    }
}
