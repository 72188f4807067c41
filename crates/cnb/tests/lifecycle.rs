//! Runs the kiln-lifecycle binary on the host against the test buildpacks in
//! `testdata/buildpacks` and the app in `testdata/apps/cnb-basic`, with temp dirs standing in
//! for `/workspace`, `/layers` and `/platform`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_cnb::export::{ExportDescription, LayerSource, SbomKind};
use kiln_cnb::files::read_toml;
use kiln_cnb::metadata::BuildMetadata;
use kiln_cnb::{Group, Plan};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A build's directories.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    app: PathBuf,
    layers: PathBuf,
    platform: PathBuf,
    buildpacks: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let app = root.join("workspace");
        copy_dir(&testdata().join("apps/cnb-basic"), &app);
        let layers = root.join("layers");
        std::fs::create_dir_all(&layers).unwrap();
        let platform = root.join("platform");
        std::fs::create_dir_all(platform.join("env")).unwrap();
        std::fs::write(platform.join("env/USER_VAR"), "from-platform").unwrap();
        Fixture {
            _tmp: tmp,
            app,
            layers,
            platform,
            buildpacks: testdata().join("buildpacks"),
            root,
        }
    }

    fn lifecycle(&self, phase: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-lifecycle"));
        cmd.arg(phase)
            .arg("-app")
            .arg(&self.app)
            .arg("-layers")
            .arg(&self.layers)
            .arg("-platform")
            .arg(&self.platform)
            .arg("-buildpacks")
            .arg(&self.buildpacks)
            .args(extra)
            .env("HOST_SECRET", "must-not-leak")
            .env("TMPDIR", &self.root);
        for (k, _) in std::env::vars() {
            if k.starts_with("CNB_") {
                cmd.env_remove(k);
            }
        }
        cmd.output().unwrap()
    }

    fn detect(&self) -> Output {
        let order = self.buildpacks.join("order.toml");
        let out = self.lifecycle("detect", &["-order", order.to_str().unwrap()]);
        assert!(out.status.success(), "detect failed: {}", show(&out));
        out
    }

    fn bp_file(&self, id: &str, file: &str) -> String {
        std::fs::read_to_string(self.layers.join(id.replace('/', "_")).join(file))
            .unwrap_or_else(|e| panic!("{id}/{file}: {e}"))
    }
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn env_lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn detect_picks_the_first_passing_group_and_resolves_the_plan() {
    let f = Fixture::new();
    let out = f.detect();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "======== Group ========\nkiln-test/provider@1.0.0\nkiln-test/layers@1.0.0\nkiln-test/processes@1.0.0\nkiln-test/consumer@1.0.0\nkiln-test/execd@1.0.0\n"
        ),
        "{}",
        show(&out)
    );
    assert!(
        stdout.contains("optional-fail: nothing for me here"),
        "{stdout}"
    );
    assert!(stdout.contains("provider: found greeting.txt"), "{stdout}");
    assert!(
        stdout.contains("fail: kiln-test/optional-fail@1.0.0"),
        "{stdout}"
    );

    let group: Group = read_toml(&f.layers.join("group.toml")).unwrap();
    let ids: Vec<_> = group.group.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "kiln-test/provider",
            "kiln-test/layers",
            "kiln-test/processes",
            "kiln-test/consumer",
            "kiln-test/execd"
        ]
    );
    assert_eq!(group.group[0].api.as_deref(), Some("0.10"));
    assert_eq!(group.group[2].api.as_deref(), Some("0.11"));

    let plan: Plan = read_toml(&f.layers.join("plan.toml")).unwrap();
    assert_eq!(plan.entries.len(), 1);
    assert_eq!(plan.entries[0].providers[0].id, "kiln-test/provider");
    assert_eq!(plan.entries[0].requires[0].name, "greeting");
    assert_eq!(
        plan.entries[0].requires[0].metadata["loud"],
        toml::Value::Boolean(true)
    );
}

