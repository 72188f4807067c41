//! Remote inputs pinned before a stage's cache keys are computed, so that a key says what the
//! step will read: the platform manifest digest of each `COPY --from=IMAGE` and
//! `RUN --mount=from=IMAGE`, and for each `ADD URL` without `--checksum` the server's
//! validators (`HEAD`) or, when it gives none or refuses `HEAD`, the content itself,
//! downloaded once and reused by the step; for each `ADD` of a git repository, the commit its
//! ref names (asked as `git ls-remote` does, through gix), which the step then checks out.
//!
//! Pinning starts with the stage's first round of requests (its base manifest and cache
//! record) as far as it can before the base config is known: [`RemotePins::prefetch`] pins the
//! images and asks for the URLs' validators of the steps as written; [`RemotePins::pin`] then
//! completes what the base's ENV or ONBUILD triggers changed and downloads the URLs that gave no
//! validators. A cached rebuild of a stage with `COPY --from=IMAGE` thus needs no extra round.
//!
//! A pin is taken once per build and kept: two stages reading the same image or URL key and
//! copy the same content. A step that runs after being keyed reads its input through the
//! pin too (the image by digest, the download as fetched), or, for validators, checks that
//! its own download came with the same ones; otherwise the step's key would describe
//! content it did not copy.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use futures::future::join_all;
use kiln_context::{GitCommit, GitRepository};
use kiln_oci::{Digest, Platform};
use kiln_plan::{CopySource, Operation, Source, Step};
use kiln_registry::Client;

use crate::base::ResolvedManifest;
use crate::ops::copy::fetch::{Downloaded, Validators};

/// How the content of a URL is pinned for the cache.
#[derive(Debug, Clone)]
pub(crate) enum UrlPin {
    /// The server's validators: a cache hit needs no download, and a download made when the
    /// step runs must come with the same validators to be cached under the key.
    Validators(Validators),
    /// Downloaded while keying: the key holds the content digest and the step copies this file.
    Downloaded(Downloaded),
}

/// The pins of one build, shared by its stages.
#[derive(Debug)]
pub(crate) struct RemotePins {
    /// Where downloads made while keying are kept until the build ends.
    dir: PathBuf,
    downloads: AtomicUsize,
    /// Each image's platform manifest, kept so that a step that has to copy from it pulls by
    /// what was keyed without asking for the manifest again.
    images: Mutex<HashMap<String, ResolvedManifest>>,
    urls: Mutex<HashMap<String, UrlPin>>,
    /// The commit each git source's ref named when it was asked (`git ls-remote`).
    commits: Mutex<HashMap<String, GitCommit>>,
    /// URLs already asked for validators that gave none: [`RemotePins::pin`] downloads them
    /// without asking again.
    probed: Mutex<HashSet<String>>,
}

/// What a stage needs pinned, before any of it is.
struct Wanted {
    images: Vec<String>,
    urls: Vec<String>,
    git: Vec<String>,
}

impl RemotePins {
    /// No pins yet; downloads made while keying go below `dir`.
    pub(crate) fn new(dir: PathBuf) -> Self {
        RemotePins {
            dir,
            downloads: AtomicUsize::new(0),
            images: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
            commits: Mutex::new(HashMap::new()),
            probed: Mutex::new(HashSet::new()),
        }
    }

    /// The manifest digest `image` (as written in `COPY --from`) was pinned to.
    pub(crate) fn image(&self, image: &str) -> Option<Digest> {
        let images = self.images.lock().expect("image pins");
        images.get(image).map(|manifest| manifest.digest().clone())
    }

    /// The manifest `image` was pinned to, for a copy that must read what the key describes
    /// even if the tag moved since.
    pub(crate) fn image_manifest(&self, image: &str) -> Option<ResolvedManifest> {
        self.images.lock().expect("image pins").get(image).cloned()
    }

    /// The commit the git source `source` (as written in `ADD`) was pinned to.
    pub(crate) fn git(&self, source: &str) -> Option<GitCommit> {
        self.commits.lock().expect("git pins").get(source).cloned()
    }

