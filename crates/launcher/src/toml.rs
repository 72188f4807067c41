//! A small TOML reader for the two documents the launcher reads: `config/metadata.toml` and the
//! `NAME = "value"` lines `exec.d` programs write.
//!
//! The launcher ships in every app image, so it does not carry the `toml`/`serde` stack (with
//! kiln-cnb, which brought it, nearly a third of its size when it did). This reader takes the whole TOML syntax (tables, arrays of
//! tables, dotted and quoted keys, inline tables, every string form and escape, comments) but
//! keeps numbers and dates as written, since the launcher never computes with them, and checks
//! fewer of the rules that only reject documents (a table extended after it was written inline
//! is accepted, for one).

/// A TOML value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A string, escapes resolved.
    String(String),
    /// `true` or `false`.
    Boolean(bool),
    /// An integer, float or date-time, as written.
    Other(String),
    /// An array (also an array of tables).
    Array(Vec<Value>),
    /// A table (also an inline table).
    Table(Table),
}

impl Value {
    /// What kind of value this is, for messages ("a string", "an array").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "a string",
            Value::Boolean(_) => "a boolean",
            Value::Other(_) => "a number or date",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

/// A table: its keys in document order, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    entries: Vec<(String, Value)>,
}

impl Table {
    /// The value of `key`, if the table has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The keys and values, in document order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The table under `path`, made (empty) where missing. Through an array of tables it goes
    /// into the last element, as a `[a.b]` header after `[[a]]` does.
    fn descend(&mut self, path: &[String]) -> Result<&mut Table, String> {
        let Some((first, rest)) = path.split_first() else {
            return Ok(self);
        };
        if self.get(first).is_none() {
            self.entries
                .push((first.clone(), Value::Table(Table::default())));
        }
        let next = match self.get_mut(first) {
            Some(Value::Table(t)) => t,
            Some(Value::Array(items)) => match items.last_mut() {
                Some(Value::Table(t)) => t,
                _ => return Err(format!("key `{first}` is not a table")),
            },
            _ => return Err(format!("key `{first}` is not a table")),
        };
        next.descend(rest)
    }

    /// Sets the (dotted) key `path`, which must not be set yet.
    fn insert(&mut self, path: &[String], value: Value) -> Result<(), String> {
        let Some((last, parents)) = path.split_last() else {
            return Err("empty key".into());
        };
        let table = self.descend(parents)?;
        if table.get(last).is_some() {
            return Err(format!("key `{last}` is defined twice"));
        }
        table.entries.push((last.clone(), value));
        Ok(())
    }
}

