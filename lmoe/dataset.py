"""Multi-task data: read jsonl rows, tokenise them into (input_ids, labels), mix tasks, pad batches.

A row is either the bundled schema (``prompt`` + ``answer`` strings, see ``data/README.md``) or a
plain ``{"text": ...}`` row, read as an empty prompt whose answer is the whole text. The training
sequence is exactly ``prompt + answer``; all other fields of a row travel along untouched.

Non-obvious choices:

* **Prompt and answer are tokenised separately** and concatenated: the prompt with the tokenizer's
  own special tokens (a BOS if it adds one), the answer with none, then eos appended. The bundled
  answers start with a space (``" yes"``), so this matches the joint tokenisation, and it makes the
  answer boundary exact, which the label mask needs.
* **Truncation cuts the prompt from the left** (keeping a leading BOS): the answer is what is
  learnt and the end of a prompt (``Question: ...\\nAnswer:``) matters most. Only an answer that is
  longer than ``seq_len`` by itself is cut, and then its *first* tokens are kept.
* **``uniform`` mixing repeats, it does not draw with replacement**: a task of n examples brought
  to m > n holds every example ``m // n`` times plus a seeded sample of ``m % n`` more, so nothing
  is left out by chance. Both mixes are shuffled with the same seed.
* **Padding is masked through ``attention_mask`` and ``labels = -100``**, never by comparing ids
  with the pad id: SmolLM2's pad token is its eos token, which is a real target at each answer end.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

BUNDLED_DATA = Path(__file__).parent / "data"
IGNORE_INDEX = -100
MIXES = ("proportional", "uniform")
LOSS_ON = ("answer", "all")
_SPLIT_NAMES = {"train", "test", "val", "valid", "validation", "dev"}

# LoRAMoE's task types (docs/methods.md, "loramoe"): 1 = world knowledge (closed-book questions), 0 = downstream
# task, -1 = unknown (the localised balancing constraint weights it 1). The bundled tasks: ARC-Easy is closed-book
# science questions (world knowledge); BoolQ gives the passage, GSM8K is arithmetic, MBPP code, tinyshakespeare
# plain text: downstream. Pass another mapping as ``DataCollator(task_types=...)``.
WORLD_KNOWLEDGE, DOWNSTREAM, UNKNOWN_TASK_TYPE = 1, 0, -1
BUNDLED_TASK_TYPES = {"arc_easy": WORLD_KNOWLEDGE, "boolq": DOWNSTREAM, "gsm8k": DOWNSTREAM, "mbpp": DOWNSTREAM,
                      "tinyshakespeare": DOWNSTREAM}


# ---------------------------------------------------------------------------------------------
# reading


def load_examples(paths: str | Path | Sequence[str | Path], split: str = "train") -> list[dict]:
    """Read examples from jsonl files and/or directories (see ``_files_of`` for directory layouts)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no data paths given")
    examples = []
    for path in paths:
        for file in _files_of(Path(path), split):
            examples.extend(_read_jsonl(file, split))
    return examples


def _files_of(path: Path, split: str) -> list[Path]:
    """A file is itself; a directory holds ``<task>/<split>.jsonl``, or ``<split>.jsonl``, or ``*.jsonl``."""
    if not path.exists():
        raise FileNotFoundError(f"data path '{path}' does not exist")
    if path.is_file():
        return [path]
    per_task = sorted(d / f"{split}.jsonl" for d in path.iterdir() if (d / f"{split}.jsonl").is_file())
    if per_task:
        return per_task
    if (path / f"{split}.jsonl").is_file():
        return [path / f"{split}.jsonl"]
    files = sorted(f for f in path.glob("*.jsonl") if f.is_file())
    if not files:
        raise FileNotFoundError(f"data directory '{path}' holds no <task>/{split}.jsonl, {split}.jsonl "
                                f"or *.jsonl files")
    return files


def _default_task(file: Path, split: str) -> str:
    """``boolq/train.jsonl`` -> ``boolq``; ``notes.jsonl`` -> ``notes``."""
    return file.parent.name if file.stem in _SPLIT_NAMES | {split} else file.stem


def _read_jsonl(file: Path, split: str) -> list[dict]:
    task = _default_task(file, split)
    rows = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{lineno}: invalid JSON: {err}") from None
            rows.append(_parse_row(row, task, f"{file}:{lineno}"))
    if not rows:
        raise ValueError(f"{file}: no examples")
    return rows


