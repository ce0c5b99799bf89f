"""lmoe.inspect: per-task routing statistics against a one-sequence-at-a-time reference, the
specialisation score against hand-computed values, the plots, the collapse warning, ``lmoe inspect``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math

import pytest
import torch
from transformers import TrainerControl, TrainerState

from lmoe import LMoEConfig, get_lmoe_model
from lmoe.inspect import (CollapseDetector, add_parser, blocks, cmd_inspect, load_entropy, plot_entropy_by_layer,
                          plot_task_expert_heatmaps, routing_by_task, specialisation_score)
from tests.helpers import save_tiny_model_dir, randomize_lora_B, tiny_llama

ROWS = [
    {"task": "qa", "type": "yes_no", "prompt": "Question: the cat sat on the mat Answer:", "answer": " yes",
     "choices": ["no", "yes"], "label": 1},
    {"task": "qa", "type": "yes_no", "prompt": "Question: the dog Answer:", "answer": " no",
     "choices": ["no", "yes"], "label": 0},
    {"task": "lm", "type": "lm", "prompt": "the cat", "answer": " sat on the mat"},
    {"task": "lm", "type": "lm", "prompt": "a b c d e f g h", "answer": " the dog ran on the mat the cat sat"},
    {"task": "lm", "type": "lm", "prompt": "the", "answer": " dog"},
]
PNG = b"\x89PNG\r\n\x1a\n"


def lmoe_tiny(tok, router="softmax", seed=0):
    cfg = LMoEConfig(num_experts=4, rank=2, target_modules=["q_proj", "v_proj", "down_proj"], router=router,
                     top_k=2)
    torch.manual_seed(seed)
    model = get_lmoe_model(tiny_llama(vocab_size=len(tok)), cfg)
    randomize_lora_B(model)
    return model


@torch.no_grad()
def reference(model, tok, rows, k):
    """Per layer, from one unpadded sequence at a time: (sum of dispatch one-hots / k, sum of gates,
    sum of exp(H(g)), tokens)."""
    acc = {}
    for ex in rows:
        ids = tok(ex["prompt"])["input_ids"] + tok(ex["answer"], add_special_tokens=False)["input_ids"]
        model(input_ids=torch.tensor([ids]))
        for name, m in model.lmoe_layers().items():
            logits, g = m.last_routing
            load = torch.zeros_like(g).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0 / k)
            eff = (-(g * g.clamp_min(1e-20).log()).sum(-1)).exp()
            a = acc.setdefault(name, [0.0, 0.0, 0.0, 0])
            acc[name] = [a[0] + load.sum(0), a[1] + g.sum(0), a[2] + eff.sum().item(), a[3] + len(ids)]
    return acc


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_routing_by_task_matches_one_sequence_at_a_time(tiny_tokenizer, router):
    tok = tiny_tokenizer
    model = lmoe_tiny(tok, router).train()
    stats = routing_by_task(model, tok, ROWS, batch_size=2)  # padded batches
    assert stats["layers"] == list(model.lmoe_layers()) and stats["num_experts"] == 4
    assert list(stats["tasks"]) == ["qa", "lm"]
    k = 2 if router == "topk" else 1
    for task, t in stats["tasks"].items():
        rows = [ex for ex in ROWS if ex["task"] == task]
        ref = reference(model, tok, rows, k)
        assert t["examples"] == len(rows)
        for name, s in t["layers"].items():
            load, gate, eff, tokens = ref[name]
            assert s["tokens"] == tokens == t["tokens"]  # padding left out
            assert sum(s["load"]) == pytest.approx(1.0, abs=1e-6)
            assert sum(s["mean_gate"]) == pytest.approx(1.0, abs=1e-5)
            assert s["load"] == pytest.approx((load / tokens).tolist(), abs=1e-6)
            assert s["mean_gate"] == pytest.approx((gate / tokens).tolist(), abs=1e-5)
            assert s["effective_experts"] == pytest.approx(eff / tokens, rel=1e-5)
            assert 1.0 <= s["effective_experts"] <= (2.0 if router == "topk" else 4.0) + 1e-6
            assert s["load_entropy"] == pytest.approx(load_entropy(s["load"]))
    assert model.training and not model._accumulate
    assert all(not m._forward_hooks for m in model.lmoe_layers().values())  # hooks removed


def two_tasks(a, b, value="load"):
    """Hand-made stats: one layer 'L', tasks 'x' and 'y' with the given distributions."""
    layer = lambda p: {value: p, "load": p, "mean_gate": p, "entropy": 0.5, "effective_experts": 2.0,
                       "load_entropy": load_entropy(p), "tokens": 10}
    return {"layers": ["L"], "num_experts": len(a),
            "tasks": {"x": {"layers": {"L": layer(a)}}, "y": {"layers": {"L": layer(b)}}}}


def test_specialisation_score_by_hand():
    assert specialisation_score(two_tasks([0.3, 0.7], [0.3, 0.7])) == {"L": 0.0}
    assert specialisation_score(two_tasks([1.0, 0.0], [0.0, 1.0])) == {"L": pytest.approx(1.0)}
    # x = (1/2, 1/2), y = (1, 0): mixture (3/4, 1/4); JSD = H(3/4, 1/4) - (ln 2 + 0) / 2, over ln 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (h - math.log(2) / 2) / math.log(2)
    assert expected == pytest.approx(0.3113, abs=1e-4)
    assert specialisation_score(two_tasks([0.5, 0.5], [1.0, 0.0]))["L"] == pytest.approx(expected, abs=1e-12)
    # K = 2 tasks on N = 4 experts: disjoint pairs of experts is the maximum, 1; the bound is ln min(K, N)
    assert specialisation_score(two_tasks([0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]))["L"] == pytest.approx(1.0)
    assert specialisation_score(two_tasks([0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]))["L"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least two tasks"):
        specialisation_score({"layers": ["L"], "tasks": {"x": {}}})
    with pytest.raises(ValueError, match="value must be one of"):
        specialisation_score(two_tasks([1, 0], [0, 1]), value="entropy")


def test_load_entropy_and_blocks():
    assert load_entropy([0.25] * 4) == pytest.approx(1.0)
    assert load_entropy([1.0, 0, 0, 0]) == 0.0
    assert load_entropy([0.5, 0.5, 0, 0]) == pytest.approx(0.5)  # two of four experts: ln 2 / ln 4
    assert load_entropy([1.0]) == 1.0
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.11.self_attn.q_proj"]
    assert blocks(names) == {0: names[:2], 11: names[2:]}
    assert blocks(["up", "down"]) == {0: ["up"], 1: ["down"]}


def test_plots_are_valid_pngs(tiny_tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    tok = tiny_tokenizer
    stats = routing_by_task(lmoe_tiny(tok), tok, ROWS)
    for value in ("mean_gate", "load"):
        path = plot_task_expert_heatmaps(stats, [0, stats["layers"][-1]], tmp_path / f"heat_{value}.png", value)
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 1024
    path = plot_entropy_by_layer(stats, tmp_path / "sub" / "entropy.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1024
    with pytest.raises(ValueError, match="unknown or no layers"):
        plot_task_expert_heatmaps(stats, ["nope"], tmp_path / "x.png")


class FakeRouted(torch.nn.Module):
    def __init__(self, loads):
        super().__init__()
        self.loads = loads

    def routing_stats(self):
        return {name: {"load": load, "mean_gate": load, "entropy": 0.5, "tokens": 8}
                for name, load in self.loads.items()}


class Wrapped(torch.nn.Module):  # what DistributedDataParallel looks like from outside
    def __init__(self, module):
        super().__init__()
        self.module = module


def _log(cb, model, logs=None, step=7):
    state = TrainerState()
    state.global_step = step
    cb.on_log(None, state, TrainerControl(), logs={"loss": 1.0} if logs is None else logs, model=model)


def test_collapse_detector_warns_on_one_hot_load_only(caplog):
    onehot, uniform = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.125] * 8
    cb = CollapseDetector(threshold=0.5)
    with caplog.at_level(logging.WARNING, logger="lmoe"):
        _log(cb, Wrapped(FakeRouted({"layers.0.q_proj": uniform, "layers.1.q_proj": onehot})))
    assert cb.collapsed == {"layers.1.q_proj": 0.0}
    [record] = caplog.records
    assert record.name == "lmoe" and record.levelno == logging.WARNING
    msg = record.getMessage()
    assert msg.startswith("routing collapse at step 7: 1 of 2 adapted layers have load entropy < 0.50")
    assert "fewer than 2.8 of 8 experts" in msg and "layers.1.q_proj 0.00" in msg and "layers.0" not in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmoe"):
        _log(cb, FakeRouted({"a": uniform, "b": [0.2, 0.3, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]}))
        _log(cb, FakeRouted({"a": onehot}), logs={"eval_loss": 1.0})  # not a training log
    assert not caplog.records and cb.collapsed == {}
    every = CollapseDetector(every=2)
    with caplog.at_level(logging.WARNING, logger="lmoe"):
        for step in range(4):
            _log(every, FakeRouted({"a": onehot}), step=step)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["routing collapse at step 0",
                                                                      "routing collapse at step 2"]
    with pytest.raises(ValueError, match="threshold must be in"):
        CollapseDetector(threshold=1.5)


def test_collapse_detector_reads_a_real_lmoe_model(tiny_tokenizer):
    tok = tiny_tokenizer
    model = lmoe_tiny(tok)
    model(**tok(["the cat sat on the mat"], return_tensors="pt"))
    strict, lenient = CollapseDetector(threshold=1.0), CollapseDetector(threshold=0.0)
    _log(strict, model)
    _log(lenient, model)
    assert set(strict.collapsed) == set(model.lmoe_layers())  # 6 tokens over 4 experts: never exactly even
    assert lenient.collapsed == {}


@pytest.fixture(scope="module")
def inspect_workdir(tmp_path_factory):

    d = tmp_path_factory.mktemp("inspect")
    tok = save_tiny_model_dir(d / "model")
    lmoe_tiny(tok).save_pretrained(d / "adapter")
    (d / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lmoe")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["inspect", *argv])


def test_cmd_inspect_writes_json_plots_and_summary(inspect_workdir, capsys):
    d = inspect_workdir
    out = d / "routing"
    args = _parse(["--model", str(d / "model"), "--adapter", str(d / "adapter"), "--data", str(d / "mix.jsonl"),
                   "--limit", "2", "--batch-size", "2", "--output-dir", str(out)])
    assert cmd_inspect(args) == 0
    stats = json.loads((out / "routing.json").read_text())
    assert {t: s["examples"] for t, s in stats["tasks"].items()} == {"qa": 2, "lm": 2}
    assert set(stats["specialisation"]) == set(stats["layers"]) and len(stats["layers"]) == 6
    captured = capsys.readouterr()
    assert "| layers | gate entropy | effective experts | load entropy | specialisation |" in captured.out
    assert [line.split(" | ")[0] for line in captured.out.splitlines() if line.startswith("| 0") or
            line.startswith("| 1")] == ["| 0", "| 1"]
    pngs = [out / name for name in ("heatmap_layer0.png", "heatmap_layer1.png", "entropy_by_layer.png")]
    if importlib.util.find_spec("matplotlib"):
        assert all(p.read_bytes()[:8] == PNG for p in pngs)
    else:
        assert not any(p.exists() for p in pngs) and "matplotlib is not installed" in captured.err
    with pytest.raises(ValueError, match=r"--layers \[5\] not found; layers with adapters: 0..1"):
        cmd_inspect(_parse(["--model", str(d / "model"), "--adapter", str(d / "adapter"), "--data",
                            str(d / "mix.jsonl"), "--layers", "5", "--output-dir", str(out)]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cmd_inspect(_parse(["--model", str(d / "model"), "--adapter", str(d / "nothing")]))
