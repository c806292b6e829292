"""Running a plan: choose each arm's learning rate on validation, train its seeds at that rate,
score every test record, one JSON per finished run -- resumable, shareable by several workers.

Jobs, in the order they are taken:

1. ``select/<arm>_lr<lr>_seed<s>.json``: one training per rate of the arm's grid (and selection
   seed), scored on the validation split; while the best is at the grid's edge, the next rate past
   it (``select.widen``). Arms with a fixed ``lr`` have none.
2. ``<arm>_seed<s>.json`` (and ``base.json``): a training at the arm's chosen rate, scored on the
   test and held-out records, with its losses and routing. A training the selection already did
   (same rate, seed and steps) is scored, not repeated. Seed-major: every arm's first seed before
   anyone's second, so an unfinished plan already compares every arm.

A worker claims a job (``claims.Claim``: host, PID, start time and a heartbeat; a claim whose
heartbeat stopped for the grace period is taken over), trains in ``<work>/train/<run>/`` (resuming
a killed attempt from its last complete checkpoint), and writes the JSON last, atomically. A
finished JSON made under other settings is refused. ``pending`` says what can run now; the
engines (``engines``: SLURM, Ray) run the same jobs through one driver.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..safety import atomic_write_text
from ..stopping import stop_cleanly
from .claims import Claim, grace_seconds, live_claims
from .data import Splits, carve, write_train_folders
from .plan import Arm, Plan, PlanError, key_hash, lr_name, rate_beyond

SCORE_VERSION = 1  # what a result file's scores mean; a change refuses older files


@dataclass(frozen=True)
class Job:
    kind: str  # "select" | "final" | "base"
    arm: Optional[str]
    seed: Optional[int]
    lr: Optional[float] = None  # select jobs: the rate tried

    @property
    def name(self) -> str:
        if self.kind == "base":
            return "base"
        if self.kind == "select":
            return f"select/{self.arm}_lr{lr_name(self.lr)}_seed{self.seed}"
        return f"{self.arm}_seed{self.seed}"


def jobs(plan: Plan) -> list[Job]:
    out = [Job("select", a.name, s, lr) for a in plan.arms.values() if len(plan.arm_grid(a)) > 1
           for lr in selection(plan, a)[0] for s in plan.select_seeds()]
    out += [Job("base", None, None)] if plan.baseline else []
    seeds = list(dict.fromkeys([*plan.seeds, *(s for a in plan.arms.values() for s in plan.arm_seeds(a))]))
    out += [Job("final", a.name, s) for s in seeds for a in plan.arms.values() if s in plan.arm_seeds(a)]
    return out


def job_key(plan: Plan, job: Job, lr: float | None = None) -> dict:
    """What a job's result depends on: its training (if any) and what it is scored on."""
    scored = dict(data=plan.data.key(), model=plan.model, scoring=plan.scoring, version=SCORE_VERSION)
    if job.kind == "base":
        return dict(kind="base", **scored)
    arm = plan.arms[job.arm]
    steps = plan.select_steps() if job.kind == "select" else plan.steps()
    return dict(kind=job.kind, training=plan.training_key(arm, job.lr if job.kind == "select" else lr, job.seed, steps),
                **scored, routing_prompts=plan.routing_prompts if job.kind == "final" else None)


# -- results on disk ------------------------------------------------------------------------------

def result_path(plan: Plan, job: Job) -> Path:
    return plan.results_dir() / f"{job.name}.json"


