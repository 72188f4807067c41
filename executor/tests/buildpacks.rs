//! Buildpacks builds end to end through the executor: a builder image Kiln built from a
//! Dockerfile, the test buildpacks of `testdata/buildpacks` (a provider and a consumer linked by
//! the build plan, an optional buildpack that fails detection, a composite, a buildpack writing
//! launch, build and cache layers with every env suffix, one with two processes, one with
//! exec.d), images pulled back and run with runc, reuse, the cache, rebase and failures.

mod support;

use kiln_testkit::image;
use support::cnb::{executor, run_process, stderr, World, BUILDER, RUN_IMAGE};

fn builder_flag(world: &World) -> String {
    format!("--builder={}", world.image(BUILDER))
}

fn label<'a>(config: &'a serde_json::Value, key: &str) -> &'a str {
    config["config"]["Labels"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no label {key}: {config}"))
}

/// The app is built with the builder's order (group 1 fails, group 2 passes), and the image
/// runs each of its processes with the layers' environment, exec.d and working directories.
#[test]
fn a_builder_builds_an_app_that_runs_each_process() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let sbom_dir = world.work.path().join("sbom-out");
    let out = world.build(
        &app,
        "apps/basic:1",
        &[
            builder_flag(&world),
            format!("--sbom-output-dir={}", sbom_dir.display()),
        ],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("front end: buildpacks"), "{log}");
    assert!(
        log.contains("buildpack group: kiln-test/provider@1.0.0, kiln-test/layers@1.0.0, kiln-test/processes@1.0.0, kiln-test/consumer@1.0.0, kiln-test/execd@1.0.0"),
        "the group that passed is named: {log}"
    );
    assert!(
        log.contains("consumer: greetings: hello from cnb-basic"),
        "{log}"
    );

    let flat = image::flatten(&world.registry, "apps/basic:1");
    let config = &flat.config;
    assert_eq!(
        config["config"]["Entrypoint"][0], "/cnb/process/web",
        "{config}"
    );
    assert_eq!(config["config"]["User"], "1000:1000");
    assert_eq!(config["config"]["WorkingDir"], "/workspace");
    assert_eq!(label(config, "io.kiln.test.processes"), "two");
    let metadata: serde_json::Value =
        serde_json::from_str(label(config, "io.buildpacks.lifecycle.metadata")).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(
        metadata["runImage"]["topLayer"], diff_ids[0],
        "the run image is one layer: {metadata}"
    );
    for key in ["app", "config", "launcher"] {
        assert!(!metadata[key].is_null(), "{key} in {metadata}");
    }
    for bp in metadata["buildpacks"].as_array().unwrap() {
        for (name, layer) in bp["layers"].as_object().unwrap() {
            let sha = layer["sha"].as_str().unwrap_or_default();
            assert!(
                diff_ids.iter().any(|d| d == sha),
                "layer {name} of {} names a layer of the image: {metadata}",
                bp["key"]
            );
        }
    }
    let build: serde_json::Value =
        serde_json::from_str(label(config, "io.buildpacks.build.metadata")).unwrap();
    assert!(build["processes"].as_array().unwrap().len() == 2, "{build}");

    // Launch layers only: build and cache layers stay out of the image.
    let layers = flat.rootfs.join("layers");
    assert!(layers.join("kiln-test_layers/runtime/README").is_file());
    assert!(!layers.join("kiln-test_layers/a-base").exists());
    assert!(!layers.join("kiln-test_layers/cached").exists());
    assert!(flat.rootfs.join("workspace/greeting.txt").is_file());
    assert!(flat.rootfs.join("workspace/static/index.html").is_file());
    assert!(flat.rootfs.join("cnb/lifecycle/launcher").is_file());

    let sbom = sbom_dir.join("launch/kiln-test_layers/runtime/sbom.cdx.json");
    assert!(
        std::fs::read_to_string(&sbom).is_ok_and(|t| t.contains("CycloneDX")),
        "--sbom-output-dir has the layer's SBOM"
    );
    assert!(flat
        .rootfs
        .join("layers/sbom/launch/kiln-test_layers/runtime/sbom.cdx.json")
        .is_file());

    let web = run_process(&flat, None);
    assert!(web.contains("argv: web default-arg"), "{web}");
    assert!(web.contains("cwd: /workspace\n"), "{web}");
    for line in [
        "LAYERS_PLAIN=plain",
        "LAYERS_OVERRIDE=overridden",
        "LAYERS_LIST=head,tail",
        "LAUNCH_ONLY=launch",
        "WEB_ONLY=web",
        "EXECD_VAR=from-exec.d",
        "EXECD_WEB=only-for-web",
        "EXECD_SAW_PLAIN=plain",
    ] {
        assert!(web.contains(line), "{line} in {web}");
    }
    assert!(!web.contains("BUILD_ONLY"), "{web}");
    let worker = run_process(&flat, Some(&["/cnb/process/worker", "extra"]));
    assert!(worker.contains("argv: worker extra"), "{worker}");
    assert!(worker.contains("cwd: /workspace/sub"), "{worker}");
    assert!(worker.contains("WORKER_ONLY=worker"), "{worker}");
    assert!(!worker.contains("WEB_ONLY"), "{worker}");
}

