//! Builds at once sharing one Kiln dir: eight `executor` processes sharing one `--kiln-dir`
//! (base layers mounted from its layer trees), one `--cache-dir` and one cache repository, with
//! cache mounts of every sharing mode, give the images the same builds give one at a time, to
//! the digest (`--reproducible`), against the real loopback registry. And `executor cache prune
//! --kiln-dir` while a build runs removes the trees nobody uses and keeps the ones it mounts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{bases, image, Registry};

/// Each Dockerfile is built this many times in every concurrent round (4 x 2 = 8 builds).
const COPIES: usize = 2;

/// The Dockerfiles, by name. `{reg}` is the registry. Every RUN that reads a cache mount puts
/// into the image only what does not depend on which build wrote the cache first: shared users
/// write whole files by rename, a locked user may test and fill, a private copy is its own,
/// and content is read with `cat`, not copied with `cp` (which would carry over the mode of
/// whichever build made the file: `mktemp` makes 0600).
const DOCKERFILES: &[(&str, &str)] = &[
    (
        "multistage",
        "FROM {reg}/library/debian:bookworm AS build\n\
         RUN --mount=type=cache,id=kiln-shared,target=/var/cache/shared,sharing=shared \\\n\
             f=$(mktemp /var/cache/shared/part.XXXXXX) && echo shared-v1 > \"$f\" \\\n\
             && mv \"$f\" /var/cache/shared/version && cat /var/cache/shared/version > /from-shared\n\
         RUN mkdir -p /out && seq 1 3000 > /out/numbers && sha256sum /out/numbers > /out/sum\n\
         COPY app.txt /out/app.txt\n\
         FROM {reg}/library/busybox:latest\n\
         COPY --from=build /out /out\n\
         COPY --from=build /from-shared /from-shared\n\
         RUN cat /out/sum /out/app.txt > /out/both\n",
    ),
    (
        "cache-modes",
        "FROM {reg}/library/debian:bookworm\n\
         RUN --mount=type=cache,id=kiln-downloads,target=/cache,sharing=locked \\\n\
             if [ ! -f /cache/archive ]; then seq 1 20000 > /cache/archive; fi \\\n\
             && sha256sum < /cache/archive > /archive.sum\n\
         RUN --mount=type=cache,id=kiln-scratch,target=/scratch,sharing=private \\\n\
             mkdir -p /scratch/work && echo private > /scratch/work/p && cat /scratch/work/p > /private\n\
         COPY . /src\n\
         RUN ls /src > /src.listing\n",
    ),
    (
        "files",
        "FROM {reg}/library/busybox:latest\n\
         RUN mkdir -p /data && for i in $(seq 1 300); do echo $i > /data/f$i; done\n\
         RUN --mount=type=cache,id=kiln-shared,target=/shared,sharing=locked \\\n\
             echo shared-v1 > /shared/version && cat /shared/version > /seen-version\n\
         RUN rm /data/f1 && echo changed > /data/f2\n\
         COPY data/ /data/\n",
    ),
    (
        "parallel-stages",
        "FROM {reg}/library/busybox:latest AS tools\n\
         RUN mkdir /tools && echo tool > /tools/t\n\
         FROM {reg}/library/debian:bookworm AS libs\n\
         RUN mkdir /libs && seq 1 500 > /libs/l\n\
         FROM {reg}/library/debian:bookworm\n\
         RUN --mount=type=bind,from=tools,source=/tools,target=/mnt/tools cp /mnt/tools/t /t\n\
         RUN --mount=type=cache,target=/seeded,from=libs,source=/libs,sharing=shared \\\n\
             wc -l < /seeded/l > /seeded-count\n\
         COPY --from=libs /libs /libs\n",
    ),
];

