"""The ``mor`` command line: train, eval, merge, analyze. Thin: parse flags, call the library,
print tables. ``mor <command> --help`` lists every flag."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from .data import DEFAULT_TEMPLATE, DataError
from .report import text_table

logger = logging.getLogger("mor")

# The default run (`mor train` alone) must finish in under 10 minutes on a 2-core CPU:
# SmolLM2 takes about 2.7 s per step of 8 examples there, and each evaluation pass over
# 5 tasks x 40 records about 35 s.
BUILTIN_STEPS = 140
BUILTIN_EVAL_SIZE = 40
FIGURE_PROMPTS = 40  # prompts per task for the routing figures after training


# -- shared flags -------------------------------------------------------------------------------

def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


def _add_data(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", nargs="+", required=required, default=[],
                   help="task files (JSON list or JSONL) or folders; each is one task named after it")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records and report how many")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_at_least_one, default=None, help="score at most this many records per task")
    p.add_argument("--batch-size", type=_at_least_one, default=16)
    p.add_argument("--scoring", choices=["label", "text"], default="label",
                   help="label: log P('the correct answer is <label>'); text: lm-eval style option texts")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template of --scoring text")


def _at_least_one(value: str) -> int:
    """argparse type of counts: an int >= 1 (0 or -1 would silently score nothing or all but one)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return number


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output folder or an existing --output file (never an input)")


def _targets(value: str):
    """--target-modules: a preset or a regex stays a string; otherwise comma-separated names."""
    if value in ("ffn", "attention", "attention+ffn", "all-linear"):
        return value
    if "," not in value and any(c in value for c in "*.[](|"):
        return value  # a regular expression over full module names
    return [name.strip() for name in value.split(",") if name.strip()]


