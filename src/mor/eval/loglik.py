"""Log-likelihood scoring of multiple-choice items, matching lm-evaluation-harness's ``HFLM``.

Choice ``i`` of a :class:`~mor.data.MultipleChoiceItem` scores ``log P(continuations[i] | contexts[i])``
in float32 over the continuation's tokens (tokenised by :mod:`mor.eval.encoding`, left-truncated
to ``max_length`` as HFLM does). Each distinct context runs once and its KV cache serves all its
candidates when that saves enough tokens (``reuse_prefix``); the scores are the same either way.
:func:`score_items` gives an :class:`ItemScore` per item (docs/evaluation.md).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import MultipleChoiceItem
from ..errors import AdapterError, DataError
from .encoding import choice_length, encode_pair, resolve_max_length

log = logging.getLogger(__name__)

#: Fraction of a context group's tokens the cached path must save to be taken ("auto").
PREFIX_REUSE_MIN_SAVING = 0.5



@dataclass
class ItemScore:
    """The scores of one item's choices.

    ``logprobs[i]`` is log P(continuations[i] | contexts[i]) summed over the continuation's
    tokens; ``lengths[i]`` is the character count ``acc_norm`` divides by; ``num_tokens[i]`` is
    how many continuation tokens were scored; ``is_greedy[i]`` says whether every continuation
    token was the model's argmax (lm-eval's ``is_greedy``).
    """

    item: MultipleChoiceItem
    logprobs: list[float]
    lengths: list[int]
    num_tokens: list[int] = field(default_factory=list)
    is_greedy: list[bool] = field(default_factory=list)

    @property
    def pred(self) -> int:
        """Index of the choice with the highest summed log-probability (first on ties)."""
        return int(np.argmax(np.asarray(self.logprobs, dtype=np.float64)))

    @property
    def pred_norm(self) -> int:
        """Index of the choice with the highest log-probability per character."""
        with np.errstate(divide="ignore", invalid="ignore"):
            normed = np.asarray(self.logprobs, dtype=np.float64) / np.asarray(self.lengths, dtype=np.float64)
        return int(np.argmax(normed))

    @property
    def correct(self) -> bool:
        return self.pred == self.item.gold

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.item.gold

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.item.task,
            "source": self.item.source,
            "gold": self.item.gold,
            "pred": self.pred,
            "pred_norm": self.pred_norm,
            "logprobs": list(self.logprobs),
            "lengths": list(self.lengths),
            "num_tokens": list(self.num_tokens),
            "is_greedy": list(self.is_greedy),
        }


def _item_lengths(item: MultipleChoiceItem) -> list[int]:
    if len(set(item.contexts)) > 1 and len(set(item.continuations)) == 1:
        # fill-in-the-blank: one shared continuation; every choice gets the same length
        return [choice_length(item.continuations[0])] * len(item.continuations)
    return [choice_length(c) for c in item.continuations]


# ---------------------------------------------------------------------------------------------
# Model plumbing


@dataclass
class _Request:
    item: int
    choice: int
    ctx: list[int]
    cont: list[int]
    logprob: float | None = None
    greedy: bool | None = None


class _NoCache(Exception):
    """The model does not support the cached prefix path."""


def _model_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:  # noqa: BLE001 - any model without the HF accessor
        pass
    try:
        return next(model.parameters()).device
    except Exception:  # noqa: BLE001
        return torch.device("cpu")


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    try:
        from transformers import PreTrainedModel
    except Exception:  # noqa: BLE001
        return "past_key_values"
    modules = model.modules() if isinstance(model, torch.nn.Module) else []
    for module in modules:
        if isinstance(module, PreTrainedModel):
            try:
                params = inspect.signature(module.forward).parameters
            except (TypeError, ValueError):
                break
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


def _get(out, name):
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


def _logits(out) -> torch.Tensor:
    logits = _get(out, "logits")
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    return logits


def _output_cache(out):
    for name in ("cache", "past_key_values"):
        value = _get(out, name)
        if value is not None:
            return value
    return None


def _select_cache(cache, index: torch.Tensor, keep_original: bool):
    """A cache whose batch rows are ``cache[index]`` (rows may repeat)."""
    if hasattr(cache, "batch_select_indices"):
        selected = copy.deepcopy(cache) if keep_original else cache
        selected.batch_select_indices(index)
        return selected
    if isinstance(cache, (tuple, list)):  # legacy ((k, v), ...) per layer
        return tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)
    raise _NoCache(f"cannot index a cache of type {type(cache).__name__}")


def _pad(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _score_rows(logprobs: torch.Tensor, start: int, targets: Sequence[int]) -> tuple[float, bool]:
    """Sum of ``logprobs[start + t, targets[t]]`` and whether all targets are the argmax."""
    if not targets:
        return 0.0, True
    rows = logprobs[start : start + len(targets)]
    tgt = torch.tensor(targets, dtype=torch.long, device=rows.device)
    picked = rows.gather(1, tgt.unsqueeze(1)).squeeze(1)
    greedy = bool((rows.argmax(dim=-1) == tgt).all())
    return float(picked.sum()), greedy


def _prefix_saving(group: Sequence[_Request]) -> float:
    """Fraction of the plain path's tokens that one shared prefix pass saves for ``group``."""
    ctx = len(group[0].ctx)
    full = sum(ctx + len(r.cont) - 1 for r in group)
    return (len(group) - 1) * ctx / max(full, 1)


