#!/usr/bin/env bash
# The GPU check (python -m benchmarks.gpu) on a CUDA machine that has torch, transformers, accelerate
# and triton but no internet: what else it needs travels with the source tree as wheels.
#
#   bash scripts/gpu_check.sh pack        # here, online: wheels of peft, bitsandbytes and mor into .gpu-wheels/
#   bash scripts/gpu_check.sh run [DIR]   # there: install them offline beside the system's packages, run the
#                                         # check under a timeout; DIR gets gpu.json (default: results/)
#
# Then, back here: copy DIR/gpu.json to results/gpu.json and write its tables into docs/results.md with
#   python -m benchmarks.gpu --render results/gpu.json --docs docs/results.md
# The wheels are installed with --no-deps into .gpu-site/ (put first on PYTHONPATH), not into the machine's
# environment: its torch / transformers / accelerate are the ones measured, and nothing of it changes.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=.gpu-site
PYTHON=${PYTHON:-python}
PEFT=${PEFT_VERSION:-0.21.2}          # within mor's peft range (pyproject), the minor CI tests
BITSANDBYTES=${BITSANDBYTES_VERSION:-0.50.2}  # ~41 MiB (manylinux, every CUDA it supports); the tree + wheels stay under 64 MiB
TIMEOUT=${GPU_CHECK_TIMEOUT:-560}     # seconds: the check is sized for 8 min on one H100

case "${1:-}" in
pack)
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$PYTHON" -m pip wheel --no-deps -q -w "$WHEELS" . "peft==$PEFT"
    "$PYTHON" -m pip download --no-deps -q -d "$WHEELS" --only-binary=:all: --platform manylinux_2_24_x86_64 \
        "bitsandbytes==$BITSANDBYTES"
    du -sh "$WHEELS" && ls "$WHEELS"
    ;;
run)
    OUT=${2:-results}
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $WHEELS: run 'bash scripts/gpu_check.sh pack' where pip can download" >&2; exit 2; }
    rm -rf "$SITE" && mkdir -p "$OUT"
    "$PYTHON" -m pip install --no-index --no-deps --disable-pip-version-check -q --target "$SITE" "$WHEELS"/*.whl
    # the tree's src/ first: the code measured is this tree's, whatever wheel was packed
    export PYTHONPATH="$PWD/src:$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    "$PYTHON" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for name in ("transformers", "accelerate", "triton", "peft", "bitsandbytes", "mor"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as err:
        print(name, "does not import:", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
PY
    # GPU_CHECK_ARGS: more arguments (a rehearsal on a CPU: "--cpu --tiny"; --only SECTION ...)
    timeout "$TIMEOUT" "$PYTHON" -m benchmarks.gpu --out "$OUT/gpu.json" ${GPU_CHECK_ARGS:-}
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh pack | run [DIR]" >&2
    exit 2
    ;;
esac
