//! Word expansion with BuildKit's semantics (its `shell.Lex`).
//!
//! Quotes, the escape character, `$V`, `${V}` and the operators `${V:-x}`, `${V-x}`, `${V:+x}`,
//! `${V+x}`, `${V:?msg}`, `${V?msg}`, `${V#p}`, `${V##p}`, `${V%p}`, `${V%%p}`, `${V/p/r}` and
//! `${V//p/r}`. Used for the instructions Docker expands; never for RUN/CMD/ENTRYPOINT bodies,
//! which the shell expands at run time.

use std::collections::{BTreeMap, HashMap};

use crate::pattern::Pattern;

/// Where the expander looks variables up.
pub trait Variables {
    /// The value of `name`, or `None` when it is not set (which differs from set-but-empty).
    fn get(&self, name: &str) -> Option<&str>;
}

impl Variables for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        HashMap::get(self, name).map(String::as_str)
    }
}

impl Variables for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

/// A list of `(name, value)` pairs; the last pair with a name wins.
impl Variables for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Variables for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Variables::get(self.as_slice(), name)
    }
}

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {word:?}: {message}")]
pub struct ExpandError {
    /// The word as written.
    pub word: String,
    /// What was wrong with it.
    pub message: String,
}

/// The word expander. `Lexer::new('\\')` is what a Dockerfile without an `escape` directive uses.
#[derive(Debug, Clone)]
pub struct Lexer {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset: bool,
    skip_quotes: bool,
}

impl Lexer {
    /// An expander using `escape` (`\` or `` ` ``) as the escape character.
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset: false,
            skip_quotes: false,
        }
    }

    /// Keeps quote characters in the output (used to tell quoted heredoc delimiters apart).
    pub(crate) fn raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// Keeps escape characters in the output.
    pub(crate) fn raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// Leaves references to unset variables as written instead of expanding them to "".
    pub(crate) fn skip_unset(mut self, on: bool) -> Self {
        self.skip_unset = on;
        self
    }

    /// Treats quotes as ordinary characters (heredoc bodies).
    pub(crate) fn skip_quotes(mut self, on: bool) -> Self {
        self.skip_quotes = on;
        self
    }

    /// Expands `word` into one string; whitespace is kept as it is.
    pub fn expand(&self, word: &str, vars: &dyn Variables) -> Result<String, ExpandError> {
        self.run(word, vars).map(|(s, _)| s)
    }

    /// Expands `word` and splits the result into words: unquoted whitespace (written or coming
    /// from a variable's value) separates words, quoted whitespace does not.
    pub fn split(&self, word: &str, vars: &dyn Variables) -> Result<Vec<String>, ExpandError> {
        self.run(word, vars).map(|(_, w)| w)
    }

    fn run(&self, word: &str, vars: &dyn Variables) -> Result<(String, Vec<String>), ExpandError> {
        let mut state = State {
            lex: self,
            chars: word.chars().collect(),
            pos: 0,
            vars,
            raw_escapes: self.raw_escapes,
            depth: 0,
        };
        state
            .process_until(None, self.raw_escapes)
            .map_err(|message| ExpandError {
                word: word.to_string(),
                message,
            })
    }
}

/// Collects the words of a split.
#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() {
            if self.in_word && !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(c);
        }
    }

    fn add_raw_char(&mut self, c: char) {
        self.buf.push(c);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        for c in s.chars() {
            self.add_char(c);
        }
    }

    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

struct State<'a> {
    lex: &'a Lexer,
    chars: Vec<char>,
    pos: usize,
    vars: &'a dyn Variables,
    raw_escapes: bool,
    /// Nesting of `${...}`, bounded so hostile input cannot exhaust the stack.
    depth: usize,
}

/// Deeper nesting than any real Dockerfile uses.
const MAX_NESTING: usize = 128;

type Res<T> = Result<T, String>;

