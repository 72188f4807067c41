//! SIGTERM and SIGINT during a build, with the real `executor` binary against a real loopback
//! registry: during a RUN, during a base pull and during the layer push the executor exits
//! with 143 / 130 within seconds, tags nothing, writes no digest file, leaves no mount, no work
//! dir and no process of the step behind; a rerun succeeds and does not upload again what the
//! interrupted build had uploaded. After SIGKILL the next build unmounts and claims what the
//! killed one left.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{bases, image, Registry};

#[path = "support/throttle.rs"]
mod throttle;
use throttle::{Slow, Throttle};

/// How long an interrupted build may take to exit after the signal.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// One build's files: its context, kiln dir, digest file and captured output.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new(dockerfile: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("context")).unwrap();
        std::fs::write(dir.path().join("context/Dockerfile"), dockerfile).unwrap();
        Workspace { dir }
    }

    fn kiln_dir(&self) -> PathBuf {
        self.dir.path().join("kiln")
    }

    fn digest_file(&self) -> PathBuf {
        self.dir.path().join("digest")
    }

    fn stderr_path(&self, run: &str) -> PathBuf {
        self.dir.path().join(format!("{run}.stderr"))
    }

    fn stderr(&self, run: &str) -> String {
        std::fs::read_to_string(self.stderr_path(run)).unwrap_or_default()
    }

    /// Starts `executor` for `destination`, its stderr going to a file named after `run`.
    fn spawn(&self, run: &str, destination: &str, extra: &[&str]) -> Running {
        let stderr = std::fs::File::create(self.stderr_path(run)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_executor"))
            .arg(format!(
                "--context=dir://{}",
                self.dir.path().join("context").display()
            ))
            .arg(format!("--destination={destination}"))
            .arg(format!("--kiln-dir={}", self.kiln_dir().display()))
            .arg(format!("--digest-file={}", self.digest_file().display()))
            .args(["--mode=chroot", "--progress=plain", "--reproducible"])
            .args(extra)
            .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("run executor");
        Running(child)
    }

    fn run(&self, run: &str, destination: &str, extra: &[&str]) -> Output {
        let status = self.spawn(run, destination, extra).wait().unwrap();
        Output {
            status,
            stdout: Vec::new(),
            stderr: self.stderr(run).into_bytes(),
        }
    }
}

