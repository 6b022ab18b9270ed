#!/usr/bin/env bash
# Builds a benchmark-only venv holding a peer tool, never .venv nor mergelab's dependencies; idempotent.
#   benchmarks/peer_venv.sh fusionbench   -> benchmarks/_work/fb-venv (FusionBench: bench_spectral.py, bench_continual.py)
#   benchmarks/peer_venv.sh mergekit      -> benchmarks/_work/mk-venv (mergekit 0.1.5: bench_peers.py)
# The CPU torch wheel goes in first (constraints.txt pins it), then the peer's pinned packages; the venv is
# ready when the peer's own modules import.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
case "${1:-}" in
    fusionbench)
        venv="$here/_work/fb-venv"
        # the import OPCM needs (fusion_bench.method.opcm pulls in the CLIP task pool: transformers + datasets)
        check='import fusion_bench.method.opcm.opcm, fusion_bench.method.isotropic_merging.iso_utils, fusion_bench.method.task_singular_vector.utils.TSVM_utils'
        # fusion-bench 0.2.33 declares no upper bounds, but its CLIP task pool imports
        # transformers.models.clip.modeling_clip.CLIPVisionTransformer (gone in transformers 5) and datasets 5
        # needs huggingface-hub >= 1.31, which transformers 4 refuses: the last versions that import together
        # (not through constraints.txt, which pins .venv's transformers 5)
        packages=(fusion-bench==0.2.33 transformers==4.57.6 datasets==4.8.5 huggingface-hub==0.36.2)
        report='import fusion_bench, torch, transformers; print("fusion-bench", fusion_bench.__file__, "torch", torch.__version__, "transformers", transformers.__version__)'
        ;;
    mergekit)
        venv="$here/_work/mk-venv"
        check="import importlib.metadata as m, mergekit.merge, mergekit.merge_methods.generalized_task_arithmetic; assert m.version('mergekit') == '0.1.5'"
        packages=(mergekit==0.1.5)
        report='import importlib.metadata as m, torch, transformers; print("mergekit", m.version("mergekit"), "torch", torch.__version__, "transformers", transformers.__version__)'
        ;;
    *)
        echo "usage: $0 fusionbench|mergekit" >&2
        exit 2
        ;;
esac
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
    echo "$1 venv ready: $venv"
    exit 0
fi
mkdir -p "$here/_work"
"$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
$pip install -c "$here/../constraints.txt" torch==2.13.0   # the CPU build (a local wheel on this project's machines)
$pip install torch==2.13.0 "${packages[@]}"
"$venv/bin/python" -c "$check"
"$venv/bin/python" -c "$report"
