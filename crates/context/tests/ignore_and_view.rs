//! `.dockerignore` semantics on a real tree, `NAME.dockerignore` precedence, and COPY source
//! resolution.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use kiln_context::{open_dir, BuildContext, ContextError, DockerIgnore};

const FILES: &[&str] = &[
    "README.md",
    "Dockerfile",
    ".dockerignore",
    "docs/guide.md",
    "docs/img/logo.png",
    "src/main.rs",
    "src/lib.rs",
    "src/notes.md",
    "src/gen/out.rs",
    "target/debug/app",
    "target/keep.txt",
    "build/a.o",
    "build/sub/b.o",
    "node_modules/x/index.js",
    ".git/HEAD",
    "secret.env",
    "config/app.env",
    "config/keep.env",
    "dir.md/inner.txt",
    "a[1].txt",
];

fn make_tree(root: &Path) {
    for file in FILES {
        let path = root.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, file.as_bytes()).unwrap();
    }
}

/// The regular files a COPY of the whole context would see with these ignore patterns.
fn included(root: &Path, patterns: &str) -> BTreeSet<String> {
    let ignore = DockerIgnore::parse(patterns, Path::new(".dockerignore")).unwrap();
    let context = BuildContext::new(root, ignore).unwrap();
    let sources = context.resolve_sources(".").unwrap();
    context
        .walk(sources[0].entry())
        .unwrap()
        .into_iter()
        .filter(|e| !e.is_dir())
        .map(|e| e.rel().to_owned())
        .collect()
}

fn all_but(excluded: &[&str]) -> BTreeSet<String> {
    FILES
        .iter()
        .filter(|f| !excluded.contains(f))
        .map(|f| f.to_string())
        .collect()
}

fn only(files: &[&str]) -> BTreeSet<String> {
    files.iter().map(|f| f.to_string()).collect()
}

#[test]
fn dockerignore_table() {
    let tmp = tempfile::tempdir().unwrap();
    make_tree(tmp.path());
    let cases: Vec<(&str, BTreeSet<String>)> = vec![
        ("", all_but(&[])),
        // `*.md` is anchored at the root; `**/*.md` reaches any depth (and a dir named x.md).
        ("*.md", all_but(&["README.md", "dir.md/inner.txt"])),
        (
            "**/*.md",
            all_but(&[
                "README.md",
                "docs/guide.md",
                "src/notes.md",
                "dir.md/inner.txt",
            ]),
        ),
        // An exception inside an excluded directory re-includes just that file.
        ("target\n!target/keep.txt", all_but(&["target/debug/app"])),
        ("target\n!target/debug/app", all_but(&["target/keep.txt"])),
        // Leading `/`, `./` and trailing `/` are cleaned away.
        (
            "/build/\n./node_modules\n.git/",
            all_but(&[
                "build/a.o",
                "build/sub/b.o",
                "node_modules/x/index.js",
                ".git/HEAD",
            ]),
        ),
        // The last matching line wins.
        (
            "*.env\n!config/*.env\nconfig/app.env",
            all_but(&["secret.env", "config/app.env"]),
        ),
        (
            "*.env\nconfig/*.env\n!config/*.env",
            all_but(&["secret.env"]),
        ),
        // Exclude everything, then re-include: Docker's "allow list" idiom.
        (
            "**\n!src\n!Dockerfile",
            only(&[
                "Dockerfile",
                "src/main.rs",
                "src/lib.rs",
                "src/notes.md",
                "src/gen/out.rs",
            ]),
        ),
        ("*\n!src/gen", only(&["src/gen/out.rs"])),
        (
            "src/**/*.rs",
            all_but(&["src/main.rs", "src/lib.rs", "src/gen/out.rs"]),
        ),
        ("*/*.rs", all_but(&["src/main.rs", "src/lib.rs"])),
        ("**/gen", all_but(&["src/gen/out.rs"])),
        // Comments, blank lines and surrounding spaces.
        (
            "# comment\n\n   docs   \n!docs/img\n",
            all_but(&["docs/guide.md"]),
        ),
        ("#README.md\n", all_but(&[])),
        // An exception with a wildcard only reaches what it names.
        ("build\n!build/*.o", all_but(&["build/sub/b.o"])),
        // `?`, classes and escapes are Go's.
        (
            "?ocs\nconfig/[a-j]*.env",
            all_but(&["docs/guide.md", "docs/img/logo.png", "config/app.env"]),
        ),
        ("a\\[1\\].txt", all_but(&["a[1].txt"])),
        ("!README.md", all_but(&[])),
        (".*", all_but(&[".dockerignore", ".git/HEAD"])),
        ("**/*.o\n!**/b.o", all_but(&["build/a.o"])),
    ];
    for (patterns, want) in cases {
        assert_eq!(
            included(tmp.path(), patterns),
            want,
            "patterns {patterns:?}"
        );
    }
}

#[test]
fn excluded_directories_with_exceptions_are_listed_as_parents() {
    let tmp = tempfile::tempdir().unwrap();
    make_tree(tmp.path());
    let ignore = DockerIgnore::parse("target\n!target/debug/app", Path::new("x")).unwrap();
    let context = BuildContext::new(tmp.path(), ignore).unwrap();
    let root = context.resolve_sources(".").unwrap();
    let listed: Vec<String> = context
        .walk(root[0].entry())
        .unwrap()
        .into_iter()
        .map(|e| e.rel().to_owned())
        .filter(|r| r.starts_with("target"))
        .collect();
    assert_eq!(listed, ["target", "target/debug", "target/debug/app"]);
}

