#!/usr/bin/env bash
# Checks Coral's Debian packages (`coral` and `coral-libtorch`): builds them from the debug
# binaries the tests already built (packaging/build-deb.sh --prebuilt target/debug, with the
# workspace's `embed` feature: no second full build) unless the two .debs are given, checks
# that `dpkg-deb -c` lists the expected files, then installs them with `dpkg -i` and checks that
# the user, group, directories and files exist, that corald finds libtorch under
# /usr/lib/coral, that `systemd-analyze verify` accepts the installed units and that `corald
# --check-config` reads the shipped configuration. Then it starts the installed corald the way
# its unit does (ExecStart, Environment, as user coral, with the state and runtime directories
# systemd would give it) on generated tracks of 65-75 s, waits for their embeddings, asks
# `coralctl similar`, stops corald, and purges both packages, checking nothing is left behind.
#
#   packaging/check-deb.sh [path/to/coral.deb path/to/coral-libtorch.deb]
#
# As root with mount namespaces available (CI), the installation happens on throw-away overlays
# of /etc, /usr, /var and /run, so this machine is left as it was; elsewhere only the contents
# are checked. Needs dpkg-deb, ffmpeg and jq, and cargo-deb and patchelf when it builds the
# packages. The managed PostgreSQL comes from scripts/setup (/var/cache/coral/postgres).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deb=${1:-}
torch_deb=${2:-}
if [[ -z $deb ]]; then
    target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
    # The workspace's feature set, so the dependencies the tests built are reused as they are
    # (building only these two packages would rebuild many of them with other features).
    cargo build --workspace --bins --features corald/embed
    built=$(packaging/build-deb.sh --prebuilt "$target_dir/debug" | tail -n 2)
    deb=$(sed -n 1p <<<"$built")
    torch_deb=$(sed -n 2p <<<"$built")
fi
for f in "$deb" "$torch_deb"; do
    [[ -n $f && -f $f ]] || {
        echo "check-deb: no package at '$f' (give both coral and coral-libtorch)" >&2
        exit 1
    }
done
echo "==> checking $deb and $torch_deb"

failures=0
check() {
    local what=$1
    shift
    if "$@"; then
        printf '  ok    %s\n' "$what"
    else
        printf '  FAIL  %s\n' "$what"
        failures=$((failures + 1))
    fi
}

contents=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
expected=(
    /usr/bin/corald
    /usr/bin/coralctl
    /usr/lib/systemd/system/corald.service
    /usr/lib/systemd/system/corald.socket
    /usr/lib/systemd/system/coral-bridge.service
    /usr/lib/systemd/system/coral-worker.service
    /usr/lib/sysusers.d/coral.conf
    /usr/lib/tmpfiles.d/coral.conf
    /etc/coral/corald.toml
    /usr/share/coral/models/musicnn-msd.pt
    /usr/share/coral/models/musicnn-msd.json
    /usr/share/coral/models/musicnn-msd-int8.pt
    /usr/share/coral/models/musicnn-msd-int8.json
    /usr/share/coral/models/musicnn-msd-mtt.pt
    /usr/share/coral/models/musicnn-msd-mtt.json
    /usr/share/coral/models/musicnn-msd-mtt-int8.pt
    /usr/share/coral/models/musicnn-msd-mtt-int8.json
    /usr/share/coral/models/LICENSE-musicnn
    /usr/share/bash-completion/completions/coralctl
    /usr/share/zsh/vendor-completions/_coralctl
    /usr/share/fish/vendor_completions.d/coralctl.fish
    /usr/share/man/man1/coralctl.1.gz
    /usr/share/man/man1/coralctl-scan.1.gz
    /usr/share/doc/coral/service.md
)
for f in "${expected[@]}"; do
    check "contains $f" grep -qxF "$f" <<<"$contents"
