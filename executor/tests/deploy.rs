//! The examples in `executor/deploy/` run as written, with Kiln's image as Kiln built it
//! (`scripts/executor-image`), in podman with its default capabilities and seccomp profile:
//! Pods with `podman kube play`, the Jenkins pipeline's command through `podman exec`, the
//! Tekton and GitLab commands as their systems would run them. Each pushes to a loopback
//! registry that demands Basic auth, with the credentials from the registry Secret's
//! `config.json` mounted at `/kaniko/.docker` (a hostPath: podman 4.3's Secret volumes crash),
//! and the result is pulled back and run.
//!
//! What differs from a cluster, and why: the Pods use the host's network (the registry listens
//! on loopback), `REGISTRY` is the loopback registry, and the Job is played as the Pod of its
//! template (podman 4.3 has no Jobs).

use std::time::Duration;

mod support;
use support::deploy::{
    args_of, example, example_yaml, pod_spec, set_host_path, World, DEBUG_IMAGE, IMAGE,
};

const LIMIT: Duration = Duration::from_secs(300);

/// `deploy/pod.yaml`: a Pod whose one container builds a hostPath context and pushes it.
#[test]
fn pod_yaml_builds_and_pushes_with_the_registry_secret() {
    let world = World::new();
    let context = world.app("pod-context");
    let mut pod = example_yaml("pod.yaml").remove(0);
    assert_eq!(pod["kind"], "Pod");
    world.localise(&mut pod);
    set_host_path(pod_spec(&mut pod), "context", &context);
    world.podman.kube_play(world.work.path(), &pod);
    let code = world.podman.wait("kiln-build-kiln", LIMIT);
    let logs = world.podman.logs("kiln-build-kiln");
    assert_eq!(code, 0, "{logs}");
    assert_eq!(
        world.run_result("team/app:latest"),
        "built in a pod\nhello\n"
    );
}

/// `deploy/job.yaml`: the Job's Pod builds a git context (a subdirectory of a branch, served by
/// a git daemon; the image has no `git` program) whose Dockerfile also ADDs a second
/// repository, and pushes with the layer cache in the registry.
#[test]
fn job_yaml_builds_a_git_context_with_the_layer_cache() {
    let world = World::new();
    let served = world.work.path().join("git");
    let lib = git_repo(&served, "team/lib.git", &[("VERSION", "lib 2.1\n")]);
    let daemon = kiln_testkit::git::Daemon::start(&served);
    let dockerfile = format!(
        "FROM {}/base/busybox:latest\n\
         ADD {}#main /lib\n\
         COPY hello.txt /hello.txt\n\
         RUN cat /lib/VERSION > /built.txt\n\
         CMD [\"cat\", \"/built.txt\", \"/hello.txt\"]\n",
        world.addr(),
        daemon.url("team/lib.git")
    );
    git_repo(
        &served,
        "team/app.git",
        &[
            ("service/Dockerfile", dockerfile.as_str()),
            ("service/hello.txt", "hello from git\n"),
            ("README", "not part of the context\n"),
        ],
    );
    drop(lib);
    let mut job = example_yaml("job.yaml").remove(0);
    assert_eq!(job["kind"], "Job");
    world.localise(&mut job);
    let app_url = daemon.url("team/app.git");
    support::deploy::replace_strings(&mut job, &|text| {
        text.replace("git://git.example.com/team/app.git", &app_url)
    });
    // podman 4.3 plays Pods, not Jobs: the Job's Pod template is what a Job controller runs.
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": job["metadata"]["name"] },
        "spec": pod_spec(&mut job).clone(),
    });
    world.podman.kube_play(world.work.path(), &pod);
    let code = world.podman.wait("kiln-build-app-kiln", LIMIT);
    let logs = world.podman.logs("kiln-build-app-kiln");
    assert_eq!(code, 0, "{logs}");
    assert_eq!(
        world.run_result("team/app:main"),
        "lib 2.1\nhello from git\n"
    );
    let cached = world.tags("team/app/cache");
    assert!(!cached.is_empty(), "no cache entries were pushed:\n{logs}");
}

