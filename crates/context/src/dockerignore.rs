//! `.dockerignore` files with Docker's semantics.
//!
//! Reading follows Docker's ignore-file reader: a line whose first character is `#` is a
//! comment, surrounding whitespace is trimmed, blank lines are skipped, a leading `!` marks an
//! exception, and each pattern is cleaned like a path with a leading `/` dropped (so `/foo`,
//! `./foo` and `foo/` all mean `foo`).
//!
//! Matching follows moby's pattern matcher: `*` and `?` never cross `/`, `**` spans any number
//! of directories (`**/` may also match nothing), character classes and `\` escapes are Go's,
//! a pattern that matches a directory matches everything under it, and the last matching
//! pattern decides. A directory that is excluded is still walked when an exception pattern
//! names something beneath it (Docker's rule: the exception's text starts with the directory's
//! path), so `dir` + `!dir/keep` keeps `dir/keep` and nothing else of `dir`.

use std::path::{Path, PathBuf};

use regex::Regex;

use kiln_fs::resolve::{Root, RootError};

use crate::error::{ContextError, Result};
use crate::pattern::{clean, go_match};

/// How one pattern is compared with a path; the literal forms avoid a regex for the common
/// `name`, `dir/**` and `**/name` patterns and reproduce the matcher's behaviour for them.
#[derive(Debug, Clone)]
enum Matcher {
    /// The path equals the pattern.
    Exact,
    /// The path starts with the given prefix (a pattern ending in `**`).
    Prefix(String),
    /// The path ends with the given suffix (a pattern starting with `**`).
    Suffix(String),
    /// Anything else, compiled from the pattern.
    Regex(Regex),
}

/// One line of a `.dockerignore` file, compiled.
#[derive(Debug, Clone)]
pub struct IgnorePattern {
    text: String,
    exception: bool,
    matcher: Matcher,
}

impl IgnorePattern {
    /// Compiles an already-normalised pattern (cleaned, without the `!`).
    fn compile(text: &str, exception: bool) -> std::result::Result<Self, String> {
        go_match(text, ".").map_err(|e| e.to_string())?;
        let matcher = translate(text).map_err(|e| e.to_string())?;
        Ok(IgnorePattern {
            text: text.to_owned(),
            exception,
            matcher,
        })
    }

    /// The cleaned pattern text, without a leading `!`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether this is an exception (`!pattern`) that re-includes what earlier lines excluded.
    pub fn is_exception(&self) -> bool {
        self.exception
    }

    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => path == self.text,
            Matcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => {
                path.ends_with(suffix.as_str())
                    || suffix
                        .strip_prefix('/')
                        .is_some_and(|without_slash| path == without_slash)
            }
            Matcher::Regex(regex) => regex.is_match(path),
        }
    }
}

/// Builds the matcher for a cleaned pattern, classifying it the way moby's matcher does.
fn translate(pattern: &str) -> std::result::Result<Matcher, regex::Error> {
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let chars: Vec<char> = pattern.chars().collect();
    let mut kind = Kind::Exact;
    let mut re = String::from("^");
    let mut i = 0;
    let mut token = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = Kind::Regex;
                    }
                } else {
                    re.push_str("(.*/)?");
                    kind = Kind::Regex;
                }
                if token == 0 {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                kind = Kind::Regex;
            }
            '?' => {
                re.push_str("[^/]");
                kind = Kind::Regex;
            }
            '\\' => {
                if let Some(&next) = chars.get(i) {
                    i += 1;
                    re.push_str(&regex::escape(&next.to_string()));
                    kind = Kind::Regex;
                } else {
                    re.push_str(r"\\");
                }
            }
            '[' => {
                i = translate_class(&chars, i, &mut re);
                kind = Kind::Regex;
            }
            literal => re.push_str(&regex::escape(&literal.to_string())),
        }
        token += 1;
    }
    Ok(match kind {
        Kind::Exact => Matcher::Exact,
        Kind::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_owned()),
        Kind::Suffix => Matcher::Suffix(pattern[2..].to_owned()),
        Kind::Regex => {
            re.push('$');
            Matcher::Regex(Regex::new(&re)?)
        }
    })
}

