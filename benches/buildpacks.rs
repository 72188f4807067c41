//! `kiln-bench-buildpacks`: the Express app of `testdata/apps/node-express` built from source
//! by Kiln's own buildpacks (no Dockerfile), against buildah (overlay driver, `--layers`)
//! building the hand-written `testdata/apps/node-express.Dockerfile`, on the same loopback
//! registry and the same stand-in Node.js images. Three builds per run and tool, alternating
//! tools run by run: cold (nothing cached), rebuild with no change, rebuild after editing one
//! source file. Kiln keeps its work directory and registry cache across the three, as buildah
//! keeps its store; every build pushes. After each one-file rebuild the Kiln image's
//! node_modules layer must have the digest it had: dependencies are not reinstalled.
//!
//! Run it with `./scripts/bench-buildpacks` (as root). Options: `--executor PATH`, `--work DIR`
//! (default `/var/tmp/kiln-bench-buildpacks`), `--runs N` (default 3), `--results FILE` (the
//! report replaces the buildpacks section of that Markdown file, or is appended to it).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_benches::{log_file, measure, median, Measured};
use kiln_testkit::langs::{self, LangImage};
use kiln_testkit::Registry;

/// The heading of the report's section in the results file.
const SECTION: &str = "# Buildpacks: the Express app (no Dockerfile) against buildah --layers on its hand-written Dockerfile";

/// The builds of one run, in order.
const BUILDS: [&str; 3] = ["cold", "no change", "one file"];

struct Options {
    executor: PathBuf,
    work: PathBuf,
    runs: usize,
    results: Option<PathBuf>,
}

fn parse_options() -> Options {
    let exe = std::env::current_exe().expect("current exe");
    let mut options = Options {
        executor: exe.with_file_name("executor"),
        work: PathBuf::from("/var/tmp/kiln-bench-buildpacks"),
        runs: 3,
        results: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--executor" => options.executor = value().into(),
            "--work" => options.work = value().into(),
            "--runs" => options.runs = value().parse().expect("--runs N"),
            "--results" => options.results = Some(value().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

/// One tool's three builds, as shell commands measured whole (build and push).
trait Tool {
    fn name(&self) -> &'static str;
    /// Forgets everything from an earlier run (work dirs, stores, destination).
    fn reset(&self, run: usize);
    fn build(&self, run: usize, step: usize) -> Command;
}

struct Kiln<'a> {
    executor: &'a Path,
    registry: &'a Registry,
    work: &'a Path,
    app: &'a Path,
}

impl Kiln<'_> {
    fn kiln_dir(&self) -> PathBuf {
        self.work.join("kiln-dir")
    }

    fn repository(&self, run: usize) -> String {
        format!("{}/bench/express-kiln-{run}", self.registry.addr())
    }
}

impl Tool for Kiln<'_> {
    fn name(&self) -> &'static str {
        "kiln"
    }

    fn reset(&self, _run: usize) {
        let _ = std::fs::remove_dir_all(self.kiln_dir());
    }

    fn build(&self, run: usize, step: usize) -> Command {
        let mut cmd = Command::new(self.executor);
        cmd.arg(format!("--context=dir://{}", self.app.display()))
            .arg(format!("--destination={}:latest", self.repository(run)))
            .arg(format!("--kiln-dir={}", self.kiln_dir().display()))
            .arg("--cache=true")
            .arg(format!(
                "--cache-repo={}/bench/express-kiln-cache-{run}",
                self.registry.addr()
            ))
            .args(langs::registry_flags(self.registry))
            .arg("--mode=chroot")
            .arg("--progress=plain")
            // Where the time went, phase by phase, beside the log.
            .arg(format!(
                "--benchmark-file={}",
                self.work
                    .join("logs")
                    .join(format!("kiln-{run}-{step}.json"))
                    .display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(log_file(self.work, &format!("kiln-{run}-{step}")))
            .env("DOCKER_CONFIG", "/nonexistent-kiln-bench")
            .env("KILN_LIFECYCLE_DIR", kiln_testkit::cnb::lifecycle_dir())
            .env("KILN_BUILDPACKS_DIR", kiln_testkit::cnb::buildpacks_dir());
        cmd
    }
}

struct Buildah<'a> {
    registry: &'a Registry,
    work: &'a Path,
    app: &'a Path,
    dockerfile: PathBuf,
    registries_conf: PathBuf,
}

impl Buildah<'_> {
    fn global(&self) -> String {
        let store = self.work.join("buildah");
        format!(
            "buildah --root {} --runroot {} --storage-driver overlay",
            store.join("root").display(),
            store.join("runroot").display()
        )
    }
}

impl Tool for Buildah<'_> {
    fn name(&self) -> &'static str {
        "buildah"
    }

    fn reset(&self, _run: usize) {
        let global = self.global();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{global} rm --all; {global} rmi --all --force; umount -R {0}/buildah/root/overlay; rm -rf {0}/buildah",
                self.work.display()
            ))
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .output();
    }

    fn build(&self, run: usize, step: usize) -> Command {
        let global = self.global();
        let local = format!("localhost/bench/express:{run}-{step}");
        let script = format!(
            "{global} bud --quiet --tls-verify=false --layers=true --format oci -f {dockerfile} -t {local} {context} >/dev/null && \
             {global} push --quiet --tls-verify=false {local} docker://{registry}/bench/express-buildah-{run}:latest",
            dockerfile = self.dockerfile.display(),
            context = self.app.display(),
            registry = self.registry.addr(),
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stderr(log_file(self.work, &format!("buildah-{run}-{step}")))
            .env("BUILDAH_ISOLATION", "chroot")
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf);
        cmd
    }
}

