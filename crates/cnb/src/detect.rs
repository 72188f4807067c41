//! The detect phase: resolve the order into groups of component buildpacks (expanding composite
//! buildpacks), run each buildpack's `bin/detect`, and pick the first group that passes with a
//! build plan in which every requirement is provided by an earlier or the same buildpack.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::buildpack::{escape_id, Buildpack, BuildpackKind, BuildpackStore};
use crate::env::{Env, Phase};
use crate::error::{io, Error, Result};
use crate::files::read_toml_if_exists;
use crate::metadata::Target;
use crate::order::{
    BuildPlan, Group, GroupBuildpack, GroupEntry, Order, Plan, PlanEntry, PlanSections, Provider,
};

/// Exit status of `bin/detect` meaning "this buildpack does not apply".
pub const DETECT_FAIL: i32 = 100;

/// What the detect phase needs.
#[derive(Debug, Clone)]
pub struct DetectConfig {
    /// The app directory (`bin/detect`'s working directory).
    pub app_dir: PathBuf,
    /// The platform directory (`<platform>/env/` holds the user's variables).
    pub platform_dir: PathBuf,
    /// The build config directory whose `env/` applies to every buildpack, if any.
    pub build_config_dir: Option<PathBuf>,
    /// Where the buildpacks are.
    pub store: BuildpackStore,
    /// The lifecycle's own environment (only some variables reach buildpacks).
    pub base_env: Vec<(String, String)>,
    /// The target given to buildpacks as `CNB_TARGET_*`.
    pub target: Option<Target>,
    /// Where the per-buildpack `<plan>` files are written.
    pub temp_dir: PathBuf,
}

/// The result of one `bin/detect`.
#[derive(Debug, Clone, PartialEq)]
pub enum DetectStatus {
    /// Exit 0 and a readable plan.
    Pass,
    /// Exit 100.
    Fail,
    /// Any other exit, a signal, or a plan that could not be read.
    Error(String),
}

impl fmt::Display for DetectStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetectStatus::Pass => f.write_str("pass"),
            DetectStatus::Fail => write!(f, "fail (exit status {DETECT_FAIL})"),
            DetectStatus::Error(why) => write!(f, "error ({why})"),
        }
    }
}

/// One buildpack's detection: its status, output and plan.
#[derive(Debug, Clone)]
pub struct DetectRun {
    /// `id@version`.
    pub key: String,
    /// How it ended.
    pub status: DetectStatus,
    /// What it printed (stdout and stderr, interleaved).
    pub output: String,
    /// The build plan it wrote, when it passed.
    pub plan: BuildPlan,
}

/// A buildpack of a tried group, as the report shows it.
#[derive(Debug, Clone)]
pub struct MemberReport {
    /// `id@version`.
    pub key: String,
    /// Whether the group could pass without it.
    pub optional: bool,
    /// Its detection result.
    pub status: DetectStatus,
}

/// One group that was tried and why it did not pass.
#[derive(Debug, Clone)]
pub struct GroupReport {
    /// Its buildpacks.
    pub members: Vec<MemberReport>,
    /// Why it did not pass (empty for the group that passed).
    pub reason: String,
}

/// No group of the order passed detection: every group tried, with each buildpack's result.
#[derive(Debug, Clone, thiserror::Error)]
pub struct DetectionFailed {
    /// The groups in the order they were tried.
    pub groups: Vec<GroupReport>,
    /// Every buildpack's detection, in the order they ran.
    pub runs: Vec<DetectRun>,
}

impl fmt::Display for DetectionFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no buildpack group passed detection")?;
        if self.groups.is_empty() {
            write!(f, " (the order has no groups)")?;
        }
        for (i, g) in self.groups.iter().enumerate() {
            write!(f, "\n  group {}: {}", i + 1, g.reason)?;
            for m in &g.members {
                write!(
                    f,
                    "\n    {}{}: {}",
                    m.key,
                    if m.optional { " (optional)" } else { "" },
                    m.status
                )?;
            }
        }
        Ok(())
    }
}

/// The outcome of a successful detect phase.
#[derive(Debug, Clone)]
pub struct Detected {
    /// The group that passed (without the buildpacks that did not take part).
    pub group: Group,
    /// The resolved build plan.
    pub plan: Plan,
    /// Every buildpack's detection, in the order they ran.
    pub runs: Vec<DetectRun>,
    /// The groups tried before (and including) the one that passed.
    pub groups: Vec<GroupReport>,
}