def _add_adapter_fields(p: argparse.ArgumentParser) -> None:
    """One flag per adapter field of MoRConfig, with its default and help text (one source)."""
    from .config import INITS, ROUTERS
    from .methods import config_field_help

    kinds = {"r": int, "num_experts": int, "top_k": int, "init_seed": int, "alpha": float, "dropout": float,
             "balance_coef": float, "init_scale_std": float, "target_modules": _targets}
    choices = {"router": ROUTERS, "init": INITS}
    for name, (default, help_text) in config_field_help().items():
        if name == "init_seed":
            continue  # --seed seeds the adapter too
        shown = "" if default is None else f" (default: {default})"
        p.add_argument("--" + name.replace("_", "-"), type=kinds.get(name, str), default=default,
                       choices=choices.get(name), help=help_text + shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor", description="Mixture-of-Ranks adapters: train, eval, merge, analyze")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train an adapter (default: MoR on the built-in suite)")
    _add_model(t)
    t.add_argument("--method", choices=["mor", "lora", "dora", "moelora"], default="mor")
    _add_adapter_fields(t)
    _add_data(t, required=False)
    t.add_argument("--eval-data", nargs="+", default=[], help="extra eval tasks (default: the test splits of --data)")
    t.add_argument("--holdout", type=int, default=0, help="carve this many eval records out of tasks with no test split")
    t.add_argument("--target", choices=["output", "text"], default="output",
                   help="output: the record's answer; text: the correct option's text (matches --scoring text)")
    t.add_argument("--mix", choices=["proportional", "uniform"], default="proportional")
    t.add_argument("--output", default="runs/mor")
    t.add_argument("--max-steps", type=int, default=None, help=f"default: {BUILTIN_STEPS} on the built-in suite, else --epochs")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=None, help="default 1e-3 (MoR, MoE-LoRA, LoRA, DoRA alike)")
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-steps", type=int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --output")
    _add_overwrite(t)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--load-in-4bit", action="store_true",
                   help="quantise the frozen base to bitsandbytes nf4 (QLoRA-style); the adapter trains in fp32")
    t.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    t.add_argument("--eval-limit", type=int, default=None)
    t.add_argument("--no-figures", action="store_true", help="skip the routing figures after training a MoR adapter")
    t.add_argument("--base-dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="dtype of the frozen base (adapter and optimizer stay fp32); auto: bf16 where the "
                        "hardware runs it natively (CPU with AVX512-BF16/AMX, GPU with bf16)")
    t.add_argument("--group-by-length", action="store_true", help="batch examples of similar length (less padding)")
    t.add_argument("--router-lr-multiplier", type=float, default=1.0, help="router learning rate = lr times this")
    t.add_argument("--router-init-scale", type=float, default=1.0,
                   help="multiply the router's initial weights by this (1/temperature of its logits at init)")
    t.add_argument("--routing-stats-steps", type=int, default=None,
                   help="measure routing entropy/load/divergence every N steps (default: every logging step; 0: off)")

    e = sub.add_parser("eval", help="zero-shot multiple-choice accuracy per task")
    _add_model(e)
    e.add_argument("--adapter", default=None, help="adapter folder (MoR, MoE-LoRA, LoRA or DoRA)")
    _add_data(e, required=True)
    _add_eval_flags(e)
    e.add_argument("--merged", action="store_true",
                   help="evaluate the MoR adapter merged with fixed routing (one profile per task)")
    e.add_argument("--routing", default=None, help="with --merged: a saved routing_profile.json for every task")
    e.add_argument("--output", default=None, help="write the results as JSON here")
    e.add_argument("--log-samples", action="store_true",
                   help="with --output: also every record's scores (index, gold, preds, log-likelihoods, acc), "
                        "for paired comparisons between runs (lm-eval's --log_samples)")
    _add_overwrite(e)

    m = sub.add_parser("merge", help="merge a MoR adapter with fixed routing into a plain model folder")
    _add_model(m)
    m.add_argument("--adapter", required=True)
    _add_data(m, required=False)
    m.add_argument("--routing", default=None, help="a saved routing_profile.json instead of measuring on --data")
    m.add_argument("--limit", type=_at_least_one, default=200, help="records of --data used to measure the routing")
    m.add_argument("--output", required=True, help="folder for the merged model (safetensors)")
    _add_overwrite(m)

    a = sub.add_parser("analyze", help="router specialisation, parameter scaling and rank spectra (PNGs)")
    _add_model(a)
    a.add_argument("--adapter", required=True)
    _add_data(a, required=True)
    a.add_argument("--limit", type=_at_least_one, default=100, help="records per task used to measure routing")
    a.add_argument("--output", default="figures")
    a.add_argument("--routing-stats", default=None,
                   help="routing_stats.json of a training run (default: the one beside --adapter, if any): "
                        "draws routing entropy and divergence over steps")
    _add_overwrite(a)
    _add_export_and_generate(sub)
    _add_convert(sub)
    return parser


