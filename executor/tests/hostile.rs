//! Hostile builds: contexts, stages, images and archives that try to reach the build host
//! through symlinks, hard links and `..` names. Each case is a small context and Dockerfile
//! built by the real `executor` (chroot mode) against a loopback registry, with a secret marker
//! file on the host that the case points at. A case passes only if
//! - the build fails with an error naming the path, or succeeds with every blob of the pushed
//!   image (layers decompressed, config) free of the marker's bytes, as the case expects;
//! - the marker never appears in the build's output;
//! - nothing outside the build's own directories was created, changed or removed (the host
//!   directory the links point into is compared before and after);
//! - where BuildKit defines the result (a link resolved inside its root), the image equals
//!   buildah's, built from the same context.
//!
//! The same cases, where they apply, run in in-place mode inside a runc container (as in a
//! Pod), where the host directory is mounted into the container at the same path, as a Secret
//! would be.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testkit::buildah::Buildah;
use kiln_testkit::tree::Tree;
use kiln_testkit::{bases, image, Registry};

use support::hostile::{self, Case, Expect};
use support::pod;

/// Paths buildah leaves in RUN layers as mount stubs (see testdata/cases/DEVIATIONS.md).
const BUILDAH_STUBS: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "run",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/hostname",
];

/// Everything about `dir` a build could change: each path's type, mode, owner, size, mtime and
/// content or link target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let detail = if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            String::new()
        } else if meta.file_type().is_symlink() {
            std::fs::read_link(&path).unwrap().display().to_string()
        } else {
            String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
        };
        out.insert(
            path.strip_prefix(dir).unwrap().to_path_buf(),
            format!(
                "{:o} {}:{} {} {} {detail}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.len(),
                meta.mtime()
            ),
        );
    }
    out
}

/// The flags every hostile build takes besides its context and Kiln dir.
fn common_args(registry: &Registry, case: &Case, repo_tag: &str) -> Vec<String> {
    let addr = registry.addr();
    let mut args = vec![
        format!("--destination={addr}/{repo_tag}"),
        "--progress=plain".to_owned(),
        format!("--registry-map=docker.io={addr}"),
        format!("--insecure-registry={addr}"),
    ];
    if case.cache {
        args.push("--cache=true".to_owned());
        args.push(format!("--cache-repo={addr}/hostile-cache"));
    }
    args
}

/// Builds `case` with the executor in chroot mode, as on a CI host.
fn build_chroot(registry: &Registry, case: &Case, context: &Path, repo_tag: &str) -> Output {
    build_chroot_with(registry, case, context, repo_tag, &[])
}

/// [`build_chroot`] with more flags.
fn build_chroot_with(
    registry: &Registry,
    case: &Case,
    context: &Path,
    repo_tag: &str,
    extra: &[&str],
) -> Output {
    let kiln_dir = context.with_extension("kiln");
    Command::new(env!("CARGO_BIN_EXE_executor"))
        .arg(format!("--context=dir://{}", context.display()))
        .arg(format!("--kiln-dir={}", kiln_dir.display()))
        .arg("--mode=chroot")
        .args(extra)
        .args(common_args(registry, case, repo_tag))
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .expect("spawn executor")
}

/// Whether `repo_tag` exists in the registry.
fn pushed(registry: &Registry, repo_tag: &str) -> bool {
    Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/{repo_tag}", registry.addr()))
        .output()
        .unwrap()
        .status
        .success()
}

/// How a case is built: the case, its context directory and the `repo:tag` to push.
type Build<'a> = &'a dyn Fn(&Case, &Path, &str) -> Output;

