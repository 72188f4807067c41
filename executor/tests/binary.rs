//! The `executor` binary itself: exit codes and what goes to which stream.

use std::process::{Command, Output};

#[path = "support/agent.rs"]
mod agent;
use agent::Agent;

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
        "--preserve-context",
    ]);
    let err = stderr(&output);
    assert!(err.contains("WARN --preserve-context"), "{err}");
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

/// A context with a COPY and a RUN, so a reproducible build has a real layer of each kind.
fn write_small_context(dir: &std::path::Path, registry: &str) {
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {registry}/base/busybox:latest\nCOPY files/ /srv/\nRUN echo made > /srv/made && chmod 0640 /srv/made\nCMD [\"cat\", \"/srv/a.txt\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("files/a.txt"), "a\n").unwrap();
    std::fs::write(dir.join("files/b.txt"), "b\n").unwrap();
}

/// `--reproducible` from two different work directories, and from two copies of the context
/// made at different times, gives one digest.
#[test]
fn reproducible_builds_from_two_work_dirs_have_one_digest() {
    use kiln_testkit::{bases, image, Registry};
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");

    let mut digests = Vec::new();
    for (n, tag) in ["one", "two"].iter().enumerate() {
        let work = tempfile::tempdir().unwrap();
        let context = work.path().join(format!("context-{n}"));
        write_small_context(&context, &addr);
        // The second copy's files get later mtimes; --reproducible must not see them.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let digest_file = work.path().join("digest");
        let timings = work.path().join("timings.json");
        let out = executor(&[
            &format!("--benchmark-file={}", timings.display()),
            &format!("--context={}", context.display()),
            &format!("--destination={addr}/out/repro:{tag}"),
            &format!(
                "--kiln-dir={}",
                work.path().join(format!("kiln-{n}")).display()
            ),
            &format!("--digest-file={}", digest_file.display()),
            "--reproducible",
            "--mode=chroot",
            "--progress=plain",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        digests.push(std::fs::read_to_string(&digest_file).unwrap());
        check_timing_report(&timings);
    }
    assert!(digests[0].starts_with("sha256:"), "{digests:?}");
    assert_eq!(digests[0], digests[1], "two reproducible builds differ");
}

/// `--benchmark-file` holds every phase the build went through and each step's own phases.
fn check_timing_report(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).expect("timing report written");
    let report: serde_json::Value = serde_json::from_str(&text).expect("timing report is JSON");
    assert_eq!(report["succeeded"], true, "{text}");
    for phase in [
        "context", "plan", "pull", "execute", "snapshot", "layer", "push",
    ] {
        assert!(
            report["phases"][phase].as_f64().is_some_and(|s| s >= 0.0),
            "phase {phase} missing: {text}"
        );
    }
    let steps = report["steps"].as_array().expect("steps");
    let run = steps
        .iter()
        .find(|s| s["instruction"].as_str().unwrap_or("").starts_with("RUN "))
        .unwrap_or_else(|| panic!("no RUN step: {text}"));
    assert_eq!(run["line"], 3, "{text}");
    assert!(run["seconds"].as_f64().is_some(), "{text}");
    assert!(run["phases"]["execute"].as_f64().is_some(), "{text}");
    assert!(run["phases"]["layer"].as_f64().is_some(), "{text}");
}

/// A syntax error names the Dockerfile and line, exits 1 and pushes nothing.
#[test]
fn a_syntax_error_names_its_line_and_pushes_nothing() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("Dockerfile"),
        "FROM scratch\nCOPY . /\nRUNN echo typo\n",
    )
    .unwrap();
    let digest_file = work.path().join("digest");
    let out = executor(&[
        &format!("--context={}", work.path().display()),
        // Nothing listens here: the build must fail before any registry is contacted.
        "--destination=127.0.0.1:9/out/never:1",
        &format!("--kiln-dir={}", work.path().join("kiln").display()),
        &format!("--digest-file={}", digest_file.display()),
        "--mode=chroot",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Dockerfile:3"), "{err}");
    assert!(err.contains("unknown instruction: RUNN"), "{err}");
    assert!(err.contains("did you mean RUN?"), "{err}");
    assert!(!digest_file.exists());
}

/// A registry that refuses the push gives an error naming registry, repository and HTTP status,
/// exits 1 and writes no digest file.
#[test]
fn a_refused_push_names_registry_repository_and_status() {
    use kiln_testkit::{bases, image, Registry, RegistryConfig};
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let source = Registry::start();
    image::push_rootfs(&source, bases::busybox_rootfs(), "base/busybox:latest");
    let refusing = Registry::start_with(RegistryConfig {
        read_only: true,
        ..RegistryConfig::default()
    });
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_small_context(&context, &source.addr());
    let digest_file = work.path().join("digest");
    let out = executor(&[
        &format!("--context={}", context.display()),
        &format!("--destination={}/team/app:1", refusing.addr()),
        &format!("--kiln-dir={}", work.path().join("kiln").display()),
        &format!("--digest-file={}", digest_file.display()),
        "--mode=chroot",
        "--progress=plain",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&refusing.addr()), "{last}");
    assert!(last.contains("team/app"), "{last}");
    assert!(last.contains("405"), "{last}");
    assert!(!digest_file.exists());
}

/// The manifest digest `repo_tag` names on the registry at `addr` (plain HTTP).
fn tag_digest(addr: &str, repo_tag: &str) -> String {
    let out = kiln_testkit::run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{addr}/{repo_tag}"),
    ]));
    out.trim().to_owned()
}

