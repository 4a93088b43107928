#!/usr/bin/env bash
# Builds the `coral` Debian package (corald, coralctl, systemd units, sysusers/tmpfiles entries,
# the commented default /etc/coral/corald.toml, the musicnn model, completions and man pages):
#
#   packaging/build-deb.sh [--features embed] [extra cargo-deb flags, e.g. --output DIR]
#
# Needs cargo-deb (`cargo install cargo-deb`). Steps: release build of both binaries, then
# `coralctl generate completions|man` into <target>/release/coral-assets (what the
# `[package.metadata.deb]` assets of daemon/Cargo.toml point at), then `cargo deb --no-build`.
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build_args=()
deb_args=()
while (($#)); do
    case $1 in
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
cargo build --release -p corald -p coralctl "${build_args[@]}"

assets="$target_dir/release/coral-assets"
rm -rf "$assets"
"$target_dir/release/coralctl" generate completions "$assets/completions" >/dev/null
"$target_dir/release/coralctl" generate man "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1

# Stripped binaries (the release profile keeps line tables for backtraces during development).
cargo deb -p corald --no-build --strip "${deb_args[@]}"
