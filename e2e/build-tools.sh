#!/usr/bin/env bash
# Build the real Kubernetes components the k8scsi end-to-end test runs on
# loopback (tests/e2e.rs), from the Go module proxy at pinned versions, into a
# cache OUTSIDE the work tree:
#     ${K8SCSI_TOOLS_DIR:-$HOME/.cache/k8scsi-tools}/e2e/bin/
#
# Test tooling only: none of this is product code.
#
# The upstream sidecars and k8s.io/kubernetes pin their k8s.io/* modules with
# replace directives, which `go install mod@version` refuses. So each tool is
# built from a tiny wrapper module that requires the upstream module and
# carries the same replace block (local staging paths of k8s.io/kubernetes are
# mapped to the matching published k8s.io/* v0.X.Y modules).
#
# Idempotent: a stamp file per tool records the version; a warm cache does no
# network access and finishes in well under a second. Each step prints its time.
# A cold build takes roughly 25 minutes on 2 cores (kube-apiserver dominates).
#
# Output: progress on stderr; the LAST stdout line is the bin directory.
#
# Environment:
#   K8SCSI_TOOLS_DIR   cache dir (default: $HOME/.cache/k8scsi-tools)
#   E2E_TOOLS          space-separated subset to build (default: all)
set -euo pipefail

ETCD_VERSION=v3.6.17
KUBE_VERSION=v1.36.3            # kube-apiserver, kube-controller-manager, kubectl
PROVISIONER_VERSION=v6.3.0
RESIZER_VERSION=v2.2.0
SNAPSHOTTER_VERSION=v8.7.0      # csi-snapshotter, snapshot-controller, CRDs
HELM_VERSION=v3.22.0

export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
TOOLS_DIR="${K8SCSI_TOOLS_DIR:-${HOME}/.cache/k8scsi-tools}"
E2E_DIR="${TOOLS_DIR}/e2e"
BIN_DIR="${E2E_DIR}/bin"
SRC_DIR="${E2E_DIR}/src"
mkdir -p "${BIN_DIR}" "${SRC_DIR}"