/// A component buildpack in a flattened group.
#[derive(Debug, Clone)]
struct Candidate {
    bp: Buildpack,
    optional: bool,
}

/// Runs the detect phase over `order`.
pub fn detect(config: &DetectConfig, order: &Order) -> Result<Detected> {
    let groups = expand_order(&config.store, order)?;
    let mut runs: Vec<DetectRun> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut reports = Vec::new();
    for group in groups {
        for c in &group {
            if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(c.bp.key()) {
                let run = run_detect(config, &c.bp)?;
                slot.insert(runs.len());
                runs.push(run);
            }
        }
        let run_of = |c: &Candidate| &runs[index[&c.bp.key()]];
        let members: Vec<MemberReport> = group
            .iter()
            .map(|c| MemberReport {
                key: c.bp.key(),
                optional: c.optional,
                status: run_of(c).status.clone(),
            })
            .collect();
        let outcome = resolve(&group.iter().map(|c| (c, run_of(c))).collect::<Vec<_>>());
        match outcome {
            Ok((members_passed, plan)) => {
                reports.push(GroupReport {
                    members,
                    reason: String::new(),
                });
                let group = Group {
                    group: members_passed
                        .into_iter()
                        .map(|c| GroupBuildpack {
                            id: c.bp.id.clone(),
                            version: c.bp.version.clone(),
                            api: Some(c.bp.api.to_string()),
                            homepage: c.bp.homepage.clone(),
                        })
                        .collect(),
                };
                return Ok(Detected {
                    group,
                    plan,
                    runs,
                    groups: reports,
                });
            }
            Err(reason) => reports.push(GroupReport { members, reason }),
        }
    }
    Err(Error::Detection(DetectionFailed {
        groups: reports,
        runs,
    }))
}

/// Flattens an order into the component-buildpack groups to try, in the order the spec tries
/// them: a composite buildpack contributes each group of its own order in turn (and, when
/// optional, finally nothing); a buildpack already in the group is not added twice.
fn expand_order(store: &BuildpackStore, order: &Order) -> Result<Vec<Vec<Candidate>>> {
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for g in &order.order {
        out.extend(expand_group(store, &g.group, &mut stack)?);
    }
    Ok(out
        .into_iter()
        .map(|group: Vec<Candidate>| {
            let mut seen: Vec<String> = Vec::new();
            group
                .into_iter()
                .filter(|c| {
                    let new = !seen.contains(&c.bp.id);
                    seen.push(c.bp.id.clone());
                    new
                })
                .collect()
        })
        .collect())
}

fn expand_group(
    store: &BuildpackStore,
    entries: &[GroupEntry],
    stack: &mut Vec<String>,
) -> Result<Vec<Vec<Candidate>>> {
    let mut results: Vec<Vec<Candidate>> = vec![Vec::new()];
    for entry in entries {
        let bp = store.lookup(&entry.id, entry.version.as_deref())?;
        let alternatives = match &bp.kind {
            BuildpackKind::Component => vec![vec![Candidate {
                bp: bp.clone(),
                optional: entry.optional,
            }]],
            BuildpackKind::Composite(order) => {
                let key = bp.key();
                if stack.contains(&key) {
                    return Err(Error::OrderCycle(key));
                }
                stack.push(key);
                let mut alts = Vec::new();
                for g in &order.order {
                    alts.extend(expand_group(store, &g.group, stack)?);
                }
                stack.pop();
                if entry.optional {
                    alts.push(Vec::new());
                }
                alts
            }
        };
        let mut next = Vec::new();
        for prefix in &results {
            for alt in &alternatives {
                let mut g = prefix.clone();
                g.extend(alt.iter().cloned());
                next.push(g);
            }
        }
        results = next;
    }
    Ok(results)
}

/// The environment `bin/detect` and `bin/build` start from (before layers add to it).
pub(crate) fn base_build_env(base_env: &[(String, String)], target: Option<&Target>) -> Env {
    let mut env = Env::for_build(base_env.iter().cloned());
    if let Some(t) = target {
        for (k, v) in t.env() {
            env.set(k, v);
        }
    }
    env
}

/// The variables a buildpack's executable sees: `env` with the platform's `env/` (unless the
/// buildpack clears it) and the build config's `env/` applied on top.
pub(crate) fn with_overrides(
    env: &Env,
    bp: &Buildpack,
    platform_dir: &Path,
    build_config_dir: Option<&Path>,
) -> Result<Env> {
    let mut env = env.clone();
    if !bp.clear_env {
        env.apply_platform_env_dir(&platform_dir.join("env"), Phase::Build)?;
    }
    if let Some(dir) = build_config_dir {
        env.apply_env_dir(&dir.join("env"))?;
    }
    Ok(env)
}

