//! Cache keys at the key level: real Dockerfiles lowered into plans by kiln-dockerfile, real
//! context files hashed by kiln-context, keys chained by kiln-cache the way the engine does it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln_cache::{
    run_environment, CacheKey, CopyInput, FileEntry, FileKind, KeyChain, Parent, RemoteSource,
    RemoteValidator, RunInput, SourceContent, StepInput,
};
use kiln_context::{open_dir, ContextHasher, HashOptions};
use kiln_dockerfile::{Dockerfile, PlanOptions};
use kiln_oci::{Digest, Platform};
use kiln_plan::{BaseFacts, ConfigEdit, CopySource, Operation, StageFiles, Step};

struct NoStages;

impl StageFiles for NoStages {
    fn read(&self, _: usize, _: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    fn list(&self, _: usize, _: &str) -> Result<Option<Vec<String>>, String> {
        Ok(None)
    }
}

/// The target stage's steps of `dockerfile` with `build_args`, on a base without environment.
fn steps_of(dockerfile: &str, build_args: &BTreeMap<String, String>) -> Vec<Step> {
    let parsed = Dockerfile::parse(dockerfile).unwrap();
    let options = PlanOptions {
        build_args: build_args.clone(),
        ..PlanOptions::default()
    };
    let plan = parsed.lower(dockerfile, "Dockerfile", &options).unwrap();
    let stage = plan.stage(plan.target()).unwrap();
    stage.steps.lower(&BaseFacts::default(), &NoStages).unwrap()
}

const DOCKERFILE: &str = r#"FROM busybox
COPY *.txt /files/
RUN echo one
ARG VERSION=1
ARG SRC=src
COPY ${SRC}/ /src/
RUN echo "two $VERSION"
ENV DONE=1
"#;

fn platform() -> Platform {
    Platform::parse("linux/amd64").unwrap()
}

fn base() -> Parent {
    Parent::Image(Digest::sha256_of(b"the busybox manifest"))
}

/// The engine's key computation for the target stage: plan with `build_args`, expand the
/// steps, hash COPY sources in `context`, chain the keys.
fn stage_keys(
    dockerfile: &str,
    build_args: &[(&str, &str)],
    context: &Path,
    keep_owner: bool,
) -> Vec<CacheKey> {
    let build_args: BTreeMap<String, String> = build_args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let steps = steps_of(dockerfile, &build_args);
    let build_context = open_dir(context, None).unwrap();
    let hasher = ContextHasher::new();
    let mut chain = KeyChain::new(base(), platform());
    steps
        .iter()
        .map(|step| {
            let input = match &step.operation {
                Operation::Run(run) => {
                    let declared: Vec<(String, Option<String>)> = run
                        .build_env
                        .iter()
                        .map(|(k, v)| (k.clone(), Some(v.clone())))
                        .collect();
                    StepInput::Run(RunInput {
                        run: run.clone(),
                        env: run_environment(&[], &declared, &BTreeMap::new()),
                        user: String::new(),
                        workdir: "/".into(),
                        shell: vec!["/bin/sh".into(), "-c".into()],
                        bind_contents: BTreeMap::new(),
                    })
                }
                Operation::Copy(copy) => {
                    let mut matches = Vec::new();
                    for source in &copy.sources {
                        if let CopySource::Path(path) = source {
                            matches.extend(build_context.resolve_sources(path).unwrap());
                        }
                    }
                    let digest = build_context
                        .hash_sources(
                            &hasher,
                            &matches,
                            HashOptions {
                                include_owner: keep_owner,
                            },
                        )
                        .unwrap();
                    StepInput::Copy(CopyInput {
                        copy: copy.clone(),
                        content: SourceContent::Tree(digest.0),
                        remote: Vec::new(),
                    })
                }
                Operation::Config(edit) => StepInput::Config(edit.clone()),
                other => panic!("unexpected {other:?}"),
            };
            chain.next_key(&input)
        })
        .collect()
}

fn context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "alpha\n").unwrap();
    std::fs::write(dir.path().join("b.txt"), "beta\n").unwrap();
    for sub in ["src", "src2"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        std::fs::write(dir.path().join(sub).join("main.c"), "int main;\n").unwrap();
    }
    dir
}

/// Index of the first step whose key differs; every later key must differ too (the chain).
fn first_change(before: &[CacheKey], after: &[CacheKey]) -> Option<usize> {
    assert_eq!(before.len(), after.len());
    let first = before.iter().zip(after).position(|(a, b)| a != b)?;
    for i in first..before.len() {
        assert_ne!(
            before[i], after[i],
            "step {i} kept its key after step {first} changed"
        );
    }
    Some(first)
}

