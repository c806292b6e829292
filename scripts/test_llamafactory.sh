#!/usr/bin/env bash
# MoR through real LLaMA-Factory 0.9.5 (tests/test_llamafactory.py: its v1 trainer with
# PeftPlugin("mor") from the documented YAML, 3 steps on CPU, the adapter reloading in mor).
# LLaMA-Factory's full dependency set (gradio, modelscope, av, torchvision, a torch of its own) is
# for its web UI and multimodal data: its venv sees the main environment (torch, numpy, ...) and
# adds, --no-deps, llamafactory and exactly the packages its v1 training path imports, at its pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
source scripts/venv.sh
venv=.venvs/llamafactory-0.9.5
PACKAGES=(llamafactory==0.9.5 transformers==5.6.0 peft==0.18.1 trl==0.24.0 accelerate==1.11.0 datasets==4.0.0
          huggingface_hub==1.17.0 tokenizers==0.22.2 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0
          omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 tyro==0.8.14 shtab==1.7.2 fire==0.7.1 termcolor==3.3.0
          torchdata==0.11.0 torchaudio==2.11.1)
make_venv "$venv" "${PACKAGES[@]}"
# llamafactory.data imports torchaudio at the top; no torchaudio wheel is built for the CPU torch
# 2.13: keep its Python package without its compiled libraries (torchaudio's "no extension" mode)
rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so
echo "== llamafactory 0.9.5"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_llamafactory.py
