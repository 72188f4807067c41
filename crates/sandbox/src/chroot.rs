//! Chroot mode: new namespaces and pivot_root into a stage rootfs.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::cancel::CancelToken;
use crate::error::SandboxError;
use crate::output::OutputSink;
use crate::process::{self, Plan, Reaping, Setup, SetupOp};
use crate::rootpath::Stubs;
use crate::step::{extra_mounts, path_cstring, prepare_exec, Network, Step};
use crate::{Mode, RunOutcome, Sandbox};

/// Hostname of the step's UTS namespace unless set otherwise (BuildKit uses a fixed name too,
/// so that builds do not depend on the machine).
pub const DEFAULT_HOSTNAME: &str = "kiln-sandbox";

/// Paths inside the rootfs that chroot mode mounts over for the duration of a step. Where one
/// is missing from the rootfs an empty stub is created before the step and removed after it.
pub const CHROOT_MOUNT_POINTS: [&str; 6] = [
    "/proc",
    "/dev",
    "/sys",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/hostname",
];

/// The capabilities a step keeps in chroot mode unless [`ChrootSandbox::with_all_capabilities`]
/// is used: Docker's default set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID,
/// SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP), so a RUN step
/// can do what it can under Docker and no more (no mount, no ptrace, no module loading).
pub const DOCKER_DEFAULT_CAPABILITIES: u64 = 0xa804_25fb;

/// Host devices bound into the step's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Runs steps in a rootfs directory through new mount, pid, uts and ipc namespaces and
/// pivot_root, with the host's network unless the step asks for none. Needs root
/// (CAP_SYS_ADMIN).
#[derive(Debug, Clone)]
pub struct ChrootSandbox {
    rootfs: PathBuf,
    hostname: String,
    resolv_conf: Option<Vec<u8>>,
    extra_hosts: Vec<(String, String)>,
    all_capabilities: bool,
}

impl ChrootSandbox {
    /// A sandbox for the rootfs directory `rootfs` (made absolute and canonical here).
    pub fn new(rootfs: impl AsRef<Path>) -> Result<Self, SandboxError> {
        let rootfs = rootfs.as_ref();
        let rootfs = rootfs
            .canonicalize()
            .map_err(|e| SandboxError::io(rootfs, e))?;
        if !rootfs.is_dir() {
            return Err(SandboxError::BadPath {
                path: rootfs,
                reason: "the rootfs is not a directory".into(),
            });
        }
        Ok(ChrootSandbox {
            rootfs,
            hostname: DEFAULT_HOSTNAME.to_string(),
            resolv_conf: None,
            extra_hosts: Vec::new(),
            all_capabilities: false,
        })
    }

