//! Here-documents (`RUN <<EOF`, `COPY <<out.txt /`): recognising the markers in an
//! instruction line and reading each body up to its delimiter. Apart from the line grammar
//! because heredocs are the one construct that consumes lines after its instruction.

use super::trim_newline;
use crate::error::{Error, ErrorKind, Lines};
use crate::expand::Lexer;

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

/// Reads the bodies of the heredocs `line` opens from the lines after it, each up to its
/// delimiter line. `current` is the number of the last line read and advances with every line
/// consumed; errors name the lines from `start` to there.
pub(super) fn read_heredocs<'a>(
    line: &str,
    lines: &mut impl Iterator<Item = &'a str>,
    start: usize,
    current: &mut usize,
) -> Result<Vec<Heredoc>, Error> {
    let docs = heredocs_in_line(line).map_err(|m| {
        Error::at(
            Lines {
                start,
                end: *current,
            },
            ErrorKind::Syntax(m),
        )
    })?;
    let mut read = Vec::with_capacity(docs.len());
    for mut doc in docs {
        let mut terminated = false;
        for raw in &mut *lines {
            *current += 1;
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
                    end: *current,
                },
                ErrorKind::UnterminatedHeredoc(doc.name),
            ));
        }
        read.push(doc);
    }
    Ok(read)
}
