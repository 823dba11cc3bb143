#!/usr/bin/env bash
# Makes sure an nvcc that can build kernels/*.cu exists, installing the pinned CUDA 13.0 compiler
# wheels from PyPI into the git-ignored folder .toolchain/cuda when none is found. Idempotent.
# Prints the nvcc it settled on as the last line: `nvcc: <path>`.
#
#   bash tools/install-cuda-toolchain.sh            # use a suitable system nvcc, else install
#   bash tools/install-cuda-toolchain.sh --pinned   # always use the pinned wheels (what CI does)
#   bash tools/install-cuda-toolchain.sh --sass-tools  # also cuobjdump/nvdisasm for reading SASS
#
# The five wheels must come from one release: a newer nvvm emits PTX (ISA version) that a CUDA
# 13.0 driver (the GPU machine's 580) cannot load. pip puts everything into one tree,
# .toolchain/cuda/nvidia/cu13/{bin,include,nvvm,lib}, and that tree's bin/nvcc.profile already
# points nvcc at its cicc, libdevice and the crt/cccl headers, so nvcc needs no extra flags.
# nvcc preprocesses with the host compiler (`gcc -E -x c++`), so g++ must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEST="$ROOT/.toolchain/cuda"
NVCC_PINNED="$DEST/nvidia/cu13/bin/nvcc"
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)
# (the disassemblers start at 13.2 on PyPI; they only read cubins, so any newer one does)
SASS_PINS=(nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51)

pinned=0 sass=0
for arg in "$@"; do
  case "$arg" in
    --pinned) pinned=1 ;;
    --sass-tools) sass=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

die() { echo "error: $*" >&2; exit 1; }

# "release 12.4" -> 1204; empty when the binary does not run.
nvcc_release() {
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' |
    { read -r a b && printf '%d%02d\n' "$a" "$b"; } || true
}

# A system nvcc is suitable from 12.0 (sm_90) up to 13.0 (newer PTX would not load on the 580
# driver the GPU machine has).
suitable() {
  local v
  v=$(nvcc_release "$1")
  [ -n "$v" ] && [ "$v" -ge 1200 ] && [ "$v" -le 1300 ]
}

python_cmd() {
  for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then
      echo "$p"; return 0
    fi
  done
  return 1
}

host_cxx_ok() { echo 'int main(){}' | gcc -E -x c++ - >/dev/null 2>&1; }

# nvcc preprocesses .cu files with `gcc -E -x c++`, which needs g++'s cc1plus (Debian's gcc
# alone lacks it). Installed with apt when we are root on a Debian-like machine (CI).
check_host_compiler() {
  if ! host_cxx_ok && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing g++ (nvcc's host compiler) with apt-get" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; } >&2 || true
  fi
  host_cxx_ok || die "nvcc needs a host C++ compiler: 'gcc -E -x c++' failed. Install g++ (Debian/Ubuntu: apt-get install -y g++)."
}

found=""
if [ "$pinned" = 0 ]; then
  for cand in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
              "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc; do
    if [ -n "$cand" ] && [ -x "$cand" ] && suitable "$cand"; then found="$cand"; break; fi
  done
fi

if [ -z "$found" ]; then
  stamp="$DEST/.pins"
  if [ -x "$NVCC_PINNED" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${PINS[*]}" ] &&
     [ "$(nvcc_release "$NVCC_PINNED")" = 1300 ]; then
    echo "pinned CUDA 13.0 compiler already in $DEST" >&2
  else
    py=$(python_cmd) || die "no python with pip found; install python3-pip, or a CUDA toolkit 12.x/13.0 and set NVCC"
    echo "installing ${PINS[*]} into $DEST" >&2
    rm -rf "$DEST.tmp"
    "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$DEST.tmp" "${PINS[@]}" ||
      die "pip could not install the CUDA compiler wheels (network or PyPI down?)"
    rm -rf "$DEST"
    mv "$DEST.tmp" "$DEST"
    echo "${PINS[*]}" > "$stamp"
  fi
  found="$NVCC_PINNED"
  [ "$(nvcc_release "$found")" = 1300 ] || die "$found does not run"
fi

if [ "$sass" = 1 ]; then
  if [ ! -x "$DEST/nvidia/cu13/bin/cuobjdump" ]; then
    py=$(python_cmd) || die "no python with pip found"
    # Same tree as the compiler: pip --target refuses to merge into an existing package folder
    # unless told to upgrade, so install beside it and copy the two binaries in.
    rm -rf "$DEST.sass"
    "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$DEST.sass" "${SASS_PINS[@]}"
    mkdir -p "$DEST/nvidia/cu13/bin"
    cp "$DEST.sass"/nvidia/cu13/bin/* "$DEST/nvidia/cu13/bin/"
    rm -rf "$DEST.sass"
  fi
  echo "cuobjdump: $DEST/nvidia/cu13/bin/cuobjdump" >&2
fi

check_host_compiler
"$found" --version | tail -n 2 >&2
echo "nvcc: $found"
