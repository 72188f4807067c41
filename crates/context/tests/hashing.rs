//! Content hashes of context sources for cache keys.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use kiln_context::{open_dir, ContentDigest, ContextHasher, DockerIgnore, HashOptions};

/// A modification applied to a fresh copy of the tree.
type Change = Box<dyn Fn(&Path)>;

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("app/lib")).unwrap();
    fs::write(root.join("app/main.txt"), "main").unwrap();
    fs::write(root.join("app/lib/util.txt"), "util").unwrap();
    fs::write(root.join("app/big.bin"), vec![7u8; 3 << 20]).unwrap();
    symlink("main.txt", root.join("app/link")).unwrap();
    fs::write(root.join("other.txt"), "other").unwrap();
}

fn hash(root: &Path, source: &str, options: HashOptions) -> ContentDigest {
    let context = open_dir(root, None).unwrap();
    let sources = context.resolve_sources(source).unwrap();
    context
        .hash_sources(&ContextHasher::new(), &sources, options)
        .unwrap()
}

fn fresh(name: &str, tmp: &Path) -> std::path::PathBuf {
    let root = tmp.join(name);
    make_tree(&root);
    root
}

#[test]
fn hash_is_stable_across_copies_and_changes_with_every_observable_property() {
    let tmp = tempfile::tempdir().unwrap();
    let defaults = HashOptions::default();
    let base_root = fresh("base", tmp.path());
    let base = hash(&base_root, "app", defaults);
    assert_eq!(base.to_string().len(), "sha256:".len() + 64);

    // The same tree elsewhere (and with other mtimes) hashes the same.
    let copy = tmp.path().join("copy");
    let status = Command::new("cp")
        .arg("-r")
        .arg(&base_root)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(hash(&copy, "app", defaults), base);
    assert_eq!(hash(&base_root, "app", defaults), base, "deterministic");

    let changes: Vec<(&str, Change)> = vec![
        (
            "content",
            Box::new(|r| fs::write(r.join("app/lib/util.txt"), "UTIL").unwrap()),
        ),
        (
            "content of a large file",
            Box::new(|r| {
                let mut data = vec![7u8; 3 << 20];
                data[2 << 20] = 8;
                fs::write(r.join("app/big.bin"), data).unwrap()
            }),
        ),
        (
            "name",
            Box::new(|r| {
                fs::rename(r.join("app/lib/util.txt"), r.join("app/lib/utils.txt")).unwrap()
            }),
        ),
        (
            "directory name",
            Box::new(|r| fs::rename(r.join("app/lib"), r.join("app/lib2")).unwrap()),
        ),
        (
            "mode",
            Box::new(|r| {
                fs::set_permissions(r.join("app/main.txt"), fs::Permissions::from_mode(0o600))
                    .unwrap()
            }),
        ),
        (
            "directory mode",
            Box::new(|r| {
                fs::set_permissions(r.join("app/lib"), fs::Permissions::from_mode(0o700)).unwrap()
            }),
        ),
        (
            "symlink target",
            Box::new(|r| {
                fs::remove_file(r.join("app/link")).unwrap();
                symlink("lib/util.txt", r.join("app/link")).unwrap();
            }),
        ),
        (
            "file becomes symlink",
            Box::new(|r| {
                fs::remove_file(r.join("app/main.txt")).unwrap();
                symlink("main", r.join("app/main.txt")).unwrap();
            }),
        ),
        (
            "added empty file",
            Box::new(|r| fs::write(r.join("app/empty"), "").unwrap()),
        ),
        (
            "removed file",
            Box::new(|r| fs::remove_file(r.join("app/lib/util.txt")).unwrap()),
        ),
    ];
    for (index, (what, change)) in changes.iter().enumerate() {
        let root = fresh(&format!("changed-{index}"), tmp.path());
        assert_eq!(
            hash(&root, "app", defaults),
            base,
            "{what}: before the change"
        );
        change(&root);
        assert_ne!(
            hash(&root, "app", defaults),
            base,
            "{what} must change the hash"
        );
    }

    // Files outside the sources, and mtimes, don't matter.
    let root = fresh("unrelated", tmp.path());
    fs::write(root.join("other.txt"), "changed").unwrap();
    let file = fs::File::options()
        .write(true)
        .open(root.join("app/main.txt"))
        .unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(hash(&root, "app", defaults), base);

    // Excluded files don't matter either.
    let root = fresh("ignored", tmp.path());
    fs::write(root.join(".dockerignore"), "app/lib\n").unwrap();
    let with_ignore = hash(&root, "app", defaults);
    assert_ne!(with_ignore, base);
    fs::write(root.join("app/lib/util.txt"), "changed but ignored").unwrap();
    assert_eq!(hash(&root, "app", defaults), with_ignore);
}

