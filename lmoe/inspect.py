"""Routing analysis: which experts each task uses, how evenly, and whether experts specialise by task.

``routing_by_task`` runs the evaluation loss pass (``prompt + answer``, every non-padding token) once per
task with routing tracking on and returns, per task and adapted layer (N experts, T tokens, gate g_t):

* ``load``: f_i, the share of tokens dispatched to expert i (arg-max for the softmax router, top-k
  membership / k for top-k), as in the balance loss; ``mean_gate``: the mean of g_t,i.
* ``entropy``: mean over tokens of H(g_t) / log N — how soft each token's own mixture is.
* ``effective_experts``: mean over tokens of exp(H(g_t)), from 1 (one expert per token) to N.
* ``load_entropy``: H(f) / log N — how evenly the *tokens* spread over experts (balance), whatever
  each token's gate looks like: 1 = every expert gets the same share; 0 = every token goes to one
  expert; the tokens are spread as if over exp(load_entropy · ln N) equally used experts (0.5 at
  N = 8: about 2.8 experts).

``specialisation_score`` says whether experts specialise by task. Per layer it is the generalised
Jensen-Shannon divergence of the tasks' distributions P_t (``load`` by default, or ``mean_gate``), with
every task weighted equally (so the test-set sizes do not matter), normalised to [0, 1]:

    S = [ H(mean_t P_t) - mean_t H(P_t) ] / log min(K, N)        (K tasks, natural logs)

With ``load`` and the softmax router this is the mutual information I(task; arg-max expert) for a task
drawn uniformly, divided by its largest possible value: 0 = all tasks route identically; 1 = the tasks
use disjoint sets of experts (when K <= N). It is a statement about routing, not about quality.

``CollapseDetector`` is a ``TrainerCallback`` that warns when a layer's ``load_entropy`` falls below a
threshold; ``add_parser``/``cmd_inspect`` are the ``lmoe inspect`` command. Plots use matplotlib's
object API (``Figure``), so no global backend is switched and no window opens; matplotlib is only
needed for the plots.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from .dataset import encode_example

logger = logging.getLogger("lmoe")
VALUES = ("mean_gate", "load")


# ---------------------------------------------------------------------------------------------
# measuring


def routing_by_task(model, tokenizer, examples: list[dict], *, seq_len: int = 512, batch_size: int = 8,
                    limit: int | None = None) -> dict:
    """``{"layers": [names], "num_experts": N, "tasks": {task: {"examples", "tokens", "layers": {name:
    {"load", "mean_gate", "entropy", "effective_experts", "load_entropy", "tokens"}}}}}`` for an
    ``LMoEModel``; ``limit`` keeps the first ``limit`` examples of every task. Eval mode and no_grad
    inside; the training mode is restored and routing tracking is left off."""
    layers = model.lmoe_layers() if callable(getattr(model, "lmoe_layers", None)) else {}
    if not layers:
        raise ValueError("routing_by_task needs an LMoEModel with adapted layers")
    if seq_len < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"seq_len and batch_size must be >= 1 and limit None or >= 1, got {seq_len}, "
                         f"{batch_size}, {limit}")
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        rows = by_task.setdefault(ex["task"], [])
        if limit is None or len(rows) < limit:
            rows.append(ex)
    if not by_task:
        raise ValueError("no examples to inspect")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    # exp(H(g_t)) summed over the non-padding tokens of each layer, read off ``last_routing`` by hooks.
    current = {"mask": None}
    eff: dict[str, list] = {}

    def hook(name):
        def read(module, inputs, output):
            if module.last_routing is None:
                return
            g = module.last_routing[1].detach().float()  # (T, N)
            e = (-(g * g.clamp_min(1e-20).log()).sum(-1)).exp()  # (T,)
            mask = current["mask"]
            if mask is not None and mask.numel() == e.numel():
                e = e[mask]
            eff[name][0] += float(e.sum())
            eff[name][1] += e.numel()
        return read

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    out = {"layers": list(layers), "num_experts": next(iter(layers.values())).num_experts, "tasks": {}}
    try:
        with torch.no_grad():
            for task, rows in by_task.items():
                eff.update({name: [0.0, 0] for name in layers})
                model.track_routing(True)
                seqs = sorted((list(encode_example(tokenizer, ex, seq_len, append_eos=False)["input_ids"])
                               for ex in rows), key=len, reverse=True)
                for b in range(0, len(seqs), batch_size):
                    batch = seqs[b:b + batch_size]
                    width = max(len(s) for s in batch)
                    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
                    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
                    for r, s in enumerate(batch):
                        input_ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                        attention_mask[r, :len(s)] = 1
                    current["mask"] = attention_mask.reshape(-1).bool().to(device)  # (B*T,)
                    model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                stats = model.routing_stats()
                model.track_routing(False)
                out["tasks"][task] = {"examples": len(rows), "tokens": sum(len(s) for s in seqs), "layers": {
                    name: {**stats[name], "effective_experts": eff[name][0] / max(eff[name][1], 1),
                           "load_entropy": load_entropy(stats[name]["load"])} for name in layers}}
    finally:
        for h in handles:
            h.remove()
        model.track_routing(False)
        model.train(was_training)
    return out


def load_entropy(load: list[float]) -> float:
    """H(f) / log N of a load vector f (normalised to sum 1): 1 = balanced, 0 = one expert; 1.0 if N == 1."""
    return _entropy(load) / math.log(len(load)) if len(load) > 1 else 1.0


def _entropy(p: list[float]) -> float:
    total = sum(p)
    return max(0.0, -sum(x / total * math.log(x / total) for x in p if x > 0)) if total > 0 else 0.0  # no -0.0


def specialisation_score(stats: dict, value: str = "load") -> dict[str, float]:
    """Per layer, ``[H(mean_t P_t) - mean_t H(P_t)] / log min(K, N)`` over the K tasks' ``value``
    distributions (see the module docstring): 0 = identical routing for every task, 1 = disjoint experts."""
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    tasks = list(stats["tasks"].values())
    if len(tasks) < 2:
        raise ValueError(f"specialisation needs at least two tasks, got {len(tasks)}")
    scores = {}
    for name in stats["layers"]:
        dists = [_normalised(t["layers"][name][value]) for t in tasks]
        n = len(dists[0])
        bound = math.log(min(len(dists), n))
        if bound == 0:
            scores[name] = 0.0
            continue
        mixture = [sum(d[i] for d in dists) / len(dists) for i in range(n)]
        jsd = _entropy(mixture) - sum(_entropy(d) for d in dists) / len(dists)
        scores[name] = min(max(jsd / bound, 0.0), 1.0)  # clamp float round-off
    return scores


def _normalised(p: list[float]) -> list[float]:
    total = sum(p)
    return [x / total for x in p] if total > 0 else [1.0 / len(p)] * len(p)


def pooled(stats: dict, name: str) -> dict:
    """One layer over all tasks, token-weighted: ``entropy``, ``effective_experts``, and the
    ``load_entropy`` of the pooled load."""
    tasks = [t["layers"][name] for t in stats["tasks"].values()]
    tokens = sum(t["tokens"] for t in tasks) or 1
    load = [sum(t["load"][i] * t["tokens"] for t in tasks) / tokens for i in range(len(tasks[0]["load"]))]
    return {"entropy": sum(t["entropy"] * t["tokens"] for t in tasks) / tokens,
            "effective_experts": sum(t["effective_experts"] * t["tokens"] for t in tasks) / tokens,
            "load_entropy": load_entropy(load)}


def blocks(names: list[str]) -> dict[int, list[str]]:
    """Adapted layers grouped by transformer block: the first ``.<number>.`` in the module path
    (``model.layers.3.self_attn.q_proj`` -> 3); paths without one each form their own group, numbered
    by position."""
    found = [re.search(r"(?:^|\.)(\d+)\.", n) for n in names]
    if not all(found):
        return {i: [n] for i, n in enumerate(names)}
    groups: dict[int, list[str]] = {}
    for name, m in zip(names, found):
        groups.setdefault(int(m.group(1)), []).append(name)
    return groups


# ---------------------------------------------------------------------------------------------
# plotting (matplotlib's object API: no pyplot state, no backend switch)


def plot_task_expert_heatmaps(stats: dict, layers: list, path, value: str = "mean_gate") -> Path:
    """One heatmap per layer (a name, or an index into ``stats["layers"]``): rows = tasks, columns =
    experts, colour and annotation = ``value`` (``mean_gate`` or ``load``). Saved as a PNG at ``path``."""
    from matplotlib.figure import Figure

    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    names = [stats["layers"][x] if isinstance(x, int) else x for x in layers]
    unknown = [n for n in names if n not in stats["layers"]]
    if unknown or not names:
        raise ValueError(f"unknown or no layers {unknown}; the adapted layers are {stats['layers'][:5]} ...")
    tasks = list(stats["tasks"])
    n = stats["num_experts"]
    spec = specialisation_score(stats, value) if len(tasks) > 1 else {}
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(0.55 * n * cols + 2.5, (0.45 * len(tasks) + 1.2) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(max(stats["tasks"][t]["layers"][name][value]) for t in tasks for name in names) or 1.0
    for ax, name in zip(axes.flat, names):
        grid = [stats["tasks"][t]["layers"][name][value] for t in tasks]  # (K, N)
        im = ax.imshow(grid, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * vmax else "white")
        ax.set_xticks(range(n), [str(j) for j in range(n)])
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("expert")
        title = _short(name) + (f"\nspecialisation {spec[name]:.2f}" if name in spec else "")
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, label=value.replace("_", " "), shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_entropy_by_layer(stats: dict, path) -> Path:
    """Per transformer block (mean over its adapted layers): per-token gate entropy and load entropy,
    one line per task, and the specialisation score. Saved as a PNG at ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups = blocks(stats["layers"])
    x = sorted(groups)
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_g, ax_l, ax_s = fig.subplots(1, 3)
    for task, t in stats["tasks"].items():
        for ax, key in ((ax_g, "entropy"), (ax_l, "load_entropy")):
            ax.plot(x, [_mean(t["layers"][n][key] for n in groups[b]) for b in x], marker=".", label=task)
    if len(stats["tasks"]) > 1:
        spec = specialisation_score(stats)
        ax_s.plot(x, [_mean(spec[n] for n in groups[b]) for b in x], marker=".", color="black")
    ax_g.set_title("per-token gate entropy H(g)/log N")
    ax_l.set_title("load entropy H(f)/log N (balance)")
    ax_s.set_title("specialisation by task (0 = none)")
    for ax in (ax_g, ax_l, ax_s):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _short(name: str) -> str:
    return re.sub(r"^(base_model\.)?(model\.)?", "", name)