/// A rebuild with nothing changed reuses every layer: the same image digest, no blob
/// uploaded, and the layers buildpack keeps its launch layer from its restored metadata.
#[test]
fn an_unchanged_rebuild_reuses_every_layer() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let digest_file = world.work.path().join("digest");
    let flags = [
        builder_flag(&world),
        format!("--digest-file={}", digest_file.display()),
    ];
    let first = world.build(&app, "apps/reuse:1", &flags);
    assert!(first.status.success(), "{}", stderr(&first));
    let first_digest = std::fs::read_to_string(&digest_file).unwrap();
    assert!(stderr(&first).contains("layers: writing runtime layer"));

    let before = world.registry.requests().len();
    let timings = world.work.path().join("timings.json");
    let mut second_flags = flags.to_vec();
    second_flags.push(format!("--benchmark-file={}", timings.display()));
    let second = world.build(&app, "apps/reuse:1", &second_flags);
    let log = stderr(&second);
    assert!(second.status.success(), "{log}");
    assert!(
        log.contains("layers: reusing runtime layer from the previous image"),
        "the buildpack saw its restored metadata: {log}"
    );
    // The kept layer is the previous image's blob, taken by its diff ID: no file of it is
    // copied (the step has no execute phase, only the lookup of the previous image).
    let timings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&timings).unwrap()).unwrap();
    let kept = timings["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["instruction"]
                .as_str()
                .unwrap_or_default()
                .ends_with(":runtime")
        })
        .unwrap_or_else(|| panic!("no step for the runtime layer: {timings:#}"));
    assert!(kept["phases"].get("execute").is_none(), "{kept:#}");
    assert!(kept["phases"].get("pull").is_some(), "{kept:#}");
    assert_eq!(std::fs::read_to_string(&digest_file).unwrap(), first_digest);
    let uploads: Vec<_> = world.registry.requests()[before..]
        .iter()
        .filter(|(method, uri)| {
            (method == "POST" || method == "PUT" || method == "PATCH") && uri.contains("/blobs/")
        })
        .cloned()
        .collect();
    assert!(
        uploads.is_empty(),
        "nothing but the manifest is uploaded: {uploads:?}"
    );
}