/// A bare repository `name` below `served` holding `files` in one commit on `main`; returns
/// its path.
fn git_repo(served: &std::path::Path, name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    use kiln_testkit::git::git;
    let work = served.join(format!("{name}.work"));
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    for (path, content) in files {
        let file = work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "app"]);
    let bare = served.join(name);
    git(
        served,
        &[
            "clone",
            "-q",
            "--bare",
            &work.to_string_lossy(),
            &bare.to_string_lossy(),
        ],
    );
    std::fs::remove_dir_all(&work).unwrap();
    bare
}

/// Jenkins: the Pod of the Jenkinsfile's podTemplate, with the workspace volume the kubernetes
/// plugin adds, and its `sh` step (kaniko's command line, unchanged) run through `sh` in the
/// builder container with `podman exec`, as `container('kaniko')` does; twice, since a
/// pipeline's container outlives a build, and the second build is a cache hit.
#[test]
fn jenkins_pipeline_runs_the_kaniko_command_line_in_the_debug_image() {
    let world = World::new();
    let jenkinsfile = example("Jenkinsfile");
    let yaml = between(&jenkinsfile, "podTemplate(yaml: '''", "''')");
    let script = between(&jenkinsfile, "sh '''", "'''").trim().to_owned();
    assert!(
        script.starts_with(r#"/kaniko/executor -f "$(pwd)/Dockerfile" -c "$(pwd)" --insecure --skip-tls-verify --cache=true --destination="#),
        "{script}"
    );
    let mut pod = support::podman::parse_yaml(yaml).remove(0);
    pod["metadata"]["name"] = "jenkins-agent".into();
    world.localise(&mut pod);
    let script = script.replace("REGISTRY", &world.addr());
    let workspace = world.work.path().join("agent");
    let job_dir = workspace.join("workspace/app");
    std::fs::create_dir_all(job_dir.parent().unwrap()).unwrap();
    std::fs::rename(world.app("app"), &job_dir).unwrap();
    let spec = pod_spec(&mut pod);
    spec["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "workspace-volume",
            "hostPath": { "path": workspace, "type": "Directory" },
        }));
    spec["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(
            serde_json::json!({ "name": "workspace-volume", "mountPath": "/home/jenkins/agent" }),
        );
    assert_eq!(spec["containers"][0]["image"], DEBUG_IMAGE);
    world.podman.kube_play(world.work.path(), &pod);
    let container = "jenkins-agent-kaniko";
    for build in ["7", "8"] {
        let out = world.podman.output(&[
            "exec",
            "-w",
            "/home/jenkins/agent/workspace/app",
            "-e",
            &format!("BUILD_NUMBER={build}"),
            container,
            "sh",
            "-c",
            &script,
        ]);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build {build}:\n{log}");
        assert_eq!(
            world.run_result(&format!("team/app:{build}")),
            "built in a pod\nhello\n"
        );
        if build == "8" {
            assert!(log.contains("CACHED"), "{log}");
        }
    }
}

/// The init container builds and pushes, writing the image's name with its digest into an
/// emptyDir; the main container waits for it, then pulls exactly that image and runs a
/// command of it with Kiln.
#[test]
fn init_container_builds_and_main_container_runs_the_result() {
    let world = World::new();
    let context = world.app("init-context");
    let mut pod = example_yaml("init-container.yaml").remove(0);
    world.localise(&mut pod);
    set_host_path(pod_spec(&mut pod), "context", &context);
    world.podman.kube_play(world.work.path(), &pod);
    let code = world.podman.wait("kiln-build-and-check-check", LIMIT);
    let logs = world.podman.logs("kiln-build-and-check-check");
    assert_eq!(code, 0, "{logs}");
    let pushed = format!("{}/team/app@sha256:", world.addr());
    assert!(logs.contains(&format!("checking {pushed}")), "{logs}");
    assert!(
        logs.contains("| built in a pod") && logs.contains("| hello"),
        "{logs}"
    );
}

