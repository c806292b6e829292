"""``mor export-vllm``: a folder vLLM serves with the MoR adapter routed per token (mor.serving)."""

from __future__ import annotations

import argparse

from . import add_overwrite, command


def add_export_vllm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="MoR or MoE-LoRA adapter folder")
    p.add_argument("--model", default=None, help="the base model: hub id, local folder or .gguf file (default: the "
                                                 "base the adapter records; 'smollm2' for the embedded SmolLM2)")
    p.add_argument("--output", required=True, help="new folder to serve: base weights (hard links or copies), "
                                                   "config.json naming the MoR architecture, the adapter")
    add_overwrite(p)


@command("export-vllm", "a folder that vLLM serves with the MoR adapter routed per token (mor's vLLM plugin)",
         arguments=add_export_vllm_flags, doing="writing the vLLM folder")
def cmd_export_vllm(args) -> int:
    from ..serving import export_for_vllm, serve_command

    folder = export_for_vllm(args.adapter, args.output, model=args.model, overwrite=args.overwrite)
    print(f"vLLM folder written to {folder}. Serve it, routing every token, with mor installed beside vLLM:\n"
          f"  {' '.join(serve_command(folder))}\n  offline: vllm.LLM({str(folder)!r})")
    return 0
