//! Registry credentials from a Docker `config.json`, as a kubelet mounts a
//! `kubernetes.io/dockerconfigjson` Secret: `auths` entries, `credsStore` and `credHelpers`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use crate::error::Error;
use crate::secret::Secret;

/// The key Docker uses for Docker Hub in `auths` and when asking credential helpers.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// How long a credential helper may run before Kiln gives up on it.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// What a registry accepts as proof of identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password, sent as HTTP Basic to the registry or to its token realm.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken`), exchanged at the token realm by a POST.
    IdentityToken {
        /// The user name stored with the token, if any; some token servers want it.
        username: Option<String>,
        /// The refresh token.
        token: Secret,
    },
    /// A bearer token (`registrytoken`) sent to the registry as it is.
    RegistryToken(Secret),
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// A parsed Docker `config.json`. Secrets are kept only as [`Secret`]s.
#[derive(Clone, Default)]
pub struct DockerConfig {
    path: Option<PathBuf>,
    auths: Vec<(String, Option<Credential>)>,
    creds_store: Option<String>,
    cred_helpers: HashMap<String, String>,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfig")
            .field("path", &self.path)
            .field(
                "auths",
                &self.auths.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("creds_store", &self.creds_store)
            // Sorted: a HashMap prints in a per-process random order, and two loads of the
            // same file should log the same text.
            .field(
                "cred_helpers",
                &self.cred_helpers.iter().collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

impl DockerConfig {
    /// Parses the text of a `config.json`; `path` is only used in error messages.
    ///
    /// Parse errors report the line and column but never the offending text, because the
    /// text around a syntax error in this file is usually a credential.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let file: ConfigFile = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_owned(),
            message: format!(
                "invalid JSON ({:?} error) at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
        let mut auths = Vec::with_capacity(file.auths.len());
        for (key, entry) in file.auths {
            let credential = entry.into_credential().map_err(|message| Error::Config {
                path: path.to_owned(),
                message: format!("auths entry {key:?}: {message}"),
            })?;
            auths.push((key, credential));
        }
        // Deterministic order for the normalised-key fallback, whatever the JSON map order.
        auths.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(DockerConfig {
            path: Some(path.to_owned()),
            auths,
            creds_store: file.creds_store.filter(|s| !s.is_empty()),
            cred_helpers: file.cred_helpers,
        })
    }

    /// Reads and parses a `config.json` file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// The file this configuration was read from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The credential helper responsible for `registry`, from `credHelpers` or `credsStore`.
    pub fn helper_for(&self, registry: &str) -> Option<&str> {
        let wanted = normalize_registry(registry);
        let by_exact = self.cred_helpers.get(registry);
        let by_normalised = || {
            let mut keys: Vec<_> = self.cred_helpers.iter().collect();
            keys.sort();
            keys.into_iter()
                .find(|(k, _)| normalize_registry(k) == wanted)
                .map(|(_, v)| v)
        };
        by_exact
            .or_else(by_normalised)
            .map(String::as_str)
            .or(self.creds_store.as_deref())
    }

    /// The `auths` entry for `registry`, matched as Docker does: the exact key first, then
    /// Docker Hub's legacy key, then any key that names the same host once the scheme and a
    /// `/v1/` or `/v2/` path are stripped.
    pub fn auth_for(&self, registry: &str) -> Option<&Credential> {
        let wanted = normalize_registry(registry);
        let exact = self.auths.iter().find(|(k, _)| k == registry);
        let hub = (wanted == "docker.io")
            .then(|| self.auths.iter().find(|(k, _)| k == DOCKER_HUB_AUTH_KEY))
            .flatten();
        let normalised = || {
            self.auths
                .iter()
                .find(|(k, _)| normalize_registry(k) == wanted)
        };
        exact
            .or(hub)
            .or_else(normalised)
            .and_then(|(_, c)| c.as_ref())
    }
}

impl AuthEntry {
    fn into_credential(self) -> Result<Option<Credential>, String> {
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        if let Some(token) = non_empty(self.registrytoken) {
            return Ok(Some(Credential::RegistryToken(Secret::new(token))));
        }
        let (mut username, mut password) = (non_empty(self.username), non_empty(self.password));
        if let Some(auth) = non_empty(self.auth) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "the \"auth\" field is not valid base64".to_owned())?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| "the \"auth\" field does not decode to UTF-8".to_owned())?;
            let (user, pass) = decoded
                .split_once(':')
                .ok_or_else(|| "the \"auth\" field does not decode to user:password".to_owned())?;
            username = Some(user.to_owned());
            password = Some(pass.to_owned());
        }
        if let Some(token) = non_empty(self.identitytoken) {
            return Ok(Some(Credential::IdentityToken {
                username: username.filter(|u| u != "<token>"),
                token: Secret::new(token),
            }));
        }
        Ok(match (username, password) {
            (Some(username), Some(password)) => Some(Credential::Basic {
                username,
                password: Secret::new(password),
            }),
            _ => None,
        })
    }
}

