//! The hostile-build cases (see `tests/hostile.rs`): small contexts and Dockerfiles that point
//! symlinks, hard links and `..` names at a secret on the build host.
//!
//! Texts may hold placeholders: `{HOST}` is the host directory holding the secret (absolute),
//! `{CLIMB}` a relative path from anywhere in a context to `/` (`../` repeated), `{IMAGE}` an
//! image in the test registry whose own symlinks point at the host directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::hostile::{finish_tar, raw_tar_entry};

/// The build host's secret: a directory outside every build root, holding a file whose bytes
/// must never reach an image or a log.
pub struct Host {
    /// The directory (absolute).
    pub dir: PathBuf,
    /// The secret's content.
    pub marker: String,
}

impl Host {
    /// Makes the host directory in `work`: `secret` (the marker), `ignorefile` (a
    /// `.dockerignore` that would exclude `keep.txt`) and `dockerfile` (a Dockerfile copying
    /// a file named after the marker).
    pub fn create(work: &Path) -> Host {
        let dir = work.join("host");
        std::fs::create_dir(&dir).unwrap();
        let marker = format!(
            "KILN-HOST-SECRET-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        std::fs::write(dir.join("secret"), &marker).unwrap();
        std::fs::write(dir.join("ignorefile"), format!("keep.txt\n# {marker}\n")).unwrap();
        std::fs::write(
            dir.join("dockerfile"),
            format!("FROM scratch\nCOPY {marker} /\n"),
        )
        .unwrap();
        Host { dir, marker }
    }

    /// `text` with the placeholders filled in.
    pub fn fill(&self, text: &str, registry: &str) -> String {
        text.replace("{HOST}", &self.dir.display().to_string())
            .replace("{CLIMB}", &"../".repeat(24))
            .replace("{IMAGE}", &format!("{registry}/hostile/links:1"))
    }
}

/// What a context file is.
pub enum Item {
    /// A regular file with this content.
    File(&'static str),
    /// A symlink with this target (placeholders allowed).
    Link(&'static str),
    /// A tar archive made by this function.
    Tar(fn(&Host) -> Vec<u8>),
}

/// How a case must end.
pub enum Expect {
    /// The build fails, and its output names this path.
    Fails(&'static str),
    /// The build succeeds; with `oracle`, its image must equal buildah's.
    Succeeds {
        /// Compare with buildah (BuildKit defines the result).
        oracle: bool,
    },
    /// Either outcome is safe (the rules leave it open); the blob and host checks still apply.
    Either,
}

/// A check of a built image's unpacked filesystem.
pub type ImageCheck = fn(&Path, &Host) -> Result<(), String>;

/// One hostile build.
pub struct Case {
    /// Unique name (also the image's repository).
    pub name: &'static str,
    /// The context's files besides the Dockerfile.
    pub files: Vec<(&'static str, Item)>,
    /// The Dockerfile (placeholders allowed); `None` when `files` provides it.
    pub dockerfile: Option<&'static str>,
    /// Build with `--cache` and a cache repository.
    pub cache: bool,
    /// How it must end.
    pub expect: Expect,
    /// Whether the case means the same in in-place mode (the rootfs is `/`, where a link into a
    /// mounted directory is the container's own business, not an escape).
    pub in_place: bool,
    /// A further check of the built image's filesystem.
    pub image_check: Option<ImageCheck>,
}

fn case(name: &'static str, dockerfile: &'static str, expect: Expect) -> Case {
    Case {
        name,
        files: Vec::new(),
        dockerfile: Some(dockerfile),
        cache: false,
        expect,
        in_place: true,
        image_check: None,
    }
}

impl Case {
    fn file(mut self, path: &'static str, item: Item) -> Case {
        self.files.push((path, item));
        self
    }

    fn cached(mut self) -> Case {
        self.cache = true;
        self
    }

    fn chroot_only(mut self) -> Case {
        self.in_place = false;
        self
    }

    fn then_check(mut self, check: ImageCheck) -> Case {
        self.image_check = Some(check);
        self
    }
}

/// Writes `case`'s context into `dir` (created).
pub fn write_context(case: &Case, host: &Host, registry: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    if let Some(dockerfile) = case.dockerfile {
        std::fs::write(dir.join("Dockerfile"), host.fill(dockerfile, registry)).unwrap();
    }
    for (path, item) in &case.files {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        match item {
            Item::File(content) => std::fs::write(&target, content).unwrap(),
            Item::Link(to) => std::os::unix::fs::symlink(host.fill(to, registry), &target).unwrap(),
            Item::Tar(make) => std::fs::write(&target, make(host)).unwrap(),
        }
    }
}

/// Builds and pushes `{IMAGE}` with Kiln itself: an image whose `/leak` and `/d/l` are symlinks
/// to the host's secret and `/hostdir` one to the host directory.
pub fn push_link_image(
    registry: &kiln_testkit::Registry,
    host: &Host,
    work: &Path,
    executor: &str,
) {
    let context = work.join("link-image");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        host.fill(
            "FROM busybox\n\
             RUN ln -s {HOST}/secret /leak && ln -s {HOST} /hostdir && mkdir /d \
             && echo data > /d/f && ln -s {HOST}/secret /d/l\n",
            &registry.addr(),
        ),
    )
    .unwrap();
    let addr = registry.addr();
    kiln_testkit::run(
        Command::new(executor)
            .arg(format!("--context=dir://{}", context.display()))
            .arg(format!("--destination={addr}/hostile/links:1"))
            .arg(format!(
                "--kiln-dir={}",
                work.join("link-image-kiln").display()
            ))
            .args(["--mode=chroot", "--progress=plain"])
            .arg(format!("--registry-map=docker.io={addr}"))
            .arg(format!("--insecure-registry={addr}"))
            .env("DOCKER_CONFIG", "/nonexistent-kiln-test"),
    );
}

fn tar_symlink_then_file(host: &Host) -> Vec<u8> {
    let mut tar = Vec::new();
    let dir = host.dir.display().to_string();
    raw_tar_entry(&mut tar, b"x", tar::EntryType::Symlink, dir.as_bytes(), b"");
    raw_tar_entry(
        &mut tar,
        b"x/pwned",
        tar::EntryType::Regular,
        b"",
        b"written",
    );
    finish_tar(tar)
}

fn tar_hardlink_climbing(host: &Host) -> Vec<u8> {
    let mut tar = Vec::new();
    let target = format!("{}{}/secret", "../".repeat(12), host.dir.display());
    raw_tar_entry(
        &mut tar,
        b"hl",
        tar::EntryType::Link,
        target.as_bytes(),
        b"",
    );
    finish_tar(tar)
}

fn tar_hardlink_absolute(host: &Host) -> Vec<u8> {
    let mut tar = Vec::new();
    let target = format!("{}/secret", host.dir.display());
    raw_tar_entry(
        &mut tar,
        b"hl",
        tar::EntryType::Link,
        target.as_bytes(),
        b"",
    );
    finish_tar(tar)
}

fn tar_dotdot(_: &Host) -> Vec<u8> {
    let mut tar = Vec::new();
    raw_tar_entry(
        &mut tar,
        b"../../../../../../tmp/kiln-escaped",
        tar::EntryType::Regular,
        b"",
        b"x",
    );
    finish_tar(tar)
}

/// The file `rel` of an image's filesystem, without following a final symlink out of it.
fn image_file(rootfs: &Path, rel: &str) -> Result<std::fs::Metadata, String> {
    std::fs::symlink_metadata(rootfs.join(rel)).map_err(|e| format!("/{rel}: {e}"))
}

fn keep_txt_is_copied(rootfs: &Path, _: &Host) -> Result<(), String> {
    // The host's ignore file would have excluded it: it was not read.
    image_file(rootfs, "ctx/keep.txt").map(|_| ())
}

fn link_copied_as_link(rootfs: &Path, host: &Host) -> Result<(), String> {
    let target = std::fs::read_link(rootfs.join("dir/l")).map_err(|e| format!("/dir/l: {e}"))?;
    if target != host.dir.join("secret") {
        return Err(format!("/dir/l points at {}", target.display()));
    }
    Ok(())
}

fn write_stayed_in_the_image(rootfs: &Path, host: &Host) -> Result<(), String> {
    let inside = host.dir.strip_prefix("/").unwrap().join("f");
    image_file(rootfs, &inside.display().to_string()).map(|_| ())
}

fn archive_wrote_inside(rootfs: &Path, host: &Host) -> Result<(), String> {
    let inside = Path::new("dest")
        .join(host.dir.strip_prefix("/").unwrap())
        .join("pwned");
    image_file(rootfs, &inside.display().to_string()).map(|_| ())
}

/// Every case of the suite.
pub fn cases() -> Vec<Case> {
    use Expect::{Either, Fails, Succeeds};
    use Item::{File, Link, Tar};
    const SCRATCH_COPY_L: &str = "FROM scratch\nCOPY l /l\n";
    vec![
        // The build context.
        case("ctx-abs-link", SCRATCH_COPY_L, Fails("l: not found"))
            .file("l", Link("{HOST}/secret")),
        case("ctx-rel-link", SCRATCH_COPY_L, Fails("l: not found"))
            .file("l", Link("{CLIMB}{HOST}/secret")),
        case(
            "ctx-abs-parent",
            "FROM scratch\nCOPY d/secret /s\n",
            Fails("d/secret: not found"),
        )
        .file("d", Link("{HOST}")),
        case(
            "ctx-rel-parent",
            "FROM scratch\nCOPY sub/d/secret /s\n",
            Fails("sub/d/secret: not found"),
        )
        .file("sub/d", Link("../{CLIMB}{HOST}")),
        case(
            "ctx-link-in-copied-dir",
            "FROM scratch\nCOPY dir /dir\n",
            Succeeds { oracle: true },
        )
        .file("dir/l", Link("{HOST}/secret"))
        .file("dir/f", File("ordinary\n"))
        .then_check(link_copied_as_link),
        case(
            "ctx-wildcard-file",
            "FROM scratch\nCOPY *.txt /out/\n",
            Either,
        )
        .file("a.txt", Link("{HOST}/secret"))
        .file("b.txt", File("b\n")),
        case(
            "ctx-wildcard-parent",
            "FROM scratch\nCOPY dl/* /out/\n",
            Fails("dl/*"),
        )
        .file("dl", Link("{HOST}")),
        case(
            "ctx-abs-link-inside",
            SCRATCH_COPY_L,
            Succeeds { oracle: true },
        )
        .file("l", Link("/real.txt"))
        .file("real.txt", File("resolved inside the context\n")),
        case(
            "ctx-climb-link-inside",
            "FROM scratch\nCOPY d/l /l\nCOPY d /d\n",
            Succeeds { oracle: true },
        )
        .file("d/l", Link("../../../../real.txt"))
        .file("real.txt", File("resolved inside the context\n")),
        case(
            "ctx-dockerignore-link",
            "FROM scratch\nCOPY . /ctx/\n",
            Succeeds { oracle: false },
        )
        .file(".dockerignore", Link("{HOST}/ignorefile"))
        .file("keep.txt", File("kept\n"))
        .then_check(keep_txt_is_copied),
        Case {
            dockerfile: None,
            ..case("ctx-dockerfile-link", "", Fails("Dockerfile"))
        }
        .file("Dockerfile", Link("{HOST}/dockerfile")),
        case("cache-ctx-abs-link", SCRATCH_COPY_L, Fails("l: not found"))
            .file("l", Link("{HOST}/secret"))
            .cached(),
        case(
            "cache-ctx-abs-parent",
            "FROM scratch\nCOPY d/secret /s\n",
            Fails("d/secret: not found"),
        )
        .file("d", Link("{HOST}"))
        .cached(),
        case(
            "cache-ctx-link-in-copied-dir",
            "FROM scratch\nCOPY dir /dir\n",
            Succeeds { oracle: true },
        )
        .file("dir/l", Link("{HOST}/secret"))
        .file("dir/f", File("ordinary\n"))
        .cached(),
        // Another stage.
        case(
            "stage-abs-link",
            "FROM busybox AS s\nRUN ln -s {HOST}/secret /leak\nFROM scratch\nCOPY --from=s /leak /leak\n",
            Fails("/leak: not found"),
        ),
        case(
            "stage-abs-parent",
            "FROM busybox AS s\nRUN ln -s {HOST} /h\nFROM scratch\nCOPY --from=s /h/secret /x\n",
            Fails("/h/secret: not found"),
        ),
        case(
            "stage-rel-link",
            "FROM busybox AS s\nRUN ln -s {CLIMB}{HOST}/secret /leak\nFROM scratch\nCOPY --from=s /leak /leak\n",
            Fails("/leak: not found"),
        ),
        case(
            "stage-link-in-dir",
            "FROM busybox AS s\nRUN mkdir /d && echo x > /d/f && ln -s {HOST}/secret /d/l\nFROM scratch\nCOPY --from=s /d /d\n",
            Succeeds { oracle: true },
        ),
        case(
            "stage-wildcard",
            "FROM busybox AS s\nRUN mkdir /w && ln -s {HOST}/secret /w/leak.txt && echo ok > /w/ok.txt\nFROM scratch\nCOPY --from=s /w/*.txt /out/\n",
            Either,
        ),
        case(
            "cache-stage-abs-link",
            "FROM busybox AS s\nRUN ln -s {HOST}/secret /leak\nFROM scratch\nCOPY --from=s /leak /leak\n",
            Fails("/leak: not found"),
        )
        .cached(),
        // An image.
        case(
            "image-abs-link",
            "FROM scratch\nCOPY --from={IMAGE} /leak /leak\n",
            Fails("/leak: not found"),
        ),
        case(
            "image-abs-parent",
            "FROM scratch\nCOPY --from={IMAGE} /hostdir/secret /x\n",
            Fails("/hostdir/secret: not found"),
        ),
        case(
            "image-link-in-dir",
            "FROM scratch\nCOPY --from={IMAGE} /d /d\n",
            Succeeds { oracle: true },
        ),
        case(
            "cache-image-abs-link",
            "FROM scratch\nCOPY --from={IMAGE} /leak /leak\n",
            Fails("/leak: not found"),
        )
        .cached(),
        // RUN --mount=type=bind sources.
        case(
            "bind-ctx-link",
            "FROM busybox\nRUN --mount=type=bind,source=l,target=/m cat /m > /out\n",
            Fails("/l does not exist"),
        )
        .file("l", Link("{HOST}/secret")),
        case(
            "bind-ctx-parent",
            "FROM busybox\nRUN --mount=type=bind,source=d/secret,target=/m cat /m > /out\n",
            Fails("/d/secret does not exist"),
        )
        .file("d", Link("{HOST}")),
        case(
            "bind-stage-link",
            "FROM busybox AS s\nRUN ln -s {HOST}/secret /leak\nFROM busybox\nRUN --mount=type=bind,from=s,source=/leak,target=/m cat /m > /out\n",
            Fails("/leak does not exist"),
        ),
        case(
            "bind-image-parent",
            "FROM busybox\nRUN --mount=type=bind,from={IMAGE},source=/hostdir,target=/m cat /m/secret > /out\n",
            Fails("/hostdir does not exist"),
        ),
        case(
            "bind-target-through-link",
            "FROM busybox\nRUN ln -s {HOST} /t\nRUN --mount=type=bind,source=f,target=/t/m cat /t/m > /out\n",
            Succeeds { oracle: false },
        )
        .file("f", File("mounted\n"))
        .chroot_only(),
        // ADD of archives.
        case(
            "add-symlink-then-file",
            "FROM scratch\nADD a.tar /dest/\n",
            Succeeds { oracle: false },
        )
        .file("a.tar", Tar(tar_symlink_then_file))
        .then_check(archive_wrote_inside),
        case(
            "add-hardlink-climbing",
            "FROM scratch\nADD a.tar /dest/\n",
            Fails("a.tar"),
        )
        .file("a.tar", Tar(tar_hardlink_climbing)),
        case(
            "add-hardlink-absolute",
            "FROM scratch\nADD a.tar /dest/\n",
            Fails("a.tar"),
        )
        .file("a.tar", Tar(tar_hardlink_absolute)),
        case("add-dotdot", "FROM scratch\nADD a.tar /dest/\n", Fails("a.tar"))
            .file("a.tar", Tar(tar_dotdot)),
        // Destinations through symlinks of the stage.
        case(
            "workdir-through-link",
            "FROM busybox\nRUN ln -s {HOST} /w\nWORKDIR /w/sub\nRUN pwd > /pwd\n",
            Succeeds { oracle: false },
        )
        .chroot_only(),
        case(
            "copy-dest-through-link",
            "FROM busybox\nRUN ln -s {HOST} /d\nCOPY f /d/f\n",
            Succeeds { oracle: true },
        )
        .file("f", File("copied\n"))
        .chroot_only()
        .then_check(write_stayed_in_the_image),
        case(
            "copy-dest-is-link-to-secret",
            "FROM busybox\nRUN ln -s {HOST}/secret /target\nCOPY f /target\n",
            Succeeds { oracle: false },
        )
        .file("f", File("copied\n"))
        .chroot_only(),
    ]
}
