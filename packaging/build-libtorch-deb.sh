#!/usr/bin/env bash
# Builds the package of the libtorch that corald's embedding pipeline loads:
#
#   packaging/build-libtorch-deb.sh --binary PATH/TO/corald [--out DIR]      # coral-libtorch
#   packaging/build-libtorch-deb.sh --cuda [--out DIR]                       # coral-libtorch-cuda
#
# Both install under /usr/lib/coral/, in the layout of the PyTorch wheel they come from
# (torch/lib/ and nvidia/<part>/lib/), so the libraries' own run paths ($ORIGIN/../../nvidia/…)
# find each other unchanged; the packaged corald's RUNPATH is /usr/lib/coral/torch/lib.
#
# coral-libtorch (CPU): only the shared libraries the given corald actually loads from the
# libtorch it was linked against ($LIBTORCH, written by scripts/setup), as `ldd` resolves them:
# libtorch_cpu, libc10, libgomp and the two small CUDA runtime pieces libtorch_cpu links
# (libcudart, libcupti; no GPU code runs from them).
#
# coral-libtorch-cuda: the full torch 2.13.0 wheel and the NVIDIA runtime wheels it depends on,
# from PyPI, into ${XDG_CACHE_HOME:-~/.cache}/coral/venv-torch-cuda (several GB, once; the same
# environment benches/gpu.sh uses). It ships everything libtorch_cuda.so needs besides the
# NVIDIA driver, and Provides/Replaces coral-libtorch, so the same `coral` package runs on it:
# corald loads libtorch_cuda.so from beside libtorch_cpu.so when `embed.device` is `auto` or
# `cuda`, and then uses the GPU.
#
# Compressed with zstd (level 3, all cores): xz took minutes for libtorch_cpu alone. Prints the
# package's path on the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION=2.13.0
PREFIX=usr/lib/coral
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/coral"

die() {
    printf 'build-libtorch-deb: error: %s\n' "$*" >&2
    exit 1
}

cuda=0
binary=
out_dir=
while (($#)); do
    case $1 in
    --cuda)
        cuda=1
        shift
        ;;
    --binary)
        binary=$2
        shift 2
        ;;
    --out)
        out_dir=$2
        shift 2
        ;;
    *) die "unknown argument '$1'" ;;
    esac
done
if [[ -z $out_dir ]]; then
    out_dir="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/debian"
fi
mkdir -p "$out_dir"
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
mkdir -p "$root/$PREFIX" "$root/DEBIAN" "$root/usr/share/doc"

