//! Parser directives (`# syntax=`, `# escape=`, `# check=`): the comment lines at the very top
//! of a Dockerfile that change how the rest is read. Apart from the line grammar because they
//! follow their own rules (first non-directive line ends them, each at most once).

use crate::error::{Error, ErrorKind, Lines};

/// The parser directives at the top of a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// `# syntax=...`: the frontend image the author asked for (informational for Kiln).
    pub syntax: Option<String>,
    /// `# escape=...`: the escape and line-continuation character, `\` (default) or `` ` ``.
    pub escape: char,
    /// `# check=...`: build-check configuration, kept verbatim.
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            syntax: None,
            escape: '\\',
            check: None,
        }
    }
}

/// Tracks the directive section at the top of the file.
#[derive(Default)]
pub(super) struct DirectiveState {
    pub(super) directives: Directives,
    done: bool,
    seen: Vec<String>,
}

impl DirectiveState {
    /// Looks for `# key=value` on a (left-trimmed) line; the first line that is not a directive
    /// ends the directive section for good.
    pub(super) fn inspect(&mut self, line: &str, line_no: usize) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        let Some((key, value)) = directive(line) else {
            self.done = true;
            return Ok(());
        };
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(());
        }
        let at = Lines::single(line_no);
        if self.seen.contains(&key) {
            return Err(Error::at(
                at,
                ErrorKind::Syntax(format!("only one {key} parser directive can be used")),
            ));
        }
        self.seen.push(key.clone());
        match key.as_str() {
            "escape" => match value {
                "\\" => self.directives.escape = '\\',
                "`" => self.directives.escape = '`',
                other => {
                    return Err(Error::at(
                        at,
                        ErrorKind::Syntax(format!(
                            "invalid escape token '{other}' does not match ` or \\"
                        )),
                    ))
                }
            },
            "syntax" => self.directives.syntax = Some(value.to_string()),
            _ => self.directives.check = Some(value.to_string()),
        }
        Ok(())
    }
}

/// Matches `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` (Go's ASCII `\s`).
fn directive(line: &str) -> Option<(&str, &str)> {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r');
    let rest = line.strip_prefix('#')?.trim_start_matches(is_space);
    let key_len = rest
        .char_indices()
        .take_while(|&(i, c)| {
            if i == 0 {
                c.is_ascii_alphabetic()
            } else {
                c.is_ascii_alphanumeric()
            }
        })
        .count();
    if key_len == 0 {
        return None;
    }
    let (key, rest) = rest.split_at(key_len);
    let rest = rest.trim_start_matches(is_space).strip_prefix('=')?;
    let value = rest.trim_matches(is_space);
    if !value.is_empty() {
        return Some((key, value));
    }
    // `(.+?)` must take at least one character: with only whitespace left the regex gives back
    // the last one.
    let last = rest.chars().last()?;
    Some((key, &rest[rest.len() - last.len_utf8()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directive_regex() {
        assert_eq!(directive("# escape = `"), Some(("escape", "`")));
        assert_eq!(
            directive("#syntax=docker/dockerfile:1 "),
            Some(("syntax", "docker/dockerfile:1"))
        );
        assert_eq!(directive("# just a comment"), None);
        assert_eq!(directive("#1x=y"), None);
    }
}
