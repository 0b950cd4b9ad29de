#!/usr/bin/env bash
# Build dist/agent_<version>_<arch>.deb from this tree: `bash packaging/build-deb.sh`.
#
# Layout of the package:
#   /usr/lib/agent/                   a private virtual environment: the agent (with its compiled
#                                     data plane, agent._fastpath) and its wheels
#   /usr/bin/agent                    wrapper: /usr/lib/agent/bin/python -I -B -m agent
#   /lib/systemd/system/*.service     agent, agent@, agent-derper, agent-coordinator
#   /usr/lib/sysusers.d/agent.conf    system users agent, agent-derper, agent-coordinator
#   /usr/lib/tmpfiles.d/agent.conf    /run/wireguard (shared with wireguard-go), made at boot
#   /usr/share/polkit-1/rules.d/50-agent.rules  user agent may set DNS on its link (resolved)
#   /etc/agent/agent.conf             conffile: agent.conf.example with only [interface] active
#   /etc/agent/coordinator.conf       conffile: coordinator.conf.example (root only: the unit
#                                     hands it to the coordinator as a credential)
#   /usr/share/doc/agent/             README.md, the two config examples, copyright
#
# Why a private virtual environment and not Debian's python3 packages: Debian 12 has no
# python3-pytun at all, and its pyroute2 (0.7.2), cryptography (38), structlog (22.3) and numpy
# (1.24) are older than pyproject.toml's floors (cryptography>=42, structlog>=23, numpy>=1.26).
# The environment is built with Debian's own interpreter, so compiled modules match its ABI and
# the package Depends on exactly that python3.X; C libraries the wheels need are found with
# dpkg-shlibdeps. Wheels come from PyPI (or a mirror/cache pip is configured for); python-pytun
# ships no wheel, so building needs gcc and python3.X-dev (packaging/setup.sh installs both).
#
# Needs: dpkg-deb, dpkg-shlibdeps (dpkg-dev), python3-venv, python3-dev, gcc, libssl-dev. Runs as any user;
# files in the package are owned by root (dpkg-deb --root-owner-group). Environment:
#   AGENT_DEB_PYTHON      interpreter to build for (default: what /usr/bin/python3 points to)
#   AGENT_DEB_MAINTAINER  Maintainer field (default "agent maintainers <root@localhost>")
#   AGENT_DEB_OUT         output directory (default dist/)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TREE=$PWD
say() { printf '==> %s\n' "$*"; }
die() {
    printf 'build-deb: %s\n' "$*" >&2
    exit 1
}

PY=$(readlink -f "${AGENT_DEB_PYTHON:-/usr/bin/python3}")
[ -x "$PY" ] || die "no interpreter at ${AGENT_DEB_PYTHON:-/usr/bin/python3}"
for tool in dpkg-deb dpkg-shlibdeps dpkg; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg-dev)"
done
"$PY" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$PY cannot create virtual environments (apt-get install python3-venv)"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PY is Python $PYVER; the agent needs 3.11 or newer"
dpkg -S "$PY" >/dev/null 2>&1 ||
    die "$PY does not come from a Debian package; the .deb must use Debian's interpreter"
PYPKG="python$PYVER"  # the interpreter with its whole standard library
dpkg-query -W -f='${Status}' "$PYPKG" 2>/dev/null | grep -q 'ok installed' ||
    die "$PYPKG is not installed"

VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
OUT=${AGENT_DEB_OUT:-$TREE/dist}
DEB="$OUT/agent_${VERSION}_${ARCH}.deb"
MAINTAINER=${AGENT_DEB_MAINTAINER:-agent maintainers <root@localhost>}
PREFIX=/usr/lib/agent

