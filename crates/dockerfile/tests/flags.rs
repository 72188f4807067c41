//! Every flag of every instruction, with its validation errors.

use std::time::Duration;

use kiln_dockerfile::{
    Base, CacheSharing, Chmod, CommandLine, Dockerfile, ErrorKind, HealthCheck, Instruction, Mount,
    MountType, NetworkMode, PlanOptions, SecurityMode, Source, Step,
};

fn steps_of(source: &str, stage: usize) -> Vec<Step> {
    let dockerfile = Dockerfile::parse(source).unwrap_or_else(|e| panic!("{e}"));
    let plan = dockerfile
        .plan(&PlanOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    plan.stage(stage)
        .unwrap_or_else(|| panic!("stage {stage} not planned"))
        .steps(&[])
        .unwrap_or_else(|e| panic!("{e}"))
        .steps
}

fn last_instruction(source: &str) -> Instruction {
    let dockerfile = Dockerfile::parse(source).unwrap_or_else(|e| panic!("{e}"));
    let last = dockerfile.stages().len() - 1;
    steps_of(source, last).pop().expect("a step").instruction
}

fn parse_error(source: &str) -> String {
    match Dockerfile::parse(source) {
        Ok(_) => panic!("expected an error for {source:?}"),
        Err(e) => e.to_string(),
    }
}

/// Errors that only show once values are expanded.
fn plan_error(source: &str) -> String {
    let dockerfile = Dockerfile::parse(source).unwrap_or_else(|e| panic!("{e}"));
    let plan = match dockerfile.plan(&PlanOptions::default()) {
        Ok(p) => p,
        Err(e) => return e.to_string(),
    };
    for stage in plan.stages() {
        if let Err(e) = stage.steps(&[]) {
            return e.to_string();
        }
    }
    panic!("expected an error for {source:?}")
}

fn mounts(flag: &str) -> Vec<Mount> {
    match last_instruction(&format!("FROM a AS first\nFROM b\nRUN {flag} true\n")) {
        Instruction::Run(run) => run.mounts,
        other => panic!("{other:?}"),
    }
}

#[test]
fn from_platform_is_expanded_with_global_args() {
    let dockerfile =
        Dockerfile::parse("FROM --platform=$BUILDPLATFORM golang AS build\nFROM alpine\n").unwrap();
    let options = PlanOptions {
        target: Some("build".into()),
        build_platform: kiln_dockerfile::Platform::parse("linux/arm64/v8").unwrap(),
        ..PlanOptions::default()
    };
    let plan = dockerfile.plan(&options).unwrap();
    assert_eq!(plan.stages()[0].platform.as_deref(), Some("linux/arm64/v8"));
    assert_eq!(plan.stages()[0].base, Base::Image("golang".into()));
}

#[test]
fn from_flag_errors() {
    assert_eq!(
        parse_error("FROM --platfrom=linux/amd64 alpine\n"),
        "Dockerfile:1: unknown flag: --platfrom for FROM (did you mean --platform?)"
    );
    assert_eq!(
        parse_error("FROM --from=x alpine\n"),
        "Dockerfile:1: --from is not a flag of FROM (it belongs to COPY)"
    );
    assert_eq!(
        parse_error("FROM --platform alpine\n"),
        "Dockerfile:1: invalid --platform: missing a value"
    );
}

#[test]
fn run_mount_types_and_defaults() {
    let m = mounts("--mount=type=bind,source=src,target=/src");
    assert_eq!(m[0].kind, MountType::Bind);
    assert!(m[0].read_only, "bind mounts are read-only by default");
    assert_eq!(m[0].source.as_deref(), Some("src"));

    let m = mounts("--mount=type=bind,target=/src,rw");
    assert!(!m[0].read_only);

    let m =
        mounts("--mount=type=cache,target=/root/.cache,sharing=locked,mode=0700,uid=1000,gid=1000");
    assert_eq!(m[0].kind, MountType::Cache);
    assert_eq!(
        m[0].id.as_deref(),
        Some("/root/.cache"),
        "cache id defaults to the target"
    );
    assert_eq!(m[0].sharing, CacheSharing::Locked);
    assert_eq!(
        (m[0].mode, m[0].uid, m[0].gid),
        (Some(0o700), Some(1000), Some(1000))
    );
    assert!(!m[0].read_only);

    let m = mounts("--mount=type=tmpfs,target=/tmp,size=64m");
    assert_eq!(m[0].size, Some(64 << 20));

    let m = mounts("--mount=type=secret,id=npmrc,required");
    assert_eq!(m[0].target, "/run/secrets/npmrc");
    assert!(m[0].required);

    let m = mounts("--mount=type=secret,id=token,env=TOKEN");
    assert_eq!(m[0].env.as_deref(), Some("TOKEN"));

    let m = mounts("--mount=type=ssh");
    assert_eq!(m[0].id.as_deref(), Some("default"));

    let m =
        mounts("--mount=type=bind,from=first,target=/x --mount=type=cache,target=/y,from=alpine:3");
    assert_eq!(m[0].from, Some(Source::Stage(0)));
    assert_eq!(m[1].from, Some(Source::Image("alpine:3".into())));

    // Flag words lose their quotes; an escaped quote reaches the CSV syntax of --mount.
    let m = mounts("--mount=type=bind,\\\"target=/a,b\\\",ro");
    assert_eq!(m[0].target, "/a,b");
    assert!(m[0].read_only);
}

#[test]
fn run_mount_errors() {
    let cases = [
        (
            "--mount=type=nfs,target=/x",
            "unsupported mount type \"nfs\"",
        ),
        (
            "--mount=type=bind,target=/x,colour=red",
            "unexpected key 'colour'",
        ),
        (
            "--mount=type=bind,target=/x,mode=0755",
            "mode not allowed for \"bind\" type mounts",
        ),
        (
            "--mount=type=bind,target=/x,sharing=locked",
            "invalid cache sharing set for bind mount",
        ),
        (
            "--mount=type=cache,target=/x,sharing=sometimes",
            "unsupported sharing value",
        ),
        (
            "--mount=type=bind,target=/x,size=1g",
            "unexpected key 'size' for mount type 'bind'",
        ),
        ("--mount=type=tmpfs,target=/x,size=lots", "invalid size"),
        ("--mount=type=cache", "cache mount requires a target"),
        ("--mount=type=secret", "one of source, target required"),
        (
            "--mount=type=bind,target=/x,ro=maybe",
            "invalid value for ro: maybe",
        ),
        (
            "--mount=type=bind,target=/x,required",
            "unexpected key 'required' for mount type 'bind'",
        ),
        (
            "--mount=type=cache,target=/x,uid=me",
            "invalid value me for uid",
        ),
        (
            "--mount=type=bind,\\\"target=/x",
            "missing \" in quoted field",
        ),
        (
            "--mount=type=bind,tar\\\"get=/x",
            "bare \" in non-quoted field",
        ),
        (
            "--mount=type=secret,target=/s,from=x",
            "from is not allowed for secret mounts",
        ),
        (
            "--mount=type=bind,target=/x,nokey",
            "invalid field 'nokey' must be a key=value pair",
        ),
    ];
    for (flag, expected) in cases {
        let err = parse_error(&format!("FROM a\n\nRUN {flag} true\n"));
        assert!(
            err.starts_with("Dockerfile:3: invalid --mount: "),
            "{flag}: {err}"
        );
        assert!(
            err.contains(expected),
            "{flag}: {err} should contain {expected:?}"
        );
    }
}

#[test]
fn run_mount_values_are_expanded() {
    let steps = steps_of(
        "FROM a\nARG CACHE=/root/.cache\nRUN --mount=type=cache,target=$CACHE true\n",
        0,
    );
    match &steps[1].instruction {
        Instruction::Run(run) => assert_eq!(run.mounts[0].target, "/root/.cache"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn run_network_and_security() {
    for (flag, network) in [
        ("none", NetworkMode::None),
        ("host", NetworkMode::Host),
        ("default", NetworkMode::Default),
    ] {
        match last_instruction(&format!("FROM a\nRUN --network={flag} true\n")) {
            Instruction::Run(run) => assert_eq!(run.network, network),
            other => panic!("{other:?}"),
        }
    }
    match last_instruction("FROM a\nRUN --security=insecure true\n") {
        Instruction::Run(run) => assert_eq!(run.security, SecurityMode::Insecure),
        other => panic!("{other:?}"),
    }
    assert!(parse_error("FROM a\nRUN --network=bridge true\n")
        .contains("unsupported network mode \"bridge\""));
    assert!(parse_error("FROM a\nRUN --security=relaxed true\n")
        .contains("unsupported security mode \"relaxed\""));
    assert_eq!(
        parse_error("FROM a\nRUN --network=none --network=host true\n"),
        "Dockerfile:2: invalid --network: duplicate flag specified"
    );
}

#[test]
fn copy_flags() {
    let source = "FROM a AS build\nFROM b\nARG OWNER=app\nCOPY --from=build --chown=$OWNER:$OWNER --chmod=0755 --link --parents --exclude=*.tmp --exclude=.git src/ /dst/\n";
    match last_instruction(source) {
        Instruction::Copy(c) => {
            assert_eq!(c.from, Some(Source::Stage(0)));
            assert_eq!(c.chown.as_deref(), Some("app:app"));
            assert_eq!(c.chmod, Some(Chmod::Octal(0o755)));
            assert!(c.link && c.parents);
            assert_eq!(c.exclude, vec!["*.tmp".to_string(), ".git".to_string()]);
            assert_eq!(c.dest, "/dst/");
        }
        other => panic!("{other:?}"),
    }
    match last_instruction("FROM b\nCOPY --link=false --chmod=u+x,go=rx a /b\n") {
        Instruction::Copy(c) => {
            assert!(!c.link);
            assert_eq!(c.chmod, Some(Chmod::Symbolic("u+x,go=rx".into())));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn copy_flag_errors() {
    assert!(parse_error("FROM b\nCOPY --chmod=999 a /b\n")
        .starts_with("Dockerfile:2: invalid --chmod: invalid chmod parameter"));
    assert!(
        parse_error("FROM b\nCOPY --chmod=77777 a /b\n").contains("mode must be in range 0 - 7777")
    );
    assert_eq!(
        parse_error("FROM b\nCOPY --link=maybe a /b\n"),
        "Dockerfile:2: invalid --link: expecting boolean value, not: maybe"
    );
    assert_eq!(
        parse_error("FROM b\nCOPY --link= a /b\n"),
        "Dockerfile:2: invalid --link: missing a value"
    );
    assert_eq!(
        parse_error("FROM b\nCOPY --from a /b\n"),
        "Dockerfile:2: invalid --from: missing a value"
    );
    assert_eq!(
        parse_error("FROM b\nCOPY --chmode=644 a /b\n"),
        "Dockerfile:2: unknown flag: --chmode for COPY (did you mean --chmod?)"
    );
    assert_eq!(
        parse_error("FROM b\nCOPY --checksum=sha256:00 a /b\n"),
        "Dockerfile:2: --checksum is not a flag of COPY (it belongs to ADD)"
    );
    assert_eq!(
        parse_error("FROM b\nCOPY a\n"),
        "Dockerfile:2: COPY requires at least two arguments, but only one was provided. Destination could not be determined"
    );
    // A variable --chmod is validated once expanded.
    assert!(
        plan_error("FROM b\nARG MODE=rwx\nCOPY --chmod=$MODE a /b\n")
            .starts_with("Dockerfile:3: invalid --chmod")
    );
}

#[test]
fn add_flags() {
    let sum = "sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d";
    let source = format!("FROM a\nADD --checksum={sum} --chown=1:1 --chmod=600 --link --keep-git-dir --exclude=x https://example.com/f.tgz /f\n");
    match last_instruction(&source) {
        Instruction::Add(a) => {
            assert_eq!(a.checksum.as_deref(), Some(sum));
            assert_eq!(a.chown.as_deref(), Some("1:1"));
            assert_eq!(a.chmod, Some(Chmod::Octal(0o600)));
            assert!(a.link && a.keep_git_dir);
            assert_eq!(a.exclude, vec!["x".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        parse_error("FROM a\nADD --checksum=md5:abc https://e/f /f\n")
            .contains("unsupported checksum algorithm \"md5\"")
    );
    assert!(
        parse_error("FROM a\nADD --checksum=sha256:abc https://e/f /f\n")
            .contains("expected 64 lowercase hex digits")
    );
    assert!(
        plan_error(&format!("FROM a\nADD --checksum={sum} local.txt /f\n"))
            .contains("checksum can't be specified for non-HTTP(S)")
    );
    assert_eq!(
        parse_error("FROM a\nADD --from=x a /b\n"),
        "Dockerfile:2: --from is not a flag of ADD (it belongs to COPY)"
    );
    assert_eq!(
        parse_error("FROM a\nADD --parents a /b\n"),
        "Dockerfile:2: --parents is not a flag of ADD (it belongs to COPY)"
    );
}

#[test]
fn healthcheck_flags() {
    let source = "FROM a\nHEALTHCHECK --interval=30s --timeout=1m30s --start-period=1.5s --start-interval=500ms --retries=3 CMD curl -f http://localhost/\n";
    match last_instruction(source) {
        Instruction::Healthcheck(HealthCheck::Check {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        }) => {
            assert_eq!(test, CommandLine::Shell("curl -f http://localhost/".into()));
            assert_eq!(interval, Some(Duration::from_secs(30)));
            assert_eq!(timeout, Some(Duration::from_secs(90)));
            assert_eq!(start_period, Some(Duration::from_millis(1500)));
            assert_eq!(start_interval, Some(Duration::from_millis(500)));
            assert_eq!(retries, Some(3));
        }
        other => panic!("{other:?}"),
    }
    match last_instruction("FROM a\nHEALTHCHECK CMD [\"/bin/check\", \"-q\"]\n") {
        Instruction::Healthcheck(HealthCheck::Check { test, .. }) => {
            assert_eq!(
                test,
                CommandLine::Exec(vec!["/bin/check".into(), "-q".into()])
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        last_instruction("FROM a\nHEALTHCHECK NONE\n"),
        Instruction::Healthcheck(HealthCheck::Disable)
    );

    let errors = [
        (
            "--interval=5 CMD true",
            "invalid --interval: missing unit in duration \"5\"",
        ),
        (
            "--timeout=abc CMD true",
            "invalid --timeout: invalid duration \"abc\"",
        ),
        (
            "--start-period=10parsecs CMD true",
            "invalid --start-period: unknown unit",
        ),
        ("--interval=10us CMD true", "cannot be less than 1ms"),
        (
            "--retries=-1 CMD true",
            "invalid --retries: cannot be negative (-1)",
        ),
        (
            "--retries=three CMD true",
            "invalid --retries: invalid number \"three\"",
        ),
        ("NONE extra", "HEALTHCHECK NONE takes no arguments"),
        ("--interval=5s NONE", "HEALTHCHECK NONE takes no flags"),
        (
            "CONNECT TCP 7000",
            "Unknown type \"CONNECT\" in HEALTHCHECK (try CMD)",
        ),
        ("CMD", "Missing command after HEALTHCHECK CMD"),
        (
            "--mount=type=cache,target=/x CMD true",
            "--mount is not a flag of HEALTHCHECK (it belongs to RUN)",
        ),
    ];
    for (args, expected) in errors {
        let err = parse_error(&format!("FROM a\nHEALTHCHECK {args}\n"));
        assert!(err.starts_with("Dockerfile:2: "), "{args}: {err}");
        assert!(
            err.contains(expected),
            "{args}: {err} should contain {expected:?}"
        );
    }
}

#[test]
fn instructions_without_flags_reject_them() {
    for instruction in [
        "ENV --x=1 A=b",
        "WORKDIR --chown=1 /x",
        "CMD --network=none true",
        "USER --from=a me",
    ] {
        let err = parse_error(&format!("FROM a\n{instruction}\n"));
        assert!(err.starts_with("Dockerfile:2: "), "{err}");
        assert!(err.contains("flag"), "{instruction}: {err}");
    }
    match Dockerfile::parse("FROM a\nRUN --from=x true\n")
        .unwrap_err()
        .kind()
    {
        ErrorKind::FlagNotAllowed {
            instruction,
            flag,
            owners,
        } => {
            assert_eq!(
                (instruction.as_str(), flag.as_str(), owners.as_str()),
                ("RUN", "from", "COPY")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn expose_stopsignal_and_friends() {
    match last_instruction("FROM a\nARG P=8080\nEXPOSE 80 $P/udp 9000-9010/tcp\n") {
        Instruction::Expose(ports) => {
            let got: Vec<(u16, u16)> = ports.iter().map(|p| (p.start, p.end)).collect();
            assert_eq!(got, vec![(80, 80), (8080, 8080), (9000, 9010)]);
        }
        other => panic!("{other:?}"),
    }
    assert!(parse_error("FROM a\nEXPOSE 80/icmp\n").contains("invalid protocol"));
    assert!(parse_error("FROM a\nEXPOSE 70000\n").contains("must be 0-65535"));
    assert_eq!(
        last_instruction("FROM a\nSTOPSIGNAL SIGKILL\n"),
        Instruction::StopSignal("SIGKILL".into())
    );
    assert!(parse_error("FROM a\nSTOPSIGNAL SIGFOO\n").contains("invalid signal: SIGFOO"));
    assert!(parse_error("FROM a\nSHELL /bin/bash -c\n").contains("JSON form"));
    assert_eq!(
        parse_error("FROM a\nWORKDIR\n"),
        "Dockerfile:2: WORKDIR requires exactly one argument"
    );
    assert_eq!(
        last_instruction("FROM a\nWORKDIR /a b\n"),
        Instruction::Workdir("/a b".into())
    );
    assert_eq!(
        parse_error("FROM a\nONBUILD ONBUILD RUN x\n"),
        "Dockerfile:2: Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
    );
    assert_eq!(
        parse_error("FROM a\nONBUILD FROM x\n"),
        "Dockerfile:2: FROM isn't allowed as an ONBUILD trigger"
    );
    assert!(parse_error("FROM a\nONBUILD COPY --chmod=9 a b\n").contains("invalid --chmod"));
    assert_eq!(
        last_instruction("FROM a\nonbuild  RUN echo $HOME\n"),
        Instruction::Onbuild("RUN echo $HOME".into())
    );
}
