#!/usr/bin/env bash
# Snapshot and restore times per mechanism: makes an XFS (reflink=1), a btrfs and an ext4
# filesystem on sparse loop images, runs `k8scsi bench-snapshots` with its data directory on
# each, and cleans up. Needs root. Usage:
#   bash scripts/bench-snapshots.sh [path/to/k8scsi] [extra bench-snapshots args...]
# FILESYSTEMS="xfs-reflink btrfs" limits the runs (default: all eight below).
set -euo pipefail
K8SCSI="${1:-target/debug/k8scsi}"
shift || true
WORK="$(mktemp -d /tmp/k8scsi-bench-snap-XXXXXX)"
cleanup() {
  for m in "$WORK"/mnt-*; do
    [ -d "$m" ] && umount "$m" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

FILESYSTEMS="${FILESYSTEMS:-xfs-reflink btrfs btrfs-dir ext4 ext4-dir btrfs-shared xfs-shared ext4-shared}"

run_on() { # name, mkfs command..., then bench args after --
  local name="$1"; shift
  case " $FILESYSTEMS " in *" $name "*) ;; *) return 0 ;; esac
  local mkfs=()
  while [ "$1" != "--" ]; do mkfs+=("$1"); shift; done
  shift
  truncate -s 40G "$WORK/$name.img"
  "${mkfs[@]}" "$WORK/$name.img" >/dev/null
  mkdir -p "$WORK/mnt-$name"
  mount -o loop "$WORK/$name.img" "$WORK/mnt-$name"
  echo "== $name"
  "$K8SCSI" bench-snapshots --data-dir "$WORK/mnt-$name" "$@"
  umount "$WORK/mnt-$name"
  rm -f "$WORK/$name.img"
}

run_on xfs-reflink mkfs.xfs -q -m reflink=1 -- --backend loop "$@"
run_on btrfs mkfs.btrfs -q -- --backend loop "$@"
run_on btrfs-dir mkfs.btrfs -q -- --backend dir "$@"
run_on ext4 mkfs.ext4 -q -- --backend loop "$@"
run_on ext4-dir mkfs.ext4 -q -- --backend dir "$@"
run_on btrfs-shared mkfs.btrfs -q -- --backend shared "$@"
run_on xfs-shared mkfs.xfs -q -m reflink=1 -- --backend shared "$@"
run_on ext4-shared mkfs.ext4 -q -- --backend shared "$@"