/// A running executor, killed if the test fails before it exits (else it would go on
/// sleeping in its RUN step).
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn send(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

/// Waits until `ready` holds, failing after `within` with `what` and the build's output.
fn wait_for(what: &str, within: Duration, ws: &Workspace, run: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}:\n{}",
            ws.stderr(run)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child` to exit, at most [`EXIT_WITHIN`]; returns its exit code and how long it
/// took. A build that does not exit in time is killed and the test fails.
fn exit_code_within(child: &mut Child, ws: &Workspace, run: &str) -> (i32, Duration) {
    let signalled = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let code = status.code().unwrap_or(-1);
            return (code, signalled.elapsed());
        }
        if signalled.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the build did not exit within {EXIT_WITHIN:?} of the signal:\n{}",
                ws.stderr(run)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The blobs whose uploads the registry completed (`PUT …/blobs/uploads/…?digest=…`) in
/// `requests`, for repository `repo`.
fn completed_uploads(requests: &[(String, String)], repo: &str) -> BTreeSet<String> {
    let prefix = format!("/v2/{repo}/blobs/uploads/");
    requests
        .iter()
        .filter(|(method, uri)| method == "PUT" && uri.starts_with(&prefix))
        .filter_map(|(_, uri)| {
            let digest = uri.split("digest=").nth(1)?.split('&').next()?;
            Some(digest.replace("%3A", ":").replace("%3a", ":"))
        })
        .collect()
}

fn manifest_puts(requests: &[(String, String)], repo: &str) -> usize {
    let prefix = format!("/v2/{repo}/manifests/");
    requests
        .iter()
        .filter(|(method, uri)| method == "PUT" && uri.starts_with(&prefix))
        .count()
}

/// Mount points at or under `dir` in this (the test's, the build's) mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| Path::new(point).starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// Entries of `dir` whose names start with one of `prefixes`.
fn entries_starting(dir: &Path, prefixes: &[&str]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
        .collect()
}

/// Processes whose command line holds `needle` (the step's unique `sleep` argument).
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// What an interrupted build must leave: nothing tagged, no digest file, no mount under the
/// kiln dir, no work dir, no temporary layer tree.
fn assert_left_nothing(ws: &Workspace, registry: &Registry, repo: &str, run: &str) {
    let err = ws.stderr(run);
    assert_eq!(
        manifest_puts(&registry.requests(), repo),
        0,
        "a manifest was pushed:\n{err}"
    );
    assert!(!ws.digest_file().exists(), "a digest file was written");
    let mounts = mounts_under(&ws.kiln_dir());
    assert!(mounts.is_empty(), "left mounted: {mounts:?}\n{err}");
    let work = entries_starting(&ws.kiln_dir().join("work"), &["build-", "removing-"]);
    assert!(work.is_empty(), "work dirs left: {work:?}\n{err}");
    let trees = entries_starting(&ws.kiln_dir().join("layers"), &[".unpacking-"]);
    assert!(trees.is_empty(), "half-unpacked trees left: {trees:?}");
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("error: ") && l.contains("cancelled")),
        "{err}"
    );
}

fn start_registry() -> Registry {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    registry
}

/// A RUN that sleeps until the signal, after a step whose layer is pushed ahead meanwhile:
/// the step's processes die, the exit code is 128 + the signal, and the rerun finds the
/// layers the interrupted build uploaded.
fn interrupt_during_run(signal: &str, code: i32, pause: &str) {
    let registry = start_registry();
    let addr = registry.addr();
    let repo = format!("out/run-{}", signal.to_lowercase());
    let ws = Workspace::new(&format!(
        "FROM {addr}/base/busybox:latest\nARG PAUSE=0\nRUN echo kept > /kept\n\
         RUN echo step-started && sleep $PAUSE\n"
    ));
    let destination = format!("{addr}/{repo}:1");
    let pause_arg = format!("--build-arg=PAUSE={pause}");
    let mut child = ws.spawn("first", &destination, &[&pause_arg]);
    wait_for(
        "the RUN step",
        Duration::from_secs(60),
        &ws,
        "first",
        || ws.stderr("first").contains("| step-started"),
    );
    // The first step's layer is uploaded while the RUN runs (the base's is mounted from its
    // repository on the same registry, not uploaded).
    wait_for(
        "the upload ahead",
        Duration::from_secs(30),
        &ws,
        "first",
        || !completed_uploads(&registry.requests(), &repo).is_empty(),
    );
    let uploaded = completed_uploads(&registry.requests(), &repo);
    assert!(
        !processes_with(&format!("sleep {pause}")).is_empty(),
        "the step runs"
    );
    send(&child, signal);
    let (exit, took) = exit_code_within(&mut child, &ws, "first");
    eprintln!("{signal} during a RUN: exit {exit} after {took:?}");
    assert_eq!(exit, code, "{}", ws.stderr("first"));
    assert_left_nothing(&ws, &registry, &repo, "first");
    let survivors = processes_with(&format!("sleep {pause}"));
    assert!(
        survivors.is_empty(),
        "processes of the step survived: {survivors:?}"
    );

    let before = registry.requests().len();
    let rerun = ws.run("rerun", &destination, &["--build-arg=PAUSE=0"]);
    assert_eq!(rerun.status.code(), Some(0), "{}", ws.stderr("rerun"));
    assert!(ws.digest_file().exists());
    let requests = registry.requests()[before..].to_vec();
    assert_eq!(manifest_puts(&requests, &repo), 1);
    let again = completed_uploads(&requests, &repo);
    assert!(
        uploaded.is_disjoint(&again),
        "the rerun uploaded again {:?} (first run uploaded {uploaded:?})",
        uploaded.intersection(&again).collect::<Vec<_>>()
    );
}

#[test]
fn sigterm_during_a_run_exits_143_and_leaves_nothing() {
    interrupt_during_run("TERM", 143, "3141");
}

#[test]
fn sigint_during_a_run_exits_130_and_leaves_nothing() {
    interrupt_during_run("INT", 130, "2718");
}

/// The base image's layer comes through a proxy at 32 KiB/s: the signal lands while the
/// layer downloads and unpacks, and the build stops without waiting for the rest.
#[test]
fn sigint_during_a_base_pull_exits_130_and_leaves_nothing() {
    let registry = start_registry();
    let proxy = Throttle::start(&registry.addr(), Slow::Down, 32 << 10);
    let repo = "out/pull";
    let ws = Workspace::new(&format!(
        "FROM {}/base/busybox:latest\nRUN echo built > /built\n",
        proxy.addr()
    ));
    let destination = format!("{}/{repo}:1", registry.addr());
    let insecure = format!("--insecure-registry={}", proxy.addr());
    let mut child = ws.spawn("first", &destination, &[&insecure]);
    wait_for(
        "the base pull",
        Duration::from_secs(60),
        &ws,
        "first",
        || proxy.forwarded() > 96 << 10,
    );
    send(&child, "INT");
    let (exit, took) = exit_code_within(&mut child, &ws, "first");
    eprintln!("SIGINT during a base pull: exit {exit} after {took:?}");
    assert_eq!(exit, 130, "{}", ws.stderr("first"));
    assert_left_nothing(&ws, &registry, repo, "first");
    assert!(
        !ws.stderr("first").contains("| built"),
        "the build went on past the pull"
    );

    proxy.full_speed();
    let rerun = ws.run("rerun", &destination, &[&insecure]);
    assert_eq!(rerun.status.code(), Some(0), "{}", ws.stderr("rerun"));
    assert!(ws.digest_file().exists());
}

/// The destination is behind a proxy that takes uploads at 192 KiB/s and the last step writes
/// 3 MB that do not compress: the signal lands while layers upload. The rerun (at full speed)
/// does not upload again the blobs the registry had completed.
#[test]
fn sigterm_during_the_layer_push_exits_143_and_the_rerun_reuses_uploads() {
    let registry = start_registry();
    let proxy = Throttle::start(&registry.addr(), Slow::Up, 192 << 10);
    let repo = "out/push";
    let ws = Workspace::new(&format!(
        "FROM {}/base/busybox:latest\nRUN echo small > /small\n\
         RUN head -c 3000000 /dev/urandom > /big\n",
        registry.addr()
    ));
    let destination = format!("{}/{repo}:1", proxy.addr());
    let insecure = format!("--insecure-registry={}", proxy.addr());
    let mut child = ws.spawn("first", &destination, &[&insecure]);
    wait_for(
        "the layer uploads",
        Duration::from_secs(60),
        &ws,
        "first",
        || proxy.forwarded() > 1_500_000,
    );
    let uploaded = completed_uploads(&registry.requests(), repo);
    send(&child, "TERM");
    let (exit, took) = exit_code_within(&mut child, &ws, "first");
    eprintln!("SIGTERM during the layer push: exit {exit} after {took:?}");
    assert_eq!(exit, 143, "{}", ws.stderr("first"));
    assert_left_nothing(&ws, &registry, repo, "first");
    assert!(
        !uploaded.is_empty(),
        "no upload had completed before the signal:\n{}",
        ws.stderr("first")
    );

    proxy.full_speed();
    let before = registry.requests().len();
    let rerun = ws.run("rerun", &destination, &[&insecure]);
    assert_eq!(rerun.status.code(), Some(0), "{}", ws.stderr("rerun"));
    let requests = registry.requests()[before..].to_vec();
    assert_eq!(manifest_puts(&requests, repo), 1);
    let again = completed_uploads(&requests, repo);
    assert!(
        uploaded.is_disjoint(&again),
        "the rerun uploaded again {:?}",
        uploaded.intersection(&again).collect::<Vec<_>>()
    );
    // The big layer, cut short the first time, is uploaded whole now.
    assert!(!again.is_empty(), "{}", ws.stderr("rerun"));
}

/// SIGKILL gives the build no chance to clean up: its stage stays mounted in its work dir. The
/// next build with the same kiln dir unmounts it and claims the dir.
#[test]
fn the_next_build_unmounts_and_claims_what_a_killed_build_left() {
    let registry = start_registry();
    let addr = registry.addr();
    let ws = Workspace::new(&format!(
        "FROM {addr}/base/busybox:latest\nARG PAUSE=0\nRUN echo step-started && sleep $PAUSE\n"
    ));
    let destination = format!("{addr}/out/killed:1");
    let mut child = ws.spawn("first", &destination, &["--build-arg=PAUSE=1618"]);
    wait_for(
        "the RUN step",
        Duration::from_secs(60),
        &ws,
        "first",
        || ws.stderr("first").contains("| step-started"),
    );
    let killed = entries_starting(&ws.kiln_dir().join("work"), &["build-"]);
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert!(killed[0].starts_with(&format!("build-{}-", child.id())));
    send(&child, "KILL");
    child.wait().unwrap();
    // The step's init dies with its supervising thread.
    wait_for(
        "the step's end",
        Duration::from_secs(5),
        &ws,
        "first",
        || processes_with("sleep 1618").is_empty(),
    );
    let left = mounts_under(&ws.kiln_dir());
    assert!(!left.is_empty(), "the killed build left nothing mounted");

    let rerun = ws.run("rerun", &destination, &["--build-arg=PAUSE=0"]);
    assert_eq!(rerun.status.code(), Some(0), "{}", ws.stderr("rerun"));
    let mounts = mounts_under(&ws.kiln_dir());
    assert!(mounts.is_empty(), "still mounted: {mounts:?}");
    let work = entries_starting(&ws.kiln_dir().join("work"), &[&killed[0]]);
    assert!(
        work.is_empty(),
        "the killed build's work dir is still there: {work:?}"
    );
}
