//! Expanding a planned stage's instructions into steps, once its base's environment is
//! known, with ONBUILD triggers of the base first. Apart from the stage graph because it runs
//! per stage, late, with what only the engine learns from the base image.

use super::{resolve_args, resolve_source, set, PlannedStage, Scope};
use crate::ast::{parse_ast, Node};
use crate::error::{Error, ErrorKind, Lines};
use crate::instruction::{Builder, Instruction};
use crate::values::Source;

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
