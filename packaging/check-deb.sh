#!/usr/bin/env bash
# Checks the `coral` Debian package: builds it from the debug binaries the tests already built
# (packaging/build-deb.sh --prebuilt target/debug: no second full build) unless a .deb is given, checks that `dpkg-deb -c`
# lists the expected files, then installs it with `dpkg -i` and checks that the user, group,
# directories and files exist, that `systemd-analyze verify` accepts the installed units and
# that `corald --check-config` reads the shipped configuration; finally purges it.
#
#   packaging/check-deb.sh [path/to/coral.deb]
#
# As root with mount namespaces available (CI), the installation happens on throw-away overlays
# of /etc, /usr, /var and /run, so this machine is left as it was; elsewhere only the contents
# are checked. Needs dpkg-deb, and cargo-deb when it has to build the package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deb=${1:-}
if [[ -z $deb ]]; then
    target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
    # The workspace's feature set, so the dependencies the tests built are reused as they are
    # (building only these two packages would rebuild many of them with other features).
    cargo build --workspace --bins
    deb=$(packaging/build-deb.sh --prebuilt "$target_dir/debug" | tail -n 1)
fi
[[ -f $deb ]] || {
    echo "check-deb: no package at '$deb'" >&2
    exit 1
}
echo "==> checking $deb"

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
    # Everything below runs in a private mount namespace on overlays: nothing reaches the host.
    if unshare --mount --propagation private bash -s "$deb_abs" "$scratch" <<'INNER'; then
set -euo pipefail
deb=$1
scratch=$2
for d in etc usr var run; do
    mkdir -p "$scratch/$d-up" "$scratch/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$scratch/$d-up,workdir=$scratch/$d-work" "/$d"
done
fail=0
ok() { printf '  ok    %s\n' "$1"; }
bad() { printf '  FAIL  %s\n' "$1"; fail=1; }
t() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi; }
if dpkg -i "$deb" >"$scratch/dpkg-install.log" 2>&1; then ok "dpkg -i"; else bad "dpkg -i"; cat "$scratch/dpkg-install.log"; fi
t "user coral exists" getent passwd coral
t "group coral exists" getent group coral
t "coral's home is /var/lib/coral" sh -c 'getent passwd coral | cut -d: -f6 | grep -qx /var/lib/coral'
t "/var/lib/coral belongs to coral" sh -c '[ "$(stat -c %U:%G /var/lib/coral)" = coral:coral ]'
t "/run/coral belongs to coral" sh -c '[ "$(stat -c %U:%G /run/coral)" = coral:coral ]'
t "corald is installed" test -x /usr/bin/corald
t "coralctl is installed" test -x /usr/bin/coralctl
t "the model is installed" test -s /usr/share/coral/models/musicnn-msd.pt
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
t "dpkg -r" dpkg -r coral
t "binaries removed" sh -c '! test -e /usr/bin/corald'
t "dpkg -P" dpkg -P coral
t "state removed on purge" sh -c '! test -e /var/lib/coral'
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
