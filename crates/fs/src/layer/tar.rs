//! Deterministic tar headers: POSIX ustar, with a PAX extended header only when a value does
//! not fit (long names and link targets, large ids, sizes or times) or xattrs must be carried.
//! No user or group names, no access or change times, no sub-second mtimes.

use std::io::{self, Write};

/// Tar block size.
pub(crate) const BLOCK: usize = 512;

/// Entry type flags used in layers.
pub(crate) mod typeflag {
    pub(crate) const REGULAR: u8 = b'0';
    pub(crate) const HARDLINK: u8 = b'1';
    pub(crate) const SYMLINK: u8 = b'2';
    pub(crate) const CHAR: u8 = b'3';
    pub(crate) const BLOCK: u8 = b'4';
    pub(crate) const DIRECTORY: u8 = b'5';
    pub(crate) const FIFO: u8 = b'6';
    pub(crate) const PAX: u8 = b'x';
}

/// One entry's header fields.
pub(crate) struct Header<'a> {
    /// Name inside the archive, relative, with a trailing `/` for directories.
    pub(crate) path: &'a [u8],
    pub(crate) typeflag: u8,
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) size: u64,
    pub(crate) mtime: i64,
    pub(crate) linkname: &'a [u8],
    pub(crate) devmajor: u32,
    pub(crate) devminor: u32,
    /// Extended attributes, sorted by name.
    pub(crate) xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

const MAX_OCTAL_7: u64 = 0o7_777_777;
const MAX_OCTAL_11: u64 = 0o77_777_777_777;

/// Writes the header (preceded by a PAX header when needed) of one entry. The caller writes
/// `size` bytes of content and then [`padding`].
pub(crate) fn write_header(out: &mut impl Write, h: &Header<'_>) -> io::Result<()> {
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let (name, prefix): (&[u8], &[u8]) = if h.path.len() <= 100 {
        (h.path, b"")
    } else if let Some(split) = ustar_split(h.path) {
        (&h.path[split + 1..], &h.path[..split])
    } else {
        pax.push((b"path".to_vec(), h.path.to_vec()));
        (&h.path[..100], b"")
    };
    let linkname = if h.linkname.len() > 100 {
        pax.push((b"linkpath".to_vec(), h.linkname.to_vec()));
        &h.linkname[..100]
    } else {
        h.linkname
    };
    let uid = if h.uid > MAX_OCTAL_7 {
        pax.push((b"uid".to_vec(), h.uid.to_string().into_bytes()));
        0
    } else {
        h.uid
    };
    let gid = if h.gid > MAX_OCTAL_7 {
        pax.push((b"gid".to_vec(), h.gid.to_string().into_bytes()));
        0
    } else {
        h.gid
    };
    let size = if h.size > MAX_OCTAL_11 {
        pax.push((b"size".to_vec(), h.size.to_string().into_bytes()));
        0
    } else {
        h.size
    };
    let mtime = if h.mtime < 0 || h.mtime as u64 > MAX_OCTAL_11 {
        pax.push((b"mtime".to_vec(), h.mtime.to_string().into_bytes()));
        0
    } else {
        h.mtime as u64
    };
    for (key, value) in h.xattrs {
        let mut k = b"SCHILY.xattr.".to_vec();
        k.extend_from_slice(key);
        pax.push((k, value.clone()));
    }
    if !pax.is_empty() {
        pax.sort();
        let mut records = Vec::new();
        for (key, value) in &pax {
            pax_record(&mut records, key, value);
        }
        let base = h
            .path
            .rsplit(|b| *b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"entry");
        let mut pax_name = b"PaxHeaders.0/".to_vec();
        pax_name.extend_from_slice(base);
        pax_name.truncate(100);
        let block = ustar_block(
            &pax_name,
            b"",
            typeflag::PAX,
            0o644,
            0,
            0,
            records.len() as u64,
            0,
            b"",
            0,
            0,
        );
        out.write_all(&block)?;
        out.write_all(&records)?;
        out.write_all(padding(records.len() as u64))?;
    }
    let block = ustar_block(
        name, prefix, h.typeflag, h.mode, uid, gid, size, mtime, linkname, h.devmajor, h.devminor,
    );
    out.write_all(&block)
}

/// Zero bytes that pad `size` bytes of content to a whole block.
pub(crate) fn padding(size: u64) -> &'static [u8] {
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let rem = (size % BLOCK as u64) as usize;
    if rem == 0 {
        &[]
    } else {
        &ZEROS[..BLOCK - rem]
    }
}

/// The end-of-archive marker: two zero blocks.
pub(crate) fn write_end(out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[0u8; 2 * BLOCK])
}

/// Where to cut a long path into ustar's 155-byte prefix and 100-byte name, if possible.
fn ustar_split(path: &[u8]) -> Option<usize> {
    if path.len() > 256 {
        return None;
    }
    // The name part must be non-empty and at most 100 bytes; take the longest prefix that fits.
    let directory = path.ends_with(b"/");
    let body = if directory {
        &path[..path.len() - 1]
    } else {
        path
    };
    (0..body.len())
        .rev()
        .filter(|&i| body[i] == b'/')
        .find(|&i| i <= 155 && path.len() - i - 1 <= 100 && i > 0)
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "LEN key=value\n" where LEN counts the whole record including its own digits.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    loop {
        let total = rest + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[allow(clippy::too_many_arguments)]
fn ustar_block(
    name: &[u8],
    prefix: &[u8],
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    linkname: &[u8],
    devmajor: u32,
    devminor: u32,
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], u64::from(mode));
    octal(&mut b[108..116], uid);
    octal(&mut b[116..124], gid);
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], mtime);
    b[156] = typeflag;
    b[157..157 + linkname.len()].copy_from_slice(linkname);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    if matches!(typeflag, typeflag::CHAR | typeflag::BLOCK) {
        octal(&mut b[329..337], u64::from(devmajor));
        octal(&mut b[337..345], u64::from(devminor));
    }
    b[345..345 + prefix.len()].copy_from_slice(prefix);
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    let digits = format!("{sum:06o}");
    b[148..154].copy_from_slice(digits.as_bytes());
    b[154] = 0;
    b[155] = b' ';
    b
}

/// Zero-padded octal with a terminating NUL; callers guarantee the value fits.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let digits = format!("{value:0width$o}");
    field[..width].copy_from_slice(digits.as_bytes());
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        pax_record(&mut out, b"path", &[b'a'; 95]);
        let text = String::from_utf8(out.clone()).unwrap();
        let (len, _) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), out.len());
    }

    #[test]
    fn long_paths_use_prefix_before_pax() {
        let dir = "d".repeat(120);
        let path = format!("{dir}/file");
        assert_eq!(ustar_split(path.as_bytes()), Some(120));
        let long = "x".repeat(150);
        assert_eq!(ustar_split(long.as_bytes()), None);
    }
}
