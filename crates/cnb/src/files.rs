//! Reading and writing the platform's TOML and JSON files with errors that name file and key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{io, Error, Result};

/// Parses TOML `text` read from `path` into `T`; an error names the key path and line.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| malformed(path, text, "", &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        malformed(path, text, &key, e.inner())
    })
}

fn malformed(path: &Path, text: &str, key: &str, e: &toml::de::Error) -> Error {
    let message = match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{} (line {line})", e.message().trim_end())
        }
        None => e.message().trim_end().to_owned(),
    };
    Error::Malformed {
        path: path.to_owned(),
        key: key.to_owned(),
        message,
    }
}

/// Reads and parses the TOML file at `path`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_toml(path, &text)
}

/// Reads and parses the TOML file at `path`, or `None` when there is no file.
pub fn read_toml_if_exists<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_toml(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Parses JSON `text` (from `what`, a file or label name) into `T`; an error names the key path.
pub fn parse_json<T: DeserializeOwned>(what: &Path, text: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| Error::Malformed {
        path: what.to_owned(),
        key: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// Writes `value` as TOML to `path`, creating its directory.
pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = toml::to_string(value).map_err(|e| Error::Malformed {
        path: path.to_owned(),
        key: String::new(),
        message: format!("cannot be written as TOML: {e}"),
    })?;
    write_file(path, text.as_bytes())
}

/// Writes `bytes` to `path`, creating its directory.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(path, bytes).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
    }

    #[test]
    fn errors_name_key_and_line() {
        let err = parse_toml::<Outer>(Path::new("x.toml"), "[inner]\nname = 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("x.toml"), "{text}");
        assert!(text.contains("inner.name"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        let err = parse_toml::<Outer>(Path::new("x.toml"), "[inner\n").unwrap_err();
        assert!(err.to_string().starts_with("x.toml: "), "{err}");
    }
}
