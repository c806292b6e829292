#!/usr/bin/env bash
# The oldest transformers mor supports (pyproject: transformers>=4.55): the peft-facing tests (the same
# files as scripts/test_peft_versions.sh) on transformers 4.55.4 with the oldest peft, 0.18.1. Its venv sees
# the main environment and adds, --no-deps, that transformers and the versions of its own pins it needs
# (tokenizers <0.22, huggingface_hub <1.0; datasets 4.1 for that hub). Left out, as docs/trainers.md says:
# a 4-bit base's save (transformers 4.5x cannot write the bitsandbytes dtype into its config) and `mor train`
# (it takes transformers 5's TrainingArguments and refuses 4.x in one line).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
source scripts/venv.sh
venv=.venvs/transformers-4.55.4
PACKAGES=(transformers==4.55.4 tokenizers==0.21.4 huggingface_hub==0.34.4 datasets==4.1.1 peft==0.18.1)
make_venv "$venv" "${PACKAGES[@]}"
echo "== transformers 4.55.4 (peft 0.18.1)"
# as in scripts/test_peft_versions.sh, the import orders through a mor submodule are left to the main run
SKIP="four_bit_base_trains_saves or cli_trains or failed_import or (imported_first and (config or layer))"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_peft_integration.py tests/test_peft_options.py \
  tests/test_compat.py -k "not ($SKIP)"