fn check(
    registry: &Registry,
    oracle: Option<&Buildah>,
    host: &hostile::Host,
    work: &Path,
    case: &Case,
    (repo, build): (&str, Build<'_>),
) -> Vec<String> {
    let mut problems = Vec::new();
    let context = work.join(format!("{repo}-{}", case.name));
    hostile::write_context(case, host, &registry.addr(), &context);
    let repo_tag = format!("{repo}/{}:1", case.name);
    let before = snapshot(&host.dir);
    let out = build(case, &context, &repo_tag);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if log.contains(&host.marker) {
        problems.push(format!("the marker appears in the build output:\n{log}"));
    }
    match (&case.expect, out.status.success()) {
        (Expect::Fails(names), false) => {
            if !log.contains(names) {
                problems.push(format!("the error does not name {names:?}:\n{log}"));
            }
            if pushed(registry, &repo_tag) {
                problems.push("a failed build pushed an image".to_owned());
            }
        }
        (Expect::Fails(_), true) => problems.push(format!("the build succeeded:\n{log}")),
        (Expect::Succeeds { .. } | Expect::Either, true) => {
            let leaks = image::blobs_containing(registry, &repo_tag, host.marker.as_bytes());
            if !leaks.is_empty() {
                problems.push(format!("the marker is in blobs {leaks:?}"));
            }
        }
        (Expect::Either, false) => {}
        (Expect::Succeeds { .. }, false) => problems.push(format!("the build failed:\n{log}")),
    }
    if snapshot(&host.dir) != before {
        problems.push("the host directory changed".to_owned());
    }
    let buildah = oracle.filter(|_| matches!(case.expect, Expect::Succeeds { oracle: true }));
    if let (Some(buildah), true) = (buildah, out.status.success()) {
        let oracle_tag = format!("hostile-oracle/{}:1", case.name);
        match buildah.build_and_push(&context, None, &[], None, &oracle_tag) {
            Err(e) => problems.push(format!("buildah failed: {e}")),
            Ok(()) => {
                let ours = image::flatten(registry, &repo_tag);
                let theirs = image::flatten(registry, &oracle_tag);
                let diff = Tree::scan(&ours.rootfs, BUILDAH_STUBS)
                    .unwrap()
                    .diff(&Tree::scan(&theirs.rootfs, BUILDAH_STUBS).unwrap());
                if !diff.is_empty() {
                    problems.push(format!("differs from buildah (left: kiln):\n{diff}"));
                }
            }
        }
        if snapshot(&host.dir) != before {
            problems.push("the host directory changed while buildah built".to_owned());
        }
    }
    if let Some(check) = case.image_check {
        if out.status.success() {
            let flat = image::flatten(registry, &repo_tag);
            if let Err(e) = check(&flat.rootfs, host) {
                problems.push(e);
            }
        }
    }
    eprintln!(
        "case {repo}/{}: {}",
        case.name,
        if problems.is_empty() { "ok" } else { "FAILED" }
    );
    problems
}

#[test]
fn hostile_contexts_stages_images_and_archives_stay_in_their_roots() {
    kiln_testkit::require_tools(&["buildah", "skopeo", "umoci", "gzip"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let host = hostile::Host::create(work.path());
    hostile::push_link_image(
        &registry,
        &host,
        work.path(),
        env!("CARGO_BIN_EXE_executor"),
    );
    let buildah = Buildah::new(&registry);
    let cases = hostile::cases();
    assert!(cases.len() >= 20, "the suite has {} cases", cases.len());
    let top_level = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let root_before = top_level(Path::new("/"));
    let build = |case: &Case, context: &Path, repo_tag: &str| {
        build_chroot(&registry, case, context, repo_tag)
    };
    let failures = failures_of(&cases, |case| {
        check(
            &registry,
            Some(&buildah),
            &host,
            work.path(),
            case,
            ("hostile", &build),
        )
    });
    assert_eq!(
        root_before,
        top_level(Path::new("/")),
        "the host's / changed"
    );
    assert_none_failed(&failures, cases.len());
}

/// The problems of each case that has any, headed by its name.
fn failures_of(cases: &[Case], mut problems_of: impl FnMut(&Case) -> Vec<String>) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let problems = problems_of(case);
        if !problems.is_empty() {
            failures.push(format!("=== {} ===\n{}", case.name, problems.join("\n")));
        }
    }
    failures
}

fn assert_none_failed(failures: &[String], cases: usize) {
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The same hostile cases with bases unpacked into the stage rootfs instead of mounted from
/// layer trees (`--base-overlay=false`, the path a kernel without overlayfs takes). The
/// buildah comparison is left to the test above; containment is what differs between the paths.
#[test]
fn hostile_cases_stay_in_their_roots_with_unpacked_bases() {
    kiln_testkit::require_tools(&["skopeo", "umoci", "gzip"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let host = hostile::Host::create(work.path());
    hostile::push_link_image(
        &registry,
        &host,
        work.path(),
        env!("CARGO_BIN_EXE_executor"),
    );
    let build = |case: &Case, context: &Path, repo_tag: &str| {
        build_chroot_with(
            &registry,
            case,
            context,
            repo_tag,
            &["--base-overlay=false"],
        )
    };
    let cases = hostile::cases();
    let failures = failures_of(&cases, |case| {
        check(
            &registry,
            None,
            &host,
            work.path(),
            case,
            ("hostile-unpacked", &build),
        )
    });
    assert_none_failed(&failures, cases.len());
}

/// In chroot mode RUN sees the stage's rootfs only: the push credentials (`config.json` of
/// `DOCKER_CONFIG`) and every other host path are out of its reach.
#[test]
fn run_cannot_reach_the_push_credentials_or_the_host() {
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let docker = work.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    let config = docker.join("config.json");
    // base64 of "kiln:credential-marker", the form a docker-registry Secret holds.
    let marker = "a2lsbjpjcmVkZW50aWFsLW1hcmtlcg==";
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"other.invalid":{{"auth":"{marker}"}}}}}}"#),
    )
    .unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM busybox\n\
             RUN if [ -e {config} ]; then echo FOUND {config}; exit 3; fi\n\
             RUN if [ -e {docker} ] || [ -e {work} ]; then echo FOUND host; exit 4; fi\n\
             RUN ls / > /listing\n",
            config = config.display(),
            docker = docker.display(),
            work = work.path().display(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_executor"))
        .arg(format!("--context=dir://{}", context.display()))
        .arg(format!("--destination={addr}/creds/probe:1"))
        .arg(format!("--kiln-dir={}", work.path().join("kiln").display()))
        .args(["--mode=chroot", "--progress=plain"])
        .arg(format!("--registry-map=docker.io={addr}"))
        .arg(format!("--insecure-registry={addr}"))
        .env("DOCKER_CONFIG", &docker)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    // A step that finds either path exits non-zero and fails the build.
    assert!(out.status.success(), "{log}");
    assert!(!log.contains(marker), "{log}");
    assert!(image::blobs_containing(&registry, "creds/probe:1", marker.as_bytes()).is_empty());
}

