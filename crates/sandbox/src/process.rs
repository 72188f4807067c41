//! Starting, supervising and reaping a step's processes. All `unsafe` of the crate is here and
//! in `child`, which holds the code that runs in the cloned processes.
//!
//! Shape of a running step:
//!
//! ```text
//! caller thread (supervisor)        poll(): stdout, stderr, report pipe, cancel wake-up pipe
//!   └─ init      clone(2): in chroot mode with new mount/pid/uts/ipc namespaces (pid 1 there);
//!      │         runs the setup operations (mounts, pivot_root), reaps every orphan, and
//!      │         reports the command's wait status over the report pipe
//!      └─ command   setsid, user switch, chdir, execve of the step's program
//! ```
//!
//! The init exists so that the step's program is not pid 1 (pid 1 ignores signals it has no
//! handler for, so `kill $$` would not work as in Docker) and so that daemonised grandchildren
//! have a reaper that is ours. When the command exits:
//! - chroot mode: the init exits; the kernel then kills every process left in the pid namespace
//!   and its mount namespace (with all the step's mounts) disappears with the last of them;
//! - in-place mode: the init is a child subreaper; it kills the command's process group and
//!   every process re-parented to it (found through `/proc`), until it has no child left.
//!
//! Both children are made with the raw `clone` system call from a possibly multi-threaded
//! program, so they may only do async-signal-safe work: everything (C strings, pointer arrays,
//! the group list) is prepared before the clone, the children never allocate, never unwind and
//! leave only through `_exit` or `execve`, and user switching uses raw system calls because
//! glibc's `setuid` family would try to signal the parent's other threads.

mod child;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::{c_char, c_int, c_ulong, pid_t};

use crate::cancel::CancelToken;
use crate::error::SandboxError;
use crate::output::{LineSplitter, OutputSink, OutputStream};
use crate::ExitStatus;

/// How long output pipes may stay open after the init reported, before the supervisor stops
/// reading them (only a process that escaped the step could hold them).
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// One operation the init performs before starting the command.
pub(crate) enum SetupOp {
    /// `unshare(2)` with these flags (in-place mode, for RUN --mount).
    Unshare(c_int),
    /// `mount(2)`.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: c_ulong,
        data: Option<CString>,
    },
    /// A read-only sysfs; if the kernel refuses a new sysfs instance, a read-only recursive bind
    /// of the host's `/sys`.
    Sysfs { target: CString },
    /// Creates an empty file (a bind-mount target inside the sandbox's own /dev tmpfs).
    CreateFile(CString),
    /// `mkdir(2)` inside the sandbox's own tmpfs.
    Mkdir(CString),
    /// `symlink(2)` inside the sandbox's own tmpfs.
    Symlink { target: CString, link: CString },
    /// `sethostname(2)` in the new UTS namespace.
    SetHostname(CString),
    /// Brings the loopback interface of a new network namespace up (it starts down). Unless
    /// `required`, a refusal (no CAP_NET_ADMIN) leaves it down and the step still runs.
    LoopbackUp { required: bool },
    /// Makes this directory (a mount point) the root: pivot_root(".", ".") and a lazy unmount of
    /// the old root stacked on it, so no directory for the old root is needed in the rootfs.
    PivotRoot(CString),
}

/// A setup operation and its description for error messages.
pub(crate) struct Setup {
    pub op: SetupOp,
    pub description: String,
}

/// How the step's left-over processes are killed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reaping {
    /// The init is pid 1 of a new pid namespace: its exit kills everything.
    PidNamespace,
    /// Process group kill plus child-subreaper sweep.
    ProcessTree,
}

/// The step's program and the identity it runs as.
pub(crate) struct ExecSpec {
    /// `argv[0]` as the step named it, for error messages.
    pub program: String,
    /// Paths to try with `execve`, in order (the PATH search is done up front).
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    /// uid, gid and supplementary groups; `None` keeps the supervisor's identity.
    pub user: Option<(u32, u32, Vec<libc::gid_t>)>,
    /// Working directory, as seen by the command (after pivot_root in chroot mode).
    pub workdir: CString,
    /// Capability mask (bit n = capability n) the command keeps in its bounding set and, when
    /// it runs as uid 0, in its permitted and effective sets; `None` leaves capabilities alone.
    pub capabilities: Option<u64>,
}

