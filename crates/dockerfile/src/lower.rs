//! Lowering a Dockerfile into the front-end-neutral build plan ([`kiln_plan::Plan`]): one
//! plan stage per needed Dockerfile stage, one plan step per instruction (ARG has none: its
//! values reach the RUN steps that see them).
//!
//! A stage's instructions are expanded only when the engine knows its base, because the base's
//! ENV is in scope for every word and the base's ONBUILD triggers run first ([`kiln_plan::Lower`]:
//! the engine answers with the base's [`BaseFacts`], as BuildKit's gateway answers a front end's
//! image-config requests). The same rule serves a stage built FROM an earlier stage: its base
//! facts are that stage's final environment and the triggers it declared.

use std::sync::Arc;

use kiln_plan::{
    BaseFacts, ConfigEdit, Copy, CopySource, FrontEnd, Lower, LowerError, Mkdir, Operation,
    Provenance, Run, StageFiles, Steps,
};

use crate::error::Error;
use crate::instruction::{FileSource, Instruction};
use crate::stage::{Base, Dockerfile, PlanOptions, PlannedStage, Step, PROXY_ARGS};
use crate::values::Protocol;

impl Dockerfile {
    /// Lowers the stages `options` need into a build plan. `text` is the Dockerfile's text
    /// (history and progress show each instruction as written) and `file` its name as the
    /// user gave it (errors say `FILE:LINE`).
    pub fn lower(
        &self,
        text: &str,
        file: &str,
        options: &PlanOptions,
    ) -> Result<kiln_plan::Plan, Error> {
        let graph = self.plan(options)?;
        let source = Arc::new(Source {
            file: file.to_owned(),
            lines: text.lines().map(str::to_owned).collect(),
        });
        let stages = graph
            .stages()
            .iter()
            .map(|planned| kiln_plan::Stage {
                id: planned.index,
                name: planned.name.clone(),
                base: match &planned.base {
                    Base::Scratch => kiln_plan::Base::Scratch,
                    Base::Image(image) => kiln_plan::Base::Image(image.clone()),
                    Base::Stage(index) => kiln_plan::Base::Stage(*index),
                },
                origin: source.provenance(planned.lines.start, planned.lines.end, None),
                dependencies: planned.dependencies.clone(),
                steps: Steps::Lowered(Arc::new(StageLowering {
                    stage: planned.clone(),
                    source: source.clone(),
                })),
                layer_epoch: None,
            })
            .collect();
        let mut identity = String::new();
        for part in std::iter::once(text.to_owned()).chain(
            options
                .build_args
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        ) {
            identity.push_str(&format!("{}:{part}\n", part.len()));
        }
        let plan = kiln_plan::Plan::new(FrontEnd::Dockerfile, identity, stages, graph.target())
            .map_err(|e| Error::general(crate::error::ErrorKind::Invalid(e.to_string())))?;
        Ok(plan.with_notes(
            graph
                .unused_build_args()
                .iter()
                .map(|arg| format!("build arg {arg} was given but no stage uses it"))
                .collect(),
        ))
    }
}

/// The Dockerfile's name and lines, shared by every stage's lowering.
struct Source {
    file: String,
    lines: Vec<String>,
}

impl Source {
    /// The provenance of the instruction on lines `start..=end`: its text as written
    /// (continuation lines joined, comments dropped) unless `text` is given.
    fn provenance(&self, start: usize, end: usize, text: Option<&str>) -> Provenance {
        Provenance {
            front_end: FrontEnd::Dockerfile,
            file: self.file.clone(),
            line: start,
            text: match text {
                Some(text) => text.to_owned(),
                None => self.instruction_text(start, end),
            },
        }
    }

    fn instruction_text(&self, start: usize, end: usize) -> String {
        let start = start.saturating_sub(1);
        let end = end.min(self.lines.len());
        let mut text = String::new();
        for line in self.lines.get(start..end).unwrap_or_default() {
            let trimmed = line.trim();
            let trimmed = trimmed.strip_suffix('\\').unwrap_or(trimmed).trim();
            if trimmed.starts_with('#') || trimmed.is_empty() {
                continue;
            }
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(trimmed);
        }
        text
    }

