//! Building a typed [`Instruction`] from a syntax node, one method per instruction that has
//! more than a word to check.
//!
//! The same builder serves two purposes. [`crate::Dockerfile::parse`] runs it in *check* mode
//! over every instruction, so unknown instructions and flags, flags on the wrong instruction,
//! bad `--chmod` values, durations and the like are reported with their line even in stages
//! that will never be built; values that contain `$` are checked later. The planner runs it in
//! *expand* mode with a stage's variables, producing the values the engine executes.

use std::time::Duration;

use super::flags::Flags;
use super::{
    AddFiles, ArgDecl, CommandLine, CopyFiles, FileSource, HealthCheck, Instruction, KeyValue,
    RunCommand, RunProgram, KEYWORDS,
};
use crate::ast::{parse_heredoc_marker, Node};
use crate::error::ErrorKind;
use crate::expand::{Lexer, Variables};
use crate::values::{
    parse_duration, parse_mount, parse_network_mode, parse_security_mode, suggest,
    validate_checksum, validate_signal, Chmod, NetworkMode, Port, SecurityMode, Source,
};

/// How the builder treats words.
pub(crate) struct Builder<'a> {
    escape: char,
    /// Variables for expansion; `None` in check mode.
    vars: Option<&'a dyn Variables>,
    /// Variables for `--from` and mount `from=` values (the Dockerfile's own ARG/ENV only, so
    /// the stage graph does not depend on base images).
    ref_vars: Option<&'a dyn Variables>,
    /// Maps an expanded `--from` value to a stage or image.
    resolve: &'a dyn Fn(&str) -> Result<Source, String>,
}

fn invalid(message: impl Into<String>) -> ErrorKind {
    ErrorKind::Invalid(message.into())
}

fn bad_flag(flag: &str, reason: impl Into<String>) -> ErrorKind {
    ErrorKind::InvalidFlag {
        flag: flag.to_string(),
        reason: reason.into(),
    }
}

impl<'a> Builder<'a> {
    /// A builder that validates without variables.
    pub(crate) fn check(escape: char, resolve: &'a dyn Fn(&str) -> Result<Source, String>) -> Self {
        Builder {
            escape,
            vars: None,
            ref_vars: None,
            resolve,
        }
    }

    /// A builder that expands with `vars` (and `ref_vars` for stage references).
    pub(crate) fn expand(
        escape: char,
        vars: &'a dyn Variables,
        ref_vars: &'a dyn Variables,
        resolve: &'a dyn Fn(&str) -> Result<Source, String>,
    ) -> Self {
        Builder {
            escape,
            vars: Some(vars),
            ref_vars: Some(ref_vars),
            resolve,
        }
    }

    fn lexer(&self) -> Lexer {
        Lexer::new(self.escape)
    }

    /// An expanded word. In check mode the raw word (it is only validated, never used).
    fn word(&self, raw: &str) -> Result<String, ErrorKind> {
        match self.vars {
            Some(vars) => Ok(self.lexer().expand(raw, vars)?),
            None => Ok(raw.to_string()),
        }
    }

    /// An expanded word whose value gets validated: in check mode `None` when the value
    /// depends on variables (or fails to expand) and so can only be checked in a plan.
    fn checked_word(&self, raw: &str) -> Result<Option<String>, ErrorKind> {
        match self.vars {
            Some(vars) => Ok(Some(self.lexer().expand(raw, vars)?)),
            None if raw.contains('$') => Ok(None),
            None => {
                let none: Vec<(String, String)> = Vec::new();
                Ok(self.lexer().expand(raw, &none).ok())
            }
        }
    }

    /// Resolves a `--from`-like value to a stage or image.
    fn source(&self, flag: &str, raw: &str) -> Result<Option<Source>, ErrorKind> {
        let Some(vars) = self.ref_vars else {
            return Ok(None);
        };
        let value = self.lexer().expand(raw, vars)?;
        if value.is_empty() {
            return Err(bad_flag(flag, "empty value"));
        }
        (self.resolve)(&value)
            .map(Some)
            .map_err(|e| bad_flag(flag, e))
    }