# ---------------------------------------------------------------------------------------------
# training-time collapse warning


class CollapseDetector(TrainerCallback):
    """At every ``every``-th training log, warns (logger ``"lmoe"``) naming the adapted layers whose load
    entropy H(f)/log N, from the model's last forward, is below ``threshold``.

    Load entropy measures how evenly tokens spread over the experts: 1 = perfectly balanced, 0 = every
    token sent to one expert; at ``threshold`` the tokens are spread as if over ``N ** threshold``
    equally used experts (0.5 at N = 8: about 2.8). Outside ``track_routing`` the statistics come from
    the last micro-batch and count padding tokens too. ``collapsed`` holds the last check's
    ``{layer: load entropy}`` below the threshold.
    """

    def __init__(self, threshold: float = 0.5, every: int = 1):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.threshold, self.every = threshold, every
        self.collapsed: dict[str, float] = {}
        self._logs = 0

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        self._logs += 1
        if (self._logs - 1) % self.every:
            return
        while hasattr(model, "module"):  # DistributedDataParallel / DataParallel
            model = model.module
        if not callable(getattr(model, "routing_stats", None)):
            return
        stats = model.routing_stats()
        ents = {name: load_entropy(s["load"]) for name, s in stats.items()}
        self.collapsed = {name: e for name, e in ents.items() if e < self.threshold}
        if self.collapsed:
            n = len(next(iter(stats.values()))["load"])
            worst = sorted(self.collapsed.items(), key=lambda kv: kv[1])
            shown = ", ".join(f"{name} {e:.2f}" for name, e in worst[:5]) + (", ..." if len(worst) > 5 else "")
            logger.warning(
                "routing collapse at step %d: %d of %d adapted layers have load entropy < %.2f (tokens spread "
                "over fewer than %.1f of %d experts; 1 = balanced, 0 = one expert): %s",
                state.global_step, len(worst), len(ents), self.threshold, n ** self.threshold, n, shown)