fn executor() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_executor"));
    // Nothing of the machine running the tests may leak in.
    command
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One context per Dockerfile, under `work/contexts/NAME`.
fn contexts(work: &Path, registry: &Registry) -> Vec<(String, PathBuf)> {
    DOCKERFILES
        .iter()
        .map(|(name, dockerfile)| {
            let dir = work.join("contexts").join(name);
            std::fs::create_dir_all(dir.join("data")).unwrap();
            std::fs::write(
                dir.join("Dockerfile"),
                dockerfile.replace("{reg}", &registry.addr()),
            )
            .unwrap();
            std::fs::write(dir.join("app.txt"), format!("app of {name}\n")).unwrap();
            std::fs::write(dir.join("data/f3"), "from the context\n").unwrap();
            (name.to_string(), dir)
        })
        .collect()
}

/// Where one build keeps what it shares with others.
struct Shared<'a> {
    kiln_dir: &'a Path,
    cache_dir: &'a Path,
    cache_repo: String,
}

/// Starts `executor` building `context` to `REG/concurrent/NAME:TAG`, its digest written to
/// `digest_file`.
fn spawn_build(
    registry: &Registry,
    shared: &Shared<'_>,
    (name, context): &(String, PathBuf),
    tag: &str,
    digest_file: &Path,
) -> Child {
    executor()
        .arg(format!("--context=dir://{}", context.display()))
        .arg(format!(
            "--destination={}/concurrent/{name}:{tag}",
            registry.addr()
        ))
        .arg("--reproducible")
        .arg("--cache=true")
        .arg(format!("--cache-repo={}", shared.cache_repo))
        .arg(format!("--cache-dir={}", shared.cache_dir.display()))
        .arg(format!("--kiln-dir={}", shared.kiln_dir.display()))
        .arg("--base-overlay=true")
        .arg("--mode=chroot")
        .arg("--progress=plain")
        .arg(format!("--digest-file={}", digest_file.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start executor")
}

/// The digest a finished build wrote; panics with its output when it failed.
fn digest_of(what: &str, out: Output, digest_file: &Path) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {}:\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    std::fs::read_to_string(digest_file)
        .unwrap_or_else(|e| panic!("{what}: {}: {e}", digest_file.display()))
        .trim()
        .to_owned()
}

fn warm(registry: &Registry, cache_dir: &Path) {
    let out = executor()
        .arg("warm")
        .arg(format!("--cache-dir={}", cache_dir.display()))
        .arg(format!(
            "--image={}/library/debian:bookworm",
            registry.addr()
        ))
        .arg(format!(
            "--image={}/library/busybox:latest",
            registry.addr()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "executor warm failed:\n{}",
        text(&out.stderr)
    );
}

/// The layer trees in a Kiln dir, by name (the store's own dot files left out).
fn trees_in(kiln_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(kiln_dir.join("layers"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// An image's config and manifest as the registry has them, for a failure message.
fn describe(registry: &Registry, repo_tag: &str) -> String {
    let source = format!("docker://{}/{repo_tag}", registry.addr());
    let inspect = |extra: &[&str]| {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .args(extra)
            .arg(&source)
            .output()
            .unwrap();
        text(&out.stdout)
    };
    format!("{}\n{}", inspect(&["--config"]), inspect(&[]))
}

fn prepared() -> (Registry, tempfile::TempDir, PathBuf) {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    image::push_rootfs(&registry, bases::debian_rootfs(), "library/debian:bookworm");
    let work = tempfile::tempdir().unwrap();
    let cache_dir = work.path().join("cache-dir");
    warm(&registry, &cache_dir);
    (registry, work, cache_dir)
}

#[test]
fn eight_builds_at_once_give_the_images_of_serial_builds() {
    let (registry, work, cache_dir) = prepared();
    let contexts = contexts(work.path(), &registry);
    let digests = work.path().join("digests");
    std::fs::create_dir_all(&digests).unwrap();

    // The reference: one at a time, with a Kiln dir and a cache repository of their own.
    let serial_kiln = work.path().join("kiln-serial");
    let serial = Shared {
        kiln_dir: &serial_kiln,
        cache_dir: &cache_dir,
        cache_repo: format!("{}/serial/cache", registry.addr()),
    };
    let started = Instant::now();
    let reference: Vec<String> = contexts
        .iter()
        .map(|context| {
            let file = digests.join(format!("serial-{}", context.0));
            let out = spawn_build(&registry, &serial, context, "serial", &file)
                .wait_with_output()
                .unwrap();
            digest_of(&format!("serial build of {}", context.0), out, &file)
        })
        .collect();
    eprintln!("serial builds: {:.1}s", started.elapsed().as_secs_f64());

    // What the Dockerfiles made, checked once on the reference images.
    let flat = image::flatten(&registry, "concurrent/multistage:serial");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("from-shared")).unwrap(),
        "shared-v1\n"
    );
    assert!(std::fs::read_to_string(flat.rootfs.join("out/both"))
        .unwrap()
        .ends_with("app of multistage\n"));
    let flat = image::flatten(&registry, "concurrent/files:serial");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("seen-version")).unwrap(),
        "shared-v1\n"
    );
    assert!(!flat.rootfs.join("data/f1").exists());
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("data/f3")).unwrap(),
        "from the context\n"
    );
    assert_eq!(
        std::fs::read_dir(flat.rootfs.join("data")).unwrap().count(),
        299
    );

    // Eight at once, in rounds that find the shared Kiln dir and cache in different states.
    let kiln = work.path().join("kiln");
    let kiln_again = work.path().join("kiln-again");
    let rounds: [(&str, &Path, &str); 3] = [
        // Nothing unpacked, nothing cached: every step runs, every tree is made.
        ("cold", &kiln, "cache"),
        // The trees and cache mounts are there, the cache repository is new: steps run again
        // on mounted trees.
        ("warm-kiln-dir", &kiln, "cache-rerun"),
        // A new Kiln dir over a warm cache: the cached layers become trees at once.
        ("warm-cache", &kiln_again, "cache"),
    ];
    for (round, kiln_dir, repo) in rounds {
        let shared = Shared {
            kiln_dir,
            cache_dir: &cache_dir,
            cache_repo: format!("{}/{repo}", registry.addr()),
        };
        let started = Instant::now();
        let builds: Vec<(String, PathBuf, Child)> = (0..COPIES)
            .flat_map(|copy| contexts.iter().map(move |context| (copy, context)))
            .map(|(copy, context)| {
                let tag = format!("{round}-{copy}");
                let file = digests.join(format!("{}-{tag}", context.0));
                let child = spawn_build(&registry, &shared, context, &tag, &file);
                (
                    format!("{round} build {copy} of {}", context.0),
                    file,
                    child,
                )
            })
            .collect();
        let got: Vec<(String, String)> = builds
            .into_iter()
            .map(|(what, file, child)| {
                let out = child.wait_with_output().unwrap();
                let digest = digest_of(&what, out, &file);
                (what, digest)
            })
            .collect();
        eprintln!(
            "{round}: {} builds at once in {:.1}s",
            got.len(),
            started.elapsed().as_secs_f64()
        );
        for (i, (what, digest)) in got.iter().enumerate() {
            let name = &contexts[i % contexts.len()].0;
            assert_eq!(
                digest,
                &reference[i % contexts.len()],
                "{what} gave another image than the serial build:\nserial: {}\nthis one: {}",
                describe(&registry, &format!("concurrent/{name}:serial")),
                describe(
                    &registry,
                    &format!("concurrent/{name}:{round}-{}", i / contexts.len())
                ),
            );
        }
    }

    // Every build unmounted what it mounted and let go of its trees: nothing is in use, and no
    // half-made tree is left.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&work.path().display().to_string()),
        "still mounted:\n{mounts}"
    );
    for kiln_dir in [&kiln, &kiln_again] {
        let out = executor()
            .args(["cache", "prune", "--dry-run", "--older-than=0s"])
            .arg(format!("--kiln-dir={}", kiln_dir.display()))
            .output()
            .unwrap();
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
        assert!(!stdout.contains("in use:"), "{stdout}");
        assert!(!stdout.contains("left half-made"), "{stdout}");
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.starts_with("would remove"))
                .count(),
            trees_in(kiln_dir).len(),
            "{stdout}"
        );
    }
}

