"""The commands that use a trained adapter: eval, merge, analyze, export-lora, generate,
convert-adapter. Each loads "a base with an adapter" through ``mor.runtime.loading.load_adapted``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_data, add_load_in_4bit, add_model, add_overwrite, at_least_one, command, load_in_4bit_of
from ..errors import SettingsError
from ..options import ROUTING_PROMPTS

PLAIN_TEXT = ["The quick brown fox jumps over the lazy dog."]  # the check text when no --data is given


# -- eval -------------------------------------------------------------------------------------------

def add_eval_flags(e: argparse.ArgumentParser) -> None:
    from ..data import DEFAULT_TEMPLATE  # imports torch: only when `mor eval` is run

    add_model(e)
    add_load_in_4bit(e)
    e.add_argument("--adapter", default=None, help="adapter folder (MoR, MoE-LoRA, LoRA or DoRA)")
    add_data(e, required=True)
    e.add_argument("--limit", type=at_least_one, default=None, help="score at most this many records per task")
    e.add_argument("--batch-size", type=at_least_one, default=16, help="records scored together (default: 16)")
    e.add_argument("--scoring", choices=["label", "text"], default="label",
                   help="label: log P('the correct answer is <label>'); text: lm-eval style option texts")
    e.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template of --scoring text")
    e.add_argument("--merged", action="store_true",
                   help="evaluate the MoR adapter merged with fixed routing (one profile per task)")
    e.add_argument("--routing", default=None, help="with --merged: a saved routing_profile.json for every task")
    e.add_argument("--output", default=None, help="write the results as JSON here")
    e.add_argument("--log-samples", action="store_true",
                   help="with --output: also every record's scores (index, gold, preds, log-likelihoods, acc), "
                        "for paired comparisons between runs (lm-eval's --log_samples)")
    add_overwrite(e)


@command("eval", "zero-shot multiple-choice accuracy per task", arguments=add_eval_flags, doing="scoring")
def cmd_eval(args) -> int:
    from ..data import load_eval_tasks
    from ..eval.scoring import format_table, write_results_json
    from ..eval.tasks import evaluate_merged, evaluate_model
    from ..model import is_mor_model
    from ..runtime.loading import load_adapted
    from ..safety import check_output_file

    if args.output:  # before the evaluation, not after it
        check_output_file(args.output, args.overwrite, inputs={"--data": args.data, "--adapter": args.adapter,
                                                               "--model": args.model, "--routing": args.routing})
    tasks = load_eval_tasks(args.data, args.skip_bad)
    model, tokenizer = load_adapted(args.model, args.adapter, load_in_4bit=load_in_4bit_of(args))
    common = dict(batch_size=args.batch_size, limit=args.limit, template=args.template, skip_bad=args.skip_bad,
                  log_samples=args.log_samples)
    if not args.merged:
        results = evaluate_model(model, tokenizer, tasks, args.scoring, **common)
    elif not is_mor_model(model):
        raise SettingsError("--merged needs a MoR or MoE-LoRA adapter (--adapter)")
    else:
        results = evaluate_merged(model, tokenizer, tasks, args.scoring, routing=args.routing, **common)
    for task in tasks:
        if task.skipped:
            print(f"{task.name}: skipped {len(task.skipped)} bad records (--skip-bad)")
    print(format_table(results))
    if args.output:
        print(f"\nResults written to {write_results_json(results, args.output)}")
    return 0


# -- merge ------------------------------------------------------------------------------------------

def add_merge_flags(m: argparse.ArgumentParser) -> None:
    add_model(m)
    add_load_in_4bit(m)
    m.add_argument("--adapter", required=True, help="MoR or MoE-LoRA adapter folder")
    add_data(m, required=False, help="task files/folders whose routing to measure (or give --routing)")
    m.add_argument("--routing", default=None, help="a saved routing_profile.json instead of measuring on --data")
    m.add_argument("--limit", type=at_least_one, default=ROUTING_PROMPTS,
                   help=f"records of --data used to measure the routing (default: {ROUTING_PROMPTS})")
    m.add_argument("--output", required=True, help="folder for the merged model (safetensors)")
    add_overwrite(m)


@command("merge", "merge a MoR adapter with fixed routing into a plain model folder", arguments=add_merge_flags,
         doing="merging")
def cmd_merge(args) -> int:
    from ..export import merge_checked, merged_model_card
    from ..model import is_mor_model
    from ..routing import RoutingProfile
    from ..runtime.loading import load_adapted, standalone_base
    from ..safety import atomic_folder, check_free_space, claim_output_folder

    recorded = standalone_base(args.model)  # the base as transformers opens it without mor
    out = claim_output_folder(args.output, args.overwrite, inputs={
        "--model": recorded, "--adapter": args.adapter, "--routing": args.routing, "--data": args.data})
    model, tokenizer = load_adapted(args.model, args.adapter, load_in_4bit=load_in_4bit_of(args))
    check_free_space(out, sum(p.numel() * p.element_size() for p in model.parameters()), "the merged model")
    if not is_mor_model(model):
        raise SettingsError(f"{args.adapter} is not a MoR/MoE-LoRA adapter; LoRA/DoRA merge with peft's merge_and_unload")
    if args.routing:
        routing, texts = RoutingProfile.load(args.routing), PLAIN_TEXT
    elif not args.data:
        raise SettingsError("give --data (a task whose routing to measure) or --routing profile.json")
    else:
        texts = _prompts_of(args.data, args.skip_bad, tokenizer, args.limit)
        routing = model.measure_routing(texts, tokenizer=tokenizer, progress=True)
    merged, check = merge_checked(model, routing, tokenizer, texts)
    merged.config.base_model_name_or_path = recorded  # a folder or hub id found without mor
    with atomic_folder(out) as tmp:  # a whole new folder: nothing of what was there is mixed in
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        routing.save(tmp / "routing_profile.json")
        source = f"from {args.routing}" if args.routing else f"measured on {', '.join(args.data)}"
        (tmp / "README.md").write_text(merged_model_card(out, recorded, args.adapter, source))
    print(f"Merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    print(f"Max |logit difference| vs the un-merged model with the same fixed routing: {check.max_difference:.3g} "
          f"(top-1 token agreement {100 * check.top1_agreement:.1f} %)")
    if check.note:
        print(check.note)
    print(f"Mean routing weights over layers: {[round(x, 4) for x in routing.mean().tolist()]}")
    return 0


def _prompts_of(data: list[str], skip_bad: bool, tokenizer, limit: int | None) -> list[str]:
    from ..data import load_eval_tasks, task_prompts

    return [text for task in load_eval_tasks(data, skip_bad) for text in task_prompts(task, tokenizer, limit)]


# -- analyze ----------------------------------------------------------------------------------------

def add_analyze_flags(a: argparse.ArgumentParser) -> None:
    add_model(a)
    add_load_in_4bit(a)
    a.add_argument("--adapter", required=True, help="MoR or MoE-LoRA adapter folder")
    add_data(a, required=True)
    a.add_argument("--limit", type=at_least_one, default=ROUTING_PROMPTS,
                   help=f"records per task used to measure routing (default: {ROUTING_PROMPTS})")
    a.add_argument("--output", default="figures", help="folder for the figures and analysis.json (default: figures)")
    a.add_argument("--routing-stats", default=None,
                   help="routing_stats.json of a training run (default: the one beside --adapter, if any): "
                        "draws routing entropy and divergence over steps")
    add_overwrite(a)


@command("analyze", "router specialisation, parameter scaling and rank spectra (PNGs)", arguments=add_analyze_flags,
         doing="analysing")
def cmd_analyze(args) -> int:
    from ..analysis.analyze import analyze, format_report, routing_over_steps
    from ..data import load_eval_tasks, task_prompts
    from ..model import is_mor_model
    from ..runtime.loading import load_adapted
    from ..safety import atomic_folder, claim_output_folder

    stats = Path(args.routing_stats) if args.routing_stats else Path(args.adapter).parent / "routing_stats.json"
    claim_output_folder(args.output, args.overwrite, inputs={"--model": args.model, "--adapter": args.adapter,
                                                             "--data": args.data, "--routing-stats": stats})
    model, tokenizer = load_adapted(args.model, args.adapter, load_in_4bit=load_in_4bit_of(args))
    if not is_mor_model(model):
        raise SettingsError(f"{args.adapter} is not a MoR/MoE-LoRA adapter: routing analysis needs a router")
    texts = {t.name: task_prompts(t, tokenizer, args.limit) for t in load_eval_tasks(args.data, args.skip_bad)}
    with atomic_folder(args.output) as tmp:  # a whole new folder: no stale figures next to new ones
        result = analyze(model, texts, tmp, tokenizer=tokenizer)
        if stats.is_file() or args.routing_stats:
            print("\n" + routing_over_steps(stats, tmp))
    print(format_report(Path(args.output) / result["analysis"].name))
    print(f"\nFigures written to {Path(args.output)}/: " + ", ".join(p.name for k, p in result.items() if k != "analysis"))
    return 0


# -- export-lora ------------------------------------------------------------------------------------

def add_export_lora_flags(x: argparse.ArgumentParser) -> None:
    add_model(x)
    add_load_in_4bit(x)
    x.add_argument("--adapter", required=True, help="MoR or MoE-LoRA adapter folder")
    routing = x.add_mutually_exclusive_group(required=True)
    routing.add_argument("--routing", default=None, help="a saved routing_profile.json (or 'uniform'): one LoRA in --output")
    routing.add_argument("--data", nargs="+", default=[],
                         help="task files/folders: measure each task's routing, one LoRA per task in --output/<task>")
    x.add_argument("--skip-bad", action="store_true", help="skip malformed records of --data and report how many")
    x.add_argument("--limit", type=at_least_one, default=ROUTING_PROMPTS,
                   help=f"records per task of --data used to measure the routing (default: {ROUTING_PROMPTS})")
    x.add_argument("--output", required=True, help="folder for the LoRA (with --data: one subfolder per task)")
    add_overwrite(x)
    x.add_argument("--no-check", action="store_true",
                   help="skip reloading each LoRA with peft onto a fresh base model to compare logits")


@command("export-lora", "a MoR/MoE-LoRA adapter under fixed routing as standard peft LoRA folders",
         arguments=add_export_lora_flags, doing="exporting LoRA folders")
def cmd_export_lora(args) -> int:
    from ..data import load_eval_tasks, task_prompts
    from ..export import check_exported_lora, export_lora, exported_rank, standalone_commands
    from ..layer import mixture_layers
    from ..runtime.loading import load_adapted, load_model, standalone_base
    from ..safety import atomic_folder, claim_output_folder

    recorded = standalone_base(args.model)  # the base as peft and vLLM open it without mor
    out = claim_output_folder(args.output, args.overwrite, inputs={
        "--model": recorded, "--adapter": args.adapter, "--routing": args.routing, "--data": args.data})
    four_bit = load_in_4bit_of(args)
    model, tokenizer = load_adapted(args.model, args.adapter, load_in_4bit=four_bit)
    try:
        layers = mixture_layers(model)
    except ValueError:
        raise SettingsError(f"{args.adapter} is not a MoR/MoE-LoRA adapter (a peft LoRA/DoRA is already a LoRA)")
    if args.routing:
        jobs = [(Path(), args.routing, PLAIN_TEXT)]
    else:
        jobs = []
        for task in load_eval_tasks(args.data, args.skip_bad):
            texts = task_prompts(task, tokenizer, args.limit)
            jobs.append((Path(task.name), model.measure_routing(texts, tokenizer=tokenizer), texts))
    layer = next(iter(layers.values()))
    rank = exported_rank(layer)
    if rank != layer.r:
        print(f"MoE-LoRA has no shared factors: exported at rank N*r = {layer.num_experts}*{layer.r} = {rank}")
    base = None
    with atomic_folder(out) as tmp:  # every LoRA or none; what was in --output is replaced as a whole
        for name, routing, texts in jobs:
            export_lora(model, routing, tmp / name, base_model_name_or_path=recorded)
            print(f"LoRA (rank {rank}) written to {out / name} (loads with peft.PeftModel.from_pretrained)")
            if not args.no_check:
                base = base if base is not None else load_model(args.model, load_in_4bit=four_bit)
                diff, base = check_exported_lora(model, routing, tmp / name, base, tokenizer, texts)
                print(f"  max |logit difference| vs the MoR adapter with the same fixed routing: {diff:.3g}")
    folders = {(name.name or out.name): out / name for name, _, _ in jobs}
    print(f"Without mor (the folders record their base as {recorded}):")
    for line in standalone_commands(folders, recorded, rank):
        print(f"  {line}")
    return 0


# -- generate ---------------------------------------------------------------------------------------

def add_generate_flags(g: argparse.ArgumentParser) -> None:
    add_model(g)
    add_load_in_4bit(g)
    g.add_argument("--adapter", default=None, help="MoR, MoE-LoRA, LoRA or DoRA adapter folder (default: base model)")
    g.add_argument("--merged", action="store_true", help="merge the MoR/MoE-LoRA adapter with --routing first")
    g.add_argument("--routing", default=None,
                   help="routing_profile.json or 'uniform': fixed routing (merged with --merged, else un-merged)")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable); without it, prompts are read from stdin, one per non-empty line")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw prompt even if the tokenizer has a chat template")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")


@command("generate", "generate text, streaming tokens (base model, any adapter, or merged MoR)",
         arguments=add_generate_flags)
def cmd_generate(args) -> int:
    import contextlib

    import torch

    from ..model import is_mor_model
    from ..runtime.generate import GenerationSettings, generate_all, read_prompts
    from ..runtime.loading import load_adapted

    if not args.prompt and sys.stdin.isatty():  # before loading anything
        raise SettingsError("give --prompt TEXT, or pipe prompts on stdin (one per line)")
    prompts = args.prompt or read_prompts(sys.stdin)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  chat_template=not args.no_chat_template)
    model, tokenizer = load_adapted(args.model, args.adapter, merge=args.merged, routing=args.routing,
                                   load_in_4bit=load_in_4bit_of(args))
    context = contextlib.nullcontext()
    if args.routing and not args.merged:
        if not is_mor_model(model):
            raise SettingsError("--routing needs a MoR or MoE-LoRA adapter (--adapter)")
        context = model.fixed_routing(args.routing)
    torch.manual_seed(args.seed)
    with context:
        for text in prompts:
            if len(prompts) > 1:
                print(f"> {text}", file=sys.stderr, flush=True)
            generate_all(model, tokenizer, [text], settings)
    return 0


# -- convert-adapter --------------------------------------------------------------------------------

def add_convert_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("adapter", help="the old adapter folder (adapter_type 'mor', no peft_type)")
    c.add_argument("output", help="new folder (must be new or empty)")
    add_model(c)


@command("convert-adapter", "rewrite a mor 0.1 adapter folder as a peft MoR folder", arguments=add_convert_flags)
def cmd_convert_adapter(args) -> int:
    import warnings

    from ..model import convert_legacy_adapter
    from ..runtime.loading import load_model
    from ..safety import claim_output_folder

    out = claim_output_folder(args.output, overwrite=False, flag="output",
                              inputs={"adapter": args.adapter, "--model": args.model})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "legacy format" warning: converting is the point
        convert_legacy_adapter(args.adapter, out, load_model(args.model))
    print(f"Converted {args.adapter} to {out} (loads with peft.PeftModel.from_pretrained or mor.load_adapter)")
    return 0
