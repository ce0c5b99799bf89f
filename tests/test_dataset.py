"""lmoe.dataset: reading jsonl, exact label masks, truncation, mixing, collation, validation split.

The tokenizers come from conftest.py: word-level, one token per whitespace-separated word, ids
<pad>=0 <bos>=1 <eos>=2 <unk>=3 the=4 cat=5 sat=6 on=7 mat=8 dog=9 ran=10 Question:=11 Answer:=12
yes=13 no=14 a=15 ... h=22.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lmoe.dataset import (BUNDLED_DATA, DataCollator, build_dataset, encode_example, load_examples,
                          split_validation)

PAD, BOS, EOS, UNK = 0, 1, 2, 3
THE, CAT, SAT, ON, MAT, DOG, RAN, QUESTION, ANSWER, YES, NO = range(4, 15)
A, B, C, D, E, F, G, H = range(15, 23)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def ex(prompt, answer, task="t"):
    return {"prompt": prompt, "answer": answer, "task": task}


# ---------------------------------------------------------------------------------------------
# load_examples


def test_bundled_train_and_test_counts_and_extra_fields():
    train = load_examples(BUNDLED_DATA)
    assert Counter(e["task"] for e in train) == {
        "arc_easy": 2000, "boolq": 2000, "gsm8k": 2000, "mbpp": 474, "tinyshakespeare": 2000}
    test = load_examples(BUNDLED_DATA, split="test")
    assert Counter(e["task"] for e in test) == {
        "arc_easy": 500, "boolq": 500, "gsm8k": 500, "mbpp": 500, "tinyshakespeare": 499}
    arc = next(e for e in train if e["task"] == "arc_easy")
    assert arc["answer"] == " " + arc["choice_labels"][arc["label"]]
    mbpp = next(e for e in train if e["task"] == "mbpp")
    assert len(mbpp["test_list"]) == 3 and "test_setup_code" in mbpp


def test_directory_layouts_and_task_names(tmp_path):
    row = {"prompt": "p", "answer": " a"}
    write_jsonl(tmp_path / "multi" / "beta" / "train.jsonl", [row])
    write_jsonl(tmp_path / "multi" / "alpha" / "train.jsonl", [row, row])
    write_jsonl(tmp_path / "multi" / "alpha" / "test.jsonl", [row])
    write_jsonl(tmp_path / "single" / "train.jsonl", [row])
    write_jsonl(tmp_path / "flat" / "zeta.jsonl", [row])
    write_jsonl(tmp_path / "flat" / "eta.jsonl", [{**row, "task": "own"}])

    assert [e["task"] for e in load_examples(tmp_path / "multi")] == ["alpha", "alpha", "beta"]
    assert [e["task"] for e in load_examples(tmp_path / "multi", split="test")] == ["alpha"]
    assert [e["task"] for e in load_examples(str(tmp_path / "single"))] == ["single"]
    assert [e["task"] for e in load_examples(tmp_path / "flat")] == ["own", "zeta"]  # eta.jsonl first
    combined = load_examples([tmp_path / "flat" / "zeta.jsonl", tmp_path / "single" / "train.jsonl"])
    assert [e["task"] for e in combined] == ["zeta", "single"]


def test_text_rows_become_empty_prompt_and_keep_fields(tmp_path):
    f = write_jsonl(tmp_path / "notes.jsonl", [{"text": "the cat", "id": 7}, {"text": "dog", "task": "x"}])
    assert load_examples(f) == [
        {"text": "the cat", "id": 7, "prompt": "", "answer": "the cat", "task": "notes"},
        {"text": "dog", "task": "x", "prompt": "", "answer": "dog"},
    ]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}, "", "   ", {"prompt": 1, "answer": "b"}])
    with pytest.raises(ValueError) as err:
        load_examples(f)
    assert str(err.value) == f"{f}:4: 'prompt' must be a string, got int"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"}', "missing 'answer' (a row needs 'prompt' and 'answer', or 'text')"),
    ('{"answer": "a"}', "missing 'prompt' (a row needs 'prompt' and 'answer', or 'text')"),
    ('{"question": "a"}', "missing 'prompt' and 'answer' (or 'text'); keys: ['question']"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"prompt": "a", "answer": null}', "'answer' must be a string, got NoneType"),
    ('{"text": 3}', "'text' must be a string, got int"),
    ('{"prompt": "a", "answer": "b", "task": 5}', "'task' must be a string, got int"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, line, message):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "ok"}, line])
    with pytest.raises(ValueError) as err:
        load_examples(f)
    assert str(err.value) == f"{f}:2: {message}"


def test_invalid_json_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "ok"}, "", '{"prompt": "a",'])
    with pytest.raises(ValueError) as err:
        load_examples(f)
    assert str(err.value).startswith(f"{f}:3: invalid JSON: ")


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_examples(tmp_path / "nope.jsonl")
    assert str(err.value) == f"data path '{tmp_path / 'nope.jsonl'}' does not exist"
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError) as err:
        load_examples(empty)
    assert str(err.value) == f"{empty}: no examples"
    (tmp_path / "void").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no <task>/train.jsonl, train.jsonl or"):
        load_examples(tmp_path / "void")
    with pytest.raises(ValueError, match="no data paths given"):
        load_examples([])


# ---------------------------------------------------------------------------------------------
# encode_example


def test_encode_masks_prompt_and_appends_eos(tiny_tokenizer):
    out = encode_example(tiny_tokenizer, ex("Question: the cat Answer:", " yes"), seq_len=16)
    assert out == {"input_ids": [BOS, QUESTION, THE, CAT, ANSWER, YES, EOS],
                   "labels": [-100, -100, -100, -100, -100, YES, EOS], "task": "t", "truncated": False}
    out = encode_example(tiny_tokenizer, ex("the cat", " yes"), seq_len=16, loss_on="all", append_eos=False)
    assert out["input_ids"] == out["labels"] == [BOS, THE, CAT, YES]


def test_encode_text_row_without_bos_learns_every_token(tiny_tokenizer_no_bos):
    out = encode_example(tiny_tokenizer_no_bos, ex("", "the cat sat"), seq_len=16)
    assert out["input_ids"] == out["labels"] == [THE, CAT, SAT, EOS]


def test_truncation_cuts_prompt_from_left_keeping_bos(tiny_tokenizer, tiny_tokenizer_no_bos):
    e = ex("a b c d e f", " yes no")  # bos + 6 prompt tokens, 2 answer tokens + eos = 10
    assert encode_example(tiny_tokenizer, e, seq_len=10)["truncated"] is False
    out = encode_example(tiny_tokenizer, e, seq_len=6)
    assert out == {"input_ids": [BOS, E, F, YES, NO, EOS], "labels": [-100, -100, -100, YES, NO, EOS],
                   "task": "t", "truncated": True}
    out = encode_example(tiny_tokenizer, e, seq_len=4)  # only bos is left of the prompt
    assert out["input_ids"] == [BOS, YES, NO, EOS] and out["labels"] == [-100, YES, NO, EOS]
    out = encode_example(tiny_tokenizer_no_bos, e, seq_len=5)
    assert out["input_ids"] == [E, F, YES, NO, EOS] and out["labels"] == [-100, -100, YES, NO, EOS]


def test_answer_longer_than_seq_len_keeps_its_head(tiny_tokenizer):
    e = ex("the cat", " a b c d e")  # answer: 5 tokens + eos
    out = encode_example(tiny_tokenizer, e, seq_len=4)
    assert out["input_ids"] == [BOS, A, B, C] and out["labels"] == [-100, A, B, C] and out["truncated"]
    out = encode_example(tiny_tokenizer, e, seq_len=1)  # never an empty answer region, even without bos
    assert out["input_ids"] == out["labels"] == [A]


@pytest.mark.parametrize("add_bos", [True, False])
def test_truncation_against_a_plain_reference(add_bos, tiny_tokenizer, tiny_tokenizer_no_bos):
    tok = tiny_tokenizer if add_bos else tiny_tokenizer_no_bos
    e = ex("a b c d e f g", " the cat sat")
    full = encode_example(tok, e, seq_len=100)
    head = [BOS] if add_bos else []
    prompt = full["input_ids"][len(head):-4]
    answer = full["input_ids"][-4:]
    for seq_len in range(1, 16):
        out = encode_example(tok, e, seq_len=seq_len)
        if len(head) + len(prompt) + len(answer) <= seq_len:
            ref = head + prompt + answer
        elif len(head) + len(answer) <= seq_len:
            keep = seq_len - len(head) - len(answer)
            ref = head + prompt[len(prompt) - keep:] + answer
        else:
            keep_head = head if len(head) < seq_len else []
            ref = keep_head + answer[:seq_len - len(keep_head)]
        assert out["input_ids"] == ref, seq_len
        assert sum(label != -100 for label in out["labels"]) >= 1
        assert out["truncated"] == (seq_len < len(head) + 11)


def test_encode_rejects_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        encode_example(tiny_tokenizer, ex("a", "b"), seq_len=0)
    with pytest.raises(ValueError, match="unknown loss_on 'prompt'"):
        encode_example(tiny_tokenizer, ex("a", "b"), seq_len=8, loss_on="prompt")


# ---------------------------------------------------------------------------------------------
# build_dataset


def small_corpus():
    return ([ex("the cat", f" {w}", "big") for w in "abcdef"]
            + [ex("a b c d e f", " yes", "small"), ex("dog", " no", "small")])


def test_proportional_keeps_everything_and_counts(tiny_tokenizer):
    data, stats = build_dataset(tiny_tokenizer, small_corpus(), seq_len=5, seed=3)
    assert stats["count"] == {"big": 6, "small": 2}
    assert stats["unique"] == {"big": 6, "small": 2}
    assert stats["truncated"] == {"big": 0, "small": 1}  # bos + 6 + yes + eos = 9 > 5
    assert stats["tokens"] == 6 * 5 + 5 + 4  # big: bos the cat x eos; small: 5 (cut) and bos dog no eos
    assert stats["loss_tokens"] == 8 * 2
    assert sorted(d["input_ids"][-2] for d in data) == sorted([A, B, C, D, E, F, YES, NO])
    again, _ = build_dataset(tiny_tokenizer, small_corpus(), seq_len=5, seed=3)
    other, _ = build_dataset(tiny_tokenizer, small_corpus(), seq_len=5, seed=4)
    assert [d["input_ids"] for d in again] == [d["input_ids"] for d in data]
    assert [d["input_ids"] for d in other] != [d["input_ids"] for d in data]


def test_uniform_repeats_small_tasks_to_the_largest(tiny_tokenizer):
    corpus = small_corpus() + [ex("on", " h", "tiny")]
    data, stats = build_dataset(tiny_tokenizer, corpus, seq_len=5, mix="uniform", seed=0)
    assert stats["count"] == {"big": 6, "small": 6, "tiny": 6}
    assert stats["unique"] == {"big": 6, "small": 2, "tiny": 1}
    assert stats["truncated"] == {"big": 0, "small": 1, "tiny": 0}
    small_answers = Counter(d["input_ids"][-2] for d in data if d["task"] == "small")
    assert small_answers == {YES: 3, NO: 3}  # 6 // 2 full copies, nothing left to chance
    assert stats["tokens"] == sum(len(d["input_ids"]) for d in data)
    data[0]["input_ids"] = []
    assert all(d["input_ids"] for d in data[1:])


def test_uniform_remainder_is_a_seeded_sample(tiny_tokenizer):
    corpus = [ex("the", f" {w}", "big") for w in "abcdefg"] + [ex("cat", f" {w}", "small") for w in "ab"]
    data, stats = build_dataset(tiny_tokenizer, corpus, seq_len=8, mix="uniform", seed=1)
    small = Counter(d["input_ids"][-2] for d in data if d["task"] == "small")
    assert stats["count"]["small"] == 7 and sorted(small.values()) == [3, 4]


def test_unknown_mix_and_empty_input(tiny_tokenizer):
    with pytest.raises(ValueError) as err:
        build_dataset(tiny_tokenizer, small_corpus(), seq_len=8, mix="temperature")
    assert str(err.value) == "unknown mix 'temperature': expected one of ('proportional', 'uniform')"
    with pytest.raises(ValueError, match="no examples"):
        build_dataset(tiny_tokenizer, [], seq_len=8)


def test_truncation_counts_on_bundled_mbpp(tiny_tokenizer):
    examples = load_examples(BUNDLED_DATA / "mbpp")
    seq_len = 64
    _, stats = build_dataset(tiny_tokenizer, examples, seq_len=seq_len)
    # one token per word, plus bos and eos
    expected = sum(1 + len(e["prompt"].split()) + len(e["answer"].split()) + 1 > seq_len for e in examples)
    assert stats["truncated"] == {"mbpp": expected}
    assert 0 < expected < len(examples)


# ---------------------------------------------------------------------------------------------
# DataCollator and split_validation


def test_collator_pads_right_and_masks_labels():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task": "a", "truncated": False},
                {"input_ids": [8, 9, 10, 11, 2], "labels": [8, 9, 10, 11, 2], "task": "b", "truncated": True}]
    batch = DataCollator(pad_token_id=2)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 2, 2], [8, 9, 10, 11, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7, -100, -100], [8, 9, 10, 11, 2]]))
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="pad_token_id is None"):
        DataCollator(None)
    with pytest.raises(ValueError, match="empty batch"):
        DataCollator(0)([])


def test_split_validation_is_per_task_deterministic_and_order_preserving():
    examples = [{"task": t, "i": i} for i, t in enumerate("ab" * 6 + "c" * 3)]
    train, val = split_validation(examples, per_task=2, seed=5)
    assert Counter(e["task"] for e in val) == {"a": 2, "b": 2, "c": 2}
    assert len(train) == len(examples) - 6
    assert sorted(e["i"] for e in train + val) == list(range(len(examples)))
    assert [e["i"] for e in train] == sorted(e["i"] for e in train)
    assert [e["i"] for e in val] == sorted(e["i"] for e in val)
    assert split_validation(examples, per_task=2, seed=5) == (train, val)
    # a task's held-out rows do not depend on which other tasks are present
    _, val_a = split_validation([e for e in examples if e["task"] == "a"], per_task=2, seed=5)
    assert val_a == [e for e in val if e["task"] == "a"]
    assert split_validation(examples, per_task=0, seed=5) == (examples, [])


def test_split_validation_refuses_to_empty_a_task():
    examples = [{"task": "a"}] * 5 + [{"task": "b"}] * 2
    with pytest.raises(ValueError) as err:
        split_validation(examples, per_task=2, seed=0)
    assert str(err.value) == "task 'b' has 2 examples; cannot hold out 2 and keep any for training"
