#!/usr/bin/env bash
# Installs what bitsweep needs on a fresh Debian/Ubuntu machine: system packages, then a
# virtual environment in .venv with the pinned torch pair. Safe to run again: it skips
# what is already done. Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the standard compressors (their tools read our archives back),
# Fashion-MNIST (the real labelled images the default sweep runs on) and a C++ compiler
# for the packed-weight kernels, which are built on this machine the first time they run.
apt_packages=(p7zip-full zstd gzip dataset-fashion-mnist g++)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: bitsweep needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
  "$python" -m venv .venv
fi

# Reinstall only when the project's requirements change (a dev install holds everything a plain one needs).
extra=${1:-}
stamp=".venv/.bitsweep-installed${extra:+-$extra}"
current() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ] && [ ! tests/example_plugin/pyproject.toml -nt "$1" ]; }
if ! current "$stamp" && { [ -n "$extra" ] || ! current .venv/.bitsweep-installed-dev; }; then
  echo "setup: installing Python packages into .venv (first time: a few minutes)"
  # Hide pip's notes about local package mirrors that do not exist; its exit status still counts.
  pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
            2> >(grep -v "^WARNING: Location" >&2); }
  # torch 2.14.1 + torchvision 0.29.1 is the pair that imports timm here; install it first.
  pip "torch==2.14.1" "torchvision==0.29.1"
  if [ "$extra" = dev ]; then
    pip -e ".[dev,dask]"
    pip ./tests/example_plugin  # the README's worked third-party plugin, used by the tests
  else
    pip -e .
  fi
  .venv/bin/python -c "import bitsweep, timm, torch" || { echo "setup: the install did not complete"; exit 1; }
  touch "$stamp"
fi