/// Translates a Go character class starting after its `[` (already validated by
/// [`go_match`]) into a regex class; returns the index after the closing `]`.
fn translate_class(chars: &[char], mut i: usize, re: &mut String) -> usize {
    re.push('[');
    if chars.get(i) == Some(&'^') {
        re.push('^');
        i += 1;
    }
    let mut first = true;
    while i < chars.len() {
        if chars[i] == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        let take = |i: &mut usize| {
            let c = if chars[*i] == '\\' && *i + 1 < chars.len() {
                *i += 1;
                chars[*i]
            } else {
                chars[*i]
            };
            *i += 1;
            regex::escape(&c.to_string())
        };
        let lo = take(&mut i);
        re.push_str(&lo);
        if chars.get(i) == Some(&'-') && i + 1 < chars.len() {
            i += 1;
            let hi = take(&mut i);
            re.push('-');
            re.push_str(&hi);
        }
    }
    re.push(']');
    i
}

/// A parsed `.dockerignore`: which context paths are left out of COPY/ADD.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<IgnorePattern>,
    file: Option<PathBuf>,
}

impl DockerIgnore {
    /// An ignore list that excludes nothing (no `.dockerignore` file).
    pub fn empty() -> Self {
        DockerIgnore::default()
    }

    /// Parses the text of an ignore file; `file` is only used to name it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let (exception, rest) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let error = |reason: String| ContextError::IgnorePattern {
                file: file.to_owned(),
                line: index + 1,
                pattern: raw.to_owned(),
                reason,
            };
            if rest.is_empty() {
                return Err(error("an exception needs a pattern after '!'".to_owned()));
            }
            let mut cleaned = clean(rest);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            patterns.push(IgnorePattern::compile(&cleaned, exception).map_err(error)?);
        }
        Ok(DockerIgnore {
            patterns,
            file: Some(file.to_owned()),
        })
    }

    /// Loads the ignore file that applies to a build: `<dockerfile>.dockerignore` beside the
    /// Dockerfile when it exists (Docker's per-Dockerfile ignore file), otherwise
    /// `.dockerignore` at the context root, otherwise nothing is ignored.
    ///
    /// Files inside the context are read through `context` (a symlinked `.dockerignore` is
    /// followed inside the context, never to the host); a Dockerfile the user named outside the
    /// context has its ignore file read from beside it, where the user put it.
    pub fn load(context: &Root, dockerfile: Option<&Path>) -> Result<Self> {
        let mut candidates = Vec::new();
        if let Some(dockerfile) = dockerfile {
            if let Some(name) = dockerfile.file_name() {
                let mut specific = name.to_owned();
                specific.push(".dockerignore");
                candidates.push(dockerfile.with_file_name(specific));
            }
        }
        candidates.push(context.path().join(".dockerignore"));
        for candidate in candidates {
            let read = match candidate.strip_prefix(context.path()) {
                Ok(inside) => context.open_file(inside).and_then(|mut file| {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut file, &mut bytes)
                        .map(|_| bytes)
                        .map_err(|e| RootError::Io {
                            op: "read",
                            root: context.path().to_path_buf(),
                            path: inside.to_path_buf(),
                            source: e,
                        })
                }),
                Err(_) => std::fs::read(&candidate).map_err(|e| RootError::Io {
                    op: "read",
                    root: PathBuf::from("/"),
                    path: candidate.clone(),
                    source: e,
                }),
            };
            match read {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    return DockerIgnore::parse(&text, &candidate);
                }
                Err(e) if e.is_not_found() => continue,
                Err(error) => {
                    return Err(ContextError::Contained {
                        source_name: "dockerignore".to_owned(),
                        error,
                    })
                }
            }
        }
        Ok(DockerIgnore::empty())
    }

    /// The file these patterns came from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The compiled patterns, in file order.
    pub fn patterns(&self) -> &[IgnorePattern] {
        &self.patterns
    }

    /// Whether the context-relative, slash-separated `path` is excluded: the last pattern that
    /// matches the path or one of its parent directories decides.
    pub fn is_excluded(&self, path: &str) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        let path = clean(path);
        if path == "." {
            return false;
        }
        let parents: Vec<&str> = match path.rfind('/') {
            Some(slash) => path[..slash].split('/').collect(),
            None => Vec::new(),
        };
        let mut excluded = false;
        for pattern in &self.patterns {
            // An exclusion cannot change an already-excluded path, nor an exception an
            // included one.
            if pattern.exception != excluded {
                continue;
            }
            let mut matched = pattern.matches(&path);
            if !matched {
                let mut ancestor = String::new();
                for part in &parents {
                    if !ancestor.is_empty() {
                        ancestor.push('/');
                    }
                    ancestor.push_str(part);
                    if pattern.matches(&ancestor) {
                        matched = true;
                        break;
                    }
                }
            }
            if matched {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// For an excluded directory, whether it must still be walked because an exception
    /// pattern names something inside it.
    pub fn has_exception_under(&self, dir: &str) -> bool {
        let dir_slash = format!("{}/", clean(dir));
        self.patterns
            .iter()
            .filter(|p| p.exception)
            .any(|p| format!("{}/", p.text).starts_with(&dir_slash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text, Path::new(".dockerignore")).unwrap()
    }

    #[test]
    fn reading_normalises_like_docker() {
        let parsed = ignore(
            "\u{feff}test1\n/test2\n/a/file/here\n\nlastfile\n# comment\n ! /inverted/abs/path\n./dot/\n",
        );
        let texts: Vec<(bool, &str)> = parsed
            .patterns()
            .iter()
            .map(|p| (p.is_exception(), p.text()))
            .collect();
        assert_eq!(
            texts,
            vec![
                (false, "test1"),
                (false, "test2"),
                (false, "a/file/here"),
                (false, "lastfile"),
                (true, "inverted/abs/path"),
                (false, "dot"),
            ]
        );
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let err = DockerIgnore::parse("ok\n!\n", Path::new("ctx/.dockerignore")).unwrap_err();
        assert!(err.to_string().starts_with("ctx/.dockerignore:2:"), "{err}");
        let err = DockerIgnore::parse("a\n\nb[\n", Path::new("x.dockerignore")).unwrap_err();
        assert!(err.to_string().starts_with("x.dockerignore:3:"), "{err}");
    }

    #[test]
    fn matcher_kinds_behave_like_moby() {
        let cases: &[(&str, &str, bool)] = &[
            ("foo", "foo", true),
            ("foo", "foo/bar", true),
            ("foo", "foobar", false),
            ("foo/**", "foo/bar/baz", true),
            ("foo/**", "foo", false),
            ("foo**", "foobar", true),
            ("**", "anything/at/all", true),
            ("**/foo", "foo", true),
            ("**/foo", "a/b/foo", true),
            ("**/foo", "a/bfoo", false),
            ("**/*.md", "a/b/c.md", true),
            ("**/*.md", "c.md", true),
            ("*.md", "a/c.md", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/xb", false),
            ("dir/*", "dir/x", true),
            ("dir/*", "dir/x/y", true),
            ("[a-c]?.txt", "bz.txt", true),
            ("[^a-c]?.txt", "bz.txt", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("a.b", "axb", false),
            ("a+(b)", "a+(b)", true),
        ];
        for (pattern, path, want) in cases {
            assert_eq!(
                ignore(pattern).is_excluded(path),
                *want,
                "{pattern:?} vs {path:?}"
            );
        }
    }
}
