//! In-place mode: the rootfs is `/` of the container Kiln runs in.

use std::ffi::CString;
use std::path::Path;

use crate::cancel::CancelToken;
use crate::error::SandboxError;
use crate::output::OutputSink;
use crate::process::{self, Plan, Reaping, Setup, SetupOp};
use crate::rootpath::Stubs;
use crate::step::{extra_mounts, prepare_exec, Step};
use crate::{Mode, RunOutcome, Sandbox};

/// Runs steps directly in the current container (as kaniko does): no namespaces, the step's
/// processes in a new session under a child-subreaper init that kills the whole tree when the
/// step's command exits. Needs a root user in the container for USER switching (CAP_SETUID,
/// CAP_SETGID, and CAP_CHOWN for a new WORKDIR); [`crate::MountSpec`]s additionally need
/// CAP_SYS_ADMIN, which a default Pod does not grant.
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
        let mut stubs = Stubs::new(root);
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
    Ok(Plan {
        namespaces: 0,
        setup,
        reaping: Reaping::ProcessTree,
        exec,
    })
}
