#!/bin/sh
# Prepares the build context of executor/Containerfile in OUTDIR (see the comment there):
# compiles the static executor and lifecycle binaries and lays out the image's files.
#
#   executor/image-context.sh OUTDIR [--debug]
#
# With --debug, busybox (Debian's busybox-static) is added under /busybox, like kaniko's debug
# image, for CI systems that run the build through a shell (Jenkins, GitLab).
# Kiln's builtin buildpacks go to /kiln/buildpacks when the checkout has them: made by
# scripts/build-buildpacks DIR when that script exists, else copied from buildpacks/ when it
# holds an order.toml (KILN_IMAGE_BUILDPACKS=0 leaves them out).
set -eu
out=${1:?usage: executor/image-context.sh OUTDIR [--debug]}
debug=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
target=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps crt-static away from build scripts and proc-macros, which must stay dynamic.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --quiet --release --locked --target "$target" -p kiln-executor \
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
# Buildpacks builds copy these into build and app images; the executor finds them beside it.
"$repo/scripts/build-lifecycle" "$out/rootfs/kiln/lifecycle" >/dev/null
if [ "${KILN_IMAGE_BUILDPACKS:-1}" != 0 ]; then
    if [ -x "$repo/scripts/build-buildpacks" ]; then
        "$repo/scripts/build-buildpacks" "$out/rootfs/kiln/buildpacks"
    elif [ -f "$repo/buildpacks/order.toml" ]; then
        cp -a "$repo/buildpacks" "$out/rootfs/kiln/buildpacks"
    fi
fi
ln -s kiln "$out/rootfs/kaniko"
if [ "$debug" = "--debug" ]; then
    mkdir -p "$out/rootfs/busybox"
    cp /bin/busybox "$out/rootfs/busybox/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "$out/rootfs/busybox/$applet"
    done
fi
# Every file as the image will have it, whatever the checkout's umask made of it.
chmod -R u=rwX,go=rX "$out/rootfs/kiln" "$out/rootfs/workspace" "$out/rootfs/root"
chmod 1777 "$out/rootfs/tmp"
cp "$repo/executor/Containerfile" "$out/Containerfile"
echo "context ready: $out (build it with: executor --context dir://$out --dockerfile Containerfile ...)"
