//! Builds the cnb-basic app with the test buildpacks (through kiln-cnb), lays out what the
//! image holds (the launch layers, config/metadata.toml and the app), and runs the launcher
//! binary on the host for each process type.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_cnb::build::{build, BuildConfig, OutputMode};
use kiln_cnb::detect::{detect, DetectConfig};
use kiln_cnb::files::read_toml;
use kiln_cnb::{BuildpackStore, Order};

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

/// The image's files after a build: `/layers` (launch layers and config) and `/workspace`.
struct Image {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    layers: PathBuf,
    app: PathBuf,
}

fn built_image() -> Image {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let build_app = root.join("build/workspace");
    let build_layers = root.join("build/layers");
    copy_dir(&testdata().join("apps/cnb-basic"), &build_app);
    std::fs::create_dir_all(&build_layers).unwrap();
    std::fs::create_dir_all(root.join("platform")).unwrap();
    let store = BuildpackStore::new(testdata().join("buildpacks"));
    let order: Order = read_toml(&testdata().join("buildpacks/order.toml")).unwrap();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let detected = detect(
        &DetectConfig {
            app_dir: build_app.clone(),
            platform_dir: root.join("platform"),
            build_config_dir: None,
            store: store.clone(),
            base_env: env.clone(),
            target: None,
            temp_dir: root.clone(),
        },
        &order,
    )
    .unwrap();
    let outcome = build(
        &BuildConfig {
            app_dir: build_app.clone(),
            layers_dir: build_layers.clone(),
            platform_dir: root.join("platform"),
            build_config_dir: None,
            store,
            base_env: env,
            target: None,
            temp_dir: root.clone(),
            analyzed: None,
            default_process: None,
            output: OutputMode::Capture,
        },
        &detected.group,
        &detected.plan,
    )
    .unwrap();
    // What the export stage copies: only the launch layers, metadata.toml and the app. The
    // paths stay the same in the image, so layer paths inside env files keep working: the
    // image is laid out at the build's own paths after moving the build's layers away.
    let image_layers = root.join("image-layers");
    for layer in &outcome.export.launch_layers {
        let rel = Path::new(&layer.path).strip_prefix(&build_layers).unwrap();
        copy_dir(Path::new(&layer.path), &image_layers.join(rel));
    }
    std::fs::create_dir_all(image_layers.join("config")).unwrap();
    std::fs::copy(
        &outcome.export.launch_metadata_path,
        image_layers.join("config/metadata.toml"),
    )
    .unwrap();
    std::fs::rename(&build_layers, root.join("build/layers-of-build")).unwrap();
    std::fs::rename(&image_layers, &build_layers).unwrap();
    Image {
        _tmp: tmp,
        root,
        layers: build_layers,
        app: build_app,
    }
}

impl Image {
    /// Runs the launcher as `name` (`web` makes a `/cnb/process/web`-style link).
    fn launch(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let dir = self.root.join("cnb/process");
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_launcher"), &link).unwrap();
        }
        let mut cmd = Command::new(&link);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("CNB_LAYERS_DIR", &self.layers)
            .env("CNB_APP_DIR", &self.app);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "launcher failed: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn processes_get_their_environment_and_arguments() {
    let image = built_image();
    let app = image.app.display().to_string();

    let web = stdout(&image.launch(
        "web",
        &[],
        &[("LAYERS_LIST", "mid"), ("LAYERS_OVERRIDE", "before")],
    ));
    for want in [
        "argv: web default-arg",
        &format!("cwd: {app}"),
        "LAYERS_PLAIN=plain",
        "LAYERS_OVERRIDE=overridden",
        "LAYERS_DEFAULT=from-layer",
        "LAYERS_LIST=head,mid,tail",
        "LAUNCH_ONLY=launch",
        "WEB_ONLY=web",
        "EXECD_VAR=from-exec.d",
        "EXECD_SAW_PLAIN=plain",
        "EXECD_WEB=only-for-web",
    ] {
        assert!(has(&web, want), "web: missing {want} in\n{web}");
    }
    assert!(
        web.lines().any(|l| l.starts_with("GREETING_FILE=")),
        "{web}"
    );
    for absent in ["WORKER_ONLY=", "BUILD_ONLY=", "BT_LIST=", "NOT_AT_BUILD="] {
        assert!(
            !web.contains(absent),
            "web: {absent} should not be set:\n{web}"
        );
    }

