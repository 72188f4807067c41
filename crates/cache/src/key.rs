//! Step cache keys: a chain of SHA-256 digests, one per build step.
//!
//! A step's key covers exactly what the step can observe, so two builds get the same key if and
//! only if the step would produce the same result:
//!
//! - the parent: the base image's manifest digest (or scratch, or the final key of the stage
//!   this stage is `FROM`) for the first step, the previous step's key after that;
//! - the platform;
//! - the operation (kiln-plan's [`kiln_plan::Operation`]) with all its options;
//! - for RUN, the environment the command will really see (image `ENV` plus the ARGs declared
//!   in scope, see [`run_environment`]), user, working directory, shell, the `--mount` specs and
//!   the content behind bind mounts. A cache mount's content is not covered (it is a cache, not
//!   an input); a secret's id is, its value never is;
//! - for a copy, the content of the sources ([`SourceContent`]): names relative to their
//!   root, types, modes, owners when kept, link targets, file contents and which names are hard
//!   links of one file; for a URL or git source, the checksum, the server's validators or the
//!   commit ([`RemoteValidator`]). A copy made on its own (`--link`) is keyed without the steps
//!   below it, so its entry is found again when only they change; the steps after it still
//!   chain from everything below.
//!
//! Every variable-length field is written with its length in front, and every optional or
//! enumerated field with a tag byte, so two different inputs never produce the same byte
//! stream. Build args that no stage declares never reach a key, so they bust nothing; a
//! declared ARG reaches only the RUN steps that follow its declaration (and, through the
//! chain, the steps after those).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use kiln_oci::{Digest, Hasher, Platform};
use kiln_plan::{Chmod, ConfigEdit, Copy, CopySource, Mount, MountType, Run, RunProgram, Source};

/// Starts every key's byte stream; bump it whenever the encoding below changes, so keys
/// written by an older Kiln are simply never matched.
const FORMAT_TAG: &[u8] = b"kiln-cache-key-v2";

/// A step's cache key: a SHA-256 digest over the step's framed inputs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(Digest);

impl CacheKey {
    /// The key as a digest (`sha256:...`).
    pub fn digest(&self) -> &Digest {
        &self.0
    }

    /// The tag a cache entry for this key carries in a registry repository or OCI layout: the
    /// 64 hex digits of the digest, a valid tag (at most 128 characters of `[0-9a-f]`).
    pub fn tag(&self) -> String {
        self.0.hex().to_owned()
    }

    /// The key whose digest is `digest` (as stored in a stage record).
    pub fn from_digest(digest: Digest) -> CacheKey {
        CacheKey(digest)
    }

    /// The key a [`CacheKey::tag`] names, or `None` if `tag` is not one.
    pub fn from_tag(tag: &str) -> Option<CacheKey> {
        Digest::parse(&format!("sha256:{tag}")).ok().map(CacheKey)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// What the first step of a stage builds on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// `FROM scratch`.
    Scratch,
    /// `FROM image`: the digest of the platform-specific image manifest that was pulled (not
    /// of an index), so a re-pushed tag busts the cache.
    Image(Digest),
    /// The previous step's key, or for `FROM stage` the key of that stage's last step.
    Key(CacheKey),
}

/// The kind of a file system entry, as a COPY source listing records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device with its device number.
    CharDevice(u64),
    /// A block device with its device number.
    BlockDevice(u64),
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

/// One entry of a copy's source, for callers that list sources themselves rather than hash
/// their trees into a [`SourceContent::Tree`] (which covers the same fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// The path relative to the source's root (`.` for the root), as the copy will name it.
    pub path: PathBuf,
    /// File, directory, link, ...
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    /// `(uid, gid)` when the copy keeps the source's owners; `None` when `--chown` or COPY's
    /// default (root) decides the owner, so the source owner cannot matter.
    pub owner: Option<(u32, u32)>,
    /// A symlink's target, as stored in the link.
    pub link_target: Option<PathBuf>,
    /// The SHA-256 of a regular file's content.
    pub content: Option<Digest>,
}