/// Why a document is not TOML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// The line (from 1) where reading stopped.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses a TOML document into its root table.
pub fn parse(text: &str) -> Result<Table, ParseError> {
    let mut p = Parser { text, pos: 0 };
    let mut root = Table::default();
    // The table key/value lines go into, and the headers seen (a `[table]` may appear once).
    let mut current: Vec<String> = Vec::new();
    let mut headers: Vec<Vec<String>> = Vec::new();
    loop {
        p.skip_blank();
        // Where the line starts: what is wrong with the line as a whole is reported there.
        let start = p.pos;
        match p.peek() {
            None => return Ok(root),
            Some(b'[') => {
                p.pos += 1;
                let array = p.eat(b'[');
                let path = p.key()?;
                if !p.eat(b']') || (array && !p.eat(b']')) {
                    return Err(p.error("expected `]` to end the table header"));
                }
                p.end_of_line()?;
                if array {
                    let (last, parents) = path.split_last().expect("a key has a part");
                    let parent = root.descend(parents).map_err(|m| p.error_at(start, m))?;
                    match parent.get_mut(last) {
                        None => parent.entries.push((
                            last.clone(),
                            Value::Array(vec![Value::Table(Table::default())]),
                        )),
                        Some(Value::Array(items))
                            if items.iter().all(|v| matches!(v, Value::Table(_))) =>
                        {
                            items.push(Value::Table(Table::default()))
                        }
                        Some(_) => {
                            return Err(p.error_at(
                                start,
                                format!("key `{last}` is not an array of tables"),
                            ))
                        }
                    }
                    // Headers under the new element start afresh.
                    headers.retain(|h| !h.starts_with(&path));
                } else {
                    if headers.contains(&path) {
                        let name = path.join(".");
                        return Err(p.error_at(start, format!("table [{name}] is defined twice")));
                    }
                    root.descend(&path).map_err(|m| p.error_at(start, m))?;
                    headers.push(path.clone());
                }
                current = path;
            }
            Some(_) => {
                let (key, value) = p.key_value()?;
                p.end_of_line()?;
                root.descend(&current)
                    .and_then(|t| t.insert(&key, value))
                    .map_err(|m| p.error_at(start, m))?;
            }
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    /// A byte offset, always at a character boundary: only ASCII bytes and whole characters
    /// are ever stepped over.
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        self.error_at(self.pos, message)
    }

    fn error_at(&self, pos: usize, message: impl Into<String>) -> ParseError {
        let line = 1 + self.text.as_bytes()[..pos]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        ParseError {
            line,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn rest(&self) -> &[u8] {
        &self.text.as_bytes()[self.pos..]
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.peek() == Some(b);
        if found {
            self.pos += 1;
        }
        found
    }

    fn next_char(&mut self) -> Option<char> {
        let c = self.text[self.pos..].chars().next()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Spaces and tabs.
    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Spaces, tabs, line ends and comments.
    fn skip_blank(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r' | b'\n') => self.pos += 1,
                Some(b'#') => {
                    while !matches!(self.peek(), None | Some(b'\n')) {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    /// Trailing spaces and a comment, then the line's end.
    fn end_of_line(&mut self) -> Result<(), ParseError> {
        self.skip_spaces();
        if self.peek() == Some(b'#') {
            while !matches!(self.peek(), None | Some(b'\n')) {
                self.pos += 1;
            }
        }
        if self.rest().starts_with(b"\r\n") {
            self.pos += 2;
        } else if !self.eat(b'\n') && self.peek().is_some() {
            return Err(self.error("expected the end of the line"));
        }
        Ok(())
    }

    /// A key (`name`, `"quoted"`, `a.b.c`), surrounding spaces included, as its parts.
    fn key(&mut self) -> Result<Vec<String>, ParseError> {
        let mut parts = Vec::new();
        loop {
            self.skip_spaces();
            let part = match self.peek() {
                Some(b'"' | b'\'') => self.string(false)?,
                _ => {
                    let start = self.pos;
                    while matches!(self.peek(), Some(b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        self.pos += 1;
                    }
                    if start == self.pos {
                        return Err(self.error("expected a key"));
                    }
                    self.text[start..self.pos].to_owned()
                }
            };
            parts.push(part);
            self.skip_spaces();
            if !self.eat(b'.') {
                return Ok(parts);
            }
        }
    }

    /// `key = value`.
    fn key_value(&mut self) -> Result<(Vec<String>, Value), ParseError> {
        let key = self.key()?;
        if !self.eat(b'=') {
            return Err(self.error("expected `=` after a key"));
        }
        self.skip_spaces();
        Ok((key, self.value()?))
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        match self.peek() {
            Some(b'"' | b'\'') => Ok(Value::String(self.string(true)?)),
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_blank();
                    if self.eat(b']') {
                        return Ok(Value::Array(items));
                    }
                    items.push(self.value()?);
                    self.skip_blank();
                    if !self.eat(b',') {
                        self.skip_blank();
                        if self.eat(b']') {
                            return Ok(Value::Array(items));
                        }
                        return Err(self.error("expected `,` or `]` in an array"));
                    }
                }
            }
            Some(b'{') => {
                self.pos += 1;
                let mut table = Table::default();
                loop {
                    self.skip_blank();
                    if self.eat(b'}') {
                        return Ok(Value::Table(table));
                    }
                    let (key, value) = self.key_value()?;
                    table.insert(&key, value).map_err(|m| self.error(m))?;
                    self.skip_blank();
                    if !self.eat(b',') {
                        if self.eat(b'}') {
                            return Ok(Value::Table(table));
                        }
                        return Err(self.error("expected `,` or `}` in an inline table"));
                    }
                }
            }
            _ => self.bare_value(),
        }
    }

    /// `true`, `false`, a number or a date-time.
    fn bare_value(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        let word =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b':');
        while matches!(self.peek(), Some(b) if word(b)) {
            self.pos += 1;
            // `1979-05-27 07:32:00`: a date, a space, a time.
            let date = &self.text.as_bytes()[start..self.pos];
            if date.len() == 10
                && date[4] == b'-'
                && date[7] == b'-'
                && self.peek() == Some(b' ')
                && matches!(self.rest().get(1), Some(b) if b.is_ascii_digit())
            {
                self.pos += 1;
            }
        }
        match &self.text[start..self.pos] {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            w if w.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-')
                || matches!(w, "inf" | "nan") =>
            {
                Ok(Value::Other(w.to_owned()))
            }
            _ => {
                self.pos = start;
                Err(self.error("expected a value"))
            }
        }
    }

    /// A basic (`"..."`) or literal (`'...'`) string, or with `multi_line` also their `"""`
    /// and `'''` forms.
    fn string(&mut self, multi_line: bool) -> Result<String, ParseError> {
        let quote = self.peek().expect("called at a quote");
        let literal = quote == b'\'';
        let triple = multi_line && self.rest().starts_with(&[quote; 3]);
        if triple {
            self.pos += 3;
            // A line end right after the opening quotes is not part of the string.
            if self.rest().starts_with(b"\r\n") {
                self.pos += 2;
            } else {
                self.eat(b'\n');
            }
        } else {
            self.pos += 1;
        }
        let mut out = String::new();
        loop {
            let Some(c) = self.next_char() else {
                return Err(self.error("unterminated string"));
            };
            match c {
                c if c == quote as char => {
                    if !triple {
                        return Ok(out);
                    }
                    if self.rest().starts_with(&[quote; 2]) {
                        self.pos += 2;
                        // `""""` ends with a quote of the content: up to two belong to it.
                        for _ in 0..2 {
                            if self.eat(quote) {
                                out.push(quote as char);
                            }
                        }
                        return Ok(out);
                    }
                    out.push(c);
                }
                '\\' if !literal => self.escape(&mut out, triple)?,
                '\n' | '\r' if triple => out.push(c),
                '\t' => out.push(c),
                c if c < ' ' || c == '\u{7f}' => {
                    self.pos -= 1; // the line of the character, not of the one after it
                    return Err(self.error("control character in a string (write it as an escape)"));
                }
                c => out.push(c),
            }
        }
    }

    /// The escape after a `\` in a basic string.
    fn escape(&mut self, out: &mut String, multi_line: bool) -> Result<(), ParseError> {
        let c = match self.next_char() {
            Some('b') => '\u{8}',
            Some('t') => '\t',
            Some('n') => '\n',
            Some('f') => '\u{c}',
            Some('r') => '\r',
            Some('e') => '\u{1b}',
            Some('"') => '"',
            Some('\\') => '\\',
            Some('x') => self.hex(2)?,
            Some('u') => self.hex(4)?,
            Some('U') => self.hex(8)?,
            Some(' ' | '\t' | '\r' | '\n') if multi_line => {
                // A line-ending backslash: the white space up to the next text goes, and it
                // must span a line end.
                self.pos -= 1;
                let start = self.pos;
                self.skip_spaces();
                if !matches!(self.peek(), Some(b'\r' | b'\n')) {
                    self.pos = start;
                    return Err(self.error("invalid escape: `\\` followed by spaces"));
                }
                while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
                    self.pos += 1;
                }
                return Ok(());
            }
            _ => return Err(self.error("invalid escape in a string")),
        };
        out.push(c);
        Ok(())
    }

    /// The character of `digits` hex digits (`\xHH`, `\uHHHH`, `\UHHHHHHHH`).
    fn hex(&mut self, digits: usize) -> Result<char, ParseError> {
        let c = self
            .text
            .get(self.pos..self.pos + digits)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32)
            .ok_or_else(|| self.error("invalid unicode escape"))?;
        self.pos += digits;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    fn table(pairs: &[(&str, Value)]) -> Value {
        Value::Table(Table {
            entries: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        })
    }

    #[test]
    fn strings_of_every_form() {
        let doc = parse(concat!(
            "basic = \"tab\\there \\\"q\\\" \\\\ \\u00e9\\U0001F600 \\x41\\e\"\n",
            "literal = 'C:\\path \"as is\"'\n",
            "multi = \"\"\"\nline one\n  line \\\n    two\"\"\"\n",
            "ends = \"\"\"quote\"\"\"\"\"\n",
            "raw = '''\n'one'\n\\n'''\n",
            "crlf = \"\"\"\r\na\r\nb\"\"\"\r\n",
            "empty = \"\"\n",
            "utf8 = \"ünï ✓\"\n",
        ))
        .unwrap();
        assert_eq!(doc.get("basic"), Some(&s("tab\there \"q\" \\ é😀 A\u{1b}")));
        assert_eq!(doc.get("literal"), Some(&s("C:\\path \"as is\"")));
        assert_eq!(doc.get("multi"), Some(&s("line one\n  line two")));
        assert_eq!(doc.get("ends"), Some(&s("quote\"\"")));
        assert_eq!(doc.get("raw"), Some(&s("'one'\n\\n")));
        assert_eq!(doc.get("crlf"), Some(&s("a\r\nb")));
        assert_eq!(doc.get("empty"), Some(&s("")));
        assert_eq!(doc.get("utf8"), Some(&s("ünï ✓")));
    }

    #[test]
    fn tables_arrays_and_keys() {
        let doc = parse(
            r#"
# a comment
top = true # trailing comment
"quoted key" = 1
dotted.inner = 'x'

[[list]]
name = "a"
nums = [ 1, 2.5, -3, 1979-05-27 07:32:00Z, ]

[list.sub]
deep = false

[[list]]
name = "b"
words = [
  "x", # one
  'y',
]
inline = { a = "1", b.c = [] }

[other."with.dot"]
v = "w"
"#,
        )
        .unwrap();
        assert_eq!(doc.get("top"), Some(&Value::Boolean(true)));
        assert_eq!(doc.get("quoted key"), Some(&Value::Other("1".into())));
        assert_eq!(doc.get("dotted"), Some(&table(&[("inner", s("x"))])));
        let Some(Value::Array(list)) = doc.get("list") else {
            panic!("{doc:?}")
        };
        assert_eq!(
            list[0],
            table(&[
                ("name", s("a")),
                (
                    "nums",
                    Value::Array(vec![
                        Value::Other("1".into()),
                        Value::Other("2.5".into()),
                        Value::Other("-3".into()),
                        Value::Other("1979-05-27 07:32:00Z".into()),
                    ])
                ),
                ("sub", table(&[("deep", Value::Boolean(false))])),
            ])
        );
        assert_eq!(
            list[1],
            table(&[
                ("name", s("b")),
                ("words", Value::Array(vec![s("x"), s("y")])),
                (
                    "inline",
                    table(&[("a", s("1")), ("b", table(&[("c", Value::Array(vec![]))]))])
                ),
            ])
        );
        assert_eq!(
            doc.get("other"),
            Some(&table(&[("with.dot", table(&[("v", s("w"))]))]))
        );
    }

    #[test]
    fn malformed_documents_name_the_line() {
        for (doc, line, message) in [
            ("a = \"open\n", 1, "control character"),
            ("a = \"open", 1, "unterminated string"),
            ("\n\na = 1\na = 2\n", 4, "key `a` is defined twice"),
            ("[t]\n[t]\n", 2, "table [t] is defined twice"),
            ("a = 1\n[a.b]\n", 2, "key `a` is not a table"),
            ("a = [1, 2\n", 2, "expected `,` or `]`"),
            ("a = \"x\" b = 1\n", 1, "expected the end of the line"),
            ("a\n", 1, "expected `=`"),
            ("= 1\n", 1, "expected a key"),
            ("a = bare\n", 1, "expected a value"),
            ("a = \"\\q\"\n", 1, "invalid escape"),
            ("a = \"\\uD800\"\n", 1, "invalid unicode escape"),
            ("[t\n", 1, "expected `]`"),
            ("a = {b = 1\n", 2, "expected `,` or `}`"),
            ("a = [1]\n[[a]]\n", 2, "not an array of tables"),
        ] {
            let err = parse(doc).unwrap_err();
            assert_eq!(err.line, line, "{doc:?}: {err}");
            assert!(err.message.contains(message), "{doc:?}: {err}");
        }
    }

    #[test]
    fn arrays_of_tables_start_each_element_afresh() {
        let doc = parse("[[p]]\n[p.env]\na = '1'\n[[p]]\n[p.env]\na = '2'\n").unwrap();
        let Some(Value::Array(p)) = doc.get("p") else {
            panic!("{doc:?}")
        };
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], table(&[("env", table(&[("a", s("2"))]))]));
    }
}
