"""What caching U (MoRAdapter's token-independent factors) buys at decode: greedy generation with
SmolLM2 and a default MoR adapter (r=8, N=8, the FFN), batch 1 and 32, the factors kept for the
whole call vs rebuilt at every forward; a second "kept" run is the noise floor. Contenders are
interleaved round by round; each ratio is the median over rounds of the per-round ratio.

    python -m benchmarks.u_cache [--rounds 5] [--new-tokens 16] [--json results/u_cache.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine_line, median, paired_ratio, rotations, rx, text_table, write_json

PROMPT = "Question: which is heavier, a kilogram of iron or a kilogram of feathers? Answer:"


def decode_seconds(model, inputs, new_tokens: int, keep: bool) -> float:
    from mor.layer import MoRAdapter

    original = MoRAdapter.token_independent_factors

    def rebuilt(adapter):
        adapter._factors_cache = None
        return original(adapter)

    MoRAdapter.token_independent_factors = original if keep else rebuilt
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return time.perf_counter() - start
    finally:
        MoRAdapter.token_independent_factors = original


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from mor import MoRConfig, get_mor_model
    from mor.runtime.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(None)
    tokenizer.padding_side = "left"
    model = get_mor_model(load_model(None), MoRConfig(init_seed=0)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    rows, result = [], {"machine": machine_line(), "new_tokens": args.new_tokens, "rounds": args.rounds, "batches": {}}
    for batch in args.batches:
        inputs = dict(tokenizer([PROMPT] * batch, return_tensors="pt", padding=True))
        inputs["pad_token_id"] = tokenizer.pad_token_id
        times = {"kept": [], "kept again": [], "rebuilt": []}
        decode_seconds(model, inputs, 2, True)  # warm-up
        for order in rotations(list(times), args.rounds):
            for name in order:
                times[name].append(decode_seconds(model, inputs, args.new_tokens, keep=name != "rebuilt"))
            print(f"batch {batch}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        rebuilt = paired_ratio(times["rebuilt"], times["kept"])
        floor = paired_ratio(times["kept again"], times["kept"])
        per_token = median(times["kept"]) / args.new_tokens * 1e3
        rows.append([str(batch), f"{per_token:.1f}", rx(rebuilt), rx(floor)])
        result["batches"][str(batch)] = {"seconds": times, "rebuilt_over_kept": rebuilt, "noise_floor": floor}
    print(result["machine"])
    print(text_table(["batch", "ms/token (kept)", "rebuilt / kept", "kept again / kept (noise)"], rows))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
