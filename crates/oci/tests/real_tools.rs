//! kiln-oci's on-disk formats checked against the real tools that consume and produce them:
//! skopeo and umoci read the OCI layouts Kiln writes, Kiln reads layouts skopeo writes, and
//! skopeo and podman load the docker-archives Kiln writes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use kiln_oci::archive::{ArchiveLayer, DockerArchiveWriter};
use kiln_oci::image::ANNOTATION_REF_NAME;
use kiln_oci::layout::OciLayout;
use kiln_oci::{
    Algorithm, Compression, Descriptor, Digest, DigestWriter, Healthcheck, History, ImageConfig,
    ImageFormat, ManifestBuilder, MediaType, Platform, Reference,
};
use kiln_testkit::{bases, require_tools, run, Registry};
use serde_json::Value;

/// Tars `dir` (symlinks kept as links) into a new layout blob, gzip-compressed or not, and
/// returns the layer descriptor and diff ID. Everything streams: tar → diff-ID hasher →
/// gzip → blob hasher → temporary file.
fn write_layer(layout: &OciLayout, dir: &Path, compression: Compression) -> (Descriptor, Digest) {
    let blob = layout.blob_writer(None).unwrap();
    let (diff_id, blob) = match compression {
        Compression::None => {
            let tar = tar_dir(DigestWriter::new(blob, Algorithm::Sha256), dir);
            let (blob, diff_id, _) = tar.finish();
            (diff_id, blob)
        }
        Compression::Gzip => {
            let gzip = GzEncoder::new(blob, flate2::Compression::fast());
            let tar = tar_dir(DigestWriter::new(gzip, Algorithm::Sha256), dir);
            let (gzip, diff_id, _) = tar.finish();
            (diff_id, gzip.finish().unwrap())
        }
        Compression::Zstd => unreachable!("not used by these tests"),
    };
    let (digest, size) = blob.commit().unwrap();
    let media_type = ImageFormat::Oci.layer_type(compression);
    (Descriptor::new(media_type, digest, size), diff_id)
}

fn tar_dir<W: Write>(out: W, dir: &Path) -> W {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).unwrap();
    tar.into_inner().unwrap()
}

fn hello_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("hello-rootfs");
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/hello"), "hello from kiln\n").unwrap();
    dir
}

fn test_config(diff_ids: &[Digest]) -> ImageConfig {
    let mut config = ImageConfig::new(&Platform::parse("linux/amd64").unwrap());
    config.created = Some(kiln_oci::image::rfc3339_utc(1_700_000_000));
    let c = &mut config.config;
    c.set_env_var("PATH", "/bin:/usr/bin");
    c.set_env_var("GREETING", "hi there");
    c.cmd = Some(vec!["/bin/sh".into(), "-c".into(), "cat /etc/hello".into()]);
    c.working_dir = Some("/".into());
    c.labels = Some(
        [
            ("org.example.b".into(), "2".into()),
            ("org.example.a".into(), "1".into()),
        ]
        .into(),
    );
    c.exposed_ports = Some(["8080/tcp".to_owned()].into());
    c.healthcheck = Some(Healthcheck {
        test: Some(vec!["CMD-SHELL".into(), "true".into()]),
        interval: Some(5_000_000_000),
        retries: Some(3),
        ..Healthcheck::default()
    });
    c.on_build = Some(vec!["RUN echo child".into()]);
    c.shell = Some(vec!["/bin/sh".into(), "-ec".into()]);
    for diff_id in diff_ids {
        config.push_layer(
            diff_id.clone(),
            History {
                created_by: Some("kiln-oci test layer".into()),
                ..History::default()
            },
        );
    }
    config
}

/// Writes an image of the busybox base plus a small `/etc/hello` layer into `layout` and
/// tags it; returns the manifest descriptor and the layers.
fn write_test_image(
    layout: &OciLayout,
    scratch: &Path,
    format: ImageFormat,
    tag: &str,
) -> (Descriptor, Vec<Descriptor>) {
    let (base, base_diff) = write_layer(layout, bases::busybox_rootfs(), Compression::None);
    let (hello, hello_diff) = write_layer(layout, &hello_dir(scratch), Compression::Gzip);
    let config = test_config(&[base_diff, hello_diff])
        .to_blob(format)
        .unwrap();
    layout.write_json_blob(&config).unwrap();
    let manifest = ManifestBuilder::new(format)
        .config(&config)
        .layers([base.clone(), hello.clone()])
        .build()
        .unwrap();
    let manifest = layout
        .write_json_blob(&manifest.to_blob().unwrap())
        .unwrap();
    layout.tag(tag, manifest.clone()).unwrap();
    (manifest, vec![base, hello])
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

fn assert_busybox_bundle(bundle: &Path) {
    let rootfs = bundle.join("rootfs");
    let busybox_len = fs::metadata("/bin/busybox").unwrap().len();
    assert_eq!(
        fs::metadata(rootfs.join("bin/busybox")).unwrap().len(),
        busybox_len
    );
    assert!(fs::read_link(rootfs.join("bin/sh"))
        .unwrap()
        .ends_with("busybox"));
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/hello")).unwrap(),
        "hello from kiln\n"
    );
    let runtime = json(&fs::read_to_string(bundle.join("config.json")).unwrap());
    assert_eq!(
        runtime["process"]["args"],
        serde_json::json!(["/bin/sh", "-c", "cat /etc/hello"])
    );
    let env = runtime["process"]["env"].as_array().unwrap();
    assert!(
        env.contains(&Value::String("GREETING=hi there".into())),
        "{env:?}"
    );
}