log() { printf 'e2e-build-tools: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if command -v go >/dev/null 2>&1; then GO="$(command -v go)";
elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go;
else die "Go toolchain not found (needed to build the e2e tools)"; fi

export GOFLAGS="-mod=mod -buildvcs=false" GO111MODULE=on GOWORK=off CGO_ENABLED=0
# Skip checksum DB lookups only for nothing: keep default GOSUMDB (integrity).

now() { date +%s; }

# stamp_ok NAME VERSION -> 0 when NAME is built at VERSION.
stamp_ok() {
  [[ -f "${BIN_DIR}/.$1.version" && "$(cat "${BIN_DIR}/.$1.version")" == "$2" ]] || return 1
  local b
  for b in "${@:3}"; do [[ -x "${BIN_DIR}/${b}" ]] || return 1; done
}

# wrapper_module DIR MODULE VERSION: create a wrapper module in DIR that
# requires MODULE@VERSION with MODULE's own versioned replace directives.
wrapper_module() {
  local dir="$1" module="$2" version="$3"
  rm -rf "${dir}"; mkdir -p "${dir}"
  local upstream_mod
  upstream_mod="$(cd "${dir}" && "${GO}" mod download -json "${module}@${version}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  cat >"${dir}/go.mod" <<MOD
module k8scsi.test/e2e-tools/$(basename "${dir}")

go 1.25
MOD
  # Translate the upstream replace block. Versioned replaces are copied;
  # ./staging/src/<path> (k8s.io/kubernetes) becomes <path> at the staging
  # version (v1.X.Y -> v0.X.Y); other local paths are dropped (they point at
  # sibling modules that the requirement graph already resolves by version).
  local staging_version="v0.${version#v1.}"
  python3 - "${upstream_mod}" "${staging_version}" "${module}" >"${dir}/replaces.txt" <<'PY'
import json, subprocess, sys
mod, staging, module = sys.argv[1], sys.argv[2], sys.argv[3]
data = json.loads(subprocess.check_output(["go", "mod", "edit", "-json", mod]))
for r in data.get("Replace") or []:
    old = r["Old"]["Path"] + ("@" + r["Old"]["Version"] if r["Old"].get("Version") else "")
    new = r["New"]
    if new.get("Version"):
        print(f'{old}={new["Path"]}@{new["Version"]}')
    elif new["Path"].startswith("./staging/src/"):
        print(f'{old}={new["Path"][len("./staging/src/"):]}@{staging}')
PY
  local line
  while IFS= read -r line; do
    [[ -n "${line}" ]] && (cd "${dir}" && "${GO}" mod edit -replace="${line}")
  done <"${dir}/replaces.txt"
  (cd "${dir}" && "${GO}" mod edit -require="${module}@${version}")
}

# build_tool NAME MODULE VERSION PKG:BIN...
build_tool() {
  local name="$1" module="$2" version="$3"; shift 3
  local bins=() spec
  for spec in "$@"; do bins+=("${spec#*:}"); done
  if stamp_ok "${name}" "${version}" "${bins[@]}"; then
    log "${name} ${version}: cached (${bins[*]})"
    return 0
  fi
  local t0; t0="$(now)"
  log "${name} ${version}: building ${bins[*]} from ${module}"
  rm -f "${BIN_DIR}/.${name}.version"
  local dir="${SRC_DIR}/${name}"
  wrapper_module "${dir}" "${module}" "${version}"
  for spec in "$@"; do
    local pkg="${spec%%:*}" bin="${spec#*:}" t1; t1="$(now)"
    (cd "${dir}" && "${GO}" build -trimpath -ldflags='-s -w' -o "${BIN_DIR}/${bin}.tmp" "${pkg}") >&2 \
      || die "building ${pkg} failed"
    mv -f "${BIN_DIR}/${bin}.tmp" "${BIN_DIR}/${bin}"
    log "  ${bin}: built in $(( $(now) - t1 )) s"
  done
  printf '%s\n' "${version}" >"${BIN_DIR}/.${name}.version"
  log "${name} ${version}: done in $(( $(now) - t0 )) s"
}

# The snapshot CRDs ship in the external-snapshotter client module zip.
install_snapshot_crds() {
  local dest="${E2E_DIR}/snapshot-crds"
  if [[ -f "${dest}/.version" && "$(cat "${dest}/.version")" == "${SNAPSHOTTER_VERSION}" ]]; then
    log "snapshot CRDs ${SNAPSHOTTER_VERSION}: cached"
    return 0
  fi
  local dir
  dir="$(cd "${SRC_DIR}" && "${GO}" mod download -json \
    "github.com/kubernetes-csi/external-snapshotter/client/v8@${SNAPSHOTTER_VERSION}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  rm -rf "${dest}"; mkdir -p "${dest}"
  local f n=0
  for f in "${dir}"/config/crd/snapshot.storage.k8s.io_*.yaml; do
    [[ -f "${f}" ]] || continue
    cp "${f}" "${dest}/"; n=$((n + 1))
  done
  [[ "${n}" -ge 3 ]] || die "expected >= 3 snapshot CRDs in ${dir}/config/crd, found ${n}"
  printf '%s\n' "${SNAPSHOTTER_VERSION}" >"${dest}/.version"
  log "snapshot CRDs ${SNAPSHOTTER_VERSION}: ${n} files in ${dest}"
}

want() { [[ -z "${E2E_TOOLS:-}" || " ${E2E_TOOLS} " == *" $1 "* ]]; }

main() {
  local t0; t0="$(now)"
  log "go: $("${GO}" version); cache: ${E2E_DIR}"
  want etcd && build_tool etcd go.etcd.io/etcd/server/v3 "${ETCD_VERSION}" \
    "go.etcd.io/etcd/server/v3:etcd"
  want kube && build_tool kube k8s.io/kubernetes "${KUBE_VERSION}" \
    "k8s.io/kubernetes/cmd/kubectl:kubectl" \
    "k8s.io/kubernetes/cmd/kube-controller-manager:kube-controller-manager" \
    "k8s.io/kubernetes/cmd/kube-apiserver:kube-apiserver"
  want provisioner && build_tool provisioner github.com/kubernetes-csi/external-provisioner/v6 \
    "${PROVISIONER_VERSION}" "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner:csi-provisioner"
  want resizer && build_tool resizer github.com/kubernetes-csi/external-resizer/v2 \
    "${RESIZER_VERSION}" "github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer:csi-resizer"
  want snapshotter && build_tool snapshotter github.com/kubernetes-csi/external-snapshotter/v8 \
    "${SNAPSHOTTER_VERSION}" \
    "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter:csi-snapshotter" \
    "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller:snapshot-controller"
  want snapshotter && install_snapshot_crds
  want helm && build_tool helm helm.sh/helm/v3 "${HELM_VERSION}" "helm.sh/helm/v3/cmd/helm:helm"
  log "all e2e tools ready in $(( $(now) - t0 )) s"
  printf '%s\n' "${BIN_DIR}"
}

main "$@"
