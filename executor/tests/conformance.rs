//! Conformance: every case under `testdata/cases/` is built with the `executor` binary (chroot
//! mode, kaniko-style flags) twice, with bases mounted from layer trees and with bases unpacked
//! (`BASE_PATHS`), and with buildah, against one loopback registry; the images are pulled back
//! with skopeo, unpacked with umoci and compared path by path and config field by config field.
//! Each Kiln image is then run with runc and must print what the case's `expect` file says.
//!
//! `expect` format, one directive per line (`#` starts a comment):
//! - `run: TEXT` — one line of the expected stdout, in order;
//! - `arg: KEY=VALUE` — a `--build-arg`;
//! - `target: STAGE` — `--target`;
//! - `secret: ID=VALUE` — a `--secret id=ID` whose value must never reach a layer or the config;
//! - `buildah: skip REASON` — buildah cannot build this case at all (the Kiln image is still
//!   built and run);
//! - `serve: DIR` — serve the case's DIR over HTTP (`python3 -m http.server`) on a loopback port
//!   for the duration of the case, and pass its URL as `--build-arg SERVE_URL=...` to both
//!   builders (ADD of URLs);
//! - `absent: PATH` / `present: PATH` — a path (relative to the root) that must not / must exist
//!   in the Kiln image: the hand-written oracle for paths the comparison leaves out (the
//!   deviations below) or that a running container cannot show (`/dev`, `/proc` are mounts).
//!
//! Besides `busybox` and `debian:bookworm`, cases build on the configured bases of
//! `kiln_testkit::configured` (`base-full`, `base-noenv`, `base-user`, `base-onbuild`): the
//! busybox layer under a full Docker config, no `Env` at all, a config that sets `User`,
//! `WorkingDir` and `Volumes`, and one with `ONBUILD` triggers.
//!
//! `KILN_CONFORMANCE_CASES=a,b` restricts the run to the named cases. `KILN_CONFORMANCE_EXECUTOR`
//! names another `executor` binary to build the cases with (an older build, to show that a case
//! fails without the fix it covers). Cases run on [`WORKERS`] threads.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::buildah::Buildah;
use kiln_testkit::image::{self, Flattened};
use kiln_testkit::tree::Tree;
use kiln_testkit::{bases, configured, Registry};