/// Tekton and GitLab: no cluster or runner here, so their files are read as those systems read
/// them, checked for kaniko's arguments, and their commands run as they would run them: the
/// Tekton step as the image's entrypoint with the step's arguments (parameters substituted),
/// the GitLab job's script through `sh` in the debug image with the entrypoint cleared.
#[test]
fn tekton_task_and_gitlab_job_run_their_commands() {
    let world = World::new();
    let task = example_yaml("tekton-task.yaml").remove(0);
    assert_eq!(task["kind"], "Task");
    let step = &task["spec"]["steps"][0];
    assert_eq!(step["image"], "REGISTRY/kiln/executor:latest");
    assert_eq!(step["volumeMounts"][0]["mountPath"], "/kaniko/.docker");
    let args = args_of(step);
    for flag in [
        "--context=",
        "--dockerfile=",
        "--destination=",
        "--digest-file=",
    ] {
        assert!(
            args.iter().any(|a| a.starts_with(flag)),
            "{flag} in {args:?}"
        );
    }
    let source = world.app("tekton-source");
    let results = world.work.path().join("results");
    std::fs::create_dir_all(&results).unwrap();
    let args: Vec<String> = args
        .iter()
        .filter(|a| *a != "$(params.EXTRA_ARGS[*])")
        .map(|a| {
            a.replace("$(workspaces.source.path)", "/workspace/source")
                .replace("$(params.CONTEXT)", "./")
                .replace("$(params.DOCKERFILE)", "./Dockerfile")
                .replace(
                    "$(params.IMAGE)",
                    &format!("{}/team/app:tekton", world.addr()),
                )
                .replace(
                    "$(results.IMAGE_DIGEST.path)",
                    "/tekton/results/IMAGE_DIGEST",
                )
        })
        .collect();
    assert!(!args.iter().any(|a| a.contains("$(")), "{args:?}");
    let mut run = vec![
        "run".to_owned(),
        "--rm".to_owned(),
        "--network=host".to_owned(),
        format!("--volume={}:/workspace/source:ro", source.display()),
        format!("--volume={}:/tekton/results", results.display()),
        format!("--volume={}:/kaniko/.docker:ro", world.regcred.display()),
        "--workdir=/workspace/source".to_owned(),
        IMAGE.to_owned(),
    ];
    run.extend(args);
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let out = world.podman.output(&run);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = std::fs::read_to_string(results.join("IMAGE_DIGEST")).unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(
        world.run_result(&format!("team/app@{}", digest.trim())),
        "built in a pod\nhello\n"
    );

    let ci = example_yaml("gitlab-ci.yml").remove(0);
    let job = &ci["build-image"];
    assert_eq!(job["image"]["name"], "REGISTRY/kiln/executor:debug");
    assert_eq!(job["image"]["entrypoint"], serde_json::json!([""]));
    let script: Vec<&str> = job["script"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line.as_str().unwrap())
        .collect();
    for flag in ["--context", "--dockerfile", "--destination"] {
        assert!(
            script.iter().any(|l| l.contains(flag)),
            "{flag} in {script:?}"
        );
    }
    let project = world.app("gitlab-project");
    let out = world.podman.output(&[
        "run",
        "--rm",
        "--network=host",
        "--entrypoint=",
        &format!("--volume={}:/builds/team/app", project.display()),
        &format!("--volume={}:/kaniko/.docker:ro", world.regcred.display()),
        "--env=CI_PROJECT_DIR=/builds/team/app",
        &format!("--env=CI_REGISTRY_IMAGE={}/team/app", world.addr()),
        "--env=CI_COMMIT_SHORT_SHA=1a2b3c4d",
        "--workdir=/builds/team/app",
        DEBUG_IMAGE,
        "sh",
        "-c",
        &script.join("\n"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        world.run_result("team/app:1a2b3c4d"),
        "built in a pod\nhello\n"
    );
}

/// The text between the first `start` and the next `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(start).unwrap_or_else(|| panic!("no {start:?}")) + start.len();
    let len = text[from..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?}"));
    &text[from..from + len]
}