impl FileEntry {
    /// Describes an entry from its `lstat` metadata. `link_target` is required for symlinks and
    /// `content` for regular files; `keep_owner` says whether the owner is part of the copy.
    pub fn from_metadata(
        path: impl Into<PathBuf>,
        metadata: &Metadata,
        link_target: Option<PathBuf>,
        content: Option<Digest>,
        keep_owner: bool,
    ) -> FileEntry {
        let file_type = metadata.file_type();
        let kind = if file_type.is_file() {
            FileKind::File
        } else if file_type.is_dir() {
            FileKind::Directory
        } else if file_type.is_symlink() {
            FileKind::Symlink
        } else if file_type.is_char_device() {
            FileKind::CharDevice(metadata.rdev())
        } else if file_type.is_block_device() {
            FileKind::BlockDevice(metadata.rdev())
        } else if file_type.is_fifo() {
            FileKind::Fifo
        } else {
            FileKind::Socket
        };
        FileEntry {
            path: path.into(),
            kind,
            mode: metadata.mode() & 0o7777,
            owner: keep_owner.then(|| (metadata.uid(), metadata.gid())),
            link_target,
            content,
        }
    }
}

/// The files a COPY/ADD (or a RUN bind mount) reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceContent {
    /// A digest of the sources' trees, made by the caller (the engine hashes build context
    /// sources with kiln-context), covering names, types, modes, owners where the copy keeps
    /// them, link targets, hard-link structure and contents.
    Tree([u8; 32]),
    /// An explicit listing: each source's label (the matched path) and its entries in order.
    Files(Vec<(String, Vec<FileEntry>)>),
    /// `--from=stage`: the key of that stage's last step, which determines its file system.
    Stage(CacheKey),
    /// `--from=image`: the image's manifest digest; the copied paths are in the instruction.
    Image(Digest),
    /// Nothing is read from outside the instruction (only heredoc sources).
    None,
}

/// How an ADD of a URL (or git repository) pins what it downloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteValidator {
    /// `ADD --checksum=sha256:...`: the content is fixed by the checksum.
    Checksum(String),
    /// The server's validators from a `HEAD`/`GET`: at least one must be present, otherwise
    /// the caller downloads and uses [`RemoteValidator::Content`].
    Http {
        /// `ETag`.
        etag: Option<String>,
        /// `Last-Modified`.
        last_modified: Option<String>,
    },
    /// The SHA-256 of the downloaded content.
    Content(Digest),
    /// A git source resolved to this commit id.
    GitCommit(String),
}

/// One remote source of an ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSource {
    /// The URL as written (expanded).
    pub url: String,
    /// What pins its content.
    pub validator: RemoteValidator,
}

/// A run step's inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInput {
    /// The operation (program, mounts, network, security; its build variables are keyed
    /// through `env`).
    pub run: Run,
    /// The environment the command sees, from [`run_environment`]. Never put unkeyed (proxy)
    /// variables or secret values here; variables a secret mount exposes through `env=` are
    /// dropped from the key in any case.
    pub env: Vec<(String, String)>,
    /// The user the command runs as (config `User`, empty for root by default).
    pub user: String,
    /// The working directory (config `WorkingDir`).
    pub workdir: String,
    /// The shell for shell-form commands (config `Shell`, default `["/bin/sh", "-c"]`).
    pub shell: Vec<String>,
    /// The content behind each mount that [`reads_source`] (bind mounts, and cache mounts
    /// seeded `from=` a stage or image), by mount target. Such a mount without an entry here is
    /// keyed by its spec alone, so supply one for each.
    pub bind_contents: BTreeMap<String, SourceContent>,
}

