"""Paired comparisons of two arms scored on the same test records, several seeds each.

A run's score on a task is the mean of its records' 0/1 scores; an arm's score is the average
over tasks (every task weighs the same, whatever its size). For arms a and b trained with the
same seeds, the difference and its uncertainty are:

    d_tj   = mean_s a_stj - mean_s b_stj                 record j of task t, seed-averaged
    diff   = mean_t mean_j d_tj
    se_rec = sqrt(sum_t var_j(d_tj) / n_t) / T           test sampling: which records were drawn
    se     = sqrt(se_rec^2 + sd_seeds^2 / S)             + seed-to-seed spread of the per-seed diff

(a clustered standard error: records are the clusters, seeds the repeated measures). The verdict
is "tie" when |diff| <= 2 se (about a 95 % interval), else better / worse. Two cross-checks sit
beside it: a paired bootstrap that resamples seeds and records together (percentile interval),
and McNemar-style discordance (records one arm gets right and the other wrong, seed by seed).
The power line is the difference this plan detects 80 % of the time at that error: 2.8 se.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from ..errors import PlanError

Z_95 = 1.96
Z_POWER_80 = 0.8416
TIE_WIDTH = 2.0  # the verdict's interval: diff +- 2 se


def bits(record: Mapping, task: str, metric: str = "acc_norm") -> list[int]:
    """One run's 0/1 score of every test record of ``task``, in the test split's order."""
    return [int(c) for c in record["records"][task][metric]]


def task_accuracy(record: Mapping, task: str, metric: str = "acc_norm") -> float:
    scores = bits(record, task, metric)
    return sum(scores) / len(scores)


def average_accuracy(record: Mapping, tasks: Sequence[str], metric: str = "acc_norm") -> float:
    """The task-average score of one run (each task weighs the same)."""
    return sum(task_accuracy(record, t, metric) for t in tasks) / len(tasks)


def run_stderr(record: Mapping, tasks: Sequence[str], metric: str = "acc_norm") -> float:
    """Test-sampling standard error of one run's task average: sqrt(sum_t p_t (1 - p_t) / n_t) / T."""
    var = sum(task_accuracy(record, t, metric) * (1 - task_accuracy(record, t, metric)) / len(bits(record, t, metric))
              for t in tasks)
    return math.sqrt(var) / len(tasks)


def _paired_seeds(a: Sequence[Mapping], b: Sequence[Mapping]) -> tuple[list[Mapping], list[Mapping], list]:
    """When both arms were trained, keep the seeds both have, in the same order (seed with seed);
    an untrained arm (seed None, e.g. the base model) pairs with every seed of the other."""
    common = sorted({r["seed"] for r in a} & {r["seed"] for r in b} - {None})
    if not common:
        return list(a), list(b), []
    by_a, by_b = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    return [by_a[s] for s in common], [by_b[s] for s in common], common


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the two kinds of discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: Sequence[Mapping], b: Sequence[Mapping], tasks: Sequence[str], metric: str = "acc_norm",
           bootstrap: int = 2000, seed: int = 0) -> dict:
    """a minus b on the task average, paired record by record (and seed by seed): see the module
    docstring for the formula. ``bootstrap`` resamples (0: none)."""
    a, b, common = _paired_seeds(a, b)
    T = len(tasks)
    per_task = []  # per task: the seed-averaged record differences d_tj
    diff, var_sum, n_total, b_count, c_count, discordant = 0.0, 0.0, 0, 0, 0, 0
    for t in tasks:
        sa, sb = [bits(r, t, metric) for r in a], [bits(r, t, metric) for r in b]
        n = len(sa[0])
        if any(len(x) != n for x in sa + sb):
            raise PlanError(f"task {t}: the runs scored different numbers of records; they were not made on the "
                            "same test split")
        d = [sum(x[j] for x in sa) / len(sa) - sum(x[j] for x in sb) / len(sb) for j in range(n)]
        per_task.append(d)
        diff += sum(d) / n / T
        var_sum += statistics.pvariance(d) / n if n > 1 else 0.0
        discordant += sum(1 for x in d if x != 0)
        n_total += n
        pairs = list(zip(sa, sb)) if common else [(x, y) for x in sa for y in sb]
        for x, y in pairs:
            b_count += sum(1 for j in range(n) if x[j] > y[j])
            c_count += sum(1 for j in range(n) if x[j] < y[j])
    se_records = math.sqrt(var_sum) / T
    per_seed = [average_accuracy(ra, tasks, metric) - average_accuracy(rb, tasks, metric)
                for ra, rb in zip(a, b)] if len(common) >= 2 else []
    sd_seeds = statistics.stdev(per_seed) if len(per_seed) >= 2 else None
    se = math.sqrt(se_records ** 2 + (sd_seeds ** 2 / len(per_seed) if sd_seeds is not None else 0.0))
    verdict = "tie" if abs(diff) <= TIE_WIDTH * se else ("better" if diff > 0 else "worse")
    out = dict(diff=diff, se_records=se_records, sd_seeds=sd_seeds, per_seed=per_seed, se=se, two_se=TIE_WIDTH * se,
               discordant=discordant / max(n_total, 1), n=n_total, seeds_a=len(a), seeds_b=len(b),
               a_only=b_count, b_only=c_count, mcnemar_p=mcnemar_p(b_count, c_count),
               detectable=(Z_95 + Z_POWER_80) * se, verdict=verdict)
    if bootstrap:
        out["bootstrap_95"] = _bootstrap(a, b, tasks, metric, common, bootstrap, seed)
    return out


