//! Content hashes of context trees, the part of a COPY/ADD cache key that says what the step
//! can observe.
//!
//! A hash covers, for every entry of every source: its path relative to the source, its type,
//! its permission bits (with setuid/setgid/sticky), its owner only when asked (COPY resets
//! owners unless `--chown` or a preserving mode says otherwise), its symlink target and, for a
//! regular file, the SHA-256 of its content and which earlier entry of the same hash it is a
//! hard link of, if any (a copy keeps names that share an inode hard-linked, so two trees that
//! differ only in that make different layers). Every variable-length field is length-framed, so
//! no two different trees produce the same byte stream: moving bytes between a name and a link
//! target, or renaming a file, changes the hash. Modification times are not covered: a touched
//! but unchanged file must not bust the cache.
//!
//! File contents are hashed in parallel, on more threads than cores (see `HASH_THREADS`), and
//! memoised per build by (path, device, inode, size, mtime, ctime), so a file used by several
//! COPY steps is read once.

use std::collections::HashMap;
use std::fmt;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use kiln_fs::resolve::{Root, RootError};
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::error::{ContextError, Result};

/// Content below this size is hashed on the calling thread, above it across `hash_pool`.
const PARALLEL_HASH_BYTES: u64 = 1 << 20;

/// How many threads read and hash file contents, regardless of the core count. Reading files
/// the page cache no longer holds waits on the disk, not the CPU, and a disk (virtio, network
/// block storage) serves many reads at once only when that many are queued. Measured on the
/// 300 MB copy-tree bench context, 2 cores, pages evicted with `POSIX_FADV_DONTNEED`: a fully
/// cached rebuild took 1.7 s with 2 threads, 0.67 s with 8, 0.48 s with 32 and 0.47-0.57 s
/// with 64; with the pages cached it took 0.25 s whatever the count.
const HASH_THREADS: usize = 32;

/// The domain tag that starts every tree hash; bump it when the framing changes. (v2 added the
/// hard-link frames: a v1 hash of hard-linked files equals the v2 hash of separate copies, so
/// v1 keys must never be looked up again.)
const FORMAT_TAG: &[u8] = b"kiln-context-tree-v2";

/// The largest read buffer used when hashing a file.
const MAX_READ_BUFFER: usize = 256 * 1024;

/// A SHA-256 digest of a context tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentDigest(pub [u8; 32]);

impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// What a tree hash covers beyond paths, types, modes, link targets and contents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashOptions {
    /// Include each entry's uid and gid (for COPY modes that keep the context's owners).
    pub include_owner: bool,
}

/// One entry of a tree to hash.
#[derive(Debug, Clone)]
pub struct TreeEntry {
    /// The entry's path relative to its source root, as bytes (`.` for the root itself).
    pub rel: Vec<u8>,
    /// The entry's path relative to the [`Root`] being hashed, with no symlink among its
    /// directories (as a [`crate::TreeView`] walk gives it).
    pub path: PathBuf,
    /// The entry's `lstat` metadata.
    pub metadata: Metadata,
}

/// One source of a COPY/ADD: a label (the source as matched, e.g. `src/*.rs` → `src/a.rs`)
/// and the entries it contributes, in a deterministic order.
#[derive(Debug, Clone)]
pub struct HashedTree {
    /// Identifies the source within the step; framed into the hash.
    pub label: Vec<u8>,
    /// The entries, in the order they are hashed.
    pub entries: Vec<TreeEntry>,
}

