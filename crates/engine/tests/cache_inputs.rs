//! The layer cache never answers with a stale layer: for each input a step observes, a build
//! with `--cache` is followed by a change of that one input and a second cached build, which
//! must give the same image (every path, owner, mode, content and hard link, and the config) as
//! a build of the changed input without the cache, and not the image of the first build. The
//! steps before the change must still be hits, so the cache was really asked.
//!
//! Each test is one input: hard-link structure, content with the same size and mtime, mode,
//! declared and default ARGs, ENV, USER, WORKDIR, SHELL, .dockerignore, `--chown`, a file of an
//! earlier stage, ADD archive content, symlink targets, empty directories, deletions, LABEL,
//! `RUN --mount=type=bind` sources, heredocs, a moved base tag and a moved `COPY --from` image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder};
use kiln_sandbox::Mode;
use kiln_testkit::image::{self, Flattened};
use kiln_testkit::tree::Tree;
use kiln_testkit::{bases, Registry};

/// A fixed modification time, so a changed file can keep the one it had.
const MTIME: u64 = 1_600_000_000;

/// A registry with the busybox base (`{base}` in Dockerfiles) and a context directory.
struct Fixture {
    registry: Registry,
    work: tempfile::TempDir,
}

/// What a build reported: which (stage, step) pairs were cache hits.
struct Built {
    hits: Vec<(usize, usize)>,
}

impl Fixture {
    fn new() -> Fixture {
        kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "tar"]);
        let registry = Registry::start();
        image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("context")).unwrap();
        Fixture { registry, work }
    }

    fn context(&self) -> PathBuf {
        self.work.path().join("context")
    }

    /// Writes `rel` in the context with `content` and the fixed mtime.
    fn write(&self, rel: &str, content: &str) {
        let path = self.context().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        set_mtime(&path);
    }

    /// Writes the Dockerfile, with `{base}` and `{registry}` filled in.
    fn dockerfile(&self, text: &str) {
        let text = text
            .replace(
                "{base}",
                &format!("{}/base/busybox:latest", self.registry.addr()),
            )
            .replace("{registry}", &self.registry.addr());
        std::fs::write(self.context().join("Dockerfile"), text).unwrap();
    }

    /// Builds the context into `inputs:TAG` in a new work directory (a new Pod), with the
    /// layer cache or without it.
    fn build(&self, tag: &str, cached: bool, args: &[(&str, &str)]) -> Built {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut options = BuildOptions::new(self.context().to_string_lossy());
        options.mode = Some(Mode::Chroot);
        options.kiln_dir = self.work.path().join(format!("pod-{tag}"));
        options
            .registry
            .insecure_registries
            .push(self.registry.addr());
        options.output.reproducible = true;
        options.output.destinations = vec![format!("{}/app/inputs:{tag}", self.registry.addr())];
        options.cache.enabled = cached;
        options.build_args = args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        runtime
            .block_on(
                Builder::new(options)
                    .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
                    .build(),
            )
            .unwrap_or_else(|e| panic!("build {tag} failed: {e}"));
        let hits = (events.lock().unwrap().iter())
            .filter_map(|e| match e {
                BuildEvent::StepFinished {
                    stage,
                    step,
                    cached: true,
                    ..
                } => Some((*stage, *step)),
                _ => None,
            })
            .collect();
        Built { hits }
    }

    fn flatten(&self, tag: &str) -> Flattened {
        image::flatten(&self.registry, &format!("app/inputs:{tag}"))
    }

    /// The test itself: a cached build of the context as it is (with `before` build args),
    /// `change`, then a cached and a clean build (with `after`). The cached rebuild must equal
    /// the clean one, differ from the first build, and take `hits` from the cache.
    fn check(
        &self,
        before: &[(&str, &str)],
        change: impl FnOnce(&Fixture),
        after: &[(&str, &str)],
        hits: &[(usize, usize)],
    ) {
        self.build("first", true, before);
        change(self);
        let rebuilt = self.build("cached", true, after);
        self.build("clean", false, after);
        let (first, cached, clean) = (
            self.flatten("first"),
            self.flatten("cached"),
            self.flatten("clean"),
        );
        let stale = differences(&cached, &clean);
        assert!(
            stale.is_empty(),
            "the cached rebuild differs from a clean build of the changed input:\n{}",
            stale.join("\n")
        );
        assert!(
            !differences(&first, &clean).is_empty(),
            "the change is not visible in the image, so this test could not see a stale hit"
        );
        for hit in hits {
            assert!(
                rebuilt.hits.contains(hit),
                "(stage, step) {hit:?} before the change should be a hit; hits: {:?}",
                rebuilt.hits
            );
        }
    }
}

