#!/usr/bin/env bash
# The peft-facing tests (registration, get_peft_model / PeftModel / AutoPeft / named adapters,
# save-load bit identity, merge, TRL, modules_to_save / trainable tokens / rsLoRA, the private-name
# checks) on every supported peft minor other than the installed one. Each gets a venv under
# .venvs/ that sees the main environment (torch, transformers, trl, mor) and holds only its own peft:
# `uv` makes one in about a second. Usage: scripts/test_peft_versions.sh [peft versions...]
# (`--list` prints the default versions: `make test` runs one of these scripts per version, side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
source scripts/venv.sh
DEFAULT=(0.18.1 0.19.1 0.20.0)  # with 0.21 installed: every other minor of peft>=0.18,<0.22
if [ "${1:-}" = --list ]; then echo "${DEFAULT[@]}"; exit 0; fi
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=("${DEFAULT[@]}")
TESTS=(tests/test_peft_integration.py tests/test_peft_options.py tests/test_compat.py)
for version in "${VERSIONS[@]}"; do
  venv=.venvs/peft-$version
  make_venv "$venv" "peft==$version"  # its dependencies are the main env's
  echo "== peft $version"
  # the tests that touch peft; not the CLI's 4-bit training run, the pure-mor checks or the import orders
  # through a mor submodule (subprocesses, 7 s each; the main run has them all)
  SKIP="cli_trains or train_flags or every_public_name or scan_finds or outside_the_checked or failed_import"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
    -k "not ($SKIP or (imported_first and (config or layer)))"
done