/// The memo key of a file's content hash: if none of these changed, the content is assumed
/// unchanged within one build.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn new(path: &Path, metadata: &Metadata) -> Self {
        FileKey {
            path: path.to_owned(),
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// Hashes context trees; one per build, shared by all steps so file contents are read once.
#[derive(Debug, Default)]
pub struct ContentHasher {
    memo: Mutex<HashMap<FileKey, [u8; 32]>>,
    reads: std::sync::atomic::AtomicU64,
}

impl ContentHasher {
    /// A hasher with an empty memo.
    pub fn new() -> Self {
        ContentHasher::default()
    }

    /// How many files have actually been read (memo misses); for tests and progress figures.
    pub fn files_read(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The SHA-256 of the regular file `rel` inside `root` whose `lstat` is `metadata`,
    /// memoised.
    pub fn file_digest(
        &self,
        root: &Root,
        rel: &Path,
        metadata: &Metadata,
    ) -> std::result::Result<[u8; 32], RootError> {
        let key = FileKey::new(&root.path().join(rel), metadata);
        if let Some(digest) = self.lock_memo().get(&key) {
            return Ok(*digest);
        }
        let mut file = root.open_file(rel)?;
        let read_error = |e: io::Error| RootError::Io {
            op: "read",
            root: root.path().to_path_buf(),
            path: rel.to_path_buf(),
            source: e,
        };
        let mut hasher = Sha256::new();
        // Large reads keep the syscall count low on big files; small files get a small buffer.
        let capacity = usize::try_from(metadata.size())
            .unwrap_or(MAX_READ_BUFFER)
            .clamp(1, MAX_READ_BUFFER);
        let mut buffer = vec![0u8; capacity];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buffer[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            }
        }
        let digest: [u8; 32] = hasher.finalize().into();
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock_memo().insert(key, digest);
        Ok(digest)
    }

    fn lock_memo(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, [u8; 32]>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts).
        self.memo
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hashes a list of sources (in the given order), whose entries are paths inside `root`,
    /// into one digest.
    pub fn hash_trees(
        &self,
        root: &Root,
        trees: &[HashedTree],
        options: HashOptions,
    ) -> Result<ContentDigest> {
        let contained = |error: RootError| ContextError::Contained {
            source_name: "content hash".to_owned(),
            error,
        };
        // Read every regular file's content in parallel first; framing is sequential.
        let files: Vec<&TreeEntry> = trees
            .iter()
            .flat_map(|t| t.entries.iter())
            .filter(|e| e.metadata.file_type().is_file())
            .collect();
        let digest_of = |entry: &&TreeEntry| {
            self.file_digest(root, &entry.path, &entry.metadata)
                .map_err(contained)
        };
        // A few small files hash faster here than rayon's pool starts its threads (which
        // shows on a fully cached rebuild, where hashing is most of the local work).
        let total: u64 = files.iter().map(|e| e.metadata.len()).sum();
        let digests: Vec<[u8; 32]> = if total < PARALLEL_HASH_BYTES {
            files.iter().map(digest_of).collect::<Result<_>>()?
        } else {
            let parallel = || files.par_iter().map(digest_of).collect::<Result<_>>();
            match hash_pool() {
                Some(pool) => pool.install(parallel)?,
                None => parallel()?,
            }
        };
        let mut digests = digests.into_iter();

        let mut hasher = Sha256::new();
        hasher.update(FORMAT_TAG);
        hasher.update([u8::from(options.include_owner)]);
        hasher.update((trees.len() as u64).to_le_bytes());
        // (device, inode) of each multiply-linked file seen so far, to the ordinal of the first
        // entry (over all sources) that named it: the copy links later names to that one.
        let mut first_names: HashMap<(u64, u64), u64> = HashMap::new();
        let mut ordinal: u64 = 0;
        for tree in trees {
            frame(&mut hasher, &tree.label);
            hasher.update((tree.entries.len() as u64).to_le_bytes());
            for entry in &tree.entries {
                let metadata = &entry.metadata;
                let file_type = metadata.file_type();
                frame(&mut hasher, &entry.rel);
                let type_tag: u8 = if file_type.is_file() {
                    b'f'
                } else if file_type.is_dir() {
                    b'd'
                } else if file_type.is_symlink() {
                    b'l'
                } else if file_type.is_char_device() {
                    b'c'
                } else if file_type.is_block_device() {
                    b'b'
                } else if file_type.is_fifo() {
                    b'p'
                } else {
                    b's'
                };
                hasher.update([type_tag]);
                hasher.update((metadata.mode() & 0o7777).to_le_bytes());
                if options.include_owner {
                    hasher.update(metadata.uid().to_le_bytes());
                    hasher.update(metadata.gid().to_le_bytes());
                }
                match type_tag {
                    b'f' => {
                        let digest = digests
                            .next()
                            .expect("one digest was computed per regular file");
                        hasher.update(digest);
                        hash_link(&mut hasher, &mut first_names, metadata, ordinal);
                    }
                    b'l' => {
                        let target = root.read_link(&entry.path).map_err(contained)?;
                        frame(&mut hasher, target.as_os_str().as_bytes());
                    }
                    b'c' | b'b' => hasher.update(metadata.rdev().to_le_bytes()),
                    _ => {}
                }
                ordinal += 1;
            }
        }
        Ok(ContentDigest(hasher.finalize().into()))
    }

    /// Hashes a whole tree (no ignore rules), e.g. a `COPY --from` source in another stage's
    /// rootfs: the directory `rel` inside `root`, with paths relative to it.
    pub fn hash_directory(
        &self,
        root: &Root,
        rel: &Path,
        options: HashOptions,
    ) -> Result<ContentDigest> {
        let contained = |error: RootError| ContextError::Contained {
            source_name: "content hash".to_owned(),
            error,
        };
        let metadata = root.symlink_metadata(rel).map_err(contained)?;
        let mut entries = vec![TreeEntry {
            rel: b".".to_vec(),
            path: rel.to_owned(),
            metadata: metadata.clone(),
        }];
        if metadata.is_dir() {
            collect_all(root, rel, Path::new(""), &mut entries).map_err(contained)?;
        }
        let tree = HashedTree {
            label: b".".to_vec(),
            entries,
        };
        self.hash_trees(root, &[tree], options)
    }
}

/// The threads that hash file contents, started on first use; `None` if they could not be
/// started (rayon's global pool is used instead).
fn hash_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(HASH_THREADS)
            .thread_name(|i| format!("kiln-hash-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Frames the hard-link structure of the regular file at `ordinal`: `l` and the ordinal of the
/// first entry naming the same inode, or `u` for a file whose inode no earlier entry named (a
/// lone file, or the first name of a linked one). Link counts themselves are not hashed: a
/// link outside the copied sources is not copied, so it must not change the key.
fn hash_link(
    hasher: &mut Sha256,
    first_names: &mut HashMap<(u64, u64), u64>,
    metadata: &Metadata,
    ordinal: u64,
) {
    if metadata.nlink() > 1 {
        let first = *first_names
            .entry((metadata.dev(), metadata.ino()))
            .or_insert(ordinal);
        if first != ordinal {
            hasher.update([b'l']);
            hasher.update(first.to_le_bytes());
            return;
        }
    }
    hasher.update([b'u']);
}

/// Writes a length-framed field.
fn frame(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Every entry below the directory `dir` of `root`, depth first with names sorted bytewise,
/// symlinks not followed; `rel` is `dir`'s path relative to the hashed tree.
fn collect_all(
    root: &Root,
    dir: &Path,
    rel: &Path,
    out: &mut Vec<TreeEntry>,
) -> std::result::Result<(), RootError> {
    for name in root.read_dir(dir)? {
        let path = dir.join(&name);
        let child_rel = rel.join(&name);
        let metadata = root.symlink_metadata(&path)?;
        let is_dir = metadata.is_dir();
        out.push(TreeEntry {
            rel: child_rel.as_os_str().as_bytes().to_vec(),
            path: path.clone(),
            metadata,
        });
        if is_dir {
            collect_all(root, &path, &child_rel, out)?;
        }
    }
    Ok(())
}
