"""Text generation with any model this project loads (base, MoR / MoE-LoRA, merged, peft LoRA /
DoRA): the prompt goes through the tokenizer's chat template when it has one, tokens stream to
stdout as they are produced (transformers' ``TextStreamer``), decoding is greedy unless a
temperature is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, TextIO

import torch
from ..errors import SettingsError


@dataclass
class GenerationSettings:
    """How to decode. temperature 0 is greedy (deterministic); above 0 it samples with top_p."""

    max_new_tokens: int = 128  # tokens generated per prompt at most
    temperature: float = 0.0  # 0: greedy; > 0: sampling temperature
    top_p: float = 1.0  # nucleus sampling mass (only when sampling)
    chat_template: bool = True  # wrap the prompt in the tokenizer's chat template when it has one

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if self.temperature < 0:
            raise SettingsError(f"temperature={self.temperature} is negative; use 0 for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p={self.top_p} must lie in (0, 1]")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def prompt_inputs(tokenizer, text: str, chat_template: bool = True) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` (1, T) for one user message.

    With a chat template the text becomes ``[{"role": "user", "content": text}]`` plus the
    assistant's generation prompt; the template writes its own special tokens, so none are added.
    Without one (or ``chat_template=False``) the raw text is tokenized as usual.
    """
    if uses_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(text, return_tensors="pt")


@torch.no_grad()
def generate(model, tokenizer, text: str, settings: GenerationSettings | None = None, stream: bool = True) -> str:
    """Generate a reply to ``text``; print it token by token when ``stream``; return the reply."""
    from transformers import TextStreamer

    settings = settings or GenerationSettings()
    inputs = prompt_inputs(tokenizer, text, settings.chat_template)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, streamer=streamer, pad_token_id=pad, **settings.generate_kwargs())
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def read_prompts(stream: TextIO) -> list[str]:
    """Prompts from a text stream (stdin): one per non-empty line."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def generate_all(model, tokenizer, prompts: Iterable[str], settings: GenerationSettings | None = None,
                 stream: bool = True) -> list[str]:
    """``generate`` for each prompt in turn (each streams its own reply, ending in a newline)."""
    return [generate(model, tokenizer, text, settings, stream) for text in prompts]