# -- commands ---------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .methods import ADAPTER_FIELDS, AdapterSpec
    from .train import TrainConfig, builtin_data_folder, run_training

    builtin = not args.data
    spec = AdapterSpec(method=args.method, **{name: getattr(args, name) for name in ADAPTER_FIELDS
                                              if name != "init_seed"})
    max_steps = args.max_steps if args.max_steps is not None else (BUILTIN_STEPS if builtin else -1)
    cfg = TrainConfig(model=args.model, adapter=spec, data=args.data, eval_data=args.eval_data,
                      holdout=args.holdout, target=args.target, mix=args.mix, output=args.output,
                      max_steps=max_steps, epochs=args.epochs, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr if args.lr is not None else 1e-3,
                      max_length=args.max_length, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                      skip_bad=args.skip_bad,
                      save_steps=args.save_steps, gradient_checkpointing=args.gradient_checkpointing,
                      load_in_4bit=args.load_in_4bit,
                      evaluate=not args.no_eval, eval_limit=args.eval_limit,
                      builtin_eval_size=BUILTIN_EVAL_SIZE if builtin else None, base_dtype=args.base_dtype,
                      group_by_length=args.group_by_length, router_lr_multiplier=args.router_lr_multiplier,
                      router_init_scale=args.router_init_scale, routing_stats_steps=args.routing_stats_steps)
    if builtin:
        print(f"No --data given: training on the built-in multi-task suite (written to "
              f"{builtin_data_folder(args.output)}).")
    start = time.perf_counter()
    result = run_training(cfg)
    print(f"\nTrained {args.method} ({result.trainable_parameters:,} trainable parameters) for "
          f"{result.global_step} steps in {result.train_seconds:.0f} s; adapter saved to {result.adapter_dir}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.after:
        print("\n" + format_before_after(result.before, result.after, "acc_norm" if cfg.scoring == "text" else "acc"))
    if args.method == "mor" and not args.no_figures and result.after is not None:
        figures = _figures_after_training(cfg, result)
        print(f"\nRouting figures written to {figures}/ (see analysis.json there for the numbers)")
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")
    return 0


def format_before_after(before: dict | None, after: dict, key: str = "acc") -> str:
    """Table of accuracy (``key``: acc or acc_norm) per task before (adapter off) and after training."""
    rows = []
    for name in list(after["tasks"]) + ["average"]:
        a = after["tasks"].get(name) if name != "average" else after["average"]
        b = ((before or {}).get("tasks", {}).get(name) if name != "average" else (before or {}).get("average")) or {}
        rows.append([name, a.get("n", ""), _pct(b.get(key)), _pct(a.get(key)), _pct(a.get("chance"))])
    return text_table(["task", "n", f"before {key}", f"after {key}", "chance"], rows)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _load_adapted(model_name: str | None, adapter: str | None):
    from safetensors import SafetensorError

    from .loading import load_model, load_tokenizer
    from .model import load_adapter
    from .safety import AdapterError, check_adapter_weights

    if adapter:
        check_adapter_weights(adapter)  # unreadable or NaN/inf weights: an error line, not a score
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name)
    if adapter:
        try:
            model = load_adapter(model, adapter)
        except FileNotFoundError:
            raise
        except (RuntimeError, OSError, KeyError, SafetensorError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AdapterError(f"--adapter {adapter} cannot be loaded onto --model {model_name or 'smollm2'}: "
                               f"{first} (was it trained on this model?)") from None
    return model.eval(), tokenizer


def _task_prompts(task, tokenizer, limit: int | None) -> list[str]:
    from .data import training_examples

    examples = training_examples(task, target="output", tokenizer=tokenizer)
    return [e.prompt for e in examples[:limit]]


def cmd_eval(args) -> int:
    from .data import multiple_choice_items
    from .evaluate import SCORING_NAMES, evaluate_tasks, format_table, results_of, score_tasks, write_results_json
    from .model import RoutingProfile, is_mor_model
    from .safety import check_output_file
    from .data import load_eval_tasks

    if args.output:  # before the evaluation, not after it
        check_output_file(args.output, args.overwrite, inputs={"--data": args.data, "--adapter": args.adapter,
                                                               "--model": args.model, "--routing": args.routing})
    tasks = load_eval_tasks(args.data, args.skip_bad)
    model, tokenizer = _load_adapted(args.model, args.adapter)
    items = {t.name: multiple_choice_items(t, scoring=args.scoring, tokenizer=tokenizer, template=args.template,
                                           skipped=t.skipped if args.skip_bad else None)
             for t in tasks}
    if not args.merged:
        results = evaluate_tasks(model, tokenizer, items, batch_size=args.batch_size, limit=args.limit,
                                 scoring=args.scoring, log_samples=args.log_samples)
    else:
        if not is_mor_model(model):
            raise SystemExit("--merged needs a MoR or MoE-LoRA adapter (--adapter)")
        scores = []
        for task in tasks:  # one merged model per task, with that task's routing profile
            routing = (RoutingProfile.load(args.routing) if args.routing
                       else model.measure_routing(_task_prompts(task, tokenizer, args.limit), tokenizer=tokenizer))
            merged = copy.deepcopy(model).merge_and_unload(routing)
            scores += score_tasks(merged, tokenizer, {task.name: items[task.name]}, args.batch_size, args.limit)
        results = results_of(scores, SCORING_NAMES[args.scoring] + "; merged with fixed routing, one profile per task",
                             order=[t.name for t in tasks], log_samples=args.log_samples)
    for task in tasks:
        if task.skipped:
            print(f"{task.name}: skipped {len(task.skipped)} bad records (--skip-bad)")
    print(format_table(results))
    if args.output:
        print(f"\nResults written to {write_results_json(results, args.output)}")
    return 0


def cmd_merge(args) -> int:
    import torch

    from .model import RoutingProfile, is_mor_model
    from .safety import atomic_folder, claim_output_folder
    from .data import load_eval_tasks

    out = claim_output_folder(args.output, args.overwrite, inputs={
        "--model": args.model, "--adapter": args.adapter, "--routing": args.routing, "--data": args.data})
    model, tokenizer = _load_adapted(args.model, args.adapter)
    if not is_mor_model(model):
        raise SystemExit(f"{args.adapter} is not a MoR/MoE-LoRA adapter; LoRA/DoRA merge with peft's merge_and_unload")
    if args.routing:
        routing = RoutingProfile.load(args.routing)
        texts = ["The quick brown fox jumps over the lazy dog."]
    else:
        if not args.data:
            raise SystemExit("give --data (a task whose routing to measure) or --routing profile.json")
        tasks = load_eval_tasks(args.data, args.skip_bad)
        texts = [t for task in tasks for t in _task_prompts(task, tokenizer, args.limit)]
        routing = model.measure_routing(texts, tokenizer=tokenizer, progress=True)
    check = tokenizer(texts[:8], return_tensors="pt", padding=True)
    with torch.no_grad(), model.fixed_routing(routing):
        expected = model(**check).logits
    merged = model.merge_and_unload(routing)
    with torch.no_grad():
        got = merged(**check).logits
    mask = check["attention_mask"].bool()
    diff = (got - expected)[mask].abs().max().item()
    with atomic_folder(out) as tmp:  # a whole new folder: nothing of what was there is mixed in
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        routing.save(tmp / "routing_profile.json")
    print(f"Merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    print(f"Max |logit difference| vs the un-merged model with the same fixed routing: {diff:.3g}")
    print(f"Mean routing weights over layers: {[round(x, 4) for x in routing.mean().tolist()]}")
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze, format_report
    from .model import is_mor_model
    from .safety import atomic_folder, claim_output_folder
    from .data import load_eval_tasks

    claim_output_folder(args.output, args.overwrite, inputs={"--model": args.model, "--adapter": args.adapter,
                                                             "--data": args.data})
    model, tokenizer = _load_adapted(args.model, args.adapter)
    if not is_mor_model(model):
        raise SystemExit(f"{args.adapter} is not a MoR/MoE-LoRA adapter: routing analysis needs a router")
    tasks = load_eval_tasks(args.data, args.skip_bad)
    texts = {t.name: _task_prompts(t, tokenizer, args.limit) for t in tasks}
    stats = Path(args.routing_stats) if args.routing_stats else Path(args.adapter).parent / "routing_stats.json"
    with atomic_folder(args.output) as tmp:  # a whole new folder: no stale figures next to new ones
        result = analyze(model, texts, tmp, tokenizer=tokenizer)
        if stats.is_file() or args.routing_stats:
            _routing_over_steps(stats, Path(tmp))
    print(format_report(Path(args.output) / result["analysis"].name))
    print(f"\nFigures written to {Path(args.output)}/: " + ", ".join(p.name for k, p in result.items() if k != "analysis"))
    return 0


def _routing_over_steps(stats: Path, folder: Path) -> Path:
    """Draw (and print) the routing statistics a training run logged over its steps."""
    from .analysis import routing_over_steps_table
    from .plots import ROUTING_OVER_STEPS, plot_routing_over_steps
    from .routing_stats import load_stats

    records = load_stats(stats)
    print(f"\n== Routing over training ({ROUTING_OVER_STEPS}, from {stats}) ==")
    print(routing_over_steps_table(records))
    return plot_routing_over_steps(records, folder / ROUTING_OVER_STEPS)


def _figures_after_training(cfg, result) -> Path:
    """Router-by-task figures for the eval tasks of a finished MoR run."""
    from .analysis import analyze
    from .model import load_adapter
    from .loading import load_model, load_tokenizer
    from .train import load_train_and_eval_tasks

    tokenizer = load_tokenizer(cfg.model)
    model = load_adapter(load_model(cfg.model), result.adapter_dir)
    _, eval_tasks = load_train_and_eval_tasks(cfg)
    texts = {t.name: _task_prompts(t, tokenizer, FIGURE_PROMPTS) for t in eval_tasks}
    folder = Path(cfg.output) / "figures"
    analyze(model, texts, folder, tokenizer=tokenizer)
    stats = Path(cfg.output) / "routing_stats.json"
    if stats.is_file():
        _routing_over_steps(stats, folder)
    return folder


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "analyze": cmd_analyze}


# -- export-lora / generate ---------------------------------------------------------------------------

def _add_export_and_generate(sub) -> None:
    x = sub.add_parser("export-lora", help="a MoR/MoE-LoRA adapter under fixed routing as standard peft LoRA folders")
    _add_model(x)
    x.add_argument("--adapter", required=True, help="MoR or MoE-LoRA adapter folder")
    routing = x.add_mutually_exclusive_group(required=True)
    routing.add_argument("--routing", default=None, help="a saved routing_profile.json (or 'uniform'): one LoRA in --output")
    routing.add_argument("--data", nargs="+", default=[],
                         help="task files/folders: measure each task's routing, one LoRA per task in --output/<task>")
    x.add_argument("--skip-bad", action="store_true", help="skip malformed records of --data and report how many")
    x.add_argument("--limit", type=int, default=200, help="records per task of --data used to measure the routing")
    x.add_argument("--output", required=True, help="folder for the LoRA (with --data: one subfolder per task)")
    x.add_argument("--no-check", action="store_true",
                   help="skip reloading each LoRA with peft onto a fresh base model to compare logits")

    v = sub.add_parser("export-vllm", help="a folder that vLLM serves with the MoR adapter routed per token "
                                           "(vllm serve FOLDER; mor's vLLM plugin)")
    v.add_argument("--adapter", required=True, help="MoR or MoE-LoRA adapter folder")
    v.add_argument("--model", default=None, help="the base model: hub id, local folder or .gguf file (default: the "
                                                 "base the adapter records; the embedded SmolLM2 for 'smollm2')")
    v.add_argument("--output", required=True, help="new folder to serve: base weights (hard links or copies), "
                                                   "config.json naming the MoR architecture, the adapter")
    _add_overwrite(v)

    g = sub.add_parser("generate", help="generate text, streaming tokens (base model, any adapter, or merged MoR)")
    _add_model(g)
    g.add_argument("--adapter", default=None, help="MoR, MoE-LoRA, LoRA or DoRA adapter folder (default: base model)")
    g.add_argument("--merged", action="store_true", help="merge the MoR/MoE-LoRA adapter with --routing first")
    g.add_argument("--routing", default=None,
                   help="routing_profile.json or 'uniform': fixed routing (merged with --merged, else un-merged)")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable); without it, prompts are read from stdin, one per non-empty line")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw prompt even if the tokenizer has a chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def cmd_export_lora(args) -> int:
    import torch

    from .export import export_lora, exported_rank, mixture_layers
    from .data import load_eval_tasks

    model, tokenizer = _load_adapted(args.model, args.adapter)
    try:
        layers = mixture_layers(model)
    except ValueError:
        raise SystemExit(f"{args.adapter} is not a MoR/MoE-LoRA adapter (a peft LoRA/DoRA is already a LoRA)")
    if args.routing:
        jobs = [(Path(args.output), args.routing, ["The quick brown fox jumps over the lazy dog."])]
    else:
        jobs = []
        for task in load_eval_tasks(args.data, args.skip_bad):
            texts = _task_prompts(task, tokenizer, args.limit)
            jobs.append((Path(args.output) / task.name, model.measure_routing(texts, tokenizer=tokenizer), texts))
    layer = next(iter(layers.values()))
    rank = exported_rank(layer)
    if rank != layer.r:
        print(f"MoE-LoRA has no shared factors: exported at rank N*r = {layer.num_experts}*{layer.r} = {rank}")
    base = None
    for folder, routing, texts in jobs:
        export_lora(model, routing, folder, base_model_name_or_path=args.model)
        print(f"LoRA (rank {rank}) written to {folder} (loads with peft.PeftModel.from_pretrained)")
        if args.no_check:
            continue
        from peft import PeftModel

        from .loading import load_model

        check = tokenizer(texts[:8], return_tensors="pt", padding=True)
        with torch.no_grad(), model.fixed_routing(routing):
            expected = model(**check).logits
        lora = PeftModel.from_pretrained(base if base is not None else load_model(args.model), str(folder)).eval()
        with torch.no_grad():
            got = lora(**check).logits
        base = lora.unload()  # the plain base model again, for the next task's LoRA
        diff = (got - expected)[check["attention_mask"].bool()].abs().max().item()
        print(f"  max |logit difference| vs the MoR adapter with the same fixed routing: {diff:.3g}")
    return 0


