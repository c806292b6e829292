"""The README's Python quickstart runs as written (on the embedded SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(smollm2_path, tmp_path, monkeypatch):
    code = re.search(r"## Quickstart \(Python\).*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    assert "mor" not in type(namespace["merged"]).__module__