def _bootstrap(a, b, tasks, metric, common, rounds: int, seed: int) -> list[float]:
    """Percentile 95 % interval of the difference when seeds (paired) and each task's records are
    drawn again with replacement, ``rounds`` times."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if common:
        picks_a = picks_b = rng.integers(0, len(common), size=(rounds, len(common)))
    else:
        picks_a = rng.integers(0, len(a), size=(rounds, len(a)))
        picks_b = rng.integers(0, len(b), size=(rounds, len(b)))
    total = np.zeros(rounds)
    for t in tasks:
        sa = np.array([bits(r, t, metric) for r in a], dtype=np.float32)  # (seeds, records)
        sb = np.array([bits(r, t, metric) for r in b], dtype=np.float32)
        rows = rng.integers(0, sa.shape[1], size=(rounds, sa.shape[1]))
        da = sa[picks_a].mean(axis=1)  # (rounds, records): the drawn seeds' average per record
        db = sb[picks_b].mean(axis=1)
        total += np.take_along_axis(da - db, rows, axis=1).mean(axis=1)
    stats = np.sort(total / len(tasks))
    return [float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))]


def records_needed(record_variance: float, seed_sd: float | None, tasks: int, seeds: int,
                   difference: float = 0.02) -> int | None:
    """Test records per task for which ``difference`` is detected with 80 % power at 5 % (two-sided),
    given the per-record variance of the paired difference (averaged over tasks) and the
    seed-to-seed standard deviation of the per-seed difference; None when seeds alone make it
    impossible (their spread is already too large)."""
    target_var = (difference / (Z_95 + Z_POWER_80)) ** 2
    seed_var = (seed_sd ** 2 / seeds) if seed_sd else 0.0
    left = target_var - seed_var
    if left <= 0:
        return None
    # se_rec^2 = sum_t v / n / T^2 = v / (n T)
    return math.ceil(record_variance / (left * tasks))


def seeds_needed(record_variance: float, seed_sd: float | None, tasks: int, records: int,
                 difference: float = 0.02) -> int | None:
    """Seeds for which ``difference`` is detected with 80 % power at 5 % (two-sided) with ``records``
    test records per task; None when the records alone make it impossible (too few of them)."""
    left = (difference / (Z_95 + Z_POWER_80)) ** 2 - record_variance / (records * tasks)
    if left <= 0:
        return None
    return max(1, math.ceil((seed_sd or 0.0) ** 2 / left))