def cmd_generate(args) -> int:
    import contextlib

    import torch

    from .export import mixture_layers
    from .generate import GenerationSettings, generate_all, read_prompts

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  chat_template=not args.no_chat_template)
    model, tokenizer = _load_adapted(args.model, args.adapter)
    context = contextlib.nullcontext()
    if args.merged or args.routing:
        try:
            layers = mixture_layers(model)
        except ValueError:
            raise SystemExit("--merged/--routing need a MoR or MoE-LoRA adapter (--adapter)")
        if args.merged:
            if not args.routing and any(layer.router.strategy != "mean" for layer in layers.values()):
                raise SystemExit("--merged needs --routing routing_profile.json (or 'uniform') for a learned router")
            model = model.merge_and_unload(args.routing)
        else:
            context = model.fixed_routing(args.routing)
    if args.prompt:
        prompts = args.prompt
    elif sys.stdin.isatty():
        raise SystemExit("give --prompt TEXT, or pipe prompts on stdin (one per line)")
    else:
        prompts = read_prompts(sys.stdin)
    torch.manual_seed(args.seed)
    with context:
        for text in prompts:
            if len(prompts) > 1:
                print(f"> {text}", file=sys.stderr, flush=True)
            generate_all(model, tokenizer, [text], settings)
    return 0


