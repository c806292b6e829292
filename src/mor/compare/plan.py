"""A comparison plan: which model, which data, which arms, how many steps and seeds, which learning
rates to choose from. Read from YAML or JSON; every path in it is relative to the plan file.

    name: mix9
    model: null                      # hub id, folder or .gguf (null: the embedded SmolLM2-135M-Instruct)
    data:
      root: ../../../shared/data     # task paths below are relative to it
      train: [commonsense/boolq, builtin:parity]   # anything --data takes; builtin:<task> for the built-in suite
      heldout: [commonsense/piqa]    # scored, never trained on (forgetting)
      train_per_task: 500
      validation_per_task: 100       # carved from the training data: the learning rate is chosen on it
      test_per_task: 300
      heldout_per_task: 300
    train: {max_steps: 300, batch_size: 8, max_length: 128, target: text}   # any TrainConfig setting
    seeds: [0, 1, 2]
    select: {lrs: [3e-4, 1e-3, 3e-3], seeds: [0]}   # each arm's rate, chosen on validation
    arms:
      lora: {method: lora, r: 16}
      mor: {method: mor, num_experts: 8, router: balanced, router_lr_multiplier: 100}   # r: matched to the budget
    budget: {method: lora, r: 16}    # arms without r get the r whose trainable parameters are nearest
    compare: [[mor, lora]]           # a vs b (default: every arm vs the first)

An arm takes adapter settings (``AdapterSpec`` fields), run settings (``TrainConfig`` fields) and
``label``, ``lr`` (a fixed rate: no selection), ``lrs`` (its own grid) and ``seeds`` (its own seeds).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import PlanError
from ..train.adapters import AdapterSpec
from ..train.config import TrainConfig, read_mapping_file

BUILTIN_PREFIX = "builtin:"
# run settings the engine sets itself, per run: a plan may not set them
ENGINE_SETTINGS = {"model", "adapter", "data", "eval_data", "output", "seed", "lr", "resume", "overwrite",
                   "evaluate", "evaluate_before", "figures", "holdout", "eval_limit"}
ADAPTER_FIELDS = {f.name for f in fields(AdapterSpec)}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - ENGINE_SETTINGS
ARM_KEYS = {"label", "lr", "lrs", "seeds"}




@dataclass
class DataPlan:
    train: list[str] = field(default_factory=list)  # required: validate() says so
    heldout: list[str] = field(default_factory=list)
    root: Optional[str] = None
    train_per_task: int = 1000
    validation_per_task: int = 100
    test_per_task: int = 300
    heldout_per_task: int = 300
    split_seed: int = 1234
    columns: dict = field(default_factory=dict)  # record field -> column of the data (as --columns)

    def validate(self, where: str) -> None:
        _need(isinstance(self.train, list) and self.train and all(isinstance(t, str) for t in self.train),
              f"{where}.train", "give a list of tasks (paths, hub ids or builtin:<task>)")
        for key in ("train_per_task", "test_per_task", "heldout_per_task"):
            _count(getattr(self, key), f"{where}.{key}", 1)
        _count(self.validation_per_task, f"{where}.validation_per_task", 0)
        names = [Path(t.removeprefix(BUILTIN_PREFIX)).name for t in self.train + self.heldout]
        _need(len(set(names)) == len(names), where, f"two tasks share a name in {names}")

    def key(self) -> dict:
        """What the carved splits depend on (paths as written: the key does not change between machines)."""
        return {k: v for k, v in asdict(self).items() if k != "root" and not (k == "columns" and not v)}

    def source(self, entry: str, plan_dir: Path) -> str:
        """The path (or builtin:/hub name) an entry of ``train`` / ``heldout`` reads."""
        if entry.startswith((BUILTIN_PREFIX, "hub:")):
            return entry
        root = plan_dir / self.root if self.root else plan_dir
        local = Path(entry) if Path(entry).is_absolute() else root / entry
        return str(local.resolve()) if local.exists() else entry  # else a hub dataset id


@dataclass
class Select:
    """How each arm's learning rate is chosen: every rate of ``lrs`` trained ``max_steps`` steps with
    each of ``seeds``, scored on the validation split; the best average wins. While the best is at
    an edge of the grid, the next rate beyond it is tried too, at most ``widen`` more an arm: a
    rate at the edge is not known to be the best."""

    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    max_steps: Optional[int] = None  # default: the plan's
    seeds: Optional[list[int]] = None  # default: the plan's first seed
    widen: int = 2  # rates an arm's grid may gain beyond its edges (0: the grid as written)

    def validate(self, where: str) -> None:
        self.lrs = _rates(self.lrs, f"{where}.lrs")
        if self.seeds is not None:
            self.seeds = _positive_ints(self.seeds, f"{where}.seeds")
        _need(isinstance(self.widen, int) and not isinstance(self.widen, bool) and self.widen >= 0,
              f"{where}.widen", "give how many rates a grid may gain beyond its edges (0 or more)")


@dataclass
class Arm:
    name: str
    adapter: dict
    train: dict = field(default_factory=dict)
    label: str = ""
    lr: Optional[float] = None
    lrs: Optional[list[float]] = None
    seeds: Optional[list[int]] = None

    def spec(self) -> AdapterSpec:
        return AdapterSpec(**self.adapter)

    def key(self) -> dict:
        return dict(adapter=self.spec().key(), train=dict(sorted(self.train.items())))


@dataclass
class Plan:
    name: str
    data: DataPlan
    arms: dict[str, Arm]
    model: Optional[str] = None
    train: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    select: Select = field(default_factory=Select)
    compare: list[tuple[str, str]] = field(default_factory=list)
    baseline: bool = False  # also score the base model (no adapter)
    budget: Optional[dict] = None
    processes: int = 1  # processes per training (accelerate), where the machine has them
    # prompts per task for the routing statistics of the final runs: 64, not the commands' ROUTING_PROMPTS, because
    # every finished result is keyed on it (runner.job_key): another default would orphan the results on disk
    routing_prompts: int = 64
    eval_batch_size: int = 16
    results: Optional[str] = None
    work: Optional[str] = None
    engine: str = "local"  # where the trainings run: local | slurm | ray (--engine overrides)
    resources: dict = field(default_factory=dict)  # one run's gpus / cpus / mem_gb (engines.Resources)
    slurm: dict = field(default_factory=dict)  # partition / timeout_min / array_parallelism of --engine slurm
    path: Optional[Path] = None  # the plan file

    def validate(self, where: str = "plan") -> None:
        """Every value checked, each error naming its key (as ``TrainConfig.validate`` names the flag)."""
        self.data.validate(f"{where}: data")
        for k in self.train:
            _need(k in TRAIN_FIELDS, f"{where}: train.{k}",
                  f"not a run setting a plan may set ({'set per run by compare' if k in ENGINE_SETTINGS else 'unknown'}); "
                  f"known: {sorted(TRAIN_FIELDS)}")
        _need(isinstance(self.train.get("max_steps"), int) and self.train["max_steps"] >= 1,
              f"{where}: train.max_steps", "give the optimizer steps of every run (at least 1)")
        self.select.validate(f"{where}: select")
        self.seeds = _positive_ints(self.seeds, f"{where}: seeds")
        _need(self.engine in ENGINE_NAMES, f"{where}: engine", f"give one of {', '.join(ENGINE_NAMES)}")
        for a, b in self.comparisons():
            for side in (a, b):
                _need(side in self.arms or (side == "base" and self.baseline), f"{where}: compare [{a}, {b}]",
                      f"no arm {side!r} (arms: {sorted(self.arms)}{', base' if self.baseline else ''})")
        for key in ("processes", "routing_prompts", "eval_batch_size"):
            _count(getattr(self, key), f"{where}: {key}", 1)
        _need(isinstance(self.baseline, bool), f"{where}: baseline", "give true or false")

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.folder / p).resolve()

    def results_dir(self) -> Path:
        return self.resolve(self.results or f"results/compare/{self.name}")

    def work_dir(self) -> Path:
        return self.resolve(self.work or f"runs/compare/{self.name}")

    @property
    def scoring(self) -> str:
        """How records are scored: option texts when the runs train on them (target: text), else labels."""
        return "text" if self.train.get("target", "output") == "text" else "label"

    def arm_seeds(self, arm: Arm) -> list[int]:
        return list(arm.seeds) if arm.seeds is not None else list(self.seeds)

    def arm_grid(self, arm: Arm) -> list[float]:
        """The rates an arm chooses from ([its fixed lr] when it has one: no selection)."""
        if arm.lr is not None:
            return [arm.lr]
        return list(arm.lrs) if arm.lrs is not None else list(self.select.lrs)

    def select_seeds(self) -> list[int]:
        return list(self.select.seeds) if self.select.seeds is not None else self.seeds[:1]

    def steps(self) -> int:
        return int(self.train.get("max_steps") or 0)

    def select_steps(self) -> int:
        return int(self.select.max_steps or self.steps())

    def training_key(self, arm: Arm, lr: float, seed: int, steps: int) -> dict:
        """Everything one training depends on."""
        return dict(model=self.model, data=self.data.key(), train=dict(sorted(self.train.items())), arm=arm.key(),
                    lr=lr, seed=seed, steps=steps)

    def comparisons(self) -> list[tuple[str, str]]:
        if self.compare:
            return [tuple(c) for c in self.compare]
        names = list(self.arms)
        return [(n, names[0]) for n in names[1:]] + ([(names[0], "base")] if self.baseline else [])


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def lr_name(lr: float) -> str:
    return f"{lr:g}"


def rate_beyond(grid: list[float], edge: float) -> float | None:
    """The next rate past ``edge`` (the grid's lowest or highest): the grid's own step at that edge,
    on the 1-3-10 ladder when the grid is on it (3e-3, 1e-2 -> 3e-2), else to two significant
    digits; None past the plan's (0, 1) range or when the grid has one rate."""
    rates = sorted(set(grid))
    if len(rates) < 2 or edge not in (rates[0], rates[-1]):
        return None
    step = rates[-1] / rates[-2] if edge == rates[-1] else rates[0] / rates[1]
    want = edge * step

    def mantissa(x: float) -> float:
        return x / 10 ** math.floor(math.log10(x))

    if all(min(abs(mantissa(r) - m) for m in (1, 3, 10)) < 1e-6 for r in rates):  # the 1-3-10 ladder
        decade = 10.0 ** math.floor(math.log10(want))
        nearest = min((decade, 3 * decade, 10 * decade), key=lambda c: abs(math.log(c / want)))
        want = float(f"{nearest:.0e}")
    else:
        want = float(f"{want:.1e}")
    return want if 0 < want < 1 and want not in rates else None


# -- reading ---------------------------------------------------------------------------------------

def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise PlanError(f"{where}: {what}")


def _only(values: dict, known: set, where: str) -> None:
    unknown = sorted(set(values) - known)
    _need(not unknown, where, f"unknown key(s) {unknown}; known: {sorted(known)}")


def _positive_ints(value, where: str) -> list[int]:
    _need(isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
          where, "give a non-empty list of integers")
    return list(value)


def _rates(value, where: str) -> list[float]:
    _need(isinstance(value, list) and value, where, "give a non-empty list of learning rates")
    try:
        rates = [float(v) for v in value]
    except (TypeError, ValueError):
        raise PlanError(f"{where}: {value!r} are not numbers; write e.g. [3e-4, 1e-3]") from None
    _need(all(0 < r < 1 for r in rates), where, "every learning rate must be in (0, 1)")
    return rates


ENGINE_NAMES = ("local", "slurm", "ray")
RESOURCE_KEYS = {"gpus": int, "cpus": int, "mem_gb": (int, float)}  # one run's
SLURM_KEYS = {"partition": str, "timeout_min": int, "array_parallelism": int}


def _engine_mapping(raw: dict, name: str, known: dict, where: str) -> dict:
    value = raw.get(name) or {}
    _need(isinstance(value, dict), f"{where}: {name}", f"give a mapping ({', '.join(known)})")
    _only(value, set(known), f"{where}: {name}")
    for k, v in value.items():
        ok = isinstance(v, known[k]) and not isinstance(v, bool) and (known[k] is str or v >= (0 if k == "gpus" else 1))
        _need(ok, f"{where}: {name}.{k}", f"give {'a name' if known[k] is str else 'a positive number'}, not {v!r}")
    return dict(value)


def read_plan(path: str | Path) -> Plan:
    """The plan in ``path`` (YAML or JSON), checked: every error names the key."""
    path = Path(path)
    raw = read_mapping_file(path, f"plan {path}")
    _need(bool(raw), f"plan {path}", "give a mapping (name:, data:, arms:, ...)")
    return plan_from_dict(raw, path)


def plan_from_dict(raw: dict, path: Path | None = None) -> Plan:
    """A plan from ``{key: value}`` as a plan file holds it, the way ``TrainConfig.from_dict`` reads
    a run: an unknown key is an error naming it, every default comes from the dataclasses above,
    and :meth:`Plan.validate` checks the values (errors name the key)."""
    where = f"plan {path}" if path else "plan"
    _only(raw, PLAN_KEYS, where)
    _need("data" in raw and "arms" in raw, where, "needs data: and arms:")
    values = dict(raw)
    values["name"] = str(raw.get("name") or (path.stem if path else "compare"))
    values["data"] = _sub_plan(DataPlan, raw["data"], f"{where}: data", "give a mapping (train:, heldout:, sizes)")
    values["select"] = _sub_plan(Select, raw.get("select") or {}, f"{where}: select",
                                 "give a mapping (lrs:, max_steps:, seeds:, widen:)")
    values["arms"] = _arms(raw["arms"], where)
    values["train"] = dict(raw.get("train") or {})
    values["compare"] = [tuple(c) for c in raw.get("compare") or []]
    for key, known in (("resources", RESOURCE_KEYS), ("slurm", SLURM_KEYS)):
        values[key] = _engine_mapping(raw, key, known, where)
    plan = Plan(**values, path=path.resolve() if path else None)
    plan.validate(where)
    return plan


PLAN_KEYS = {f.name for f in fields(Plan)} - {"path"}


def _sub_plan(cls, value, where: str, what: str):
    """``cls(**value)`` for a mapping of a plan (data:, select:), its unknown keys named."""
    _need(isinstance(value, dict), where, what)
    _only(value, {f.name for f in fields(cls)}, where)
    return cls(**value)


def _arms(arms_raw, where: str) -> dict[str, Arm]:
    if isinstance(arms_raw, list):  # shorthand: [lora, mor] -> default settings, matched budget
        arms_raw = {a: {"method": a} for a in arms_raw}
    _need(isinstance(arms_raw, dict) and arms_raw, f"{where}: arms", "give a mapping of arm name -> settings")
    _need("base" not in arms_raw, f"{where}: arms.base", "'base' is the untrained model (baseline: true)")
    arms = {}
    for arm_name, settings in arms_raw.items():
        w = f"{where}: arms.{arm_name}"
        settings = dict(settings or {})
        _only(settings, ADAPTER_FIELDS | TRAIN_FIELDS | ARM_KEYS, w)
        adapter = {k: v for k, v in settings.items() if k in ADAPTER_FIELDS}
        try:
            AdapterSpec(**adapter)
        except (TypeError, ValueError) as err:
            raise PlanError(f"{w}: {err}") from None
        arm = Arm(str(arm_name), adapter, {k: v for k, v in settings.items() if k in TRAIN_FIELDS - ADAPTER_FIELDS},
                  label=str(settings.get("label", "")),
                  lr=_rates([settings["lr"]], f"{w}.lr")[0] if "lr" in settings else None,
                  lrs=_rates(settings["lrs"], f"{w}.lrs") if "lrs" in settings else None,
                  seeds=_positive_ints(settings["seeds"], f"{w}.seeds") if "seeds" in settings else None)
        _need(arm.lr is None or arm.lrs is None, w, "give lr (fixed) or lrs (its grid), not both")
        arms[str(arm_name)] = arm
    return arms


def _default(cls, name: str):
    """The default of field ``name`` of the dataclass ``cls``."""
    item = cls.__dataclass_fields__[name]
    return item.default_factory() if callable(item.default_factory) else item.default


def _count(value, where: str, least: int) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= least, where,
          f"give {'at least 1' if least else '0 or more'}")


