//! What the launcher needs of `<layers>/config/metadata.toml`: the buildpacks with their APIs,
//! the processes and the default process type. kiln-cnb writes the file (the Platform API's
//! form, which other tools read too); its other tables (labels, slices) are not read here.

use std::path::{Path, PathBuf};

use crate::toml::{Table, Value};

/// Where the metadata lives, relative to the layers directory.
pub const METADATA_PATH: &str = "config/metadata.toml";

/// A buildpack of the group that built the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buildpack {
    /// Its id (`kiln/go`).
    pub id: String,
    /// The Buildpack API it implements, as written (`0.10`).
    pub api: Option<String>,
}

/// A process the image defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The process type (`web`).
    pub kind: String,
    /// The command and its fixed arguments.
    pub command: Vec<String>,
    /// Overridable (Buildpack API 0.9+) or leading (older) arguments.
    pub args: Vec<String>,
    /// Whether it runs without a shell.
    pub direct: bool,
    /// The buildpack that defined it.
    pub buildpack_id: String,
    /// Its working directory, if not the app directory.
    pub working_dir: Option<String>,
}

/// The parts of metadata.toml the launcher uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The buildpacks, in group order.
    pub buildpacks: Vec<Buildpack>,
    /// The processes.
    pub processes: Vec<Process>,
    /// The default process type a buildpack chose.
    pub default_process_type: Option<String>,
}

/// Why metadata.toml could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}", path = path.display())]
pub struct MetadataError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it: the system's error, a TOML syntax error with its line, or the key
    /// (`processes[0].command`) whose value does not fit.
    pub message: String,
}

impl Metadata {
    /// Reads `<layers_dir>/config/metadata.toml`.
    pub fn read(layers_dir: &Path) -> Result<Metadata, MetadataError> {
        let path = layers_dir.join(METADATA_PATH);
        let fail = |message: String| MetadataError {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
        Metadata::parse(&text).map_err(fail)
    }

    /// The metadata in the TOML document `text`; the error says what is wrong where.
    pub fn parse(text: &str) -> Result<Metadata, String> {
        let doc = crate::toml::parse(text).map_err(|e| e.to_string())?;
        let mut md = Metadata {
            default_process_type: string(&doc, "", "buildpack-default-process-type")?,
            ..Metadata::default()
        };
        for (i, bp) in tables(&doc, "buildpacks")?.into_iter().enumerate() {
            let at = format!("buildpacks[{i}].");
            md.buildpacks.push(Buildpack {
                id: required(string(bp, &at, "id")?, &at, "id")?,
                api: string(bp, &at, "api")?,
            });
        }
        for (i, p) in tables(&doc, "processes")?.into_iter().enumerate() {
            let at = format!("processes[{i}].");
            let kind = required(string(p, &at, "type")?, &at, "type")?;
            let command = required(strings(p, &at, "command")?, &at, "command")?;
            if command.is_empty() {
                return Err(format!("key `{at}command`: empty (it names the program)"));
            }
            md.processes.push(Process {
                kind,
                command,
                args: strings(p, &at, "args")?.unwrap_or_default(),
                direct: match p.get("direct") {
                    None => false,
                    Some(Value::Boolean(b)) => *b,
                    Some(v) => return Err(wrong(&at, "direct", "a boolean", v)),
                },
                buildpack_id: string(p, &at, "buildpack-id")?.unwrap_or_default(),
                working_dir: string(p, &at, "working-dir")?,
            });
        }
        Ok(md)
    }

    /// A process by type.
    pub fn process(&self, kind: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.kind == kind)
    }

    /// Whether the buildpack `id` implements Buildpack API `major.minor` or newer; a buildpack
    /// that is not in the group, or whose API cannot be read, counts as 0.9 (the API whose
    /// rules Kiln applies when it cannot tell).
    pub fn buildpack_api_at_least(&self, id: &str, major: u64, minor: u64) -> bool {
        let api = self
            .buildpacks
            .iter()
            .find(|b| b.id == id)
            .and_then(|b| b.api.as_deref())
            .and_then(parse_api)
            .unwrap_or((0, 9));
        api >= (major, minor)
    }
}

