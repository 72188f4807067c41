//! A real `docker-registry` (distribution 2.8, Debian package) on a random loopback port.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Extra configuration for a test registry; the default is anonymous plain HTTP, deletes
/// allowed.
#[derive(Debug, Default, Clone)]
pub struct RegistryConfig {
    /// The body of the top-level `auth:` section, unindented YAML, e.g.
    /// `"htpasswd:\n  realm: kiln\n  path: /tmp/htpasswd"`.
    pub auth: Option<String>,
    /// PEM certificate and key files; when set the registry serves HTTPS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA certificates (PEM files) for `http.tls.clientcas`: with TLS on, the registry then
    /// demands a client certificate signed by one of them.
    pub client_cas: Vec<PathBuf>,
    /// Serve pulls but refuse every write (distribution's maintenance read-only mode), for
    /// tests of a registry that refuses a push.
    pub read_only: bool,
    /// Leave deletes off, as distribution's own default configuration does (every `DELETE`
    /// is answered 405 `UNSUPPORTED`); otherwise the test registry allows them.
    pub deletes_disabled: bool,
}

/// A running registry process, killed (and its storage deleted) on drop.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an anonymous plain-HTTP registry.
    pub fn start() -> Registry {
        Self::start_with(RegistryConfig::default())
    }

    /// Starts a registry with authentication and/or TLS; retries on another port if the chosen
    /// one was taken between probing and binding.
    pub fn start_with(config: RegistryConfig) -> Registry {
        crate::require_tools(&["docker-registry"]);
        let mut last_log = String::new();
        for _ in 0..5 {
            match Self::try_start(&config) {
                Ok(registry) => return registry,
                Err(log) => last_log = log,
            }
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    fn try_start(config: &RegistryConfig) -> Result<Registry, String> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-registry-")
            .tempdir()
            .expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("probe a free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: {}\n",
            dir.path().join("storage").display(),
            !config.deletes_disabled,
        );
        if config.read_only {
            yaml.push_str("  maintenance:\n    readonly:\n      enabled: true\n");
        }
        yaml.push_str(&format!(
            "http:\n  addr: {addr}\n  secret: kiln-test-secret\n"
        ));
        if let Some((cert, key)) = &config.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if !config.client_cas.is_empty() {
                yaml.push_str("    clientcas:\n");
                for ca in &config.client_cas {
                    yaml.push_str(&format!("      - {}\n", ca.display()));
                }
            }
        }
        if let Some(auth) = &config.auth {
            yaml.push_str("auth:\n");
            for line in auth.lines() {
                yaml.push_str("  ");
                yaml.push_str(line);
                yaml.push('\n');
            }
        }
        let config_path = dir.path().join("config.yml");
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(yaml.as_bytes()))
            .expect("write registry config");
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).expect("registry log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot spawn docker-registry: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited with {status}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Registry { child, addr, dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        Err(format!(
            "not listening on {addr} after 20 s:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ))
    }

    /// `127.0.0.1:PORT`, the registry part of image references pushed here.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address, for tests that connect directly (proxies, fault injection).
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registry's own log, to include in a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Every request the registry has answered so far, as `(method, path)` in order, read
    /// from its log (distribution logs each response at the `info` level). Tests count the
    /// requests a build made by slicing this list before and after it.
    pub fn requests(&self) -> Vec<(String, String)> {
        let field = |line: &str, name: &str| {
            let start = line.find(name)? + name.len();
            let rest = &line[start..];
            let end = rest.find(' ').unwrap_or(rest.len());
            Some(rest[..end].trim_matches('"').to_owned())
        };
        // A response with several errors is logged once per error, under one request id.
        let mut seen = std::collections::HashSet::new();
        self.log()
            .lines()
            .filter(|line| line.contains("msg=\"response completed"))
            .filter(|line| field(line, "http.request.id=").is_some_and(|id| seen.insert(id)))
            .filter_map(|line| {
                Some((
                    field(line, "http.request.method=")?,
                    field(line, "http.request.uri=")?,
                ))
            })
            .collect()
    }

    /// The directory that holds the registry's config, log and storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