/// Reduces an `auths` key or a registry name to a comparable host: drops `http://` or
/// `https://` and any path (`/v1/`, `/v2/`), lowercases, and folds Docker Hub's aliases into
/// `docker.io`.
pub fn normalize_registry(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or(without_scheme)
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | "docker.io" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

/// The name a credential helper is asked about: Docker Hub's legacy key, otherwise the host.
fn helper_server_url(registry: &str) -> String {
    let normalised = normalize_registry(registry);
    if normalised == "docker.io" {
        DOCKER_HUB_AUTH_KEY.to_owned()
    } else {
        normalised
    }
}

/// Where credentials come from: one Docker configuration (or none) and the `PATH` on which
/// `docker-credential-*` helpers are looked up.
#[derive(Clone, Debug, Default)]
pub struct Keychain {
    config: Option<DockerConfig>,
    helper_path: Option<OsString>,
    /// Credentials from outside the config (a CI job's environment), by normalized registry.
    fallback: Vec<(String, Credential)>,
}

impl Keychain {
    /// A keychain with no credentials: every registry is accessed anonymously.
    pub fn anonymous() -> Self {
        Keychain::default()
    }

    /// The directories searched for `config.json`, in Kiln's order: `$DOCKER_CONFIG`,
    /// `/kiln/.docker/`, `/kaniko/.docker/` (kaniko compatibility) and `~/.docker/`.
    pub fn default_search_dirs() -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            dirs.push(PathBuf::from(dir));
        }
        dirs.push(PathBuf::from("/kiln/.docker"));
        dirs.push(PathBuf::from("/kaniko/.docker"));
        if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            dirs.push(Path::new(&home).join(".docker"));
        }
        dirs
    }

    /// Loads the first `config.json` found in the default search directories.
    pub fn from_default_locations() -> Result<Self, Error> {
        Self::from_search_dirs(&Self::default_search_dirs())
    }

    /// Loads the first `config.json` found in `dirs`. An entry may also name the file itself
    /// (kaniko accepts `DOCKER_CONFIG=/path/config.json`). No file at all means anonymous
    /// access; a file that exists but cannot be parsed is an error.
    pub fn from_search_dirs(dirs: &[PathBuf]) -> Result<Self, Error> {
        for dir in dirs {
            let candidate = if dir.is_file() {
                dir.clone()
            } else {
                dir.join("config.json")
            };
            match std::fs::metadata(&candidate) {
                Ok(meta) if meta.is_file() => {
                    tracing::debug!(path = %candidate.display(), "using docker config");
                    return Ok(Keychain::from_config(DockerConfig::load(&candidate)?));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => {
                    return Err(Error::Config {
                        path: candidate,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(Keychain::anonymous())
    }

    /// A keychain over an already parsed configuration.
    pub fn from_config(config: DockerConfig) -> Self {
        Keychain {
            config: Some(config),
            ..Keychain::default()
        }
    }

    /// Adds a credential for `registry` from outside the docker config (GitLab CI's registry
    /// variables, for example). It is used only when the config has nothing for that registry,
    /// so a mounted Secret always wins, as kaniko consults its config first.
    pub fn with_fallback(mut self, registry: &str, credential: Credential) -> Self {
        self.fallback
            .push((normalize_registry(registry), credential));
        self
    }

    /// Looks credential helpers up on `path` (a `PATH`-style list) instead of the process's
    /// `PATH`. The helper itself runs with the process's environment.
    pub fn with_helper_path(mut self, path: impl Into<OsString>) -> Self {
        self.helper_path = Some(path.into());
        self
    }

    /// The configuration in use, if a file was found.
    pub fn config(&self) -> Option<&DockerConfig> {
        self.config.as_ref()
    }

    /// The credential for `registry` (a host with optional port, e.g. `127.0.0.1:5000` or
    /// `docker.io`): from its credential helper if one is configured, else from `auths`.
    /// `None` means anonymous access.
    pub async fn credential_for(&self, registry: &str) -> Result<Option<Credential>, Error> {
        if let Some(config) = &self.config {
            if let Some(helper) = config.helper_for(registry) {
                if let Some(found) = self.run_helper(helper, registry).await? {
                    return Ok(Some(found));
                }
            }
            if let Some(found) = config.auth_for(registry) {
                return Ok(Some(found.clone()));
            }
        }
        let wanted = normalize_registry(registry);
        Ok(self
            .fallback
            .iter()
            .find(|(known, _)| *known == wanted)
            .map(|(_, credential)| credential.clone()))
    }

    async fn run_helper(&self, helper: &str, registry: &str) -> Result<Option<Credential>, Error> {
        let program = format!("docker-credential-{helper}");
        let helper_error = |message: String| Error::CredentialHelper {
            helper: program.clone(),
            registry: registry.to_owned(),
            message,
        };
        let search_path = self
            .helper_path
            .clone()
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_default();
        let executable = std::env::split_paths(&search_path)
            .map(|dir| dir.join(&program))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| helper_error("not found on PATH".to_owned()))?;

        let mut command = tokio::process::Command::new(&executable);
        command
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| helper_error(format!("cannot run {}: {e}", executable.display())))?;
        let server_url = helper_server_url(registry);
        if let Some(mut stdin) = child.stdin.take() {
            // A helper that exits without reading stdin is not an error in itself; its exit
            // status says what happened.
            let _ = stdin.write_all(server_url.as_bytes()).await;
            drop(stdin);
        }
        let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| helper_error(format!("no answer within {HELPER_TIMEOUT:?}")))?
            .map_err(|e| helper_error(e.to_string()))?;

        if !output.status.success() {
            let stdout = String::from_utf8_lossy(&output.stdout);
            if stdout.contains("credentials not found") {
                return Ok(None);
            }
            // Only the first line of stderr, shortened: helpers explain failures there, and
            // nothing longer is needed to act on it.
            let stderr = String::from_utf8_lossy(&output.stderr);
            let first_line: String = stderr
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            return Err(helper_error(format!("{}: {first_line}", output.status)));
        }

        #[derive(Deserialize)]
        struct HelperAnswer {
            #[serde(rename = "Username", default)]
            username: String,
            #[serde(rename = "Secret", default)]
            secret: String,
        }
        let answer: HelperAnswer = serde_json::from_slice(&output.stdout).map_err(|e| {
            helper_error(format!(
                "answer is not the expected JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if answer.secret.is_empty() {
            return Ok(None);
        }
        Ok(Some(if answer.username == "<token>" {
            Credential::IdentityToken {
                username: None,
                token: Secret::new(answer.secret),
            }
        } else {
            Credential::Basic {
                username: answer.username,
                password: Secret::new(answer.secret),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> DockerConfig {
        DockerConfig::parse(text, Path::new("/secret/config.json")).unwrap()
    }

    fn basic(user: &str, pass: &str) -> Credential {
        Credential::Basic {
            username: user.into(),
            password: Secret::new(pass),
        }
    }

    #[test]
    fn decodes_auth_field_and_username_password() {
        let config = parse(
            r#"{"auths":{
                "reg.example:5000":{"auth":"dXNlcjpwYTpzcw=="},
                "other.example":{"username":"u2","password":"p2"}}}"#,
        );
        assert_eq!(
            config.auth_for("reg.example:5000"),
            Some(&basic("user", "pa:ss"))
        );
        assert_eq!(config.auth_for("other.example"), Some(&basic("u2", "p2")));
        assert_eq!(config.auth_for("third.example"), None);
    }

    #[test]
    fn matches_keys_with_scheme_and_api_path() {
        let config = parse(
            r#"{"auths":{
                "https://reg.example:5000/v2/":{"username":"a","password":"b"},
                "http://plain.example/v1/":{"username":"c","password":"d"}}}"#,
        );
        assert_eq!(config.auth_for("reg.example:5000"), Some(&basic("a", "b")));
        assert_eq!(config.auth_for("plain.example"), Some(&basic("c", "d")));
        assert_eq!(config.auth_for("reg.example"), None);
    }

    #[test]
    fn docker_hub_aliases_find_the_legacy_key() {
        let config =
            parse(r#"{"auths":{"https://index.docker.io/v1/":{"username":"hub","password":"x"}}}"#);
        for name in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
        ] {
            assert_eq!(config.auth_for(name), Some(&basic("hub", "x")), "{name}");
        }
        let short = parse(r#"{"auths":{"docker.io":{"username":"hub","password":"y"}}}"#);
        assert_eq!(short.auth_for("index.docker.io"), Some(&basic("hub", "y")));
    }

    #[test]
    fn tokens_take_their_own_kinds() {
        let config = parse(
            r#"{"auths":{
                "a.example":{"username":"<token>","identitytoken":"refresh"},
                "b.example":{"registrytoken":"bearer"}}}"#,
        );
        assert_eq!(
            config.auth_for("a.example"),
            Some(&Credential::IdentityToken {
                username: None,
                token: Secret::new("refresh")
            })
        );
        assert_eq!(
            config.auth_for("b.example"),
            Some(&Credential::RegistryToken(Secret::new("bearer")))
        );
    }

    #[test]
    fn helpers_by_host_then_store() {
        let config = parse(
            r#"{"credsStore":"store","credHelpers":{"https://gcr.example":"gcr","reg:5000":"x"}}"#,
        );
        assert_eq!(config.helper_for("gcr.example"), Some("gcr"));
        assert_eq!(config.helper_for("reg:5000"), Some("x"));
        assert_eq!(config.helper_for("elsewhere"), Some("store"));
        assert_eq!(helper_server_url("index.docker.io"), DOCKER_HUB_AUTH_KEY);
        assert_eq!(helper_server_url("reg:5000"), "reg:5000");
    }

    #[test]
    fn parse_errors_do_not_echo_secrets() {
        let err = DockerConfig::parse(
            r#"{"auths":{"a":"hunter2-secret"}}"#,
            Path::new("/x/config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/x/config.json"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = DockerConfig::parse(r#"{"auths":{"a":{"auth":"!!hunter2"}}}"#, Path::new("/c"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn search_takes_the_first_directory_with_a_config() {
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("empty");
        let mounted = root.path().join("mounted");
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&mounted).unwrap();
        std::fs::write(
            mounted.join("config.json"),
            r#"{"auths":{"r.example":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let keychain =
            Keychain::from_search_dirs(&[root.path().join("missing"), empty, mounted.clone()])
                .unwrap();
        assert_eq!(
            keychain.config().unwrap().path(),
            Some(mounted.join("config.json").as_path())
        );
        let none = Keychain::from_search_dirs(&[root.path().join("missing")]).unwrap();
        assert!(none.config().is_none());
    }

    /// Found by `cargo fuzz run docker_config` (crates/registry/fuzz): two loads of the same
    /// file printed their `credHelpers` in different orders. The fuzz target also checks that
    /// `Debug` is the same with every secret removed, which this repeats for one input.
    #[test]
    fn debug_is_deterministic_and_shows_no_secret() {
        let text = r#"{"auths":{"r.example":{"username":"u","password":"hunter2-secret"}},
            "credHelpers":{"c127.0.0.1:5000ggcr.io":"gcloud","":"desktop","b":"x","a":"y"}}"#;
        let shown = format!("{:?}", parse(text));
        for _ in 0..8 {
            assert_eq!(format!("{:?}", parse(text)), shown);
        }
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        let helpers = ["\"\": \"desktop\"", "\"a\"", "\"b\"", "\"c127"];
        let positions: Vec<usize> = helpers.iter().map(|h| shown.find(h).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{shown}");
    }
}
