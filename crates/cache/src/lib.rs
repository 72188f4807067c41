//! Kiln's layer cache.
//!
//! Its parts, used by the engine (`kiln-engine`) and the `executor warm` and `executor cache
//! prune` commands:
//!
//! - [`key`]: a step's [`CacheKey`], chained from the base image through every step, covering
//!   exactly what the step can observe ([`StepInput`], [`run_environment`], [`KeyChain`]).
//! - [`store`]: the step cache, [`CacheStore`], in a registry repository (`--cache-repo
//!   REGISTRY/REPO`) or an OCI layout (`--cache-repo oci:/path`), with a TTL and concurrent
//!   lookup of all of a stage's keys ([`CacheStore::lookup_all`]).
//! - [`stage`]: stage records ([`StageRecord`], found by a [`StageLocator`]), which answer all
//!   of a stage's lookups and carry its base config, so a fully cached stage costs one request
//!   made at the same time as the base manifest's.
//! - [`base`]: `--cache-dir`, base images by digest ([`BaseImageDir`]) and the warmer.
//! - [`prune`]: retention. [`CacheStore::prune`] deletes entries and stage records older than
//!   a cutoff (a registry's manifest `DELETE`, which a registry may refuse: that is reported,
//!   not fatal; an OCI layout's `index.json` and the blobs nothing else uses), and
//!   [`BaseImageDir::prune`] the base images stored longer than that, each with a
//!   [`PruneReport`] of what went, what stayed and what was refused.
//!
//! ```no_run
//! # async fn example(client: kiln_registry::Client, steps: Vec<kiln_cache::StepInput>,
//! #     base: kiln_oci::Digest) -> Result<(), kiln_cache::CacheError> {
//! use kiln_cache::{CacheStore, KeyChain, Parent, DEFAULT_TTL};
//! let platform = kiln_oci::Platform::parse("linux/amd64").expect("valid platform");
//! let mut chain = KeyChain::new(Parent::Image(base), platform);
//! let keys: Vec<_> = steps.iter().map(|step| chain.next_key(step)).collect();
//! let cache = CacheStore::open("127.0.0.1:5000/app/cache", &client, DEFAULT_TTL)?;
//! for (key, hit) in keys.iter().zip(cache.lookup_all(&keys).await) {
//!     match hit {
//!         Ok(Some(entry)) => println!("{key}: cached, layer {:?}", entry.layer),
//!         Ok(None) => println!("{key}: miss"),
//!         Err(err) => println!("{key}: cache unavailable ({err}), treated as a miss"),
//!     }
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod base;
mod clock;
mod error;
pub mod key;
pub mod prune;
pub mod stage;
pub mod store;

pub use base::{BaseImage, BaseImageDir, WarmReport};
pub use clock::Clock;
pub use error::CacheError;
pub use key::{
    run_environment, step_key, CacheKey, CopyInput, FileEntry, FileKind, KeyChain, MkdirInput,
    Parent, RemoteSource, RemoteValidator, RunInput, SourceContent, StepInput,
};
pub use prune::{PruneFailure, PruneOptions, PruneReport, PrunedItem, PrunedKind, RefusedDelete};
pub use stage::{RecordedBase, StageLocator, StageRecord, STAGE_RECORD_MEDIA_TYPE};
pub use store::{
    CacheEntry, CacheStore, CachedLayer, LayerFile, NewEntry, StoredEntry, ANNOTATION_CREATED_UNIX,
    ANNOTATION_KEY, DEFAULT_TTL,
};