    /// `Dockerfile:LINE: ...` messages name the file as the user gave it.
    fn error(&self, error: Error) -> LowerError {
        let text = error.to_string();
        let name = std::path::Path::new(&self.file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".into());
        LowerError(match text.strip_prefix("Dockerfile") {
            Some(rest) if name != "Dockerfile" => format!("{name}{rest}"),
            _ => text,
        })
    }
}

/// One stage's instructions, expanded once the base is known.
struct StageLowering {
    stage: PlannedStage,
    source: Arc<Source>,
}

impl Lower for StageLowering {
    fn lower(
        &self,
        base: &BaseFacts,
        _stages: &dyn StageFiles,
    ) -> Result<Vec<kiln_plan::Step>, LowerError> {
        let expanded = self
            .stage
            .steps_with_triggers(&base.env, &base.on_build)
            .map_err(|e| self.source.error(e))?;
        let triggers = base.on_build.len();
        let mut steps = Vec::with_capacity(expanded.steps.len());
        for (i, step) in expanded.steps.into_iter().enumerate() {
            // Trigger steps carry the FROM line; history shows the trigger itself.
            let text = (i < triggers).then(|| base.on_build[i].as_str());
            let provenance = self
                .source
                .provenance(step.lines.start, step.lines.end, text);
            if let Some(operation) = operation(&step)
                .map_err(|message| LowerError(format!("{}: {message}", provenance.location())))?
            {
                steps.push(kiln_plan::Step::new(operation, provenance));
            }
        }
        Ok(steps)
    }
}

/// The operation an expanded instruction stands for (`None` for ARG, which only scopes
/// variables).
fn operation(step: &Step) -> Result<Option<Operation>, String> {
    let pairs = |pairs: &[crate::instruction::KeyValue]| {
        pairs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect::<Vec<_>>()
    };
    let config = |edit| Ok(Some(Operation::Config(edit)));
    match &step.instruction {
        Instruction::Arg(_) => Ok(None),
        Instruction::Run(run) => {
            // Proxy settings reach the step but never its key, declared or not (BuildKit).
            let (proxies, args): (Vec<_>, Vec<_>) = step
                .args
                .iter()
                .cloned()
                .partition(|(name, _)| PROXY_ARGS.contains(&name.as_str()));
            Ok(Some(Operation::Run(Run {
                program: run.program.clone(),
                mounts: run.mounts.clone(),
                network: run.network,
                security: run.security,
                build_env: args,
                unkeyed_env: proxies
                    .into_iter()
                    .chain(step.proxy_args().iter().cloned())
                    .collect(),
            })))
        }
        Instruction::Copy(copy) => Ok(Some(Operation::Copy(Copy {
            from: copy.from.clone(),
            sources: copy.sources.iter().map(local_source).collect(),
            dest: copy.dest.clone(),
            chown: copy.chown.clone(),
            chmod: copy.chmod.clone(),
            link: copy.link,
            parents: copy.parents,
            exclude: copy.exclude.clone(),
            unpack: false,
            checksum: None,
            keep_git_dir: false,
            reuse_layer: None,
        }))),
        Instruction::Add(add) => {
            let sources = add
                .sources
                .iter()
                .map(add_source)
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Some(Operation::Copy(Copy {
                from: None,
                sources,
                dest: add.dest.clone(),
                chown: add.chown.clone(),
                chmod: add.chmod.clone(),
                link: add.link,
                parents: false,
                exclude: add.exclude.clone(),
                unpack: true,
                checksum: add.checksum.clone(),
                keep_git_dir: add.keep_git_dir,
                reuse_layer: None,
            })))
        }
        Instruction::Workdir(path) => Ok(Some(Operation::Mkdir(Mkdir {
            path: path.clone(),
            set_working_dir: true,
        }))),
        Instruction::Env(kv) => config(ConfigEdit::Env(pairs(kv))),
        Instruction::Label(kv) => config(ConfigEdit::Labels(pairs(kv))),
        Instruction::Expose(ports) => config(ConfigEdit::ExposePorts(
            ports
                .iter()
                .flat_map(|port| {
                    let protocol = match port.protocol {
                        Protocol::Tcp => "tcp",
                        Protocol::Udp => "udp",
                        Protocol::Sctp => "sctp",
                    };
                    (port.start..=port.end).map(move |number| format!("{number}/{protocol}"))
                })
                .collect(),
        )),
        Instruction::Volume(paths) => config(ConfigEdit::Volumes(paths.clone())),
        Instruction::User(user) => config(ConfigEdit::User(user.clone())),
        Instruction::StopSignal(signal) => config(ConfigEdit::StopSignal(signal.clone())),
        Instruction::Shell(argv) => config(ConfigEdit::Shell(argv.clone())),
        Instruction::Cmd(command) => config(ConfigEdit::Cmd(command.clone())),
        Instruction::Entrypoint(command) => config(ConfigEdit::Entrypoint(command.clone())),
        Instruction::Healthcheck(check) => config(ConfigEdit::Healthcheck(check.clone())),
        Instruction::Onbuild(trigger) => config(ConfigEdit::OnBuild(trigger.clone())),
        Instruction::Maintainer(name) => config(ConfigEdit::Author(name.clone())),
    }
}

