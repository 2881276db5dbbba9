#!/usr/bin/env bash
# How long one create+delete benchmark run slows down the next on the same filesystem.
#
# On ext4 without a journal, inode allocation skips every free inode deleted in the last 60 s
# (360 s while its inode-table block is still dirty), so thousands of deletions leave a trail
# that every later `mkdir` in that block group walks past. This script runs the README's
# create+delete phases, then reruns them after growing idle gaps. Every 15 s of a gap it makes
# and removes one directory in the temporary directory's parent and prints where ext4 put its
# inode (block group:index, 8,192 inodes per group assumed; a low index means the earlier
# run's inodes no longer count as recently deleted). Before each run, two seconds of the
# `rpc-pair` workload (gRPC alone, no filesystem work) gauge the VM's own speed.
#
#   sudo bash scripts/bench-after-idle.sh target/release/k8scsi [GAPS...]   # default 30 90 180 360
set -euo pipefail
binary=$1
shift
gaps=("$@")
((${#gaps[@]})) || gaps=(30 90 180 360)
per_group=8192

probe() {
  local d i
  d=$(mktemp -d)
  mkdir "$d/x"
  i=$(stat -c %i "$d/x")
  rm -rf "$d"
  echo "$((i / per_group)):$((i % per_group))"
}

run() {
  local gap=$1 where=$2 rpc out
  rpc=$("$binary" bench --seconds 2 --concurrency 16 --workloads rpc-pair | awk '/c=16/ {print $6}')
  sleep 3
  out=$("$binary" bench --seconds 5 --concurrency 1,16 --workloads create-delete)
  printf '%s gap=%ss probe=%s rpc-pair=%s/s c=1:%s/s | %s\n' "$(date -u +%H:%M:%S)" "$gap" \
    "$where" "$rpc" "$(awk '/c=1 / {print $5}' <<<"$out")" \
    "$(grep 'c=16' <<<"$out" | tr -s ' ')"
}

run - "$(probe)"
for gap in "${gaps[@]}"; do
  waited=0
  while ((waited < gap)); do
    sleep 15
    waited=$((waited + 15))
    echo "  +${waited}s probe=$(probe)"
  done
  run "$gap" "$(probe)"
done
