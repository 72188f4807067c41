//! Command-line parsing: every flag lands in the right field, kaniko's flag forms work, and
//! bad command lines are usage errors that name the flag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_engine::SecretSource;
use kiln_executor::cli::{self, parse, Command, Env, Invocation, UsageError, WarmInvocation};
use kiln_executor::{Level, LogFormat, Progress};
use kiln_fs::snapshot::SnapshotMode;
use kiln_oci::{Compression, ImageFormat, Platform};
use kiln_sandbox::Mode;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn try_build(args: &[&str], env: &Env) -> Result<Invocation, UsageError> {
    let argv = std::iter::once("executor").chain(args.iter().copied());
    match parse(argv, env)? {
        Command::Build(invocation) => Ok(*invocation),
        other => panic!("expected a build, got {other:?}"),
    }
}

fn build(args: &[&str]) -> Invocation {
    try_build(args, &Env::new()).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn usage_error(args: &[&str]) -> String {
    match try_build(args, &Env::new()) {
        Ok(_) => panic!("{args:?} parsed"),
        Err(e) => e.message,
    }
}

fn warm(args: &[&str]) -> WarmInvocation {
    let argv = ["executor", "warm"].into_iter().chain(args.iter().copied());
    match parse(argv, &Env::new()).unwrap() {
        Command::Warm(w) => *w,
        other => panic!("expected warm, got {other:?}"),
    }
}

const DEST: &str = "--destination=127.0.0.1:5000/app:1";

#[test]
fn defaults_match_kaniko() {
    let inv = build(&[DEST]);
    let o = &inv.options;
    assert_eq!(o.context.source, "/workspace/");
    assert_eq!(o.context.sub_path, None);
    assert_eq!(o.dockerfile, PathBuf::from("Dockerfile"));
    assert!(o.build_args.is_empty());
    assert_eq!(o.target, None);
    assert_eq!(o.platform, None);
    assert_eq!(o.mode, None);
    assert_eq!(o.snapshot.mode, SnapshotMode::Exact);
    assert!(!o.snapshot.single_snapshot);
    assert!(o.snapshot.ignore_var_run);
    assert!(o.snapshot.base_overlay);
    assert_eq!(o.output.destinations, ["127.0.0.1:5000/app:1"]);
    assert!(!o.output.no_push);
    assert_eq!(o.output.compression, Compression::Gzip);
    assert_eq!(o.output.compression_level, None);
    assert_eq!(o.output.image_format, ImageFormat::Oci);
    assert!(!o.output.reproducible);
    assert_eq!(o.kiln_dir, PathBuf::from("/kiln"));
    assert!(!o.cleanup && !o.force);
    assert_eq!(o.benchmark_file, None);
    assert_eq!(o.registry.retries, 3);
    assert_eq!(inv.output.verbosity, Level::Info);
    assert_eq!(inv.output.log_format, None);
    assert!(!inv.output.log_timestamp);
    assert_eq!(inv.output.progress, Progress::Auto);
    assert_eq!(inv.cache, cli::CacheFlags::default());
    assert_eq!(inv.cache.ttl, Duration::from_secs(14 * 24 * 3600));
    assert!(inv.cache.run_layers && !inv.cache.copy_layers);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
}

#[test]
fn every_build_flag_lands_in_its_field() {
    let inv = try_build(
        &[
            "-f",
            "build/Dockerfile.prod",
            "-c",
            "git://git.example/app.git#main",
            "--context-sub-path=svc",
            "--git",
            "branch=dev,single-branch=true,recurse-submodules=true",
            "--git=insecure-skip-tls=true",
            "-d",
            "reg.example/app:1",
            "--destination",
            "reg.example/app:latest",
            "--build-arg=VERSION=1.2",
            "--build-arg",
            "FROM_ENV",
            "--build-arg=EMPTY=",
            "--target=final",
            "--custom-platform=linux/arm64/v8",
            "--secret=id=npm,src=/run/npmrc",
            "--secret",
            "id=token,env=API_TOKEN",
            "--snapshot-mode=time",
            "--single-snapshot",
            "--ignore-path=/var/cache",
            "--ignore-path",
            "/opt/skip",
            "--ignore-var-run=false",
            "--base-overlay=false",
            "--kiln-dir=/work/kiln",
            "--mode=in-place",
            "--compression=zstd",
            "--compression-level=19",
            "--image-format=docker",
            "--tar-path=/out/image.tar",
            "--oci-layout-path=/out/layout",
            "--digest-file=/out/digest",
            "--image-name-with-digest-file=/out/name-digest",
            "--image-name-tag-with-digest-file=/out/name-tag-digest",
            "--label=org.example.team=build",
            "--label",
            "empty",
            "--reproducible",
            "--cleanup",
            "--force=true",
            "--benchmark-file=/out/bench.json",
            "--insecure",
            "--insecure-pull",
            "--insecure-registry=plain.example:5000",
            "--skip-tls-verify",
            "--skip-tls-verify-pull",
            "--skip-tls-verify-registry=self.example",
            "--registry-certificate=reg.example=/certs/ca.pem",
            "--registry-client-cert=reg.example=/certs/c.pem,/certs/k.pem",
            "--registry-certs-dir=/kiln/certs.d",
            "--registry-certs-dir",
            "reg.example:5000=/mnt/reg-tls",
            "--registry-mirror=mirror.example/hub",
            "--registry-map=quay.io=m1.example;gcr.io=m2.example",
            "--skip-default-registry-fallback",
            "--push-retry=5",
            "--image-download-retry=2",
            "-v",
            "debug",
            "--log-format=json",
            "--log-timestamp",
            "--progress=plain",
            "--skip-unused-stages",
            "--use-new-run",
            "--cache",
            "--cache-repo=reg.example/app/cache",
            "--cache-dir=/cache/bases",
            "--cache-ttl=6h30m",
            "--cache-run-layers=false",
            "--cache-copy-layers",
            "--no-push-cache",
        ],
        &env(&[
            ("FROM_ENV", "from-the-env"),
            ("SOURCE_DATE_EPOCH", "1700000000"),
        ]),
    )
    .unwrap();
    let o = &inv.options;
    assert_eq!(o.dockerfile, PathBuf::from("build/Dockerfile.prod"));
    assert_eq!(o.context.source, "git://git.example/app.git#main");
    assert_eq!(o.context.sub_path, Some(PathBuf::from("svc")));
    assert_eq!(o.context.git.branch.as_deref(), Some("dev"));
    assert!(o.context.git.single_branch && o.context.git.recurse_submodules);
    assert!(o.context.git.insecure_skip_tls);
    assert_eq!(
        o.output.destinations,
        ["reg.example/app:1", "reg.example/app:latest"]
    );
    assert_eq!(o.build_args["VERSION"], "1.2");
    assert_eq!(o.build_args["FROM_ENV"], "from-the-env");
    assert_eq!(o.build_args["EMPTY"], "");
    assert_eq!(o.target.as_deref(), Some("final"));
    assert_eq!(
        o.platform,
        Some(Platform::new("linux", "arm64").with_variant("v8"))
    );
    assert_eq!(o.secrets.len(), 2);
    assert_eq!(o.secrets[0].id, "npm");
    assert_eq!(
        o.secrets[0].source,
        SecretSource::File(PathBuf::from("/run/npmrc"))
    );
    assert_eq!(o.secrets[1].source, SecretSource::Env("API_TOKEN".into()));
    assert_eq!(o.snapshot.mode, SnapshotMode::MtimeOnly);
    assert!(o.snapshot.single_snapshot);
    assert_eq!(
        o.snapshot.ignore_paths,
        [PathBuf::from("/var/cache"), PathBuf::from("/opt/skip")]
    );
    assert!(!o.snapshot.ignore_var_run);
    assert!(!o.snapshot.base_overlay);
    assert_eq!(o.kiln_dir, PathBuf::from("/work/kiln"));
    assert_eq!(o.mode, Some(Mode::InPlace));
    assert_eq!(o.output.compression, Compression::Zstd);
    assert_eq!(o.output.compression_level, Some(19));
    assert_eq!(o.output.image_format, ImageFormat::Docker);
    assert_eq!(o.output.tar_path, Some(PathBuf::from("/out/image.tar")));
    assert_eq!(o.output.oci_layout_path, Some(PathBuf::from("/out/layout")));
    assert_eq!(o.output.digest_file, Some(PathBuf::from("/out/digest")));
    assert_eq!(
        o.output.image_name_with_digest_file,
        Some(PathBuf::from("/out/name-digest"))
    );
    assert_eq!(
        o.output.image_name_tag_with_digest_file,
        Some(PathBuf::from("/out/name-tag-digest"))
    );
    assert_eq!(o.output.labels["org.example.team"], "build");
    assert_eq!(o.output.labels["empty"], "");
    assert!(o.output.reproducible);
    assert_eq!(o.output.source_date_epoch, Some(1_700_000_000));
    assert!(o.cleanup && o.force);
    assert_eq!(o.benchmark_file, Some(PathBuf::from("/out/bench.json")));

    let r = &o.registry;
    assert!(r.insecure && r.insecure_pull && r.skip_tls_verify && r.skip_tls_verify_pull);
    assert_eq!(r.insecure_registries, ["plain.example:5000"]);
    assert_eq!(r.skip_tls_verify_registries, ["self.example"]);
    assert_eq!(
        r.registry_certificates,
        [("reg.example".to_string(), PathBuf::from("/certs/ca.pem"))]
    );
    assert_eq!(r.registry_client_certificates[0].0, "reg.example");
    assert_eq!(
        r.registry_client_certificates[0].1.key,
        PathBuf::from("/certs/k.pem")
    );
    assert_eq!(r.certs_dirs, [PathBuf::from("/kiln/certs.d")]);
    assert_eq!(
        r.registry_certs_dirs,
        [(
            "reg.example:5000".to_string(),
            PathBuf::from("/mnt/reg-tls")
        )]
    );
    assert!(r.system_certs_dirs);
    assert_eq!(r.registry_mirrors, ["mirror.example/hub"]);
    assert_eq!(
        r.registry_maps,
        [
            ("quay.io".to_string(), vec!["m1.example".to_string()]),
            ("gcr.io".to_string(), vec!["m2.example".to_string()]),
        ]
    );
    assert!(r.skip_default_registry_fallback);
    assert_eq!(r.retries, 5);

    assert_eq!(inv.output.verbosity, Level::Debug);
    assert_eq!(inv.output.log_format, Some(LogFormat::Json));
    assert!(inv.output.log_timestamp);
    assert_eq!(inv.output.progress, Progress::Plain);

    let c = &inv.cache;
    assert!(c.enabled);
    assert_eq!(c.repo.as_deref(), Some("reg.example/app/cache"));
    assert_eq!(c.dir, PathBuf::from("/cache/bases"));
    assert_eq!(c.ttl, Duration::from_secs(6 * 3600 + 30 * 60));
    assert!(!c.run_layers && c.copy_layers && c.no_push_cache);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
}

#[test]
fn boolean_flag_forms() {
    for (arg, expected) in [
        ("--reproducible", true),
        ("--reproducible=true", true),
        ("--reproducible=True", true),
        ("--reproducible=1", true),
        ("--reproducible=t", true),
        ("--reproducible=false", false),
        ("--reproducible=FALSE", false),
        ("--reproducible=0", false),
        ("--reproducible=f", false),
    ] {
        assert_eq!(
            build(&[DEST, arg]).options.output.reproducible,
            expected,
            "{arg}"
        );
    }
    // The last occurrence wins, as with kaniko's pflag.
    assert!(
        !build(&[DEST, "--cleanup", "--cleanup=false"])
            .options
            .cleanup
    );
    assert!(
        build(&[DEST, "--cleanup=false", "--cleanup"])
            .options
            .cleanup
    );
    // A separate value would be ambiguous with the next argument: it is refused, naming it.
    let message = usage_error(&[DEST, "--reproducible", "false"]);
    assert!(message.contains("false"), "{message}");
    assert!(message.contains("--flag=false"), "{message}");
    let message = usage_error(&[DEST, "--reproducible=yes"]);
    assert!(
        message.contains("yes") && message.contains("--reproducible"),
        "{message}"
    );
}

#[test]
fn value_flag_forms_and_repeats() {
    let a = build(&["--destination", "r/a:1", "--dockerfile", "D1", "-f=D2"]);
    assert_eq!(a.options.dockerfile, PathBuf::from("D2"), "last one wins");
    let b = build(&["-d", "r/a:1", "-dr/b:2", "--destination=r/c:3", "-d=r/d:4"]);
    assert_eq!(
        b.options.output.destinations,
        ["r/a:1", "r/b:2", "r/c:3", "r/d:4"]
    );
    let c = build(&[DEST, "-vtrace", "--compression-level", "-1"]);
    assert_eq!(c.output.verbosity, Level::Trace);
    assert_eq!(c.options.output.compression_level, None);
    let d = build(&[
        DEST,
        "--build-arg",
        "A=1",
        "--build-arg",
        "A=2",
        "--build-arg",
        "B=x=y",
    ]);
    assert_eq!(d.options.build_args["A"], "2");
    assert_eq!(d.options.build_args["B"], "x=y");
    assert_eq!(
        build(&[DEST, "--kaniko-dir", "/k"]).options.kiln_dir,
        PathBuf::from("/k")
    );
}

#[test]
fn build_arg_from_environment() {
    let e = env(&[("TOKEN_NAME", "value with spaces"), ("EMPTY", "")]);
    let inv = try_build(
        &[
            DEST,
            "--build-arg=TOKEN_NAME",
            "--build-arg=EMPTY",
            "--build-arg=UNSET",
        ],
        &e,
    )
    .unwrap();
    assert_eq!(inv.options.build_args["TOKEN_NAME"], "value with spaces");
    assert_eq!(inv.options.build_args["EMPTY"], "");
    // Docker leaves an unset variable out so the Dockerfile's default applies, and says so.
    assert!(!inv.options.build_args.contains_key("UNSET"));
    assert!(
        inv.warnings.iter().any(|w| w.contains("UNSET")),
        "{:?}",
        inv.warnings
    );
    assert!(usage_error(&[DEST, "--build-arg==v"]).contains("--build-arg"));
}

#[test]
fn kaniko_environment_variables() {
    let e = env(&[
        ("KANIKO_NO_PUSH", "true"),
        ("KANIKO_DIR", "/kaniko-here"),
        ("KANIKO_REGISTRY_MIRROR", "m1.example,m2.example"),
        ("KANIKO_REGISTRY_MAP", "ghcr.io=gm.example"),
        ("BENCHMARK_FILE", "/tmp/bench.json"),
    ]);
    let inv = try_build(&["--registry-mirror=flag.example"], &e).unwrap();
    assert!(
        inv.options.output.no_push,
        "KANIKO_NO_PUSH allows no destination"
    );
    assert_eq!(inv.options.kiln_dir, PathBuf::from("/kaniko-here"));
    assert_eq!(
        inv.options.registry.registry_mirrors,
        ["flag.example", "m1.example", "m2.example"]
    );
    assert_eq!(inv.options.registry.registry_maps[0].0, "ghcr.io");
    assert_eq!(
        inv.options.benchmark_file,
        Some(PathBuf::from("/tmp/bench.json"))
    );
    // Flags beat the environment; "false" is kaniko's way to turn benchmarking off.
    let e = env(&[
        ("KANIKO_NO_PUSH", "1"),
        ("KANIKO_DIR", "/env"),
        ("BENCHMARK_FILE", "false"),
    ]);
    let inv = try_build(&[DEST, "--no-push=false", "--kaniko-dir=/flag"], &e).unwrap();
    assert!(!inv.options.output.no_push);
    assert_eq!(inv.options.kiln_dir, PathBuf::from("/flag"));
    assert_eq!(inv.options.benchmark_file, None);
    let bad = try_build(&[DEST], &env(&[("SOURCE_DATE_EPOCH", "yesterday")])).unwrap_err();
    assert!(bad.message.contains("SOURCE_DATE_EPOCH"), "{bad}");
}

#[test]
fn registry_map_forms() {
    let inv = build(&[
        DEST,
        "--registry-map=index.docker.io=a.example;index.docker.io=b.example",
        "--registry-map",
        "gcr.io=c.example;d.example:5000",
    ]);
    let maps = &inv.options.registry.registry_maps;
    let mirrors_of = |name: &str| -> Vec<String> {
        maps.iter()
            .filter(|(o, _)| o == name)
            .flat_map(|(_, m)| m.clone())
            .collect()
    };
    assert_eq!(mirrors_of("index.docker.io"), ["a.example", "b.example"]);
    assert_eq!(mirrors_of("gcr.io"), ["c.example", "d.example:5000"]);
    assert!(usage_error(&[DEST, "--registry-map=nomirror"]).contains("--registry-map"));
    assert!(
        usage_error(&[DEST, "--registry-certificate=noequals"]).contains("--registry-certificate")
    );
    assert!(
        usage_error(&[DEST, "--registry-client-cert=r=/only"]).contains("--registry-client-cert")
    );
    assert!(
        usage_error(&[DEST, "--registry-certs-dir=reg.example="]).contains("--registry-certs-dir")
    );
}

#[test]
fn retries_never_drop_below_the_default() {
    assert_eq!(build(&[DEST, "--push-retry=0"]).options.registry.retries, 3);
    assert_eq!(
        build(&[DEST, "--image-download-retry=7"])
            .options
            .registry
            .retries,
        7
    );
}

#[test]
fn stall_timeout_and_request_deadline() {
    let defaults = build(&[DEST]).options.registry;
    assert_eq!(defaults.stall_timeout, Some(Duration::from_secs(60)));
    assert_eq!(defaults.request_deadline, Some(Duration::from_secs(3600)));
    let set = build(&[
        DEST,
        "--registry-stall-timeout=90s",
        "--registry-request-deadline=2h30m",
    ])
    .options
    .registry;
    assert_eq!(set.stall_timeout, Some(Duration::from_secs(90)));
    assert_eq!(set.request_deadline, Some(Duration::from_secs(9000)));
    let off = build(&[
        DEST,
        "--registry-stall-timeout=0",
        "--registry-request-deadline=0s",
    ])
    .options
    .registry;
    assert_eq!((off.stall_timeout, off.request_deadline), (None, None));
    assert!(
        usage_error(&[DEST, "--registry-stall-timeout=soon"]).contains("--registry-stall-timeout")
    );
    assert!(usage_error(&[DEST, "--registry-request-deadline=-1h"])
        .contains("--registry-request-deadline"));
}

#[test]
fn snapshot_modes_and_deprecated_spellings() {
    assert_eq!(
        build(&[DEST, "--snapshot-mode=full"]).options.snapshot.mode,
        SnapshotMode::Full
    );
    assert_eq!(
        build(&[DEST, "--snapshot-mode=redo"]).options.snapshot.mode,
        SnapshotMode::Exact
    );
    assert!(usage_error(&[DEST, "--snapshot-mode=fast"]).contains("--snapshot-mode"));
    let inv = build(&[
        DEST,
        "--snapshotMode=full",
        "--customPlatform=linux/amd64",
        "--tarPath=/t.tar",
        "--whitelist-var-run=false",
    ]);
    assert_eq!(inv.options.snapshot.mode, SnapshotMode::Full);
    assert_eq!(inv.options.platform, Some(Platform::new("linux", "amd64")));
    assert_eq!(inv.options.output.tar_path, Some(PathBuf::from("/t.tar")));
    assert!(!inv.options.snapshot.ignore_var_run);
    assert_eq!(inv.warnings.len(), 4, "{:?}", inv.warnings);
    assert!(inv.warnings.iter().all(|w| w.contains("deprecated")));
}

#[test]
fn kaniko_only_flags_are_decided() {
    // Accepted silently: Kiln always does what they ask for.
    let inv = build(&[
        DEST,
        "--compressed-caching=true",
        "--skip-push-permission-check",
        "--skip-unused-stages=true",
        "--use-new-run",
    ]);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert!(!inv.options.output.ignore_immutable_tags);
    let inv = build(&[DEST, "--push-ignore-immutable-tag-errors"]);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert!(inv.options.output.ignore_immutable_tags);
    assert!(!build(&[DEST]).options.materialize);
    let inv = build(&[DEST, "--materialize"]);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert!(inv.options.materialize);
    // Accepted with a warning: Kiln cannot honour them.
    for flag in [
        "--skip-unused-stages=false",
        "--use-new-run=false",
        "--preserve-context",
        "--compressed-caching=false",
    ] {
        let inv = build(&[DEST, flag]);
        assert_eq!(inv.warnings.len(), 1, "{flag}: {:?}", inv.warnings);
        let name = flag.trim_start_matches('-').split('=').next().unwrap();
        assert!(inv.warnings[0].contains(name), "{flag}: {:?}", inv.warnings);
    }
    // Implemented since: no warning, and the option is set.
    let inv = build(&[DEST, "--force-build-metadata"]);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert!(inv.options.snapshot.force_build_metadata);
    let inv = build(&[DEST, "--image-fs-extract-retry=3"]);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
    assert_eq!(inv.options.extract_retries, 3);
    assert!(build(&[DEST]).credential_providers.gitlab);
    let inv = build(&[DEST, "--credential-helpers="]);
    assert!(inv.warnings.is_empty() && !inv.credential_providers.gitlab);
    let message = usage_error(&[DEST, "--credential-helpers=ecr,gitlab"]);
    assert!(message.contains("docker-credential-ecr-login"), "{message}");
    // Rejected: GCS bucket contexts.
    let message = usage_error(&[DEST, "--bucket=my-bucket"]);
    assert!(message.contains("--bucket"), "{message}");
    assert!(usage_error(&[DEST, "-b", "x"]).contains("--bucket"));
}

#[test]
fn invalid_values_name_their_flag() {
    for (args, flag) in [
        (&[DEST, "--verbosity=loud"][..], "--verbosity"),
        (&[DEST, "--log-format=xml"], "--log-format"),
        (&[DEST, "--progress=fancy"], "--progress"),
        (&[DEST, "--mode=vm"], "--mode"),
        (&[DEST, "--compression=lz4"], "--compression"),
        (&[DEST, "--compression-level=12"], "--compression-level"),
        (
            &[DEST, "--compression=zstd", "--compression-level=23"],
            "--compression-level",
        ),
        (&[DEST, "--image-format=v1"], "--image-format"),
        (&[DEST, "--custom-platform=linux"], "--custom-platform"),
        (&[DEST, "--cache-ttl=2w"], "--cache-ttl"),
        (&[DEST, "--cache-ttl=-1h"], "--cache-ttl"),
        (&[DEST, "--push-retry=many"], "--push-retry"),
        (&[DEST, "--secret=id=x"], "--secret"),
        (&[DEST, "--secret=src=/f"], "--secret"),
        (&[DEST, "--secret=id=x,src=/f,env=V"], "--secret"),
        (&[DEST, "--secret=id=x,kind=file"], "--secret"),
        (&[DEST, "--git=depth=1"], "--git"),
        (&[DEST, "--git=single-branch=maybe"], "--git"),
        (&[DEST, "--label==v"], "--label"),
        (&[DEST, "--dockerfile"], "--dockerfile"),
    ] {
        let message = usage_error(args);
        assert!(message.contains(flag), "{args:?}: {message}");
    }
}

#[test]
fn unknown_flags_and_arguments_are_named() {
    let message = usage_error(&[DEST, "--no-such-flag"]);
    assert!(
        message.starts_with("unknown flag: --no-such-flag"),
        "{message}"
    );
    let message = usage_error(&[DEST, "--destinaton=x"]);
    assert!(
        message.starts_with("unknown flag: --destinaton"),
        "{message}"
    );
    assert!(
        message.contains("--destination"),
        "suggests the right one: {message}"
    );
    let message = usage_error(&[DEST, "-Z"]);
    assert!(message.contains("-Z"), "{message}");
    let message = usage_error(&[DEST, "stray"]);
    assert_eq!(message, "unexpected argument: stray");
    let message = usage_error(&["stray"]);
    assert_eq!(message, "unexpected argument: stray");
    let message = usage_error(&[DEST, "warm"]);
    assert!(message.contains("subcommands come before"), "{message}");
    assert_eq!(UsageError::EXIT_CODE, 2);
}

#[test]
fn kaniko_consistency_rules() {
    assert!(usage_error(&[]).contains("--destination"));
    assert!(build(&["--no-push"]).options.output.destinations.is_empty());
    assert!(
        usage_error(&["--no-push", "--image-name-with-digest-file=/f"])
            .contains("--image-name-with-digest-file")
    );
    assert!(
        usage_error(&["--no-push", "--image-name-tag-with-digest-file=/f"])
            .contains("--image-name-tag-with-digest-file")
    );
    assert!(usage_error(&["--no-push", "--cache"]).contains("--cache-repo"));
    let inv = build(&["--no-push", "--cache", "--cache-repo=oci:/cache/layout"]);
    assert_eq!(inv.cache.repo.as_deref(), Some("oci:/cache/layout"));
}

#[test]
fn go_durations() {
    let d = cli::parse_go_duration;
    assert_eq!(d("336h").unwrap(), Duration::from_secs(336 * 3600));
    assert_eq!(d("336h0m0s").unwrap(), Duration::from_secs(336 * 3600));
    assert_eq!(d("1.5h").unwrap(), Duration::from_secs(5400));
    assert_eq!(d("90s").unwrap(), Duration::from_secs(90));
    assert_eq!(d("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(d("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(d("0").unwrap(), Duration::ZERO);
    for bad in ["", "h", "10", "5d", "-1s", "1..5h"] {
        assert!(d(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn warm_subcommand() {
    let w = warm(&[
        "--image=reg.example/base:1",
        "-i",
        "reg.example/other:2",
        "--dockerfile=ctx/Dockerfile",
        "--cache-dir=/cache/dir",
        "--force",
        "--build-arg=V=1",
        "--custom-platform=linux/amd64",
        "--insecure-pull",
        "--registry-mirror=mirror.example",
        "-v",
        "warn",
    ]);
    assert_eq!(w.images, ["reg.example/base:1", "reg.example/other:2"]);
    assert_eq!(w.dockerfile, Some(PathBuf::from("ctx/Dockerfile")));
    assert_eq!(w.cache_dir, PathBuf::from("/cache/dir"));
    assert!(w.force);
    assert_eq!(w.build_args["V"], "1");
    assert_eq!(w.platform, Some(Platform::new("linux", "amd64")));
    assert!(w.registry.insecure_pull);
    assert_eq!(w.registry.registry_mirrors, ["mirror.example"]);
    assert_eq!(w.output.verbosity, Level::Warn);
    let w = warm(&["-i", "x", "-c", "/c", "-d", "Dockerfile"]);
    assert_eq!(w.cache_dir, PathBuf::from("/c"));
    assert_eq!(warm(&["-i", "x"]).cache_dir, PathBuf::from("/cache"));
    let err = parse(["executor", "warm"], &Env::new()).unwrap_err();
    assert!(err.message.contains("--image"), "{err}");
    let err = parse(
        ["executor", "warm", "--image=x", "--destination=y"],
        &Env::new(),
    )
    .unwrap_err();
    assert!(err.message.contains("--destination"), "{err}");
}

#[test]
fn version_and_help() {
    let e = Env::new();
    assert!(matches!(
        parse(["executor", "version"], &e),
        Ok(Command::Version)
    ));
    assert!(matches!(
        parse(["executor", "--version"], &e),
        Ok(Command::Version)
    ));
    match parse(["executor", "--help"], &e) {
        Ok(Command::Help(text)) => {
            for flag in [
                "--destination",
                "--kaniko-dir",
                "--kiln-dir",
                "--progress",
                "--cache-ttl",
            ] {
                assert!(text.contains(flag), "help lacks {flag}");
            }
            // Compatibility-only flags stay out of the help text.
            assert!(!text.contains("--snapshotMode") && !text.contains("--bucket"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse(["executor", "warm", "--help"], &e),
        Ok(Command::Help(_))
    ));
}

#[test]
fn credential_locations() {
    let e = env(&[("DOCKER_CONFIG", "/etc/docker-cfg"), ("HOME", "/home/u")]);
    let dirs = cli::credential_search_dirs(Path::new("/work/kiln"), &e);
    let expected: Vec<PathBuf> = [
        "/etc/docker-cfg",
        "/work/kiln/.docker",
        "/kiln/.docker",
        "/kaniko/.docker",
        "/home/u/.docker",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(dirs, expected);
    let dirs = cli::credential_search_dirs(Path::new("/kiln"), &Env::new());
    assert_eq!(dirs.len(), 2, "{dirs:?}");
}

#[test]
fn docker_config_is_loaded_from_the_kiln_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let kiln_dir = tmp.path().join("kiln");
    std::fs::create_dir_all(kiln_dir.join(".docker")).unwrap();
    std::fs::write(
        kiln_dir.join(".docker/config.json"),
        r#"{"auths":{"reg.example":{"auth":"dXNlcjpzM2NyZXQ="}}}"#,
    )
    .unwrap();
    let kiln_dir_arg = format!("--kiln-dir={}", kiln_dir.display());
    let mut inv = build(&[DEST, kiln_dir_arg.as_str()]);
    inv.load_credentials(&Env::new()).unwrap();
    let config = inv
        .options
        .registry
        .keychain
        .config()
        .expect("config found");
    assert_eq!(
        config.path(),
        Some(kiln_dir.join(".docker/config.json").as_path())
    );
    assert!(config.auth_for("reg.example").is_some());
    // Debug output of the whole invocation never shows the password.
    assert!(!format!("{inv:?}").contains("s3cret"));

    std::fs::write(kiln_dir.join(".docker/config.json"), "{ not json").unwrap();
    let mut inv = build(&[DEST, kiln_dir_arg.as_str()]);
    let error = inv.load_credentials(&Env::new()).unwrap_err().to_string();
    assert!(error.contains("config.json"), "{error}");
}

#[test]
fn dockerfile_is_looked_up_like_kaniko() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    std::fs::write(tmp.path().join("sub/Dockerfile.dev"), "FROM scratch\n").unwrap();
    let mut inv = build(&[DEST, "-f", "sub/Dockerfile.dev"]);
    inv.resolve_dockerfile(tmp.path());
    assert_eq!(
        inv.options.dockerfile,
        tmp.path().join("sub/Dockerfile.dev")
    );
    // Not in the working directory: left relative to the context.
    let mut inv = build(&[DEST, "-f", "other/Dockerfile"]);
    inv.resolve_dockerfile(tmp.path());
    assert_eq!(inv.options.dockerfile, PathBuf::from("other/Dockerfile"));
}

#[test]
fn ssh_agents_come_from_their_socket_or_ssh_auth_sock() {
    let mut env = Env::new();
    env.insert("SSH_AUTH_SOCK".into(), "/tmp/agent.sock".into());
    let inv = try_build(
        &[
            DEST,
            "--ssh",
            "default",
            "--ssh=deploy=/run/deploy-agent.sock",
        ],
        &env,
    )
    .unwrap();
    let ssh: Vec<(&str, &Path)> = (inv.options.ssh.iter())
        .map(|s| (s.id.as_str(), s.socket.as_path()))
        .collect();
    assert_eq!(
        ssh,
        [
            ("default", Path::new("/tmp/agent.sock")),
            ("deploy", Path::new("/run/deploy-agent.sock"))
        ]
    );
    // No agent to default to, key files, an empty id: usage errors naming the flag.
    for args in [
        &[DEST, "--ssh=default"][..],
        &[
            DEST,
            "--ssh=default=/home/me/.ssh/id_ed25519,/home/me/.ssh/id_rsa",
        ],
        &[DEST, "--ssh==/tmp/agent.sock"],
        &[DEST, "--ssh=default="],
    ] {
        let message = usage_error(args);
        assert!(message.starts_with("--ssh"), "{args:?}: {message}");
    }
    assert!(usage_error(&[DEST, "--ssh=default"]).contains("SSH_AUTH_SOCK"));
}

#[test]
fn upper_tmpfs_forms_and_sizes() {
    use kiln_engine::UpperTmpfs;
    let o = build(&[DEST]).options;
    assert_eq!(o.snapshot.upper_tmpfs, UpperTmpfs::Auto);
    assert_eq!(o.snapshot.upper_tmpfs_size, None);
    for (flag, want) in [
        ("--upper-tmpfs", UpperTmpfs::Always),
        ("--upper-tmpfs=true", UpperTmpfs::Always),
        ("--upper-tmpfs=1", UpperTmpfs::Always),
        ("--upper-tmpfs=false", UpperTmpfs::Never),
        ("--upper-tmpfs=auto", UpperTmpfs::Auto),
    ] {
        assert_eq!(
            build(&[DEST, flag]).options.snapshot.upper_tmpfs,
            want,
            "{flag}"
        );
    }
    for (flag, want) in [
        ("--upper-tmpfs-size=4194304", 4 << 20),
        ("--upper-tmpfs-size=4M", 4 << 20),
        ("--upper-tmpfs-size=4MiB", 4 << 20),
        ("--upper-tmpfs-size=2048k", 2 << 20),
        ("--upper-tmpfs-size=3G", 3 << 30),
        ("--upper-tmpfs-size=1Ti", 1 << 40),
    ] {
        let o = build(&[DEST, flag]).options;
        assert_eq!(o.snapshot.upper_tmpfs_size, Some(want), "{flag}");
    }
    let both = build(&[DEST, "--upper-tmpfs-size", "64M", "--upper-tmpfs=false"]).options;
    assert_eq!(both.snapshot.upper_tmpfs, UpperTmpfs::Never);
    assert_eq!(both.snapshot.upper_tmpfs_size, Some(64 << 20));

    for bad in ["--upper-tmpfs=sometimes", "--upper-tmpfs=yes"] {
        let message = usage_error(&[DEST, bad]);
        assert!(message.contains("--upper-tmpfs"), "{bad}: {message}");
    }
    for bad in ["4X", "M", "-4M", "512k", "1.5G", "99999999999T", ""] {
        let message = usage_error(&[DEST, &format!("--upper-tmpfs-size={bad}")]);
        assert!(message.contains("--upper-tmpfs-size"), "{bad}: {message}");
    }
}