/// `<major>.<minor>` or `<major>` (meaning `<major>.0`), as kiln-cnb's `Api` reads it.
fn parse_api(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.split_once('.').unwrap_or((text, "0"));
    let number = |part: &str| {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    Some((number(major)?, number(minor)?))
}

fn wrong(at: &str, key: &str, expected: &str, found: &Value) -> String {
    format!(
        "key `{at}{key}`: expected {expected}, found {}",
        found.kind()
    )
}

fn required<T>(value: Option<T>, at: &str, key: &str) -> Result<T, String> {
    value.ok_or_else(|| format!("key `{at}{key}`: missing"))
}

fn string(table: &Table, at: &str, key: &str) -> Result<Option<String>, String> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(at, key, "a string", v)),
    }
}

fn strings(table: &Table, at: &str, key: &str) -> Result<Option<Vec<String>>, String> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                v => Err(wrong(at, &format!("{key}[{i}]"), "a string", v)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(v) => Err(wrong(at, key, "an array of strings", v)),
    }
}

/// The tables of the array of tables `key` of the root (none when it is missing).
fn tables<'a>(doc: &'a Table, key: &str) -> Result<Vec<&'a Table>, String> {
    match doc.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Table(t) => Ok(t),
                v => Err(wrong("", &format!("{key}[{i}]"), "a table", v)),
            })
            .collect(),
        Some(v) => Err(wrong("", key, "an array of tables", v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_processes_buildpacks_and_the_default() {
        let md = Metadata::parse(
            r#"
buildpack-default-process-type = "web"

[[buildpacks]]
id = "kiln/go"
version = "0.1.0"
api = "0.10"

[[buildpacks]]
id = "old/bp"
version = "1"
api = "0.8"

[[labels]]
key = "k"
value = "v"

[[processes]]
type = "web"
command = ["/layers/kiln_go/bin/app"]
args = ["--port", "8080"]
direct = true
buildpack-id = "kiln/go"
working-dir = "srv"

[[processes]]
type = "task"
command = ['echo "done"']
buildpack-id = "old/bp"

[[slices]]
paths = ["a/*"]
"#,
        )
        .unwrap();
        assert_eq!(md.default_process_type.as_deref(), Some("web"));
        assert_eq!(md.buildpacks.len(), 2);
        let web = md.process("web").unwrap();
        assert_eq!(web.command, ["/layers/kiln_go/bin/app"]);
        assert_eq!(web.args, ["--port", "8080"]);
        assert!(web.direct);
        assert_eq!(web.working_dir.as_deref(), Some("srv"));
        let task = md.process("task").unwrap();
        assert_eq!(task.command, ["echo \"done\""]);
        assert!(task.args.is_empty() && !task.direct && task.working_dir.is_none());
        assert!(md.buildpack_api_at_least("kiln/go", 0, 9));
        assert!(!md.buildpack_api_at_least("old/bp", 0, 9));
        // Unknown buildpacks and unreadable APIs count as 0.9.
        assert!(md.buildpack_api_at_least("missing/bp", 0, 9));
        assert!(!md.buildpack_api_at_least("missing/bp", 0, 10));
    }

    #[test]
    fn values_of_the_wrong_kind_are_named_by_key() {
        for (doc, message) in [
            ("[[processes]]\ncommand = []\n", "key `processes[0].type`: missing"),
            (
                "[[processes]]\ntype = 'web'\ncommand = 'x'\n",
                "key `processes[0].command`: expected an array of strings, found a string",
            ),
            (
                "[[processes]]\ntype = 'a'\ncommand = ['x']\n[[processes]]\ntype = 'b'\ncommand = [1]\n",
                "key `processes[1].command[0]`: expected a string, found a number or date",
            ),
            (
                "[[processes]]\ntype = 'web'\ncommand = ['x']\ndirect = 'yes'\n",
                "key `processes[0].direct`: expected a boolean, found a string",
            ),
            ("processes = 3\n", "key `processes`: expected an array of tables"),
            (
                "[[processes]]\ntype = 'web'\ncommand = []\n",
                "key `processes[0].command`: empty",
            ),
            (
                "buildpack-default-process-type = true\n",
                "key `buildpack-default-process-type`: expected a string, found a boolean",
            ),
            ("[[buildpacks]]\napi = '0.9'\n", "key `buildpacks[0].id`: missing"),
            ("processes = [", "line 1: "),
        ] {
            let err = Metadata::parse(doc).unwrap_err();
            assert!(err.contains(message), "{doc:?}: {err}");
        }
    }

    #[test]
    fn api_versions() {
        assert_eq!(parse_api("0.10"), Some((0, 10)));
        assert_eq!(parse_api("1"), Some((1, 0)));
        for bad in ["", "0.", ".1", "0.1.2", "a.b", "-1"] {
            assert_eq!(parse_api(bad), None, "{bad}");
        }
    }
}
