//! Language images for tests of Kiln's own buildpacks, standing in for the official images
//! the engine picks by default (`node:22`, `node:22-slim`, `python:3.12`, `golang:1.19`,
//! distroless static, busybox), which no test can pull here: Debian bases with the language's
//! Debian packages, and a smallest base made from nothing. Made once per machine and kept as
//! OCI layouts in [`crate::cache_dir`] (a build image takes minutes: `npm` alone is 380
//! packages), then pushed to a test registry under the names the defaults use, so a build
//! reaches them through `--registry-map docker.io=REGISTRY;gcr.io=REGISTRY`.
//!
//! The package registries are reached here through TLS interception by this machine's own CA,
//! which no image trusts: every image gets this machine's bundle as its
//! `/etc/ssl/certs/ca-certificates.crt` (pip and Go read it), and Node.js images also name it
//! in `NODE_EXTRA_CA_CERTS` (Node.js carries its own roots), as a company's build image
//! trusts its proxy.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{bases, build_once, cache_dir, image, require_tools, run, Registry};

/// The machine's CA bundle, baked into the images.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One stand-in image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LangImage {
    /// Node.js and npm (Debian `nodejs`, `npm`), as `node:<major>`.
    NodeBuild,
    /// Node.js alone, as `node:<major>-slim`.
    NodeRun,
    /// Python with venv and pip (Debian `python3`, `python3-venv`, `python3-pip`), as
    /// `python:3.x`.
    PythonBuild,
    /// Python alone, as `python:3.x-slim`.
    PythonRun,
    /// Go (Debian `golang-go`, Go 1.19), as `golang:1.19`; `GOPROXY=off`, since no module
    /// proxy is reachable (test apps use the standard library only).
    GoBuild,
    /// No shell, no libc: a passwd file, `/tmp` and the CA bundle, as distroless static.
    Smallest,
    /// busybox-static, as `busybox`.
    Busybox,
}

impl LangImage {
    /// Every stand-in.
    pub const ALL: [LangImage; 7] = [
        LangImage::NodeBuild,
        LangImage::NodeRun,
        LangImage::PythonBuild,
        LangImage::PythonRun,
        LangImage::GoBuild,
        LangImage::Smallest,
        LangImage::Busybox,
    ];

    fn name(self) -> &'static str {
        match self {
            LangImage::NodeBuild => "node-build",
            LangImage::NodeRun => "node-run",
            LangImage::PythonBuild => "python-build",
            LangImage::PythonRun => "python-run",
            LangImage::GoBuild => "go-build",
            LangImage::Smallest => "smallest",
            LangImage::Busybox => "busybox",
        }
    }

    /// The repositories and tags (below the mapped registry) the engine's defaults name.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            LangImage::NodeBuild => &["library/node:22"],
            LangImage::NodeRun => &["library/node:22-slim"],
            LangImage::PythonBuild => &["library/python:3.12"],
            LangImage::PythonRun => &["library/python:3.12-slim"],
            LangImage::GoBuild => &["library/golang:1.19"],
            LangImage::Smallest => &["distroless/static-debian12:latest"],
            LangImage::Busybox => &["library/busybox:stable"],
        }
    }

    fn packages(self) -> &'static [&'static str] {
        match self {
            LangImage::NodeBuild => &["nodejs", "npm"],
            LangImage::NodeRun => &["nodejs"],
            LangImage::PythonBuild => &["python3", "python3-venv", "python3-pip"],
            LangImage::PythonRun => &["python3"],
            LangImage::GoBuild => &["golang-go"],
            LangImage::Smallest | LangImage::Busybox => &[],
        }
    }

    fn env(self) -> &'static [&'static str] {
        match self {
            LangImage::NodeBuild | LangImage::NodeRun => {
                &["NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt"]
            }
            LangImage::GoBuild => &["GOPROXY=off", "GOFLAGS=-mod=mod"],
            _ => &[],
        }
    }

    /// The image as a cached OCI layout (tag `latest`).
    pub fn layout(self) -> PathBuf {
        if self == LangImage::Busybox {
            return bases::busybox_layout().to_path_buf();
        }
        let dir = cache_dir().join(format!("lang-{}-layout", self.name()));
        build_once(&dir, |layout| {
            let work = tempfile::Builder::new()
                .prefix("kiln-lang-")
                .tempdir_in(cache_dir())
                .unwrap();
            let rootfs = work.path().join("rootfs");
            if self == LangImage::Smallest {
                smallest_rootfs(&rootfs);
            } else {
                debian_with(&rootfs, self.packages());
            }
            image::oci_layout_with_env(&rootfs, layout, "latest", self.env());
        });
        dir
    }

    /// Pushes the image to `registry` under each of its [`names`](Self::names).
    pub fn push(self, registry: &Registry) {
        let layout = self.layout();
        for name in self.names() {
            image::push_layout(registry, &layout, "latest", name);
        }
    }
}

