//! What Kiln's benchmarks share: measuring a child process the way `time -v` would, so each
//! tool's figures (wall time, CPU time, peak RSS) are taken the same way in the same run.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod workloads;

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

/// Wall time, CPU time and peak RSS of one child process run to completion.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Time from spawn to exit.
    pub wall: Duration,
    /// User + system CPU time: less sensitive than wall time to other load on the machine.
    pub cpu: Duration,
    /// The kernel's `ru_maxrss` for the child (and the descendants it waited for), in KiB.
    pub max_rss_kib: i64,
}

/// Runs `cmd` to completion and reads its rusage with `wait4`, which `std::process` does not
/// expose. Panics when the command cannot start or exits non-zero: a benchmark whose subject
/// failed has no figure worth printing.
pub fn measure(cmd: &mut Command) -> Measured {
    try_measure(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// [`measure`], with a failed command as an error naming it, for a caller that retries.
pub fn try_measure(cmd: &mut Command) -> Result<Measured, String> {
    let start = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on our own child; `child` is not waited for elsewhere.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(rc, pid, "wait4: {}", io::Error::last_os_error());
    // The child has been reaped by wait4; dropping `Child` would not wait again, but forgetting
    // it makes that independent of std's implementation.
    std::mem::forget(child);
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("{cmd:?} failed with status {status:#x}"));
    }
    let seconds = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(Measured {
        wall,
        cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
    })
}

/// The run with the median wall time: medians resist the odd run disturbed by other load.
pub fn median(mut values: Vec<Measured>) -> Measured {
    assert!(!values.is_empty(), "median of no runs");
    values.sort_by_key(|m| m.wall);
    values[values.len() / 2]
}
