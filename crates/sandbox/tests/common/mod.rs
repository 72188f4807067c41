//! Helpers shared by the sandbox integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::mpsc;
use std::time::Duration;

use kiln_sandbox::{
    CancelToken, OutputLine, OutputStream, RunOutcome, Sandbox, SandboxError, Step,
};

/// A private copy of a base rootfs (tests change their rootfs).
pub struct RootCopy {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn copy_base(base: &Path) -> RootCopy {
    let dir = tempfile::Builder::new()
        .prefix("kiln-sandbox-test-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("rootfs");
    let status = Process::new("cp")
        .arg("-a")
        .arg(base)
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {} failed", base.display());
    RootCopy { _dir: dir, path }
}

pub fn busybox() -> RootCopy {
    copy_base(kiln_testkit::bases::busybox_rootfs())
}

pub fn debian() -> RootCopy {
    copy_base(kiln_testkit::bases::debian_rootfs())
}

/// Output of one run: all lines in arrival order, tagged.
pub struct Ran {
    pub result: Result<RunOutcome, SandboxError>,
    pub lines: Vec<OutputLine>,
}

impl Ran {
    pub fn stream(&self, stream: OutputStream) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| String::from_utf8_lossy(&l.line).into_owned())
            .collect()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stream(OutputStream::Stdout)
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stream(OutputStream::Stderr)
    }

    /// The exit code; panics (with stderr) if the step could not run.
    pub fn code(&self) -> i32 {
        match &self.result {
            Ok(o) => o.status.code(),
            Err(e) => panic!("step failed to run: {e}; stderr: {:?}", self.stderr()),
        }
    }

    /// Stdout lines, asserting the step exited 0.
    pub fn ok_stdout(&self) -> Vec<String> {
        assert_eq!(self.code(), 0, "stderr: {:?}", self.stderr());
        self.stdout()
    }
}

pub fn run(sandbox: &dyn Sandbox, step: &Step) -> Ran {
    let (tx, rx) = mpsc::channel();
    let mut sink = tx;
    let result = sandbox.run(step, &mut sink, &CancelToken::new());
    drop(sink);
    Ran {
        result,
        lines: rx.try_iter().collect(),
    }
}

pub fn sh(sandbox: &dyn Sandbox, script: &str) -> Ran {
    run(sandbox, &Step::new(kiln_sandbox::Command::shell(script)))
}

/// Every entry under `root` with the metadata a layer would record (not atime/ctime).
pub fn listing(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.insert(
        dir.strip_prefix(root).unwrap().to_path_buf(),
        describe(dir, &meta),
    );
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            walk(root, &path, out);
        } else {
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                describe(&path, &meta),
            );
        }
    }
}

fn describe(path: &Path, meta: &std::fs::Metadata) -> String {
    let target = if meta.file_type().is_symlink() {
        std::fs::read_link(path).unwrap().display().to_string()
    } else {
        String::new()
    };
    format!(
        "mode={:o} uid={} gid={} size={} mtime={}.{} ino={} nlink={} -> {target}",
        meta.mode(),
        meta.uid(),
        meta.gid(),
        if meta.is_dir() { 0 } else { meta.size() },
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
        meta.nlink()
    )
}

/// Lines of the host's mount table that mention `path`.
pub fn host_mounts_under(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Host pids whose command line is exactly `argv`.
pub fn host_processes(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c == wanted)
                .unwrap_or(false)
        })
        .collect()
}

/// Waits up to `limit` for `f` to hold (processes take a moment to be reaped by the kernel).
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