/// A rebuild pushed to an existing tag of an immutable repository (ECR's answer) fails the
/// build with the registry's message; with `--push-ignore-immutable-tag-errors` the build
/// succeeds, that tag keeps its first image, and the other destination gets the new one.
#[test]
fn an_immutable_tag_fails_the_push_unless_told_to_ignore_it() {
    use kiln_testkit::{bases, http::ImmutableTags, image, Registry};
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "python3"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let immutable = ImmutableTags::start(&registry.addr());
    let addr = immutable.addr();
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_small_context(&context, &registry.addr());
    let build = |n: usize, extra: &[&str]| {
        let digest_file = work.path().join(format!("digest-{n}"));
        let mut args = vec![
            format!("--context={}", context.display()),
            format!("--destination={addr}/team/app:1"),
            format!(
                "--kiln-dir={}",
                work.path().join(format!("kiln-{n}")).display()
            ),
            format!("--digest-file={}", digest_file.display()),
            "--mode=chroot".to_owned(),
            "--progress=plain".to_owned(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = executor(&args);
        (out, std::fs::read_to_string(&digest_file).ok())
    };

    let (out, first) = build(0, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let first = first.unwrap();
    assert_eq!(tag_digest(&addr, "team/app:1"), first);

    std::fs::write(context.join("files/a.txt"), "a, rebuilt\n").unwrap();
    let (out, digest) = build(1, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot be overwritten because the repository is immutable"),
        "{err}"
    );
    assert!(err.contains(&format!("{addr}/team/app")), "{err}");
    assert_eq!(digest, None);

    let second_destination = format!("--destination={addr}/team/app:2");
    let (out, second) = build(
        2,
        &["--push-ignore-immutable-tag-errors", &second_destination],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("{addr}/team/app:1 not pushed")),
        "{err}"
    );
    let second = second.unwrap();
    assert_ne!(second, first);
    assert_eq!(tag_digest(&addr, "team/app:1"), first);
    assert_eq!(tag_digest(&addr, "team/app:2"), second);
}

/// `executor warm` stores a base image in the cache directory (by digest, every blob), a
/// second run downloads nothing, and a Dockerfile's images are found from its FROM and
/// `COPY --from` lines.
#[test]
fn warm_fills_the_cache_dir_once() {
    use kiln_testkit::{bases, image, Registry};
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let cache_dir = work.path().join("cache");
    let dockerfile = work.path().join("Dockerfile");
    std::fs::write(
        &dockerfile,
        format!("FROM {addr}/base/busybox:latest AS b\nRUN true\nFROM b\n"),
    )
    .unwrap();
    let warm = |extra: &[&str]| {
        let mut args = vec![
            "warm".to_owned(),
            format!("--cache-dir={}", cache_dir.display()),
            format!("--insecure-registry={addr}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        executor(&args)
    };
    let first = warm(&[&format!("--image={addr}/base/busybox:latest")]);
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        out.contains("cached ") && !out.contains(" 0 blobs"),
        "{out}"
    );
    let blobs = std::fs::read_dir(cache_dir.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(blobs >= 3, "manifest, config and layer stored: {blobs}");
    let again = warm(&[&format!("--dockerfile={}", dockerfile.display())]);
    let out = String::from_utf8_lossy(&again.stdout).into_owned();
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(out.contains("(0 blobs, 0 bytes downloaded)"), "{out}");

    // An image a stage copies from is one the build reads too.
    let files = work.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("note.txt"), "copied\n").unwrap();
    image::push_rootfs(&registry, &files, "other/files:1");
    std::fs::write(
        &dockerfile,
        format!("FROM {addr}/base/busybox:latest\nCOPY --from={addr}/other/files:1 /note.txt /n\n"),
    )
    .unwrap();
    let copied = warm(&[&format!("--dockerfile={}", dockerfile.display())]);
    let out = String::from_utf8_lossy(&copied.stdout).into_owned();
    assert_eq!(copied.status.code(), Some(0), "{}", stderr(&copied));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("busybox") && lines[0].contains("(0 blobs"),
        "{out}"
    );
    assert!(
        lines[1].contains("other/files:1") && !lines[1].contains("(0 blobs"),
        "{out}"
    );
}

/// `RUN --mount=type=ssh` reaches the `--ssh` agent through a socket of its own: the default
/// one is `SSH_AUTH_SOCK` at /run/buildkit/ssh_agent.0 and lists the agent's key; a named one
/// sits at its target with the mount's mode and owner; nothing of either reaches the image; an
/// agent that a `required` mount names and that was not given fails the build at its line.
#[test]
fn run_mount_ssh_forwards_the_agent() {
    use kiln_testkit::{bases, image, Registry};
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::debian_rootfs(), "base/debian:bookworm");
    let agent = Agent::start("kiln-test-key");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    // The agent protocol by hand (SSH_AGENTC_REQUEST_IDENTITIES), with the perl of Debian's
    // minimal base: count of keys and the first key's comment.
    let list_keys = r#"perl -MIO::Socket::UNIX -e 'my $s = IO::Socket::UNIX->new(Peer => $ENV{SSH_AUTH_SOCK}) or die "connect: $!"; print $s pack("NC", 1, 11); read($s, my $len, 4) == 4 or die "no answer"; read($s, my $body, unpack("N", $len)); my ($type, $n, $blob, $comment) = unpack("C N N/a N/a", $body); print "agent at $ENV{SSH_AUTH_SOCK}: type $type, $n key, $comment\n"'"#;
    let dockerfile = |last: &str| {
        format!(
            "FROM {addr}/base/debian:bookworm\n\
             RUN --mount=type=ssh {list_keys}\n\
             RUN --mount=type=ssh,id=deploy,target=/tmp/deploy.sock,mode=0640,uid=1000,gid=1000 \
             stat -c 'deploy socket %F %a %u:%g' /tmp/deploy.sock && echo \"SSH_AUTH_SOCK=$SSH_AUTH_SOCK\"\n\
             {last}\n"
        )
    };
    let build = |name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_executor"))
            .arg(format!("--context={}", context.display()))
            .arg(format!("--kiln-dir={}", work.path().join(name).display()))
            .arg("--no-push")
            .arg(format!(
                "--oci-layout-path={}",
                work.path().join(format!("{name}-layout")).display()
            ))
            .args(["--ssh", "default"])
            .arg(format!("--ssh=deploy={}", agent.socket.display()))
            .args(["--mode=chroot", "--progress=plain"])
            .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .output()
            .unwrap();
        (out.status.code(), stderr(&out))
    };

    std::fs::write(context.join("Dockerfile"), dockerfile("RUN true")).unwrap();
    let (code, err) = build("ok");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("agent at /run/buildkit/ssh_agent.0: type 12, 1 key, kiln-test-key"),
        "{err}"
    );
    assert!(err.contains("deploy socket socket 640 1000:1000"), "{err}");
    assert!(err.contains("SSH_AUTH_SOCK=/tmp/deploy.sock"), "{err}");
    let unpacked = work.path().join("unpacked");
    kiln_testkit::run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!(
                "{}:latest",
                work.path().join("ok-layout").display()
            ))
            .arg(&unpacked),
    );
    assert!(!unpacked.join("rootfs/run/buildkit").exists());
    assert!(!unpacked.join("rootfs/tmp/deploy.sock").exists());

    std::fs::write(
        context.join("Dockerfile"),
        dockerfile("RUN --mount=type=ssh,id=missing,required true"),
    )
    .unwrap();
    let (code, err) = build("missing");
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("Dockerfile:4"), "{last}");
    assert!(last.contains("--ssh missing="), "{last}");
}