    /// How `url` was pinned, if it was.
    pub(crate) fn url(&self, url: &str) -> Option<UrlPin> {
        self.urls.lock().expect("url pins").get(url).cloned()
    }

    /// What can be pinned of `steps` before the base config is known, all at once: the images
    /// of `COPY --from` and `RUN --mount=from=`, the validators of each `ADD` URL and the
    /// commit of each `ADD` git ref. Nothing is downloaded, so a step whose expansion the
    /// base's ENV changes later costs at most one wasted request.
    pub(crate) async fn prefetch(&self, steps: &[Step], client: &Client, platform: &Platform) {
        self.pin_wanted(self.wanted(steps), client, platform, false)
            .await
    }

    /// Pins every remote input of `steps` that is not pinned yet, all at once. An input that
    /// cannot be pinned (unreachable, refused) stays unpinned: its step is not keyed, and
    /// when it runs it reports the real error.
    pub(crate) async fn pin(&self, steps: &[Step], client: &Client, platform: &Platform) {
        self.pin_wanted(self.wanted(steps), client, platform, true)
            .await
    }

    async fn pin_wanted(
        &self,
        wanted: Wanted,
        client: &Client,
        platform: &Platform,
        download: bool,
    ) {
        let images = join_all(wanted.images.into_iter().map(|image| async move {
            let resolved = crate::base::resolve_manifest(client, &image, platform).await;
            (image, resolved)
        }));
        let urls = join_all(wanted.urls.into_iter().map(|url| async move {
            let pin = self.pin_url(&url, download).await;
            (url, pin)
        }));
        // A ref listing is blocking network I/O (gix's blocking client): each runs on a
        // blocking thread, all at once.
        let commits = join_all(wanted.git.into_iter().map(|source| async move {
            let resolved = tokio::task::spawn_blocking({
                let source = source.clone();
                move || GitRepository::parse(&source).and_then(|repo| repo.resolve())
            })
            .await;
            (source, resolved)
        }));
        let (images, urls, commits) = futures::join!(images, urls, commits);
        (self.commits.lock().expect("git pins")).extend(
            commits
                .into_iter()
                .filter_map(|(source, resolved)| Some((source, resolved.ok()?.ok()?))),
        );
        (self.images.lock().expect("image pins")).extend(
            images
                .into_iter()
                .filter_map(|(image, m)| Some((image, m.ok()?))),
        );
        (self.urls.lock().expect("url pins"))
            .extend(urls.into_iter().filter_map(|(url, pin)| Some((url, pin?))));
    }

    fn wanted(&self, steps: &[Step]) -> Wanted {
        let images = self.images.lock().expect("image pins");
        let urls = self.urls.lock().expect("url pins");
        let commits = self.commits.lock().expect("git pins");
        let mut wanted = Wanted {
            images: Vec::new(),
            urls: Vec::new(),
            git: Vec::new(),
        };
        for step in steps {
            let read_from: Vec<&Option<Source>> = match &step.operation {
                Operation::Copy(copy) => vec![&copy.from],
                Operation::Run(run) => run.mounts.iter().map(|m| &m.from).collect(),
                _ => Vec::new(),
            };
            for from in read_from {
                if let Some(Source::Image(image)) = from {
                    if !images.contains_key(image) && !wanted.images.contains(image) {
                        wanted.images.push(image.clone());
                    }
                }
            }
            let Operation::Copy(copy) = &step.operation else {
                continue;
            };
            for source in &copy.sources {
                match source {
                    CopySource::Git(url)
                        if !commits.contains_key(url) && !wanted.git.contains(url) =>
                    {
                        wanted.git.push(url.clone());
                    }
                    CopySource::Url(url)
                        if copy.checksum.is_none()
                            && !urls.contains_key(url)
                            && !wanted.urls.contains(url) =>
                    {
                        wanted.urls.push(url.clone());
                    }
                    _ => {}
                }
            }
        }
        wanted
    }

