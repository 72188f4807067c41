//! The code that runs in the cloned children (the init and the command), apart from the
//! supervisor because it lives under different rules: only async-signal-safe calls, no
//! allocation, no panics, no return (see the parent module's comment).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;

use libc::{c_char, c_int, c_ulong, pid_t};

use super::{
    ChildContext, Reaping, Record, SetupOp, REC_CANCELLED, REC_COMMAND_FAILED, REC_EXEC_FAILED,
    REC_EXITED, REC_INIT_FAILED, REC_SETUP_FAILED,
};

/// `clone(2)` used like `fork(2)`: returns 0 in the child, the child's pid in the parent.
///
/// # Safety
/// The child may only perform async-signal-safe operations and must end in `_exit`/`execve`.
pub(super) unsafe fn raw_clone(namespaces: c_int) -> pid_t {
    let flags = (namespaces | libc::SIGCHLD) as c_ulong;
    // SAFETY: without CLONE_VM and with a null stack the kernel gives the child a copy of our
    // memory and stack, exactly as fork does; the caller upholds the child's restrictions.
    unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) as pid_t }
}

fn errno() -> c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes one record to the report pipe; false if the supervisor is gone.
fn report(fd: RawFd, kind: u32, index: usize, value: c_int) -> bool {
    let rec = Record {
        kind,
        index: index as u32,
        value,
        _pad: 0,
    };
    // SAFETY: writes the bytes of a live, plain-old-data local.
    let n = unsafe {
        libc::write(
            fd,
            (&rec as *const Record).cast(),
            std::mem::size_of::<Record>(),
        )
    };
    n == std::mem::size_of::<Record>() as isize
}

fn exit(code: c_int) -> ! {
    // SAFETY: _exit is async-signal-safe and skips atexit handlers and destructors, which
    // belong to the parent.
    unsafe { libc::_exit(code) }
}

/// Closes every fd from 3 up except those in `keep` (sorted).
fn close_fds_except(keep: &[RawFd]) {
    let mut from: u32 = 3;
    for &fd in keep {
        let fd = fd as u32;
        if fd > from {
            close_range(from, fd - 1);
        }
        if fd >= from {
            from = fd + 1;
        }
    }
    close_range(from, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes fds; in a child that owns nothing else that is what we want.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r < 0 {
        // Kernels before 5.9: close one by one up to a sane bound.
        let last = last.min(65_535);
        for fd in first..=last {
            // SAFETY: closing an fd number; EBADF for unused numbers is harmless.
            unsafe { libc::close(fd as c_int) };
        }
    }
}

/// The init: setup, start the command, reap, report. Never returns.
///
/// # Safety
/// Only to be called in the child of [`raw_clone`].
pub(super) unsafe fn init_main(ctx: &ChildContext<'_>) -> ! {
    // SAFETY: the whole function makes only async-signal-safe libc calls on data prepared
    // before the clone; pointers come from CStrings and arrays that live in this copy of the
    // address space.
    unsafe {
        // All signals are blocked: the ones we care about are taken with sigwaitinfo below, and
        // SIGINT/SIGTERM aimed at the supervisor's process group must not kill the init before it
        // has cleaned up.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        // An embedding program that ignores SIGCHLD would make the kernel reap our children
        // before we can read their status.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        close_fds_except(&ctx.init_keep);
        // A recognisable name in `ps` inside the step instead of the embedding program's.
        libc::prctl(libc::PR_SET_NAME, c"kiln-init".as_ptr() as c_ulong, 0, 0, 0);
        // Die with the supervising thread. In chroot mode SIGKILL to pid 1 takes the whole
        // namespace with it; in in-place mode SIGTERM makes the init kill the tree first.
        let death_signal = match ctx.plan.reaping {
            Reaping::PidNamespace => libc::SIGKILL,
            Reaping::ProcessTree => libc::SIGTERM,
        };
        libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as c_ulong, 0, 0, 0);
        if ctx.plan.reaping == Reaping::ProcessTree {
            if libc::getppid() != ctx.supervisor {
                exit(1);
            }
            // Orphans of the step are re-parented to us rather than to the container's init,
            // so that they can be found and killed.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as c_ulong, 0, 0, 0);
        }

        for (index, setup) in ctx.plan.setup.iter().enumerate() {
            if !run_setup(&setup.op) {
                report(ctx.report, REC_SETUP_FAILED, index, errno());
                exit(1);
            }
        }

        let command = raw_clone(0);
        if command < 0 {
            report(ctx.report, REC_INIT_FAILED, 0, errno());
            exit(1);
        }
        if command == 0 {
            command_main(ctx);
        }
        libc::close(ctx.stdin);
        libc::close(ctx.stdout);
        libc::close(ctx.stderr);

        let mut wanted: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut wanted);
        libc::sigaddset(&mut wanted, libc::SIGCHLD);
        libc::sigaddset(&mut wanted, libc::SIGTERM);
        let mut command_status: Option<c_int> = None;
        let mut cancelled = false;
        while command_status.is_none() && !cancelled {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&wanted, &mut info);
            if sig == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if pid <= 0 {
                        break;
                    }
                    if pid == command {
                        command_status = Some(status);
                    }
                }
            } else if sig == libc::SIGTERM {
                // Only the supervisor (or its death) cancels; a step's own `kill -TERM $PPID`
                // must not.
                cancelled = ctx.plan.reaping == Reaping::ProcessTree
                    && (info.si_pid() == ctx.supervisor || libc::getppid() != ctx.supervisor);
            } else if sig < 0 && errno() != libc::EINTR {
                report(ctx.report, REC_INIT_FAILED, 1, errno());
                break;
            }
        }
        if ctx.plan.reaping == Reaping::ProcessTree {
            kill_tree(command);
        }
        match command_status {
            Some(status) if !cancelled => report(ctx.report, REC_EXITED, 0, status),
            _ => report(ctx.report, REC_CANCELLED, 0, 0),
        };
        exit(0)
    }
}

