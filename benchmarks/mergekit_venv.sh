#!/usr/bin/env bash
# Builds the benchmark-only venv holding mergekit (benchmarks/_work/mk-venv, git-ignored), used by
# bench_peers.py to time mergekit's TIES, task arithmetic and breadcrumbs on the engine benchmark's files.
# mergekit never goes into .venv or into mergelab's dependencies. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/_work/mk-venv"
constraints="$here/../constraints.txt"
python="${PYTHON:-python3}"
version="0.1.5"
check="import importlib.metadata as m, mergekit.merge, mergekit.merge_methods.generalized_task_arithmetic; assert m.version('mergekit') == '$version'"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
    echo "mergekit venv ready: $venv"
    exit 0
fi
mkdir -p "$here/_work"
"$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
$pip install -c "$constraints" torch==2.13.0   # the CPU build (a local wheel on this project's machines)
$pip install torch==2.13.0 "mergekit==$version"
"$venv/bin/python" -c "$check"
"$venv/bin/python" -c "import importlib.metadata as m, torch, transformers; print('mergekit', m.version('mergekit'), 'torch', torch.__version__, 'transformers', transformers.__version__)"