/// What differs between two images: paths (with owners, modes, contents, link targets and
/// hard-link groups; not times) and the runtime config.
fn differences(left: &Flattened, right: &Flattened) -> Vec<String> {
    let scan = |flat: &Flattened| Tree::scan(&flat.rootfs, &[]).unwrap();
    let mut found = Vec::new();
    let diff = scan(left).diff(&scan(right));
    if !diff.is_empty() {
        found.push(format!("rootfs:\n{diff}"));
    }
    if left.config["config"] != right.config["config"] {
        found.push(format!(
            "config: {} vs {}",
            left.config["config"], right.config["config"]
        ));
    }
    found
}

fn set_mtime(path: &Path) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(MTIME))
        .unwrap();
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A step before the change, so the rebuild has something to take from the cache.
const WARM: &str = "RUN echo warm > /warm";

#[test]
fn hard_links_replaced_by_separate_copies() {
    let f = Fixture::new();
    f.write("d/a", "shared content\n");
    std::fs::hard_link(f.context().join("d/a"), f.context().join("d/b")).unwrap();
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY d/ /d/\nRUN stat -c %h /d/a > /links.txt\n"
    ));
    f.check(
        &[],
        |f| {
            // The same content, mode and time: only which names share an inode differs.
            std::fs::remove_file(f.context().join("d/b")).unwrap();
            f.write("d/b", "shared content\n");
            set_mtime(&f.context().join("d/a"));
        },
        &[],
        &[(0, 0)],
    );
}

#[test]
fn content_with_the_same_size_and_mtime() {
    let f = Fixture::new();
    f.write("f.txt", "first\n");
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY f.txt /f.txt\nRUN cat /f.txt > /seen.txt\n"
    ));
    f.check(&[], |f| f.write("f.txt", "other\n"), &[], &[(0, 0)]);
}

#[test]
fn mode_only() {
    let f = Fixture::new();
    f.write("tool.sh", "echo tool\n");
    set_mode(&f.context().join("tool.sh"), 0o644);
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY tool.sh /tool.sh\nRUN stat -c %a /tool.sh > /mode.txt\n"
    ));
    f.check(
        &[],
        |f| set_mode(&f.context().join("tool.sh"), 0o755),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn a_declared_build_arg() {
    let f = Fixture::new();
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nARG FLAVOUR\nRUN echo \"$FLAVOUR\" > /flavour.txt\n"
    ));
    f.check(
        &[("FLAVOUR", "vanilla")],
        |_| {},
        &[("FLAVOUR", "chocolate")],
        &[(0, 0)],
    );
}