/// The trees (as directory names) on the prune report's lines that start with `prefix`.
fn named(stdout: &str, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|rest| rest.split(' ').next().unwrap().replacen(':', "-", 1))
        .collect();
    names.sort();
    names
}

/// `executor cache prune --kiln-dir --older-than 0s` while a build holds its trees (a RUN is
/// sleeping): the held trees stay, the others go, and the build then finishes with the image it
/// gives alone. Once it is over, its trees go too.
#[test]
fn a_prune_while_a_build_runs_keeps_its_trees_and_removes_the_rest() {
    let (registry, work, cache_dir) = prepared();
    let kiln = work.path().join("kiln");
    let signal = work.path().join("signal");
    std::fs::create_dir_all(&signal).unwrap();
    let context = work.path().join("sleeper");
    std::fs::create_dir_all(&context).unwrap();
    // The RUN tells the test it is running through a file in a cache mount the test can see
    // (not in the image), then sleeps long enough for the prune.
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {}/library/busybox:latest\n\
             RUN --mount=type=cache,id=signal,target=/signal,sharing=shared \\\n\
                 touch /signal/started && sleep 6 && echo slept > /slept\n",
            registry.addr()
        ),
    )
    .unwrap();
    let sleeper = ("sleeper".to_owned(), context);
    let other = contexts(work.path(), &registry)
        .into_iter()
        .find(|(name, _)| name == "cache-modes")
        .unwrap();
    let digests = work.path().join("digests");
    std::fs::create_dir_all(&digests).unwrap();
    let build = |kiln_dir: &Path, repo: &str, context: &(String, PathBuf), tag: &str| {
        let shared = Shared {
            kiln_dir,
            cache_dir: &cache_dir,
            cache_repo: format!("{}/{repo}", registry.addr()),
        };
        let file = digests.join(format!("{}-{tag}", context.0));
        (spawn_build(&registry, &shared, context, tag, &file), file)
    };

    // The reference, alone in a Kiln dir of its own.
    let (child, file) = build(&work.path().join("kiln-alone"), "alone", &sleeper, "alone");
    let alone = digest_of(
        "the sleeper alone",
        child.wait_with_output().unwrap(),
        &file,
    );

    // A Debian tree nobody will hold, then the sleeper in the same Kiln dir.
    let (child, file) = build(&kiln, "cache", &other, "first");
    digest_of("the Debian build", child.wait_with_output().unwrap(), &file);
    let debian_trees = trees_in(&kiln);
    assert!(!debian_trees.is_empty());
    let started_file = kiln.join("mount-cache/signal/started");
    let (sleeping, file) = build(&kiln, "cache", &sleeper, "held");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !started_file.exists() {
        assert!(Instant::now() < deadline, "the sleeper's RUN never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let held: Vec<String> = trees_in(&kiln)
        .into_iter()
        .filter(|t| !debian_trees.contains(t))
        .collect();
    assert_eq!(held.len(), 1, "the busybox base is one layer: {held:?}");

    let out = executor()
        .args(["cache", "prune", "--older-than=0s"])
        .arg(format!("--kiln-dir={}", kiln.display()))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        named(&stdout, "removed layer tree "),
        debian_trees,
        "{stdout}"
    );
    assert_eq!(named(&stdout, "in use: layer tree "), held, "{stdout}");
    assert_eq!(
        trees_in(&kiln),
        held,
        "the held tree is gone, or others stayed"
    );
    assert!(started_file.exists());

    let digest = digest_of(
        "the sleeper during the prune",
        sleeping.wait_with_output().unwrap(),
        &file,
    );
    assert_eq!(digest, alone, "the held build gave another image");

    // Over, it holds nothing: the next prune takes its tree as well.
    let out = executor()
        .args(["cache", "prune", "--older-than=0s"])
        .arg(format!("--kiln-dir={}", kiln.display()))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(named(&stdout, "removed layer tree "), held, "{stdout}");
    assert!(trees_in(&kiln).is_empty());
}