def _score_full(model, requests: list[_Request], batch_size: int, max_length: int, device, pbar) -> None:
    """Plain path: each pair as one full sequence, like HFLM._loglikelihood_tokens."""
    order = sorted(requests, key=lambda r: -(len(r.ctx) + len(r.cont)))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = [(r.ctx + r.cont)[-(max_length + 1) :][:-1] for r in chunk]
        ids, mask = _pad(inputs, device)
        logprobs = F.log_softmax(_logits(model(input_ids=ids, attention_mask=mask)).float(), dim=-1)
        for row, (r, inp) in enumerate(zip(chunk, inputs)):
            r.logprob, r.greedy = _score_rows(logprobs[row], len(inp) - len(r.cont), r.cont)
        if pbar is not None:
            pbar.update(len(chunk))


def _score_prefix_groups(
    model, groups: list[list[_Request]], batch_size: int, device, cache_kw: str, pbar
) -> None:
    """Cached path: each group shares one context (docs/evaluation.md, section 2)."""
    # longest first (like lm-eval): memory problems show up at once, less padding per step
    groups = sorted(groups, key=lambda g: -len(g[0].ctx))
    i = 0
    while i < len(groups):
        step = [groups[i]]
        n_rows = len(groups[i])
        i += 1
        while i < len(groups) and n_rows + len(groups[i]) <= batch_size:
            step.append(groups[i])
            n_rows += len(groups[i])
            i += 1

        ctx_ids, ctx_mask = _pad([g[0].ctx for g in step], device)
        out = model(input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True)
        cache = _output_cache(out)
        if cache is None:
            raise _NoCache("the model returned no cache")
        logits = _logits(out)
        ctx_lens = [len(g[0].ctx) for g in step]
        last = torch.stack([logits[g, n - 1] for g, n in enumerate(ctx_lens)])
        first = F.log_softmax(last.float(), dim=-1)  # [groups, vocab]
        del out, logits

        rest: list[tuple[int, _Request]] = []
        for g, group in enumerate(step):
            for r in group:
                r.logprob, r.greedy = _score_rows(first[g : g + 1], 0, r.cont[:1])
                if len(r.cont) > 1:
                    rest.append((g, r))

        chunks = [rest[s : s + batch_size] for s in range(0, len(rest), batch_size)]
        for c_idx, chunk in enumerate(chunks):
            index = torch.tensor([g for g, _ in chunk], dtype=torch.long, device=device)
            rows_cache = _select_cache(cache, index, keep_original=c_idx < len(chunks) - 1)
            ids, mask = _pad([r.cont[:-1] for _, r in chunk], device)
            width = ids.shape[1]
            base = torch.tensor([ctx_lens[g] for g, _ in chunk], dtype=torch.long, device=device)
            position_ids = base.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
            attention_mask = torch.cat([ctx_mask.index_select(0, index), mask], dim=1)
            out = model(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_kw: rows_cache},
            )
            logprobs = F.log_softmax(_logits(out).float(), dim=-1)
            del out, rows_cache
            for row, (_, r) in enumerate(chunk):
                lp, greedy = _score_rows(logprobs[row], 0, r.cont[1:])
                r.logprob = r.logprob + lp
                r.greedy = r.greedy and greedy
        del cache
        if pbar is not None:
            pbar.update(n_rows)



