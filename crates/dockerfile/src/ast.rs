//! The syntax tree: BuildKit's line-oriented Dockerfile grammar.
//!
//! [`parse_ast`] turns text into [`Node`]s, one per instruction, without judging whether the
//! instruction or its flags exist (that is [`crate::Dockerfile::parse`]'s job). [`Ast::dump`]
//! prints the tree in BuildKit's test format. Parser directives are read in `directives`,
//! here-documents in `heredoc`.

mod directives;
mod heredoc;

use crate::error::{Error, ErrorKind, Lines};
use crate::json::{parse_string_array, JsonArray};
use crate::quote::{go_quote, go_quote_list};

use self::directives::DirectiveState;
pub use self::directives::Directives;
pub(crate) use self::heredoc::parse_heredoc_marker;
use self::heredoc::read_heredocs;
pub use self::heredoc::Heredoc;

/// One instruction of the syntax tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The instruction keyword in lower case (`run`, `copy`, ...), as written otherwise.
    pub keyword: String,
    /// The `--flags` in the order written, each as `--name` or `--name=value`.
    pub flags: Vec<String>,
    /// The arguments as BuildKit's line parsers split them (see the crate docs).
    pub args: Vec<String>,
    /// The instruction wrapped by ONBUILD.
    pub trigger: Option<Box<Node>>,
    /// Whether the arguments were written in JSON (exec) form.
    pub json: bool,
    /// Here-documents, in the order their bodies follow the instruction.
    pub heredocs: Vec<Heredoc>,
    /// The instruction line with continuations joined.
    pub original: String,
    /// First and last line of the instruction, heredoc bodies included.
    pub lines: Lines,
}

impl Node {
    /// Appends this node's dump (without the surrounding parentheses) to `out`.
    fn dump_into(&self, out: &mut String) {
        out.push_str(&self.keyword);
        if !self.flags.is_empty() {
            out.push(' ');
            out.push_str(&go_quote_list(&self.flags));
        }
        if let Some(trigger) = &self.trigger {
            out.push_str(" (");
            trigger.dump_into(out);
            out.push(')');
        }
        for arg in &self.args {
            out.push(' ');
            out.push_str(&go_quote(arg));
        }
    }

    /// The node whose syntax decides about heredocs: the trigger for ONBUILD.
    fn heredoc_owner(&self) -> &Node {
        match (&self.trigger, self.keyword.as_str()) {
            (Some(t), "onbuild") => t,
            _ => self,
        }
    }

    fn can_contain_heredoc(&self) -> bool {
        let owner = self.heredoc_owner();
        matches!(owner.keyword.as_str(), "run" | "copy" | "add") && !owner.json
    }
}

/// A warning the parser noticed; the file still parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Where.
    pub lines: Lines,
    /// What.
    pub message: String,
}

/// A parsed Dockerfile syntax tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ast {
    /// The parser directives found at the top.
    pub directives: Directives,
    /// The instructions in file order.
    pub nodes: Vec<Node>,
    /// Things that parsed but are probably mistakes (empty continuation lines).
    pub warnings: Vec<Warning>,
}

impl Ast {
    /// The tree in BuildKit's dump format: one `(keyword ...)` line per instruction, each line
    /// ending with a newline. Equal, byte for byte, to the `result` files of BuildKit's parser
    /// tests.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let mut line = String::new();
            node.dump_into(&mut line);
            out.push('(');
            out.push_str(line.trim());
            out.push_str(")\n");
        }
        out
    }

    /// First and last line covered by instructions.
    pub fn lines(&self) -> Lines {
        let start = self.nodes.first().map_or(0, |n| n.lines.start);
        let end = self.nodes.last().map_or(0, |n| n.lines.end);
        Lines { start, end }
    }
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(raw: &str) -> bool {
    trim_newline(raw).trim_start().starts_with('#')
}

