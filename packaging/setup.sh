#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine to run and test the agent. Run as root from anywhere; it is
# safe to run again (apt and pip only add what is missing, an existing .venv is reused).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "packaging/setup.sh must run as root (it installs Debian packages)" >&2
    exit 1
fi

say "apt: updating package lists"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends matters: wireguard-tools would otherwise pull in a kernel image
say "apt: installing python3-venv gcc libssl-dev wireguard-go wireguard-tools iperf3 systemd-container miniupnpd-nftables ..."
apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 \
    python3-venv python3-dev gcc libssl-dev wireguard-go wireguard-tools iperf3 iproute2 iputils-ping \
    nftables ethtool procps dpkg-dev systemd systemd-container mmdebstrap postgresql \
    miniupnpd-nftables >/dev/null

PY="$(command -v python3 || true)"
if [ -z "$PY" ]; then
    echo "no python3 on PATH" >&2
    exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "$PY is $("$PY" -V 2>&1); the agent needs Python 3.11 or newer" >&2
    exit 1
fi

if [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys' 2>/dev/null; then
    say "venv: reusing .venv ($(.venv/bin/python -V))"
else
    say "venv: creating .venv with $PY ($("$PY" -V))"
    rm -rf .venv
    "$PY" -m venv .venv
fi

say "pip: installing the agent (editable, with its compiled data plane) and its test tools into .venv"
# AGENT_NATIVE=1: a compiled module that does not build is an error here, not a quiet fallback
AGENT_NATIVE=1 .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

say "ready: .venv/bin/agent demo   (tour)   |   .venv/bin/python -m pytest   (tests)"
