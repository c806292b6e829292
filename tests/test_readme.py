"""The README's Python quickstart runs as written (on the embedded SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks() -> list[str]:
    """Every ```python block of the README, in order, as written."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_readme_blocks(blocks: list[str], folder: Path) -> dict:
    """Run the README's Python blocks as one session in ``folder``: plain blocks are executed, ``>>>``
    blocks checked as doctests (their printed output must be the README's)."""
    import doctest

    namespace: dict = {}
    for number, code in enumerate(blocks, 1):
        if code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, namespace, f"README block {number}", "README.md", 0)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
            runner.run(test, clear_globs=False)
            assert runner.failures == 0, f"README block {number} printed something else"
        else:
            exec(compile(code, f"README block {number}", "exec"), namespace)
    return namespace


@pytest.fixture
def readme_model(tmp_path_factory, monkeypatch):
    """``resolve_model_path(None)`` (the README's model) gives a tiny LLaMA + tokenizer folder, 64 wide
    (bitsandbytes' CPU kernel needs blocks of 64): the blocks run verbatim in seconds."""
    from conftest import make_tiny_llama, make_tiny_tokenizer

    import mor.runtime.loading

    folder = tmp_path_factory.mktemp("readme-model")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), hidden=64)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    real = mor.runtime.loading.resolve_model_path
    monkeypatch.setattr(mor.runtime.loading, "resolve_model_path",
                        lambda name=None: str(folder) if name in (None, "smollm2") else real(name))
    return folder


def test_every_readme_python_block_runs_as_written(readme_model, tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) >= 4  # the trainable-parameter count, the quickstart, TRL, the 4-bit base
    monkeypatch.chdir(tmp_path)
    code = [b for b in blocks if not b.lstrip().startswith(">>>")]  # its printed count is SmolLM2's (slow test)
    namespace = run_readme_blocks(code, tmp_path)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    assert "mor" not in type(namespace["merged"]).__module__
    assert namespace["trainer"].args.learning_rate == 1e-3  # the learning rate the README recommends
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert len({p.dtype for p in namespace["merged"].parameters()}) == 1  # the 4-bit block's merge


@pytest.mark.slow
def test_readme_quickstart_runs_on_smollm2(smollm2_path, tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    monkeypatch.chdir(tmp_path)
    namespace = run_readme_blocks([blocks[0], blocks[1]], tmp_path)  # the printed count, the quickstart
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert "mor" not in type(namespace["merged"]).__module__


# -- every command and link of the README is valid (fast: parsing, not running) ----------------------

def _readme_commands() -> list[str]:
    """Command lines of the README: every line of its bash blocks, and inline `mor ...` /
    `python -m ...` code, with comments and line continuations resolved."""
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:mor|python -m) [^`]*)`", text)
    commands = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            commands.append(line)
    return commands


def test_every_readme_command_parses():
    import importlib.util
    import shlex

    from mor.cli import build_parser

    checked = {"mor": 0, "python -m": 0, "make": 0}
    makefile = (README.parent / "Makefile").read_text()
    for line in _readme_commands():
        words = shlex.split(line)
        while words and "=" in words[0]:  # VAR=value prefixes
            words = words[1:]
        if words[:2] in (["accelerate", "launch"], ["torchrun", "--nproc_per_node"]):
            words = ["mor", *words[words.index("mor.cli") + 1:]]
        if words[0] == "mor" and len(words) == 2 and not words[1].startswith("-"):  # names a command
            assert words[1] in build_parser()._subparsers._group_actions[0].choices, line
            checked["mor"] += 1
        elif words[0] == "mor":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit as exit_:  # --help / --version exit 0; a bad flag exits 2
                assert exit_.code == 0, line
            checked["mor"] += 1
        elif words[:2] == ["python", "-m"]:
            module = words[2]
            assert importlib.util.find_spec(module) is not None, line
            if module.startswith("benchmarks."):
                parse = getattr(importlib.import_module(module), "parse_args", None)
                if parse is not None:
                    parse(words[3:])
            checked["python -m"] += 1
        elif words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, re.M), line
            checked["make"] += 1
        elif words[:2] == ["vllm", "serve"]:  # served through mor's plugin, declared for vLLM to find
            assert '"vllm.general_plugins"' in (README.parent / "pyproject.toml").read_text(), line
        elif words[0] == "mor-lm-eval":
            assert 'mor-lm-eval = "mor.lm_eval_model:main"' in (README.parent / "pyproject.toml").read_text()
    assert checked["mor"] >= 10 and checked["python -m"] >= 5 and checked["make"] == 2, checked


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_readme_and_docs_link_points_at_something():
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: {target}"
            checked += 1
    assert checked >= 10


def test_readme_is_a_five_minute_read():
    assert len(README.read_text().splitlines()) <= 300
