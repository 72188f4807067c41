//! The build plan: what every Kiln front end produces and the engine runs.
//!
//! A [`Plan`] is a set of [`Stage`]s, each starting from a [`Base`] (nothing, an image, or an
//! earlier stage) and made of [`Step`]s. A step is one [`Operation`] — [`Run`], [`Copy`],
//! [`Mkdir`] or a [`ConfigEdit`] — with its [`Provenance`]: which front end made it, from which
//! file and line, and the text history and progress show. The engine knows operations, not
//! Dockerfile instructions or buildpacks; a front end knows its input, not the engine.
//!
//! Some of a stage's steps can only be written once its base is known (a Dockerfile's ENV of
//! the base image is expanded into later instructions; ONBUILD triggers of the base run first)
//! or once an earlier stage has run (a buildpacks export copies the layers the build made).
//! Such a stage carries a [`Lower`] instead of fixed steps: the engine calls it when the base's
//! config and the stages it depends on are there, answering its questions through
//! [`BaseFacts`] and [`StageFiles`], as BuildKit's gateway answers a front end's
//! image-config requests.
//!
//! Types only: nothing here reads a file or a network.
//!
//! ```
//! use kiln_plan::{Base, Copy, CopySource, Operation, Plan, Provenance, Stage, Step, Steps};
//!
//! let copy = Copy::new(vec![CopySource::Path("app".into())], "/app/");
//! let stage = Stage {
//!     id: 0,
//!     name: None,
//!     base: Base::Scratch,
//!     origin: Provenance::api("base"),
//!     dependencies: Vec::new(),
//!     steps: Steps::Fixed(vec![Step::new(Operation::Copy(copy), Provenance::api("copy app"))]),
//!     layer_epoch: None,
//! };
//! let plan = Plan::new(kiln_plan::FrontEnd::Api, "example", vec![stage], 0).unwrap();
//! assert_eq!(plan.levels(), &[vec![0]]);
//! ```

#![forbid(unsafe_code)]

mod ops;
mod values;

use std::fmt;
use std::sync::Arc;

pub use ops::{
    CommandLine, ConfigEdit, Copy, CopySource, HealthCheck, Mkdir, Operation, Run, RunProgram,
};
pub use values::{CacheSharing, Chmod, Mount, MountType, NetworkMode, SecurityMode, Source};

/// The front end a plan (and each of its steps) comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FrontEnd {
    /// A Dockerfile.
    Dockerfile,
    /// Cloud Native Buildpacks.
    Buildpacks,
    /// A plan written by a program against this crate.
    Api,
}

impl FrontEnd {
    /// The front end's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            FrontEnd::Dockerfile => "dockerfile",
            FrontEnd::Buildpacks => "buildpacks",
            FrontEnd::Api => "api",
        }
    }
}

/// Where a step (or a stage's base) comes from: what history and progress show and errors
/// point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The front end that made it.
    pub front_end: FrontEnd,
    /// The file it was written in (the Dockerfile's name as given, a buildpack's id), or empty.
    pub file: String,
    /// The first line it was written on, 0 when it has none.
    pub line: usize,
    /// The text history (`created_by`) and progress show for it.
    pub text: String,
}

impl Provenance {
    /// Provenance of a step written by a program (no file, no line).
    pub fn api(text: impl Into<String>) -> Provenance {
        Provenance {
            front_end: FrontEnd::Api,
            file: String::new(),
            line: 0,
            text: text.into(),
        }
    }

    /// Where to point a user: `FILE:LINE`, `FILE`, or the front end's name.
    pub fn location(&self) -> String {
        match (self.file.is_empty(), self.line) {
            (true, _) => self.front_end.name().to_owned(),
            (false, 0) => self.file.clone(),
            (false, line) => format!("{}:{line}", self.file),
        }
    }
}

/// One operation of a stage with its provenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What to do.
    pub operation: Operation,
    /// Where it comes from.
    pub provenance: Provenance,
}

impl Step {
    /// A step doing `operation`.
    pub fn new(operation: Operation, provenance: Provenance) -> Step {
        Step {
            operation,
            provenance,
        }
    }
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// An empty filesystem and config.
    Scratch,
    /// An image, by reference as written (normalised by the engine).
    Image(String),
    /// The filesystem and config an earlier stage ends with, by stage id.
    Stage(usize),
}

