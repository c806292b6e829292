"""Tokenisation of a multiple-choice request exactly as lm-evaluation-harness's ``HFLM`` does it:
the (context, continuation) split (:func:`encode_pair`), the characters ``acc_norm`` divides by
(:func:`choice_length`) and the context length (:func:`resolve_max_length`). Training uses the
same split (``mor.data``), so what is trained on is what is scored."""

from __future__ import annotations

DEFAULT_MAX_LENGTH = 2048  # lm_eval.models.utils.DEFAULT_MAX_LENGTH
TOKENIZER_INFINITY = 1000000000000000019884624838656  # "unset" model_max_length


def _prefix_token_id(tokenizer, prefix_token_id: int | None = None) -> int:
    if prefix_token_id is not None:
        return prefix_token_id
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def _tok_encode(
    tokenizer,
    string: str,
    add_special_tokens: bool | None = None,
    add_bos_token: bool | None = None,
    prefix_token_id: int | None = None,
) -> list[int]:
    """``HFLM.tok_encode`` (no truncation)."""
    if add_special_tokens is not None:
        kwargs: dict[str, bool] = {"add_special_tokens": add_special_tokens}
    elif add_bos_token is not None:
        kwargs = {"add_special_tokens": add_bos_token}
    else:
        kwargs = {}
    if add_special_tokens is None:
        bos_str = tokenizer.decode(_prefix_token_id(tokenizer, prefix_token_id))
        if bos_str is not None and string.startswith(bos_str):
            kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(string, **kwargs))


def encode_pair(
    tokenizer,
    context: str,
    continuation: str,
    *,
    add_bos_token: bool | None = None,
    prefix_token_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids ``(context_enc, continuation_enc)`` exactly as lm-eval's HFLM builds them for a
    causal LM's ``loglikelihood`` request (``TemplateLM.loglikelihood`` + ``_encode_pair``).

    The model input is ``context_enc + continuation_enc``; the continuation tokens are scored.
    """
    if context == "":
        continuation_enc = _tok_encode(
            tokenizer, continuation, add_special_tokens=False, prefix_token_id=prefix_token_id
        )
        prefix = _prefix_token_id(tokenizer, prefix_token_id)
        if not continuation_enc or prefix != continuation_enc[0]:
            return [prefix], continuation_enc
        return continuation_enc[:1], continuation_enc[1:]

    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    opts = {"add_bos_token": add_bos_token, "prefix_token_id": prefix_token_id}
    whole_enc = _tok_encode(tokenizer, context + continuation, **opts)
    context_enc = _tok_encode(tokenizer, context, **opts)
    return context_enc, whole_enc[len(context_enc) :]


def choice_length(continuation: str) -> int:
    """Characters ``acc_norm`` divides by: the continuation without lm-eval's default
    ``target_delimiter`` (one leading space), i.e. the length of the choice text."""
    return len(continuation) - 1 if continuation.startswith(" ") else len(continuation)


def resolve_max_length(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The context length HFLM uses: config ``n_positions`` / ``max_position_embeddings`` /
    ``n_ctx`` (a nested ``text_config`` first), then ``tokenizer.model_max_length``, then
    ``default``."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and model_max_length != TOKENIZER_INFINITY:
        return int(model_max_length)
    return default
