//! The directories behind `RUN --mount=type=cache`, kept below the Kiln dir between steps,
//! stages and builds, and the locks that give `sharing` its meaning.
//!
//! A cache is named by its id (the target when no id is given). One seeded `from` a stage or
//! an image is named by its id and by what seeded it, as BuildKit keys such a cache by id and
//! source: when the seed changes, a new cache starts from the new seed instead of the old files
//! staying under a name that now promises others.
//!
//! `sharing` is an `flock` on a file in a separate lock directory (never visible to the step),
//! held until the step ends, so it holds between the concurrent stages of one build and between
//! builds that share a Kiln dir: `shared` takes a shared lock (it waits only while a `locked`
//! user works), `locked` an exclusive one, and `private` the first of `NAME`, `NAME+1`, ...
//! that nobody holds, creating it when needed. A step takes its locks in name order, so two
//! steps never wait for each other in a cycle.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_fs::resolve::Root;
use kiln_oci::Digest;
use kiln_plan::{CacheSharing, Mount};

/// Where cache mounts live: `dirs` holds one directory per cache, `locks` one lock file each.
pub(crate) struct CacheMountStore<'a> {
    /// Parent of the cache directories.
    pub(crate) dirs: &'a Path,
    /// Parent of the lock files, apart from `dirs` so that no cache id can name a lock.
    pub(crate) locks: &'a Path,
}

/// Files a cache mount starts with when its cache is new, from its `from=` and `source=`.
#[derive(Debug, Clone)]
pub(crate) struct Seed {
    /// The directory to copy, already resolved inside the stage's or image's tree.
    pub(crate) path: PathBuf,
    /// Names the seed's content: the tree's identity and the path inside it.
    pub(crate) identity: String,
}

/// One cache mount of a step that needs a directory.
pub(crate) struct CacheRequest<'m> {
    /// The mount's position in the RUN's `--mount` list.
    pub(crate) index: usize,
    /// The mount as parsed.
    pub(crate) mount: &'m Mount,
    /// Its seed, when it has `from=`.
    pub(crate) seed: Option<Seed>,
}

/// The directories claimed for one step's cache mounts; the claims end when this is dropped.
#[derive(Default)]
pub(crate) struct ClaimedCaches {
    dirs: HashMap<usize, PathBuf>,
    _locks: Vec<File>,
}

impl ClaimedCaches {
    /// The host directory to bind for the mount at `index` of the RUN's `--mount` list.
    pub(crate) fn dir(&self, index: usize) -> Option<&Path> {
        self.dirs.get(&index).map(PathBuf::as_path)
    }
}

/// Makes each new directory's temporary name unique within the process.
static FRESH: AtomicUsize = AtomicUsize::new(0);