/// Where buildah departs from Docker/BuildKit's documented behaviour, per case: a path (relative
/// to the root, with its subtree) or `config:Field` that is not compared, and why. Docker wins:
/// the Kiln side is still checked by the case's `run:` lines. `*` applies to every case.
/// `testdata/cases/DEVIATIONS.md` lists the same entries for the README.
const DEVIATIONS: &[(&str, &str, &str)] = &[
    (
        "*",
        "dev",
        "buildah leaves /dev stubs (device nodes, mount points) in RUN layers",
    ),
    (
        "*",
        "proc",
        "buildah leaves a /proc mount point stub in RUN layers",
    ),
    (
        "*",
        "etc/hosts",
        "buildah leaves an empty /etc/hosts in RUN layers; BuildKit mounts it and keeps it out of the image",
    ),
    (
        "*",
        "etc/resolv.conf",
        "buildah leaves an empty /etc/resolv.conf in RUN layers; BuildKit mounts it and keeps it out of the image",
    ),
    (
        "*",
        "etc/hostname",
        "buildah leaves an empty /etc/hostname in RUN layers; BuildKit mounts it and keeps it out of the image",
    ),
    (
        "*",
        "run",
        "buildah leaves a /run mount point stub (for /run/secrets) in RUN layers",
    ),
    ("env", "config:Env", "buildah moves a redefined variable (PATH) to the end of Env; Docker replaces it in place"),
    ("healthcheck", "config:Healthcheck", "buildah drops Healthcheck from OCI-format configs; Docker records HEALTHCHECK NONE as Test [\"NONE\"]"),
    ("healthcheck-exec", "config:Healthcheck", "buildah drops Healthcheck from OCI-format configs"),
    ("metadata", "config:OnBuild", "buildah drops OnBuild from OCI-format configs"),
    ("shell", "config:Shell", "buildah drops Shell from OCI-format configs"),
    ("shell", "config:Cmd", "buildah ignores SHELL for shell-form CMD; Docker wraps it with the current SHELL"),
    ("user-workdir", "var/tmp", "buildah creates WORKDIR lazily at the next step, so a trailing WORKDIR never exists; BuildKit creates it (and missing parents) owned by USER"),
    ("volume-writes", "data/after.txt", "buildah discards RUN writes under a declared VOLUME; BuildKit keeps them"),
    (
        "volume-writes",
        "listing.txt",
        "the listing of /data written after VOLUME lacks after.txt under buildah (writes under VOLUME discarded)",
    ),
    ("copy-chmod-octal", "secretdir", "buildah applies --chmod to copied files only; BuildKit applies it to the copied directory too"),
    ("run-mount-bind-context", "tmp/ctx", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("run-mount-bind-context", "tmp/data", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("run-mount-bind-stage", "tmp/gen", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("run-mount-cache", "tmp/cache", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("run-mount-tmpfs", "tmp/scratch", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("run-mount-bind-image", "tmp/bb", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("run-mount-cache-from", "tmp/c", "buildah leaves RUN --mount target stubs in the layer; BuildKit removes mount points it created"),
    ("add-archives", "x/owned", "buildah ignores ADD --chown for extracted archive entries (as Docker's legacy builder did); BuildKit owns every extracted entry by --chown since v0.23 (moby/buildkit#5987)"),
    ("onbuild-from-stage", "stage-trigger.txt", STAGE_ONBUILD),
    ("onbuild-from-stage", "child.txt", STAGE_ONBUILD),
    ("onbuild-from-stage", "config:Env", STAGE_ONBUILD),
    ("onbuild-runs-once", "log.txt", STAGE_ONBUILD),
    ("user-base-run", "data", BASE_VOLUMES),
    ("user-base-workdir-relative", "data", BASE_VOLUMES),
    ("user-base-root-override", "data", BASE_VOLUMES),
    ("user-base-volume-writes", "data/inside.txt", "buildah discards RUN writes under a VOLUME of the base image; BuildKit keeps them (VOLUME only edits the config)"),
    ("user-base-volume-writes", "seen.txt", "what a later step reads under the base's VOLUME: the file is gone under buildah (writes under VOLUME discarded)"),
    ("shell-base-without-env", "config:Shell", "buildah drops Shell from OCI-format configs"),
];

/// Why the stage ONBUILD cases are not compared with buildah.
const STAGE_ONBUILD: &str = "buildah runs no ONBUILD triggers of an earlier stage (it builds stages as OCI images, whose configs have no OnBuild); BuildKit runs the ONBUILD instructions of the stage named in FROM (frontend/dockerfile/dockerfile2llb/convert.go, resolveStages: the base stage's OnbuildCommands are appended to the triggers)";

/// Why the base-user cases do not compare `/data`.
const BASE_VOLUMES: &str = "buildah creates the base image's Volumes directories at the first RUN; BuildKit leaves them to the runtime (VOLUME, and a base's Volumes, only edit the config), so they are not in the image";

#[derive(Clone)]
struct Case {
    name: String,
    serve: Option<PathBuf>,
    dir: PathBuf,
    run: String,
    args: Vec<(String, String)>,
    target: Option<String>,
    secrets: Vec<(String, String)>,
    buildah_skip: Option<String>,
    absent: Vec<String>,
    present: Vec<String>,
}

/// How many cases are built at once. Each case is mostly waiting on fsync, the registry and
/// two builders that overlap already; two at a time keep a 2-core machine busy without
/// starving the builds of the other tests.
const WORKERS: usize = 2;

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/cases")
}

fn load_cases() -> Vec<Case> {
    let only: Option<Vec<String>> = std::env::var("KILN_CONFORMANCE_CASES")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let mut cases = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(cases_dir())
        .expect("testdata/cases exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    entries.sort();
    for dir in entries {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if only.as_ref().is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let expect = std::fs::read_to_string(dir.join("expect"))
            .unwrap_or_else(|e| panic!("{}/expect: {e}", dir.display()));
        let mut case = Case {
            name,
            serve: None,
            dir: dir.clone(),
            run: String::new(),
            args: Vec::new(),
            target: None,
            secrets: Vec::new(),
            buildah_skip: None,
            absent: Vec::new(),
            present: Vec::new(),
        };
        for (number, line) in expect.lines().enumerate() {
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{}/expect:{}: no `key:`", dir.display(), number + 1));
            let value = value.strip_prefix(' ').unwrap_or(value);
            let pair = |v: &str| {
                let (k, v) = v.split_once('=').unwrap_or_else(|| {
                    panic!("{}/expect:{}: want KEY=VALUE", dir.display(), number + 1)
                });
                (k.to_owned(), v.to_owned())
            };
            match key {
                "run" => {
                    case.run.push_str(value);
                    case.run.push('\n');
                }
                "arg" => case.args.push(pair(value)),
                "secret" => case.secrets.push(pair(value)),
                "target" => case.target = Some(value.to_owned()),
                "serve" => case.serve = Some(dir.join(value)),
                "absent" => case.absent.push(value.to_owned()),
                "present" => case.present.push(value.to_owned()),
                "buildah" => {
                    case.buildah_skip = Some(
                        value
                            .strip_prefix("skip")
                            .unwrap_or_else(|| {
                                panic!(
                                    "{}/expect:{}: want `buildah: skip REASON`",
                                    dir.display(),
                                    number + 1
                                )
                            })
                            .trim()
                            .to_owned(),
                    )
                }
                other => panic!(
                    "{}/expect:{}: unknown key {other:?}",
                    dir.display(),
                    number + 1
                ),
            }
        }
        cases.push(case);
    }
    cases
}

/// The two ways a chroot build gets its bases, each checked against the oracle: mounted as
/// overlays of layer trees kept in the Kiln dir (the default), and unpacked into the stage
/// rootfs (`--base-overlay=false`, and where overlayfs is refused), each pushed to its own
/// repository.
const BASE_PATHS: [(bool, &str); 2] = [(true, "kiln"), (false, "kiln-unpacked")];

/// The `executor` command line a kaniko user would write for `case`, pushing to `repo`.
fn executor_command(
    registry: &Registry,
    case: &Case,
    (base_overlay, repo): (bool, &str),
    kiln_dir: &Path,
    secret_dir: &Path,
) -> Command {
    let addr = registry.addr();
    let executor = std::env::var_os("KILN_CONFORMANCE_EXECUTOR")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_executor")));
    let mut cmd = Command::new(executor);
    cmd.arg(format!("--context=dir://{}", case.dir.display()))
        .arg(format!("--destination={addr}/{repo}/{}:1", case.name))
        .arg(format!("--base-overlay={base_overlay}"))
        .arg(format!("--kiln-dir={}", kiln_dir.display()))
        .arg("--mode=chroot")
        .arg("--progress=plain")
        .arg(format!("--registry-map=docker.io={addr}"))
        .arg(format!("--insecure-registry={addr}"))
        // No docker config of the machine running the tests may leak into these builds.
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH");
    for (key, value) in &case.args {
        cmd.arg(format!("--build-arg={key}={value}"));
    }
    if let Some(target) = &case.target {
        cmd.arg(format!("--target={target}"));
    }
    for (id, value) in &case.secrets {
        let path = secret_dir.join(id);
        std::fs::write(&path, value).unwrap();
        cmd.arg(format!("--secret=id={id},src={}", path.display()));
    }
    cmd
}

/// Paths and config fields not compared for `case`.
fn deviations_for(case: &str) -> Vec<&'static str> {
    DEVIATIONS
        .iter()
        .filter(|(c, _, _)| *c == "*" || *c == case)
        .map(|(_, what, _)| *what)
        .collect()
}

fn scan(flat: &Flattened, excluded: &[&str]) -> Tree {
    Tree::scan(&flat.rootfs, excluded)
        .unwrap_or_else(|e| panic!("scan {}: {e}", flat.rootfs.display()))
}

const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
];

/// A config field as JSON text, with every spelling of "not set" (absent, null, "", [] or {})
/// mapped to `null`, since builders spell an unset field differently for the same image.
fn render(value: &impl std::fmt::Display) -> String {
    let text = value.to_string();
    match text.as_str() {
        "\"\"" | "[]" | "{}" => "null".to_owned(),
        _ => text,
    }
}

/// buildah stamps every image with an `io.buildah.version` label, which is not part of what the
/// Dockerfile asks for.
fn without_buildah_version(labels: &str) -> String {
    let Some(start) = labels.find("\"io.buildah.version\":\"") else {
        return labels.to_owned();
    };
    let value_start = start + "\"io.buildah.version\":\"".len();
    let end = value_start + labels[value_start..].find('"').map_or(0, |e| e + 1);
    let mut rest = format!("{}{}", &labels[..start], &labels[end..]);
    rest = rest
        .replace(",,", ",")
        .replace("{,", "{")
        .replace(",}", "}");
    render(&rest)
}

/// Builds `case` with buildah on its own thread (it is a separate process and can overlap with
/// Kiln's build of the same case).
fn spawn_buildah(
    buildah: &std::sync::Arc<Buildah>,
    case: &Case,
) -> Option<std::thread::JoinHandle<Result<(), String>>> {
    if case.buildah_skip.is_some() {
        return None;
    }
    let buildah = buildah.clone();
    let dir = case.dir.clone();
    let args = case.args.clone();
    let target = case.target.clone();
    let tag = format!("buildah/{}:1", case.name);
    Some(std::thread::spawn(move || {
        let args: Vec<(&str, &str)> = args.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        buildah.build_and_push(&dir, None, &args, target.as_deref(), &tag)
    }))
}

/// Runs `f`, turning a testkit panic (skopeo/umoci/runc failure) into an error message so one
/// broken case does not hide the others.
fn catching<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!("{what}: {message}")
    })
}

/// Compares Kiln's image with buildah's: trees (without deviating paths) and config fields.
fn compare(case: &Case, kiln: &Flattened, oracle: &Flattened) -> Vec<String> {
    let deviations = deviations_for(&case.name);
    let paths: Vec<&str> = deviations
        .iter()
        .copied()
        .filter(|d| !d.starts_with("config:"))
        .collect();
    let mut problems = Vec::new();
    let diff = scan(kiln, &paths).diff(&scan(oracle, &paths));
    if !diff.is_empty() {
        problems.push(format!(
            "rootfs differs (left: kiln, right: buildah):\n{diff}"
        ));
    }
    for field in CONFIG_FIELDS {
        if deviations.contains(&format!("config:{field}").as_str()) {
            continue;
        }
        let left = render(&kiln.config["config"][field]);
        let mut right = render(&oracle.config["config"][field]);
        if *field == "Labels" {
            right = without_buildah_version(&right);
        }
        if left != right {
            problems.push(format!("config {field}: kiln {left} vs buildah {right}"));
        }
    }
    problems
}

/// The `absent:` and `present:` paths the Kiln image gets wrong. Symlinks are not followed: the
/// path itself must (not) exist.
fn path_expectations(case: &Case, kiln: &Flattened) -> Vec<String> {
    let exists = |rel: &str| std::fs::symlink_metadata(kiln.rootfs.join(rel)).is_ok();
    let absent = (case.absent.iter())
        .filter(|rel| exists(rel))
        .map(|rel| format!("/{rel} is in the kiln image but must not be"));
    let present = (case.present.iter())
        .filter(|rel| !exists(rel))
        .map(|rel| format!("/{rel} is missing from the kiln image"));
    absent.chain(present).collect()
}

/// Looks for each secret value in every blob of the pushed image (layers decompressed, config
/// with its history as is).
fn secret_leaks(registry: &Registry, case: &Case, repo: &str) -> Vec<String> {
    let repo_tag = format!("{repo}/{}:1", case.name);
    let mut leaks = Vec::new();
    for (id, value) in &case.secrets {
        for blob in image::blobs_containing(registry, &repo_tag, value.as_bytes()) {
            leaks.push(format!("secret {id:?} appears in image blob {blob}"));
        }
    }
    leaks
}

fn check_case(registry: &Registry, buildah: &std::sync::Arc<Buildah>, case: &Case) -> Vec<String> {
    let started = std::time::Instant::now();
    let server = case
        .serve
        .as_deref()
        .map(kiln_testkit::http::StaticServer::start);
    let mut case = case.clone();
    if let Some(server) = &server {
        case.args.push(("SERVE_URL".to_owned(), server.url()));
    }
    let case = &case;
    let oracle_build = spawn_buildah(buildah, case);
    let mut problems = Vec::new();
    let mut kilns = Vec::new();
    for base_path in BASE_PATHS {
        let repo = base_path.1;
        let work = tempfile::tempdir().unwrap();
        let secret_dir = tempfile::tempdir().unwrap();
        let built = executor_command(registry, case, base_path, work.path(), secret_dir.path())
            .output()
            .map_err(|e| format!("cannot start executor: {e}"))
            .and_then(|out| {
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "executor exited with {}:\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            });
        match built {
            Ok(()) => match catching(&format!("pull/unpack {repo} image"), || {
                image::flatten(registry, &format!("{repo}/{}:1", case.name))
            }) {
                Ok(flat) => kilns.push((repo, flat)),
                Err(e) => problems.push(e),
            },
            Err(e) => problems.push(format!("kiln build ({repo}) failed: {e}")),
        }
    }
    let oracle_built = oracle_build.map(|h| h.join().expect("buildah thread"));
    let oracle = match oracle_built {
        None => None,
        Some(Ok(())) => match catching("pull/unpack buildah image", || {
            image::flatten(registry, &format!("buildah/{}:1", case.name))
        }) {
            Ok(flat) => Some(flat),
            Err(e) => {
                problems.push(e);
                None
            }
        },
        Some(Err(e)) => {
            problems.push(format!("buildah build failed: {e}"));
            None
        }
    };
    for (repo, kiln) in &kilns {
        let mut found = Vec::new();
        if let Some(oracle) = &oracle {
            found.extend(compare(case, kiln, oracle));
        }
        found.extend(path_expectations(case, kiln));
        found.extend(secret_leaks(registry, case, repo));
        match catching("run kiln image with runc", || image::run_with_runc(kiln)) {
            Ok(output) if output == case.run => {}
            Ok(output) => found.push(format!(
                "kiln image printed:\n{output}--- expected:\n{}---",
                case.run
            )),
            Err(e) => found.push(e),
        }
        problems.extend(found.into_iter().map(|p| format!("[{repo}] {p}")));
    }
    eprintln!(
        "case {}: {} in {:.1?}{}",
        case.name,
        if problems.is_empty() { "ok" } else { "FAILED" },
        started.elapsed(),
        case.buildah_skip
            .as_ref()
            .map(|r| format!(" (buildah skipped: {r})"))
            .unwrap_or_default()
    );
    problems
}

#[test]
fn cases_match_buildah_and_print_their_expected_output() {
    kiln_testkit::require_tools(&["buildah", "skopeo", "umoci", "runc", "gzip", "python3"]);
    let cases = load_cases();
    assert!(!cases.is_empty(), "no cases selected");
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    image::push_rootfs(&registry, bases::debian_rootfs(), "library/debian:bookworm");
    configured::push_configured_bases(&registry);
    let buildah = std::sync::Arc::new(Buildah::new(&registry));

    // Cases are taken in order by the workers; failures are reported in case order.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let problems = check_case(&registry, &buildah, case);
                results.lock().unwrap().push((i, problems));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let failures: Vec<String> = (results.into_iter())
        .filter(|(_, problems)| !problems.is_empty())
        .map(|(i, problems)| format!("=== case {} ===\n{}", cases[i].name, problems.join("\n")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn deviations_are_documented() {
    let doc = std::fs::read_to_string(cases_dir().join("DEVIATIONS.md"))
        .expect("testdata/cases/DEVIATIONS.md");
    for (case, what, _) in DEVIATIONS {
        let entry = format!("`{case}` `{what}`");
        assert!(doc.contains(&entry), "DEVIATIONS.md lacks {entry}");
    }
}
