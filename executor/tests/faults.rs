//! A flaky registry costs time, never a corrupt or half-pushed image, and nothing hangs: every
//! registry fault the fault proxy can give, in every phase of a build that talks to a registry,
//! once twice and once always. Each cell is a real executor build through its own
//! [`FaultProxy`] in front of the real `docker-registry`, and ends in one of two outcomes
//! (`expected_outcome`): built, with every blob present and verified (skopeo copies the image
//! out, checking each digest) and the layers of a fault-free build; or failed, within the
//! bound, with an error that names the registry, the request and the fault, and no tag pushed.
//!
//! `KILN_FAULTS_ONLY=<substring>` runs only the cells whose name contains it.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_testkit::faults::{Direction, Fault, FaultProxy, Rule};
use kiln_testkit::{image, Registry};

/// The waits every cell runs with: short, so that a fault that never mends fails fast.
const STALL: &str = "--registry-stall-timeout=2s";
const DEADLINE: &str = "--registry-request-deadline=20s";

/// How long a failing cell may take: four tries that each stall for 2 s, the back-off
/// between them (at most 3.5 s), and the build itself, with room for a loaded machine.
const FAILURE_BOUND: Duration = Duration::from_secs(45);

/// Cells run at once; each is one executor process and one proxy.
const PARALLEL: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    BasePull,
    LayerPush,
    ManifestPush,
    CacheLookup,
    CacheWrite,
}

const PHASES: [Phase; 5] = [
    Phase::BasePull,
    Phase::LayerPush,
    Phase::ManifestPush,
    Phase::CacheLookup,
    Phase::CacheWrite,
];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::BasePull => "base pull",
            Phase::LayerPush => "layer push",
            Phase::ManifestPush => "manifest push",
            Phase::CacheLookup => "cache lookup",
            Phase::CacheWrite => "cache write",
        }
    }

    /// The requests of this phase, in cell `n`'s repositories.
    fn requests(self, n: usize) -> (&'static str, String) {
        match self {
            Phase::BasePull => ("GET", "/v2/base/tiny/blobs/".to_owned()),
            Phase::LayerPush => ("PUT", format!("/v2/c{n}/app/blobs/uploads/")),
            Phase::ManifestPush => ("PUT", format!("/v2/c{n}/app/manifests/")),
            Phase::CacheLookup => ("GET", format!("/v2/c{n}/cache/manifests/")),
            Phase::CacheWrite => ("PUT", format!("/v2/c{n}/cache/")),
        }
    }

    /// Which way the phase's bodies flow, for the faults that change or slow a body.
    fn direction(self) -> Direction {
        match self {
            Phase::BasePull | Phase::CacheLookup => Direction::Answer,
            _ => Direction::Upload,
        }
    }

    /// The operation a failure of this phase is reported as.
    fn operation(self) -> &'static str {
        match self {
            Phase::BasePull => "blob pull",
            Phase::LayerPush => "push",
            Phase::ManifestPush => "manifest push",
            Phase::CacheLookup | Phase::CacheWrite => "cache",
        }
    }

    fn is_cache(self) -> bool {
        matches!(self, Phase::CacheLookup | Phase::CacheWrite)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Status(u16),
    TooManyRequestsRetryAfter,
    ResetBeforeHeaders,
    ResetMidBody,
    ShortBody,
    Trickle,
    StallAfterHeaders,
    NeverAnswers,
    CorruptBody,
    TokenExpires,
}

