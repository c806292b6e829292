"""MoR inside other trainers: ``mor.integrations.axolotl.MoRPlugin`` (an axolotl plugin) and
``mor.integrations.llamafactory`` (an entry script for LLaMA-Factory). Each imports its trainer
only when used."""
