//! Regular files of a layer written by worker threads while the main thread keeps reading the
//! tar stream.
//!
//! Creating an inode is the dominant cost of unpacking a base image (hundreds of microseconds
//! each on some virtual disks, nearly all of it kernel time), and the kernel creates inodes in
//! parallel: two threads unpack a Debian base in about 60% of the time one needs. The stream
//! itself stays sequential, so the applier reads each small file's bytes and hands the rest of
//! the work (create, write, owner, mode, times, stat) to a worker.
//!
//! Ordering is kept by the applier: it waits for every queued file ([`WritePool::drain`])
//! before anything that could touch a queued path (the same path again, a hard link, a
//! whiteout, an opaque directory, removing a directory) and before directory times are set.

use std::collections::HashSet;
use std::fs::{File, Metadata};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use rustix::fs::{Gid, Mode, OFlags, Timestamps, Uid};

use crate::resolve::{ParentDir, RootError};

/// Files larger than this are written by the applier itself: holding them in memory would cost
/// more than the inode they need.
pub(crate) const MAX_QUEUED_FILE: u64 = 1024 * 1024;

/// At most this many bytes of file content wait in the queue, so memory stays bounded whatever
/// the layer.
const MAX_QUEUED_BYTES: u64 = 16 * 1024 * 1024;

/// One regular file to create: the directory that holds it is already resolved inside the root.
/// Only regular files are queued: a symlink must exist as soon as its entry is applied, since
/// later entries may resolve paths through it.
pub(crate) struct FileJob {
    pub path: PathBuf,
    pub parent: ParentDir,
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub times: Timestamps,
    /// Whether the caller wants the file's metadata back (for the snapshot index).
    pub want_metadata: bool,
}

/// What a worker reports for one file.
pub(crate) struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub outcome: Result<Option<Metadata>, FileOpError>,
}

/// The worker threads and the bookkeeping of queued files.
pub(crate) struct WritePool {
    jobs: Option<Sender<FileJob>>,
    done: Receiver<Written>,
    workers: Vec<JoinHandle<()>>,
    queued: HashSet<PathBuf>,
    queued_bytes: u64,
    root_path: PathBuf,
}

