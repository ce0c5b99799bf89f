"""Evaluation: per-task answer loss and perplexity, log-likelihood accuracy, gsm8k exact match, mbpp
pass@1, routing statistics.

``evaluate(model, tokenizer, examples)`` returns ``{"tasks": {task: metrics}, "overall": {...}}`` plus
``"routing"`` for an ``LMoEModel`` (and ``"samples"`` with ``keep_samples=True``); ``format_table`` and
``format_markdown`` render it as markdown, ``save_results`` as JSON (and markdown).

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
* **Generative tasks** (``generate_tasks=True``): rows of type ``math`` (gsm8k) and ``code`` (mbpp) are
  also answered by greedy generation (KV cache on, at most ``max_new_tokens``), batched with LEFT
  padding built here from the prompt ids (cut from the left to ``seq_len`` as in the loss pass; the
  tokenizer's padding side is never touched). A row stops at eos or, for ``math``, once it has written
  a full ``#### <number>`` line; for ``code``, at ``"\\nTask:"``, ``"\\n\\n\\n"`` or a closing fence.
  ``exact_match``: ``extract_number`` of the generation (the number after ``####``, commas dropped,
  else the last number) equals ``final_answer`` as a decimal number (``"18" == "18.0"``). ``pass@1``:
  ``extract_code`` of the generation (the text up to ``"\\nTask:"`` / ``"\\n\\n\\n"``; with a fence, the
  code before it or else the first fenced block), then ``test_setup_code`` and the ``test_list``
  asserts, run by ``sandbox.run_tests`` in a confined subprocess — never in this process; a syntax
  error is caught by ``compile`` first and counted in ``syntax_error_rate``.
"""

from __future__ import annotations

import json
import math
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .dataset import IGNORE_INDEX, encode_example
from .model import _atomic_write

MAIN_METRICS = ("pass@1", "exact_match", "accuracy")  # a task's headline score: the first one it has
GENERATIVE = {"math": "final_answer", "code": "test_list"}  # row type -> the field scoring needs
CODE_STOPS = ("\nTask:", "\n\n\n")
_NUMBER = r"(?:(?<![\w.)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 1,234.5 or -12; "5-3" gives 5 and 3
_HASH_NUMBER = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_MATH_DONE = re.compile(r"####\s*\$?\s*" + _NUMBER + r"[ \t]*\n")


def evaluate(model, tokenizer, examples: list[dict], *, seq_len: int = 512, batch_size: int = 8,
             limit: int | None = None, length_normalised: bool = True, progress: bool = True,
             generate_tasks: bool = True, max_new_tokens: int = 256, keep_samples: bool = False,
             sandbox_timeout: float = 10.0, per_example: bool = False) -> dict:
    """Per-task ``test_loss``, ``perplexity``, ``answer_tokens``, ``examples`` and ``truncated``; for
    tasks with ``choices`` also ``accuracy`` (and ``accuracy_norm`` when ``length_normalised``); with
    ``generate_tasks``, ``exact_match`` for ``math`` rows and ``pass@1``, ``syntax_error_rate`` and
    ``failures`` (count per sandbox error) for ``code`` rows, plus ``generated`` and ``max_new_tokens``.
    ``keep_samples`` adds ``results["samples"][task]``: one dict per generated row (``prompt_index``
    within the task, ``generation``, ``extracted``, ``gold``, ``correct``; ``error`` and ``detail`` for
    code). ``sandbox_timeout`` bounds each mbpp program's wall-clock (and CPU) time in seconds.
    ``per_example`` adds ``per_example`` to each task: lists in row order of ``loss`` (the row's mean NLL
    over its answer tokens) and 0/1 ``accuracy`` / ``exact_match`` / ``pass@1`` (for paired statistics).

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
    if generate_tasks and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
    gen_rows = _generative_rows(rows, model) if generate_tasks else []
    prompts = {i: list(encode_example(tokenizer, {**rows[i], "answer": ""}, seq_len, append_eos=False)["input_ids"])
               for i in gen_rows}  # the prompt alone, cut from the left to seq_len like the loss pass

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
        generations = {}
        with torch.no_grad(), tqdm(total=len(gen_rows), desc="generate", unit="row",
                                   disable=not progress or not gen_rows) as bar:
            for kind in GENERATIVE:
                jobs = [(i, prompts[i]) for i in gen_rows if rows[i]["type"] == kind]
                generations.update(_generate(model, tokenizer, jobs, kind, batch_size, max_new_tokens, pad_id, bar))
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
        rows_out = {}
        if per_example:
            rows_out["loss"] = [-scores[("loss", i)][0] / max(scores[("loss", i)][1], 1) for i in idx]
        choice_rows = [i for i in idx if i in num_choices]
        if choice_rows:
            hits, hits_norm = 0, 0
            correct = []
            for i in choice_rows:
                s = [scores[("choice", i, j)] for j in range(num_choices[i])]  # (sum log-prob, tokens)
                gold = rows[i]["label"]
                correct.append(int(_argmax([lp for lp, _ in s]) == gold))
                hits += correct[-1]
                hits_norm += _argmax([lp / n for lp, n in s]) == gold
            if per_example and len(choice_rows) == len(idx):
                rows_out["accuracy"] = correct
            metrics["choice_examples"] = len(choice_rows)
            metrics["accuracy"] = hits / len(choice_rows)
            if length_normalised:
                metrics["accuracy_norm"] = hits_norm / len(choice_rows)
        task_gen = [i for i in idx if i in generations]
        if task_gen:
            samples = [_score_generation(rows[i], i - idx.start, generations[i], sandbox_timeout) for i in task_gen]
            metrics.update(_generation_metrics(samples, rows[task_gen[0]]["type"], max_new_tokens))
            if per_example and len(task_gen) == len(idx):
                key = "exact_match" if rows[task_gen[0]]["type"] == "math" else "pass@1"
                rows_out[key] = [int(bool(x["correct"])) for x in samples]
            if keep_samples:
                results.setdefault("samples", {})[task] = samples
        if rows_out:
            metrics["per_example"] = rows_out
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


# ---------------------------------------------------------------------------------------------
# generative tasks: gsm8k exact match, mbpp pass@1


def extract_number(text: str) -> str | None:
    """The number after the first ``####`` (commas dropped, a ``$`` allowed), else the last number in
    ``text``, else ``None``: ``"so 5 + 3 = 8.\\n#### 1,008"`` -> ``"1008"``; ``"it is -2.5 km"`` -> ``"-2.5"``."""
    m = _HASH_NUMBER.search(text)
    if m is None:
        found = re.findall(_NUMBER, text)
        return found[-1].replace(",", "") if found else None
    return m.group(1).replace(",", "")


def extract_code(text: str) -> str:
    """The code to run from a generation, cut at the first ``"\\nTask:"`` or ``"\\n\\n\\n"``. With a
    fence (```` ``` ````): the text before the first fence if it is not blank and compiles (the model
    wrote code straight after ``Solution:`` and then closed a block), else the body of the first
    fenced block (its language tag dropped)."""
    for stop in CODE_STOPS:
        text = text.split(stop, 1)[0]
    if "```" not in text:
        return text
    before, body = text.split("```", 2)[:2]
    if before.strip() and _compiles(before):
        return before
    first, _, rest = body.partition("\n")
    return rest if first.strip().isidentifier() or not first.strip() else body


def _compiles(code: str) -> bool:
    try:
        compile(code, "<generated>", "exec")  # compiled only, never executed
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False
    return True


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))
    except InvalidOperation:
        return a.strip() == b.strip()