#[test]
fn layout_written_by_kiln_is_read_by_skopeo_and_umoci() {
    require_tools(&["skopeo", "umoci"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let layout = OciLayout::create(&dir).unwrap();
    let (manifest, layers) = write_test_image(&layout, tmp.path(), ImageFormat::Oci, "v1");
    let image = format!("oci:{}:v1", dir.display());

    let inspect = json(&run(Command::new("skopeo").args(["inspect", &image])));
    assert_eq!(inspect["Digest"], manifest.digest.to_string());
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    let layer_digests: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    assert_eq!(inspect["Layers"], serde_json::json!(layer_digests));
    assert_eq!(inspect["Labels"]["org.example.a"], "1");

    // The config skopeo reads is byte for byte the one Kiln wrote, Docker-only fields included.
    let config = layout
        .read_config(
            &layout
                .read_manifest(Some("v1"), &Platform::host())
                .unwrap()
                .1,
        )
        .unwrap();
    let raw_config = run(Command::new("skopeo").args(["inspect", "--raw", "--config", &image]));
    assert_eq!(
        ImageConfig::from_json(raw_config.as_bytes()).unwrap(),
        config
    );
    assert_eq!(
        Digest::sha256_of(raw_config.as_bytes()),
        config.to_blob(ImageFormat::Oci).unwrap().digest
    );
    assert!(
        raw_config.contains(r#""OnBuild":["RUN echo child"]"#),
        "{raw_config}"
    );

    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", dir.display()))
        .arg(&bundle));
    assert_busybox_bundle(&bundle);
}

/// skopeo 1.9 ignores `index.json` entries that are not OCI manifests or indexes, so a
/// Docker-format image is handed to it through its `dir:` transport (written here by hand from
/// the layout's blobs), pushed to a real registry, which validates schema 2 manifests, and
/// inspected there.
#[test]
fn docker_format_manifest_is_accepted_by_a_registry() {
    require_tools(&["skopeo", "docker-registry"]);
    let tmp = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(tmp.path().join("layout")).unwrap();
    let (manifest_desc, layers) =
        write_test_image(&layout, tmp.path(), ImageFormat::Docker, "docker");
    assert_eq!(manifest_desc.media_type, MediaType::DockerManifest);
    let (_, manifest) = layout
        .read_manifest(Some("docker"), &Platform::host())
        .unwrap();
    assert_eq!(manifest.config.media_type, MediaType::DockerConfig);

    let dir = tmp.path().join("dir-image");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    fs::copy(
        layout.blob_path(&manifest_desc.digest),
        dir.join("manifest.json"),
    )
    .unwrap();
    for blob in layers.iter().chain([&manifest.config]) {
        fs::copy(layout.blob_path(&blob.digest), dir.join(blob.digest.hex())).unwrap();
    }

    let registry = Registry::start();
    let image = format!("docker://{}/kiln/docker-format:v1", registry.addr());
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("dir:{}", dir.display()))
        .arg(&image));
    let raw = run(Command::new("skopeo").args(["inspect", "--tls-verify=false", "--raw", &image]));
    assert_eq!(
        Digest::sha256_of(raw.as_bytes()),
        manifest_desc.digest,
        "the registry stored Kiln's manifest unchanged"
    );
    let inspect = json(&run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &image,
    ])));
    assert_eq!(inspect["Digest"], manifest_desc.digest.to_string());
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
}

