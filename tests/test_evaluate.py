"""lmoe.evaluate against deliberately dumb references: one sequence at a time, no padding, by hand."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch
import torch.nn as nn
from helpers import VOCAB, randomize_lora_B, tiny_llama
from transformers.modeling_outputs import CausalLMOutput

from lmoe import LMoEConfig, get_lmoe_model
from lmoe.dataset import BUNDLED_DATA, load_examples
from lmoe.evaluate import evaluate, extract_code, extract_number, format_markdown, format_table, save_results

# ---------------------------------------------------------------------------------------------
# tokenizers and examples

CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]


def char_tokenizer():
    """One token per printable ASCII character, no BOS (as SmolLM2 adds none); 101 ids < VOCAB."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
    backend.decoder = decoders.Fuse()  # decode joins characters without spaces: decode(encode(s)) == s
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def hand_encode(kind: str, tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """(ids of prompt + answer, number of answer tokens), without calling the tokenizer's pipeline."""
    split = list if kind == "char" else str.split
    bos = [tok.bos_token_id] if kind == "word" else []
    p, a = tok.convert_tokens_to_ids(split(prompt)), tok.convert_tokens_to_ids(split(answer))
    return bos + p + a, len(a)


def yes_no(task, prompt, label):
    return {"task": task, "type": "yes_no", "prompt": prompt, "answer": " " + ["no", "yes"][label],
            "choices": ["no", "yes"], "label": label}


def mc(task, prompt, letters, label):
    return {"task": task, "type": "multiple_choice", "prompt": prompt, "answer": " " + letters[label],
            "choices": [f"option {x}" for x in letters], "choice_labels": list(letters), "label": label}


def lm(task, prompt, answer):
    return {"task": task, "type": "lm", "prompt": prompt, "answer": answer}


CHAR_EXAMPLES = [
    lm("play", "ROMEO:\nHark.\n\n", "JULIET:\nWho is there?\n"),
    lm("play", "NURSE:\nAnon, anon!\n\n", "ROMEO:\nI come.\n"),
    lm("play", "A:\nx\n\n", "B:\nSo much longer an answer than all of the others, to force padding.\n"),
    lm("play", "FRIAR LAURENCE:\nHoly Saint Francis, what a change is here!\n\n", "ROMEO:\nGo.\n"),
    yes_no("boolq", "Passage: The sky is blue.\nQuestion: is the sky blue?\nAnswer:", 1),
    yes_no("boolq", "Passage: Cats bark.\nQuestion: do cats bark?\nAnswer:", 0),
    yes_no("boolq", "Passage: Water is wet and rivers hold it.\nQuestion: is water dry?\nAnswer:", 0),
    mc("arc", "Question: 2+2?\nA. 3\nB. 4\nC. 5\nAnswer:", "ABC", 1),
    mc("arc", "Question: Which is a planet?\nA. Moon\nB. Sun\nC. Mars\nD. Comet\nAnswer:", "ABCD", 2),
    mc("arc", "Question: Ice is?\nA. cold\nB. hot\nAnswer:", "AB", 0),
]

WORD_EXAMPLES = [  # only words of conftest's tiny vocabulary
    lm("lm", "the cat sat", " on the mat"),
    lm("lm", "the dog", " ran on the mat the cat sat on the mat"),
    lm("lm", "a b c d e f g h the cat", " sat"),
    yes_no("boolq", "the cat sat on the mat Question: the cat sat Answer:", 1),
    yes_no("boolq", "Question: the dog sat Answer:", 0),
    mc("arc", "Question: the cat a the b dog c mat Answer:", "abc", 0),
    mc("arc", "Question: the dog ran a cat b mat Answer:", "ab", 1),
]

@pytest.fixture(params=["char", "word"])
def setup(request):
    if request.param == "word":
        tok = request.getfixturevalue("tiny_tokenizer")  # word-level, adds <bos>
        return "word", tok, WORD_EXAMPLES
    return "char", char_tokenizer(), CHAR_EXAMPLES


# ---------------------------------------------------------------------------------------------
# references


@torch.no_grad()
def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) float64 log-probs of one unpadded sequence."""
    return model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


def ref_answer_nll(model, ids: list[int], n_answer: int) -> float:
    logp = ref_logprobs(model, ids)
    return -sum(logp[k - 1, ids[k]].item() for k in range(len(ids) - n_answer, len(ids)))


def ref_choice_scores(model, kind, tok, ex) -> list[tuple[float, int]]:
    names = ex.get("choice_labels") or ex["choices"]
    out = []
    for name in names:
        ids, n = hand_encode(kind, tok, ex["prompt"], " " + name)
        out.append((-ref_answer_nll(model, ids, n), n))
    return out


def first_argmax(values):
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


# ---------------------------------------------------------------------------------------------
# tests


def test_loss_matches_per_example_reference(setup):
    kind, tok, examples = setup
    model = tiny_llama()
    res = evaluate(model, tok, examples, batch_size=3, progress=False)
    per_task: dict[str, list[float]] = {}
    for ex in examples:
        ids, n = hand_encode(kind, tok, ex["prompt"], ex["answer"])
        nll, tokens = per_task.setdefault(ex["task"], [0.0, 0])
        per_task[ex["task"]] = [nll + ref_answer_nll(model, ids, n), tokens + n]
    assert list(res["tasks"]) == list(per_task)
    for task, (nll, tokens) in per_task.items():
        m = res["tasks"][task]
        assert m["answer_tokens"] == tokens
        assert m["examples"] == sum(ex["task"] == task for ex in examples)
        assert m["test_loss"] == pytest.approx(nll / tokens, abs=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert m["truncated"] == 0
    total_nll = sum(v[0] for v in per_task.values())
    total_tokens = sum(v[1] for v in per_task.values())
    assert res["overall"]["answer_tokens"] == total_tokens
    assert res["overall"]["test_loss"] == pytest.approx(total_nll / total_tokens, abs=1e-5)
    assert "routing" not in res


def test_batch_size_does_not_change_results():
    tok, model = char_tokenizer(), tiny_llama()
    a = evaluate(model, tok, CHAR_EXAMPLES, batch_size=1, progress=False)
    b = evaluate(model, tok, CHAR_EXAMPLES, batch_size=16, progress=False)
    for task in a["tasks"]:
        assert a["tasks"][task]["test_loss"] == pytest.approx(b["tasks"][task]["test_loss"], abs=1e-5)
        assert a["tasks"][task].get("accuracy") == b["tasks"][task].get("accuracy")


def test_truncation_cuts_the_prompt_from_the_left():
    tok, model = char_tokenizer(), tiny_llama()
    ex = lm("play", "a long prompt that will not fit at all\n", "short answer\n")
    seq_len = 20
    res = evaluate(model, tok, [ex], seq_len=seq_len, progress=False)
    ids, n = hand_encode("char", tok, ex["prompt"], ex["answer"])
    ids = ids[-seq_len:]  # the prompt loses its start; the answer stays whole
    assert res["tasks"]["play"]["truncated"] == 1
    assert res["tasks"]["play"]["answer_tokens"] == n
    assert res["tasks"]["play"]["test_loss"] == pytest.approx(ref_answer_nll(model, ids, n) / n, abs=1e-5)


def test_accuracy_matches_per_choice_reference(setup):
    kind, tok, examples = setup
    model = tiny_llama(seed=3)
    rows = [dict(ex, task=f"row{i}") for i, ex in enumerate(examples) if "choices" in ex]
    res = evaluate(model, tok, rows, batch_size=3, progress=False)  # one task per row: per-row accuracy
    for ex in rows:
        scores = ref_choice_scores(model, kind, tok, ex)
        m = res["tasks"][ex["task"]]
        assert m["choice_examples"] == 1
        assert m["accuracy"] == float(first_argmax([s for s, _ in scores]) == ex["label"])
        assert m["accuracy_norm"] == float(first_argmax([s / n for s, n in scores]) == ex["label"])
    # the pooled accuracy of a task is the mean over its rows
    pooled = evaluate(model, tok, [dict(ex, task="all") for ex in rows], batch_size=2, progress=False)
    assert pooled["tasks"]["all"]["accuracy"] == pytest.approx(
        sum(res["tasks"][ex["task"]]["accuracy"] for ex in rows) / len(rows))
    assert "accuracy" not in res["tasks"].get("lm", {}) and "accuracy" not in pooled["overall"]


class FixedLogits(nn.Module):
    """Returns the same logits at every position; records what it was called with."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.rows_run, self.modes = 0, []

    def forward(self, input_ids, attention_mask):  # no labels argument: passing labels would raise
        self.rows_run += input_ids.shape[0]
        self.modes.append((self.training, torch.is_grad_enabled()))
        return CausalLMOutput(logits=self.bias.expand(*input_ids.shape, -1))


