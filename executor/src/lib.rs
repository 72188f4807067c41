//! The `executor` binary's library half: kaniko-compatible flag parsing ([`cli`]), progress
//! rendering ([`render`]), the `cache prune` report ([`prune`]), exit codes ([`exit`]) and
//! the handling of SIGTERM and SIGINT during a build ([`interrupt`]).
//! `main.rs` only wires these to the engine, so everything here is testable without running a
//! build.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod exit;
pub mod interrupt;
pub mod prune;
pub mod render;

pub use cli::{
    parse, CacheFlags, Command, Env, Invocation, PruneInvocation, UsageError, WarmInvocation,
};
pub use render::{Level, LogFormat, OutputSettings, Progress, Renderer};
