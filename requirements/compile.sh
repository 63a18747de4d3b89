#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (pip-tools, with hashes). Run from the repo root:
#   bash requirements/compile.sh
# cpu.lock       the package's dependencies, CPU torch          (the image, `pip install .`)
# cpu-dev.lock   the same plus the `dev` extra                  (the README's commands, .ci/run)
# cuda.lock      the dependencies plus the `gpu` extra, CUDA torch from PyPI (the -cuda image)
# Each lock's header records the sha256 of pyproject.toml's dependency lists it was made from;
# tests/test_repo.py fails when pyproject changes and the locks are not regenerated.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_compile="${PREFTUNE_PIP_COMPILE:-pip-compile}"
stamp="$(python3 requirements/deps_digest.py)"
common=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
        --no-emit-trusted-host --newline LF --annotation-style line)
compile() {  # out, then pip-compile arguments
  local out="$1"; shift
  CUSTOM_COMPILE_COMMAND="bash requirements/compile.sh" "$pip_compile" "${common[@]}" -o "$out.tmp" "$@" pyproject.toml
  { echo "# pyproject-deps-sha256: $stamp"; cat "$out.tmp"; } > "$out"
  rm -f "$out.tmp"
}
compile requirements/cpu.lock requirements/cpu.in
compile requirements/cpu-dev.lock --extra dev requirements/cpu.in
# pip's --require-hashes mode treats selenium's `urllib3[socks]` as a requirement of its own, unpinned
# unless the lock spells it out: repeat urllib3's entry (same version and hashes) with the extra.
python3 - requirements/cpu-dev.lock <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
m = re.search(r"^urllib3==.*?\n(?=\S)", text, flags=re.M | re.S)
if m and "urllib3[socks]==" not in text:
    text = text[: m.end()] + m.group(0).replace("urllib3==", "urllib3[socks]==", 1) + text[m.end():]
    open(path, "w").write(text)
PY
# CUDA: PyPI only (no pip config, no local find-links or indexes from the environment either), so
# torch is the CUDA build; refuse a lock that still pinned the local CPU wheel.
(
  unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT
  export PIP_CONFIG_FILE=/dev/null
  compile requirements/cuda.lock --extra gpu requirements/cuda.in
)
if grep -q '^torch==.*+cpu' requirements/cuda.lock; then
  echo "requirements/cuda.lock pinned the CPU torch: pip still saw a local wheel" >&2
  exit 1
fi