def test_controlled_logits_give_constructed_accuracy_and_loss():
    tok = char_tokenizer()
    ids = dict(zip(CHARS, tok.convert_tokens_to_ids(CHARS)))
    bias = torch.zeros(VOCAB)
    bias[ids["A"]] = 10.0  # " A" beats every other letter
    for c in " yes":
        bias[ids[c]] = 1.0  # " yes" is likelier per token than " no", but not in total
    lp = bias.double().log_softmax(0)
    yes_sum, no_sum = sum(lp[ids[c]] for c in " yes"), sum(lp[ids[c]] for c in " no")
    assert no_sum > yes_sum and yes_sum / 4 > no_sum / 3  # the construction holds
    examples = [mc("gold_a", "Question: q1\nA. x\nB. y\nAnswer:", "AB", 0),
                mc("gold_a", "Question: q2\nA. x\nB. y\nC. z\nAnswer:", "ABC", 0),
                mc("gold_not_a", "Question: q3\nA. x\nB. y\nAnswer:", "AB", 1),
                mc("gold_not_a", "Question: q4\nA. x\nB. y\nC. z\nD. w\nAnswer:", "ABCD", 3),
                yes_no("gold_yes", "Passage: p\nQuestion: q?\nAnswer:", 1)]
    model = FixedLogits(bias).train()
    res = evaluate(model, tok, examples, batch_size=2, progress=False)
    t = res["tasks"]
    assert (t["gold_a"]["accuracy"], t["gold_a"]["accuracy_norm"]) == (1.0, 1.0)
    assert (t["gold_not_a"]["accuracy"], t["gold_not_a"]["accuracy_norm"]) == (0.0, 0.0)
    assert (t["gold_yes"]["accuracy"], t["gold_yes"]["accuracy_norm"]) == (0.0, 1.0)
    # position-independent logits: the loss has a closed form
    assert t["gold_a"]["test_loss"] == pytest.approx(-(lp[ids[" "]] + lp[ids["A"]]).item() / 2, abs=1e-6)
    assert t["gold_not_a"]["test_loss"] == pytest.approx(
        -(2 * lp[ids[" "]] + lp[ids["B"]] + lp[ids["D"]]).item() / 4, abs=1e-6)
    assert t["gold_yes"]["test_loss"] == pytest.approx(-yes_sum.item() / 4, abs=1e-6)
    # eval mode and no grad inside; training mode restored after
    assert model.modes and all(mode == (False, False) for mode in model.modes)
    assert model.training
    no_norm = evaluate(model, tok, examples, length_normalised=False, progress=False)
    assert "accuracy_norm" not in no_norm["tasks"]["gold_yes"] and no_norm["tasks"]["gold_yes"]["accuracy"] == 0.0


