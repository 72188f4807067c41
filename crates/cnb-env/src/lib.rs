//! Environment construction from layer directories: the `bin`/`lib`/... root directories and
//! the `env`, `env.build`, `env.launch` directories with their suffix rules, shared by the
//! build phase (kiln-cnb) and the launcher (kiln-launcher).
//!
//! A crate of its own, with nothing but `std` at run time, because the launcher ships in every
//! app image: it must not pull in the TOML and JSON stack the build phase uses.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A layer directory or env file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}", path = path.display())]
pub struct Error {
    /// The path that failed.
    pub path: PathBuf,
    /// What the system said.
    pub source: std::io::Error,
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error { path, source }
}

/// The directory name of a buildpack id (`/` becomes `_`), as the layers directory
/// (`<layers>/<escaped id>/`) and a builder's buildpacks directory use.
pub fn escape_id(id: &str) -> String {
    id.replace('/', "_")
}

/// Which phase an environment is for: decides which layer root directories count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Later buildpacks' `bin/detect` and `bin/build`.
    Build,
    /// The app's processes.
    Launch,
}

impl Phase {
    /// Subdirectories of a layer and the variables they are prepended to.
    fn root_dirs(self) -> &'static [(&'static str, &'static [&'static str])] {
        match self {
            Phase::Build => &[
                ("bin", &["PATH"]),
                ("lib", &["LD_LIBRARY_PATH", "LIBRARY_PATH"]),
                ("include", &["CPATH"]),
                ("pkgconfig", &["PKG_CONFIG_PATH"]),
            ],
            Phase::Launch => &[("bin", &["PATH"]), ("lib", &["LD_LIBRARY_PATH"])],
        }
    }

    /// Whether `name` is a path-list variable that layer roots feed.
    pub fn is_root_var(self, name: &str) -> bool {
        self.root_dirs()
            .iter()
            .any(|(_, vars)| vars.contains(&name))
    }
}

/// Variables of the lifecycle's own environment that reach buildpacks; everything else is
/// left out so that builds do not depend on how the platform was started.
pub const BUILD_ENV_INCLUDED: &[&str] = &[
    "CNB_STACK_ID",
    "HOSTNAME",
    "HOME",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "PATH",
    "LD_LIBRARY_PATH",
    "LIBRARY_PATH",
    "CPATH",
    "PKG_CONFIG_PATH",
];

/// Variables of the launcher's environment that never reach the app.
pub const LAUNCH_ENV_EXCLUDED: &[&str] = &["CNB_LAYERS_DIR", "CNB_APP_DIR", "CNB_PROCESS_TYPE"];

/// How an env file changes its variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Override,
    Default,
    Append,
    Prepend,
}