/// Whether a RUN observes what `mount` is made from, so that its key needs that content: a
/// bind mount shows its source, and a cache mount with `from=` starts as a copy of it when the
/// cache is new. A plain cache mount's contents are never part of a key.
pub fn reads_source(mount: &Mount) -> bool {
    match mount.kind {
        MountType::Bind => true,
        MountType::Cache => mount.from.is_some(),
        _ => false,
    }
}

/// A copy step's inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyInput {
    /// The operation (sources as written, destination and every option).
    pub copy: Copy,
    /// The content of the sources read from a tree (the context, a stage, an image).
    pub content: SourceContent,
    /// The remote sources (URLs, git repositories), in operation order.
    pub remote: Vec<RemoteSource>,
}

/// A mkdir step's inputs: the directory as written; the working directory and user it
/// depends on are keyed by the steps before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MkdirInput {
    /// The directory as written.
    pub path: String,
    /// Whether it becomes the working directory.
    pub set_working_dir: bool,
    /// The working directory it is relative to.
    pub workdir: String,
    /// The user who owns what is created.
    pub user: String,
}

/// What one build step contributes to its key besides the parent and platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepInput {
    /// A run.
    Run(RunInput),
    /// A copy.
    Copy(CopyInput),
    /// A mkdir.
    Mkdir(MkdirInput),
    /// An edit of the image config only.
    Config(ConfigEdit),
}

impl StepInput {
    /// Whether the step is keyed without the steps below it (a copy with `link`).
    pub fn is_linked(&self) -> bool {
        matches!(self, StepInput::Copy(copy) if copy.copy.link)
    }
}

/// The key of one step on top of `parent` for `platform`.
pub fn step_key(parent: &Parent, platform: &Platform, input: &StepInput) -> CacheKey {
    let mut w = KeyWriter::new();
    write_parent(&mut w, parent);
    w.str(&platform.normalized().to_string());
    write_input(&mut w, input);
    w.finish()
}

fn write_input(w: &mut KeyWriter, input: &StepInput) {
    match input {
        StepInput::Run(run) => {
            w.tag(b'R');
            write_run(w, run);
        }
        StepInput::Copy(copy) => {
            w.tag(b'C');
            write_copy(w, &copy.copy);
            write_content(w, &copy.content);
            w.len(copy.remote.len());
            for remote in &copy.remote {
                write_remote(w, remote);
            }
        }
        StepInput::Mkdir(mkdir) => {
            w.tag(b'D');
            w.str(&mkdir.path);
            w.tag(u8::from(mkdir.set_working_dir));
            w.str(&mkdir.workdir);
            w.str(&mkdir.user);
        }
        StepInput::Config(edit) => {
            w.tag(b'M');
            // The derived Debug form names every variant and field and quotes every string,
            // so it is an unambiguous encoding of the typed edit.
            w.str(&format!("{edit:?}"));
        }
    }
}

/// The key of a step made on its own (a copy with `link`): the same for any parent.
fn linked_key(platform: &Platform, input: &StepInput) -> CacheKey {
    let mut w = KeyWriter::new();
    w.tag(b'l');
    w.str(&platform.normalized().to_string());
    write_input(&mut w, input);
    w.finish()
}

/// What the steps after a linked step chain from: what was below it and the linked step.
fn after_linked(parent: &Parent, linked: &CacheKey) -> CacheKey {
    let mut w = KeyWriter::new();
    w.tag(b'L');
    write_parent(&mut w, parent);
    w.str(&linked.to_string());
    w.finish()
}

/// Computes the keys of a stage's steps one after another, each on top of the previous one.
#[derive(Clone, Debug)]
pub struct KeyChain {
    parent: Parent,
    platform: Platform,
    every_step_layered: bool,
}

impl KeyChain {
    /// A chain starting from the stage's base.
    pub fn new(base: Parent, platform: Platform) -> KeyChain {
        KeyChain {
            parent: base,
            platform,
            every_step_layered: false,
        }
    }

