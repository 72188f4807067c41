//! Buildpacks named by URI (`--buildpack`, a project descriptor's group): directories,
//! archives, buildpack package images, ids in the builder or among Kiln's own, and the inline
//! buildpacks of a descriptor.

use std::path::{Path, PathBuf};

use kiln_cnb::buildpack::parse_buildpack_toml;
use kiln_cnb::order::{GroupEntry, Order, OrderGroup};
use kiln_cnb::platform::LocalBuildpack;
use kiln_cnb::project::{ProjectBuildpack, ProjectDescriptor};
use kiln_fs::resolve::Root;

use super::{BuilderImage, Gathered};
use crate::error::BuildError;
use crate::options::BuildOptions;

/// The label of a buildpack package image naming the buildpack it packages.
const PACKAGE_LABEL: &str = "io.buildpacks.buildpackage.metadata";

/// The environment variable naming the directory of Kiln's own buildpacks.
pub const BUILTIN_DIR_ENV: &str = "KILN_BUILDPACKS_DIR";

/// Where a buildpack of the group comes from.
pub(crate) enum Supply {
    /// A directory of this machine, copied into the build image.
    Local(LocalBuildpack),
    /// A buildpack package image, whose `/cnb/buildpacks` is copied into the build image.
    Image(String),
    /// The build image (a builder) already holds it.
    InBuilder,
}

/// The group a build names explicitly, each buildpack with where it comes from.
pub(crate) struct ResolvedGroup {
    members: Vec<(GroupEntry, Supply)>,
}