const KINDS: [Kind; 14] = [
    Kind::Status(500),
    Kind::Status(502),
    Kind::Status(503),
    Kind::Status(504),
    Kind::Status(429),
    Kind::TooManyRequestsRetryAfter,
    Kind::ResetBeforeHeaders,
    Kind::ResetMidBody,
    Kind::ShortBody,
    Kind::Trickle,
    Kind::StallAfterHeaders,
    Kind::NeverAnswers,
    Kind::CorruptBody,
    Kind::TokenExpires,
];

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Status(code) => code.to_string(),
            Kind::TooManyRequestsRetryAfter => "429 Retry-After 1".to_owned(),
            Kind::ResetBeforeHeaders => "reset before headers".to_owned(),
            Kind::ResetMidBody => "reset mid-body".to_owned(),
            Kind::ShortBody => "body cut short".to_owned(),
            Kind::Trickle => "trickle 1 KiB/s".to_owned(),
            Kind::StallAfterHeaders => "stall after headers".to_owned(),
            Kind::NeverAnswers => "never answers".to_owned(),
            Kind::CorruptBody => "corrupt body".to_owned(),
            Kind::TokenExpires => "token expires".to_owned(),
        }
    }

    fn fault(self, direction: Direction) -> Fault {
        match self {
            Kind::Status(code) => Fault::Status {
                code,
                retry_after: None,
            },
            Kind::TooManyRequestsRetryAfter => Fault::Status {
                code: 429,
                retry_after: Some(1),
            },
            Kind::ResetBeforeHeaders => Fault::ResetBeforeHeaders,
            Kind::ResetMidBody => Fault::ResetMidBody,
            Kind::ShortBody => Fault::ShortBody,
            Kind::Trickle => Fault::Trickle {
                bytes_per_second: 1024,
                direction,
            },
            Kind::StallAfterHeaders => Fault::StallAfterHeaders,
            Kind::NeverAnswers => Fault::NeverAnswer,
            Kind::CorruptBody => Fault::CorruptBody { direction },
            Kind::TokenExpires => Fault::ExpireToken,
        }
    }

    /// What a failure caused by this fault must say, any one of these.
    fn evidence(self) -> &'static [&'static str] {
        match self {
            Kind::Status(500) => &["500 Internal Server Error"],
            Kind::Status(502) => &["502 Bad Gateway"],
            Kind::Status(503) => &["503 Service Unavailable"],
            Kind::Status(504) => &["504 Gateway Timeout"],
            Kind::Status(_) | Kind::TooManyRequestsRetryAfter => &["429 Too Many Requests"],
            Kind::ResetBeforeHeaders | Kind::ResetMidBody | Kind::ShortBody => &[
                "reset",
                "closed",
                "end of file",
                "EOF",
                "incomplete",
                "connection",
                // distribution's answer to a body that did not arrive whole
                "499",
            ],
            Kind::Trickle => &["stall timeout", "deadline"],
            Kind::StallAfterHeaders | Kind::NeverAnswers => &["stall timeout"],
            Kind::CorruptBody => &["digest"],
            Kind::TokenExpires => &["401"],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dose {
    /// The first matching requests get the fault (two of them; one expiry for a token, since
    /// a token refused again right after it was issued is a broken token server).
    Twice,
    /// Every matching request gets the fault.
    Always,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Built,
    Failed,
}

/// The documented outcome of each cell.
fn expected_outcome(kind: Kind, phase: Phase, dose: Dose) -> Outcome {
    // The layer cache only costs time: a lookup that fails is a miss, a write that fails a
    // warning.
    if phase.is_cache() {
        return Outcome::Built;
    }
    match kind {
        // Kiln sees an upload's bytes handed to the kernel, not the bytes the registry read:
        // the last of them drain from the socket's buffers unseen, and while they do, the
        // stall timeout runs. The 7.5 KB layer at 1 KiB/s takes longer than the test's 2 s, so
        // it fails when every try trickles (with the default 60 s, an upload slower than about
        // 70 KB/s can be cut at its end this way; README, "A flaky registry").
        Kind::Trickle if phase == Phase::LayerPush => match dose {
            Dose::Twice => Outcome::Built,
            Dose::Always => Outcome::Failed,
        },
        // A trickle that keeps moving is never cut: the tiny base and the manifest arrive
        // within the deadline.
        Kind::Trickle => Outcome::Built,
        // A pulled blob that does not match its digest fails the build: it is streamed into
        // the unpack as it arrives, so trying again would mean starting both over.
        Kind::CorruptBody if phase == Phase::BasePull => Outcome::Failed,
        _ => match dose {
            Dose::Twice => Outcome::Built,
            Dose::Always => Outcome::Failed,
        },
    }
}

#[derive(Clone, Copy, Debug)]
struct Cell {
    n: usize,
    kind: Kind,
    phase: Phase,
    dose: Dose,
}

impl Cell {
    fn name(&self) -> String {
        format!(
            "{} / {} / {}",
            self.kind.name(),
            self.phase.name(),
            match self.dose {
                Dose::Twice => "twice",
                Dose::Always => "always",
            }
        )
    }

    fn rule(&self) -> Rule {
        let (method, path) = self.phase.requests(self.n);
        let rule = Rule::new(Some(method), &path, self.kind.fault(self.phase.direction()));
        match (self.dose, self.kind) {
            (Dose::Twice, Kind::TokenExpires) => rule.times(1),
            (Dose::Twice, _) => rule.times(2),
            (Dose::Always, _) => rule,
        }
    }
}

struct Run {
    output: Output,
    elapsed: Duration,
}

fn executor(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(args)
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .expect("run executor")
}

/// One build of the test context from `registry` (the proxy, or the registry itself), into
/// cell `n`'s repositories.
fn build(work: &Path, context: &Path, registry: &str, n: usize, extra: &[&str]) -> Run {
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {registry}/base/tiny:latest\nCOPY a.txt /srv/a.txt\nCOPY b.bin /srv/b.bin\n"),
    )
    .unwrap();
    let mut args = vec![
        format!("--context=dir://{}", context.display()),
        format!("--destination={registry}/c{n}/app:1"),
        format!("--kiln-dir={}", work.join("kiln").display()),
        format!("--digest-file={}", work.join("digest").display()),
        "--cache=true".to_owned(),
        "--cache-copy-layers=true".to_owned(),
        format!("--cache-repo={registry}/c{n}/cache"),
        "--mode=chroot".to_owned(),
        "--progress=plain".to_owned(),
        "--reproducible".to_owned(),
        STALL.to_owned(),
        DEADLINE.to_owned(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let started = Instant::now();
    let output = executor(&args);
    Run {
        output,
        elapsed: started.elapsed(),
    }
}

/// The test context: one small text file and 6 KiB that do not compress, so that a trickle
/// of the layer takes seconds, not milliseconds.
fn write_context(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    std::fs::write(dir.join("b.bin"), noise(6 * 1024, 7)).unwrap();
}

/// Bytes no compressor can shrink, the same on every run.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// The base every cell pulls: one layer of 8 KiB that does not compress.
fn push_tiny_base(registry: &Registry) {
    let rootfs = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(rootfs.path().join("etc")).unwrap();
    std::fs::write(rootfs.path().join("etc/hello"), "tiny base\n").unwrap();
    std::fs::write(rootfs.path().join("etc/noise"), noise(8 * 1024, 3)).unwrap();
    image::push_rootfs(registry, rootfs.path(), "base/tiny:latest");
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The layer digests of `repo_tag`, copied out with skopeo, which verifies every blob's digest
/// on the way; `None` if the tag is absent or any blob is missing or wrong.
fn verified_layers(registry: &str, repo_tag: &str) -> Option<Vec<String>> {
    let dir = tempfile::tempdir().unwrap();
    let copied = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{registry}/{repo_tag}"))
        .arg(format!("oci:{}:x", dir.path().display()))
        .output()
        .unwrap();
    if !copied.status.success() {
        return None;
    }
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:x", dir.path().display()))
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    Some(
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect(),
    )
}

fn tag_exists(registry: &str, repo_tag: &str) -> bool {
    Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{registry}/{repo_tag}"))
        .output()
        .unwrap()
        .status
        .success()
}

struct Verdict {
    cell: Cell,
    outcome: Outcome,
    retries: usize,
    elapsed: Duration,
    problems: Vec<String>,
    last_line: String,
}

fn run_cell(cell: Cell, registry: &Registry, reference: &[String]) -> Verdict {
    let rules = vec![cell.rule()];
    let proxy = if cell.kind == Kind::TokenExpires {
        FaultProxy::start_with_token_auth(&registry.addr(), rules)
    } else {
        FaultProxy::start(&registry.addr(), rules)
    };
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context);
    let run = build(work.path(), &context, &proxy.addr(), cell.n, &[]);
    let err = stderr(&run.output);
    let last_line = err.lines().last().unwrap_or("").to_owned();
    let retries = err.lines().filter(|l| l.contains("retrying: ")).count();
    let outcome = if run.output.status.success() {
        Outcome::Built
    } else {
        Outcome::Failed
    };
    let mut problems = Vec::new();
    if proxy.faults_given() == 0 {
        problems.push("the proxy never gave the fault".to_owned());
    }
    let expected = expected_outcome(cell.kind, cell.phase, cell.dose);
    if outcome != expected {
        problems.push(format!("expected {expected:?}, got {outcome:?}"));
    }
    let repo_tag = format!("c{}/app:1", cell.n);
    match outcome {
        Outcome::Built => match verified_layers(&registry.addr(), &repo_tag) {
            Some(layers) if layers == reference => {}
            Some(layers) => problems.push(format!("layers {layers:?} differ from {reference:?}")),
            None => problems.push("the pushed image does not copy out verified".to_owned()),
        },
        Outcome::Failed => {
            if run.elapsed > FAILURE_BOUND {
                problems.push(format!("failed after {:?}", run.elapsed));
            }
            if !last_line.starts_with("error: ") || !last_line.contains(&proxy.addr()) {
                problems.push("the error does not name the registry".to_owned());
            }
            if !last_line.contains(cell.phase.operation()) {
                problems.push(format!(
                    "the error does not name the {}",
                    cell.phase.operation()
                ));
            }
            if !cell.kind.evidence().iter().any(|e| last_line.contains(e)) {
                problems.push(format!(
                    "the error does not name the fault (one of {:?})",
                    cell.kind.evidence()
                ));
            }
            if tag_exists(&registry.addr(), &repo_tag) {
                problems.push("the tag was pushed".to_owned());
            }
            if work.path().join("digest").exists() {
                problems.push("a digest file was written".to_owned());
            }
        }
    }
    if !problems.is_empty() {
        problems.push(format!("stderr:\n{err}"));
    }
    Verdict {
        cell,
        outcome,
        retries,
        elapsed: run.elapsed,
        problems,
        last_line,
    }
}

/// A registry holding the tiny base, and a work dir with the test context in `context/`.
fn start() -> (Registry, tempfile::TempDir, std::path::PathBuf) {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci"]);
    let registry = Registry::start();
    push_tiny_base(&registry);
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context);
    (registry, work, context)
}

#[test]
fn every_fault_in_every_phase_ends_in_its_documented_outcome() {
    let (registry, work, context) = start();

    // The fault-free build the built cells must match.
    let clean = build(work.path(), &context, &registry.addr(), 0, &[]);
    assert!(clean.output.status.success(), "{}", stderr(&clean.output));
    let reference = verified_layers(&registry.addr(), "c0/app:1").expect("reference image");

    let only = std::env::var("KILN_FAULTS_ONLY").ok();
    let mut cells = Vec::new();
    for kind in KINDS {
        for phase in PHASES {
            for dose in [Dose::Twice, Dose::Always] {
                let cell = Cell {
                    n: cells.len() + 1,
                    kind,
                    phase,
                    dose,
                };
                if only
                    .as_ref()
                    .is_none_or(|o| cell.name().contains(o.as_str()))
                {
                    cells.push(cell);
                }
            }
        }
    }
    let queue = Mutex::new(cells.clone());
    let verdicts = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL {
            scope.spawn(|| loop {
                let Some(cell) = queue.lock().unwrap().pop() else {
                    break;
                };
                let verdict = run_cell(cell, &registry, &reference);
                verdicts.lock().unwrap().push(verdict);
            });
        }
    });
    let mut verdicts = verdicts.into_inner().unwrap();
    verdicts.sort_by_key(|v| v.cell.n);
    print_matrix(&verdicts);
    let failures: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.problems.is_empty())
        .map(|v| format!("{}: {}", v.cell.name(), v.problems.join("; ")))
        .collect();
    assert_eq!(verdicts.len(), cells.len());
    assert!(
        failures.is_empty(),
        "{} of {} cells:\n{}",
        failures.len(),
        cells.len(),
        failures.join("\n\n")
    );
}