    /// Sets the hostname the steps see (also in `/etc/hostname` and `/etc/hosts`).
    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = hostname.into();
        self
    }

    /// Sets the content of the step's `/etc/resolv.conf`; by default it is the host's (the
    /// step shares the host's network, so the host's resolvers, even on 127.0.0.53, work).
    pub fn with_resolv_conf(mut self, content: impl Into<Vec<u8>>) -> Self {
        self.resolv_conf = Some(content.into());
        self
    }

    /// Adds `host ip` entries to the step's `/etc/hosts` (`--add-host`).
    pub fn with_extra_host(mut self, host: impl Into<String>, ip: impl Into<String>) -> Self {
        self.extra_hosts.push((host.into(), ip.into()));
        self
    }

    /// Lets steps keep every capability of the caller (like `RUN --security=insecure`)
    /// instead of [`DOCKER_DEFAULT_CAPABILITIES`].
    pub fn with_all_capabilities(mut self) -> Self {
        self.all_capabilities = true;
        self
    }

    /// Writes the generated `/etc` files into `dir`; returns (inside path, host file) pairs.
    fn generate_etc_files(&self, dir: &Path) -> Result<Vec<(&'static str, PathBuf)>, SandboxError> {
        let resolv = match &self.resolv_conf {
            Some(c) => c.clone(),
            None => match std::fs::read("/etc/resolv.conf") {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(SandboxError::io("/etc/resolv.conf", e)),
            },
        };
        let mut hosts = format!(
            "127.0.0.1\tlocalhost {}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            self.hostname
        );
        for (host, ip) in &self.extra_hosts {
            hosts.push_str(&format!("{ip}\t{host}\n"));
        }
        let files = [
            ("/etc/resolv.conf", "resolv.conf", resolv),
            ("/etc/hosts", "hosts", hosts.into_bytes()),
            (
                "/etc/hostname",
                "hostname",
                format!("{}\n", self.hostname).into_bytes(),
            ),
        ];
        let mut out = Vec::new();
        for (inside, name, content) in files {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(|e| SandboxError::io(&path, e))?;
            out.push((inside, path));
        }
        Ok(out)
    }

    fn plan(
        &self,
        step: &Step,
        stubs: &mut Stubs,
        etc_files: &[(&'static str, PathBuf)],
    ) -> Result<Plan, SandboxError> {
        let mut exec = prepare_exec(&self.rootfs, step)?;
        if !self.all_capabilities {
            exec.capabilities = Some(DOCKER_DEFAULT_CAPABILITIES);
        }
        let root = path_cstring(&self.rootfs)?;
        let root_c = CString::new("/").unwrap_or_default();
        let mut setup = vec![
            // Nothing we mount may propagate back to the host's namespace.
            Setup {
                op: mount(None, &root_c, None, libc::MS_REC | libc::MS_PRIVATE, None),
                description: "make all mounts private".into(),
            },
            // pivot_root needs the new root to be a mount point.
            Setup {
                op: SetupOp::Mount {
                    source: Some(root.clone()),
                    target: root.clone(),
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                },
                description: format!("bind mount {} on itself", self.rootfs.display()),
            },
        ];

        let proc_dir = path_cstring(&stubs.dir(Path::new("/proc"))?)?;
        setup.push(Setup {
            op: mount(
                Some("proc"),
                &proc_dir,
                Some("proc"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                None,
            ),
            description: "mount proc on /proc".into(),
        });
        setup.extend(dev_setup(stubs)?);
        let sys = path_cstring(&stubs.dir(Path::new("/sys"))?)?;
        setup.push(Setup {
            op: SetupOp::Sysfs { target: sys },
            description: "mount sysfs read-only on /sys".into(),
        });
        for (inside, generated) in etc_files {
            let target = path_cstring(&stubs.file(Path::new(inside))?)?;
            setup.push(Setup {
                op: SetupOp::Mount {
                    source: Some(path_cstring(generated)?),
                    target,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                description: format!("bind mount the generated {inside}"),
            });
        }

        setup.extend(extra_mounts(stubs, &step.mounts)?);
        setup.push(Setup {
            op: SetupOp::SetHostname(
                CString::new(self.hostname.as_str()).map_err(|_| {
                    SandboxError::InvalidStep("hostname contains a NUL byte".into())
                })?,
            ),
            description: format!("set hostname {:?}", self.hostname),
        });
        let mut namespaces =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if step.network == Network::None {
            namespaces |= libc::CLONE_NEWNET;
            setup.push(Setup {
                op: SetupOp::LoopbackUp { required: true },
                description: "bring up loopback in the step's network namespace".into(),
            });
        }
        setup.push(Setup {
            op: SetupOp::PivotRoot(root),
            description: format!("pivot_root into {}", self.rootfs.display()),
        });

        Ok(Plan {
            namespaces,
            setup,
            reaping: Reaping::PidNamespace,
            exec,
        })
    }
}

/// A `mount(2)` setup operation from plain strings (none of which holds a NUL).
fn mount(
    source: Option<&str>,
    target: &CString,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> SetupOp {
    SetupOp::Mount {
        source: source.map(|s| CString::new(s).unwrap_or_default()),
        target: target.clone(),
        fstype: fstype.map(|s| CString::new(s).unwrap_or_default()),
        flags,
        data: data.map(|s| CString::new(s).unwrap_or_default()),
    }
}

/// The step's own `/dev`: a tmpfs with the host's harmless devices bound in, a private devpts
/// instance, the usual symlinks and a `/dev/shm`, as Docker gives a container.
fn dev_setup(stubs: &mut Stubs) -> Result<Vec<Setup>, SandboxError> {
    let mut setup = Vec::new();
    let mut add = |op: SetupOp, description: String| setup.push(Setup { op, description });
    let dev = stubs.dir(Path::new("/dev"))?;
    let dev_c = path_cstring(&dev)?;
    add(
        mount(
            Some("tmpfs"),
            &dev_c,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        ),
        "mount tmpfs on /dev".into(),
    );
    for name in DEVICES {
        let target = path_cstring(&dev.join(name))?;
        add(
            SetupOp::CreateFile(target.clone()),
            format!("create /dev/{name}"),
        );
        add(
            mount(
                Some(&format!("/dev/{name}")),
                &target,
                None,
                libc::MS_BIND,
                None,
            ),
            format!("bind mount the host's /dev/{name}"),
        );
    }
    let pts = path_cstring(&dev.join("pts"))?;
    add(SetupOp::Mkdir(pts.clone()), "create /dev/pts".into());
    add(
        mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        "mount devpts on /dev/pts".into(),
    );
    for (target, link) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        add(
            SetupOp::Symlink {
                target: CString::new(target).unwrap_or_default(),
                link: path_cstring(&dev.join(link))?,
            },
            format!("create the /dev/{link} symlink"),
        );
    }
    let shm = path_cstring(&dev.join("shm"))?;
    add(SetupOp::Mkdir(shm.clone()), "create /dev/shm".into());
    add(
        mount(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        ),
        "mount tmpfs on /dev/shm".into(),
    );
    Ok(setup)
}

impl Sandbox for ChrootSandbox {
    fn mode(&self) -> Mode {
        Mode::Chroot
    }

    fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    fn mounts_available(&self) -> bool {
        true
    }

    fn isolates_network(&self) -> bool {
        true
    }

    fn run(
        &self,
        step: &Step,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
    ) -> Result<RunOutcome, SandboxError> {
        if cancel.is_cancelled() {
            return Err(SandboxError::Cancelled);
        }
        let scratch = tempfile::Builder::new()
            .prefix("kiln-sandbox-")
            .tempdir()
            .map_err(|e| SandboxError::io(std::env::temp_dir(), e))?;
        let etc_files = self.generate_etc_files(scratch.path())?;
        let mut stubs = Stubs::new(&self.rootfs)?;
        let result = self
            .plan(step, &mut stubs, &etc_files)
            .and_then(|plan| process::run(&plan, sink, cancel));
        // The step's namespace is gone by now, so no stub is still a mount point.
        let restored_dirs = stubs.remove();
        result.map(|status| RunOutcome {
            status,
            restored_dirs,
        })
    }
}