impl ResolvedGroup {
    /// The buildpacks to copy in (from directories and from images) and the one-group order,
    /// with the descriptor's pre- and post-buildpacks around it.
    #[allow(clippy::type_complexity)]
    pub(crate) fn into_parts(
        self,
        descriptor: Option<&ProjectDescriptor>,
    ) -> Result<(Vec<LocalBuildpack>, Vec<String>, Option<Order>), BuildError> {
        let (pre, post) = match descriptor {
            Some(d) => (
                plain_entries(&d.pre_buildpacks, "pre")?,
                plain_entries(&d.post_buildpacks, "post")?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        let mut local = Vec::new();
        let mut images = Vec::new();
        let mut group = pre;
        for (entry, supply) in self.members {
            match supply {
                Supply::Local(bp) => local.push(bp),
                Supply::Image(image) => images.push(image),
                Supply::InBuilder => {}
            }
            group.push(entry);
        }
        group.extend(post);
        let order = Order {
            order: vec![OrderGroup { group }],
        };
        Ok((local, images, Some(order)))
    }
}

/// The group the flags (or else the descriptor) name; `None` when neither names one.
pub(crate) async fn resolve_group(
    facts: &Gathered<'_>,
    descriptor: Option<&ProjectDescriptor>,
    builder: Option<&BuilderImage>,
) -> Result<Option<ResolvedGroup>, BuildError> {
    let flags = &facts.options.buildpacks.buildpacks;
    let mut members = Vec::new();
    if !flags.is_empty() {
        for uri in flags {
            let where_ = format!("--buildpack {uri}");
            members.push(resolve_uri(facts, builder, uri, Origin::Host, &where_).await?);
        }
    } else if let Some(d) = descriptor.filter(|d| !d.buildpacks.is_empty()) {
        for (index, bp) in d.buildpacks.iter().enumerate() {
            let where_ = format!("project.toml: buildpack {}", index + 1);
            members.push(descriptor_member(facts, builder, bp, index, &where_).await?);
        }
    } else {
        return Ok(None);
    }
    Ok(Some(ResolvedGroup { members }))
}

/// Where a relative path in a URI is taken from.
#[derive(Clone, Copy)]
enum Origin {
    /// The executor's working directory (a flag).
    Host,
    /// The build context (a project descriptor inside it), through its root.
    Context,
}

async fn descriptor_member(
    facts: &Gathered<'_>,
    builder: Option<&BuilderImage>,
    bp: &ProjectBuildpack,
    index: usize,
    where_: &str,
) -> Result<(GroupEntry, Supply), BuildError> {
    if let Some(script) = &bp.script {
        let id = bp.id.clone().ok_or_else(|| {
            BuildError::Plan(format!("{where_}: an inline buildpack needs an id"))
        })?;
        let version = bp.version.clone().unwrap_or_else(|| "0.0.0".into());
        let dir = facts.work_dir.join(format!("inline-buildpack-{index}"));
        write_inline(&dir, &id, &version, script)?;
        let entry = GroupEntry {
            id: id.clone(),
            version: Some(version.clone()),
            optional: false,
        };
        let local = LocalBuildpack {
            dir: dir.display().to_string(),
            id,
            version,
        };
        return Ok((entry, Supply::Local(local)));
    }
    let uri = match (&bp.uri, &bp.id) {
        (Some(uri), _) => uri.clone(),
        (None, Some(id)) => match &bp.version {
            Some(v) => format!("{id}@{v}"),
            None => id.clone(),
        },
        (None, None) => {
            return Err(BuildError::Plan(format!(
                "{where_}: names neither an id nor a uri"
            )))
        }
    };
    resolve_uri(facts, builder, &uri, Origin::Context, where_).await
}

/// An inline buildpack of a descriptor as a buildpack directory: detection always passes, and
/// build runs the script with its shell (bash unless it names one), as `pack` does.
fn write_inline(
    dir: &Path,
    id: &str,
    version: &str,
    script: &kiln_cnb::project::InlineScript,
) -> Result<(), BuildError> {
    std::fs::create_dir_all(dir.join("bin")).map_err(BuildError::io(dir))?;
    let root = Root::open(dir).map_err(|e| BuildError::image(dir.display().to_string(), e))?;
    let shell = script.shell.clone().unwrap_or_else(|| "/bin/bash".into());
    let descriptor = format!(
        "api = {api:?}\n\n[buildpack]\nid = {id:?}\nversion = {version:?}\n",
        api = script.api
    );
    let files = [
        ("buildpack.toml", descriptor, 0o644),
        ("bin/detect", "#!/bin/sh\nexit 0\n".to_owned(), 0o755),
        (
            "bin/build",
            format!("#!{shell}\n{}\n", script.inline),
            0o755,
        ),
    ];
    for (name, content, mode) in files {
        let write = || -> Result<(), String> {
            let mut file = root.create(name, mode).map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut file, content.as_bytes()).map_err(|e| e.to_string())?;
            root.set_mode(name, mode).map_err(|e| e.to_string())
        };
        write().map_err(|e| BuildError::image(format!("inline buildpack {id}: {name}"), e))?;
    }
    Ok(())
}

/// One buildpack URI: `docker://IMAGE`, `urn:cnb:builder:ID[@VERSION]`, a directory or an
/// archive (`.tgz`, `.tar.gz`, `.tar`), or `ID[@VERSION]` of the builder or Kiln's own.
async fn resolve_uri(
    facts: &Gathered<'_>,
    builder: Option<&BuilderImage>,
    uri: &str,
    origin: Origin,
    where_: &str,
) -> Result<(GroupEntry, Supply), BuildError> {
    if let Some(image) = uri.strip_prefix("docker://") {
        return package_image(facts, image.trim_start_matches('/'), where_).await;
    }
    if uri.starts_with("urn:cnb:registry:")
        || uri.starts_with("http://")
        || uri.starts_with("https://")
    {
        return Err(BuildError::Options(format!(
            "{where_}: buildpacks are not downloaded from the buildpack registry or URLs; fetch it and name the directory or archive, or use a docker:// package image"
        )));
    }
    let id_version = uri.strip_prefix("urn:cnb:builder:").unwrap_or(uri);
    if !uri.starts_with("urn:") {
        if let Some(local) = local_buildpack(facts, uri, origin, where_)? {
            let entry = GroupEntry {
                id: local.id.clone(),
                version: Some(local.version.clone()),
                optional: false,
            };
            return Ok((entry, Supply::Local(local)));
        }
    }
    let (id, version) = match id_version.split_once('@') {
        Some((id, v)) => (id.to_owned(), Some(v.to_owned())),
        None => (id_version.to_owned(), None),
    };
    let entry = GroupEntry {
        id,
        version,
        optional: false,
    };
    if let Some(builder) = builder {
        if builder.has(&entry) {
            return Ok((entry, Supply::InBuilder));
        }
        let held: Vec<String> = (builder.metadata.buildpacks.iter())
            .map(|b| format!("{}@{}", b.id, b.version))
            .collect();
        return Err(BuildError::Options(format!(
            "{where_}: not a directory or archive, and builder {} has no buildpack {id_version} (it has: {})",
            builder.name,
            held.join(", ")
        )));
    }
    let (builtin, _) = builtin(facts.options).map_err(|e| {
        BuildError::Options(format!(
            "{where_}: not a directory or archive, there is no builder, and {e}"
        ))
    })?;
    let found = builtin
        .into_iter()
        .find(|b| b.id == entry.id && entry.version.as_ref().is_none_or(|v| *v == b.version));
    match found {
        Some(local) => Ok((entry, Supply::Local(local))),
        None => Err(BuildError::Options(format!(
            "{where_}: not a directory or archive, there is no builder, and Kiln has no buildpack {id_version}"
        ))),
    }
}

/// A buildpack package image: its label names the buildpack, its `/cnb/buildpacks` holds it
/// (and, for a composite one, its components).
async fn package_image(
    facts: &Gathered<'_>,
    image: &str,
    where_: &str,
) -> Result<(GroupEntry, Supply), BuildError> {
    let config = super::image_config(facts.client, image, facts.platform).await?;
    let labels = config.config.labels.unwrap_or_default();
    let label = labels.get(PACKAGE_LABEL).ok_or_else(|| {
        BuildError::Options(format!(
            "{where_}: not a buildpack package image: it has no {PACKAGE_LABEL} label"
        ))
    })?;
    #[derive(serde::Deserialize)]
    struct Package {
        id: String,
        version: String,
    }
    let package: Package = serde_json::from_str(label)
        .map_err(|e| BuildError::Options(format!("{where_}: label {PACKAGE_LABEL}: {e}")))?;
    let entry = GroupEntry {
        id: package.id,
        version: Some(package.version),
        optional: false,
    };
    Ok((entry, Supply::Image(image.to_owned())))
}

/// A buildpack in a directory or an archive at `uri`, if there is one there.
fn local_buildpack(
    facts: &Gathered<'_>,
    uri: &str,
    origin: Origin,
    where_: &str,
) -> Result<Option<LocalBuildpack>, BuildError> {
    let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
    // A path in the context is resolved inside it: a descriptor cannot name a directory of
    // the build host through a symlink.
    let (parent, name) = match origin {
        Origin::Host => {
            if !path.exists() {
                return Ok(None);
            }
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            let name = path.file_name().map(PathBuf::from).unwrap_or_default();
            let root =
                Root::open(parent).map_err(|e| BuildError::Options(format!("{where_}: {e}")))?;
            (root, name)
        }
        Origin::Context => {
            let tree = facts.context.tree();
            match tree.symlink_metadata(path) {
                Ok(_) => {}
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(BuildError::Options(format!("{where_}: {e}"))),
            }
            let parent = path.parent().unwrap_or(Path::new(""));
            let root = if parent.as_os_str().is_empty() {
                Root::open(tree.path())
            } else {
                tree.subroot(parent)
            };
            let root = root.map_err(|e| BuildError::Options(format!("{where_}: {e}")))?;
            let name = path.file_name().map(PathBuf::from).unwrap_or_default();
            (root, name)
        }
    };
    let meta = parent
        .metadata(&name)
        .map_err(|e| BuildError::Options(format!("{where_}: {e}")))?;
    let dir = if meta.is_dir() {
        parent
            .host_path(&name, true)
            .map_err(|e| BuildError::Options(format!("{where_}: {e}")))?
    } else {
        unpack_archive(facts, &parent, &name, where_)?
    };
    read_local(&dir, where_).map(Some)
}

/// Extracts a buildpack archive into the build's work directory; the buildpack is at its top
/// or in its only directory.
fn unpack_archive(
    facts: &Gathered<'_>,
    parent: &Root,
    name: &Path,
    where_: &str,
) -> Result<PathBuf, BuildError> {
    let fail = |e: String| BuildError::Options(format!("{where_}: {e}"));
    let format = crate::ops::copy::archive::detect(parent, name)
        .map_err(fail)?
        .ok_or_else(|| fail("neither a directory nor a tar archive".into()))?;
    let unique = kiln_oci::Digest::sha256_of(where_.as_bytes());
    let dir = facts
        .work_dir
        .join(format!("buildpack-{}", &unique.hex()[..12]));
    std::fs::create_dir_all(&dir).map_err(BuildError::io(&dir))?;
    let dest = Root::open(&dir).map_err(|e| fail(e.to_string()))?;
    crate::ops::copy::archive::extract(&dest, parent, name, format, None).map_err(fail)?;
    if dest.metadata("buildpack.toml").is_ok() {
        return Ok(dir);
    }
    let entries = dest.read_dir("").map_err(|e| fail(e.to_string()))?;
    match entries.as_slice() {
        [only]
            if dest
                .metadata(Path::new(only).join("buildpack.toml"))
                .is_ok() =>
        {
            dest.host_path(only, false).map_err(|e| fail(e.to_string()))
        }
        _ => Err(fail("the archive holds no buildpack.toml".into())),
    }
}

/// The buildpack in `dir`, its descriptor read inside it.
fn read_local(dir: &Path, where_: &str) -> Result<LocalBuildpack, BuildError> {
    let root = Root::open(dir).map_err(|e| BuildError::Options(format!("{where_}: {e}")))?;
    let path = dir.join("buildpack.toml");
    let mut text = String::new();
    root.open_file("buildpack.toml")
        .map_err(|e| e.to_string())
        .and_then(|mut f| {
            std::io::Read::read_to_string(&mut f, &mut text).map_err(|e| e.to_string())
        })
        .map_err(|e| BuildError::Options(format!("{where_}: {}: {e}", path.display())))?;
    let bp =
        parse_buildpack_toml(dir, &path, &text).map_err(|e| BuildError::Plan(e.to_string()))?;
    Ok(LocalBuildpack {
        dir: dir.display().to_string(),
        id: bp.id,
        version: bp.version,
    })
}

/// A descriptor's pre- or post-buildpacks, which must be named by id (they come from the
/// builder).
pub(crate) fn plain_entries(
    buildpacks: &[ProjectBuildpack],
    which: &str,
) -> Result<Vec<GroupEntry>, BuildError> {
    buildpacks
        .iter()
        .map(|bp| match (&bp.id, &bp.uri, &bp.script) {
            (Some(id), None, None) => Ok(GroupEntry {
                id: id.clone(),
                version: bp.version.clone(),
                optional: false,
            }),
            _ => Err(BuildError::Plan(format!(
                "project.toml: {which}-buildpacks are named by id only (found {})",
                bp.uri.clone().or(bp.id.clone()).unwrap_or_default()
            ))),
        })
        .collect()
}

/// Kiln's own buildpacks (one directory each) and their `order.toml`: the directory named,
/// else `$KILN_BUILDPACKS_DIR`, else `buildpacks/` beside the executor (where Kiln's image
/// has them).
pub(crate) fn builtin(options: &BuildOptions) -> Result<(Vec<LocalBuildpack>, Order), BuildError> {
    let dir = match &options.buildpacks.builtin_dir {
        Some(dir) => dir.clone(),
        None => match std::env::var_os(BUILTIN_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|p| p.join("buildpacks")))
                .unwrap_or_else(|| PathBuf::from("/kaniko/buildpacks")),
        },
    };
    let order_path = dir.join("order.toml");
    let missing = || {
        BuildError::Options(format!(
            "no buildpacks to run: give --builder or --buildpack (or a project.toml group); Kiln's own buildpacks are not in {} (set {BUILTIN_DIR_ENV})",
            dir.display()
        ))
    };
    let order_text = std::fs::read_to_string(&order_path).map_err(|_| missing())?;
    let order: Order = kiln_cnb::files::parse_toml(&order_path, &order_text)
        .map_err(|e| BuildError::Plan(e.to_string()))?;
    let mut buildpacks = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(BuildError::io(&dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("buildpack.toml").is_file())
        .collect();
    names.sort();
    for path in names {
        buildpacks.push(read_local(
            &path,
            &format!("builtin buildpack {}", path.display()),
        )?);
    }
    Ok((buildpacks, order))
}
