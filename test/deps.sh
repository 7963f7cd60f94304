#!/usr/bin/env bash
# Installs what the end-to-end tests need when it is missing (Debian),
# and prepares this machine's cgroups for crun. Safe to run again.
set -euo pipefail

need=()
command -v runc >/dev/null || need+=(runc)
command -v crun >/dev/null || need+=(crun)
command -v podman >/dev/null || need+=(podman)
# grep without -q reads the whole list: with pipefail, -q's early exit would
# SIGPIPE busybox and count as missing.
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x base64 >/dev/null || need+=(busybox-static)
command -v newuidmap >/dev/null || need+=(uidmap)
command -v rpmbuild >/dev/null || need+=(rpm)
command -v systemd-analyze >/dev/null || need+=(systemd)
# test/cri: CRI-O's conmon; building CRI-O (cgo, libseccomp) and its pinns.
command -v conmon >/dev/null || need+=(conmon)
command -v gcc >/dev/null || need+=(gcc)
dpkg-query -W -f '${Status}' libseccomp-dev 2>/dev/null | grep -q 'install ok installed' || need+=(libseccomp-dev)
# nginx: a real application that reloads its TLS files on SIGHUP (renew_signal).
[ -x /usr/sbin/nginx ] || need+=(nginx)
# make test-systemd: systemd as PID 1 of a container on this root, and the
# system bus that SPIRE's systemd workload attestor asks.
[ -x /lib/systemd/systemd ] || need+=(systemd)
command -v dbus-daemon >/dev/null || need+=(dbus)
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test/deps.sh: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "test/deps.sh: installing ${need[*]}"
  apt-get update -qq
  # Installing nginx must not start it on the node (it would hold port 80
  # and outlive the tests): a policy-rc.d that refuses every start, only
  # for this install and only if the machine has none.
  policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# crun refuses hybrid cgroups while cgroup v2 holds a controller; moving
# hugetlb to v1 (once) lets it run on this kind of machine.
if [ "$(id -u)" = 0 ] && [ -d /sys/fs/cgroup/unified ] && ! mountpoint -q /sys/fs/cgroup/hugetlb 2>/dev/null; then
  if grep -qw hugetlb /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null; then
    mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb || true
  fi
fi
