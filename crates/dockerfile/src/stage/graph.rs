//! The stage graph: the global ARG scope, each stage's base, the stages `--target` needs
//! (through bases, `COPY --from` and `RUN --mount from=`) and the order and levels they can
//! run in. Apart from step expansion because it is computed once for the whole Dockerfile,
//! before any base image is known.

use super::{
    platform_args, resolve_args, resolve_source, set, Base, Dockerfile, Plan, PlanOptions,
    PlannedStage, Scope, PLATFORM_ARGS, PROXY_ARGS,
};
use crate::error::{Error, ErrorKind};
use crate::expand::{Lexer, Variables};
use crate::instruction::{Builder, Flags, Instruction};
use crate::values::{mount_from, Source};

/// What a stage needs finished or pulled first: stage indices and image references.
type Needs = (Vec<usize>, Vec<String>);

/// Variables as `(name, value)` pairs in the order they were set.
type Pairs = Vec<(String, String)>;

impl Dockerfile {
    /// Resolves the build: global ARGs, each stage's base, the stages `--target` needs and the
    /// order they can run in.
    pub fn plan(&self, options: &PlanOptions) -> Result<Plan, Error> {
        let escape = self.ast.directives.escape;
        let names: Vec<Option<String>> = self.stages.iter().map(|s| s.name.clone()).collect();
        let (global, declared) = self.global_scope(options, &names)?;
        let headers = self.stage_headers(&global)?;
        let target = self.target_index(options, &names)?;
        let (order, deps) = self.build_order(target, &headers, &global, options, &names)?;
        let levels = levels(&order, &deps);

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

    /// The global scope FROM lines are expanded with: the predefined platform args, then the
    /// meta ARGs in order. Also the names the meta ARGs declare.
    fn global_scope(
        &self,
        options: &PlanOptions,
        names: &[Option<String>],
    ) -> Result<(Pairs, Vec<String>), Error> {
        let escape = self.ast.directives.escape;
        let resolve = |v: &str| resolve_source(v, names);
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
        Ok((global, declared))
    }

    /// Every FROM, expanded with the global scope: the base (an earlier stage, scratch or an
    /// image) and the platform of each stage, in file order.
    fn stage_headers(&self, global: &dyn Variables) -> Result<Vec<(Base, Option<String>)>, Error> {
        let lexer = Lexer::new(self.ast.directives.escape);
        let mut headers = Vec::with_capacity(self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            let at = |k| Error::at(stage.lines, k);
            let base = lexer
                .expand(&stage.base, global)
                .map_err(|e| at(e.into()))?;
            if base.is_empty() {
                return Err(at(ErrorKind::Invalid(format!(
                    "base name ({}) should not be blank",
                    stage.base
                ))));
            }
            let platform = match &stage.platform {
                Some(raw) => Some(lexer.expand(raw, global).map_err(|e| at(e.into()))?)
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
        Ok(headers)
    }

    /// The index of the stage `--target` names, or of the last stage.
    fn target_index(
        &self,
        options: &PlanOptions,
        names: &[Option<String>],
    ) -> Result<usize, Error> {
        Ok(match &options.target {
            Some(t) => {
                let lower = t.to_lowercase();
                names
                    .iter()
                    .position(|n| n.as_deref() == Some(lower.as_str()))
                    .ok_or_else(|| Error::general(ErrorKind::TargetNotFound(t.clone())))?
            }
            None => self.stages.len() - 1,
        })
    }

    /// Depth-first from the target: the stages it needs in a topological order (every stage
    /// after those it depends on), what each of them needs (`None` for stages not needed),
    /// and an error on a cycle.
    fn build_order(
        &self,
        target: usize,
        headers: &[(Base, Option<String>)],
        global: &[(String, String)],
        options: &PlanOptions,
        names: &[Option<String>],
    ) -> Result<(Vec<usize>, Vec<Option<Needs>>), Error> {
        let mut deps: Vec<Option<Needs>> = vec![None; self.stages.len()];
        let mut state = vec![Visit::New; self.stages.len()];
        let mut order = Vec::new();
        let mut stack: Vec<(usize, usize)> = vec![(target, 0)];
        state[target] = Visit::Active;
        while let Some(&(stage, next)) = stack.last() {
            if deps[stage].is_none() {
                deps[stage] = Some(self.stage_dependencies(
                    stage,
                    &headers[stage].0,
                    global,
                    options,
                    names,
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
        Ok((order, deps))
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

/// Stage indices grouped by depth: a stage's level is one more than its deepest dependency's,
/// so each level only needs earlier ones.
fn levels(order: &[usize], deps: &[Option<Needs>]) -> Vec<Vec<usize>> {
    let mut level = vec![0usize; deps.len()];
    for &s in order {
        let d = deps[s].as_ref().map(|d| d.0.as_slice()).unwrap_or_default();
        level[s] = d.iter().map(|&x| level[x] + 1).max().unwrap_or(0);
    }
    let depth = order.iter().map(|&s| level[s]).max().unwrap_or(0);
    let mut levels = vec![Vec::new(); depth + 1];
    for &s in order {
        levels[level[s]].push(s);
    }
    for l in &mut levels {
        l.sort_unstable();
    }
    levels
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

/// Where the depth-first walk of [`Dockerfile::build_order`] stands with a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    New,
    Active,
    Done,
}