# -- the common case without a plan file ---------------------------------------------------------------

DEFAULT_STEPS = 300


def plan_from_flags(data: list[str], heldout: list[str] | None = None, arms: list[str] | None = None,
                    model: str | None = None, steps: int | None = None, seeds: list[int] | None = None,
                    lrs: list[float] | None = None, target: str | None = None, name: str | None = None) -> dict:
    """The plan that ``mor compare --data ... [--arms lora mor ...]`` describes, as a plan file holds
    it (local paths made absolute, results and checkpoints under ``results/compare/NAME`` and
    ``runs/compare/NAME`` of the current folder; NAME defaults to "compare"); checked like a plan file."""
    from ..data.sources import DataSource

    def local(entry: str) -> str:
        if entry.startswith(BUILTIN_PREFIX):
            return entry
        DataSource(entry)  # a file, a folder or a hub dataset, as `mor train --data` reads it: checked before writing
        return str(Path(entry).resolve()) if Path(entry).exists() else entry

    name = name or "compare"
    _need(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)), f"--name {name}",
          "give a folder name: letters, digits, '_', '.', '-'")
    raw = dict(name=name, model=str(Path(model).resolve()) if model and Path(model).exists() else model,
               data=dict(train=[local(t) for t in data], heldout=[local(t) for t in heldout or []]),
               train=dict(max_steps=steps or DEFAULT_STEPS, **({"target": target} if target else {})),
               seeds=list(seeds or _default(Plan, "seeds")), select=dict(lrs=list(lrs or Select().lrs)),
               arms=list(arms or ["lora", "mor"]),
               results=str(Path("results/compare", name).resolve()), work=str(Path("runs/compare", name).resolve()))
    plan_from_dict(raw)
    return raw