/// With `--cache`, the cache layers come back in the next build: a changed app file re-runs
/// the build, and the buildpack keeps its cached dependency layer.
#[test]
fn the_cache_keeps_a_dependency_layer_across_an_app_change() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let flags = [
        builder_flag(&world),
        "--cache".to_owned(),
        format!("--cache-repo={}", world.image("cache/basic")),
    ];
    let first = world.build(&app, "apps/cached:1", &flags);
    let log = stderr(&first);
    assert!(first.status.success(), "{log}");
    assert!(log.contains("layers: creating cache layer"), "{log}");

    std::fs::write(app.join("greeting.txt"), "hello again\n").unwrap();
    let second = world.build(&app, "apps/cached:2", &flags);
    let log = stderr(&second);
    assert!(second.status.success(), "{log}");
    assert!(
        log.contains("consumer: greetings: hello again"),
        "build ran: {log}"
    );
    assert!(
        log.contains("layers: keeping restored cache layer"),
        "{log}"
    );

    let flat = image::flatten(&world.registry, "apps/cached:2");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("workspace/greeting.txt")).unwrap(),
        "hello again\n"
    );
    // --clear-cache: the same build starts from nothing.
    let mut cleared = flags.to_vec();
    cleared.push("--clear-cache".into());
    let third = world.build(&app, "apps/cached:3", &cleared);
    let log = stderr(&third);
    assert!(third.status.success(), "{log}");
    assert!(log.contains("layers: creating cache layer"), "{log}");
}

/// Rebase onto an updated run image: the app layers keep their digests, the labels name the
/// new run image, and the result runs.
#[test]
fn rebase_swaps_the_run_image_under_the_app() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let out = world.build(&app, "apps/rebase:1", &[builder_flag(&world)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = image::flatten(&world.registry, "apps/rebase:1");

    // The run image's tag moves to A': A plus a layer, built by Kiln.
    let context = world.dir("run-a2");
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {}\nRUN echo patched > /etc/run-image-patch\n",
            world.image(RUN_IMAGE)
        ),
    )
    .unwrap();
    let out = executor(&[
        format!("--context={}", context.display()),
        format!("--destination={}", world.image(RUN_IMAGE)),
        format!("--kiln-dir={}", world.dir("kiln-a2").display()),
        "--mode=chroot".into(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = executor(&[
        "rebase".into(),
        format!("--image={}", world.image("apps/rebase:1")),
        format!("--run-image={}", world.image(RUN_IMAGE)),
        format!("--destination={}", world.image("apps/rebase:2")),
        format!("--kiln-dir={}", world.dir("kiln-rebase").display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = image::flatten(&world.registry, "apps/rebase:2");
    let ids = |flat: &image::Flattened| -> Vec<String> {
        flat.config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_owned())
            .collect()
    };
    let (old, new) = (ids(&before), ids(&after));
    assert_eq!(new.len(), old.len() + 1, "one more run image layer");
    assert_eq!(old[1..], new[2..], "the app layers are unchanged");
    let metadata: serde_json::Value =
        serde_json::from_str(label(&after.config, "io.buildpacks.lifecycle.metadata")).unwrap();
    assert_eq!(metadata["runImage"]["topLayer"], new[1].as_str());
    let a2_digest = kiln_testkit::run(
        std::process::Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .arg(format!("docker://{}", world.image(RUN_IMAGE))),
    );
    let reference = metadata["runImage"]["reference"].as_str().unwrap();
    assert!(
        reference.ends_with(&format!("@{}", a2_digest.trim())),
        "the label names A' by digest: {metadata}"
    );
    assert!(after.rootfs.join("etc/run-image-patch").is_file());
    let web = run_process(&after, None);
    assert!(web.contains("argv: web default-arg"), "{web}");
}

/// Detection that no group passes fails the build with each group's result and pushes
/// nothing.
#[test]
fn no_passing_group_fails_listing_the_groups() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let out = world.build(
        &app,
        "apps/nogroup:1",
        &[
            builder_flag(&world),
            "--buildpack=kiln-test/consumer@1.0.0".into(),
        ],
    );
    let log = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("kiln-test/consumer@1.0.0"), "{log}");
    assert!(log.lines().last().unwrap().starts_with("error: "), "{log}");
    assert!(!world.exists("apps/nogroup:1"), "nothing pushed");
}

/// A buildpack whose build fails: its output is shown, the build fails, nothing is pushed.
#[test]
fn a_failing_build_shows_its_output_and_pushes_nothing() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let broken = support::cnb::testdata().join("buildpacks/kiln-test_broken-build/1.0.0");
    let out = world.build(
        &app,
        "apps/broken:1",
        &[
            builder_flag(&world),
            format!("--buildpack={}", broken.display()),
        ],
    );
    let log = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("the compiler is on fire"), "{log}");
    assert!(!world.exists("apps/broken:1"), "nothing pushed");
}

