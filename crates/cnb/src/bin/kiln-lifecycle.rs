//! `kiln-lifecycle`: the CNB detect and build phases, run inside the build image.
//!
//! ```text
//! kiln-lifecycle detect [-app DIR] [-buildpacks DIR] [-group FILE] [-layers DIR]
//!                       [-order FILE] [-plan FILE] [-platform DIR] [-analyzed FILE]
//! kiln-lifecycle build  [-app DIR] [-buildpacks DIR] [-group FILE] [-layers DIR]
//!                       [-plan FILE] [-platform DIR] [-analyzed FILE] [-process-type TYPE]
//! ```
//!
//! Flags take the Platform API's names and defaults, and each has its `CNB_*` variable
//! (`CNB_APP_DIR`, `CNB_BUILDPACKS_DIR`, `CNB_GROUP_PATH`, `CNB_LAYERS_DIR`, `CNB_ORDER_PATH`,
//! `CNB_PLAN_PATH`, `CNB_PLATFORM_DIR`, `CNB_ANALYZED_PATH`, `CNB_BUILD_CONFIG_DIR`,
//! `CNB_PROCESS_TYPE`); a flag wins over its variable.
//!
//! Exit status: 0 success; 3 bad arguments; detect: 20 no group passed, 21 no group passed and a
//! buildpack errored, 22 other detect errors; build: 51 a buildpack's `bin/build` failed, 50
//! other build errors.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kiln_cnb::build::{build, BuildConfig, OutputMode};
use kiln_cnb::detect::{detect, DetectConfig, DetectStatus};
use kiln_cnb::files::{read_toml, read_toml_if_exists, write_toml};
use kiln_cnb::metadata::{Analyzed, Target};
use kiln_cnb::{BuildpackStore, Error, Group, Order, Plan};

const USAGE: &str = "usage: kiln-lifecycle detect|build [-app DIR] [-buildpacks DIR] [-group FILE] [-layers DIR] [-order FILE] [-plan FILE] [-platform DIR] [-analyzed FILE] [-build-config DIR] [-process-type TYPE]";

/// The flags and their variables.
const FLAGS: &[(&str, &str)] = &[
    ("app", "CNB_APP_DIR"),
    ("buildpacks", "CNB_BUILDPACKS_DIR"),
    ("group", "CNB_GROUP_PATH"),
    ("layers", "CNB_LAYERS_DIR"),
    ("order", "CNB_ORDER_PATH"),
    ("plan", "CNB_PLAN_PATH"),
    ("platform", "CNB_PLATFORM_DIR"),
    ("analyzed", "CNB_ANALYZED_PATH"),
    ("build-config", "CNB_BUILD_CONFIG_DIR"),
    ("process-type", "CNB_PROCESS_TYPE"),
];

struct Args {
    values: Vec<(String, String)>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let mut values = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let name = arg
                .strip_prefix("--")
                .or_else(|| arg.strip_prefix('-'))
                .ok_or_else(|| format!("unexpected argument `{arg}`"))?;
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    i += 1;
                    let v = args
                        .get(i)
                        .ok_or_else(|| format!("flag -{name} needs a value"))?;
                    (name.to_owned(), v.clone())
                }
            };
            if !FLAGS.iter().any(|(f, _)| *f == name) {
                return Err(format!("unknown flag -{name}"));
            }
            values.push((name, value));
            i += 1;
        }
        Ok(Args { values })
    }

    fn get(&self, flag: &str) -> Option<String> {
        if let Some((_, v)) = self.values.iter().rev().find(|(n, _)| n == flag) {
            return Some(v.clone());
        }
        let var = FLAGS.iter().find(|(f, _)| *f == flag)?.1;
        std::env::var(var).ok().filter(|v| !v.is_empty())
    }

    fn path(&self, flag: &str, default: impl FnOnce() -> PathBuf) -> PathBuf {
        self.get(flag).map(PathBuf::from).unwrap_or_else(default)
    }
}

struct Common {
    app: PathBuf,
    layers: PathBuf,
    platform: PathBuf,
    store: BuildpackStore,
    group: PathBuf,
    plan: PathBuf,
    analyzed: Option<Analyzed>,
    build_config: Option<PathBuf>,
    target: Target,
}

