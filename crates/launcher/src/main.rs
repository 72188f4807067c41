//! The launcher binary: `/cnb/lifecycle/launcher` and `/cnb/process/<type>`.
//!
//! Exit status: that of the process it becomes; 82 when the process cannot be launched.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let req = kiln_launcher::LaunchRequest::from_process();
    let err = match kiln_launcher::prepare(&req) {
        Ok(p) => kiln_launcher::exec(&p),
        Err(e) => e,
    };
    eprintln!("ERROR: failed to launch: {err}");
    ExitCode::from(82)
}
