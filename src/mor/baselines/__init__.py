"""Comparison adapters that peft does not provide (LoRA and DoRA come from peft itself)."""

from .moelora import MoELoRALinear

__all__ = ["MoELoRALinear"]
