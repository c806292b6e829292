"""Training on two CPU processes for real: DDP through `accelerate launch` (data split, identical
adapters, gradient accumulation, resume after a kill), and FSDP2 / FSDP1 / DeepSpeed ZeRO-3
through torchrun (the adapter is gathered whole, written once, reloads equal to the ranks', and
loads back into the sharded model), and preemption under the Trainer's FSDP2 and ZeRO-3 (SIGTERM, a gathered
checkpoint, an exact resume; accelerate's CPU refusal of both lifted in the launched script).

Every multi-process test asserts that two ranks ran: `accelerate launch --num_processes 2 --cpu`
starts ONE process on a CPU-only machine, so a test that only checks for a saved adapter proves
nothing (``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu`` gives two, over gloo).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mor.config import MoRConfig
from mor.runtime.distributed import adapter_checksum, gather_adapter_state_dict, save_adapter
from mor.model import get_mor_model, load_adapter


def adapter_state(model) -> dict:
    """The MoR adapter's tensors as the model holds them (possibly sharded), keyed by parameter name."""
    return {n: p.detach() for n, p in model.named_parameters() if ".mor." in n}
from mor.data.builtin import write_builtin_suite

from conftest import make_tiny_llama

HERE = Path(__file__).resolve().parent
STEPS, BATCH, ACCUM, SAVE_STEPS = 4, 2, 2, 2


