//! The syntax tree: BuildKit's line-oriented Dockerfile grammar.
//!
//! [`parse_ast`] turns text into [`Node`]s, one per instruction, without judging whether the
//! instruction or its flags exist (that is [`crate::Dockerfile::parse`]'s job). [`Ast::dump`]
//! prints the tree in BuildKit's test format.

use crate::error::{Error, ErrorKind, Lines};
use crate::expand::Lexer;
use crate::json::{parse_string_array, JsonArray};
use crate::quote::{go_quote, go_quote_list};

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

/// A here-document attached to a RUN, COPY or ADD instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed; also the file name for COPY/ADD.
    pub name: String,
    /// The file descriptor written before `<<` (`3<<EOF`), 0 when absent.
    pub fd: u32,
    /// Whether variables in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from each body line.
    pub chomp: bool,
    /// The body exactly as written, each line with its newline.
    pub content: String,
}

impl Heredoc {
    /// The body with leading tabs removed from each line when the heredoc used `<<-`.
    pub fn body(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        self.content
            .split_inclusive('\n')
            .map(|line| line.trim_start_matches('\t'))
            .collect()
    }
}

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

/// Tracks the directive section at the top of the file.
struct DirectiveState {
    directives: Directives,
    done: bool,
    seen: Vec<String>,
}

impl DirectiveState {
    /// Looks for `# key=value` on a (left-trimmed) line; the first line that is not a directive
    /// ends the directive section for good.
    fn inspect(&mut self, line: &str, line_no: usize) -> Result<(), Error> {
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

/// Recognises `[fd]<<[-]WORD`; `Ok(None)` when `word` is not a heredoc marker.
pub(crate) fn parse_heredoc_marker(word: &str) -> Result<Option<Heredoc>, String> {
    let digits = word.len() - word.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let Some(after) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, after),
    };
    if rest.contains('<') || rest.is_empty() {
        return Ok(None);
    }
    let fd = word[..digits].parse::<u32>().unwrap_or(0);
    let no_vars: Vec<(String, String)> = Vec::new();
    let lexer = Lexer::new('\\').skip_unset(true);
    let words = lexer.split(rest, &no_vars).map_err(|e| e.to_string())?;
    if words.len() != 1 {
        return Ok(None);
    }
    let raw = lexer
        .raw_quotes(true)
        .split(rest, &no_vars)
        .map_err(|e| e.to_string())?;
    if raw.len() != words.len() {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    }
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = quotes(&words[0]) == quotes(&raw[0]);
    Ok(Some(Heredoc {
        name: words[0].clone(),
        fd,
        expand,
        chomp,
        content: String::new(),
    }))
}

fn heredocs_in_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let no_vars: Vec<(String, String)> = Vec::new();
    let words = Lexer::new('\\')
        .raw_quotes(true)
        .raw_escapes(true)
        .skip_unset(true)
        .split(line, &no_vars)
        .unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc_marker(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Parses Dockerfile text into its syntax tree.
///
/// Errors: an invalid or repeated directive, invalid JSON-array arguments holding non-strings,
/// ENV/LABEL without a value, an unterminated heredoc, or a file without instructions.
pub fn parse_ast(source: &str) -> Result<Ast, Error> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let mut state = DirectiveState {
        directives: Directives::default(),
        done: false,
        seen: Vec::new(),
    };
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
            let docs = heredocs_in_line(&line).map_err(|m| {
                Error::at(
                    Lines {
                        start,
                        end: current,
                    },
                    ErrorKind::Syntax(m),
                )
            })?;
            for mut doc in docs {
                let mut terminated = false;
                for raw in lines.by_ref() {
                    current += 1;
                    let mut candidate = trim_newline(raw);
                    if doc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                }
                if !terminated {
                    return Err(Error::at(
                        Lines {
                            start,
                            end: current,
                        },
                        ErrorKind::UnterminatedHeredoc(doc.name),
                    ));
                }
                node.heredocs.push(doc);
            }
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