/// Everything needed to run one step.
pub(crate) struct Plan {
    /// Namespace flags for the init's clone; 0 for in-place mode.
    pub namespaces: c_int,
    pub setup: Vec<Setup>,
    pub reaping: Reaping,
    pub exec: ExecSpec,
}

// Report records, written by the init and the command child into the report pipe. 16 bytes,
// below PIPE_BUF, so every write is atomic.
const REC_SETUP_FAILED: u32 = 1;
const REC_COMMAND_FAILED: u32 = 2;
const REC_EXEC_FAILED: u32 = 3;
const REC_EXITED: u32 = 4;
const REC_CANCELLED: u32 = 5;
const REC_INIT_FAILED: u32 = 6;

/// Steps of the command child before exec, for [`REC_COMMAND_FAILED`].
const COMMAND_STEPS: [&str; 7] = [
    "redirecting stdin/stdout/stderr",
    "setgroups",
    "setresgid",
    "setresuid",
    "chdir to the working directory",
    "dropping capabilities from the bounding set",
    "capset",
];
/// Steps of the init itself, for [`REC_INIT_FAILED`].
const INIT_STEPS: [&str; 2] = ["fork of the command", "waiting for signals"];

#[repr(C)]
#[derive(Clone, Copy)]
struct Record {
    kind: u32,
    index: u32,
    value: i32,
    _pad: i32,
}

/// What the children need, prepared before the clone so they allocate nothing.
struct ChildContext<'a> {
    plan: &'a Plan,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    groups: &'a [libc::gid_t],
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    report: RawFd,
    /// The supervisor's pid; the init of in-place mode accepts SIGTERM only from it.
    supervisor: pid_t,
    /// Sorted fds the init keeps; every other inherited fd is closed (a concurrent step's pipe
    /// ends would otherwise be held open by this step's init).
    init_keep: [RawFd; 4],
}

/// Runs `plan` to completion, streaming output to `sink`. Returns the command's exit status;
/// when it returns, every process of the step is gone.
pub(crate) fn run(
    plan: &Plan,
    sink: &mut dyn OutputSink,
    cancel: &CancelToken,
) -> Result<ExitStatus, SandboxError> {
    let (out_r, out_w) = pipe("pipe for stdout")?;
    let (err_r, err_w) = pipe("pipe for stderr")?;
    let (report_r, report_w) = pipe("pipe for the sandbox report")?;
    let (wake_r, wake_w) = pipe("pipe for cancellation")?;
    set_nonblocking(&wake_w);
    let stdin = open_dev_null()?;
    let _registration = cancel.register(Arc::new(wake_w));
    if cancel.is_cancelled() {
        return Err(SandboxError::Cancelled);
    }

    let mut init = start_init(
        plan,
        ChildFds {
            stdin,
            stdout: out_w,
            stderr: err_w,
            report: report_w,
        },
    )?;
    let supervised = supervise(plan, &mut init, [&out_r, &err_r, &report_r, &wake_r], sink)?;
    let init_status = init.wait()?;

    let report = Report::decode(plan, &supervised.report);
    if let Some(err) = report.failure {
        return Err(err);
    }
    match report.exited {
        Some(raw) => Ok(ExitStatus::from_wait_status(raw)),
        None if supervised.cancelled || report.cancelled => Err(SandboxError::Cancelled),
        None => Err(SandboxError::InitDied(describe_wait_status(init_status))),
    }
}

/// The children's ends of the pipes, and their stdin; the supervisor closes its copies once
/// the init is started.
struct ChildFds {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    report: OwnedFd,
}

