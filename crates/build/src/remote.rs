//! Remote inputs pinned before a stage's cache keys are computed, so that a key says what the
//! step will read: the platform manifest digest of each `COPY --from=IMAGE`, and for each
//! `ADD URL` without `--checksum` the server's validators (`HEAD`) or, when it gives none or
//! refuses `HEAD`, the content itself, downloaded once and reused by the step.
//!
//! A pin is taken once per build and kept: two stages reading the same image or URL key and
//! copy the same content. A step that runs after being keyed reads its input through the
//! pin too (the image by digest, the download as fetched), or, for validators, checks that
//! its own download came with the same ones; otherwise the step's key would describe
//! content it did not copy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use futures::future::join_all;
use kiln_dockerfile::{FileSource, Instruction, Source, Step};
use kiln_oci::{Digest, Platform, Reference};
use kiln_registry::Client;

use crate::fetch::{Downloaded, Validators};

/// How the content of a URL is pinned for the cache.
#[derive(Debug, Clone)]
pub enum UrlPin {
    /// The server's validators: a cache hit needs no download, and a download made when the
    /// step runs must come with the same validators to be cached under the key.
    Validators(Validators),
    /// Downloaded while keying: the key holds the content digest and the step copies this file.
    Downloaded(Downloaded),
}

/// The pins of one build, shared by its stages.
#[derive(Debug)]
pub struct RemotePins {
    /// Where downloads made while keying are kept until the build ends.
    dir: PathBuf,
    downloads: AtomicUsize,
    images: Mutex<HashMap<String, Digest>>,
    urls: Mutex<HashMap<String, UrlPin>>,
}

/// What a stage needs pinned, before any of it is.
struct Wanted {
    images: Vec<String>,
    urls: Vec<String>,
}

impl RemotePins {
    /// No pins yet; downloads made while keying go below `dir`.
    pub fn new(dir: PathBuf) -> Self {
        RemotePins {
            dir,
            downloads: AtomicUsize::new(0),
            images: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// The manifest digest `image` (as written in `COPY --from`) was pinned to.
    pub fn image(&self, image: &str) -> Option<Digest> {
        self.images.lock().expect("image pins").get(image).cloned()
    }

    /// The reference to pull for `image`: pinned to its digest when it was keyed by one, so
    /// the copy reads what the key describes even if the tag moved since.
    pub fn image_to_pull(&self, image: &str) -> String {
        match (self.image(image), Reference::parse(image)) {
            (Some(digest), Ok(reference)) => reference.with_digest(digest).to_string(),
            _ => image.to_owned(),
        }
    }

    /// How `url` was pinned, if it was.
    pub fn url(&self, url: &str) -> Option<UrlPin> {
        self.urls.lock().expect("url pins").get(url).cloned()
    }

    /// Pins every remote input of `steps` that is not pinned yet, all at once. An input that
    /// cannot be pinned (unreachable, refused) stays unpinned: its step is not keyed, and
    /// when it runs it reports the real error.
    pub async fn pin(&self, steps: &[Step], client: &Client, platform: &Platform) {
        let wanted = self.wanted(steps);
        let images = join_all(wanted.images.into_iter().map(|image| async move {
            let resolved = crate::base::resolve_manifest(client, &image, platform).await;
            (image, resolved.map(|r| r.digest().clone()))
        }));
        let urls = join_all(
            wanted
                .urls
                .into_iter()
                .map(|url| async move { (url.clone(), self.pin_url(&url).await) }),
        );
        let (images, urls) = futures::join!(images, urls);
        (self.images.lock().expect("image pins")).extend(
            images
                .into_iter()
                .filter_map(|(image, d)| Some((image, d.ok()?))),
        );
        (self.urls.lock().expect("url pins"))
            .extend(urls.into_iter().filter_map(|(url, pin)| Some((url, pin?))));
    }

    fn wanted(&self, steps: &[Step]) -> Wanted {
        let images = self.images.lock().expect("image pins");
        let urls = self.urls.lock().expect("url pins");
        let mut wanted = Wanted {
            images: Vec::new(),
            urls: Vec::new(),
        };
        for step in steps {
            match &step.instruction {
                Instruction::Copy(files) => {
                    if let Some(Source::Image(image)) = &files.from {
                        if !images.contains_key(image) && !wanted.images.contains(image) {
                            wanted.images.push(image.clone());
                        }
                    }
                }
                Instruction::Add(files) if files.checksum.is_none() => {
                    for source in &files.sources {
                        let FileSource::Path(path) = source else {
                            continue;
                        };
                        if crate::fetch::is_http_url(path)
                            && !crate::fetch::is_git_source(path)
                            && !urls.contains_key(path)
                            && !wanted.urls.contains(path)
                        {
                            wanted.urls.push(path.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        wanted
    }

    /// The validators of `url`, or its content when it has none.
    async fn pin_url(&self, url: &str) -> Option<UrlPin> {
        if let Ok(validators) = crate::fetch::probe(url).await {
            if !validators.is_empty() {
                return Some(UrlPin::Validators(validators));
            }
        }
        let n = self.downloads.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(n.to_string());
        std::fs::create_dir_all(&dir).ok()?;
        match crate::fetch::download(url, None, &dir).await {
            Ok(downloaded) => Some(UrlPin::Downloaded(downloaded)),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }
}
