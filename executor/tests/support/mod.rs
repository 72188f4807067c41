//! Helpers shared by the executor's integration tests. Each test binary uses a part of them.
#![allow(dead_code)]

pub mod agent;
pub mod apps;
pub mod cnb;
pub mod deploy;
pub mod hostile;
pub mod pod;
pub mod podman;