    // A preset variable wins over a .default file.
    let preset = stdout(&image.launch("web", &[], &[("LAYERS_DEFAULT", "preset")]));
    assert!(has(&preset, "LAYERS_DEFAULT=preset"), "{preset}");

    // Buildpack API 0.11: the user's arguments replace the default ones.
    let args = stdout(&image.launch("web", &["one", "two"], &[]));
    assert!(has(&args, "argv: web one two"), "{args}");

    // The worker, by CNB_PROCESS_TYPE through the plain launcher: its own env and working dir.
    let worker = stdout(&image.launch("launcher", &[], &[("CNB_PROCESS_TYPE", "worker")]));
    assert!(has(&worker, "argv: worker"), "{worker}");
    assert!(has(&worker, &format!("cwd: {app}/sub")), "{worker}");
    assert!(has(&worker, "WORKER_ONLY=worker"), "{worker}");
    assert!(has(&worker, "EXECD_VAR=from-exec.d"), "{worker}");
    assert!(
        !worker.contains("WEB_ONLY=") && !worker.contains("EXECD_WEB="),
        "{worker}"
    );

    // Through its /cnb/process link too.
    let worker = stdout(&image.launch("worker", &["x"], &[]));
    assert!(has(&worker, "argv: worker x"), "{worker}");

    // The plain launcher with no arguments runs the default process.
    let default = stdout(&image.launch("launcher", &[], &[]));
    assert!(has(&default, "argv: web default-arg"), "{default}");

    // A user command: `--` runs it directly (found on the layers' PATH), otherwise through the
    // shell, which expands variables.
    let direct = stdout(&image.launch("launcher", &["--", "show", "custom"], &[]));
    assert!(has(&direct, "argv: custom"), "{direct}");
    let shell = stdout(&image.launch("launcher", &["echo", "$LAYERS_PLAIN-$LAUNCH_ONLY"], &[]));
    assert_eq!(shell.trim(), "plain-launch");
}

#[test]
fn unknown_process_types_are_refused() {
    let image = built_image();
    let out = image.launch("launcher", &[], &[("CNB_PROCESS_TYPE", "nope")]);
    assert_eq!(out.status.code(), Some(82));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("process type nope is not defined") && err.contains("web, worker"),
        "{err}"
    );
}