/// BuildKit's continuation rule: the line ends with the escape character (followed only by
/// spaces and tabs) that is not itself escaped, or the line is only that character.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    if let Some(before) = trimmed.strip_suffix(escape) {
        if before.is_empty() {
            return (String::new(), false);
        }
        if !before.ends_with(escape) {
            return (before.to_string(), false);
        }
    }
    (line.to_string(), true)
}

/// Whitespace of BuildKit's `[\t\v\f\r ]+` splits.
fn is_split_space(c: char) -> bool {
    matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ')
}

/// Splits on runs of `[\t\v\f\r ]`, keeping empty leading/trailing fields like Go's regexp split.
fn split_whitespace_runs(s: &str, limit: Option<usize>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        if limit.is_some_and(|l| out.len() + 1 >= l) {
            out.push(rest.to_string());
            return out;
        }
        match rest.find(is_split_space) {
            Some(i) => {
                out.push(rest[..i].to_string());
                let after = &rest[i..];
                let run = after.len() - after.trim_start_matches(is_split_space).len();
                rest = &after[run..];
            }
            None => {
                out.push(rest.to_string());
                return out;
            }
        }
    }
}

fn lower(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            // Go's simple case mapping sends U+0130 to a plain `i`.
            let mapped: Vec<char> = if c == '\u{130}' {
                vec!['i']
            } else {
                c.to_lowercase().collect()
            };
            mapped
        })
        .collect()
}

