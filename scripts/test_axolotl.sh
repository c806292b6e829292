#!/usr/bin/env bash
# MoR through real axolotl 0.19 (tests/test_axolotl.py: config validation, axolotl's loader, its
# training loop on CPU, the adapter reloading in mor). axolotl's full dependency set (xformers,
# triton, fla-core, gradio, cloud file systems, ...) is neither needed on a CPU nor quick to install:
# its venv sees the main environment (torch, numpy, ...) and adds, --no-deps, axolotl and exactly
# the packages its config, plugin, loader and training path import, at the versions it pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
source scripts/venv.sh
venv=.venvs/axolotl-0.19.0
PACKAGES=(axolotl==0.19.0 transformers==5.16.1 peft==0.20.0 trl==1.9.0 accelerate==1.13.0 tokenizers==0.23.1
          huggingface_hub==1.17.0 datasets==4.8.4 pydantic==2.12.5 pydantic-core==2.41.5 posthog==6.7.11
          axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6 addict==2.4.0 fire==0.7.1 distro==1.9.0
          fastcore==2.2.41 termcolor==3.3.0 backoff==2.2.1 wandb==0.31.0 platformdirs==4.14.9)
make_venv "$venv" "${PACKAGES[@]}"
echo "== axolotl 0.19.0"
AXOLOTL_DO_NOT_TRACK=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_axolotl.py