/// The matrix as a Markdown table: for each fault and phase, "twice / always", ✓ built (retry
/// lines, wall time) or ✗ failed (wall time); then one failure message of each fault.
fn print_matrix(verdicts: &[Verdict]) {
    let mut table = String::from("| fault |");
    for phase in PHASES {
        table.push_str(&format!(" {} |", phase.name()));
    }
    table.push_str("\n|---|");
    table.push_str(&"---|".repeat(PHASES.len()));
    table.push('\n');
    let show = |v: Option<&Verdict>| match v {
        None => "-".to_owned(),
        Some(v) => match v.outcome {
            Outcome::Built => format!("✓ {}r {:.1}s", v.retries, v.elapsed.as_secs_f64()),
            Outcome::Failed => format!("✗ {:.1}s", v.elapsed.as_secs_f64()),
        },
    };
    for kind in KINDS {
        table.push_str(&format!("| {} |", kind.name()));
        for phase in PHASES {
            let find = |dose| {
                verdicts
                    .iter()
                    .find(|v| v.cell.kind == kind && v.cell.phase == phase && v.cell.dose == dose)
            };
            table.push_str(&format!(
                " {} / {} |",
                show(find(Dose::Twice)),
                show(find(Dose::Always))
            ));
        }
        table.push('\n');
    }
    println!("{table}");
    for kind in KINDS {
        if let Some(v) = verdicts
            .iter()
            .find(|v| v.cell.kind == kind && v.outcome == Outcome::Failed)
        {
            println!("{}: {}", v.cell.name(), v.last_line);
        }
    }
}

