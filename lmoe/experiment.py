"""The multi-task experiment: does a mixture of LoRA experts beat plain LoRA on the bundled mix?

Every method gets the same data, steps, batch, sequence length, schedule and seeds; only the adapter
differs. One run = one (method, seed) = one JSON file in ``results/multitask/``; finished runs are
skipped, so the experiment resumes where it stopped. Within a run, training saves a checkpoint every
``CHECKPOINT_EVERY`` steps in ``<work-dir>/<profile>/<method>-seed<k>/`` and a killed run continues from the last one
(Trainer restores the optimizer, scheduler, data order and RNG state); a run whose training finished keeps
its adapter and goes straight to evaluation, whose loss pass is kept too (``eval-loss.json``). The work
folder records the run's settings (``run.json``); resuming under other settings is refused.

Methods (N = 8 experts of rank r = 8 on all 7 projections):

* ``base``: the untrained model (greedy decoding, so one seed says everything; run for seed 0 only).
* ``lora``: PEFT LoRA whose rank is chosen so its trainable parameters match ``lmoe``'s, gates included.
* ``lora-r``: PEFT LoRA of rank r (rank-matched to one expert).
* ``lmoe`` (dense softmax, delta), ``lmoe-factor`` (dense softmax, factor), ``lmoe-top2`` (top-2 of N).

LoRA uses alpha = 2 * rank, as lmoe does (alpha = 16 for r = 8), so every method starts with the same
update scale alpha / r = 2.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("base", "lora", "lora-r", "lmoe", "lmoe-factor", "lmoe-top2")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Profile:
    name: str
    seq_len: int
    batch_size: int
    max_steps: int
    lr: float
    # test examples per task: loss / accuracy pass, and the generation-scored tasks (gsm8k, mbpp)
    eval_limit: int
    gen_limit: int
    max_new_tokens: int
    num_experts: int = 8
    rank: int = 8
    warmup_ratio: float = 0.05
    aux_loss_coef: float = 1e-2
    model: str = "smollm2-135m"  # anything lmoe.models.load_model takes (tests use a tiny model folder)
    lr_by_method: dict = field(default_factory=dict)  # per-method learning rate (validated on the sweep); else lr
    extra: dict = field(default_factory=dict)

    def lr_for(self, method: str) -> float:
        return self.lr_by_method.get(method, self.lr)


# Each method's learning rate as picked on the validation split by the sweep below (docs/results.md, "Tuning
# sweep"): LoRA best at 1e-3; rank-8 LoRA, L-MoE, factor and top-2 at 3e-3 (1e-2 is worse for lmoe and lora-r).
TUNED_LR = {"lora": 1e-3, "lora-r": 3e-3, "lmoe": 3e-3, "lmoe-factor": 3e-3, "lmoe-top2": 3e-3}

PROFILES = {
    # Fits a 2-core CPU: ~25 min per trained run (~14 s per step of 8 x 256 tokens, ~5 min of evaluation).
    # Test subsets: the first rows of each test file. One shared learning rate (chosen before the sweep).
    "cpu": Profile("cpu", seq_len=256, batch_size=8, max_steps=80, lr=3e-4, eval_limit=100, gen_limit=25,
                   max_new_tokens=192),
    # The cpu profile with each method at its validated learning rate.
    "cpu-tuned": Profile("cpu-tuned", seq_len=256, batch_size=8, max_steps=80, lr=3e-4, eval_limit=100, gen_limit=25,
                         max_new_tokens=192, lr_by_method=dict(TUNED_LR)),
    # For a GPU: full test sets, longer training, the rates validated on the CPU sweep (40 steps of batch 8:
    # re-check them with a sweep at this scale before trusting a comparison).
    "gpu": Profile("gpu", seq_len=512, batch_size=16, max_steps=2000, lr=2e-4, eval_limit=0, gen_limit=0,
                   max_new_tokens=384, lr_by_method=dict(TUNED_LR)),
}


# The tuning sweep (issue 5): a validation split carved from train (never test), half the cpu profile's
# steps, validation loss only. Each point is (method, Profile overrides); the aux and N/r points use the
# lr the lr points pick for lmoe (1e-3 if it is not yet known, see docs/results.md).
SWEEP_VAL_PER_TASK = 40
SWEEP_PROFILE = dict(name="sweep", seq_len=256, batch_size=8, max_steps=40, lr=3e-4, eval_limit=0, gen_limit=0,
                     max_new_tokens=0)
SWEEP = {
    "lora-lr3e-4": ("lora", {"lr": 3e-4}),
    "lora-lr1e-3": ("lora", {"lr": 1e-3}),
    "lora-lr3e-3": ("lora", {"lr": 3e-3}),
    "lmoe-lr3e-4": ("lmoe", {"lr": 3e-4}),
    "lmoe-lr1e-3": ("lmoe", {"lr": 1e-3}),
    "lmoe-lr3e-3": ("lmoe", {"lr": 3e-3}),
    "lmoe-lr1e-2": ("lmoe", {"lr": 1e-2}),
    # At L-MoE's validated lr (3e-3, best of the lr points above): the aux-loss weight (1e-2 is lmoe-lr3e-3)
    # and N / r at a fixed parameter budget (N·r = 64; the gates grow with N).
    "lmoe-aux0": ("lmoe", {"lr": 3e-3, "aux_loss_coef": 0.0}),
    "lmoe-aux1e-3": ("lmoe", {"lr": 3e-3, "aux_loss_coef": 1e-3}),
    "lmoe-aux1e-1": ("lmoe", {"lr": 3e-3, "aux_loss_coef": 1e-1}),  # added: the tuned run's last layers collapse
    "lmoe-N4r16": ("lmoe", {"lr": 3e-3, "num_experts": 4, "rank": 16}),
    "lmoe-N16r4": ("lmoe", {"lr": 3e-3, "num_experts": 16, "rank": 4}),
    # Added in session 5: the rates the cpu-tuned profile first borrowed (lora-r from lora, the variants from
    # lmoe), now checked on the same validation split.
    "lora-r-lr3e-4": ("lora-r", {"lr": 3e-4}),
    "lora-r-lr1e-3": ("lora-r", {"lr": 1e-3}),
    "lora-r-lr3e-3": ("lora-r", {"lr": 3e-3}),
    "lora-r-lr1e-2": ("lora-r", {"lr": 1e-2}),
    "lmoe-factor-lr1e-3": ("lmoe-factor", {"lr": 1e-3}),
    "lmoe-factor-lr3e-3": ("lmoe-factor", {"lr": 3e-3}),
    "lmoe-factor-lr1e-2": ("lmoe-factor", {"lr": 1e-2}),
    "lmoe-top2-lr1e-3": ("lmoe-top2", {"lr": 1e-3}),
    "lmoe-top2-lr3e-3": ("lmoe-top2", {"lr": 3e-3}),
    "lmoe-top2-lr1e-2": ("lmoe-top2", {"lr": 1e-2}),
}


def run_sweep_point(name: str, out_dir: Path, work_dir: Path, seed: int = 0, progress: bool = True) -> dict:
    """Train sweep point ``name`` on train minus the validation split; write its validation losses."""
    from .dataset import BUNDLED_DATA, load_examples, split_validation
    from .evaluate import evaluate

    method, overrides = SWEEP[name]
    profile = Profile(**{**SWEEP_PROFILE, **overrides})
    t0 = time.time()
    train, val = split_validation(load_examples([BUNDLED_DATA], split="train"), SWEEP_VAL_PER_TASK, seed=seed)
    tr = train_method(method, seed, profile, train, work_dir / f"sweep-{name}", progress)
    res = evaluate(tr.model, tr.tokenizer, val, seq_len=profile.seq_len, batch_size=profile.batch_size,
                   progress=progress, generate_tasks=False)
    val_loss = {t: m["test_loss"] for t, m in res["tasks"].items()}
    result = {"point": name, "method": method, "seed": seed, "settings": asdict(profile),
              "trainable_params": tr.trainable_params, "train_tokens": tr.train_tokens,
              "val_per_task": SWEEP_VAL_PER_TASK,
              "val_loss": val_loss, "val_loss_mean": sum(val_loss.values()) / len(val_loss),
              "wall_s": round(time.time() - t0, 1)}
    if tr.collapsed is not None:
        result["collapsed_layers"] = tr.collapsed
    _write_json(out_dir / f"{name}.json", result)
    return result


def build_method(method: str, model, profile: Profile):
    """Wrap ``model`` for ``method``; returns the trainable model (or the base for ``base``)."""
    from peft import LoraConfig, get_peft_model

    from .config import LMoEConfig
    from .model import get_lmoe_model

    n, r = profile.num_experts, profile.rank
    if method == "base":
        return model
    if method.startswith("lmoe"):
        kw = {"lmoe": {}, "lmoe-factor": {"composition": "factor"},
              "lmoe-top2": {"router": "topk", "top_k": 2}}[method]
        return get_lmoe_model(model, LMoEConfig(num_experts=n, rank=r, alpha=2 * r, target_modules=TARGETS,
                                                aux_loss_coef=profile.aux_loss_coef, **kw))
    if method in ("lora", "lora-r"):
        rank = r if method == "lora-r" else matched_lora_rank(model, n, r)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def matched_lora_rank(model, n: int, r: int) -> int:
    """LoRA rank whose parameter count is closest to L-MoE's N*r*(in+out) + N*in (gates) per layer."""
    import torch.nn as nn

    shapes = [(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    lmoe = sum(n * r * (i + o) + n * i for i, o in shapes)
    per_rank = sum(i + o for i, o in shapes)
    return max(1, round(lmoe / per_rank))


CHECKPOINT_EVERY = 20  # training steps between the checkpoints a killed run resumes from


@dataclass
class Trained:
    """What ``train_method`` returns: the trained model and the facts the result JSON records."""
    model: object
    tokenizer: object
    trainable_params: int = 0
    train_tokens: int = 0
    train_s: float = 0.0  # training wall time, summed over the pieces of a resumed run
    resumed_from_step: int | None = None  # the checkpoint step a killed run continued from
    collapsed: dict | None = None  # L-MoE: layers whose load entropy was below 0.5 at the last logging step


def _claim_run_dir(run_dir: Path, method: str, seed: int, profile: Profile) -> None:
    """Record the run's settings in ``run.json``; refuse a folder that holds a run under other settings."""
    want = {"method": method, "seed": seed, "settings": asdict(profile)}
    path = run_dir / "run.json"
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in set(have.get("settings", {})) | set(want["settings"])
                          if have.get("settings", {}).get(k) != want["settings"].get(k))
            raise RuntimeError(f"{run_dir} holds a run with other settings ({', '.join(diff) or 'method/seed'} "
                               f"differ); remove the folder or pass another --work-dir")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, want)