def test_choices_are_read_off_the_loss_pass_when_possible(setup):
    kind, tok, examples = setup
    model = FixedLogits(torch.zeros(VOCAB))
    evaluate(model, tok, examples, batch_size=4, progress=False)
    if kind == "word":  # every continuation is one token: the loss pass already holds all of them
        extra = 0
    else:  # characters: " A" shares the context "...Answer: " with the gold; " no"/" yes" differ before their end
        extra = sum(ex["type"] == "yes_no" for ex in examples)
    assert model.rows_run == len(examples) + extra


def test_limit_keeps_the_first_examples_of_each_task():
    tok, model = char_tokenizer(), tiny_llama()
    res = evaluate(model, tok, CHAR_EXAMPLES, limit=2, progress=False)
    assert {t: m["examples"] for t, m in res["tasks"].items()} == {"play": 2, "boolq": 2, "arc": 2}
    firsts = [ex for t in ("play", "boolq", "arc") for ex in [e for e in CHAR_EXAMPLES if e["task"] == t][:2]]
    ref = evaluate(model, tok, firsts, progress=False)
    for t in ref["tasks"]:
        assert res["tasks"][t]["test_loss"] == pytest.approx(ref["tasks"][t]["test_loss"], abs=1e-6)
        assert res["tasks"][t]["answer_tokens"] == ref["tasks"][t]["answer_tokens"]
    assert res["overall"]["examples"] == 6


