//! What Kiln's benchmarks share: measuring a child process the way `time -v` would, so each
//! tool's figures (wall time, CPU time, peak RSS) are taken the same way in the same run.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod workloads;

use std::io;
use std::path::Path;
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

/// Where a measured command's stderr goes, `WORK/logs/NAME.log`: the runner's output stays a
/// readable report, and a failed run's log is there to read (`measure` names the command).
pub fn log_file(work: &Path, name: &str) -> std::fs::File {
    let path = work.join("logs").join(format!("{name}.log"));
    std::fs::create_dir_all(path.parent().unwrap()).expect("log dir");
    std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The run with the median wall time: medians resist the odd run disturbed by other load.
pub fn median(mut values: Vec<Measured>) -> Measured {
    assert!(!values.is_empty(), "median of no runs");
    values.sort_by_key(|m| m.wall);
    values[values.len() / 2]
}

/// Writes `section` (which starts with its own `# ` heading line) into the Markdown results file
/// at `path`: in place of the section with the same heading, up to the next `# ` heading, or at
/// the end. Each benchmark owns one section, so running one leaves the others' figures alone.
pub fn write_section(path: &Path, section: &str) {
    let heading = section.lines().next().unwrap_or_default();
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut kept: Vec<String> = Vec::new();
    let mut replaced = false;
    for part in split_sections(&old) {
        if part.lines().next() == Some(heading) {
            kept.push(section.trim_end().to_owned());
            replaced = true;
        } else if !part.trim().is_empty() {
            kept.push(part.trim_end().to_owned());
        }
    }
    if !replaced {
        kept.push(section.trim_end().to_owned());
    }
    let text = kept.join("\n\n") + "\n";
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The file's parts, each starting at a line that begins with `# ` (the first part may not).
fn split_sections(text: &str) -> Vec<&str> {
    let mut starts: Vec<usize> = text.match_indices("\n# ").map(|(i, _)| i + 1).collect();
    starts.insert(0, 0);
    starts.push(text.len());
    starts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_replaces_its_namesake_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("RESULTS.md");
        write_section(&path, "# A\n\nfirst\n");
        write_section(&path, "# B\n\n| x |\n");
        write_section(&path, "# A\n\nsecond\n");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# A\n\nsecond\n\n# B\n\n| x |\n"
        );
    }
}
