//! The buildah oracle builds `FROM busybox` against a test registry and the result flattens.

use kiln_testkit::{bases, buildah::Buildah, image, Registry};

#[test]
fn buildah_builds_from_mapped_busybox() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM busybox\nRUN echo hi > /hello\nENV GREETING=hi\nCMD [\"cat\", \"/hello\"]\n",
    )
    .unwrap();
    let buildah = Buildah::new(&registry);
    buildah
        .build_and_push(context.path(), None, &[], None, "oracle/hello:1")
        .unwrap();
    let flat = image::flatten(&registry, "oracle/hello:1");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("hello")).unwrap(),
        "hi\n"
    );
    assert_eq!(flat.config["config"]["Cmd"][0], "cat");
    let env = flat.config["config"]["Env"].to_string();
    assert!(env.contains("GREETING=hi"), "{env}");
}