def _parse_row(row, default_task: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" in row or "answer" in row:
        fields = ("prompt", "answer")
        missing = [k for k in fields if k not in row]
        if missing:
            raise ValueError(f"{where}: missing '{missing[0]}' (a row needs 'prompt' and 'answer', or 'text')")
        example = dict(row)
    elif "text" in row:
        fields = ("text",)
        example = {**row, "prompt": "", "answer": row["text"]}
    else:
        raise ValueError(f"{where}: missing 'prompt' and 'answer' (or 'text'); keys: {sorted(row)}")
    for key in fields + (("task",) if "task" in row else ()):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    example.setdefault("task", default_task)
    return example


# ---------------------------------------------------------------------------------------------
# tokenising


def encode_example(tokenizer, ex: dict, seq_len: int, loss_on: str = "answer", append_eos: bool = True) -> dict:
    """Tokenise ``prompt + answer`` into ``input_ids`` and ``labels`` of at most ``seq_len`` tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown loss_on '{loss_on}': expected one of {LOSS_ON}")
    prompt = tokenizer(ex["prompt"])["input_ids"]
    answer = tokenizer(ex["answer"], add_special_tokens=False)["input_ids"]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos token")
        answer = answer + [tokenizer.eos_token_id]
    truncated = len(prompt) + len(answer) > seq_len
    if truncated:
        prompt, answer = _truncate(prompt, answer, seq_len, tokenizer.bos_token_id)
    masked = [IGNORE_INDEX] * len(prompt) if loss_on == "answer" else prompt
    return {"input_ids": prompt + answer, "labels": masked + answer, "task": ex["task"], "truncated": truncated}


def _truncate(prompt: list[int], answer: list[int], seq_len: int, bos_id: int | None):
    """Cut the prompt from the left (keeping a leading BOS); cut the answer's tail only if it alone is too long."""
    head = prompt[:1] if prompt and bos_id is not None and prompt[0] == bos_id else []
    body = prompt[len(head):]
    room = seq_len - len(head) - len(answer)  # prompt-body tokens that still fit
    if room >= 0:
        return head + body[len(body) - room:], answer
    head = head if len(head) < seq_len else []  # at least one answer token always survives
    return head, answer[: seq_len - len(head)]


def build_dataset(tokenizer, examples: Sequence[dict], seq_len: int, mix: str = "proportional",
                  seed: int = 0, loss_on: str = "answer") -> tuple[list[dict], dict]:
    """Encode, mix and shuffle ``examples``; return ``(encoded, stats)``.

    ``stats``: ``count`` (per task, after mixing), ``unique`` (per task, before), ``truncated`` (per
    task, among the unique examples), ``tokens`` and ``loss_tokens`` (totals over the mixed set).
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix '{mix}': expected one of {MIXES}")
    if not examples:
        raise ValueError("no examples to build a dataset from")
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append(encode_example(tokenizer, ex, seq_len, loss_on))
    rng = random.Random(seed)
    if mix == "uniform":
        size = max(len(rows) for rows in by_task.values())
        mixed = [row for rows in by_task.values() for row in _resample(rows, size, rng)]
    else:
        mixed = [row for rows in by_task.values() for row in rows]
    rng.shuffle(mixed)
    counts = Counter(row["task"] for row in mixed)
    stats = {
        "count": {task: counts[task] for task in by_task},
        "unique": {task: len(rows) for task, rows in by_task.items()},
        "truncated": {task: sum(row["truncated"] for row in rows) for task, rows in by_task.items()},
        "tokens": sum(len(row["input_ids"]) for row in mixed),
        "loss_tokens": sum(label != IGNORE_INDEX for row in mixed for label in row["labels"]),
    }
    return mixed, stats


def _resample(rows: list[dict], size: int, rng: random.Random) -> list[dict]:
    """Every row ``size // len(rows)`` times, plus a seeded sample of ``size % len(rows)`` rows."""
    repeats, extra = divmod(size, len(rows))
    picked = rows * repeats + rng.sample(rows, extra)
    return [dict(row) for row in picked]  # separate dicts, so editing one copy leaves the others


# ---------------------------------------------------------------------------------------------
# batching and splitting


class DataCollator:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask``, ``labels`` tensors.

    With ``task_types`` (a mapping of task name to 1 = world knowledge or 0 = downstream task, e.g.
    ``BUNDLED_TASK_TYPES``) it also emits ``task_type`` (B,) long: each example's ``task`` looked up there, -1 for a
    task the mapping lacks (or an example without a task). ``LMoEModel`` uses it only for LoRAMoE's localised
    balancing constraint."""

    def __init__(self, pad_token_id: int, task_types: dict[str, int] | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; give the tokenizer a pad token (eos is fine)")
        if task_types is not None:
            if not isinstance(task_types, dict):
                raise ValueError(f"task_types must be a dict of task name to 0 or 1, got {type(task_types).__name__}")
            bad = {k: v for k, v in task_types.items() if not isinstance(k, str) or v not in (WORLD_KNOWLEDGE, DOWNSTREAM)
                   or isinstance(v, bool)}
            if bad:
                k, v = next(iter(bad.items()))
                raise ValueError(f"task_types maps task names to 1 (world knowledge) or 0 (downstream task), "
                                 f"got {k!r}: {v!r}")
        self.pad_token_id = pad_token_id
        self.task_types = task_types

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.task_types is not None:
            batch["task_type"] = torch.tensor([self.task_types.get(f.get("task"), UNKNOWN_TASK_TYPE) for f in features],
                                              dtype=torch.long)  # (B,)
        return batch


def split_validation(examples: Sequence[dict], per_task: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out ``per_task`` examples of every task; both parts keep the input order.

    The choice for a task depends only on ``seed``, the task name and that task's rows, so adding
    or removing another task does not change it.
    """
    if per_task < 0:
        raise ValueError(f"per_task must be >= 0, got {per_task}")
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex["task"], []).append(i)
    held_out: set[int] = set()
    for task, indices in by_task.items():
        if len(indices) <= per_task:
            raise ValueError(f"task '{task}' has {len(indices)} examples; cannot hold out {per_task} "
                             f"and keep any for training")
        held_out.update(random.Random(f"{seed}:{task}").sample(indices, per_task))
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    val = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, val