/// One setup operation; false with errno set on failure.
///
/// # Safety
/// Only in the init child.
unsafe fn run_setup(op: &SetupOp) -> bool {
    fn opt_ptr(s: &Option<CString>) -> *const c_char {
        s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
    }
    // SAFETY: async-signal-safe system calls on C strings prepared before the clone.
    unsafe {
        match op {
            SetupOp::Unshare(flags) => libc::unshare(*flags) == 0,
            SetupOp::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                libc::mount(
                    opt_ptr(source),
                    target.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                ) == 0
            }
            SetupOp::Sysfs { target } => {
                let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                let sysfs = c"sysfs".as_ptr();
                if libc::mount(sysfs, target.as_ptr(), sysfs, flags, std::ptr::null()) == 0 {
                    return true;
                }
                libc::mount(
                    c"/sys".as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) == 0
                    && libc::mount(
                        std::ptr::null(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | flags,
                        std::ptr::null(),
                    ) == 0
            }
            SetupOp::CreateFile(path) => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                );
                fd >= 0 && libc::close(fd) == 0
            }
            SetupOp::Mkdir(path) => libc::mkdir(path.as_ptr(), 0o755) == 0,
            SetupOp::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()) == 0,
            SetupOp::SetHostname(name) => {
                libc::sethostname(name.as_ptr(), name.as_bytes().len()) == 0
            }
            SetupOp::PivotRoot(new_root) => pivot_root(new_root),
            SetupOp::LoopbackUp { required } => loopback_up() || !required,
        }
    }
}

/// `ip link set lo up` through the interface-flags ioctls.
///
/// # Safety
/// Only in the init child.
unsafe fn loopback_up() -> bool {
    // SAFETY: a socket and two ioctls on a zeroed, NUL-terminated `ifreq`.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return false;
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as c_char;
        }
        let up = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut request) == 0 && {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &request) == 0
        };
        // The ioctl's errno, not close's, is the failure to report.
        let saved = errno();
        libc::close(sock);
        *libc::__errno_location() = saved;
        up
    }
}

