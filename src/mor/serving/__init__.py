"""Serving MoR with its routing live: per-token MoR / MoE-LoRA inside a serving engine.

- ``folder``: ``export_for_vllm`` writes the folder vLLM serves (base + adapter, checked first).
- ``fused``: ``ServedMixtureLinear``, an engine's (fused) linear layer plus its adapters.
- ``vllm_plugin``: the ``vllm.general_plugins`` entry point registering the ``MoR<Arch>`` models.

Only ``vllm_plugin`` imports vLLM; the rest runs (and is tested) without it.
"""

from .folder import export_for_vllm, serve_command

__all__ = ["export_for_vllm", "serve_command"]