def write_plan_file(raw: dict, path: Path) -> Path:
    """``raw`` as a YAML plan at ``path``; the same plan already there is reused (the runs resume),
    another one is an error (nothing is overwritten)."""
    import yaml

    from ..safety import atomic_write_text

    if path.exists():
        if read_mapping_file(path, f"plan {path}") != raw:
            raise PlanError(f"plan {path}: holds another plan for the name {raw['name']!r}; give --name OTHER for a "
                            f"new comparison, or run `mor compare {path}` to continue that one")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "# written by `mor compare` from its flags; `mor compare THIS_FILE` resumes it\n"
                             + yaml.safe_dump(raw, sort_keys=False))


# -- a matched trainable-parameter budget ------------------------------------------------------------

def match_budget(plan: Plan, model=None) -> dict[str, int] | None:
    """Give every arm without an ``r`` the rank whose trainable-parameter count on ``model`` is
    nearest the budget (default: LoRA r=16 on the arms' targets), and a label to every arm; returns
    each arm's count (None when no ``model`` was given and none was needed)."""
    if model is None and any("r" not in arm.adapter for arm in plan.arms.values()):
        from ..runtime.loading import load_model

        model = load_model(plan.model)
    counts = {} if model is not None else None
    if model is not None:
        target = AdapterSpec(**dict(plan.budget or {"method": "lora", "r": 16})).parameter_count(model)
    for arm in plan.arms.values():
        if "r" not in arm.adapter:
            arm.adapter["r"] = min(range(1, 257), key=lambda r: abs(
                AdapterSpec(**{**arm.adapter, "r": r}).parameter_count(model) - target))
        if counts is not None:
            counts[arm.name] = arm.spec().parameter_count(model)
        if not arm.label:
            spec = arm.spec()
            arm.label = f"{spec.method} r={spec.r}" + (f" N={spec.num_experts}" if spec.method in ("mor", "moelora")
                                                        else "")
    return counts
