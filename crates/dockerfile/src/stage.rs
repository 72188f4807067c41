//! Stages, ARG scoping and the build plan: which stages a target needs, in which order, and the
//! expanded instructions of each.

use std::collections::BTreeMap;
use std::fmt;

use crate::ast::{parse_ast, Ast, Directives, Node, Warning};
use crate::error::{Error, ErrorKind, Lines};
use crate::expand::{Lexer, Variables};
use crate::instruction::{Builder, Flags, Instruction};
use crate::values::{mount_from, Source};

/// An OS/architecture/variant triple such as `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Architecture variant (`v7`, `v8`), if any.
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "invalid platform {s:?}: expected os/arch[/variant]"
            ));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// `linux/amd64`, the default when the caller names no platform.
    pub fn linux_amd64() -> Self {
        Platform {
            os: "linux".to_string(),
            architecture: "amd64".to_string(),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Build arguments BuildKit passes to RUN without an ARG declaration (and keeps out of cache
/// keys and history).
pub const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The predefined platform arguments.
pub const PLATFORM_ARGS: &[&str] = &[
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// A stage as written: `FROM base [AS name]` and the instructions up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The stage name, lower case.
    pub name: Option<String>,
    /// The base as written (may contain variables).
    pub base: String,
    /// `--platform` as written.
    pub platform: Option<String>,
    /// Lines of the FROM instruction.
    pub lines: Lines,
    nodes: Vec<Node>,
}

impl Stage {
    /// The stage's instructions (syntax nodes) after FROM.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
}

/// A parsed and validated Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    ast: Ast,
    meta_args: Vec<Node>,
    stages: Vec<Stage>,
}

fn is_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// Maps an expanded `--from` value to a stage (by index or case-insensitive name) or an image.
fn resolve_source(value: &str, names: &[Option<String>]) -> Result<Source, String> {
    let numeric = value.strip_prefix(['+', '-']).unwrap_or(value);
    if !numeric.is_empty() && numeric.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(index) = value.parse::<i64>() {
            return match usize::try_from(index) {
                Ok(i) if i < names.len() => Ok(Source::Stage(i)),
                _ => Err(format!("invalid stage index {index}")),
            };
        }
    }
    let lower = value.to_lowercase();
    Ok(names
        .iter()
        .position(|n| n.as_deref() == Some(lower.as_str()))
        .map_or_else(|| Source::Image(value.to_string()), Source::Stage))
}

impl Dockerfile {
    /// Parses `source` and validates every instruction: unknown instructions and flags, flags on
    /// the wrong instruction, argument counts, `--chmod`, durations, `--mount`, ... Values that
    /// contain variables are validated again by [`Dockerfile::plan`].
    pub fn parse(source: &str) -> Result<Self, Error> {
        let ast = parse_ast(source)?;
        let escape = ast.directives.escape;
        let resolve = |v: &str| Ok(Source::Image(v.to_string()));
        let checker = Builder::check(escape, &resolve);
        let mut meta_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for node in &ast.nodes {
            let at = |kind| Error::at(node.lines, kind);
            if node.keyword == "from" {
                let stage = stage_header(node).map_err(at)?;
                if let Some(name) = &stage.name {
                    if stages.iter().any(|s| s.name.as_ref() == Some(name)) {
                        return Err(at(ErrorKind::Invalid(format!(
                            "duplicate stage name {name:?}"
                        ))));
                    }
                }
                stages.push(stage);
                continue;
            }
            checker.build(node).map_err(at)?;
            match stages.last_mut() {
                Some(stage) => stage.nodes.push(node.clone()),
                None if node.keyword == "arg" => meta_args.push(node.clone()),
                None => {
                    return Err(at(ErrorKind::Invalid(format!(
                    "{} must come after a FROM instruction (only ARG may precede the first FROM)",
                    node.keyword.to_uppercase()
                ))))
                }
            }
        }
        if stages.is_empty() {
            return Err(Error::at(
                ast.lines(),
                ErrorKind::Invalid("no FROM instruction: nothing to build".to_string()),
            ));
        }
        Ok(Dockerfile {
            ast,
            meta_args,
            stages,
        })
    }

    /// The syntax tree.
    pub fn ast(&self) -> &Ast {
        &self.ast
    }

    /// The tree in BuildKit's dump format (see [`Ast::dump`]).
    pub fn dump(&self) -> String {
        self.ast.dump()
    }

    /// The parser directives.
    pub fn directives(&self) -> &Directives {
        &self.ast.directives
    }

    /// Parser warnings.
    pub fn warnings(&self) -> &[Warning] {
        &self.ast.warnings
    }

    /// The stages in file order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The ARG instructions before the first FROM.
    pub fn meta_args(&self) -> &[Node] {
        &self.meta_args
    }

    /// Resolves the build: global ARGs, each stage's base, the stages `--target` needs and the
    /// order they can run in.
    pub fn plan(&self, options: &PlanOptions) -> Result<Plan, Error> {
        let escape = self.ast.directives.escape;
        let names: Vec<Option<String>> = self.stages.iter().map(|s| s.name.clone()).collect();
        let resolve = |v: &str| resolve_source(v, &names);

        // Global scope: predefined platform args, then the meta ARGs in order.
        let mut global: Vec<(String, String)> = platform_args(options);
        for (name, value) in &options.build_args {
            if PLATFORM_ARGS.contains(&name.as_str()) {
                set(&mut global, name, value);
            }
        }
        let mut declared: Vec<String> = Vec::new();
        for node in &self.meta_args {
            let snapshot = global.clone();
            let builder = Builder::expand(escape, &snapshot, &snapshot, &resolve);
            let instruction = builder.build(node).map_err(|k| Error::at(node.lines, k))?;
            if let Instruction::Arg(decls) = instruction {
                for decl in decls {
                    let value = options.build_args.get(&decl.name).cloned().or(decl.default);
                    if let Some(v) = value {
                        set(&mut global, &decl.name, &v);
                    }
                    declared.push(decl.name);
                }
            }
        }

        // Every FROM, expanded with the global scope.
        let lexer = Lexer::new(escape);
        let mut headers = Vec::with_capacity(self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            let at = |k| Error::at(stage.lines, k);
            let base = lexer
                .expand(&stage.base, &global)
                .map_err(|e| at(e.into()))?;
            if base.is_empty() {
                return Err(at(ErrorKind::Invalid(format!(
                    "base name ({}) should not be blank",
                    stage.base
                ))));
            }
            let platform = match &stage.platform {
                Some(raw) => Some(lexer.expand(raw, &global).map_err(|e| at(e.into()))?)
                    .filter(|p| !p.is_empty()),
                None => None,
            };
            let lower = base.to_lowercase();
            let base = match self.stages[..i]
                .iter()
                .position(|s| s.name.as_deref() == Some(lower.as_str()))
            {
                Some(j) => Base::Stage(j),
                None if base == "scratch" => Base::Scratch,
                None => Base::Image(base),
            };
            headers.push((base, platform));
        }

        let target = match &options.target {
            Some(t) => {
                let lower = t.to_lowercase();
                names
                    .iter()
                    .position(|n| n.as_deref() == Some(lower.as_str()))
                    .ok_or_else(|| Error::general(ErrorKind::TargetNotFound(t.clone())))?
            }
            None => self.stages.len() - 1,
        };

        // Depth-first from the target: dependencies, cycles, topological order.
        let mut deps: Vec<Option<(Vec<usize>, Vec<String>)>> = vec![None; self.stages.len()];
        let mut state = vec![Visit::New; self.stages.len()];
        let mut order = Vec::new();
        let mut stack: Vec<(usize, usize)> = vec![(target, 0)];
        state[target] = Visit::Active;
        while let Some(&(stage, next)) = stack.last() {
            if deps[stage].is_none() {
                deps[stage] = Some(self.stage_dependencies(
                    stage,
                    &headers[stage].0,
                    &global,
                    options,
                    &names,
                )?);
            }
            let stage_deps = deps[stage]
                .as_ref()
                .map(|d| d.0.clone())
                .unwrap_or_default();
            if next < stage_deps.len() {
                let dep = stage_deps[next];
                if let Some(top) = stack.last_mut() {
                    top.1 += 1;
                }
                match state[dep] {
                    Visit::Done => {}
                    Visit::Active => {
                        let name = self.stages[dep]
                            .name
                            .clone()
                            .unwrap_or_else(|| dep.to_string());
                        return Err(Error::at(
                            self.stages[stage].lines,
                            ErrorKind::CircularDependency(name),
                        ));
                    }
                    Visit::New => {
                        state[dep] = Visit::Active;
                        stack.push((dep, 0));
                    }
                }
            } else {
                state[stage] = Visit::Done;
                order.push(stage);
                stack.pop();
            }
        }

        let mut level = vec![0usize; self.stages.len()];
        for &s in &order {
            let d = deps[s].as_ref().map(|d| d.0.as_slice()).unwrap_or_default();
            level[s] = d.iter().map(|&x| level[x] + 1).max().unwrap_or(0);
        }
        let depth = order.iter().map(|&s| level[s]).max().unwrap_or(0);
        let mut levels = vec![Vec::new(); depth + 1];
        for &s in &order {
            levels[level[s]].push(s);
        }
        for l in &mut levels {
            l.sort_unstable();
        }

        let proxy: Vec<(String, String)> = options
            .build_args
            .iter()
            .filter(|(k, _)| PROXY_ARGS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut consumed: Vec<String> = declared.clone();
        let mut planned = Vec::with_capacity(order.len());
        for &s in &order {
            let stage = &self.stages[s];
            for node in stage.nodes.iter().filter(|n| n.keyword == "arg") {
                consumed.extend(
                    node.args
                        .iter()
                        .map(|a| a.split('=').next().unwrap_or_default().to_string()),
                );
            }
            let (dependencies, images) = deps[s].clone().unwrap_or_default();
            let (base, platform) = headers[s].clone();
            let mut global_for_stage: Vec<(String, String)> = Vec::new();
            for (k, v) in &global {
                if declared.contains(k) || PLATFORM_ARGS.contains(&k.as_str()) {
                    global_for_stage.push((k.clone(), v.clone()));
                }
            }
            planned.push(PlannedStage {
                index: s,
                name: stage.name.clone(),
                base,
                platform,
                lines: stage.lines,
                dependencies,
                images,
                nodes: stage.nodes.clone(),
                escape,
                global: global_for_stage,
                build_args: options.build_args.clone(),
                proxy: proxy.clone(),
                stage_names: names.clone(),
            });
        }
        let unused_build_args = options
            .build_args
            .keys()
            .filter(|k| {
                !consumed.contains(k)
                    && !PROXY_ARGS.contains(&k.as_str())
                    && !PLATFORM_ARGS.contains(&k.as_str())
            })
            .cloned()
            .collect();
        Ok(Plan {
            target,
            stages: planned,
            levels,
            global,
            unused_build_args,
        })
    }

    /// The stages and images `stage` needs: its base stage and every `COPY --from` and
    /// `RUN --mount ... from=` target. References are expanded with the stage's ARGs and its own
    /// ENVs (not the base image's), so the graph is known before any image is pulled.
    fn stage_dependencies(
        &self,
        index: usize,
        base: &Base,
        global: &[(String, String)],
        options: &PlanOptions,
        names: &[Option<String>],
    ) -> Result<(Vec<usize>, Vec<String>), Error> {
        let stage = &self.stages[index];
        let escape = self.ast.directives.escape;
        let lexer = Lexer::new(escape);
        let mut stages: Vec<usize> = Vec::new();
        let mut images: Vec<String> = Vec::new();
        let mut add = |source: Source| match source {
            Source::Stage(i) => {
                if !stages.contains(&i) {
                    stages.push(i);
                }
            }
            Source::Image(r) => {
                if !images.contains(&r) {
                    images.push(r);
                }
            }
            // A Dockerfile never names one.
            Source::Local(_) => {}
        };
        match base {
            Base::Stage(i) => add(Source::Stage(*i)),
            Base::Image(r) => add(Source::Image(r.clone())),
            Base::Scratch => {}
        }
        let mut env: Vec<(String, String)> = Vec::new();
        let mut args: Vec<(String, String)> = Vec::new();
        let resolve = |v: &str| resolve_source(v, names);
        for node in &stage.nodes {
            let at = |k| Error::at(node.lines, k);
            let scope = Scope {
                env: &env,
                args: &args,
            };
            let mut references: Vec<(&str, String)> = Vec::new();
            match node.keyword.as_str() {
                "arg" | "env" => {
                    // Errors here (say `${X:?}` about a base-image variable) are reported by
                    // `steps`, which knows the base image's environment.
                    let builder = Builder::expand(escape, &scope, &scope, &resolve);
                    match builder.build(node) {
                        Ok(Instruction::Arg(decls)) => {
                            let resolved = resolve_args(&decls, &options.build_args, global);
                            for (k, v) in resolved {
                                set(&mut args, &k, &v);
                            }
                        }
                        Ok(Instruction::Env(pairs)) => {
                            for kv in pairs {
                                set(&mut env, &kv.key, &kv.value);
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                "copy" => {
                    let flags = Flags::parse("copy", &node.flags).map_err(at)?;
                    if let Some(raw) = flags_value(&flags, "from") {
                        references.push(("from", raw));
                    }
                }
                "run" => {
                    let flags = Flags::parse("run", &node.flags).map_err(at)?;
                    for raw in flags_list(&flags, "mount") {
                        if let Some(from) = mount_from(&raw) {
                            references.push(("mount", from));
                        }
                    }
                }
                _ => {}
            }
            for (flag, raw) in references {
                let value = lexer.expand(&raw, &scope).map_err(|e| at(e.into()))?;
                if value.is_empty() {
                    return Err(at(ErrorKind::InvalidFlag {
                        flag: flag.to_string(),
                        reason: "empty stage or image reference".to_string(),
                    }));
                }
                let source = resolve_source(&value, names).map_err(|reason| {
                    at(ErrorKind::InvalidFlag {
                        flag: flag.to_string(),
                        reason,
                    })
                })?;
                if source == Source::Stage(index) {
                    let name = stage.name.clone().unwrap_or_else(|| index.to_string());
                    return Err(at(ErrorKind::CircularDependency(name)));
                }
                add(source);
            }
        }
        Ok((stages, images))
    }
}

fn flags_value(flags: &Flags, name: &str) -> Option<String> {
    flags.values_of(name).first().map(|s| s.to_string())
}

fn flags_list(flags: &Flags, name: &str) -> Vec<String> {
    flags
        .values_of(name)
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    New,
    Active,
    Done,
}

fn stage_header(node: &Node) -> Result<Stage, ErrorKind> {
    let flags = Flags::parse("from", &node.flags)?;
    let platform = flags.values_of("platform").first().map(|s| s.to_string());
    let (base, name) = match node.args.as_slice() {
        [base] => (base.clone(), None),
        [base, as_, name] if as_.eq_ignore_ascii_case("as") => {
            let lower = name.to_lowercase();
            if !is_stage_name(&lower) {
                return Err(ErrorKind::Invalid(format!(
                    "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
                )));
            }
            (base.clone(), Some(lower))
        }
        _ => {
            return Err(ErrorKind::Invalid(
                "FROM requires either one or three arguments".to_string(),
            ))
        }
    };
    Ok(Stage {
        name,
        base,
        platform,
        lines: node.lines,
        nodes: Vec::new(),
    })
}

fn platform_args(options: &PlanOptions) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (prefix, p) in [
        ("TARGET", &options.target_platform),
        ("BUILD", &options.build_platform),
    ] {
        out.push((format!("{prefix}PLATFORM"), p.to_string()));
        out.push((format!("{prefix}OS"), p.os.clone()));
        out.push((format!("{prefix}ARCH"), p.architecture.clone()));
        out.push((
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        ));
    }
    out
}

fn set(list: &mut Vec<(String, String)>, key: &str, value: &str) {
    match list.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.to_string(),
        None => list.push((key.to_string(), value.to_string())),
    }
}

/// The values an ARG instruction gives its names: a build arg wins over the default, the
/// default over the global (meta ARG or predefined) value; a name with none stays unset.
fn resolve_args(
    decls: &[crate::instruction::ArgDecl],
    build_args: &BTreeMap<String, String>,
    global: &[(String, String)],
) -> Vec<(String, String)> {
    decls
        .iter()
        .filter_map(|d| {
            build_args
                .get(&d.name)
                .cloned()
                .or_else(|| d.default.clone())
                .or_else(|| Variables::get(global, &d.name).map(str::to_string))
                .map(|v| (d.name.clone(), v))
        })
        .collect()
}

/// Variables of a stage at one point: ENV (base image and Dockerfile) shadows ARG.
struct Scope<'a> {
    env: &'a [(String, String)],
    args: &'a [(String, String)],
}

impl Variables for Scope<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        Variables::get(self.env, name).or_else(|| Variables::get(self.args, name))
    }
}

/// What to build: build args, target and platforms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// `--build-arg NAME=VALUE`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`: the stage to build (the last one when `None`).
    pub target: Option<String>,
    /// The platform the image is for (TARGET* args). As in BuildKit, `FROM --platform` does
    /// not change these: `FROM --platform=$BUILDPLATFORM` stages still see the target platform,
    /// which is what cross-compiling stages need.
    pub target_platform: Platform,
    /// The platform the build runs on (BUILD* args).
    pub build_platform: Platform,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            build_args: BTreeMap::new(),
            target: None,
            target_platform: Platform::linux_amd64(),
            build_platform: Platform::linux_amd64(),
        }
    }
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: an empty filesystem.
    Scratch,
    /// An image reference, expanded, not yet normalised.
    Image(String),
    /// An earlier stage, by index.
    Stage(usize),
}