/// Clones the init, which runs the setup and the command. Returns the guard that reaps it.
fn start_init(plan: &Plan, fds: ChildFds) -> Result<InitGuard, SandboxError> {
    let groups: &[libc::gid_t] = plan
        .exec
        .user
        .as_ref()
        .map(|(_, _, g)| g.as_slice())
        .unwrap_or(&[]);
    let mut init_keep = [
        fds.stdin.as_raw_fd(),
        fds.stdout.as_raw_fd(),
        fds.stderr.as_raw_fd(),
        fds.report.as_raw_fd(),
    ];
    init_keep.sort_unstable();
    let ctx = ChildContext {
        plan,
        argv: null_terminated(&plan.exec.argv),
        envp: null_terminated(&plan.exec.env),
        groups,
        stdin: fds.stdin.as_raw_fd(),
        stdout: fds.stdout.as_raw_fd(),
        stderr: fds.stderr.as_raw_fd(),
        report: fds.report.as_raw_fd(),
        // SAFETY: getpid has no preconditions.
        supervisor: unsafe { libc::getpid() },
        init_keep,
    };

    // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child gets a copy of this
    // address space and continues here with 0. The child only runs `init_main`, which obeys the
    // async-signal-safety rules of the module comment and never returns.
    let pid = unsafe { child::raw_clone(plan.namespaces) };
    if pid < 0 {
        let err = io::Error::last_os_error();
        return Err(SandboxError::Os {
            operation: if plan.namespaces != 0 {
                "clone with new mount/pid/uts/ipc namespaces (chroot mode needs root)"
            } else {
                "fork"
            },
            source: err,
        });
    }
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; see above.
        unsafe { child::init_main(&ctx) }
    }
    let init = InitGuard {
        pid,
        reaping: plan.reaping,
        reaped: false,
    };
    drop(fds);
    Ok(init)
}

/// What the supervisor took from the pipes.
struct Supervised {
    /// The raw report records.
    report: Vec<u8>,
    /// Whether the step was cancelled through the wake-up pipe.
    cancelled: bool,
}

/// Streams stdout and stderr to `sink` and collects the report until the children close
/// them (or, once the init has reported, until [`OUTPUT_GRACE`] passes); on cancellation
/// kills the init, escalating to SIGKILL if it does not end in time. `pipes` are stdout,
/// stderr, report and the cancellation wake-up, read ends.
fn supervise(
    plan: &Plan,
    init: &mut InitGuard,
    pipes: [&OwnedFd; 4],
    sink: &mut dyn OutputSink,
) -> Result<Supervised, SandboxError> {
    let mut out_lines = LineSplitter::new(OutputStream::Stdout);
    let mut err_lines = LineSplitter::new(OutputStream::Stderr);
    let mut report_bytes: Vec<u8> = Vec::new();
    let mut fds = pipes.map(|fd| pollfd(fd.as_raw_fd()));
    let mut buf = vec![0u8; 64 * 1024];
    let mut stop_reading_at: Option<Instant> = None;
    let mut cancelled = false;
    let mut escalate_at: Option<Instant> = None;
    while fds[..3].iter().any(|p| p.fd >= 0) {
        let now = Instant::now();
        if stop_reading_at.is_some_and(|t| now >= t) {
            break;
        }
        if escalate_at.is_some_and(|t| now >= t) {
            init.kill(libc::SIGKILL);
            escalate_at = None;
        }
        let timeout = [stop_reading_at, escalate_at]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now).as_millis().min(60_000) as c_int + 1)
            .unwrap_or(-1);
        // SAFETY: `fds` is a live array of 4 initialised pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::Os {
                operation: "poll on the step's output",
                source: err,
            });
        }
        for (i, pfd) in fds.iter_mut().enumerate().take(3) {
            if pfd.fd < 0 || pfd.revents == 0 {
                continue;
            }
            match read(pfd.fd, &mut buf) {
                Ok(0) => {
                    pfd.fd = -1;
                    if i == 2 {
                        stop_reading_at = Some(Instant::now() + OUTPUT_GRACE);
                    }
                }
                Ok(n) => match i {
                    0 => out_lines.push(&buf[..n], sink),
                    1 => err_lines.push(&buf[..n], sink),
                    _ => report_bytes.extend_from_slice(&buf[..n]),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => pfd.fd = -1,
            }
        }
        if fds[3].fd >= 0 && fds[3].revents != 0 {
            fds[3].fd = -1;
            cancelled = true;
            match plan.reaping {
                Reaping::PidNamespace => init.kill(libc::SIGKILL),
                Reaping::ProcessTree => {
                    // The init kills the process tree and exits; if it does not within the
                    // grace period, it is killed itself.
                    init.kill(libc::SIGTERM);
                    escalate_at = Some(Instant::now() + OUTPUT_GRACE);
                }
            }
        }
    }
    out_lines.finish(sink);
    err_lines.finish(sink);
    Ok(Supervised {
        report: report_bytes,
        cancelled,
    })
}