def cmd_export_vllm(args) -> int:
    from .serving import export_for_vllm, serve_command

    folder = export_for_vllm(args.adapter, args.output, model=args.model, overwrite=args.overwrite)
    print(f"vLLM folder written to {folder}. Serve it, routing every token, with mor installed beside vLLM:\n"
          f"  {' '.join(serve_command(folder))}\n  offline: vllm.LLM({str(folder)!r})")
    return 0


COMMANDS.update({"export-lora": cmd_export_lora, "export-vllm": cmd_export_vllm, "generate": cmd_generate})


# -- convert-adapter ----------------------------------------------------------------------------------

def _add_convert(sub) -> None:
    c = sub.add_parser("convert-adapter", help="rewrite a mor 0.1 adapter folder as a peft MoR folder")
    c.add_argument("adapter", help="the old adapter folder (adapter_type 'mor', no peft_type)")
    c.add_argument("output", help="new folder (must not exist)")
    _add_model(c)


def cmd_convert_adapter(args) -> int:
    import warnings

    from .loading import load_model
    from .model import convert_legacy_adapter

    out = Path(args.output)
    if out.exists():
        raise ValueError(f"{out} exists; give a new folder for the converted adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "legacy format" warning: converting is the point
        convert_legacy_adapter(args.adapter, out, load_model(args.model))
    print(f"Converted {args.adapter} to {out} (loads with peft.PeftModel.from_pretrained or mor.load_adapter)")
    return 0


COMMANDS["convert-adapter"] = cmd_convert_adapter


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"]  # `mor` alone runs the default job
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *argv])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # a launched rank (accelerate, torchrun) leaves no gloo threads
            from .distributed import end_process_group

            end_process_group()


if __name__ == "__main__":
    sys.exit(main())
