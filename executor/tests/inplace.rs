//! In-place mode end to end, as in a Pod: `executor` runs INSIDE a runc container whose rootfs
//! is a copy of the busybox base plus the executor under `/kaniko`, builds testdata/quickstart
//! (two stages, RUN, COPY --from) in the container's own `/`, and pushes to a loopback registry
//! (the container shares the host's network namespace). The image is pulled back and run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{bases, image, require_tools, run, Registry};

mod support;
use support::pod::{container_rootfs, install_executor, runc_run, write_bundle_config, Bind};

/// A runc bundle for the container: the context at `/workspace/context` and a "volume" at
/// `/cache-volume`, `args` as the process.
fn write_config(bundle: &Path, args: &[String], context: &Path, volume: &Path) {
    write_config_with_caps(bundle, args, context, volume, &[]);
}

/// [`write_config`] with `extra_caps` added to Docker's (a Pod whose securityContext adds them).
fn write_config_with_caps(
    bundle: &Path,
    args: &[String],
    context: &Path,
    volume: &Path,
    extra_caps: &[&str],
) {
    let binds = [
        Bind(context, "/workspace/context", "ro"),
        Bind(volume, "/cache-volume", "rw"),
    ];
    write_bundle_config(bundle, args, &binds, extra_caps);
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The host's mounts (point and root) where the container's work could leak: under the test's
/// directory, the host's own system directories, and the places the container sees mounted.
/// Other tests and builds on the machine mount and unmount elsewhere meanwhile.
fn host_mount_points(work: &Path) -> BTreeSet<String> {
    let watched = |point: &str| {
        Path::new(point).starts_with(work)
            || [
                "/",
                "/proc",
                "/sys",
                "/dev",
                "/kiln",
                "/kaniko",
                "/workspace",
                "/cache-volume",
            ]
            .iter()
            .any(|p| point == *p || (*p != "/" && Path::new(point).starts_with(p)))
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let point = *fields.get(4)?;
            let root = *fields.get(3)?;
            watched(point).then(|| format!("{point} {root}"))
        })
        .collect()
}

