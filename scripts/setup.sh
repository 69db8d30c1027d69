#!/usr/bin/env bash
# Installs what xlb needs on Debian 12, idempotently and without questions.
# Each step checks before it acts and says what it did; a second run changes nothing.
set -eu
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, /lib/modules)"

# Debian packages. bcc comes from Debian: PyPI's "bcc" is an unrelated project.
# prometheus (with promtool) is for the metrics tests only; keepalived and bird2 for the
# high-availability lab (netns-lab/ha-*.sh), which runs its own instances; nginx, haproxy,
# nftables and netsniff-ng (trafgen) for `make bench`'s backends and the balancers it compares;
# systemd (systemd-analyze) for the test of contrib/xlb.service; openssl for the https checks'
# tests' self-signed certificates.
PKGS="python3-bpfcc linux-headers-amd64 python3-venv iproute2 iputils-ping ethtool wrk curl prometheus keepalived bird2
      nginx haproxy nftables netsniff-ng systemd openssl"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends $missing >/dev/null || die "apt-get install failed:$missing"
else
    say "Debian packages present"
fi

# The tests run their own Prometheus, keepalived and BIRD, the bench its own nginx and
# HAProxy, inside lab namespaces. The packages' services would run in the root namespace
# (Prometheus on :9090, VRRP and BGP on the host's links, nginx on :80): stop and disable
# them, whether systemd or (where there is no systemd) the postinst's sysvinit script
# started them. sysv_stop stops the service's
# own daemon, never a test's (by the service's pidfile or user: keepalived's script has
# no status and BIRD's would stop every bird), and succeeds only if it stopped one.
sysv_stop() {
    case $1 in
        keepalived) start-stop-daemon --stop --quiet --pidfile /run/keepalived.pid --exec /usr/sbin/keepalived ;;
        bird) start-stop-daemon --stop --quiet --user bird --exec /usr/sbin/bird ;;
        *) "/etc/init.d/$1" status && "/etc/init.d/$1" stop ;;
    esac
}
for svc in prometheus prometheus-node-exporter keepalived bird nginx haproxy; do
    if [ -d /run/systemd/system ]; then
        { systemctl is-enabled --quiet "$svc" || systemctl is-active --quiet "$svc"; } 2>/dev/null || continue
        say "stopping and disabling the $svc service"
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$svc" ]; then
        if sysv_stop "$svc" >/dev/null 2>&1; then
            say "stopped the $svc service"
        fi
        if ls /etc/rc[2-5].d/S*"$svc" >/dev/null 2>&1; then
            say "disabling the $svc service at boot"
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    fi
done

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. This kernel ships no
# headers of its own; XDP only uses stable UAPI, so Debian's newest installed headers do.
mod=/lib/modules/$(uname -r)
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$hdr" ] || die "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64"
common=${hdr%-amd64}-common
# bcc takes the generated headers from build and kconfig.h from source or build; a
# link that dangles (its headers package removed) counts as missing.
if [ -d "$mod/build/include/generated" ] &&
    { [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/source/include/linux/kconfig.h" ]; }; then
    say "kernel headers for $(uname -r) present ($(readlink -f "$mod/build"))"
else
    say "linking $mod/build -> $hdr and $mod/source -> $common (bcc needs headers; none exist for $(uname -r))"
    mkdir -p "$mod"
    ln -sfn "$hdr" "$mod/build"
    ln -sfn "$common" "$mod/source"
fi

# The venv is made from Debian's own python3, with system site-packages, so that
# Debian's bcc imports in it (the python3 first on PATH may be another build).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    say "creating .venv from /usr/bin/python3 with system site-packages"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
# What .venv lacks, comma-separated, or nothing: bcc, each requirement of xlb (the test
# extra's too), and xlb from this very checkout (a copied or moved clone's .venv runs
# the old one's code). The stamp alone would miss a package removed since.
venv_lacks() {
    .venv/bin/python -I - "$PWD/control" <<'EOF'   # -I: as the venv is, whatever PYTHONPATH says
import importlib.metadata as md, importlib.util, re, sys
from pathlib import Path
lacks = [] if importlib.util.find_spec("bcc") else ["bcc"]
try:
    reqs = md.requires("xlb") or []
except md.PackageNotFoundError:
    reqs = []
for req in reqs:
    name = re.match(r"[\w.-]+", req)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        lacks.append(name)
xlb = importlib.util.find_spec("xlb")
if not xlb or Path(xlb.origin).resolve().parent != Path(sys.argv[1]).resolve():
    lacks.append(f"xlb from {sys.argv[1]}")
print(", ".join(lacks))
EOF
}
stamp=.venv/.xlb-installed
lacks=$(venv_lacks) || die ".venv/bin/python does not run"
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ -z "$lacks" ]; then
    say "Python environment up to date"
else
    [ -f "$stamp" ] || lacks=""    # a new .venv lacks everything
    say "installing xlb and its Python dependencies into .venv${lacks:+ (it lacks $lacks)}"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' ||
        die "pip install -e '.[test]' into .venv failed"
    touch "$stamp"
    lacks=$(venv_lacks)
    [ -z "$lacks" ] || die ".venv still lacks $lacks after pip install"
fi
say "ready: .venv/bin/xlb"
