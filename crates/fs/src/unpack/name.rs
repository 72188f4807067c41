//! Validation of entry names as they appear in a layer tar, and recognition of whiteouts.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The file name that marks its directory as opaque (OCI image spec, "Opaque Whiteout").
pub(crate) const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// The prefix of a whiteout file name.
pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// aufs keeps its own bookkeeping under names with this prefix; they carry no meaning for an
/// OCI runtime and are ignored (as the spec allows).
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// Turns a name from a tar header into a clean path relative to the root: leading `/` and `./`
/// removed, `.` and empty components dropped, `..` applied lexically. A name that is empty,
/// contains NUL, or climbs above the root is rejected with the reason. The root itself comes
/// back as an empty path.
pub(crate) fn clean_name(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.is_empty() {
        return Err("empty name");
    }
    if raw.contains(&0) {
        return Err("NUL byte in name");
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("`..` escapes the root");
                }
            }
            _ => parts.push(part),
        }
    }
    let mut path = PathBuf::new();
    for part in parts {
        path.push(OsStr::from_bytes(part));
    }
    Ok(path)
}

/// What a (cleaned) entry path means for the layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Special<'a> {
    /// A normal entry.
    None,
    /// `DIR/.wh..wh..opq`: hide everything lower layers put under `DIR`.
    Opaque {
        /// The directory made opaque.
        dir: &'a Path,
    },
    /// `DIR/.wh.NAME`: delete `DIR/NAME` from lower layers.
    Whiteout {
        /// The path to delete.
        target: PathBuf,
    },
    /// aufs metadata (`.wh..wh.*` other than the opaque marker), ignored.
    AufsMeta,
}

/// Classifies a cleaned path; an invalid whiteout target (`.wh.`, `.wh..`, `.wh...`) is an error.
pub(crate) fn classify(path: &Path) -> Result<Special<'_>, &'static str> {
    let Some(name) = path.file_name() else {
        return Ok(Special::None);
    };
    let name = name.as_bytes();
    let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) else {
        return Ok(Special::None);
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    if name == OPAQUE_WHITEOUT {
        return Ok(Special::Opaque { dir });
    }
    if name.starts_with(AUFS_META_PREFIX) {
        return Ok(Special::AufsMeta);
    }
    match target {
        b"" => Err("whiteout without a target name"),
        b"." | b".." => Err("whiteout of `.` or `..`"),
        _ => Ok(Special::Whiteout {
            target: dir.join(OsStr::from_bytes(target)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_names() {
        assert_eq!(clean_name(b"./usr/bin/").unwrap(), Path::new("usr/bin"));
        assert_eq!(
            clean_name(b"/etc//passwd").unwrap(),
            Path::new("etc/passwd")
        );
        assert_eq!(clean_name(b"a/../b").unwrap(), Path::new("b"));
        assert_eq!(clean_name(b"./").unwrap(), Path::new(""));
        assert!(clean_name(b"../x").is_err());
        assert!(clean_name(b"a/../../x").is_err());
        assert!(clean_name(b"/../x").is_err());
        assert!(clean_name(b"").is_err());
        assert!(clean_name(b"a\0b").is_err());
    }

    #[test]
    fn classifies_whiteouts() {
        assert_eq!(classify(Path::new("a/b")).unwrap(), Special::None);
        assert_eq!(
            classify(Path::new("a/.wh..wh..opq")).unwrap(),
            Special::Opaque {
                dir: Path::new("a")
            }
        );
        assert_eq!(
            classify(Path::new(".wh..wh..opq")).unwrap(),
            Special::Opaque { dir: Path::new("") }
        );
        assert_eq!(
            classify(Path::new("a/.wh.b")).unwrap(),
            Special::Whiteout {
                target: PathBuf::from("a/b")
            }
        );
        assert_eq!(
            classify(Path::new("a/.wh..wh.plnk")).unwrap(),
            Special::AufsMeta
        );
        assert!(classify(Path::new("a/.wh...")).is_err());
        assert!(classify(Path::new("a/.wh.")).is_err());
    }
}