/// A set of environment variables being built up, kept sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// An empty environment.
    pub fn new() -> Env {
        Env::default()
    }

    /// The environment made of `vars`.
    pub fn from_vars<I, K, V>(vars: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env::from_vars_where(vars, |_| true)
    }

    /// The build phase's starting environment: only the [`BUILD_ENV_INCLUDED`] variables of
    /// `vars`.
    pub fn for_build<I, K, V>(vars: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env::from_vars_where(vars, |k| BUILD_ENV_INCLUDED.contains(&k))
    }

    /// The launcher's starting environment: `vars` without [`LAUNCH_ENV_EXCLUDED`].
    pub fn for_launch<I, K, V>(vars: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env::from_vars_where(vars, |k| !LAUNCH_ENV_EXCLUDED.contains(&k))
    }

    /// The variables of `vars` whose names `keep` accepts; a name given twice keeps its last
    /// value.
    ///
    /// Inserted one by one and filtered before insertion, not collected and then retained: the
    /// launcher then carries neither the sort `collect` does first nor the map's removal code
    /// (a few kilobytes each, in every app image).
    fn from_vars_where<I, K, V>(vars: I, keep: impl Fn(&str) -> bool) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut env = Env::new();
        for (k, v) in vars {
            let k = k.into();
            if keep(&k) {
                env.vars.insert(k, v.into());
            }
        }
        env
    }

    /// A variable's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Sets a variable.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(name.into(), value.into());
    }

    /// Removes a variable.
    pub fn remove(&mut self, name: &str) {
        self.vars.remove(name);
    }

    /// The variables, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Prepends `value` to the path list `name` (`:`-separated).
    fn prepend_path(&mut self, name: &str, value: &str) {
        let joined = match self.get(name) {
            Some(old) if !old.is_empty() => format!("{value}:{old}"),
            _ => value.to_owned(),
        };
        self.set(name, joined);
    }

    /// Adds a layer's root directories (`bin` to `PATH`, `lib` to `LD_LIBRARY_PATH`, ...) for
    /// `phase`, each only when the layer has it.
    pub fn add_root_dir(&mut self, layer: &Path, phase: Phase) {
        for (dir, vars) in phase.root_dirs() {
            let path = layer.join(dir);
            if path.is_dir() {
                let value = path.to_string_lossy().into_owned();
                for var in *vars {
                    self.prepend_path(var, &value);
                }
            }
        }
    }

    /// Applies an env directory of a layer (`env/`, `env.build/`, `env.launch/`,
    /// `env.launch/<process>/`): each file names a variable, its suffix says how it changes:
    /// none or `.override` replaces, `.default` sets when unset, `.append`/`.prepend` join
    /// with the contents of `<NAME>.delim` (nothing when there is no such file). Files are
    /// applied in name order; subdirectories are left for the caller. A missing directory
    /// changes nothing.
    pub fn apply_env_dir(&mut self, dir: &Path) -> Result<()> {
        for (file, value) in env_files(dir)? {
            let (name, action) = split_action(&file);
            let Some(action) = action else {
                continue; // a `.delim` file, read with its variable
            };
            let delim = || -> Result<String> {
                let path = dir.join(format!("{name}.delim"));
                match std::fs::read_to_string(&path) {
                    Ok(d) => Ok(d),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                    Err(e) => Err(io(path)(e)),
                }
            };
            let old = self.get(name).filter(|v| !v.is_empty()).map(str::to_owned);
            let new = match (action, old) {
                (Action::Override, _) => value,
                (Action::Default, Some(_)) => continue,
                (Action::Default, None) => value,
                (Action::Append, Some(old)) => format!("{old}{}{value}", delim()?),
                (Action::Prepend, Some(old)) => format!("{value}{}{old}", delim()?),
                (Action::Append | Action::Prepend, None) => value,
            };
            self.set(name, new);
        }
        Ok(())
    }

    /// Applies the platform's `<platform>/env/` directory: each file sets its variable, except
    /// that path lists fed by layer roots (`PATH`, ...) get the value prepended.
    pub fn apply_platform_env_dir(&mut self, dir: &Path, phase: Phase) -> Result<()> {
        for (name, value) in env_files(dir)? {
            if phase.is_root_var(&name) {
                self.prepend_path(&name, &value);
            } else {
                self.set(name, value);
            }
        }
        Ok(())
    }
}

/// Splits `NAME.suffix` into the variable and its action; `None` for `.delim` files.
fn split_action(file: &str) -> (&str, Option<Action>) {
    for (suffix, action) in [
        (".override", Some(Action::Override)),
        (".default", Some(Action::Default)),
        (".append", Some(Action::Append)),
        (".prepend", Some(Action::Prepend)),
        (".delim", None),
    ] {
        if let Some(name) = file.strip_suffix(suffix) {
            if !name.is_empty() {
                return (name, action);
            }
        }
    }
    (file, Some(Action::Override))
}