/// What the children said over the report pipe.
#[derive(Default)]
struct Report {
    /// The command's wait status, if it ran to its end.
    exited: Option<c_int>,
    /// Whether the init reported a cancellation.
    cancelled: bool,
    /// The first failure reported, as the error `run` returns.
    failure: Option<SandboxError>,
}

impl Report {
    /// Decodes the records; step numbers and setup indices are named from `plan`.
    fn decode(plan: &Plan, bytes: &[u8]) -> Report {
        let mut report = Report::default();
        for chunk in bytes.chunks_exact(std::mem::size_of::<Record>()) {
            let field = |i: usize| {
                let b = &chunk[i * 4..i * 4 + 4];
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
            };
            let (kind, index, value) = (field(0), field(1) as usize, field(2) as i32);
            let errno = io::Error::from_raw_os_error(value);
            let failure = match kind {
                REC_EXITED => {
                    report.exited = Some(value);
                    continue;
                }
                REC_CANCELLED => {
                    report.cancelled = true;
                    continue;
                }
                REC_SETUP_FAILED => SandboxError::Setup {
                    operation: plan
                        .setup
                        .get(index)
                        .map(|s| s.description.clone())
                        .unwrap_or_default(),
                    source: errno,
                },
                REC_COMMAND_FAILED => {
                    let step = COMMAND_STEPS.get(index).copied().unwrap_or("?");
                    let operation = if index == 4 {
                        format!("{step} {:?}", plan.exec.workdir)
                    } else {
                        step.to_string()
                    };
                    SandboxError::Setup {
                        operation,
                        source: errno,
                    }
                }
                REC_EXEC_FAILED => SandboxError::Exec {
                    program: plan.exec.program.clone(),
                    source: errno,
                },
                REC_INIT_FAILED => SandboxError::Setup {
                    operation: INIT_STEPS.get(index).copied().unwrap_or("?").to_string(),
                    source: errno,
                },
                _ => continue,
            };
            report.failure.get_or_insert(failure);
        }
        report
    }
}

/// Owns the init's pid until it is reaped; kills and reaps it if the supervisor leaves early
/// (an error, or a panicking sink), so no step outlives its `run`.
struct InitGuard {
    pid: pid_t,
    reaping: Reaping,
    reaped: bool,
}

impl InitGuard {
    fn kill(&self, signal: c_int) {
        // SAFETY: `pid` is our unreaped child, so the pid cannot have been reused.
        unsafe { libc::kill(self.pid, signal) };
    }

    fn wait(&mut self) -> Result<c_int, SandboxError> {
        let mut status = 0;
        loop {
            // SAFETY: plain waitpid on our own child with a valid out pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                self.reaped = true;
                return Ok(status);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                self.reaped = true;
                return Err(SandboxError::Os {
                    operation: "waitpid for the sandbox init",
                    source: err,
                });
            }
        }
    }
}

impl Drop for InitGuard {
    fn drop(&mut self) {
        if !self.reaped {
            // In in-place mode SIGTERM makes the init kill the tree before it exits; SIGKILL
            // would orphan the step's processes.
            self.kill(match self.reaping {
                Reaping::PidNamespace => libc::SIGKILL,
                Reaping::ProcessTree => libc::SIGTERM,
            });
            let _ = self.wait();
        }
    }
}

fn describe_wait_status(status: c_int) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit status {}", libc::WEXITSTATUS(status))
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A close-on-exec pipe whose ends are numbered 3 or above, so that the command child's
/// `dup2` onto 0, 1 and 2 can never clobber one of them.
fn pipe(what: &'static str) -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(SandboxError::Os {
            operation: what,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(r, what)?, above_stdio(w, what)?))
}

fn above_stdio(fd: OwnedFd, what: &'static str) -> Result<OwnedFd, SandboxError> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(SandboxError::Os {
            operation: what,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fcntl returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl flag manipulation on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn open_dev_null() -> Result<OwnedFd, SandboxError> {
    let file = std::fs::File::open("/dev/null").map_err(|e| SandboxError::io("/dev/null", e))?;
    above_stdio(OwnedFd::from(file), "duplicating /dev/null")
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}
