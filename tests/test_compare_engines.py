"""``mor compare`` where its users run it: claims that are safe across hosts (heartbeat, grace,
takeover), each local worker on its own GPUs, and the same plan through real engines on this
machine -- a local Ray cluster and a single-node SLURM (slurmctld + slurmd started here) --
giving the local engine's records and adapters, a killed or requeued job resuming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mor.compare.claims import Claim
from mor.compare.plan import PlanError, plan_from_dict

from tests.test_compare import BASE_PLAN, compare, tiny_plan

# -- claims ---------------------------------------------------------------------------------------------


def test_a_claim_records_its_holder_and_is_taken_over_only_when_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("MOR_HOST", "node-a")
    lock = tmp_path / "locks" / "mor_seed0.lock"
    holder = Claim(lock, grace=0.5)
    assert holder.acquire()
    seen = json.loads(lock.read_text())
    assert seen["host"] == "node-a" and seen["pid"] == os.getpid() and seen["started"] and seen["token"]
    other = Claim(lock, grace=0.5)
    time.sleep(1.2)  # longer than the grace: the heartbeat thread keeps the claim fresh
    assert not other.acquire() and not holder.lost
    holder._stop.set()  # the holder dies: its heartbeat stops, its file stays
    holder._thread.join()
    time.sleep(0.8)
    assert other.acquire() and json.loads(lock.read_text())["token"] == other.token
    time.sleep(0.3)
    holder.release()  # a holder that lost its claim does not delete the new holder's
    assert json.loads(lock.read_text())["token"] == other.token
    other.release()
    assert not lock.exists()


def test_a_dead_pid_with_a_fresh_heartbeat_is_not_taken(tmp_path):
    """A PID says nothing across hosts: only the heartbeat counts."""
    lock = tmp_path / "x.lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps(dict(host="elsewhere", pid=dead.pid, token="t", started="now")))
    assert not Claim(lock, grace=30).acquire()
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert Claim(lock, grace=30).acquire()


RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mor.compare.claims import Claim
    folder, log = Path(sys.argv[1]), Path(sys.argv[2])
    for i in range(int(sys.argv[3])):  # as a worker does: skip what is done, claim, check again, work, release
        done = folder / f"job{i}.done"
        if done.exists():
            continue
        claim = Claim(folder / f"job{i}.lock", grace=1.0)
        if claim.acquire():
            with claim:
                if not done.exists():
                    with open(log, "a") as f:
                        f.write(f"job{i} {os.environ['MOR_HOST']}\\n")
                    time.sleep(0.02)
                    done.touch()
""")


def test_hosts_racing_for_the_same_claims_each_take_each_job_once(tmp_path):
    """Four processes on four "hosts" race through 40 jobs as workers do, 10 of them claimed by a
    holder that died: every job is done exactly once, the stale ones too."""
    folder, log = tmp_path / "locks", tmp_path / "log"
    folder.mkdir()
    old = time.time() - 60
    for i in range(0, 40, 4):
        (folder / f"job{i}.lock").write_text(json.dumps(dict(host="gone", pid=1, token="old", started="then")))
        os.utime(folder / f"job{i}.lock", (old, old))
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), str(log), "40"],
                              env=dict(os.environ, MOR_HOST=f"host{h}")) for h in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    taken = [line.split() for line in log.read_text().splitlines()]
    assert sorted(job for job, _ in taken) == sorted(f"job{i}" for i in range(40))
    assert not list(folder.glob("*.lock")) and not list(folder.glob("*.takeover"))


def _wait_for_checkpoint(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    from mor.train.trainer import last_complete_checkpoint

    start = time.time()
    while time.time() - start < timeout:
        for out in folder.glob("train/*/checkpoints") if folder.is_dir() else []:
            found = last_complete_checkpoint(out)
            if found is not None:
                return found
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)
    raise AssertionError("no complete checkpoint appeared")


def long_plan(folder: Path, model: Path, **changes) -> Path:
    """One arm at a fixed rate: a training long enough to be stopped in the middle (a checkpoint every 50 steps)."""
    return tiny_plan(folder, model, **{**dict(seeds=[0], baseline=False, arms=dict(lora=dict(method="lora", r=4,
                                                                                          lr=1e-3)),
                                              train=dict(max_steps=300, batch_size=4, max_length=64, target="text")),
                                       **changes})