def _env() -> dict:
    src = str(HERE.parent / "src")  # this checkout's mor, also in the launched processes
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": src + (os.pathsep + path if path else "")}


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def accelerate_two_processes(*args, script: list[str] | None = None,
                             launch: tuple[str, ...] = ("--multi_gpu",)) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m mor.cli ARGS`
    (``launch``: the distribution flags in place of ``--multi_gpu``)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", _free_port(), *(script or ["-m", "mor.cli"]), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=24, eval_size=8, tasks=["parity", "colour"])
    return [str(folder / "parity"), str(folder / "colour")]


def train_args(model_dir, tasks, out) -> list:
    return ["train", "--model", model_dir, "--data", *tasks, "--output", out, "--max-steps", STEPS,
            "--batch-size", BATCH, "--grad-accum", ACCUM, "--save-steps", SAVE_STEPS, "--no-eval", "--no-figures",
            "--r", 4, "--num-experts", 3]


RECORD_THE_END = """
import json, os, sys, torch
from mor import cli
code = cli.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--output") + 1]
with open(f"{out}.rank{os.environ['RANK']}.end.json", "w") as f:
    json.dump({"code": code, "process_group_alive": torch.distributed.is_initialized()}, f)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, tiny_tasks) -> Path:
    """An uninterrupted 2-process DDP run with gradient accumulation; each rank records, after
    `mor.cli.main` returned, whether its process group is still alive (``run.rankN.end.json``)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    script = out.parent / "record_the_end.py"
    script.write_text(RECORD_THE_END)
    proc = accelerate_two_processes(*train_args(tiny_model_dir, tiny_tasks, out), script=[str(script)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_each_rank_ends_its_process_group_before_it_exits(ddp_run):
    """A gloo rank that exits with its process group alive can abort at interpreter shutdown
    (SIGABRT, "terminate called without an active exception") after its work is done, failing the
    launch; the CLI destroys the group on every rank."""
    ends = [json.loads(Path(f"{ddp_run}.rank{r}.end.json").read_text()) for r in range(2)]
    assert ends == [{"code": 0, "process_group_alive": False}] * 2


def test_two_processes_split_the_data_and_end_with_the_same_adapter(ddp_run):
    result = json.loads((ddp_run / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["ranks"]) == 2
    assert json.loads((ddp_run / "adapter" / "training.json").read_text())["world_size"] == 2
    rank0, rank1 = result["ranks"]
    # each rank trained on its own examples: STEPS optimizer steps of ACCUM micro-batches of BATCH
    assert rank0["examples"] == rank1["examples"] == STEPS * ACCUM * BATCH
    assert len(set(rank0["example_indices"])) == STEPS * ACCUM * BATCH
    assert not set(rank0["example_indices"]) & set(rank1["example_indices"])
    # both ranks hold bit-identical adapters, and the saved file is rank 0's
    assert rank0["adapter_sha256"] == rank1["adapter_sha256"]
    saved = load_file(str(ddp_run / "adapter" / "adapter_model.safetensors"))
    assert adapter_checksum(saved) == rank0["adapter_sha256"]


KILL_AFTER_FIRST_CHECKPOINT = """
import os, sys, torch
from mor import cli
from mor.train.trainer import CompleteCheckpointCallback
original = CompleteCheckpointCallback.on_save
def on_save(self, args, state, control, **kw):
    original(self, args, state, control, **kw)
    torch.distributed.barrier()  # rank 0 has marked the checkpoint complete
    os._exit(17)  # every rank dies, as under a SIGKILL
CompleteCheckpointCallback.on_save = on_save
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_a_kill_on_two_processes_gives_the_same_adapter(tmp_path, ddp_run, tiny_model_dir, tiny_tasks):
    killer = tmp_path / "kill_after_first_checkpoint.py"
    killer.write_text(KILL_AFTER_FIRST_CHECKPOINT)
    out = tmp_path / "killed"
    proc = accelerate_two_processes(*train_args(tiny_model_dir, tiny_tasks, out), script=[str(killer)])
    assert proc.returncode != 0 and not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}"]

    proc = accelerate_two_processes(*train_args(tiny_model_dir, tiny_tasks, out), "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == STEPS
    assert result["ranks"][0]["adapter_sha256"] == result["ranks"][1]["adapter_sha256"]
    # the resumed processes trained only on the steps after the checkpoint
    assert result["ranks"][0]["examples"] == (STEPS - SAVE_STEPS) * ACCUM * BATCH
    assert_same_adapter(out, ddp_run)


def assert_same_adapter(run: Path, reference: Path) -> None:
    """The adapter ``run`` saved equals the uninterrupted ``reference`` run's (to float noise)."""
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5)


SIGTERM_ON_RANK_1 = """
import os, signal, sys
from transformers import TrainerCallback
from mor import cli, train
class SigtermOnRank1(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if os.environ["RANK"] == "1" and state.global_step == 2:  # during step 3, on one process only
            os.kill(os.getpid(), signal.SIGTERM)
run_training = train.run_training
train.run_training = lambda cfg, callbacks=None: run_training(cfg, [*(callbacks or []), SigtermOnRank1()])
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_one_checkpoint_and_resume_is_exact(tmp_path, ddp_run,
                                                                                         tiny_model_dir, tiny_tasks):
    script = tmp_path / "sigterm_on_rank_1.py"
    script.write_text(SIGTERM_ON_RANK_1)
    out = tmp_path / "preempted"
    proc = accelerate_two_processes(*train_args(tiny_model_dir, tiny_tasks, out), script=[str(script)])
    assert proc.returncode != 0 and not (out / "adapter").exists()
    assert "stopped by SIGTERM at step 3" in proc.stderr  # rank 1, which got the signal
    assert "stopped by a signal on another process at step 3" in proc.stderr  # rank 0 stopped with it
    assert sorted(p.parent.name for p in (out / "checkpoints").glob("checkpoint-*/checkpoint_complete")) == [
        "checkpoint-2", "checkpoint-3"]

    proc = accelerate_two_processes(*train_args(tiny_model_dir, tiny_tasks, out), "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_adapter(out, ddp_run)


SHARDED_ON_CPU = """
import json, os, signal, sys
import accelerate.state, torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback
import mor.train.recipe
from mor import cli, train

# accelerate runs FSDP and DeepSpeed only on accelerators: on CPU it stays MULTI_CPU and drops
# their plugins without a word, and mor refuses that launch (check_launch_before_start). Both are
# lifted here, so that the Trainer's own FSDP2 / ZeRO-3 path (accelerate's fully_shard or the
# DeepSpeed engine, their sharded optimizer checkpoints, our gathered adapter) runs over gloo.
init = accelerate.state.AcceleratorState.__init__
def init_sharded(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if kwargs.get("fsdp_plugin") is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, kwargs["fsdp_plugin"]
    elif kwargs.get("deepspeed_plugin") is not None:
        plugin = kwargs["deepspeed_plugin"]
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        self.distributed_type, self.deepspeed_plugins = DistributedType.DEEPSPEED, plugin
    else:
        return
    accelerate.state.PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does
accelerate.state.AcceleratorState.__init__ = init_sharded
mor.train.recipe.check_launch_before_start = lambda world_size: None

def sharded(p):
    if isinstance(p, torch.distributed.tensor.DTensor):  # FSDP2
        return True
    return hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel  # a ZeRO-3 partition

sigterm_at = int(sys.argv.pop(1))  # SIGTERM to rank 1 during this step (0: never)
out = sys.argv[sys.argv.index("--output") + 1]
class ShardedAndSigterm(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        rank = os.environ["RANK"]
        adapter = [p for n, p in model.named_parameters() if ".mor." in n]
        with open(f"{out}.rank{rank}.sharding.json", "w") as f:  # what this step really ran under
            json.dump({"distributed_type": accelerate.state.AcceleratorState().distributed_type.name,
                       "adapter_sharded": bool(adapter) and all(sharded(p) for p in adapter)}, f)
        if rank == "1" and state.global_step + 1 == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
run_training = train.run_training
train.run_training = lambda cfg, callbacks=None: run_training(cfg, [*(callbacks or []), ShardedAndSigterm()])
code = cli.main(sys.argv[1:])
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    # DeepSpeed on gloo (CPU only; GPUs use NCCL) now and then aborts at interpreter shutdown after
    # the work is done and the group destroyed ("terminate called without an active exception"):
    # leave without the shutdown, so the exit status is the CLI's
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
sys.exit(code)
"""
ZERO3_ON_CPU = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # shard even tiny tensors
                "zero_allow_untested_optimizer": True}
DISTRIBUTED_TYPE = {"fsdp2": "FSDP", "zero3": "DEEPSPEED"}


def sharded_two_processes(mode: str, tmp_path: Path, out: Path, model_dir, tasks, *extra, sigterm_at: int = 0):
    """`mor train` on two CPU processes under the Trainer's FSDP2 or ZeRO-3 (see SHARDED_ON_CPU)."""
    script = tmp_path / "sharded_on_cpu.py"
    script.write_text(SHARDED_ON_CPU)
    if mode == "zero3":
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps(ZERO3_ON_CPU))
        launch = ("--use_deepspeed", "--deepspeed_config_file", str(config))
    else:
        launch = ("--use_fsdp", "--fsdp_version", "2")
    return accelerate_two_processes(*train_args(model_dir, tasks, out), *extra, launch=launch,
                                    script=[str(script), str(sigterm_at)])


def assert_ran_sharded(mode: str, out: Path) -> None:
    for rank in range(2):
        ran = json.loads(Path(f"{out}.rank{rank}.sharding.json").read_text())
        assert ran == {"distributed_type": DISTRIBUTED_TYPE[mode], "adapter_sharded": True}, ran


@pytest.fixture(scope="module")
def sharded_run(request, tmp_path_factory, tiny_model_dir, tiny_tasks) -> tuple[str, Path]:
    """An uninterrupted 2-process run under the Trainer's FSDP2 or ZeRO-3 (``request.param``)."""
    mode = request.param
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")
    folder = tmp_path_factory.mktemp(mode)
    proc = sharded_two_processes(mode, folder, folder / "run", tiny_model_dir, tiny_tasks)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_ran_sharded(mode, folder / "run")
    return mode, folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("sharded_run", ["fsdp2", "zero3"], indirect=True)
def test_sigterm_under_sharding_writes_the_gathered_adapter_and_resume_is_exact(tmp_path, sharded_run,
                                                                               tiny_model_dir, tiny_tasks):
    """Issue 22 item 1 under FSDP2 and ZeRO-3: SIGTERM on one of two processes during step 3
    finishes the step on both, writes checkpoint-3 (the adapter gathered whole from the shards,
    the framework's sharded optimizer state), the ranks exit 75, and --resume reaches the
    uninterrupted run's adapter bit for bit."""
    mode, uninterrupted = sharded_run
    out = tmp_path / "preempted"
    proc = sharded_two_processes(mode, tmp_path, out, tiny_model_dir, tiny_tasks, sigterm_at=3)
    assert proc.returncode != 0 and not (out / "adapter").exists()
    assert_ran_sharded(mode, out)
    assert "stopped by SIGTERM at step 3" in proc.stderr  # rank 1, which got the signal
    assert "stopped by a signal on another process at step 3" in proc.stderr  # rank 0 stopped with it
    statuses = {int(s) for s in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)}
    assert 75 in statuses and statuses <= {75, -15}, proc.stderr[-3000:]  # -15: the launcher ending a rank it outlived
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert sorted(p.parent.name for p in (out / "checkpoints").glob("checkpoint-*/checkpoint_complete")) == [
        "checkpoint-2", "checkpoint-3"]
    sharded_state = {"fsdp2": "optimizer_0", "zero3": "global_step3"}[mode]  # accelerate's / DeepSpeed's own
    assert (checkpoint / sharded_state).is_dir()
    expected = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    stopped = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in stopped.items()} == {k: v.shape for k, v in expected.items()}  # whole, not shards

    proc = sharded_two_processes(mode, tmp_path, out, tiny_model_dir, tiny_tasks, "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key  # bit-identical on CPU


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1", "zero3"])
def test_sharded_training_saves_the_full_adapter_once(tmp_path, mode):
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "distributed_worker.py"), mode, str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["losses"] != reports[1]["losses"]  # each rank trained on its own batches
    for report in reports:
        assert report["local_numel"] < report["full_numel"]  # the adapter really was sharded
        assert report["refused"] and "refusing to save a sharded adapter" in report["refused"]
        assert report["partial_shards_refused"] == report["partial_shards"]
        assert report["keys_match"] and report["trained"] > 1e-3
        # the gathered adapter is what unsharded data-parallel training gives
        assert report["max_diff_from_unsharded"] <= 1e-5
        # written once, and reloading gives exactly what every rank held
        assert report["reloaded_sha256"] == report["gathered_sha256"] == reports[0]["gathered_sha256"]
        # and loading the file back into the sharded model (what resuming needs) gives the same tensors
        assert report["back_to_initial"] and report["loaded_into_shards_sha256"] == report["gathered_sha256"]
    assert not (tmp_path / "local-shards").exists()
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert saved in (["adapter_config.json", "adapter_model.safetensors"],
                     ["README.md", "adapter_config.json", "adapter_model.safetensors"])  # + peft's model card


TRAINER_WITH_DEEPSPEED = """
import dataclasses, sys
from mor.train import recipe as train
from mor.train.adapters import AdapterSpec
plain = train.training_arguments
train.training_arguments = lambda cfg: dataclasses.replace(plain(cfg), deepspeed={
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True})
model, out, *tasks = sys.argv[1:]
train.run_training(train.TrainConfig(model=model, data=tasks, output=out, max_steps=2, batch_size=2, evaluate=False,
                                     adapter=AdapterSpec(r=4, num_experts=3)))
"""


ONE_OF_TWO = "torch.distributed runs 2 processes but the Trainer (accelerate) sees 1"
DROPPED = "accelerate was asked for DEEPSPEED (ACCELERATE_USE_DEEPSPEED=true) but the Trainer runs without it"


@pytest.mark.parametrize("launch", ["torchrun", "trainer-deepspeed", "accelerate-deepspeed-cpu"])
def test_a_launch_that_is_not_what_it_seems_is_refused(tmp_path, tiny_model_dir, tiny_tasks, launch):
    """Three CPU launches that look like 2-process training and are not; each must stop before
    its first step instead of training each process alone on all the data (and each writing):

    - torchrun without ACCELERATE_USE_CPU=true, and DeepSpeed through the Trainer under torchrun:
      the Trainer sees a world of 1 while torch.distributed runs 2;
    - `ACCELERATE_USE_CPU=true accelerate launch --use_deepspeed`: accelerate drops DeepSpeed.
    """
    args = [str(a) for a in train_args(tiny_model_dir, tiny_tasks, tmp_path / "run")]
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    if launch == "accelerate-deepspeed-cpu":
        pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", _free_port(), "-m", "mor.cli", *args]
        env, expected = _env(), DROPPED
    else:
        if launch == "torchrun":  # torchrun takes "--r" (even "--r=4") for an abbreviation of its own options
            target = ["-m", "mor.cli", *args[:-4]]
        else:
            pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")
            script = tmp_path / "trainer_with_deepspeed.py"
            script.write_text(TRAINER_WITH_DEEPSPEED)
            target = [str(script), str(tiny_model_dir), str(tmp_path / "run"), *tiny_tasks]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
        expected = ONE_OF_TWO
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert expected in proc.stderr
    assert not (tmp_path / "run" / "adapter").exists()
    assert not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))


# -- single process: the save path's refusals ------------------------------------------------------

def test_save_refuses_empty_or_sharded_tensors_and_writes_nothing(tmp_path):
    model = get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, init_seed=0))
    state = gather_adapter_state_dict(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="refusing to save a sharded adapter"):
        save_adapter(model, tmp_path / "bad", state_dict={**state, key: torch.empty(0)})
    with pytest.raises(ValueError, match="does not match the model"):
        save_adapter(model, tmp_path / "bad", state_dict={k: v for k, v in state.items() if k != key})
    assert not (tmp_path / "bad").exists()
    save_adapter(model, tmp_path / "good")
    reloaded = adapter_state(load_adapter(make_tiny_llama(), tmp_path / "good"))
    assert adapter_checksum(reloaded) == adapter_checksum(adapter_state(model))  # both in model keys


def test_the_gpu_config_files_are_what_accelerate_reads():
    """The GPU launch files of the README parse as accelerate configs (running them needs GPUs)."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = HERE.parent / "configs"
    fsdp = load_config_from_file(str(configs / "accelerate_fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    zero3 = load_config_from_file(str(configs / "accelerate_deepspeed_zero3.yaml"))
    assert zero3.distributed_type == "DEEPSPEED"
    ds_file = HERE.parent / zero3.deepspeed_config["deepspeed_config_file"]
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 3
