"""The ``lmoe`` command line: ``train``, ``eval``, ``generate``.

A thin layer over the library. ``lmoe`` with no arguments (or ``lmoe train`` with neither ``--model`` nor
``--data``) runs the embedded demo: SmolLM2-135M on the bundled five-task mix, a short training run, an
evaluation on a slice of the test sets and one generation. Flags override values from ``--config FILE.yaml``
(keys are the flags' names with underscores). ``--method NAME`` starts the adapter config from a preset
(``lmoe.presets``); only the adapter flags given explicitly (or in the YAML) override it. Errors a user can cause are printed as one line
``lmoe: error: ...`` with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .config import ROUTERS

# Train-flag defaults, and the demo's (used when neither --model nor --data is given and the flag is unset).
TRAIN_DEFAULTS = {"max_steps": 200, "batch_size": 8, "seq_len": 512, "eval_limit": 0}
DEMO = {"max_steps": 30, "batch_size": 4, "seq_len": 256, "eval_limit": 8}
_REGEX_CHARS = set(".*()[]|^$+?\\")
# LMoEConfig fields set by flags of the same name; their flags default to None ("not given"), so that a
# --method preset keeps its values for every flag the user did not pass.
LMOE_FLAGS = ("num_experts", "rank", "alpha", "dropout", "composition", "router", "top_k", "aux_loss_coef",
              "z_loss_coef", "capacity_factor", "shared_experts", "share_A", "lbc_loss_coef", "lbc_delta")


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="smollm2-135m (default), a HF model id or folder, or a .gguf file")
    p.add_argument("--data", nargs="+", default=None,
                   help="jsonl files or folders (default: the bundled five-task mix)")
    p.add_argument("--seq-len", type=int, default=512, help="maximum tokens per example (prompt cut from the left)")
    p.add_argument("--batch-size", type=int, default=8)


def _float_or_none(text: str):
    """``--capacity-factor``: a number, or 'none' (kept as the string until the config is built: None means unset)."""
    return "none" if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmoe", description="Mixtures of LoRA experts: train, evaluate, generate.")
    sub = parser.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train an L-MoE adapter (Trainer under the hood)")
    t.add_argument("--config", default=None, help="YAML file of defaults; flags override it")
    _add_model_args(t)
    t.add_argument("--output-dir", default=None, help="where checkpoints and the final adapter go")
    t.add_argument("--max-steps", type=int, default=None, help="default 200 (demo: 30)")
    t.add_argument("--method", default=None,
                   help="start from a method preset: lmoe, lmoe-factor, mola, hydralora, shared-expert, llava-mole, "
                        "switch, noisy-topk (docs/methods.md); adapter flags given explicitly override it")
    t.add_argument("--num-experts", type=int, nargs="+", default=None,
                   help="default 8; several values: per depth group (e.g. 2 4 6 8 for quarters)")
    t.add_argument("--rank", type=int, default=None, help="default 8")
    t.add_argument("--alpha", type=float, default=None, help="default 16")
    t.add_argument("--dropout", type=float, default=None, help="default 0")
    t.add_argument("--composition", default=None, help="delta (default) | factor")
    t.add_argument("--router", default=None, help="softmax (default) | " + " | ".join(r for r in ROUTERS if r != "softmax"))
    t.add_argument("--top-k", type=int, default=None, help="default 2")
    t.add_argument("--aux-loss-coef", type=float, default=None, help="default 0.01")
    t.add_argument("--z-loss-coef", type=float, default=None, help="default 0")
    t.add_argument("--capacity-factor", type=_float_or_none, default=None,
                   help="switch router: expert capacity factor (default 1.25; 'none': no limit)")
    t.add_argument("--shared-experts", type=int, default=None, help="always-on experts (default 0)")
    t.add_argument("--lbc-loss-coef", type=float, default=None,
                   help="LoRAMoE's localised balancing constraint weight (default 0: off); the bundled tasks' types "
                        "(lmoe.dataset.BUNDLED_TASK_TYPES) are then passed to the model")
    t.add_argument("--lbc-delta", type=float, default=None, help="LoRAMoE's delta in I = 1 +- delta (default 0)")
    t.add_argument("--share-A", dest="share_A", action=argparse.BooleanOptionalAction, default=None,
                   help="one A shared by all experts (HydraLoRA); default off")
    t.add_argument("--target-modules", nargs="+", default=None,
                   help="module names/suffixes, or one regex (default: the 7 Llama projections)")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--lr-scheduler", default="cosine", help="any transformers scheduler name")
    t.add_argument("--warmup-ratio", type=float, default=0.05)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mix", default="proportional", help="proportional | uniform task mixing")
    t.add_argument("--loss-on", default="answer", help="answer (default) | all tokens")
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every K steps (0: only the final adapter)")
    t.add_argument("--eval-steps", type=int, default=0, help="validation loss every K steps (0: never)")
    t.add_argument("--val-per-task", type=int, default=16, help="validation examples carved from train per task")
    t.add_argument("--eval-limit", type=int, default=None,
                   help="after training, evaluate on the first N test examples per task (default 0: skip; demo: 8)")
    t.add_argument("--logging-steps", type=int, default=5)
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU; very slow on most CPUs)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    t.add_argument("--overwrite-output-dir", action="store_true", help="replace a finished run in --output-dir")
    t.add_argument("--report-to", default="none", help="none | tensorboard | wandb ... (log.csv is always written)")
    t.set_defaults(seq_len=None, batch_size=None)  # filled from TRAIN_DEFAULTS or DEMO

    e = sub.add_parser("eval", help="per-task test loss / perplexity / accuracy")
    _add_model_args(e)
    e.add_argument("--adapter", default=None, help="adapter folder (omit to evaluate the base model)")
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="first N examples per task")
    e.add_argument("--output", default=None,
                   help="JSON path, with a .md report beside it (default: <adapter>/eval.json or ./eval.json)")
    e.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation budget for gsm8k exact match / mbpp pass@1 (0: skip generation)")

    g = sub.add_parser("generate", help="generate text (chat template when the tokenizer has one)")
    g.add_argument("--model", default=None)
    g.add_argument("--adapter", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    from .inspect import add_parser as add_inspect_parser

    add_inspect_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            args = _apply_yaml(parser, argv, args)
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "inspect":
            from .inspect import cmd_inspect

            return cmd_inspect(args)
        return cmd_generate(args)
    except UsageError as e:
        print(f"lmoe: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError, PermissionError) as e:
        print(f"lmoe: error: {e}", file=sys.stderr)
        return 2


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    if not args.config:
        return args
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise UsageError(f"config file '{path}' does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values")
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # the 'train' sub-parser
    known = {a.dest for a in train_parser._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known - {"config"})
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {', '.join(unknown)}")
    train_parser.set_defaults(**values)
    return parser.parse_args(argv)  # flags given on the command line win over the YAML values


def _lmoe_config(args):
    """The adapter config: the --method preset (or LMoEConfig's defaults), then the flags given explicitly."""
    from .config import LMoEConfig

    kw = {k: getattr(args, k) for k in LMOE_FLAGS if getattr(args, k, None) is not None}
    if isinstance(kw.get("num_experts"), list) and len(kw["num_experts"]) == 1:
        kw["num_experts"] = kw["num_experts"][0]
    if kw.get("capacity_factor") == "none":
        kw["capacity_factor"] = None
    if args.target_modules:
        tm = args.target_modules
        kw["target_modules"] = tm[0] if len(tm) == 1 and set(tm[0]) & _REGEX_CHARS else list(tm)
    method = getattr(args, "method", None)
    config = LMoEConfig.from_preset(method, **kw) if method else LMoEConfig(**kw)
    for k in LMOE_FLAGS:
        setattr(args, k, getattr(config, k))  # train_summary.json records the values used
    return config


def _check_positive(args, *names: str) -> None:
    for name in names:
        v = getattr(args, name)
        if v is None or v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _check_train_numbers(args) -> None:
    _check_positive(args, "max_steps", "batch_size", "grad_accum", "seq_len", "logging_steps")
    for name in ("save_steps", "eval_steps", "val_per_task", "eval_limit"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")


def _check_scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise UsageError(f"--lr-scheduler must be one of {', '.join(names)}; got {name!r}")


def _check_model_arg(name: str | None) -> None:
    """Fail fast on a model given as a path that is not there (instead of asking the hub for it)."""
    if name is None:
        return
    path = Path(name).expanduser()
    looks_like_path = path.is_absolute() or name.startswith((".", "~")) or name.endswith(".gguf")
    if looks_like_path and not path.exists():
        raise UsageError(f"model path '{name}' does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"'{name}' is not a model folder: config.json is missing")


def _load_base(name: str | None):
    """``load_model`` with a one-line error for what a bad model folder or file raises."""
    from .models import load_model

    try:
        return load_model(name or "smollm2-135m")
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot load model '{name or 'smollm2-135m'}': {first}") from None


def _is_rank0() -> bool:
    """Rank 0 of a torchrun launch (or a plain process); decided before Trainer sets up distributed."""
    return int(os.environ.get("RANK", "0")) == 0


# What ``lmoe train`` writes at the top of its output directory (``--overwrite-output-dir`` removes these).
_RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_summary.json", "log.csv", "eval.json")


def _finished_run(out: Path) -> bool:
    return (out / "adapter_config.json").is_file() and (out / "train_summary.json").is_file()


def _finished_step(out: Path) -> int | None:
    """The step a finished run stopped at (None if unreadable)."""
    try:
        summary = json.loads((out / "train_summary.json").read_text())
        return int(summary.get("global_step", summary["args"]["max_steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clear_run(out: Path) -> None:
    """Remove a previous run's outputs (only the files ``lmoe train`` writes), for --overwrite-output-dir."""
    from .train import checkpoints

    for ckpt in checkpoints(out):
        shutil.rmtree(ckpt)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)


def cmd_train(args) -> int:
    from .train import checkpoints, latest_checkpoint

    demo = args.model is None and args.data is None
    for k, v in (DEMO if demo else TRAIN_DEFAULTS).items():  # the demo is short enough for a 2-core CPU
        if getattr(args, k) is None:
            setattr(args, k, v)
    _check_train_numbers(args)
    config = _lmoe_config(args)  # validates before anything slow happens
    if args.mix not in ("proportional", "uniform"):
        raise UsageError(f"--mix must be proportional or uniform, got {args.mix!r}")
    if args.loss_on not in ("answer", "all"):
        raise UsageError(f"--loss-on must be answer or all, got {args.loss_on!r}")
    _check_scheduler(args.lr_scheduler)
    _check_model_arg(args.model)
    out = Path(args.output_dir or f"runs/lmoe-{time.strftime('%Y%m%d-%H%M%S')}")
    rank0 = _is_rank0()
    resume_from = None
    if args.resume and args.overwrite_output_dir:
        raise UsageError("--resume and --overwrite-output-dir exclude each other")
    if args.resume:
        done = _finished_step(out) if _finished_run(out) else None
        if done is not None and done >= args.max_steps:
            if rank0:
                print(f"lmoe: '{out}' already holds a run finished at step {done} (--max-steps {args.max_steps}); "
                      f"nothing to resume", file=sys.stderr)
            return 0
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            raise UsageError(f"--resume: no complete checkpoint-* folder in '{out}'")
    elif not args.overwrite_output_dir:
        if _finished_run(out):
            raise UsageError(f"'{out}' already holds a finished run; pass --resume to continue it or "
                             f"--overwrite-output-dir to replace it")
        if checkpoints(out):
            raise UsageError(f"'{out}' holds checkpoints of an unfinished run; pass --resume to continue it or "
                             f"--overwrite-output-dir to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory '{out}': {e.strerror}") from None
    _check_writable(out)
    if args.overwrite_output_dir and rank0:
        _clear_run(out)

    import torch
    from transformers import TrainingArguments, set_seed

    from .dataset import (BUNDLED_DATA, BUNDLED_TASK_TYPES, DataCollator, build_dataset, load_examples,
                          split_validation)
    from .model import _atomic_write, get_lmoe_model
    from .inspect import CollapseDetector
    from .train import CSVLogger, LMoETrainer

    set_seed(args.seed)
    examples = load_examples(args.data or [BUNDLED_DATA], split="train")
    val = []
    if args.eval_steps:
        examples, val = split_validation(examples, args.val_per_task, seed=args.seed)
    if rank0:
        print(f"lmoe: loading model {args.model or 'smollm2-135m'}", file=sys.stderr)
    model, tokenizer = _load_base(args.model)
    set_seed(args.seed)
    lmoe_model = get_lmoe_model(model, config)
    if rank0:
        lmoe_model.print_trainable_parameters()
    train_ds, stats = build_dataset(tokenizer, examples, args.seq_len, mix=args.mix, seed=args.seed,
                                    loss_on=args.loss_on)
    if rank0:
        _print_data_stats(stats)
    eval_ds = build_dataset(tokenizer, val, args.seq_len, seed=args.seed, loss_on=args.loss_on)[0] if val else None

    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup_ratio,  # < 1: a ratio
        weight_decay=args.weight_decay, seed=args.seed, data_seed=args.seed,
        logging_steps=args.logging_steps, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=args.eval_steps or None, remove_unused_columns=False, report_to=args.report_to,
        bf16=args.bf16, activation_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # LMoETrainer stops on a non-finite loss; the filter would hide it
        ddp_find_unused_parameters=False,  # every adapter parameter is used in every forward
    )
    trainer = LMoETrainer(model=lmoe_model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                          # LoRAMoE's localised balancing constraint needs each sample's task type
                          data_collator=DataCollator(tokenizer.pad_token_id, task_types=BUNDLED_TASK_TYPES
                                                     if config.lbc_loss_coef > 0 else None),
                          callbacks=[CSVLogger(out / "log.csv"), CollapseDetector(threshold=0.5)])
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.time() - t0
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        _end_distributed()
        return 0
    trainable, total = lmoe_model.num_parameters_split()
    summary = {"model": args.model or "smollm2-135m", "lmoe_config": config.to_dict(),
               "args": {k: v for k, v in vars(args).items() if k != "command"},
               "trainable_params": trainable, "total_params": total, "data": stats,
               "global_step": trainer.state.global_step, "resumed_from": resume_from,
               "train_loss": result.training_loss, "train_wall_s": round(wall, 1),
               "train_tokens": int(trainer.state.num_input_tokens_seen)}
    # Written last and atomically: its presence is what marks the run as finished.
    text = json.dumps(summary, indent=2, default=str) + "\n"
    _atomic_write(out / "train_summary.json", lambda p: p.write_text(text))
    print(f"lmoe: adapter saved to {out}/ (adapter_config.json, adapter_model.safetensors); log: {out}/log.csv")
    _end_distributed()

    if args.eval_limit:
        _evaluate_and_report(lmoe_model, tokenizer, args.data, args.seq_len, args.batch_size, args.eval_limit,
                             out / "eval.json", max_new_tokens=192 if demo else 256)
    if demo:
        prompt = "Question: Which gas do plants absorb from the air?\nAnswer:"
        print(f"\nlmoe: sample generation\n> {prompt}\n{_generate(lmoe_model, tokenizer, prompt, 32, False)}")
        print(f"\nlmoe: demo finished; outputs in {out}/")
    return 0


def _end_distributed() -> None:
    """Leave the process group cleanly once this rank has no collective left to run.

    Two failure modes seen in CI, both at the group's teardown:
    * a rank that exits with its gloo group never destroyed can abort at interpreter shutdown (SIGABRT,
      "terminate called without an active exception");
    * a deadlock: gloo's worker thread frees the last collective's work object (Trainer's final barrier)
      *after* the caller has returned from it, and freeing its tensors needs the GIL; if DDP's Reducer (which
      holds the group) is freed meanwhile, the group's destructor joins that worker while holding the GIL.
    So: first let the workers finish (sleeping releases the GIL), then destroy the group. Nothing collective
    follows, so a rank may do this while another still works (rank 0 writes the summary)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for _ in range(5):  # ~0.5 s in short sleeps, each a chance for the worker to take the GIL
            time.sleep(0.1)
        dist.destroy_process_group()


def _check_writable(out: Path) -> None:
    probe = out / f".lmoe-write-test-{os.getpid()}"  # one per process: DDP ranks probe at the same time
    try:
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()  # a disk-full write may have left a partial probe behind
        raise UsageError(f"output directory '{out}' is not writable: {e.strerror}") from None


def _print_data_stats(stats: dict) -> None:
    parts = [f"{t}: {n} examples ({stats['truncated'][t]} truncated)" for t, n in stats["count"].items()]
    print("lmoe: training data: " + "; ".join(parts), file=sys.stderr)


def _evaluate_and_report(model, tokenizer, data, seq_len, batch_size, limit, out_path, split="test",
                         max_new_tokens=256):
    from .dataset import BUNDLED_DATA, load_examples
    from .evaluate import evaluate, format_table, save_results

    examples = load_examples(data or [BUNDLED_DATA], split=split)
    results = evaluate(model, tokenizer, examples, seq_len=seq_len, batch_size=batch_size, limit=limit,
                       generate_tasks=max_new_tokens > 0, max_new_tokens=max(max_new_tokens, 1))
    print(format_table(results))
    save_results(results, out_path, markdown=True)
    print(f"lmoe: evaluation written to {out_path}")
    return results


def _load(model_name, adapter):
    from .model import LMoEModel

    _check_model_arg(model_name)
    model, tokenizer = _load_base(model_name)
    if adapter:
        model = LMoEModel.from_pretrained(model, adapter)
    return model, tokenizer


def cmd_eval(args) -> int:
    _check_positive(args, "batch_size", "seq_len")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.adapter:  # fail on a bad adapter before the (slow) model load
        from .model import load_adapter_config
        load_adapter_config(args.adapter)
    model, tokenizer = _load(args.model, args.adapter)
    out = Path(args.output) if args.output else Path(args.adapter or ".") / "eval.json"
    _evaluate_and_report(model, tokenizer, args.data, args.seq_len, args.batch_size, args.limit, out, args.split,
                         args.max_new_tokens)
    return 0


def _generate(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool) -> str:
    import torch

    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def cmd_generate(args) -> int:
    _check_positive(args, "max_new_tokens")
    if args.adapter:
        from .model import load_adapter_config
        load_adapter_config(args.adapter)
    model, tokenizer = _load(args.model, args.adapter)
    print(_generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.no_chat_template))
    return 0


if __name__ == "__main__":
    sys.exit(main())
