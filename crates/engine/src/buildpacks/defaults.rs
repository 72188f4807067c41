//! The build and run images of a build with Kiln's own buildpacks when the user names none.
//!
//! The build image must be known before detection runs in it, so the engine looks at the
//! context first, by the same marker files the buildpacks detect on and in the same order as
//! their `order.toml` (the first language that matches wins; a static site only when no
//! language does), and picks the images a user would pick by hand for that language: the
//! official full image to build in and its slim variant to run on, a version taken from the
//! app where it says one. A Go binary and a static site (served by a static executable) need
//! nothing of the run image, so they run on the smallest base there is (no shell, no libc).
//!
//! Only the first look is done here; whether the app really builds is the buildpacks'
//! business (a `package.json` that is not JSON still picks Node.js images, and the node
//! buildpack then fails naming the file).

use std::path::Path;

/// The Node.js major version used when `engines.node` names none: the active LTS line.
pub const DEFAULT_NODE_MAJOR: u32 = 22;
/// The Python version used when the app names none.
pub const DEFAULT_PYTHON: &str = "3.12";
/// The Go version used when `go.mod` names none.
pub const DEFAULT_GO: &str = "1.23";
/// The smallest run image: no shell, no libc, only CA certificates, time zones and a passwd
/// file, for static executables.
pub const SMALLEST_IMAGE: &str = "gcr.io/distroless/static-debian12:latest";
/// The image static sites are built in: the build only copies files, so any image with a
/// POSIX shell does.
pub const STATIC_BUILD_IMAGE: &str = "docker.io/library/busybox:stable";

/// The language a context was taken for, with the version it asks for where it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Language {
    /// `package.json`; the major version from `engines.node`, when it names one.
    Node(Option<u32>),
    /// `requirements.txt`, `Pipfile.lock` or `pyproject.toml`; `MAJOR.MINOR` from
    /// `.python-version` or `runtime.txt`.
    Python(Option<String>),
    /// `go.mod`; `MAJOR.MINOR` of its `go` directive.
    Go(Option<String>),
    /// `index.html` or `public/index.html`, and no language.
    Static,
}

impl Language {
    /// The language's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Language::Node(_) => "Node.js",
            Language::Python(_) => "Python",
            Language::Go(_) => "Go",
            Language::Static => "static site",
        }
    }

    /// The default (build image, run image).
    pub fn images(&self) -> (String, String) {
        match self {
            Language::Node(major) => {
                let major = major.unwrap_or(DEFAULT_NODE_MAJOR);
                (
                    format!("docker.io/library/node:{major}"),
                    format!("docker.io/library/node:{major}-slim"),
                )
            }
            Language::Python(version) => {
                let version = version.as_deref().unwrap_or(DEFAULT_PYTHON);
                (
                    format!("docker.io/library/python:{version}"),
                    format!("docker.io/library/python:{version}-slim"),
                )
            }
            Language::Go(version) => {
                let version = version.as_deref().unwrap_or(DEFAULT_GO);
                (
                    format!("docker.io/library/golang:{version}"),
                    SMALLEST_IMAGE.to_owned(),
                )
            }
            Language::Static => (STATIC_BUILD_IMAGE.to_owned(), SMALLEST_IMAGE.to_owned()),
        }
    }
}

/// The marker files looked for, in the order of the languages, for messages.
pub const MARKERS: &str =
    "package.json, requirements.txt, Pipfile.lock, pyproject.toml, go.mod, index.html";

/// The language of an app whose top-level files `read` returns (`None`: no such file).
pub fn detect(read: impl Fn(&str) -> Option<String>) -> Option<Language> {
    if let Some(text) = read("package.json") {
        return Some(Language::Node(node_major(&text)));
    }
    if ["requirements.txt", "Pipfile.lock", "pyproject.toml"]
        .iter()
        .any(|m| read(m).is_some())
    {
        let version = read(".python-version")
            .and_then(|t| major_minor(t.trim()))
            .or_else(|| {
                read("runtime.txt")
                    .and_then(|t| major_minor(t.trim().trim_start_matches("python-")))
            });
        return Some(Language::Python(version));
    }
    if let Some(text) = read("go.mod") {
        let version = text.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("go ")?;
            major_minor(rest.trim())
        });
        return Some(Language::Go(version));
    }
    if read("index.html").is_some() || read("public/index.html").is_some() {
        return Some(Language::Static);
    }
    None
}

