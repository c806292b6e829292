"""One rank of a sharded training run on CPU (gloo), started twice by torchrun from
tests/test_distributed.py: ``distributed_worker.py {fsdp2|fsdp1|zero3} OUTPUT_DIR``.

It trains a MoR adapter on a tiny LLaMA for a few steps, each rank on its own batches, while an
unsharded copy of the same model takes the same steps on the mean of both ranks' losses (what
data-parallel training computes). Then it gathers the adapter, saves it once, reloads it, and
writes ``rank<k>.json`` with what the test checks.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402

from mor.config import MoRConfig  # noqa: E402
from mor.runtime.distributed import (adapter_checksum, check_full_state_dict, clean_name, gather_adapter_state_dict,  # noqa: E402
                             load_adapter_file, load_adapter_state_dict, save_adapter, unwrap_model)
from mor.model import get_mor_model, load_adapter  # noqa: E402


def adapter_state(model) -> dict:
    """The MoR adapter's tensors as the model holds them (possibly sharded), keyed by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if ".mor." in n}

STEPS, BATCH, LENGTH, LR = 3, 2, 16, 1e-2


def batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(3, 128, (BATCH, LENGTH), generator=generator)


def adapter_model():
    return get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0))


def wrap(model, mode: str):
    """The sharded model and an optimizer step function."""
    if mode == "zero3":
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10_000}
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=LR), config=config,
                                          model_parameters=params)

        def step(loss):
            engine.backward(loss)
            engine.step()
        return engine, step
    decoder_layers = list(model.get_base_model().model.layers)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:  # fsdp1
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(decoder_layers[0])}), use_orig_params=True,
                       device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)

    def step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return wrapped, step


def _refused(state, model) -> bool:
    try:
        check_full_state_dict(state, model)
    except ValueError:
        return True
    return False


def main(mode: str, output: Path) -> None:
    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    model = adapter_model()
    initial = copy.deepcopy(adapter_state(model))
    reference = copy.deepcopy(model)  # unsharded, sees both ranks' batches
    ref_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR)
    wrapped, step = wrap(model, mode)
    local = adapter_state(unwrap_model(wrapped))
    full = {k: v.numel() for k, v in adapter_state(reference).items()}
    partial = {k: v for k, v in local.items()  # a shard that is neither empty nor the whole tensor
               if not isinstance(v, DTensor) and 0 < v.numel() < full[clean_name(k)]}
    partial_refused = sum(_refused({k: v}, wrapped) for k, v in partial.items())
    local_numel = sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in local.values())  # this rank's share

    losses = []
    for i in range(STEPS):
        ids = batch(i, rank)
        loss = wrapped(input_ids=ids, labels=ids).loss
        step(loss)
        losses.append(loss.item())
        ref_loss = sum(reference(input_ids=batch(i, r), labels=batch(i, r)).loss for r in range(world)) / world
        ref_loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()

    # saving what a rank holds locally must be refused, and write nothing
    refused = None
    try:
        save_adapter(wrapped, output / "local-shards", state_dict=adapter_state(unwrap_model(wrapped)))
    except ValueError as err:
        refused = str(err)

    gathered = gather_adapter_state_dict(wrapped)
    save_adapter(wrapped, output / "adapter", state_dict=None)  # gathers again, rank 0 writes
    torch.distributed.barrier()
    reloaded = adapter_state(load_adapter(make_tiny_llama(), output / "adapter"))
    # loading into the sharded model (what resuming needs): back to the start, then the saved file
    load_adapter_state_dict(wrapped, initial)
    back_to_initial = adapter_checksum(gather_adapter_state_dict(wrapped)) == adapter_checksum(initial)
    load_adapter_file(wrapped, output / "adapter" / "adapter_model.safetensors")
    loaded_sharded = adapter_checksum(gather_adapter_state_dict(wrapped))
    expected = adapter_state(reference)
    report = {
        "rank": rank, "world_size": world, "losses": losses,
        "local_numel": local_numel, "partial_shards": len(partial), "partial_shards_refused": partial_refused, "full_numel": sum(t.numel() for t in gathered.values()),
        "refused": refused, "gathered_sha256": adapter_checksum(gathered),
        "reloaded_sha256": adapter_checksum(reloaded),
        "back_to_initial": back_to_initial, "loaded_into_shards_sha256": loaded_sharded,
        "keys_match": sorted(gathered) == sorted(expected),
        "max_diff_from_unsharded": max((gathered[k] - expected[k]).abs().max().item() for k in expected),
        "trained": max((gathered[k] - initial[k]).abs().max().item() for k in expected),
    }
    (output / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], Path(sys.argv[2]))
