"""Where a plan's trainings run: this machine's workers, SLURM (through submitit) or Ray.

One driver, :class:`Driver`, decides what can run now -- the learning-rate trials, a grid widened
from the finished trials, the seeds at the chosen rates, the scoring -- from the finished results
(``runner.pending``), hands those jobs to an engine, and writes each finished run's JSON itself:
the jobs need no write access to the results folder. Every job runs :func:`run_job`: it checks
that it sees the driver's ``work:`` folder (a marker file), claims its job (``claims.Claim``: two
attempts never train into one folder), trains -- resuming a killed attempt from its last complete
checkpoint -- scores, and returns the record.

- ``local``: ``--workers N`` processes on this machine (``runner.Worker``), each given its own GPUs
  through ``CUDA_VISIBLE_DEVICES`` from the plan's ``resources: {gpus: G}`` (:func:`gpu_sets`).
- ``slurm``: each batch of jobs is one job array (``submitit``); a job preempted or requeued
  (SIGTERM) stops at a complete checkpoint and leaves no result, and its rerun resumes; one near
  its time limit is requeued by submitit (USR2) and resumes from its last complete checkpoint.
- ``ray``: each job a Ray task with the run's resources (Ray sets its GPUs), retried when its
  worker or node dies and resumed from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import MissingExtra, MorError
from ..safety import atomic_write_text
from .claims import Claim, host_name
from .plan import ENGINE_NAMES, Plan, PlanError
from .runner import Job, Worker, job_key, lock_path, lr_selection, pending, result_path

MARKER = ".mor-shared-work.json"


class EngineError(MorError, RuntimeError):
    """An engine refused or lost a job; the message is the engine's own, in one line."""


def one_line(err: BaseException | str) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[-3:]) if len(lines) > 3 else " ".join(lines)


def need_extra(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"--engine {extra} needs {module}: pip install \"mor-adapters[{extra}]\"") from None


# -- resources ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """What one run needs: ``gpus`` (default: the plan's ``processes`` where the machine has GPUs,
    else none), ``cpus`` (default 1) and ``mem_gb`` (default: the engine's)."""

    gpus: Optional[int] = None
    cpus: int = 1
    mem_gb: Optional[float] = None

    @classmethod
    def of(cls, plan: Plan) -> "Resources":
        return cls(**plan.resources)

    def gpus_per_run(self, plan: Plan, available: int) -> int:
        if self.gpus is not None:
            return self.gpus
        return plan.processes if available > 0 else 0


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries when set, else all."""
    import torch

    count = torch.cuda.device_count()
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def gpu_sets(workers: int, per_run: int, gpus: list[str]) -> list[Optional[str]]:
    """Each local worker's CUDA_VISIBLE_DEVICES (None: no GPU, the environment untouched)."""
    if per_run == 0:
        return [None] * workers
    if per_run > len(gpus):
        raise PlanError(f"resources.gpus: {per_run} GPUs a run, but this machine has {len(gpus)}; give at most "
                        f"{len(gpus)}" if gpus else f"resources.gpus: {per_run} GPUs a run, but this machine has none")
    if workers * per_run > len(gpus):
        raise PlanError(f"--workers {workers} at {per_run} GPU(s) a run need {workers * per_run} GPUs; this machine "
                        f"has {len(gpus)}: give --workers {len(gpus) // per_run} or fewer")
    return [",".join(gpus[w * per_run:(w + 1) * per_run]) for w in range(workers)]


# -- the shared work folder -------------------------------------------------------------------------------

def write_marker(plan: Plan) -> str:
    """A marker in ``work:`` that every job must read before training: a token only this driver knows."""
    token = uuid.uuid4().hex
    work = plan.work_dir()
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / MARKER, json.dumps(dict(token=token, host=host_name())) + "\n")
    return token


