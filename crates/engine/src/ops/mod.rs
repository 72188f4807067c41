//! One module per operation of the plan, each owning the operation's three faces: what goes
//! into its cache key, how it edits the image config, and how it executes. The stage loop and
//! the cache planner call these and nothing else, so a step is keyed by exactly the config it
//! runs with (the planner replays the same edits the loop applies).

pub(crate) mod cache_mount;
pub(crate) mod config;
pub(crate) mod copy;
pub(crate) mod mkdir;
pub(crate) mod run;
pub(crate) mod ssh_agent;
pub(crate) mod unmounted;

use kiln_cache::{CacheKey, StepInput};
use kiln_context::{BuildContext, ContextHasher};
use kiln_oci::image::ImageConfig;
use kiln_plan::Operation;

use crate::remote::RemotePins;

/// What a stage's keys need from the rest of the build.
pub(crate) struct KeyInputs<'a> {
    /// The build context, for copy sources and bind mounts.
    pub(crate) context: &'a BuildContext,
    /// Final keys of the stages built so far.
    pub(crate) stage_key: &'a dyn Fn(usize) -> Option<CacheKey>,
    /// Image digests, URL validators or contents and git commits, pinned before keying.
    pub(crate) remote: &'a RemotePins,
    /// Hashes context files once per build.
    pub(crate) hasher: &'a ContextHasher,
}

/// What `operation` can observe when the image config is `image` (as the steps before left
/// it, before the operation's own edit), or `None` when some input cannot be pinned (an image or URL that could not be
/// reached, a source that does not resolve): the chain stops there and the rest of the stage
/// runs uncached.
pub(crate) fn key_input(
    operation: &Operation,
    image: &ImageConfig,
    inputs: &KeyInputs<'_>,
) -> Option<StepInput> {
    match operation {
        Operation::Run(op) => run::key_input(op, &image.config, inputs),
        Operation::Copy(op) => copy::key_input(op, inputs),
        Operation::Mkdir(op) => Some(mkdir::key_input(op, &image.config)),
        Operation::Config(edit) => Some(StepInput::Config(edit.clone())),
    }
}

/// Applies what `operation` changes in the image config (a mkdir that sets the working
/// directory, a config edit); run and copy change none.
pub(crate) fn edit_config(
    operation: &Operation,
    image: &mut ImageConfig,
    state: &mut config::EditState,
) {
    match operation {
        Operation::Mkdir(op) => mkdir::edit_config(op, &mut image.config),
        Operation::Config(edit) => config::edit(image, edit, state),
        Operation::Run(_) | Operation::Copy(_) => {}
    }
}