// Steps of DOCKERFILE: 0 COPY *.txt, 1 RUN one, 2 COPY ${SRC}/, 3 RUN two, 4 ENV (ARG
// declarations are no steps: their values reach the runs that see them).

#[test]
fn same_inputs_give_the_same_keys() {
    let ctx = context();
    let a = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    let b = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(a, b);
    assert_eq!(a.len(), 5);
    // Touching a file without changing it does not bust anything.
    let file = std::fs::File::options()
        .append(true)
        .open(ctx.path().join("a.txt"))
        .unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(stage_keys(DOCKERFILE, &[], ctx.path(), false), a);
}

#[test]
fn copied_file_content_change_busts_that_copy_and_what_follows() {
    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    std::fs::write(ctx.path().join("a.txt"), "alphA\n").unwrap();
    let after = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(first_change(&before, &after), Some(0));

    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    std::fs::write(ctx.path().join("src/main.c"), "int main(void);\n").unwrap();
    let after = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(first_change(&before, &after), Some(2));
}

#[test]
fn copied_file_rename_busts_that_copy() {
    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    std::fs::rename(ctx.path().join("b.txt"), ctx.path().join("c.txt")).unwrap();
    let after = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(first_change(&before, &after), Some(0));

    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    std::fs::rename(ctx.path().join("src/main.c"), ctx.path().join("src/lib.c")).unwrap();
    let after = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(first_change(&before, &after), Some(2));
}

#[test]
fn copied_file_mode_change_busts_that_copy() {
    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    let path = ctx.path().join("src/main.c");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let after = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(first_change(&before, &after), Some(2));
}

#[test]
fn copied_file_owner_change_busts_that_copy_when_owners_are_kept() {
    let ctx = context();
    let path = ctx.path().join("a.txt");
    let kept_before = stage_keys(DOCKERFILE, &[], ctx.path(), true);
    let reset_before = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    if std::os::unix::fs::chown(&path, Some(1234), Some(4321)).is_err() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let kept_after = stage_keys(DOCKERFILE, &[], ctx.path(), true);
    assert_eq!(first_change(&kept_before, &kept_after), Some(0));
    // A COPY that sets owners itself (the default, or --chown) cannot observe the source owner.
    let reset_after = stage_keys(DOCKERFILE, &[], ctx.path(), false);
    assert_eq!(reset_before, reset_after);
}

#[test]
fn build_arg_no_stage_declares_busts_nothing() {
    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[("UNDECLARED", "1")], ctx.path(), false);
    let after = stage_keys(DOCKERFILE, &[("UNDECLARED", "2")], ctx.path(), false);
    assert_eq!(before, after);
    assert_eq!(stage_keys(DOCKERFILE, &[], ctx.path(), false), before);
    // Proxy args reach RUN but never a key.
    let proxied = stage_keys(
        DOCKERFILE,
        &[("HTTP_PROXY", "http://proxy.example:3128")],
        ctx.path(),
        false,
    );
    assert_eq!(proxied, before);
}

#[test]
fn declared_arg_busts_only_the_runs_after_its_declaration() {
    let ctx = context();
    let before = stage_keys(DOCKERFILE, &[("VERSION", "1")], ctx.path(), false);
    let after = stage_keys(DOCKERFILE, &[("VERSION", "2")], ctx.path(), false);
    // COPY (2) keeps its key; RUN two (3) is the first step that sees VERSION.
    assert_eq!(first_change(&before, &after), Some(3));
    // The default is the same value as passing it explicitly.
    assert_eq!(stage_keys(DOCKERFILE, &[], ctx.path(), false), before);
}

#[test]
fn variable_in_a_copy_path_busts_that_copy() {
    let ctx = context();
    // src/ and src2/ have identical content: only the expanded path differs.
    let before = stage_keys(DOCKERFILE, &[("SRC", "src")], ctx.path(), false);
    let after = stage_keys(DOCKERFILE, &[("SRC", "src2")], ctx.path(), false);
    assert_eq!(first_change(&before, &after), Some(2));
}

