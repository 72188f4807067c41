//! Git contexts against repositories served by a real `git daemon` on loopback (`git://`).
//! Smart HTTP with credentials is in `git_http.rs`.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_context::{open_context, ContextError, ContextOptions};
use kiln_testkit::git::{git, Daemon};

struct Fixture {
    _tmp: tempfile::TempDir,
    daemon: Daemon,
    work: PathBuf,
    first_commit: String,
}

/// Serves `app.git` (main: two commits, tag v1 on the first, then a submodule `vendor/lib`
/// pointing at `lib.git` by a relative URL; branch dev from the first commit) and `lib.git`.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    fs::create_dir(&served).unwrap();
    let daemon = Daemon::start(&served);

    let lib = tmp.path().join("lib");
    fs::create_dir(&lib).unwrap();
    git(&lib, &["init", "-q"]);
    fs::write(lib.join("lib.txt"), "lib\n").unwrap();
    git(&lib, &["add", "."]);
    git(&lib, &["commit", "-q", "-m", "lib"]);
    git(
        tmp.path(),
        &["clone", "-q", "--bare", "lib", "served/lib.git"],
    );

    let app = tmp.path().join("app");
    fs::create_dir(&app).unwrap();
    git(&app, &["init", "-q"]);
    fs::write(app.join("a.txt"), "one\n").unwrap();
    git(&app, &["add", "."]);
    git(&app, &["commit", "-q", "-m", "first"]);
    let first_commit = git(&app, &["rev-parse", "HEAD"]);
    git(&app, &["tag", "v1"]);
    git(&app, &["checkout", "-q", "-b", "dev"]);
    fs::write(app.join("dev.txt"), "dev\n").unwrap();
    git(&app, &["add", "."]);
    git(&app, &["commit", "-q", "-m", "dev"]);
    git(&app, &["checkout", "-q", "main"]);
    fs::write(app.join("a.txt"), "two\n").unwrap();
    git(&app, &["commit", "-q", "-am", "second"]);
    let lib_path = served.join("lib.git");
    git(
        &app,
        &[
            "submodule",
            "add",
            "-q",
            lib_path.to_str().unwrap(),
            "vendor/lib",
        ],
    );
    // Clients resolve the relative URL against the superproject's own URL on the daemon.
    git(
        &app,
        &[
            "config",
            "-f",
            ".gitmodules",
            "submodule.vendor/lib.url",
            "../lib.git",
        ],
    );
    git(&app, &["add", ".gitmodules"]);
    git(&app, &["commit", "-q", "-m", "submodule"]);
    git(
        tmp.path(),
        &["clone", "-q", "--bare", "app", "served/app.git"],
    );

    Fixture {
        work: tmp.path().join("work"),
        _tmp: tmp,
        daemon,
        first_commit,
    }
}

fn read(root: &Path, file: &str) -> Option<String> {
    fs::read_to_string(root.join(file)).ok()
}

#[tokio::test]
async fn git_contexts_from_a_git_daemon() {
    let fx = fixture();
    let app = fx.daemon.url("app.git");
    let options = ContextOptions::new(&fx.work);

    // Default branch, no submodules.
    let context = open_context(&app, &options).await.unwrap();
    let root = context.root().to_owned();
    assert_eq!(read(&root, "a.txt").as_deref(), Some("two\n"));
    assert!(read(&root, "dev.txt").is_none());
    assert!(root.join("vendor/lib").is_dir());
    assert!(
        read(&root, "vendor/lib/lib.txt").is_none(),
        "submodules only on request"
    );
    assert!(
        root.join(".git").is_dir(),
        "kaniko keeps .git in the context"
    );
    drop(context);
    assert!(!root.exists(), "the clone is removed with the context");

    // A branch by full ref and by name, a tag.
    for (spec, file, content) in [
        (format!("{app}#refs/heads/dev"), "dev.txt", "dev\n"),
        (format!("{app}#dev"), "dev.txt", "dev\n"),
        (format!("{app}#v1"), "a.txt", "one\n"),
        (format!("{app}#refs/tags/v1"), "a.txt", "one\n"),
    ] {
        let context = open_context(&spec, &options).await.unwrap();
        assert_eq!(
            read(context.root(), file).as_deref(),
            Some(content),
            "{spec}"
        );
    }

    // A commit pinned after the ref is what gets checked out.
    for spec in [
        format!("{app}#refs/heads/main#{}", fx.first_commit),
        format!("{app}##{}", fx.first_commit),
    ] {
        let context = open_context(&spec, &options).await.unwrap();
        assert_eq!(
            read(context.root(), "a.txt").as_deref(),
            Some("one\n"),
            "{spec}"
        );
        assert_eq!(git(context.root(), &["rev-parse", "HEAD"]), fx.first_commit);
    }
}

