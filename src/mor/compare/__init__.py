"""``mor compare PLAN``: an honest answer to "MoR or LoRA (or DoRA, MoE-LoRA) for my model and my
data?" -- every arm at its own learning rate chosen on a validation split carved from the training
data, several seeds, every test record scored, paired comparisons with intervals that count both
test sampling and seed spread, and a report to paste.

``plan`` (the plan file and a matched parameter budget), ``data`` (the seeded carve), ``runner``
(jobs, resumable workers), ``stats`` (the paired comparison), ``report`` (tables and figures),
``cost`` (interleaved step-time ratios).
"""

from .plan import Plan, PlanError, read_plan
from .report import write_report
from .runner import Worker, jobs

__all__ = ["Plan", "PlanError", "read_plan", "write_report", "Worker", "jobs"]
