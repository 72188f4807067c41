//! The `executor` binary itself: exit codes and what goes to which stream.

use std::process::{Command, Output};

fn executor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(args)
        // No docker config of the machine running the tests may leak into these runs.
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .expect("run executor")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn unknown_flag_is_a_usage_error_naming_it() {
    let output = executor(&["--destination=r/a:1", "--frobnicate"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: unknown flag: --frobnicate\n"),
        "{err}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn bad_values_and_missing_destination_are_usage_errors() {
    for args in [
        &["--destination=r/a:1", "--verbosity=loud"][..],
        &["--destination=r/a:1", "--cache-ttl=forever"],
        &["--destination=r/a:1", "--reproducible", "no"],
        &[],
    ] {
        let output = executor(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(stderr(&output).starts_with("error: "), "{args:?}");
    }
}

#[test]
fn help_and_version_succeed_on_stdout() {
    let output = executor(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("--destination"));
    for args in [&["version"][..], &["--version"]] {
        let output = executor(args);
        assert_eq!(output.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&output.stdout).contains(env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn warnings_are_rendered_before_the_build() {
    let kiln_dir = tempfile::tempdir().unwrap();
    let kiln_dir_arg = format!("--kiln-dir={}", kiln_dir.path().display());
    let output = executor(&[
        "--no-push",
        "--progress=plain",
        "--mode=chroot",
        &kiln_dir_arg,
        "--context=/nonexistent-kiln-context",
        "--materialize",
    ]);
    let err = stderr(&output);
    assert!(err.contains("WARN --materialize"), "{err}");
    // A context that does not exist is a build error: exit code 1, naming the path.
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent-kiln-context"), "{err}");
    assert!(err.lines().last().unwrap().starts_with("error: "), "{err}");
}

#[test]
fn an_unreadable_docker_config_fails_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{ broken").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(["--no-push", "--progress=plain"])
        .env("DOCKER_CONFIG", dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("config.json"), "{err}");
}

/// End to end against a real registry: a RUN's status becomes the exit code and nothing is
/// pushed or written; a good build pushes and writes its digest file.
#[test]
fn run_status_is_the_exit_code_and_success_pushes() {
    use kiln_testkit::{bases, image, Registry};
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");

    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    let kiln_dir_arg = format!("--kiln-dir={}", work.path().join("kiln").display());
    let digest_file = work.path().join("digest");
    let digest_arg = format!("--digest-file={}", digest_file.display());
    let context_arg = format!("--context=dir://{}", context.display());
    let run = |dockerfile: &str, destination: &str| {
        std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
        let destination = format!("--destination={addr}/{destination}");
        executor(&[
            &context_arg,
            &destination,
            &kiln_dir_arg,
            &digest_arg,
            "--mode=chroot",
            "--progress=plain",
        ])
    };

    let failing = run(
        &format!("FROM {addr}/base/busybox:latest\nRUN echo before-failing && exit 7\n"),
        "out/failing:1",
    );
    let err = stderr(&failing);
    assert_eq!(failing.status.code(), Some(7), "{err}");
    assert!(
        err.contains("| before-failing"),
        "RUN output is shown: {err}"
    );
    assert!(err.lines().last().unwrap().starts_with("error: "), "{err}");
    assert!(!digest_file.exists(), "no digest file after a failed build");
    let inspect = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{addr}/out/failing:1"),
        ])
        .output()
        .unwrap();
    assert!(!inspect.status.success(), "nothing was pushed");

    let good = run(
        &format!("FROM {addr}/base/busybox:latest\nRUN echo hello > /hello\n"),
        "out/good:1",
    );
    let err = stderr(&good);
    assert_eq!(good.status.code(), Some(0), "{err}");
    let digest = std::fs::read_to_string(&digest_file).unwrap();
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    assert!(err.contains(&format!("pushed {addr}/out/good:1")), "{err}");
}