    /// The validators of `url`, or its content when it has none and `download` allows.
    async fn pin_url(&self, url: &str, download: bool) -> Option<UrlPin> {
        let asked = self.probed.lock().expect("probed urls").contains(url);
        if !asked {
            if let Ok(validators) = crate::ops::copy::fetch::probe(url).await {
                if !validators.is_empty() {
                    return Some(UrlPin::Validators(validators));
                }
            }
            self.probed
                .lock()
                .expect("probed urls")
                .insert(url.to_owned());
        }
        if !download {
            return None;
        }
        let n = self.downloads.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(n.to_string());
        std::fs::create_dir_all(&dir).ok()?;
        match crate::ops::copy::fetch::download(url, None, &dir).await {
            Ok(downloaded) => Some(UrlPin::Downloaded(downloaded)),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dir);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_dockerfile::{Dockerfile, PlanOptions};
    use kiln_plan::BaseFacts;
    use kiln_testkit::http::{StaticServer, Validators};

    /// Pins for a one-step Dockerfile that ADDs `a.txt` from a server sending `validators`.
    struct Fixture {
        server: StaticServer,
        url: String,
        steps: Vec<Step>,
        pins: RemotePins,
        client: Client,
        platform: Platform,
        runtime: tokio::runtime::Runtime,
        _dirs: [tempfile::TempDir; 2],
    }

    impl Fixture {
        fn new(validators: Validators) -> Fixture {
            let served = tempfile::tempdir().unwrap();
            std::fs::write(served.path().join("a.txt"), "served\n").unwrap();
            let server = StaticServer::start_with(served.path(), validators);
            let url = format!("{}/a.txt", server.url());
            let text = format!("FROM scratch\nADD {url} /a.txt\n");
            let plan = Dockerfile::parse(&text)
                .unwrap()
                .lower(&text, "Dockerfile", &PlanOptions::default())
                .unwrap();
            let steps = plan.stages()[0]
                .steps
                .lower(&BaseFacts::default(), &crate::stage::trees::NoStages)
                .unwrap();
            let downloads = tempfile::tempdir().unwrap();
            Fixture {
                pins: RemotePins::new(downloads.path().to_path_buf()),
                client: Client::new(kiln_registry::RegistryOptions::default()).unwrap(),
                platform: Platform::host(),
                runtime: tokio::runtime::Runtime::new().unwrap(),
                server,
                url,
                steps,
                _dirs: [served, downloads],
            }
        }

        fn prefetch(&self) {
            (self.runtime).block_on(
                self.pins
                    .prefetch(&self.steps, &self.client, &self.platform),
            );
        }

        fn pin(&self) {
            (self.runtime).block_on(self.pins.pin(&self.steps, &self.client, &self.platform));
        }
    }

    /// The first round only asks; the second downloads what gave no validators without asking
    /// the server again, and the step later copies that download.
    #[test]
    fn prefetching_asks_for_validators_and_pinning_downloads_the_rest_once() {
        let fixture = Fixture::new(Validators::None);
        fixture.prefetch();
        assert!(fixture.pins.url(&fixture.url).is_none());
        assert_eq!(fixture.server.requests(), vec!["HEAD /a.txt".to_owned()]);

        fixture.pin();
        let pin = fixture.pins.url(&fixture.url);
        assert!(matches!(pin, Some(UrlPin::Downloaded(_))));
        fixture.pin();
        assert_eq!(
            fixture.server.requests(),
            vec!["HEAD /a.txt".to_owned(), "GET /a.txt".to_owned()]
        );
    }

    #[test]
    fn validators_found_while_prefetching_are_the_pin() {
        let fixture = Fixture::new(Validators::ContentEtag);
        fixture.prefetch();
        fixture.pin();
        let pin = fixture.pins.url(&fixture.url);
        assert!(matches!(pin, Some(UrlPin::Validators(_))));
        assert_eq!(fixture.server.requests(), vec!["HEAD /a.txt".to_owned()]);
    }
}