impl CacheMountStore<'_> {
    /// Claims a directory for every request as its `sharing` says, waiting for locks where it
    /// must, and creates (or seeds) the caches that do not exist yet. Two mounts of one step
    /// with the same cache share one directory and one claim.
    pub(crate) fn claim(&self, requests: Vec<CacheRequest<'_>>) -> Result<ClaimedCaches, String> {
        for dir in [self.dirs, self.locks] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut named: Vec<(String, CacheRequest<'_>)> = requests
            .into_iter()
            .map(|request| (cache_name(&request), request))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut claims = ClaimedCaches::default();
        let mut held: HashMap<String, PathBuf> = HashMap::new();
        for (name, request) in named {
            let dir = match held.get(&name) {
                Some(dir) => dir.clone(),
                None => {
                    let (dir, lock) = self.lock(&name, request.mount.sharing)?;
                    claims._locks.push(lock);
                    self.create(&dir, request.mount, request.seed.as_ref())?;
                    held.insert(name, dir.clone());
                    dir
                }
            };
            let dir = match (&request.seed, request.mount.source.as_deref()) {
                // Without `from`, `source` picks a directory inside the cache.
                (None, Some(source))
                    if !super::copy::tree::clean_relative(Path::new(source))
                        .as_os_str()
                        .is_empty() =>
                {
                    let root = Root::open(&dir).map_err(|e| e.to_string())?;
                    root.mkdir_all(source, 0o755).map_err(|e| e.to_string())?;
                    root.host_path(source, true).map_err(|e| e.to_string())?
                }
                _ => dir,
            };
            claims.dirs.insert(request.index, dir);
        }
        Ok(claims)
    }

    /// Takes the lock `sharing` asks for on cache `name`, and says which directory it is for.
    fn lock(&self, name: &str, sharing: CacheSharing) -> Result<(PathBuf, File), String> {
        let open = |name: &str| {
            let path = self.locks.join(name);
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cache mount lock {}: {e}", path.display()))
        };
        let failed = |e: std::io::Error| format!("cache mount lock {name}: {e}");
        match sharing {
            CacheSharing::Shared => {
                let lock = open(name)?;
                lock.lock_shared().map_err(failed)?;
                Ok((self.dirs.join(name), lock))
            }
            CacheSharing::Locked => {
                let lock = open(name)?;
                lock.lock().map_err(failed)?;
                Ok((self.dirs.join(name), lock))
            }
            CacheSharing::Private => {
                // `NAME`, then `NAME+1`, `NAME+2`, ...: the first copy nobody holds.
                let mut candidate = name.to_owned();
                let mut copies = 0usize;
                loop {
                    let lock = open(&candidate)?;
                    match lock.try_lock() {
                        Ok(()) => return Ok((self.dirs.join(candidate), lock)),
                        Err(std::fs::TryLockError::WouldBlock) => {
                            copies += 1;
                            candidate = format!("{name}+{copies}");
                        }
                        Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
                    }
                }
            }
        }
    }

    /// Creates cache `dir` when it does not exist: empty with the mount's mode and owner, or a
    /// copy of the seed. It is built under a temporary name and renamed into place while an
    /// exclusive creation lock is held, so a `shared` user never sees a half-made cache, and two
    /// creators never replace each other's directory.
    fn create(&self, dir: &Path, mount: &Mount, seed: Option<&Seed>) -> Result<(), String> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        if dir.symlink_metadata().is_ok() {
            return Ok(());
        }
        let creating_path = self.locks.join(format!("{name}+create"));
        let creating = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&creating_path)
            .map_err(|e| format!("cache mount lock {}: {e}", creating_path.display()))?;
        creating
            .lock()
            .map_err(|e| format!("cache mount lock {}: {e}", creating_path.display()))?;
        if dir.symlink_metadata().is_ok() {
            return Ok(());
        }
        let fresh = self.dirs.join(format!(
            "{name}+new-{}-{}",
            std::process::id(),
            FRESH.fetch_add(1, Ordering::Relaxed)
        ));
        let made = (|| {
            match seed {
                Some(seed) => {
                    if !seed.path.is_dir() {
                        return Err(format!(
                            "--mount=type=cache: the source {} of from= is not a directory",
                            seed.path.display()
                        ));
                    }
                    super::run::copy_tree(&seed.path, &fresh)?;
                    if let Some(mode) = mount.mode {
                        set_mode(&fresh, mode)?;
                    }
                    if mount.uid.is_some() || mount.gid.is_some() {
                        set_owner(&fresh, mount)?;
                    }
                }
                None => {
                    std::fs::create_dir(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
                    set_mode(&fresh, mount.mode.unwrap_or(0o755))?;
                    set_owner(&fresh, mount)?;
                }
            }
            std::fs::rename(&fresh, dir).map_err(|e| format!("{}: {e}", dir.display()))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&fresh);
        }
        made
    }
}

/// The cache's directory name: its id made safe for a file name, and for a seeded cache a
/// digest of the seed. `@` and `+` never come out of the id's rewriting, so a seeded cache, a
/// private copy or a directory being made cannot take the name of another cache.
fn cache_name(request: &CacheRequest<'_>) -> String {
    let mount = request.mount;
    let id = super::run::sanitize(mount.id.as_deref().unwrap_or(&mount.target));
    match &request.seed {
        None => id,
        Some(seed) => {
            let digest = Digest::sha256_of(seed.identity.as_bytes());
            format!("{id}@{}", &digest.hex()[..16])
        }
    }
}