def read_result(path: Path, expected: dict | None) -> dict | None:
    """The finished result at ``path`` or None; one made under other settings is an error."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"{path} is not a readable result ({err}); delete it to redo that run") from None
    if expected is not None and record.get("key_hash") != key_hash(expected):
        raise PlanError(f"{path} was made under other settings than this plan's (settings hash {record.get('key_hash')} "
                        f"!= {key_hash(expected)}); give the plan another results: folder, or delete the file to redo "
                        "that run")
    return record


def selection(plan: Plan, arm: Arm) -> tuple[list[float], float | None, dict]:
    """(the rates the arm's selection tries -- its grid, widened past an edge while the best sits
    there, at most ``select.widen`` more; the chosen rate, None while a trial is unfinished; the
    validation scores so far). Read from the finished trials, so every worker agrees."""
    grid = declared = plan.arm_grid(arm)
    if len(grid) == 1:
        return grid, grid[0], {}
    scores = {}
    while True:
        for lr in grid:
            if lr_name(lr) in scores:
                continue
            per_seed = []
            for seed in plan.select_seeds():
                job = Job("select", arm.name, seed, lr)
                record = read_result(result_path(plan, job), job_key(plan, job))
                if record is None:
                    return grid, None, scores
                per_seed.append(record["validation_average"])
            scores[lr_name(lr)] = sum(per_seed) / len(per_seed)
        best = max(grid, key=lambda lr: scores[lr_name(lr)])  # the first of equals: the grid's order
        beyond = rate_beyond(grid, best) if len(grid) - len(declared) < plan.select.widen else None
        if beyond is None:
            return grid, best, scores
        grid = [*grid, beyond]


def chosen_lr(plan: Plan, arm: Arm) -> tuple[float | None, dict]:
    """(the arm's rate -- None while its selection is unfinished, the validation scores)."""
    _, lr, scores = selection(plan, arm)
    return lr, scores


# -- what can run now -----------------------------------------------------------------------------------

def pending(plan: Plan) -> tuple[list[tuple[Job, float | None]], bool]:
    """(the unfinished jobs that can run now, in order, each with its rate (final runs); whether a
    final run waits for its arm's selection to finish). Read from the finished results, so every
    worker and the driver agree."""
    ready, waiting = [], False
    for job in jobs(plan):
        lr = None
        if job.kind == "final":
            lr, _ = chosen_lr(plan, plan.arms[job.arm])
            if lr is None:
                waiting = True
                continue
        if read_result(result_path(plan, job), job_key(plan, job, lr)) is None:
            ready.append((job, lr))
    return ready, waiting


def lr_selection(plan: Plan, job: Job, lr: float | None) -> dict | None:
    """What a final run records of its arm's selection: every tried rate's validation score."""
    if job.kind != "final":
        return None
    _, grid = chosen_lr(plan, plan.arms[job.arm])
    return dict(validation_average=grid, chosen=lr_name(lr)) if grid else None


def lock_path(plan: Plan, job: Job) -> Path:
    return plan.work_dir() / "locks" / f"{job.name.replace('/', '_')}.lock"


# -- one job ------------------------------------------------------------------------------------------

class Worker:
    """Runs the jobs of one plan in this process."""

    def __init__(self, plan: Plan, log: Callable[[str], None] = print, limit: int | None = None,
                 grace: float | None = None):
        from .plan import match_budget

        match_budget(plan)  # an arm without r gets the budget's (every key below needs its r)
        self.plan, self.log, self.limit, self.grace = plan, log, limit, grace_seconds(grace)
        self.work = plan.work_dir()
        self._splits: Splits | None = None
        self._data_folders: list[str] | None = None

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            claim = Claim(self.work / "locks" / "carve.lock", self.grace)
            while not claim.acquire():  # one worker writes the generated and carved files at a time
                time.sleep(0.5)
            with claim:
                self._splits = carve(self.plan, self.work)
                folder = self.work / f"data_{key_hash(self.plan.data.key())}"
                self._data_folders = write_train_folders(self._splits, folder)
        return self._splits

    def run(self, poll_seconds: float | None = None) -> int:
        """Do every job that is not finished; wait for jobs other workers hold. Returns how many
        this worker finished."""
        poll_seconds = min(15.0, self.grace / 2) if poll_seconds is None else poll_seconds
        done = 0
        while True:
            ready, waiting = pending(self.plan)
            progressed = False
            for job, lr in ready:
                if self.limit is not None and done >= self.limit:
                    return done
                claim = Claim(lock_path(self.plan, job), self.grace)
                if not claim.acquire():
                    waiting = True
                    continue
                with claim:
                    key = job_key(self.plan, job, lr)
                    path = result_path(self.plan, job)
                    if read_result(path, key) is None:  # finished while we were claiming?
                        self.execute(job, lr, key, path)
                        done += 1
                        progressed = True
                if progressed:  # from the top: a finished trial may have widened a grid or chosen a rate
                    break
            if progressed:
                continue
            if not waiting:
                return done
            if not live_claims(self.work / "locks", self.grace) and not any(
                    j.kind == "select" for j, _ in pending(self.plan)[0]):
                return done
            time.sleep(poll_seconds)

    def execute(self, job: Job, lr: float | None, key: dict, path: Path) -> dict:
        """Run ``job`` and write its record at ``path``."""
        record = self.perform(job, lr, key, lr_selection(self.plan, job, lr))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
        self.log(f"finished {job.name} -> {path}")
        return record

    def perform(self, job: Job, lr: float | None, key: dict, selection: dict | None) -> dict:
        """Train (or reuse the training of) ``job`` and score it: its record, not written."""
        import torch

        plan = self.plan
        arm = plan.arms.get(job.arm) if job.arm else None
        record = dict(run=job.name.split("/")[-1], kind=job.kind, method=job.arm or "base",
                      label=(arm.label if arm else "base model, zero-shot"), seed=job.seed, lr=lr or job.lr,
                      key=key, key_hash=key_hash(key), machine=_machine(), threads=torch.get_num_threads(),
                      started=_now())
        adapter_dir = None
        if arm is not None:
            rate = job.lr if job.kind == "select" else lr
            steps = plan.select_steps() if job.kind == "select" else plan.steps()
            trained = self.train(arm, rate, job.seed, steps)
            adapter_dir = trained["adapter_dir"]
            record.update(trainable_parameters=trained["trainable_parameters"],
                          train_seconds=trained["train_seconds"], global_step=trained["global_step"],
                          final_loss=trained["final_loss"], base_dtype=trained["base_dtype"],
                          world_size=trained.get("world_size", 1),
                          losses=[(h["step"], round(h["loss"], 5)) for h in trained.get("log_history") or []
                                  if "loss" in h],
                          routing_during_training=trained.get("routing_stats"))
            if job.kind == "final":
                record["lr_selection"] = selection
        else:
            record.update(trainable_parameters=0, train_seconds=0.0)
        self.log(f"score {job.name}")
        start = time.perf_counter()
        trained = f"its training is finished ({adapter_dir}), its scores were not written" if adapter_dir else \
            "its scores were not written"
        with stop_cleanly(f"scoring {job.name}", trained, rerun="run the same `mor compare` command again (it scores "
                                                              "this run again, without training it again)"):
            if job.kind == "select":
                record.update(self.score(adapter_dir, self.splits.validation, routing=False))
                record["validation_average"] = sum(t["acc_norm"] for t in record["tasks"].values()) / len(record["tasks"])
            else:
                tasks = {**self.splits.test, **self.splits.heldout}
                routing = arm is not None and arm.spec().method in ("mor", "moelora")
                record.update(self.score(adapter_dir, tasks, routing=routing))
        record["eval_seconds"] = time.perf_counter() - start
        record["finished"] = _now()
        return record

    def train(self, arm: Arm, lr: float, seed: int, steps: int) -> dict:
        """The training of ``arm`` at ``lr`` / ``seed`` / ``steps``: done once, whichever job needs it
        first; a killed attempt resumes from its last complete checkpoint."""
        from ..train.trainer import last_complete_checkpoint

        plan = self.plan
        key = plan.training_key(arm, lr, seed, steps)
        out = self.work / "train" / f"{arm.name}_lr{lr_name(lr)}_seed{seed}_steps{steps}"
        done = out / "result.json"
        marker = out.parent / f"{out.name}.key.json"
        if done.is_file() and marker.is_file() and json.loads(marker.read_text()).get("key_hash") == key_hash(key):
            return json.loads(done.read_text())
        _ = self.splits  # the train folders exist
        cfg = self.train_config(arm, lr, seed, steps, out)
        cfg["resume"] = last_complete_checkpoint(out / "checkpoints") is not None and marker.is_file() and \
            json.loads(marker.read_text()).get("key_hash") == key_hash(key)
        cfg["overwrite"] = not cfg["resume"]  # no finished training of this key: what is there is ours to replace
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(dict(key=key, key_hash=key_hash(key)), indent=1, default=str) + "\n")
        self.log(f"train {arm.name} lr {lr_name(lr)} seed {seed} ({steps} steps)" + (" resuming" if cfg["resume"] else ""))
        from ..safety import Stopped

        try:
            if plan.processes > 1:
                self._train_launched(cfg, out)
            else:
                from ..train import TrainConfig, run_training

                run_training(TrainConfig.from_dict(cfg, source=f"plan {plan.path}"))
        except Stopped as stop:  # SIGTERM / SIGINT: the training's checkpoint is complete; the plan resumes it
            raise Stopped(f"{str(stop).split(';')[0]}; to continue, run the same `mor compare` command again "
                          "(the plan resumes this training from that checkpoint)", stop.status) from None
        return json.loads(done.read_text())

    def train_config(self, arm: Arm, lr: float, seed: int, steps: int, out: Path) -> dict:
        """The run's settings (TrainConfig field names): the plan's, the arm's, and the engine's own."""
        plan = self.plan
        settings = dict(save_steps=max(10, steps // 6), logging_steps=1, routing_stats_steps=max(1, steps // 30),
                        lr_scheduler="cosine")
        settings.update(plan.train)
        settings.update(arm.train)
        settings.update(model=plan.model, data=list(self._data_folders), output=str(out), lr=lr, seed=seed,
                        max_steps=steps, evaluate=False, figures=False, adapter=arm.spec().to_dict())
        return settings

    def _train_launched(self, cfg: dict, out: Path) -> None:
        """One training on ``plan.processes`` processes through ``accelerate launch`` (gloo on CPU)."""
        import torch
        import yaml

        config_file = out.parent / f"{out.name}.train.yaml"
        flat = {**{k: v for k, v in cfg.items() if k != "adapter"}, **cfg["adapter"]}
        atomic_write_text(config_file, yaml.safe_dump(flat, sort_keys=True))
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(self.plan.processes), "-m", "mor.cli", "train", "--config", str(config_file)]
        if cfg["resume"]:
            command.append("--resume")
        if cfg["overwrite"]:
            command.append("--overwrite")
        self.log(" ".join(command))
        status = subprocess.run(command, env=env).returncode
        if status != 0:
            raise RuntimeError(f"the launched training exited with status {status} (its output is above); "
                               f"settings: {config_file}")

    def score(self, adapter_dir, tasks: dict, routing: bool) -> dict:
        """Every record's score (acc_norm and acc as strings of 0/1, in the split's order), per-task
        accuracies, and the routing by task when asked."""
        import torch

        from ..data import multiple_choice_items
        from ..eval.scoring import evaluate_tasks
        from ..runtime.loading import load_adapted

        plan = self.plan
        model, tokenizer = load_adapted(plan.model, adapter_dir)
        items = {t: multiple_choice_items(task, scoring=plan.scoring, tokenizer=tokenizer) for t, task in tasks.items()}
        with torch.no_grad():
            res = evaluate_tasks(model, tokenizer, items, batch_size=plan.eval_batch_size, progress=False,
                                 scoring=plan.scoring, log_samples=True)
        out = dict(tasks={t: res["tasks"][t] for t in tasks},
                   records={t: {m: "".join(str(int(x[m])) for x in res["samples"][t]) for m in ("acc_norm", "acc")}
                            for t in tasks})
        if routing:
            out["routing"] = routing_by_task(model, tokenizer, items, plan.routing_prompts,
                                             int(plan.train.get("max_length", 256)))
        return out


