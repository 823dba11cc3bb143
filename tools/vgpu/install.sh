#!/usr/bin/env bash
# Builds the virtual CUDA device (tools/vgpu) in release and makes <target>/vgpu-lib/, a
# directory of symlinks to libvgpu.so under the names cudarc 0.19 (dynamic loading) tries:
# libcuda.so, libcuda.so.1, libcublas.so, libcublas.so.13, libcublas.so.12, libnccl.so (and
# NCCL's own soname, libnccl.so.2). All names resolve to one file, so the dynamic loader maps
# it once and the driver, cuBLAS and NCCL share their state (allocations, streams, streamcheck).
#
# Usage: tools/vgpu/install.sh            (honours CARGO_TARGET_DIR; default <repo>/target)
#        export LD_LIBRARY_PATH="<dir printed on the last line>:$LD_LIBRARY_PATH"
# Idempotent: reruns rebuild incrementally and refresh the links. Last line: "vgpu: <dir>".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

cargo build --release -p vgpu >&2

target="${CARGO_TARGET_DIR:-$root/target}"
target="$(cd "$target" && pwd)"
lib="$target/release/libvgpu.so"
if [[ ! -f "$lib" ]]; then
    echo "vgpu: build did not produce $lib" >&2
    exit 1
fi

dir="$target/vgpu-lib"
mkdir -p "$dir"
for name in libcuda.so libcuda.so.1 libcublas.so libcublas.so.13 libcublas.so.12 libnccl.so libnccl.so.2; do
    ln -sfn "$lib" "$dir/$name"
done
echo "vgpu: $dir"
