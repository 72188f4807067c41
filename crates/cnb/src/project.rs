//! `project.toml`, the project descriptor: the buildpacks to use, build-time environment and
//! which files of the source are part of the app. Both schema 0.2 (`[_]` and `[io.buildpacks]`)
//! and the older 0.1 form (`[project]` and `[build]`) are read.
//!
//! Own serde types: `libcnb-data` has no project descriptor.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::files::parse_toml;

/// A project descriptor, in the form both schemas reduce to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectDescriptor {
    /// The schema version (`0.2`), or `None` for the 0.1 form.
    pub schema_version: Option<String>,
    /// The project's id.
    pub id: Option<String>,
    /// The project's name.
    pub name: Option<String>,
    /// The project's version.
    pub version: Option<String>,
    /// The builder the project asks for.
    pub builder: Option<String>,
    /// The buildpacks to run as one group, in order.
    pub buildpacks: Vec<ProjectBuildpack>,
    /// Buildpacks to run before the detected group.
    pub pre_buildpacks: Vec<ProjectBuildpack>,
    /// Buildpacks to run after the detected group.
    pub post_buildpacks: Vec<ProjectBuildpack>,
    /// Build-time environment variables, in file order.
    pub env: Vec<(String, String)>,
    /// Globs of the only files that are part of the app.
    pub include: Vec<String>,
    /// Globs of files that are not part of the app.
    pub exclude: Vec<String>,
}

/// A buildpack named in a project descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ProjectBuildpack {
    /// Its id (a buildpack of the builder, or the id to give an inline buildpack).
    #[serde(default)]
    pub id: Option<String>,
    /// Its version.
    #[serde(default)]
    pub version: Option<String>,
    /// Where to get it (a directory, `.tgz`, `docker://` image, `urn:cnb:registry:...`).
    #[serde(default)]
    pub uri: Option<String>,
    /// An inline buildpack's build script.
    #[serde(default)]
    pub script: Option<InlineScript>,
}

/// An inline buildpack's script.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct InlineScript {
    /// The Buildpack API it is written for.
    pub api: String,
    /// The script.
    pub inline: String,
    /// The shell to run it with.
    #[serde(default)]
    pub shell: Option<String>,
}

#[derive(Deserialize)]
struct File {
    #[serde(rename = "_", default)]
    meta: Option<Meta>,
    #[serde(default)]
    project: Option<Meta>,
    #[serde(default)]
    io: Option<Io>,
    #[serde(default)]
    build: Option<Build>,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(rename = "schema-version", default)]
    schema_version: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize, Default)]
struct Io {
    #[serde(default)]
    buildpacks: Option<Build>,
}