/// Hashes the sources `names` of one step together (as `COPY a b /dst/` does).
fn hash_of(root: &Path, names: &[&str]) -> ContentDigest {
    let context = open_dir(root, None).unwrap();
    let mut sources = Vec::new();
    for name in names {
        sources.extend(context.resolve_sources(name).unwrap());
    }
    context
        .hash_sources(&ContextHasher::new(), &sources, HashOptions::default())
        .unwrap()
}

#[test]
fn which_names_share_an_inode_is_part_of_the_hash() {
    let tmp = tempfile::tempdir().unwrap();
    // Two trees alike in every name, content, mode and mtime: in one, d/a and d/b are hard
    // links of one file (a copy keeps them linked), in the other separate files.
    let same_mtime = |path: &Path| {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000))
            .unwrap();
    };
    let make = |name: &str, linked: bool| {
        let root = tmp.path().join(name);
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/a"), "shared").unwrap();
        if linked {
            fs::hard_link(root.join("d/a"), root.join("d/b")).unwrap();
        } else {
            fs::write(root.join("d/b"), "shared").unwrap();
        }
        same_mtime(&root.join("d/a"));
        same_mtime(&root.join("d/b"));
        root
    };
    let linked = make("linked", true);
    let separate = make("separate", false);
    assert_ne!(hash_of(&linked, &["d"]), hash_of(&separate, &["d"]));
    assert_eq!(
        hash_of(&linked, &["d"]),
        hash_of(&make("linked-again", true), &["d"])
    );
    // Across the sources of one step too: the copy links the second name to the first.
    assert_ne!(
        hash_of(&linked, &["d/a", "d/b"]),
        hash_of(&separate, &["d/a", "d/b"])
    );
    // A link to a file outside the sources is not copied, so it does not change the key.
    fs::hard_link(separate.join("d/a"), separate.join("outside")).unwrap();
    let alone = make("alone", false);
    assert_eq!(hash_of(&separate, &["d"]), hash_of(&alone, &["d"]));
    assert_eq!(hash_of(&linked, &["d/a"]), hash_of(&alone, &["d/a"]));
}

#[test]
fn renaming_a_wildcard_source_changes_the_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fresh("r", tmp.path());
    let before = hash(&root, "*.txt", HashOptions::default());
    fs::rename(root.join("other.txt"), root.join("renamed.txt")).unwrap();
    assert_ne!(hash(&root, "*.txt", HashOptions::default()), before);
}

#[test]
fn owner_is_covered_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fresh("o", tmp.path());
    let without = hash(&root, "app", HashOptions::default());
    let with = hash(
        &root,
        "app",
        HashOptions {
            include_owner: true,
        },
    );
    assert_ne!(with, without, "the options are part of the hash");
    std::os::unix::fs::lchown(root.join("app/main.txt"), Some(4321), Some(8765)).unwrap();
    assert_eq!(hash(&root, "app", HashOptions::default()), without);
    assert_ne!(
        hash(
            &root,
            "app",
            HashOptions {
                include_owner: true
            }
        ),
        with
    );
}

#[test]
fn files_are_read_once_per_build() {
    let tmp = tempfile::tempdir().unwrap();
    let root = fresh("m", tmp.path());
    let context = open_dir(&root, None).unwrap();
    let hasher = ContextHasher::new();
    let app = context.resolve_sources("app").unwrap();
    let main = context.resolve_sources("app/main.txt").unwrap();
    let first = context
        .hash_sources(&hasher, &app, HashOptions::default())
        .unwrap();
    assert_eq!(hasher.files_read(), 3);
    context
        .hash_sources(&hasher, &main, HashOptions::default())
        .unwrap();
    assert_eq!(
        context
            .hash_sources(&hasher, &app, HashOptions::default())
            .unwrap(),
        first
    );
    assert_eq!(hasher.files_read(), 3, "memoised");
    // A changed file (new size/mtime) is read again.
    fs::write(root.join("app/main.txt"), "main, longer").unwrap();
    let changed = context
        .hash_sources(&hasher, &app, HashOptions::default())
        .unwrap();
    assert_ne!(changed, first);
    assert_eq!(hasher.files_read(), 4);
}

#[test]
fn whole_directory_hash_for_other_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let a = fresh("a", tmp.path());
    let b = fresh("b", tmp.path());
    fs::write(a.join(".dockerignore"), "other.txt\n").unwrap();
    fs::write(b.join(".dockerignore"), "other.txt\n").unwrap();
    let hasher = ContextHasher::new();
    let hash = |dir: &Path| {
        let root = kiln_fs::resolve::Root::open(dir).unwrap();
        hasher
            .hash_directory(&root, Path::new(""), HashOptions::default())
            .unwrap()
    };
    let da = hash(&a);
    assert_eq!(hash(&b), da);
    // No ignore rules apply to a stage's filesystem.
    fs::write(b.join("other.txt"), "x").unwrap();
    assert_ne!(hash(&b), da);
    let _ = DockerIgnore::empty();
}