#[test]
fn dockerfile_specific_ignore_file_takes_precedence() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fs::create_dir(root.join("x")).unwrap();
    for f in ["a.txt", "b.txt", "x/app.Dockerfile", "x/other.Dockerfile"] {
        fs::write(root.join(f), f).unwrap();
    }
    fs::write(root.join(".dockerignore"), "a.txt\n").unwrap();
    fs::write(root.join("x/app.Dockerfile.dockerignore"), "b.txt\n").unwrap();

    let specific = open_dir(root, Some(&root.join("x/app.Dockerfile"))).unwrap();
    assert!(!specific.ignore().is_excluded("a.txt"));
    assert!(specific.ignore().is_excluded("b.txt"));
    assert_eq!(
        specific.ignore().file().unwrap(),
        root.join("x/app.Dockerfile.dockerignore")
    );

    let fallback = open_dir(root, Some(&root.join("x/other.Dockerfile"))).unwrap();
    assert!(fallback.ignore().is_excluded("a.txt"));
    assert!(!fallback.ignore().is_excluded("b.txt"));

    let plain = open_dir(root, None).unwrap();
    assert!(plain.ignore().is_excluded("a.txt"));
}

#[test]
fn the_dockerfile_and_ignore_file_can_be_excluded() {
    let tmp = tempfile::tempdir().unwrap();
    make_tree(tmp.path());
    fs::write(
        tmp.path().join(".dockerignore"),
        "Dockerfile\n.dockerignore\n",
    )
    .unwrap();
    let context = open_dir(tmp.path(), Some(&tmp.path().join("Dockerfile"))).unwrap();
    // Only COPY is affected: the files are still on disk for the front end to read.
    assert!(matches!(
        context.resolve_sources("Dockerfile").unwrap_err(),
        ContextError::NotFound { .. }
    ));
    assert!(context.root().join("Dockerfile").is_file());
    assert!(context.resolve_sources(".dockerignore").is_err());
}

fn matched(context: &BuildContext, source: &str) -> Vec<String> {
    context
        .resolve_sources(source)
        .unwrap()
        .iter()
        .map(|m| m.matched().to_owned())
        .collect()
}

#[test]
fn copy_sources_resolve_with_wildcards_ignores_and_containment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ctx");
    make_tree(&root);
    fs::write(tmp.path().join("host-secret"), "host").unwrap();
    symlink("/etc", root.join("abs-link")).unwrap();
    symlink("../../host-secret", root.join("docs/rel-link")).unwrap();
    symlink("src", root.join("src-link")).unwrap();
    fs::write(root.join(".dockerignore"), "secret.env\nsrc/notes.md\n").unwrap();
    let context = open_dir(&root, None).unwrap();

    assert_eq!(matched(&context, "src/*.rs"), ["src/lib.rs", "src/main.rs"]);
    assert_eq!(
        matched(&context, "src/*"),
        ["src/gen", "src/lib.rs", "src/main.rs"]
    );
    assert_eq!(matched(&context, "*/*.o"), ["build/a.o"]);
    assert_eq!(matched(&context, "*.env"), Vec::<String>::new());
    assert_eq!(matched(&context, "config/?eep.env"), ["config/keep.env"]);
    assert_eq!(matched(&context, "/README.md"), ["README.md"]);
    assert_eq!(matched(&context, "./docs/"), ["docs"]);
    assert_eq!(matched(&context, "."), ["."]);
    // `..` is clamped at the context root, as BuildKit does.
    assert_eq!(matched(&context, "../../README.md"), ["README.md"]);
    // Through a symlinked directory, the matched name is kept and the entry resolved.
    let through = context.resolve_sources("src-link/main.rs").unwrap();
    assert_eq!(through[0].matched(), "src-link/main.rs");
    assert_eq!(through[0].entry().rel(), "src/main.rs");

    // Symlinks never lead out of the context: absolute targets and `..` stay inside.
    let err = context.resolve_sources("abs-link/passwd").unwrap_err();
    assert!(matches!(err, ContextError::NotFound { .. }), "{err}");
    let err = context.resolve_sources("docs/rel-link").unwrap_err();
    assert!(matches!(err, ContextError::NotFound { .. }), "{err}");
    let rel = context.resolve_in_root("docs/rel-link").unwrap();
    assert_eq!(rel.as_deref(), Some(Path::new("host-secret")));

    // Ignored files cannot be copied by name.
    assert!(matches!(
        context.resolve_sources("secret.env").unwrap_err(),
        ContextError::NotFound { .. }
    ));
    assert!(context.resolve_sources("src/[").is_err());

    // Walking a matched directory honours the ignore file.
    let src = context.resolve_sources("src").unwrap();
    let walked: Vec<String> = context
        .walk(src[0].entry())
        .unwrap()
        .iter()
        .map(|e| e.rel().to_owned())
        .collect();
    assert_eq!(
        walked,
        ["src/gen", "src/gen/out.rs", "src/lib.rs", "src/main.rs"]
    );
}