#[derive(Deserialize, Default)]
struct Build {
    #[serde(default)]
    builder: Option<String>,
    #[serde(default)]
    include: Option<Vec<String>>,
    #[serde(default)]
    exclude: Option<Vec<String>>,
    #[serde(default)]
    group: Vec<ProjectBuildpack>,
    #[serde(default)]
    buildpacks: Vec<ProjectBuildpack>,
    #[serde(default)]
    pre: Option<Groups>,
    #[serde(default)]
    post: Option<Groups>,
    #[serde(default)]
    build: Option<BuildEnv>,
    #[serde(default)]
    env: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
struct Groups {
    #[serde(default)]
    group: Vec<ProjectBuildpack>,
}

#[derive(Deserialize, Default)]
struct BuildEnv {
    #[serde(default)]
    env: Option<toml::Value>,
}

/// Parses a `project.toml` read from `path`.
pub fn parse_project_toml(path: &Path, text: &str) -> Result<ProjectDescriptor> {
    let file: File = parse_toml(path, text)?;
    let malformed = |key: &str, message: String| Error::Malformed {
        path: path.to_owned(),
        key: key.to_owned(),
        message,
    };
    let (table, prefix, meta) = match (file.io.and_then(|io| io.buildpacks), file.build) {
        (Some(io), _) => (io, "io.buildpacks", file.meta),
        (None, Some(build)) => (build, "build", file.project.or(file.meta)),
        (None, None) => (
            Build::default(),
            "io.buildpacks",
            file.meta.or(file.project),
        ),
    };
    let meta = meta.unwrap_or_default();
    let (buildpacks, group_key) = if table.group.is_empty() {
        (table.buildpacks, format!("{prefix}.buildpacks"))
    } else {
        (table.group, format!("{prefix}.group"))
    };
    for (i, bp) in buildpacks.iter().enumerate() {
        if bp.id.is_none() && bp.uri.is_none() {
            return Err(malformed(
                &format!("{group_key}[{i}]"),
                "a buildpack needs an id or a uri".into(),
            ));
        }
        if bp.script.is_some() && bp.id.is_none() {
            return Err(malformed(
                &format!("{group_key}[{i}].id"),
                "an inline buildpack needs an id".into(),
            ));
        }
    }
    if table.include.is_some() && table.exclude.is_some() {
        return Err(malformed(
            &format!("{prefix}.exclude"),
            "include and exclude cannot both be given".into(),
        ));
    }
    let (env_value, env_key) = match (table.build.and_then(|b| b.env), table.env) {
        (Some(v), _) => (Some(v), format!("{prefix}.build.env")),
        (None, Some(v)) => (Some(v), format!("{prefix}.env")),
        (None, None) => (None, String::new()),
    };
    let env = match env_value {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let key = format!("{env_key}[{i}]");
                let t = item.as_table().ok_or_else(|| {
                    malformed(&key, "expected a table with name and value".into())
                })?;
                let field = |f: &str| -> Result<String> {
                    match t.get(f) {
                        Some(toml::Value::String(s)) => Ok(s.clone()),
                        Some(other) => Err(malformed(
                            &format!("{key}.{f}"),
                            format!("expected a string, found {other}"),
                        )),
                        None => Err(malformed(&format!("{key}.{f}"), "missing".into())),
                    }
                };
                out.push((field("name")?, field("value")?));
            }
            out
        }
        Some(toml::Value::Table(t)) => {
            let mut out = Vec::new();
            for (k, v) in t {
                match v {
                    toml::Value::String(s) => out.push((k, s)),
                    other => {
                        return Err(malformed(
                            &format!("{env_key}.{k}"),
                            format!("expected a string, found {other}"),
                        ))
                    }
                }
            }
            out
        }
        Some(other) => {
            return Err(malformed(
                &env_key,
                format!("expected [[{env_key}]] tables of name and value, found {other}"),
            ))
        }
    };
    for (i, (name, _)) in env.iter().enumerate() {
        if name.is_empty() || name.contains('=') {
            return Err(malformed(
                &format!("{env_key}[{i}].name"),
                format!("`{name}` is not an environment variable name"),
            ));
        }
    }
    Ok(ProjectDescriptor {
        schema_version: meta.schema_version,
        id: meta.id,
        name: meta.name,
        version: meta.version,
        builder: table.builder,
        buildpacks,
        pre_buildpacks: table.pre.map(|g| g.group).unwrap_or_default(),
        post_buildpacks: table.post.map(|g| g.group).unwrap_or_default(),
        env,
        include: table.include.unwrap_or_default(),
        exclude: table.exclude.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProjectDescriptor> {
        parse_project_toml(Path::new("/app/project.toml"), text)
    }

    #[test]
    fn schema_0_2() {
        let p = parse(
            r#"
[_]
schema-version = "0.2"
id = "my-app"
[io.buildpacks]
builder = "b"
exclude = ["*.md"]
[[io.buildpacks.group]]
id = "kiln/node"
version = "1.0.0"
[[io.buildpacks.group]]
uri = "docker://example/bp"
[[io.buildpacks.build.env]]
name = "A"
value = "1"
"#,
        )
        .unwrap();
        assert_eq!(p.schema_version.as_deref(), Some("0.2"));
        assert_eq!(p.buildpacks.len(), 2);
        assert_eq!(p.buildpacks[1].uri.as_deref(), Some("docker://example/bp"));
        assert_eq!(p.env, vec![("A".into(), "1".into())]);
        assert_eq!(p.exclude, vec!["*.md"]);
    }

    #[test]
    fn schema_0_1_and_env_table() {
        let p = parse(
            "[project]\nid = \"x\"\n[build]\ninclude = [\"src\"]\n[[build.buildpacks]]\nuri = \"./bp\"\n[[build.env]]\nname = \"B\"\nvalue = \"2\"\n",
        )
        .unwrap();
        assert_eq!(p.id.as_deref(), Some("x"));
        assert_eq!(p.buildpacks[0].uri.as_deref(), Some("./bp"));
        assert_eq!(p.env, vec![("B".into(), "2".into())]);
        assert_eq!(p.include, vec!["src"]);
        let p = parse("[build.env]\nC = \"3\"\n").unwrap();
        assert_eq!(p.env, vec![("C".into(), "3".into())]);
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = parse("[[io.buildpacks.group]]\nversion = \"1\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/app/project.toml"), "{text}");
        assert!(text.contains("io.buildpacks.group[0]"), "{text}");
        let err = parse("[[io.buildpacks.build.env]]\nname = \"A\"\nvalue = 1\n").unwrap_err();
        assert!(
            err.to_string().contains("io.buildpacks.build.env[0].value"),
            "{err}"
        );
        let err = parse("[io.buildpacks]\ninclude = [\"a\"]\nexclude = [\"b\"]\n").unwrap_err();
        assert!(err.to_string().contains("io.buildpacks.exclude"), "{err}");
        let err = parse("[io.buildpacks]\nbuilder = 5\n").unwrap_err();
        assert!(err.to_string().contains("io.buildpacks.builder"), "{err}");
    }
}