def test_a_killed_holder_is_taken_over_after_the_grace_and_its_training_resumes(tmp_path, tiny_model_dir):
    plan_file = long_plan(tmp_path, tiny_model_dir)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", MOR_CLAIM_GRACE="3")
    command = [sys.executable, "-m", "mor.cli", "compare", str(plan_file), "--no-report", "--threads", "1"]
    first = subprocess.Popen(command, env=dict(env, MOR_HOST="host-a"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    checkpoint = _wait_for_checkpoint(tmp_path / "work", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    lock = tmp_path / "work" / "locks" / "lora_seed0.lock"
    assert json.loads(lock.read_text())["host"] == "host-a"  # the dead holder's claim stays...
    second = subprocess.run(command, env=dict(env, MOR_HOST="host-b"), capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout  # ...until its heartbeat is stale; then from its checkpoint
    result = json.loads((tmp_path / "results" / "lora_seed0.json").read_text())
    assert result["global_step"] == 300 and checkpoint.name.startswith("checkpoint-")
    assert not lock.exists()


# -- each local worker on its own GPUs --------------------------------------------------------------------

def test_gpu_sets_give_each_worker_its_own_gpus():
    from mor.compare.engines import gpu_sets

    assert gpu_sets(4, 1, ["0", "1", "2", "3"]) == ["0", "1", "2", "3"]
    assert gpu_sets(2, 2, ["4", "5", "6", "7"]) == ["4,5", "6,7"]  # within CUDA_VISIBLE_DEVICES's GPUs
    assert gpu_sets(3, 0, []) == [None] * 3  # a CPU plan: the environment untouched
    with pytest.raises(PlanError, match="give --workers 2"):
        gpu_sets(3, 2, ["0", "1", "2", "3"])
    with pytest.raises(PlanError, match="resources.gpus: 16 GPUs a run"):
        gpu_sets(1, 16, ["0", "1"])


def test_local_workers_get_their_own_gpus_or_one_error_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """``--workers 4`` on a (pretend) 4-GPU machine: each worker process sees one GPU; more workers
    than the plan's resources allow is one error line and starts nothing."""
    import torch

    from mor.cli import main
    from mor.compare import runner

    started = []

    class Proc:
        def __init__(self, command, env):
            started.append(env.get("CUDA_VISIBLE_DEVICES"))

        def wait(self):
            return 0

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runner.subprocess, "Popen", Proc)
    plan_file = tiny_plan(tmp_path, tiny_model_dir)
    assert main(["compare", str(plan_file), "--workers", "4", "--no-report"]) == 0
    assert started == ["0", "1", "2", "3"]
    started.clear()
    assert main(["compare", str(plan_file), "--no-report"]) == 0  # one worker: on one GPU, not spread over four
    assert started == ["0"]
    started.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # a worker started so runs its jobs itself: no further worker
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("mor.cli.compare._run_here", lambda plan, args: started.append("here"))
    assert main(["compare", str(plan_file), "--no-report"]) == 0 and started == ["here"]
    started.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    plan_file.write_text(plan_file.read_text() + "resources: {gpus: 2}\n")
    assert main(["compare", str(plan_file), "--workers", "3", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert started == [] and len(err) == 1 and err[0].startswith("error: --workers 3 at 2 GPU(s) a run need 6 GPUs")


@pytest.mark.parametrize("change, message", [
    (dict(engine="spark"), "engine: give one of local, slurm, ray"),
    (dict(resources=dict(gpus="x")), "resources.gpus"),
    (dict(resources=dict(tpus=1)), "unknown key"),
    (dict(slurm=dict(partition=3)), "slurm.partition"),
])
def test_engine_keys_of_a_plan_are_checked(change, message):
    with pytest.raises(PlanError, match=message):
        plan_from_dict({**BASE_PLAN, **change})


# -- bad input to the engines --------------------------------------------------------------------------------

def test_an_engine_not_installed_is_one_error_line_naming_the_extra(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from mor.cli import main

    plan_file = tiny_plan(tmp_path, tiny_model_dir)
    for module, engine in (("ray", "ray"), ("submitit", "slurm")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        assert main(["compare", str(plan_file), "--engine", engine, "--no-report"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f'error: --engine {engine} needs {module}: pip install "mor-adapters[{engine}]"']
    assert not (tmp_path / "results").exists()


def test_a_job_that_cannot_see_the_work_folder_is_refused_before_training(tmp_path, tiny_model_dir):
    from mor.compare.engines import JobSpec, run_job, write_marker
    from mor.compare.plan import match_budget
    from mor.compare.runner import Job, job_key

    plan = plan_from_dict(yaml.safe_load(tiny_plan(tmp_path, tiny_model_dir).read_text()), tmp_path / "plan.yaml")
    match_budget(plan)
    write_marker(plan)
    job = Job("final", "lora", 0)
    spec = JobSpec(plan, job, 1e-3, job_key(plan, job, 1e-3), None, marker="another-drivers-token", threads=1, grace=5)
    with pytest.raises(PlanError, match="storage every node sees"):
        run_job(spec)
    assert not (tmp_path / "work" / "train").exists() and not (tmp_path / "work" / "locks").exists()


# -- the same plan through real engines ------------------------------------------------------------------------

# the machine and the clock; and transformers' train_loss, which after a resume divides the loss of
# the steps trained since the resume by all the steps (every step's loss, in "losses", is compared)
VARYING = {"machine", "threads", "started", "finished", "train_seconds", "eval_seconds", "final_loss"}


def engine_plan(folder: Path, model: Path) -> Path:
    """A tiny plan with a learning-rate selection (two trials, then the seeds at the chosen rate):
    4 jobs, 3 trainings of 300 steps (a few seconds each: long enough to be stopped in the middle)."""
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_plan(folder, model, seeds=[0, 1], baseline=False, select=dict(lrs=[1e-3, 3e-2], widen=0),
                     arms=dict(lora=dict(method="lora", r=4)),
                     train=dict(max_steps=300, batch_size=4, max_length=64, target="text"))


def records(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {k: v for k, v in json.loads(p.read_text()).items() if k not in VARYING}
            for p in sorted(folder.rglob("*.json")) if p.name != "report.json"}


def adapters(work: Path) -> dict:
    from safetensors.torch import load_file

    return {p.parent.parent.name: load_file(p) for p in sorted(work.glob("train/*/adapter/*.safetensors"))}


def assert_same_as_local(folder: Path, local: Path) -> None:
    import torch

    got, want = records(folder / "results"), records(local / "results")
    assert sorted(got) == sorted(want) and len(want) == 4
    for name in want:
        assert got[name] == want[name], name
    a, b = adapters(folder / "work"), adapters(local / "work")
    assert sorted(a) == sorted(b) and len(b) == 3
    for name in b:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in b[name]), name


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("local")
    compare(engine_plan(folder, tiny_model_dir), "--no-report", "--threads", "1")
    return folder


def run_until_checkpoint(command: list[str], folder: Path, env: dict, stop) -> subprocess.CompletedProcess:
    """Run ``command``; at the first complete checkpoint of any training call ``stop(folder)``; return
    once it ends."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(folder / "work", proc)
        stop(folder)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def kill_holders(folder: Path) -> None:
    """SIGKILL every process holding a job's claim (the one training towards the checkpoint among them)."""
    pids = {json.loads(lock.read_text())["pid"] for lock in (folder / "work" / "locks").glob("*.lock")
            if lock.name != "carve.lock"}
    assert pids, "no job holds a claim"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "it/s]" not in line)[-4000:]


@pytest.mark.slow
def test_ray_runs_the_plan_as_the_local_engine_does_and_a_killed_job_resumes(tmp_path, tiny_model_dir, local_run):
    """A real local Ray cluster (2 CPUs): the plan's jobs as Ray tasks; the worker process of one is
    killed mid-training, Ray retries it, and it resumes from its checkpoint; the records and the
    adapters equal the local engine's (CPU: bit for bit)."""
    pytest.importorskip("ray")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", MOR_CLAIM_GRACE="2", RAY_DEDUP_LOGS="0", TQDM_DISABLE="1")
    command = [sys.executable, "-m", "mor.cli", "compare", str(engine_plan(tmp_path, tiny_model_dir)), "--engine",
               "ray", "--threads", "1", "--no-report"]
    out = run_until_checkpoint(command, tmp_path, env, kill_holders)
    assert out.returncode == 0, _lines(out.stdout)
    assert "resuming" in out.stdout and "submit" in out.stdout, _lines(out.stdout)
    assert_same_as_local(tmp_path, local_run)


def test_an_unreachable_ray_cluster_is_one_error_line(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    plan_file = tiny_plan(tmp_path, tiny_model_dir)
    proc = compare(plan_file, "--engine", "ray", "--ray-address", "127.0.0.1:9", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: ray: nothing answers at 127.0.0.1:9 (Connection refused): "
                                                "start the cluster (ray start --head) or give its address"]
    assert not (tmp_path / "work" / "locks").exists() and not (tmp_path / "results").exists()  # nothing claimed


# -- SLURM: a real single-node cluster where this machine can start one ------------------------------------------

SLURM_CONF = """\
ClusterName=mortest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={port}
SlurmdPort={port2}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _start_slurm(folder: Path) -> tuple[dict | None, str]:
    """slurmctld + slurmd (+ munged) for this machine alone; (the environment that reaches it, or
    None and why not)."""
    import socket

    if os.geteuid() != 0:
        return None, "not root (slurmd must run as root)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        return None, f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge)"
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    folder.chmod(0o755)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munged = subprocess.run(["munged", "--force", f"--socket={folder}/munge.sock", f"--key-file={key}",
                             f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
                             f"--seed-file={folder}/munged.seed"], capture_output=True, text=True)
    if munged.returncode != 0:
        return None, f"munged: {munged.stderr.strip()}"
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("", 0))
        s2.bind(("", 0))
        ports = s1.getsockname()[1], s2.getsockname()[1]
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], port=ports[0], port2=ports[1],
                                      dir=folder, cpus=os.cpu_count()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    for daemon in ("slurmctld", "slurmd"):
        proc = subprocess.run([daemon, "-f", str(conf)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"{daemon}: {proc.stderr.strip()}"
    for _ in range(60):
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
        if state in ("idle", "mix", "alloc"):
            return env, "ran"
        time.sleep(0.5)
    return None, f"the node did not come up (sinfo: {state!r}; {folder}/slurmd.log)"


def _stop_slurm(folder: Path) -> None:
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = folder / f"{name}.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """(environment, how): a real single-node SLURM when this machine can start one; else the reason
    it could not, and the tests run submitit's LocalExecutor (the same jobs and code path)."""
    folder = tmp_path_factory.mktemp("slurm")
    env, why = _start_slurm(folder)
    print(f"\nSLURM: {'a real single-node cluster' if env else 'submitit LocalExecutor, because ' + why}")
    yield env, why
    if env is not None:
        subprocess.run(["scancel", "-u", "root"], env=env, capture_output=True)
        _stop_slurm(folder)


def _requeue_running(env: dict):
    def stop(folder: Path) -> None:
        jobs = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], env=env, capture_output=True,
                              text=True).stdout.split()
        assert jobs, "no running SLURM job"
        for job in jobs:  # every running array task, the one with a checkpoint among them
            subprocess.run(["scontrol", "requeue", job], env=env, check=True)
        time.sleep(1)
        for job in jobs:  # SLURM holds a requeued job for two minutes before it may start again
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    return stop


@pytest.mark.slow
def test_slurm_runs_the_plan_as_job_arrays_and_a_requeued_job_resumes(tmp_path, tiny_model_dir, local_run, slurm):
    pytest.importorskip("submitit")
    env, why = slurm
    command = [sys.executable, "-m", "mor.cli", "compare", str(engine_plan(tmp_path, tiny_model_dir)), "--engine",
               "slurm", "--threads", "1", "--no-report", "--slurm-time", "30"]
    base_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", MOR_CLAIM_GRACE="3", TQDM_DISABLE="1")
    if env is None:  # the same jobs through submitit's LocalExecutor (which cannot requeue)
        proc = subprocess.run(command + ["--slurm-local"], env=base_env, capture_output=True, text=True)
        out = subprocess.CompletedProcess(command, proc.returncode, proc.stdout + proc.stderr, "")
    else:
        out = run_until_checkpoint(command, tmp_path, dict(base_env, **env), _requeue_running(env))
    assert out.returncode == 0, _lines(out.stdout)
    if env is not None:  # the requeued tasks stopped at a checkpoint, and their reruns resumed
        logs = "".join(p.read_text() for p in (tmp_path / "work" / "submitit").glob("*/*_log.*"))
        assert "DUE TO JOB REQUEUE" in logs and "exit code 75" in logs and "resuming" in logs, _lines(logs)
    assert_same_as_local(tmp_path, local_run)


def test_slurm_refuses_resources_no_node_has_before_submitting(tmp_path, tiny_model_dir, slurm):
    pytest.importorskip("submitit")
    env, why = slurm
    if env is None:
        pytest.skip(f"no SLURM here: {why}")
    plan_file = tiny_plan(tmp_path, tiny_model_dir)
    plan_file.write_text(plan_file.read_text() + "resources: {gpus: 16}\n")
    proc = subprocess.run([sys.executable, "-m", "mor.cli", "compare", str(plan_file), "--engine", "slurm"],
                          env=dict(os.environ, **env), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: resources: no node of the cluster has 16 GPU(s)")
    assert not (tmp_path / "work" / "submitit").exists()
