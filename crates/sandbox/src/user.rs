//! USER resolution against the rootfs's own `/etc/passwd` and `/etc/group`.
//!
//! The files are parsed here rather than through NSS: the host's NSS configuration describes the
//! host, not the image, and a static Kiln binary has no NSS at all. The rules follow what Docker
//! (through runc's user lookup) does:
//! - `name` or `uid`, optionally `:group` or `:gid`;
//! - a name must be in passwd; a numeric uid need not be (gid 0 and HOME `/` then);
//! - without an explicit group, the primary group comes from passwd and the supplementary
//!   groups are the groups of `/etc/group` that list the user by name;
//! - with an explicit group, that group is the primary one and there are no supplementary ones.

use std::path::Path;

use crate::error::SandboxError;
use kiln_fs::resolve::Root;

/// Largest id Docker accepts in a USER spec.
const MAX_ID: u64 = i32::MAX as u64;

/// The identity a step runs as, resolved from a USER spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// Real, effective and saved uid.
    pub uid: u32,
    /// Real, effective and saved gid.
    pub gid: u32,
    /// The groups `/etc/group` lists the user in; may be empty. A step's `setgroups` list is
    /// the primary group followed by these.
    pub supplementary_gids: Vec<u32>,
    /// Home directory from passwd, `/` when the user has no entry; used for HOME if unset.
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves a USER spec (`""` means root) against `rootfs/etc/passwd` and `rootfs/etc/group`.
/// Symlinks in those paths are resolved inside `rootfs`, never on the host.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<ResolvedUser, SandboxError> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (spec, None),
    };
    let uid_arg = parse_id(user_arg, "uid", spec)?;
    let gid_arg = match group_arg {
        Some(g) => parse_id(g, "gid", spec)?,
        None => None,
    };

    let root = Root::open(rootfs)?;
    let passwd_path = rootfs.join("etc/passwd");
    let passwd = read_optional(&root, "etc/passwd")?;
    let entries = parse_passwd(&passwd);
    let matched = entries.into_iter().find(|e| {
        if user_arg.is_empty() {
            e.uid == 0
        } else if let Some(uid) = uid_arg {
            e.uid == uid
        } else {
            e.name == user_arg
        }
    });

    let mut user = ResolvedUser {
        uid: 0,
        gid: 0,
        supplementary_gids: Vec::new(),
        home: "/".to_string(),
    };
    let mut matched_name = None;
    match matched {
        Some(e) => {
            user.uid = e.uid;
            user.gid = e.gid;
            user.home = e.home;
            matched_name = Some(e.name);
        }
        None if user_arg.is_empty() => {}
        None => match uid_arg {
            Some(uid) => user.uid = uid,
            None => {
                return Err(SandboxError::UnknownUser {
                    user: user_arg.to_string(),
                    path: passwd_path.clone(),
                })
            }
        },
    }

    if group_arg.is_none() && matched_name.is_none() {
        return Ok(user);
    }
    let group_path = rootfs.join("etc/group");
    let groups = parse_group(&read_optional(&root, "etc/group")?);
    match group_arg {
        Some(group) => {
            let found = groups.iter().find(|g| match gid_arg {
                Some(gid) => g.gid == gid,
                None => g.name == group,
            });
            user.gid = match (found, gid_arg) {
                (Some(g), _) => g.gid,
                (None, Some(gid)) => gid,
                (None, None) => {
                    return Err(SandboxError::UnknownGroup {
                        group: group.to_string(),
                        path: group_path.clone(),
                    })
                }
            };
        }
        None => {
            let name = matched_name.unwrap_or_default();
            user.supplementary_gids = groups
                .iter()
                .filter(|g| g.members.contains(&name))
                .map(|g| g.gid)
                .collect();
        }
    }
    Ok(user)
}

/// `Some(id)` if `s` is all digits, `None` if it is a name; an error if the number is too big.
fn parse_id(s: &str, what: &'static str, spec: &str) -> Result<Option<u32>, SandboxError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let value: u64 = s.parse().unwrap_or(u64::MAX);
    if value > MAX_ID {
        return Err(SandboxError::IdOutOfRange {
            what,
            value,
            spec: spec.to_string(),
        });
    }
    Ok(Some(value as u32))
}

/// The file's text, or empty if it does not exist (an image without passwd can still run as a
/// numeric uid, as with Docker).
/// The file `rel` of the rootfs (symlinks followed inside it), or nothing if it is missing.
fn read_optional(root: &Root, rel: &str) -> Result<String, SandboxError> {
    let mut file = match root.open_file(rel) {
        Ok(file) => file,
        Err(e) if e.is_not_found() => return Ok(String::new()),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .map_err(|e| SandboxError::io(root.path().join(rel), e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Lines that are blank, comments or malformed (too few fields, non-numeric ids, NIS `+`
/// entries) are skipped, as the C library does.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: f.get(5).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "# comment\nroot:x:0:0:root:/root:/bin/sh\nkiln:x:1000:1000::/home/kiln:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nkiln:x:1000:\nbuilders:x:2000:kiln,other\nwheel:x:10:other\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn name_gets_primary_and_supplementary_groups() {
        let r = root();
        let u = resolve_user(r.path(), "kiln").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.supplementary_gids, vec![2000]);
        assert_eq!(u.home, "/home/kiln");
    }

    #[test]
    fn explicit_group_replaces_supplementary_groups() {
        let r = root();
        let u = resolve_user(r.path(), "kiln:wheel").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        assert!(u.supplementary_gids.is_empty());
        let u = resolve_user(r.path(), "1000:4242").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 4242));
    }

    #[test]
    fn unknown_numeric_uid_is_allowed_with_defaults() {
        let r = root();
        let u = resolve_user(r.path(), "4321").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4321, 0, "/"));
        let u = resolve_user(r.path(), "").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn unknown_names_are_errors_naming_the_file() {
        let r = root();
        let e = resolve_user(r.path(), "nobody").unwrap_err().to_string();
        assert!(e.contains("\"nobody\"") && e.contains("etc/passwd"), "{e}");
        let e = resolve_user(r.path(), "kiln:nogroup")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nogroup\"") && e.contains("etc/group"), "{e}");
        let e = resolve_user(r.path(), "99999999999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn passwd_symlink_is_resolved_inside_the_rootfs() {
        let r = root();
        std::fs::rename(
            r.path().join("etc/passwd"),
            r.path().join("etc/passwd.real"),
        )
        .unwrap();
        // An absolute target must mean the rootfs's /etc, never the host's.
        std::os::unix::fs::symlink("/etc/passwd.real", r.path().join("etc/passwd")).unwrap();
        let u = resolve_user(r.path(), "kiln").unwrap();
        assert_eq!(u.uid, 1000);
    }
}