def _finished(kind: str, text: str) -> bool:
    """Whether a row may stop generating: a full ``#### <number>`` line (math); a stop string or a
    closed fenced block (code)."""
    if kind == "math":
        return _MATH_DONE.search(text) is not None
    if any(stop in text for stop in CODE_STOPS) or text.count("```") >= 2:
        return True
    before = text.split("```", 1)[0]
    return "```" in text and bool(before.strip()) and _compiles(before)  # code, then a closing fence


def _generative_rows(rows: list[dict], model) -> list[int]:
    picked = []
    for i, ex in enumerate(rows):
        field = GENERATIVE.get(ex.get("type"))
        if field is None:
            continue
        if ex.get(field) is None:
            raise ValueError(f"task '{ex['task']}' row {i}: a '{ex['type']}' row needs '{field}' to be scored "
                             f"(or pass generate_tasks=False)")
        picked.append(i)
    if picked and not callable(getattr(model, "generate", None)):
        raise ValueError(f"{type(model).__name__} has no generate(); pass generate_tasks=False to skip "
                         f"the generative metrics")
    return picked


class _StopWhenFinished(StoppingCriteria):
    """Per row: done once ``_finished`` holds for its new text (generate then pads that row)."""

    def __init__(self, tokenizer, prompt_width: int, kind: str):
        self.tokenizer, self.width, self.kind, self.done = tokenizer, prompt_width, kind, None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = [False] * input_ids.shape[0]
        for r, ids in enumerate(input_ids[:, self.width:].tolist()):
            if not self.done[r]:
                self.done[r] = _finished(self.kind, self.tokenizer.decode(ids, skip_special_tokens=True))
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _generate(model, tokenizer, jobs: list[tuple[int, list[int]]], kind: str, batch_size: int,
              max_new_tokens: int, pad_id: int, bar) -> dict[int, str]:
    """Greedy generations ``{row: text}`` for ``(row, prompt ids)`` jobs, batched with left padding."""
    out = {}
    if not jobs:
        return out
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    jobs = sorted(jobs, key=lambda job: len(job[1]), reverse=True)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), left-padded
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for r, (_, ids) in enumerate(batch):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids):] = 1
        ids = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             do_sample=False, use_cache=True, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             stopping_criteria=StoppingCriteriaList([_StopWhenFinished(tokenizer, width, kind)]))
        for (i, _), new in zip(batch, ids[:, width:].tolist()):  # (B, new tokens)
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True)
        bar.update(len(batch))
    return out


