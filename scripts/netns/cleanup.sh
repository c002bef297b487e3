#!/usr/bin/env bash
# Removes network namespaces left behind by interrupted multi-host tests
# (e2e/netns, e2e/internal/ns): every namespace named tp-*. Processes still
# running inside one (a tcpproxy the test started) are killed first.
# Only those namespaces are touched; the root namespace is never changed.
#
#   scripts/netns/cleanup.sh          remove them
#   scripts/netns/cleanup.sh -n       list what would be removed
set -euo pipefail

dry=
if [ "${1:-}" = "-n" ]; then dry=1; fi
if [ "$(id -u)" != 0 ] && [ -z "$dry" ]; then
  echo "cleanup.sh: needs root (ip netns del)" >&2
  exit 1
fi
command -v ip >/dev/null || { echo "cleanup.sh: ip (iproute2) not found" >&2; exit 1; }

n=0
# `ip netns list` prints "NAME" or "NAME (id: N)".
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^tp-' || true); do
  n=$((n + 1))
  if [ -n "$dry" ]; then
    echo "would remove $ns (pids: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' '))"
    continue
  fi
  for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  ip netns del "$ns" && echo "removed $ns"
done
[ "$n" -gt 0 ] || echo "no tp-* namespaces"