#[test]
fn a_default_build_arg() {
    let f = Fixture::new();
    let dockerfile = |value: &str| {
        format!(
            "FROM {{base}}\n{WARM}\nARG FLAVOUR={value}\nRUN echo \"$FLAVOUR\" > /flavour.txt\n"
        )
    };
    f.dockerfile(&dockerfile("vanilla"));
    f.check(
        &[],
        |f| f.dockerfile(&dockerfile("chocolate")),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn env() {
    let f = Fixture::new();
    let dockerfile = |value: &str| {
        format!("FROM {{base}}\n{WARM}\nENV MODE={value}\nRUN echo \"$MODE\" > /mode.txt\n")
    };
    f.dockerfile(&dockerfile("debug"));
    f.check(
        &[],
        |f| f.dockerfile(&dockerfile("release")),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn user() {
    let f = Fixture::new();
    let dockerfile =
        |user: &str| format!("FROM {{base}}\n{WARM}\nUSER {user}\nRUN id > /tmp/id.txt\n");
    f.dockerfile(&dockerfile("kiln"));
    f.check(&[], |f| f.dockerfile(&dockerfile("daemon")), &[], &[(0, 0)]);
}

#[test]
fn workdir() {
    let f = Fixture::new();
    let dockerfile =
        |dir: &str| format!("FROM {{base}}\n{WARM}\nWORKDIR {dir}\nRUN pwd > /tmp/pwd.txt\n");
    f.dockerfile(&dockerfile("/srv/one"));
    f.check(
        &[],
        |f| f.dockerfile(&dockerfile("/srv/two")),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn shell() {
    let f = Fixture::new();
    let dockerfile = |shell: &str| {
        format!("FROM {{base}}\n{WARM}\nSHELL {shell}\nRUN echo \"$-\" > /flags.txt\n")
    };
    f.dockerfile(&dockerfile(r#"["/bin/sh", "-c"]"#));
    f.check(
        &[],
        |f| f.dockerfile(&dockerfile(r#"["/bin/sh", "-ec"]"#)),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn dockerignore() {
    let f = Fixture::new();
    f.write("src/keep.txt", "keep\n");
    f.write("src/secret.txt", "not for the image\n");
    f.write(".dockerignore", "*.bak\n");
    // Only src/ is copied, so the change of .dockerignore shows through its rules alone.
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY src/ /ctx/\nRUN find /ctx | sort > /listing.txt\n"
    ));
    f.check(
        &[],
        |f| f.write(".dockerignore", "*.bak\nsrc/secret.txt\n"),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn chown() {
    let f = Fixture::new();
    f.write("f.txt", "owned\n");
    let dockerfile = |owner: &str| {
        format!("FROM {{base}}\n{WARM}\nCOPY --chown={owner} f.txt /f.txt\nRUN stat -c %U /f.txt > /owner.txt\n")
    };
    f.dockerfile(&dockerfile("kiln"));
    f.check(&[], |f| f.dockerfile(&dockerfile("daemon")), &[], &[(0, 0)]);
}

#[test]
fn a_file_of_an_earlier_stage() {
    let f = Fixture::new();
    f.write("gen.txt", "generated one\n");
    f.dockerfile(&format!(
        "FROM {{base}} AS gen\nCOPY gen.txt /out/gen.txt\n\
         FROM {{base}}\n{WARM}\nCOPY --from=gen /out/ /in/\nRUN cat /in/gen.txt > /seen.txt\n"
    ));
    f.check(
        &[],
        |f| f.write("gen.txt", "generated two\n"),
        &[],
        &[(1, 0)],
    );
}

#[test]
fn add_archive_content() {
    let f = Fixture::new();
    let archive = |f: &Fixture, content: &str| {
        let dir = f.work.path().join("archive");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pkg")).unwrap();
        std::fs::write(dir.join("pkg/data.txt"), content).unwrap();
        kiln_testkit::run(
            Command::new("tar")
                .args([
                    "--sort=name",
                    "--mtime=@1600000000",
                    "--numeric-owner",
                    "-C",
                ])
                .arg(&dir)
                .arg("-cf")
                .arg(f.context().join("bundle.tar"))
                .arg("."),
        );
        set_mtime(&f.context().join("bundle.tar"));
    };
    archive(&f, "version 1\n");
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nADD bundle.tar /opt/\nRUN cat /opt/pkg/data.txt > /seen.txt\n"
    ));
    f.check(&[], |f| archive(f, "version 2\n"), &[], &[(0, 0)]);
}

#[test]
fn a_symlink_target() {
    let f = Fixture::new();
    f.write("d/a.txt", "a\n");
    f.write("d/b.txt", "b\n");
    std::os::unix::fs::symlink("a.txt", f.context().join("d/current")).unwrap();
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY d/ /d/\nRUN cat /d/current > /seen.txt\n"
    ));
    f.check(
        &[],
        |f| {
            std::fs::remove_file(f.context().join("d/current")).unwrap();
            std::os::unix::fs::symlink("b.txt", f.context().join("d/current")).unwrap();
        },
        &[],
        &[(0, 0)],
    );
}

#[test]
fn an_empty_directory() {
    let f = Fixture::new();
    f.write("d/a.txt", "a\n");
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY d/ /d/\nRUN find /d | sort > /listing.txt\n"
    ));
    f.check(
        &[],
        |f| std::fs::create_dir(f.context().join("d/empty")).unwrap(),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn a_deletion() {
    let f = Fixture::new();
    f.write("d/a.txt", "a\n");
    f.write("d/b.txt", "b\n");
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY d/ /d/\nRUN ls /d > /listing.txt\n"
    ));
    f.check(
        &[],
        |f| std::fs::remove_file(f.context().join("d/b.txt")).unwrap(),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn a_label() {
    let f = Fixture::new();
    let dockerfile = |value: &str| format!("FROM {{base}}\n{WARM}\nLABEL release={value}\n");
    f.dockerfile(&dockerfile("one"));
    f.check(&[], |f| f.dockerfile(&dockerfile("two")), &[], &[(0, 0)]);
}

#[test]
fn a_bind_mount_source() {
    let f = Fixture::new();
    f.write("m/input.txt", "input one\n");
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nRUN --mount=type=bind,source=m,target=/m cat /m/input.txt > /seen.txt\n"
    ));
    f.check(
        &[],
        |f| f.write("m/input.txt", "input two\n"),
        &[],
        &[(0, 0)],
    );
}

#[test]
fn a_heredoc() {
    let f = Fixture::new();
    let dockerfile =
        |word: &str| format!("FROM {{base}}\n{WARM}\nRUN <<EOF\necho {word} > /heredoc.txt\nEOF\n");
    f.dockerfile(&dockerfile("one"));
    f.check(&[], |f| f.dockerfile(&dockerfile("two")), &[], &[(0, 0)]);
}

#[test]
fn a_moved_base_tag() {
    let f = Fixture::new();
    image::push_rootfs(&f.registry, bases::busybox_rootfs(), "base/moving:1");
    f.dockerfile("FROM {registry}/base/moving:1\nRUN ls / > /root-listing.txt\n");
    f.check(
        &[],
        |f| {
            let moved = f.work.path().join("moved-base");
            kiln_testkit::run(
                Command::new("cp")
                    .arg("-a")
                    .arg(bases::busybox_rootfs())
                    .arg(&moved),
            );
            std::fs::write(moved.join("moved.txt"), "the tag moved\n").unwrap();
            image::push_rootfs(&f.registry, &moved, "base/moving:1");
        },
        &[],
        &[],
    );
}

#[test]
fn a_moved_copy_from_image() {
    let f = Fixture::new();
    let files = f.work.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("note.txt"), "first image\n").unwrap();
    image::push_rootfs(&f.registry, &files, "other/files:1");
    f.dockerfile(&format!(
        "FROM {{base}}\n{WARM}\nCOPY --from={{registry}}/other/files:1 /note.txt /note.txt\nRUN cat /note.txt > /seen.txt\n"
    ));
    f.check(
        &[],
        |f| {
            std::fs::write(files.join("note.txt"), "second image\n").unwrap();
            image::push_rootfs(&f.registry, &files, "other/files:1");
        },
        &[],
        &[(0, 0)],
    );
}