fn local_source(source: &FileSource) -> CopySource {
    match source {
        FileSource::Path(path) => CopySource::Path(path.clone()),
        FileSource::Heredoc { name, content } => CopySource::Inline {
            name: name.clone(),
            content: content.clone(),
        },
    }
}

/// An ADD source: a git repository, an HTTP(S) URL, or a path (archives are extracted).
fn add_source(source: &FileSource) -> Result<CopySource, String> {
    let FileSource::Path(path) = source else {
        return Ok(local_source(source));
    };
    if is_git_source(path) {
        Ok(CopySource::Git(path.clone()))
    } else if is_http_url(path) {
        Ok(CopySource::Url(path.clone()))
    } else if path.contains("://") {
        Err(format!(
            "ADD {path}: only http:// and https:// URLs can be fetched"
        ))
    } else {
        Ok(CopySource::Path(path.clone()))
    }
}

/// Whether an ADD source is an HTTP(S) URL.
fn is_http_url(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Whether an ADD source names a git repository (BuildKit's rule): `git://`, `git@`,
/// `ssh://`, or an HTTP(S) URL whose path, before any query or fragment, ends in `.git`.
fn is_git_source(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    if lower.starts_with("git://") || lower.starts_with("git@") || lower.starts_with("ssh://") {
        return true;
    }
    if !is_http_url(source) {
        return false;
    }
    let path = lower.split(['#', '?']).next().unwrap_or_default();
    path.trim_end_matches('/').ends_with(".git")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plan::{CommandLine, RunProgram};

    struct NoStages;

    impl StageFiles for NoStages {
        fn read(&self, _: usize, _: &str) -> Result<Option<Vec<u8>>, String> {
            Ok(None)
        }
        fn list(&self, _: usize, _: &str) -> Result<Option<Vec<String>>, String> {
            Ok(None)
        }
    }

    fn lowered(text: &str, base: &BaseFacts) -> Vec<kiln_plan::Step> {
        let dockerfile = Dockerfile::parse(text).unwrap();
        let plan = dockerfile
            .lower(text, "Dockerfile", &PlanOptions::default())
            .unwrap();
        let stage = plan.stage(plan.target()).unwrap();
        stage.steps.lower(base, &NoStages).unwrap()
    }

    #[test]
    fn instructions_become_operations_with_their_text_and_line() {
        let base = BaseFacts {
            env: vec![("PATH".into(), "/bin".into())],
            known: true,
            ..BaseFacts::default()
        };
        let steps = lowered(
            "FROM busybox\nARG V=1\nENV P=$PATH:/opt \\\n    Q=2\nRUN echo $V\n\
             ADD https://example.invalid/a.tgz git@example.invalid:r.git /d/\nWORKDIR w\nCMD run\n",
            &base,
        );
        assert_eq!(steps.len(), 5, "ARG has no step: {steps:#?}");
        assert_eq!(
            steps[0].operation,
            Operation::Config(ConfigEdit::Env(vec![
                ("P".into(), "/bin:/opt".into()),
                ("Q".into(), "2".into())
            ]))
        );
        assert_eq!(steps[0].provenance.text, "ENV P=$PATH:/opt Q=2");
        assert_eq!(steps[0].provenance.location(), "Dockerfile:3");
        let Operation::Run(run) = &steps[1].operation else {
            panic!("{:?}", steps[1]);
        };
        assert_eq!(run.program, RunProgram::Shell("echo $V".into()));
        assert_eq!(run.build_env, vec![("V".into(), "1".into())]);
        let Operation::Copy(add) = &steps[2].operation else {
            panic!("{:?}", steps[2]);
        };
        assert!(add.unpack);
        assert!(matches!(add.sources[0], CopySource::Url(_)));
        assert!(matches!(add.sources[1], CopySource::Git(_)));
        assert_eq!(
            steps[3].operation,
            Operation::Mkdir(Mkdir {
                path: "w".into(),
                set_working_dir: true
            })
        );
        assert_eq!(
            steps[4].operation,
            Operation::Config(ConfigEdit::Cmd(CommandLine::Shell("run".into())))
        );
    }

    #[test]
    fn proxy_settings_reach_runs_unkeyed_even_when_declared() {
        let text = "FROM busybox\nARG HTTP_PROXY\nARG V=1\nRUN true\n";
        let mut options = PlanOptions::default();
        options
            .build_args
            .insert("HTTP_PROXY".into(), "http://proxy:3128".into());
        options
            .build_args
            .insert("NO_PROXY".into(), "localhost".into());
        let plan = Dockerfile::parse(text)
            .unwrap()
            .lower(text, "Dockerfile", &options)
            .unwrap();
        let steps = plan.stages()[0]
            .steps
            .lower(&BaseFacts::default(), &NoStages)
            .unwrap();
        let Operation::Run(run) = &steps[0].operation else {
            panic!("{steps:?}");
        };
        assert_eq!(run.build_env, vec![("V".into(), "1".into())]);
        assert_eq!(
            run.unkeyed_env,
            vec![
                ("HTTP_PROXY".into(), "http://proxy:3128".into()),
                ("NO_PROXY".into(), "localhost".into())
            ]
        );
    }

    #[test]
    fn base_triggers_run_first_and_show_their_own_text() {
        let base = BaseFacts {
            on_build: vec!["RUN echo triggered".into(), "ENV T=1".into()],
            known: true,
            ..BaseFacts::default()
        };
        let steps = lowered("FROM busybox\nRUN echo own\n", &base);
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0].provenance.text, "RUN echo triggered");
        assert_eq!(steps[0].provenance.line, 1);
        assert_eq!(steps[1].provenance.text, "ENV T=1");
        assert_eq!(steps[2].provenance.text, "RUN echo own");
    }

    #[test]
    fn add_sources_are_told_apart_as_buildkit_does() {
        assert!(is_git_source("https://example.com/repo.git#main"));
        assert!(is_git_source("git@example.com:repo"));
        assert!(is_git_source("https://example.com/repo.git?ref=main"));
        assert!(!is_git_source("https://example.com/file.tgz"));
        assert!(is_http_url("HTTPS://example.com/x"));
        assert_eq!(
            add_source(&FileSource::Path("dir/*.tgz".into())),
            Ok(CopySource::Path("dir/*.tgz".into()))
        );
    }

    #[test]
    fn errors_name_the_file_as_given() {
        let text = "FROM busybox\nADD ftp://example.invalid/x /x\n";
        let dockerfile = Dockerfile::parse(text).unwrap();
        let plan = dockerfile
            .lower(text, "build/Dockerfile.prod", &PlanOptions::default())
            .unwrap();
        let err = plan.stages()[0]
            .steps
            .lower(&BaseFacts::default(), &NoStages)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "build/Dockerfile.prod:2: ADD ftp://example.invalid/x: only http:// and https:// URLs can be fetched"
        );
    }
}
