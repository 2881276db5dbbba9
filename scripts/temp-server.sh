# Sourced by the benchmark scripts: starts `$binary serve` on fresh temporary directories,
# sets $dir (its directories, socket at $dir/csi.sock) and $pid, waits for the socket, and
# stops the server and removes the directories when the script exits.
#
#   binary=target/release/k8scsi; source scripts/temp-server.sh NAME
dir=$(mktemp -d "/tmp/k8scsi-$1.XXXXXX")
"$binary" serve --endpoint "unix://$dir/csi.sock" --node-id bench --state-dir "$dir/state" \
  --data-dir "$dir/data" --kubelet-dir "$dir/kubelet" >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [[ -S "$dir/csi.sock" ]] && break; sleep 0.1; done