/// The resolved build: the stages the target needs and how they depend on each other.
#[derive(Debug, Clone)]
pub struct Plan {
    target: usize,
    stages: Vec<PlannedStage>,
    levels: Vec<Vec<usize>>,
    global: Vec<(String, String)>,
    unused_build_args: Vec<String>,
}

impl Plan {
    /// Index of the target stage.
    pub fn target(&self) -> usize {
        self.target
    }

    /// The needed stages in a topological order: every stage after the stages it depends on.
    /// Stages the target does not need are absent.
    pub fn stages(&self) -> &[PlannedStage] {
        &self.stages
    }

    /// A needed stage by its index in the Dockerfile.
    pub fn stage(&self, index: usize) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.index == index)
    }

    /// Stage indices grouped by depth: the stages of one level depend only on earlier levels,
    /// so each level can run in parallel once the previous ones are done.
    pub fn levels(&self) -> &[Vec<usize>] {
        &self.levels
    }

    /// The global scope FROM lines were expanded with (predefined and meta ARGs).
    pub fn global_args(&self) -> &[(String, String)] {
        &self.global
    }

    /// Build args no needed stage or global ARG declares (BuildKit warns about these).
    pub fn unused_build_args(&self) -> &[String] {
        &self.unused_build_args
    }
}

