"""One-off (run 2026-11-30): give the quality study's result files, written by the retired
benchmarks/quality.py, the settings key of `mor compare`, after checking that the plan describes
the settings each file was made with. Scores and everything else stay as they were; the old key
is kept as ``legacy_key``.

    python -m benchmarks.plans.migrate_quality
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mor.compare import read_plan
from mor.compare.plan import key_hash
from mor.compare.runner import Job, job_key, result_path

PLANS = Path(__file__).resolve().parent


def legacy_settings_agree(plan, arm, old: dict) -> list[str]:
    """Differences between a legacy key and the plan's arm (empty when they agree)."""
    s, problems = old["settings"], []
    d = plan.data
    want = dict(tasks=d.train, heldout=d.heldout, train_per_task=d.train_per_task, test_per_task=d.test_per_task,
                heldout_size=d.heldout_per_task, split_seed=d.split_seed, steps=plan.steps(),
                batch_size=plan.train["batch_size"], max_length=plan.train["max_length"],
                warmup_ratio=plan.train["warmup_ratio"], base_dtype=plan.train["base_dtype"],
                group_by_length=plan.train["group_by_length"], routing_prompts=plan.routing_prompts, model=plan.model)
    problems += [f"{k}: {s[k]} != {v}" for k, v in want.items() if s[k] != v]
    if arm is None:
        return problems
    extras = dict(old["extras"])
    lr = extras.pop("lr", s["lr"])
    if lr != arm.lr:
        problems.append(f"lr {lr} != {arm.lr}")
    if old["adapter"] != {k: v for k, v in arm.adapter.items() if k != "label"}:
        problems.append(f"adapter {old['adapter']} != {arm.adapter}")
    if extras != arm.train:
        problems.append(f"run settings {extras} != {arm.train}")
    return problems


def migrate(plan_file: str, stem_to_arm) -> None:
    plan = read_plan(PLANS / plan_file)
    folder = plan.results_dir()
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "legacy_key" in record or path.stem.startswith("report"):
            continue
        arm_name, seed = stem_to_arm(path.stem)
        arm = plan.arms.get(arm_name)
        job = Job("base", None, None) if arm_name == "base" else Job("final", arm_name, seed)
        problems = legacy_settings_agree(plan, arm, record["key"])
        if problems:
            raise SystemExit(f"{path}: the plan does not describe this run: {problems}")
        key = job_key(plan, job, arm.lr if arm else None)
        record.update(legacy_key=record["key"], key=key, key_hash=key_hash(key), kind=job.kind,
                      lr=arm.lr if arm else None)
        target = result_path(plan, job)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        if target != path:
            subprocess.run(["git", "mv", str(path), str(target)], check=True)
        print(f"{path.name} -> {target.name}")


def main() -> None:
    migrate("commonsense4.yaml", lambda stem: ("base", None) if stem == "base" else
            (stem.rsplit("_seed", 1)[0], int(stem.rsplit("_seed", 1)[1])))
    migrate("commonsense4_ablations.yaml", lambda stem: (stem.removeprefix("ablation_"), 0))


if __name__ == "__main__":
    main()
