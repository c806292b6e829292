"""What every command and run stands on: loading models, tokenizers and adapters (``loading``),
multi-process training (``distributed``), generation (``generate``), plain-text tables
(``report``), and the machine's description (``system``)."""
