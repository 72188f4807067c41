//! `RUN --mount` and heredoc scripts in a default Pod: Kiln's image (as Kiln built it) runs in
//! podman with its default capabilities (no CAP_SYS_ADMIN) and seccomp profile, so it builds
//! in place and cannot mount anything. The conformance cases that use `RUN --mount` (secret,
//! cache, bind, tmpfs) or heredoc scripts, and an ssh case with an agent socket mounted into
//! the container, must build there, print what their `expect` says, and leave no secret value
//! in any layer or the config. Then: a killed step leaves none of its mounts behind and its
//! cache keeps what it wrote, and an image's own entry at a mount target comes back.

use std::path::{Path, PathBuf};

use kiln_testkit::kiln_image::{kiln_image, repo_root};
use kiln_testkit::{bases, image, Registry};

mod support;
use support::agent::Agent;
use support::podman::Podman;

const IMAGE: &str = "localhost/kiln/executor:latest";
const DEBUG_IMAGE: &str = "localhost/kiln/executor:debug";

/// A case: its directory and what its `expect` file asks for.
struct Case {
    name: String,
    dir: PathBuf,
    run: String,
    args: Vec<String>,
    secrets: Vec<(String, String)>,
    ssh_key: Option<String>,
    absent: Vec<String>,
    present: Vec<String>,
}