impl WritePool {
    /// Starts one worker per core (at most four), or returns `None` on a single core, where the
    /// applier writing inline is as fast.
    pub(crate) fn start(root_path: &Path) -> Option<WritePool> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        if threads < 2 {
            return None;
        }
        let (jobs, job_queue) = crossbeam_channel::bounded::<FileJob>(256);
        let (results, done) = crossbeam_channel::unbounded();
        let mut workers = Vec::new();
        for i in 0..threads {
            let job_queue = job_queue.clone();
            let results = results.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-unpack-{i}"))
                .spawn(move || {
                    for job in job_queue {
                        let outcome = write_file(&job);
                        let report = Written {
                            bytes: job.content.len() as u64,
                            path: job.path,
                            outcome,
                        };
                        if results.send(report).is_err() {
                            break;
                        }
                    }
                });
            match spawned {
                Ok(handle) => workers.push(handle),
                // Fewer workers still work; none means writing inline.
                Err(_) if !workers.is_empty() => break,
                Err(_) => return None,
            }
        }
        Some(WritePool {
            jobs: Some(jobs),
            done,
            workers,
            queued: HashSet::new(),
            queued_bytes: 0,
            root_path: root_path.to_path_buf(),
        })
    }

    /// Whether `path` is queued and not yet written.
    pub(crate) fn is_queued(&self, path: &Path) -> bool {
        self.queued.contains(path)
    }

    /// Whether any file is queued and not yet written.
    pub(crate) fn busy(&self) -> bool {
        !self.queued.is_empty()
    }

    /// Queues a file, first waiting (handing each finished file to `finished`) while the queue
    /// holds too many bytes.
    pub(crate) fn submit(
        &mut self,
        job: FileJob,
        finished: &mut dyn FnMut(&Path, &Metadata),
    ) -> Result<(), RootError> {
        while self.busy() && self.queued_bytes + job.content.len() as u64 > MAX_QUEUED_BYTES {
            self.wait_one(finished)?;
        }
        self.queued.insert(job.path.clone());
        self.queued_bytes += job.content.len() as u64;
        let jobs = self.jobs.as_ref().expect("the pool is running");
        if let Err(crossbeam_channel::SendError(job)) = jobs.send(job) {
            // Every worker is gone (they only stop when the queue closes): report it on the file.
            self.queued.remove(&job.path);
            self.queued_bytes -= job.content.len() as u64;
            return Err(self.error(
                "queue the write of",
                &job.path,
                io::Error::other("the unpack workers stopped"),
            ));
        }
        // Collect whatever finished meanwhile, so the queue rarely has to be waited for.
        while let Ok(written) = self.done.try_recv() {
            self.settle(written, finished)?;
        }
        Ok(())
    }

    /// Waits until every queued file is written. The first failure is returned (the files
    /// after it are still waited for, so nothing is written behind the caller's back).
    pub(crate) fn drain(
        &mut self,
        finished: &mut dyn FnMut(&Path, &Metadata),
    ) -> Result<(), RootError> {
        let mut first_error = None;
        while self.busy() {
            if let Err(e) = self.wait_one(finished) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn wait_one(&mut self, finished: &mut dyn FnMut(&Path, &Metadata)) -> Result<(), RootError> {
        match self.done.recv() {
            Ok(written) => self.settle(written, finished),
            Err(_) => {
                let path = self.queued.iter().next().cloned().unwrap_or_default();
                self.queued.clear();
                self.queued_bytes = 0;
                Err(self.error(
                    "write",
                    &path,
                    io::Error::other("the unpack workers stopped"),
                ))
            }
        }
    }

    fn settle(
        &mut self,
        written: Written,
        finished: &mut dyn FnMut(&Path, &Metadata),
    ) -> Result<(), RootError> {
        self.queued.remove(&written.path);
        self.queued_bytes -= written.bytes;
        match written.outcome {
            Ok(Some(metadata)) => {
                finished(&written.path, &metadata);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err((op, source)) => Err(self.error(op, &written.path, source)),
        }
    }

    fn error(&self, op: &'static str, path: &Path, source: io::Error) -> RootError {
        RootError::Io {
            op,
            root: self.root_path.clone(),
            path: path.to_path_buf(),
            source,
        }
    }
}

impl Drop for WritePool {
    fn drop(&mut self) {
        // Closing the queue ends the workers once they finish what they hold.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A failed file operation: what was being done, and why it failed.
pub(crate) type FileOpError = (&'static str, io::Error);

/// Creates a new regular file in `parent` (never through a symlink, never over an existing
/// entry), writable and private until its owner and mode are set.
pub(crate) fn create_exclusive(parent: &ParentDir) -> Result<File, FileOpError> {
    rustix::fs::openat(
        parent.dir(),
        parent.name(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map(File::from)
    .map_err(|e| ("create", e.into()))
}

/// Sets a written file's owner, then its mode: chown clears setuid/setgid bits and
/// `security.capability`, so the order matters.
pub(crate) fn set_owner_and_mode(
    file: &File,
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<(), FileOpError> {
    rustix::fs::fchown(file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(|e| ("change owner of", e.into()))?;
    rustix::fs::fchmod(file, Mode::from_bits_retain(mode)).map_err(|e| ("change mode of", e.into()))
}

/// Creates the file as the applier does inline (queued files have no xattrs): content, owner
/// and mode, then times.
fn write_file(job: &FileJob) -> Result<Option<Metadata>, FileOpError> {
    let mut file = create_exclusive(&job.parent)?;
    file.write_all(&job.content).map_err(|e| ("write", e))?;
    set_owner_and_mode(&file, job.uid, job.gid, job.mode)?;
    rustix::fs::futimens(&file, &job.times).map_err(|e| ("set times of", e.into()))?;
    if job.want_metadata {
        return file.metadata().map(Some).map_err(|e| ("stat", e));
    }
    Ok(None)
}