    /// A chain for builds where every step makes a layer, an empty one included
    /// (`--force-build-metadata`). Its keys differ from the usual ones because the entries do:
    /// a step that makes no layer in a usual build has one here, and a hit from either kind of
    /// build would give the other the wrong layers.
    pub fn every_step_layered(self) -> KeyChain {
        KeyChain {
            every_step_layered: true,
            ..self
        }
    }

    /// The key of the next step, under which its cache entry is found. It becomes the parent
    /// of the step after, except for a linked step, whose key leaves out what is below it: the
    /// step after chains from both.
    pub fn next_key(&mut self, input: &StepInput) -> CacheKey {
        if input.is_linked() {
            let key = self.layered(linked_key(&self.platform, input));
            self.parent = Parent::Key(after_linked(&self.parent, &key));
            return key;
        }
        let key = self.layered(step_key(&self.parent, &self.platform, input));
        self.parent = Parent::Key(key.clone());
        key
    }

    fn layered(&self, key: CacheKey) -> CacheKey {
        if !self.every_step_layered {
            return key;
        }
        let mut w = KeyWriter::new();
        w.tag(b'F');
        w.str(&key.to_string());
        w.finish()
    }

    /// The key of the last step so far (what a stage `FROM` this one or a `COPY --from` uses),
    /// or the base when no step has been keyed.
    pub fn current(&self) -> &Parent {
        &self.parent
    }
}

/// The environment a RUN sees, for its key and its execution: the image environment
/// (`image_env`, inherited `ENV` plus the stage's `ENV`s so far), then each ARG declared in scope
/// (`declared_args`: name and default, in declaration order) that has a value, taken from
/// `build_args` when given there and from its default otherwise, unless an ENV of the same name
/// shadows it. Build args that are not declared are ignored; unkeyed variables (proxy settings,
/// which BuildKit passes to RUN but keeps out of the cache) are never passed here.
pub fn run_environment(
    image_env: &[(String, String)],
    declared_args: &[(String, Option<String>)],
    build_args: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = image_env.to_vec();
    for (name, default) in declared_args {
        let Some(value) = build_args.get(name).or(default.as_ref()) else {
            continue;
        };
        if let Some(slot) = env.iter_mut().find(|(k, _)| k == name) {
            // A later ARG redeclaration in scope replaces an earlier one; an ENV shadows it.
            if !image_env.iter().any(|(k, _)| k == name) {
                slot.1 = value.clone();
            }
        } else {
            env.push((name.clone(), value.clone()));
        }
    }
    env
}

fn write_parent(w: &mut KeyWriter, parent: &Parent) {
    match parent {
        Parent::Scratch => w.tag(b's'),
        Parent::Image(digest) => {
            w.tag(b'i');
            w.str(&digest.to_string());
        }
        Parent::Key(key) => {
            w.tag(b'k');
            w.str(&key.to_string());
        }
    }
}

fn write_run(w: &mut KeyWriter, run: &RunInput) {
    let command = &run.run;
    match &command.program {
        RunProgram::Shell(script) => {
            w.tag(b's');
            w.str(script);
        }
        RunProgram::Exec(argv) => {
            w.tag(b'e');
            w.strs(argv);
        }
        RunProgram::Script { name, content } => {
            w.tag(b'f');
            w.str(name);
            w.str(content);
        }
    }
    w.str(&format!("{:?}", command.network));
    w.str(&format!("{:?}", command.security));
    w.len(command.mounts.len());
    for mount in &command.mounts {
        write_mount(w, mount);
        if reads_source(mount) {
            match run.bind_contents.get(&mount.target) {
                Some(content) => {
                    w.tag(1);
                    write_content(w, content);
                }
                None => w.tag(0),
            }
        }
    }
    // A secret exposed as an environment variable must not carry its value into the key,
    // whatever the caller put into `env`.
    let secret_env: BTreeSet<&str> = command
        .mounts
        .iter()
        .filter(|m| m.kind == MountType::Secret)
        .filter_map(|m| m.env.as_deref())
        .collect();
    let env: Vec<&(String, String)> = run
        .env
        .iter()
        .filter(|(k, _)| !secret_env.contains(k.as_str()))
        .collect();
    w.len(env.len());
    for (k, v) in env {
        w.str(k);
        w.str(v);
    }
    w.str(&run.user);
    w.str(&run.workdir);
    w.strs(&run.shell);
}