/// Pushes every stand-in to `registry`.
pub fn push_all(registry: &Registry) {
    for lang in LangImage::ALL {
        lang.push(registry);
    }
}

/// `--registry-map` values that send the defaults' registries to `registry`, and the flag
/// that keeps a missing image from being looked for on the internet.
pub fn registry_flags(registry: &Registry) -> Vec<String> {
    vec![
        format!("--registry-map=docker.io={}", registry.addr()),
        format!("--registry-map=gcr.io={}", registry.addr()),
        "--skip-default-registry-fallback".into(),
    ]
}

/// The cached Debian base plus `packages`, installed with apt from Debian's mirror (plain
/// HTTP) inside the tree, then stripped of apt's lists and downloads, with this machine's CA
/// bundle.
fn debian_with(rootfs: &Path, packages: &[&str]) {
    require_tools(&["chroot", "cp"]);
    run(Command::new("cp")
        .arg("-a")
        .arg(bases::debian_rootfs())
        .arg(rootfs));
    // apt resolves the mirror's name with the machine's resolver; the image keeps its own file.
    let resolv = rootfs.join("etc/resolv.conf");
    let saved = std::fs::read(&resolv).ok();
    std::fs::copy("/etc/resolv.conf", &resolv).unwrap();
    run(Command::new("chroot")
        .arg(rootfs)
        .args(["apt-get", "update", "-qq"]));
    run(Command::new("chroot")
        .arg(rootfs)
        .args(["apt-get", "install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    run(Command::new("chroot")
        .arg(rootfs)
        .args(["apt-get", "clean"]));
    match saved {
        Some(bytes) => std::fs::write(&resolv, bytes).unwrap(),
        None => std::fs::remove_file(&resolv).unwrap(),
    }
    let lists = rootfs.join("var/lib/apt/lists");
    run(Command::new("rm").arg("-rf").arg(&lists));
    std::fs::create_dir_all(lists.join("partial")).unwrap();
    for log in ["var/log/apt", "var/log/dpkg.log", "var/cache/debconf"] {
        let path = rootfs.join(log);
        if path.exists() {
            run(Command::new("rm").arg("-rf").arg(&path));
        }
    }
    install_ca_bundle(rootfs);
}

/// A root with nothing to run but what an image copies in: users root and nonroot (65532, as
/// distroless has), `/tmp`, and the CA bundle.
fn smallest_rootfs(rootfs: &Path) {
    for dir in ["etc", "tmp", "home/nonroot", "root"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();
    run(Command::new("chmod").arg("1777").arg(rootfs.join("tmp")));
    run(Command::new("chown")
        .arg("65532:65532")
        .arg(rootfs.join("home/nonroot")));
    install_ca_bundle(rootfs);
}

fn install_ca_bundle(rootfs: &Path) {
    let certs = rootfs.join("etc/ssl/certs");
    std::fs::create_dir_all(&certs).unwrap();
    let target = certs.join("ca-certificates.crt");
    // Debian may have left a symlink here; replace it with the file.
    let _ = std::fs::remove_file(&target);
    std::fs::copy(HOST_CA_BUNDLE, &target)
        .unwrap_or_else(|e| panic!("cannot copy {HOST_CA_BUNDLE}: {e}"));
}