#[test]
fn build_runs_the_group_and_describes_the_export() {
    let f = Fixture::new();
    f.detect();
    let out = f.lifecycle("build", &[]);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("consumer: greetings: hello from cnb-basic"),
        "{stdout}"
    );
    assert!(
        stdout.contains("web (default): show web default-arg"),
        "{stdout}"
    );

    // The buildpack plan each buildpack was given.
    let provider_plan = f.bp_file("kiln-test/provider", "received-plan.txt");
    assert!(
        provider_plan.contains("name = \"greeting\""),
        "{provider_plan}"
    );
    assert!(provider_plan.contains("loud = true"), "{provider_plan}");
    // The consumer provides nothing: its plan has no entries.
    let consumer_plan = f.bp_file("kiln-test/consumer", "received-plan.txt");
    assert!(!consumer_plan.contains("greeting"), "{consumer_plan}");

    // The environment the consumer saw: earlier build layers, suffix rules, platform env.
    let env = f.bp_file("kiln-test/consumer", "build-env.txt");
    let lines = env_lines(&env);
    for want in [
        "BT_LIST=head,base,tail",
        "BT_DEFAULT=from-a",
        "BUILD_ONLY=build",
        "USER_VAR=from-platform",
        "CNB_TARGET_OS=linux",
    ] {
        assert!(lines.contains(&want), "missing {want} in\n{env}");
    }
    let layers = f.layers.display().to_string();
    let greeting_file = format!("GREETING_FILE={layers}/kiln-test_provider/greeting/greeting.txt");
    assert!(lines.contains(&greeting_file.as_str()), "{env}");
    let path = lines.iter().find(|l| l.starts_with("PATH=")).unwrap();
    assert!(
        path.contains(&format!("{layers}/kiln-test_layers/b-more/bin")),
        "{path}"
    );
    assert!(
        path.contains(&format!("{layers}/kiln-test_provider/greeting/bin")),
        "{path}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("CNB_BP_PLAN_PATH=")),
        "{env}"
    );
    assert!(
        lines.contains(&format!("CNB_LAYERS_DIR={layers}/kiln-test_consumer").as_str()),
        "{env}"
    );
    for absent in [
        "NOT_AT_BUILD=",
        "LAYERS_PLAIN=",
        "HOST_SECRET=",
        "LAUNCH_ONLY=",
    ] {
        assert!(
            !lines.iter().any(|l| l.starts_with(absent)),
            "{absent} leaked into\n{env}"
        );
    }
    // The first buildpack saw none of the layers.
    let first = f.bp_file("kiln-test/provider", "build-env.txt");
    assert!(!first.contains("BT_LIST="), "{first}");
    assert_eq!(
        f.bp_file("kiln-test/processes", "buildtool-output.txt"),
        "buildtool ran\n"
    );

    // metadata.toml for the launcher.
    let md = BuildMetadata::read(&f.layers).unwrap();
    assert_eq!(md.buildpack_default_process_type.as_deref(), Some("web"));
    let kinds: Vec<_> = md.processes.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(kinds, ["web", "worker"]);
    assert_eq!(md.processes[1].working_dir.as_deref(), Some("sub"));
    assert_eq!(md.processes[0].buildpack_id, "kiln-test/processes");
    assert_eq!(
        md.buildpack_api("kiln-test/processes"),
        Some(kiln_cnb::Api::new(0, 11))
    );

    // The export description.
    let desc = ExportDescription::read(&f.layers).unwrap();
    let launch: Vec<_> = desc
        .launch_layers
        .iter()
        .map(|l| format!("{}/{}", l.buildpack_id, l.name))
        .collect();
    assert_eq!(
        launch,
        [
            "kiln-test/provider/greeting",
            "kiln-test/layers/runtime",
            "kiln-test/processes/tools",
            "kiln-test/execd/execd"
        ]
    );
    assert!(desc
        .launch_layers
        .iter()
        .all(|l| l.source == LayerSource::Directory && !l.restored));
    assert!(desc.launch_layers[0].build);
    assert_eq!(desc.launch_layers[1].metadata["version"], "1.0");
    assert_eq!(
        desc.launch_layers[1].path,
        format!("{layers}/kiln-test_layers/runtime")
    );
    let caches: Vec<_> = desc.cache_layers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(caches, ["cached"]);
    assert_eq!(desc.app.path, f.app.display().to_string());
    assert_eq!(desc.app.slices[0].paths, ["static/*"]);
    assert_eq!(desc.default_process.as_deref(), Some("web"));
    assert_eq!(desc.processes[1].buildpack_api, "0.11");
    assert_eq!(desc.labels[0].key, "io.kiln.test.processes");
    let sbom = &desc.sbom[0];
    assert_eq!(
        (sbom.kind, sbom.layer.as_deref(), sbom.format.as_str()),
        (SbomKind::Launch, Some("runtime"), "cdx.json")
    );
    assert_eq!(
        sbom.path,
        format!("{layers}/sbom/launch/kiln-test_layers/runtime/sbom.cdx.json")
    );
    assert!(Path::new(&sbom.path).is_file());
    assert_eq!(
        desc.launch_sbom_dir.as_deref(),
        Some(format!("{layers}/sbom/launch").as_str())
    );
    let build_label: serde_json::Value = serde_json::from_str(&desc.build_metadata_label).unwrap();
    assert_eq!(
        build_label["processes"][0]["buildpackID"],
        "kiln-test/processes"
    );
    let bp_md = desc
        .lifecycle_metadata
        .buildpack("kiln-test/layers")
        .unwrap();
    assert!(bp_md.layers["runtime"].launch);
    assert_eq!(bp_md.store.as_ref().unwrap().metadata["runs"], "1");
    assert_eq!(
        desc.launch_metadata_path,
        format!("{layers}/config/metadata.toml")
    );
}