    /// Builds the typed instruction for `node` (not FROM).
    pub(crate) fn build(&self, node: &Node) -> Result<Instruction, ErrorKind> {
        let keyword = node.keyword.as_str();
        if !KEYWORDS.contains(&keyword) {
            let written = node.original.split_whitespace().next().unwrap_or_default();
            return Err(ErrorKind::UnknownInstruction {
                name: written.to_string(),
                suggestion: suggest(written, KEYWORDS.iter().copied()).map(str::to_uppercase),
            });
        }
        let flags = Flags::parse(keyword, &node.flags)?;
        let upper = keyword.to_uppercase();
        let args = &node.args;
        let one_arg = || -> Result<&String, ErrorKind> {
            match args.as_slice() {
                [one] => Ok(one),
                _ => Err(invalid(format!("{upper} requires exactly one argument"))),
            }
        };
        let at_least_one = || -> Result<(), ErrorKind> {
            if args.is_empty() {
                Err(invalid(format!("{upper} requires at least one argument")))
            } else {
                Ok(())
            }
        };
        Ok(match keyword {
            "add" => Instruction::Add(self.add(node, &flags)?),
            "copy" => Instruction::Copy(self.copy(node, &flags)?),
            "arg" => {
                at_least_one()?;
                let mut decls = Vec::new();
                for word in args {
                    let (name, default) = match word.split_once('=') {
                        Some((n, d)) => (n, Some(d)),
                        None => (word.as_str(), None),
                    };
                    if name.is_empty() {
                        return Err(invalid("ARG names can not be blank"));
                    }
                    decls.push(ArgDecl {
                        name: self.word(name)?,
                        default: default.map(|d| self.word(d)).transpose()?,
                    });
                }
                Instruction::Arg(decls)
            }
            "env" | "label" => {
                at_least_one()?;
                let mut pairs = Vec::new();
                for triple in args.chunks(3) {
                    let [key, value, _] = triple else {
                        return Err(invalid(format!("Bad input to {upper}, too many arguments")));
                    };
                    if key.is_empty() {
                        return Err(invalid(format!("{upper} names can not be blank")));
                    }
                    let key = self.word(key)?;
                    if key.is_empty() {
                        return Err(invalid(format!("{upper} names can not be blank")));
                    }
                    pairs.push(KeyValue {
                        key,
                        value: self.word(value)?,
                    });
                }
                if keyword == "env" {
                    Instruction::Env(pairs)
                } else {
                    Instruction::Label(pairs)
                }
            }
            "cmd" => Instruction::Cmd(command_line(node)),
            "entrypoint" => Instruction::Entrypoint(command_line(node)),
            "run" => Instruction::Run(self.run(node, &flags)?),
            "shell" => {
                if !node.json {
                    return Err(invalid(
                        "SHELL requires the arguments to be in JSON form, like SHELL [\"/bin/sh\", \"-c\"]",
                    ));
                }
                at_least_one()?;
                Instruction::Shell(args.clone())
            }
            "expose" => {
                at_least_one()?;
                let mut ports = Vec::new();
                for raw in args {
                    if let Some(value) = self.checked_word(raw)? {
                        for port in value.split_whitespace() {
                            ports.push(Port::parse(port).map_err(invalid)?);
                        }
                    }
                }
                Instruction::Expose(ports)
            }
            "healthcheck" => Instruction::Healthcheck(health_check(node, &flags)?),
            "maintainer" => Instruction::Maintainer(one_arg()?.clone()),
            "onbuild" => Instruction::Onbuild(self.onbuild(node)?),
            "stopsignal" => {
                let raw = one_arg()?;
                if let Some(value) = self.checked_word(raw)? {
                    validate_signal(&value).map_err(invalid)?;
                }
                Instruction::StopSignal(self.word(raw)?)
            }
            "user" => Instruction::User(self.word(one_arg()?)?),
            "workdir" => Instruction::Workdir(self.word(one_arg()?)?),
            "volume" => {
                at_least_one()?;
                let mut volumes = Vec::new();
                for raw in args {
                    let v = self.word(raw)?;
                    let v = v.trim();
                    if v.is_empty() {
                        return Err(invalid("VOLUME specified can not be an empty string"));
                    }
                    volumes.push(v.to_string());
                }
                Instruction::Volume(volumes)
            }
            // FROM starts a stage and is handled by the caller.
            _ => return Err(invalid("FROM is handled by the stage builder")),
        })
    }

    fn sources(&self, node: &Node, upper: &str) -> Result<(Vec<FileSource>, String), ErrorKind> {
        let args = &node.args;
        if args.len() < 2 {
            return Err(invalid(format!(
                "{upper} requires at least two arguments, but only one was provided. Destination could not be determined"
            )));
        }
        let (dest, srcs) = args.split_last().unwrap_or((&args[0], &[]));
        let marker = |word: &str| {
            if node.json {
                Ok(None)
            } else {
                parse_heredoc_marker(word).map_err(invalid)
            }
        };
        if marker(dest)?.is_some() {
            return Err(invalid(format!(
                "{upper} cannot accept a heredoc as a destination"
            )));
        }
        let mut sources = Vec::new();
        for src in srcs {
            match marker(src)? {
                Some(mark) => {
                    let doc = node.heredocs.iter().find(|d| d.name == mark.name);
                    let body = doc.map(|d| d.body()).unwrap_or_default();
                    let content = match (self.vars, mark.expand) {
                        (Some(vars), true) => {
                            Lexer::new('\\').skip_quotes(true).expand(&body, vars)?
                        }
                        _ => body,
                    };
                    sources.push(FileSource::Heredoc {
                        name: mark.name,
                        content,
                    });
                }
                None => sources.push(FileSource::Path(self.word(src)?)),
            }
        }
        Ok((sources, self.word(dest)?))
    }

