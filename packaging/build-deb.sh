#!/usr/bin/env bash
# Builds the `coral` Debian package (corald, coralctl, systemd units, sysusers/tmpfiles entries,
# the commented default /etc/coral/corald.toml, the musicnn model, completions and man pages):
#
#   packaging/build-deb.sh [--features embed] [--prebuilt DIR] [cargo-deb flags]
#
# Needs cargo-deb (`cargo install cargo-deb`). Steps: release build of both binaries (or, with
# `--prebuilt DIR`, the corald and coralctl already in DIR, e.g. target/debug: how the CI check
# avoids a second full build), `coralctl generate completions|man` into
# <target>/release/coral-assets (what the `[package.metadata.deb]` assets of daemon/Cargo.toml
# point at), then `cargo deb --no-build --strip`. Writes the .deb to <target>/debian/ and prints
# its path on the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prebuilt=
build_args=()
deb_args=()
while (($#)); do
    case $1 in
    --prebuilt)
        prebuilt=$2
        shift 2
        ;;
    --features)
        build_args+=(--features "$2")
        shift 2
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

target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
out_dir="$target_dir/debian"
if [[ -n $prebuilt ]]; then
    # Package the given binaries: a scratch target directory whose release/ holds copies.
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/release"
    cp "$prebuilt/corald" "$prebuilt/coralctl" "$stage/release/"
    export CARGO_TARGET_DIR=$stage
    bin_dir="$stage/release"
else
    cargo build --release -p corald -p coralctl "${build_args[@]}"
    bin_dir="$target_dir/release"
fi

assets="$bin_dir/coral-assets"
rm -rf "$assets"
"$bin_dir/coralctl" generate completions "$assets/completions" >/dev/null
"$bin_dir/coralctl" generate man "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1

# Stripped binaries (the release profile keeps line tables for backtraces during development).
mkdir -p "$out_dir"
cargo deb -p corald --no-build --strip --output "$out_dir" "${deb_args[@]}"