impl State<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn lookup(&self, name: &str) -> Option<String> {
        self.vars.get(name).map(str::to_string)
    }

    /// Processes characters until `stop` (consumed) or the end of input.
    fn process_until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Res<(String, Vec<String>)> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let result = self.process_until_inner(stop);
        self.raw_escapes = saved;
        result
    }

    fn process_until_inner(&mut self, stop: Option<char>) -> Res<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let quotes = !self.lex.skip_quotes;
            if c == '$' {
                let s = self.dollar()?;
                result.push_str(&s);
                words.add_string(&s);
            } else if quotes && c == '\'' {
                let s = self.single_quote()?;
                result.push_str(&s);
                words.add_raw_string(&s);
            } else if quotes && c == '"' {
                let s = self.double_quote()?;
                result.push_str(&s);
                words.add_raw_string(&s);
            } else {
                self.next();
                let mut ch = c;
                if ch == self.lex.escape {
                    if self.raw_escapes {
                        words.add_raw_char(ch);
                        result.push(ch);
                    }
                    match self.next() {
                        // A trailing escape character is dropped.
                        None => break,
                        Some(e) => {
                            ch = e;
                            words.add_raw_char(ch);
                        }
                    }
                } else {
                    words.add_char(ch);
                }
                result.push(ch);
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn single_quote(&mut self) -> Res<String> {
        let mut out = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            out.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .to_string(),
                    )
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Res<String> {
        let mut out = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            out.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .to_string(),
                    )
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let s = self.dollar()?;
                    out.push_str(&s);
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            out.push(ch);
                        }
                        match self.peek() {
                            // The loop reports the missing closing quote.
                            None => continue,
                            Some(e) if e == '"' || e == '$' || e == self.lex.escape => {
                                self.next();
                                ch = e;
                            }
                            // Any other escaped character keeps its escape character.
                            Some(_) => {}
                        }
                    }
                    out.push(ch);
                }
            }
        }
    }

    fn dollar(&mut self) -> Res<String> {
        if self.depth >= MAX_NESTING {
            return Err("substitutions nested too deeply".to_string());
        }
        self.depth += 1;
        let result = self.dollar_inner();
        self.depth -= 1;
        result
    }

    fn dollar_inner(&mut self) -> Res<String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.lookup(&name) {
                Some(v) => v,
                None if self.lex.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return Err("syntax error: missing '}'".to_string()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".to_string()),
            Some(_) => {}
        }
        let name = self.name();
        let Some(ch) = self.next() else {
            return Err("syntax error: missing '}'".to_string());
        };
        match ch {
            '}' => Ok(match self.lookup(&name) {
                Some(v) => v,
                None if self.lex.skip_unset => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let mut op = ch;
                let mut chs = ch.to_string();
                let null_is_unset = ch == ':';
                if null_is_unset {
                    let Some(c) = self.next() else {
                        return Err("syntax error: missing '}'".to_string());
                    };
                    op = c;
                    chs.push(c);
                }
                let pattern_op = op == '#' || op == '%';
                if null_is_unset && pattern_op {
                    return Err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = self.nested('}', pattern_op, "syntax error: missing '}'")?;
                let value = self.lookup(&name);
                if self.lex.skip_unset && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let unset_or_null =
                    value.is_none() || (null_is_unset && value.as_deref() == Some(""));
                match op {
                    '-' => Ok(if unset_or_null {
                        word
                    } else {
                        value.unwrap_or_default()
                    }),
                    '+' => Ok(if unset_or_null { String::new() } else { word }),
                    '?' => {
                        if value.is_none() {
                            let msg = if word.is_empty() {
                                "is not allowed to be unset"
                            } else {
                                &word
                            };
                            return Err(format!("{name}: {msg}"));
                        }
                        if unset_or_null {
                            let msg = if word.is_empty() {
                                "is not allowed to be empty"
                            } else {
                                &word
                            };
                            return Err(format!("{name}: {msg}"));
                        }
                        Ok(value.unwrap_or_default())
                    }
                    '#' | '%' => {
                        let (greedy, pattern) = match word.strip_prefix(op) {
                            Some(rest) => (true, rest),
                            None => (false, word.as_str()),
                        };
                        let compiled = Pattern::compile(pattern).map_err(|e| {
                            format!("invalid pattern ({pattern}) in substitution: {e}")
                        })?;
                        let value = value.unwrap_or_default();
                        Ok(if op == '%' {
                            compiled.trim_suffix(&value, greedy)
                        } else {
                            compiled.trim_prefix(&value, greedy)
                        })
                    }
                    _ => Err(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            '/' => {
                let all = self.peek() == Some('/');
                if all {
                    self.next();
                }
                let pattern = self.nested('/', true, "syntax error: missing '/' in ${}")?;
                let replacement = self.nested('}', true, "syntax error: missing '}'")?;
                let value = self.lookup(&name);
                if self.lex.skip_unset && value.is_none() {
                    let slash = if all { "//" } else { "/" };
                    return Ok(format!("${{{name}{slash}{pattern}/{replacement}}}"));
                }
                let compiled = Pattern::compile(&pattern)
                    .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
                Ok(compiled.replace(&value.unwrap_or_default(), &replacement, all))
            }
            other => Err(format!("unsupported modifier ({other}) in substitution")),
        }
    }

    /// Processes the operand of an operator up to `stop`.
    fn nested(&mut self, stop: char, raw_escapes: bool, missing: &str) -> Res<String> {
        match self.process_until(Some(stop), raw_escapes) {
            Ok((s, _)) => Ok(s),
            Err(e) => Err(if self.peek().is_none() {
                missing.to_string()
            } else {
                e
            }),
        }
    }

    /// A variable name: letters, digits and `_`; or a run of digits (positional parameter);
    /// or one special parameter character.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|&d| is_digit(d)) {
                    name.push(d);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return c.to_string();
            }
            if !(c.is_alphabetic() || is_digit(c) || c == '_') {
                break;
            }
            name.push(c);
            self.next();
        }
        name
    }
}

fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("PWD".into(), "/home".into()),
            ("EMPTY".into(), String::new()),
            ("P".into(), "a/b/c.tar.gz".into()),
        ]
    }

    fn ex(word: &str) -> Result<String, ExpandError> {
        Lexer::new('\\').expand(word, &env())
    }

    #[test]
    fn operators() {
        assert_eq!(ex("${X-d}").unwrap(), "d");
        assert_eq!(ex("${EMPTY-d}").unwrap(), "");
        assert_eq!(ex("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(ex("${EMPTY+s}").unwrap(), "s");
        assert_eq!(ex("${EMPTY:+s}").unwrap(), "");
        assert_eq!(
            ex("${X?}").unwrap_err().message,
            "X: is not allowed to be unset"
        );
        assert_eq!(
            ex("${EMPTY:?need it}").unwrap_err().message,
            "EMPTY: need it"
        );
        assert_eq!(ex("${EMPTY?}").unwrap(), "");
        assert_eq!(ex("${P#*/}").unwrap(), "b/c.tar.gz");
        assert_eq!(ex("${P##*/}").unwrap(), "c.tar.gz");
        assert_eq!(ex("${P%.*}").unwrap(), "a/b/c.tar");
        assert_eq!(ex("${P%%.*}").unwrap(), "a/b/c");
        assert_eq!(ex("${P/\\//_}").unwrap(), "a_b/c.tar.gz");
        assert_eq!(ex("${P//\\//_}").unwrap(), "a_b_c.tar.gz");
        assert_eq!(
            ex("${P:#x}").unwrap_err().message,
            "unsupported modifier (:#) in substitution"
        );
        assert!(ex("${P/x}").is_err());
    }

    #[test]
    fn hostile_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "${A:-".repeat(10_000) + &"}".repeat(10_000);
        assert_eq!(
            ex(&deep).unwrap_err().message,
            "substitutions nested too deeply"
        );
        let long_pattern = format!("${{P#{}}}", "*a".repeat(5_000));
        assert!(ex(&long_pattern)
            .unwrap_err()
            .message
            .contains("pattern longer than"));
    }

    #[test]
    fn skip_unset_keeps_references() {
        let lex = Lexer::new('\\').skip_unset(true);
        assert_eq!(
            lex.expand("$X ${Y} ${Z:-d} $PWD", &env()).unwrap(),
            "$X ${Y} ${Z:-d} /home"
        );
    }
}
