#!/usr/bin/env bash
# How long DeleteVolume takes for a volume full of files: starts a server on temporary
# directories, creates a plain directory volume, fills it with DIRS directories of 1,000 empty
# files each (as a pod would), and times `k8scsi client delete`.
#
#   sudo bash scripts/bench-big-delete.sh target/release/k8scsi [DIRS]
set -euo pipefail
binary=$1
dirs=${2:-100}
source "$(dirname "$0")/temp-server.sh" bigdelete
client() { "$binary" client --endpoint "unix://$dir/csi.sock" "$@"; }
id=$(client create-volume full --size 1Mi --param enforceCapacity=false | awk '{print $1; exit}')
root="$dir/data/volumes/$id"
for i in $(seq "$dirs"); do
  mkdir "$root/d$i"
  (cd "$root/d$i" && seq 1000 | xargs touch)
done
sync
started=$(date +%s%N)
client delete "$id" >/dev/null
ended=$(date +%s%N)
echo "DeleteVolume of $((dirs * 1000)) files: $(((ended - started) / 1000000)) ms"