done
torch_contents=$(dpkg-deb -c "$torch_deb" | awk '{print $6}' | sed 's|^\./|/|')
for f in /usr/lib/coral/torch/lib/libtorch_cpu.so /usr/lib/coral/torch/lib/libc10.so; do
    check "coral-libtorch contains $f" grep -qxF "$f" <<<"$torch_contents"
done
check "coral depends on coral-libtorch" \
    sh -c "dpkg-deb -f '$deb' Depends | grep -q 'coral-libtorch (= '"
check "conffiles list /etc/coral/corald.toml" \
    sh -c "dpkg-deb --ctrl-tarfile '$deb' | tar -xO ./conffiles | grep -qx /etc/coral/corald.toml"

can_install=0
if [[ $(id -u) -eq 0 ]] && command -v unshare >/dev/null 2>&1 &&
    unshare --mount --propagation private true 2>/dev/null; then
    can_install=1
fi
if ((can_install)); then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    deb_abs=$(realpath "$deb")
    torch_deb_abs=$(realpath "$torch_deb")
    # Everything below runs in a private mount namespace on overlays: nothing reaches the host.
    if unshare --mount --propagation private bash -s "$deb_abs" "$torch_deb_abs" "$scratch" <<'INNER'; then
set -euo pipefail
deb=$1
torch_deb=$2
scratch=$3
for d in etc usr var run; do
    mkdir -p "$scratch/$d-up" "$scratch/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$scratch/$d-up,workdir=$scratch/$d-work" "/$d"
