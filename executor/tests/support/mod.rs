//! Helpers shared by the executor's integration tests. Each test binary uses a part of them.
#![allow(dead_code)]

pub mod apps;
pub mod cnb;
pub mod hostile;
pub mod pod;