/// The major version `engines.node` pins, when it pins one: `18`, `18.x`, `18.2.0`, `^18`,
/// `~18.2`, `=18`. Open ranges (`>=18`, `18 - 20`, `||` lists) leave the choice to the
/// default, which satisfies the usual `>=` floor.
fn node_major(package_json: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(package_json).ok()?;
    let range = value.get("engines")?.get("node")?.as_str()?.trim();
    let version = range.trim_start_matches(['^', '~', '=', 'v']).trim();
    if version.contains([' ', '|', '<', '>']) {
        return None;
    }
    let major = version.split('.').next()?;
    major.parse().ok()
}

/// `MAJOR.MINOR` of a version (`3.11.4` → `3.11`), when it starts with one.
fn major_minor(version: &str) -> Option<String> {
    let mut parts = version.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    let minor: String = minor.chars().take_while(char::is_ascii_digit).collect();
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    (numeric(major) && numeric(&minor)).then(|| format!("{major}.{minor}"))
}

/// The language of the context at `root`, read through its root (a marker that is a symlink
/// out of the context is not followed out of it).
pub(crate) fn detect_context(context: &kiln_context::BuildContext) -> Option<Language> {
    detect(|name| {
        super::read_context_file(context, Path::new(name))
            .ok()
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files<'a>(list: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            list.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.to_string())
        }
    }

    #[test]
    fn languages_are_taken_in_the_order_of_the_buildpacks() {
        let node_and_site = [("package.json", "{}"), ("index.html", "")];
        assert_eq!(detect(files(&node_and_site)), Some(Language::Node(None)));
        let python_and_go = [("go.mod", "module x\n"), ("pyproject.toml", "")];
        assert_eq!(detect(files(&python_and_go)), Some(Language::Python(None)));
        let site = [("public/index.html", "")];
        assert_eq!(detect(files(&site)), Some(Language::Static));
        assert_eq!(detect(files(&[("Procfile", "web: x")])), None);
    }

    #[test]
    fn versions_come_from_the_app_where_it_pins_one() {
        for (range, major) in [
            ("18", Some(18)),
            ("^20.1.0", Some(20)),
            ("~18.2", Some(18)),
            ("18.x", Some(18)),
            (">=18", None),
            ("16 - 20", None),
            ("18 || 20", None),
        ] {
            let pkg = format!(r#"{{"engines":{{"node":"{range}"}}}}"#);
            assert_eq!(node_major(&pkg), major, "{range}");
        }
        assert_eq!(node_major("not json"), None);
        let go = [("go.mod", "module example.com/x\n\ngo 1.21.3\n")];
        assert_eq!(detect(files(&go)), Some(Language::Go(Some("1.21".into()))));
        let py = [("requirements.txt", ""), ("runtime.txt", "python-3.11.9\n")];
        assert_eq!(
            detect(files(&py)),
            Some(Language::Python(Some("3.11".into())))
        );
        let py = [("Pipfile.lock", "{}"), (".python-version", "3.13\n")];
        assert_eq!(
            detect(files(&py)),
            Some(Language::Python(Some("3.13".into())))
        );
    }

    #[test]
    fn images_are_the_official_ones() {
        assert_eq!(
            Language::Node(Some(20)).images(),
            (
                "docker.io/library/node:20".into(),
                "docker.io/library/node:20-slim".into()
            )
        );
        assert_eq!(
            Language::Python(None).images().1,
            format!("docker.io/library/python:{DEFAULT_PYTHON}-slim")
        );
        assert_eq!(Language::Go(None).images().1, SMALLEST_IMAGE);
        assert_eq!(Language::Static.images().1, SMALLEST_IMAGE);
    }
}