/// Malformed descriptors and an unsupported Buildpack API: errors that name the file and the
/// key, before anything is pushed.
#[test]
fn malformed_files_are_named_with_their_key() {
    let world = World::new();
    let bad_dir = world.dir("bad-buildpack");
    std::fs::create_dir_all(bad_dir.join("bin")).unwrap();
    std::fs::write(
        bad_dir.join("buildpack.toml"),
        "api = \"0.10\"\n[buildpack]\nid = \"bad/one\"\nversion = 3\n",
    )
    .unwrap();
    let old_api = world.dir("old-api");
    std::fs::write(
        old_api.join("buildpack.toml"),
        "api = \"0.2\"\n[buildpack]\nid = \"old/api\"\nversion = \"1.0.0\"\n",
    )
    .unwrap();
    let bad_launch = world.dir("bad-launch");
    std::fs::create_dir_all(bad_launch.join("bin")).unwrap();
    std::fs::write(
        bad_launch.join("buildpack.toml"),
        "api = \"0.10\"\n[buildpack]\nid = \"bad/launch\"\nversion = \"1.0.0\"\n",
    )
    .unwrap();
    std::fs::write(bad_launch.join("bin/detect"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::write(
        bad_launch.join("bin/build"),
        "#!/bin/sh\nprintf '[[processes]]\\ntype = \"web\"\\ncommand = 7\\n' > \"$1/launch.toml\"\n",
    )
    .unwrap();
    for script in ["bin/detect", "bin/build"] {
        use std::os::unix::fs::PermissionsExt;
        let path = bad_launch.join(script);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let app = world.app("cnb-basic");
    let cases: [(&std::path::Path, &[&str]); 3] = [
        (&bad_dir, &["buildpack.toml", "version"]),
        (&old_api, &["buildpack.toml", "0.2"]),
        (&bad_launch, &["launch.toml", "command"]),
    ];
    for (n, (dir, needles)) in cases.iter().enumerate() {
        let destination = format!("apps/malformed:{n}");
        let out = world.build(
            &app,
            &destination,
            &[
                builder_flag(&world),
                format!("--buildpack={}", dir.display()),
            ],
        );
        let log = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{log}");
        for needle in needles.iter() {
            assert!(log.contains(needle), "{needle} in {log}");
        }
        assert!(!world.exists(&destination), "nothing pushed");
    }

    std::fs::write(
        app.join("project.toml"),
        "[_]\nschema-version = \"0.2\"\n[io.buildpacks]\nexclude = \"not-a-list\"\n",
    )
    .unwrap();
    let out = world.build(&app, "apps/malformed:project", &[builder_flag(&world)]);
    let log = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("project.toml"), "{log}");
    assert!(log.contains("exclude"), "{log}");
}

/// Without a builder: a plain busybox image as the build image (not made for CNB: the
/// buildpacks run as uid 1000 with a home of their own), buildpacks from a package image, an
/// archive and a directory, and a project descriptor's exclusions and metadata.
#[test]
fn buildpacks_from_images_archives_and_directories_run_in_a_plain_image() {
    let world = World::new();
    let testdata = support::cnb::testdata().join("buildpacks");
    // A buildpack package image made by Kiln: the provider in /cnb/buildpacks, labelled.
    let package = world.dir("package");
    kiln_testkit::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(testdata.join("kiln-test_provider"))
            .arg(package.join("provider")),
    );
    std::fs::write(
        package.join("Dockerfile"),
        "FROM scratch\n\
         COPY provider/ /cnb/buildpacks/kiln-test_provider/\n\
         LABEL io.buildpacks.buildpackage.metadata='{\"id\":\"kiln-test/provider\",\"version\":\"1.0.0\"}'\n",
    )
    .unwrap();
    let out = executor(&[
        format!("--context={}", package.display()),
        format!("--destination={}", world.image("bp/provider:1")),
        format!("--kiln-dir={}", world.dir("kiln-package").display()),
        "--mode=chroot".into(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The consumer as a .tgz.
    let archive = world.work.path().join("consumer.tgz");
    kiln_testkit::run(
        std::process::Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(testdata.join("kiln-test_consumer/1.0.0"))
            .arg("."),
    );
    let app = world.app("cnb-basic");
    std::fs::write(app.join("secret.txt"), "left out\n").unwrap();
    std::fs::write(
        app.join("project.toml"),
        "[_]\nschema-version = \"0.2\"\nid = \"kiln.test.app\"\nversion = \"2.1\"\n\
         [io.buildpacks]\nexclude = [\"secret.txt\"]\n",
    )
    .unwrap();
    let out = world.build(
        &app,
        "apps/plain:1",
        &[
            format!("--build-image={}", world.image(RUN_IMAGE)),
            format!("--buildpack=docker://{}", world.image("bp/provider:1")),
            format!("--buildpack={}", archive.display()),
            format!(
                "--buildpack={}",
                testdata.join("kiln-test_layers/1.0.0").display()
            ),
            format!(
                "--buildpack={}",
                testdata.join("kiln-test_processes/1.0.0").display()
            ),
            "--default-process=worker".into(),
        ],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("consumer: greetings: hello from cnb-basic"),
        "{log}"
    );
    assert!(
        log.contains("buildpack group: kiln-test/provider@1.0.0, kiln-test/consumer@1.0.0, kiln-test/layers@1.0.0, kiln-test/processes@1.0.0"),
        "{log}"
    );
    let flat = image::flatten(&world.registry, "apps/plain:1");
    assert_eq!(flat.config["config"]["User"], "1000:1000");
    assert_eq!(
        flat.config["config"]["Entrypoint"][0],
        "/cnb/process/worker"
    );
    assert!(
        !flat.rootfs.join("workspace/secret.txt").exists(),
        "excluded"
    );
    let project: serde_json::Value =
        serde_json::from_str(label(&flat.config, "io.buildpacks.project.metadata")).unwrap();
    assert_eq!(project["source"]["version"]["declared"], "2.1", "{project}");
    let worker = run_process(&flat, None);
    assert!(worker.contains("argv: worker"), "{worker}");
}

/// A project descriptor's group (a buildpack directory inside the context and an inline
/// script) and the platform environment from the descriptor, `--env-file` and `--env`, later
/// ones winning.
#[test]
fn a_project_descriptor_names_the_group_and_the_environment() {
    let world = World::new();
    let app = world.app("cnb-basic");
    kiln_testkit::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(support::cnb::testdata().join("buildpacks/kiln-test_provider/1.0.0"))
            .arg(app.join("provider-bp")),
    );
    kiln_testkit::run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(support::cnb::testdata().join("buildpacks/kiln-test_consumer/1.0.0"))
            .arg(app.join("consumer-bp")),
    );
    std::fs::write(
        app.join("project.toml"),
        r#"[_]
schema-version = "0.2"

[[io.buildpacks.group]]
uri = "provider-bp"

[[io.buildpacks.group]]
uri = "consumer-bp"

[[io.buildpacks.group]]
id = "kiln-test/inline"
[io.buildpacks.group.script]
api = "0.10"
shell = "/bin/sh"
inline = "echo \"inline: project=$FROM_PROJECT file=$FROM_FILE flag=$FROM_FLAG\""

[[io.buildpacks.build.env]]
name = "FROM_PROJECT"
value = "project"

[[io.buildpacks.build.env]]
name = "FROM_FILE"
value = "project"
"#,
    )
    .unwrap();
    let env_file = world.work.path().join("build.env");
    std::fs::write(
        &env_file,
        "# platform env\nFROM_FILE=file\nFROM_FLAG=file\n",
    )
    .unwrap();
    let out = world.build(
        &app,
        "apps/descriptor:1",
        &[
            format!("--build-image={}", world.image(RUN_IMAGE)),
            format!("--env-file={}", env_file.display()),
            "--env=FROM_FLAG=flag".into(),
        ],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("provider: building greeting layer"), "{log}");
    assert!(
        log.contains("inline: project=project file=file flag=flag"),
        "{log}"
    );
}
