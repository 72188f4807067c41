//! `buildpack.toml` (component and composite buildpacks) and the buildpacks directory
//! (`<buildpacks>/<escaped id>/<version>/`) the platform finds them in.

use std::path::{Path, PathBuf};

use libcnb_data::buildpack::{ComponentBuildpackDescriptor, CompositeBuildpackDescriptor};

pub use kiln_cnb_env::escape_id;

use crate::api::Api;
use crate::error::{io, Error, Result};
use crate::files::parse_toml;
use crate::order::{GroupEntry, Order, OrderGroup};

/// A buildpack as the platform sees it: its descriptor and where it lives.
#[derive(Debug, Clone)]
pub struct Buildpack {
    /// The buildpack's root directory (`$CNB_BUILDPACK_DIR`).
    pub dir: PathBuf,
    /// The Buildpack API it implements.
    pub api: Api,
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// Its homepage, if it names one.
    pub homepage: Option<String>,
    /// Whether `bin/detect` and `bin/build` run without the user's platform environment.
    pub clear_env: bool,
    /// SBOM media types it may write (`application/vnd.cyclonedx+json`, ...).
    pub sbom_formats: Vec<String>,
    /// Component (runs itself) or composite (an order of other buildpacks).
    pub kind: BuildpackKind,
}

/// What kind of buildpack a descriptor describes.
#[derive(Debug, Clone)]
pub enum BuildpackKind {
    /// A buildpack with `bin/detect` and `bin/build`.
    Component,
    /// A buildpack that is an order of other buildpacks.
    Composite(Order),
}

impl Buildpack {
    /// `id@version`, as groups and messages show a buildpack.
    pub fn key(&self) -> String {
        format!("{}@{}", self.id, self.version)
    }
}

/// The lenient first look at a descriptor: enough to check the API before the strict parse.
#[derive(serde::Deserialize)]
struct Head {
    api: Option<toml::Value>,
    buildpack: Option<HeadBuildpack>,
    order: Option<toml::Value>,
}

#[derive(serde::Deserialize)]
struct HeadBuildpack {
    id: Option<toml::Value>,
}

/// Parses a `buildpack.toml` read from `path` (in buildpack directory `dir`).
///
/// The strict parse uses `libcnb-data`'s descriptor types, chosen by whether the file has an
/// `[[order]]` so that an error names the key of the kind of buildpack it is.
pub fn parse_buildpack_toml(dir: &Path, path: &Path, text: &str) -> Result<Buildpack> {
    let head: Head = parse_toml(path, text)?;
    let id = head
        .buildpack
        .as_ref()
        .and_then(|b| b.id.as_ref())
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_owned();
    let api_text = match &head.api {
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(Error::Malformed {
                path: path.to_owned(),
                key: "api".into(),
                message: format!("expected a string such as \"0.10\", found {other}"),
            })
        }
        None => {
            return Err(Error::Malformed {
                path: path.to_owned(),
                key: "api".into(),
                message: "missing: a buildpack.toml must declare its Buildpack API".into(),
            })
        }
    };
    let api: Api = api_text
        .parse()
        .map_err(|e: crate::api::ApiParseError| Error::Malformed {
            path: path.to_owned(),
            key: "api".into(),
            message: e.to_string(),
        })?;
    if !api.is_supported_buildpack_api() {
        return Err(Error::UnsupportedApi {
            path: path.to_owned(),
            id,
            api: api_text,
        });
    }
    if head.order.is_some() {
        let d: CompositeBuildpackDescriptor = parse_toml(path, text)?;
        let order = Order {
            order: d
                .order
                .iter()
                .map(|o| OrderGroup {
                    group: o
                        .group
                        .iter()
                        .map(|g| GroupEntry {
                            id: g.id.to_string(),
                            version: Some(g.version.to_string()),
                            optional: g.optional,
                        })
                        .collect(),
                })
                .collect(),
        };
        Ok(Buildpack {
            dir: dir.to_owned(),
            api,
            id: d.buildpack.id.to_string(),
            version: d.buildpack.version.to_string(),
            homepage: d.buildpack.homepage.clone(),
            clear_env: d.buildpack.clear_env,
            sbom_formats: Vec::new(),
            kind: BuildpackKind::Composite(order),
        })
    } else {
        let d: ComponentBuildpackDescriptor = parse_toml(path, text)?;
        let mut sbom_formats: Vec<String> = d
            .buildpack
            .sbom_formats
            .iter()
            .map(|f| {
                serde_json::to_value(f)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            })
            .collect();
        sbom_formats.sort();
        Ok(Buildpack {
            dir: dir.to_owned(),
            api,
            id: d.buildpack.id.to_string(),
            version: d.buildpack.version.to_string(),
            homepage: d.buildpack.homepage.clone(),
            clear_env: d.buildpack.clear_env,
            sbom_formats,
            kind: BuildpackKind::Component,
        })
    }
}