# ---------------------------------------------------------------------------------------------
# lmoe inspect


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` sub-command to an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("inspect", help="routing analysis: expert use per task, entropy, specialisation")
    p.add_argument("--model", default=None, help="smollm2-135m (default), a HF model id or folder, or a .gguf file")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--data", nargs="+", default=None, help="jsonl files or folders (default: the bundled mix)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=32, help="first N examples per task (default 32)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="transformer blocks to draw heatmaps for (default: first, middle, last)")
    p.add_argument("--value", default="mean_gate", choices=VALUES, help="heatmap colour (default mean_gate)")
    p.add_argument("--output-dir", default=None, help="default: <adapter>/routing")
    return p


def cmd_inspect(args) -> int:
    from .dataset import BUNDLED_DATA, load_examples
    from .evaluate import save_results
    from .model import LMoEModel, load_adapter_config
    from .models import load_model

    for name in ("limit", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    load_adapter_config(args.adapter)  # a bad adapter fails before the slow model load
    examples = load_examples(args.data or [BUNDLED_DATA], split=args.split)
    model, tokenizer = load_model(args.model or "smollm2-135m")
    model = LMoEModel.from_pretrained(model, args.adapter)
    stats = routing_by_task(model, tokenizer, examples, seq_len=args.seq_len, batch_size=args.batch_size,
                            limit=args.limit)
    groups = blocks(stats["layers"])
    chosen = args.layers if args.layers is not None else sorted({min(groups), sorted(groups)[len(groups) // 2],
                                                                 max(groups)})
    missing = [b for b in chosen if b not in groups]
    if missing:
        raise ValueError(f"--layers {missing} not found; layers with adapters: {min(groups)}..{max(groups)}")
    if len(stats["tasks"]) > 1:
        stats["specialisation"] = specialisation_score(stats)
    out = Path(args.output_dir or Path(args.adapter) / "routing")
    save_results(stats, out / "routing.json")
    written = [out / "routing.json"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("lmoe: matplotlib is not installed; skipping the plots (pip install matplotlib)", file=sys.stderr)
    else:
        for b in chosen:
            written.append(plot_task_expert_heatmaps(stats, groups[b], out / f"heatmap_layer{b}.png", args.value))
        written.append(plot_entropy_by_layer(stats, out / "entropy_by_layer.png"))
    print(summary(stats))
    print(f"lmoe: routing analysis written to {', '.join(str(p) for p in written)}")
    return 0


def summary(stats: dict, max_lines: int = 6) -> str:
    """A short table: per group of consecutive blocks, the token-weighted gate entropy, effective
    experts, load entropy and (with two or more tasks) specialisation, averaged over its layers."""
    groups = blocks(stats["layers"])
    keys = sorted(groups)
    size = -(-len(keys) // max_lines)
    spec = stats.get("specialisation") or (specialisation_score(stats) if len(stats["tasks"]) > 1 else None)
    n = stats["num_experts"]
    lines = [f"routing over {', '.join(stats['tasks'])} ({n} experts):",
             "| layers | gate entropy | effective experts | load entropy | specialisation |",
             "|---|---:|---:|---:|---:|"]
    for k in range(0, len(keys), size):
        part = keys[k:k + size]
        names = [name for b in part for name in groups[b]]
        p = [pooled(stats, name) for name in names]
        label = str(part[0]) if len(part) == 1 else f"{part[0]}-{part[-1]}"
        s = f"{_mean(spec[name] for name in names):.3f}" if spec else "–"
        lines.append(f"| {label} | {_mean(x['entropy'] for x in p):.3f} | "
                     f"{_mean(x['effective_experts'] for x in p):.2f} / {n} | "
                     f"{_mean(x['load_entropy'] for x in p):.3f} | {s} |")
    return "\n".join(lines)