def routing_by_task(model, tokenizer, items: dict, prompts: int, max_length: int) -> dict:
    """Routing on each task's first test prompts: entropy, between-task divergence, and each
    task's mean gate per layer."""
    from ..analysis.routing_stats import measure_routing_stats, probe_batches

    texts = {t: [it.contexts[0] for it in task_items[:prompts]] for t, task_items in items.items()}
    stats = measure_routing_stats(model, probe_batches(texts, tokenizer, max_length=max_length), gate_means=True)
    layers = stats.pop("layers")
    stats["jsd_bits_per_layer"] = {k: round(v["jsd_bits"], 6) for k, v in layers.items()}
    stats["entropy_bits_per_layer"] = {k: round(v["entropy_bits"], 5) for k, v in layers.items()}
    return stats


def _machine() -> str:
    import platform

    import torch

    from ..runtime.system import cpu_model

    return (f"{platform.node()} | {platform.system()} {platform.release()} | {cpu_model()} x{os.cpu_count()} | "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def run_workers(plan_path: str, workers: int, threads: int | None, extra: list[str],
                gpus: list[str | None] | None = None) -> int:
    """``workers`` processes of ``mor compare PLAN`` sharing the plan, worker w seeing the GPUs
    ``gpus[w]`` (``CUDA_VISIBLE_DEVICES``; None: the environment's); returns the first failure's status."""
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    child = [sys.executable, "-m", "mor.cli", "compare", plan_path, "--workers", "1", "--threads", str(threads),
             "--no-report", *extra]
    gpus = gpus or [None] * workers
    procs = [subprocess.Popen(child, env=dict(os.environ, **({"CUDA_VISIBLE_DEVICES": g} if g is not None else {})))
             for g in gpus]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)