def _score_generation(ex: dict, prompt_index: int, text: str, sandbox_timeout: float) -> dict:
    if ex["type"] == "math":
        m = _MATH_DONE.search(text)
        text = text[:m.end()] if m else text  # what a stopped row would have written
        got = extract_number(text)
        return {"prompt_index": prompt_index, "generation": text, "extracted": got, "gold": ex["final_answer"],
                "correct": _same_number(got, str(ex["final_answer"]))}
    from .sandbox import run_tests

    code = extract_code(text)
    run = run_tests(code, ex.get("test_setup_code") or "", list(ex["test_list"]), timeout=sandbox_timeout)
    return {"prompt_index": prompt_index, "generation": text, "extracted": code, "gold": None,
            "correct": run["passed"], "error": run["error"], "detail": run["detail"], "isolation": run["isolation"]}


def _generation_metrics(samples: list[dict], kind: str, max_new_tokens: int) -> dict:
    n = len(samples)
    metrics = {"generated": n, "max_new_tokens": max_new_tokens}
    hits = sum(s["correct"] for s in samples) / n
    if kind == "math":
        metrics["exact_match"] = hits
        return metrics
    failures: dict[str, int] = {}
    for s in samples:
        if s["error"] is not None:
            failures[s["error"]] = failures.get(s["error"], 0) + 1
    metrics.update({"pass@1": hits, "syntax_error_rate": failures.get("syntax", 0) / n, "failures": failures,
                    "sandbox": next((s["isolation"] for s in samples if s["isolation"]), None)})
    for s in samples:
        s.pop("isolation")
    return metrics


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


def main_metric(metrics: dict) -> tuple[str, float] | None:
    """A task's headline score ``(name, value)``: ``pass@1``, else ``exact_match``, else ``accuracy``."""
    for name in MAIN_METRICS:
        if metrics.get(name) is not None:
            return name, metrics[name]
    return None


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def format_table(results: dict) -> str:
    """A markdown table, one row per task: task | examples | test loss | ppl | score, where score is the
    task's ``main_metric`` with its name (``accuracy 0.6667``) or "–"."""
    lines = ["| task | examples | test loss | ppl | score |", "|---|---:|---:|---:|---:|"]
    for task, m in results["tasks"].items():
        score = main_metric(m)
        lines.append(f"| {task} | {m['examples']} | {_num(m.get('test_loss'), '.4f')} | "
                     f"{_num(m.get('perplexity'), '.2f')} | {f'{score[0]} {score[1]:.4f}' if score else '–'} |")
    return "\n".join(lines)


def format_markdown(results: dict, title: str = "Evaluation") -> str:
    """A markdown report: the ``format_table`` table with an overall row, the other metrics of each
    task, and a one-line routing summary (for an ``LMoEModel``)."""
    o = results.get("overall", {})
    lines = [f"## {title}", "", format_table(results),
             f"| **overall** | {o.get('examples', '–')} | {_num(o.get('test_loss'), '.4f')} | "
             f"{_num(o.get('perplexity'), '.2f')} | – |", ""]
    details = []
    for task, m in results["tasks"].items():
        parts = []
        if m.get("accuracy_norm") is not None:
            parts.append(f"accuracy_norm {m['accuracy_norm']:.4f} (per-token log-likelihood)")
        if "generated" in m:
            parts.append(f"{m['generated']} greedy generations of at most {m['max_new_tokens']} new tokens")
        if m.get("syntax_error_rate") is not None:
            fails = ", ".join(f"{k} {v}" for k, v in sorted(m.get("failures", {}).items())) or "none"
            parts.append(f"syntax_error_rate {m['syntax_error_rate']:.4f}; failures: {fails}")
        if m.get("truncated"):
            parts.append(f"{m['truncated']} prompt(s) cut to fit")
        if parts:
            details.append(f"- **{task}**: " + "; ".join(parts))
    sandbox = next((m["sandbox"] for m in results["tasks"].values() if m.get("sandbox")), None)
    if sandbox:
        details.append(f"- code ran in `lmoe.sandbox` ({sandbox})")
    if details:
        lines += details + [""]
    routing = results.get("routing")
    if routing and routing.get("layers"):
        ent = {name: s["entropy"] for name, s in routing["layers"].items()}
        lo, hi = min(ent, key=ent.get), max(ent, key=ent.get)
        lines += [f"Routing (loss pass, padding masked): mean normalised gate entropy "
                  f"{routing['mean_entropy']:.3f} over {len(ent)} adapted layers (1 = uniform gate, 0 = one "
                  f"expert); lowest {ent[lo]:.3f} in `{lo}`, highest {ent[hi]:.3f} in `{hi}`.", ""]
    return "\n".join(lines)


def save_results(results: dict, path: str | os.PathLike, markdown: bool = False) -> None:
    """Write ``results`` as JSON (indent 2) atomically; a non-finite number (an overflowed perplexity)
    is written as ``null`` so the file stays valid JSON. ``markdown=True`` also writes
    ``format_markdown(results)`` to ``path`` with the suffix ``.md``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(results), indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    if markdown:
        report = format_markdown(results)
        _atomic_write(path.with_suffix(".md"), lambda p: p.write_text(report, encoding="utf-8"))


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
