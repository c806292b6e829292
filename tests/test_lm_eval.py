"""lm-evaluation-harness integration: the "mor" model type, make_lm, the CLI wrapper, and
agreement of mor.eval.scoring with lm-eval's own numbers on a local multiple-choice task."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

import mor.lm_eval_model as mle  # noqa: E402  (registers "mor")
from conftest import make_bpe_tokenizer, make_tiny_llama  # noqa: E402
from mor.data import MultipleChoiceItem  # noqa: E402
from mor.eval.scoring import score_items  # noqa: E402

TASK = "mor_tiny_mc"
MAX_POS = 48  # small, so the long record below is left-truncated by both scorers

RECORDS = [
    {"question": "what colour is the sky?", "choices": ["blue", "green", "the lazy dog"], "label": 0},
    {"question": "which is larger, 3 or 7?", "choices": ["3", "7"], "label": 1},
    {"question": "what do plants need to grow?", "choices": ["sunlight, water and air", "a cat", "the mat"], "label": 0},
    {"question": "where did the cat sit?", "choices": ["on the mat", "over the fox", "in the sky", "no"], "label": 0},
    {"question": "is the fox quick?", "choices": ["yes", "no", "maybe"], "label": 0},
    {"question": "what jumps over the lazy dog?", "choices": ["a quick brown fox", "the sky"], "label": 0},
    {"question": "true or false: the sky is green", "choices": ["true", "false"], "label": 1},
    {"question": "which is larger, 3 or 7? " * 8, "choices": ["3", "7", "blue"], "label": 1},  # > MAX_POS tokens
]

def build_llama(vocab_size: int, seed: int = 0):
    return make_tiny_llama(seed, vocab_size, hidden=64, max_position_embeddings=MAX_POS)


# ---------------------------------------------------------------------------------------------
# Fixtures: a saved tiny model, adapters for it, and the local task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = make_bpe_tokenizer()
    build_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def load_base(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    peft = pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("lora")
    base, _ = load_base(tiny)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(folder)
    return str(folder)


def perturbed_mor(base):
    from mor.config import MoRConfig
    from mor.model import get_mor_model

    model = get_mor_model(base, MoRConfig(r=4, num_experts=3, target_modules="ffn", init_seed=0, dropout=0.0))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tensor in (p for a in model.mor_adapters().values() for p in a.parameters()):  # B = 0 at init
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def mor_dir(tiny, tmp_path_factory):
    pytest.importorskip("mor.model")
    folder = tmp_path_factory.mktemp("mor_adapter")
    base, tok = load_base(tiny)
    model = perturbed_mor(base)
    model.save_pretrained(folder)
    profile = model.measure_routing(["the cat sat on the mat", "Question: is the fox quick?\nAnswer: yes"], tokenizer=tok)
    profile.save(folder / "profile.json")
    return str(folder)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mc_task")
    write_task(folder, TASK, RECORDS)
    return TaskManager(include_path=str(folder), include_defaults=False), str(folder)


def write_task(folder, name, records):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


def items_for(records, task=TASK):
    return [
        MultipleChoiceItem(task, [f"Question: {r['question']}\nAnswer:"] * len(r["choices"]),
                           [" " + c for c in r["choices"]], r["label"], f"rec:{i}")
        for i, r in enumerate(records)
    ]


def run_lm_eval(model, model_args=None, tm=None, task=TASK, batch_size=4):
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], task_manager=tm, device="cpu",
        batch_size=batch_size, log_samples=True,
    )
    res = out["results"][task]
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return res, samples


def assert_agree(model, tokenizer, records, res, samples, task=TASK, batch_size=3):
    """Our scorer on the same items: identical acc / acc_norm, same log-likelihoods."""
    items = items_for(records, task)
    # the same (context, continuation) strings as lm-eval's requests
    assert [list(map(tuple, s["arguments"])) for s in samples] == [
        list(zip(it.contexts, it.continuations)) for it in items
    ]
    scores = score_items(model, tokenizer, items, batch_size=batch_size, progress=False)
    for s, sample in zip(scores, samples):
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert s.logprobs == pytest.approx(theirs, abs=1e-4)
        assert (float(s.correct), float(s.correct_norm)) == (sample["acc"], sample["acc_norm"])
    n = len(scores)
    assert sum(s.correct for s in scores) / n == res["acc,none"]
    assert sum(s.correct_norm for s in scores) / n == res["acc_norm,none"]
    return scores


# ---------------------------------------------------------------------------------------------
# Registration and the CLI wrapper


def test_mor_is_registered_and_hf_still_resolves():
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    assert get_model("mor") is mle.MoRLM
    assert issubclass(mle.MoRLM, HFLM)
    assert get_model("hf") is HFLM
    assert mle.register() is mle.MoRLM  # idempotent


def test_unsupported_hflm_arguments_are_refused(tiny):
    with pytest.raises(ValueError, match="adapter="):
        mle.MoRLM(pretrained=tiny, peft="somewhere")


# ---------------------------------------------------------------------------------------------
# Agreement with lm-eval


def test_agreement_base_hf_and_mor(tiny, task_manager):
    tm, _ = task_manager
    model, tok = load_base(tiny)
    res_hf, samples_hf = run_lm_eval("hf", f"pretrained={tiny}", tm)
    scores = assert_agree(model, tok, RECORDS, res_hf, samples_hf)
    res_mor, samples_mor = run_lm_eval("mor", f"pretrained={tiny}", tm)
    assert (res_mor["acc,none"], res_mor["acc_norm,none"]) == (res_hf["acc,none"], res_hf["acc_norm,none"])
    assert_agree(model, tok, RECORDS, res_mor, samples_mor)
    # the task is not trivial for the check: acc and acc_norm pick differently somewhere
    assert any(s.pred != s.pred_norm for s in scores) or len({s.pred for s in scores}) > 1


def test_agreement_peft_lora_adapter(tiny, lora_dir, task_manager):
    import peft

    tm, _ = task_manager
    base, tok = load_base(tiny)
    model = peft.PeftModel.from_pretrained(base, lora_dir).eval()
    res_hf, samples_hf = run_lm_eval("hf", f"pretrained={tiny},peft={lora_dir}", tm)
    assert_agree(model, tok, RECORDS, res_hf, samples_hf)
    res_mor, samples_mor = run_lm_eval("mor", f"pretrained={tiny},adapter={lora_dir}", tm)
    assert_agree(model, tok, RECORDS, res_mor, samples_mor)
    base_only, _ = load_base(tiny)
    plain = score_items(base_only, tok, items_for(RECORDS[:1]), progress=False)
    adapted = score_items(model, tok, items_for(RECORDS[:1]), progress=False)
    assert plain[0].logprobs != pytest.approx(adapted[0].logprobs, abs=1e-3)  # the adapter matters


def test_agreement_mor_adapter_and_merged_routing(tiny, mor_dir, task_manager):
    from mor.model import load_adapter

    tm, _ = task_manager
    base, tok = load_base(tiny)
    model = load_adapter(base, mor_dir)
    res, samples = run_lm_eval("mor", f"pretrained={tiny},adapter={mor_dir}", tm)
    scores = assert_agree(model, tok, RECORDS, res, samples)
    plain = score_items(load_base(tiny)[0], tok, items_for(RECORDS), progress=False)
    assert plain[0].logprobs != pytest.approx(scores[0].logprobs, abs=1e-3)

    profile = os.path.join(mor_dir, "profile.json")
    merged = load_adapter(load_base(tiny)[0], mor_dir).merge_and_unload(routing=profile)
    res_m, samples_m = run_lm_eval("mor", f"pretrained={tiny},adapter={mor_dir},merged_routing={profile}", tm)
    assert_agree(merged, tok, RECORDS, res_m, samples_m)


def test_merged_routing_refused_for_lora(tiny, lora_dir):
    with pytest.raises(ValueError, match="merged_routing"):
        mle.MoRLM(pretrained=tiny, adapter=lora_dir, merged_routing="uniform", device="cpu")


def test_make_lm_with_a_model_object(tiny, lora_dir, task_manager):
    import peft

    tm, _ = task_manager
    base, tok = load_base(tiny)
    model = peft.PeftModel.from_pretrained(base, lora_dir)
    lm = mle.make_lm(model, tok, batch_size=5)
    res, samples = run_lm_eval(lm, tm=tm)
    assert_agree(model, tok, RECORDS, res, samples)


def test_make_lm_with_a_mor_model_object(tiny, task_manager):
    pytest.importorskip("mor.model")
    tm, _ = task_manager
    base, tok = load_base(tiny)
    model = perturbed_mor(base)
    res, samples = run_lm_eval(mle.make_lm(model, tok, batch_size=2), tm=tm)
    assert_agree(model, tok, RECORDS, res, samples)


def test_cli_wrapper_runs_model_mor(tiny, task_manager, tmp_path):
    _, task_dir = task_manager
    mle.main([
        "--model", "mor", "--model_args", f"pretrained={tiny}", "--tasks", TASK,
        "--include_path", task_dir, "--device", "cpu", "--batch_size", "4",
        "--output_path", str(tmp_path / "out"),
    ])
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())["results"][TASK]
    model, tok = load_base(tiny)
    scores = score_items(model, tok, items_for(RECORDS), progress=False)
    assert results["acc,none"] == sum(s.correct for s in scores) / len(scores)
    assert results["acc_norm,none"] == sum(s.correct_norm for s in scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# The real model on real data (skipped when SmolLM2 or the shared data are absent)


def arc_records(path, n):
    records = []
    for rec in json.loads(path.read_text())[:n]:
        body = rec["instruction"].split("\n\nAnswer format:")[0]
        question, _, options = body.partition("\n\nAnswer1:")
        question = re.sub(r"^Please choose the correct answer to the question:\s*", "", question).strip()
        choices = [c.strip() for c in re.split(r"\s*Answer\d+:\s*", "Answer1:" + options) if c.strip()]
        records.append({"question": question, "choices": choices, "label": int(rec["answer"][-1]) - 1})
    return records


@pytest.mark.slow
def test_agreement_smollm2_arc_easy_slice(smollm2_path, commonsense, tmp_path):
    records = arc_records(commonsense / "ARC-Easy" / "test.json", 12)
    assert all(2 <= len(r["choices"]) <= 5 and 0 <= r["label"] < len(r["choices"]) for r in records)
    write_task(tmp_path, "mor_arc_easy_slice", records)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res, samples = run_lm_eval("mor", f"pretrained={smollm2_path}", tm, task="mor_arc_easy_slice", batch_size=8)
    from mor.runtime.loading import load_model, load_tokenizer

    model, tok = load_model(smollm2_path), load_tokenizer(smollm2_path)
    assert_agree(model, tok, records, res, samples, task="mor_arc_easy_slice", batch_size=8)


class _BareWrapper(torch.nn.Module):
    """A wrapper exposing only forward (no config / device / tie_weights)."""

    def __init__(self, model):
        super().__init__()
        self.wrapped = model

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)


def test_make_lm_accepts_a_bare_wrapper(tiny):
    from lm_eval.api.instance import Instance

    model, tok = load_base(tiny)
    lm = mle.make_lm(_BareWrapper(model), tok, batch_size=3)
    items = items_for(RECORDS[:3])
    requests = [Instance("loglikelihood", {}, (c, x), k) for it in items for k, (c, x) in
                enumerate(zip(it.contexts, it.continuations))]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    ours = [lp for s in score_items(_BareWrapper(model), tok, items, progress=False) for lp in s.logprobs]
    assert ours == pytest.approx(theirs, abs=1e-4)