/// One needed stage of a [`Plan`].
#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// Index in the Dockerfile (0 = first FROM).
    pub index: usize,
    /// The stage name, lower case.
    pub name: Option<String>,
    /// What the stage starts from.
    pub base: Base,
    /// `FROM --platform`, expanded.
    pub platform: Option<String>,
    /// Lines of the FROM instruction.
    pub lines: Lines,
    /// Stages this one needs finished first (base stage, COPY --from, RUN --mount from=).
    pub dependencies: Vec<usize>,
    /// Images this stage needs (base image, COPY --from and mount images).
    pub images: Vec<String>,
    nodes: Vec<Node>,
    escape: char,
    global: Vec<(String, String)>,
    build_args: BTreeMap<String, String>,
    proxy: Vec<(String, String)>,
    stage_names: Vec<Option<String>>,
}

/// One instruction of a stage, expanded, with the variables in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Lines of the instruction.
    pub lines: Lines,
    /// The instruction with every expandable word expanded.
    pub instruction: Instruction,
    /// ARGs in scope (declared in this stage and having a value) once this step is applied, in
    /// declaration order. These belong in RUN's environment and in cache keys.
    pub args: Vec<(String, String)>,
    /// The image environment once this step is applied: the inherited environment plus the
    /// stage's ENVs so far.
    pub env: Vec<(String, String)>,
    proxy: Vec<(String, String)>,
}