# copy_lib FILE SITE: FILE (under the wheel's site-packages directory SITE) into the package,
# at the same path relative to SITE.
copy_lib() {
    local file=$1 site=$2
    local rel=${file#"$site"/}
    [[ $rel != "$file" ]] || die "$file is not under $site"
    install -D -m 0644 "$file" "$root/$PREFIX/$rel"
}

if ((cuda)); then
    name=coral-libtorch-cuda
    venv="$CACHE_ROOT/venv-torch-cuda"
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '$TORCH_VERSION')" 2>/dev/null; then
        printf '==> installing torch %s with its CUDA dependencies into %s (several GB)\n' "$TORCH_VERSION" "$venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" ||
            die "pip could not install torch==$TORCH_VERSION"
    fi
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [[ -f $site/torch/lib/libtorch_cuda.so ]] || die "$site/torch/lib has no libtorch_cuda.so"
    # libtorch's libraries, without the Python extension's.
    for f in "$site"/torch/lib/*.so*; do
        case $(basename "$f") in libtorch_python.so | libshm*.so) continue ;; esac
        copy_lib "$f" "$site"
    done
    # Every NVIDIA runtime library the wheels brought (cuBLAS, cuDNN, NCCL, …).
    while IFS= read -r -d '' f; do
        copy_lib "$f" "$site"
    done < <(find "$site/nvidia" -path '*/lib/*.so*' -type f -print0)
    # Nothing libtorch_cuda needs may be missing (the driver's libcuda is loaded at run time).
    missing=$(LD_LIBRARY_PATH= ldd "$root/$PREFIX/torch/lib/libtorch_cuda.so" | grep 'not found' || true)
    [[ -z $missing ]] || die "libtorch_cuda.so would miss: $missing"
    control_extra="Provides: coral-libtorch (= $TORCH_VERSION)
Conflicts: coral-libtorch
Replaces: coral-libtorch"
    description="libtorch $TORCH_VERSION with CUDA for Coral's embeddings
 The PyTorch C++ libraries corald's embedding pipeline loads, built for NVIDIA GPUs: libtorch
 (CPU and CUDA) and the NVIDIA runtime libraries it needs (cuBLAS, cuDNN, NCCL, ...), from the
 PyPI wheels of torch $TORCH_VERSION. Needs the NVIDIA driver. Installed under
 /usr/lib/coral, used by corald only."
else
    name=coral-libtorch
    [[ -n $binary && -x $binary ]] || die "--binary PATH/TO/corald is required (the corald whose libraries to ship)"
    # shellcheck source=/dev/null
    [[ -n ${LIBTORCH:-} ]] || source "$CACHE_ROOT/libtorch.env"
    site=$(cd "$LIBTORCH/.." && pwd)
    libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
    shipped=0
    while IFS= read -r lib; do
        real=$(realpath "$lib")
        [[ $real == "$site"/* ]] || continue
        copy_lib "$real" "$site"
        shipped=$((shipped + 1))
    done <<<"$libs"
    [[ -f $root/$PREFIX/torch/lib/libtorch_cpu.so ]] ||
        die "$binary does not load libtorch_cpu.so from $LIBTORCH (was it built with --features corald/embed?)"
    printf '==> %s: %d libraries from %s\n' "$name" "$shipped" "$site" >&2
    control_extra=""
    description="libtorch $TORCH_VERSION (CPU) for Coral's embeddings
 The PyTorch C++ libraries corald's embedding pipeline loads: libtorch_cpu, libc10, libgomp
 and the CUDA runtime stubs libtorch_cpu links (no GPU code runs from them), from the PyPI
 wheel of torch $TORCH_VERSION. Installed under /usr/lib/coral, used by corald only. On a
 machine with an NVIDIA GPU, install coral-libtorch-cuda instead."
fi

# Copyright: PyTorch is BSD-3-Clause; the NVIDIA libraries come under NVIDIA's licence for
# redistribution of the CUDA runtime, as in the wheels.
install -d "$root/usr/share/doc/$name"
{
    printf 'libtorch %s, from the torch wheel on PyPI (BSD-3-Clause, https://github.com/pytorch/pytorch).\n' "$TORCH_VERSION"
    if [[ -d $root/$PREFIX/nvidia ]]; then
        printf 'NVIDIA CUDA runtime libraries, from the nvidia-* wheels on PyPI, under the NVIDIA\n'
        printf 'Software License Agreement / CUDA Toolkit EULA redistribution terms.\n'
    fi
} >"$root/usr/share/doc/$name/copyright"

installed_kb=$(du -sk "$root/usr" | cut -f1)
{
    printf 'Package: %s\nVersion: %s\nArchitecture: %s\n' "$name" "$TORCH_VERSION" "$arch"
    printf 'Maintainer: Coral developers <coral@example.invalid>\nSection: libs\nPriority: optional\n'
    printf 'Installed-Size: %s\nDepends: libc6, libstdc++6, libgcc-s1\n' "$installed_kb"
    [[ -z $control_extra ]] || printf '%s\n' "$control_extra"
    printf 'Description: %s\n' "$description"
} >"$root/DEBIAN/control"

deb="$out_dir/${name}_${TORCH_VERSION}_${arch}.deb"
dpkg-deb --root-owner-group -Zzstd -z3 --threads-max="$(nproc)" --build "$root" "$deb" >/dev/null 2>&1 ||
    dpkg-deb --root-owner-group -Zzstd -z3 --build "$root" "$deb" >/dev/null
printf '%s\n' "$deb"