def check_marker(plan: Plan, token: str) -> None:
    path = plan.work_dir() / MARKER
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = None
    if not seen or seen.get("token") != token:
        what = "is absent" if seen is None else "was written by another driver"
        raise PlanError(f"work: {plan.work_dir()} is not the folder the driver wrote on this node ({host_name()}: "
                        f"its marker {MARKER} {what}); put work: (and the plan's data) on storage every node sees, "
                        "a shared file system")


# -- one job, wherever it runs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobSpec:
    plan: Plan
    job: Job
    lr: Optional[float]
    key: dict
    selection: Optional[dict]
    marker: str
    threads: Optional[int]
    grace: Optional[float]


def run_job(spec: JobSpec, log: Callable[[str], None] | None = None) -> dict:
    """Check the shared folder, claim the job (waiting while another attempt's heartbeat is fresh),
    train (resuming), score; the record, unwritten."""
    check_marker(spec.plan, spec.marker)
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    log = log or (lambda msg: print(f"[{time.strftime('%H:%M:%S')} {host_name()} pid {os.getpid()}] {msg}", flush=True))
    claim = Claim(lock_path(spec.plan, spec.job), spec.grace)
    while not claim.acquire():  # an earlier attempt (a lost node's) holds it until its heartbeat is stale
        log(f"waiting for the claim on {spec.job.name} (held by {claim.holder()})")
        time.sleep(max(0.2, min(10.0, claim.grace / 4)))
    try:
        return Worker(spec.plan, log=log, grace=spec.grace).perform(spec.job, spec.lr, spec.key, spec.selection)
    finally:
        claim.release()


class SlurmJobFunction:
    """The callable an array task runs. SIGTERM (preemption, ``scontrol requeue``) stops the training
    at a complete checkpoint and the task leaves without a result, so the driver waits for its
    rerun; submitit's USR2 before the time limit requeues it through :meth:`checkpoint`."""

    def __call__(self, spec: JobSpec) -> dict:
        from ..safety import Stopped

        try:
            return run_job(spec)
        except Stopped as stop:
            print(f"{stop}; the requeued job resumes it", flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.status)  # no result: the rerun writes it

    def checkpoint(self, spec: JobSpec):
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)  # the same job; it resumes from its checkpoint


# -- engines ------------------------------------------------------------------------------------------------

class RayEngine:
    def __init__(self, plan: Plan, address: str | None, retries: int = 3):
        ray = need_extra("ray", "ray")
        self.ray = ray
        if address and address != "auto":
            reach(address)
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
        except Exception as err:  # noqa: BLE001 -- ray raises ConnectionError, RuntimeError, ValueError...
            raise EngineError(f"ray: {one_line(err)}") from None
        res = Resources.of(plan)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        gpus = res.gpus_per_run(plan, max((n.get("GPU", 0) for n in nodes), default=0))
        if not any(n.get("GPU", 0) >= gpus and n.get("CPU", 0) >= res.cpus and
                   (res.mem_gb is None or n.get("memory", 0) >= res.mem_gb * 2 ** 30) for n in nodes):
            raise PlanError(f"resources: no node of the Ray cluster has {gpus} GPU(s), {res.cpus} CPU(s)"
                            + (f" and {res.mem_gb} GB" if res.mem_gb else "") + " (nodes: " +
                            "; ".join(f"{n.get('GPU', 0):g} GPU {n.get('CPU', 0):g} CPU" for n in nodes) + ")")
        options = dict(num_cpus=res.cpus, num_gpus=gpus, max_retries=retries)
        if res.mem_gb:
            options["memory"] = int(res.mem_gb * 2 ** 30)
        self.remote = ray.remote(run_job).options(**options)

    def submit(self, specs: list[JobSpec]) -> list:
        return [self.remote.remote(spec) for spec in specs]

    def wait(self, handles: list) -> list[tuple[object, dict | None, str | None]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref), None))
            except Exception as err:  # noqa: BLE001 -- a task's error, or its node lost past the retries
                out.append((ref, None, one_line(getattr(err, "cause", None) or err)))
        return out

    def close(self) -> None:
        self.ray.shutdown()