/// Runs `cmd` with stdout and stderr into one pipe; returns how it ended and what it printed.
pub(crate) fn run_captured(mut cmd: Command) -> std::io::Result<(ExitStatus, String)> {
    let (mut reader, writer) = std::io::pipe()?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let mut child = cmd.spawn()?;
    // The command holds the pipe's write ends until dropped; reading would never end.
    drop(cmd);
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut out)?;
    let status = child.wait()?;
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}

/// How a process ended, in words.
pub(crate) fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "an unknown status".into(),
    }
}

fn run_detect(config: &DetectConfig, bp: &Buildpack) -> Result<DetectRun> {
    let plan_dir = config
        .temp_dir
        .join(format!("kiln-detect-{}", std::process::id()))
        .join(escape_id(&bp.id));
    std::fs::create_dir_all(&plan_dir).map_err(io(&plan_dir))?;
    let plan_path = plan_dir.join("plan.toml");
    std::fs::write(&plan_path, b"").map_err(io(&plan_path))?;
    let base = base_build_env(&config.base_env, config.target.as_ref());
    let mut env = with_overrides(
        &base,
        bp,
        &config.platform_dir,
        config.build_config_dir.as_deref(),
    )?;
    env.set("CNB_BUILDPACK_DIR", bp.dir.to_string_lossy());
    if bp.api.at_least(0, 8) {
        env.set("CNB_PLATFORM_DIR", config.platform_dir.to_string_lossy());
        env.set("CNB_BUILD_PLAN_PATH", plan_path.to_string_lossy());
    }
    let program = bp.dir.join("bin").join("detect");
    let mut cmd = Command::new(&program);
    cmd.arg(&config.platform_dir)
        .arg(&plan_path)
        .current_dir(&config.app_dir)
        .env_clear()
        .envs(env.vars());
    let key = bp.key();
    let (status, output) = match run_captured(cmd) {
        Ok(done) => done,
        Err(e) => {
            return Ok(DetectRun {
                key,
                status: DetectStatus::Error(format!("cannot run {}: {e}", program.display())),
                output: String::new(),
                plan: BuildPlan::default(),
            })
        }
    };
    let status = match status.code() {
        Some(0) => DetectStatus::Pass,
        Some(DETECT_FAIL) => DetectStatus::Fail,
        _ => DetectStatus::Error(describe_status(status)),
    };
    let mut plan = BuildPlan::default();
    let status = if status == DetectStatus::Pass {
        match read_toml_if_exists::<BuildPlan>(&plan_path) {
            Ok(p) => {
                plan = p.unwrap_or_default();
                match check_plan(&plan) {
                    Ok(()) => DetectStatus::Pass,
                    Err(why) => DetectStatus::Error(format!("{}: {why}", plan_path.display())),
                }
            }
            Err(e) => DetectStatus::Error(e.to_string()),
        }
    } else {
        status
    };
    let _ = std::fs::remove_dir_all(&plan_dir);
    Ok(DetectRun {
        key,
        status,
        output,
        plan,
    })
}

/// Refuses what the spec forbids in detect output: the top-level `version` of a requirement.
fn check_plan(plan: &BuildPlan) -> std::result::Result<(), String> {
    for (i, alt) in plan.alternatives().iter().enumerate() {
        for (j, r) in alt.requires.iter().enumerate() {
            if r.version.is_some() {
                let at = if i == 0 {
                    format!("requires[{j}]")
                } else {
                    format!("or[{}].requires[{j}]", i - 1)
                };
                return Err(format!(
                    "key `{at}.version`: a top-level version is not supported; use metadata.version"
                ));
            }
        }
    }
    Ok(())
}

/// One buildpack's chosen alternative in a trial.
#[derive(Clone)]
struct TrialMember<'a> {
    candidate: &'a Candidate,
    sections: PlanSections,
    optional: bool,
}

