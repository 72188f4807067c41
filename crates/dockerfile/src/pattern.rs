//! Shell patterns of `${V#p}`, `${V%p}` and `${V/p/r}`.
//!
//! BuildKit turns the pattern into a Go regular expression (`*` is `.*` or `.*?`, `?` is `.`,
//! no bracket expressions) and takes Go's leftmost-first match. This module matches the same
//! way with a memoised backtracking matcher, so the result is identical (including that `.` does
//! not match a newline) without a regex engine.

use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyChar,
    Star,
}

const MAX_PATTERN: usize = 1024;

/// A compiled pattern.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    tokens: Vec<Token>,
}

impl Pattern {
    /// Compiles `pattern`; `\` escapes `*`, `?` and `\`, and is dropped before `}` and `/`
    /// (which had to be escaped to be part of the `${...}`).
    pub(crate) fn compile(pattern: &str) -> Result<Self, String> {
        // The matcher recurses per token; real patterns are a few characters long.
        if pattern.chars().count() > MAX_PATTERN {
            return Err(format!("pattern longer than {MAX_PATTERN} characters"));
        }
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::AnyChar),
                '\\' => match chars.peek() {
                    Some('}') | Some('/') => {}
                    Some(&e @ ('*' | '?' | '\\')) => {
                        chars.next();
                        tokens.push(Token::Literal(e));
                    }
                    Some(&e) => return Err(format!("invalid escape '\\{e}'")),
                    None => return Err("invalid escape at end of pattern".to_string()),
                },
                c => tokens.push(Token::Literal(c)),
            }
        }
        Ok(Pattern { tokens })
    }

    fn reversed(&self) -> Self {
        let mut tokens = self.tokens.clone();
        tokens.reverse();
        Pattern { tokens }
    }

    /// End of the match starting exactly at `start`, with stars lazy or greedy.
    fn match_at(&self, value: &[char], start: usize, greedy: bool) -> Option<usize> {
        let mut failed = HashSet::new();
        let mut m = Matcher {
            tokens: &self.tokens,
            value,
            greedy,
            failed: &mut failed,
        };
        m.run(0, start)
    }

    /// `${V#p}` / `${V##p}`: removes the shortest (longest) matching prefix.
    pub(crate) fn trim_prefix(&self, value: &str, greedy: bool) -> String {
        let chars: Vec<char> = value.chars().collect();
        match self.match_at(&chars, 0, greedy) {
            Some(end) => chars[end..].iter().collect(),
            None => value.to_string(),
        }
    }

    /// `${V%p}` / `${V%%p}`: removes the shortest (longest) matching suffix, by matching the
    /// reversed pattern against the reversed value as BuildKit does.
    pub(crate) fn trim_suffix(&self, value: &str, greedy: bool) -> String {
        let mut chars: Vec<char> = value.chars().collect();
        chars.reverse();
        match self.reversed().match_at(&chars, 0, greedy) {
            Some(end) => {
                let mut kept: Vec<char> = chars[end..].to_vec();
                kept.reverse();
                kept.into_iter().collect()
            }
            None => value.to_string(),
        }
    }

    /// `${V/p/r}` and `${V//p/r}` (greedy stars, unanchored).
    pub(crate) fn replace(&self, value: &str, replacement: &str, all: bool) -> String {
        let chars: Vec<char> = value.chars().collect();
        let mut failed = HashSet::new();
        let mut out = String::new();
        let mut pos = 0;
        let mut last_match_end: Option<usize> = None;
        while pos <= chars.len() {
            let mut found = None;
            for start in pos..=chars.len() {
                let mut m = Matcher {
                    tokens: &self.tokens,
                    value: &chars,
                    greedy: true,
                    failed: &mut failed,
                };
                if let Some(end) = m.run(0, start) {
                    found = Some((start, end));
                    break;
                }
            }
            let Some((start, end)) = found else { break };
            if !all {
                out.extend(&chars[pos..start]);
                out.push_str(replacement);
                out.extend(&chars[end..]);
                return out;
            }
            // Go ignores an empty match right after the previous match.
            if start == end && last_match_end == Some(start) {
                if start < chars.len() {
                    out.push(chars[start]);
                }
                pos = start + 1;
                continue;
            }
            out.extend(&chars[pos..start]);
            out.push_str(&expand_template(replacement, &chars[start..end]));
            last_match_end = Some(end);
            if end == start {
                if start < chars.len() {
                    out.push(chars[start]);
                }
                pos = start + 1;
            } else {
                pos = end;
            }
        }
        if pos <= chars.len() {
            out.extend(&chars[pos.min(chars.len())..]);
        }
        out
    }
}