#[test]
fn executor_builds_in_place_inside_a_runc_container() {
    require_tools(&["runc", "docker-registry", "skopeo", "umoci", "ldd"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");

    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle");
    let rootfs = container_rootfs(&bundle);
    // Left by "the container image": an in-place build must delete it.
    std::fs::write(rootfs.join("etc/left-over"), "not part of any image").unwrap();
    let volume = work.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("kept"), "a volume is never deleted").unwrap();

    let quickstart = repo_root().join("testdata/quickstart");
    let mut args = install_executor(&rootfs);
    args.extend([
        "--context=dir:///workspace/context".to_owned(),
        format!("--destination={addr}/quickstart:in-place"),
        format!("--registry-map=index.docker.io={addr}"),
        "--kaniko-dir=/kaniko".to_owned(),
        "--digest-file=/kaniko/digest".to_owned(),
        "--mode=in-place".to_owned(),
        "--progress=plain".to_owned(),
    ]);
    write_config(&bundle, &args, &quickstart, &volume);

    let mounts_before = host_mount_points(work.path());
    let name = format!("kiln-inplace-{}", std::process::id());
    let out = runc_run(&bundle, &name);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "in-place build failed ({}):\n{log}",
        out.status
    );
    eprintln!("{log}");
    assert_eq!(
        mounts_before,
        host_mount_points(work.path()),
        "the host's mount namespace is untouched"
    );

    // The container's `/` is now the image's filesystem; Kiln's dir and the volume survived.
    assert!(
        !rootfs.join("etc/left-over").exists(),
        "/ was wiped:\n{log}"
    );
    assert!(rootfs.join("app/hello.sh").is_file());
    assert!(!rootfs.join("src").exists(), "stage 0's files are gone");
    assert!(rootfs.join("kiln/executor").is_file());
    assert!(rootfs.join("kaniko").is_symlink());
    assert_eq!(
        std::fs::read_to_string(volume.join("kept")).unwrap(),
        "a volume is never deleted"
    );
    let digest = std::fs::read_to_string(rootfs.join("kiln/digest")).unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");

    let flat = image::flatten(&registry, "quickstart:in-place");
    for absent in ["kaniko", "workspace", "cache-volume", "etc/left-over"] {
        assert!(
            !flat.rootfs.join(absent).exists(),
            "{absent} is not in the image"
        );
    }
    let greeting = std::fs::read_to_string(repo_root().join("testdata/quickstart/greeting.txt"))
        .unwrap()
        .to_uppercase();
    let output = image::run_with_runc(&flat);
    assert_eq!(
        output,
        format!("{greeting}built by root in /src\nand hello from kiln\n"),
        "build log:\n{log}"
    );

    // Again over the first build's leftovers, with --cleanup: the same image, and afterwards
    // only the ignored paths (and directories leading to them) remain.
    let mut cleanup_args = args.clone();
    cleanup_args.push("--cleanup".into());
    // The default Kiln dir, /kiln, this time.
    cleanup_args.retain(|a| !a.starts_with("--digest-file") && !a.starts_with("--kaniko-dir"));
    std::fs::remove_file(bundle.join("config.json")).unwrap();
    write_config(&bundle, &cleanup_args, &quickstart, &volume);
    let out = runc_run(&bundle, &name);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "--cleanup build failed:\n{log}");
    let mut left: Vec<String> = std::fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "cache-volume",
            "dev",
            "kaniko",
            "kiln",
            "proc",
            "sys",
            "workspace"
        ],
        "{log}"
    );
    assert!(volume.join("kept").is_file());
    assert_eq!(mounts_before, host_mount_points(work.path()));

    // FROM scratch, written as an OCI layout to the volume: the directories that survived the
    // wipe because they lead to mount points (/workspace, /cache-volume) are not in its layer.
    let scratch = work.path().join("scratch-context");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::write(
        scratch.join("Dockerfile"),
        "FROM scratch\nCOPY note /note\n",
    )
    .unwrap();
    std::fs::write(scratch.join("note"), "from scratch\n").unwrap();
    let mut scratch_args = install_executor_args(&args);
    scratch_args.extend([
        "--context=dir:///workspace/context".to_owned(),
        "--no-push".to_owned(),
        "--oci-layout-path=/cache-volume/layout".to_owned(),
        "--mode=in-place".to_owned(),
        "--progress=plain".to_owned(),
    ]);
    std::fs::remove_file(bundle.join("config.json")).unwrap();
    write_config(&bundle, &scratch_args, &scratch, &volume);
    let out = runc_run(&bundle, &name);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "FROM scratch build failed:\n{log}");
    let unpacked = work.path().join("scratch-bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", volume.join("layout").display()))
        .arg(&unpacked));
    let mut files: Vec<String> = std::fs::read_dir(unpacked.join("rootfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["note"], "{log}");
}

/// One in-place build in a fresh container (busybox rootfs, Kiln installed) whose context is
/// `context`, with `extra_caps` beyond Docker's; `args` follow the common ones. Panics if the
/// build fails; returns the container's rootfs and the build log.
fn build_in_pod(
    work: &Path,
    name: &str,
    context: &Path,
    volume: &Path,
    registry: &str,
    args: &[String],
    extra_caps: &[&str],
) -> (PathBuf, String) {
    let bundle = work.join(format!("bundle-{name}"));
    let rootfs = container_rootfs(&bundle);
    let mut argv = install_executor(&rootfs);
    argv.extend([
        "--context=dir:///workspace/context".to_owned(),
        format!("--registry-map=index.docker.io={registry}"),
        "--mode=in-place".to_owned(),
        "--progress=plain".to_owned(),
    ]);
    argv.extend_from_slice(args);
    write_config_with_caps(&bundle, &argv, context, volume, extra_caps);
    let out = runc_run(&bundle, &format!("kiln-{name}-{}", std::process::id()));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: build failed:\n{log}");
    (rootfs, log)
}

/// RUN --mount, heredocs and RUN --network=none in a Pod: a read-write bind mount gets a private
/// copy in a stage that has no `cp` (in-place, `PATH` is the stage's), mounted with
/// CAP_SYS_ADMIN and placed in `/` for the step without it; with it the step without network
/// sees only loopback; without it that step runs on the Pod's network with a warning, as kaniko
/// would run it.
#[test]
fn run_mounts_and_network_none_in_place() {
    require_tools(&["runc", "docker-registry", "skopeo", "umoci", "ldd"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("note"), "from the context\n").unwrap();
    let volume = work.path().join("volume");
    std::fs::create_dir(&volume).unwrap();

    for (case, caps) in [
        ("sys-admin", &["CAP_SYS_ADMIN"][..]),
        ("default-pod", &[][..]),
    ] {
        // Without CAP_SYS_ADMIN the bind mount and the heredoc script are files in `/` for
        // the step only (see the engine's ops::unmounted).
        let dockerfile = "FROM busybox\n\
             RUN rm /bin/cp\n\
             RUN --mount=type=bind,target=/ctx,rw echo scribbled >> /ctx/note && cat /ctx/note > /seen\n\
             RUN --network=none cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' > /interfaces\n\
             RUN <<EOF\necho heredoc ran > /heredoc\nEOF\n";
        std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
        let args = [
            "--no-push".to_owned(),
            format!("--oci-layout-path=/cache-volume/{case}"),
        ];
        let (_, log) = build_in_pod(work.path(), case, &context, &volume, &addr, &args, caps);
        let unpacked = work.path().join(format!("unpacked-{case}"));
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:latest", volume.join(case).display()))
            .arg(&unpacked));
        let interfaces = std::fs::read_to_string(unpacked.join("rootfs/interfaces")).unwrap();
        if caps.is_empty() {
            assert_ne!(interfaces, "lo\n", "{log}");
            assert!(
                log.contains("RUN --network=none needs CAP_SYS_ADMIN"),
                "{log}"
            );
        } else {
            assert_eq!(interfaces, "lo\n", "{log}");
            assert!(!log.contains("CAP_SYS_ADMIN"), "{log}");
        }
        assert_eq!(
            std::fs::read_to_string(unpacked.join("rootfs/seen")).unwrap(),
            "from the context\nscribbled\n"
        );
        assert_eq!(
            std::fs::read_to_string(unpacked.join("rootfs/heredoc")).unwrap(),
            "heredoc ran\n"
        );
        for absent in ["ctx", "run/kiln-heredoc"] {
            assert!(
                !unpacked.join("rootfs").join(absent).exists(),
                "{case}: /{absent}"
            );
        }
    }
    // The writes went to the step's copy, never to the context.
    assert_eq!(
        std::fs::read_to_string(context.join("note")).unwrap(),
        "from the context\n"
    );
}

/// A fully cached in-place build pulls and unpacks nothing, so `/` is left wiped; with
/// `--materialize` it holds the image's filesystem, as kaniko promises.
#[test]
fn materialize_leaves_a_fully_cached_build_in_place() {
    require_tools(&["runc", "docker-registry", "skopeo", "umoci", "ldd"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("note"), "copied\n").unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM busybox\nCOPY note /app/note\nRUN echo built > /app/built\n",
    )
    .unwrap();
    let volume = work.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let build = |run: &str, extra: &[&str]| {
        let mut args = vec![
            format!("--destination={addr}/app:{run}"),
            "--cache=true".to_owned(),
            format!("--cache-repo={addr}/app-cache"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let name = format!("materialize-{run}");
        build_in_pod(work.path(), &name, &context, &volume, &addr, &args, &[])
    };
    let (rootfs, log) = build("cold", &[]);
    assert!(rootfs.join("app/built").is_file(), "{log}");
    let (rootfs, log) = build("cached", &[]);
    assert!(log.contains("CACHED"), "{log}");
    assert!(!rootfs.join("app").exists(), "{log}");
    assert!(!rootfs.join("bin/sh").exists(), "{log}");
    let (rootfs, log) = build("materialized", &["--materialize"]);
    assert!(log.contains("CACHED"), "{log}");
    assert!(!log.contains("built\n#"), "nothing ran: {log}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/built")).unwrap(),
        "built\n",
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/note")).unwrap(),
        "copied\n"
    );
    assert!(rootfs.join("bin/sh").exists(), "{log}");
}

/// The leading part of `args` that starts the executor (the loader and its options, if any).
fn install_executor_args(args: &[String]) -> Vec<String> {
    let end = args
        .iter()
        .position(|a| a == "/kaniko/executor")
        .map_or(1, |i| i + 1);
    args[..end].to_vec()
}

/// In-place mode deletes `/`: outside a container it is refused unless forced.
#[test]
fn in_place_mode_is_refused_outside_a_container() {
    if kiln_sandbox::in_container() {
        // Running the refused command here would build in this container's `/`.
        eprintln!("skipped: these tests run inside a container");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_executor"))
        .arg(format!("--context={}", work.path().display()))
        .arg(format!("--kiln-dir={}", work.path().join("kiln").display()))
        .args(["--no-push", "--mode=in-place", "--progress=plain"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not look like a container"), "{err}");
    assert!(err.contains("--force"), "{err}");
}