#[test]
fn a_rebuild_honours_restored_layer_metadata() {
    let first = Fixture::new();
    first.detect();
    assert!(first.lifecycle("build", &[]).status.success());

    // What analyze and restore leave: the group and plan, the launch layer's metadata from the
    // previous image (no directory), and the cache layer with its metadata from the cache.
    let f = Fixture::new();
    for file in ["group.toml", "plan.toml"] {
        std::fs::copy(first.layers.join(file), f.layers.join(file)).unwrap();
    }
    let bp = f.layers.join("kiln-test_layers");
    std::fs::create_dir_all(&bp).unwrap();
    let old = first.layers.join("kiln-test_layers");
    std::fs::copy(old.join("runtime.toml"), bp.join("runtime.toml")).unwrap();
    std::fs::copy(old.join("cached.toml"), bp.join("cached.toml")).unwrap();
    copy_dir(&old.join("cached"), &bp.join("cached"));
    std::fs::write(
        f.layers.join("analyzed.toml"),
        "[metadata]\n[[metadata.buildpacks]]\nkey = \"kiln-test/layers\"\nversion = \"1.0.0\"\n[metadata.buildpacks.layers.runtime]\nsha = \"sha256:previous\"\nlaunch = true\n[metadata.runImage]\ntopLayer = \"sha256:top\"\nreference = \"run@sha256:abc\"\n",
    )
    .unwrap();
    let out = f.lifecycle("build", &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        f.bp_file("kiln-test/layers", "runtime-decision.txt"),
        "reused\n"
    );
    assert_eq!(
        f.bp_file("kiln-test/layers", "cached-decision.txt"),
        "kept\n"
    );
    let desc = ExportDescription::read(&f.layers).unwrap();
    let runtime = desc
        .launch_layers
        .iter()
        .find(|l| l.name == "runtime")
        .unwrap();
    assert!(runtime.restored);
    assert_eq!(
        runtime.source,
        LayerSource::Reuse {
            digest: "sha256:previous".into()
        }
    );
    assert_eq!(
        desc.lifecycle_metadata
            .buildpack("kiln-test/layers")
            .unwrap()
            .layers["runtime"]
            .sha,
        "sha256:previous"
    );

    // Without a previous image to take the layer from, keeping only the metadata is an error.
    std::fs::remove_file(f.layers.join("analyzed.toml")).unwrap();
    std::fs::remove_dir_all(f.layers.join("kiln-test_layers/runtime")).ok();
    let out = f.lifecycle("build", &[]);
    assert_eq!(out.status.code(), Some(50), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("layer runtime") && stderr.contains("no such layer to reuse"),
        "{stderr}"
    );
}