/// Go's `ReplaceAllString` treats the replacement as a template: `$$` is `$`, `$0`/`${0}` the
/// match, any other `$name` (no groups exist here) is empty, a malformed `$` stays literal.
fn expand_template(template: &str, matched: &[char]) -> String {
    let chars: Vec<char> = template.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                let close = chars[i + 2..].iter().position(|&c| c == '}');
                match close {
                    Some(n) if n > 0 && chars[i + 2..i + 2 + n].iter().all(|&c| is_name(c)) => {
                        let name: String = chars[i + 2..i + 2 + n].iter().collect();
                        if name == "0" {
                            out.extend(matched);
                        }
                        i += n + 3;
                    }
                    _ => {
                        out.push('$');
                        i += 1;
                    }
                }
            }
            Some(&c) if is_name(c) => {
                let n = chars[i + 1..].iter().take_while(|&&c| is_name(c)).count();
                let name: String = chars[i + 1..i + 1 + n].iter().collect();
                if name == "0" {
                    out.extend(matched);
                }
                i += n + 1;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

struct Matcher<'a> {
    tokens: &'a [Token],
    value: &'a [char],
    greedy: bool,
    /// States known not to match; the order of attempts is fixed, so a state's outcome is too.
    failed: &'a mut HashSet<(usize, usize)>,
}

impl Matcher<'_> {
    fn run(&mut self, ti: usize, vi: usize) -> Option<usize> {
        if ti == self.tokens.len() {
            return Some(vi);
        }
        if self.failed.contains(&(ti, vi)) {
            return None;
        }
        let result = match self.tokens[ti] {
            Token::Literal(c) => {
                if self.value.get(vi) == Some(&c) {
                    self.run(ti + 1, vi + 1)
                } else {
                    None
                }
            }
            Token::AnyChar => match self.value.get(vi) {
                Some(&c) if c != '\n' => self.run(ti + 1, vi + 1),
                _ => None,
            },
            Token::Star => {
                // The star covers value[vi..vi+n] with no newline in it.
                let max = self.value[vi..]
                    .iter()
                    .position(|&c| c == '\n')
                    .unwrap_or(self.value.len() - vi);
                let mut found = None;
                if self.greedy {
                    for n in (0..=max).rev() {
                        if let Some(end) = self.run(ti + 1, vi + n) {
                            found = Some(end);
                            break;
                        }
                    }
                } else {
                    for n in 0..=max {
                        if let Some(end) = self.run(ti + 1, vi + n) {
                            found = Some(end);
                            break;
                        }
                    }
                }
                found
            }
        };
        if result.is_none() {
            self.failed.insert((ti, vi));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::compile(s).unwrap()
    }

    #[test]
    fn prefix_and_suffix() {
        assert_eq!(p("*/").trim_prefix("a/b/c", false), "b/c");
        assert_eq!(p("*/").trim_prefix("a/b/c", true), "c");
        assert_eq!(p("/*").trim_suffix("a/b/c", false), "a/b");
        assert_eq!(p("/*").trim_suffix("a/b/c", true), "a");
        assert_eq!(p("x").trim_prefix("abc", false), "abc");
        assert_eq!(p("a?c").trim_prefix("abcd", false), "d");
        assert_eq!(p("\\*").trim_prefix("*x", false), "x");
        assert!(Pattern::compile("\\q").is_err());
    }

    #[test]
    fn replace() {
        assert_eq!(p("o").replace("foo boo", "0", false), "f0o boo");
        assert_eq!(p("o").replace("foo boo", "0", true), "f00 b00");
        assert_eq!(p("o*").replace("foo boo", "X", false), "fX");
        assert_eq!(p("").replace("ab", "-", true), "-a-b-");
        assert_eq!(p("b").replace("abc", "[$0]", true), "a[b]c");
    }
}