def _warn_truncated(items: Sequence[MultipleChoiceItem], requests: Sequence[_Request], max_length: int) -> None:
    """One warning per task with the number of items whose context is cut from the left."""
    cut: dict[str, dict[int, None]] = {}  # task -> indices of cut items, in order
    for r in requests:
        if len(r.ctx) + len(r.cont) > max_length + 1:
            cut.setdefault(items[r.item].task, {})[r.item] = None
    for task, indices in cut.items():
        total = sum(1 for item in items if item.task == task)
        first = next(iter(indices))
        example = items[first].source or f"item {first}"
        log.warning("task %s: %d of %d questions are longer than the model's context (%d tokens) and are cut "
                    "from the left, as lm-eval does (e.g. %s); their scores see only the question's end",
                    task, len(indices), total, max_length, example)


def score_items(
    model,
    tokenizer,
    items: Sequence[MultipleChoiceItem],
    batch_size: int = 8,
    progress: bool = True,
    *,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    prefix_token_id: int | None = None,
    reuse_prefix: bool | str = "auto",
) -> list[ItemScore]:
    """Score every choice of every item by log-likelihood, as lm-eval's HFLM does.

    ``model`` is anything whose forward takes ``input_ids`` / ``attention_mask`` and returns
    ``.logits`` (a transformers causal LM, a peft model, a MoR model); it is put in eval mode
    for the call (and back in training mode afterwards if it was) and run under
    ``torch.no_grad()`` on the device of its input embeddings. ``batch_size`` is the most
    sequences per forward pass. ``max_length`` defaults to HFLM's (:func:`resolve_max_length`);
    ``add_bos_token`` / ``prefix_token_id`` are HFLM's model arguments of the same names.
    ``reuse_prefix`` is ``"auto"``, ``True`` or ``False`` (docs/evaluation.md, section 2); the
    scores are the same either way.

    Four steps: the (context, continuation) token requests, their grouping by shared context,
    the forward passes, and the checks that turn the log-likelihoods into per-item scores.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reuse_prefix not in (True, False, "auto"):
        raise ValueError(f"reuse_prefix must be True, False or 'auto', got {reuse_prefix!r}")
    items = list(items)
    if max_length is None:
        max_length = resolve_max_length(model, tokenizer)
    requests = _requests(items, tokenizer, max_length, add_bos_token, prefix_token_id)
    _warn_truncated(items, requests, max_length)
    groups, plain = _prefix_groups(requests, max_length, reuse_prefix)
    _score_requests(model, requests, groups, plain, batch_size, max_length, progress)
    return _item_scores(items, requests)


def _requests(items: list[MultipleChoiceItem], tokenizer, max_length: int, add_bos_token: bool | None,
              prefix_token_id: int | None) -> list[_Request]:
    """One request per choice of every item: its context and continuation tokens, HFLM's encoding."""
    requests: list[_Request] = []
    for i, item in enumerate(items):
        if len(item.contexts) != len(item.continuations):
            raise DataError(f"{item.source or item.task}: {len(item.contexts)} contexts but {len(item.continuations)} continuations")
        if not item.continuations:
            raise DataError(f"{item.source or item.task}: no choices")
        for j, (context, continuation) in enumerate(zip(item.contexts, item.continuations)):
            ctx, cont = encode_pair(
                tokenizer, context, continuation, add_bos_token=add_bos_token, prefix_token_id=prefix_token_id
            )
            if not cont:
                raise DataError(f"{item.source or item.task}: choice {j} ({continuation!r}) has no tokens to score")
            if len(cont) > max_length:
                raise DataError(f"{item.source or item.task}: choice {j} has {len(cont)} tokens > max_length {max_length}")
            requests.append(_Request(i, j, ctx, cont))
    return requests