#[tokio::test]
async fn git_options_branch_single_branch_and_submodules() {
    let fx = fixture();
    let app = fx.daemon.url("app.git");

    let mut options = ContextOptions::new(&fx.work);
    options
        .source
        .git
        .apply("branch=dev,single-branch=true")
        .unwrap();
    let context = open_context(&format!("{app}#main"), &options)
        .await
        .unwrap();
    assert_eq!(
        read(context.root(), "dev.txt").as_deref(),
        Some("dev\n"),
        "branch= wins"
    );
    let remote_refs = git(
        context.root(),
        &["for-each-ref", "--format=%(refname)", "refs/remotes"],
    );
    assert_eq!(remote_refs, "refs/remotes/origin/dev");

    let mut options = ContextOptions::new(&fx.work);
    let context = open_context(&app, &options).await.unwrap();
    let remote_refs = git(
        context.root(),
        &["for-each-ref", "--format=%(refname)", "refs/remotes"],
    );
    assert!(remote_refs.contains("origin/dev") && remote_refs.contains("origin/main"));

    options.source.git.apply("recurse-submodules=true").unwrap();
    let context = open_context(&app, &options).await.unwrap();
    assert_eq!(
        read(context.root(), "vendor/lib/lib.txt").as_deref(),
        Some("lib\n")
    );

    // The sub-path applies inside the clone.
    options.sub_path = Some("vendor/lib".into());
    let context = open_context(&app, &options).await.unwrap();
    assert!(context.root().join("lib.txt").is_file());
}

#[tokio::test]
async fn git_failures_name_the_source_and_hide_credentials() {
    let fx = fixture();
    let options = ContextOptions::new(&fx.work);

    let spec = format!("{}#no-such-branch", fx.daemon.url("app.git"));
    let err = open_context(&spec, &options).await.unwrap_err();
    assert!(matches!(err, ContextError::Git { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&spec) && message.contains("no-such-branch"),
        "{message}"
    );

    let err = open_context(&fx.daemon.url("missing.git"), &options)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.git"), "{err}");

    let pinned = format!("{}#main#{}", fx.daemon.url("app.git"), "0".repeat(40));
    assert!(open_context(&pinned, &options).await.is_err());

    // Nothing listens on port 1: git fails, and neither user nor password leak.
    let secret = "https://kiln-user:hunter22-token@127.0.0.1:1/private/repo.git#main";
    let err = open_context(secret, &options).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("hunter22") && !shown.contains("kiln-user"),
        "{shown}"
    );
    assert!(shown.contains("127.0.0.1:1/private/repo.git"), "{shown}");

    // Nothing is left behind in the work directory by failed clones.
    let leftovers = fs::read_dir(&fx.work).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0);
}

/// ADD's git sources: refs resolved with ls-remote before anything is fetched, then exactly
/// that commit checked out with its submodules.
#[test]
fn git_repositories_for_add_resolve_then_check_out_one_commit() {
    use kiln_context::GitRepository;
    let fx = fixture();
    let app = fx.daemon.url("app.git");
    fs::create_dir_all(&fx.work).unwrap();
    let main = git(
        &fx.work.parent().unwrap().join("app"),
        &["rev-parse", "main"],
    );

    for (source, commit) in [
        (app.clone(), main.as_str()),
        (format!("{app}#main"), main.as_str()),
        (format!("{app}#v1"), fx.first_commit.as_str()),
        (format!("{app}#refs/tags/v1"), fx.first_commit.as_str()),
        (
            format!("{app}#{}", fx.first_commit),
            fx.first_commit.as_str(),
        ),
    ] {
        let repo = GitRepository::parse(&source).unwrap();
        assert_eq!(repo.resolve().unwrap().id, commit, "{source}");
    }

    // The default branch with its submodule, checked out at the resolved commit.
    let repo = GitRepository::parse(&app).unwrap();
    let pinned = repo.resolve().unwrap();
    let root = fx.work.join("main");
    repo.checkout(&pinned, &root).unwrap();
    assert_eq!(read(&root, "a.txt").as_deref(), Some("two\n"));
    assert_eq!(read(&root, "vendor/lib/lib.txt").as_deref(), Some("lib\n"));
    assert_eq!(git(&root, &["rev-parse", "HEAD"]), main);

    // A commit id, which git daemon does not hand out by id: the whole history is fetched.
    let repo = GitRepository::parse(&format!("{app}#{}:", fx.first_commit)).unwrap();
    let root = fx.work.join("by-id");
    repo.checkout(&repo.resolve().unwrap(), &root).unwrap();
    assert_eq!(read(&root, "a.txt").as_deref(), Some("one\n"));
    assert_eq!(repo.subdir(), Path::new("."));

    // A ref the remote does not have, and a repository that does not exist.
    let missing = GitRepository::parse(&format!("{app}#no-such-branch")).unwrap();
    let error = missing.resolve().unwrap_err().to_string();
    assert!(error.contains("no ref \"no-such-branch\""), "{error}");
    let gone = GitRepository::parse(&fx.daemon.url("gone.git")).unwrap();
    let error = gone.resolve().unwrap_err().to_string();
    assert!(error.contains("ls-remote"), "{error}");
}