/// The digest of the node buildpack's modules layer in `image`, from its lifecycle label.
fn modules_layer(image: &str) -> String {
    let raw = kiln_testkit::run(
        Command::new("skopeo")
            .args(["inspect", "--config", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{image}")),
    );
    let config: serde_json::Value = serde_json::from_str(&raw).expect("config JSON");
    let label = config["config"]["Labels"]["io.buildpacks.lifecycle.metadata"]
        .as_str()
        .expect("lifecycle label");
    let metadata: serde_json::Value = serde_json::from_str(label).expect("label JSON");
    metadata["buildpacks"][0]["layers"]["modules"]["sha"]
        .as_str()
        .expect("modules layer")
        .to_owned()
}

/// Sets the one source file the one-file rebuild edits.
fn set_greeting(app: &Path, text: &str) {
    std::fs::write(
        app.join("greeting.js"),
        format!("exports.greeting = () => '{text}';\n"),
    )
    .expect("write greeting.js");
}

fn main() {
    let options = parse_options();
    kiln_testkit::require_tools(&["buildah", "docker-registry", "skopeo"]);
    assert!(
        options.executor.is_file(),
        "no executor at {}",
        options.executor.display()
    );
    let _ = std::fs::remove_dir_all(&options.work);
    std::fs::create_dir_all(&options.work).expect("work dir");
    let apps = kiln_testkit::cnb::workspace_root().join("testdata/apps");
    let app = options.work.join("node-express");
    kiln_testkit::run(
        Command::new("cp")
            .arg("-a")
            .arg(apps.join("node-express"))
            .arg(&app),
    );
    let registry = Registry::start();
    eprintln!(
        "registry on {}; pushing the Node.js images",
        registry.addr()
    );
    LangImage::NodeBuild.push(&registry);
    LangImage::NodeRun.push(&registry);
    let registries_conf = options.work.join("registries.conf");
    std::fs::write(
        &registries_conf,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"{0}\"\ninsecure = true\n\n[[registry]]\nlocation = \"{0}\"\ninsecure = true\n",
            registry.addr()
        ),
    )
    .expect("registries.conf");
    let kiln = Kiln {
        executor: &options.executor,
        registry: &registry,
        work: &options.work,
        app: &app,
    };
    let buildah = Buildah {
        registry: &registry,
        work: &options.work,
        app: &app,
        dockerfile: apps.join("node-express.Dockerfile"),
        registries_conf,
    };
    let tools: [&dyn Tool; 2] = [&kiln, &buildah];
    let mut results: BTreeMap<(&str, usize), Vec<Measured>> = BTreeMap::new();
    let mut kept = Vec::new();
    for run in 0..options.runs {
        // Alternate which tool goes first, so neither always meets a cold page cache.
        let order: Vec<&dyn Tool> = if run % 2 == 0 {
            tools.to_vec()
        } else {
            tools.iter().rev().copied().collect()
        };
        for tool in order {
            tool.reset(run);
            set_greeting(&app, "hello from express");
            for (step, label) in BUILDS.iter().enumerate() {
                if step == 2 {
                    set_greeting(&app, &format!("edited in run {run}"));
                }
                let m = measure(&mut tool.build(run, step));
                eprintln!(
                    "   {:<8} run {run} {label:<9}: {:.3} s",
                    tool.name(),
                    m.wall.as_secs_f64()
                );
                results.entry((tool.name(), step)).or_default().push(m);
                if tool.name() == "kiln" {
                    kept.push(modules_layer(&format!("{}:latest", kiln.repository(run))));
                }
            }
            tool.reset(run);
        }
    }
    set_greeting(&app, "hello from express");
    // Both rebuilds of a run kept the modules layer of that run's cold build.
    let unchanged = kept
        .chunks(BUILDS.len())
        .all(|run| run.iter().all(|d| *d == run[0]));
    let report = report(&options, &results, unchanged);
    print!("{report}");
    if let Some(path) = &options.results {
        kiln_benches::write_section(path, &report);
    }
}

fn report(
    options: &Options,
    results: &BTreeMap<(&str, usize), Vec<Measured>>,
    unchanged: bool,
) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut out = String::new();
    writeln!(
        out,
        "{SECTION}\n\n\
         {date}, medians of {} runs, `./scripts/bench-buildpacks` (testdata/apps/node-express; \
         Kiln keeps its work directory and `--cache` repository across the three builds of a \
         run, buildah its store; every build pushes). Target: Kiln's one-file rebuild at most \
         0.5x buildah's.\n\n| build | kiln wall (s) | kiln CPU (s) | buildah wall (s) | buildah CPU (s) | kiln/buildah wall |\n|---|---:|---:|---:|---:|---:|",
        options.runs
    )
    .unwrap();
    for (step, label) in BUILDS.iter().enumerate() {
        let get = |tool| median(results[&(tool, step)].clone());
        let (k, b) = (get("kiln"), get("buildah"));
        writeln!(
            out,
            "| {label} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2}x |",
            k.wall.as_secs_f64(),
            k.cpu.as_secs_f64(),
            b.wall.as_secs_f64(),
            b.cpu.as_secs_f64(),
            k.wall.as_secs_f64() / b.wall.as_secs_f64()
        )
        .unwrap();
    }
    writeln!(
        out,
        "\nKiln's node_modules layer after the no-change and one-file rebuilds: {}.",
        if unchanged {
            "the same digest as after the cold build in every run (nothing reinstalled)"
        } else {
            "a different digest (dependencies were reinstalled)"
        }
    )
    .unwrap();
    out
}