    fn chmod(&self, flags: &Flags) -> Result<Option<Chmod>, ErrorKind> {
        let Some(raw) = flags.string("chmod") else {
            return Ok(None);
        };
        match self.checked_word(raw)? {
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Chmod::parse(&v).map(Some).map_err(|e| bad_flag("chmod", e)),
            None => Ok(None),
        }
    }

    fn chown(&self, flags: &Flags) -> Result<Option<String>, ErrorKind> {
        let Some(raw) = flags.string("chown") else {
            return Ok(None);
        };
        let v = self.word(raw)?;
        Ok((!v.is_empty()).then_some(v))
    }

    fn exclude(&self, flags: &Flags) -> Result<Vec<String>, ErrorKind> {
        flags
            .list("exclude")
            .into_iter()
            .map(|p| self.word(p))
            .collect()
    }

    fn copy(&self, node: &Node, flags: &Flags) -> Result<CopyFiles, ErrorKind> {
        let (sources, dest) = self.sources(node, "COPY")?;
        let from = match flags.string("from") {
            Some(raw) => self.source("from", raw)?,
            None => None,
        };
        Ok(CopyFiles {
            sources,
            dest,
            from,
            chown: self.chown(flags)?,
            chmod: self.chmod(flags)?,
            link: flags.bool("link"),
            parents: flags.bool("parents"),
            exclude: self.exclude(flags)?,
        })
    }

    fn add(&self, node: &Node, flags: &Flags) -> Result<AddFiles, ErrorKind> {
        let (sources, dest) = self.sources(node, "ADD")?;
        let checksum = match flags.string("checksum") {
            Some(raw) => match self.checked_word(raw)? {
                Some(v) if v.is_empty() => None,
                Some(v) => {
                    validate_checksum(&v).map_err(|e| bad_flag("checksum", e))?;
                    let remote = |s: &FileSource| match s {
                        FileSource::Path(p) => is_remote(p),
                        FileSource::Heredoc { .. } => false,
                    };
                    if self.vars.is_some() && !sources.iter().all(remote) {
                        return Err(bad_flag(
                            "checksum",
                            "checksum can't be specified for non-HTTP(S) or non-git sources",
                        ));
                    }
                    Some(v)
                }
                None => None,
            },
            None => None,
        };
        Ok(AddFiles {
            sources,
            dest,
            chown: self.chown(flags)?,
            chmod: self.chmod(flags)?,
            link: flags.bool("link"),
            keep_git_dir: flags.bool("keep-git-dir"),
            checksum,
            exclude: self.exclude(flags)?,
        })
    }

    fn run(&self, node: &Node, flags: &Flags) -> Result<RunCommand, ErrorKind> {
        let network = match flags.string("network") {
            Some(v) => parse_network_mode(v).map_err(|e| bad_flag("network", e))?,
            None => NetworkMode::Default,
        };
        let security = match flags.string("security") {
            Some(v) => parse_security_mode(v).map_err(|e| bad_flag("security", e))?,
            None => SecurityMode::Sandbox,
        };
        let mut mounts = Vec::new();
        for raw in flags.list("mount") {
            let mount = match (self.vars, self.ref_vars) {
                (Some(vars), Some(ref_vars)) => {
                    let lexer = self.lexer();
                    let mut expand = |v: &str| lexer.expand(v, vars).map_err(|e| e.to_string());
                    let mut resolve = |v: &str| {
                        let value = lexer.expand(v, ref_vars).map_err(|e| e.to_string())?;
                        (self.resolve)(&value)
                    };
                    Some(
                        parse_mount(raw, &mut expand, &mut resolve)
                            .map_err(|e| bad_flag("mount", e))?,
                    )
                }
                // Check mode: validate mounts that do not depend on variables.
                _ if raw.contains('$') => None,
                _ => {
                    let lexer = self.lexer();
                    let none: Vec<(String, String)> = Vec::new();
                    let mut expand = |v: &str| lexer.expand(v, &none).map_err(|e| e.to_string());
                    let mut resolve = |v: &str| Ok(Source::Image(v.to_string()));
                    Some(
                        parse_mount(raw, &mut expand, &mut resolve)
                            .map_err(|e| bad_flag("mount", e))?,
                    )
                }
            };
            mounts.extend(mount);
        }
        let program = if node.json {
            RunProgram::Exec(node.args.clone())
        } else {
            let Some(cmd) = node.args.first() else {
                return Err(invalid("RUN requires at least one argument"));
            };
            if node.heredocs.is_empty() {
                RunProgram::Shell(cmd.clone())
            } else if parse_heredoc_marker(cmd).ok().flatten().is_some() {
                // The whole command is one heredoc: its body is the program.
                let doc = &node.heredocs[0];
                let body = doc.body();
                if body.starts_with("#!") {
                    RunProgram::Script {
                        name: doc.name.clone(),
                        content: body,
                    }
                } else {
                    RunProgram::Shell(body)
                }
            } else {
                // Heredocs inside a command line: hand the shell a real heredoc script.
                let mut script = cmd.clone();
                for doc in &node.heredocs {
                    script.push('\n');
                    script.push_str(&doc.content);
                    script.push_str(&doc.name);
                }
                RunProgram::Shell(script)
            }
        };
        Ok(RunCommand {
            program,
            mounts,
            network,
            security,
        })
    }