/// Kiln's own image is `FROM scratch`, with no `git`: a git context whose Dockerfile ADDs
/// another git repository (both from a git daemon on loopback) builds and pushes with `PATH`
/// pointing nowhere.
#[test]
fn a_git_context_with_a_git_add_builds_with_no_git_on_path() {
    use kiln_testkit::git::{git, Daemon};
    use kiln_testkit::{image, Registry};
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "git"]);
    let registry = Registry::start();
    let addr = registry.addr();
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let daemon = Daemon::start(&served);
    let lib_url = daemon.url("lib.git");
    for (name, files) in [
        ("lib", vec![("lib.txt".to_owned(), "lib\n".to_owned())]),
        (
            "app",
            vec![
                ("app.txt".to_owned(), "app\n".to_owned()),
                (
                    "Dockerfile".to_owned(),
                    format!("FROM scratch\nCOPY app.txt /app/\nADD {lib_url}#v1 /lib\n"),
                ),
            ],
        ),
    ] {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        git(&dir, &["init", "-q"]);
        for (file, content) in files {
            std::fs::write(dir.join(file), content).unwrap();
        }
        git(&dir, &["add", "."]);
        git(&dir, &["commit", "-q", "-m", name]);
        git(&dir, &["tag", "-a", "v1", "-m", "one"]);
        let bare = format!("served/{name}.git");
        git(work.path(), &["clone", "-q", "--bare", name, &bare]);
    }

    let output = Command::new(env!("CARGO_BIN_EXE_executor"))
        .args([
            &format!("--context={}#main", daemon.url("app.git")),
            &format!("--destination={addr}/out/from-git:1"),
            &format!("--kiln-dir={}", work.path().join("kiln").display()),
            "--mode=chroot",
            "--progress=plain",
        ])
        .env("PATH", "/nonexistent")
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .expect("run executor");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let flat = image::flatten(&registry, "out/from-git:1");
    let read = |path: &str| std::fs::read_to_string(flat.rootfs.join(path)).unwrap_or_default();
    assert_eq!(read("app/app.txt"), "app\n");
    assert_eq!(read("lib/lib.txt"), "lib\n");
    assert!(!flat.rootfs.join("lib/.git").exists());
}
