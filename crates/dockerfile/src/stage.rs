//! Stages, ARG scoping and the build plan: which stages a target needs, in which order, and the
//! expanded instructions of each.
//!
//! This module holds the parsed [`Dockerfile`], the plan's types and the ARG scoping both
//! halves share; `graph` resolves which stages run and in which order, `steps` expands a
//! stage's instructions once its base is known.

mod graph;
mod steps;

use std::collections::BTreeMap;
use std::fmt;

use crate::ast::{parse_ast, Ast, Directives, Node, Warning};
use crate::error::{Error, ErrorKind, Lines};
use crate::expand::Variables;
use crate::instruction::{Builder, Flags};
use crate::values::Source;

pub use self::steps::{StageSteps, Step};

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