def reach(address: str, timeout: float = 10.0) -> None:
    """Refuse a Ray address nothing answers at (ray.init retries one for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"ray: --ray-address {address}: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise EngineError(f"ray: nothing answers at {address} ({err.strerror or err}): start the cluster (ray start "
                          "--head) or give its address") from None


class SlurmEngine:
    """submitit's executor: ``cluster="slurm"`` (sbatch, one job array per batch) or ``"local"``
    (submitit's LocalExecutor: the same pickled jobs as processes on this machine)."""

    def __init__(self, plan: Plan, cluster: str = "slurm", partition: str | None = None,
                 timeout_min: int | None = None, array_parallelism: int | None = None):
        submitit = need_extra("submitit", "slurm")
        settings = dict(plan.slurm)
        partition = partition or settings.get("partition")
        timeout_min = timeout_min or settings.get("timeout_min") or 240
        array_parallelism = array_parallelism or settings.get("array_parallelism") or 256
        res = Resources.of(plan)
        self.cluster = cluster
        if cluster == "slurm":
            if shutil.which("sbatch") is None:
                raise EngineError("slurm: sbatch is not on PATH: run `mor compare --engine slurm` on a login node")
            gpus = res.gpus_per_run(plan, max_node_gpus(partition))
            check_slurm_capacity(partition, gpus, res)
        else:
            gpus = res.gpus_per_run(plan, len(visible_gpus()))
        self.folder = plan.work_dir() / "submitit"
        self.executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=cluster)
        params = dict(timeout_min=int(timeout_min), cpus_per_task=res.cpus, nodes=1, tasks_per_node=1,
                      name=f"mor-{plan.name}")
        if gpus:
            params["gpus_per_node"] = gpus
        if res.mem_gb:
            params["mem_gb"] = res.mem_gb
        if cluster == "slurm":
            params.update(slurm_array_parallelism=int(array_parallelism),
                          **({"slurm_partition": partition} if partition else {}))
        self.executor.update_parameters(**params)
        self.function = SlurmJobFunction()
        self._gone_checked = 0.0

    def submit(self, specs: list[JobSpec]) -> list:
        try:
            return self.executor.map_array(self.function, specs)
        except Exception as err:  # noqa: BLE001 -- submitit raises sbatch's refusal as a FailedJobError etc.
            raise EngineError(f"{self.cluster}: {one_line(err)}") from None

    def _outcome(self, job) -> tuple[dict | None, str | None] | None:
        from submitit.core.utils import pickle_load

        if job.paths.result_pickle.exists():
            status, value = pickle_load(job.paths.result_pickle)
            return (value, None) if status == "success" else (None, one_line(value))
        return None

    def wait(self, handles: list) -> list[tuple[object, dict | None, str | None]]:
        while True:
            out = [(job, *outcome) for job in handles if (outcome := self._outcome(job)) is not None]
            if out:
                return out
            if time.time() - self._gone_checked > 5:
                self._gone_checked = time.time()
                gone = self._gone(handles)
                for job in gone:
                    time.sleep(1)  # a result written just now (a slow shared file system)
                    outcome = self._outcome(job) or (None, f"{self.cluster} job {job.job_id} ended without a result "
                                                           f"(cancelled, out of memory, or killed); its log: "
                                                           f"{job.paths.stderr}")
                    out.append((job, *outcome))
                if out:
                    return out
            time.sleep(0.5)

    def _gone(self, handles: list) -> list:
        if self.cluster != "slurm":
            return [job for job in handles if job.done()]  # submitit's local processes
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join({j.job_id.split('_')[0]
                                                                                 for j in handles})],
                              capture_output=True, text=True)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:  # (squeue's answer once all have left)
            return []  # the controller did not answer: ask again later
        queued = set(proc.stdout.split()) if proc.returncode == 0 else set()
        return [job for job in handles if job.job_id not in queued]

    def close(self) -> None:
        pass


