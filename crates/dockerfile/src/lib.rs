//! Everything Kiln knows about Dockerfiles, with BuildKit's semantics and no I/O.
//!
//! Three layers, each usable on its own:
//!
//! 1. **Syntax** — [`parse_ast`] reads the text into [`Node`]s: parser directives (`syntax`,
//!    `escape`, `check`), line continuations (also across comments and blank lines, and at end
//!    of file), case-insensitive keywords, JSON (exec) and shell form with BuildKit's fallback to
//!    shell form for invalid JSON, `--flags`, ONBUILD, heredocs. Every node keeps its first and
//!    last line. [`Ast::dump`] prints BuildKit's test format.
//! 2. **Instructions** — [`Dockerfile::parse`] also validates each instruction into a typed
//!    [`Instruction`]: unknown instructions (with a "did you mean"), unknown flags, flags on the
//!    wrong instruction, bad `--chmod`, durations, `--mount`s, argument counts are errors that
//!    carry the line: `Dockerfile:7: unknown instruction: RUNN (did you mean RUN?)`.
//! 3. **Plan** — [`Dockerfile::plan`] applies build args, `--target` and the target/build
//!    platforms: global ARGs, FROM expansion, the stages the target needs (others are never
//!    built) as a dependency graph with a topological order and parallel [`Plan::levels`].
//!    [`PlannedStage::steps`] then expands each instruction with the stage's ARG/ENV scope at
//!    that point ([`Lexer`] implements BuildKit's word expansion), and tells which ARGs and ENVs
//!    are in effect at every step. RUN, CMD and ENTRYPOINT bodies are never expanded here (the
//!    shell does that); COPY/ADD heredoc bodies are, unless the delimiter is quoted.
//!
//! # Example
//!
//! ```
//! use kiln_dockerfile::{Base, Dockerfile, Instruction, PlanOptions, RunProgram};
//!
//! let dockerfile = Dockerfile::parse(
//!     r#"
//! ARG VERSION=1.22
//! FROM golang:${VERSION} AS build
//! ARG VERSION
//! WORKDIR /src/v$VERSION
//! RUN go build -o /out/app .
//!
//! FROM scratch AS unused
//!
//! FROM debian:bookworm
//! COPY --from=build /out/app /usr/local/bin/app
//! CMD ["app"]
//! "#,
//! )?;
//!
//! let mut options = PlanOptions::default();
//! options.build_args.insert("VERSION".into(), "1.23".into());
//! let plan = dockerfile.plan(&options)?;
//!
//! // The unused stage is pruned; `build` must finish before the final stage.
//! assert_eq!(plan.levels(), &[vec![0], vec![2]]);
//! let build = plan.stage(0).expect("stage 0 is needed");
//! assert_eq!(build.base, Base::Image("golang:1.23".into()));
//!
//! // Words are expanded with the stage's scope; RUN bodies are left to the shell.
//! let steps = build.steps(&[])?.steps;
//! assert_eq!(steps[1].instruction, Instruction::Workdir("/src/v1.23".into()));
//! match &steps[2].instruction {
//!     Instruction::Run(run) => {
//!         assert_eq!(run.program, RunProgram::Shell("go build -o /out/app .".into()));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert_eq!(steps[2].args, vec![("VERSION".to_string(), "1.23".to_string())]);
//!
//! // Errors carry the line.
//! let err = Dockerfile::parse("FROM alpine\nRUNN make\n").unwrap_err();
//! assert_eq!(err.to_string(), "Dockerfile:2: unknown instruction: RUNN (did you mean RUN?)");
//! # Ok::<(), kiln_dockerfile::Error>(())
//! ```

#![forbid(unsafe_code)]

mod ast;
mod error;
mod expand;
mod instruction;
mod json;
mod lower;
mod pattern;
mod quote;
mod stage;
mod values;

pub use ast::{parse_ast, Ast, Directives, Heredoc, Node, Warning};
pub use error::{Error, ErrorKind, Lines};
pub use expand::{ExpandError, Lexer, Variables};
pub use instruction::{
    AddFiles, ArgDecl, CommandLine, CopyFiles, FileSource, HealthCheck, Instruction, KeyValue,
    RunCommand, RunProgram,
};
pub use stage::{
    Base, Dockerfile, Plan, PlanOptions, PlannedStage, Platform, Stage, StageSteps, Step,
    PLATFORM_ARGS, PROXY_ARGS,
};
pub use values::{
    CacheSharing, Chmod, Mount, MountType, NetworkMode, Port, Protocol, SecurityMode, Source,
};