fn set_mode(dir: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn set_owner(dir: &Path, mount: &Mount) -> Result<(), String> {
    std::os::unix::fs::chown(
        dir,
        Some(mount.uid.unwrap_or(0)),
        Some(mount.gid.unwrap_or(0)),
    )
    .map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use kiln_plan::{CacheSharing, Mount, MountType};

    use super::*;

    fn cache_mount(id: &str, sharing: CacheSharing) -> Mount {
        Mount {
            kind: MountType::Cache,
            target: "/cache".into(),
            source: None,
            from: None,
            read_only: false,
            id: Some(id.into()),
            sharing,
            mode: None,
            uid: None,
            gid: None,
            size: None,
            required: false,
            env: None,
        }
    }

    struct Store {
        _dir: tempfile::TempDir,
        dirs: PathBuf,
        locks: PathBuf,
    }

    impl Store {
        fn new() -> Store {
            let dir = tempfile::tempdir().unwrap();
            Store {
                dirs: dir.path().join("caches"),
                locks: dir.path().join("locks"),
                _dir: dir,
            }
        }

        fn claim(&self, mount: &Mount, seed: Option<Seed>) -> Result<ClaimedCaches, String> {
            let store = CacheMountStore {
                dirs: &self.dirs,
                locks: &self.locks,
            };
            store.claim(vec![CacheRequest {
                index: 0,
                mount,
                seed,
            }])
        }
    }

    #[test]
    fn shared_caches_are_one_directory_used_at_once() {
        let store = Store::new();
        let mount = cache_mount("go", CacheSharing::Shared);
        let first = store.claim(&mount, None).unwrap();
        let second = store.claim(&mount, None).unwrap();
        assert_eq!(first.dir(0), second.dir(0));
        std::fs::write(first.dir(0).unwrap().join("a"), "kept").unwrap();
        drop((first, second));
        let later = store.claim(&mount, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(later.dir(0).unwrap().join("a")).unwrap(),
            "kept"
        );
    }

    #[test]
    fn a_locked_cache_waits_for_its_user_to_finish() {
        let store = std::sync::Arc::new(Store::new());
        let mount = cache_mount("apt", CacheSharing::Locked);
        let first = store.claim(&mount, None).unwrap();
        let (claimed, got) = mpsc::channel();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mount = cache_mount("apt", CacheSharing::Locked);
                let second = store.claim(&mount, None).unwrap();
                claimed.send(second.dir(0).unwrap().to_path_buf()).unwrap();
            })
        };
        assert!(
            got.recv_timeout(Duration::from_millis(300)).is_err(),
            "a second locked user got the cache while the first held it"
        );
        let dir = first.dir(0).unwrap().to_path_buf();
        drop(first);
        assert_eq!(got.recv_timeout(Duration::from_secs(10)).unwrap(), dir);
        waiter.join().unwrap();
    }

    #[test]
    fn a_shared_user_waits_for_a_locked_one() {
        let store = std::sync::Arc::new(Store::new());
        let locked = store
            .claim(&cache_mount("npm", CacheSharing::Locked), None)
            .unwrap();
        let (claimed, got) = mpsc::channel();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let shared = store.claim(&cache_mount("npm", CacheSharing::Shared), None);
                claimed.send(shared.is_ok()).unwrap();
            })
        };
        assert!(got.recv_timeout(Duration::from_millis(300)).is_err());
        drop(locked);
        assert!(got.recv_timeout(Duration::from_secs(10)).unwrap());
        waiter.join().unwrap();
    }

    #[test]
    fn private_users_at_once_get_their_own_directories_and_reuse_them_later() {
        let store = Store::new();
        let mount = cache_mount("pip", CacheSharing::Private);
        let first = store.claim(&mount, None).unwrap();
        let second = store.claim(&mount, None).unwrap();
        let (a, b) = (first.dir(0).unwrap(), second.dir(0).unwrap());
        assert_ne!(a, b);
        std::fs::write(a.join("mine"), "first").unwrap();
        assert!(!b.join("mine").exists());
        let first_dir = a.to_path_buf();
        drop((first, second));
        let again = store.claim(&mount, None).unwrap();
        assert_eq!(again.dir(0).unwrap(), first_dir);
    }

    #[test]
    fn a_new_cache_has_the_mounts_mode_and_owner() {
        let store = Store::new();
        let mut mount = cache_mount("owned", CacheSharing::Shared);
        mount.mode = Some(0o700);
        mount.uid = Some(1234);
        mount.gid = Some(5678);
        let claim = store.claim(&mount, None).unwrap();
        let meta = std::fs::metadata(claim.dir(0).unwrap()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    }

    #[test]
    fn source_without_from_mounts_a_directory_inside_the_cache() {
        let store = Store::new();
        let mut whole = cache_mount("tree", CacheSharing::Shared);
        let mut sub = whole.clone();
        sub.source = Some("/a/b".into());
        let inner = store.claim(&sub, None).unwrap();
        std::fs::write(inner.dir(0).unwrap().join("f"), "x").unwrap();
        whole.source = None;
        let outer = store.claim(&whole, None).unwrap();
        assert!(outer.dir(0).unwrap().join("a/b/f").is_file());
        // A source that climbs out stays inside the cache.
        sub.source = Some("../../escape".into());
        let climbed = store.claim(&sub, None).unwrap();
        assert!(climbed.dir(0).unwrap().starts_with(outer.dir(0).unwrap()));
    }

    #[test]
    fn a_seeded_cache_starts_from_its_seed_and_a_new_seed_starts_a_new_cache() {
        let store = Store::new();
        let seeds = tempfile::tempdir().unwrap();
        let (one, two) = (seeds.path().join("one"), seeds.path().join("two"));
        for (dir, text) in [(&one, "first seed"), (&two, "second seed")] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("s.txt"), text).unwrap();
        }
        let seed = |path: &Path, identity: &str| Seed {
            path: path.to_path_buf(),
            identity: identity.into(),
        };
        let mount = cache_mount("deps", CacheSharing::Shared);
        let first = store.claim(&mount, Some(seed(&one, "one"))).unwrap();
        let dir = first.dir(0).unwrap().to_path_buf();
        assert_eq!(
            std::fs::read_to_string(dir.join("s.txt")).unwrap(),
            "first seed"
        );
        std::fs::write(dir.join("added"), "by a step").unwrap();
        drop(first);
        // The same seed: the same cache, with what earlier steps left in it.
        let again = store.claim(&mount, Some(seed(&one, "one"))).unwrap();
        assert!(again.dir(0).unwrap().join("added").is_file());
        // Another seed under the same id: a fresh copy of that seed.
        let other = store.claim(&mount, Some(seed(&two, "two"))).unwrap();
        let other_dir = other.dir(0).unwrap();
        assert_ne!(other_dir, dir);
        assert_eq!(
            std::fs::read_to_string(other_dir.join("s.txt")).unwrap(),
            "second seed"
        );
        assert!(!other_dir.join("added").exists());
        // Nothing half-made is left beside the caches.
        let names: Vec<String> = std::fs::read_dir(&store.dirs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("+new-")), "{names:?}");
    }

    #[test]
    fn a_seed_that_is_not_a_directory_is_an_error_and_leaves_no_cache() {
        let store = Store::new();
        let seeds = tempfile::tempdir().unwrap();
        let file = seeds.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let mount = cache_mount("bad", CacheSharing::Shared);
        let error = store
            .claim(
                &mount,
                Some(Seed {
                    path: file,
                    identity: "f".into(),
                }),
            )
            .err()
            .unwrap();
        assert!(error.contains("not a directory"), "{error}");
        let left = std::fs::read_dir(&store.dirs).unwrap().count();
        assert_eq!(left, 0);
    }

    #[test]
    fn two_mounts_of_one_step_on_the_same_cache_share_one_claim() {
        let store = Store::new();
        let mount = cache_mount("same", CacheSharing::Locked);
        let mut other = mount.clone();
        other.target = "/elsewhere".into();
        let claims = CacheMountStore {
            dirs: &store.dirs,
            locks: &store.locks,
        }
        .claim(vec![
            CacheRequest {
                index: 0,
                mount: &mount,
                seed: None,
            },
            CacheRequest {
                index: 1,
                mount: &other,
                seed: None,
            },
        ])
        .unwrap();
        assert_eq!(claims.dir(0), claims.dir(1));
    }
}
