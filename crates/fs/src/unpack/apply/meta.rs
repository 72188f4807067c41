//! Reading what Kiln applies of a tar entry's header and PAX records: owner, mode, times
//! (with sub-second PAX times), device numbers and xattrs. Parsing is kept apart from the
//! code that writes to the root.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;

use rustix::fs::{Timespec, Timestamps};

use super::OpError;

/// PAX record prefix under which GNU tar, Go's archive/tar and Kiln's writer store xattrs.
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// The metadata of one tar entry that Kiln applies.
pub(in crate::unpack) struct EntryMeta {
    pub(in crate::unpack) mode: u32,
    pub(in crate::unpack) uid: u32,
    pub(in crate::unpack) gid: u32,
    pub(in crate::unpack) times: Timestamps,
    pub(in crate::unpack) xattrs: Vec<(OsString, Vec<u8>)>,
    pub(in crate::unpack) device: (u32, u32),
}

/// Reads the applied metadata of an entry: header fields with their PAX overrides (uid/gid are
/// already folded in by the tar crate; sub-second times and xattrs are read here).
pub(in crate::unpack) fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<EntryMeta, OpError> {
    let bad = |what: &str, e: io::Error| OpError::Invalid(format!("bad {what} field: {e}"));
    let header = entry.header();
    let old = header.as_old();
    // As Go's archive/tar does, an all-blank numeric field reads as 0 (some writers leave
    // fields they do not track empty).
    let numeric = |field: &[u8], parsed: io::Result<u64>, what: &str| {
        if field.iter().all(|b| *b == 0 || *b == b' ') {
            Ok(0)
        } else {
            parsed.map_err(|e| bad(what, e))
        }
    };
    let mode = numeric(&old.mode, header.mode().map(u64::from), "mode")? as u32 & 0o7777;
    let uid = numeric(&old.uid, header.uid(), "uid")?;
    let gid = numeric(&old.gid, header.gid(), "gid")?;
    let mtime = numeric(&old.mtime, header.mtime(), "mtime")?;
    let (major, minor) = match header.entry_type() {
        tar::EntryType::Char | tar::EntryType::Block => {
            let (dev_major, dev_minor) = match header.as_gnu() {
                Some(gnu) => (gnu.dev_major, gnu.dev_minor),
                None => match header.as_ustar() {
                    Some(ustar) => (ustar.dev_major, ustar.dev_minor),
                    None => ([0; 8], [0; 8]),
                },
            };
            let major = header.device_major().map(|d| u64::from(d.unwrap_or(0)));
            let minor = header.device_minor().map(|d| u64::from(d.unwrap_or(0)));
            (
                numeric(&dev_major, major, "device major")? as u32,
                numeric(&dev_minor, minor, "device minor")? as u32,
            )
        }
        _ => (0, 0),
    };
    let to_id = |v: u64, what: &str| {
        u32::try_from(v)
            .ok()
            .filter(|v| *v != u32::MAX)
            .ok_or_else(|| OpError::Invalid(format!("{what} {v} out of range")))
    };
    let (uid, gid) = (to_id(uid, "uid")?, to_id(gid, "gid")?);
    let mut mtime = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut atime = None;
    let mut xattrs = Vec::new();
    if let Some(records) = entry.pax_extensions().map_err(OpError::Stream)? {
        for record in records {
            let record = record.map_err(|e| bad("PAX", e))?;
            let key = record.key_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(record.value_bytes())
                    .ok_or_else(|| OpError::Invalid("bad PAX mtime".into()))?;
            } else if key == b"atime" {
                atime = Some(
                    parse_pax_time(record.value_bytes())
                        .ok_or_else(|| OpError::Invalid("bad PAX atime".into()))?,
                );
            } else if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if name.is_empty() {
                    return Err(OpError::Invalid("PAX xattr record without a name".into()));
                }
                xattrs.push((
                    OsString::from_vec(name.to_vec()),
                    record.value_bytes().to_vec(),
                ));
            }
        }
    }
    Ok(EntryMeta {
        mode,
        uid,
        gid,
        times: Timestamps {
            last_access: atime.unwrap_or(mtime),
            last_modification: mtime,
        },
        xattrs,
        device: (major, minor),
    })
}

/// Parses a PAX time (`[-]SECONDS[.FRACTION]`).
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if negative {
        if nanos > 0 {
            Timespec {
                tv_sec: -secs - 1,
                tv_nsec: 1_000_000_000 - nanos,
            }
        } else {
            Timespec {
                tv_sec: -secs,
                tv_nsec: 0,
            }
        }
    } else {
        Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pax_times() {
        let t = parse_pax_time(b"1700000000.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 250_000_000));
        let t = parse_pax_time(b"-1.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
        let t = parse_pax_time(b"12").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 0));
        assert!(parse_pax_time(b"1.2x").is_none());
        assert!(parse_pax_time(b"").is_none());
    }
}