fn common(args: &Args) -> Result<Common, Error> {
    let layers = args.path("layers", || PathBuf::from("/layers"));
    let analyzed_path = args.path("analyzed", || layers.join("analyzed.toml"));
    let analyzed: Option<Analyzed> = read_toml_if_exists(&analyzed_path)?;
    let target = analyzed
        .as_ref()
        .and_then(|a| a.run_image.as_ref())
        .and_then(|r| r.target.clone())
        .unwrap_or_else(|| Target::of_root(Path::new("/")));
    let build_config = args
        .get("build-config")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/cnb/build-config")))
        .filter(|d| d.is_dir());
    Ok(Common {
        app: args.path("app", || PathBuf::from("/workspace")),
        platform: args.path("platform", || PathBuf::from("/platform")),
        store: BuildpackStore::new(args.path("buildpacks", || PathBuf::from("/cnb/buildpacks"))),
        group: args.path("group", || layers.join("group.toml")),
        plan: args.path("plan", || layers.join("plan.toml")),
        layers,
        analyzed,
        build_config,
        target,
    })
}

fn run_detect(args: &Args) -> Result<(), Error> {
    let c = common(args)?;
    let order_path = args.get("order").map(PathBuf::from).unwrap_or_else(|| {
        let in_layers = c.layers.join("order.toml");
        if in_layers.is_file() {
            in_layers
        } else {
            PathBuf::from("/cnb/order.toml")
        }
    });
    let order: Order = read_toml(&order_path)?;
    let config = DetectConfig {
        app_dir: c.app,
        platform_dir: c.platform,
        build_config_dir: c.build_config,
        store: c.store,
        base_env: std::env::vars().collect(),
        target: Some(c.target),
        temp_dir: std::env::temp_dir(),
    };
    let result = detect(&config, &order);
    let runs = match &result {
        Ok(d) => &d.runs,
        Err(Error::Detection(f)) => &f.runs,
        Err(_) => return result.map(|_| ()),
    };
    for run in runs {
        if !run.output.is_empty() {
            println!("======== Output: {} ========", run.key);
            print!("{}", run.output);
            if !run.output.ends_with('\n') {
                println!();
            }
        }
    }
    println!("======== Results ========");
    for run in runs {
        let word = match &run.status {
            DetectStatus::Pass => "pass".to_owned(),
            DetectStatus::Fail => "fail".to_owned(),
            DetectStatus::Error(why) => format!("err ({why})"),
        };
        println!("{word}: {}", run.key);
    }
    let detected = result?;
    println!("======== Group ========");
    for bp in &detected.group.group {
        println!("{}", bp.key());
    }
    write_toml(&c.group, &detected.group)?;
    write_toml(&c.plan, &detected.plan)?;
    Ok(())
}

fn run_build(args: &Args) -> Result<(), Error> {
    let c = common(args)?;
    let group: Group = read_toml(&c.group)?;
    let plan: Plan = read_toml_if_exists(&c.plan)?.unwrap_or_default();
    let config = BuildConfig {
        app_dir: c.app,
        layers_dir: c.layers,
        platform_dir: c.platform,
        build_config_dir: c.build_config,
        store: c.store,
        base_env: std::env::vars().collect(),
        target: Some(c.target),
        temp_dir: std::env::temp_dir(),
        analyzed: c.analyzed,
        default_process: args.get("process-type"),
        output: OutputMode::Inherit,
    };
    let outcome = build(&config, &group, &plan)?;
    for w in &outcome.warnings {
        eprintln!("warning: {w}");
    }
    println!("======== Processes ========");
    for p in &outcome.export.processes {
        let default = if outcome.export.default_process.as_deref() == Some(p.kind.as_str()) {
            " (default)"
        } else {
            ""
        };
        println!(
            "{}{default}: {}",
            p.kind,
            [p.command.clone(), p.args.clone()].concat().join(" ")
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let Some(phase) = argv.get(1).cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(3);
    };
    let args = match Args::parse(&argv[2..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kiln-lifecycle: {e}\n{USAGE}");
            return ExitCode::from(3);
        }
    };
    let result = match phase.as_str() {
        "detect" => run_detect(&args),
        "build" => run_build(&args),
        other => {
            eprintln!("kiln-lifecycle: unknown phase `{other}`\n{USAGE}");
            return ExitCode::from(3);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR: {e}");
            let code = match (&e, phase.as_str()) {
                (Error::Detection(f), _) => {
                    let errored = f
                        .runs
                        .iter()
                        .any(|r| matches!(r.status, DetectStatus::Error(_)));
                    if errored {
                        21
                    } else {
                        20
                    }
                }
                (_, "detect") => 22,
                (Error::BuildFailed { .. }, _) => 51,
                _ => 50,
            };
            ExitCode::from(code)
        }
    }
}
