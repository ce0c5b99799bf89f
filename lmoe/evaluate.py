"""Evaluation: per-task answer loss and perplexity, log-likelihood accuracy, routing statistics.

``evaluate(model, tokenizer, examples)`` returns ``{"tasks": {task: metrics}, "overall": {...}}`` plus
``"routing"`` for an ``LMoEModel``; ``format_table`` renders it as markdown, ``save_results`` as JSON.

Non-obvious choices:

* **The loss is scored on the answer text only.** Each row is encoded by ``dataset.encode_example``
  with ``append_eos=False`` (same tokenisation and left truncation of the prompt as in training, but no
  eos target), and ``test_loss`` is the mean NLL over all answer tokens of a task: token-weighted, so
  long answers weigh more, as in the training loss. ``overall`` is token-weighted over all tasks.
  As in transformers' shifted loss, a token at position 0 (an empty prompt and no BOS) has no
  prediction and is not scored.
* **Accuracy compares log-likelihoods** of the continuations ``" " + choice_labels[j]`` (multiple
  choice: ``" A"``) or ``" " + choices[j]`` (yes/no: ``" no"``), each encoded like an answer, so the
  gold continuation is scored exactly as in the loss. ``accuracy`` ranks by the summed log-prob,
  ``accuracy_norm`` by the log-prob per continuation token; ties go to the first choice.
* **Choices are read off the loss pass when they can be.** A continuation's log-prob needs only the
  logits *before* its last token, so when its ids up to that token are a prefix of the row's loss
  sequence (always so for single-token continuations such as ``" A"`` or ``" yes"``), no extra forward
  is run. Only the other continuations go to a second pass; identical contexts run once.
* **Batches are sorted by length, longest first** (less padding; an out-of-memory error shows up in
  the first batch), right-padded with an ``attention_mask``. The log-softmax is taken only at the
  scored positions, in float32: a full ``(B, T, V)`` log-softmax would double the logits' memory.
* **Routing statistics cover the loss pass only**: every example once, padding masked.
  ``evaluate`` leaves routing tracking off afterwards.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from .dataset import IGNORE_INDEX, encode_example
from .model import _atomic_write


def evaluate(model, tokenizer, examples: list[dict], *, seq_len: int = 512, batch_size: int = 8,
             limit: int | None = None, length_normalised: bool = True, progress: bool = True) -> dict:
    """Per-task ``test_loss``, ``perplexity``, ``answer_tokens``, ``examples`` and ``truncated``; for
    tasks with ``choices`` also ``accuracy`` (and ``accuracy_norm`` when ``length_normalised``).

    ``model`` is any causal LM called as ``model(input_ids=..., attention_mask=...)`` with a ``.logits``
    output (labels are never passed, so an ``LMoEModel`` computes no auxiliary loss). ``test_loss`` is
    the token-weighted mean NLL of the answer text itself, without an appended eos. ``limit`` keeps
    the first ``limit`` examples of every task. The model runs in eval mode under ``no_grad``; its
    training mode is restored afterwards.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    by_task: dict[str, list[dict]] = {}
    for i, ex in enumerate(examples):
        if "task" not in ex:
            raise ValueError(f"example {i} has no 'task' field")
        rows = by_task.setdefault(ex["task"], [])
        if limit is None or len(rows) < limit:
            rows.append(ex)
    if not by_task:
        raise ValueError("no examples to evaluate")
    rows = [ex for task_rows in by_task.values() for ex in task_rows]

    # Loss jobs: one per row. A job is [ids, reads]; a read is (key, logit positions, target tokens).
    loss_jobs, truncated = [], []
    for i, ex in enumerate(rows):
        enc = encode_example(tokenizer, ex, seq_len, append_eos=False)
        ids, pos = list(enc["input_ids"]), _scored_positions(enc["labels"])
        loss_jobs.append([ids, [(("loss", i), [k - 1 for k in pos], [ids[k] for k in pos])]])
        truncated.append(bool(enc["truncated"]))
    choice_jobs: dict[tuple, list] = {}  # context ids -> job, so identical contexts run once
    num_choices = {}
    for i, ex in enumerate(rows):
        if not ex.get("choices"):
            continue
        conts = _continuations(ex, i)
        num_choices[i] = len(conts)
        loss_ids = loss_jobs[i][0]
        for j, cont in enumerate(conts):
            enc = encode_example(tokenizer, {**ex, "answer": cont}, seq_len, append_eos=False)
            ids, pos = list(enc["input_ids"]), _scored_positions(enc["labels"])
            if not pos:
                raise ValueError(f"task '{ex['task']}' row {i}: continuation {cont!r} has no token to score "
                                 f"(seq_len={seq_len})")
            last = pos[-1]  # logits up to position last - 1 are needed: the context is ids[:last]
            read = (("choice", i, j), [k - 1 for k in pos], [ids[k] for k in pos])
            if last <= len(loss_ids) and loss_ids[:last] == ids[:last]:
                loss_jobs[i][1].append(read)
            else:
                choice_jobs.setdefault(tuple(ids[:last]), [ids[:last], []])[1].append(read)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n_batches = -(-len(loss_jobs) // batch_size) + -(-len(choice_jobs) // batch_size)
    track = callable(getattr(model, "track_routing", None))
    was_training = model.training
    model.eval()
    routing = None
    try:
        with torch.no_grad(), tqdm(total=n_batches, desc="evaluate", unit="batch", disable=not progress) as bar:
            if track:
                model.track_routing(True)
            scores = _run(model, loss_jobs, batch_size, pad_id, bar)
            if track:
                routing = _routing_summary(model.routing_stats())
                model.track_routing(False)
            scores.update(_run(model, list(choice_jobs.values()), batch_size, pad_id, bar))
    finally:
        if track:
            model.track_routing(False)
        model.train(was_training)

    results = {"tasks": {}, "overall": {}}
    total_nll, total_tokens, start = 0.0, 0, 0
    for task, task_rows in by_task.items():
        idx = range(start, start + len(task_rows))
        start += len(task_rows)
        nll = -sum(scores[("loss", i)][0] for i in idx)
        tokens = sum(scores[("loss", i)][1] for i in idx)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        metrics = {"examples": len(task_rows), "answer_tokens": tokens, **_loss_metrics(nll, tokens),
                   "truncated": sum(truncated[i] for i in idx)}
        choice_rows = [i for i in idx if i in num_choices]
        if choice_rows:
            hits, hits_norm = 0, 0
            for i in choice_rows:
                s = [scores[("choice", i, j)] for j in range(num_choices[i])]  # (sum log-prob, tokens)
                gold = rows[i]["label"]
                hits += _argmax([lp for lp, _ in s]) == gold
                hits_norm += _argmax([lp / n for lp, n in s]) == gold
            metrics["choice_examples"] = len(choice_rows)
            metrics["accuracy"] = hits / len(choice_rows)
            if length_normalised:
                metrics["accuracy_norm"] = hits_norm / len(choice_rows)
        results["tasks"][task] = metrics
    results["overall"] = {"examples": len(rows), "answer_tokens": total_tokens,
                          **_loss_metrics(total_nll, total_tokens)}
    if routing is not None:
        results["routing"] = routing
    return results


def _scored_positions(labels) -> list[int]:
    """Positions k >= 1 whose label is kept: logits[k - 1] predicts input_ids[k] (the HF shift)."""
    labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
    return [k for k in range(1, len(labels)) if labels[k] != IGNORE_INDEX]


def _continuations(ex: dict, i: int) -> list[str]:
    if ex.get("type") == "multiple_choice" and not ex.get("choice_labels"):
        raise ValueError(f"task '{ex['task']}' row {i}: a multiple_choice row needs 'choice_labels'")
    names = ex.get("choice_labels") or ex["choices"]  # letters (" A") for multiple choice, else the choice text
    label = ex.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(names):
        raise ValueError(f"task '{ex['task']}' row {i}: label must be an index into its {len(names)} "
                         f"choices, got {label!r}")
    return [" " + str(name) for name in names]


def _run(model, jobs: list[list], batch_size: int, pad_id: int, bar) -> dict:
    """Forward every job's ids once; return ``{key: (sum of target log-probs, number of targets)}``."""
    out = {}
    if not jobs:
        return out
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    jobs = sorted(jobs, key=lambda job: len(job[0]), reverse=True)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        rows, cols, targets, owner, keys = [], [], [], [], []
        for r, (ids, reads) in enumerate(batch):
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, :len(ids)] = 1
            for key, positions, tokens in reads:
                rows += [r] * len(positions)
                cols += positions
                targets += tokens
                owner += [len(keys)] * len(positions)
                keys.append((key, len(positions)))
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # (B, T, V)
        picked = logits[torch.tensor(rows, dtype=torch.long, device=device),
                        torch.tensor(cols, dtype=torch.long, device=device)]  # (M, V)
        tgt = torch.tensor(targets, dtype=torch.long, device=device).unsqueeze(-1)  # (M, 1)
        logp = picked.float().log_softmax(-1).gather(-1, tgt).squeeze(-1).double().cpu()  # (M,)
        sums = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, torch.tensor(owner, dtype=torch.long), logp)
        for (key, n), s in zip(keys, sums.tolist()):
            out[key] = (s, n)
        bar.update(1)
    return out