def test_lmoe_model_reports_routing_over_the_loss_pass():
    tok = char_tokenizer()
    cfg = LMoEConfig(num_experts=4, rank=2, target_modules=["q_proj", "v_proj"], router="topk", top_k=2)
    model = get_lmoe_model(tiny_llama(), cfg)
    randomize_lora_B(model)
    model.train()
    res = evaluate(model, tok, CHAR_EXAMPLES, batch_size=3, progress=False)
    routing = res["routing"]
    assert sorted(routing["layers"]) == sorted(model.lmoe_layers())
    loss_tokens = sum(len(ex["prompt"]) + len(ex["answer"]) for ex in CHAR_EXAMPLES)  # no padding, no choice pass
    for stats in routing["layers"].values():
        assert stats["tokens"] == loss_tokens
        assert len(stats["load"]) == len(stats["mean_gate"]) == 4
        assert sum(stats["load"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(stats["mean_gate"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < stats["entropy"] <= 1.0
    entropies = [s["entropy"] for s in routing["layers"].values()]
    assert routing["mean_entropy"] == pytest.approx(sum(entropies) / len(entropies))
    assert model.training and not model._accumulate  # mode restored, tracking switched off
    base = evaluate(tiny_llama(), tok, CHAR_EXAMPLES, progress=False)
    assert abs(res["overall"]["test_loss"] - base["overall"]["test_loss"]) > 1e-4  # the adapter is active
    model.eval()
    ex = CHAR_EXAMPLES[0]
    ids, n = hand_encode("char", tok, ex["prompt"], ex["answer"])
    one = evaluate(model, tok, [ex], progress=False)
    assert one["tasks"]["play"]["test_loss"] == pytest.approx(ref_answer_nll(model, ids, n) / n, abs=1e-5)


def test_format_table_has_one_row_per_task():
    results = {"tasks": {"boolq": {"examples": 3, "test_loss": 0.5, "perplexity": math.exp(0.5), "accuracy": 2 / 3},
                         "play": {"examples": 4, "test_loss": 2.0, "perplexity": math.exp(2.0)}},
               "overall": {"test_loss": 1.0, "perplexity": math.e}}
    results["tasks"]["gsm8k"] = {"examples": 2, "test_loss": 1.0, "perplexity": math.e, "exact_match": 0.5}
    results["tasks"]["mbpp"] = {"examples": 4, "test_loss": 1.0, "perplexity": math.e, "pass@1": 0.25,
                                "accuracy": 0.9}  # pass@1 is the headline when both exist
    lines = format_table(results).splitlines()
    assert lines[0] == "| task | examples | test loss | ppl | score |"
    assert lines[2:] == ["| boolq | 3 | 0.5000 | 1.65 | accuracy 0.6667 |", "| play | 4 | 2.0000 | 7.39 | – |",
                         "| gsm8k | 2 | 1.0000 | 2.72 | exact_match 0.5000 |",
                         "| mbpp | 4 | 1.0000 | 2.72 | pass@1 0.2500 |"]
    table = format_table(evaluate(tiny_llama(), char_tokenizer(), CHAR_EXAMPLES, progress=False))
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    assert rows == ["play", "boolq", "arc"]
    assert table.splitlines()[2].endswith("| – |") and not table.splitlines()[3].endswith("| – |")


def test_save_results_writes_valid_json_atomically(tmp_path):
    res = evaluate(tiny_llama(), char_tokenizer(), CHAR_EXAMPLES[:5], progress=False)
    path = tmp_path / "out" / "results.json"
    save_results(res, path)
    assert json.loads(path.read_text()) == res
    assert path.read_text().startswith('{\n  "tasks": {')  # indent 2
    res["overall"]["perplexity"] = math.inf  # overflowed perplexity: still valid JSON
    save_results(res, path)
    assert json.loads(path.read_text())["overall"]["perplexity"] is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left


def test_bundled_data_smoke():
    examples = load_examples(BUNDLED_DATA, "test")
    res = evaluate(tiny_llama(), char_tokenizer(), examples, seq_len=48, limit=2, batch_size=4, progress=False,
                   max_new_tokens=8)
    assert sorted(res["tasks"]) == ["arc_easy", "boolq", "gsm8k", "mbpp", "tinyshakespeare"]
    assert all(m["examples"] == 2 and m["answer_tokens"] > 0 for m in res["tasks"].values())
    assert {t for t, m in res["tasks"].items() if "accuracy" in m} == {"arc_easy", "boolq"}
    assert {t for t, m in res["tasks"].items() if "exact_match" in m} == {"gsm8k"}
    assert {t for t, m in res["tasks"].items() if "pass@1" in m} == {"mbpp"}
    assert res["tasks"]["gsm8k"]["generated"] == res["tasks"]["mbpp"]["generated"] == 2
    assert res["tasks"]["boolq"]["truncated"] == 2  # passages are longer than 48 characters
    assert math.isfinite(res["overall"]["test_loss"])


def test_bad_inputs_raise():
    tok, model = char_tokenizer(), tiny_llama()
    with pytest.raises(ValueError, match="label must be an index"):
        evaluate(model, tok, [dict(CHAR_EXAMPLES[7], label=5)], progress=False)
    with pytest.raises(ValueError, match="needs 'choice_labels'"):
        evaluate(model, tok, [{k: v for k, v in CHAR_EXAMPLES[7].items() if k != "choice_labels"}], progress=False)
    with pytest.raises(ValueError, match="limit must be"):
        evaluate(model, tok, CHAR_EXAMPLES, limit=0, progress=False)
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="no 'task'"):
        evaluate(model, tok, [{"prompt": "a", "answer": "b"}], progress=False)
    with pytest.raises(ValueError, match="a 'math' row needs 'final_answer'"):
        evaluate(model, tok, [{"task": "gsm8k", "type": "math", "prompt": "Q: 1+1\nA:", "answer": " 2"}],
                 progress=False)
    with pytest.raises(ValueError, match="FixedLogits has no generate"):
        evaluate(FixedLogits(torch.zeros(VOCAB)), tok, [math_row("Q: 1+1\nA:", "2")], progress=False)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        evaluate(model, tok, CHAR_EXAMPLES, max_new_tokens=0, progress=False)


# ---------------------------------------------------------------------------------------------
# generative tasks: gsm8k exact match, mbpp pass@1


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("#### 1,234\nQuestion: 5 more", "1234"),
    ("####-7", "-7"),
    ("the total is $18.\n#### $18.50", "18.50"),
    ("#### 5\n#### 6", "5"),  # the first #### line counts
    ("She pays 3,000 dollars, then 12.5", "12.5"),  # no ####: the last number
    ("10 - 3 = 7 apples", "7"),
    ("from 5-3 we get", "3"),  # a minus after a digit is subtraction, not a sign
    ("it fell to -4 degrees.", "-4"),
    ("lists 1, 2, 3", "3"),  # commas that are not thousands separators split numbers
    ("no numbers at all", None),
    ("####", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("text, code", [
    ("def f():\n    return 1\n\n\n\ndef g(): pass", "def f():\n    return 1"),
    ("def f():\n    return 1\nTask: more", "def f():\n    return 1"),
    ("x = 'Task: y'\n", "x = 'Task: y'\n"),  # "Task:" counts only at the start of a line
    ("def f():\n    return 1\n\nTask: more", "def f():\n    return 1\n"),
    ("Here you go:\n```python\ndef f():\n    return 1\n```\nExplanation", "def f():\n    return 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # unclosed fence: to the end
    ("def f():\n    return 1\n```\nThis solution returns one.", "def f():\n    return 1\n"),  # code, then a fence
    ("Use this:\n```py\nx = 1\n```", "x = 1\n"),  # prose before the fence does not compile
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def math_row(prompt, final, task="gsm8k"):
    return {"task": task, "type": "math", "prompt": prompt, "answer": f" so\n#### {final}", "final_answer": final}


def code_row(prompt, tests, task="mbpp"):
    return {"task": task, "type": "code", "prompt": prompt, "answer": "def add(a, b):\n    return a + b\n",
            "test_list": tests, "test_setup_code": ""}


class ScriptedLM(FixedLogits):
    """FixedLogits plus a ``generate`` that writes a fixed text per prompt, token by token, with HF's
    semantics: a row ends at eos or when the stopping criteria say so, and is padded afterwards."""

    def __init__(self, tok, script: dict[str, str]):
        super().__init__(torch.zeros(VOCAB))
        self.tok, self.script, self.calls = tok, script, []

    def generate(self, input_ids, attention_mask, stopping_criteria, max_new_tokens, pad_token_id, **kwargs):
        self.calls.append({"rows": input_ids.shape[0], "left_padded": bool(attention_mask[:, -1].all()),
                           "max_new_tokens": max_new_tokens, **kwargs})
        texts = [self.script[self.tok.decode(ids[mask.bool()])] for ids, mask in zip(input_ids, attention_mask)]
        seqs = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for t in texts]
        out, done = input_ids, torch.zeros(len(seqs), dtype=torch.bool)
        for t in range(max_new_tokens):
            nxt = torch.tensor([[pad_token_id if d or t >= len(s) else s[t]] for s, d in zip(seqs, done.tolist())])
            out = torch.cat([out, nxt], dim=1)
            done |= (nxt[:, 0] == self.tok.eos_token_id) | stopping_criteria(out, None)
            if done.all():
                break
        return out


def test_generated_answers_are_scored_as_constructed():
    tok = char_tokenizer()
    add_tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    script = {  # prompt -> what the model "writes"
        "Q: a\nA:": " 5 + 3 = 8.\n#### 8\nQuestion: and then 9",  # stops after the #### line: 8, correct
        "Q: bb\nA:": " The answer is 1,234.0 dollars",  # no ####: the last number, 1234.0 == 1234
        "Q: ccc\nA:": " #### 12\n",  # wrong
        "Q: dddd\nA:": " I do not know",  # nothing to extract
        "T: add1\nS:\n": "def add(a, b):\n    return a + b\n\n\n\nTask: write more",  # passes
        "T: add2\nS:\n": "```python\ndef add(a, b):\n    return a - b\n```\nIt subtracts.",  # assertion
        "T: add3\nS:\n": "def add(a, b)\n    return a + b\n",  # syntax error: never run
        "T: add4\nS:\n": "def add(a, b):\n    while True:\n        pass\n",  # timeout
        "T: add5\nS:\n": "def add(a, b):\n    return b + a\n```\nThis adds them.",  # passes; stops at the fence
    }
    rows = [math_row("Q: a\nA:", "8"), math_row("Q: bb\nA:", "1234"), math_row("Q: ccc\nA:", "13"),
            math_row("Q: dddd\nA:", "3")] + [code_row(f"T: add{k}\nS:\n", add_tests) for k in (1, 2, 3, 4, 5)]
    model = ScriptedLM(tok, script)
    res = evaluate(model, tok, rows, batch_size=3, max_new_tokens=64, keep_samples=True, sandbox_timeout=1.0,
                   progress=False)
    g, c = res["tasks"]["gsm8k"], res["tasks"]["mbpp"]
    assert (g["exact_match"], g["generated"], g["max_new_tokens"]) == (0.5, 4, 64)
    assert (c["pass@1"], c["syntax_error_rate"]) == (0.4, 0.2)
    assert c["failures"] == {"assertion": 1, "syntax": 1, "timeout": 1}
    gs = res["samples"]["gsm8k"]
    assert [s["prompt_index"] for s in gs] == [0, 1, 2, 3]
    assert [s["extracted"] for s in gs] == ["8", "1234.0", "12", None]
    assert [s["correct"] for s in gs] == [True, True, False, False]
    assert gs[0]["generation"] == " 5 + 3 = 8.\n#### 8\n"  # the stopping criterion ended that row
    assert gs[1]["generation"] == script["Q: bb\nA:"] and gs[1]["gold"] == "1234"
    cs = res["samples"]["mbpp"]
    assert [s["error"] for s in cs] == [None, "assertion", "syntax", "timeout", None]
    assert cs[4]["generation"] == "def add(a, b):\n    return b + a\n```"
    assert cs[0]["generation"] == "def add(a, b):\n    return a + b\n\n\n"  # stopped at the blank lines
    assert cs[0]["extracted"] == "def add(a, b):\n    return a + b"
    assert cs[1]["extracted"] == "def add(a, b):\n    return a - b\n"
    assert all(call["left_padded"] and call["do_sample"] is False and call["use_cache"] is True
               for call in model.calls)
    assert [call["rows"] for call in model.calls] == [3, 1, 3, 2]  # per kind, batches of batch_size
    assert "samples" not in evaluate(model, tok, rows[:4], max_new_tokens=64, progress=False)
    off = evaluate(model, tok, rows, generate_tasks=False, progress=False)
    assert "exact_match" not in off["tasks"]["gsm8k"] and "pass@1" not in off["tasks"]["mbpp"]
    assert len(model.calls) == 5  # 4 above, 1 for rows[:4] (batch_size 8); none with generate_tasks=False


def test_left_padded_batches_generate_what_single_prompts_do(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny_llama(seed=4, vocab_size=len(tok))
    prompts = ["the cat sat on the mat Question: the dog Answer:", "the dog ran", "Question: a b Answer:",
               "the", "a b c d e f g h the cat sat on"]
    rows = [math_row(p, "1") for p in prompts]
    batched = evaluate(model, tok, rows, batch_size=3, max_new_tokens=8, keep_samples=True, progress=False)
    single = evaluate(model, tok, rows, batch_size=1, max_new_tokens=8, keep_samples=True, progress=False)
    texts = [s["generation"] for s in batched["samples"]["gsm8k"]]
    assert texts == [s["generation"] for s in single["samples"]["gsm8k"]]
    for prompt, text in zip(prompts, texts):  # reference: the plain, unpadded generate call
        enc = tok(prompt, return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0]
        new = new[enc["input_ids"].shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert text == tok.decode(new, skip_special_tokens=True)
    assert sum(len(t.split()) for t in texts) > 10  # the model did write something


def test_format_markdown_and_save_results_markdown(tmp_path):
    results = {"tasks": {"boolq": {"examples": 3, "test_loss": 0.5, "perplexity": math.exp(0.5), "accuracy": 2 / 3,
                                   "accuracy_norm": 1 / 3},
                         "mbpp": {"examples": 4, "test_loss": 1.0, "perplexity": math.e, "pass@1": 0.25,
                                  "syntax_error_rate": 0.5, "failures": {"syntax": 2, "assertion": 1},
                                  "generated": 4, "max_new_tokens": 256, "sandbox": "network=netns"}},
               "overall": {"examples": 7, "test_loss": 0.8, "perplexity": math.exp(0.8)},
               "routing": {"layers": {"a.q": {"entropy": 0.9}, "a.v": {"entropy": 0.7}}, "mean_entropy": 0.8}}
    md = format_markdown(results)
    lines = md.splitlines()
    assert lines[0] == "## Evaluation"
    assert lines[2:7] == format_table(results).splitlines() + ["| **overall** | 7 | 0.8000 | 2.23 | – |"]
    assert "- **boolq**: accuracy_norm 0.3333 (per-token log-likelihood)" in lines
    assert ("- **mbpp**: 4 greedy generations of at most 256 new tokens; syntax_error_rate 0.5000; "
            "failures: assertion 1, syntax 2") in lines
    assert "- code ran in `lmoe.sandbox` (network=netns)" in lines
    assert any(line.startswith("Routing (loss pass, padding masked): mean normalised gate entropy 0.800 over 2 "
                               "adapted layers") and "lowest 0.700 in `a.v`, highest 0.900 in `a.q`" in line
               for line in lines)
    path = tmp_path / "eval.json"
    save_results(results, path, markdown=True)
    assert path.with_suffix(".md").read_text() == md and json.loads(path.read_text()) == results
    save_results(results, tmp_path / "plain.json")
    assert not (tmp_path / "plain.md").exists()


def test_per_example_lists_average_to_the_task_metrics():
    import math as _m

    from tests.conftest import build_tiny_tokenizer
    from tests.helpers import tiny_llama

    tok = build_tiny_tokenizer(add_bos=True)
    model = tiny_llama(vocab_size=len(tok))
    rows = [{"task": "qa", "type": "yes_no", "prompt": "Question: the cat sat\nAnswer:", "answer": " yes",
             "choices": ["no", "yes"], "label": 1},
            {"task": "qa", "type": "yes_no", "prompt": "Question: the dog ran on the mat\nAnswer:", "answer": " no",
             "choices": ["no", "yes"], "label": 0},
            {"task": "lm", "type": "lm", "prompt": "the cat", "answer": " sat on the mat"}]
    res = evaluate(model, tok, rows, batch_size=2, progress=False, per_example=True, generate_tasks=False)
    qa, lm = res["tasks"]["qa"], res["tasks"]["lm"]
    assert len(qa["per_example"]["loss"]) == 2 and qa["per_example"]["accuracy"] in ([0, 0], [0, 1], [1, 0], [1, 1])
    assert sum(qa["per_example"]["accuracy"]) / 2 == qa["accuracy"]
    # one answer token per qa row: the mean of per-row losses equals the token-weighted task loss
    assert _m.isclose(sum(qa["per_example"]["loss"]) / 2, qa["test_loss"], rel_tol=1e-9)
    assert _m.isclose(lm["per_example"]["loss"][0], lm["test_loss"], rel_tol=1e-9)
    assert "per_example" not in evaluate(model, tok, rows, progress=False, generate_tasks=False)["tasks"]["qa"]
