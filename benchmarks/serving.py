"""Serving throughput: vLLM with MoR routed per token, against the vLLM base model, vLLM's own
multi-LoRA serving the exported per-task LoRAs, and transformers' ``generate`` (base and MoR).

    python -m benchmarks.serving                   # SmolLM2, batch 1/8/32, 64 tokens, 5 rounds
    python -m benchmarks.serving --adapter DIR     # your MoR adapter instead of a fresh one

Every contender generates the same number of tokens (greedy, EOS ignored) for the same prompts
(chat-templated boolq and ARC-Easy questions). All engines live in this one process and are timed
in interleaved rounds (the order rotates); a second vLLM base engine gives the noise floor. The
table reports generated tokens/s and ms per decoding step (wall time / tokens per sequence), each
the median over rounds, and the median over rounds of the per-round ratios. Results:
results/serving.json; the method: docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, median, rotations, text_table, write_json

TARGETS = {"vLLM MoR / vLLM base at batch 32": 0.85, "vLLM MoR / transformers MoR at batch 8": 3.0}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="a MoR adapter folder (default: a fresh MoR r=8 N=8 on the FFN "
                                                  "with random B and a sharp router: speed does not depend on training)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-transformers", action="store_true", help="time vLLM only")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile (a quick smoke run)")
    p.add_argument("--json", default="results/serving.json")
    return p.parse_args(argv)


def prompts_and_ids(tokenizer, count: int) -> list[list[int]]:
    import json

    from mor.runtime.generate import prompt_inputs

    tasks = []
    for task in ("boolq", "ARC-Easy"):
        path = DATA / task / "test.json"
        if path.is_file():
            tasks.append([r["instruction"] for r in json.loads(path.read_text())[:count]])
    if not tasks:  # without ../shared: generic questions
        tasks = [[f"Question {i}: what is {i} plus {i}? Answer briefly." for i in range(count)]]
    texts = [tasks[i % len(tasks)][i // len(tasks)] for i in range(count)]  # the tasks alternate
    return [prompt_inputs(tokenizer, t)["input_ids"][0].tolist() for t in texts]


def fresh_adapter(model_path: str, folder: Path) -> Path:
    import torch
    from peft import get_peft_model

    import mor
    from mor.runtime.loading import load_model

    peft_model = get_peft_model(load_model(model_path), mor.MoRConfig(init_seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            elif "router.weight" in name:
                p.mul_(20.0)
    peft_model.save_pretrained(folder)
    return folder


def task_loras(model_path: str, adapter: Path, prompts: list[list[int]], folder: Path) -> list[Path]:
    """Two per-task LoRAs (mor export-lora): the routing measured on each task's prompts."""
    import torch

    import mor
    from mor.export import export_lora
    from mor.runtime.loading import load_model

    model = mor.load_adapter(load_model(model_path), adapter)
    out = []
    for k, part in enumerate((prompts[0::2], prompts[1::2])):
        batches = [{"input_ids": torch.tensor([ids])} for ids in part[:8]]
        out.append(export_lora(model, model.measure_routing(batches), folder / f"task{k}"))
    return out


class VLLMContender:
    def __init__(self, name: str, model: str, dtype: str, loras: list[Path] | None = None, eager: bool = False):
        from vllm import LLM

        self.name = name
        kwargs = {}
        if loras:
            import json

            rank = max(json.loads((folder / "adapter_config.json").read_text())["r"] for folder in loras)
            kwargs = dict(enable_lora=True, max_loras=len(loras),
                          max_lora_rank=next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank))
        self.llm = LLM(model=model, dtype=dtype, max_model_len=1024, seed=0, enforce_eager=eager, **kwargs)
        self.loras = loras

    def run(self, prompts: list[list[int]], tokens: int) -> float:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        requests = None
        if self.loras:
            requests = [LoRARequest(f"task{i % 2}", i % 2 + 1, str(self.loras[i % 2])) for i in range(len(prompts))]
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, lora_request=requests,
                                 use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return elapsed