/// # Safety
/// Only in the init child, in its own mount namespace.
unsafe fn pivot_root(new_root: &CStr) -> bool {
    // SAFETY: system calls on valid C strings, in a private mount namespace.
    unsafe {
        let dot = c".".as_ptr();
        let old_root = libc::open(
            c"/".as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if old_root < 0 || libc::chdir(new_root.as_ptr()) != 0 {
            return false;
        }
        // With "." as both arguments the old root ends up stacked on top of the new one, so the
        // rootfs needs no directory to hold it.
        if libc::syscall(libc::SYS_pivot_root, dot, dot) != 0 {
            return false;
        }
        if libc::fchdir(old_root) != 0 {
            return false;
        }
        // Keep the unmount below from propagating anywhere (the namespace is already private;
        // this is belt and braces for mounts the pivot moved).
        if libc::mount(
            std::ptr::null(),
            dot,
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return false;
        }
        if libc::umount2(dot, libc::MNT_DETACH) != 0 {
            return false;
        }
        libc::close(old_root);
        libc::chdir(c"/".as_ptr()) == 0
    }
}

/// The command child: session, signals, stdio, identity, cwd, exec. Never returns.
///
/// # Safety
/// Only in the child the init cloned.
unsafe fn command_main(ctx: &ChildContext<'_>) -> ! {
    let fail = |step: usize| -> ! {
        report(ctx.report, REC_COMMAND_FAILED, step, errno());
        exit(127)
    };
    // SAFETY: the whole function makes only async-signal-safe system calls on data prepared
    // before the clone; user switching uses raw system calls (see the parent module's comment).
    unsafe {
        libc::setsid();
        // Dispositions set to "ignore" survive exec (Rust programs ignore SIGPIPE); a step must
        // start with the defaults and nothing blocked, as under Docker.
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::dup2(ctx.stdin, 0) < 0
            || libc::dup2(ctx.stdout, 1) < 0
            || libc::dup2(ctx.stderr, 2) < 0
        {
            fail(0);
        }
        close_fds_except(&[ctx.report]);
        libc::umask(0o022);
        let keep = ctx.plan.exec.capabilities;
        if let Some(keep) = keep {
            for cap in 0..64u64 {
                if keep & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) != 0
                    && errno() != libc::EINVAL
                {
                    // EINVAL: a capability number beyond what this kernel knows.
                    fail(5);
                }
            }
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
                0,
                0,
                0,
            );
        }
        if let Some((uid, gid, _)) = &ctx.plan.exec.user {
            if libc::syscall(libc::SYS_setgroups, ctx.groups.len(), ctx.groups.as_ptr()) != 0 {
                fail(1);
            }
            if libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) != 0 {
                fail(2);
            }
            if libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) != 0 {
                fail(3);
            }
        }
        if libc::chdir(ctx.plan.exec.workdir.as_ptr()) != 0 {
            fail(4);
        }
        // A non-root uid lost all capabilities with setresuid; root keeps only `keep`.
        if let Some(keep) = keep.filter(|_| libc::geteuid() == 0) {
            if !set_capabilities(keep) {
                fail(6);
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        let mut saw_eacces = false;
        let mut last = libc::ENOENT;
        for candidate in &ctx.plan.exec.candidates {
            libc::execve(candidate.as_ptr(), ctx.argv.as_ptr(), ctx.envp.as_ptr());
            last = errno();
            match last {
                libc::EACCES => saw_eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG => {}
                // Anything else (ENOEXEC, E2BIG, ...) is about this program: stop searching.
                _ => break,
            }
        }
        let errno = if saw_eacces && last == libc::ENOENT {
            libc::EACCES
        } else {
            last
        };
        report(ctx.report, REC_EXEC_FAILED, 0, errno);
        exit(127)
    }
}

/// Sets the permitted and effective capabilities to `keep` and the inheritable ones to none
/// (as Docker does since the CVE-2022-24769 fix), with the raw `capset` call.
fn set_capabilities(keep: u64) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let word = |shift: u32| Data {
        effective: (keep >> shift) as u32,
        permitted: (keep >> shift) as u32,
        inheritable: 0,
    };
    let data = [word(0), word(32)];
    // SAFETY: capset reads a version-3 header and two data structs from live locals.
    unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) == 0 }
}