/// The regular files of `dir` (following symlinks) with their contents, sorted by name.
fn env_files(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (path, is_dir) in sorted_entries(dir)? {
        if is_dir {
            continue;
        }
        let value = std::fs::read(&path).map_err(io(&path))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        out.push((
            name.into_owned(),
            String::from_utf8_lossy(&value).into_owned(),
        ));
    }
    Ok(out)
}

/// The sorted subdirectories of `dir` (none when it does not exist).
pub fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter_map(|(path, is_dir)| is_dir.then_some(path))
        .collect())
}

/// The sorted regular files (or links to them) directly in `dir`.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter_map(|(path, is_dir)| (!is_dir).then_some(path))
        .collect())
}

/// The entries of `dir` by name, each with whether it is a directory (following symlinks);
/// none when `dir` does not exist. One listing for the three callers above: the launcher
/// carries one sort, not three.
fn sorted_entries(dir: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        let is_dir = path.is_dir();
        out.push((path, is_dir));
    }
    // The paths share their parent, so byte order is name order; names are unique, so an
    // unstable sort gives the one order there is.
    out.sort_unstable_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_ids() {
        assert_eq!(escape_id("heroku/nodejs"), "heroku_nodejs");
        assert_eq!(escape_id("kiln/go"), "kiln_go");
    }

    #[test]
    fn suffix_rules() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, value) in [
            ("PLAIN", "p"),
            ("OVR.override", "o"),
            ("DEF.default", "d"),
            ("SET.default", "ignored"),
            ("APP.append", "tail"),
            ("APP.delim", ","),
            ("PRE.prepend", "head"),
            ("PRE.delim", ":"),
            ("NODELIM.append", "x"),
            ("NEW.append", "only"),
        ] {
            std::fs::write(d.join(name), value).unwrap();
        }
        std::fs::create_dir(d.join("web")).unwrap();
        let mut env = Env::from_vars([
            ("OVR", "old"),
            ("SET", "kept"),
            ("APP", "start"),
            ("PRE", "rest"),
            ("NODELIM", "y"),
        ]);
        env.apply_env_dir(d).unwrap();
        assert_eq!(env.get("PLAIN"), Some("p"));
        assert_eq!(env.get("OVR"), Some("o"));
        assert_eq!(env.get("DEF"), Some("d"));
        assert_eq!(env.get("SET"), Some("kept"));
        assert_eq!(env.get("APP"), Some("start,tail"));
        assert_eq!(env.get("PRE"), Some("head:rest"));
        assert_eq!(env.get("NODELIM"), Some("yx"));
        assert_eq!(env.get("NEW"), Some("only"));
        assert_eq!(env.get("web"), None);
    }

    #[test]
    fn root_dirs_by_phase() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "lib", "include"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let mut build = Env::from_vars([("PATH", "/usr/bin")]);
        build.add_root_dir(dir.path(), Phase::Build);
        let bin = dir.path().join("bin").display().to_string();
        assert_eq!(build.get("PATH"), Some(format!("{bin}:/usr/bin").as_str()));
        assert!(build.get("LIBRARY_PATH").is_some());
        assert!(build.get("CPATH").is_some());
        let mut launch = Env::new();
        launch.add_root_dir(dir.path(), Phase::Launch);
        assert_eq!(launch.get("PATH"), Some(bin.as_str()));
        assert!(launch.get("LIBRARY_PATH").is_none());
        assert!(launch.get("CPATH").is_none());
    }

    #[test]
    fn platform_env_prepends_path_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("PATH"), "/opt/bin").unwrap();
        std::fs::write(dir.path().join("FOO"), "bar").unwrap();
        let mut env = Env::for_build([("PATH", "/usr/bin"), ("SECRET", "x")]);
        assert_eq!(env.get("SECRET"), None);
        env.apply_platform_env_dir(dir.path(), Phase::Build)
            .unwrap();
        assert_eq!(env.get("PATH"), Some("/opt/bin:/usr/bin"));
        assert_eq!(env.get("FOO"), Some("bar"));
    }
}
