//! Stages: ARG scoping, predefined args, build args, --target, pruning, the dependency graph,
//! and errors with line numbers.

use std::collections::BTreeMap;

use kiln_dockerfile::{
    Base, Dockerfile, Instruction, KeyValue, Plan, PlanOptions, Platform, Source, Step,
};

fn options(args: &[(&str, &str)], target: Option<&str>) -> PlanOptions {
    PlanOptions {
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        target: target.map(str::to_string),
        ..PlanOptions::default()
    }
}

fn plan(source: &str, options: &PlanOptions) -> Plan {
    Dockerfile::parse(source)
        .unwrap_or_else(|e| panic!("{e}"))
        .plan(options)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn steps(plan: &Plan, stage: usize) -> Vec<Step> {
    plan.stage(stage)
        .unwrap_or_else(|| panic!("stage {stage} not planned"))
        .steps(&[])
        .unwrap_or_else(|e| panic!("{e}"))
        .steps
}

fn workdir(step: &Step) -> &str {
    match &step.instruction {
        Instruction::Workdir(w) => w,
        other => panic!("expected WORKDIR, got {other:?}"),
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn global_args_are_visible_in_from_but_not_in_stages_unless_redeclared() {
    let source = "ARG BASE=alpine\nARG TAG=3.19\nFROM ${BASE}:${TAG}\nWORKDIR /$TAG\nARG TAG\nWORKDIR /$TAG\n";
    let p = plan(source, &PlanOptions::default());
    assert_eq!(p.stages()[0].base, Base::Image("alpine:3.19".into()));
    let s = steps(&p, 0);
    assert_eq!(
        workdir(&s[0]),
        "/",
        "global ARG is not in scope before redeclaration"
    );
    assert_eq!(
        workdir(&s[2]),
        "/3.19",
        "redeclared ARG inherits the global value"
    );
    assert_eq!(s[2].args, pairs(&[("TAG", "3.19")]));
}

#[test]
fn build_args_override_global_and_stage_defaults() {
    let source = "ARG TAG=3.19\nFROM alpine:$TAG\nARG TAG\nARG MODE=debug\nWORKDIR /$TAG/$MODE\n";
    let p = plan(
        source,
        &options(&[("TAG", "edge"), ("MODE", "release")], None),
    );
    assert_eq!(p.stages()[0].base, Base::Image("alpine:edge".into()));
    assert_eq!(workdir(&steps(&p, 0)[2]), "/edge/release");
    assert!(p.unused_build_args().is_empty());
}

#[test]
fn arg_defaults_reference_earlier_args_and_one_instruction_sees_the_old_scope() {
    let source = "FROM a\nARG A=1\nARG B=${A}2 C=${B}3\nWORKDIR /$A/$B/$C\nENV X=old\nENV X=new Y=$X\nWORKDIR /$Y\n";
    let p = plan(source, &PlanOptions::default());
    let s = steps(&p, 0);
    assert_eq!(
        workdir(&s[2]),
        "/1/12/3",
        "C sees B's value from before the instruction (unset)"
    );
    assert_eq!(
        workdir(&s[5]),
        "/old",
        "Y sees X's value from before the instruction"
    );
    assert_eq!(s[5].env, pairs(&[("X", "new"), ("Y", "old")]));
}

#[test]
fn env_shadows_arg() {
    let source = "FROM a\nARG V=from-arg\nENV V=from-env\nWORKDIR /$V\nARG V=again\nWORKDIR /$V\n";
    let s = steps(&plan(source, &PlanOptions::default()), 0);
    assert_eq!(workdir(&s[2]), "/from-env");
    assert_eq!(workdir(&s[4]), "/from-env");
    assert_eq!(s[4].run_env(), pairs(&[("V", "from-env")]));
}

#[test]
fn args_do_not_cross_stages_but_env_is_inherited_from_a_base_stage() {
    let source = "FROM a AS one\nARG ONLY_ONE=1\nENV FROM_ONE=yes\nFROM one AS two\nWORKDIR /${ONLY_ONE:-unset}/$FROM_ONE\n";
    let p = plan(source, &PlanOptions::default());
    let one = p
        .stage(0)
        .unwrap()
        .steps(&pairs(&[("PATH", "/bin")]))
        .unwrap();
    assert_eq!(one.env, pairs(&[("PATH", "/bin"), ("FROM_ONE", "yes")]));
    let two = p.stage(1).unwrap();
    assert_eq!(two.base, Base::Stage(0));
    let s = two.steps(&one.env).unwrap().steps;
    assert_eq!(workdir(&s[0]), "/unset/yes");
    assert!(s[0].args.is_empty());
}

#[test]
fn base_image_env_is_used_for_expansion() {
    let source = "FROM golang\nWORKDIR $GOPATH/src\nENV PATH=$PATH:/go/bin\n";
    let p = plan(source, &PlanOptions::default());
    let out = p
        .stage(0)
        .unwrap()
        .steps(&pairs(&[("GOPATH", "/go"), ("PATH", "/usr/bin")]))
        .unwrap();
    assert_eq!(workdir(&out.steps[0]), "/go/src");
    assert_eq!(
        out.env,
        pairs(&[("GOPATH", "/go"), ("PATH", "/usr/bin:/go/bin")])
    );
}

#[test]
fn run_environment_holds_declared_args_and_proxies_only() {
    let source = "FROM a\nARG DECLARED\nARG WITH_DEFAULT=d\nARG UNSET\nRUN env\n";
    let p = plan(
        source,
        &options(
            &[
                ("DECLARED", "x"),
                ("UNDECLARED", "y"),
                ("HTTP_PROXY", "http://p:3128"),
            ],
            None,
        ),
    );
    let s = steps(&p, 0);
    assert_eq!(
        s[3].args,
        pairs(&[("DECLARED", "x"), ("WITH_DEFAULT", "d")])
    );
    assert_eq!(
        s[3].proxy_args(),
        pairs(&[("HTTP_PROXY", "http://p:3128")]).as_slice()
    );
    assert_eq!(
        s[3].run_env(),
        pairs(&[
            ("DECLARED", "x"),
            ("WITH_DEFAULT", "d"),
            ("HTTP_PROXY", "http://p:3128")
        ])
    );
    assert_eq!(p.unused_build_args(), &["UNDECLARED".to_string()]);
    // The RUN body stays unexpanded for the shell.
    match &s[3].instruction {
        Instruction::Run(run) => assert_eq!(
            run.program,
            kiln_dockerfile::RunProgram::Shell("env".into())
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn predefined_platform_args() {
    let source = "FROM --platform=$BUILDPLATFORM tools-$TARGETARCH AS build\nARG TARGETOS TARGETARCH TARGETVARIANT BUILDPLATFORM\nWORKDIR /$TARGETOS/$TARGETARCH/$TARGETVARIANT/$BUILDPLATFORM\nWORKDIR /${BUILDOS:-undeclared}\n";
    let options = PlanOptions {
        target_platform: Platform::parse("linux/arm/v7").unwrap(),
        build_platform: Platform::parse("linux/amd64").unwrap(),
        ..PlanOptions::default()
    };
    let p = plan(source, &options);
    let stage = &p.stages()[0];
    assert_eq!(stage.base, Base::Image("tools-arm".into()));
    assert_eq!(stage.platform.as_deref(), Some("linux/amd64"));
    let s = steps(&p, 0);
    assert_eq!(workdir(&s[1]), "/linux/arm/v7/linux/amd64");
    assert_eq!(
        workdir(&s[2]),
        "/undeclared",
        "predefined args need ARG inside a stage"
    );
    assert!(p
        .global_args()
        .contains(&("TARGETPLATFORM".to_string(), "linux/arm/v7".to_string())));
    assert!(p
        .global_args()
        .contains(&("TARGETVARIANT".to_string(), "v7".to_string())));
    assert!(p
        .global_args()
        .contains(&("BUILDVARIANT".to_string(), String::new())));
}

const MULTI: &str = "\
FROM alpine AS base
RUN apk add make

FROM base AS Deps
RUN make deps

FROM golang AS tools
RUN go install tool

FROM scratch AS docs

FROM deps AS build
COPY --from=TOOLS /go/bin/tool /usr/bin/
COPY --from=1 /deps /deps
COPY --from=busybox:1.36 /bin/busybox /bin/
RUN --mount=type=bind,from=docs,target=/docs make

FROM build AS final
";

#[test]
fn target_prunes_unused_stages_and_builds_a_dependency_graph() {
    let p = plan(MULTI, &PlanOptions::default());
    let planned: Vec<usize> = p.stages().iter().map(|s| s.index).collect();
    // Topological: every stage after what it depends on.
    for (pos, stage) in p.stages().iter().enumerate() {
        for dep in &stage.dependencies {
            let dep_pos = planned
                .iter()
                .position(|i| i == dep)
                .expect("dependency planned");
            assert!(dep_pos < pos, "{} before {}", dep, stage.index);
        }
    }
    assert_eq!(p.target(), 5);
    assert_eq!(p.levels(), &[vec![0, 2, 3], vec![1], vec![4], vec![5]]);
    let build = p.stage(4).unwrap();
    assert_eq!(
        build.base,
        Base::Stage(1),
        "FROM deps matches the stage named Deps"
    );
    assert_eq!(build.dependencies, vec![1, 2, 3]);
    assert_eq!(build.images, vec!["busybox:1.36".to_string()]);
    let s = steps(&p, 4);
    match &s[0].instruction {
        Instruction::Copy(c) => assert_eq!(c.from, Some(Source::Stage(2))),
        other => panic!("{other:?}"),
    }
    match &s[2].instruction {
        Instruction::Copy(c) => assert_eq!(c.from, Some(Source::Image("busybox:1.36".into()))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn target_selects_a_stage_case_insensitively() {
    let p = plan(MULTI, &options(&[], Some("DEPS")));
    let planned: Vec<usize> = p.stages().iter().map(|s| s.index).collect();
    assert_eq!(planned, vec![0, 1]);
    assert_eq!(p.levels(), &[vec![0], vec![1]]);

    let p = plan(MULTI, &options(&[], Some("docs")));
    assert_eq!(p.stages().len(), 1);
    assert_eq!(p.stages()[0].base, Base::Scratch);
}

#[test]
fn unknown_target_is_an_error() {
    let err = Dockerfile::parse(MULTI)
        .unwrap()
        .plan(&options(&[], Some("nope")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile: target stage \"nope\" could not be found"
    );
}

#[test]
fn copy_from_with_variables_and_unneeded_stage_errors_are_ignored() {
    let source = "ARG SRC=builder\nFROM alpine AS builder\nFROM scratch AS broken\nWORKDIR ${NOPE:?must be set}\nFROM alpine\nARG SRC\nCOPY --from=$SRC /a /a\n";
    let p = plan(source, &PlanOptions::default());
    let planned: Vec<usize> = p.stages().iter().map(|s| s.index).collect();
    assert_eq!(planned, vec![0, 2]);
    assert_eq!(p.stage(2).unwrap().dependencies, vec![0]);
}

#[test]
fn dependency_cycles_are_errors() {
    let source = "FROM a AS one\nCOPY --from=two /x /x\nFROM b AS two\nCOPY --from=one /y /y\n";
    let err = Dockerfile::parse(source)
        .unwrap()
        .plan(&PlanOptions::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("circular dependency detected on stage"),
        "{err}"
    );

    let err = Dockerfile::parse("FROM a AS me\nCOPY --from=me /x /x\n")
        .unwrap()
        .plan(&PlanOptions::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2: circular dependency detected on stage: me"
    );

    let err = Dockerfile::parse("FROM a\nCOPY --from=7 /x /x\n")
        .unwrap()
        .plan(&PlanOptions::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2: invalid --from: invalid stage index 7"
    );
}

#[test]
fn from_refers_to_previous_stages_only() {
    let p = plan(
        "FROM later AS first\nFROM alpine AS later\n",
        &options(&[], Some("first")),
    );
    assert_eq!(p.stages()[0].base, Base::Image("later".into()));
}

#[test]
fn stage_names_are_validated() {
    let err = Dockerfile::parse("FROM a AS 1st\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:1: invalid name for build stage: \"1st\", name can't start with a number or contain symbols"
    );
    let err = Dockerfile::parse("FROM a AS x\nFROM b AS X\n").unwrap_err();
    assert_eq!(err.to_string(), "Dockerfile:2: duplicate stage name \"x\"");
    let err = Dockerfile::parse("FROM a AS\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:1: FROM requires either one or three arguments"
    );
}

#[test]
fn env_and_label_pairs() {
    let p = plan("FROM a\nENV A=1 B=\"two words\" C=x\\ y\nLABEL version=$A \"key two\"=v\nENV OLD form value\n", &PlanOptions::default());
    let s = steps(&p, 0);
    let kv = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: v.into(),
    };
    assert_eq!(
        s[0].instruction,
        Instruction::Env(vec![kv("A", "1"), kv("B", "two words"), kv("C", "x y")])
    );
    assert_eq!(
        s[1].instruction,
        Instruction::Label(vec![kv("version", "1"), kv("key two", "v")])
    );
    assert_eq!(
        s[2].instruction,
        Instruction::Env(vec![kv("OLD", "form value")])
    );
}

#[test]
fn escape_directive_applies_to_expansion() {
    let p = plan(
        "# escape=`\nFROM a\nARG V=x\nWORKDIR C:\\$V\\`$V\n",
        &PlanOptions::default(),
    );
    assert_eq!(workdir(&steps(&p, 0)[1]), "C:\\x\\$V");
}

#[test]
fn errors_carry_line_numbers() {
    let cases: &[(&str, &str)] = &[
        ("FROM alpine\n\nRUNN make\n", "Dockerfile:3: unknown instruction: RUNN (did you mean RUN?)"),
        ("FROM alpine\ncopy --form=x a b\n", "Dockerfile:2: unknown flag: --form for COPY (did you mean --from?)"),
        ("RUN true\nFROM alpine\n", "Dockerfile:1: RUN must come after a FROM instruction (only ARG may precede the first FROM)"),
        ("FROM alpine\nENV PATH\n", "Dockerfile:2: ENV must have two arguments"),
        ("FROM alpine\nRUN a \\\n  b \\\n  --c\nCOPY --chmod=8 a b\n", "Dockerfile:5: invalid --chmod: invalid chmod parameter \"8\": expected an octal mode (0-7777) or a symbolic mode like u+x"),
        ("FROM alpine\nCMD [\"a\", [\"b\"]]\n", "Dockerfile:2: when using JSON array syntax, arrays must be comprised of strings only"),
        ("# escape=x\nFROM a\n", "Dockerfile:1: invalid escape token 'x' does not match ` or \\"),
        ("# escape=`\n# escape=\\\nFROM a\n", "Dockerfile:2: only one escape parser directive can be used"),
        ("# just comments\n\n", "Dockerfile:2: file with no instructions"),
        ("ARG X=1\n", "Dockerfile:1: no FROM instruction: nothing to build"),
        ("FROM a\nFOO bar\n", "Dockerfile:2: unknown instruction: FOO"),
    ];
    for (source, expected) in cases {
        let err = Dockerfile::parse(source).unwrap_err();
        assert_eq!(&err.to_string(), expected, "for {source:?}");
    }
    // Expansion errors surface when the stage is planned, at the instruction's line.
    let err = plan(
        "FROM a\nARG V\n\nWORKDIR ${V:?is required}\n",
        &PlanOptions::default(),
    )
    .stage(0)
    .unwrap()
    .steps(&[])
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:4: failed to process \"${V:?is required}\": V: is required"
    );
    assert_eq!(err.line(), Some(4));
    let err = Dockerfile::parse("ARG B\nFROM $B\n")
        .unwrap()
        .plan(&PlanOptions::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2: base name ($B) should not be blank"
    );
    let named = Dockerfile::parse("FROM a\nRUNN\n")
        .unwrap_err()
        .with_file_name("ci/Dockerfile.build");
    assert_eq!(
        named.to_string(),
        "ci/Dockerfile.build:2: unknown instruction: RUNN (did you mean RUN?)"
    );
}

#[test]
fn directives_and_warnings_are_exposed() {
    let d = Dockerfile::parse("# syntax=docker/dockerfile:1.7\n# check=skip=JSONArgsRecommended\nFROM a\nRUN a \\\n\n  b\n").unwrap();
    assert_eq!(
        d.directives().syntax.as_deref(),
        Some("docker/dockerfile:1.7")
    );
    assert_eq!(
        d.directives().check.as_deref(),
        Some("skip=JSONArgsRecommended")
    );
    assert_eq!(d.directives().escape, '\\');
    assert_eq!(d.warnings().len(), 1);
    assert_eq!(d.warnings()[0].lines.start, 4);
}

#[test]
fn onbuild_triggers_of_a_base_image_run_first() {
    let p = plan(
        "FROM app-base\nARG V=1\nRUN make\n",
        &PlanOptions::default(),
    );
    let stage = p.stage(0).unwrap();
    let triggers = vec![
        "COPY . /app/src".to_string(),
        "RUN cd /app/src && build $V".to_string(),
    ];
    let s = stage.steps_with_triggers(&[], &triggers).unwrap().steps;
    assert_eq!(s.len(), 4);
    assert_eq!(s[0].lines, stage.lines);
    assert!(matches!(s[0].instruction, Instruction::Copy(_)));
    assert!(matches!(s[1].instruction, Instruction::Run(_)));
    let err = stage
        .steps_with_triggers(&[], &["FROM x".to_string()])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:1: FROM isn't allowed as an ONBUILD trigger"
    );
    let err = stage
        .steps_with_triggers(&[], &["RUNN x".to_string()])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:1: unknown instruction: RUNN (did you mean RUN?)"
    );
}