impl Step {
    /// The environment a RUN at this step gets: ENV, then ARGs not shadowed by an ENV, then
    /// proxy build args not declared otherwise.
    pub fn run_env(&self) -> Vec<(String, String)> {
        let mut out = self.env.clone();
        for (k, v) in self.args.iter().chain(&self.proxy) {
            if !out.iter().any(|(e, _)| e == k) {
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }

    /// Proxy build args (HTTP_PROXY, ...) passed to RUN but kept out of cache keys.
    pub fn proxy_args(&self) -> &[(String, String)] {
        &self.proxy
    }
}

/// The expanded instructions of a stage and the environment it ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSteps {
    /// The steps in order.
    pub steps: Vec<Step>,
    /// The environment after the last step (what a stage `FROM` this one inherits).
    pub env: Vec<(String, String)>,
}

impl PlannedStage {
    /// Expands the stage's instructions. `inherited_env` is the base's environment: the image
    /// config's `Env` for an image base, the [`StageSteps::env`] of the base stage, or empty for
    /// scratch.
    pub fn steps(&self, inherited_env: &[(String, String)]) -> Result<StageSteps, Error> {
        self.expand_nodes(inherited_env, self.nodes.iter())
    }

    /// Like [`PlannedStage::steps`] for a stage whose base image carries ONBUILD triggers (its
    /// config's `OnBuild` entries): they run first, as if written right after FROM, and their
    /// steps carry the FROM line. A trigger that is not a valid instruction (or is ONBUILD,
    /// FROM or MAINTAINER) is an error at that line.
    pub fn steps_with_triggers(
        &self,
        inherited_env: &[(String, String)],
        triggers: &[String],
    ) -> Result<StageSteps, Error> {
        let mut nodes = Vec::with_capacity(triggers.len());
        let resolve = |v: &str| Ok(Source::Image(v.to_string()));
        for trigger in triggers {
            let at = |e: Error| Error::at(self.lines, e.kind().clone());
            let ast = parse_ast(trigger).map_err(at)?;
            for mut node in ast.nodes {
                if matches!(node.keyword.as_str(), "onbuild" | "from" | "maintainer") {
                    return Err(Error::at(
                        self.lines,
                        ErrorKind::Invalid(format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            node.keyword.to_uppercase()
                        )),
                    ));
                }
                Builder::check('\\', &resolve)
                    .build(&node)
                    .map_err(|k| Error::at(self.lines, k))?;
                node.lines = self.lines;
                nodes.push(node);
            }
        }
        self.expand_nodes(inherited_env, nodes.iter().chain(&self.nodes))
    }

