//! Git contexts and ADD's git sources need no `git` program: Kiln's own image is `FROM scratch`.
//!
//! This is a test binary of its own because it changes the process's `PATH`, which every
//! other test that makes fixtures with `git` needs. Fixtures are made and the `git daemon` is
//! started first; then `PATH` is a directory whose only entry is a `git` that records each
//! call and fails, so a run of `git` by anything under test, even one whose failure is
//! tolerated, is seen.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_context::{open_context, ContextOptions, GitRepository};
use kiln_testkit::git::{git, Daemon};

#[tokio::test]
async fn git_contexts_and_add_sources_run_no_git_program() {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    fs::create_dir(&served).unwrap();
    let daemon = Daemon::start(&served);
    for (name, file) in [("lib", "lib.txt"), ("app", "a.txt")] {
        let dir = tmp.path().join(name);
        fs::create_dir(&dir).unwrap();
        git(&dir, &["init", "-q"]);
        fs::write(dir.join(file), format!("{name}\n")).unwrap();
        git(&dir, &["add", "."]);
        git(&dir, &["commit", "-q", "-m", name]);
        if name == "app" {
            git(&dir, &["tag", "-a", "v1", "-m", "one"]);
            let lib = served.join("lib.git");
            git(
                &dir,
                &[
                    "submodule",
                    "add",
                    "-q",
                    lib.to_str().unwrap(),
                    "vendor/lib",
                ],
            );
            git(
                &dir,
                &[
                    "config",
                    "-f",
                    ".gitmodules",
                    "submodule.vendor/lib.url",
                    "../lib.git",
                ],
            );
            git(&dir, &["add", ".gitmodules"]);
            git(&dir, &["commit", "-q", "-m", "submodule"]);
        }
        let bare = format!("served/{name}.git");
        git(tmp.path(), &["clone", "-q", "--bare", name, &bare]);
    }
    let app = daemon.url("app.git");

    let tripwire = tmp.path().join("bin");
    fs::create_dir(&tripwire).unwrap();
    let calls = tmp.path().join("git-calls");
    fs::write(
        tripwire.join("git"),
        format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", calls.display()),
    )
    .unwrap();
    fs::set_permissions(tripwire.join("git"), fs::Permissions::from_mode(0o755)).unwrap();
    // The only test of this binary: nothing else reads the environment meanwhile.
    std::env::set_var("PATH", &tripwire);

    let mut options = ContextOptions::new(tmp.path().join("work"));
    options.source.git.apply("recurse-submodules=true").unwrap();
    let context = open_context(&format!("{app}#v1"), &options).await.unwrap();
    assert_eq!(read(context.root(), "a.txt"), "app\n");
    let context = open_context(&app, &options).await.unwrap();
    assert_eq!(read(context.root(), "vendor/lib/lib.txt"), "lib\n");

    let repo = GitRepository::parse(&format!("{app}#main:vendor")).unwrap();
    let commit = repo.resolve().unwrap();
    let checkout = tmp.path().join("add");
    repo.checkout(&commit, &checkout).unwrap();
    assert_eq!(read(&checkout.join(repo.subdir()), "lib/lib.txt"), "lib\n");

    assert!(!calls.exists(), "git ran: {}", read(&calls, ""));
}

fn read(root: &Path, file: &str) -> String {
    fs::read_to_string(root.join(file)).unwrap_or_default()
}
