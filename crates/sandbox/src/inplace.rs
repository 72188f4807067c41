//! In-place mode: the rootfs is `/` of the container Kiln runs in.

use std::ffi::CString;
use std::path::Path;

use crate::cancel::CancelToken;
use crate::error::SandboxError;
use crate::output::OutputSink;
use crate::process::{self, Plan, Reaping, Setup, SetupOp};
use crate::rootpath::Stubs;
use crate::step::{extra_mounts, prepare_exec, Network, Step};
use crate::{Mode, RunOutcome, Sandbox};

/// Runs steps directly in the current container (as kaniko does): no namespaces, the step's
/// processes in a new session under a child-subreaper init that kills the whole tree when the
/// step's command exits. Needs a root user in the container for USER switching (CAP_SETUID,
/// CAP_SETGID, and CAP_CHOWN for a new WORKDIR); [`crate::MountSpec`]s and
/// [`Network::None`] additionally need CAP_SYS_ADMIN, which a default Pod does not grant (and
/// the loopback of a step without network is up only with CAP_NET_ADMIN too).
#[derive(Debug, Clone, Default)]
pub struct InPlaceSandbox {
    _private: (),
}

impl InPlaceSandbox {
    /// The in-place sandbox (its rootfs is always `/`).
    pub fn new() -> Self {
        Self::default()
    }
}

impl Sandbox for InPlaceSandbox {
    fn mode(&self) -> Mode {
        Mode::InPlace
    }

    fn rootfs(&self) -> &Path {
        Path::new("/")
    }

    fn isolates_network(&self) -> bool {
        crate::has_sys_admin()
    }

    fn mounts_available(&self) -> bool {
        crate::has_sys_admin()
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
        let root = Path::new("/");
        let mut stubs = Stubs::new(root)?;
        let result =
            plan(root, step, &mut stubs).and_then(|plan| process::run(&plan, sink, cancel));
        let restored_dirs = stubs.remove();
        result.map(|status| RunOutcome {
            status,
            restored_dirs,
        })
    }
}

fn plan(root: &Path, step: &Step, stubs: &mut Stubs) -> Result<Plan, SandboxError> {
    let exec = prepare_exec(root, step)?;
    let mut setup = Vec::new();
    if !step.mounts.is_empty() {
        // The step's mounts go into a mount namespace of its own, so they vanish with it.
        setup.push(Setup {
            op: SetupOp::Unshare(libc::CLONE_NEWNS),
            description: "unshare the mount namespace for RUN --mount (needs CAP_SYS_ADMIN)".into(),
        });
        setup.push(Setup {
            op: SetupOp::Mount {
                source: None,
                target: CString::from(c"/"),
                fstype: None,
                flags: libc::MS_REC | libc::MS_PRIVATE,
                data: None,
            },
            description: "make all mounts private".into(),
        });
        setup.extend(extra_mounts(stubs, &step.mounts)?);
    }
    if step.network == Network::None {
        setup.push(Setup {
            op: SetupOp::Unshare(libc::CLONE_NEWNET),
            description:
                "unshare the network namespace for RUN --network=none (needs CAP_SYS_ADMIN)".into(),
        });
        // Without CAP_NET_ADMIN the loopback stays down: the step is still cut off, which is
        // what it asked for, and only loses 127.0.0.1 for itself.
        setup.push(Setup {
            op: SetupOp::LoopbackUp { required: false },
            description: "bring up loopback in the step's network namespace".into(),
        });
    }
    Ok(Plan {
        namespaces: 0,
        setup,
        reaping: Reaping::ProcessTree,
        exec,
    })
}

/// Whether a `/proc/PID/status` text shows CAP_SYS_ADMIN (bit 21) among the effective
/// capabilities, which creating a namespace needs.
pub(crate) fn has_sys_admin_in(status: &str) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::has_sys_admin_in as has_sys_admin;

    #[test]
    fn sys_admin_is_read_from_the_effective_set() {
        // Docker's and a default Pod's set: no CAP_SYS_ADMIN.
        assert!(!has_sys_admin(
            "CapInh:\t0000000000000000\nCapEff:\t00000000a80425fb\n"
        ));
        assert!(has_sys_admin("CapEff:\t000001ffffffffff\n"));
        assert!(has_sys_admin("CapEff:\t0000000000200000\n"));
        assert!(!has_sys_admin("CapPrm:\t000001ffffffffff\n"));
        assert!(!has_sys_admin(""));
    }
}
