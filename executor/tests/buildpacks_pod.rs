//! A buildpacks build in place, as in a Pod: the executor in a runc container laid out as Kiln's
//! image (lifecycle binaries beside it), Docker's default capabilities and nothing more, the
//! app mounted read-only as the context.

mod support;

use kiln_testkit::image;
use support::cnb::{run_process, World, BUILDER};
use support::pod;

#[test]
fn a_buildpacks_app_builds_in_place_in_a_default_pod() {
    let world = World::new();
    let app = world.app("cnb-basic");
    let bundle = world.work.path().join("bundle");
    let rootfs = pod::container_rootfs(&bundle);
    let lifecycle = rootfs.join("kiln/lifecycle");
    std::fs::create_dir_all(&lifecycle).unwrap();
    for binary in ["kiln-lifecycle", "launcher"] {
        std::fs::copy(
            kiln_testkit::cnb::lifecycle_dir().join(binary),
            lifecycle.join(binary),
        )
        .unwrap();
    }
    let mut argv = pod::install_executor(&rootfs);
    argv.extend([
        "--context=dir:///workspace/context".to_owned(),
        "--mode=in-place".to_owned(),
        "--progress=plain".to_owned(),
        format!("--destination={}", world.image("apps/pod:1")),
        format!("--builder={}", world.image(BUILDER)),
    ]);
    pod::write_bundle_config(
        &bundle,
        &argv,
        &[pod::Bind(&app, "/workspace/context", "ro")],
        &[],
    );
    let config_path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push("KILN_LIFECYCLE_DIR=/kiln/lifecycle".into());
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let out = pod::runc_run(&bundle, &format!("kiln-cnb-pod-{}", std::process::id()));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("buildpack group: kiln-test/provider@1.0.0"),
        "{log}"
    );

    let flat = image::flatten(&world.registry, "apps/pod:1");
    let web = run_process(&flat, None);
    assert!(web.contains("argv: web default-arg"), "{web}");
    assert!(web.contains("EXECD_VAR=from-exec.d"), "{web}");
    assert!(flat.rootfs.join("workspace/greeting.txt").is_file());
}