def max_node_gpus(partition: str | None) -> int:
    return max((n["gpus"] for n in slurm_nodes(partition)), default=0)


def slurm_nodes(partition: str | None) -> list[dict]:
    """Each node of ``partition`` (default: all): CPUs, memory (MB) and GPUs, from ``sinfo``."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G"] + (["-p", partition] if partition else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EngineError(f"slurm: sinfo: {one_line(proc.stderr or proc.stdout)}")
    nodes = []
    for line in proc.stdout.split():
        name, cpus, mem, gres = line.split("|")
        gpus = sum(int(part.split(":")[-1].split("(")[0]) for part in gres.split(",")
                   if part.startswith("gpu") and part.split(":")[-1].split("(")[0].isdigit())
        nodes.append(dict(name=name, cpus=int(cpus.rstrip("+")), mem_mb=int(mem.rstrip("+")), gpus=gpus))
    return nodes


def check_slurm_capacity(partition: str | None, gpus: int, res: Resources) -> None:
    nodes = slurm_nodes(partition)
    if not any(n["gpus"] >= gpus and n["cpus"] >= res.cpus and (res.mem_gb is None or n["mem_mb"] >= res.mem_gb * 1024)
               for n in nodes):
        where = f"partition {partition}" if partition else "the cluster"
        raise PlanError(f"resources: no node of {where} has {gpus} GPU(s), {res.cpus} CPU(s)"
                        + (f" and {res.mem_gb} GB" if res.mem_gb else "") + " (nodes: " +
                        "; ".join(f"{n['name']} {n['gpus']} GPU {n['cpus']} CPU {n['mem_mb']} MB" for n in nodes) + ")")


# -- the driver --------------------------------------------------------------------------------------------------

class Driver:
    """Hands every job that can run now to ``engine`` and writes each record as it comes back."""

    def __init__(self, plan: Plan, engine, log: Callable[[str], None] = print, threads: int | None = None,
                 grace: float | None = None):
        self.plan, self.engine, self.log, self.threads, self.grace = plan, engine, log, threads, grace

    def run(self) -> int:
        plan = self.plan
        marker = write_marker(plan)
        in_flight: dict[object, Job] = {}
        submitted: set[str] = set()
        done, failures = 0, []
        while True:
            if not failures:
                ready, _ = pending(plan)
                specs = [JobSpec(plan, job, lr, job_key(plan, job, lr), lr_selection(plan, job, lr), marker,
                                 self.threads, self.grace) for job, lr in ready if job.name not in submitted]
                if specs:
                    self.log(f"submit {len(specs)} job(s): " + ", ".join(s.job.name for s in specs))
                    for spec, handle in zip(specs, self.engine.submit(specs)):
                        in_flight[handle] = spec.job
                        submitted.add(spec.job.name)
            if not in_flight:
                break
            for handle, record, error in self.engine.wait(list(in_flight)):
                job = in_flight.pop(handle)
                submitted.discard(job.name)
                if error is not None:
                    failures.append(f"{job.name}: {error}")
                    continue
                path = result_path(plan, job)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
                done += 1
                self.log(f"finished {job.name} -> {path}")
        if failures:
            raise EngineError(f"{len(failures)} job(s) failed ({'; '.join(failures)}); the finished ones are written, "
                              "run the same command again to resume")
        return done


def make_engine(plan: Plan, name: str, ray_address: str | None = None, slurm_partition: str | None = None,
                slurm_time: int | None = None, slurm_array_parallelism: int | None = None, slurm_local: bool = False):
    """The engine ``name`` (ray, slurm) for ``plan``; refuses resources no node has before anything is submitted."""
    if name == "ray":
        return RayEngine(plan, ray_address)
    if name == "slurm":
        return SlurmEngine(plan, "local" if slurm_local else "slurm", slurm_partition, slurm_time,
                           slurm_array_parallelism)
    raise PlanError(f"--engine {name}: give one of {', '.join(ENGINE_NAMES)}")