/// Decides whether a group passes, given each member's detection; returns the members that
/// take part and the plan, or why the group does not pass.
fn resolve<'a>(
    group: &[(&'a Candidate, &DetectRun)],
) -> std::result::Result<(Vec<&'a Candidate>, Plan), String> {
    let mut passed: Vec<(&Candidate, &DetectRun)> = Vec::new();
    let mut failed_required = Vec::new();
    for (c, run) in group {
        match &run.status {
            DetectStatus::Pass => passed.push((c, run)),
            _ if c.optional => {}
            status => failed_required.push(format!("{} {}", c.bp.key(), status)),
        }
    }
    if !failed_required.is_empty() {
        return Err(format!(
            "a required buildpack did not pass: {}",
            failed_required.join(", ")
        ));
    }
    if passed.is_empty() {
        return Err("no buildpack passed".into());
    }
    // Every combination of the members' alternatives, first alternatives first; a member may
    // only be dropped (as optional) in its last alternative.
    let options: Vec<Vec<TrialMember>> = passed
        .iter()
        .map(|(c, run)| {
            let alts = run.plan.alternatives();
            let last = alts.len() - 1;
            alts.into_iter()
                .enumerate()
                .map(|(i, sections)| TrialMember {
                    candidate: c,
                    sections,
                    optional: c.optional && i == last,
                })
                .collect()
        })
        .collect();
    let mut indices = vec![0usize; options.len()];
    loop {
        let trial: Vec<TrialMember> = indices
            .iter()
            .enumerate()
            .map(|(m, &i)| options[m][i].clone())
            .collect();
        let last_reason = match run_trial(trial) {
            Ok((members, plan)) => return Ok((members, plan)),
            Err(reason) => reason,
        };
        // Next combination: the last member's alternatives vary fastest.
        let mut m = options.len();
        loop {
            if m == 0 {
                return Err(last_reason);
            }
            m -= 1;
            indices[m] += 1;
            if indices[m] < options[m].len() {
                break;
            }
            indices[m] = 0;
        }
    }
}

/// Checks one combination of alternatives: every requirement must come at or after a provide
/// of its name, and every provide must be required later. Optional members that break a rule
/// are dropped and the check repeats.
fn run_trial<'a>(
    mut trial: Vec<TrialMember<'a>>,
) -> std::result::Result<(Vec<&'a Candidate>, Plan), String> {
    loop {
        // name -> (providers so far not yet required, entry)
        let mut names: Vec<String> = Vec::new();
        let mut pending: HashMap<String, Vec<usize>> = HashMap::new();
        let mut entries: HashMap<String, PlanEntry> = HashMap::new();
        let mut early: Vec<(usize, String)> = Vec::new();
        for (i, m) in trial.iter().enumerate() {
            for p in &m.sections.provides {
                if !names.contains(&p.name) {
                    names.push(p.name.clone());
                }
                pending.entry(p.name.clone()).or_default().push(i);
            }
            for r in &m.sections.requires {
                if !names.contains(&r.name) {
                    names.push(r.name.clone());
                }
                let entry = entries.entry(r.name.clone()).or_default();
                for p in pending.remove(&r.name).unwrap_or_default() {
                    let bp = &trial[p].candidate.bp;
                    entry.providers.push(Provider {
                        id: bp.id.clone(),
                        version: bp.version.clone(),
                    });
                }
                if entry.providers.is_empty() {
                    early.push((i, r.name.clone()));
                } else {
                    entry.requires.push(r.clone());
                }
            }
        }
        let mut offenders: Vec<(usize, String)> = Vec::new();
        for (i, name) in &early {
            offenders.push((
                *i,
                format!(
                    "{} requires {name}, which no earlier buildpack provides",
                    trial[*i].candidate.bp.key()
                ),
            ));
        }
        for name in &names {
            for i in pending.get(name).into_iter().flatten() {
                offenders.push((
                    *i,
                    format!(
                        "{} provides {name}, which no buildpack requires",
                        trial[*i].candidate.bp.key()
                    ),
                ));
            }
        }
        if offenders.is_empty() {
            if trial.is_empty() {
                return Err("no buildpack of the group takes part".into());
            }
            let plan = Plan {
                entries: names
                    .iter()
                    .filter_map(|n| entries.remove(n))
                    .filter(|e| !e.providers.is_empty())
                    .collect(),
            };
            return Ok((trial.iter().map(|m| m.candidate).collect(), plan));
        }
        if let Some((_, why)) = offenders.iter().find(|(i, _)| !trial[*i].optional) {
            return Err(why.clone());
        }
        let drop: Vec<usize> = offenders.iter().map(|(i, _)| *i).collect();
        trial = trial
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !drop.contains(i))
            .map(|(_, m)| m)
            .collect();
        if trial.is_empty() {
            return Err(format!(
                "no buildpack of the group takes part: {}",
                offenders
                    .into_iter()
                    .map(|(_, w)| w)
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Api;
    use crate::order::{Provide, Require};

    fn candidate(id: &str, optional: bool) -> Candidate {
        Candidate {
            bp: Buildpack {
                dir: PathBuf::from("/bp"),
                api: Api::new(0, 10),
                id: id.into(),
                version: "1.0.0".into(),
                homepage: None,
                clear_env: false,
                sbom_formats: vec![],
                kind: BuildpackKind::Component,
            },
            optional,
        }
    }

    fn run(key: &str, status: DetectStatus, plan: BuildPlan) -> DetectRun {
        DetectRun {
            key: key.into(),
            status,
            output: String::new(),
            plan,
        }
    }

    fn sections(provides: &[&str], requires: &[&str]) -> PlanSections {
        PlanSections {
            provides: provides
                .iter()
                .map(|n| Provide { name: (*n).into() })
                .collect(),
            requires: requires
                .iter()
                .map(|n| Require {
                    name: (*n).into(),
                    version: None,
                    metadata: toml::Table::new(),
                })
                .collect(),
        }
    }

    fn plan(first: PlanSections, or: Vec<PlanSections>) -> BuildPlan {
        BuildPlan {
            provides: first.provides,
            requires: first.requires,
            or,
        }
    }

    #[test]
    fn requires_after_provides_resolve() {
        let a = candidate("a", false);
        let b = candidate("b", false);
        let ra = run(
            "a@1.0.0",
            DetectStatus::Pass,
            plan(sections(&["node"], &[]), vec![]),
        );
        let rb = run(
            "b@1.0.0",
            DetectStatus::Pass,
            plan(sections(&[], &["node"]), vec![]),
        );
        let (members, plan) = resolve(&[(&a, &ra), (&b, &rb)]).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(plan.entries.len(), 1);
        assert_eq!(plan.entries[0].providers[0].id, "a");
        assert_eq!(plan.entries[0].requires[0].name, "node");
        // The other way round, the requirement comes first: the group fails.
        let err = resolve(&[(&b, &rb), (&a, &ra)]).unwrap_err();
        assert!(err.contains("b@1.0.0 requires node"), "{err}");
    }

    #[test]
    fn or_alternatives_and_optional_members() {
        let a = candidate("a", false);
        let opt = candidate("opt", true);
        // `a` provides node and requires it, or requires nothing.
        let ra = run(
            "a",
            DetectStatus::Pass,
            plan(sections(&["x"], &[]), vec![sections(&[], &[])]),
        );
        let (members, plan) = resolve(&[(&a, &ra)]).unwrap();
        assert_eq!(members.len(), 1);
        assert!(plan.entries.is_empty());
        // An optional member whose provide nobody requires is dropped.
        let ro = run("opt", DetectStatus::Pass, plan_provides("y"));
        let rplain = run("a", DetectStatus::Pass, BuildPlan::default());
        let (members, _) = resolve(&[(&a, &rplain), (&opt, &ro)]).unwrap();
        assert_eq!(
            members.iter().map(|c| c.bp.id.as_str()).collect::<Vec<_>>(),
            vec!["a"]
        );
        // An optional member failing detection does not fail the group.
        let rf = run("opt", DetectStatus::Fail, BuildPlan::default());
        assert!(resolve(&[(&a, &rplain), (&opt, &rf)]).is_ok());
        // A required member failing does.
        let err = resolve(&[(&a, &rf)]).unwrap_err();
        assert!(err.contains("did not pass"), "{err}");
        // Nothing passing fails.
        assert!(resolve(&[(&opt, &rf)]).is_err());
    }

    fn plan_provides(name: &str) -> BuildPlan {
        plan(sections(&[name], &[]), vec![])
    }

    #[test]
    fn top_level_versions_are_refused() {
        let mut p = plan(sections(&[], &["node"]), vec![]);
        p.requires[0].version = Some(toml::Value::String("1".into()));
        assert!(check_plan(&p).unwrap_err().contains("requires[0].version"));
    }

    #[test]
    fn failure_report_lists_groups_and_results() {
        let err = DetectionFailed {
            groups: vec![GroupReport {
                members: vec![MemberReport {
                    key: "a@1".into(),
                    optional: false,
                    status: DetectStatus::Error("exit status 3".into()),
                }],
                reason: "a required buildpack did not pass".into(),
            }],
            runs: vec![],
        };
        let text = err.to_string();
        assert!(text.contains("group 1"), "{text}");
        assert!(text.contains("a@1: error (exit status 3)"), "{text}");
    }
}
