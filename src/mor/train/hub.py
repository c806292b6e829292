"""The adapter's model card (``<output>/adapter/README.md``: how to load it, the base model, the
method and its routing, the run's numbers) and ``--push-to-hub`` (the adapter folder uploaded with
``huggingface_hub``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SettingsError
from .config import TrainConfig

DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantised from


def check_hub_token() -> None:
    """Refuse ``--push-to-hub`` before training when no Hugging Face token is set (no network)."""
    from huggingface_hub import get_token

    if not get_token():
        raise SettingsError("--push-to-hub: no Hugging Face token; run `huggingface-cli login` or set HF_TOKEN "
                               "(or leave --push-to-hub out and upload <output>/adapter later)")


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def model_card(cfg: TrainConfig, result: Any, repo_id: str | None = None) -> str:
    """The README.md of a trained adapter (``result``: the run's TrainResult)."""
    spec = cfg.adapter
    where = repo_id or "path/to/adapter"
    if cfg.model:
        base, load_base = cfg.model, f'AutoModelForCausalLM.from_pretrained("{cfg.model}")'
    else:
        base = DEFAULT_BASE
        load_base = "load_model()  # mor's embedded default: SmolLM2-135M-Instruct dequantised from a Q4_1 GGUF"
    shape = f"r={spec.r}, target_modules={spec.target_modules}"
    if spec.method in ("mor", "moelora"):
        shape += f", {spec.num_experts} experts, {spec.router} router" + (f" (top {spec.top_k})" if spec.router == "topk" else "")
    imports = "from mor.runtime.loading import load_model" if not cfg.model else \
        "from transformers import AutoModelForCausalLM"
    routed = spec.method in ("mor", "moelora")
    about = ("MoR (Mixture of Ranks, arXiv 2410.13408) routes every token to a mixture of rank-r experts; the routing "
             "is live, so the adapter runs with mor installed." if spec.method == "mor" else
             "MoE-LoRA as mor implements it; it runs with mor installed." if routed else
             f"A plain peft {spec.method.upper()} adapter (peft loads it without mor).")
    lines = [
        "---", "library_name: peft", f"base_model: {base}", "tags:", "- mor", "- mixture-of-ranks",
        *([f"- {spec.method}"] if spec.method != "mor" else []), "---", "",
        f"# {spec.method} adapter for {base}", "",
        f"Trained with `mor train` ({spec.method}: {shape}). {about}", "",
        "## Load it", "", "```python",
        *(["import mor  # registers the method with peft; without it peft stops with KeyError: "
           f"'{spec.method.upper()}'"] if routed else []),
        "from peft import PeftModel", imports, "",
        f"base = {load_base}", f'model = PeftModel.from_pretrained(base, "{where}")', "```", "",
        *(["On a local copy, `mor eval --adapter <folder> --data <task>` scores it and `mor merge --adapter <folder> "
           "--data <task> --output merged/` folds it into the base with that task's mean routing."] if routed else []),
        "",
        "## Training", "",
        f"- data: {', '.join(f'{k} ({v})' for k, v in result.data_report['tasks'].items())}; "
        f"{result.data_report['examples']} examples",
        f"- {result.global_step} steps, lr {cfg.lr} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio}), batch "
        f"{cfg.batch_size} x {cfg.grad_accum} x {result.world_size} process(es), max_length {cfg.max_length}, seed {cfg.seed}",
        f"- trainable parameters: {result.trainable_parameters:,}; final training loss: "
        + ("-" if result.final_loss is None else f"{result.final_loss:.4f}"),
    ]
    stats = result.routing_stats
    if stats:
        last = stats["last"]
        lines.append(f"- routing at step {last['step']}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in last.items() if k != "step" and isinstance(v, float)))
    if result.after:
        key = "acc_norm" if cfg.scoring == "text" else "acc"
        lines += ["", f"## Evaluation ({key}, %, zero-shot multiple choice)", "",
                  "| task | n | adapter off | adapter on |", "| --- | --- | --- | --- |"]
        before = result.before or {}
        for name, after in list(result.after["tasks"].items()) + [("average", result.after["average"])]:
            was = (before.get("tasks", {}).get(name) if name != "average" else before.get("average")) or {}
            lines.append(f"| {name} | {after.get('n', '')} | {_pct(was.get(key))} | {_pct(after.get(key))} |")
    return "\n".join(lines) + "\n"


def push_adapter(cfg: TrainConfig, result: Any) -> str:
    """Create the hub repository (if new), write the card naming it, upload the adapter folder;
    returns the repository id."""
    from huggingface_hub import HfApi

    from ..safety import atomic_write_text

    api = HfApi()
    repo_id = api.create_repo(cfg.hub_model_id or Path(cfg.output).resolve().name, exist_ok=True).repo_id
    atomic_write_text(Path(result.adapter_dir) / "README.md", model_card(cfg, result, repo_id))
    api.upload_folder(repo_id=repo_id, folder_path=str(result.adapter_dir),
                      commit_message=f"{cfg.adapter.method} adapter trained with mor train ({result.global_step} steps)")
    return repo_id