class TransformersContender:
    def __init__(self, name: str, model, pad_id: int):
        self.name, self.model, self.pad_id = name, model, pad_id

    def run(self, prompts: list[list[int]], tokens: int) -> float:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, pad_token_id=self.pad_id)
        elapsed = time.perf_counter() - start
        assert out.shape[1] - width == tokens
        return elapsed


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: batch 32 of SmolLM2 needs ~0.3
    import torch

    import mor
    from mor.runtime.loading import load_model, load_tokenizer, resolve_model_path
    from mor.serving import export_for_vllm

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    prompts = prompts_and_ids(tokenizer, max(args.batches))
    work = Path(tempfile.mkdtemp(prefix="mor-serving-bench-"))
    adapter = Path(args.adapter) if args.adapter else fresh_adapter(model_path, work / "adapter")
    serve = export_for_vllm(adapter, work / "serve", model=model_path)
    loras = task_loras(model_path, adapter, prompts, work / "loras")

    contenders = [VLLMContender("vLLM base", model_path, args.dtype, eager=args.eager),
                  VLLMContender("vLLM base (2nd engine)", model_path, args.dtype, eager=args.eager),
                  VLLMContender("vLLM MoR dynamic", str(serve), args.dtype, eager=args.eager),
                  VLLMContender("vLLM per-task LoRA", model_path, args.dtype, loras, eager=args.eager)]
    if not args.no_transformers:
        dtype = getattr(torch, args.dtype)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        contenders += [TransformersContender("transformers base", load_model(model_path, dtype=dtype).eval(), pad),
                       TransformersContender("transformers MoR dynamic",
                                             mor.load_adapter(load_model(model_path, dtype=dtype), adapter).eval(), pad)]
    times = {(c.name, b): [] for c in contenders for b in args.batches}
    for c in contenders:  # warm-up: compile, first allocations
        c.run(prompts[:max(args.batches)], 4)
    for round_, order in enumerate(rotations(contenders, args.rounds)):
        for batch in args.batches:
            for c in order:
                times[(c.name, batch)].append(c.run(prompts[:batch], args.max_tokens))
        result = summarise(args, contenders, times, prompts)  # written after every round: a crash keeps them
        write_json(args.json, result)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    print(result["table"])
    print(f"wrote {args.json}")
    return result


def summarise(args, contenders, times, prompts) -> dict:
    """The table, the targets and the noise floor from the rounds timed so far."""
    def tps(name, batch):
        return [batch * args.max_tokens / t for t in times[(name, batch)]]

    def ratio(a, b, batch):
        return median([x / y for x, y in zip(tps(a, batch), tps(b, batch))])

    rows, table = [], {}
    for batch in args.batches:
        for c in contenders:
            t = times[(c.name, batch)]
            entry = {"tokens_per_s": median(tps(c.name, batch)), "ms_per_step": 1000 * median(t) / args.max_tokens,
                     "vs_vllm_base": ratio(c.name, "vLLM base", batch), "seconds": t}
            table[f"{c.name} @ {batch}"] = entry
            rows.append([str(batch), c.name, f"{entry['tokens_per_s']:.1f}", f"{entry['ms_per_step']:.1f}",
                         f"{entry['vs_vllm_base']:.3f}x"])
    checks = {}
    if 32 in args.batches:
        checks["vLLM MoR / vLLM base at batch 32"] = ratio("vLLM MoR dynamic", "vLLM base", 32)
    if 8 in args.batches and not args.no_transformers:
        checks["vLLM MoR / transformers MoR at batch 8"] = ratio("vLLM MoR dynamic", "transformers MoR dynamic", 8)
    noise = {b: ratio("vLLM base (2nd engine)", "vLLM base", b) for b in args.batches}
    lines = [text_table(["batch", "contender", "tokens/s", "ms/step", "vs vLLM base"], rows),
             "noise floor (2nd base engine / base): " + ", ".join(f"batch {b}: {r:.3f}x" for b, r in noise.items())]
    for name, value in checks.items():
        lines.append(f"target {name} >= {TARGETS[name]}x: {value:.3f}x ({'met' if value >= TARGETS[name] else 'MISSED'})")
    return {"machine": machine_info(packages=("vllm-cpu", "vllm", "transformers", "peft")),
            "settings": {k: v for k, v in vars(args).items() if k != "json"}, "prompt_tokens": [len(p) for p in prompts],
            "rounds": len(next(iter(times.values()))), "results": table, "noise_floor": noise,
            "targets": {k: {"value": v, "target": TARGETS[k]} for k, v in checks.items()}, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()
