"""The fields of a MoR adapter — name, default and meaning of each — as a plain dataclass that needs
nothing but the standard library. ``mor.config.MoRConfig`` is these fields on top of peft's
``PeftConfig``; the ``mor train`` flags are generated from them, so ``mor train --help`` lists them
without importing torch or peft. Adding an adapter option is adding a field here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union
from .errors import SettingsError

METHODS = ("mor", "moelora")  # the peft methods of this package
ALL_METHODS = (*METHODS, "lora", "dora")  # every adapter a training run can put on (LoRA/DoRA: peft's own)
ROUTERS = ("softmax", "mean", "balanced", "topk")
INITS = ("ones_noise", "ones")
#: Prompts per task a routing is measured on by default (a routing profile for merge / export-lora, the
#: figures of mor analyze): the one default of the commands. mor compare's plans keep 64 (compare/plan.py):
#: their finished results are keyed on it.
ROUTING_PROMPTS = 200

#: Presets for ``target_modules`` (LLaMA-family names; other models: give the names).
TARGET_PRESETS: dict[str, list[str]] = {
    "ffn": ["gate_proj", "up_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention+ffn": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class MoROptions:
    """Every setting of a MoR (``method="mor"``) or MoE-LoRA (``method="moelora"``) adapter. Per adapted
    layer W: d_in -> d_out MoR learns A (r x d_in), B (d_out x r), expert scales Omega_A (N x r),
    Omega_B (N x d_out) and a router W_g (N x d_in); see ``mor.layer`` for the equation."""

    method: str = field(default="mor", metadata={"help": "mor: shared A, B + per-expert scaling vectors; "
                                                         "moelora: N independent LoRA pairs (the baseline)"})
    r: int = field(default=8, metadata={"help": "rank of the shared pair (mor) or of each expert (moelora)"})
    num_experts: int = field(default=8, metadata={"help": "number of experts N"})
    alpha: Optional[float] = field(default=None, metadata={
        "help": "the update is scaled by alpha / r; default 2*r (a scale of 2 at every rank)"})
    use_rslora: bool = field(default=False, metadata={
        "help": "rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r (as peft's LoRA use_rslora)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input (0 disables it)"})
    target_modules: Optional[Union[list[str], str]] = field(default="ffn", metadata={
        "help": "modules to adapt: comma-separated names, a preset (ffn, attention, attention+ffn), "
                "all-linear (every linear layer but the output head), or a regex over full module names"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "modules not to adapt (names or a regex), as in peft"})
    router: str = field(default="softmax", metadata={
        "help": "softmax (learned, the paper's), mean (uniform 1/N, no parameters), balanced (softmax + "
                "load-balancing loss), topk (softmax kept on the top_k experts)"})
    top_k: int = field(default=2, metadata={"help": "experts kept per token with router=topk"})
    balance_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss (router=balanced)"})
    init: str = field(default="ones_noise", metadata={
        "help": "expert scales at init: ones_noise (1 + N(0, init_scale_std^2): experts differ from the start) "
                "or ones (identical experts; B = 0 either way, so the model starts as the base model)"})
    init_scale_std: float = field(default=0.1, metadata={"help": "std of the noise of init=ones_noise"})
    init_seed: Optional[int] = field(default=None, metadata={"help": "seed of the adapter's initialisation"})
    base_model_fingerprint: Optional[dict] = field(default=None, metadata={
        "help": "shapes and a hash of a few base weights, recorded at save and checked at load"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "modules trained in full beside the adapter and saved with it (e.g. lm_head, embed_tokens), "
                "as in peft's LoRA"})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None, metadata={
        "help": "token ids whose embedding rows are trained and saved (new tokens of a chat template), "
                "as in peft's LoRA; a dict maps embedding layer names to ids", "flag": None})

    def __post_init__(self) -> None:
        self.resolve()

    def resolve(self) -> None:
        """Expand a target preset, default alpha to 2*r, and validate every field."""
        if isinstance(self.target_modules, str) and self.target_modules in TARGET_PRESETS:
            self.target_modules = list(TARGET_PRESETS[self.target_modules])
        elif isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        if self.alpha is None and _is_int(self.r):
            self.alpha = 2.0 * self.r
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed."""

        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise SettingsError(f"MoRConfig.{name}={getattr(self, name)!r} is invalid: {allowed}.")

        check(self.method in METHODS, "method", f"choose one of {METHODS}")
        check(_is_int(self.r) and self.r >= 1, "r", "the rank must be an integer >= 1")
        check(_is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "need an integer >= 1 experts")
        check(self.router in ROUTERS, "router", f"choose one of {ROUTERS}")
        check(_is_int(self.top_k) and self.top_k >= 1, "top_k", "must be an integer >= 1")
        if self.router == "topk":
            check(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts={self.num_experts}")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(isinstance(self.use_rslora, bool), "use_rslora", "must be true or false")
        check(self.modules_to_save is None or (isinstance(self.modules_to_save, (list, tuple))
                                               and all(isinstance(m, str) and m for m in self.modules_to_save)),
              "modules_to_save", "give a list of module names, e.g. ['lm_head']")
        check(self.balance_coef >= 0, "balance_coef", "must be >= 0")
        check(self.init in INITS, "init", f"choose one of {INITS}")
        check(self.init_scale_std >= 0, "init_scale_std", "must be >= 0")
        targets = self.target_modules
        check((isinstance(targets, str) and targets != "")
              or (isinstance(targets, list) and len(targets) > 0 and all(isinstance(t, str) and t for t in targets)),
              "target_modules",
              "give a non-empty list of module names, a preset (ffn, attention, attention+ffn), 'all-linear' or a regex")
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                check(False, "target_modules", f"not a valid regular expression ({err}); give comma-separated module "
                                               "names or a valid regex")

    @property
    def scaling(self) -> float:
        """The factor applied to every expert's update (see :func:`update_scale`)."""
        return update_scale(self.alpha, self.r, self.use_rslora)


def update_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The one place the update's scale is computed: alpha / r, or alpha / sqrt(r) with
    ``use_rslora`` (rank-stabilised LoRA, Kalajdzievski 2023). Every adapter, merge and export reads it."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