/// Buildpack API 0.8 processes: a command line run by the shell after profile.d scripts, and
/// user arguments appended.
#[test]
fn older_buildpack_api_shell_processes_source_profile_d() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = tmp.path().join("layers");
    let app = tmp.path().join("workspace");
    std::fs::create_dir_all(&app).unwrap();
    let layer = layers.join("old_bp/runtime");
    std::fs::create_dir_all(layer.join("profile.d/web")).unwrap();
    std::fs::write(
        layer.join("profile.d/set.sh"),
        "export FROM_PROFILE=sourced\n",
    )
    .unwrap();
    std::fs::write(
        layer.join("profile.d/web/only-web.sh"),
        "export WEB_PROFILE=yes\n",
    )
    .unwrap();
    std::fs::write(app.join(".profile"), "export APP_PROFILE=app\n").unwrap();
    std::fs::create_dir_all(layers.join("config")).unwrap();
    std::fs::write(
        layers.join("config/metadata.toml"),
        r#"
[[buildpacks]]
id = "old/bp"
version = "1.0.0"
api = "0.8"

[[processes]]
type = "web"
command = ["echo $FROM_PROFILE $WEB_PROFILE $APP_PROFILE"]
args = []
direct = false
buildpack-id = "old/bp"

[[processes]]
type = "args"
command = ["echo"]
args = ["$FROM_PROFILE", "fixed"]
direct = false
buildpack-id = "old/bp"
"#,
    )
    .unwrap();
    let run = |name: &str, args: &[&str]| {
        let dir = tmp.path().join("process");
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_launcher"), &link).unwrap();
        }
        Command::new(&link)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("CNB_LAYERS_DIR", &layers)
            .env("CNB_APP_DIR", &app)
            .output()
            .unwrap()
    };
    assert_eq!(stdout(&run("web", &[])).trim(), "sourced yes app");
    assert_eq!(stdout(&run("args", &["user"])).trim(), "sourced fixed user");
    // The metadata file's permissions don't matter; a missing one is a clear error.
    std::fs::set_permissions(
        layers.join("config/metadata.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::remove_file(layers.join("config/metadata.toml")).unwrap();
    let out = run("web", &[]);
    assert_eq!(out.status.code(), Some(82));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config/metadata.toml"));
}

/// metadata.toml is written by kiln-cnb with the `toml` crate and read by the launcher's own
/// reader: every string the writer can produce (quotes of both kinds, backslashes, line ends,
/// control characters, non-ASCII) must read back as it was.
#[test]
fn metadata_written_by_the_exporter_reads_back() {
    use kiln_cnb::layer::{Label, Slice};
    use kiln_cnb::metadata::{BuildMetadata, Process};
    use kiln_cnb::order::GroupBuildpack;
    use kiln_launcher::metadata::Metadata;

    let awkward = [
        "plain",
        "",
        "double \"quoted\"",
        "single 'quoted'",
        "both ' and \"",
        "back\\slash and C:\\path",
        "line one\nline two\n",
        "\"\"\"triple\"\"\" and '''triple'''",
        "tab\tand\u{1}control\u{7f}",
        "crlf\r\nend",
        "ünïcödé ✓ 😀",
        "ends with a quote\"",
        "ends with an apostrophe'",
    ];
    let md = BuildMetadata {
        buildpacks: vec![
            GroupBuildpack {
                id: "kiln/node".into(),
                version: "1.0.0".into(),
                api: Some("0.10".into()),
                homepage: Some("https://example.invalid".into()),
            },
            GroupBuildpack {
                id: "old/bp".into(),
                version: "2".into(),
                api: Some("0.8".into()),
                homepage: None,
            },
        ],
        labels: vec![Label {
            key: "org.example".into(),
            value: awkward.join("|"),
        }],
        processes: awkward
            .iter()
            .enumerate()
            .map(|(i, text)| Process {
                kind: format!("p{i}"),
                command: vec![text.to_string(), "fixed".into()],
                args: vec![text.to_string(); i % 3],
                direct: i % 2 == 0,
                buildpack_id: "kiln/node".into(),
                working_dir: (i % 2 == 1).then(|| text.to_string()),
            })
            .collect(),
        slices: vec![Slice {
            paths: vec!["static/**".into()],
        }],
        buildpack_default_process_type: Some("p0".into()),
    };
    let dir = tempfile::tempdir().unwrap();
    md.write(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("config/metadata.toml")).unwrap();
    let read = Metadata::read(dir.path()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(read.default_process_type.as_deref(), Some("p0"));
    assert_eq!(read.buildpacks.len(), 2);
    assert!(read.buildpack_api_at_least("kiln/node", 0, 10));
    assert!(!read.buildpack_api_at_least("old/bp", 0, 9));
    assert_eq!(read.processes.len(), md.processes.len());
    for (got, want) in read.processes.iter().zip(&md.processes) {
        assert_eq!(got.kind, want.kind, "{text}");
        assert_eq!(got.command, want.command, "{text}");
        assert_eq!(got.args, want.args, "{text}");
        assert_eq!(got.direct, want.direct, "{text}");
        assert_eq!(got.buildpack_id, want.buildpack_id, "{text}");
        assert_eq!(got.working_dir, want.working_dir, "{text}");
    }
}
