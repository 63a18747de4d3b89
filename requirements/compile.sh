#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (pip-tools for the CPU locks, uv for the CUDA one; hashes). Run from the repo root:
#   bash requirements/compile.sh
# cpu.lock       the package's dependencies, CPU torch          (the image, `pip install .`)
# cpu-dev.lock   the same plus the `dev` extra                  (the README's commands, .ci/run)
# cuda.lock      the dependencies plus the `gpu` extra, CUDA torch from PyPI (the -cuda image; uv, see below)
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
# CUDA: with uv, not pip-tools. pip-compile downloads every candidate wheel to read its metadata, and
# torch's CUDA wheels bring their CUDA runtime as nvidia-* wheels from PyPI (several GB in all); uv
# reads the metadata PyPI serves next to each wheel (PEP 658) and the index's hashes, so the lock is
# made without downloading them (about 50 MB of index pages and sdists, a few seconds). The lock is
# for the -cuda image: Python 3.11 (the CPU image's Python, from the same base) on x86_64 glibc >= 2.28.
# uv comes from PREFTUNE_UV or PATH (e.g. `python3 -m venv /tmp/uvvenv && /tmp/uvvenv/bin/pip install uv`).
# PyPI only: no index, find-links or pip configuration from the environment (uv reads no pip config).
# Every package both images have stays at cpu.lock's version (constraints from cpu.lock, torch aside).
uv="${PREFTUNE_UV:-uv}"
sed -n -E 's/^([A-Za-z0-9_.-]+==[^ +]+) .*$/\1/p' requirements/cpu.lock | grep -v '^torch==' > requirements/cuda.constraints.tmp
(
  unset UV_INDEX UV_INDEX_URL UV_DEFAULT_INDEX UV_EXTRA_INDEX_URL UV_FIND_LINKS UV_CONSTRAINT UV_OVERRIDE
  "$uv" pip compile --quiet --generate-hashes --no-emit-index-url --annotation-style line \
    --custom-compile-command "bash requirements/compile.sh" --default-index https://pypi.org/simple \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --constraint requirements/cuda.constraints.tmp --extra gpu -o requirements/cuda.lock.tmp requirements/cuda.in pyproject.toml
  # (the constraints are a means, not a reason a package is there: drop them from the annotations)
  { echo "# pyproject-deps-sha256: $stamp"
    sed -e 's/, -c requirements\/cuda.constraints.tmp//; s/-c requirements\/cuda.constraints.tmp, //' requirements/cuda.lock.tmp
  } > requirements/cuda.lock
  rm -f requirements/cuda.lock.tmp requirements/cuda.constraints.tmp
)
if grep -q '^torch==.*+cpu' requirements/cuda.lock; then
  echo "requirements/cuda.lock pinned the CPU torch" >&2
  exit 1
fi