done
# As on a machine that never had Coral: this machine's own state (a corald run here as root)
# is hidden by the overlays.
rm -rf /var/lib/coral /run/coral /etc/coral
fail=0
ok() { printf '  ok    %s\n' "$1"; }
bad() { printf '  FAIL  %s\n' "$1"; fail=1; }
t() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi; }
# The installed corald, started as its unit starts it, embeds generated tracks and answers
# `similar`.
embed_check() {
    local music=/var/lib/coral-check-music log=$scratch/corald.log sock=/run/coral/corald.sock
    mkdir -p "$music"
    local i freq
    for i in 1 2 3; do
        freq=$((220 * i))
        ffmpeg -hide_banner -loglevel error -nostdin -y \
            -f lavfi -i "sine=frequency=$freq:duration=$((60 + 5 * i)):sample_rate=44100" \
            -f lavfi -i "anoisesrc=color=pink:amplitude=0.1:duration=$((60 + 5 * i)):sample_rate=44100" \
            -filter_complex amix=inputs=2 -metadata artist="Check $i" -metadata title="Tone $i" \
            "$music/tone-$i.flac" || return 1
    done
    chmod -R a+rX "$music"
    local exec env
    exec=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/corald.service)
    env=$(sed -n 's/^Environment=//p' /usr/lib/systemd/system/corald.service)
    # What StateDirectory=/RuntimeDirectory= give the service under systemd.
    install -d -o coral -g coral -m 0750 /var/lib/coral
    install -d -o coral -g coral -m 0755 /run/coral
    # shellcheck disable=SC2086 # ExecStart and Environment are word lists
    runuser -u coral -- env $env STATE_DIRECTORY=/var/lib/coral RUNTIME_DIRECTORY=/run/coral \
        CONFIGURATION_DIRECTORY=/etc/coral $exec >"$log" 2>&1 &
    local pid=$! waited=0
    ctl() { /usr/bin/coralctl --socket "$sock" "$@"; }
    until ctl status >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null || ((waited >= 240)); then
            bad "the installed corald answers on $sock"
            tail -n 30 "$log"
            kill "$pid" 2>/dev/null || true
            return 1
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
    ok "the installed corald (its unit's ExecStart, as coral) answers on $sock"
    local rc=0 embedded=0
    if ctl library add "$music" >/dev/null; then
        waited=0
        while ((waited < 600)); do
            embedded=$(ctl --json status | jq '.embedding.tracks_embedded // 0')
            ((embedded >= 3)) && break
            sleep 0.5
            waited=$((waited + 1))
        done
    fi
    if ((embedded >= 3)); then
        ok "the installed corald computed embeddings ($embedded tracks, $(ctl --json status | jq -r .embedding.device))"
        local id n
        id=$(ctl --json search Tone --limit 1 | jq -r '.[0].id // empty')
        n=$(ctl --json similar "$id" --limit 5 | jq 'length')
        if [[ $n == 2 ]]; then
            ok "coralctl similar answers (2 neighbours of track $id)"
        else
            bad "coralctl similar answers (got '$n' neighbours of track '$id', expected 2)"
            rc=1
        fi
    else
        bad "the installed corald computed embeddings (got $embedded of 3)"
        ctl scans || true
        tail -n 30 "$log"
        rc=1
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$music"
    return "$rc"
}
if dpkg -i "$torch_deb" "$deb" >"$scratch/dpkg-install.log" 2>&1; then ok "dpkg -i"; else bad "dpkg -i"; cat "$scratch/dpkg-install.log"; fi
t "user coral exists" getent passwd coral
t "group coral exists" getent group coral
t "coral's home is /var/lib/coral" sh -c 'getent passwd coral | cut -d: -f6 | grep -qx /var/lib/coral'
t "/var/lib/coral belongs to coral" sh -c '[ "$(stat -c %U:%G /var/lib/coral)" = coral:coral ]'
t "/run/coral belongs to coral" sh -c '[ "$(stat -c %U:%G /run/coral)" = coral:coral ]'
t "corald is installed" test -x /usr/bin/corald
t "coralctl is installed" test -x /usr/bin/coralctl
t "the fp32 model is installed" test -s /usr/share/coral/models/musicnn-msd.pt
t "the int8 model is installed" test -s /usr/share/coral/models/musicnn-msd-int8.pt
t "the fused model (the CUDA default) is installed" test -s /usr/share/coral/models/musicnn-msd-mtt.pt
t "the fused int8 model (the CPU default) is installed" test -s /usr/share/coral/models/musicnn-msd-mtt-int8.pt
t "corald loads libtorch from /usr/lib/coral" sh -c 'ldd /usr/bin/corald | grep -q "libtorch_cpu.so => /usr/lib/coral/torch/lib/libtorch_cpu.so" && ! ldd /usr/bin/corald | grep -q "not found"'
t "corald reads the shipped configuration" /usr/bin/corald --check-config --config /etc/coral/corald.toml
t "coralctl --help runs" /usr/bin/coralctl --help
if command -v systemd-analyze >/dev/null 2>&1; then
    if out=$(systemd-analyze verify --man=no /usr/lib/systemd/system/corald.service \
        /usr/lib/systemd/system/corald.socket /usr/lib/systemd/system/coral-bridge.service \
        /usr/lib/systemd/system/coral-worker.service 2>&1) &&
        [[ -z $out ]]; then
        ok "systemd-analyze verify (installed units)"
    else
        bad "systemd-analyze verify (installed units): $out"
    fi
fi
t "units enabled" test -L /etc/systemd/system/sockets.target.wants/corald.socket
embed_check || fail=1
t "dpkg -r" dpkg -r coral
t "binaries removed" sh -c '! test -e /usr/bin/corald'
t "dpkg -P" dpkg -P coral coral-libtorch
t "state removed on purge" sh -c '! test -e /var/lib/coral'
t "libtorch removed on purge" sh -c '! test -e /usr/lib/coral'
t "no package files left" sh -c '! dpkg -S /usr/bin/corald /usr/lib/coral >/dev/null 2>&1'
exit $fail
INNER
        :
    else
        failures=$((failures + 1))
    fi
else
    echo "  (not root or no mount namespaces: installation not checked)"
fi

if ((failures)); then
    echo "check-deb: $failures check(s) failed"
    exit 1
fi
echo "check-deb: all checks passed"