/// The conformance cases about mounts and heredocs, and the ones only a Pod test can run.
fn cases() -> Vec<Case> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (parent, all) in [("testdata/cases", false), ("testdata/pod-cases", true)] {
        for entry in std::fs::read_dir(repo_root().join(parent)).unwrap() {
            let dir = entry.unwrap().path();
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let wanted = all || name.starts_with("run-mount-") || name.starts_with("run-heredoc");
            if wanted && dir.join("Dockerfile").is_file() {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    dirs.into_iter().map(|dir| read_case(&dir)).collect()
}

fn read_case(dir: &Path) -> Case {
    let mut case = Case {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        dir: dir.to_path_buf(),
        run: String::new(),
        args: Vec::new(),
        secrets: Vec::new(),
        ssh_key: None,
        absent: Vec::new(),
        present: Vec::new(),
    };
    let expect = std::fs::read_to_string(dir.join("expect")).unwrap();
    for line in expect
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line.split_once(':').expect("key: value");
        let value = value.strip_prefix(' ').unwrap_or(value);
        match key {
            "run" => case.run.push_str(&format!("{value}\n")),
            "arg" => case.args.push(format!("--build-arg={value}")),
            "target" => case.args.push(format!("--target={value}")),
            "secret" => {
                let (id, secret) = value.split_once('=').expect("secret: ID=VALUE");
                case.secrets.push((id.to_owned(), secret.to_owned()));
            }
            "ssh" => case.ssh_key = Some(value.to_owned()),
            "absent" => case.absent.push(value.to_owned()),
            "present" => case.present.push(value.to_owned()),
            "buildah" => {}
            other => panic!("{}: {other}: not a directive this test knows", case.name),
        }
    }
    case
}

/// A loopback registry with the bases the cases use, and a podman holding Kiln's images.
fn setup() -> (Registry, Podman) {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    image::push_rootfs(&registry, bases::debian_rootfs(), "library/debian:bookworm");
    let podman = Podman::new();
    podman.load(kiln_image(false), IMAGE);
    podman.load(kiln_image(true), DEBUG_IMAGE);
    // What the containers get is what the test is about: podman's defaults lack SYS_ADMIN.
    let status = podman.run(&[
        "run",
        "--rm",
        "--entrypoint=/busybox/sh",
        DEBUG_IMAGE,
        "-c",
        "grep CapEff /proc/self/status",
    ]);
    let caps = u64::from_str_radix(status.trim().trim_start_matches("CapEff:").trim(), 16).unwrap();
    assert_eq!(
        caps & (1 << 21),
        0,
        "the container has CAP_SYS_ADMIN: {status}"
    );
    (registry, podman)
}

/// Builds `case` in a container of Kiln's image and pushes it; the executor's log.
fn build(registry: &Registry, podman: &Podman, case: &Case, agent: Option<&Agent>) -> String {
    let addr = registry.addr();
    let secrets = tempfile::tempdir().unwrap();
    let mut args = vec![
        "run".to_owned(),
        "--rm".to_owned(),
        "--network=host".to_owned(),
        format!("--volume={}:/workspace:ro", case.dir.display()),
        format!("--volume={}:/run/kiln-secrets:ro", secrets.path().display()),
    ];
    if let Some(agent) = agent {
        let dir = agent.socket.parent().unwrap();
        args.push(format!("--volume={}:/run/agent", dir.display()));
    }
    args.push(IMAGE.to_owned());
    args.extend([
        "--context=dir:///workspace".to_owned(),
        format!("--destination={addr}/inplace/{}:1", case.name),
        format!("--registry-map=docker.io={addr}"),
        "--progress=plain".to_owned(),
    ]);
    args.extend(case.args.iter().cloned());
    for (id, value) in &case.secrets {
        std::fs::write(secrets.path().join(id), value).unwrap();
        args.push(format!("--secret=id={id},src=/run/kiln-secrets/{id}"));
    }
    if agent.is_some() {
        args.push("--ssh=default=/run/agent/agent.sock".to_owned());
        args.push("--ssh=deploy=/run/agent/agent.sock".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podman.output(&args);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "case {} failed in the Pod:\n{log}",
        case.name
    );
    log
}

#[test]
fn mount_and_heredoc_cases_pass_in_a_default_pod_and_leak_no_secret() {
    kiln_testkit::require_tools(&["skopeo", "umoci", "runc", "gzip"]);
    let (registry, podman) = setup();
    let cases = cases();
    assert!(cases.len() >= 10, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let agent = case.ssh_key.as_deref().map(Agent::start);
        let log = build(&registry, &podman, case, agent.as_ref());
        let tag = format!("inplace/{}:1", case.name);
        let flat = image::flatten(&registry, &tag);
        for path in &case.absent {
            if flat.rootfs.join(path).symlink_metadata().is_ok() {
                failures.push(format!("{}: /{path} is in the image", case.name));
            }
        }
        for path in &case.present {
            if flat.rootfs.join(path).symlink_metadata().is_err() {
                failures.push(format!("{}: /{path} is not in the image", case.name));
            }
        }
        let printed = image::run_with_runc(&flat);
        if printed != case.run {
            failures.push(format!(
                "{}: printed\n{printed}--- expected\n{}---\n{log}",
                case.name, case.run
            ));
        }
        for (id, value) in &case.secrets {
            let found = image::blobs_containing(&registry, &tag, value.as_bytes());
            if !found.is_empty() {
                failures.push(format!("{}: secret {id} in blobs {found:?}", case.name));
            }
            if log.contains(value.as_str()) {
                failures.push(format!("{}: secret {id} in the log", case.name));
            }
        }
        eprintln!("case {}: done", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A step killed by a signal: the build fails with its status, its secret, bind copy and
/// parent directories are gone from `/`, and its cache kept what it wrote (the next build
/// reads it). A bind mount over a directory the image has shows the source during the step
/// and the image's own files after it.
#[test]
fn a_killed_step_leaves_no_mount_behind_and_image_entries_come_back() {
    kiln_testkit::require_tools(&["skopeo", "umoci", "runc"]);
    let (registry, podman) = setup();
    let addr = registry.addr();
    let context = tempfile::tempdir().unwrap();
    std::fs::create_dir(context.path().join("data")).unwrap();
    std::fs::write(context.path().join("data/one.txt"), "from the context\n").unwrap();
    std::fs::write(
        context.path().join("Dockerfile.killed"),
        "FROM busybox\n\
         RUN --mount=type=secret,id=token --mount=type=cache,target=/var/cache/app \
             --mount=type=bind,source=data,target=/src/data \
             cat /run/secrets/token > /dev/null && echo kept > /var/cache/app/more.txt && kill -9 $$\n",
    )
    .unwrap();
    std::fs::write(
        context.path().join("Dockerfile.after"),
        "FROM busybox\n\
         RUN mkdir -p /opt/tool && echo 'the image' > /opt/tool/own.txt\n\
         RUN --mount=type=bind,source=data,target=/opt/tool cat /opt/tool/one.txt > /seen.txt\n\
         RUN --mount=type=cache,target=/var/cache/app cat /var/cache/app/more.txt >> /seen.txt\n\
         RUN cat /opt/tool/own.txt >> /seen.txt && ls /opt/tool >> /seen.txt\n\
         CMD [\"cat\", \"/seen.txt\"]\n",
    )
    .unwrap();
    std::fs::write(context.path().join("token"), "kiln-killed-step-secret").unwrap();
    let executor = format!(
        "/kaniko/executor --context=dir:///workspace --registry-map=docker.io={addr} \
         --progress=plain --secret=id=token,src=/workspace/token"
    );
    let script = format!(
        "{executor} --dockerfile=Dockerfile.killed --no-push; echo \"exit=$?\"\n\
         for p in /run/secrets /src /var/cache/app; do [ -e $p ] && echo \"left $p\"; done\n\
         {executor} --dockerfile=Dockerfile.after --destination={addr}/inplace/after:1 || echo failed\n"
    );
    let out = podman.output(&[
        "run",
        "--rm",
        "--network=host",
        &format!("--volume={}:/workspace:ro", context.path().display()),
        "--entrypoint=/busybox/sh",
        DEBUG_IMAGE,
        "-c",
        &script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("exit=137"), "{stdout}\n{stderr}");
    assert!(!stdout.contains("left "), "{stdout}\n{stderr}");
    assert!(!stdout.contains("failed"), "{stdout}\n{stderr}");
    let printed = image::run_with_runc(&image::flatten(&registry, "inplace/after:1"));
    assert_eq!(printed, "from the context\nkept\nthe image\nown.txt\n");
    let leaks = image::blobs_containing(&registry, "inplace/after:1", b"kiln-killed-step-secret");
    assert!(leaks.is_empty(), "{leaks:?}");
}