/// What a [`Lower`] learns about its stage's base: the parts of the base's config that decide
/// how the stage's steps are written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseFacts {
    /// The base's environment, in order (with a default `PATH` when it sets none).
    pub env: Vec<(String, String)>,
    /// The base's build triggers (an image config's `OnBuild`, or what an earlier stage added
    /// to its own), to run before the stage's own steps.
    pub on_build: Vec<String>,
    /// The base's working directory, if it sets one.
    pub working_dir: Option<String>,
    /// The base's user, if it sets one.
    pub user: Option<String>,
    /// Whether these are the base's real facts. Before the base is resolved the engine may
    /// lower a stage with empty facts to see which remote inputs its steps name; such steps
    /// are never run.
    pub known: bool,
}

/// Read access to the files of the stages a stage depends on, for a [`Lower`] that must see
/// what an earlier stage made. Paths are absolute inside that stage's filesystem and resolved
/// inside it.
pub trait StageFiles {
    /// The content of a regular file, or `None` when there is nothing at `path`.
    fn read(&self, stage: usize, path: &str) -> Result<Option<Vec<u8>>, String>;

    /// The names in a directory, sorted, or `None` when there is nothing at `path`.
    fn list(&self, stage: usize, path: &str) -> Result<Option<Vec<String>>, String>;
}

/// The layers of a finished stage, for a [`Lower`] whose config names them (a buildpacks
/// image's lifecycle label records the digests of its layers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageLayers {
    /// The diff IDs of the base's layers, bottom first.
    pub base: Vec<String>,
    /// The base image by digest (`name@sha256:...`), when the stage is on an image.
    pub base_image: Option<String>,
    /// The diff ID of each step's layer (`None` for a step without one), in step order.
    pub steps: Vec<Option<String>>,
}

/// Writes a stage's steps once its base and the stages it depends on are known.
pub trait Lower: Send + Sync {
    /// The stage's steps on top of a base described by `base`.
    fn lower(&self, base: &BaseFacts, stages: &dyn StageFiles) -> Result<Vec<Step>, LowerError>;

    /// Config edits that need the stage's layers, applied after its last step (no history
    /// entry). None by default.
    fn finish(&self, _layers: &StageLayers) -> Result<Vec<ConfigEdit>, LowerError> {
        Ok(Vec::new())
    }

    /// What the user should be told about the last lowering (a buildpacks build: which group
    /// passed detection), shown as notes in the progress output. None by default.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Why a stage could not be lowered; the message says where (file and line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LowerError(pub String);

/// A stage's steps: known when the plan is made, or written by the front end when the base is
/// known.
#[derive(Clone)]
pub enum Steps {
    /// Steps that do not depend on the base.
    Fixed(Vec<Step>),
    /// Steps written by the front end once the base (and earlier stages) are known.
    Lowered(Arc<dyn Lower>),
}

impl fmt::Debug for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Steps::Fixed(steps) => f.debug_tuple("Fixed").field(steps).finish(),
            Steps::Lowered(_) => f.write_str("Lowered(..)"),
        }
    }
}

impl Steps {
    /// The steps on top of a base described by `base`.
    pub fn lower(
        &self,
        base: &BaseFacts,
        stages: &dyn StageFiles,
    ) -> Result<Vec<Step>, LowerError> {
        match self {
            Steps::Fixed(steps) => Ok(steps.clone()),
            Steps::Lowered(lower) => lower.lower(base, stages),
        }
    }

    /// The notes of the last lowering (see [`Lower::notes`]).
    pub fn notes(&self) -> Vec<String> {
        match self {
            Steps::Fixed(_) => Vec::new(),
            Steps::Lowered(lower) => lower.notes(),
        }
    }

    /// The config edits that need the stage's layers (see [`Lower::finish`]).
    pub fn finish(&self, layers: &StageLayers) -> Result<Vec<ConfigEdit>, LowerError> {
        match self {
            Steps::Fixed(_) => Ok(Vec::new()),
            Steps::Lowered(lower) => lower.finish(layers),
        }
    }
}