fn write_mount(w: &mut KeyWriter, mount: &Mount) {
    w.str(&mount.kind.to_string());
    w.str(&mount.target);
    w.opt_str(mount.source.as_deref());
    write_from(w, mount.from.as_ref());
    w.tag(u8::from(mount.read_only));
    w.opt_str(mount.id.as_deref());
    w.str(&format!("{:?}", mount.sharing));
    w.opt_u64(mount.mode.map(u64::from));
    w.opt_u64(mount.uid.map(u64::from));
    w.opt_u64(mount.gid.map(u64::from));
    w.opt_u64(mount.size);
    w.tag(u8::from(mount.required));
    w.opt_str(mount.env.as_deref());
}

fn write_from(w: &mut KeyWriter, from: Option<&Source>) {
    match from {
        None => w.tag(0),
        Some(Source::Stage(index)) => {
            w.tag(1);
            w.u64(*index as u64);
        }
        Some(Source::Image(image)) => {
            w.tag(2);
            w.str(image);
        }
        Some(Source::Local(dir)) => {
            w.tag(3);
            w.str(dir);
        }
    }
}

fn write_sources(w: &mut KeyWriter, sources: &[CopySource]) {
    w.len(sources.len());
    for source in sources {
        match source {
            CopySource::Path(path) => {
                w.tag(b'p');
                w.str(path);
            }
            CopySource::Inline { name, content } => {
                w.tag(b'h');
                w.str(name);
                w.str(content);
            }
            CopySource::Url(url) => {
                w.tag(b'u');
                w.str(url);
            }
            CopySource::Git(url) => {
                w.tag(b'g');
                w.str(url);
            }
            CopySource::Symlink { name, target } => {
                w.tag(b'l');
                w.str(name);
                w.str(target);
            }
        }
    }
}

fn write_chmod(w: &mut KeyWriter, chmod: Option<&Chmod>) {
    match chmod {
        None => w.tag(0),
        Some(Chmod::Octal(mode)) => {
            w.tag(1);
            w.u64(u64::from(*mode));
        }
        Some(Chmod::Symbolic(mode)) => {
            w.tag(2);
            w.str(mode);
        }
    }
}

fn write_copy(w: &mut KeyWriter, copy: &Copy) {
    write_sources(w, &copy.sources);
    w.str(&copy.dest);
    write_from(w, copy.from.as_ref());
    w.opt_str(copy.chown.as_deref());
    write_chmod(w, copy.chmod.as_ref());
    w.tag(u8::from(copy.link));
    w.tag(u8::from(copy.parents));
    w.strs(&copy.exclude);
    w.tag(u8::from(copy.unpack));
    w.opt_str(copy.checksum.as_deref());
    w.tag(u8::from(copy.keep_git_dir));
    // Written only when set, so the keys of every other copy stay what they were; no content
    // encoding that follows starts with this tag.
    if let Some(layer) = &copy.reuse_layer {
        w.tag(b'u');
        w.str(layer);
    }
}

fn write_content(w: &mut KeyWriter, content: &SourceContent) {
    match content {
        SourceContent::Tree(digest) => {
            w.tag(b't');
            w.bytes(digest);
        }
        SourceContent::Files(sources) => {
            w.tag(b'f');
            w.len(sources.len());
            for (label, entries) in sources {
                w.str(label);
                w.len(entries.len());
                for entry in entries {
                    write_entry(w, entry);
                }
            }
        }
        SourceContent::Stage(key) => {
            w.tag(b's');
            w.str(&key.to_string());
        }
        SourceContent::Image(digest) => {
            w.tag(b'i');
            w.str(&digest.to_string());
        }
        SourceContent::None => w.tag(b'n'),
    }
}