WORK=$(mktemp -d "${TMPDIR:-/tmp}/agent-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
VENV="$ROOT$PREFIX"

say "agent $VERSION for $ARCH with $PY ($PYPKG)"

# The source is copied so building the wheel writes nothing into the tree.
mkdir -p "$WORK/src"
cp -a pyproject.toml setup.py README.md agent native "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
find "$WORK/src" -name '*.so' -delete  # an editable install's in-tree build is not this one

say "venv: $PREFIX with the agent and its dependencies (pip)"
"$PY" -m venv "$VENV"
# AGENT_NATIVE=1: the compiled data plane (agent._fastpath, against Debian's libssl3) must build
AGENT_NATIVE=1 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
    --no-warn-script-location "$WORK/src"
"$VENV/bin/python" -m pip uninstall --quiet --yes pip setuptools
# Nothing of the build may point into $WORK: scripts, activate files, pip's records.
find "$VENV/bin" ! -type d ! -name "python*" -delete  # /usr/bin/agent runs -m agent
find "$VENV" -name direct_url.json -delete
grep -rlI --null "$VENV" "$VENV" | xargs -0r sed -i "s#$VENV#$PREFIX#g"
if grep -rlI "$WORK" "$VENV"; then die "files above still name the build directory $WORK"; fi
# Bytecode now, recorded with its installed path; -B in the wrapper keeps it from changing.
"$VENV/bin/python" -m compileall -q -j 0 -s "$ROOT" -p / "$VENV/lib" >/dev/null

say "files: wrapper, units, sysusers, tmpfiles, configs, docs"
install -D -m 0755 packaging/deb/agent.sh "$ROOT/usr/bin/agent"
for unit in systemd/*.service; do
    install -D -m 0644 "$unit" "$ROOT/lib/systemd/system/$(basename "$unit")"
done
install -D -m 0644 packaging/sysusers.conf "$ROOT/usr/lib/sysusers.d/agent.conf"
install -D -m 0644 packaging/tmpfiles.conf "$ROOT/usr/lib/tmpfiles.d/agent.conf"
install -D -m 0644 packaging/polkit-resolved.rules "$ROOT/usr/share/polkit-1/rules.d/50-agent.rules"
install -d -m 0750 "$ROOT/etc/agent"
# The default config: the documented example with everything after [interface] commented out,
# so the service starts as installed (an interface, no peers) and every key stays documented.
awk '
    /^\[derp\]/ { rest = 1 }
    rest && !/^[[:space:]]*(#|$)/ { print "#" $0; next }
    { print }
' agent.conf.example >"$ROOT/etc/agent/agent.conf"
chmod 0640 "$ROOT/etc/agent/agent.conf"
install -m 0640 coordinator.conf.example "$ROOT/etc/agent/coordinator.conf"
install -D -m 0644 README.md "$ROOT/usr/share/doc/agent/README.md"
install -m 0644 agent.conf.example coordinator.conf.example "$ROOT/usr/share/doc/agent/"
install -D -m 0644 docs/reference.md "$ROOT/usr/share/doc/agent/docs/reference.md"
LICENSE=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["license"]["text"])')
printf 'agent %s\nLicense: %s\nThe bundled Python packages in %s carry their own licenses\n(see %s/lib/python%s/site-packages/*.dist-info).\n' \
    "$VERSION" "$LICENSE" "$PREFIX" "$PREFIX" "$PYVER" >"$ROOT/usr/share/doc/agent/copyright"

say "control: dependencies of the compiled modules (dpkg-shlibdeps)"
mkdir -p "$WORK/debian" "$ROOT/DEBIAN"
printf 'Source: agent\n\nPackage: agent\nArchitecture: any\n' >"$WORK/debian/control"
mapfile -d '' ELFS < <(find "$VENV" -type f -name '*.so*' -print0)
# Libraries bundled with the wheels (numpy.libs, ...) are found in their own directories.
mapfile -t LIBDIRS < <(find "$VENV" -type d -name '*.libs' | sed 's/^/-l/')
SHLIBS=$(cd "$WORK" && dpkg-shlibdeps -O --ignore-missing-info "${LIBDIRS[@]}" "${ELFS[@]}" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no library dependencies"
DEPENDS="$PYPKG, $SHLIBS"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat >"$ROOT/DEBIAN/control" <<EOF
Package: agent
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $SIZE
Depends: $DEPENDS
Recommends: wireguard-tools
Section: net
Priority: optional
Description: userspace WireGuard-compatible overlay VPN agent
 Tunnels over direct UDP or DERP relays, with NAT traversal. Runs as the
 hardened systemd service agent.service (one interface per config with
 agent@NAME.service); agent-derper.service runs a DERP relay and STUN server.
 Python $PYVER and the Python dependencies live in a private environment
 in $PREFIX.
EOF
printf '%s\n' /etc/agent/agent.conf /etc/agent/coordinator.conf >"$ROOT/DEBIAN/conffiles"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$ROOT/DEBIAN/"

say "dpkg-deb: $DEB"
mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz -z6 --build "$ROOT" "$DEB" >/dev/null
say "built $DEB ($(du -h "$DEB" | cut -f1), Depends: $DEPENDS)"
