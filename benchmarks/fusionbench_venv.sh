#!/usr/bin/env bash
# Builds the benchmark-only venv holding FusionBench (benchmarks/_work/fb-venv, git-ignored), used by
# bench_spectral.py and bench_continual.py to time FusionBench's TSV-M, Iso-C and OPCM code on the same
# inputs. FusionBench never goes into .venv or into mergelab's dependencies. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/_work/fb-venv"
constraints="$here/../constraints.txt"
python="${PYTHON:-python3}"
# the import OPCM needs (fusion_bench.method.opcm pulls in the CLIP task pool, i.e. transformers + datasets)
check='import fusion_bench.method.opcm.opcm, fusion_bench.method.isotropic_merging.iso_utils, fusion_bench.method.task_singular_vector.utils.TSVM_utils'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
    echo "fusion-bench venv ready: $venv"
    exit 0
fi
mkdir -p "$here/_work"
"$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
$pip install -c "$constraints" torch==2.13.0   # the CPU build (a local wheel on this project's machines)
# fusion-bench 0.2.33 declares no upper bounds, but its CLIP task pool imports
# transformers.models.clip.modeling_clip.CLIPVisionTransformer (gone in transformers 5) and datasets 5
# needs huggingface-hub >= 1.31, which transformers 4 refuses: pin the last versions that import together
# (not through constraints.txt, which pins .venv's transformers 5)
$pip install torch==2.13.0 fusion-bench==0.2.33 transformers==4.57.6 datasets==4.8.5 huggingface-hub==0.36.2
"$venv/bin/python" -c "$check"
"$venv/bin/python" -c "import fusion_bench, torch, transformers; print('fusion-bench', fusion_bench.__file__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
