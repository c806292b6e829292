"""The engines' overhead: one small plan (8 trainings: 2 arms x 4 seeds at fixed rates, a tiny
config-built LLaMA with SmolLM2's tokenizer) through ``mor compare`` on the ``local`` engine
(``--workers 2``), ``ray`` (a local Ray on this machine's CPUs) and ``slurm`` (the SLURM that
``$SLURM_CONF`` / ``sinfo`` reaches; else submitit's LocalExecutor, and the JSON says so), each
from a fresh folder, the engines taking turns for ROUNDS rounds (who goes first rotates). Each
engine's wall time over local's in the same round (median of the rounds), and its start-up time:
``ray.init`` + shutdown; one trivial ``sbatch`` job from submission to its end.

    python -m benchmarks.engines --rounds 2      # about 10 min on 2 CPU cores

Writes results/engines.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, median, rotations, rx, text_table, write_json

ENGINES = ("local", "ray", "slurm")


def tiny_model(folder: Path) -> Path:
    """A 2-layer config-built LLaMA (hidden 64) with SmolLM2's tokenizer: trainings of seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mor.runtime.loading import resolve_model_path

    import torch

    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_plan(folder: Path, model: Path, steps: int) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    plan = dict(name="engines", model=str(model),
                data=dict(train=["builtin:parity", "builtin:colour"], train_per_task=32, validation_per_task=8,
                          test_per_task=16, heldout_per_task=8),
                train=dict(max_steps=steps, batch_size=4, max_length=64, target="text"), seeds=[0, 1, 2, 3],
                arms=dict(lora=dict(method="lora", r=4, lr=1e-3), mor=dict(method="mor", r=2, num_experts=4, lr=1e-3)),
                results="results", work="work")
    (folder / "plan.yaml").write_text(yaml.safe_dump(plan))
    return folder / "plan.yaml"


def slurm_reachable() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def run_plan(plan: Path, engine: str) -> float:
    command = [sys.executable, "-m", "mor.cli", "compare", str(plan), "--threads", "1", "--no-report"]
    command += ["--workers", "2"] if engine == "local" else ["--engine", engine]
    if engine == "slurm" and not slurm_reachable():
        command.append("--slurm-local")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {engine}: {proc.stderr[-2000:]}")
    finished = len(list((plan.parent / "results").glob("*_seed*.json")))
    if finished != 8:
        raise SystemExit(f"error: {engine} finished {finished} runs of 8")
    return seconds


def startup(engine: str) -> float | None:
    """Seconds the engine takes to be ready and idle again, with no training."""
    start = time.perf_counter()
    if engine == "ray":
        subprocess.run([sys.executable, "-c", "import ray; ray.init(num_cpus=2, include_dashboard=False); "
                        "ray.shutdown()"], check=True, capture_output=True)
    elif engine == "slurm" and slurm_reachable():
        job = subprocess.run(["sbatch", "--parsable", "--wrap", "true", "-o", "/dev/null"], check=True,
                             capture_output=True, text=True).stdout.strip()
        while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            time.sleep(0.1)
    else:
        return None
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each of the 8 trainings")
    p.add_argument("--json", default="results/engines.json")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model")
        for k, order in enumerate(rotations(list(ENGINES), args.rounds)):
            for engine in order:
                folder = Path(tmp) / f"round{k}_{engine}"
                times[engine].append(run_plan(write_plan(folder, model, args.steps), engine))
                print(f"round {k} {engine}: {times[engine][-1]:.1f} s", flush=True)
    starts = {e: [s for _ in range(3) if (s := startup(e)) is not None] for e in ENGINES}
    rows, out = [], dict(machine=machine_info(packages=("ray", "submitit")), rounds=args.rounds, steps=args.steps,
                         trainings=8, slurm="a real SLURM (sinfo answered)" if slurm_reachable() else
                         "submitit LocalExecutor (no SLURM reachable)", engines={})
    for e in ENGINES:
        ratio = median([t / base for t, base in zip(times[e], times["local"])])
        out["engines"][e] = dict(seconds=times[e], ratio_to_local=ratio, startup_seconds=median(starts[e]) if starts[e]
                                 else None)
        rows.append([e, f"{median(times[e]):.1f}", rx(ratio), f"{median(starts[e]):.1f}" if starts[e] else "-"])
    print(text_table(["engine", "wall s (median)", "vs local", "start-up s"], rows))
    write_json(args.json, out)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
