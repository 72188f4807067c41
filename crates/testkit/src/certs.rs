//! Certificates made with the `openssl` command as users make them for a private registry:
//! Docker's documented self-signed recipe (which OpenSSL 3 marks `CA:TRUE`), a private CA and
//! leaves it signs, client certificates, and certificates outside their validity period
//! (`openssl ca` with explicit dates, since OpenSSL 3.0's `req` and `x509` cannot backdate).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require_tools, run};

/// A certificate and its private key, PEM files made by openssl.
#[derive(Clone, Debug)]
pub struct CertKey {
    /// The certificate.
    pub cert: PathBuf,
    /// Its unencrypted private key.
    pub key: PathBuf,
}

impl CertKey {
    /// The SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it (`AB:CD:…`).
    pub fn fingerprint(&self) -> String {
        let out = openssl(
            &["x509", "-noout", "-fingerprint", "-sha256", "-in"],
            &[&self.cert],
        );
        out.trim().rsplit('=').next().unwrap_or_default().to_owned()
    }

    /// `openssl x509 -text` of the certificate, to check what a recipe really made.
    pub fn text(&self) -> String {
        openssl(&["x509", "-noout", "-text", "-in"], &[&self.cert])
    }
}

/// A directory in which certificates are made; removed on drop.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

impl Certs {
    /// An empty working directory.
    pub fn new() -> Certs {
        require_tools(&["openssl"]);
        Certs {
            dir: tempfile::Builder::new()
                .prefix("kiln-certs-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pair(&self, name: &str) -> CertKey {
        CertKey {
            cert: self.dir().join(format!("{name}.crt")),
            key: self.dir().join(format!("{name}.key")),
        }
    }

    /// Docker's registry documentation recipe as OpenSSL 3 runs it:
    /// `openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=CN -addext subjectAltName=SAN`.
    /// OpenSSL 3 adds `basicConstraints=critical,CA:TRUE` to such a certificate. `san` is an
    /// OpenSSL list (`IP:127.0.0.1`, `DNS:registry.test`); `None` leaves the extension out.
    pub fn self_signed(&self, name: &str, cn: &str, san: Option<&str>) -> CertKey {
        let out = self.pair(name);
        let subject = format!("/CN={cn}");
        let mut args = vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            subject.as_str(),
        ];
        let san_ext = san.map(|s| format!("subjectAltName={s}"));
        if let Some(ext) = &san_ext {
            args.extend(["-addext", ext.as_str()]);
        }
        args.extend(["-keyout"]);
        openssl(&args, &[&out.key, Path::new("-out"), &out.cert]);
        out
    }

    /// A private CA: `req -x509` with the subject `/CN=CN`.
    pub fn ca(&self, name: &str, cn: &str) -> CertKey {
        let out = self.pair(name);
        let subject = format!("/CN={cn}");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "365",
                "-subj",
                subject.as_str(),
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
            ],
            &[&out.key, Path::new("-out"), &out.cert],
        );
        out
    }

    /// A leaf certificate `ca` signs with `openssl x509 -req`: `CA:FALSE`, the given
    /// subjectAltName (if any) and extended key usage (`serverAuth` or `clientAuth`).
    pub fn leaf(
        &self,
        name: &str,
        ca: &CertKey,
        cn: &str,
        san: Option<&str>,
        usage: &str,
    ) -> CertKey {
        let out = self.pair(name);
        let csr = self.request(name, cn, &out.key);
        let ext = self.extensions(name, san, usage);
        openssl(
            &["x509", "-req", "-days", "30", "-sha256", "-in"],
            &[
                &csr,
                Path::new("-CA"),
                &ca.cert,
                Path::new("-CAkey"),
                &ca.key,
                Path::new("-CAcreateserial"),
                Path::new("-extfile"),
                &ext,
                Path::new("-out"),
                &out.cert,
            ],
        );
        out
    }

    /// A certificate valid only from `start` to `end` (`YYYYMMDDHHMMSSZ`), made with
    /// `openssl ca`, the one OpenSSL 3.0 command that sets both dates: signed by `ca`, or
    /// self-signed (with the recipe's `CA:TRUE`) when `ca` is `None`.
    pub fn dated(
        &self,
        name: &str,
        ca: Option<&CertKey>,
        cn: &str,
        san: &str,
        start: &str,
        end: &str,
    ) -> CertKey {
        let out = self.pair(name);
        let csr = self.request(name, cn, &out.key);
        let db = self.dir().join(format!("{name}-ca"));
        std::fs::create_dir_all(db.join("new")).unwrap();
        std::fs::write(db.join("index.txt"), "").unwrap();
        std::fs::write(db.join("serial"), "1000\n").unwrap();
        let constraints = if ca.is_some() {
            "critical,CA:FALSE"
        } else {
            "critical,CA:TRUE"
        };
        let config = db.join("ca.cnf");
        std::fs::write(
            &config,
            format!(
                "[ca]\ndefault_ca = here\n[here]\ndir = {dir}\ndatabase = {dir}/index.txt\nnew_certs_dir = {dir}/new\nserial = {dir}/serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n[exts]\nbasicConstraints = {constraints}\nsubjectAltName = {san}\n",
                dir = db.display()
            ),
        )
        .unwrap();
        let mut args: Vec<&Path> = vec![Path::new("-config"), &config, Path::new("-in"), &csr];
        match ca {
            Some(ca) => args.extend([Path::new("-cert"), &ca.cert, Path::new("-keyfile"), &ca.key]),
            None => args.extend([Path::new("-selfsign"), Path::new("-keyfile"), &out.key]),
        }
        args.extend([
            Path::new("-startdate"),
            Path::new(start),
            Path::new("-enddate"),
            Path::new(end),
            Path::new("-extensions"),
            Path::new("exts"),
            Path::new("-notext"),
            Path::new("-out"),
            &out.cert,
        ]);
        openssl(&["ca", "-batch"], &args);
        out
    }

    fn request(&self, name: &str, cn: &str, key: &Path) -> PathBuf {
        let csr = self.dir().join(format!("{name}.csr"));
        let subject = format!("/CN={cn}");
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subject.as_str(),
                "-keyout",
            ],
            &[key, Path::new("-out"), &csr],
        );
        csr
    }

    fn extensions(&self, name: &str, san: Option<&str>, usage: &str) -> PathBuf {
        let path = self.dir().join(format!("{name}.ext"));
        let mut text =
            format!("basicConstraints = critical,CA:FALSE\nextendedKeyUsage = {usage}\n");
        if let Some(san) = san {
            text.push_str(&format!("subjectAltName = {san}\n"));
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Lays `files` (name, content source) out in `dir` as a kubelet mounts a Secret volume: the
/// files live in a timestamped directory, `..data` links to it, and each top-level name is a
/// link into `..data`. A name with a `/` (a Secret item's `path: HOST/ca.crt`) makes a
/// directory inside the data directory, reached through a top-level link of its own.
pub fn kubelet_secret_mount(dir: &Path, files: &[(&str, &Path)]) {
    let data = dir.join("..2026_01_01_00_00_00.000000001");
    for (name, source) in files {
        let target = data.join(name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(source, &target).unwrap();
    }
    std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
    let mut top: Vec<&str> = files
        .iter()
        .map(|(name, _)| name.split('/').next().unwrap())
        .collect();
    top.sort_unstable();
    top.dedup();
    for name in top {
        std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
    }
}

fn openssl(args: &[&str], paths: &[&Path]) -> String {
    run(Command::new("openssl").args(args).args(paths))
}
