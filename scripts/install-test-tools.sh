#!/usr/bin/env bash
# Install the external tools that k8scsi's integration tests need.
#
#   * Debian packages for loop-device / filesystem tests
#     (mkfs.ext4, mkfs.xfs, mkfs.btrfs, losetup, mount, findmnt, ...).
#   * the end-to-end test's Kubernetes components (etcd, kube-apiserver,
#     kube-controller-manager, kubectl, CSI sidecars, snapshot-controller, helm),
#     built by e2e/build-tools.sh into ${K8SCSI_TOOLS_DIR}/e2e (cold: ~25 min on
#     2 cores; warm: well under a second). K8SCSI_SKIP_E2E_TOOLS=1 skips them
#     (tests/e2e.rs then skips, or fails under K8SCSI_REQUIRE_TOOLS=1).
#   * csi-sanity (github.com/kubernetes-csi/csi-test) at a pinned version,
#     built with `go install` into a cache dir OUTSIDE the work tree:
#       ${K8SCSI_TOOLS_DIR:-$HOME/.cache/k8scsi-tools}/bin/csi-sanity
#
# Idempotent: when everything is present it does no network access and
# finishes in well under a second. Go is used only to build csi-sanity.
#
# Output: progress goes to stderr; the LAST line on stdout is the absolute
# path of the csi-sanity binary, so callers can do
#     CSI_SANITY="$(scripts/install-test-tools.sh | tail -n1)"
#
# Environment:
#   K8SCSI_TOOLS_DIR          cache dir (default: $HOME/.cache/k8scsi-tools)
#   K8SCSI_SKIP_APT=1         do not check/install Debian packages
#   CSI_SANITY_VERSION        override the pinned csi-test version (testing only)
set -euo pipefail

# csi-test v5.6.0 (2026-08-25) is built against CSI spec v1.13.0: it accepts the
# GET_SNAPSHOT controller capability (v5.4.0, built against spec v1.12.0's
# enum list, fails "Unknown capability" on it). It has no replace directives,
# so plain `go install module/cmd/csi-sanity@version` works.
CSI_TEST_MODULE="github.com/kubernetes-csi/csi-test/v5"
CSI_SANITY_PKG="${CSI_TEST_MODULE}/cmd/csi-sanity"
CSI_SANITY_VERSION="${CSI_SANITY_VERSION:-v5.6.0}"

APT_PACKAGES=(
  e2fsprogs     # mkfs.ext4, resize2fs, e2fsck
  xfsprogs      # mkfs.xfs, xfs_growfs
  btrfs-progs   # mkfs.btrfs
  quota         # setquota (ext4 project quotas)
  util-linux    # findmnt, blkid, lsblk, fallocate, wipefs, fsfreeze (snapshots), setpriv (the driver runs its tools under it)
  mount         # mount, umount, losetup (separate package on Debian 12)
  ca-certificates # TLS to the Go module proxy
  openssl       # e2e: the API server's service-account signing key
  python3       # e2e/build-tools.sh: reads upstream go.mod replace blocks
)

# go itself needs HOME (for GOCACHE/GOPATH) when XDG vars are unset.
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
TOOLS_DIR="${K8SCSI_TOOLS_DIR:-${HOME}/.cache/k8scsi-tools}"
BIN_DIR="${TOOLS_DIR}/bin"
CSI_SANITY_BIN="${BIN_DIR}/csi-sanity"
CSI_SANITY_STAMP="${BIN_DIR}/.csi-sanity.version"

log() { printf 'install-test-tools: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# ---------------------------------------------------------------- apt packages
install_apt_packages() {
  if [[ "${K8SCSI_SKIP_APT:-0}" == "1" ]]; then
    log "K8SCSI_SKIP_APT=1: skipping Debian packages"
    return 0
  fi
  command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found (not a Debian system?)"

  local missing=() pkg status
  for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null || true)"
    [[ "${status}" == "install ok installed" ]] || missing+=("${pkg}")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "apt packages: all present (${APT_PACKAGES[*]})"
    return 0
  fi

  log "apt packages missing: ${missing[*]} -> apt-get update && apt-get install"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# ------------------------------------------------------------------ csi-sanity
find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    return 1
  fi
}

install_csi_sanity() {
  if [[ -x "${CSI_SANITY_BIN}" && -f "${CSI_SANITY_STAMP}" \
        && "$(cat "${CSI_SANITY_STAMP}")" == "${CSI_SANITY_VERSION}" ]]; then
    log "csi-sanity ${CSI_SANITY_VERSION}: already installed at ${CSI_SANITY_BIN}"
    return 0
  fi

  local go_bin
  go_bin="$(find_go)" || die "Go toolchain not found (need go >= 1.25 to build csi-sanity ${CSI_SANITY_VERSION})"

  log "building csi-sanity ${CSI_SANITY_VERSION} with $("${go_bin}" version) (takes ~1 min on 2 cores)"
  mkdir -p "${BIN_DIR}"
  rm -f "${CSI_SANITY_STAMP}"
  # Run outside any go.mod so the work tree never influences the build.
  (
    cd "${TOOLS_DIR}"
    GOBIN="${BIN_DIR}" GOFLAGS="-buildvcs=false" GO111MODULE=on \
      "${go_bin}" install "${CSI_SANITY_PKG}@${CSI_SANITY_VERSION}"
  ) >&2

  [[ -x "${CSI_SANITY_BIN}" ]] || die "go install finished but ${CSI_SANITY_BIN} is missing"
  # Smoke test: the binary must start and print its flags.
  if ! "${CSI_SANITY_BIN}" -h >/dev/null 2>&1; then
    die "${CSI_SANITY_BIN} -h failed"
  fi
  "${CSI_SANITY_BIN}" -h 2>&1 | grep -q -- '-csi.endpoint' \
    || die "${CSI_SANITY_BIN} -h does not list -csi.endpoint"
  printf '%s\n' "${CSI_SANITY_VERSION}" >"${CSI_SANITY_STAMP}"
  log "csi-sanity ${CSI_SANITY_VERSION}: installed at ${CSI_SANITY_BIN}"
}

install_e2e_tools() {
  if [[ "${K8SCSI_SKIP_E2E_TOOLS:-0}" == "1" ]]; then
    log "K8SCSI_SKIP_E2E_TOOLS=1: skipping the e2e tools"
    return 0
  fi
  # Its stdout (the bin dir) must not become our last stdout line.
  K8SCSI_TOOLS_DIR="${TOOLS_DIR}" bash "$(dirname "${BASH_SOURCE[0]}")/../e2e/build-tools.sh" >&2
}

main() {
  install_apt_packages
  install_csi_sanity
  install_e2e_tools
  log "tools dir: ${BIN_DIR}"
  printf '%s\n' "${CSI_SANITY_BIN}"
}

main "$@"
