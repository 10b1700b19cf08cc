#!/usr/bin/env bash
# Installs what encidfs needs on Debian/Ubuntu: FUSE 3 (and what building pyfuse3 takes),
# then a virtual environment in .venv with encidfs and its test tools, and as root the helper
# mount(8) runs.  With --test, also the programs the tests drive: inotifywait, systemd-analyze,
# systemd-cgls and systemd-cgtop, tmux, libcgroup's cgget, crun and runc with busybox-static
# for their containers, and Prometheus with promtool (on a host run by systemd, that package
# starts a Prometheus service of its own).  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(fuse3 libfuse3-dev pkg-config gcc make)
if [ "${1:-}" = --test ]; then
    packages+=(inotify-tools systemd prometheus tmux cgroup-tools crun runc busybox-static)
fi
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv python3-dev)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

# mount(8) runs /sbin/mount.fuse.encidfs for `mount -t fuse.encidfs` and fstab lines.
helper=/sbin/mount.fuse.encidfs
if [ "$(id -u)" -eq 0 ]; then
    ln -sfn "$PWD/.venv/bin/encidfs" "$helper"
elif [ "$(readlink "$helper" 2>/dev/null)" != "$PWD/.venv/bin/encidfs" ]; then
    echo "for mount(8) and fstab, as root: ln -sfn $PWD/.venv/bin/encidfs $helper"
fi