/// What a checkout writes stays in its directory: symlinks are created as symlinks (never
/// followed on the host), executable bits are kept, and a tree that puts a file below a
/// symlink of its own (`link -> /outside`, `link/x`), which git's fsck would reject but a
/// server still sends, fails the checkout without writing through the link.
#[test]
fn checkouts_keep_links_and_modes_and_write_nothing_outside() {
    use kiln_context::GitRepository;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&served).unwrap();
    fs::create_dir(&outside).unwrap();
    let daemon = Daemon::start(&served);

    let app = tmp.path().join("app");
    fs::create_dir(&app).unwrap();
    git(&app, &["init", "-q"]);
    fs::write(app.join("run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(app.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", app.join("passwd")).unwrap();
    std::os::unix::fs::symlink(&outside, app.join("out")).unwrap();
    git(&app, &["add", "."]);
    git(&app, &["commit", "-q", "-m", "links"]);
    git(
        tmp.path(),
        &["clone", "-q", "--bare", "app", "served/app.git"],
    );

    let hostile = served.join("hostile.git");
    git(
        tmp.path(),
        &["init", "-q", "--bare", hostile.to_str().unwrap()],
    );
    let object = |kind: &str, input: &str| {
        let mut child = std::process::Command::new("git")
            .arg("-C")
            .arg(&hostile)
            .args(["hash-object", "-w", "--stdin", "-t", kind])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let target = object("blob", outside.to_str().unwrap());
    let payload = object("blob", "written through the link\n");
    let below = mktree(&hostile, &format!("100644 blob {payload}\tx\n"));
    let root = mktree(
        &hostile,
        &format!("120000 blob {target}\tlink\n040000 tree {below}\tlink\n"),
    );
    let commit = git(&hostile, &["commit-tree", &root, "-m", "hostile"]);
    git(&hostile, &["update-ref", "refs/heads/main", &commit]);
    git(&hostile, &["symbolic-ref", "HEAD", "refs/heads/main"]);

    let repo = GitRepository::parse(&daemon.url("app.git")).unwrap();
    let dir = tmp.path().join("checkout");
    repo.checkout(&repo.resolve().unwrap(), &dir).unwrap();
    assert_eq!(
        fs::read_link(dir.join("passwd")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(fs::read_link(dir.join("out")).unwrap(), outside);
    let mode = fs::metadata(dir.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "{mode:o}");
    assert_eq!(git(&dir, &["status", "--porcelain"]), "", "a usable .git");

    let repo = GitRepository::parse(&daemon.url("hostile.git")).unwrap();
    let dir = tmp.path().join("hostile");
    let error = repo
        .checkout(&repo.resolve().unwrap(), &dir)
        .unwrap_err()
        .to_string();
    assert!(error.contains("checkout failed"), "{error}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

    let options = ContextOptions::new(tmp.path().join("work"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let error = rt
        .block_on(open_context(&daemon.url("hostile.git"), &options))
        .err()
        .map(|e| e.to_string());
    assert!(
        error
            .as_ref()
            .is_some_and(|e| e.contains("checkout failed")),
        "{error:?}"
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

/// `git mktree` of `entries` in `repo`, duplicates and all.
fn mktree(repo: &Path, entries: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .arg("mktree")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(entries.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Repositories in git's SHA-256 object format work as SHA-1 ones do: as a context, and as an
/// ADD source by ref and by full commit id.
#[tokio::test]
async fn sha256_repositories() {
    use kiln_context::GitRepository;
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    fs::create_dir(&served).unwrap();
    let daemon = Daemon::start(&served);
    let app = tmp.path().join("app");
    fs::create_dir(&app).unwrap();
    git(&app, &["init", "-q", "--object-format=sha256"]);
    fs::write(app.join("a.txt"), "one\n").unwrap();
    git(&app, &["add", "."]);
    git(&app, &["commit", "-q", "-m", "first"]);
    let id = git(&app, &["rev-parse", "HEAD"]);
    assert_eq!(id.len(), 64);
    git(
        tmp.path(),
        &["clone", "-q", "--bare", "app", "served/app.git"],
    );
    let url = daemon.url("app.git");

    let context = open_context(&url, &ContextOptions::new(tmp.path().join("work")))
        .await
        .unwrap();
    assert_eq!(read(context.root(), "a.txt").as_deref(), Some("one\n"));
    for (n, source) in [format!("{url}#main"), format!("{url}#{id}")]
        .iter()
        .enumerate()
    {
        let repo = GitRepository::parse(source).unwrap();
        let commit = repo.resolve().unwrap();
        assert_eq!(commit.id, id, "{source}");
        let dir = tmp.path().join(format!("add-{n}"));
        repo.checkout(&commit, &dir).unwrap();
        assert_eq!(read(&dir, "a.txt").as_deref(), Some("one\n"), "{source}");
    }
}
