#!/bin/sh
# Prepares the build context of executor/Containerfile in OUTDIR (see the comment there).
set -eu
# With --debug, busybox (Debian's busybox-static) is added under /busybox, like kaniko's
# debug image, for CI systems that run the build through a shell (Jenkins, GitLab).
out=${1:?usage: executor/image-context.sh OUTDIR [--debug]}
debug=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
target=x86_64-unknown-linux-gnu
# --target keeps crt-static away from build scripts and proc-macros, which must stay dynamic.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" -p kiln-executor \
    --manifest-path "$repo/Cargo.toml"
binary="${CARGO_TARGET_DIR:-$repo/target}/$target/release/executor"
if readelf -l "$binary" | grep -q 'program interpreter'; then
    echo "error: $binary is dynamically linked" >&2
    exit 1
fi
bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
rm -rf "$out/rootfs"
mkdir -p "$out/rootfs/kiln/ssl/certs" "$out/rootfs/kiln/.docker" "$out/rootfs/workspace" \
    "$out/rootfs/tmp" "$out/rootfs/root"
chmod 1777 "$out/rootfs/tmp"
cp "$binary" "$out/rootfs/kiln/executor"
# The release profile keeps line tables for profiling; the image does not need them.
strip --strip-unneeded "$out/rootfs/kiln/executor"
cp "$bundle" "$out/rootfs/kiln/ssl/certs/ca-certificates.crt"
ln -s kiln "$out/rootfs/kaniko"
# Buildpacks builds: the static lifecycle binaries and Kiln's own buildpacks, beside the
# executor, where it looks for them (lifecycle/, buildpacks/).
"$repo/scripts/build-lifecycle" "$out/rootfs/kiln/lifecycle" >/dev/null
"$repo/scripts/build-buildpacks" "$out/rootfs/kiln/buildpacks" >/dev/null
if [ "$debug" = "--debug" ]; then
    mkdir -p "$out/rootfs/busybox"
    cp /bin/busybox "$out/rootfs/busybox/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$out/rootfs/busybox/$applet"
    done
fi
cp "$repo/executor/Containerfile" "$out/Containerfile"
echo "context ready: $out (build it with: executor --context dir://$out --dockerfile Containerfile ...)"