def _load_trained(method: str, model, adapter: Path):
    if method.startswith("lmoe"):
        from .model import LMoEModel

        return LMoEModel.from_pretrained(model, adapter)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter))


def train_method(method: str, seed: int, profile: Profile, examples: list[dict], run_dir: Path,
                 progress: bool = True) -> Trained:
    """Load the model, wrap it for ``method`` and train it on ``examples`` with ``profile``'s settings.

    Resumable in ``run_dir`` (see the module docstring); ``base`` is returned untrained."""
    import shutil

    import torch
    from transformers import TrainerCallback, TrainingArguments, set_seed

    from .dataset import DataCollator, build_dataset
    from .inspect import CollapseDetector
    from .models import load_model
    from .train import CSVLogger, LMoETrainer, checkpoints, latest_checkpoint

    set_seed(seed)
    model, tok = load_model(profile.model)
    if method == "base":
        return Trained(model, tok)
    _claim_run_dir(run_dir, method, seed, profile)
    done, adapter = run_dir / "trained.json", run_dir / "adapter"
    if done.exists():  # trained by an earlier process: evaluate its adapter
        model = _load_trained(method, model, adapter)
        return Trained(model, tok, **json.loads(done.read_text()))
    (run_dir / "eval-loss.json").unlink(missing_ok=True)  # a loss pass of an earlier adapter, if any
    model = build_method(method, model, profile)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_ds, _ = build_dataset(tok, examples, profile.seq_len, seed=seed)
    targs = TrainingArguments(
        output_dir=str(run_dir), max_steps=profile.max_steps, per_device_train_batch_size=profile.batch_size,
        learning_rate=profile.lr_for(method), lr_scheduler_type="cosine", warmup_steps=profile.warmup_ratio, seed=seed,
        data_seed=seed, logging_steps=10, save_strategy="steps", save_steps=CHECKPOINT_EVERY, save_total_limit=1,
        report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=not progress)
    resume = latest_checkpoint(run_dir)
    elapsed = Path(resume or run_dir) / "elapsed.json"  # absent if killed between the checkpoint and this file
    before = json.loads(elapsed.read_text())["train_s"] if resume and elapsed.exists() else 0.0
    t0 = time.time()

    class Elapsed(TrainerCallback):  # each checkpoint records the training time spent up to it
        def on_save(self, args, state, control, **kwargs):
            _write_json(run_dir / f"checkpoint-{state.global_step}" / "elapsed.json",
                        {"train_s": round(before + time.time() - t0, 1)})

    collapse = CollapseDetector(threshold=0.5)  # logs a warning; the last check goes in the result
    trainer = LMoETrainer(model=model, args=targs, train_dataset=train_ds, data_collator=DataCollator(tok.pad_token_id),
                          callbacks=[CSVLogger(run_dir / "log.csv"), Elapsed(), collapse])
    if resume:
        print(f"resuming {run_dir.name} from {Path(resume).name}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    model.save_pretrained(str(adapter))  # for evaluation after a restart and `lmoe inspect` (not committed)
    result = Trained(model, tok, trainable, int(trainer.state.num_input_tokens_seen), round(before + time.time() - t0, 1),
                     int(Path(resume).name.split("-")[-1]) if resume else None,
                     {k: round(v, 4) for k, v in collapse.collapsed.items()} if method.startswith("lmoe") else None)
    _write_json(done, {k: getattr(result, k) for k in ("trainable_params", "train_tokens", "train_s",
                                                        "resumed_from_step", "collapsed")})
    for ckpt in checkpoints(run_dir):  # optimizer state (~3x the adapter): no longer needed
        shutil.rmtree(ckpt)
    return result


def run_one(method: str, seed: int, profile: Profile, out_dir: Path, work_dir: Path, progress: bool = True) -> dict:
    from .dataset import BUNDLED_DATA, load_examples

    t0 = time.time()
    run_dir = work_dir / profile.name / f"{method}-seed{seed}"
    examples = load_examples([BUNDLED_DATA], split="train")
    tr = train_method(method, seed, profile, examples, run_dir, progress)
    train_s = tr.train_s if method != "base" else time.time() - t0
    t1 = time.time()
    metrics, routing, cached_eval_s = evaluate_suite(tr.model, tr.tokenizer, profile, progress=progress,
                                                     cache_dir=None if method == "base" else run_dir)
    result = {"method": method, "seed": seed, "profile": profile.name, "trainable_params": tr.trainable_params,
              "train_tokens": tr.train_tokens, "metrics": metrics,
              "train_wall_s": round(train_s, 1), "total_wall_s": round(train_s + cached_eval_s + time.time() - t1, 1),
              "settings": asdict(profile)}
    if tr.resumed_from_step is not None:
        result["resumed_from_step"] = tr.resumed_from_step
    if tr.collapsed is not None:
        result["collapsed_layers"] = tr.collapsed  # {layer: load entropy} below 0.5 at the last logging step
    if routing is not None:
        result["routing_mean_entropy"] = routing
    _write_json(out_dir / f"{method}-seed{seed}.json", result)
    return result


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def bundled_test_rows() -> dict[str, list[dict]]:
    """The bundled test rows grouped by task, in file order (a profile scores the first ``eval_limit`` of each)."""
    from .dataset import BUNDLED_DATA, load_examples

    by_task: dict[str, list] = {}
    for ex in load_examples([BUNDLED_DATA], split="test"):
        by_task.setdefault(ex["task"], []).append(ex)
    return by_task


def evaluate_suite(model, tok, profile: Profile, progress: bool = True, cache_dir: Path | None = None):
    """Per-task test metrics in the experiment's JSON shape, the mean routing entropy (lmoe only) and the
    seconds a cached loss pass took when it ran (``cache_dir/eval-loss.json``: kept, and reused if there)."""
    from .evaluate import evaluate

    by_task = bundled_test_rows()
    cut = lambda rows, k: rows[:k] if k else rows  # noqa: E731
    loss_rows = [ex for rows in by_task.values() for ex in cut(rows, profile.eval_limit)]
    cached = cache_dir / "eval-loss.json" if cache_dir is not None else None
    if cached is not None and cached.exists():
        res = json.loads(cached.read_text())
        earlier_s = res.pop("wall_s")
    else:
        t0 = time.time()
        res = evaluate(model, tok, loss_rows, seq_len=profile.seq_len, batch_size=profile.batch_size,
                       progress=progress, generate_tasks=False, per_example=True)
        earlier_s = 0.0
        if cached is not None:
            _write_json(cached, {**res, "wall_s": round(time.time() - t0, 1)})
    gen_rows = [ex for t in ("gsm8k", "mbpp") for ex in cut(by_task.get(t, []), profile.gen_limit)]
    gen = evaluate(model, tok, gen_rows, seq_len=profile.seq_len, batch_size=profile.batch_size,
                   progress=progress, generate_tasks=True, max_new_tokens=profile.max_new_tokens,
                   per_example=True) if gen_rows else None
    metrics = {}
    for task, m in res["tasks"].items():
        entry = {"test_loss": m["test_loss"], "perplexity": m["perplexity"], "examples": m["examples"]}
        per = dict(m.get("per_example", {}))
        if "accuracy" in m:
            entry["accuracy"] = m["accuracy"]
            entry["accuracy_norm"] = m.get("accuracy_norm")
        if gen is not None and task in gen["tasks"]:
            g = gen["tasks"][task]
            for key in ("exact_match", "pass@1", "syntax_error_rate"):
                if key in g:
                    entry[key] = g[key]
            entry["generated_examples"] = g["examples"]
            per.update({k: v for k, v in g.get("per_example", {}).items() if k != "loss"})
        entry["per_example"] = per  # row-ordered lists for the paired bootstrap
        metrics[task] = entry
    routing = res.get("routing", {}).get("mean_entropy")
    return metrics, routing, earlier_s


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="The multi-task experiment (resumable: finished runs are skipped).")
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default=None, help="default results/multitask (cpu), results/multitask-<profile>, "
                                                 "results/sweep (--sweep)")
    p.add_argument("--work-dir", default="runs/multitask",
                   help="per run: checkpoints, adapter, logs in <work-dir>/<profile>/<method>-seed<k> (not committed)")
    p.add_argument("--max-steps", type=int, default=None, help="override the profile (smoke tests)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--gen-limit", type=int, default=None)
    p.add_argument("--sweep", nargs="*", default=None, metavar="POINT",
                   help=f"run tuning-sweep points instead (none named: all); known: {', '.join(SWEEP)}")
    a = p.parse_args(argv)
    if a.sweep is not None:
        names = a.sweep or list(SWEEP)
        unknown = [n for n in names if n not in SWEEP]
        if unknown:
            p.error(f"unknown sweep point(s) {', '.join(unknown)}; known: {', '.join(SWEEP)}")
        out = Path(a.out or "results/sweep")
        for name in names:
            if (out / f"{name}.json").exists():
                print(f"skip {out / name}.json (done)")
                continue
            print(f"sweep {name}", flush=True)
            r = run_sweep_point(name, out, Path(a.work_dir))
            print(json.dumps({k: r[k] for k in ("point", "val_loss_mean", "wall_s")}), flush=True)
        return 0
    profile = PROFILES[a.profile]
    for k in ("max_steps", "eval_limit", "gen_limit"):
        if getattr(a, k) is not None:
            setattr(profile, k, getattr(a, k))
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    out = Path(a.out or ("results/multitask" if a.profile == "cpu" else f"results/multitask-{a.profile}"))
    for seed in a.seeds:
        for method in a.methods:
            if method == "base" and seed != a.seeds[0]:
                continue  # deterministic: one run says everything
            path = out / f"{method}-seed{seed}.json"
            if path.exists():
                print(f"skip {path} (done)")
                continue
            print(f"run {method} seed {seed} ({a.profile})", flush=True)
            r = run_one(method, seed, profile, out, Path(a.work_dir))
            print(json.dumps({k: r[k] for k in ("method", "seed", "trainable_params", "total_wall_s")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
