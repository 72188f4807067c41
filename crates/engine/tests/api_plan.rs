//! A second front end can plug in: a plan written directly in Rust (no Dockerfile anywhere)
//! is built by the engine against a real registry, pulled back and run with runc. It uses
//! every operation, a stage built from another stage, a copy from that stage, and a stage
//! whose steps are written once its base is known (the way a front end reads the base's
//! environment).

use std::sync::Arc;

use kiln_engine::{BuildOptions, Builder};
use kiln_plan::{
    Base, BaseFacts, CommandLine, ConfigEdit, Copy, CopySource, FrontEnd, Lower, LowerError, Mkdir,
    Operation, Plan, Provenance, Run, RunProgram, Source, Stage, StageFiles, Step, Steps,
};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, Registry};

fn step(operation: Operation, text: &str) -> Step {
    Step::new(operation, Provenance::api(text))
}

fn run(script: &str) -> Operation {
    Operation::Run(Run {
        program: RunProgram::Shell(script.into()),
        mounts: Vec::new(),
        network: Default::default(),
        security: Default::default(),
        build_env: vec![("FLAVOUR".into(), "api".into())],
        unkeyed_env: Vec::new(),
    })
}

/// The final stage: written once its base (the first stage) is known, reading the base's
/// `GREETING` as a Dockerfile front end expands `$GREETING`.
struct Final;

impl Lower for Final {
    fn lower(&self, base: &BaseFacts, _: &dyn StageFiles) -> Result<Vec<Step>, LowerError> {
        let greeting = base
            .env
            .iter()
            .find(|(k, _)| k == "GREETING")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| LowerError("the base sets no GREETING".into()))?;
        let mut copy = Copy::new(vec![CopySource::Path("/made/by-run".into())], "/app/");
        copy.from = Some(Source::Stage(0));
        Ok(vec![
            step(Operation::Copy(copy), "copy from the first stage"),
            step(
                Operation::Config(ConfigEdit::Cmd(CommandLine::Shell(format!(
                    "echo {greeting}; cat /app/by-run /notes/note.txt; pwd"
                )))),
                "command",
            ),
        ])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_written_in_rust_builds_and_runs() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("note.txt"), "from the context\n").unwrap();

    let first = Stage {
        id: 0,
        name: Some("first".into()),
        base: Base::Image(format!("{}/library/busybox:latest", registry.addr())),
        origin: Provenance::api("busybox"),
        dependencies: Vec::new(),
        steps: Steps::Fixed(vec![
            step(
                Operation::Config(ConfigEdit::Env(vec![("GREETING".into(), "hello".into())])),
                "env",
            ),
            step(
                Operation::Mkdir(Mkdir {
                    path: "/made".into(),
                    set_working_dir: true,
                }),
                "workdir",
            ),
            step(run("echo \"run as $FLAVOUR in $(pwd)\" > by-run"), "run"),
            step(
                Operation::Copy(Copy::new(
                    vec![
                        CopySource::Path("note.txt".into()),
                        CopySource::Inline {
                            name: "inline.txt".into(),
                            content: "inline\n".into(),
                        },
                    ],
                    "/notes/",
                )),
                "copy from the context",
            ),
        ]),
        layer_epoch: None,
    };
    let last = Stage {
        id: 1,
        name: None,
        base: Base::Stage(0),
        origin: Provenance::api("from the first stage"),
        dependencies: vec![0],
        steps: Steps::Lowered(Arc::new(Final)),
        layer_epoch: None,
    };
    let plan = Plan::new(FrontEnd::Api, "api test", vec![first, last], 1).unwrap();

    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = work.path().join("kiln");
    options.registry.insecure_registries.push(registry.addr());
    options
        .output
        .destinations
        .push(format!("{}/api/plan:1", registry.addr()));
    Builder::new(options)
        .plan(plan)
        .build()
        .await
        .unwrap_or_else(|e| panic!("build failed: {e}"));

    let flat = image::flatten(&registry, "api/plan:1");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("notes/inline.txt")).unwrap(),
        "inline\n"
    );
    assert_eq!(flat.config["config"]["WorkingDir"], "/made");
    let history: Vec<String> = flat.config["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["created_by"].as_str().map(str::to_owned))
        .collect();
    assert!(
        history.contains(&"copy from the first stage".to_owned()),
        "{history:?}"
    );
    assert_eq!(
        image::run_with_runc(&flat),
        "hello\nrun as api in /made\nfrom the context\n/made\n"
    );
}