/// Kills the command's process group and every process re-parented to this subreaper, until
/// none is left. Without `/proc` only the process group can be found.
fn kill_tree(group: pid_t) {
    // SAFETY: kill and waitpid with plain integer arguments.
    unsafe {
        loop {
            libc::kill(-group, libc::SIGKILL);
            let scanned = kill_children();
            let options = if scanned { 0 } else { libc::WNOHANG };
            let r = libc::waitpid(-1, std::ptr::null_mut(), options);
            if r > 0 {
                continue;
            }
            if r < 0 && errno() == libc::EINTR {
                continue;
            }
            break;
        }
    }
}

/// SIGKILLs every process whose parent is this process, found by reading `/proc/*/stat` with
/// stack buffers. Returns false if `/proc` cannot be read.
fn kill_children() -> bool {
    // SAFETY: open/getdents64/read/close/kill on stack buffers; getpid has no preconditions.
    unsafe {
        let me = libc::getpid();
        let dir = libc::open(
            c"/proc".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name[].
                let reclen = match buf.get(off + 16..off + 18) {
                    Some(b) => u16::from_ne_bytes([b[0], b[1]]) as usize,
                    None => break,
                };
                if reclen == 0 {
                    break;
                }
                let name = buf.get(off + 19..off + reclen).unwrap_or(&[]);
                if let Some(pid) = parse_pid(name) {
                    if parent_of(pid) == Some(me) {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                off += reclen;
            }
        }
        libc::close(dir);
        true
    }
}

/// The leading all-digit part of a NUL-terminated name, if it is a pid.
fn parse_pid(name: &[u8]) -> Option<pid_t> {
    let mut pid: pid_t = 0;
    let mut digits = 0;
    for &b in name {
        match b {
            0 => break,
            b'0'..=b'9' => {
                pid = pid.checked_mul(10)?.checked_add((b - b'0') as pid_t)?;
                digits += 1;
            }
            _ => return None,
        }
    }
    (digits > 0).then_some(pid)
}

/// The parent pid from `/proc/PID/stat` (the field after the parenthesised command name).
fn parent_of(pid: pid_t) -> Option<pid_t> {
    let mut path = [0u8; 32];
    let mut len = 0;
    for &b in b"/proc/" {
        *path.get_mut(len)? = b;
        len += 1;
    }
    let mut digits = [0u8; 12];
    let mut n = pid;
    let mut count = 0;
    loop {
        *digits.get_mut(count)? = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in (0..count).rev() {
        *path.get_mut(len)? = digits[i];
        len += 1;
    }
    for &b in b"/stat\0" {
        *path.get_mut(len)? = b;
        len += 1;
    }
    let mut stat = [0u8; 1024];
    // SAFETY: `path` is NUL-terminated; `stat` is a live buffer of its length.
    let read = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let r = libc::read(fd, stat.as_mut_ptr().cast(), stat.len());
        libc::close(fd);
        r
    };
    if read <= 0 {
        return None;
    }
    let stat = stat.get(..read as usize)?;
    let close_paren = stat.iter().rposition(|&b| b == b')')?;
    // ") S PPID ..."
    let rest = stat.get(close_paren + 4..)?;
    let mut ppid: pid_t = 0;
    let mut seen = false;
    for &b in rest {
        match b {
            b'0'..=b'9' => {
                ppid = ppid.checked_mul(10)?.checked_add((b - b'0') as pid_t)?;
                seen = true;
            }
            _ => break,
        }
    }
    seen.then_some(ppid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_entries() {
        assert_eq!(parse_pid(b"1234\0junk"), Some(1234));
        assert_eq!(parse_pid(b"self\0"), None);
        assert_eq!(parse_pid(b"\0"), None);
        // SAFETY: getpid/getppid have no preconditions.
        let (me, parent) = unsafe { (libc::getpid(), libc::getppid()) };
        assert_eq!(parent_of(me), Some(parent));
    }
}
