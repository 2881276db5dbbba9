#!/usr/bin/env bash
# Server-side cost of one create+delete cycle: CPU time and context switches of the k8scsi server
# process per cycle, read from /proc around a `k8scsi bench` run against it. Less sensitive to a
# busy machine or a slow disk than cycles/s, so two builds can be compared on the same box.
#
#   sudo bash scripts/bench-server-cpu.sh target/release/k8scsi [SECONDS]
set -euo pipefail
binary=$1
seconds=${2:-4}
source "$(dirname "$0")/temp-server.sh" cpubench
sleep 0.5
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }            # utime + stime, clock ticks
switches() { cat /proc/"$pid"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
cpu0=$(cpu); sw0=$(switches)
line=$("$binary" bench --endpoint "unix://$dir/csi.sock" --server-pid "$pid" --seconds "$seconds" \
  --concurrency 16 --workloads create-delete | grep 'c=16')
cpu1=$(cpu); sw1=$(switches)
cycles=$(sed 's/.*cycles=\([0-9]*\).*/\1/' <<<"$line")
ticks=$(getconf CLK_TCK)
echo "$line"
awk -v c="$cycles" -v t="$((cpu1 - cpu0))" -v s="$((sw1 - sw0))" -v hz="$ticks" \
  'BEGIN { printf "server CPU per cycle: %.0f us; context switches per cycle: %.1f\n", t * 1e6 / hz / c, s / c }'