/// Reads the buildpack in directory `dir`.
pub fn read_buildpack(dir: &Path) -> Result<Buildpack> {
    let path = dir.join("buildpack.toml");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    parse_buildpack_toml(dir, &path, &text)
}

/// The buildpacks directory of a builder (`/cnb/buildpacks`): `<dir>/<escaped id>/<version>/`.
#[derive(Debug, Clone)]
pub struct BuildpackStore {
    dir: PathBuf,
}

impl BuildpackStore {
    /// The store rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> BuildpackStore {
        BuildpackStore { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The buildpack `id` at `version`; with no version, the only version the store has.
    pub fn lookup(&self, id: &str, version: Option<&str>) -> Result<Buildpack> {
        let not_found = || Error::BuildpackNotFound {
            id: id.to_owned(),
            version: version.map(str::to_owned),
            dir: self.dir.clone(),
        };
        let id_dir = self.dir.join(escape_id(id));
        let version_dir = match version.filter(|v| !v.is_empty()) {
            Some(v) => id_dir.join(v),
            None => {
                let mut versions: Vec<PathBuf> = match std::fs::read_dir(&id_dir) {
                    Ok(entries) => entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| p.join("buildpack.toml").is_file())
                        .collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
                    Err(e) => {
                        return Err(Error::Io {
                            path: id_dir,
                            source: e,
                        })
                    }
                };
                if versions.len() > 1 {
                    versions.sort();
                    return Err(Error::Platform(format!(
                        "buildpack {id} has {} versions in {} ({}); name one as {id}@VERSION",
                        versions.len(),
                        self.dir.display(),
                        versions
                            .iter()
                            .filter_map(|p| p.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                versions.pop().ok_or_else(not_found)?
            }
        };
        if !version_dir.join("buildpack.toml").is_file() {
            return Err(not_found());
        }
        let bp = read_buildpack(&version_dir)?;
        if bp.id != id {
            return Err(Error::Platform(format!(
                "{}: declares buildpack {} but is stored as {id}",
                version_dir.join("buildpack.toml").display(),
                bp.id
            )));
        }
        Ok(bp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Buildpack> {
        parse_buildpack_toml(Path::new("/bp"), Path::new("/bp/buildpack.toml"), text)
    }

    #[test]
    fn component_and_composite() {
        let bp = parse(
            "api = \"0.10\"\n[buildpack]\nid = \"a/b\"\nversion = \"1.2.3\"\nclear-env = true\nsbom-formats = [\"application/vnd.cyclonedx+json\"]\n[[targets]]\nos = \"linux\"\n[[stacks]]\nid = \"*\"\n",
        )
        .unwrap();
        assert_eq!(bp.key(), "a/b@1.2.3");
        assert!(bp.clear_env);
        assert_eq!(bp.sbom_formats, vec!["application/vnd.cyclonedx+json"]);
        assert!(matches!(bp.kind, BuildpackKind::Component));
        let bp = parse(
            "api = \"0.11\"\n[buildpack]\nid = \"meta\"\nversion = \"0.1.0\"\n[[order]]\n[[order.group]]\nid = \"x\"\nversion = \"1.0.0\"\noptional = true\n",
        )
        .unwrap();
        match bp.kind {
            BuildpackKind::Composite(order) => {
                assert_eq!(order.order[0].group[0].id, "x");
                assert!(order.order[0].group[0].optional);
            }
            BuildpackKind::Component => panic!("composite expected"),
        }
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = parse("api = \"0.10\"\n[buildpack]\nid = \"a\"\nversion = 1\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/bp/buildpack.toml"), "{text}");
        assert!(text.contains("buildpack.version"), "{text}");
        let err = parse("[buildpack]\nid = \"a\"\nversion = \"1.0.0\"\n").unwrap_err();
        assert!(err.to_string().contains("key `api`"), "{err}");
        let err =
            parse("api = \"0.6\"\n[buildpack]\nid = \"old\"\nversion = \"1.0.0\"\n").unwrap_err();
        assert!(matches!(err, Error::UnsupportedApi { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("buildpack old declares Buildpack API 0.6"),
            "{err}"
        );
        assert!(err.to_string().contains("0.7 to 0.12"), "{err}");
    }

    #[test]
    fn escapes_ids() {
        assert_eq!(escape_id("heroku/nodejs"), "heroku_nodejs");
    }
}
