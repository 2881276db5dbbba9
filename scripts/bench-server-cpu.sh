#!/usr/bin/env bash
# Server-side cost of one create+delete cycle: CPU time and context switches of the k8scsi server
# process per cycle, in total and per thread name (runtime workers, store writer, directory-fsync
# thread, trash remover), read from /proc around a `k8scsi bench` run against it. Less sensitive
# to a busy machine or a slow disk than cycles/s, so two builds can be compared on the same box.
#
#   sudo bash scripts/bench-server-cpu.sh target/release/k8scsi [SECONDS]
set -euo pipefail
binary=$1
seconds=${2:-4}
source "$(dirname "$0")/temp-server.sh" cpubench
sleep 0.5
# One line per thread name: name, CPU clock ticks (utime + stime), voluntary and involuntary
# context switches, summed over the threads of that name.
threads() {
  for task in /proc/"$pid"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ <"$task/comm")" \
      "$(awk '{print $14 + $15}' "$task/stat")" \
      "$(awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2} END {print v, n}' "$task/status")"
  done | awk '{t[$1] += $2; v[$1] += $3; n[$1] += $4} END {for (k in t) print k, t[k], v[k], n[k]}' |
    sort
}
before=$(threads)
line=$("$binary" bench --endpoint "unix://$dir/csi.sock" --server-pid "$pid" --seconds "$seconds" \
  --concurrency 16 --workloads create-delete | grep 'c=16')
after=$(threads)
cycles=$(sed 's/.*cycles=\([0-9]*\).*/\1/' <<<"$line")
echo "$line"
# Threads that started during the run (blocking-pool workers) count from zero.
join -a 2 -e 0 -o 2.1,1.2,1.3,1.4,2.2,2.3,2.4 <(echo "$before") <(echo "$after") |
  awk -v c="$cycles" -v hz="$(getconf CLK_TCK)" '
    { cpu = ($5 - $2) * 1e6 / hz / c; sw = ($6 - $3 + $7 - $4) / c; tc += cpu; ts += sw
      rows[NR] = sprintf("  %-16s %5.0f us  %4.1f switches", $1, cpu, sw) }
    END { printf "server CPU per cycle: %.0f us; context switches per cycle: %.1f\n", tc, ts
          for (i = 1; i <= NR; i++) print rows[i] }'
