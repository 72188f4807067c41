//! Directory and tarball contexts, `--context-sub-path`, and safe extraction of hostile
//! archives.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use kiln_context::{open_context, ContextError, ContextOptions};

/// A small context tree with a nested directory, an executable and a symlink.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("app/bin")).unwrap();
    fs::write(root.join("Dockerfile"), "FROM scratch\nCOPY . /\n").unwrap();
    fs::write(root.join("app/main.txt"), "hello\n").unwrap();
    fs::write(root.join("app/bin/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(
        root.join("app/bin/run.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("main.txt", root.join("app/link")).unwrap();
}

fn run(command: &mut Command) {
    let status = command.status().unwrap();
    assert!(status.success(), "{command:?} failed: {status}");
}

fn assert_tree(root: &Path) {
    assert_eq!(
        fs::read_to_string(root.join("app/main.txt")).unwrap(),
        "hello\n"
    );
    let mode = fs::metadata(root.join("app/bin/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        fs::read_link(root.join("app/link")).unwrap(),
        Path::new("main.txt")
    );
}

#[tokio::test]
async fn directory_contexts_plain_and_dir_scheme() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    make_tree(&ctx);
    let options = ContextOptions::new(tmp.path().join("work"));

    for spec in [
        ctx.display().to_string(),
        format!("dir://{}", ctx.display()),
    ] {
        let context = open_context(&spec, &options).await.unwrap();
        assert_eq!(context.root(), fs::canonicalize(&ctx).unwrap());
        assert_tree(context.root());
    }

    let missing = format!("dir://{}/nope", tmp.path().display());
    let err = open_context(&missing, &options).await.unwrap_err();
    assert!(matches!(err, ContextError::NotADirectory { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn tarball_contexts_plain_and_gzip() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    make_tree(&ctx);
    let plain = tmp.path().join("ctx.tar");
    let gzip = tmp.path().join("ctx.tgz-without-telling-extension");
    run(Command::new("tar")
        .arg("-C")
        .arg(&ctx)
        .arg("-cf")
        .arg(&plain)
        .arg("."));
    run(Command::new("tar")
        .arg("-C")
        .arg(&ctx)
        .arg("-czf")
        .arg(&gzip)
        .arg("."));

    let work = tmp.path().join("work");
    let options = ContextOptions::new(&work);
    for archive in [&plain, &gzip] {
        let context = open_context(&format!("tar://{}", archive.display()), &options)
            .await
            .unwrap();
        assert!(context.root().starts_with(fs::canonicalize(&work).unwrap()));
        assert_tree(context.root());
        let root = context.root().to_owned();
        drop(context);
        assert!(!root.exists(), "extracted context is removed on drop");
    }

    let err = open_context(
        &format!("tar://{}/missing.tar", tmp.path().display()),
        &options,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("missing.tar"), "{err}");
}

#[tokio::test]
async fn sub_path_selects_a_directory_inside_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    make_tree(&ctx);
    fs::create_dir(tmp.path().join("outside")).unwrap();
    symlink(tmp.path().join("outside"), ctx.join("escape")).unwrap();
    symlink("app/bin", ctx.join("inner-link")).unwrap();
    let spec = ctx.display().to_string();

    let mut options = ContextOptions::new(tmp.path().join("work"));
    options.sub_path = Some("app".into());
    let context = open_context(&spec, &options).await.unwrap();
    assert_eq!(context.root(), fs::canonicalize(ctx.join("app")).unwrap());

    options.sub_path = Some("inner-link".into());
    let context = open_context(&spec, &options).await.unwrap();
    assert_eq!(
        context.root(),
        fs::canonicalize(ctx.join("app/bin")).unwrap()
    );

    for bad in [
        "../outside",
        "app/../../outside",
        "escape",
        "missing",
        "Dockerfile",
    ] {
        options.sub_path = Some(bad.into());
        let err = open_context(&spec, &options).await.unwrap_err();
        assert!(matches!(err, ContextError::SubPath { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(bad), "{err}");
    }

    // The sub-path also applies to archives, after extraction.
    let archive = tmp.path().join("ctx.tar.gz");
    run(Command::new("tar")
        .arg("-C")
        .arg(&ctx)
        .arg("-czf")
        .arg(&archive)
        .arg("."));
    options.sub_path = Some("app/bin".into());
    let context = open_context(&format!("tar://{}", archive.display()), &options)
        .await
        .unwrap();
    assert!(context.root().join("run.sh").is_file());
}

/// Appends an entry with exactly the given raw name, bypassing the tar crate's own checks
/// (a hostile archive is written by a hostile tool).
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    if let Some(link) = link {
        header.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
    }
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

async fn extract(archive: Vec<u8>, tmp: &Path, name: &str) -> Result<(), ContextError> {
    let path = tmp.join(name);
    fs::write(&path, archive).unwrap();
    let options = ContextOptions::new(tmp.join("work"));
    open_context(&format!("tar://{}", path.display()), &options)
        .await
        .map(drop)
}

#[tokio::test]
async fn hostile_tarballs_are_rejected() {
    use tar::EntryType;
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let outside_bytes = outside.as_os_str().as_encoded_bytes().to_vec();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", {
            let mut b = tar::Builder::new(Vec::new());
            raw_entry(&mut b, b"../../escaped.txt", EntryType::Regular, None, b"x");
            b.into_inner().unwrap()
        }),
        ("absolute", {
            let mut b = tar::Builder::new(Vec::new());
            let name = format!("{}/abs.txt", outside.display());
            raw_entry(&mut b, name.as_bytes(), EntryType::Regular, None, b"x");
            b.into_inner().unwrap()
        }),
        ("through-symlink", {
            let mut b = tar::Builder::new(Vec::new());
            raw_entry(
                &mut b,
                b"link",
                EntryType::Symlink,
                Some(&outside_bytes),
                b"",
            );
            raw_entry(&mut b, b"link/pwned.txt", EntryType::Regular, None, b"x");
            b.into_inner().unwrap()
        }),
        ("hardlink-out", {
            let mut b = tar::Builder::new(Vec::new());
            raw_entry(
                &mut b,
                b"hl",
                EntryType::Link,
                Some(b"../../../etc/passwd"),
                b"",
            );
            b.into_inner().unwrap()
        }),
        ("hardlink-through-symlink", {
            let mut b = tar::Builder::new(Vec::new());
            raw_entry(
                &mut b,
                b"link",
                EntryType::Symlink,
                Some(&outside_bytes),
                b"",
            );
            raw_entry(&mut b, b"hl", EntryType::Link, Some(b"link/secret"), b"");
            b.into_inner().unwrap()
        }),
    ];
    fs::write(outside.join("secret"), "secret").unwrap();
    for (name, archive) in cases {
        let err = extract(archive, tmp.path(), name).await.unwrap_err();
        assert!(
            matches!(err, ContextError::UnsafeArchiveEntry { .. }),
            "{name}: {err}"
        );
    }
    let mut leftovers: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    leftovers.sort();
    assert_eq!(leftovers, vec!["secret"], "nothing was written outside");
    assert!(!tmp.path().join("escaped.txt").exists());
}

#[tokio::test]
async fn directory_modes_are_never_applied_through_a_later_symlink() {
    use tar::EntryType;
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let outside_bytes = outside.as_os_str().as_encoded_bytes().to_vec();
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.as_gnu_mut().unwrap().name[..2].copy_from_slice(b"d/");
    dir.set_entry_type(EntryType::Directory);
    dir.set_size(0);
    dir.set_mode(0o700);
    dir.set_mtime(0);
    dir.set_cksum();
    b.append(&dir, &[][..]).unwrap();
    raw_entry(&mut b, b"d", EntryType::Symlink, Some(&outside_bytes), b"");
    let archive_path = tmp.path().join("swap.tar");
    fs::write(&archive_path, b.into_inner().unwrap()).unwrap();
    let before = fs::metadata(&outside).unwrap().modified().unwrap();
    let options = ContextOptions::new(tmp.path().join("work"));
    let context = open_context(&format!("tar://{}", archive_path.display()), &options)
        .await
        .unwrap();
    assert!(fs::symlink_metadata(context.root().join("d"))
        .unwrap()
        .file_type()
        .is_symlink());
    let after = fs::metadata(&outside).unwrap();
    assert_eq!(after.permissions().mode() & 0o777, 0o755);
    assert_eq!(after.modified().unwrap(), before);
}

#[tokio::test]
async fn a_file_entry_replaces_a_symlink_instead_of_writing_through_it() {
    use tar::EntryType;
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim.txt");
    fs::write(&victim, "original").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(
        &mut b,
        b"x",
        EntryType::Symlink,
        Some(victim.as_os_str().as_encoded_bytes()),
        b"",
    );
    raw_entry(&mut b, b"x", EntryType::Regular, None, b"replaced");
    let archive_path = tmp.path().join("replace.tar");
    fs::write(&archive_path, b.into_inner().unwrap()).unwrap();
    let options = ContextOptions::new(tmp.path().join("work"));
    let context = open_context(&format!("tar://{}", archive_path.display()), &options)
        .await
        .unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "original");
    let x = context.root().join("x");
    assert!(fs::symlink_metadata(&x).unwrap().is_file());
    assert_eq!(fs::read_to_string(&x).unwrap(), "replaced");
}