/// One stage of a plan.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The stage's id, unique in the plan (a Dockerfile's stage index).
    pub id: usize,
    /// The stage's name, if it has one.
    pub name: Option<String>,
    /// What it starts from.
    pub base: Base,
    /// Where the stage starts (a Dockerfile's FROM line).
    pub origin: Provenance,
    /// Stages that must be finished first besides the base (copies and mounts from them).
    pub dependencies: Vec<usize>,
    /// What it does.
    pub steps: Steps,
    /// A time (seconds since 1970) every new layer's entry times are clamped to, so that the
    /// same files always give the same layer (a buildpacks export dates its layers 1980-01-01,
    /// as the lifecycle does); `None`: the build's own setting (`--reproducible`).
    pub layer_epoch: Option<i64>,
}

/// An image the build writes besides its result: the image of `stage`, pushed to
/// `destination` (a buildpacks build's cache image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraImage {
    /// The stage whose image it is.
    pub stage: usize,
    /// Where it is pushed (`registry/repository:tag`).
    pub destination: String,
}

/// Why a plan is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A stage depends on a stage the plan does not have.
    #[error("stage {stage} depends on stage {missing}, which is not in the plan")]
    MissingStage {
        /// The stage with the dependency.
        stage: usize,
        /// The stage it names.
        missing: usize,
    },
    /// Two stages have the same id.
    #[error("two stages have the id {0}")]
    DuplicateStage(usize),
    /// Stages depend on each other in a circle.
    #[error("stage {0} depends on itself through its dependencies")]
    Cycle(usize),
    /// The target is not a stage of the plan.
    #[error("the target stage {0} is not in the plan")]
    NoTarget(usize),
}

/// A whole build: its stages, which one is the image, and the order they can run in.
#[derive(Debug, Clone)]
pub struct Plan {
    front_end: FrontEnd,
    identity: String,
    stages: Vec<Stage>,
    target: usize,
    levels: Vec<Vec<usize>>,
    notes: Vec<String>,
    extra_images: Vec<ExtraImage>,
}