#[test]
fn reads_layouts_written_by_skopeo() {
    require_tools(&["skopeo"]);
    let source = bases::busybox_layout();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("copied");
    let dest_zstd = tmp.path().join("copied-zstd");
    let digest_file = tmp.path().join("digest");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--digestfile"])
        .arg(&digest_file)
        .arg(format!("oci:{}:latest", source.display()))
        .arg(format!("oci:{}:gzip", dest.display())));
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-compress",
            "--dest-compress-format",
            "zstd",
        ])
        .arg(format!("oci:{}:latest", source.display()))
        .arg(format!("oci:{}:zstd", dest_zstd.display())));

    let source_layout = OciLayout::open(source).unwrap();
    let (_, source_manifest) = source_layout
        .read_manifest(Some("latest"), &Platform::host())
        .unwrap();
    let source_config = source_layout.read_config(&source_manifest).unwrap();

    let layout = OciLayout::open(&dest).unwrap();
    let index = layout.index().unwrap();
    let mut tags: Vec<_> = index
        .manifests
        .iter()
        .filter_map(|d| d.annotation(ANNOTATION_REF_NAME))
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, ["gzip"]);

    let (descriptor, manifest) = layout
        .read_manifest(Some("gzip"), &Platform::host())
        .unwrap();
    let skopeo_digest = fs::read_to_string(&digest_file).unwrap();
    assert_eq!(descriptor.digest.to_string(), skopeo_digest.trim());
    assert_eq!(
        layout.read_config(&manifest).unwrap().rootfs.diff_ids,
        source_config.rootfs.diff_ids
    );

    // No tag needed: the zstd layout holds a single image.
    let zstd_layout = OciLayout::open(&dest_zstd).unwrap();
    let (_, zstd) = zstd_layout.read_manifest(None, &Platform::host()).unwrap();
    assert_eq!(zstd.layers[0].media_type, MediaType::OciLayerZstd);
    assert_eq!(
        zstd_layout.read_config(&zstd).unwrap().rootfs.diff_ids,
        source_config.rootfs.diff_ids
    );

    // Every blob streams back and verifies against its digest and size.
    let gzip_layers = manifest.layers.iter().map(|l| (&layout, l));
    let zstd_layers = zstd.layers.iter().map(|l| (&zstd_layout, l));
    for (layout, layer) in gzip_layers.chain(zstd_layers) {
        let mut reader = layout.open_blob(&layer.digest, Some(layer.size)).unwrap();
        let copied = io::copy(&mut reader, &mut io::sink()).unwrap();
        assert_eq!(copied, layer.size);
    }
}

/// Writes a docker-archive of the test image (uncompressed base layer, gzip top layer) tagged
/// `tag`, streaming layers out of the layout.
fn write_archive(tmp: &Path, tag: &str) -> (PathBuf, ImageConfig) {
    let layout = OciLayout::create(tmp.join("layout")).unwrap();
    let (_, layers) = write_test_image(&layout, tmp, ImageFormat::Docker, "x");
    let (_, manifest) = layout.read_manifest(Some("x"), &Platform::host()).unwrap();
    let config = layout.read_config(&manifest).unwrap();
    let config_blob = config.to_blob(ImageFormat::Docker).unwrap();
    assert_eq!(config_blob.digest, manifest.config.digest);

    let path = tmp.join("image.tar");
    let mut archive = DockerArchiveWriter::new(BufWriter::new(File::create(&path).unwrap()));
    let archive_layers: Vec<ArchiveLayer> = layers
        .iter()
        .map(|l| ArchiveLayer::from_descriptor(l).unwrap())
        .collect();
    archive
        .add_image(
            &config_blob,
            &[Reference::parse(tag).unwrap()],
            &archive_layers,
            |layer| {
                layout
                    .open_blob(&layer.digest, Some(layer.size))
                    .map_err(io::Error::other)
            },
        )
        .unwrap();
    archive
        .finish()
        .unwrap()
        .into_inner()
        .unwrap()
        .sync_all()
        .unwrap();
    (path, config)
}

#[test]
fn docker_archive_is_read_by_skopeo() {
    require_tools(&["skopeo", "umoci"]);
    let tmp = tempfile::tempdir().unwrap();
    let (archive, config) = write_archive(tmp.path(), "kiln-test/archive:v1");
    let source = format!("docker-archive:{}", archive.display());

    let inspect = json(&run(Command::new("skopeo").args(["inspect", &source])));
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
    assert!(inspect["Env"]
        .as_array()
        .unwrap()
        .contains(&Value::String("GREETING=hi there".into())));
    let raw_config = run(Command::new("skopeo").args(["inspect", "--raw", "--config", &source]));
    assert_eq!(
        ImageConfig::from_json(raw_config.as_bytes()).unwrap(),
        config
    );

    // A full copy reads every layer and checks it against the config's diff IDs.
    let out = tmp.path().join("from-archive");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", &source])
        .arg(format!("oci:{}:loaded", out.display())));
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:loaded", out.display()))
        .arg(&bundle));
    assert_busybox_bundle(&bundle);
}

#[test]
fn docker_archive_is_loaded_by_podman() {
    require_tools(&["podman"]);
    let tmp = tempfile::tempdir().unwrap();
    let (archive, _) = write_archive(tmp.path(), "127.0.0.1:5000/kiln-test/podman:v2");
    // Podman's default rlimits exceed this machine's hard limit of open files, and there is
    // no systemd; a private containers.conf sets what ENVIRONMENT.md prescribes.
    let conf = tmp.path().join("containers.conf");
    fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
    )
    .unwrap();
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &conf)
            .arg("--root")
            .arg(tmp.path().join("root"))
            .arg("--runroot")
            .arg(tmp.path().join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        run(&mut cmd)
    };
    let loaded = podman(&["load", "-i", archive.to_str().unwrap()]);
    assert!(
        loaded.contains("127.0.0.1:5000/kiln-test/podman:v2"),
        "{loaded}"
    );
    let inspect = json(&podman(&[
        "image",
        "inspect",
        "127.0.0.1:5000/kiln-test/podman:v2",
    ]));
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(), 2);
    let output = podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "127.0.0.1:5000/kiln-test/podman:v2",
    ]);
    assert_eq!(output, "hello from kiln\n");
}
