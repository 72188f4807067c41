//! Base root filesystems built from Debian packages, cached per machine (see
//! [`crate::cache_dir`]). Tests must treat them as read-only and copy them before changing them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{build_once, cache_dir, require_tools, run};

/// Users and groups every base carries, so USER tests have a name, a uid and supplementary groups.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
kiln:x:1000:1000:Kiln test user:/home/kiln:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str =
    "root:x:0:\ndaemon:x:1:\nkiln:x:1000:\nbuilders:x:2000:kiln\nnogroup:x:65534:\n";

/// A minimal busybox-static root: `/bin/busybox` with every applet as a symlink in `/bin`,
/// `/etc/passwd` and `/etc/group` with users root, daemon, kiln (1000, also in group builders
/// 2000) and nobody, and the usual empty top-level directories.
pub fn busybox_rootfs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        require_tools(&["busybox", "chroot"]);
        let dir = cache_dir().join("busybox-rootfs");
        build_once(&dir, |root| {
            for sub in [
                "bin",
                "etc",
                "tmp",
                "root",
                "home/kiln",
                "usr/bin",
                "var",
                "dev",
                "proc",
                "sys",
            ] {
                std::fs::create_dir_all(root.join(sub)).unwrap();
            }
            let busybox = crate::which("busybox").expect("busybox");
            std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
            run(Command::new("chroot")
                .arg(root)
                .args(["/bin/busybox", "--install", "-s", "/bin"]));
            std::fs::write(root.join("etc/passwd"), PASSWD).unwrap();
            std::fs::write(root.join("etc/group"), GROUP).unwrap();
            run(Command::new("chmod").args(["1777"]).arg(root.join("tmp")));
            run(Command::new("chown")
                .arg("1000:1000")
                .arg(root.join("home/kiln")));
        });
        dir
    })
}

/// A Debian bookworm `minbase` root made with debootstrap (about 206 MB, 6,700 files), with the
/// `kiln` user added. Made once per machine; takes about 30 s the first time.
pub fn debian_rootfs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        require_tools(&["debootstrap"]);
        let dir = cache_dir().join("debian-rootfs");
        build_once(&dir, |root| {
            run(Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(root)
                .arg("http://deb.debian.org/debian"));
            // Drop what debootstrap leaves that no image would ship: apt lists and logs vary per run.
            for sub in [
                "var/cache/apt/archives",
                "var/lib/apt/lists",
                "var/log/bootstrap.log",
            ] {
                let p = root.join(sub);
                if p.is_dir() {
                    for entry in std::fs::read_dir(&p).unwrap().flatten() {
                        if entry.file_type().unwrap().is_file() {
                            std::fs::remove_file(entry.path()).unwrap();
                        }
                    }
                } else if p.exists() {
                    std::fs::remove_file(&p).unwrap();
                }
            }
            let mut passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
            passwd.push_str("kiln:x:1000:1000:Kiln test user:/home/kiln:/bin/sh\n");
            std::fs::write(root.join("etc/passwd"), passwd).unwrap();
            let mut group = std::fs::read_to_string(root.join("etc/group")).unwrap();
            group.push_str("kiln:x:1000:\nbuilders:x:2000:kiln\n");
            std::fs::write(root.join("etc/group"), group).unwrap();
            std::fs::create_dir_all(root.join("home/kiln")).unwrap();
            run(Command::new("chown")
                .arg("1000:1000")
                .arg(root.join("home/kiln")));
        });
        dir
    })
}

/// Cached OCI layout (tag `latest`) holding the busybox base as a one-layer image.
pub fn busybox_layout() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_layout("busybox-layout", busybox_rootfs()))
}

/// Cached OCI layout (tag `latest`) holding the Debian base as a one-layer image.
pub fn debian_layout() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_layout("debian-layout", debian_rootfs()))
}

fn cached_layout(name: &str, rootfs: &Path) -> PathBuf {
    let dir = cache_dir().join(name);
    build_once(&dir, |layout| {
        crate::image::oci_layout_from_rootfs(rootfs, layout, "latest");
    });
    dir
}
