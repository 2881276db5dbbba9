#!/usr/bin/env bash
# Runs every k8scsi test: formatting, lints, unit tests, integration tests over the real socket
# (real bind mounts when root), the crash test and csi-sanity. Installs the test tools it needs
# first (Debian packages and the pinned csi-sanity, into a cache outside the work tree).
#
#   bash scripts/test.sh
#
# K8SCSI_REQUIRE_TOOLS=1 makes a missing csi-sanity a failure instead of a skip (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

step "installing test tools"
if [[ "$(id -u)" -eq 0 ]] || command -v sudo >/dev/null 2>&1; then
  bash scripts/install-test-tools.sh >/dev/null
else
  echo "not root: skipping the tool install; tests that need it will say so"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test"
cargo test --all-targets --locked

printf '\nall tests passed in %ss\n' "$((SECONDS - started))"