/// A destination that accepts every manifest upload and never answers costs the stall timeout
/// per try, not the old read timeout: exactly retries + 1 tries, and the whole build within
/// stall × tries, the back-off, the build's own time and a little slack.
#[test]
fn a_stalled_registry_fails_the_push_within_the_stall_timeout_per_try() {
    let (registry, work, context) = start();

    let healthy = FaultProxy::start(&registry.addr(), Vec::new());
    let baseline = build(work.path(), &context, &healthy.addr(), 1, &[]);
    assert!(
        baseline.output.status.success(),
        "{}",
        stderr(&baseline.output)
    );

    let stalled = FaultProxy::start(
        &registry.addr(),
        vec![Rule::new(
            Some("PUT"),
            "/v2/c2/app/manifests/",
            Fault::NeverAnswer,
        )],
    );
    let fresh = tempfile::tempdir().unwrap();
    let run = build(fresh.path(), &context, &stalled.addr(), 2, &[]);
    let err = stderr(&run.output);
    assert!(!run.output.status.success(), "{err}");
    let tries = stalled
        .seen()
        .iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/v2/c2/app/manifests/"))
        .count();
    assert_eq!(tries, 4, "retries + 1 tries:\n{err}");
    let stall = Duration::from_secs(2);
    let backoff_ceiling = Duration::from_millis(500 + 1000 + 2000);
    let bound = stall * 4 + backoff_ceiling + baseline.elapsed + Duration::from_secs(2);
    println!(
        "stalled push failed after {:.1}s (bound {:.1}s, the build alone {:.1}s)",
        run.elapsed.as_secs_f64(),
        bound.as_secs_f64(),
        baseline.elapsed.as_secs_f64()
    );
    assert!(
        run.elapsed <= bound,
        "{:?} > {bound:?}:\n{err}",
        run.elapsed
    );
    assert!(run.elapsed >= stall * 4, "{:?}", run.elapsed);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("stall timeout") && last.contains("manifest push"),
        "{last}"
    );
    assert!(!tag_exists(&registry.addr(), "c2/app:1"));
}
