"""What a normal run prints around the work: no warnings nobody can act on, and adapter folders
that say how to load them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from mor import MoRConfig, get_mor_model
from mor.runtime.distributed import save_adapter
from tests.conftest import make_tiny_llama

ENV = {**os.environ, "PYTHONWARNINGS": "default"}


def test_import_prints_no_bitsandbytes_kernels_warning():
    # bitsandbytes (imported by peft) logs "Failed to load CPU gemm_4bit_forward from kernels-community" on a CPU
    # with AVX512-BF16 unless the optional `kernels` package is installed; `import mor` drops exactly that line
    done = subprocess.run([sys.executable, "-c", "import mor, peft, bitsandbytes"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr + done.stdout


def test_other_warnings_of_those_loggers_still_show(caplog):
    import mor  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from "
                                                                    "kernels-community: No module named 'kernels'")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning"]


def test_saved_mor_adapter_card_says_import_mor_before_peft(tmp_path):
    model = get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=2))
    save_adapter(model, tmp_path / "adapter", is_main_process=True)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "import mor" in card and "AutoPeftModelForCausalLM" in card and "KeyError: 'MOR'" in card
    save_adapter(model, tmp_path / "adapter", is_main_process=True)  # saved again: the section once
    assert (tmp_path / "adapter" / "README.md").read_text().count("## Loading this MoR adapter") == 1
