//! Removing a finished build's work dir off the critical path. A build that ran steps leaves
//! a tree of thousands of files (a stage's upper dir, copies, unpacked images); deleting them
//! costs a few hundred milliseconds on these disks, which the user would wait for after the
//! image is already pushed. So the work dir is renamed (one rename) and deleted by a
//! background thread at the lowest priority. A process that exits first leaves the
//! rest, and the next build with the same kiln dir sweeps it the same way.
//!
//! A tree being deleted is named after the process deleting it, so builds sharing a kiln dir
//! never delete one tree twice, and a tree whose process is gone is claimed again (by a
//! rename, which only one build can win) and deleted by the build that claimed it.
//!
//! Work dirs are named after their build's process too (`build-PID-…`): a build killed with
//! SIGKILL leaves its work dir, and the stage rootfs mounted in it, behind. The next sweep
//! unmounts what is mounted under such a dir and claims it like a half-deleted tree; a dir
//! with a mount that would not go is left alone, so nothing is ever deleted through a mount.

use std::path::{Path, PathBuf};

const CLAIM_PREFIX: &str = "removing-";
/// How a work dir's name starts; the owner's process id and a random part follow.
const WORK_PREFIX: &str = "build-";

/// The prefix of this process's work dirs (`build-PID-`), for the sweep to tell whose they are.
pub(crate) fn work_dir_prefix() -> String {
    format!("{WORK_PREFIX}{}-", std::process::id())
}

/// Moves `work_dir` (inside `work_root`) into the trash and deletes it in the background.
/// Falls back to deleting it here when it cannot be renamed.
pub(crate) fn discard(work_root: &Path, work_dir: PathBuf) {
    let Some(name) = work_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return;
    };
    let claimed = work_root.join(format!("{CLAIM_PREFIX}{}-{name}", std::process::id()));
    if std::fs::rename(&work_dir, &claimed).is_err() {
        let _ = std::fs::remove_dir_all(&work_dir);
        return;
    }
    spawn_removal(vec![claimed]);
}

/// Claims what builds whose processes are gone left half-deleted in `work_root` and deletes
/// it in the background.
pub(crate) fn sweep(work_root: &Path) {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    let mut claimed = Vec::new();
    let mut mounts: Option<Vec<PathBuf>> = None;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = claim_owner(&name).or_else(|| work_dir_owner(&name));
        let abandoned = owner.is_some_and(|pid| !kiln_fs::trees::process_alive(pid));
        if !abandoned {
            continue;
        }
        let mounts = mounts.get_or_insert_with(mount_points);
        if !unmount_under(&entry.path(), mounts) {
            continue;
        }
        let target = work_root.join(format!(
            "{CLAIM_PREFIX}{}-{}",
            std::process::id(),
            unclaimed_name(&name)
        ));
        // Losing the race to another build's sweep is fine: that build deletes it.
        if std::fs::rename(entry.path(), &target).is_ok() {
            claimed.push(target);
        }
    }
    if !claimed.is_empty() {
        spawn_removal(claimed);
    }
}

/// The process id in a claimed entry's name.
fn claim_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(CLAIM_PREFIX)?;
    rest.split('-').next()?.parse().ok()
}

/// The process id in a work dir's name (`build-PID-…`).
fn work_dir_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(WORK_PREFIX)?;
    rest.split('-').next()?.parse().ok()
}

/// Every mount point of this process's mount namespace, as `/proc/self/mountinfo` lists them.
fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or under `dir`, deepest first. True when none is left; false when
/// one would not go (the dir must then not be deleted: that would reach into the mount).
fn unmount_under(dir: &Path, mounts: &[PathBuf]) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut under: Vec<&PathBuf> = mounts.iter().filter(|m| m.starts_with(&dir)).collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    under.dedup();
    under.into_iter().all(|mount| {
        rustix::mount::unmount(mount, rustix::mount::UnmountFlags::DETACH).is_ok()
            // Already gone (an earlier entry of a stacked mount took it along).
            || !mount_points().contains(mount)
    })
}

/// The name of an entry without its claim, so a taken-over claim does not grow.
fn unclaimed_name(name: &str) -> &str {
    match name.strip_prefix(CLAIM_PREFIX) {
        Some(rest) => rest.split_once('-').map_or(rest, |(_, name)| name),
        None => name,
    }
}

fn spawn_removal(trees: Vec<PathBuf>) {
    let spawned = std::thread::Builder::new()
        .name("kiln-trash".into())
        .spawn(move || {
            lower_priority();
            for tree in trees {
                let _ = std::fs::remove_dir_all(&tree);
            }
        });
    // Without a thread to spare the trees stay claimed, and the next build's sweep takes them
    // once this process is gone.
    drop(spawned);
}

/// Makes the calling thread the last to get the CPU (and, with the kernel's default I/O
/// priorities, which follow the CPU's, the disk), so deleting a tree does not slow the build
/// that runs beside it. On Linux the process priority call with no pid sets the calling
/// thread's.
fn lower_priority() {
    let _ = rustix::process::setpriority_process(None, 19);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_name_their_process_and_keep_the_original_name() {
        assert_eq!(claim_owner("removing-42-build-abc"), Some(42));
        assert_eq!(claim_owner("build-abc"), None);
        assert_eq!(unclaimed_name("removing-42-build-abc"), "build-abc");
        assert_eq!(unclaimed_name("build-abc"), "build-abc");
        assert_eq!(work_dir_owner("build-42-abc"), Some(42));
        assert_eq!(work_dir_owner("build-abc"), None);
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
    }

    #[test]
    fn a_sweep_deletes_abandoned_trees_and_spares_live_ones() {
        let root = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir_all(dir.join("a/b")).unwrap();
            std::fs::write(dir.join("a/b/f"), b"x").unwrap();
        };
        // pid 0x7fffffff is never a live process; our own pid is.
        make("removing-2147483647-build-dead");
        make(&format!("removing-{}-build-live", std::process::id()));
        make("removing-2147483647-build-dead-too");
        make("build-running");
        make("build-2147483647-killed");
        make(&format!("build-{}-live", std::process::id()));
        sweep(root.path());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let names = || -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(root.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        while names().len() > 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            names(),
            [
                format!("build-{}-live", std::process::id()),
                "build-running".to_owned(),
                format!("removing-{}-build-live", std::process::id())
            ]
        );
    }
}
