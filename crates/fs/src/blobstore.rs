//! A content-addressed blob store directory: `ROOT/blobs/sha256/HEX`, the same layout as an OCI
//! image layout's blob directory, so a store can back a layout directly.
//!
//! Blobs are written to a temporary file under `ROOT/ingest/` and renamed into place once their
//! digest is known, so a reader never sees a partial blob under a digest name.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_oci::Digest;

/// Why a blob store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobStoreError {
    /// A filesystem operation on the store failed.
    #[error("blob store {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// A blob store rooted at a directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<BlobStore, BlobStoreError> {
        let root = root.into();
        for dir in [root.join("blobs").join("sha256"), root.join("ingest")] {
            std::fs::create_dir_all(&dir).map_err(|source| BlobStoreError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(BlobStore { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Starts writing a new blob; its digest is given when it is committed.
    pub fn create(&self) -> Result<BlobFile, BlobStoreError> {
        let ingest = self.root.join("ingest");
        let temp = tempfile_in(&ingest).map_err(|source| BlobStoreError::Io {
            path: ingest,
            source,
        })?;
        Ok(BlobFile {
            writer: Some(BufWriter::with_capacity(256 * 1024, temp.1)),
            temp_path: temp.0,
            store: self.clone(),
        })
    }
}

fn tempfile_in(dir: &Path) -> io::Result<(PathBuf, File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("blob-{}-{n}", std::process::id()));
        match File::options().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A blob being written; removed again if dropped without [`BlobFile::commit`].
#[derive(Debug)]
pub struct BlobFile {
    writer: Option<BufWriter<File>>,
    temp_path: PathBuf,
    store: BlobStore,
}

impl BlobFile {
    /// Where the blob is being written until it is committed: a reader that follows a
    /// download while it happens opens this path (its open file stays valid after the commit
    /// renames it).
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    /// Moves the finished blob to its digest's name and returns that path. The caller computed
    /// `digest` over exactly the bytes written. If the blob already exists the new copy is
    /// dropped (same digest, same bytes).
    pub fn commit(mut self, digest: &Digest) -> Result<PathBuf, BlobStoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BlobStoreError::Io { path, source }
        };
        let writer = self.writer.take().expect("writer present until commit");
        let file = writer.into_inner().map_err(|e| BlobStoreError::Io {
            path: self.temp_path.clone(),
            source: e.into_error(),
        })?;
        // No fsync: on a busy ext4 it waits for other processes' dirty data and cost seconds per
        // base layer. A blob cut short by a crash cannot be used silently: unpacking verifies
        // the digest of what it reads, and a registry refuses an upload whose digest is wrong.
        drop(file);
        let dest = self.store.blob_path(digest);
        std::fs::rename(&self.temp_path, &dest).map_err(io_err(&dest))?;
        Ok(dest)
    }
}

impl Write for BlobFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.writer {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("blob already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_blob_is_found_by_digest_and_abandoned_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut blob = store.create().unwrap();
        blob.write_all(b"hello").unwrap();
        let digest = Digest::sha256_of(b"hello");
        let path = blob.commit(&digest).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert!(store.contains(&digest));
        {
            let mut abandoned = store.create().unwrap();
            abandoned.write_all(b"partial").unwrap();
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