/// The cases that mean the same in-place, each built inside its own runc container laid out
/// as Kiln's image (Docker's default capabilities; CAP_SYS_ADMIN only for the cases with
/// `RUN --mount`), with the host directory mounted at the same path and the container's own
/// docker config (holding the marker) at `/kaniko/.docker/config.json`, as a Secret is.
#[test]
fn hostile_builds_in_place_stay_in_their_roots() {
    kiln_testkit::require_tools(&["runc", "skopeo", "umoci", "gzip", "ldd"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let host = hostile::Host::create(work.path());
    hostile::push_link_image(
        &registry,
        &host,
        work.path(),
        env!("CARGO_BIN_EXE_executor"),
    );
    let cases: Vec<Case> = hostile::cases()
        .into_iter()
        .filter(|case| case.in_place)
        .collect();
    assert!(cases.len() >= 20, "{} in-place cases", cases.len());
    let build = |case: &Case, context: &Path, repo_tag: &str| {
        let bundle = context.with_extension("bundle");
        let rootfs = pod::container_rootfs(&bundle);
        std::fs::create_dir_all(rootfs.join("kiln/.docker")).unwrap();
        std::fs::write(
            rootfs.join("kiln/.docker/config.json"),
            format!(
                r#"{{"auths":{{"{}.invalid":{{"auth":"a2lsbjpwdw=="}}}}}}"#,
                host.marker
            ),
        )
        .unwrap();
        let mut argv = pod::install_executor(&rootfs);
        argv.push("--context=dir:///workspace/context".to_owned());
        argv.push("--mode=in-place".to_owned());
        argv.extend(common_args(&registry, case, repo_tag));
        let host_dir = host.dir.display().to_string();
        let binds = [
            pod::Bind(context, "/workspace/context", "ro"),
            pod::Bind(&host.dir, &host_dir, "rw"),
        ];
        let mounts = case.dockerfile.is_some_and(|d| d.contains("--mount"));
        let caps: &[&str] = if mounts { &["CAP_SYS_ADMIN"] } else { &[] };
        pod::write_bundle_config(&bundle, &argv, &binds, caps);
        pod::runc_run(
            &bundle,
            &format!("kiln-hostile-{}-{}", case.name, std::process::id()),
        )
    };
    let mut failures = Vec::new();
    for case in &cases {
        let problems = check(
            &registry,
            None,
            &host,
            work.path(),
            case,
            ("hostile-inplace", &build),
        );
        if !problems.is_empty() {
            failures.push(format!("=== {} ===\n{}", case.name, problems.join("\n")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} in-place cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// In-place, RUN shares `/` with Kiln. With CAP_SYS_ADMIN every step sees an empty, read-only
/// directory where the docker config (the mounted Secret) is, while Kiln still pushes with it;
/// without it the step can read it, as under kaniko, and the build says so once.
#[test]
fn in_place_run_steps_cannot_read_the_credentials_when_they_can_be_hidden() {
    kiln_testkit::require_tools(&["runc", "skopeo", "umoci", "ldd"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM busybox\n\
         RUN ls -A /kiln/.docker > /seen\n\
         RUN if [ -e /kiln/.docker/config.json ]; then echo readable > /verdict; else echo hidden > /verdict; fi\n",
    )
    .unwrap();
    for (name, caps, verdict) in [
        ("sys-admin", &["CAP_SYS_ADMIN"][..], "hidden"),
        ("default-pod", &[][..], "readable"),
    ] {
        let bundle = work.path().join(name);
        let rootfs = pod::container_rootfs(&bundle);
        std::fs::create_dir_all(rootfs.join("kiln/.docker")).unwrap();
        std::fs::write(
            rootfs.join("kiln/.docker/config.json"),
            r#"{"auths":{"other.invalid":{"auth":"a2lsbjpwdw=="}}}"#,
        )
        .unwrap();
        let mut argv = pod::install_executor(&rootfs);
        argv.extend([
            "--context=dir:///workspace/context".to_owned(),
            "--mode=in-place".to_owned(),
            "--progress=plain".to_owned(),
            format!("--destination={addr}/creds/{name}:1"),
            format!("--registry-map=docker.io={addr}"),
            format!("--insecure-registry={addr}"),
        ]);
        pod::write_bundle_config(
            &bundle,
            &argv,
            &[pod::Bind(&context, "/workspace/context", "ro")],
            caps,
        );
        let out = pod::runc_run(
            &bundle,
            &format!("kiln-creds-{name}-{}", std::process::id()),
        );
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {log}");
        let flat = image::flatten(&registry, &format!("creds/{name}:1"));
        let read = |file: &str| std::fs::read_to_string(flat.rootfs.join(file)).unwrap();
        assert_eq!(read("verdict"), format!("{verdict}\n"), "{name}: {log}");
        let warnings = log
            .matches("RUN steps can read the registry credentials")
            .count();
        if caps.is_empty() {
            assert_eq!(read("seen"), "config.json\n", "{name}");
            assert_eq!(warnings, 1, "{name}: {log}");
        } else {
            assert_eq!(read("seen"), "", "{name}");
            assert_eq!(warnings, 0, "{name}: {log}");
        }
    }
}
