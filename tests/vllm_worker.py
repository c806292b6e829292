"""Runs real vLLM on a folder in its own process (vLLM starts worker processes: a script, with the
``__main__`` guard vLLM needs) and writes what the tests compare as JSON.

    python tests/vllm_worker.py SPEC.json OUT.json

SPEC: {"model": folder, "prompts": [[token ids], ...], "max_tokens": n, "eager": bool,
       "probe": [served layer names] (optional: record each layer's input and gates on prompts[0]),
       "loras": {name: LoRA folder}, "prompt_loras": [name per prompt], "max_lora_rank": n
       (optional: vLLM's multi-LoRA; mor is then never imported here)}
OUT:  {"tokens": [[generated ids], ...], "mor_imported": bool,
       "probe": {layer: {"x": [[...]], "gates": {module: [[...]]}}}}
"""

from __future__ import annotations

import functools
import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    loras = spec.get("loras")  # {name: folder}: vLLM's own multi-LoRA, each prompt with loras[prompt_loras[i]]
    lora_options = dict(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=len(loras)) if loras else {}
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=spec.get("eager", True),
              max_model_len=spec.get("max_model_len", 512), seed=0, enable_prefix_caching=False, **lora_options)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    requests = None
    if loras:
        from vllm.lora.request import LoRARequest

        ids = {name: index + 1 for index, name in enumerate(loras)}
        requests = [LoRARequest(name, ids[name], loras[name]) for name in spec["prompt_loras"]]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False,
                           lora_request=requests)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "mor_imported": any(name == "mor" or name.startswith("mor.") for name in sys.modules)}
    probe = spec.get("probe")
    if probe:
        from mor.serving.vllm_plugin import read_gates, record_inputs

        llm.apply_model(functools.partial(record_inputs, probe))
        llm.generate([{"prompt_token_ids": spec["prompts"][0]}], SamplingParams(temperature=0, max_tokens=1),
                     use_tqdm=False)
        result["probe"] = llm.apply_model(functools.partial(read_gates, probe))[0]
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends the probe functions
    main(sys.argv[1], sys.argv[2])