    fn onbuild(&self, node: &Node) -> Result<String, ErrorKind> {
        let Some(trigger) = &node.trigger else {
            return Err(invalid("ONBUILD requires at least one argument"));
        };
        match trigger.keyword.as_str() {
            "onbuild" => {
                return Err(invalid(
                    "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                ))
            }
            "maintainer" | "from" => {
                return Err(invalid(format!(
                    "{} isn't allowed as an ONBUILD trigger",
                    trigger.keyword.to_uppercase()
                )))
            }
            _ => {}
        }
        // The trigger runs in another build; here it only has to be a valid instruction.
        let resolve = |v: &str| Ok(Source::Image(v.to_string()));
        Builder::check(self.escape, &resolve).build(trigger)?;
        let original = node.original.trim_start();
        let expression = original
            .get(..7)
            .filter(|k| k.eq_ignore_ascii_case("onbuild"))
            .map_or(original, |_| original[7..].trim_start());
        Ok(expression.to_string())
    }
}

fn is_remote(source: &str) -> bool {
    source.starts_with("http://")
        || source.starts_with("https://")
        || source.starts_with("git@")
        || source.starts_with("git://")
        || source.ends_with(".git")
        || source.contains(".git#")
}

fn command_line(node: &Node) -> CommandLine {
    if node.json {
        CommandLine::Exec(node.args.clone())
    } else if node.args.is_empty() {
        CommandLine::Exec(Vec::new())
    } else {
        CommandLine::Shell(node.args.join(" "))
    }
}

fn health_check(node: &Node, flags: &Flags) -> Result<HealthCheck, ErrorKind> {
    let Some(kind) = node.args.first() else {
        return Err(invalid("HEALTHCHECK requires at least one argument"));
    };
    let rest = &node.args[1..];
    match kind.to_uppercase().as_str() {
        "NONE" => {
            if !rest.is_empty() {
                return Err(invalid("HEALTHCHECK NONE takes no arguments"));
            }
            if !flags.is_empty() {
                return Err(invalid("HEALTHCHECK NONE takes no flags"));
            }
            Ok(HealthCheck::Disable)
        }
        "CMD" => {
            if rest.is_empty() {
                return Err(invalid("Missing command after HEALTHCHECK CMD"));
            }
            let test = if node.json {
                CommandLine::Exec(rest.to_vec())
            } else {
                CommandLine::Shell(rest.join(" "))
            };
            let duration = |name: &str| -> Result<Option<Duration>, ErrorKind> {
                flags
                    .string(name)
                    .filter(|v| !v.is_empty())
                    .map(|v| parse_duration(v).map_err(|e| bad_flag(name, e)))
                    .transpose()
            };
            let retries = match flags.string("retries").filter(|v| !v.is_empty()) {
                Some(v) => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| bad_flag("retries", format!("invalid number {v:?}")))?;
                    if n < 0 {
                        return Err(bad_flag("retries", format!("cannot be negative ({n})")));
                    }
                    Some(
                        u32::try_from(n)
                            .map_err(|_| bad_flag("retries", format!("{n} is too large")))?,
                    )
                }
                None => None,
            };
            Ok(HealthCheck::Check {
                test,
                interval: duration("interval")?,
                timeout: duration("timeout")?,
                start_period: duration("start-period")?,
                start_interval: duration("start-interval")?,
                retries,
            })
        }
        _ => Err(invalid(format!(
            "Unknown type {:?} in HEALTHCHECK (try CMD)",
            kind.to_uppercase()
        ))),
    }
}