impl Plan {
    /// A plan of `stages` whose image is stage `target`. `identity` names the build's
    /// definition for the layer cache's stage records (a Dockerfile's text and build args):
    /// two builds with the same identity look for the same records. Checks that every
    /// dependency is a stage of the plan and that there is no cycle, and groups the stages in
    /// levels that can run at the same time.
    pub fn new(
        front_end: FrontEnd,
        identity: impl Into<String>,
        stages: Vec<Stage>,
        target: usize,
    ) -> Result<Plan, PlanError> {
        let ids: Vec<usize> = stages.iter().map(|s| s.id).collect();
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(PlanError::DuplicateStage(*id));
            }
        }
        if !ids.contains(&target) {
            return Err(PlanError::NoTarget(target));
        }
        let needs = |stage: &Stage| -> Vec<usize> {
            let mut needs = stage.dependencies.clone();
            if let Base::Stage(base) = stage.base {
                needs.push(base);
            }
            needs
        };
        for stage in &stages {
            if let Some(missing) = needs(stage).into_iter().find(|d| !ids.contains(d)) {
                return Err(PlanError::MissingStage {
                    stage: stage.id,
                    missing,
                });
            }
        }
        let mut level_of: Vec<Option<usize>> = vec![None; stages.len()];
        let position = |id: usize| ids.iter().position(|i| *i == id).expect("checked above");
        // Longest path from a stage without dependencies; at most one pass per stage.
        for _ in 0..=stages.len() {
            let mut changed = false;
            for (i, stage) in stages.iter().enumerate() {
                let deps: Vec<Option<usize>> = needs(stage)
                    .into_iter()
                    .map(|d| level_of[position(d)])
                    .collect();
                if deps.iter().all(Option::is_some) {
                    let level = deps.into_iter().flatten().map(|l| l + 1).max().unwrap_or(0);
                    if level_of[i] != Some(level) {
                        level_of[i] = Some(level);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        if let Some(i) = level_of
            .iter()
            .position(|l| l.is_none_or(|l| l >= stages.len()))
        {
            return Err(PlanError::Cycle(stages[i].id));
        }
        let depth = level_of.iter().flatten().max().map_or(0, |m| m + 1);
        let mut levels = vec![Vec::new(); depth];
        for (i, level) in level_of.iter().enumerate() {
            levels[level.expect("every stage has a level")].push(stages[i].id);
        }
        Ok(Plan {
            front_end,
            identity: identity.into(),
            stages,
            target,
            levels,
            notes: Vec::new(),
            extra_images: Vec::new(),
        })
    }

    /// The same plan with warnings the front end wants the user to see (e.g. a build arg no
    /// stage uses).
    pub fn with_notes(mut self, notes: Vec<String>) -> Plan {
        self.notes = notes;
        self
    }

    /// The front end's warnings about the plan.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The same plan, also writing `extra` (its stage must be in the plan; unknown stages are
    /// ignored by the engine with a warning).
    pub fn with_extra_image(mut self, extra: ExtraImage) -> Plan {
        self.extra_images.push(extra);
        self
    }

    /// Images the build writes besides its result.
    pub fn extra_images(&self) -> &[ExtraImage] {
        &self.extra_images
    }

    /// The front end that made the plan.
    pub fn front_end(&self) -> &FrontEnd {
        &self.front_end
    }

    /// What the layer cache's stage records are found by (see [`Plan::new`]).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The stages, every one after the stages it depends on.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// A stage by id.
    pub fn stage(&self, id: usize) -> Option<&Stage> {
        self.stages.iter().find(|s| s.id == id)
    }

    /// The id of the stage whose result is the image.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Stage ids grouped by depth: the stages of one level depend only on earlier levels.
    pub fn levels(&self) -> &[Vec<usize>] {
        &self.levels
    }

    /// The stages whose layers end up in the image: the target and the stages it is built
    /// on, transitively.
    pub fn image_stages(&self) -> Vec<usize> {
        let mut chain = vec![self.target];
        while let Some(Base::Stage(parent)) = self
            .stage(*chain.last().expect("not empty"))
            .map(|s| &s.base)
        {
            if chain.contains(parent) {
                break;
            }
            chain.push(*parent);
        }
        chain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(id: usize, base: Base, dependencies: Vec<usize>) -> Stage {
        Stage {
            id,
            name: None,
            base,
            origin: Provenance::api("from"),
            dependencies,
            steps: Steps::Fixed(Vec::new()),
            layer_epoch: None,
        }
    }

    #[test]
    fn levels_follow_dependencies_and_bases() {
        let plan = Plan::new(
            FrontEnd::Api,
            "x",
            vec![
                stage(0, Base::Scratch, vec![]),
                stage(3, Base::Image("busybox".into()), vec![]),
                stage(5, Base::Stage(0), vec![3]),
                stage(7, Base::Stage(5), vec![]),
            ],
            7,
        )
        .unwrap();
        assert_eq!(plan.levels(), &[vec![0, 3], vec![5], vec![7]]);
        assert_eq!(plan.image_stages(), vec![7, 5, 0]);
    }

    #[test]
    fn malformed_plans_are_refused() {
        let missing = Plan::new(
            FrontEnd::Api,
            "x",
            vec![stage(0, Base::Stage(1), vec![])],
            0,
        );
        assert_eq!(
            missing.unwrap_err(),
            PlanError::MissingStage {
                stage: 0,
                missing: 1
            }
        );
        let cycle = Plan::new(
            FrontEnd::Api,
            "x",
            vec![
                stage(0, Base::Stage(1), vec![]),
                stage(1, Base::Scratch, vec![0]),
            ],
            0,
        );
        assert!(matches!(cycle, Err(PlanError::Cycle(_))));
        let target = Plan::new(FrontEnd::Api, "x", vec![stage(0, Base::Scratch, vec![])], 2);
        assert_eq!(target.unwrap_err(), PlanError::NoTarget(2));
    }

    #[test]
    fn locations_name_file_and_line() {
        let mut at = Provenance::api("RUN x");
        assert_eq!(at.location(), "api");
        at.file = "Dockerfile".into();
        assert_eq!(at.location(), "Dockerfile");
        at.line = 4;
        assert_eq!(at.location(), "Dockerfile:4");
    }
}