/// Separates leading `--flags` from the rest of an instruction's arguments. Quotes and
/// backslashes inside a flag are processed; a lone `--` ends the flags.
pub(crate) fn extract_flags(line: &str) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { line.len() };
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= n {
        let mut ch = if pos < n { chars[pos].1 } else { '\0' };
        if phase == Phase::Spaces {
            if pos == n {
                break;
            }
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            if ch != '-' || pos + 1 == n || chars[pos + 1].1 != '-' {
                return (line[at(pos)..].to_string(), words);
            }
            phase = Phase::Word;
        }
        if pos == n {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if word == "--" {
                    return (line[at(pos)..].to_string(), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            if ch == '\\' {
                if pos + 1 == n {
                    pos += 1;
                    continue;
                }
                pos += 1;
                ch = chars[pos].1;
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        if ch == '\\' {
            if pos + 1 == n {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            ch = chars[pos].1;
        }
        word.push(ch);
        pos += 1;
    }
    (String::new(), words)
}

/// Splits `rest` into words, keeping quotes and escape characters (they are processed later by
/// expansion). Used by ENV, LABEL and ARG.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let n = chars.len();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= n {
        let mut ch = if pos < n { chars[pos] } else { '\0' };
        if phase == Phase::Spaces {
            if pos == n {
                break;
            }
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if pos == n {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == n {
                    pos += 1;
                    continue;
                }
                // Outside quotes the escape character and what it escapes are both kept.
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == n {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

/// Arguments of one instruction as its line parser produces them.
struct Parsed {
    args: Vec<String>,
    json: bool,
    trigger: Option<Box<Node>>,
}

impl Parsed {
    fn plain(args: Vec<String>) -> Self {
        Parsed {
            args,
            json: false,
            trigger: None,
        }
    }
}

fn syntax(message: String) -> ErrorKind {
    ErrorKind::Syntax(message)
}

fn not_string_array() -> ErrorKind {
    syntax("when using JSON array syntax, arrays must be comprised of strings only".to_string())
}

fn parse_maybe_json(rest: &str) -> Result<Parsed, ErrorKind> {
    if rest.is_empty() {
        return Ok(Parsed::plain(Vec::new()));
    }
    match parse_string_array(rest.trim_start()) {
        JsonArray::Strings(args) => Ok(Parsed {
            args,
            json: true,
            trigger: None,
        }),
        JsonArray::NotStringArray => Err(not_string_array()),
        JsonArray::NotJson => Ok(Parsed::plain(vec![rest.to_string()])),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<Parsed, ErrorKind> {
    match parse_string_array(rest.trim_start()) {
        JsonArray::Strings(args) => Ok(Parsed {
            args,
            json: true,
            trigger: None,
        }),
        JsonArray::NotStringArray => Err(not_string_array()),
        JsonArray::NotJson => Ok(parse_whitespace_delimited(rest)),
    }
}

fn parse_whitespace_delimited(rest: &str) -> Parsed {
    if rest.is_empty() {
        return Parsed::plain(Vec::new());
    }
    Parsed::plain(split_whitespace_runs(rest, None))
}

fn parse_string(rest: &str) -> Parsed {
    if rest.is_empty() {
        Parsed::plain(Vec::new())
    } else {
        Parsed::plain(vec![rest.to_string()])
    }
}

/// ENV and LABEL: `key value` (old form, one pair) or `k=v k2=v2`. Each pair becomes three
/// arguments: key, value as written, and `=` or `""` for the form used.
fn parse_name_val(rest: &str, keyword: &str, escape: char) -> Result<Parsed, ErrorKind> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Ok(Parsed::plain(Vec::new()));
    }
    if !words[0].contains('=') {
        let parts = split_whitespace_runs(rest, Some(2));
        if parts.len() < 2 {
            return Err(syntax(format!(
                "{} must have two arguments",
                keyword.to_uppercase()
            )));
        }
        let mut parts = parts.into_iter();
        let key = parts.next().unwrap_or_default();
        let value = parts.next().unwrap_or_default();
        return Ok(Parsed::plain(vec![key, value, String::new()]));
    }
    let mut args = Vec::with_capacity(words.len() * 3);
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(syntax(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                go_quote(&word)
            )));
        };
        args.push(key.to_string());
        args.push(value.to_string());
        args.push("=".to_string());
    }
    Ok(Parsed::plain(args))
}

fn parse_health(rest: &str) -> Result<Parsed, ErrorKind> {
    let sep = rest.find(char::is_whitespace).unwrap_or(rest.len());
    if sep == 0 {
        return Ok(Parsed::plain(Vec::new()));
    }
    let kind = &rest[..sep];
    let cmd = rest[sep..].trim_start();
    let parsed = parse_maybe_json(cmd)?;
    let mut args = vec![kind.to_string()];
    args.extend(parsed.args);
    Ok(Parsed {
        args,
        json: parsed.json,
        trigger: None,
    })
}

/// Builds the node for one (continuation-joined) instruction line.
fn node_from_line(line: &str, escape: char, lines: Lines, depth: usize) -> Result<Node, ErrorKind> {
    let trimmed = line.trim();
    let parts = split_whitespace_runs(trimmed, Some(2));
    let keyword = lower(&parts[0]);
    let (rest, flags) = match parts.get(1) {
        Some(after) => extract_flags(after),
        None => (String::new(), Vec::new()),
    };
    let rest = rest.trim();
    let parsed = match keyword.as_str() {
        "add" | "copy" | "volume" => parse_maybe_json_to_list(rest)?,
        "arg" => Parsed::plain(parse_words(rest, escape)),
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(rest)?,
        "env" | "label" => parse_name_val(rest, &keyword, escape)?,
        "expose" | "from" => parse_whitespace_delimited(rest),
        "healthcheck" => parse_health(rest)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => parse_string(rest),
        "onbuild" => {
            if rest.is_empty() {
                Parsed::plain(Vec::new())
            } else if depth >= 16 {
                // Chained ONBUILD is rejected later anyway; the bound keeps recursion shallow.
                return Err(syntax("ONBUILD nested too deeply".to_string()));
            } else {
                let trigger = node_from_line(rest, escape, lines, depth + 1)?;
                Parsed {
                    args: Vec::new(),
                    json: false,
                    trigger: Some(Box::new(trigger)),
                }
            }
        }
        // BuildKit keeps unknown instructions with one empty argument; the typed layer rejects them.
        _ => Parsed::plain(vec![String::new()]),
    };
    Ok(Node {
        keyword,
        flags,
        args: parsed.args,
        trigger: parsed.trigger,
        json: parsed.json,
        heredocs: Vec::new(),
        original: line.to_string(),
        lines,
    })
}

/// Parses Dockerfile text into its syntax tree.
///
/// Errors: an invalid or repeated directive, invalid JSON-array arguments holding non-strings,
/// ENV/LABEL without a value, an unterminated heredoc, or a file without instructions.
pub fn parse_ast(source: &str) -> Result<Ast, Error> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let mut state = DirectiveState::default();
    let mut lines = source.split_inclusive('\n');
    let mut current = 0usize;
    let mut nodes: Vec<Node> = Vec::new();
    let mut warnings = Vec::new();

    while let Some(raw) = lines.next() {
        let token = trim_newline(raw).trim_start();
        state.inspect(token, current + 1)?;
        let token = if token.starts_with('#') { "" } else { token };
        current += 1;
        let start = current;
        let escape = state.directives.escape;
        let (mut line, mut end_of_line) = trim_continuation(token, escape);
        if end_of_line && line.is_empty() {
            continue;
        }
        let mut empty_continuation = false;
        while !end_of_line {
            let Some(raw) = lines.next() else { break };
            let token = trim_newline(raw);
            state.inspect(token, current + 1)?;
            current += 1;
            if is_comment(raw) {
                continue;
            }
            if token.trim_start().is_empty() {
                empty_continuation = true;
                continue;
            }
            let (part, eol) = trim_continuation(token, escape);
            line.push_str(&part);
            end_of_line = eol;
        }
        if empty_continuation {
            warnings.push(Warning {
                lines: Lines {
                    start,
                    end: current,
                },
                message: "empty continuation line (these will become errors in a future release)"
                    .to_string(),
            });
        }
        let mut node = node_from_line(
            &line,
            escape,
            Lines {
                start,
                end: current,
            },
            0,
        )
        .map_err(|kind| {
            Error::at(
                Lines {
                    start,
                    end: current,
                },
                kind,
            )
        })?;
        if node.can_contain_heredoc() {
            node.heredocs = read_heredocs(&line, &mut lines, start, &mut current)?;
        }
        node.lines = Lines {
            start,
            end: current,
        };
        if let Some(trigger) = node.trigger.as_mut() {
            trigger.lines = node.lines;
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(Error::at(
            Lines::single(current.max(1)),
            ErrorKind::NoInstructions,
        ));
    }
    Ok(Ast {
        directives: state.directives,
        nodes,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_extracted() {
        assert_eq!(
            extract_flags("--from=a --chown=\"x y\" src dst"),
            (
                "src dst".to_string(),
                vec!["--from=a".to_string(), "--chown=x y".to_string()]
            )
        );
        assert_eq!(
            extract_flags("--a -- --b"),
            (" --b".to_string(), vec!["--a".to_string()])
        );
        assert_eq!(
            extract_flags("--a"),
            (String::new(), vec!["--a".to_string()])
        );
    }

    #[test]
    fn words_keep_quotes() {
        assert_eq!(
            parse_words("abc=\"123 456\" def", '\\'),
            vec!["abc=\"123 456\"", "def"]
        );
        assert_eq!(parse_words("a=b\\ c", '\\'), vec!["a=b\\ c"]);
    }

    #[test]
    fn continuation_rules() {
        assert_eq!(trim_continuation("a \\", '\\'), ("a ".to_string(), false));
        assert_eq!(
            trim_continuation("a\\\\", '\\'),
            ("a\\\\".to_string(), true)
        );
        assert_eq!(trim_continuation("\\  ", '\\'), (String::new(), false));
        assert_eq!(trim_continuation("a `", '`'), ("a ".to_string(), false));
    }

    #[test]
    fn chained_onbuild_depth_is_bounded() {
        let src = format!("FROM a\n{}RUN x\n", "ONBUILD ".repeat(10_000));
        let err = parse_ast(&src).unwrap_err();
        assert_eq!(err.to_string(), "Dockerfile:2: ONBUILD nested too deeply");
    }
}