fn write_entry(w: &mut KeyWriter, entry: &FileEntry) {
    w.bytes(entry.path.as_os_str().as_bytes());
    match entry.kind {
        FileKind::File => w.tag(b'f'),
        FileKind::Directory => w.tag(b'd'),
        FileKind::Symlink => w.tag(b'l'),
        FileKind::CharDevice(rdev) => {
            w.tag(b'c');
            w.u64(rdev);
        }
        FileKind::BlockDevice(rdev) => {
            w.tag(b'b');
            w.u64(rdev);
        }
        FileKind::Fifo => w.tag(b'p'),
        FileKind::Socket => w.tag(b's'),
    }
    w.u64(u64::from(entry.mode & 0o7777));
    match entry.owner {
        Some((uid, gid)) => {
            w.tag(1);
            w.u64(u64::from(uid));
            w.u64(u64::from(gid));
        }
        None => w.tag(0),
    }
    match &entry.link_target {
        Some(target) => {
            w.tag(1);
            w.bytes(target.as_os_str().as_bytes());
        }
        None => w.tag(0),
    }
    w.opt_str(entry.content.as_ref().map(|d| d.to_string()).as_deref());
}

fn write_remote(w: &mut KeyWriter, remote: &RemoteSource) {
    w.str(&remote.url);
    match &remote.validator {
        RemoteValidator::Checksum(checksum) => {
            w.tag(b'c');
            w.str(checksum);
        }
        RemoteValidator::Http {
            etag,
            last_modified,
        } => {
            w.tag(b'h');
            w.opt_str(etag.as_deref());
            w.opt_str(last_modified.as_deref());
        }
        RemoteValidator::Content(digest) => {
            w.tag(b'd');
            w.str(&digest.to_string());
        }
        RemoteValidator::GitCommit(commit) => {
            w.tag(b'g');
            w.str(commit);
        }
    }
}

/// Writes the framed key stream into a SHA-256 hasher.
struct KeyWriter(Hasher);

impl KeyWriter {
    fn new() -> KeyWriter {
        let mut w = KeyWriter(Hasher::sha256());
        w.bytes(FORMAT_TAG);
        w
    }

    fn tag(&mut self, tag: u8) {
        self.0.update(&[tag]);
    }

    fn u64(&mut self, value: u64) {
        self.0.update(&value.to_le_bytes());
    }

    fn len(&mut self, len: usize) {
        self.u64(len as u64);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.len(bytes.len());
        self.0.update(bytes);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn strs(&mut self, list: &[String]) {
        self.len(list.len());
        for s in list {
            self.str(s);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.tag(1);
                self.str(s);
            }
            None => self.tag(0),
        }
    }

    fn opt_u64(&mut self, value: Option<u64>) {
        match value {
            Some(v) => {
                self.tag(1);
                self.u64(v);
            }
            None => self.tag(0),
        }
    }

    fn finish(self) -> CacheKey {
        CacheKey(self.0.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(chain: KeyChain) -> Vec<CacheKey> {
        let mut chain = chain;
        ["/a", "/b"]
            .iter()
            .map(|dir| chain.next_key(&StepInput::Config(ConfigEdit::WorkingDir((*dir).into()))))
            .collect()
    }

    #[test]
    fn chains_that_layer_every_step_never_share_a_key_with_usual_ones() {
        let base = || Parent::Image(Digest::sha256_of(b"base"));
        let platform = Platform::host;
        let usual = keys(KeyChain::new(base(), platform()));
        let layered = keys(KeyChain::new(base(), platform()).every_step_layered());
        assert_eq!(
            layered,
            keys(KeyChain::new(base(), platform()).every_step_layered())
        );
        assert!(usual.iter().all(|key| !layered.contains(key)));
    }
}