def _prefix_groups(requests: list[_Request], max_length: int,
                   reuse_prefix: bool | str) -> tuple[list[list[_Request]], list[_Request]]:
    """(groups of requests sharing a context, scored once through the KV cache; requests scored one
    full sequence each). A pair the window truncates always goes the plain way; with ``"auto"`` so
    does a group whose reuse would save too little."""
    plain = [r for r in requests if not reuse_prefix or len(r.ctx) + len(r.cont) > max_length + 1]
    groups_by_ctx: dict[tuple[int, ...], list[_Request]] = {}
    if reuse_prefix:
        for r in requests:
            if len(r.ctx) + len(r.cont) <= max_length + 1:
                groups_by_ctx.setdefault(tuple(r.ctx), []).append(r)
    groups = []
    for group in groups_by_ctx.values():
        if reuse_prefix == "auto" and _prefix_saving(group) < PREFIX_REUSE_MIN_SAVING:
            plain.extend(group)
        else:
            groups.append(group)
    return groups, plain


def _score_requests(model, requests: list[_Request], groups: list[list[_Request]], plain: list[_Request],
                    batch_size: int, max_length: int, progress: bool) -> None:
    """Fill every request's ``logprob`` and ``greedy`` in eval mode under no_grad (the model's
    training mode is restored after); a model without a usable KV cache scores its groups plainly."""
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(requests), desc="Scoring choices", unit="choice")
    from ..layer import reusing_factors

    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    device = _model_device(model)
    try:
        with torch.no_grad(), reusing_factors(model):  # each MoR adapter's U built once for all batches
            if groups:
                try:
                    _score_prefix_groups(model, groups, batch_size, device, _cache_kwarg(model), pbar)
                except (_NoCache, TypeError) as exc:
                    log.warning("prefix reuse unavailable for this model (%s); scoring full sequences", exc)
                    redo = [r for g in groups for r in g]
                    for r in redo:
                        r.logprob = r.greedy = None
                    plain = plain + redo
                    if pbar is not None:
                        pbar.reset(total=len(requests))
            if plain:
                _score_full(model, plain, batch_size, max_length, device, pbar)
    finally:
        if pbar is not None:
            pbar.close()
        if was_training and hasattr(model, "train"):
            model.train()


def _item_scores(items: list[MultipleChoiceItem], requests: list[_Request]) -> list[ItemScore]:
    """Each item's scores in choice order; refused (no metric at all) if any log-likelihood is
    NaN or inf, since an accuracy computed from NaN is a number about nothing."""
    nonfinite = [r for r in requests if not math.isfinite(float(r.logprob))]
    if nonfinite:
        first = items[nonfinite[0].item]
        raise AdapterError(f"{len(nonfinite)} of {len(requests)} log-likelihoods are NaN or inf (first: "
                             f"{first.source or first.task}, choice {nonfinite[0].choice}): the model or adapter gives "
                             "non-finite logits, so no accuracy is reported. Check the weights (a diverged or "
                             "corrupt adapter or model) or use a wider dtype.")
    per_item: list[list[_Request]] = [[] for _ in items]
    for r in requests:
        per_item[r.item].append(r)
    scores = []
    for item, reqs in zip(items, per_item):
        reqs.sort(key=lambda r: r.choice)
        scores.append(
            ItemScore(
                item=item,
                logprobs=[float(r.logprob) for r in reqs],
                lengths=_item_lengths(item),
                num_tokens=[len(r.cont) for r in reqs],
                is_greedy=[bool(r.greedy) for r in reqs],
            )
        )
    return scores
