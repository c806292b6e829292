"""Comparison adapters that peft does not provide (LoRA and DoRA come from peft itself)."""

from .moelora import MoELoRAAdapter

__all__ = ["MoELoRAAdapter"]