def _loss_metrics(nll: float, tokens: int) -> dict:
    if tokens == 0:
        return {"test_loss": None, "perplexity": None}
    loss = nll / tokens
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"test_loss": loss, "perplexity": ppl}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first index among ties


def _routing_summary(stats: dict[str, dict]) -> dict:
    layers = {name: {"load": s["load"], "mean_gate": s["mean_gate"], "entropy": s["entropy"], "tokens": s["tokens"]}
              for name, s in stats.items()}
    mean = sum(s["entropy"] for s in layers.values()) / len(layers) if layers else None
    return {"layers": layers, "mean_entropy": mean}


def format_table(results: dict) -> str:
    """A markdown table, one row per task: task | examples | test loss | ppl | accuracy ("–" if none)."""
    def num(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["| task | examples | test loss | ppl | accuracy |", "|---|---:|---:|---:|---:|"]
    for task, m in results["tasks"].items():
        lines.append(f"| {task} | {m['examples']} | {num(m.get('test_loss'), '.4f')} | "
                     f"{num(m.get('perplexity'), '.2f')} | {num(m.get('accuracy'), '.4f')} |")
    return "\n".join(lines)


def save_results(results: dict, path: str | os.PathLike) -> None:
    """Write ``results`` as JSON (indent 2) atomically; a non-finite number (an overflowed perplexity)
    is written as ``null`` so the file stays valid JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(results), indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