/// The inputs of the target stage's first step, a RUN, as the engine would pass them with the
/// environment `env` and nothing behind its mounts.
fn first_run_input(dockerfile: &str, env: &[(&str, &str)]) -> RunInput {
    let steps = steps_of(dockerfile, &BTreeMap::new());
    let Operation::Run(run) = &steps[0].operation else {
        panic!("expected a run");
    };
    RunInput {
        run: run.clone(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        user: String::new(),
        workdir: "/".into(),
        shell: vec!["/bin/sh".into(), "-c".into()],
        bind_contents: BTreeMap::new(),
    }
}

fn run_with_secret(id: &str, env: &[(&str, &str)]) -> StepInput {
    StepInput::Run(first_run_input(
        &format!(
            "FROM busybox\nRUN --mount=type=secret,id={id},env=TOKEN curl -H \"$TOKEN\" example.invalid\n"
        ),
        env,
    ))
}

#[test]
fn secret_value_never_changes_a_key_but_its_id_does() {
    let key = |input: &StepInput| KeyChain::new(base(), platform()).next_key(input);
    let plain = key(&run_with_secret("token", &[("PATH", "/bin")]));
    // Even if the caller leaks the secret's value into the environment, it is not keyed.
    let leaked_a = key(&run_with_secret(
        "token",
        &[("PATH", "/bin"), ("TOKEN", "s3cr3t")],
    ));
    let leaked_b = key(&run_with_secret(
        "token",
        &[("PATH", "/bin"), ("TOKEN", "other")],
    ));
    assert_eq!(plain, leaked_a);
    assert_eq!(leaked_a, leaked_b);
    assert_ne!(
        plain,
        key(&run_with_secret("another-id", &[("PATH", "/bin")]))
    );
    assert_ne!(
        plain,
        key(&run_with_secret("token", &[("PATH", "/usr/bin")]))
    );
}

#[test]
fn run_environment_applies_declared_args_only() {
    let image_env = vec![
        ("PATH".to_string(), "/bin".to_string()),
        ("MODE".to_string(), "env".to_string()),
    ];
    let declared = vec![
        ("VERSION".to_string(), Some("1".to_string())),
        ("MODE".to_string(), Some("arg".to_string())),
        ("NOVALUE".to_string(), None),
    ];
    let build_args: BTreeMap<String, String> = [
        ("VERSION", "2"),
        ("UNDECLARED", "x"),
        ("HTTP_PROXY", "http://p:1"),
        ("MODE", "build-arg"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let env = run_environment(&image_env, &declared, &build_args);
    assert_eq!(
        env,
        vec![
            ("PATH".to_string(), "/bin".to_string()),
            ("MODE".to_string(), "env".to_string()),
            ("VERSION".to_string(), "2".to_string()),
        ]
    );
    let defaults = run_environment(&image_env, &declared, &BTreeMap::new());
    assert_eq!(defaults[2], ("VERSION".to_string(), "1".to_string()));
}

fn listed(entries: Vec<FileEntry>) -> StepInput {
    let steps = steps_of(
        "FROM busybox\nCOPY --chmod=644 app/ /app/\n",
        &BTreeMap::new(),
    );
    let Operation::Copy(copy) = &steps[0].operation else {
        panic!("expected a copy");
    };
    StepInput::Copy(CopyInput {
        copy: copy.clone(),
        content: SourceContent::Files(vec![("app/".to_string(), entries)]),
        remote: Vec::new(),
    })
}

fn file(path: &str, content: &[u8]) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind: FileKind::File,
        mode: 0o644,
        owner: None,
        link_target: None,
        content: Some(Digest::sha256_of(content)),
    }
}

#[test]
fn listed_files_key_every_field() {
    let key = |entries: Vec<FileEntry>| {
        KeyChain::new(Parent::Scratch, platform()).next_key(&listed(entries))
    };
    let original = vec![file("a", b"1"), file("b", b"2")];
    let reference = key(original.clone());
    assert_eq!(reference, key(original.clone()));

    let mut renamed = original.clone();
    renamed[1].path = "c".into();
    let mut content = original.clone();
    content[1].content = Some(Digest::sha256_of(b"3"));
    let mut mode = original.clone();
    mode[0].mode = 0o755;
    let mut owned = original.clone();
    owned[0].owner = Some((1, 1));
    let mut kind = original.clone();
    kind[0] = FileEntry {
        kind: FileKind::Symlink,
        content: None,
        link_target: Some("b".into()),
        ..kind[0].clone()
    };
    let mut retargeted = kind.clone();
    retargeted[0].link_target = Some("c".into());
    // Moving bytes between the name and the link target must not collide.
    let mut shifted = kind.clone();
    shifted[0].path = "ab".into();
    shifted[0].link_target = Some(String::new().into());
    let variants = [renamed, content, mode, owned, kind, retargeted, shifted];
    let mut keys: Vec<CacheKey> = variants.into_iter().map(key).collect();
    keys.push(reference);
    let unique: std::collections::BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        keys.len(),
        "two different listings share a key"
    );
}