#[test]
fn the_platform_chooses_the_default_process() {
    let f = Fixture::new();
    f.detect();
    let out = f.lifecycle("build", &["-process-type", "worker"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        ExportDescription::read(&f.layers)
            .unwrap()
            .default_process
            .as_deref(),
        Some("worker")
    );
    let out = f.lifecycle("build", &["-process-type", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("default process type nope is not defined"),
        "{}",
        show(&out)
    );
}

fn write_order(f: &Fixture, text: &str) -> String {
    let path = f.root.join("order.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn no_passing_group_lists_each_group_and_exit_status() {
    let f = Fixture::new();
    let order = write_order(
        &f,
        "[[order]]\n[[order.group]]\nid = \"kiln-test/consumer\"\n[[order]]\n[[order.group]]\nid = \"kiln-test/provider\"\n[[order.group]]\nid = \"kiln-test/detect-error\"\n",
    );
    let out = f.lifecycle("detect", &["-order", &order]);
    assert_eq!(out.status.code(), Some(21), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no buildpack group passed detection"),
        "{stderr}"
    );
    assert!(stderr.contains("group 1: kiln-test/consumer@1.0.0 requires greeting, which no earlier buildpack provides"), "{stderr}");
    assert!(
        stderr.contains("group 2: a required buildpack did not pass"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kiln-test/detect-error@1.0.0: error (exit status 3)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kiln-test/provider@1.0.0: pass"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("detect-error: cannot read the app"),
        "{stdout}"
    );
    assert!(!f.layers.join("group.toml").exists());

    // Only failures (no errors): exit status 20.
    let order = write_order(
        &f,
        "[[order]]\n[[order.group]]\nid = \"kiln-test/optional-fail\"\n",
    );
    let out = f.lifecycle("detect", &["-order", &order]);
    assert_eq!(out.status.code(), Some(20), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fail (exit status 100)"));
}

#[test]
fn a_failing_build_shows_its_output_and_fails() {
    let f = Fixture::new();
    let order = write_order(
        &f,
        "[[order]]\n[[order.group]]\nid = \"kiln-test/broken-build\"\n",
    );
    assert!(f.lifecycle("detect", &["-order", &order]).status.success());
    let out = f.lifecycle("build", &[]);
    assert_eq!(out.status.code(), Some(51), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("broken-build: compiling..."));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the compiler is on fire"), "{stderr}");
    assert!(
        stderr.contains(
            "buildpack kiln-test/broken-build@1.0.0: bin/build failed with exit status 7"
        ),
        "{stderr}"
    );
    assert!(!f.layers.join("kiln-export.json").exists());
}

/// A store with one buildpack whose files the test writes.
fn custom_buildpack(f: &Fixture, toml: &str, build: &str) -> PathBuf {
    let store = f.root.join("store");
    let dir = store.join("kiln-test_custom/1.0.0");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("buildpack.toml"), toml).unwrap();
    for (name, body) in [("detect", "#!/bin/sh\nexit 0\n"), ("build", build)] {
        let p = dir.join("bin").join(name);
        std::fs::write(&p, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    store
}

fn custom_detect(f: &Fixture, store: &Path) -> Output {
    let order = write_order(f, "[[order]]\n[[order.group]]\nid = \"kiln-test/custom\"\n");
    f.lifecycle(
        "detect",
        &["-order", &order, "-buildpacks", store.to_str().unwrap()],
    )
}

#[test]
fn malformed_buildpack_toml_names_file_and_key() {
    let f = Fixture::new();
    let store = custom_buildpack(
        &f,
        "api = \"0.10\"\n[buildpack]\nid = \"kiln-test/custom\"\nversion = \"1.0\"\n",
        "#!/bin/sh\n",
    );
    let out = custom_detect(&f, &store);
    assert_eq!(out.status.code(), Some(22), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kiln-test_custom/1.0.0/buildpack.toml"),
        "{stderr}"
    );
    assert!(stderr.contains("key `buildpack.version`"), "{stderr}");
}

#[test]
fn unsupported_buildpack_api_is_a_clear_error() {
    let f = Fixture::new();
    let store = custom_buildpack(
        &f,
        "api = \"0.4\"\n[buildpack]\nid = \"kiln-test/custom\"\nversion = \"1.0.0\"\n",
        "#!/bin/sh\n",
    );
    let out = custom_detect(&f, &store);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("buildpack kiln-test/custom declares Buildpack API 0.4, which Kiln does not support (it supports 0.7 to 0.12)"),
        "{stderr}"
    );
}

#[test]
fn malformed_launch_toml_names_file_and_key() {
    let f = Fixture::new();
    let store = custom_buildpack(
        &f,
        "api = \"0.10\"\n[buildpack]\nid = \"kiln-test/custom\"\nversion = \"1.0.0\"\n",
        "#!/bin/sh\nprintf '[[processes]]\\ntype = \"web\"\\ncommand = \"not-an-array\"\\n' > \"$1/launch.toml\"\n",
    );
    assert!(custom_detect(&f, &store).status.success());
    let out = f.lifecycle("build", &["-buildpacks", store.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(50), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kiln-test_custom/launch.toml"), "{stderr}");
    assert!(stderr.contains("key `processes[0].command`"), "{stderr}");
}
