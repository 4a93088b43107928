#!/usr/bin/env bash
# Builds Coral's Debian packages:
#   - `coral`: corald (with the embedding pipeline), coralctl, systemd units, sysusers/tmpfiles
#     entries, the commented default /etc/coral/corald.toml, the musicnn model, completions and
#     man pages; depends on coral-libtorch;
#   - `coral-libtorch`: the libtorch libraries that corald loads (packaging/build-libtorch-deb.sh;
#     `coral-libtorch-cuda`, built with that script's --cuda, replaces it on a GPU machine).
#
#   packaging/build-deb.sh [--prebuilt DIR] [--no-libtorch] [cargo-deb flags]
#
# Needs cargo-deb (`cargo install cargo-deb`), patchelf and the libtorch of scripts/setup. Steps:
# release build of both binaries with `--features corald/embed` (or, with `--prebuilt DIR`, the
# corald and coralctl already in DIR, e.g. target/debug: how the CI check avoids a second full
# build; they must have been built with that feature), copies of them whose RUNPATH is
# /usr/lib/coral/torch/lib (where coral-libtorch installs libtorch) in a staging directory,
# `coralctl generate completions|man` into <staging>/release/coral-assets (what the
# `[package.metadata.deb]` assets of daemon/Cargo.toml point at), `cargo deb --no-build
# --strip`, then coral-libtorch from the libraries the staged corald loads. Writes the packages
# to <target>/debian/; the last two lines printed are the paths of coral and coral-libtorch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prebuilt=
libtorch_deb=1
deb_args=()
while (($#)); do
    case $1 in
    --prebuilt)
        prebuilt=$2
        shift 2
        ;;
    --no-libtorch)
        libtorch_deb=0
        shift
        ;;
    *)
        deb_args+=("$1")
        shift
        ;;
    esac
done

command -v cargo-deb >/dev/null 2>&1 || {
    echo "build-deb: cargo-deb is missing; install it with: cargo install cargo-deb" >&2
    exit 1
}
command -v patchelf >/dev/null 2>&1 || {
    echo "build-deb: patchelf is missing; install it with: apt install patchelf" >&2
    exit 1
}
# LIBTORCH for the embed feature (written by scripts/setup).
if [[ -z ${LIBTORCH:-} ]]; then
    # shellcheck source=/dev/null
    source "${XDG_CACHE_HOME:-$HOME/.cache}/coral/libtorch.env"
fi

target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
out_dir="$target_dir/debian"
if [[ -z $prebuilt ]]; then
    cargo build --release -p corald -p coralctl --features corald/embed
    prebuilt="$target_dir/release"
fi
# Package copies of the binaries: a scratch target directory whose release/ holds them.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/release"
cp "$prebuilt/corald" "$prebuilt/coralctl" "$stage/release/"
export CARGO_TARGET_DIR=$stage
bin_dir="$stage/release"
readelf -d "$bin_dir/corald" | grep -q 'NEEDED.*libtorch_cpu' || {
    echo "build-deb: $prebuilt/corald was built without the embed feature (cargo build --features corald/embed)" >&2
    exit 1
}
# Where coral-libtorch installs libtorch (the build's RUNPATH names the build machine's copy).
patchelf --set-rpath /usr/lib/coral/torch/lib "$bin_dir/corald"

assets="$bin_dir/coral-assets"
rm -rf "$assets"
"$bin_dir/coralctl" generate completions "$assets/completions" >/dev/null
"$bin_dir/coralctl" generate man "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1

# Stripped binaries (the release profile keeps line tables for backtraces during development).
mkdir -p "$out_dir"
# --fast (xz at a low level): 8 s here instead of 26 s for the default level, 12 MB instead of
# 11 MB (cargo-deb's gzip took 100 s).
coral_deb=$(cargo deb -p corald --no-build --strip --fast --output "$out_dir" "${deb_args[@]}" | tail -n 1)
if ((libtorch_deb)); then
    torch_deb=$(packaging/build-libtorch-deb.sh --binary "$prebuilt/corald" --out "$out_dir" | tail -n 1)
fi
printf '%s\n' "$coral_deb"
((libtorch_deb == 0)) || printf '%s\n' "$torch_deb"