#[test]
fn add_url_is_keyed_by_checksum_or_validators() {
    let steps = steps_of(
        "FROM busybox\nADD https://example.invalid/x.tgz /x.tgz\n",
        &BTreeMap::new(),
    );
    let Operation::Copy(copy) = &steps[0].operation else {
        panic!("expected a copy");
    };
    let key = |validator: RemoteValidator| {
        KeyChain::new(Parent::Scratch, platform()).next_key(&StepInput::Copy(CopyInput {
            copy: copy.clone(),
            content: SourceContent::None,
            remote: vec![RemoteSource {
                url: "https://example.invalid/x.tgz".into(),
                validator,
            }],
        }))
    };
    let etag = |tag: &str| RemoteValidator::Http {
        etag: Some(tag.into()),
        last_modified: None,
    };
    assert_eq!(key(etag("\"v1\"")), key(etag("\"v1\"")));
    assert_ne!(key(etag("\"v1\"")), key(etag("\"v2\"")));
    assert_ne!(
        key(etag("\"v1\"")),
        key(RemoteValidator::Http {
            etag: None,
            last_modified: Some("\"v1\"".into()),
        })
    );
    assert_ne!(
        key(RemoteValidator::Content(Digest::sha256_of(b"a"))),
        key(RemoteValidator::Content(Digest::sha256_of(b"b")))
    );
}

#[test]
fn parent_and_platform_are_part_of_the_key() {
    let input = StepInput::Config(ConfigEdit::WorkingDir("/app".into()));
    let key = |parent: Parent, platform: &str| {
        KeyChain::new(parent, Platform::parse(platform).unwrap()).next_key(&input)
    };
    let a = key(base(), "linux/amd64");
    assert_ne!(a, key(Parent::Scratch, "linux/amd64"));
    assert_ne!(a, key(base(), "linux/arm64"));
    assert_ne!(
        a,
        key(
            Parent::Image(Digest::sha256_of(b"another base")),
            "linux/amd64"
        )
    );
    let tag = a.tag();
    assert_eq!(tag.len(), 64);
    assert!(kiln_registry::valid_tag(&tag));
    assert_eq!(CacheKey::from_tag(&tag), Some(a));
}

/// The key of a single RUN with `mount` (a `--mount` value) and `contents` behind its target.
fn run_with_mount_key(mount: &str, contents: Option<SourceContent>) -> CacheKey {
    let mut input = first_run_input(
        &format!("FROM busybox AS seed\nFROM busybox\nRUN --mount={mount} ls /m\n"),
        &[("PATH", "/bin")],
    );
    if let Some(content) = contents {
        input.bind_contents.insert("/m".to_string(), content);
    }
    KeyChain::new(base(), platform()).next_key(&StepInput::Run(input))
}

#[test]
fn mounted_sources_are_keyed_but_a_plain_cache_mounts_contents_are_not() {
    let stage = |s: &[u8]| {
        Some(SourceContent::Stage(CacheKey::from_digest(
            Digest::sha256_of(s),
        )))
    };
    let image = |s: &[u8]| Some(SourceContent::Image(Digest::sha256_of(s)));
    // A bind mount from an image: keyed by the manifest the image was pinned to.
    let bind_image = "type=bind,from=registry.example/tools:1,target=/m";
    assert_ne!(
        run_with_mount_key(bind_image, image(b"tools v1")),
        run_with_mount_key(bind_image, image(b"tools v2"))
    );
    // A cache mount seeded from a stage: keyed by what seeds it, as BuildKit keys the base of
    // such a mount.
    let seeded = "type=cache,from=seed,target=/m";
    assert_ne!(
        run_with_mount_key(seeded, stage(b"seed one")),
        run_with_mount_key(seeded, stage(b"seed two"))
    );
    // A plain cache mount: its contents are not an input, whatever a caller passes.
    let plain = "type=cache,target=/m";
    assert_eq!(
        run_with_mount_key(plain, None),
        run_with_mount_key(plain, stage(b"anything"))
    );
    // Its spec is: another id or sharing mode is another key.
    assert_ne!(
        run_with_mount_key(plain, None),
        run_with_mount_key("type=cache,target=/m,id=other", None)
    );
    assert_ne!(
        run_with_mount_key(plain, None),
        run_with_mount_key("type=cache,target=/m,sharing=locked", None)
    );
}