    fn expand_nodes<'n>(
        &self,
        inherited_env: &[(String, String)],
        nodes: impl Iterator<Item = &'n Node>,
    ) -> Result<StageSteps, Error> {
        let names = &self.stage_names;
        let resolve = |v: &str| resolve_source(v, names);
        let mut env: Vec<(String, String)> = inherited_env.to_vec();
        let mut own_env: Vec<(String, String)> = Vec::new();
        let mut args: Vec<(String, String)> = Vec::new();
        let mut steps = Vec::with_capacity(self.nodes.len());
        for node in nodes {
            let instruction = {
                let scope = Scope {
                    env: &env,
                    args: &args,
                };
                let ref_scope = Scope {
                    env: &own_env,
                    args: &args,
                };
                Builder::expand(self.escape, &scope, &ref_scope, &resolve)
                    .build(node)
                    .map_err(|k| Error::at(node.lines, k))?
            };
            match &instruction {
                Instruction::Arg(decls) => {
                    for (k, v) in resolve_args(decls, &self.build_args, &self.global) {
                        set(&mut args, &k, &v);
                    }
                }
                Instruction::Env(pairs) => {
                    for kv in pairs {
                        set(&mut env, &kv.key, &kv.value);
                        set(&mut own_env, &kv.key, &kv.value);
                    }
                }
                Instruction::Copy(copy) if copy.from == Some(Source::Stage(self.index)) => {
                    let name = self.name.clone().unwrap_or_else(|| self.index.to_string());
                    return Err(Error::at(node.lines, ErrorKind::CircularDependency(name)));
                }
                _ => {}
            }
            steps.push(Step {
                lines: node.lines,
                instruction,
                args: args.clone(),
                env: env.clone(),
                proxy: self
                    .proxy
                    .iter()
                    .filter(|(k, _)| !args.iter().any(|(a, _)| a == k))
                    .cloned()
                    .collect(),
            });
        }
        Ok(StageSteps { steps, env })
    }
}
