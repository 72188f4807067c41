//! The mkdir operation (WORKDIR): creates a directory and its missing parents, owned by the
//! config's user with mode 0755 (BuildKit's rule), and may make it the working directory.
//! An existing directory gives no layer.

use std::path::{Path, PathBuf};

use kiln_cache::{MkdirInput, StepInput};
use kiln_oci::image::ContainerConfig;
use kiln_plan::Mkdir;

use super::copy::tree::{self, clean_relative, CopyError};

fn working_dir(config: &ContainerConfig) -> &str {
    config
        .working_dir
        .as_deref()
        .filter(|w| !w.is_empty())
        .unwrap_or("/")
}

/// The directory `op` names, relative to the root, as seen from the working directory of
/// `config` (the config before the step).
pub(crate) fn target(op: &Mkdir, config: &ContainerConfig) -> PathBuf {
    clean_relative(&Path::new("/").join(working_dir(config)).join(&op.path))
}

/// The step's key input: the directory as written, and the working directory and user it is
/// resolved against and owned by.
pub(crate) fn key_input(op: &Mkdir, config: &ContainerConfig) -> StepInput {
    StepInput::Mkdir(MkdirInput {
        path: op.path.clone(),
        set_working_dir: op.set_working_dir,
        workdir: working_dir(config).to_owned(),
        user: config.user.clone().unwrap_or_default(),
    })
}

/// Makes the directory the working directory, when the operation says so.
pub(crate) fn edit_config(op: &Mkdir, config: &mut ContainerConfig) {
    if op.set_working_dir {
        let rel = target(op, config);
        config.working_dir = Some(format!("/{}", rel.display()));
    }
}

/// Whether `rel` (from [`target`]) is already a directory in `rootfs` (symlinks followed inside
/// it), so that nothing is to be made and the owner need not be looked up.
pub(crate) fn exists(rootfs: &Path, rel: &Path) -> bool {
    rel.as_os_str().is_empty()
        || kiln_fs::resolve::Root::open(rootfs)
            .and_then(|root| root.metadata(rel))
            .is_ok_and(|meta| meta.is_dir())
}

/// Creates `rel` (from [`target`]) and its missing parents in `rootfs`, owned by `uid:gid`;
/// returns the directories created, as resolved inside the rootfs.
pub(crate) fn execute(
    rootfs: &Path,
    rel: &Path,
    uid: u32,
    gid: u32,
) -> Result<Vec<PathBuf>, CopyError> {
    tree::make_dirs(rootfs, rel, uid, gid)
}
